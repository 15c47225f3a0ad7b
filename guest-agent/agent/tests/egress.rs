//! `EnableEgress`: the agent's forwarder from a loopback port to the host's proxy, here a Unix
//! socket named as the VMM names a guest connection's (`PATH_PORT`) standing in for vsock,
//! the CA in a scratch trust store, and the variables every exec gets.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use agent_protocol::{EgressConfig, ErrorKind, ExecRequest, ReplyBody, RequestBody};
use common::{sh, tmpdir, Client};
use ember_agent::egress::{Egress, HostEnd};
use ember_agent::server::{serve, Config};
use ember_agent::trust::TrustStore;

const CA: &str = "-----BEGIN CERTIFICATE-----\nTESTCA\n-----END CERTIFICATE-----\n";

/// An agent whose egress goes to `dir`/vsock.sock_PORT and trusts under `dir`/root.
fn agent_config(dir: &Path, max_connections: usize) -> Config {
    let egress = Egress::new(HostEnd::Unix(dir.join("vsock.sock")), TrustStore::under(dir.join("root")), max_connections);
    Config { egress, ..Config::default() }
}

fn client(config: &Config) -> Client {
    let (a, b) = UnixStream::pair().unwrap();
    let config = config.clone();
    thread::spawn(move || serve(b, &config));
    Client::over(a)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn enable(c: &mut Client, listen_port: u16) -> ReplyBody {
    c.call(1, RequestBody::EnableEgress(EgressConfig { listen_port, host_port: 3128, ca_pem: CA.into() }))
}

/// The host's proxy as the VMM would connect to it: each connection is answered with
/// `proxied:` and what it sent, once it has sent it all (its end of file).
fn fake_proxy(dir: &Path) -> (PathBuf, Arc<AtomicUsize>) {
    let path = dir.join("vsock.sock_3128");
    let listener = UnixListener::bind(&path).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    thread::spawn(move || {
        for s in listener.incoming() {
            let mut s = s.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                s.write_all(b"proxied:").unwrap();
                s.write_all(&got).unwrap();
            });
        }
    });
    (path, accepted)
}

fn round_trip(port: u16, request: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    tcp.write_all(request).unwrap();
    tcp.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    tcp.read_to_end(&mut got).unwrap();
    got
}

#[test]
fn connections_to_the_loopback_port_reach_the_hosts_proxy_with_half_close() {
    let dir = tmpdir("egress-path");
    let config = agent_config(&dir, 8);
    fake_proxy(&dir);
    let port = free_port();
    let mut c = client(&config);
    assert_eq!(enable(&mut c, port), ReplyBody::Ok);
    assert_eq!(round_trip(port, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n"), b"proxied:CONNECT example.com:443 HTTP/1.1\r\n\r\n");
    // Many at once, each its own stream to the host.
    let streams: Vec<_> = (0..16).map(|i| thread::spawn(move || round_trip(port, format!("stream {i}").as_bytes()))).collect();
    for (i, s) in streams.into_iter().enumerate() {
        assert_eq!(s.join().unwrap(), format!("proxied:stream {i}").as_bytes());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn enabling_again_is_idempotent_and_other_ports_are_refused() {
    let dir = tmpdir("egress-again");
    let config = agent_config(&dir, 8);
    fake_proxy(&dir);
    let port = free_port();
    let mut c = client(&config);
    assert_eq!(enable(&mut c, port), ReplyBody::Ok);
    // Another connection (as after a restore): the listener runs already.
    let mut again = client(&config);
    assert_eq!(enable(&mut again, port), ReplyBody::Ok);
    assert_eq!(round_trip(port, b"x"), b"proxied:x", "still one working listener");
    match enable(&mut again, free_port()) {
        ReplyBody::Error { kind: ErrorKind::InvalidRequest, message } => {
            assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let bundle = std::fs::read_to_string(dir.join("root/etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert_eq!(bundle, CA, "the CA is in the bundle once");
    assert_eq!(std::fs::read_to_string(dir.join("root/usr/local/share/ca-certificates/ember-egress.crt")).unwrap(), CA);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn execs_get_the_proxy_variables_once_enabled_unless_they_set_them() {
    let dir = tmpdir("egress-env");
    let config = agent_config(&dir, 8);
    let mut c = client(&config);
    // In an environment of its own (this host's may have some of them): egress adds its
    // variables even to an exec that clears the agent's.
    let show = || ExecRequest {
        clear_env: true,
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..sh("echo \"$HTTP_PROXY|$https_proxy|$NO_PROXY|$SSL_CERT_FILE|$PIP_CERT\"")
    };
    let (out, _, end) = c.exec(2, show());
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    assert_eq!(out, b"||||\n", "no egress, no variables");

    assert_eq!(enable(&mut c, free_port()), ReplyBody::Ok);
    let port_url = |out: &[u8]| String::from_utf8(out.to_vec()).unwrap();
    // From another connection too: egress is the agent's, not the connection's.
    let mut other = client(&config);
    let (out, _, _) = other.exec(3, show());
    let out = port_url(&out);
    let fields: Vec<&str> = out.trim_end().split('|').collect();
    assert!(fields[0].starts_with("http://127.0.0.1:") && fields[0] == fields[1], "{out}");
    assert_eq!(fields[2], "localhost,127.0.0.1,::1");
    assert_eq!(fields[3], "/etc/ssl/certs/ca-certificates.crt");
    assert_eq!(fields[4], fields[3]);

    let mut own = show();
    own.env.extend([("HTTPS_PROXY".into(), "http://mine:1".into()), ("PIP_CERT".into(), "/mine.pem".into())]);
    let (out, _, _) = other.exec(4, own);
    let out = port_url(&out);
    let fields: Vec<&str> = out.trim_end().split('|').collect();
    assert_eq!(fields[1], "", "the exec's HTTPS_PROXY keeps ours out of https_proxy too");
    assert_eq!(fields[4], "/mine.pem");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn connections_past_the_bound_wait_and_then_go_through() {
    let dir = tmpdir("egress-bound");
    let config = agent_config(&dir, 2);
    // A proxy that holds every connection until told to let go.
    let listener = UnixListener::bind(dir.join("vsock.sock_3128")).unwrap();
    let (held_tx, held_rx) = mpsc::channel();
    thread::spawn(move || {
        for s in listener.incoming() {
            held_tx.send(s.unwrap()).unwrap();
        }
    });
    let port = free_port();
    let mut c = client(&config);
    assert_eq!(enable(&mut c, port), ReplyBody::Ok);
    let connect = || TcpStream::connect(("127.0.0.1", port)).unwrap();
    let held = || held_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let (a, first) = (connect(), held());
    let (_b, _second) = (connect(), held());
    let _c = connect();
    assert!(held_rx.recv_timeout(Duration::from_millis(300)).is_err(), "a third connection was forwarded past the bound of 2");
    // Both ends of the first one go: its slot is free.
    drop((a, first));
    held_rx.recv_timeout(Duration::from_secs(10)).expect("the waiting connection goes through once one ends");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_client_with_no_proxy_behind_gets_a_502_saying_so() {
    let dir = tmpdir("egress-noproxy");
    let config = agent_config(&dir, 8);
    let port = free_port();
    let mut c = client(&config);
    assert_eq!(enable(&mut c, port), ReplyBody::Ok);
    let answer = String::from_utf8(round_trip(port, b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")).unwrap();
    assert!(answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{answer}");
    assert!(answer.contains("ember: this sandbox's egress proxy cannot be reached"), "{answer}");
    std::fs::remove_dir_all(&dir).unwrap();
}
