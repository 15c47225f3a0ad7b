//! Egress: the guest's one way out, to its sandbox's proxy on the host.
//!
//! Off until the host sends `EnableEgress` (a sandbox without an egress policy has no
//! listener at all). Then the agent listens on `127.0.0.1:listen_port` and splices each
//! accepted connection, bytes only, into a vsock stream it opens to the host's port
//! `host_port`, which the VMM connects to its sandbox's proxy; the proxy speaks HTTP proxy
//! (CONNECT and absolute URLs) and decides everything. The forwarder decides nothing: a guest
//! process could open that vsock stream itself, and reaches the same proxy.
//!
//! Every exec started after it gets the proxy variables and the CA bundle variables (see
//! [`ExecEnv`]), unless it sets them itself, and the proxy's CA is in the trust store (see
//! `trust`), so that unmodified `curl`, `pip`, `git`, Python and Node go through the proxy
//! and trust what it intercepts.
//!
//! Bounds: at most `max_connections` connections are forwarded at once (two threads and two
//! 64 KiB buffers each); more wait in the listener's backlog until one ends. A host end that
//! cannot be reached (no proxy) gets the client a 502 saying so, not a silent close.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use agent_protocol::{EgressConfig, ErrorKind};
use tracing::{debug, info, warn};

use crate::sys::{VsockStream, HOST_CID};
use crate::trust::TrustStore;
use crate::Connection;

/// Connections forwarded at once by default: the 100 a busy sandbox opens together, well
/// within the VMM's 256 vsock connections.
pub const MAX_CONNECTIONS: usize = 128;
/// A forwarded connection's thread (and its splice's): a few frames of stack, buffers on the
/// heap.
const CONNECTION_STACK: usize = 64 << 10;
/// Hosts never proxied: the guest's own loopback.
const NO_PROXY: &str = "localhost,127.0.0.1,::1";
/// Variables that name the CA bundle, for the programs that do not read the system's:
/// OpenSSL's own (Python's `ssl`), `requests`, pip, Node (added to its built-in roots), git,
/// curl.
const BUNDLE_VARIABLES: [&str; 6] =
    ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "CURL_CA_BUNDLE"];

/// Where forwarded connections go.
#[derive(Debug, Clone)]
pub enum HostEnd {
    /// vsock to the host (CID 2).
    Vsock,
    /// For tests on the host: the Unix socket `PATH_PORT`, as the VMM names the socket of a
    /// guest connection to host port PORT.
    Unix(PathBuf),
}

/// The agent's egress, shared by all its connections: off until enabled.
#[derive(Debug, Clone)]
pub struct Egress {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    host: HostEnd,
    trust: TrustStore,
    max_connections: usize,
    enabled: Mutex<Option<Enabled>>,
}

#[derive(Debug)]
struct Enabled {
    listen_port: u16,
    host_port: u32,
    env: Arc<ExecEnv>,
}

impl Default for Egress {
    fn default() -> Egress {
        Egress::new(HostEnd::Vsock, TrustStore::system(), MAX_CONNECTIONS)
    }
}

impl Egress {
    pub fn new(host: HostEnd, trust: TrustStore, max_connections: usize) -> Egress {
        Egress { inner: Arc::new(Inner { host, trust, max_connections, enabled: Mutex::new(None) }) }
    }

    /// `EnableEgress`: the CA installed, then the listener started unless it runs already
    /// (with the same ports: other ones are refused, a running forwarder is not moved).
    pub(crate) fn enable(&self, config: &EgressConfig) -> Result<(), (ErrorKind, String)> {
        let mut enabled = self.inner.enabled.lock().unwrap();
        if let Some(on) = enabled.as_ref() {
            if (on.listen_port, on.host_port) != (config.listen_port, config.host_port) {
                return Err((
                    ErrorKind::InvalidRequest,
                    format!(
                        "egress already listens on 127.0.0.1:{} for host port {}",
                        on.listen_port, on.host_port
                    ),
                ));
            }
        }
        let failed = |what: &str, e: io::Error| (crate::sys::error_kind(&e), format!("{what}: {e}"));
        let bundle = self.inner.trust.install(&config.ca_pem).map_err(|e| failed("install the egress CA", e))?;
        let env = Arc::new(ExecEnv::new(config.listen_port, &bundle));
        if let Some(on) = enabled.as_mut() {
            on.env = env;
            return Ok(());
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, config.listen_port))
            .map_err(|e| failed(&format!("listen on 127.0.0.1:{}", config.listen_port), e))?;
        let slots = Slots::new(self.inner.max_connections);
        let port = config.host_port;
        let started = match &self.inner.host {
            HostEnd::Vsock => spawn_forwarder(listener, slots, move || VsockStream::connect(HOST_CID, port)),
            HostEnd::Unix(path) => {
                let path = PathBuf::from(format!("{}_{port}", path.display()));
                spawn_forwarder(listener, slots, move || UnixStream::connect(&path))
            }
        };
        started.map_err(|e| failed("start the egress forwarder", e))?;
        info!("egress: 127.0.0.1:{} forwarded to host port {port}", config.listen_port);
        *enabled = Some(Enabled { listen_port: config.listen_port, host_port: port, env });
        Ok(())
    }

    /// What every exec gets (nothing while egress is off).
    pub(crate) fn exec_env(&self) -> Arc<ExecEnv> {
        match self.inner.enabled.lock().unwrap().as_ref() {
            Some(on) => on.env.clone(),
            None => Arc::default(),
        }
    }
}

/// The variables egress gives execs, in groups that share a value: a group is left out
/// whole when the exec sets any of its names (`HTTPS_PROXY` of its own must not lose to our
/// `https_proxy`, which curl prefers).
#[derive(Debug, Default)]
pub(crate) struct ExecEnv {
    groups: Vec<(Vec<&'static str>, String)>,
}

impl ExecEnv {
    fn new(listen_port: u16, bundle: &str) -> ExecEnv {
        let proxy = format!("http://127.0.0.1:{listen_port}");
        let mut groups: Vec<(Vec<&'static str>, String)> = vec![
            (vec!["HTTP_PROXY", "http_proxy"], proxy.clone()),
            (vec!["HTTPS_PROXY", "https_proxy"], proxy.clone()),
            (vec!["ALL_PROXY", "all_proxy"], proxy),
            (vec!["NO_PROXY", "no_proxy"], NO_PROXY.to_string()),
        ];
        groups.extend(BUNDLE_VARIABLES.iter().map(|&name| (vec![name], bundle.to_string())));
        ExecEnv { groups }
    }

    /// Sets the variables on `cmd`, but the groups `own` (the exec's own variables) names.
    pub(crate) fn apply(&self, cmd: &mut Command, own: &[(String, String)]) {
        for (names, value) in &self.groups {
            if !own.iter().any(|(k, _)| names.contains(&k.as_str())) {
                for name in names {
                    cmd.env(name, value);
                }
            }
        }
    }
}

/// How many connections are being forwarded, and the wait for a free slot.
struct Slots {
    open: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// A connection's slot, given back when it is dropped.
struct Slot(Arc<Slots>);

impl Slots {
    fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots { open: Mutex::new(0), freed: Condvar::new(), max: max.max(1) })
    }

    fn take(self: &Arc<Self>) -> Slot {
        let mut open = self.open.lock().unwrap();
        while *open >= self.max {
            open = self.freed.wait(open).unwrap();
        }
        *open += 1;
        Slot(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.open.lock().unwrap() -= 1;
        self.0.freed.notify_one();
    }
}

/// Accepts on `listener` for ever, each connection spliced to a stream `connect` opens, on a
/// thread of its own once a slot is free.
fn spawn_forwarder<S, F>(listener: TcpListener, slots: Arc<Slots>, connect: F) -> io::Result<()>
where
    S: Connection,
    F: Fn() -> io::Result<S> + Send + Sync + 'static,
{
    let connect = Arc::new(connect);
    std::thread::Builder::new().name("egress".into()).stack_size(CONNECTION_STACK).spawn(move || loop {
        // A slot first: past the bound, connections wait in the backlog, not in threads.
        let slot = slots.take();
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) => {
                warn!("egress: accept: {e}");
                // Out of descriptors, say: let connections end before the next try.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let connect = connect.clone();
        let spawned = std::thread::Builder::new().name("egress-conn".into()).stack_size(CONNECTION_STACK).spawn(move || {
            let _slot = slot;
            let _ = client.set_nodelay(true);
            match connect() {
                Ok(host) => {
                    if let Err(e) = crate::dial::splice(host, &[], client) {
                        debug!("egress: {e}");
                    }
                }
                Err(e) => unreachable(client, &e),
            }
        });
        if let Err(e) = spawned {
            warn!("egress: cannot start a connection's thread: {e}");
        }
    })?;
    Ok(())
}

/// Tells a client whose connection found no proxy on the host why, as an HTTP proxy's answer
/// (what the proxy variables make every client expect), and closes it once it has read that.
fn unreachable(mut client: TcpStream, e: &io::Error) {
    debug!("egress: cannot reach the host's proxy: {e}");
    let body = format!("ember: this sandbox's egress proxy cannot be reached ({e})\n");
    let response = format!(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if client.write_all(response.as_bytes()).is_err() {
        return;
    }
    let _ = client.shutdown(Shutdown::Write);
    // Its request is read and dropped until it closes: closing with unread bytes would reset
    // the connection, and the client might lose the answer.
    let _ = client.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 << 10;
    while left > 0 {
        match client.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_execs_own_variables_win_whole_groups() {
        let env = ExecEnv::new(3128, "/etc/ssl/certs/ca-certificates.crt");
        let mut cmd = Command::new("true");
        env.apply(&mut cmd, &[("HTTPS_PROXY".into(), "http://elsewhere:1".into()), ("PIP_CERT".into(), "/mine".into())]);
        let set: std::collections::HashMap<String, String> = cmd
            .get_envs()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.unwrap().to_string_lossy().into_owned()))
            .collect();
        assert_eq!(set["HTTP_PROXY"], "http://127.0.0.1:3128");
        assert_eq!(set["http_proxy"], "http://127.0.0.1:3128");
        assert_eq!(set["ALL_PROXY"], "http://127.0.0.1:3128");
        assert_eq!(set["NO_PROXY"], "localhost,127.0.0.1,::1");
        assert!(!set.contains_key("HTTPS_PROXY") && !set.contains_key("https_proxy"), "the exec's HTTPS_PROXY leaves both cases alone");
        assert!(!set.contains_key("PIP_CERT"));
        for name in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "CURL_CA_BUNDLE"] {
            assert_eq!(set[name], "/etc/ssl/certs/ca-certificates.crt", "{name}");
        }
        let mut off = Command::new("true");
        ExecEnv::default().apply(&mut off, &[]);
        assert_eq!(off.get_envs().count(), 0, "no variables while egress is off");
    }

    #[test]
    fn connections_past_the_bound_wait_for_a_slot() {
        let slots = Slots::new(2);
        let (a, b) = (slots.take(), slots.take());
        let waiting = slots.clone();
        let third = std::thread::spawn(move || {
            let _slot = waiting.take();
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!third.is_finished(), "a third slot was given while two were taken");
        drop(a);
        third.join().unwrap();
        drop(b);
        assert_eq!(*slots.open.lock().unwrap(), 0);
    }
}
