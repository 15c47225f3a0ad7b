//! Spare VMMs: `ember vmm` processes started ahead of need, each waiting on its API socket
//! with a KVM VM already made, so that a sandbox start takes one over instead of paying for a
//! process start and KVM's set-up while the user waits (about a third of a restore's time in
//! the nested harness; what remains is the restore itself and the guest's own work).
//!
//! A spare lives in `$EMBER_STATE/spares/<id>/` (beside the sandboxes): its API socket, its
//! stdout and stderr files (what becomes the sandbox's console.log and vmm.log) and `pid`.
//! A sandbox start takes one over by renaming its directory away (of two starts racing for
//! it one wins) and moving its files into the sandbox's directory; the record then names the
//! socket path the VMM was started with, by which it is recognised from then on. Spares are
//! refilled by each sandbox start once the sandbox is ready (the `ember` command keeps
//! `EMBER_SPARE_VMMS` of them, 1 by default): a spare getting ready meanwhile would take CPU
//! from the guest being waited for. One whose process is gone or runs another ember binary is
//! removed when found.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::record::{vmm_serves, API_SOCKET, CONSOLE_LOG, VMM_LOG};
use super::{io, random_hex, SandboxError, Store};

/// The spare's process id, written by the process that started it.
const PID_FILE: &str = "pid";

/// A VMM taken over for a sandbox: its files are in the sandbox's directory now.
pub(super) struct Adopted {
    pub pid: i32,
    /// The API socket path it was started with (now moved into the sandbox's directory).
    pub started_as: PathBuf,
}

impl Store {
    fn spares_dir(&self) -> PathBuf {
        self.root.with_file_name("spares")
    }

    /// Keeps `count` spare VMMs (none unless this is called): each sandbox start refills them.
    pub fn with_spare_vmms(self, count: usize) -> Self {
        Self { spare_vmms: count, ..self }
    }

    /// Takes over a live spare VMM for the sandbox in `dir`, if there is one; removes the
    /// stale spares it finds on the way.
    pub(super) fn adopt_spare(&self, dir: &Path) -> Option<Adopted> {
        let spares = self.spares_dir();
        for entry in std::fs::read_dir(&spares).ok()?.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') {
                continue;
            }
            let Some(pid) = self.live_spare(&entry.path()) else {
                self.discard_spare(&entry.path());
                continue;
            };
            let claimed = spares.join(format!(".{id}.{}", std::process::id()));
            if std::fs::rename(entry.path(), &claimed).is_err() {
                continue;
            }
            let moved = [API_SOCKET, CONSOLE_LOG, VMM_LOG]
                .iter()
                .try_for_each(|f| std::fs::rename(claimed.join(f), dir.join(f)));
            let _ = std::fs::remove_dir_all(&claimed);
            let started_as = entry.path().join(API_SOCKET);
            match moved {
                Ok(()) => return Some(Adopted { pid, started_as }),
                Err(e) => {
                    tracing::warn!("cannot take over spare VMM {id}: {e}");
                    kill_if_serving(pid, &started_as);
                }
            }
        }
        None
    }

    /// The pid of the spare in `dir` if it is ready to be taken over: its process serves the
    /// socket there and runs this ember binary (a rebuilt ember may restore differently).
    fn live_spare(&self, dir: &Path) -> Option<i32> {
        let pid = spare_pid(dir)?;
        let socket = dir.join(API_SOCKET);
        if !socket.exists() || !vmm_serves(pid, &socket) {
            return None;
        }
        let ours = std::fs::metadata(&self.vmm_binary).ok()?;
        let theirs = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
        (ours.dev() == theirs.dev() && ours.ino() == theirs.ino()).then_some(pid)
    }

    /// Stops the spare in `dir` (if its process still serves it) and removes its files; one
    /// still being started (no pid file or socket yet) is left alone for a minute.
    fn discard_spare(&self, dir: &Path) {
        let young = std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() < 60);
        let pid = spare_pid(dir);
        let starting = young && (pid.is_none() || !dir.join(API_SOCKET).exists());
        if !starting {
            self.discard_spare_now(dir);
        }
    }

    /// Starts spare VMMs until as many as wanted are ready or starting, and stops any beyond.
    /// The new ones get ready in the background.
    pub(super) fn refill_spares(&self) -> Result<(), SandboxError> {
        let target = self.spare_vmms;
        let spares = self.spares_dir();
        std::fs::create_dir_all(&spares).map_err(io("cannot create", &spares))?;
        let mut present = Vec::new();
        for entry in std::fs::read_dir(&spares).map_err(io("cannot list", &spares))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let starting = !entry.path().join(API_SOCKET).exists();
            if starting || self.live_spare(&entry.path()).is_some() {
                present.push(entry.path());
            } else {
                self.discard_spare(&entry.path());
            }
        }
        for extra in present.iter().skip(target) {
            self.discard_spare_now(extra);
        }
        for _ in present.len()..target {
            self.start_spare(&spares)?;
        }
        Ok(())
    }

    fn discard_spare_now(&self, dir: &Path) {
        if let Some(pid) = spare_pid(dir) {
            kill_if_serving(pid, &dir.join(API_SOCKET));
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    fn start_spare(&self, spares: &Path) -> Result<(), SandboxError> {
        let id = format!("spare-{}", random_hex());
        let dir = spares.join(&id);
        std::fs::create_dir(&dir).map_err(io("cannot create", &dir))?;
        let child = self.spawn_vmm(&id, &dir, false)?;
        let pid_path = dir.join(PID_FILE);
        std::fs::write(&pid_path, child.id().to_string()).map_err(io("cannot write", &pid_path))
    }
}

fn spare_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join(PID_FILE)).ok()?.trim().parse().ok()
}

fn kill_if_serving(pid: i32, socket: &Path) {
    if vmm_serves(pid, socket) {
        // SAFETY: plain kill(2) of a process that vmm_serves identified as that VMM.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}
