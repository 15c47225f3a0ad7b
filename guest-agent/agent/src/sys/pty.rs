//! Pseudo terminals for execs that ask for one.

use std::io;
use std::os::fd::OwnedFd;

use agent_protocol::PtySize;
use rustix::fs::{open, Mode, OFlags};
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use rustix::termios::{tcgetattr, tcsetwinsize, SpecialCodeIndex, Winsize};

/// A new pty of `size`: (master, slave). Both are close-on-exec and opened with O_NOCTTY, so
/// that no other child inherits them and the agent never gets a controlling terminal; the
/// child makes the slave its own with [`make_controlling_tty`].
pub fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    set_pty_size(&master, size)?;
    Ok((master, slave))
}

pub fn set_pty_size(master: &OwnedFd, size: PtySize) -> io::Result<()> {
    let ws = Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(tcsetwinsize(master, ws)?)
}

/// The terminal's end-of-file character (VEOF, ^D unless changed).
pub fn eof_char(master: &OwnedFd) -> u8 {
    match tcgetattr(master) {
        Ok(t) if t.special_codes[SpecialCodeIndex::VEOF] != 0 => {
            t.special_codes[SpecialCodeIndex::VEOF]
        }
        _ => 0x04,
    }
}

/// In the child, after `setsid` and with the slave on fd 0: make it the controlling
/// terminal. Async-signal-safe: one ioctl, no allocation.
pub fn make_controlling_tty() -> io::Result<()> {
    Ok(rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?)
}
