//! The VMM's seccomp filters: one per thread kind, default deny, each rule justified in
//! `filters.json` (seccompiler's JSON, compiled to BPF by `build.rs` and included here).
//!
//! Each thread installs its own filter before it reads a byte of guest or API input ([`install`]):
//! the API thread before its first accept, each vCPU thread before its first KVM_RUN, the main
//! thread before its first API request (or, in the foreground `ember run`, before the guest runs).
//! A thread inherits its creator's filter and adds its own; the kernel takes the strictest answer
//! of all. vCPU threads are spawned by the filtered main thread, so the main filter allows
//! everything the vCPU filter does (a test checks it) and a vCPU thread ends up with exactly
//! what its own filter allows.
//!
//! A forbidden call traps: the SIGSYS handler writes one line naming the thread and the call to
//! stderr (the VMM's `vmm.log`) and the process exits with [`EXIT_STATUS`]. `EMBER_SECCOMP=log`
//! lets forbidden calls through and has the kernel log them instead (for finding what a filter
//! lacks); `EMBER_SECCOMP=off` installs nothing (unsafe: for diagnosis only).

mod names;

use std::sync::Once;

use seccompiler::{sock_filter, BpfProgram};

/// Exit status of a VMM that made a forbidden system call (128 + SIGSYS, as a shell reports a
/// process that SIGSYS killed).
pub const EXIT_STATUS: i32 = 159;

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    /// Pre-boot configuration, the event loop, devices, snapshots, freezing memory.
    Main,
    /// The HTTP API server.
    Api,
    /// A vCPU's KVM_RUN loop.
    Vcpu,
}

impl Thread {
    pub fn name(self) -> &'static str {
        match self {
            Thread::Main => "main",
            Thread::Api => "API",
            Thread::Vcpu => "vCPU",
        }
    }
}

/// What a filter does with a call it does not allow (`EMBER_SECCOMP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SECCOMP_RET_TRAP: the SIGSYS handler reports the call and the VMM exits (the default).
    Enforce,
    /// SECCOMP_RET_LOG: the call goes through and the kernel logs it (`log`).
    Log,
    /// No filter at all (`off`): unsafe, for diagnosis only.
    Off,
}

impl Mode {
    /// The mode `EMBER_SECCOMP` asks for: unset or empty enforces.
    pub fn from_env() -> Result<Self, SeccompError> {
        Self::parse(std::env::var("EMBER_SECCOMP").ok().as_deref())
    }

    pub fn parse(value: Option<&str>) -> Result<Self, SeccompError> {
        match value {
            None | Some("") => Ok(Mode::Enforce),
            Some("log") => Ok(Mode::Log),
            Some("off") => Ok(Mode::Off),
            Some(other) => Err(SeccompError::Mode(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("EMBER_SECCOMP={0:?} is not a seccomp mode: leave it unset (enforce), or set it to log or off")]
    Mode(String),
    #[error("cannot install the {thread} thread's seccomp filter: {source}")]
    Apply { thread: &'static str, source: seccompiler::Error },
    #[error("cannot install the SIGSYS handler that reports forbidden system calls: {0}")]
    Handler(std::io::Error),
}

macro_rules! filter {
    ($name:literal) => {
        (
            include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".bpf")).as_slice(),
            include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".log.bpf")).as_slice(),
        )
    };
}

/// The compiled filters of `thread`, in the order they are installed.
pub fn programs(thread: Thread, mode: Mode) -> Vec<BpfProgram> {
    let filters: &[(&[u8], &[u8])] = match thread {
        // clone3 first: it answers ENOSYS so that glibc falls back to clone, which the main
        // filter checks (it allows clone3 itself; the stricter answer, ENOSYS, wins).
        Thread::Main => &[filter!("clone3"), filter!("main")],
        Thread::Api => &[filter!("api")],
        Thread::Vcpu => &[filter!("vcpu")],
    };
    filters.iter().map(|(trap, log)| decode(if mode == Mode::Log { log } else { trap })).collect()
}

fn decode(bytes: &[u8]) -> BpfProgram {
    bytes
        .chunks_exact(8)
        .map(|i| sock_filter {
            code: u16::from_le_bytes([i[0], i[1]]),
            jt: i[2],
            jf: i[3],
            k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
        })
        .collect()
}

/// Installs `thread`'s filter on the calling thread, in the mode `EMBER_SECCOMP` says.
pub fn install(thread: Thread) -> Result<(), SeccompError> {
    install_with(thread, Mode::from_env()?)
}

pub fn install_with(thread: Thread, mode: Mode) -> Result<(), SeccompError> {
    match mode {
        Mode::Off => {
            tracing::warn!(
                "EMBER_SECCOMP=off: the {} thread runs without a seccomp filter (unsafe, for diagnosis only)",
                thread.name()
            );
            return Ok(());
        }
        Mode::Log => tracing::warn!(
            "EMBER_SECCOMP=log: the {} thread's forbidden system calls are logged by the kernel, not refused",
            thread.name()
        ),
        Mode::Enforce => {}
    }
    install_sigsys_handler()?;
    apply(thread, &programs(thread, mode))
}

/// Applies compiled `programs` to the calling thread (seccompiler sets `PR_SET_NO_NEW_PRIVS`
/// first). Allocates nothing: a forked child of a threaded process may call it.
pub fn apply(thread: Thread, programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for program in programs {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Apply { thread: thread.name(), source })?;
    }
    Ok(())
}

/// The SIGSYS handler is process-wide; it is installed once, before the first filter.
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; all-zero is a valid starting point.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: the handler only makes async-signal-safe calls (prctl, write, _exit).
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
            result = Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    });
    result
}

/// The SIGSYS fields of `siginfo_t` on x86_64 (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS that a seccomp filter's SECCOMP_RET_TRAP sent.
const SYS_SECCOMP: libc::c_int = 1;

/// A line in a fixed buffer: the handler may not allocate.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t; for SIGSYS its union holds `_sigsys`.
    let info = unsafe { &*(info as *const SigsysInfo) };
    let mut thread = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `thread`.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let thread_len = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    let mut line = Line { buf: [0; 192], len: 0 };
    line.push(b"ember vmm: seccomp: thread ");
    line.push(&thread[..thread_len]);
    if info.code == SYS_SECCOMP {
        line.push(b" made forbidden system call ");
        line.push_number(info.syscall as u64);
        let name = names::NAMES.get(info.syscall as usize).filter(|_| info.arch == AUDIT_ARCH_X86_64);
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            line.push(b" (");
            line.push(name.as_bytes());
            line.push(b")");
        }
    } else {
        line.push(b" got a SIGSYS not sent by seccomp");
    }
    line.push(b"; the VMM exits with status ");
    line.push_number(EXIT_STATUS as u64);
    line.push(b"\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid for `len` bytes.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_STATUS);
    }
}

/// `AUDIT_ARCH_X86_64`: the architecture a trapped call's number belongs to.
const AUDIT_ARCH_X86_64: libc::c_uint = 0xc000_003e;

#[cfg(test)]
mod tests;
