//! What the CLI's tests share: the `ember` binary run against a state directory of the
//! test's own, sandboxes made there by hand (records, a stand-in VMM process), and a stand-in
//! for a VM's vsock socket that leads to the real guest agent, run in this process.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Ember {
    pub state: tempfile::TempDir,
}

impl Ember {
    pub fn new() -> Ember {
        Ember { state: tempfile::Builder::new().prefix("ember-cli-").tempdir_in("/tmp").unwrap() }
    }

    /// `ember ARGS` with this state, none of the caller's ember settings, and stdin closed.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
        c.args(args).env("EMBER_STATE", self.state.path()).env("EMBER_SPARE_VMMS", "0");
        for var in ["EMBER_HOME", "EMBER_LOG", "RUST_LOG", "EMBER_MAX_MEM_MIB", "EMBER_DISK_DIRS"] {
            c.env_remove(var);
        }
        c.stdin(std::process::Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.state.path().join("sandboxes").join(name)
    }

    /// Writes sandbox `name`'s record as a completed start with VMM `pid`, made `created`
    /// (Unix seconds).
    pub fn sandbox(&self, name: &str, pid: u32, created: u64) -> PathBuf {
        let dir = self.dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let record = serde_json::json!({
            "name": name, "pid": pid, "cid": 3, "image": "/nonexistent/image.ext4",
            "mem_mib": 256, "vcpus": 1, "created": created, "phase": "ready",
        });
        std::fs::write(dir.join("sandbox.json"), record.to_string()).unwrap();
        dir
    }
}

/// The output's stderr, and its exit status.
pub fn failure(out: &Output) -> (String, Option<i32>) {
    (String::from_utf8_lossy(&out.stderr).into_owned(), out.status.code())
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A stand-in for sandbox `dir`'s VMM: a process whose command line names its API socket, as
/// `ember vmm` started for it does (which is how ember tells its VMM from a recycled pid).
pub struct StandInVmm(pub std::process::Child);

impl StandInVmm {
    pub fn start(dir: &Path) -> StandInVmm {
        // The trailing `:` keeps the shell from exec'ing sleep, so its argv stays in /proc.
        let child = Command::new("/bin/sh").args(["-c", "sleep 60; :", "sh"]).arg(dir.join("api.sock")).spawn().unwrap();
        // Its argv is in /proc once exec is done.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        let api = dir.join("api.sock");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read(&cmdline).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == api.as_os_str().as_encoded_bytes())) {
            assert!(std::time::Instant::now() < deadline, "the stand-in VMM did not start");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        StandInVmm(child)
    }
}

impl Drop for StandInVmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The variable that makes this test binary the guest agent (see [`agent_process`]).
const AGENT_SOCKET: &str = "EMBER_CLI_TEST_AGENT_SOCKET";

/// A vsock socket at `path` as a VMM serves one, leading to the real guest agent, until the
/// returned process is dropped. The agent runs in a process of its own (this test binary run
/// again, as [`agent_process`]): its reaper waits for every child of its process, and would
/// take the `ember` processes the tests wait for.
pub fn vsock_with_agent(path: &Path) -> Agent {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "common::agent_process", "--nocapture", "--test-threads=1"])
        .env(AGENT_SOCKET, path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let agent = Agent(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "the agent process did not bind {}", path.display());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    agent
}

pub struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Not a test: the agent process of [`vsock_with_agent`], which serves the socket its
/// variable names as a VMM's vsock socket does: each connection says `CONNECT <port>`, is
/// answered `OK`, and is then the agent's. Without the variable it returns at once.
#[test]
fn agent_process() {
    let Some(path) = std::env::var_os(AGENT_SOCKET) else { return };
    let listener = UnixListener::bind(path).unwrap();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { return };
        std::thread::spawn(move || {
            // Byte by byte: what follows the line is the agent's.
            let mut line = Vec::new();
            let mut byte = [0u8];
            while line.last() != Some(&b'\n') && stream.read_exact(&mut byte).is_ok() {
                line.push(byte[0]);
            }
            assert!(line.starts_with(b"CONNECT "), "{line:?}");
            stream.write_all(b"OK 1073741824\n").unwrap();
            let _ = ember_agent::server::serve(stream, &ember_agent::server::Config::default());
        });
    }
}
