//! The control plane's side of VMM jails (the `jail` crate: what a VMM does to itself).
//!
//! Each VMM started as root gets `$EMBER_STATE/jails/<id>/`, which becomes its `/`. What it
//! must read appears there at the path it has on the host (so a qcow2 layer's backing file
//! name resolves inside as outside): the installation's kernel and images as read-only bind
//! mounts made when the VMM starts, everything of `$EMBER_STATE` (templates, frozen layers,
//! its own overlay) hard-linked in by the control plane when needed — by file descriptor, so
//! the inode checked is the inode linked. The VMM writes only to jail-local `/run` (its
//! sockets and metrics, reached from the sandbox's directory through symlinks) and `/out`
//! (snapshot files, moved out by the control plane, again by descriptor, after checking the VMM
//! made them: a jailed VMM cannot plant a link that makes the control plane touch a host file).
//!
//! Files the VMM only reads are the user's, group the jail gid, mode 0640: `$EMBER_STATE` is
//! 0700, so no other local user reaches them; the VMM's own overlay is the jail uid's, 0600.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use disk::regular::Refused;

use crate::error::io;
use crate::names::random_hex;
use crate::{SandboxError, Store};

/// Where a jailed VMM's sockets and metrics are, in its own view.
pub(crate) const RUN_DIR: &str = "/run";
/// Where a jailed VMM writes snapshot files, in its own view.
pub(crate) const OUT_DIR: &str = "/out";

/// How the control plane jails the VMMs it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSettings {
    pub uid: u32,
    pub gid: u32,
    /// Host paths (the installation's kernel and images) every VMM sees read-only.
    pub read_only: Vec<PathBuf>,
    /// The caller is not root: each VMM is jailed in a user namespace of its own, as the
    /// caller's `uid` and `gid` (see `jail`), with no cgroup.
    pub user_namespace: bool,
}

impl JailSettings {
    /// The default jail, unless `EMBER_JAIL` is `off`: as root, uid and gid
    /// `EMBER_JAIL_UID`/`EMBER_JAIL_GID` (60000); as another user, where the kernel allows
    /// unprivileged user namespaces, the caller's own ids in a user namespace per VMM. `None`
    /// otherwise: the VMMs then run as the caller, confined by their seccomp filters alone.
    pub fn from_env(read_only: Vec<PathBuf>) -> Option<JailSettings> {
        if std::env::var("EMBER_JAIL").is_ok_and(|v| v == "off") {
            return None;
        }
        if jail::privileged() {
            let id = |var: &str| std::env::var(var).ok().and_then(|v| v.parse().ok()).filter(|&v: &u32| v != 0).unwrap_or(60000);
            return Some(JailSettings { uid: id("EMBER_JAIL_UID"), gid: id("EMBER_JAIL_GID"), read_only, user_namespace: false });
        }
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        jail::user_namespaces_allowed().then_some(JailSettings { uid, gid, read_only, user_namespace: true })
    }
}

/// Says once per process what a VMM started by a caller who is not root goes without (all
/// of the jail where user namespaces are not allowed; else its own uid and cgroup), unless the
/// caller turned the jail off knowingly (`EMBER_JAIL=off`).
pub(crate) fn note_unprivileged(settings: Option<&JailSettings>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if std::env::var("EMBER_JAIL").is_ok_and(|v| v == "off") || settings.is_some_and(|s| !s.user_namespace) {
        return;
    }
    ONCE.call_once(|| match settings {
        None => tracing::warn!(
            "not running as root, and this kernel allows no unprivileged user namespaces: sandbox \
             VMMs run as you, confined by their seccomp filters only, without a jail (own mount, pid \
             and network namespaces and root, no capabilities), an unprivileged uid of their own, or \
             cgroup limits on memory, CPU and processes; run ember as root for those (EMBER_JAIL=off \
             says you know)"
        ),
        Some(_) => tracing::warn!(
            "not running as root: sandbox VMMs are jailed in user namespaces (own mount, pid and \
             network namespaces and root, no capabilities, seccomp) but run as your uid, without a \
             uid of their own or cgroup limits on memory, CPU and processes; run ember as root for \
             those (EMBER_JAIL=off says you know)"
        ),
    });
}

/// One VMM's jail directory, as the host sees it.
#[derive(Debug, Clone)]
pub(crate) struct VmmJail {
    pub root: PathBuf,
    uid: u32,
    gid: u32,
}

/// What a VMM sees of the host's files: all of them (not jailed) or its jail.
#[derive(Debug, Clone)]
pub(crate) enum View {
    Host,
    Jailed(VmmJail),
}

impl Store {
    pub(crate) fn jails_dir(&self) -> PathBuf {
        self.root.with_file_name("jails")
    }

    /// Makes the jail directory of a new VMM `id`, with the jail settings and the extra
    /// read-only paths it must see.
    pub(crate) fn new_jail(&self, settings: &JailSettings, id: &str, extra_read_only: &[PathBuf]) -> Result<jail::Jail, SandboxError> {
        let jails = self.jails_dir();
        std::fs::create_dir_all(&jails).map_err(io("cannot create", &jails))?;
        let root = jails.join(id);
        std::fs::create_dir(&root).map_err(io("cannot create", &root))?;
        // The VMM may look into its root but change nothing there beside /run and /out.
        set_mode(&root, 0o711)?;
        for (dir, mode) in [(RUN_DIR, 0o700), (OUT_DIR, 0o700)] {
            let path = root.join(&dir[1..]);
            std::fs::create_dir(&path).map_err(io("cannot create", &path))?;
            set_mode(&path, mode)?;
            chown(&path, settings.uid, settings.gid)?;
        }
        let mut read_only = settings.read_only.clone();
        read_only.extend(extra_read_only.iter().cloned());
        Ok(jail::Jail {
            root,
            uid: settings.uid,
            gid: settings.gid,
            read_only,
            // Its overlay grows to the disk's size at most, a snapshot's memory file to RAM's.
            max_file_size: 1 << 40,
            user_namespace: settings.user_namespace,
        })
    }

    /// What a VMM jailed in `root` (none: not jailed) sees. The jail's ids are its `/run`'s
    /// owner: a VMM keeps the ids it was jailed with whatever a later command's settings say.
    pub(crate) fn view_of(&self, root: Option<&Path>) -> View {
        let Some(root) = root else { return View::Host };
        match std::fs::metadata(root.join(&RUN_DIR[1..])) {
            Ok(run) => View::Jailed(VmmJail { root: root.to_path_buf(), uid: run.uid(), gid: run.gid() }),
            Err(_) => match &self.jail {
                Some(s) => View::Jailed(VmmJail { root: root.to_path_buf(), uid: s.uid, gid: s.gid }),
                None => View::Host,
            },
        }
    }
}

impl View {
    /// Makes host file `path` (on the state directory's file system) readable by the VMM at
    /// the same path; `writable` for the VMM's own overlay.
    pub fn expose(&self, path: &Path, writable: bool) -> Result<(), SandboxError> {
        let View::Jailed(jail) = self else { return Ok(()) };
        let file = open_regular(path)?;
        if writable {
            fchown(&file, path, jail.uid, jail.gid)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io("cannot set the mode of", path))?;
        } else {
            let owner = file.metadata().map_err(io("cannot look at", path))?.uid();
            fchown(&file, path, owner, jail.gid)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o640)).map_err(io("cannot set the mode of", path))?;
        }
        let target = jail.root.join(path.strip_prefix("/").unwrap_or(path));
        let parent = target.parent().expect("a jail path has a parent");
        make_dirs(&jail.root, parent)?;
        // Linked under a fresh name and renamed over the old link: a fork's parent switches
        // to its new overlay at the same path.
        let staged = parent.join(format!(".ember-{}", random_hex()));
        link_fd(&file, &staged)?;
        std::fs::rename(&staged, &target).map_err(|e| {
            let _ = std::fs::remove_file(&staged);
            io("cannot link into the VMM's jail", &target)(e)
        })
    }

    /// Makes host file `path`, which the VMM will see through a bind mount, readable by it:
    /// group the jail gid, 0640, where it is this user's and not readable by all already
    /// (other users' files are as they are).
    pub fn share(&self, path: &Path) -> Result<(), SandboxError> {
        let View::Jailed(jail) = self else { return Ok(()) };
        let file = open_regular(path)?;
        let meta = file.metadata().map_err(io("cannot look at", path))?;
        // SAFETY: geteuid has no preconditions.
        if meta.uid() == unsafe { libc::geteuid() } && meta.mode() & 0o004 == 0 {
            fchown(&file, path, meta.uid(), jail.gid)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o640)).map_err(io("cannot set the mode of", path))?;
        }
        Ok(())
    }

    /// Links the VMM's API socket into its `/run`: the VMM recognises its own directory, the
    /// only one it may write metrics to, by the socket's inode.
    pub fn link_api_socket(&self, socket: &Path) -> Result<(), SandboxError> {
        let View::Jailed(jail) = self else { return Ok(()) };
        let inside = jail.root.join(&RUN_DIR[1..]).join(socket.file_name().expect("a file name"));
        std::fs::hard_link(socket, &inside).map_err(io("cannot link into the VMM's jail", &inside))
    }

    /// The path the VMM is to use for its socket or metrics file named `name`; with a jail,
    /// `host_path` becomes a symlink to where it is.
    pub fn run_path(&self, host_path: &Path) -> Result<String, SandboxError> {
        let View::Jailed(jail) = self else { return Ok(host_path.display().to_string()) };
        let name = host_path.file_name().expect("a file name");
        let inside = jail.root.join(&RUN_DIR[1..]).join(name);
        let _ = std::fs::remove_file(host_path);
        std::os::unix::fs::symlink(&inside, host_path).map_err(io("cannot link", host_path))?;
        Ok(Path::new(RUN_DIR).join(name).display().to_string())
    }

    /// Where on the host the VMM connects a guest's vsock connection to host port `port`:
    /// `<uds_path>_PORT`, its vsock socket being the sandbox's `vsock` (in its jail's `/run`
    /// when it is jailed).
    pub fn guest_port_socket(&self, vsock: &Path, port: u32) -> PathBuf {
        let name = format!("{}_{port}", vsock.file_name().expect("a file name").to_string_lossy());
        match self {
            View::Host => vsock.with_file_name(name),
            View::Jailed(jail) => jail.root.join(&RUN_DIR[1..]).join(name),
        }
    }

    /// The group that a socket the VMM is to connect to must have (writable by the group),
    /// when the VMM runs as another user than this process: the jail's.
    pub fn socket_group(&self) -> Option<u32> {
        match self {
            // SAFETY: geteuid has no preconditions.
            View::Jailed(jail) if jail.uid != unsafe { libc::geteuid() } => Some(jail.gid),
            _ => None,
        }
    }

    /// The path the VMM is to write snapshot file `host_path` at: `/out/NAME` in a jail.
    pub fn out_path(&self, host_path: &Path) -> String {
        match self {
            View::Host => host_path.display().to_string(),
            View::Jailed(_) => Path::new(OUT_DIR).join(host_path.file_name().expect("a file name")).display().to_string(),
        }
    }

    /// Moves the file the VMM wrote for `host_path` (see [`View::out_path`]) to `host_path`,
    /// the user's, readable by VMMs (mode 0640, group the jail gid), once it is checked to be a
    /// plain file the VMM made.
    pub fn collect(&self, host_path: &Path) -> Result<(), SandboxError> {
        let View::Jailed(jail) = self else { return Ok(()) };
        let written = jail.root.join(&OUT_DIR[1..]).join(host_path.file_name().expect("a file name"));
        let file = open_regular(&written)?;
        let meta = file.metadata().map_err(io("cannot look at", &written))?;
        if meta.uid() != jail.uid || meta.nlink() != 1 {
            return Err(SandboxError::Io {
                what: "the VMM did not make",
                path: written,
                source: std::io::Error::other("not a file of its own"),
            });
        }
        // SAFETY: geteuid has no preconditions.
        fchown(&file, &written, unsafe { libc::geteuid() }, jail.gid)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o640)).map_err(io("cannot set the mode of", &written))?;
        let _ = std::fs::remove_file(host_path);
        match link_fd(&file, host_path) {
            Ok(()) => {}
            Err(SandboxError::Io { source, .. }) if source.raw_os_error() == Some(libc::EXDEV) => {
                let copy = copy_sparse(&file, host_path)?;
                // SAFETY: geteuid has no preconditions.
                fchown(&copy, host_path, unsafe { libc::geteuid() }, jail.gid)?;
            }
            Err(e) => return Err(e),
        }
        std::fs::remove_file(&written).map_err(io("cannot remove", &written))
    }
}

/// Opens `path` without following a final symlink and without blocking on a FIFO; anything
/// but a regular file is refused.
fn open_regular(path: &Path) -> Result<File, SandboxError> {
    disk::regular::open_regular(path, false, false).map_err(|refused| match refused {
        Refused::Open(e) => io("cannot open", path)(e),
        Refused::Stat(e) => io("cannot look at", path)(e),
        Refused::NotRegular(kind) => {
            SandboxError::Io { what: "not a regular file:", path: path.into(), source: std::io::Error::other(kind) }
        }
    })
}

/// Links the open file at `target` (`linkat` of the descriptor: the inode opened and checked,
/// whatever the path names by now).
fn link_fd(file: &File, target: &Path) -> Result<(), SandboxError> {
    let target_c = CString::new(target.as_os_str().as_bytes()).map_err(|_| io("bad path", target)(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: linkat with a valid fd, an empty path and a NUL-terminated target.
    let mut rc = unsafe { libc::linkat(file.as_raw_fd(), c"".as_ptr(), libc::AT_FDCWD, target_c.as_ptr(), libc::AT_EMPTY_PATH) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
        // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; without it (a caller who is not root) the
        // descriptor's /proc link, followed, names the same inode.
        let proc_fd = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
        // SAFETY: linkat with two NUL-terminated paths.
        rc = unsafe { libc::linkat(libc::AT_FDCWD, proc_fd.as_ptr(), libc::AT_FDCWD, target_c.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    }
    match rc {
        0 => Ok(()),
        _ => Err(io("cannot link", target)(std::io::Error::last_os_error())),
    }
}

/// Copies `file` to a new file `target`, leaving holes as holes (a snapshot's memory file is
/// mostly holes).
fn copy_sparse(file: &File, target: &Path) -> Result<File, SandboxError> {
    use std::os::unix::fs::FileExt;
    let out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o640).open(target).map_err(io("cannot create", target))?;
    let len = file.metadata().map_err(io("cannot look at", target))?.len();
    out.set_len(len).map_err(io("cannot size", target))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let Some(data) = disk::seek_data(file, offset).map_err(io("cannot read for", target))? else { break };
        let hole = disk::seek_hole(file, data).map_err(io("cannot read for", target))?.unwrap_or(len).max(data);
        let mut at = data;
        while at < hole {
            let n = (hole - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at).map_err(io("cannot read for", target))?;
            out.write_all_at(&buf[..n], at).map_err(io("cannot write", target))?;
            at += n as u64;
        }
        offset = hole;
    }
    out.sync_all().map_err(io("cannot sync", target))?;
    Ok(out)
}

/// Creates `dir` and its missing parents under `root`, owned by root, mode 0711: the VMM can
/// pass through them to the files linked in, list and change nothing.
fn make_dirs(root: &Path, dir: &Path) -> Result<(), SandboxError> {
    let mut at = root.to_path_buf();
    for part in dir.strip_prefix(root).unwrap_or(dir).components() {
        at.push(part);
        match std::fs::create_dir(&at) {
            Ok(()) => set_mode(&at, 0o711)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("cannot create", &at)(e)),
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), SandboxError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("cannot set the mode of", path))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io("cannot change the owner of", path))
}

fn fchown(file: &File, path: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    std::os::unix::fs::fchown(file, Some(uid), Some(gid)).map_err(io("cannot change the owner of", path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn a_sparse_copy_has_the_same_bytes_and_keeps_the_holes() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-jails-").unwrap();
        let from = tmp.as_path().join("memory");
        let f = std::fs::File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 0).unwrap();
        f.write_all_at(&[2u8; 4096], 40 << 20).unwrap();
        f.write_all_at(&[3u8; 100], (64 << 20) - 100).unwrap();
        let to = tmp.as_path().join("copy");
        let copy = copy_sparse(&std::fs::File::open(&from).unwrap(), &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), std::fs::read(&from).unwrap());
        let allocated = copy.metadata().unwrap().blocks() * 512;
        assert!(allocated < 1 << 20, "{allocated} bytes allocated for 12 KiB of data");
        assert!(copy_sparse(&std::fs::File::open(&from).unwrap(), &to).is_err(), "an existing target is overwritten");
    }
}
