//! A sandbox's VMM process: spawned in a session of its own (or tied to its starter), or a
//! spare taken over; how it ended, and the tail of its logs for reports.

use std::path::{Path, PathBuf};

use crate::error::io;
use crate::paths::{API_SOCKET, CONSOLE_LOG, VMM_LOG};
use crate::{record, spares, SandboxError, Store};

/// A sandbox's VMM process while the sandbox starts: spawned by this process, or a spare
/// taken over (some earlier ember's child).
pub(crate) enum VmmProcess {
    Child(Spawned),
    Adopted(spares::Adopted),
}

/// A VMM this process started, with its jail directory and cgroup when it has them.
pub(crate) struct Spawned {
    pub process: jail::spawn::Process,
    pub jail: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
}

impl VmmProcess {
    pub(crate) fn pid(&self) -> i32 {
        match self {
            VmmProcess::Child(child) => child.process.id(),
            VmmProcess::Adopted(spare) => spare.pid,
        }
    }

    /// How the VMM ended, if it has: a silent death (no log) is told apart from an error
    /// exit by its signal, and a kill for exceeding its memory limit is named.
    pub(crate) fn exited(&mut self) -> Option<String> {
        let (how, cgroup) = match self {
            VmmProcess::Child(child) => (
                child.process.try_wait().map(|status| {
                    use std::os::unix::process::ExitStatusExt;
                    match status.signal() {
                        Some(signal) => format!("killed by signal {signal}"),
                        None => status.to_string(),
                    }
                }),
                child.cgroup.as_deref(),
            ),
            VmmProcess::Adopted(spare) => (
                (!record::vmm_serves(spare.pid, &spare.started_as)).then(|| format!("process {} is gone", spare.pid)),
                spare.cgroup.as_deref(),
            ),
        };
        // Polled while the VMM starts: its cgroup is read only once it has ended.
        let how = how?;
        let oom = cgroup.and_then(|c| jail::cgroup::Cgroup::open(c).ok()).is_some_and(|c| c.oom_killed());
        Some(if oom { format!("{how}: it exceeded its memory limit (memory.max of its cgroup)") } else { how })
    }

    /// Its jail directory and cgroup.
    pub(crate) fn confinement(&self) -> (Option<PathBuf>, Option<PathBuf>) {
        match self {
            VmmProcess::Child(child) => (child.jail.clone(), child.cgroup.clone()),
            VmmProcess::Adopted(spare) => (spare.jail.clone(), spare.cgroup.clone()),
        }
    }
}

/// The tail of a log file, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Store {
    /// Starts a VMM process named `id` serving `dir`/api.sock, its console and log in `dir`;
    /// in its own session, so that it outlives the terminal and the command that started it,
    /// unless `tied` (a hidden sandbox's, that command's scratch): then it dies with this
    /// process even if that is killed. It allows backing files where `backing` does. As root
    /// it is jailed (see `jails`), seeing `extra_read_only` besides what every VMM sees, in a
    /// cgroup of its own where there is a writable cgroup v2 hierarchy.
    pub(crate) fn spawn_vmm(
        &self,
        id: &str,
        dir: &Path,
        tied: bool,
        backing: &disk::BackingPolicy,
        extra_read_only: &[PathBuf],
    ) -> Result<Spawned, SandboxError> {
        let console = std::fs::File::create(dir.join(CONSOLE_LOG)).map_err(io("cannot create", dir))?;
        let log = std::fs::File::create(dir.join(VMM_LOG)).map_err(io("cannot create", dir))?;
        let mut args: Vec<std::ffi::OsString> =
            vec!["vmm".into(), "--api-sock".into(), dir.join(API_SOCKET).into(), "--id".into(), id.into()];
        for d in backing.dirs() {
            args.push("--disk-dir".into());
            args.push(d.into());
        }
        let (mut jail_root, mut cgroup) = (None, None);
        crate::jails::note_unprivileged(self.jail.as_ref());
        if let Some(settings) = &self.jail {
            let jail = self.new_jail(settings, id, extra_read_only)?;
            args.extend(jail.args());
            jail_root = Some(jail.root);
            // Said once above for a caller who may not make cgroups.
            if !settings.user_namespace {
                match jail::cgroup::Cgroup::create(id) {
                    Ok(c) => cgroup = Some(c),
                    Err(reason) => tracing::warn!("{id}: the VMM runs without cgroup limits: {reason}"),
                }
            }
        }
        tracing::debug!("{id}: spawning the VMM");
        let process = jail::spawn::spawn(jail::spawn::Spawn {
            program: &self.vmm_binary,
            args,
            stdout: console,
            stderr: log,
            new_pid_namespace: self.jail.is_some(),
            user_namespace: self.jail.as_ref().filter(|s| s.user_namespace).map(|s| (s.uid, s.gid)),
            cgroup: cgroup.as_ref().map(|c| c.dir()),
            tied,
        })
        .map_err(|e| SandboxError::Spawn { binary: self.vmm_binary.clone(), reason: e.to_string() })?;
        Ok(Spawned { process, jail: jail_root, cgroup: cgroup.map(|c| c.path().to_path_buf()) })
    }
}
