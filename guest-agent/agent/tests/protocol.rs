//! Native tests of the agent, run as root on the host (see common/mod.rs): the protocol:
//! hello and health, malformed, truncated and unknown frames, and the binary over `--unix`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use agent_protocol::{
    ErrorKind, Reply, ReplyBody, RequestBody, CONNECTION_ID, MAX_FRAME, PROTOCOL_VERSION,
};

use common::*;

/// `r` is an error reply of `kind` to request `id`.
fn assert_error(r: &Reply, id: u64, kind: ErrorKind) {
    assert_eq!(r.id, id, "{r:?}");
    assert!(
        matches!(&r.body, ReplyBody::Error { kind: k, .. } if k == &kind),
        "{r:?}"
    );
}

#[test]
fn hello_and_health() {
    let mut c = Client::new();
    match c.call(
        1,
        RequestBody::Hello {
            protocol_version: PROTOCOL_VERSION,
        },
    ) {
        ReplyBody::Hello {
            protocol_version, ..
        } => assert_eq!(protocol_version, PROTOCOL_VERSION),
        r => panic!("{r:?}"),
    }
    match c.call(
        2,
        RequestBody::Hello {
            protocol_version: 999,
        },
    ) {
        ReplyBody::Error {
            kind: ErrorKind::VersionMismatch,
            ..
        } => {}
        r => panic!("{r:?}"),
    }
    assert!(matches!(
        c.call(3, RequestBody::Health),
        ReplyBody::Health { .. }
    ));
}

#[test]
fn malformed_and_oversized_frames() {
    let mut c = Client::new();
    // Garbage payload with a valid length.
    c.s.write_all(&8u32.to_le_bytes()).unwrap();
    c.s.write_all(&[0xff; 8]).unwrap();
    let r = c.recv();
    assert_error(&r, CONNECTION_ID, ErrorKind::MalformedFrame);
    assert!(matches!(
        c.call(1, RequestBody::Health),
        ReplyBody::Health { .. }
    ));
    // Oversized frame: discarded, the connection still serves.
    let n = MAX_FRAME + 1000;
    c.s.write_all(&(n as u32).to_le_bytes()).unwrap();
    let mut w = c.s.try_clone().unwrap();
    let t = std::thread::spawn(move || w.write_all(&vec![0xaa; n]).unwrap());
    let r = c.recv();
    t.join().unwrap();
    assert_error(&r, CONNECTION_ID, ErrorKind::FrameTooLarge);
    assert_eq!(c.exec(2, cmd(&["echo", "ok"])).0, b"ok\n");
    // Request id 0 is reserved; follow-ups for unknown ids are errors.
    assert!(matches!(
        c.call(0, RequestBody::Health),
        ReplyBody::Error {
            kind: ErrorKind::InvalidRequest,
            ..
        }
    ));
    assert!(matches!(
        c.call(77, RequestBody::StdinClose),
        ReplyBody::Error {
            kind: ErrorKind::UnknownId,
            ..
        }
    ));
    // An absurd length closes the connection after the error reply.
    c.s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert!(matches!(
        c.recv().body,
        ReplyBody::Error {
            kind: ErrorKind::FrameTooLarge,
            ..
        }
    ));
    let mut rest = Vec::new();
    assert_eq!(c.s.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn truncated_frame_is_answered_before_closing() {
    let mut c = Client::new();
    c.s.write_all(&100u32.to_le_bytes()).unwrap();
    c.s.write_all(&[1; 10]).unwrap();
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    let r = c.recv();
    assert_error(&r, CONNECTION_ID, ErrorKind::MalformedFrame);
    let mut rest = Vec::new();
    assert_eq!(c.s.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn unknown_variant_is_answered_under_its_id() {
    let mut c = Client::new();
    // id 5 (varint), then variant index 200 (varint 0xc8 0x01): a request from a newer host.
    let payload = [5u8, 0xc8, 0x01];
    c.s.write_all(&(payload.len() as u32).to_le_bytes())
        .unwrap();
    c.s.write_all(&payload).unwrap();
    let r = c.recv();
    assert_error(&r, 5, ErrorKind::MalformedFrame);
    assert!(matches!(
        c.call(6, RequestBody::Health),
        ReplyBody::Health { .. }
    ));
}

#[test]
fn binary_over_unix_socket() {
    let d = tmpdir("bin");
    let sock = d.join("agent.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ember-agent"))
        .arg("--unix")
        .arg(&sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    let t = Instant::now();
    let s = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if t.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut c = Client::over(s);
    assert!(matches!(
        c.call(
            1,
            RequestBody::Hello {
                protocol_version: PROTOCOL_VERSION
            }
        ),
        ReplyBody::Hello { .. }
    ));
    assert_eq!(c.exec(2, cmd(&["echo", "via unix"])).0, b"via unix\n");
    // Unframed garbage reads as an absurd length: that connection is answered and closed,
    // and the agent goes on serving new ones.
    let mut g = Client::over(UnixStream::connect(&sock).unwrap());
    g.s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(matches!(
        g.recv().body,
        ReplyBody::Error {
            kind: ErrorKind::FrameTooLarge,
            ..
        }
    ));
    // Closed, with a reset when the rest of the garbage was still unread.
    let mut rest = Vec::new();
    match g.s.read_to_end(&mut rest) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        r => panic!("{r:?}"),
    }
    let mut c2 = Client::over(UnixStream::connect(&sock).unwrap());
    assert_eq!(
        c2.exec(1, cmd(&["echo", "still serving"])).0,
        b"still serving\n"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or("VmRSS: ?")
        .to_string();
    eprintln!("agent (debug build) after one exec: {rss}");
    drop(child);
    let _ = std::fs::remove_dir_all(d);
}
