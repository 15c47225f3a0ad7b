//! Each filter applied in a forked child: an allowed call the thread needs goes through (the
//! child reports it on a pipe), then a forbidden one ends the child through the SIGSYS handler,
//! whose line on the child's stderr the parent reads.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::*;

struct Child {
    status: libc::c_int,
    stderr: String,
    /// What the child wrote to its progress pipe: one byte per allowed call that did what it should.
    progress: Vec<u8>,
}

impl Child {
    fn assert_trapped(&self, call: &str) {
        assert!(
            libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == EXIT_STATUS,
            "the child was not ended by the SIGSYS handler (wait status {:#x}); stderr: {}",
            self.status,
            self.stderr
        );
        assert!(self.stderr.contains(call), "the handler's line does not name {call:?}: {}", self.stderr);
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into `fds`.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn read_all(fd: OwnedFd) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut out).unwrap();
    out
}

/// Marks progress from the child: `ok` says the allowed call did what it should.
fn progress(fd: libc::c_int, ok: bool) {
    if ok {
        // SAFETY: writes one byte from a static buffer.
        unsafe { libc::write(fd, b"+".as_ptr().cast(), 1) };
    }
}

/// Forks a child named `name` that installs `thread`'s filter in `mode`, then runs `body` with
/// its progress fd and exits 0. The filter is compiled before the fork so that the child
/// (of a threaded test process) allocates nothing before `body`.
fn in_child(thread: Thread, mode: Mode, name: &CStr, body: fn(libc::c_int)) -> Child {
    let programs = programs(thread, mode);
    install_sigsys_handler().unwrap();
    let (err_r, err_w) = pipe();
    let (progress_r, progress_w) = pipe();
    // SAFETY: the child only makes system calls (and `body`'s) before it exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: plain system calls on fds this process owns; the name is NUL-terminated.
        unsafe {
            libc::dup2(err_w.as_raw_fd(), libc::STDERR_FILENO);
            libc::prctl(libc::PR_SET_NAME, name.as_ptr());
        }
        if apply(thread, &programs).is_err() {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(100) };
        }
        body(progress_w.as_raw_fd());
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    drop((err_w, progress_w));
    let stderr = String::from_utf8_lossy(&read_all(err_r)).into_owned();
    let progress = read_all(progress_r);
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    Child { status, stderr, progress }
}

fn errno() -> libc::c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

const KVM_RUN: libc::c_ulong = 0xae80;
const KVM_CREATE_VM: libc::c_ulong = 0xae01;

#[test]
fn the_vcpu_filter_allows_kvm_run_and_traps_openat() {
    let child = in_child(Thread::Vcpu, Mode::Enforce, c"ember-vcpu0", |p| {
        // SAFETY: an ioctl on an invalid fd: the filter lets it through and the kernel says EBADF.
        let r = unsafe { libc::ioctl(-1, KVM_RUN) };
        progress(p, r == -1 && errno() == libc::EBADF);
        // SAFETY: a NUL-terminated path; the call is trapped before it runs.
        unsafe { libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    });
    assert_eq!(child.progress, b"+", "KVM_RUN was refused: {}", child.stderr);
    child.assert_trapped("ember vmm: seccomp: thread ember-vcpu0 made forbidden system call 257 (openat)");
}

#[test]
fn the_vcpu_filter_checks_ioctl_numbers() {
    let child = in_child(Thread::Vcpu, Mode::Enforce, c"ember-vcpu1", |_| {
        // SAFETY: an ioctl on an invalid fd; trapped before it runs.
        unsafe { libc::ioctl(-1, KVM_CREATE_VM) };
    });
    child.assert_trapped("thread ember-vcpu1 made forbidden system call 16 (ioctl)");
}

#[test]
fn the_api_filter_allows_accept_and_traps_execve() {
    let child = in_child(Thread::Api, Mode::Enforce, c"ember-api", |p| {
        // SAFETY: accept4 on an invalid fd: allowed, and the kernel says EBADF.
        let r = unsafe { libc::accept4(-1, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        progress(p, r == -1 && errno() == libc::EBADF);
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        // SAFETY: NUL-terminated path and argv; the call is trapped before it runs.
        unsafe { libc::execve(argv[0], argv.as_ptr(), std::ptr::null()) };
    });
    assert_eq!(child.progress, b"+", "accept4 was refused: {}", child.stderr);
    child.assert_trapped("thread ember-api made forbidden system call 59 (execve)");
}

#[test]
fn the_main_filter_allows_unix_sockets_and_traps_inet_ones() {
    let child = in_child(Thread::Main, Mode::Enforce, c"ember", |p| {
        // SAFETY: socket has no memory arguments.
        let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        progress(p, unix >= 0);
        // SAFETY: as above; trapped before it runs.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    });
    assert_eq!(child.progress, b"+", "an AF_UNIX socket was refused: {}", child.stderr);
    child.assert_trapped("thread ember made forbidden system call 41 (socket)");
}

#[test]
fn the_main_filter_maps_memory_but_never_executable() {
    let child = in_child(Thread::Main, Mode::Enforce, c"ember", |p| {
        let map = |prot| {
            // SAFETY: a new anonymous mapping; nothing existing is touched.
            unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) }
        };
        progress(p, map(libc::PROT_READ | libc::PROT_WRITE) != libc::MAP_FAILED);
        map(libc::PROT_READ | libc::PROT_EXEC);
    });
    assert_eq!(child.progress, b"+", "a read-write mapping was refused: {}", child.stderr);
    child.assert_trapped("made forbidden system call 9 (mmap)");
}

#[test]
fn the_main_filter_spawns_threads_but_no_processes() {
    let child = in_child(Thread::Main, Mode::Enforce, c"ember", |p| {
        // SAFETY: clone3 with no arguments: answered by the filter (ENOSYS) before the kernel
        // would look at them.
        let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        progress(p, r == -1 && errno() == libc::ENOSYS);
        progress(p, std::thread::spawn(|| 7).join().ok() == Some(7));
        // SAFETY: fork's clone is trapped before it runs.
        unsafe { libc::fork() };
    });
    assert_eq!(child.progress, b"++", "clone3 was not answered ENOSYS or a thread did not start: {}", child.stderr);
    child.assert_trapped("made forbidden system call 56 (clone)");
}

#[test]
fn every_filter_denies_a_call_it_does_not_list() {
    for (thread, name) in [(Thread::Main, c"ember"), (Thread::Api, c"ember-api"), (Thread::Vcpu, c"ember-vcpu0")] {
        let child = in_child(thread, Mode::Enforce, name, |_| {
            // SAFETY: getppid has no arguments; no filter lists it.
            unsafe { libc::getppid() };
        });
        child.assert_trapped(&format!("thread {} made forbidden system call 110 (getppid)", name.to_str().unwrap()));
    }
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    let child = in_child(Thread::Vcpu, Mode::Log, c"ember-vcpu0", |p| {
        // SAFETY: getppid has no arguments.
        let parent = unsafe { libc::getppid() };
        progress(p, parent > 1);
    });
    assert_eq!(child.progress, b"+", "getppid did not go through: {}", child.stderr);
    assert!(libc::WIFEXITED(child.status) && libc::WEXITSTATUS(child.status) == 0, "status {:#x}", child.status);
}

#[test]
fn modes_come_from_ember_seccomp() {
    assert_eq!(Mode::parse(None).unwrap(), Mode::Enforce);
    assert_eq!(Mode::parse(Some("")).unwrap(), Mode::Enforce);
    assert_eq!(Mode::parse(Some("log")).unwrap(), Mode::Log);
    assert_eq!(Mode::parse(Some("off")).unwrap(), Mode::Off);
    assert!(Mode::parse(Some("of")).unwrap_err().to_string().contains("EMBER_SECCOMP=\"of\""));
}

/// The rules of one filter in filters.json: per system call, the argument checks of each rule
/// (comments left out); an empty list of checks allows the call whatever its arguments.
fn rules(filter: &str) -> std::collections::BTreeMap<String, Vec<serde_json::Value>> {
    let json: serde_json::Value = serde_json::from_str(include_str!("../filters.json")).unwrap();
    let mut out = std::collections::BTreeMap::<String, Vec<serde_json::Value>>::new();
    for rule in json[filter]["filter"].as_array().unwrap() {
        assert!(
            rule["comment"].as_str().is_some_and(|c| !c.is_empty()),
            "a {filter} rule says nothing of why: {rule}"
        );
        let mut args = rule.get("args").cloned().unwrap_or_else(|| serde_json::json!([]));
        for arg in args.as_array_mut().unwrap() {
            arg.as_object_mut().unwrap().remove("comment");
        }
        out.entry(rule["syscall"].as_str().unwrap().to_string()).or_default().push(args);
    }
    out
}

#[test]
fn vcpu_threads_lose_nothing_to_the_main_filter_they_inherit() {
    let main = rules("main");
    for (syscall, checks) in rules("vcpu") {
        let Some(allowed) = main.get(&syscall) else {
            panic!("the vCPU filter allows {syscall}, the main filter (which vCPU threads inherit) does not");
        };
        let unconditional = allowed.iter().any(|a| a.as_array().unwrap().is_empty());
        for check in checks {
            assert!(
                unconditional || allowed.contains(&check),
                "the vCPU filter allows {syscall} with {check}, the main filter does not"
            );
        }
    }
}

#[test]
fn every_rule_is_justified() {
    for filter in ["main", "api", "vcpu", "clone3"] {
        assert!(!rules(filter).is_empty());
    }
}
