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

use crate::paths::{API_SOCKET, CONSOLE_LOG, VMM_LOG};
use crate::record::vmm_serves;
use crate::error::io;
use crate::names::random_hex;
use crate::{SandboxError, Store};

/// The spare's process id, written by the process that started it.
const PID_FILE: &str = "pid";

/// A VMM taken over for a sandbox: its files are in the sandbox's directory now.
pub(super) struct Adopted {
    pub pid: i32,
    /// The API socket path it was started with (now moved into the sandbox's directory).
    pub started_as: PathBuf,
    /// Its jail directory and cgroup, if it has them (named by the spare's id).
    pub jail: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
}

impl Store {
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
            // A spare jailed (or not) as this store jails its VMMs, or the files it is handed
            // would not be where it looks.
            if self.spare_confinement(&id).0.is_some() != self.jail.is_some() {
                continue;
            }
            let Some(claimed) = claim(&entry.path()) else {
                continue;
            };
            let moved = [API_SOCKET, CONSOLE_LOG, VMM_LOG]
                .iter()
                .try_for_each(|f| std::fs::rename(claimed.join(f), dir.join(f)));
            let _ = std::fs::remove_dir_all(&claimed);
            let started_as = entry.path().join(API_SOCKET);
            let (jail, cgroup) = self.spare_confinement(&id);
            match moved {
                Ok(()) => return Some(Adopted { pid, started_as, jail, cgroup }),
                Err(e) => {
                    tracing::warn!("cannot take over spare VMM {id}: {e}");
                    kill_if_serving(pid, &started_as);
                    self.remove_confinement(jail.as_deref(), cgroup);
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

    /// Stops the spare in `dir` and removes its files, unless another ember process claims it
    /// first (to take it over, or to stop it itself).
    fn discard_spare_now(&self, dir: &Path) {
        let Some(claimed) = claim(dir) else {
            return;
        };
        if let Some(pid) = spare_pid(&claimed) {
            kill_if_serving(pid, &dir.join(API_SOCKET));
        }
        let _ = std::fs::remove_dir_all(&claimed);
        if let Some(id) = dir.file_name() {
            let (jail, cgroup) = self.spare_confinement(&id.to_string_lossy());
            self.remove_confinement(jail.as_deref(), cgroup);
        }
    }

    /// The jail directory and cgroup spare `id` was started with, those that exist.
    fn spare_confinement(&self, id: &str) -> (Option<PathBuf>, Option<PathBuf>) {
        let jail = Some(self.jails_dir().join(id)).filter(|p| p.is_dir());
        let cgroup = Some(jail::cgroup::parent().join(id)).filter(|p| p.is_dir());
        (jail, cgroup)
    }

    fn start_spare(&self, spares: &Path) -> Result<(), SandboxError> {
        let id = format!("spare-{}", random_hex());
        let dir = spares.join(&id);
        std::fs::create_dir(&dir).map_err(io("cannot create", &dir))?;
        let child = self.spawn_vmm(&id, &dir, false, &self.disk_policy(&[])?, &[])?;
        let pid_path = dir.join(PID_FILE);
        std::fs::write(&pid_path, child.process.id().to_string()).map_err(io("cannot write", &pid_path))
    }
}

/// Claims the spare in `dir` for this process by renaming its directory to a hidden name:
/// of several ember processes after it (to take it over or to stop it), exactly one gets
/// it, so that no process stops a VMM another has just taken over.
fn claim(dir: &Path) -> Option<PathBuf> {
    let id = dir.file_name()?.to_string_lossy();
    let claimed = dir.with_file_name(format!(".{id}.{}", std::process::id()));
    std::fs::rename(dir, &claimed).ok().map(|()| claimed)
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

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    /// A stand-in spare in `spares`/`id`: a shell (the store's "VMM binary") whose command line
    /// names the spare's socket, as an `ember vmm` started for it does.
    fn fake_spare(spares: &Path, id: &str) -> (PathBuf, Child) {
        let dir = spares.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        for f in [API_SOCKET, CONSOLE_LOG, VMM_LOG] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        // The trailing `:` keeps the shell from exec'ing sleep, so its argv stays in /proc.
        let child = Command::new("/bin/sh").args(["-c", "sleep 30; :", "sh"]).arg(dir.join(API_SOCKET)).spawn().unwrap();
        std::fs::write(dir.join(PID_FILE), child.id().to_string()).unwrap();
        assert!(serving_becomes(&dir, child.id() as i32, true), "the stand-in spare did not start");
        (dir, child)
    }

    fn serving_becomes(dir: &Path, pid: i32, want: bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while vmm_serves(pid, &dir.join(API_SOCKET)) != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        vmm_serves(pid, &dir.join(API_SOCKET)) == want
    }

    #[test]
    fn a_spare_taken_over_is_not_stopped_by_a_refill_that_listed_it_before() {
        let tmp = TempDir::new_with_prefix("/tmp/ember-spares-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from("/bin/sh"));
        let spares = store.spares_dir();
        let (spare_dir, mut spare) = fake_spare(&spares, "spare-a");
        let sandbox = store.dir("sb");
        std::fs::create_dir_all(&sandbox).unwrap();

        let adopted = store.adopt_spare(&sandbox).expect("the live spare is taken over");
        assert_eq!(adopted.pid, spare.id() as i32);
        assert_eq!(adopted.started_as, spare_dir.join(API_SOCKET));
        assert!(sandbox.join(API_SOCKET).exists() && sandbox.join(VMM_LOG).exists(), "its files moved");
        // Another start's refill saw the spare before the takeover and now finds it one too
        // many: the VMM is the sandbox's now, and must live on.
        store.discard_spare_now(&spare_dir);
        assert!(vmm_serves(adopted.pid, &adopted.started_as), "the taken-over VMM was stopped");
        assert!(store.adopt_spare(&sandbox).is_none(), "a spare was taken over twice");

        // One not taken over is stopped, and its files removed.
        let (other_dir, mut other) = fake_spare(&spares, "spare-b");
        store.discard_spare_now(&other_dir);
        other.wait().unwrap();
        assert!(!other_dir.exists());
        assert_eq!(std::fs::read_dir(&spares).unwrap().count(), 0, "claimed directories are removed");
        spare.kill().unwrap();
        spare.wait().unwrap();
    }
}
