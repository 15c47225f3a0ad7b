//! A sandbox's egress: its policy (the LangSmith SDK's `proxy_config`), the proxy process
//! that enforces it, and the guest agent told to forward to that proxy.
//!
//! A sandbox has no egress until [`Store::set_egress`]: its agent listens on no TCP port and
//! nothing serves the host end of its vsock port 3128 (a guest connection there is reset).
//! `set_egress` writes the policy into the sandbox's directory (`egress.json`), starts
//! `ember egress-proxy` (in a session of its own, its log `egress.log`, its audit events
//! `egress.jsonl`) on the Unix socket the VMM connects the guest's vsock port 3128 to
//! (`vsock.sock_3128` beside the VMM's vsock socket: in its jail's `/run` when it is jailed,
//! given the jail's group when the VMM runs as another user), records the proxy's pid, and
//! sends the agent `EnableEgress` with the deployment's CA (`$EMBER_STATE/egress-ca`, made by
//! the first sandbox that needs it). Called again, it rewrites the policy and has the proxy
//! reload it (SIGHUP): new connections get it; the agent is sent `EnableEgress` again (a no-op
//! but for an agent that restarted meanwhile), and a proxy that died is started anew. The proxy
//! ends by itself once the sandbox's VMM is gone; `rm` and `stop` end it first.
//!
//! The proxy runs as this process's user, unjailed (see DESIGN.md, "Egress").

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egress::ca::Ca;
use egress::config::ProxyConfig;
use egress::policy::{Options, Policy};
use egress::secrets::SecretStore;
use serde::{Deserialize, Serialize};

use crate::error::io;
use crate::paths::{API_SOCKET, EGRESS_AUDIT, EGRESS_LOG, EGRESS_POLICY, VSOCK_SOCKET};
use crate::process::tail;
use crate::record::{vmm_serves, Record};
use crate::{SandboxError, Store};

/// The host vsock port the guest's egress goes to, and by default the guest loopback port
/// its forwarder listens on (the proxy variables name it): Squid's.
pub const EGRESS_PORT: u16 = 3128;
/// How long a proxy has to listen, and the agent to answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proxy told to end has before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What every sandbox's proxy is given, besides its policy.
#[derive(Debug, Clone)]
pub struct EgressSettings {
    /// The host's secrets that rules' `{NAME}` references resolve against: a JSON object of
    /// names to values in a file only its owner can read. (Not the environment: it would
    /// reach every VMM's.)
    pub secrets: Option<PathBuf>,
    /// PEM files of CA certificates the proxies trust for upstreams, besides Mozilla's roots.
    pub upstream_cas: Vec<PathBuf>,
    /// Lets sandboxes reach internal addresses (the host's loopback, private networks): for
    /// tests whose upstreams run on loopback, never for sandboxes of untrusted code.
    pub allow_internal: bool,
    /// The port the guest's forwarder listens on, on its loopback.
    pub guest_port: u16,
}

impl Default for EgressSettings {
    fn default() -> EgressSettings {
        EgressSettings { secrets: None, upstream_cas: Vec::new(), allow_internal: false, guest_port: EGRESS_PORT }
    }
}

/// A sandbox's egress proxy process, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressProxy {
    pub pid: i32,
    /// The socket it serves, which its command line names: how it is told from a process
    /// that took its pid later.
    pub socket: PathBuf,
    /// The guest loopback port the agent was told to forward (the store's setting then).
    pub guest_port: u16,
}

impl Store {
    /// Gives the sandboxes' proxies `settings`.
    pub fn with_egress(self, settings: EgressSettings) -> Self {
        Self { egress: settings, ..self }
    }

    /// Fails unless `config` compiles into a policy with this store's secrets: the check a
    /// command makes before it starts anything.
    pub fn check_egress(&self, config: &ProxyConfig) -> Result<(), SandboxError> {
        let secrets = match &self.egress.secrets {
            Some(path) => SecretStore::from_file(path).map_err(|e| SandboxError::EgressPolicy(e.to_string()))?,
            None => SecretStore::default(),
        };
        let options = Options { allow_internal: self.egress.allow_internal };
        Policy::compile(config, &secrets, options).map(drop).map_err(|e| SandboxError::EgressPolicy(e.to_string()))
    }

    /// Gives running sandbox `name` egress under `config`, or changes its policy for new
    /// connections if it has egress already (see the module).
    pub fn set_egress(&self, name: &str, config: &ProxyConfig) -> Result<Record, SandboxError> {
        self.check_egress(config)?;
        let mut record = self.ready_record(name)?;
        let dir = self.dir(name);
        if !record.vmm_alive(&dir) {
            return Err(SandboxError::NotRunning(name.into()));
        }
        write_policy(&dir.join(EGRESS_POLICY), config)?;
        let ca = Ca::load_or_create(&self.egress_ca_dir()).map_err(|e| SandboxError::EgressCa(e.to_string()))?;
        if let Some(proxy) = record.egress.as_ref().filter(|p| vmm_serves(p.pid, &p.socket)) {
            // SAFETY: plain kill(2) of the pid just checked to be this sandbox's proxy.
            unsafe { libc::kill(proxy.pid, libc::SIGHUP) };
            // Idempotent in a guest that has it; an agent that restarted since gets it again.
            self.enable_in_guest(name, &dir, proxy.guest_port, ca.cert_pem())?;
            return Ok(record);
        }
        let view = self.view_of(record.jail.as_deref());
        let socket = view.guest_port_socket(&dir.join(VSOCK_SOCKET), EGRESS_PORT.into());
        let enabled = self.spawn_proxy(name, &dir, &record, &socket, view.socket_group()).and_then(|pid| {
            let guest_port = self.egress.guest_port;
            record.egress = Some(EgressProxy { pid, socket, guest_port });
            record.write(&dir)?;
            self.enable_in_guest(name, &dir, guest_port, ca.cert_pem())
        });
        if let Err(e) = enabled {
            // No egress rather than half of it.
            self.stop_egress(&record);
            record.egress = None;
            let _ = record.write(&dir);
            let _ = std::fs::remove_file(dir.join(EGRESS_POLICY));
            return Err(e);
        }
        Ok(record)
    }

    /// Sandbox `name`'s egress policy, if it has been given one.
    pub fn egress_policy(&self, name: &str) -> Result<Option<ProxyConfig>, SandboxError> {
        self.record(name)?;
        read_policy(&self.dir(name).join(EGRESS_POLICY))
    }

    /// The file of sandbox `name`'s egress audit events (JSON lines), whether or not it exists
    /// yet.
    pub fn egress_audit(&self, name: &str) -> Result<PathBuf, SandboxError> {
        self.record(name)?;
        Ok(self.dir(name).join(EGRESS_AUDIT))
    }

    /// A sandbox restored from a copy that had egress (a snapshot directory's or a fork
    /// parent's `egress.json`, `policy`) gets it under the same policy; if it cannot, it is
    /// removed.
    pub(crate) fn carry_egress(&self, record: Record, policy: Option<ProxyConfig>) -> Result<Record, SandboxError> {
        let Some(policy) = policy else { return Ok(record) };
        self.set_egress(&record.name, &policy).inspect_err(|_| {
            let _ = self.remove(&record.name);
        })
    }

    /// Ends the sandbox's proxy if it runs: SIGTERM, then SIGKILL after a grace period.
    pub(crate) fn stop_egress(&self, record: &Record) {
        let Some(proxy) = &record.egress else { return };
        let alive = || vmm_serves(proxy.pid, &proxy.socket);
        if !alive() {
            return;
        }
        // SAFETY: plain kill(2) of the pid just checked to be this sandbox's proxy.
        unsafe { libc::kill(proxy.pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if alive() {
            // SAFETY: as above.
            unsafe { libc::kill(proxy.pid, libc::SIGKILL) };
        }
    }

    /// Starts sandbox `name`'s proxy on `socket` and returns its pid once it listens.
    fn spawn_proxy(&self, name: &str, dir: &Path, record: &Record, socket: &Path, group: Option<u32>) -> Result<i32, SandboxError> {
        let log_path = dir.join(EGRESS_LOG);
        let log = OpenOptions::new().create(true).append(true).mode(0o600).open(&log_path).map_err(io("cannot create", &log_path))?;
        let log_err = log.try_clone().map_err(io("cannot create", &log_path))?;
        let vmm_socket = record.vmm_socket.clone().unwrap_or_else(|| dir.join(API_SOCKET));
        let mut cmd = Command::new(&self.vmm_binary);
        cmd.arg("egress-proxy")
            .arg("--socket")
            .arg(socket)
            .arg("--policy")
            .arg(dir.join(EGRESS_POLICY))
            .arg("--audit")
            .arg(dir.join(EGRESS_AUDIT))
            .arg("--ca-dir")
            .arg(self.egress_ca_dir())
            .arg("--vmm-pid")
            .arg(record.pid.to_string())
            .arg("--vmm-socket")
            .arg(vmm_socket);
        if let Some(secrets) = &self.egress.secrets {
            cmd.arg("--secrets").arg(secrets);
        }
        for ca in &self.egress.upstream_cas {
            cmd.arg("--upstream-ca").arg(ca);
        }
        if self.egress.allow_internal {
            cmd.arg("--allow-internal");
        }
        if let Some(gid) = group {
            cmd.arg("--socket-group").arg(gid.to_string());
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        // SAFETY: the closure runs in the child between fork and exec and only calls setsid,
        // which is async-signal-safe and touches no memory: the proxy gets a session of its
        // own, so that it outlives this command and its terminal, as the VMM does.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            })
        };
        let mut child = cmd.spawn().map_err(|e| SandboxError::Spawn { binary: self.vmm_binary.clone(), reason: e.to_string() })?;
        let failed = |reason: String| SandboxError::EgressProxy { name: name.into(), reason, log: tail(&log_path, 20) };
        let deadline = Instant::now() + STEP_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failed(format!("exited at its start ({status})")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!("did not listen on {} within {STEP_TIMEOUT:?}", socket.display())));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = child.id() as i32;
        // Reaped when it ends, for a control plane that outlives it (`ember serve`); a command
        // that exits first leaves that to init.
        let _ = std::thread::Builder::new().name("egress-proxy".into()).spawn(move || child.wait());
        Ok(pid)
    }

    /// Has sandbox `name`'s agent forward its loopback port `guest_port` to the proxy and
    /// trust `ca_pem`.
    fn enable_in_guest(&self, name: &str, dir: &Path, guest_port: u16, ca_pem: &str) -> Result<(), SandboxError> {
        let failed = |error| SandboxError::EgressGuest { name: name.into(), error };
        let mut agent = agent_client::connect(&dir.join(VSOCK_SOCKET), agent_protocol::DEFAULT_PORT, STEP_TIMEOUT).map_err(failed)?;
        agent.set_read_timeout(Some(STEP_TIMEOUT)).map_err(|e| failed(e.into()))?;
        let config = agent_protocol::EgressConfig {
            listen_port: guest_port,
            host_port: EGRESS_PORT.into(),
            ca_pem: ca_pem.to_string(),
        };
        agent_client::enable_egress(&mut agent, &config).map_err(failed)
    }
}

/// Writes `config` to `path` whole (a temporary file renamed over it, 0600): a proxy that
/// reloads meanwhile reads the old policy or the new one.
pub(crate) fn write_policy(path: &Path, config: &ProxyConfig) -> Result<(), SandboxError> {
    let json = serde_json::to_vec_pretty(config).expect("a proxy_config serializes");
    let temporary = path.with_extension(format!("json.{}", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut f| f.write_all(&json));
    written.and_then(|()| std::fs::rename(&temporary, path)).map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        io("cannot write", path)(e)
    })
}

/// The policy in `path`, if there is one.
pub(crate) fn read_policy(path: &Path) -> Result<Option<ProxyConfig>, SandboxError> {
    match std::fs::read_to_string(path) {
        Ok(text) => ProxyConfig::from_json(&text)
            .map(Some)
            .map_err(|e| SandboxError::BadRecord { path: path.into(), reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("cannot read", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::record::Phase;

    /// A store whose "ember" is `script`, with sandbox `name` ready and a stand-in for its
    /// VMM: a shell whose command line names the sandbox's API socket, as `ember vmm` does.
    struct Sandbox {
        _tmp: vmm_sys_util::tempdir::TempDir,
        store: Store,
        vmm: std::process::Child,
    }

    impl Drop for Sandbox {
        fn drop(&mut self) {
            let _ = self.vmm.kill();
            let _ = self.vmm.wait();
        }
    }

    fn sandbox(name: &str, script: &str) -> Sandbox {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-egress-").unwrap();
        let ember = tmp.as_path().join("ember");
        std::fs::write(&ember, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&ember, std::fs::Permissions::from_mode(0o755)).unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), ember);
        let dir = store.dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join(API_SOCKET);
        // The trailing `:` keeps the shell from exec'ing sleep, so its argv stays in /proc.
        let vmm = Command::new("/bin/sh").args(["-c", "sleep 60; :", "sh"]).arg(&socket).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !vmm_serves(vmm.id() as i32, &socket) {
            assert!(Instant::now() < deadline, "the stand-in VMM did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let record = Record { pid: vmm.id() as i32, phase: Phase::Ready, starter: None, ..Record::starting(name).unwrap() };
        record.write(&dir).unwrap();
        Sandbox { _tmp: tmp, store, vmm }
    }

    fn allow(hosts: &[&str]) -> ProxyConfig {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        ProxyConfig::from_value(serde_json::json!({"access_control": {"allow_list": hosts}})).unwrap()
    }

    #[test]
    fn a_policy_that_does_not_compile_is_refused_before_anything_starts() {
        let s = sandbox("s", "exit 1");
        let both = ProxyConfig::from_value(serde_json::json!({"access_control": {"allow_list": ["a"], "deny_list": ["b"]}})).unwrap();
        let err = s.store.set_egress("s", &both).unwrap_err();
        assert!(matches!(err, SandboxError::EgressPolicy(_)) && err.to_string().contains("both an allow_list and a deny_list"), "{err}");
        let secret = ProxyConfig::from_value(serde_json::json!({"rules": [{
            "name": "gh", "match_hosts": ["api.github.com"],
            "headers": [{"name": "Authorization", "type": "workspace_secret", "value": "{GH_TOKEN}"}]
        }]}))
        .unwrap();
        let err = s.store.check_egress(&secret).unwrap_err();
        assert!(err.to_string().contains("GH_TOKEN"), "{err}");
        assert!(!s.store.dir("s").join(EGRESS_POLICY).exists(), "a refused policy was written");
        assert!(!s.store.egress_ca_dir().exists(), "a CA was made for a refused policy");
    }

    #[test]
    fn a_proxy_that_fails_at_its_start_fails_set_egress_with_its_log_and_leaves_no_egress() {
        let s = sandbox("s", "echo \"ember egress-proxy $*\" >&2; echo 'ember: error: cannot bind' >&2; exit 3");
        let err = s.store.set_egress("s", &allow(&["example.com"])).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SandboxError::EgressProxy { .. }), "{text}");
        assert!(text.contains("exited at its start") && text.contains("cannot bind"), "{text}");
        let dir = s.store.dir("s");
        // What it was started with: the socket beside the VMM's vsock socket, the files in the
        // sandbox's directory, the VMM it ends with.
        for arg in [
            format!("--socket {}", dir.join("vsock.sock_3128").display()),
            format!("--policy {}", dir.join(EGRESS_POLICY).display()),
            format!("--audit {}", dir.join(EGRESS_AUDIT).display()),
            format!("--ca-dir {}", s.store.egress_ca_dir().display()),
            format!("--vmm-pid {} --vmm-socket {}", s.vmm.id(), dir.join(API_SOCKET).display()),
        ] {
            assert!(text.contains(&arg), "{arg} not in {text}");
        }
        assert!(!text.contains("--allow-internal"), "{text}");
        let record = s.store.record("s").unwrap();
        assert_eq!(record.egress, None);
        assert!(!dir.join(EGRESS_POLICY).exists());
        assert!(s.store.egress_ca_dir().join(egress::ca::CERT_FILE).exists(), "the deployment's CA is made once, kept");
    }

    #[test]
    fn egress_needs_a_running_sandbox() {
        let mut s = sandbox("s", "exit 1");
        assert!(matches!(s.store.set_egress("nope", &allow(&["a"])), Err(SandboxError::NotFound(_))));
        s.vmm.kill().unwrap();
        s.vmm.wait().unwrap();
        assert!(matches!(s.store.set_egress("s", &allow(&["a"])), Err(SandboxError::NotRunning(_))));
        assert_eq!(s.store.egress_policy("s").unwrap(), None);
    }

    #[test]
    fn a_recorded_proxy_is_stopped_only_if_it_is_still_that_proxy() {
        let s = sandbox("s", "exit 1");
        let socket = s.store.dir("s").join("vsock.sock_3128");
        // A process that took a recorded pid later is not the proxy: its command line does not
        // name the socket.
        let mut other = Command::new("sleep").arg("60").spawn().unwrap();
        let proxy = |pid: u32, socket: &Path| Some(EgressProxy { pid: pid as i32, socket: socket.to_path_buf(), guest_port: EGRESS_PORT });
        let stranger = Record { egress: proxy(other.id(), &socket), ..s.store.record("s").unwrap() };
        s.store.stop_egress(&stranger);
        assert!(other.try_wait().unwrap().is_none(), "a process that is not the proxy was stopped");
        other.kill().unwrap();
        other.wait().unwrap();
        // The proxy itself ends at SIGTERM.
        let mut running = Command::new("/bin/sh").args(["-c", "sleep 60; :", "sh", "--socket"]).arg(&socket).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !vmm_serves(running.id() as i32, &socket) {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let record = Record { egress: proxy(running.id(), &socket), ..stranger };
        let start = Instant::now();
        s.store.stop_egress(&record);
        let status = running.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM));
        assert!(start.elapsed() < STOP_GRACE);
    }
}
