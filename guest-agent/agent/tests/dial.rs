//! `Dial`: the agent's connection to a TCP service, against listeners on this host's loopback
//! (what the guest's loopback is to the agent in a sandbox).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;

use agent_protocol::{encode, ErrorKind, ReplyBody, Request, RequestBody};
use common::{cmd, fnv, pseudo_random, Client};

/// A listener on a free loopback port whose connections each get `service`.
fn service(f: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming() {
            let f = f.clone();
            thread::spawn(move || f(s.unwrap()));
        }
    });
    port
}

/// Echoes what it reads; shuts its write side at the client's end of file.
fn echo() -> u16 {
    service(|mut s| {
        let mut r = s.try_clone().unwrap();
        std::io::copy(&mut r, &mut s).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    })
}

fn dial(c: &mut Client, port: u16) -> ReplyBody {
    c.call(1, RequestBody::Dial { port })
}

#[test]
fn bytes_go_both_ways_and_a_half_close_reaches_the_service() {
    let port = echo();
    let mut c = Client::new();
    assert_eq!(dial(&mut c, port), ReplyBody::Ok);
    c.s.write_all(b"hello through the agent").unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello through the agent", "the echo came back and then end of file");
}

#[test]
fn the_service_closing_its_side_leaves_the_other_open() {
    // The service says its piece, shuts its write side, then reads the client's to the end.
    let (tx, rx) = mpsc::channel();
    let port = service(move |mut s| {
        s.write_all(b"banner").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        tx.send(got).unwrap();
    });
    let mut c = Client::new();
    assert_eq!(dial(&mut c, port), ReplyBody::Ok);
    let mut got = Vec::new();
    c.s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"banner");
    c.s.write_all(b"still talking after its end of file").unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(rx.recv().unwrap(), b"still talking after its end of file");
}

#[test]
fn a_refused_port_is_dial_failed_naming_it_and_the_connection_goes_on() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut c = Client::new();
    match dial(&mut c, port) {
        ReplyBody::Error { kind: ErrorKind::DialFailed, message } => {
            assert!(message.contains(&format!("port {port}")), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(c.call(2, RequestBody::Health), ReplyBody::Health { .. }));
    // And a dial after a failed one may still succeed on the same connection.
    let port = echo();
    assert_eq!(c.call(3, RequestBody::Dial { port }), ReplyBody::Ok);
}

#[test]
fn dial_after_other_requests_is_refused() {
    let port = echo();
    let mut c = Client::new();
    let (_, _, end) = c.exec(5, cmd(&["true"]));
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    match dial(&mut c, port) {
        ReplyBody::Error { kind: ErrorKind::InvalidRequest, message } => assert!(message.contains("first request"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bytes_sent_with_the_dial_frame_are_not_lost() {
    // The agent reads ahead of its frames: what it read past the Dial must reach the service.
    let port = echo();
    let mut c = Client::new();
    let mut wire = encode(&Request { id: 1, body: RequestBody::Dial { port } }).unwrap();
    wire.extend_from_slice(b"early bytes");
    c.s.write_all(&wire).unwrap();
    assert_eq!(c.recv().body, ReplyBody::Ok);
    c.s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"early bytes");
}

#[test]
fn large_transfers_both_ways_at_once_and_many_streams() {
    // Each stream writes 4 MiB while the echo sends it back: a splice that buffered without
    // bound, or copied one way at a time, would deadlock or fail the checksum.
    let port = echo();
    let streams: Vec<_> = (0..16u64)
        .map(|i| {
            thread::spawn(move || {
                let data = pseudo_random(4 << 20, i + 1);
                let mut c = Client::new();
                assert_eq!(dial(&mut c, port), ReplyBody::Ok);
                let mut w = c.s.try_clone().unwrap();
                let sent = data.clone();
                let writer = thread::spawn(move || {
                    w.write_all(&sent).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut got = Vec::new();
                c.s.read_to_end(&mut got).unwrap();
                writer.join().unwrap();
                assert_eq!((got.len(), fnv(&got)), (data.len(), fnv(&data)), "stream {i}");
            })
        })
        .collect();
    for s in streams {
        s.join().unwrap();
    }
}

#[test]
fn a_host_that_goes_away_ends_the_service_connection() {
    let (tx, rx) = mpsc::channel();
    let port = service(move |mut s| {
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        tx.send(got.len()).unwrap();
    });
    let mut c = Client::new();
    assert_eq!(dial(&mut c, port), ReplyBody::Ok);
    c.s.write_all(b"partial").unwrap();
    drop(c);
    assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(), 7);
}
