//! Native tests of the agent: the server over `UnixStream::pair()` (and the binary over
//! `--unix`), running real processes on the host. Run as root (the identity hooks need it).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ember_agent::server::{serve, Config};
use ember_agent::{
    read_message, write_frame, ErrorKind, ExecRequest, FileKind, PtySize, Reply, ReplyBody,
    Request, RequestBody, CONNECTION_ID, MAX_FRAME, PROTOCOL_VERSION,
};

struct Client {
    s: UnixStream,
}

impl Client {
    fn new() -> Client {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || serve(b, &Config::default()));
        Client::over(a)
    }
    fn over(s: UnixStream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Client { s }
    }
    fn send(&mut self, id: u64, body: RequestBody) {
        write_frame(&mut self.s, &Request { id, body }).unwrap();
    }
    fn recv(&mut self) -> Reply {
        read_message(&mut self.s).unwrap()
    }
    fn call(&mut self, id: u64, body: RequestBody) -> ReplyBody {
        self.send(id, body);
        let r = self.recv();
        assert_eq!(r.id, id);
        r.body
    }
    /// Runs one exec to completion: (stdout, stderr, final reply).
    fn exec(&mut self, id: u64, req: ExecRequest) -> (Vec<u8>, Vec<u8>, ReplyBody) {
        self.send(id, RequestBody::Exec(req));
        self.collect(id)
    }
    fn collect(&mut self, id: u64) -> (Vec<u8>, Vec<u8>, ReplyBody) {
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

fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    cmd(&["sh", "-c", script])
}

fn is_terminal(b: &ReplyBody) -> bool {
    matches!(
        b,
        ReplyBody::Exit { .. }
            | ReplyBody::Killed { .. }
            | ReplyBody::TimedOut
            | ReplyBody::Error { .. }
    )
}

/// Whether `pid` is alive (a zombie counts as dead).
fn alive(pid: u32) -> bool {
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

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
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

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ember-agent-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
fn exit_codes_and_signals() {
    let mut c = Client::new();
    let (out, err, end) = c.exec(1, cmd(&["echo", "hello"]));
    assert_eq!(
        (out.as_slice(), err.as_slice(), end),
        (&b"hello\n"[..], &b""[..], ReplyBody::Exit { code: 0 })
    );
    assert_eq!(c.exec(2, sh("exit 3")).2, ReplyBody::Exit { code: 3 });
    assert_eq!(
        c.exec(3, sh("kill -9 $$")).2,
        ReplyBody::Killed { signal: 9 }
    );
    // env and cwd
    let mut r = sh("echo $FOO; pwd");
    r.env = vec![("FOO".into(), "bar".into())];
    r.cwd = Some("/".into());
    assert_eq!(c.exec(4, r).0, b"bar\n/\n");
    // signal a running exec
    c.send(5, RequestBody::Exec(cmd(&["sleep", "100"])));
    assert!(matches!(c.recv().body, ReplyBody::Started { .. }));
    assert_eq!(
        c.call(
            5,
            RequestBody::Signal {
                signal: 15,
                group: false
            }
        ),
        ReplyBody::Ok
    );
    assert_eq!(c.collect(5).2, ReplyBody::Killed { signal: 15 });
}

#[test]
fn stdout_and_stderr_apart() {
    let mut c = Client::new();
    let (out, err, end) = c.exec(1, sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2"));
    assert_eq!(out, b"out1\nout2\n");
    assert_eq!(err, b"err1\nerr2\n");
    assert_eq!(end, ReplyBody::Exit { code: 0 });
}

#[test]
fn stdin_piped_through() {
    let mut c = Client::new();
    let data = pseudo_random(1 << 20, 7);
    let mut r = cmd(&["cat"]);
    r.stdin = true;
    c.send(1, RequestBody::Exec(r));
    // Write stdin from another thread while reading output here (the pipe buffers would
    // otherwise fill up both ways).
    let mut w = c.s.try_clone().unwrap();
    let chunks = data.clone();
    let writer = std::thread::spawn(move || {
        for ch in chunks.chunks(100_000) {
            write_frame(
                &mut w,
                &Request {
                    id: 1,
                    body: RequestBody::Stdin { data: ch.to_vec() },
                },
            )
            .unwrap();
        }
        write_frame(
            &mut w,
            &Request {
                id: 1,
                body: RequestBody::StdinClose,
            },
        )
        .unwrap();
    });
    let (out, _, end) = c.collect(1);
    writer.join().unwrap();
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    assert_eq!(fnv(&out), fnv(&data));
    assert_eq!(out.len(), data.len());
}

#[test]
fn timeout_kills_process_tree() {
    let mut c = Client::new();
    let mut r = sh("sleep 100 & echo $!; sleep 100");
    r.timeout_ms = Some(300);
    let t = Instant::now();
    let (out, _, end) = c.exec(1, r);
    assert_eq!(end, ReplyBody::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(5));
    let grandchild: u32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    let t = Instant::now();
    while alive(grandchild) {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "grandchild {grandchild} still alive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fifty_concurrent_execs() {
    let mut c = Client::new();
    for i in 1..=50u64 {
        c.send(
            i,
            RequestBody::Exec(sh(&format!("sleep 0.2; echo {i}; exit {}", i % 7))),
        );
    }
    let mut outs: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut done = HashMap::new();
    while done.len() < 50 {
        let r = c.recv();
        match r.body {
            ReplyBody::Stdout { data } => outs.entry(r.id).or_default().extend(data),
            ReplyBody::Started { .. } => {}
            b if is_terminal(&b) => {
                assert!(done.insert(r.id, b).is_none());
            }
            b => panic!("{b:?}"),
        }
    }
    for i in 1..=50u64 {
        assert_eq!(
            done[&i],
            ReplyBody::Exit {
                code: (i % 7) as i32
            }
        );
        assert_eq!(outs[&i], format!("{i}\n").into_bytes());
    }
}

#[test]
fn endless_output_does_not_starve_other_execs() {
    let mut c = Client::new();
    c.send(1, RequestBody::Exec(cmd(&["yes"])));
    c.send(2, RequestBody::Exec(sh("sleep 0.1; echo done")));
    let mut flooded = 0usize;
    let mut out2 = Vec::new();
    loop {
        let r = c.recv();
        match (r.id, r.body) {
            (1, ReplyBody::Stdout { data }) => flooded += data.len(),
            (1, ReplyBody::Started { .. }) | (2, ReplyBody::Started { .. }) => {}
            (2, ReplyBody::Stdout { data }) => out2.extend(data),
            (2, ReplyBody::Exit { code: 0 }) => break,
            (id, b) => panic!("{id} {b:?}"),
        }
    }
    assert_eq!(out2, b"done\n");
    assert!(flooded > 0);
    c.send(
        1,
        RequestBody::Signal {
            signal: 9,
            group: true,
        },
    );
    loop {
        match c.recv().body {
            ReplyBody::Killed { signal: 9 } => break,
            ReplyBody::Stdout { .. } | ReplyBody::Ok => {}
            b => panic!("{b:?}"),
        }
    }
}

#[test]
fn detached_process_outlives_request() {
    let mut c = Client::new();
    let mut r = cmd(&["sleep", "30"]);
    r.detach = true;
    let pid = match c.call(1, RequestBody::Exec(r)) {
        ReplyBody::Started { pid } => pid,
        b => panic!("{b:?}"),
    };
    assert!(matches!(
        c.call(2, RequestBody::Health),
        ReplyBody::Health { .. }
    ));
    assert_eq!(c.exec(3, cmd(&["true"])).2, ReplyBody::Exit { code: 0 });
    assert!(alive(pid));
    // Even the connection closing leaves it running.
    drop(c);
    std::thread::sleep(Duration::from_millis(50));
    assert!(alive(pid));
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[test]
fn ten_mib_of_output() {
    let d = tmpdir("out");
    let data = pseudo_random(10 << 20, 42);
    let f = d.join("data");
    std::fs::write(&f, &data).unwrap();
    let mut c = Client::new();
    let (out, err, end) = c.exec(1, cmd(&["cat", f.to_str().unwrap()]));
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    assert!(err.is_empty());
    assert_eq!(out.len(), data.len());
    assert_eq!(fnv(&out), fnv(&data));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn files() {
    let d = tmpdir("files");
    let ds = d.to_str().unwrap().to_string();
    let mut c = Client::new();
    let data = pseudo_random(8 << 20, 9);
    let path = format!("{ds}/a/b/file");
    c.send(
        1,
        RequestBody::WriteFile {
            path: path.clone(),
            mode: 0o640,
            create_parents: true,
        },
    );
    for ch in data.chunks(512 << 10) {
        c.send(1, RequestBody::FileData { data: ch.to_vec() });
    }
    assert_eq!(
        c.call(1, RequestBody::FileEnd),
        ReplyBody::FileWritten {
            size: data.len() as u64
        }
    );
    assert_eq!(fnv(&std::fs::read(&path).unwrap()), fnv(&data));

    c.send(2, RequestBody::ReadFile { path: path.clone() });
    let mut back = Vec::new();
    loop {
        match c.recv().body {
            ReplyBody::FileData { data } => back.extend(data),
            ReplyBody::FileEnd { size } => {
                assert_eq!(size, data.len() as u64);
                break;
            }
            b => panic!("{b:?}"),
        }
    }
    assert_eq!(fnv(&back), fnv(&data));

    match c.call(3, RequestBody::Stat { path: path.clone() }) {
        ReplyBody::Stat(s) => {
            assert_eq!(
                (s.kind, s.size, s.mode),
                (FileKind::File, data.len() as u64, 0o640)
            )
        }
        b => panic!("{b:?}"),
    }
    let deep = format!("{ds}/x/y/z");
    assert_eq!(
        c.call(
            4,
            RequestBody::Mkdir {
                path: deep.clone(),
                mode: 0o755,
                parents: true
            }
        ),
        ReplyBody::Ok
    );
    assert_eq!(
        c.call(
            5,
            RequestBody::Mkdir {
                path: deep.clone(),
                mode: 0o755,
                parents: true
            }
        ),
        ReplyBody::Ok
    );
    assert!(matches!(
        c.call(
            6,
            RequestBody::Mkdir {
                path: format!("{ds}/q/r"),
                mode: 0o755,
                parents: false
            }
        ),
        ReplyBody::Error {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    match c.call(7, RequestBody::ListDir { path: ds.clone() }) {
        ReplyBody::DirEntries {
            mut entries,
            last: true,
        } => {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            let names: Vec<_> = entries
                .iter()
                .map(|e| (e.name.as_str(), e.stat.kind))
                .collect();
            assert_eq!(names, [("a", FileKind::Dir), ("x", FileKind::Dir)]);
        }
        b => panic!("{b:?}"),
    }
    assert!(matches!(
        c.call(
            8,
            RequestBody::Remove {
                path: format!("{ds}/x"),
                recursive: false
            }
        ),
        ReplyBody::Error { .. }
    ));
    assert_eq!(
        c.call(
            9,
            RequestBody::Remove {
                path: format!("{ds}/x"),
                recursive: true
            }
        ),
        ReplyBody::Ok
    );
    assert_eq!(
        c.call(
            10,
            RequestBody::Remove {
                path: path.clone(),
                recursive: false
            }
        ),
        ReplyBody::Ok
    );
    assert!(matches!(
        c.call(11, RequestBody::Stat { path: path.clone() }),
        ReplyBody::Error {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    assert!(matches!(
        c.call(12, RequestBody::ReadFile { path }),
        ReplyBody::Error {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn malformed_and_oversized_frames() {
    let mut c = Client::new();
    // Garbage payload with a valid length.
    c.s.write_all(&8u32.to_le_bytes()).unwrap();
    c.s.write_all(&[0xff; 8]).unwrap();
    let r = c.recv();
    assert_eq!(r.id, CONNECTION_ID);
    assert!(
        matches!(
            r.body,
            ReplyBody::Error {
                kind: ErrorKind::MalformedFrame,
                ..
            }
        ),
        "{r:?}"
    );
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
    assert_eq!(r.id, CONNECTION_ID);
    assert!(
        matches!(
            r.body,
            ReplyBody::Error {
                kind: ErrorKind::FrameTooLarge,
                ..
            }
        ),
        "{r:?}"
    );
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
    assert_eq!(r.id, CONNECTION_ID);
    assert!(
        matches!(
            r.body,
            ReplyBody::Error {
                kind: ErrorKind::MalformedFrame,
                ..
            }
        ),
        "{r:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(c.s.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn unknown_variant_is_answered_under_its_id() {
    let mut c = Client::new();
    // id 5 (varint), then variant index 200 (varint 0xc8 0x01): a request from a newer host.
    let payload = [5u8, 0xc8, 0x01];
    c.s.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
    c.s.write_all(&payload).unwrap();
    let r = c.recv();
    assert_eq!(r.id, 5);
    assert!(
        matches!(
            r.body,
            ReplyBody::Error {
                kind: ErrorKind::MalformedFrame,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(matches!(
        c.call(6, RequestBody::Health),
        ReplyBody::Health { .. }
    ));
}

fn pty_cmd(argv: &[&str], rows: u16, cols: u16) -> ExecRequest {
    let mut r = cmd(argv);
    r.pty = Some(PtySize { rows, cols });
    r
}

#[test]
fn pty_is_the_controlling_terminal() {
    let mut c = Client::new();
    let (out, err, end) = c.exec(
        1,
        pty_cmd(
            &[
                "sh",
                "-c",
                "tty; stty size; echo to-stderr >&2; test -t 0 -a -t 1 -a -t 2 && echo all-ttys; \
                 ps -o tty= -p $$",
            ],
            33,
            101,
        ),
    );
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    assert!(err.is_empty(), "stderr goes through the pty: {err:?}");
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(lines[1], "33 101", "{out:?}");
    assert_eq!(&lines[2..4], ["to-stderr", "all-ttys"], "{out:?}");
    // ps names the controlling terminal: the same pts as `tty`.
    assert_eq!(format!("/dev/{}", lines[4].trim()), lines[0], "{out:?}");
}

#[test]
fn pty_stdin_resize_and_eof() {
    let mut c = Client::new();
    c.send(
        1,
        RequestBody::Exec(pty_cmd(&["sh", "-c", "read x; echo got:$x; stty size; exec cat"], 24, 80)),
    );
    assert!(matches!(c.recv().body, ReplyBody::Started { .. }));
    // Processed in order by the agent: the size is set before the line reaches `read`.
    c.send(1, RequestBody::Resize(PtySize { rows: 50, cols: 120 }));
    c.send(1, RequestBody::Stdin { data: b"hello\n".to_vec() });
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("50 120\r\n") {
        match c.recv().body {
            ReplyBody::Stdout { data } => out.extend(data),
            b => panic!("{b:?} after {:?}", String::from_utf8_lossy(&out)),
        }
    }
    // Sent only now, so that its echo cannot land in the middle of the lines above.
    c.send(1, RequestBody::Stdin { data: b"for cat\n".to_vec() });
    c.send(1, RequestBody::StdinClose);
    let (rest, _, end) = c.collect(1);
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    out.extend(rest);
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("got:hello\r\n50 120\r\n"), "{out:?}");
    // The terminal echoes the line and cat prints it again; ^D then ends cat.
    assert_eq!(out.matches("for cat").count(), 2, "{out:?}");
    // Resizing an exec without a pty is refused.
    c.send(2, RequestBody::Exec(cmd(&["sleep", "5"])));
    assert!(matches!(c.recv().body, ReplyBody::Started { .. }));
    assert!(matches!(
        c.call(2, RequestBody::Resize(PtySize { rows: 1, cols: 1 })),
        ReplyBody::Error {
            kind: ErrorKind::InvalidRequest,
            ..
        }
    ));
    assert_eq!(
        c.call(
            2,
            RequestBody::Signal {
                signal: 9,
                group: true
            }
        ),
        ReplyBody::Ok
    );
    assert_eq!(c.collect(2).2, ReplyBody::Killed { signal: 9 });
}

#[test]
fn not_found_and_cannot_execute() {
    let mut c = Client::new();
    assert!(matches!(
        c.exec(1, cmd(&["/nonexistent/command"])).2,
        ReplyBody::Error {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    assert!(matches!(
        c.exec(2, cmd(&["no-such-command-ember"])).2,
        ReplyBody::Error {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    let d = tmpdir("noexec");
    let f = d.join("script");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    assert!(matches!(
        c.exec(3, cmd(&[f.to_str().unwrap()])).2,
        ReplyBody::Error {
            kind: ErrorKind::CannotExecute,
            ..
        }
    ));
    std::fs::remove_dir_all(d).unwrap();
    assert!(matches!(
        c.exec(4, cmd(&[])).2,
        ReplyBody::Error {
            kind: ErrorKind::InvalidRequest,
            ..
        }
    ));
}

#[test]
fn run_as_user() {
    let mut c = Client::new();
    let mut r = cmd(&["id", "-u"]);
    r.user = Some(ember_agent::User::Id {
        uid: 65534,
        gid: 65534,
    });
    let (out, _, end) = c.exec(1, r);
    assert_eq!(
        (out, end),
        (b"65534\n".to_vec(), ReplyBody::Exit { code: 0 })
    );
    let mut r = cmd(&["id", "-u"]);
    r.user = Some(ember_agent::User::Name("root".into()));
    assert_eq!(c.exec(2, r).0, b"0\n");
}

#[test]
fn identity_hooks() {
    // sethostname inside a private UTS namespace: unshare on the thread that serves, so the
    // host's name is untouched and the execs it spawns see the new one.
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        if unsafe { libc::unshare(libc::CLONE_NEWUTS) } == 0 {
            let _ = serve(b, &Config::default());
        }
    });
    let mut c = Client::over(a);
    c.send(
        1,
        RequestBody::SetHostname {
            name: "ember-test-host".into(),
        },
    );
    let reply: Result<Reply, _> = read_message(&mut c.s);
    match reply {
        Ok(r) => {
            assert_eq!(r.body, ReplyBody::Ok);
            assert_eq!(
                c.exec(2, cmd(&["cat", "/proc/sys/kernel/hostname"])).0,
                b"ember-test-host\n"
            );
            let data = pseudo_random(64, 1);
            assert_eq!(
                c.call(
                    3,
                    RequestBody::AddEntropy {
                        data,
                        entropy_bits: 256
                    }
                ),
                ReplyBody::Ok
            );
            // The clock is the host's: only the argument check is exercised here.
            assert!(matches!(
                c.call(
                    4,
                    RequestBody::SetClock {
                        secs: 0,
                        nanos: 2_000_000_000
                    }
                ),
                ReplyBody::Error { .. }
            ));
            assert!(matches!(
                c.call(5, RequestBody::PowerOff),
                ReplyBody::Error {
                    kind: ErrorKind::Unsupported,
                    ..
                }
            ));
        }
        Err(_) => eprintln!("skipped: cannot unshare the UTS namespace here"),
    }
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
    assert_eq!(c2.exec(1, cmd(&["echo", "still serving"])).0, b"still serving\n");
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

/// The agent binary under test, killed even when an assertion fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait(); // may be taken by the in-process reaper of other tests
    }
}
