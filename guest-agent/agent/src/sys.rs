//! Thin wrappers over the Linux calls the agent needs: the process reaper, identity hooks,
//! the AF_VSOCK listener, init-mode mounts.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use crate::Connection;
use agent_protocol::{ErrorKind, PtySize};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Maps an I/O error to the protocol's error kind.
pub fn error_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) => ErrorKind::PermissionDenied,
        Some(libc::EEXIST) => ErrorKind::AlreadyExists,
        Some(libc::EISDIR) => ErrorKind::IsADirectory,
        Some(libc::ENOTDIR) => ErrorKind::NotADirectory,
        _ => ErrorKind::Io,
    }
}

// ---------------------------------------------------------------------------------------
// Reaper
// ---------------------------------------------------------------------------------------

/// The one place that waits for children: a thread blocked in `waitpid(-1)`. Exec
/// supervisors register the pid they spawned and get its raw wait status on a channel;
/// every other child (detached processes, orphans re-parented to the agent when it is init
/// or a subreaper) is reaped and forgotten, so no zombie stays. Spawning happens with the
/// reaper's lock held (see [`Reaper::spawn_locked`]), so a child that exits at once cannot be
/// reaped before its supervisor is registered.
pub struct Reaper {
    state: Mutex<ReaperState>,
    cv: Condvar,
}

#[derive(Default)]
struct ReaperState {
    waiting: HashMap<libc::pid_t, Sender<libc::c_int>>,
    spawns: u64,
}

pub struct SpawnGuard<'a>(MutexGuard<'a, ReaperState>, &'a Condvar);

impl SpawnGuard<'_> {
    /// Registers `pid` and returns the channel its wait status arrives on.
    pub fn register(mut self, pid: u32) -> Receiver<libc::c_int> {
        let (tx, rx) = channel();
        self.0.waiting.insert(pid as libc::pid_t, tx);
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
            // SAFETY: siginfo_t is plain data, filled in by waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r == 0 {
                // SAFETY: waitid succeeded with WEXITED, so si_pid is the exited child.
                let pid = unsafe { info.si_pid() };
                let mut st = self.state.lock().unwrap();
                let mut status = 0;
                // A child that a failed spawn already reaped is gone: nothing to do.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                    if let Some(tx) = st.waiting.remove(&pid) {
                        let _ = tx.send(status);
                    }
                }
            } else {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // ECHILD: no children (hence no descendants either); wait for a spawn.
                let mut st = self.state.lock().unwrap();
                while st.spawns == gen {
                    st = self.cv.wait(st).unwrap();
                }
            }
        }
    }
}

/// Opens a pidfd (pollable: readable once the process has exited), if the kernel has them.
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        None
    } else {
        Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
}

pub fn kill(pid: u32, group: bool, signal: i32) -> io::Result<()> {
    let target = if group {
        -(pid as libc::pid_t)
    } else {
        pid as libc::pid_t
    };
    cvt(unsafe { libc::kill(target, signal) }).map(drop)
}

// ---------------------------------------------------------------------------------------
// Pseudo terminals
// ---------------------------------------------------------------------------------------

/// A new pty of `size`: (master, slave). Both are close-on-exec and opened with O_NOCTTY, so
/// that no other child inherits them and the agent never gets a controlling terminal; the
/// child makes the slave its own with [`make_controlling_tty`].
pub fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let m = cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    cvt(unsafe { libc::grantpt(m) })?;
    cvt(unsafe { libc::unlockpt(m) })?;
    let mut name = [0 as libc::c_char; 128];
    let r = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let s = cvt(unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    set_pty_size(&master, size)?;
    Ok((master, slave))
}

pub fn set_pty_size(master: &OwnedFd, size: PtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    cvt(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// The terminal's end-of-file character (VEOF, ^D unless changed).
pub fn eof_char(master: &OwnedFd) -> u8 {
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(master.as_raw_fd(), &mut t) } == 0 && t.c_cc[libc::VEOF] != 0 {
        t.c_cc[libc::VEOF]
    } else {
        0x04
    }
}

/// In the child, after `setsid` and with the slave on fd 0: make it the controlling
/// terminal. Async-signal-safe (one ioctl).
pub fn make_controlling_tty() -> io::Result<()> {
    cvt(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) }).map(drop)
}

// ---------------------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------------------

/// uid, gid and supplementary groups of a user name from the passwd/group databases.
pub fn lookup_user(name: &str) -> io::Result<(u32, u32, Vec<libc::gid_t>)> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut result = std::ptr::null_mut();
    let r = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    if result.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no user {name:?}"),
        ));
    }
    let (uid, gid) = (pwd.pw_uid, pwd.pw_gid);
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    let r = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    groups.truncate(if r < 0 { 0 } else { n as usize });
    if groups.is_empty() {
        groups.push(gid);
    }
    Ok((uid, gid, groups))
}

// ---------------------------------------------------------------------------------------
// Identity hooks
// ---------------------------------------------------------------------------------------

pub fn set_clock(secs: i64, nanos: u32) -> io::Result<()> {
    if nanos >= 1_000_000_000 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "nanos out of range",
        ));
    }
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as libc::c_long,
    };
    cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

// _IOW('R', 0x03, int[2]) and _IO('R', 0x07) from <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `data` into the input pool crediting `entropy_bits`, then reseeds the CRNG, so
/// that two restores of one snapshot stop sharing RNG state.
pub fn add_entropy(data: &[u8], entropy_bits: u32) -> io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + data.len());
    let bits = entropy_bits.min(data.len() as u32 * 8);
    info.extend_from_slice(&(bits as i32).to_ne_bytes());
    info.extend_from_slice(&(data.len() as i32).to_ne_bytes());
    info.extend_from_slice(data);
    // The kernel reads buf as __u32[], so keep the buffer 4-byte aligned and padded.
    let mut words = vec![0u32; info.len().div_ceil(4)];
    unsafe {
        std::ptr::copy_nonoverlapping(info.as_ptr(), words.as_mut_ptr() as *mut u8, info.len())
    };
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, words.as_ptr()) })?;
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) })?;
    Ok(())
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    cvt(unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) }).map(drop)
}

pub fn power_off() -> io::Result<()> {
    unsafe { libc::sync() };
    cvt(unsafe { libc::reboot(libc::RB_POWER_OFF) }).map(drop)
}

// ---------------------------------------------------------------------------------------
// Init mode
// ---------------------------------------------------------------------------------------

/// What an agent running as PID 1 sets up: the usual pseudo file systems (each one already
/// mounted is left alone), a PATH, and being the subreaper (implied for PID 1).
pub fn init_mounts() {
    let mounts: &[(&str, &str, &str, libc::c_ulong, &str)] = &[
        (
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    for &(src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        let c = |s: &str| CString::new(s).unwrap();
        let (src_c, target_c, fstype_c, data_c) = (c(src), c(target), c(fstype), c(data));
        let r = unsafe {
            libc::mount(
                src_c.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                flags,
                data_c.as_ptr() as *const libc::c_void,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                tracing::warn!("mount {target} ({fstype}): {e}");
            }
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
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }).map(drop)
}

// ---------------------------------------------------------------------------------------
// AF_VSOCK
// ---------------------------------------------------------------------------------------

/// A connected AF_VSOCK stream.
pub struct VsockStream(OwnedFd);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream(self.0.try_clone()?))
    }
    fn shutdown(&self) {
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// A listening AF_VSOCK socket bound to any CID on `port`.
pub struct VsockListener(OwnedFd);

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = cvt(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
        Ok(VsockListener(fd))
    }

    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                return Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
}
