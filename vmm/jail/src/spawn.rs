//! The control plane's side: starting a VMM process in a pid namespace of its own and, when
//! given one, directly in its cgroup (`clone3` with `CLONE_NEWPID | CLONE_INTO_CGROUP`: no
//! moment where it runs outside either). `std::process::Command` cannot pass clone flags, and
//! an `unshare(CLONE_NEWPID)` before exec would only move the VMM's children.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::{step, JailError};

/// `CLONE_INTO_CGROUP` (Linux 5.7), which the libc crate declares with a 32-bit type.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// How to start the process.
pub struct Spawn<'a> {
    pub program: &'a Path,
    pub args: Vec<OsString>,
    pub stdout: File,
    pub stderr: File,
    /// A new pid namespace (the process is its pid 1); needs root, or `user_namespace`.
    pub new_pid_namespace: bool,
    /// A new user namespace whose uid and gid 0 are these (the caller's own, for a caller
    /// that is not root): the new namespaces are then its own, and so it may jail itself.
    pub user_namespace: Option<(u32, u32)>,
    /// The cgroup directory to start the process in.
    pub cgroup: Option<&'a File>,
    /// Killed when this thread's process ends (`PR_SET_PDEATHSIG`), even if that is killed;
    /// otherwise the process gets a session of its own and outlives this one.
    pub tied: bool,
}

/// A process started by [`spawn`].
#[derive(Debug)]
pub struct Process {
    pid: i32,
    reaped: bool,
}

impl Process {
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// How the process ended, once it has (reaping it); `None` while it runs.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        if self.reaped {
            return None;
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        (rc == self.pid).then(|| {
            self.reaped = true;
            std::process::ExitStatus::from_raw(status)
        })
    }
}

/// Starts `spawn.program` with `spawn.args`, its stdin /dev/null, and returns once it runs the
/// program (an exec failure is returned as this call's error).
pub fn spawn(spawn: Spawn<'_>) -> Result<Process, JailError> {
    let cstring = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).map_err(|_| JailError::Relative { path: s.into() });
    let program = cstring(spawn.program.as_os_str())?;
    let args = std::iter::once(Ok(program.clone()))
        .chain(spawn.args.iter().map(|a| cstring(a)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let null = File::open("/dev/null").map_err(step("open /dev/null"))?;
    // The child reports an exec failure as its errno through this close-on-exec pipe; the
    // parent's read sees end-of-file once the exec succeeded. A tied child also watches it to
    // see if this process died before its death signal was set.
    let (read_end, write_end) = pipe()?;
    // A child in a user namespace waits on this one until its id maps are written (before
    // them it is nobody, and an exec would leave it without the capabilities it needs there).
    let (go_read, go_write) = pipe()?;
    let mut flags = 0u64;
    if spawn.user_namespace.is_some() {
        flags |= libc::CLONE_NEWUSER as u64;
    }
    if spawn.new_pid_namespace {
        flags |= libc::CLONE_NEWPID as u64;
    }
    if spawn.cgroup.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    // SAFETY: clone_args is plain data; zero is "not used" for every field.
    let mut clone_args: libc::clone_args = unsafe { std::mem::zeroed() };
    clone_args.flags = flags;
    clone_args.exit_signal = libc::SIGCHLD as u64;
    clone_args.cgroup = spawn.cgroup.map_or(0, |c| c.as_raw_fd() as u64);
    let (stdout, stderr, null_fd) = (spawn.stdout.as_raw_fd(), spawn.stderr.as_raw_fd(), null.as_raw_fd());
    let (read_fd, write_fd) = (read_end.as_raw_fd(), write_end.as_raw_fd());
    let (go_read_fd, go_write_fd) = (go_read.as_raw_fd(), go_write.as_raw_fd());
    let tied = spawn.tied;
    // SAFETY: clone3 without CLONE_VM forks this thread: the child gets a copy of the address
    // space and, until it execs, calls only async-signal-safe functions on memory prepared
    // above (no allocation, no locks), as after fork(2) in a threaded program.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &mut clone_args, std::mem::size_of::<libc::clone_args>()) };
    if pid == 0 {
        // SAFETY: the child, see above: raw system calls on valid fds and pointers only.
        unsafe {
            libc::close(read_fd);
            libc::close(go_write_fd);
            // Returns at end-of-file: the parent wrote the maps, or gave up and kills this.
            let mut byte = 0u8;
            while libc::read(go_read_fd, (&mut byte as *mut u8).cast(), 1) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
            libc::dup2(null_fd, 0);
            libc::dup2(stdout, 1);
            libc::dup2(stderr, 2);
            if tied {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            } else {
                libc::setsid();
            }
            libc::execv(program.as_ptr(), argv.as_ptr());
            let errno = *libc::__errno_location();
            libc::write(write_fd, (&errno as *const i32).cast(), 4);
            libc::_exit(127);
        }
    }
    if pid < 0 {
        return Err(JailError::Step { step: "start the VMM process (clone3)".into(), error: std::io::Error::last_os_error() });
    }
    drop(write_end);
    drop(go_read);
    let pid = pid as i32;
    if let Some((uid, gid)) = spawn.user_namespace {
        if let Err(e) = map_ids(pid, uid, gid) {
            // SAFETY: kill and waitpid of the child just made, which has not exec'd.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(e);
        }
    }
    drop(go_write);
    let mut errno = [0u8; 4];
    let mut got = 0;
    while got < errno.len() {
        // SAFETY: read into the valid remainder of the buffer.
        let n = unsafe { libc::read(read_fd, errno[got..].as_mut_ptr().cast(), errno.len() - got) };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    if got == errno.len() {
        // SAFETY: waitpid on the child that just failed to exec.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let error = std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
        return Err(JailError::Step { step: format!("run {}", spawn.program.display()), error });
    }
    // A tied child whose death signal was set after this process died would be orphaned; the
    // exec has happened, so it was set while this process lived.
    Ok(Process { pid, reaped: false })
}

/// Maps uid and gid 0 of process `pid`'s new user namespace to `uid` and `gid` outside, as an
/// unprivileged owner of the namespace may: one id each, and `setgroups` denied first.
fn map_ids(pid: i32, uid: u32, gid: u32) -> Result<(), JailError> {
    for (file, content) in [("uid_map", format!("0 {uid} 1\n")), ("setgroups", "deny\n".into()), ("gid_map", format!("0 {gid} 1\n"))] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, content).map_err(step(format!("write {path} (the VMM's user namespace)")))?;
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::Step { step: "make a pipe".into(), error: std::io::Error::last_os_error() });
    }
    // SAFETY: both fds were just made and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_sh(script: &str, tied: bool) -> Result<Process, JailError> {
        let out = File::create("/dev/null").unwrap();
        spawn(Spawn {
            program: Path::new("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            stdout: out.try_clone().unwrap(),
            stderr: out,
            new_pid_namespace: false,
            user_namespace: None,
            cgroup: None,
            tied,
        })
    }

    fn wait(process: &mut Process) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = process.try_wait() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "the process did not end");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_spawned_process_runs_the_program_and_its_status_is_seen() {
        let mut process = spawn_sh("exit 7", false).unwrap();
        assert_eq!(wait(&mut process).code(), Some(7));
        assert!(process.try_wait().is_none(), "a reaped process is not reported twice");
    }

    #[test]
    fn a_process_in_a_user_namespace_is_root_there_and_the_callers_ids_outside() {
        if !crate::user_namespaces_allowed() {
            eprintln!("skipped: no user namespaces here");
            return;
        }
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-spawn-").unwrap();
        let out_path = tmp.as_path().join("out");
        let out = File::create(&out_path).unwrap();
        let mut process = spawn(Spawn {
            program: Path::new("/bin/sh"),
            args: vec!["-c".into(), "cat /proc/self/uid_map /proc/self/gid_map /proc/self/setgroups; echo pid $$".into()],
            stdout: out.try_clone().unwrap(),
            stderr: out,
            new_pid_namespace: true,
            user_namespace: Some((uid, gid)),
            cgroup: None,
            tied: false,
        })
        .unwrap();
        assert_eq!(wait(&mut process).code(), Some(0));
        let text = std::fs::read_to_string(&out_path).unwrap();
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words, ["0", &uid.to_string(), "1", "0", &gid.to_string(), "1", "deny", "pid", "1"], "{text}");
    }

    #[test]
    fn an_exec_failure_is_the_spawns_error() {
        let out = File::create("/dev/null").unwrap();
        let error = spawn(Spawn {
            program: Path::new("/nonexistent/ember"),
            args: vec![],
            stdout: out.try_clone().unwrap(),
            stderr: out,
            new_pid_namespace: false,
            user_namespace: None,
            cgroup: None,
            tied: false,
        })
        .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ember") && error.to_string().contains("No such file"), "{error}");
    }

    #[test]
    fn a_process_in_a_new_pid_namespace_is_its_pid_1() {
        if !crate::privileged() {
            eprintln!("skipped: needs root for a pid namespace");
            return;
        }
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-spawn-").unwrap();
        let out_path = dir.as_path().join("out");
        let out = File::create(&out_path).unwrap();
        let mut process = spawn(Spawn {
            program: Path::new("/bin/sh"),
            args: vec!["-c".into(), "echo $$".into()],
            stdout: out.try_clone().unwrap(),
            stderr: out,
            new_pid_namespace: true,
            user_namespace: None,
            cgroup: None,
            tied: false,
        })
        .unwrap();
        assert!(wait(&mut process).success());
        assert_eq!(std::fs::read_to_string(&out_path).unwrap().trim(), "1");
    }
}
