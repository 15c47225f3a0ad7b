//! Children: the reaper that waits for all of them, pidfds, signals.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use rustix::process::{
    pidfd_open as open_pidfd, waitpid, Pid, PidfdFlags, WaitOptions, WaitStatus,
};

use super::cvt;

/// The one place that waits for children: a thread blocked in `waitid(P_ALL)`. Exec
/// supervisors register the pid they spawned and get its wait status on a channel; every
/// other child (detached processes, orphans re-parented to the agent when it is init or a
/// subreaper) is reaped and forgotten, so no zombie stays. Spawning happens with the
/// reaper's lock held (see [`Reaper::spawn_locked`]), so a child that exits at once cannot be
/// reaped before its supervisor is registered.
pub struct Reaper {
    state: Mutex<ReaperState>,
    cv: Condvar,
}

#[derive(Default)]
struct ReaperState {
    waiting: HashMap<i32, Sender<WaitStatus>>,
    spawns: u64,
}

pub struct SpawnGuard<'a>(MutexGuard<'a, ReaperState>, &'a Condvar);

impl SpawnGuard<'_> {
    /// Registers `pid` and returns the channel its wait status arrives on.
    pub fn register(mut self, pid: u32) -> Receiver<WaitStatus> {
        let (tx, rx) = channel();
        self.0.waiting.insert(pid as i32, tx);
        self.0.spawns += 1;
        self.1.notify_all();
        rx
    }
    /// A child that nobody waits for (detached): the reaper reaps it.
    pub fn forget(mut self) {
        self.0.spawns += 1;
        self.1.notify_all();
    }
}

impl Reaper {
    pub fn get() -> &'static Reaper {
        static R: OnceLock<&'static Reaper> = OnceLock::new();
        R.get_or_init(|| {
            let r: &'static Reaper = Box::leak(Box::new(Reaper {
                state: Mutex::default(),
                cv: Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("reaper".into())
                .stack_size(64 << 10)
                .spawn(move || r.run())
                .expect("spawn reaper thread");
            r
        })
    }

    /// Lock before spawning; then `register` or `forget` the child (or drop on failure).
    pub fn spawn_locked(&self) -> SpawnGuard<'_> {
        SpawnGuard(self.state.lock().unwrap(), &self.cv)
    }

    fn run(&self) {
        loop {
            let gen = self.state.lock().unwrap().spawns;
            // Peek at which child exited without reaping it: std's `Command::spawn` reaps a
            // child that failed to exec itself, and a reaper that took it first would make
            // that spawn panic. The spawner holds the lock until the child is registered, so
            // taking the lock below waits for any spawn in progress to finish.
            match peek_exited() {
                Ok(pid) => {
                    let mut st = self.state.lock().unwrap();
                    // A child that a failed spawn already reaped is gone: nothing to do.
                    if let Ok(Some((_, status))) = waitpid(Some(pid), WaitOptions::NOHANG) {
                        if let Some(tx) = st.waiting.remove(&pid.as_raw_nonzero().get()) {
                            let _ = tx.send(status);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // ECHILD: no children (hence no descendants either); wait for a spawn.
                    let mut st = self.state.lock().unwrap();
                    while st.spawns == gen {
                        st = self.cv.wait(st).unwrap();
                    }
                }
            }
        }
    }
}

/// Blocks until some child has exited and returns its pid, leaving it unreaped. libc's:
/// rustix's `waitid` does not say which child it was.
fn peek_exited() -> io::Result<Pid> {
    // SAFETY: siginfo_t is plain data (integers and pointers), for which all zeroes is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a live, writable siginfo_t that waitid fills in; P_ALL ignores the id.
    cvt(unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) })?;
    // SAFETY: waitid succeeded with WEXITED, so the kernel filled in the SIGCHLD fields, of
    // which si_pid is one.
    let pid = unsafe { info.si_pid() };
    Pid::from_raw(pid).ok_or_else(|| io::Error::other("waitid: no pid"))
}

/// Opens a pidfd (pollable: readable once the process has exited), if the kernel has them.
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    open_pidfd(Pid::from_raw(pid as i32)?, PidfdFlags::empty()).ok()
}

/// Sends `signal` to `pid` or its process group. libc's: the number comes from the host and
/// may be any signal the kernel knows (real-time ones too), which rustix's `Signal` only
/// takes unchecked.
pub fn kill(pid: u32, group: bool, signal: i32) -> io::Result<()> {
    let target = if group { -(pid as i32) } else { pid as i32 };
    // SAFETY: kill takes no pointers; the kernel checks the pid and the signal number.
    cvt(unsafe { libc::kill(target, signal) }).map(drop)
}
