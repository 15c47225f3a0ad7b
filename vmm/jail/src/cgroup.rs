//! A VMM's cgroup (v2): `memory.max` (guest RAM plus a margin for the VMM itself), `cpu.max`
//! (its vCPUs plus one for its device thread), `pids.max`. All VMM cgroups sit under one
//! parent, `/sys/fs/cgroup/ember` unless `EMBER_CGROUP` names another, which gets the
//! memory, cpu and pids controllers.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::{step, JailError};

/// What a VMM may use besides guest RAM: its own heap, stacks and device buffers (vsock holds
/// up to 256 KiB for each of 256 connections), and the page cache its snapshot files bring in.
pub const VMM_MEMORY_MARGIN: u64 = 128 << 20;

/// Threads a VMM runs besides its vCPUs (main, API, the pause helper), with room to spare.
const VMM_THREADS: u64 = 16;

const CPU_PERIOD_US: u64 = 100_000;

/// The limits of one VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub mem_bytes: u64,
    pub vcpus: u64,
}

/// One VMM's cgroup directory.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    dir: File,
}

/// The parent of every VMM's cgroup.
pub fn parent() -> PathBuf {
    std::env::var_os("EMBER_CGROUP").filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from("/sys/fs/cgroup/ember"), PathBuf::from)
}

impl Cgroup {
    /// Makes cgroup `name` under [`parent`]; `None` (with the reason) where there is no
    /// writable cgroup v2 hierarchy, so that the VMM runs without these limits.
    pub fn create(name: &str) -> Result<Cgroup, String> {
        let parent = parent();
        let root = parent.parent().unwrap_or(Path::new("/"));
        if !root.join("cgroup.controllers").exists() {
            return Err(format!("{} is not a cgroup v2 hierarchy", root.display()));
        }
        std::fs::create_dir_all(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        for dir in [root, parent.as_path()] {
            let control = dir.join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&control).unwrap_or_default();
            for controller in ["memory", "cpu", "pids"] {
                if !enabled.split_whitespace().any(|c| c == controller) {
                    std::fs::write(&control, format!("+{controller}"))
                        .map_err(|e| format!("cannot enable the {controller} controller in {}: {e}", control.display()))?;
                }
            }
        }
        let path = parent.join(name);
        std::fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let dir = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Ok(Cgroup { path, dir })
    }

    /// An existing VMM's cgroup, to change its limits or remove it.
    pub fn open(path: &Path) -> Result<Cgroup, JailError> {
        let dir = File::open(path).map_err(step(format!("open cgroup {}", path.display())))?;
        Ok(Cgroup { path: path.to_path_buf(), dir })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory, for `CLONE_INTO_CGROUP`.
    pub fn dir(&self) -> &File {
        &self.dir
    }

    /// Sets the limits of a VMM with `limits`'s guest: exceeding memory kills that VMM alone.
    pub fn limit(&self, limits: Limits) -> Result<(), JailError> {
        let memory = limits.mem_bytes.saturating_add(VMM_MEMORY_MARGIN);
        self.write("memory.max", &memory.to_string())?;
        // Swap would let a VMM run on past its limit, slowly, at the host's expense.
        self.write_if_present("memory.swap.max", "0")?;
        let quota = limits.vcpus.saturating_add(1).saturating_mul(CPU_PERIOD_US);
        self.write("cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
        self.write("pids.max", &limits.vcpus.saturating_add(VMM_THREADS).to_string())
    }

    /// Whether the kernel killed a process of this cgroup for exceeding `memory.max`.
    pub fn oom_killed(&self) -> bool {
        let events = std::fs::read_to_string(self.path.join("memory.events")).unwrap_or_default();
        events.lines().any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"))
    }

    /// Removes the cgroup once its processes are gone (waiting a little for the kernel to
    /// finish with a process just killed).
    pub fn remove(self) {
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => std::thread::sleep(std::time::Duration::from_millis(10)),
                _ => return,
            }
        }
        tracing::warn!("cannot remove cgroup {}: processes remain in it", self.path.display());
    }

    fn write(&self, file: &str, value: &str) -> Result<(), JailError> {
        let path = self.path.join(file);
        std::fs::write(&path, value).map_err(step(format!("write {value} to {}", path.display())))
    }

    fn write_if_present(&self, file: &str, value: &str) -> Result<(), JailError> {
        match self.path.join(file).exists() {
            true => self.write(file, value),
            false => Ok(()),
        }
    }
}
