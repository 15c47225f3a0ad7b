//! Identity hooks that a restored snapshot gets (clock, entropy, hostname), and power-off.

use std::io;
use std::os::fd::AsRawFd;

use rustix::system::RebootCommand;
use rustix::time::{ClockId, Timespec};

use super::cvt;

pub fn set_clock(secs: i64, nanos: u32) -> io::Result<()> {
    if nanos >= 1_000_000_000 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "nanos out of range",
        ));
    }
    let ts = Timespec {
        tv_sec: secs,
        tv_nsec: nanos.into(),
    };
    Ok(rustix::time::clock_settime(ClockId::Realtime, ts)?)
}

// _IOW('R', 0x03, int[2]) and _IO('R', 0x07) from <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `data` into the input pool crediting `entropy_bits`, then reseeds the CRNG, so
/// that two restores of one snapshot stop sharing RNG state. The ioctls are libc's: rustix's
/// typed ones take a fixed-size argument, and an `Ioctl` impl for this variable-length one
/// would be one more unsafe item, no easier to check than the call.
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
    let words: Vec<u32> = info
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_ne_bytes(w)
        })
        .collect();
    // SAFETY: `words` is a rand_pool_info whose buf_size is the number of data bytes that
    // follow its header, so the kernel reads only inside it; it stays alive for the call.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, words.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument; `f` is an open fd for the call.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) })?;
    Ok(())
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    Ok(rustix::system::sethostname(name.as_bytes())?)
}

pub fn power_off() -> io::Result<()> {
    rustix::fs::sync();
    Ok(rustix::system::reboot(RebootCommand::PowerOff)?)
}
