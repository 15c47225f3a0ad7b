//! From a resolved image to an ember base image: its layers applied in order onto a staging
//! tree (each blob's digest checked as it streams), ember's own files added as `rootfs/build`
//! adds them, then `mkfs.ext4 -d` of the tree into a temp file that is renamed into place only
//! once it is complete and checked. Nothing is left behind on failure.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::fs::{self as rfs, FileType, Mode, OFlags};

use crate::apply::{self, LayerStats};
use crate::digest::{Digest, HashingReader};
use crate::error::{io, ImageError, LayerError};
use crate::oci::Compression;
use crate::source::{LayerBlob, Resolved};
use crate::store::{write_atomic, Entry, ExecDefaults, Store};
use crate::tree::{self, Tree};

/// ember's files, as `rootfs/overlay/` holds them (owners root, modes 0755 or 0644).
const OVERLAY: [(&str, &[u8], u32); 3] = [
    ("sbin/ember-init", include_bytes!("../../../rootfs/overlay/sbin/ember-init"), 0o755),
    ("etc/hostname", include_bytes!("../../../rootfs/overlay/etc/hostname"), 0o644),
    ("etc/hosts", include_bytes!("../../../rootfs/overlay/etc/hosts"), 0o644),
];
const AGENT_PATH: &str = "usr/local/sbin/ember-agent";

pub struct BuildOptions {
    /// `name:tag` the image is known by.
    pub name: String,
    /// Size of the ext4 file system (the file is sparse).
    pub capacity: u64,
    /// The static guest agent to put in.
    pub agent: PathBuf,
}

/// Where a build's time went (all zero when the image was built before and only named).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BuildTimes {
    /// Layers decompressed, checked and applied onto the staging tree, and ember's files added.
    pub unpack: Duration,
    /// `mkfs.ext4 -d` of the tree.
    pub mkfs: Duration,
    /// `e2fsck -fn` of the new file system.
    pub fsck: Duration,
}

/// Builds `image` into `store` (unless an image of that manifest and capacity is there) and
/// names it. `progress` gets one line per step.
pub fn build(store: &Store, image: Resolved, opts: &BuildOptions, progress: &mut dyn FnMut(String)) -> Result<(Entry, BuildTimes), ImageError> {
    let file = format!("{}-{}.ext4", image.digest.hex(), opts.capacity);
    let entry = Entry {
        name: opts.name.clone(),
        digest: image.digest.to_string(),
        file: file.clone(),
        capacity: opts.capacity,
        config: image.config.clone(),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    let dest = store.dir().join(&file);
    if dest.exists() && dest.with_extension("json").exists() {
        progress(format!("{}: {} already built", image.image, image.digest));
        store.add(entry.clone())?;
        return Ok((entry, BuildTimes::default()));
    }
    let started = Instant::now();
    std::fs::create_dir_all(store.dir()).map_err(io("cannot create", store.dir()))?;
    let scratch = Scratch::new(store.dir())?;
    let root = scratch.0.join("root");
    std::fs::create_dir(&root).map_err(io("cannot create", &root))?;
    let tree = Tree::open(&root).map_err(io("cannot open", &root))?;
    let mut content = 0;
    let n = image.layers.len();
    for (i, layer) in image.layers.into_iter().enumerate() {
        let shown = layer.digest.to_string();
        let stats = apply_blob(&tree, layer).map_err(|error| ImageError::Layer { image: image.image.clone(), layer: shown.clone(), error })?;
        content += stats.bytes;
        progress(format!("layer {}/{n} {shown}: {} entries, {} MiB unpacked", i + 1, stats.entries, stats.bytes >> 20));
    }
    let defaults = finish_tree(&tree, &image.image, &image.config, &opts.agent)?;
    // mkfs.ext4 needs room for metadata and the journal beside the files.
    if content + content / 8 + (8 << 20) > opts.capacity {
        return Err(ImageError::TooSmall { image: image.image, content_mib: content >> 20, capacity_mib: opts.capacity >> 20 });
    }
    let mut times = BuildTimes { unpack: started.elapsed(), ..BuildTimes::default() };
    let out = scratch.0.join("image.ext4");
    mkfs(&image.image, &root, &out, opts.capacity, &mut times)?;
    progress(format!(
        "{}: unpacked in {:.2} s, ext4 of {} MiB made in {:.2} s, checked in {:.2} s",
        image.image,
        times.unpack.as_secs_f64(),
        opts.capacity >> 20,
        times.mkfs.as_secs_f64(),
        times.fsck.as_secs_f64()
    ));
    write_atomic(&dest.with_extension("json"), &serde_json::to_vec_pretty(&defaults).expect("defaults serialize"))?;
    // A base image is read by every sandbox's VMM, jailed as a uid of its own, and never
    // written: read-only for all, as rootfs/build makes the default images.
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o444)).map_err(io("cannot make read-only", &out))?;
    std::fs::rename(&out, &dest).map_err(io("cannot rename into place", &dest))?;
    store.add(entry.clone())?;
    Ok((entry, times))
}

/// Applies one layer blob, its digest and size checked over all its bytes: a blob that does
/// not match is reported as that, even when it also failed to unpack.
fn apply_blob(tree: &Tree, layer: LayerBlob) -> Result<LayerStats, LayerError> {
    let len = layer.file.metadata().map_err(LayerError::Tar)?.len();
    if let Some(size) = layer.size {
        if len < size {
            return Err(LayerError::Truncated { expected: size, actual: len });
        }
    }
    let mut reader = HashingReader::new(BufReader::new(layer.file));
    let applied = match layer.compression {
        Compression::None => apply::apply(tree, &mut reader),
        Compression::Gzip => apply::apply(tree, flate2::read::MultiGzDecoder::new(&mut reader)),
        Compression::Zstd => match ruzstd::decoding::StreamingDecoder::new(&mut reader) {
            Ok(d) => apply::apply(tree, d),
            Err(e) => Err(LayerError::Tar(std::io::Error::other(e.to_string()))),
        },
    };
    let (actual, _) = reader.finish().map_err(LayerError::Tar)?;
    if actual != layer.digest {
        return Err(LayerError::Digest { expected: layer.digest.to_string(), actual: actual.to_string() });
    }
    applied
}

/// A directory beside the images for one build, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: &Path) -> Result<Scratch, ImageError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(".build-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).map_err(io("cannot create", &path))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // remove_dir_all does not follow symlinks, so the tree's links cannot take it outside.
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// A scratch directory for a `docker save` archive's unpacking, removed when dropped.
pub struct ScratchDir(Scratch);

impl ScratchDir {
    pub fn new(beside: &Path) -> Result<ScratchDir, ImageError> {
        std::fs::create_dir_all(beside).map_err(io("cannot create", beside))?;
        Scratch::new(beside).map(ScratchDir)
    }

    pub fn path(&self) -> &Path {
        &self.0 .0
    }
}

fn layer_err(image: &str, what: &str) -> impl FnOnce(LayerError) -> ImageError {
    let (image, layer) = (image.to_string(), format!("(ember's files: {what})"));
    move |error| ImageError::Layer { image, layer, error }
}

/// Adds ember's files and what a boot needs, as `rootfs/build`'s copy_overlay, install_agent
/// and finish_tree do; returns the image's exec defaults, its user resolved in its passwd.
fn finish_tree(tree: &Tree, image: &str, config: &crate::oci::RunConfig, agent: &Path) -> Result<ExecDefaults, ImageError> {
    let agent_bytes = std::fs::read(agent).map_err(io("cannot read the agent", agent))?;
    for (path, bytes, mode) in OVERLAY.iter().copied().chain([(AGENT_PATH, &agent_bytes[..], 0o755)]) {
        write_file(tree, path, bytes, mode).map_err(layer_err(image, path))?;
    }
    let sbin = tree.dir("sbin/init", &["sbin".into()], true).map_err(layer_err(image, "sbin/init"))?;
    let e = |what| layer_err(image, what);
    let errno = |what: &'static str| move |err: rustix::io::Errno| LayerError::Io { path: what.into(), what: "cannot make", error: err.into() };
    tree::remove_at(sbin.as_fd(), OsStr::new("init")).map_err(errno("sbin/init")).map_err(e("sbin/init"))?;
    rfs::symlinkat("ember-init", &sbin, "init").map_err(errno("sbin/init")).map_err(e("sbin/init"))?;
    for (dir, mode) in [("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("run", 0o755), ("root", 0o700)] {
        let fd = tree.dir(dir, &[dir.into()], true).map_err(e(dir))?;
        rfs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(errno("a top directory")).map_err(e(dir))?;
    }
    // The kernel opens /dev/console for init before anything is mounted.
    let dev = tree.dir("dev", &["dev".into()], true).map_err(e("dev"))?;
    for (name, mode, major, minor) in [("console", 0o600, 5, 1), ("null", 0o666, 1, 3)] {
        if tree::kind_at(dev.as_fd(), OsStr::new(name)).map_err(errno("dev")).map_err(e("dev"))?.is_none() {
            rfs::mknodat(&dev, name, FileType::CharacterDevice, Mode::from_raw_mode(mode), rfs::makedev(major, minor))
                .map_err(errno("dev node"))
                .map_err(e("dev"))?;
        }
    }
    // ember-init is a POSIX sh script.
    if tree.open_file("bin/sh").is_err() {
        return Err(ImageError::Bad { image: image.into(), problem: "it has no /bin/sh, which ember's init (a sh script) needs".into() });
    }
    let env = config.env.iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let user = config.user.as_deref().filter(|u| !u.is_empty()).map(|u| resolve_user(tree, u)).transpose().map_err(|problem| ImageError::Bad { image: image.into(), problem })?;
    Ok(ExecDefaults {
        env,
        cwd: config.working_dir.clone().filter(|d| !d.is_empty()),
        user,
        entrypoint: config.entrypoint.clone(),
        cmd: config.cmd.clone(),
    })
}

fn write_file(tree: &Tree, path: &str, bytes: &[u8], mode: u32) -> Result<(), LayerError> {
    let comps = tree::components(Path::new(path))?;
    let (name, parent) = comps.split_last().expect("a constant path");
    let dir = tree.dir(path, parent, true)?;
    let fail = |what| move |e: rustix::io::Errno| LayerError::Io { path: path.into(), what, error: e.into() };
    tree::remove_at(dir.as_fd(), name).map_err(fail("cannot replace"))?;
    let fd = rfs::openat(&dir, name, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::from_raw_mode(mode))
        .map_err(fail("cannot create"))?;
    let mut f = File::from(fd);
    f.write_all(bytes).map_err(LayerError::Tar)?;
    rfs::fchown(&f, Some(rustix::process::Uid::ROOT), Some(rustix::process::Gid::ROOT)).map_err(fail("cannot set the owner"))?;
    rfs::fchmod(&f, Mode::from_raw_mode(mode)).map_err(fail("cannot set the mode"))
}

/// The image's `User` (`name`, `uid`, `name:group`, `uid:gid`) as `uid:gid` from its own
/// passwd and group files, or a plain name for the guest to look up with its groups.
fn resolve_user(tree: &Tree, user: &str) -> Result<String, String> {
    let read = |p: &str| {
        let mut s = String::new();
        tree.open_file(p).ok().and_then(|f| f.take(16 << 20).read_to_string(&mut s).ok()).map(|_| s).unwrap_or_default()
    };
    let lookup = |file: &str, key: &str| -> Option<(u32, u32)> {
        read(file).lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() > 3 && (f[0] == key || f[2] == key)).and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) if g.is_none() => return Ok(u.to_string()),
        Err(_) => lookup("etc/passwd", u).ok_or_else(|| format!("its user {u:?} is not in its /etc/passwd"))?.0,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => read("etc/group").lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() > 2 && f[0] == g).and_then(|f| f[2].parse().ok()).ok_or_else(|| format!("its group {g:?} is not in its /etc/group"))?,
        },
        None => lookup("etc/passwd", &uid.to_string()).map_or(0, |(_, gid)| gid),
    };
    Ok(format!("{uid}:{gid}"))
}

/// As `rootfs/build`'s make_image: inode tables and journal written now, not lazily by every
/// sandbox's kernel; then checked.
fn mkfs(image: &str, root: &Path, out: &Path, capacity: u64, times: &mut BuildTimes) -> Result<(), ImageError> {
    let started = Instant::now();
    let run = |cmd: &mut Command| -> Result<(), ImageError> {
        let output = cmd.output().map_err(|e| ImageError::Mkfs { image: image.into(), output: format!("cannot run {cmd:?}: {e} (e2fsprogs installed?)") })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ImageError::Mkfs { image: image.into(), output: String::from_utf8_lossy(&output.stderr).trim().to_string() + &String::from_utf8_lossy(&output.stdout) })
        }
    };
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-T", "default", "-m", "0", "-L", "ember-oci", "-E", "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0", "-d"])
        .arg(root)
        .arg(out)
        .arg(format!("{}k", capacity / 1024)))?;
    times.mkfs = started.elapsed();
    let started = Instant::now();
    run(Command::new("e2fsck").arg("-fn").arg(out))?;
    times.fsck = started.elapsed();
    Ok(())
}

/// Where the static agent comes from: `EMBER_AGENT`, else `$EMBER_HOME/ember-agent`, else the
/// one in `$EMBER_HOME/images/default.ext4` (every installation's base image carries it),
/// copied out into `scratch`.
pub fn find_agent(scratch: &Path) -> Result<PathBuf, ImageError> {
    if let Some(p) = std::env::var_os("EMBER_AGENT").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var_os("EMBER_HOME").map(PathBuf::from).ok_or(ImageError::NoAgent)?;
    if home.join("ember-agent").is_file() {
        return Ok(home.join("ember-agent"));
    }
    let out = scratch.join("ember-agent");
    for image in ["default.ext4", "test.ext4"] {
        let img = home.join("images").join(image);
        if !img.is_file() {
            continue;
        }
        let status = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /{AGENT_PATH} {}", out.display()))
            .arg(&img)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status();
        if status.is_ok_and(|s| s.success()) && std::fs::metadata(&out).is_ok_and(|m| m.len() > 0) {
            return Ok(out);
        }
    }
    Err(ImageError::NoAgent)
}

/// The digest of a file's content (for tests and the cache's checks).
pub fn file_digest(path: &Path) -> std::io::Result<Digest> {
    HashingReader::new(File::open(path)?).finish().map(|(d, _)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_with(files: &[(&str, &str)]) -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let tree = Tree::open(dir.path()).unwrap();
        (dir, tree)
    }

    #[test]
    fn users_resolve_in_the_image_s_own_passwd_and_group() {
        let (_dir, tree) = tree_with(&[
            ("etc/passwd", "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"),
            ("etc/group", "root:x:0:\nstaff:x:50:\n"),
        ]);
        assert_eq!(resolve_user(&tree, "app").unwrap(), "app", "a name alone stays for the guest");
        assert_eq!(resolve_user(&tree, "1000").unwrap(), "1000:1001", "a uid takes its passwd group");
        assert_eq!(resolve_user(&tree, "4242").unwrap(), "4242:0", "a uid not in passwd: group 0, as docker");
        assert_eq!(resolve_user(&tree, "app:staff").unwrap(), "1000:50");
        assert_eq!(resolve_user(&tree, "7:8").unwrap(), "7:8");
        assert!(resolve_user(&tree, "nobody:staff").unwrap_err().contains("nobody"));
        assert!(resolve_user(&tree, "app:wheel").unwrap_err().contains("wheel"));
    }

    #[test]
    fn zstd_and_gzip_layers_apply_and_a_wrong_digest_is_named() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("hello").unwrap();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, &b"hi"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let zstd = ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        for (bytes, compression) in [(zstd, Compression::Zstd), (gz, Compression::Gzip)] {
            let (dir, tree) = tree_with(&[]);
            let blobs = tempfile::tempdir().unwrap();
            let blob = blobs.path().join("blob");
            std::fs::write(&blob, &bytes).unwrap();
            let layer = |digest| LayerBlob { digest, size: Some(bytes.len() as u64), compression, file: File::open(&blob).unwrap() };
            let stats = apply_blob(&tree, layer(Digest::of(&bytes))).unwrap();
            assert_eq!((stats.entries, stats.bytes), (1, 2), "{compression:?}");
            assert_eq!(std::fs::read(dir.path().join("hello")).unwrap(), b"hi");
            let e = apply_blob(&tree, layer(Digest::of(b"other"))).unwrap_err();
            assert!(matches!(e, LayerError::Digest { .. }), "{e}");
        }
    }
}
