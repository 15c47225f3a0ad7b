//! The identity hooks of the host client (hostname, clock, entropy): against the real agent
//! served on one end of a socket pair, and against a scripted agent where the real one would
//! change the host itself (its clock). Run as root, like the agent's own tests.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use ember_agent::server::{serve, Config};
use ember_agent::{decode, read_frame, write_frame, ErrorKind, ExecRequest, Reply, ReplyBody, Request, RequestBody};
use vmm::agent_client::{self, ClientError, Outcome};

/// A connection to an in-process agent; with `own_uts`, the thread that serves it (and so
/// every command it runs) has its own UTS namespace, and `None` means it could not get one.
fn agent(own_uts: bool) -> Option<UnixStream> {
    let (a, b) = UnixStream::pair().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: unshare(2) on this thread only; it touches no memory.
        let ok = !own_uts || unsafe { libc::unshare(libc::CLONE_NEWUTS) } == 0;
        tx.send(ok).unwrap();
        if ok {
            let _ = serve(b, &Config::default());
        }
    });
    a.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    rx.recv().unwrap().then_some(a)
}

/// An agent that reads one request, answers it with `reply`, and hands back what it got.
fn scripted_agent(reply: ReplyBody) -> (UnixStream, std::thread::JoinHandle<RequestBody>) {
    let (a, mut b) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = Vec::new();
        read_frame(&mut b, &mut buf).unwrap();
        let request: Request = decode(&buf).unwrap();
        write_frame(&mut b, &Reply { id: request.id, body: reply }).unwrap();
        request.body
    });
    (a, server)
}

fn hostname_seen_by_a_command(stream: UnixStream) -> String {
    let request = ExecRequest { argv: vec!["cat".into(), "/proc/sys/kernel/hostname".into()], ..Default::default() };
    let mut out = Vec::new();
    let outcome = agent_client::exec(stream, request, &mut out, &mut std::io::sink()).unwrap();
    assert_eq!(outcome, Outcome::Exit(0));
    String::from_utf8(out).unwrap().trim_end().to_string()
}

#[test]
fn set_hostname_names_the_machine_for_the_agents_commands() {
    let Some(mut c) = agent(true) else {
        eprintln!("skipped: cannot unshare the UTS namespace here");
        return;
    };
    agent_client::set_hostname(&mut c, "sb-clone-7").unwrap();
    // Longer than the kernel's 64 bytes: refused, with the agent's reason, changing nothing.
    match agent_client::set_hostname(&mut c, &"x".repeat(65)) {
        Err(e @ ClientError::Failed { what: "set the hostname", .. }) => {
            assert!(e.to_string().contains("sethostname"), "{e}")
        }
        r => panic!("{r:?}"),
    }
    // Last: an exec ends by shutting its connection down.
    assert_eq!(hostname_seen_by_a_command(c), "sb-clone-7");
}

#[test]
fn add_entropy_sends_the_bytes_and_the_credit() {
    let data: Vec<u8> = (0..32).map(|i| i * 7 + 1).collect();
    let (mut c, server) = scripted_agent(ReplyBody::Ok);
    agent_client::add_entropy(&mut c, &data, 256).unwrap();
    assert_eq!(server.join().unwrap(), RequestBody::AddEntropy { data: data.clone(), entropy_bits: 256 });
    // The real agent mixes them into this kernel's pool and reseeds (harmless to the host).
    let mut c = agent(false).unwrap();
    agent_client::add_entropy(&mut c, &data, 256).unwrap();
}

#[test]
fn set_clock_sends_the_time_and_reports_a_refusal() {
    let (mut c, server) = scripted_agent(ReplyBody::Ok);
    agent_client::set_clock(&mut c, 1_750_000_000, 123_456_789).unwrap();
    assert_eq!(server.join().unwrap(), RequestBody::SetClock { secs: 1_750_000_000, nanos: 123_456_789 });
    // The real agent would set this host's clock: only its refusal of a bad time is tried.
    let mut c = agent(false).unwrap();
    let e = agent_client::set_clock(&mut c, 0, 2_000_000_000).unwrap_err();
    assert!(e.to_string().starts_with("the agent could not set the clock"), "{e}");
    match e {
        ClientError::Failed { what: "set the clock", kind: ErrorKind::Io, message } => {
            assert!(message.contains("nanos out of range"), "{message}")
        }
        e => panic!("{e:?}"),
    }
    // An agent that answers something else is not taken as having done it.
    let (mut c, server) = scripted_agent(ReplyBody::FileWritten { size: 1 });
    assert!(matches!(agent_client::set_clock(&mut c, 1, 0), Err(ClientError::Unexpected(_))));
    server.join().unwrap();
}
