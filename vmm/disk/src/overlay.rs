//! Operations on overlays, behind `ember disk`: create one over a base (or over a frozen
//! overlay), show a chain, and flatten a chain into a standalone sparse raw image. Each takes
//! the format of the file it is given (never guessed from its content) and the
//! [`BackingPolicy`] that the backing files of the chain must meet.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};
use vm_memory::VolatileSlice;

use super::qcow2::{open_chain, write_overlay, Extent, CLUSTER_SIZE};
use super::{check_size, seek_data, seek_hole, BackingPolicy, DiskError, Format};

/// One layer of a chain, as `ember disk info` shows it (and, serialized, `--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// Absolute path of the file.
    #[serde(serialize_with = "lossy_path")]
    pub path: PathBuf,
    pub format: Format,
    /// Size of the disk the layer describes.
    pub virtual_size: u64,
    /// Length of the file.
    pub file_size: u64,
    /// Bytes the file occupies on the host (st_blocks * 512).
    pub allocated_bytes: u64,
    /// The backing file as recorded in the layer (qcow2 only).
    #[serde(rename = "backing_file", serialize_with = "lossy_opt_path")]
    pub backing: Option<PathBuf>,
    /// The backing format as recorded in the layer (qcow2 only).
    pub backing_format: Option<String>,
    /// Cluster size (qcow2 only).
    pub cluster_size: Option<u64>,
    /// Whether the layer has subclusters (qcow2 extended L2 entries: 32 per cluster).
    pub subclusters: bool,
}

/// A path as JSON: a file name need not be UTF-8, and `info` must show it anyway.
fn lossy_path<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

fn lossy_opt_path<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match path {
        Some(p) => lossy_path(p, s),
        None => s.serialize_none(),
    }
}

/// Removes a file on drop unless disarmed: the half-made output of a failed operation.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |error| DiskError::Io { path: path.into(), op, error }
}

fn sync_dir(path: &Path) -> Result<(), DiskError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir, "sync directory"))
}

/// PATH made absolute: its directory resolved (symlinks and ".." gone), its last component
/// kept as given (a symlinked image stays the link).
fn absolute_path(path: &Path) -> Result<PathBuf, DiskError> {
    let name = path.file_name().ok_or_else(|| DiskError::Open {
        path: path.into(),
        error: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = dir.canonicalize().map_err(|error| DiskError::Open { path: path.into(), error })?;
    Ok(dir.join(name))
}

/// Where an overlay goes on: its backing file, that file's format, and where the backing
/// files of that file's own chain may lie.
#[derive(Debug, Clone, Copy)]
pub struct Base<'a> {
    pub path: &'a Path,
    pub format: Format,
    pub policy: &'a BackingPolicy,
}

/// Creates OVERLAY, a new qcow2 image whose backing file is BASE (raw or qcow2, recorded as an
/// absolute path, with its format: the backing-format extension that `qemu-img create -F`
/// writes). Refuses to overwrite an existing OVERLAY. The overlay appears complete or not at
/// all: it is built under a temporary name and linked into place.
pub fn create(base: Base<'_>, overlay: &Path) -> Result<(), DiskError> {
    create_with_cluster_size(base, overlay, CLUSTER_SIZE)
}

/// [`create`] with another cluster size (a power of two from 16 KiB to 2 MiB).
pub fn create_with_cluster_size(base: Base<'_>, overlay: &Path, cluster_size: u64) -> Result<(), DiskError> {
    create_inner(base, overlay, cluster_size, true, None)
}

/// [`create`] with a virtual size of SIZE bytes, at least BASE's: the guest sees a disk larger
/// than its image, whose end (past BASE's) reads as zeros until written. The overlay never
/// grows past SIZE plus its metadata, so SIZE caps what the guest can write.
pub fn create_sized(base: Base<'_>, overlay: &Path, size: u64) -> Result<(), DiskError> {
    create_inner(base, overlay, CLUSTER_SIZE, true, Some(size))
}

/// [`create`] over a base that a paused VM still holds open for writing, flushed: a fork
/// freezes a running sandbox's overlay this way and then switches the VM to the new overlay
/// (PATCH /drives/{id}), which gives up its write lock on the base. Without that pause and
/// flush the base could change under the new overlay.
pub fn create_over_in_use(base: Base<'_>, overlay: &Path) -> Result<(), DiskError> {
    create_inner(base, overlay, CLUSTER_SIZE, false, None)
}

fn create_inner(
    base: Base<'_>,
    overlay: &Path,
    cluster_size: u64,
    lock_base: bool,
    size: Option<u64>,
) -> Result<(), DiskError> {
    if !cluster_size.is_power_of_two() || !(16 << 10..=2 << 20).contains(&cluster_size) {
        return Err(DiskError::Qcow2 {
            path: overlay.into(),
            reason: format!("cluster size {cluster_size}: overlays need a power of two from 16 KiB to 2 MiB"),
        });
    }
    if overlay.symlink_metadata().is_ok() {
        return Err(DiskError::Exists { path: overlay.into() });
    }
    let base_abs = absolute_path(base.path)?;
    let base_name = base_abs.to_str().ok_or_else(|| DiskError::Qcow2 {
        path: overlay.into(),
        reason: format!("the backing file name {} is not UTF-8", base_abs.display()),
    })?;
    // The whole chain below must open, and its size must suit a block device.
    let format = base.format;
    let base_size = open_chain(&base_abs, format, false, lock_base, base.policy)?.image.size();
    check_size(&base_abs, base_size)?;
    let size = match size {
        Some(size) if size < base_size => {
            return Err(DiskError::SmallerThanBase { path: overlay.into(), size, base: base_abs, base_size })
        }
        Some(size) => {
            check_size(overlay, size)?;
            size
        }
        None => base_size,
    };

    let name = overlay.file_name().ok_or_else(|| DiskError::Open {
        path: overlay.into(),
        error: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
    })?;
    let tmp = overlay.with_file_name(format!(".{}.ember-tmp-{}", name.to_string_lossy(), std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|error| DiskError::Open { path: tmp.clone(), error })?;
    let mut cleanup = RemoveOnDrop(Some(tmp.clone()));
    write_overlay(&file, size, cluster_size.trailing_zeros(), base_name, format.name())
        .map_err(|e| DiskError::Qcow2 { path: overlay.into(), reason: e.to_string() })?;
    file.sync_all().map_err(io_err(&tmp, "sync"))?;
    drop(file);

    // link() never replaces an existing file: a racing creator of OVERLAY wins.
    std::fs::hard_link(&tmp, overlay).map_err(|error| match error.kind() {
        io::ErrorKind::AlreadyExists => DiskError::Exists { path: overlay.into() },
        _ => DiskError::Io { path: overlay.into(), op: "link", error },
    })?;
    drop(cleanup.0.take());
    std::fs::remove_file(&tmp).map_err(io_err(&tmp, "remove"))?;
    sync_dir(overlay)
}

/// The chain of PATH (in FORMAT), top layer first, base last. Takes no locks, so it works on a
/// disk a VM is using (what it reports may then be a moment old).
pub fn info(path: &Path, format: Format, policy: &BackingPolicy) -> Result<Vec<LayerInfo>, DiskError> {
    Ok(open_chain(path, format, false, false, policy)?.layers)
}

/// "1.5 GiB"-style sizes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `ember disk info` output: human-readable, or JSON (`{"layers": [...]}`, top first).
pub fn render_info(layers: &[LayerInfo], json: bool) -> String {
    if json {
        #[derive(Serialize)]
        struct Chain<'a> {
            layers: &'a [LayerInfo],
        }
        let mut out = serde_json::to_string_pretty(&Chain { layers }).expect("plain data serializes");
        out.push('\n');
        return out;
    }
    let mut out = String::new();
    for (i, l) in layers.iter().enumerate() {
        let role = match i {
            0 if layers.len() > 1 => "top",
            _ if i == layers.len() - 1 => "base",
            _ => "backing",
        };
        out += &format!("[{i}] {role}: {}\n", l.path.display());
        out += &format!(
            "    format {}, virtual size {} ({} bytes), on the host {} allocated (file length {})\n",
            l.format,
            human_size(l.virtual_size),
            l.virtual_size,
            human_size(l.allocated_bytes),
            human_size(l.file_size),
        );
        if let Some(cs) = l.cluster_size {
            out += &match l.subclusters {
                true => format!("    clusters of {}, each in 32 subclusters of {}\n", human_size(cs), human_size(cs / 32)),
                false => format!("    clusters of {}, no subclusters\n", human_size(cs)),
            };
        }
        if let Some(b) = &l.backing {
            out += &format!(
                "    backing file {} ({})\n",
                b.display(),
                l.backing_format.as_deref().unwrap_or("format not recorded")
            );
        }
    }
    out
}

/// What `flatten` wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FlattenStats {
    pub size: u64,
    /// Bytes of data written; the rest of OUT is holes.
    pub data_bytes: u64,
}

/// Zero-detection granularity of `flatten`: the output stays sparse at this grain.
const FLATTEN_BLOCK: usize = 4096;
const FLATTEN_CHUNK: usize = 1 << 20;

/// Writes the non-zero blocks of BUF (guest offset OFF) to OUT; returns the bytes written.
fn write_nonzero(out: &File, out_path: &Path, buf: &[u8], off: u64) -> Result<u64, DiskError> {
    let mut written = 0;
    let mut i = 0;
    while i < buf.len() {
        let is_zero = |j: usize| buf[j..(j + FLATTEN_BLOCK).min(buf.len())].iter().all(|b| *b == 0);
        if is_zero(i) {
            i += FLATTEN_BLOCK;
            continue;
        }
        let start = i;
        while i < buf.len() && !is_zero(i) {
            i += FLATTEN_BLOCK;
        }
        let end = i.min(buf.len());
        out.write_all_at(&buf[start..end], off + start as u64).map_err(io_err(out_path, "write"))?;
        written += (end - start) as u64;
    }
    Ok(written)
}

/// Writes OUT, a standalone sparse raw image with the content of the chain of PATH (in
/// FORMAT). Ranges no layer has data for, holes of raw layers, and blocks of zeros are left as
/// holes. Refuses to overwrite an existing OUT. OUT is raw, and must be opened as raw from then
/// on: its first bytes are the guest's, whatever they look like.
pub fn flatten(path: &Path, format: Format, policy: &BackingPolicy, out_path: &Path) -> Result<FlattenStats, DiskError> {
    let chain = open_chain(path, format, false, true, policy)?;
    let mut chain = chain;
    let image = &mut chain.image;
    let size = image.size();
    let out =
        std::fs::OpenOptions::new().write(true).create_new(true).open(out_path).map_err(
            |error| match error.kind() {
                io::ErrorKind::AlreadyExists => DiskError::Exists { path: out_path.into() },
                _ => DiskError::Open { path: out_path.into(), error },
            },
        )?;
    let mut cleanup = RemoveOnDrop(Some(out_path.into()));
    out.set_len(size).map_err(io_err(out_path, "set length"))?;

    let chain_err = |e: io::Error| DiskError::Qcow2 { path: path.into(), reason: e.to_string() };
    let mut buf = vec![0u8; FLATTEN_CHUNK];
    let mut data_bytes = 0;
    let mut offset = 0;
    while offset < size {
        let (extent, len) = image.extent(offset, size - offset).map_err(chain_err)?;
        if len == 0 {
            break;
        }
        match extent {
            Extent::Data { file, offset: host } => {
                // Only the parts of the layer's file that hold data (SEEK_DATA) are read.
                let end = host + len;
                let mut pos = host;
                while pos < end {
                    let (data, hole) = match seek_data(file, pos) {
                        Ok(Some(d)) if d < end => {
                            (d, seek_hole(file, d).ok().flatten().unwrap_or(end).min(end))
                        }
                        Ok(_) => break,
                        // No SEEK_DATA support: treat everything as data.
                        Err(_) => (pos, end),
                    };
                    let hole = if hole > data { hole } else { end };
                    let mut at = data;
                    while at < hole {
                        let n = ((hole - at) as usize).min(FLATTEN_CHUNK);
                        file.read_exact_at(&mut buf[..n], at).map_err(chain_err)?;
                        data_bytes += write_nonzero(&out, out_path, &buf[..n], offset + (at - host))?;
                        at += n as u64;
                    }
                    pos = hole;
                }
            }
            Extent::Zero => {}
            Extent::Encoded => {
                // Compressed or otherwise encoded data: read it through the chain.
                let mut at = offset;
                while at < offset + len {
                    let n = ((offset + len - at) as usize).min(FLATTEN_CHUNK);
                    image.read_vectored(at, &[VolatileSlice::from(&mut buf[..n])]).map_err(chain_err)?;
                    data_bytes += write_nonzero(&out, out_path, &buf[..n], at)?;
                    at += n as u64;
                }
            }
        }
        offset += len;
    }
    out.sync_all().map_err(io_err(out_path, "sync"))?;
    // Disarmed, not forgotten: forgetting it leaked its path at every flatten (fuzz/ qcow2).
    cleanup.0 = None;
    Ok(FlattenStats { size, data_bytes })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::DiskBackend;
    use super::*;

    const MIB: u64 = 1 << 20;

    fn write(disk: &mut dyn DiskBackend, offset: u64, data: &[u8]) {
        write_at(disk, offset, data);
        disk.flush().unwrap();
    }

    #[test]
    fn create_refuses_to_overwrite_and_records_an_absolute_backing_path() {
        let dir = tmpdir();
        let base = make_base(dir.as_path(), "base.raw", 2 * MIB);
        let top = dir.as_path().join("top.qcow2");
        std::fs::write(&top, b"precious").unwrap();
        let e = ov::create(&base, &top).unwrap_err();
        assert!(matches!(e, DiskError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("top.qcow2"));
        assert_eq!(std::fs::read(&top).unwrap(), b"precious");
        std::fs::remove_file(&top).unwrap();

        // A relative base path is stored absolute.
        let cwd = std::env::current_dir().unwrap();
        let rel = pathdiff(&base, &cwd);
        ov::create(&rel, &top).unwrap();
        let layers = ov::info(&top).unwrap();
        assert_eq!(layers[0].backing.as_deref(), Some(base.as_path()));
        assert_eq!(layers[0].backing_format.as_deref(), Some("raw"));
        // No temporary file left behind.
        let names: Vec<_> =
            std::fs::read_dir(dir.as_path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// BASE relative to FROM, with "..".
    fn pathdiff(base: &Path, from: &Path) -> PathBuf {
        let mut rel = PathBuf::new();
        for _ in from.components().skip(1) {
            rel.push("..");
        }
        rel.join(base.strip_prefix("/").unwrap())
    }

    #[test]
    fn create_fails_cleanly_on_a_missing_base() {
        let dir = tmpdir();
        let top = dir.as_path().join("top.qcow2");
        let msg = ov::create(&dir.as_path().join("nope.raw"), &top).unwrap_err().to_string();
        assert!(msg.contains("nope.raw") && msg.contains("No such file"), "{msg}");
        assert!(std::fs::read_dir(dir.as_path()).unwrap().next().is_none());
    }

    #[test]
    fn a_fresh_overlay_is_small_even_for_a_big_base() {
        let dir = tmpdir();
        let base = make_base_with(dir.as_path(), "base.raw", 4096 * MIB, MIB);
        let top = dir.as_path().join("top.qcow2");
        ov::create(&base, &top).unwrap();
        let alloc = allocated(&top);
        assert!(alloc <= 512 << 10, "a fresh overlay of a 4 GiB base occupies {alloc} bytes");
        qemu_check(&top);
    }

    #[test]
    fn info_shows_the_chain_top_first() {
        let dir = tmpdir();
        let base = make_base(dir.as_path(), "base.raw", 4 * MIB);
        let frozen = dir.as_path().join("frozen.qcow2");
        let top = dir.as_path().join("top.qcow2");
        ov::create(&base, &frozen).unwrap();
        ov::create(&frozen, &top).unwrap();
        let layers = ov::info(&top).unwrap();
        assert_eq!(layers.len(), 3);
        assert_eq!(layers[0].path, top);
        assert_eq!(layers[1].path, frozen);
        assert_eq!(layers[2].path, base);
        assert_eq!(
            layers.iter().map(|l| l.format).collect::<Vec<_>>(),
            [Format::Qcow2, Format::Qcow2, Format::Raw]
        );
        assert!(layers.iter().all(|l| l.virtual_size == 4 * MIB));
        assert_eq!(layers[1].backing_format.as_deref(), Some("raw"));
        assert_eq!(layers[0].backing_format.as_deref(), Some("qcow2"));
        assert!(layers[2].backing.is_none());
        assert!(layers[2].allocated_bytes > 2 * MIB);

        let text = render_info(&layers, false);
        assert!(text.contains("[0] top: ") && text.contains("[2] base: "), "{text}");
        assert!(text.contains("virtual size 4.0 MiB (4194304 bytes)"), "{text}");
        assert!(text.contains(&format!("backing file {} (qcow2)", frozen.display())), "{text}");
        let json: serde_json::Value = serde_json::from_str(&render_info(&layers, true)).unwrap();
        let json = json["layers"].as_array().unwrap();
        assert_eq!(json.len(), 3);
        assert_eq!(json[0]["path"], top.to_str().unwrap());
        assert_eq!(json[0]["backing_file"], frozen.to_str().unwrap());
        assert_eq!(json[0]["backing_format"], "qcow2");
        assert_eq!(json[2]["path"], base.to_str().unwrap());
        assert_eq!(json[2]["format"], "raw");
        assert_eq!(json[2]["virtual_size"], 4 * MIB);
        assert!(json[2]["backing_file"].is_null() && json[2]["cluster_size"].is_null());
        let mut keys: Vec<&str> = json[0].as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        let fields = ["allocated_bytes", "backing_file", "backing_format", "cluster_size", "file_size"];
        assert_eq!(keys, [&fields[..], &["format", "path", "subclusters", "virtual_size"]].concat());

        // Works while a VM writes the top layer.
        let _busy = open(&top, false).unwrap();
        assert_eq!(ov::info(&top).unwrap().len(), 3);
    }

    #[test]
    fn flatten_writes_the_chain_content_sparsely() {
        let dir = tmpdir();
        // 64 MiB base with data only in its first 8 MiB (a third of that is holes).
        let base = make_base_with(dir.as_path(), "base.raw", 64 * MIB, 8 * MIB);
        let frozen = dir.as_path().join("frozen.qcow2");
        let top = dir.as_path().join("top.qcow2");
        ov::create(&base, &frozen).unwrap();
        let mut expect = std::fs::read(&base).unwrap();
        {
            let mut d = open(&frozen, false).unwrap();
            write(d.as_mut(), 40 * MIB, &[0xf0; 65536]);
            write(d.as_mut(), 2 * MIB, &[0x0f; 4096]);
        }
        expect[(40 * MIB) as usize..][..65536].fill(0xf0);
        expect[(2 * MIB) as usize..][..4096].fill(0x0f);
        ov::create(&frozen, &top).unwrap();
        {
            let mut d = open(&top, false).unwrap();
            write(d.as_mut(), 50 * MIB + 512, &[0xee; 1024]);
            // Zeros written over base data must come out as zeros.
            write(d.as_mut(), MIB, &[0; 8192]);
        }
        expect[(50 * MIB + 512) as usize..][..1024].fill(0xee);
        expect[MIB as usize..][..8192].fill(0);

        let out = dir.as_path().join("flat.raw");
        let stats = ov::flatten(&top, &out).unwrap();
        assert_eq!(stats.size, 64 * MIB);
        assert_eq!(std::fs::read(&out).unwrap(), expect);
        let alloc = allocated(&out);
        assert!(alloc <= 6 * MIB, "flattened image occupies {alloc} bytes for ~5.5 MiB of non-zero data");
        assert!(stats.data_bytes <= 6 * MIB);

        let e = ov::flatten(&top, &out).unwrap_err();
        assert!(matches!(e, DiskError::Exists { .. }), "{e}");
        // A raw image flattens to a sparse copy of itself.
        let out2 = dir.as_path().join("flat2.raw");
        ov::flatten(&base, &out2).unwrap();
        assert_eq!(checksum(&out2), checksum(&base));
        assert!(allocated(&out2) <= allocated(&base));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(4 << 30), "4.0 GiB");
    }
}
