//! The host's agent client against a hostile agent: each call of the client library (hello,
//! health, exec, detached exec, upload, download, stat, list, mkdir, remove, the identity
//! requests, the `CONNECT` handshake) gets the replies the input scripts, for its own request
//! id, for neighbouring ids, for the connection (id 0), or raw bytes that break the framing,
//! and then the end of the stream. A call must end, with a result or an error; a download's
//! size is what it wrote.
//!
//! Input: one byte selecting the call, then records `tag, length (u16 le), bytes`: a reply
//! whose id is the call's own (tag % 5 = 0), the next two ids (1, 2), 0 (3), or the bytes
//! as they are (4). A reply's bytes follow its id in the payload: a postcard `ReplyBody`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use agent_protocol::{decode, read_frame, ExecRequest, Request};
use vmm_sys_util::tempdir::TempDir;

pub const CALLS: u8 = 13;
const LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Id {
    Own,
    Plus(u64),
    Connection,
}

/// One scripted piece of the agent's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Reply(Id, Vec<u8>),
    Raw(Vec<u8>),
}

pub fn decode_input(data: &[u8]) -> Option<(u8, Vec<Record>)> {
    let (&call, mut rest) = data.split_first()?;
    let mut records = Vec::new();
    while rest.len() >= 3 {
        let tag = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let bytes = rest[3..3 + len].to_vec();
        rest = &rest[3 + len..];
        records.push(match tag % 5 {
            0 => Record::Reply(Id::Own, bytes),
            1 => Record::Reply(Id::Plus(1), bytes),
            2 => Record::Reply(Id::Plus(2), bytes),
            3 => Record::Reply(Id::Connection, bytes),
            _ => Record::Raw(bytes),
        });
    }
    Some((call % CALLS, records))
}

pub fn encode_input(call: u8, records: &[Record]) -> Vec<u8> {
    let mut out = vec![call];
    for r in records {
        let (tag, bytes) = match r {
            Record::Reply(Id::Own, b) => (0, b),
            Record::Reply(Id::Plus(1), b) => (1, b),
            Record::Reply(Id::Plus(_), b) => (2, b),
            Record::Reply(Id::Connection, b) => (3, b),
            Record::Raw(b) => (4, b),
        };
        out.push(tag);
        out.extend((bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// The bytes of `records` for a call whose request id is `id`.
fn answer(id: u64, records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        match r {
            Record::Reply(which, body) => {
                let id = match which {
                    Id::Own => id,
                    Id::Plus(k) => id.wrapping_add(*k),
                    Id::Connection => 0,
                };
                let mut payload = postcard::to_stdvec(&id).expect("an id encodes");
                payload.extend_from_slice(body);
                out.extend((payload.len() as u32).to_le_bytes());
                out.extend(payload);
            }
            Record::Raw(b) => out.extend_from_slice(b),
        }
    }
    out
}

/// The agent's side: reads the call's first request for its id, answers as scripted, ends
/// its side of the stream, and takes whatever else the client sends until it hangs up.
fn agent(mut peer: UnixStream, records: &[Record]) {
    let mut buf = Vec::new();
    let id = match read_frame(&mut peer, &mut buf).ok().and_then(|()| decode::<Request>(&buf).ok()) {
        Some(req) => req.id,
        None => return,
    };
    let _ = peer.write_all(&answer(id, records));
    let _ = peer.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    while matches!(peer.read(&mut sink), Ok(n) if n > 0) {}
}

fn exec_request() -> ExecRequest {
    ExecRequest { argv: vec!["true".into()], ..Default::default() }
}

/// Runs call `call` on `client` (a connection to the agent).
fn call(call: u8, mut client: UnixStream) {
    use agent_client as c;
    match call {
        0 => drop(c::hello(&mut client)),
        1 => drop(c::health(&mut client)),
        2 => drop(c::exec(client, exec_request(), &mut std::io::sink(), &mut std::io::sink())),
        3 => drop(c::spawn_detached(client, exec_request())),
        4 => {
            // A command with stdin, signalled and resized while it runs.
            if let Ok(exec) = c::Exec::start(client, exec_request(), Some(Box::new(&b"input"[..]))) {
                let control = exec.control();
                let _ = control.signal(15, true);
                let _ = control.resize(24, 80);
                let _ = exec.wait(&mut std::io::sink(), &mut std::io::sink());
            }
        }
        5 => drop(c::upload(&mut client, &[7u8; 3000][..], "/tmp/f", 0o644)),
        6 => {
            let mut written = Vec::new();
            if let Ok(size) = c::download(&mut client, "/tmp/f", &mut written) {
                assert_eq!(size, written.len() as u64, "a download's size is what it wrote");
            }
        }
        7 => drop(c::stat(&mut client, "/tmp/f")),
        8 => drop(c::list_dir(&mut client, "/tmp")),
        9 => drop(c::mkdir(&mut client, "/tmp/d", 0o755, true)),
        10 => drop(c::remove(&mut client, "/tmp/d", true)),
        _ => {
            let identity = c::Identity { entropy: &[1; 32], entropy_bits: 256, hostname: "fuzz" };
            drop(c::set_identity(&mut client, &identity));
        }
    }
}

/// The `CONNECT` handshake against a socket that answers with `answer`, then hangs up.
fn handshake(answer: &[u8]) {
    let Ok(dir) = TempDir::new_in(Path::new("/dev/shm")).or_else(|_| TempDir::new()) else { return };
    let path = dir.as_path().join("v.sock");
    let Ok(listener) = UnixListener::bind(&path) else { return };
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Ok((mut peer, _)) = listener.accept() {
                let _ = peer.set_read_timeout(Some(LIMIT));
                let mut line = [0u8; 64];
                let _ = peer.read(&mut line);
                let _ = peer.write_all(answer);
            }
        });
        let _ = agent_client::connect(&path, 1024, LIMIT);
    });
}

pub fn run(data: &[u8]) {
    crate::like_the_vmm();
    let Some((which, records)) = decode_input(data) else { return };
    if which == CALLS - 1 {
        let raw: Vec<u8> = records
            .iter()
            .flat_map(|r| match r {
                Record::Reply(_, b) | Record::Raw(b) => b.clone(),
            })
            .collect();
        handshake(&raw);
        return;
    }
    let (client, peer) = UnixStream::pair().expect("a socket pair");
    for s in [&client, &peer] {
        s.set_read_timeout(Some(LIMIT)).expect("a read timeout");
        s.set_write_timeout(Some(LIMIT)).expect("a write timeout");
    }
    std::thread::scope(|s| {
        s.spawn(|| agent(peer, &records));
        call(which, client);
    });
}
