//! A sandbox's record in its state directory (`sandbox.json`), and what is known of its
//! VMM process.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::paths::API_SOCKET;

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
    /// The API socket path the VMM was started with, when that is not this sandbox's (a
    /// spare VMM taken over): how the process is recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_socket: Option<PathBuf>,
    /// The VMM's jail directory (see `jail`), when it is jailed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<PathBuf>,
    /// The VMM's cgroup, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The directories the VMM allows backing files under (`ember vmm --disk-dir`): a fork's
    /// children get the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_dirs: Vec<PathBuf>,
}

impl Record {
    /// Whether the record's VMM process is alive (see [`vmm_serves`]); `dir` is the
    /// sandbox's state directory.
    pub fn vmm_alive(&self, dir: &Path) -> bool {
        let socket = self.vmm_socket.clone().unwrap_or_else(|| dir.join(API_SOCKET));
        vmm_serves(self.pid, &socket)
    }
}

/// Whether process `pid` is alive (not a zombie) and is the VMM started to serve `socket`
/// (a recycled pid is someone else).
pub fn vmm_serves(pid: i32, socket: &Path) -> bool {
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
    cmdline.split(|b| *b == 0).any(|arg| Path::new(OsStr::from_bytes(arg)) == socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_the_vmm_only_if_it_serves_the_socket() {
        let dir = Path::new("/tmp/ember-record-test");
        let socket = dir.join(API_SOCKET);
        let me = std::process::id() as i32;
        assert!(!vmm_serves(me, &socket), "the test process does not serve that socket");
        assert!(!vmm_serves(i32::MAX, &socket), "no such pid");
        // The trailing `:` keeps the shell from exec'ing sleep, so its own argv (with the
        // socket path) stays in /proc.
        let mut child = std::process::Command::new("sh").args(["-c", "sleep 30; :", "sh"]).arg(&socket).spawn().unwrap();
        let pid = child.id() as i32;
        let wait_until = |want: bool| {
            // Until the child has exec'd, /proc shows the test's own command line.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while vmm_serves(pid, &socket) != want && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            vmm_serves(pid, &socket) == want
        };
        assert!(wait_until(true), "a live process with the socket on its command line");
        assert!(!vmm_serves(pid, Path::new("/tmp/elsewhere/api.sock")), "another sandbox's socket");
        let record = Record {
            name: "r".into(),
            pid,
            cid: 3,
            image: "/i".into(),
            mem_mib: 128,
            vcpus: 1,
            created: 1,
            vmm_socket: None,
            jail: None,
            cgroup: None,
            disk_dirs: Vec::new(),
        };
        assert!(record.vmm_alive(dir), "recognised by the sandbox's own socket");
        let adopted = Record { vmm_socket: Some(socket.clone()), ..record.clone() };
        assert!(adopted.vmm_alive(Path::new("/tmp/elsewhere")), "a taken-over VMM, by the socket it was started with");
        let other = Record { vmm_socket: Some("/tmp/elsewhere/api.sock".into()), ..record };
        assert!(!other.vmm_alive(dir));
        child.kill().unwrap();
        assert!(wait_until(false), "a killed (zombie) process is not alive");
        child.wait().unwrap();
    }
}
