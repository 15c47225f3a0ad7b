//! Users by name, for execs that run as one. libc's: the passwd and group databases are the
//! C library's (NSS), and rustix has no calls for them.

use std::ffi::CString;
use std::io;

use rustix::process::{Gid, Uid};

/// uid, gid and supplementary groups of a user name from the passwd/group databases.
pub fn lookup_user(name: &str) -> io::Result<(Uid, Gid, Vec<Gid>)> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: passwd is plain data (integers and pointers), for which all zeroes is valid.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut result = std::ptr::null_mut();
    // SAFETY: `cname` is NUL-terminated; `pwd`, `buf` (with its true length) and `result`
    // are live and writable for the call. The strings it leaves in `pwd` point into `buf`,
    // and only the integer fields are read below.
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
    // SAFETY: `cname` is NUL-terminated and `n` is the length of `groups`, so getgrouplist
    // writes at most that many entries (it fails with -1 rather than write past it).
    let r = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    groups.truncate(if r < 0 { 0 } else { n as usize });
    if groups.is_empty() {
        groups.push(gid);
    }
    Ok((
        Uid::from_raw_unchecked(uid),
        Gid::from_raw_unchecked(gid),
        groups.into_iter().map(Gid::from_raw_unchecked).collect(),
    ))
}
