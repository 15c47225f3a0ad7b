//! The local terminal for `ember exec --tty`: its size, and raw mode for as long as the remote
//! program runs, so that keys (Ctrl-C included) go to it unchanged.

use std::os::fd::{AsRawFd, RawFd};

use agent_protocol::PtySize;

/// The size of the terminal on `fd`, if it is one.
pub fn size(fd: RawFd) -> Option<PtySize> {
    // SAFETY: winsize is plain integers, for which all zeroes is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0).then_some(PtySize { rows: ws.ws_row, cols: ws.ws_col })
}

/// Puts stdin's terminal in raw mode; the previous mode comes back when this is dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    pub fn enter() -> Option<RawMode> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: termios is plain integers and arrays of them, for which all zeroes is valid.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr fills `saved`; cfmakeraw and tcsetattr read a valid termios.
        unsafe {
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            (libc::tcsetattr(fd, libc::TCSANOW, &raw) == 0).then_some(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the termios read in `enter`.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}
