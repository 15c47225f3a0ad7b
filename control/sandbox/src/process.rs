//! A sandbox's VMM process: spawned in a session of its own (or tied to its starter), or a
//! spare taken over; how it ended, and the tail of its logs for reports.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::io;
use crate::paths::{API_SOCKET, CONSOLE_LOG, VMM_LOG};
use crate::{record, spares, SandboxError, Store};

/// A sandbox's VMM process while the sandbox starts: spawned by this process, or a spare
/// taken over (some earlier ember's child).
pub(crate) enum VmmProcess {
    Child(std::process::Child),
    Adopted(spares::Adopted),
}

impl VmmProcess {
    pub(crate) fn pid(&self) -> i32 {
        match self {
            VmmProcess::Child(child) => child.id() as i32,
            VmmProcess::Adopted(spare) => spare.pid,
        }
    }

    /// How the VMM ended, if it has: a silent death (no log) is told apart from an error
    /// exit by its signal.
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self {
            VmmProcess::Child(child) => child.try_wait().ok().flatten().map(|status| {
                use std::os::unix::process::ExitStatusExt;
                match status.signal() {
                    Some(signal) => format!("killed by signal {signal}"),
                    None => status.to_string(),
                }
            }),
            VmmProcess::Adopted(spare) => (!record::vmm_serves(spare.pid, &spare.started_as))
                .then(|| format!("process {} is gone", spare.pid)),
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
    /// process even if that is killed. It allows backing files where `backing` does.
    pub(crate) fn spawn_vmm(
        &self,
        id: &str,
        dir: &Path,
        tied: bool,
        backing: &disk::BackingPolicy,
    ) -> Result<std::process::Child, SandboxError> {
        let console = std::fs::File::create(dir.join(CONSOLE_LOG)).map_err(io("cannot create", dir))?;
        let log = std::fs::File::create(dir.join(VMM_LOG)).map_err(io("cannot create", dir))?;
        let mut command = Command::new(&self.vmm_binary);
        command
            .arg("vmm")
            .arg("--api-sock")
            .arg(dir.join(API_SOCKET))
            .arg("--id")
            .arg(id)
            .args(backing.dirs().iter().flat_map(|d| [std::ffi::OsStr::new("--disk-dir"), d.as_os_str()]))
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(log);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: setsid, prctl and getppid are async-signal-safe and touch no memory of the
        // parent; the error is made without allocating.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                libc::setsid();
                if tied {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    // The parent may have died before the prctl, unnoticed by it.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                }
                Ok(())
            });
        }
        tracing::debug!("{id}: spawning the VMM");
        command.spawn().map_err(io("cannot start the VMM", &self.vmm_binary))
    }
}
