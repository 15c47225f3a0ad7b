//! A sandbox's egress on this host, every piece real but the VM: the store starts the real
//! `ember egress-proxy` for a sandbox whose VMM is a stand-in and whose guest agent runs in
//! this process behind a fake vsock socket (`CONNECT`, then the agent's `serve`). The agent's
//! forwarder listens on a loopback port of this host and connects to the Unix socket the VMM
//! would connect guest port 3128 to, `vsock.sock_3128`; upstreams listen on this host's
//! loopback (the store's policies are compiled with `allow_internal`, as tests' are). No
//! exec runs in this agent: its reaper would wait for every child of this process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use egress::config::ProxyConfig;
use ember_agent::egress::{Egress, HostEnd};
use ember_agent::server::{serve, Config};
use ember_agent::trust::TrustStore;
use sandbox::egress::EgressSettings;
use sandbox::record::vmm_serves;
use sandbox::Store;

struct World {
    _tmp: tempfile::TempDir,
    store: Store,
    vmm: Child,
    /// The guest's loopback port its forwarder listens on.
    guest_port: u16,
    /// The guest's root, for its trust store.
    guest: PathBuf,
    upstream: u16,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.store.remove("s");
        let _ = self.vmm.kill();
        let _ = self.vmm.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Answers every request `200 hello` and closes.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let s = s.unwrap();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = (&s).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
            });
        }
    });
    port
}

/// Sandbox `s`, ready: its record, a stand-in VMM (a shell whose command line names the API
/// socket, as `ember vmm`'s does) and its agent behind `vsock.sock`.
fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let guest_port = free_port();
    let settings = EgressSettings { allow_internal: true, guest_port, ..EgressSettings::default() };
    let store = Store::new(tmp.path().join("state/sandboxes"), PathBuf::from(env!("CARGO_BIN_EXE_ember"))).with_egress(settings);
    let dir = store.dir("s");
    std::fs::create_dir_all(&dir).unwrap();
    let api = dir.join("api.sock");
    // The trailing `:` keeps the shell from exec'ing sleep, so its argv stays in /proc.
    let vmm = Command::new("/bin/sh").args(["-c", "sleep 120; :", "sh"]).arg(&api).spawn().unwrap();
    wait_for("the stand-in VMM", || vmm_serves(vmm.id() as i32, &api));
    let record = serde_json::json!({
        "name": "s", "pid": vmm.id(), "cid": 3, "image": "/i", "mem_mib": 256, "vcpus": 1, "created": 1, "phase": "ready"
    });
    std::fs::write(dir.join("sandbox.json"), record.to_string()).unwrap();

    let guest = tmp.path().join("guest");
    let vsock = dir.join("vsock.sock");
    let egress = Egress::new(HostEnd::Unix(vsock.clone()), TrustStore::under(&guest), 16);
    let config = Config { egress, ..Config::default() };
    let listener = UnixListener::bind(&vsock).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let mut s = s.unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8];
            while s.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            assert_eq!(line, b"CONNECT 1024");
            s.write_all(b"OK 1073741824\n").unwrap();
            let config = config.clone();
            std::thread::spawn(move || serve(s, &config));
        }
    });
    World { _tmp: tmp, store, vmm, guest_port, guest, upstream: upstream() }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn allow(hosts: &[&str]) -> ProxyConfig {
    ProxyConfig::from_value(serde_json::json!({"access_control": {"allow_list": hosts}})).unwrap()
}

impl World {
    /// A guest program's request through the proxy variables' address.
    fn get(&self, url: &str) -> String {
        let mut tcp = TcpStream::connect(("127.0.0.1", self.guest_port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let host = url.trim_start_matches("http://").split('/').next().unwrap();
        write!(tcp, "GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        answer
    }

    fn upstream_url(&self) -> String {
        format!("http://127.0.0.1:{}/path?q=1", self.upstream)
    }

    fn proxy_pid(&self) -> i32 {
        self.store.record("s").unwrap().egress.expect("a proxy is recorded").pid
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !matches!(s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()), Some("Z" | "X")))
}

#[test]
fn a_guest_request_goes_through_the_agent_and_the_proxy_under_the_policy_which_a_change_replaces() {
    let w = world();
    let record = w.store.set_egress("s", &allow(&["127.0.0.1"])).unwrap();
    let proxy = record.egress.clone().unwrap();
    assert_eq!(proxy.socket, w.store.dir("s").join("vsock.sock_3128"), "where the VMM connects guest port 3128");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&proxy.socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket is its owner's alone");

    let answer = w.get(&w.upstream_url());
    assert!(answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("hello"), "{answer}");
    let denied = w.get("http://192.0.2.7/");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(denied.contains("ember: egress to 192.0.2.7:80 denied by this sandbox's policy"), "{denied}");

    // The guest was given the deployment's CA. (What execs get is the agent's tests': an exec
    // here would start the agent's reaper, which waits for every child of this process.)
    let ca = std::fs::read_to_string(w.store.egress_ca_dir().join("ca.pem")).unwrap();
    let bundle = std::fs::read_to_string(w.guest.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(bundle.contains(ca.trim()), "the CA is not in the guest's bundle");

    // A new policy, from the command line: the same proxy reloads it, and new connections
    // get it.
    let state = w.store.dir("s").parent().unwrap().parent().unwrap().to_path_buf();
    let out = Command::new(env!("CARGO_BIN_EXE_ember")).args(["egress", "s", "--allow-net", "192.0.2.7"]).env("EMBER_STATE", &state).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(w.proxy_pid(), proxy.pid, "the policy changed in the running proxy");
    wait_for("the new policy", || w.get(&w.upstream_url()).starts_with("HTTP/1.1 403"));
    assert_eq!(w.store.egress_policy("s").unwrap(), Some(allow(&["192.0.2.7"])));

    let audit = std::fs::read_to_string(w.store.egress_audit("s").unwrap()).unwrap();
    let events: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let forwarded = events.iter().find(|e| e["mode"] == "forwarded").expect("the allowed request was audited");
    assert_eq!((forwarded["status"].as_u64(), forwarded["path"].as_str()), (Some(200), Some("/path?q=1")));
    assert_eq!(forwarded["decided_by"], "allow_list entry 127.0.0.1");
    assert!(events.iter().any(|e| e["mode"] == "denied" && e["host"] == "192.0.2.7"), "{audit}");

    // rm ends the proxy with the sandbox.
    w.store.remove("s").unwrap();
    assert!(!alive(proxy.pid), "rm left the egress proxy running");
}

#[test]
fn the_proxy_ends_once_its_sandboxs_vmm_is_gone() {
    let mut w = world();
    w.store.set_egress("s", &allow(&["127.0.0.1"])).unwrap();
    let pid = w.proxy_pid();
    let socket = w.store.dir("s").join("vsock.sock_3128");
    w.vmm.kill().unwrap();
    w.vmm.wait().unwrap();
    wait_for("the proxy's end", || !alive(pid));
    assert!(!socket.exists(), "the proxy left its socket behind");
    let log = std::fs::read_to_string(w.store.dir("s").join("egress.log")).unwrap();
    assert!(log.contains("VMM") && log.contains("is gone"), "{log}");
}

#[test]
fn a_secret_file_others_can_read_fails_egress_before_a_proxy_starts() {
    let w = world();
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets.json");
    std::fs::write(&secrets, r#"{"GH": "x"}"#).unwrap();
    // Readable by others: refused (what it holds has leaked), before any proxy starts.
    std::fs::set_permissions(&secrets, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let store = Store::new(w.store.dir("s").parent().unwrap().to_path_buf(), PathBuf::from(env!("CARGO_BIN_EXE_ember")))
        .with_egress(EgressSettings { secrets: Some(secrets), allow_internal: true, guest_port: w.guest_port, ..Default::default() });
    let err = store.set_egress("s", &allow(&["127.0.0.1"])).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
    assert!(store.record("s").unwrap().egress.is_none());
    // Without a record of any: `ember egress` says it has none.
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["egress", "s"])
        .env("EMBER_STATE", w.store.dir("s").parent().unwrap().parent().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("s has no egress"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_proxy_process_refuses_a_bad_policy_gives_its_socket_the_jails_group_and_ends_at_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("egress.json");
    std::fs::write(&policy, r#"{"access_control": {"allow_list": ["a"], "deny_list": ["b"]}}"#).unwrap();
    let socket = tmp.path().join("vsock.sock_3128");
    let proxy = |vmm_pid: u32, vmm_socket: &Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
        cmd.arg("egress-proxy")
            .arg("--socket")
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .arg("--audit")
            .arg(tmp.path().join("audit.jsonl"))
            .arg("--ca-dir")
            .arg(tmp.path().join("ca"))
            .args(["--vmm-pid", &vmm_pid.to_string(), "--vmm-socket"])
            .arg(vmm_socket);
        cmd
    };
    let out = proxy(std::process::id(), Path::new("/nonexistent/api.sock")).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("egress.json") && stderr.contains("both an allow_list and a deny_list"), "{stderr}");

    std::fs::write(&policy, r#"{"access_control": {"allow_list": ["a"]}}"#).unwrap();
    // No such VMM (this process serves no such socket): it ends at once, leaving no socket.
    let out = proxy(std::process::id(), Path::new("/nonexistent/api.sock")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!socket.exists());

    // For a VMM that runs as another user: the socket is its group's too.
    let api = tmp.path().join("api.sock");
    let mut vmm = Command::new("/bin/sh").args(["-c", "sleep 60; :", "sh"]).arg(&api).spawn().unwrap();
    wait_for("the stand-in VMM", || vmm_serves(vmm.id() as i32, &api));
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    let mut running = proxy(vmm.id(), &api).args(["--socket-group", &gid.to_string()]).stderr(std::process::Stdio::null()).spawn().unwrap();
    wait_for("the proxy's socket", || socket.exists());
    let meta = std::fs::metadata(&socket).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, gid));
    // SAFETY: plain kill(2) of the child just started.
    unsafe { libc::kill(running.id() as i32, libc::SIGTERM) };
    assert!(running.wait().unwrap().success(), "SIGTERM is a clean end");
    assert!(!socket.exists(), "its socket is removed");
    vmm.kill().unwrap();
    vmm.wait().unwrap();
}
