//! A sandbox's record in its state directory (`sandbox.json`), and what is known of its
//! VMM process.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Files in a sandbox's state directory.
pub const RECORD: &str = "sandbox.json";
pub const API_SOCKET: &str = "api.sock";
pub const VSOCK_SOCKET: &str = "vsock.sock";
pub const OVERLAY: &str = "disk.qcow2";
pub const CONSOLE_LOG: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";
pub const METRICS: &str = "metrics.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// The VMM process.
    pub pid: i32,
    pub cid: u32,
    /// The base image the sandbox's overlay sits on.
    pub image: PathBuf,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// Whether the record's VMM process is alive: the pid exists, is not a zombie, and is the VMM
/// serving this sandbox's API socket (a recycled pid is someone else).
pub fn vmm_alive(pid: i32, dir: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself hold spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let socket = dir.join(API_SOCKET);
    cmdline.split(|b| *b == 0).any(|arg| Path::new(OsStr::from_bytes(arg)) == socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_the_vmm_only_if_it_serves_the_socket() {
        let dir = Path::new("/tmp/ember-record-test");
        let me = std::process::id() as i32;
        assert!(!vmm_alive(me, dir), "the test process does not serve that socket");
        assert!(!vmm_alive(i32::MAX, dir), "no such pid");
        let socket = dir.join(API_SOCKET);
        // The trailing `:` keeps the shell from exec'ing sleep, so its own argv (with the
        // socket path) stays in /proc.
        let mut child = std::process::Command::new("sh").args(["-c", "sleep 30; :", "sh"]).arg(&socket).spawn().unwrap();
        let pid = child.id() as i32;
        let wait_until = |want: bool| {
            // Until the child has exec'd, /proc shows the test's own command line.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while vmm_alive(pid, dir) != want && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            vmm_alive(pid, dir) == want
        };
        assert!(wait_until(true), "a live process with the socket on its command line");
        assert!(!vmm_alive(pid, Path::new("/tmp/elsewhere")), "another sandbox's directory");
        child.kill().unwrap();
        assert!(wait_until(false), "a killed (zombie) process is not alive");
        child.wait().unwrap();
    }
}
