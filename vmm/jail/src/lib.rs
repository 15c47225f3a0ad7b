//! How a VMM process is confined, Firecracker-jailer style but without a separate binary:
//!
//! - the control plane spawns `ember vmm` with [`spawn::spawn`]: a new pid namespace (the VMM
//!   is its pid 1 and sees no other process) and, where cgroup v2 is writable, straight into a
//!   cgroup of its own ([`cgroup`]: `memory.max`, `cpu.max`, `pids.max`);
//! - the VMM, still root, binds its API socket at the path it was given and then calls
//!   [`Jail::enter`] before it reads a byte of API or guest input: new mount, ipc, uts and
//!   (empty) network namespaces; its jail directory becomes `/` (holding only what this VM needs:
//!   the files the control plane hard-links in at the paths they have on the host, the
//!   read-only bind mounts named on its command line, `/dev/kvm`, and a `/proc` that shows
//!   only itself); then an unprivileged uid and gid, no capabilities (bounding set included),
//!   `no_new_privs`, and resource limits.
//!
//! A caller who is not root gets the same jail inside a user namespace of the VMM's own
//! ([`Jail::user_namespace`]): `spawn` adds `CLONE_NEWUSER` and maps the caller's uid and gid to
//! 0 inside, which is what owning the new namespaces and mounting there needs; the VMM then
//! drops every capability but stays the caller's uid (one id is all an unprivileged map may
//! hold), `/dev/kvm` is bind-mounted (no `mknod` in a user namespace), and there is no cgroup
//! (the caller may not make one).
//!
//! What the control plane hands a jailed VMM later (a template's files for a spare, a fork's
//! disk layer) is hard-linked into the jail directory from the host side: the jail root is the
//! same directory, so new entries appear inside without any mount.

mod enter;
pub mod cgroup;
pub mod spawn;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The most files a jailed VMM may have open: its disk layers, memory layers, vsock
/// connections (256 at most) and pending clients (64), API connections, and the KVM fds.
pub const MAX_OPEN_FILES: u64 = 4096;

/// The most threads and processes the jail uid may have in all (the limit counts every VMM
/// sharing the uid; each VMM's own bound is its cgroup's `pids.max`).
pub const MAX_PROCESSES: u64 = 65536;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot jail the VMM: {step}: {error}")]
    Step { step: String, error: std::io::Error },
    #[error("cannot jail the VMM: {path} is not an absolute path")]
    Relative { path: PathBuf },
    #[error("cannot jail the VMM: uid and gid must not be 0 (the jail's point is an unprivileged user)")]
    Root,
}

pub(crate) fn step(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = step.into();
    move |error| JailError::Step { step, error }
}

/// A VMM's jail: the directory that becomes its `/`, who it runs as, and what of the host it
/// sees besides the files put into that directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Host files or directories bind-mounted read-only at the same path inside (the
    /// installation's kernel and images, which live on their own filesystem).
    pub read_only: Vec<PathBuf>,
    /// The largest file the VMM may write (`RLIMIT_FSIZE`): its overlay and snapshot files.
    pub max_file_size: u64,
    /// The VMM runs in a user namespace of its own, as uid 0 there, which is `uid` (the
    /// caller's) outside: it keeps that uid and drops its capabilities (see the crate's doc).
    pub user_namespace: bool,
}

impl Jail {
    /// The `ember vmm` arguments that make a VMM enter this jail (parsed back by the CLI).
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--jail".into(),
            self.root.clone().into(),
            "--jail-uid".into(),
            self.uid.to_string().into(),
            "--jail-gid".into(),
            self.gid.to_string().into(),
            "--jail-max-file-size".into(),
            self.max_file_size.to_string().into(),
        ];
        for path in &self.read_only {
            args.push("--jail-ro".into());
            args.push(path.clone().into());
        }
        if self.user_namespace {
            args.push("--jail-userns".into());
        }
        args
    }

    /// Where a host path is inside the jail's directory, seen from the host: the VMM sees
    /// `path` itself.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").unwrap_or(path);
        self.root.join(relative)
    }
}

/// Whether this kernel lets an unprivileged process make a user namespace (Debian's and
/// Ubuntu's switches, and the count limit, say so), in which it may build a jail.
pub fn user_namespaces_allowed() -> bool {
    let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok());
    read("/proc/sys/user/max_user_namespaces").is_some_and(|n| n > 0)
        && read("/proc/sys/kernel/unprivileged_userns_clone").is_none_or(|on| on == 1)
        && read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").is_none_or(|on| on == 0)
}

/// Whether this process may build jails (creating namespaces, mounting, changing uid).
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
