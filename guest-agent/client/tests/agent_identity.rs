//! The host client's identity call (entropy, clock, hostname in one write and one round trip), against a
//! scripted agent: the real agent would set this host's clock. The agent's own handling of
//! each request is tested in guest-agent/tests/ (identity.rs), and the whole in the harness.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_protocol::{decode, read_frame, write_frame, ErrorKind, Reply, ReplyBody, Request, RequestBody};
use agent_client::{self, ClientError, Identity};

/// An agent that takes the three requests in one read before it answers any (a client that
/// waited for each answer would hang it; one that wrote them one by one would reach a guest as
/// several packets), answers each with `answer`, and hands back what it got.
fn scripted_agent(answer: fn(&RequestBody) -> ReplyBody) -> (UnixStream, std::thread::JoinHandle<Vec<RequestBody>>) {
    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let server = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 64 << 10];
        let n = b.read(&mut chunk).unwrap();
        let mut one_read = &chunk[..n];
        let mut buf = Vec::new();
        let mut requests = Vec::new();
        for i in 0..3 {
            read_frame(&mut one_read, &mut buf).unwrap_or_else(|e| panic!("request {i} was not in the first read: {e:?}"));
            requests.push(decode::<Request>(&buf).unwrap());
        }
        assert!(one_read.is_empty(), "more than three requests");
        for request in &requests {
            write_frame(&mut b, &Reply { id: request.id, body: answer(&request.body) }).unwrap();
        }
        requests.into_iter().map(|r| r.body).collect()
    });
    (a, server)
}

fn identity<'a>(entropy: &'a [u8], hostname: &'a str) -> Identity<'a> {
    Identity { entropy, entropy_bits: 256, hostname }
}

#[test]
fn entropy_then_the_hosts_time_then_the_name_go_out_together() {
    let data: Vec<u8> = (0..32).map(|i| i * 7 + 1).collect();
    let (mut c, server) = scripted_agent(|_| ReplyBody::Ok);
    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    agent_client::set_identity(&mut c, &identity(&data, "sb-clone-7")).unwrap();
    let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let seen = server.join().unwrap();
    let [RequestBody::AddEntropy { data: sent, entropy_bits: 256 }, RequestBody::SetClock { secs, nanos }, RequestBody::SetHostname { name }] =
        &seen[..]
    else {
        panic!("{seen:?}")
    };
    assert_eq!(sent, &data);
    let set = Duration::new(*secs as u64, *nanos);
    assert!(before <= set && set <= after, "{set:?} not within {before:?}..{after:?}");
    assert_eq!(name, "sb-clone-7");
}

#[test]
fn a_refused_step_is_named_and_an_odd_answer_is_not_taken_for_done() {
    let (mut c, server) = scripted_agent(|r| match r {
        RequestBody::SetClock { .. } => {
            ReplyBody::Error { kind: ErrorKind::PermissionDenied, message: "clock_settime: denied".into() }
        }
        _ => ReplyBody::Ok,
    });
    match agent_client::set_identity(&mut c, &identity(&[1; 32], "a")) {
        Err(e @ ClientError::Failed { what: "set the clock", kind: ErrorKind::PermissionDenied, .. }) => {
            assert!(e.to_string().contains("clock_settime: denied"), "{e}")
        }
        r => panic!("{r:?}"),
    }
    server.join().unwrap();
    let (mut c, server) = scripted_agent(|r| match r {
        RequestBody::SetHostname { .. } => ReplyBody::FileWritten { size: 1 },
        _ => ReplyBody::Ok,
    });
    assert!(matches!(agent_client::set_identity(&mut c, &identity(&[1; 32], "a")), Err(ClientError::Unexpected(_))));
    server.join().unwrap();
}
