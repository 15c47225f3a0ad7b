//! What the agent's native tests share: a client over a socket pair served by the agent's
//! `serve` (or the binary over `--unix`), and helpers for requests and data.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::time::Duration;

use ember_agent::server::{serve, Config};
use agent_protocol::{read_message, write_frame, ExecRequest, Reply, ReplyBody, Request, RequestBody};

pub struct Client {
    pub s: UnixStream,
}

impl Client {
    pub fn new() -> Client {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || serve(b, &Config::default()));
        Client::over(a)
    }
    pub fn over(s: UnixStream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Client { s }
    }
    pub fn send(&mut self, id: u64, body: RequestBody) {
        write_frame(&mut self.s, &Request { id, body }).unwrap();
    }
    pub fn recv(&mut self) -> Reply {
        read_message(&mut self.s).unwrap()
    }
    pub fn call(&mut self, id: u64, body: RequestBody) -> ReplyBody {
        self.send(id, body);
        let r = self.recv();
        assert_eq!(r.id, id);
        r.body
    }
    /// Runs one exec to completion: (stdout, stderr, final reply).
    pub fn exec(&mut self, id: u64, req: ExecRequest) -> (Vec<u8>, Vec<u8>, ReplyBody) {
        self.send(id, RequestBody::Exec(req));
        self.collect(id)
    }
    pub fn collect(&mut self, id: u64) -> (Vec<u8>, Vec<u8>, ReplyBody) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let r = self.recv();
            assert_eq!(r.id, id, "{r:?}");
            match r.body {
                ReplyBody::Started { .. } => {}
                ReplyBody::Stdout { data } => out.extend(data),
                ReplyBody::Stderr { data } => err.extend(data),
                end => return (out, err, end),
            }
        }
    }
}

pub fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> ExecRequest {
    cmd(&["sh", "-c", script])
}

pub fn is_terminal(b: &ReplyBody) -> bool {
    matches!(
        b,
        ReplyBody::Exit { .. }
            | ReplyBody::Killed { .. }
            | ReplyBody::TimedOut
            | ReplyBody::Error { .. }
    )
}

/// Whether `pid` is alive (a zombie counts as dead).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(_) => false,
    }
}

pub fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

pub fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ember-agent-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The agent binary under test, killed even when an assertion fails.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait(); // may be taken by the in-process reaper of other tests
    }
}
