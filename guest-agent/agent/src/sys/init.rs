//! What an agent running as PID 1 sets up, and being the subreaper.

use std::ffi::CStr;
use std::io;

use rustix::io::Errno;
use rustix::mount::{mount, MountFlags};
use rustix::process::{getpid, set_child_subreaper};

/// The usual pseudo file systems (each one already mounted is left alone) and a PATH.
pub fn init_mounts() {
    const NOSUID_NODEV: MountFlags = MountFlags::NOSUID.union(MountFlags::NODEV);
    let mounts: &[(&str, &str, &str, MountFlags, Option<&CStr>)] = &[
        (
            "proc",
            "/proc",
            "proc",
            NOSUID_NODEV.union(MountFlags::NOEXEC),
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            NOSUID_NODEV.union(MountFlags::NOEXEC),
            None,
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            Some(c"mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MountFlags::NOSUID.union(MountFlags::NOEXEC),
            Some(c"gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            NOSUID_NODEV,
            Some(c"mode=1777"),
        ),
        ("tmpfs", "/run", "tmpfs", NOSUID_NODEV, Some(c"mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", NOSUID_NODEV, Some(c"mode=1777")),
    ];
    for &(src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        match mount(src, target, fstype, flags, data) {
            Ok(()) | Err(Errno::BUSY) => {}
            Err(e) => tracing::warn!("mount {target} ({fstype}): {}", io::Error::from(e)),
        }
    }
    if std::env::var_os("PATH").is_none() {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
}

/// Makes orphaned descendants re-parent to the agent (so the reaper collects them).
pub fn set_subreaper() -> io::Result<()> {
    // The prctl only asks for a non-zero argument; rustix spells "on" as a pid.
    Ok(set_child_subreaper(Some(getpid()))?)
}
