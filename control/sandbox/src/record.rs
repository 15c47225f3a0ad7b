//! A sandbox's record in its state directory (`sandbox.json`), and what is known of its
//! VMM process and of the process starting it.
//!
//! A record is written as soon as the sandbox's directory exists, in phase `starting` with
//! its starter (the ember process making it); again once its VMM is spawned; and in phase
//! `ready` once its agent answered and has its identity. A record still `starting` whose
//! starter is gone is a failed start (the starter was killed): whoever meets it stops its VMM,
//! `ls` shows it as failed, and `rm` removes it. A hidden sandbox stays `starting` for its
//! whole life: it is its command's scratch, and dies with it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::io;
use crate::paths::{API_SOCKET, RECORD};
use crate::SandboxError;

/// How far a sandbox's start has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Being made by its starter (or it died doing so).
    Starting,
    /// Its start completed. Records from before phases were kept are taken as ready.
    #[default]
    Ready,
}

/// A process, told apart from a later one with the same pid by its start time (clock ticks
/// after boot, `/proc/PID/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Starter {
    pub pid: i32,
    pub start_time: u64,
}

impl Starter {
    /// Process `pid`, if it is alive (not a zombie).
    pub fn of(pid: i32) -> Option<Starter> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the parenthesised command name (which may hold spaces) start
        // with field 3, the state; the start time is field 22.
        let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
        if matches!(fields.next(), None | Some("Z") | Some("X")) {
            return None;
        }
        let start_time = fields.nth(18)?.parse().ok()?;
        Some(Starter { pid, start_time })
    }

    /// This process.
    pub fn this_process() -> Result<Starter, SandboxError> {
        static ME: OnceLock<Option<Starter>> = OnceLock::new();
        let me = ME.get_or_init(|| Starter::of(std::process::id() as i32));
        me.ok_or_else(|| io("cannot read", Path::new("/proc/self/stat"))(std::io::ErrorKind::NotFound.into()))
    }

    /// Whether this process is still running.
    pub fn alive(&self) -> bool {
        Starter::of(self.pid).is_some_and(|now| now == *self)
    }
}

/// Where a sandbox's start stands, from its record and whether its starter lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartState {
    Ready,
    /// Its starter is at it, in this process or another.
    Starting { by_this_process: bool },
    /// Its starter is gone, the start unfinished.
    Failed,
}

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
    #[serde(default)]
    pub phase: Phase,
    /// The process making the sandbox, while it is `starting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starter: Option<Starter>,
    /// When it ends (`ember run --ttl`), and what then becomes of its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<crate::lifetime::Lifetime>,
    /// What it was restored from; none when it was booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Its egress proxy, once it was given egress (see `egress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<crate::egress::EgressProxy>,
}

/// What a restored sandbox continues: a snapshot's directory (a template's among them), or
/// the sandbox it is a fork of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Snapshot(PathBuf),
    Fork(String),
}

impl Record {
    /// The record of sandbox `name` as soon as its directory is made: this process is
    /// starting it, and nothing else is known yet (no VMM: pid 0).
    pub(crate) fn starting(name: &str) -> Result<Record, SandboxError> {
        Ok(Record {
            name: name.to_string(),
            pid: 0,
            cid: 0,
            image: PathBuf::new(),
            mem_mib: 0,
            vcpus: 0,
            created: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs(),
            vmm_socket: None,
            jail: None,
            cgroup: None,
            disk_dirs: Vec::new(),
            phase: Phase::Starting,
            starter: Some(Starter::this_process()?),
            lifetime: None,
            origin: None,
            egress: None,
        })
    }

    pub fn start_state(&self) -> StartState {
        match (self.phase, self.starter) {
            (Phase::Ready, _) => StartState::Ready,
            (Phase::Starting, Some(starter)) if starter.alive() => {
                StartState::Starting { by_this_process: Starter::this_process().is_ok_and(|me| me == starter) }
            }
            (Phase::Starting, _) => StartState::Failed,
        }
    }

    /// Writes the record into `dir` whole or not at all (a temporary file renamed over it),
    /// so that a reader never sees half of one.
    pub(crate) fn write(&self, dir: &Path) -> Result<(), SandboxError> {
        let path = dir.join(RECORD);
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| SandboxError::BadRecord { path: path.clone(), reason: e.to_string() })?;
        let temporary = dir.join(format!(".{RECORD}.{}", std::process::id()));
        std::fs::write(&temporary, json).map_err(io("cannot write", &temporary))?;
        std::fs::rename(&temporary, &path).map_err(io("cannot write", &path))
    }

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

/// A live process started to serve `socket`, looked for among all processes: the VMM of a
/// start that died before recording its pid.
pub fn find_vmm_serving(socket: &Path) -> Option<i32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).find(|&pid| vmm_serves(pid, socket))
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
            phase: Phase::Ready,
            starter: None,
            lifetime: None,
            origin: None,
            egress: None,
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
