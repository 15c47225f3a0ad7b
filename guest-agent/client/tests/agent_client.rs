//! The host client library against the real agent: `serve()` on one end of a socket pair (or
//! behind a fake vsock socket that does the `CONNECT` handshake), real processes on the host.
//! Run as root, like the agent's own tests.

use std::fs::File;
use std::io::{self, BufReader, Cursor, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_agent::server::{serve, Config};
use agent_protocol::{ExecRequest, PtySize};
use agent_client::{self, ClientError, Exec, Outcome};
use rustix::process::{kill_process, Pid, Signal};

/// A connection to an in-process agent.
fn agent() -> UnixStream {
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::spawn(move || serve(b, &Config::default()));
    a.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    a
}

fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-client-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic bytes that no run of zeros or repetition would let a bug hide in.
struct PseudoRandom {
    left: u64,
    seed: u64,
}

impl Read for PseudoRandom {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize / 8 * 8;
        let n = if n == 0 { self.left.min(buf.len() as u64) as usize } else { n };
        for chunk in buf[..n].chunks_mut(8) {
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            chunk.copy_from_slice(&self.seed.to_le_bytes()[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn pseudo_random(len: u64, seed: u64) -> Vec<u8> {
    let mut v = Vec::new();
    PseudoRandom { left: len, seed }.read_to_end(&mut v).unwrap();
    v
}

/// Whether two readers yield the same bytes, compared a chunk at a time.
fn same_bytes(a: impl Read, b: impl Read) -> bool {
    let (mut a, mut b) = (BufReader::with_capacity(1 << 20, a), BufReader::with_capacity(1 << 20, b));
    let (mut x, mut y) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = a.read(&mut x).unwrap();
        if n == 0 {
            return b.read(&mut y).unwrap() == 0;
        }
        if b.read_exact(&mut y[..n]).is_err() || x[..n] != y[..n] {
            return false;
        }
    }
}

fn run(req: ExecRequest, stdin: Option<Box<dyn Read + Send>>) -> (Vec<u8>, Vec<u8>, Outcome) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let outcome = Exec::start(agent(), req, stdin).unwrap().wait(&mut out, &mut err).unwrap();
    (out, err, outcome)
}

#[test]
fn stdin_round_trip_of_ten_mib() {
    let data = pseudo_random(10 << 20, 3);
    let (out, err, end) = run(cmd(&["cat"]), Some(Box::new(Cursor::new(data.clone()))));
    assert_eq!(end, Outcome::Exit(0));
    assert!(err.is_empty());
    assert!(out == data, "cat gave back {} bytes of {}", out.len(), data.len());
    let (out, _, end) = run(cmd(&["wc", "-c"]), Some(Box::new(PseudoRandom { left: 10 << 20, seed: 4 })));
    assert_eq!((String::from_utf8(out).unwrap().trim(), end), ("10485760", Outcome::Exit(0)));
}

#[test]
fn exec_returns_while_stdin_stays_open() {
    // A local stdin that never ends (like a terminal): the other end is kept open.
    let (local_stdin, mut keep_open) = UnixStream::pair().unwrap();
    keep_open.write_all(b"hello world").unwrap();
    let t = Instant::now();
    let (out, _, end) = run(cmd(&["head", "-c", "5"]), Some(Box::new(local_stdin)));
    assert_eq!((out.as_slice(), end), (&b"hello"[..], Outcome::Exit(0)));
    let (local_stdin, _keep_open) = UnixStream::pair().unwrap();
    let (out, _, end) = run(cmd(&["echo", "done"]), Some(Box::new(local_stdin)));
    assert_eq!((out.as_slice(), end), (&b"done\n"[..], Outcome::Exit(0)));
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn exit_status_stderr_and_refusals() {
    let (out, err, end) = run(cmd(&["sh", "-c", "echo out; echo err >&2; exit 7"]), None);
    assert_eq!((out.as_slice(), err.as_slice(), end), (&b"out\n"[..], &b"err\n"[..], Outcome::Exit(7)));
    let mut timed = cmd(&["sleep", "30"]);
    timed.timeout_ms = Some(200);
    assert_eq!(run(timed, None).2, Outcome::TimedOut);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    match agent_client::exec(agent(), cmd(&["/no/such/program"]), &mut out, &mut err) {
        Err(e @ ClientError::Refused { kind: agent_protocol::ErrorKind::NotFound, .. }) => {
            assert_eq!(e.to_string(), "/no/such/program: No such file or directory", "the agent's words, no protocol names")
        }
        r => panic!("{r:?}"),
    }
    let mut in_nowhere = cmd(&["true"]);
    in_nowhere.cwd = Some("/no/such/dir".into());
    match agent_client::exec(agent(), in_nowhere, &mut out, &mut err) {
        Err(e @ ClientError::Refused { .. }) => assert_eq!(e.to_string(), "no directory /no/such/dir in the sandbox"),
        r => panic!("{r:?}"),
    }
    let pid = agent_client::spawn_detached(agent(), cmd(&["sleep", "30"])).unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let pid = Pid::from_raw(pid as i32).unwrap();
    let _ = kill_process(pid, Signal::KILL);
}

#[test]
fn signal_and_resize_while_running() {
    let running = Exec::start(agent(), cmd(&["sleep", "30"]), None).unwrap();
    let ctl = running.control();
    let waiter = std::thread::spawn(move || running.wait(&mut io::sink(), &mut io::sink()));
    ctl.signal(Signal::TERM.as_raw(), false).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), Outcome::Killed(Signal::TERM.as_raw()));

    // A pty: the size changes before the line that makes the shell print it arrives.
    let mut req = cmd(&["sh", "-c", "stty size; read x; stty size"]);
    req.pty = Some(PtySize { rows: 24, cols: 80 });
    let (local_stdin, mut typing) = UnixStream::pair().unwrap();
    let running = Exec::start(agent(), req, Some(Box::new(local_stdin))).unwrap();
    let ctl = running.control();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut out = ChannelWriter(tx);
        running.wait(&mut out, &mut io::sink())
    });
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        seen.extend(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    ctl.resize(40, 132).unwrap();
    typing.write_all(b"go\n").unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), Outcome::Exit(0));
    seen.extend(rx.try_iter().flatten());
    let text = String::from_utf8(seen).unwrap();
    assert!(text.ends_with("go\r\n40 132\r\n"), "{text:?}");
}

/// Output writer that hands each chunk to the test thread.
struct ChannelWriter(std::sync::mpsc::Sender<Vec<u8>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.0.send(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn upload_and_download_64_mib() {
    let d = tmpdir("big");
    let size = 64u64 << 20;
    let remote = d.join("uploaded");
    let remote = remote.to_str().unwrap();
    let mut c = agent();
    let written = agent_client::upload(&mut c, PseudoRandom { left: size, seed: 11 }, remote, 0o640).unwrap();
    assert_eq!(written, size);
    assert!(same_bytes(File::open(remote).unwrap(), PseudoRandom { left: size, seed: 11 }));
    let back = d.join("downloaded");
    let got = agent_client::download(&mut c, remote, &mut File::create(&back).unwrap()).unwrap();
    assert_eq!(got, size);
    assert!(same_bytes(File::open(&back).unwrap(), PseudoRandom { left: size, seed: 11 }));
    // The same connection goes on serving.
    assert_eq!(agent_client::stat(&mut c, remote).unwrap().size, size);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn upload_sets_the_mode_and_replaces_content() {
    let d = tmpdir("mode");
    let path = d.join("f");
    let p = path.to_str().unwrap();
    let mut c = agent();
    agent_client::upload(&mut c, &b"first version"[..], p, 0o751).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o751);
    agent_client::upload(&mut c, &b"2nd"[..], p, 0o600).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
    assert_eq!(std::fs::read(&path).unwrap(), b"2nd");
    assert_eq!(agent_client::upload(&mut c, io::empty(), p, 0o644).unwrap(), 0);
    assert_eq!(std::fs::read(&path).unwrap(), b"");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn file_errors_name_the_path() {
    let d = tmpdir("errors");
    let ds = d.to_str().unwrap();
    let mut c = agent();
    let missing_parent = format!("{ds}/no/such/dir/file");
    // Larger than one frame, so the refusal has to stop a sender that is under way.
    match agent_client::upload(&mut c, PseudoRandom { left: 8 << 20, seed: 1 }, &missing_parent, 0o644) {
        Err(ClientError::NotFound { path }) => assert_eq!(path, missing_parent),
        r => panic!("{r:?}"),
    }
    match agent_client::upload(&mut c, &b"x"[..], ds, 0o644) {
        Err(ClientError::IsADirectory { path }) => assert_eq!(path, ds),
        r => panic!("{r:?}"),
    }
    let missing = format!("{ds}/missing");
    match agent_client::download(&mut c, &missing, &mut Vec::new()) {
        Err(e @ ClientError::NotFound { .. }) => assert!(e.to_string().contains(&missing), "{e}"),
        r => panic!("{r:?}"),
    }
    match agent_client::download(&mut c, ds, &mut Vec::new()) {
        Err(ClientError::IsADirectory { path }) => assert_eq!(path, ds),
        r => panic!("{r:?}"),
    }
    std::fs::write(d.join("plain"), b"").unwrap();
    let under_file = format!("{ds}/plain/x");
    match agent_client::download(&mut c, &under_file, &mut Vec::new()) {
        Err(ClientError::NotADirectory { path }) => assert_eq!(path, under_file),
        r => panic!("{r:?}"),
    }
    // A local reader that fails: reported as local, not as the guest's.
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
    }
    match agent_client::upload(&mut agent(), Failing, &format!("{ds}/partial"), 0o644) {
        Err(ClientError::Local { what: "read", .. }) => {}
        r => panic!("{r:?}"),
    }
    // After all these, the first connection still answers.
    assert!(agent_client::health(&mut c).is_ok());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn directories() {
    let d = tmpdir("dirs");
    let ds = d.to_str().unwrap();
    let mut c = agent();
    agent_client::mkdir(&mut c, &format!("{ds}/a/b"), 0o755, true).unwrap();
    agent_client::upload(&mut c, &b"1"[..], &format!("{ds}/a/f"), 0o644).unwrap();
    let mut names: Vec<_> =
        agent_client::list_dir(&mut c, &format!("{ds}/a")).unwrap().into_iter().map(|e| e.name).collect();
    names.sort();
    assert_eq!(names, ["b", "f"]);
    match agent_client::remove(&mut c, &format!("{ds}/a"), false) {
        Err(ClientError::File { path, .. }) => assert_eq!(path, format!("{ds}/a")),
        r => panic!("{r:?}"),
    }
    agent_client::remove(&mut c, &format!("{ds}/a"), true).unwrap();
    assert!(!d.join("a").exists());
    std::fs::remove_dir_all(d).unwrap();
}

/// What the fake vsock socket does with a `CONNECT` line.
#[derive(Clone, Copy)]
enum Answer {
    /// `OK <port>`, then the agent serves the connection.
    Agent,
    Close,
    Garbage,
    Silent,
    /// What the VMM writes when the guest did not answer within its timeout.
    GuestSilent,
}

/// A Unix socket at `path` that behaves like the VMM's vsock socket.
fn fake_vsock(path: &Path, answer: Answer) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            let mut line = Vec::new();
            let mut b = [0u8];
            while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            assert_eq!(line, b"CONNECT 1024");
            match answer {
                Answer::Agent => {
                    s.write_all(b"OK 1073741824\n").unwrap();
                    std::thread::spawn(move || serve(s, &Config::default()));
                }
                Answer::Close => drop(s),
                Answer::GuestSilent => s.write_all(b"TIMEOUT\n").unwrap(),
                Answer::Garbage => s.write_all(b"HTTP/1.1 400 Bad Request\r\n").unwrap(),
                Answer::Silent => std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(5));
                    drop(s)
                })
                .join()
                .unwrap(),
            }
        }
    });
}

#[test]
fn connect_handshake() {
    let d = tmpdir("connect");
    let timeout = Duration::from_millis(500);
    let ok = d.join("ok.sock");
    fake_vsock(&ok, Answer::Agent);
    let mut s = agent_client::connect(&ok, 1024, timeout).unwrap();
    // The bytes after the OK line are the agent's protocol.
    assert_eq!(agent_client::hello(&mut s).unwrap(), ember_agent::server::AGENT_VERSION);
    assert_eq!(agent_client::health(&mut s).unwrap().protocol_version, agent_protocol::PROTOCOL_VERSION);

    let closed = d.join("closed.sock");
    fake_vsock(&closed, Answer::Close);
    assert!(matches!(agent_client::connect(&closed, 1024, timeout), Err(ClientError::NoListener(1024))));

    let garbage = d.join("garbage.sock");
    fake_vsock(&garbage, Answer::Garbage);
    match agent_client::connect(&garbage, 1024, timeout) {
        Err(ClientError::Handshake { port: 1024, answer }) => assert!(answer.starts_with("HTTP/1.1 400"), "{answer}"),
        r => panic!("{r:?}"),
    }

    let stalled = d.join("stalled.sock");
    fake_vsock(&stalled, Answer::GuestSilent);
    let e = agent_client::connect(&stalled, 1024, timeout).unwrap_err();
    assert!(matches!(e, ClientError::GuestSilent(1024)), "{e:?}");
    assert!(e.to_string().contains("did not answer"), "{e}");

    let silent = d.join("silent.sock");
    fake_vsock(&silent, Answer::Silent);
    let t = Instant::now();
    assert!(matches!(agent_client::connect(&silent, 1024, timeout), Err(ClientError::NoAnswer { port: 1024, .. })));
    assert!(t.elapsed() < Duration::from_secs(3));

    match agent_client::connect(&d.join("nothing.sock"), 1024, timeout) {
        Err(ClientError::Connect { path, .. }) => assert!(path.ends_with("nothing.sock")),
        r => panic!("{r:?}"),
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn wait_ready_until_the_agent_answers() {
    let d = tmpdir("ready");
    let sock = d.join("vm.sock");
    // The VMM's socket appears late, and at first nothing listens behind it.
    let (s2, d2) = (sock.clone(), d.clone());
    let booting = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let early = d2.join("early.sock");
        fake_vsock(&early, Answer::Close);
        std::fs::rename(&early, &s2).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let ready = d2.join("ready.sock");
        fake_vsock(&ready, Answer::Agent);
        std::fs::rename(&ready, &s2).unwrap();
    });
    let t = Instant::now();
    let (h, _) = agent_client::wait_ready(&sock, 1024, Duration::from_secs(20)).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(600));
    assert_eq!(h.protocol_version, agent_protocol::PROTOCOL_VERSION);
    booting.join().unwrap();

    let t = Instant::now();
    match agent_client::wait_ready(&d.join("never.sock"), 1024, Duration::from_millis(300)) {
        Err(ClientError::NotReady { last, .. }) => assert!(matches!(*last, ClientError::Connect { .. }), "{last}"),
        r => panic!("{r:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn dial_gives_the_service_stream_or_names_the_refused_port() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        io::copy(&mut r, &mut s).unwrap();
    });
    let mut s = agent_client::dial(agent(), port).unwrap();
    s.write_all(b"ping").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"ping");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    match agent_client::dial(agent(), closed) {
        Err(e @ ClientError::DialFailed { .. }) => assert!(e.to_string().contains(&format!("port {closed}")), "{e}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn enable_egress_is_ok_refused_with_the_agents_reason_or_unsupported_by_an_old_agent() {
    use agent_protocol::{decode, read_frame, write_frame, EgressConfig, ErrorKind, Reply, ReplyBody, Request};
    use ember_agent::egress::{Egress, HostEnd};
    use ember_agent::trust::TrustStore;
    let d = tmpdir("egress");
    let egress = Egress::new(HostEnd::Unix(d.join("vsock.sock")), TrustStore::under(d.join("root")), 4);
    let (mut a, b) = UnixStream::pair().unwrap();
    std::thread::spawn(move || serve(b, &Config { egress, ..Config::default() }));
    let listen_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ca_pem = "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".to_string();
    let config = EgressConfig { listen_port, host_port: 3128, ca_pem };
    agent_client::enable_egress(&mut a, &config).unwrap();
    let bad = EgressConfig { ca_pem: "not a certificate".into(), ..config.clone() };
    match agent_client::enable_egress(&mut a, &bad) {
        Err(e @ ClientError::Failed { .. }) => assert!(e.to_string().contains("not a PEM certificate"), "{e}"),
        other => panic!("{other:?}"),
    }

    // An agent from before EnableEgress: the request is an unknown variant, answered under its id.
    let (mut old, mut peer) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        read_frame(&mut peer, &mut buf).unwrap();
        let id = decode::<Request>(&buf).unwrap().id;
        let body = ReplyBody::Error { kind: ErrorKind::MalformedFrame, message: "unknown variant".into() };
        write_frame(&mut peer, &Reply { id, body }).unwrap();
    });
    assert!(matches!(agent_client::enable_egress(&mut old, &config), Err(ClientError::EgressUnsupported)));
    std::fs::remove_dir_all(d).unwrap();
}
