//! Native tests of what the agent holds for its peers: frame buffers that grow only as bytes
//! arrive, a cap on connections (and so on threads), and frames that stall being dropped.
//! Connections are socket pairs handed to a `Server`, as the accept loop hands it vsock ones.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent_protocol::{read_message, ErrorKind, Reply, ReplyBody, RequestBody, CONNECTION_ID, MAX_FRAME};
use ember_agent::server::{Config, Server, MAX_CONNECTIONS};

use common::*;

/// These tests measure the whole process (its memory, its threads): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection served by `server`: the client's end.
fn connect(server: &Server<UnixStream>) -> Client {
    let (client, agent) = UnixStream::pair().unwrap();
    server.accept(agent);
    Client::over(client)
}

/// A line of /proc/self/status, as a number (the first field after the name).
fn status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line[field.len()..].split_whitespace().next().unwrap().parse().unwrap()
}

/// Bytes written to `s` that its peer has not read yet (SIOCOUTQ).
fn unread(s: &UnixStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer, which is valid.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(r, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n
}

/// Threads serving connections, in this process (the tests' servers' and no others).
fn connection_threads() -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap().flatten();
    tasks.filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "conn")).count()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn frames_announced_and_never_sent_hold_little_memory() {
    let _serial = serial();
    const CONNECTIONS: usize = 300;
    let server = Server::new(Config { max_connections: CONNECTIONS, ..Config::default() });
    let before_kib = status("VmRSS:");
    let clients: Vec<Client> = (0..CONNECTIONS)
        .map(|_| {
            let mut c = connect(&server);
            // A 1 MiB frame's length and one byte of it: the agent reads the byte into the
            // frame's buffer, so once it is read the buffer has been allocated.
            let mut start = (MAX_FRAME as u32).to_le_bytes().to_vec();
            start.push(0);
            c.s.write_all(&start).unwrap();
            c
        })
        .collect();
    wait_until("the agent read what every connection sent", || clients.iter().all(|c| unread(&c.s) == 0));
    let grown_mib = status("VmRSS:").saturating_sub(before_kib) / 1024;
    // Allocating the announced lengths would be 300 MiB; buffers that grow with what arrived
    // are a page each, beside each connection thread's few stack pages.
    assert!(grown_mib < 32, "{CONNECTIONS} connections of 5 bytes each grew the agent by {grown_mib} MiB");
}

#[test]
fn the_connection_past_the_limit_is_refused_with_the_reason() {
    let _serial = serial();
    wait_until("the threads of the tests before are gone", || connection_threads() == 0);
    let server = Server::new(Config::default());
    let mut served: Vec<Client> = (0..MAX_CONNECTIONS).map(|_| connect(&server)).collect();
    for (i, c) in served.iter_mut().enumerate() {
        assert!(matches!(c.call(i as u64 + 1, RequestBody::Health), ReplyBody::Health { .. }), "connection {i}");
    }
    let mut refused = connect(&server);
    let reply: Reply = read_message(&mut refused.s).unwrap();
    assert_eq!(reply.id, CONNECTION_ID);
    match reply.body {
        ReplyBody::Error { kind: ErrorKind::TooManyConnections, message } => {
            assert_eq!(message, format!("too many connections: {MAX_CONNECTIONS} open, the limit is {MAX_CONNECTIONS}"));
        }
        other => panic!("the 65th connection got {other:?}"),
    }
    assert_eq!(refused.s.read(&mut [0u8; 1]).unwrap(), 0, "the refused connection is closed");
    // Idle connections beyond the limit cost no thread each.
    let more: Vec<Client> = (0..200).map(|_| connect(&server)).collect();
    let threads = connection_threads();
    assert_eq!(threads, MAX_CONNECTIONS, "{} connections made {threads} threads", MAX_CONNECTIONS + 201);
    drop(more);
    // A connection that ends frees its slot.
    drop(served.pop());
    // Until the server has seen the end, a new connection may still be the one refused.
    wait_until("a new connection is served again", || {
        let mut c = connect(&server);
        if agent_protocol::write_frame(&mut c.s, &agent_protocol::Request { id: 1, body: RequestBody::Health }).is_err() {
            return false;
        }
        let reply: Result<Reply, _> = read_message(&mut c.s);
        matches!(reply, Ok(Reply { body: ReplyBody::Health { .. }, .. }))
    });
}

#[test]
fn a_frame_that_stalls_is_dropped_but_an_idle_connection_stays() {
    let _serial = serial();
    let timeout = Duration::from_millis(300);
    let server = Server::new(Config { frame_timeout: timeout, ..Config::default() });
    let mut idle = connect(&server);
    assert!(matches!(idle.call(1, RequestBody::Health), ReplyBody::Health { .. }));

    // 10 bytes of a 100-byte frame, then nothing.
    let mut stalled = connect(&server);
    let started = Instant::now();
    stalled.s.write_all(&100u32.to_le_bytes()).unwrap();
    stalled.s.write_all(&[0; 10]).unwrap();
    assert_eq!(stalled.s.read(&mut [0u8; 1]).unwrap(), 0, "the stalled connection was not closed");
    assert!(started.elapsed() >= timeout, "closed after {:?}, before the timeout", started.elapsed());

    // A byte every 50 ms: the frame as a whole must arrive in time, not each byte.
    let mut trickle = connect(&server);
    trickle.s.write_all(&100u32.to_le_bytes()).unwrap();
    let mut sent = 0;
    while sent < 100 && trickle.s.write_all(&[0]).is_ok() {
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(sent < 100, "a frame trickled in over {} ms was read to its end", sent * 50);

    // Idle since before either frame began, longer than the timeout: still served.
    assert!(matches!(idle.call(2, RequestBody::Health), ReplyBody::Health { .. }));
}
