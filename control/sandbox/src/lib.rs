//! Sandboxes: VMs that run in the background, one VMM process each, found by name.
//!
//! A sandbox lives in a state directory `<root>/<name>/` holding its record (`sandbox.json`),
//! its API socket, its vsock socket, its copy-on-write overlay over the base image, and the
//! guest console's and the VMM's logs. Starting one creates the overlay, spawns `ember vmm`
//! and configures and starts it through its API, exactly as any control plane would; the
//! sandbox is ready when its guest agent answers, and has been given its own identity.
//!
//! A name with a leading '.' is a hidden sandbox: one that a command makes for its own use
//! (the one a template is made from). `ls` leaves it out, and its VMM dies with the command.

mod cids;
mod error;
mod fork;
mod identity;
mod lifecycle;
mod limits;
mod names;
pub mod paths;
mod process;
pub mod record;
mod snapshot;
mod spares;
pub mod template;

pub use error::SandboxError;
pub use limits::HostLimits;

use std::path::PathBuf;
use std::time::Duration;

use api::client::ApiClient;
use api::models::InstanceInfo;

use error::io;
use names::{check_existing_name, is_hidden};
use paths::{API_SOCKET, RECORD, VSOCK_SOCKET};
use record::Record;

/// What to start.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub name: Option<String>,
    pub kernel: PathBuf,
    pub image: PathBuf,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Appended to the kernel command line.
    pub boot_args: Option<String>,
    /// How long the guest agent has to answer after the VM starts.
    pub ready_timeout: Duration,
}

/// What a sandbox's record says of its machine.
struct Shape {
    image: PathBuf,
    mem_mib: u64,
    vcpus: u8,
    cid: u32,
    /// For a restore or a fork: how long the guest agent had been running when its snapshot
    /// was taken. The restored agent, the same process going on, answers with at least that
    /// uptime; a smaller one is some other guest state (a restarted agent, a rebooted guest).
    resumes_agent_ms: Option<u64>,
}

/// A sandbox as `ember ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub record: Record,
    /// "Running", "Paused", or "Stopped" when its VMM process is gone.
    pub state: String,
}

pub struct Store {
    root: PathBuf,
    /// The `ember` binary, which is also the VMM.
    vmm_binary: PathBuf,
    /// How many spare VMMs sandbox starts keep (see `spares`).
    spare_vmms: usize,
    /// What sandboxes are bounded by, when not this host's limits (see `limits`).
    limits: Option<HostLimits>,
    /// A bound on sandboxes' memory below the host's RAM.
    mem_cap_mib: Option<u64>,
}

impl Store {
    pub fn new(root: PathBuf, vmm_binary: PathBuf) -> Self {
        Self { root, vmm_binary, spare_vmms: 0, limits: None, mem_cap_mib: None }
    }

    /// The sandbox's record, if `name` exists.
    pub fn record(&self, name: &str) -> Result<Record, SandboxError> {
        check_existing_name(name)?;
        let path = self.dir(name).join(RECORD);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SandboxError::NotFound(name.into())),
            Err(e) => return Err(io("cannot read", &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| SandboxError::BadRecord { path, reason: e.to_string() })
    }

    /// The vsock socket through which the host reaches the sandbox's guest agent.
    pub fn vsock_socket(&self, name: &str) -> Result<PathBuf, SandboxError> {
        self.record(name)?;
        Ok(self.dir(name).join(VSOCK_SOCKET))
    }

    pub fn api(&self, name: &str) -> ApiClient {
        ApiClient::new(self.dir(name).join(API_SOCKET))
    }

    /// The sandboxes, hidden ones left out.
    pub fn list(&self) -> Result<Vec<Status>, SandboxError> {
        let mut all = self.list_all()?;
        all.retain(|s| !is_hidden(&s.record.name));
        Ok(all)
    }

    fn list_all(&self) -> Result<Vec<Status>, SandboxError> {
        let mut out: Vec<Status> = self.records()?.into_iter().map(|r| self.status(r)).collect();
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    /// Every sandbox's record, hidden ones included.
    fn records(&self) -> Result<Vec<Record>, SandboxError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("cannot list", &self.root)(e)),
        };
        Ok(entries.flatten().filter_map(|e| self.record(&e.file_name().to_string_lossy()).ok()).collect())
    }

    fn status(&self, record: Record) -> Status {
        let dir = self.dir(&record.name);
        let state = if !record.vmm_alive(&dir) {
            "Stopped".to_string()
        } else {
            match ApiClient::new(dir.join(API_SOCKET)).get::<InstanceInfo>("/") {
                Ok(info) => serde_json::to_value(info.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                Err(_) => "Unresponsive".to_string(),
            }
        };
        Status { record, state }
    }

}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_sandboxes_and_an_empty_store() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let store = Store::new(dir.as_path().join("sandboxes"), PathBuf::from("/nonexistent/ember"));
        assert!(store.list().unwrap().is_empty());
        assert!(matches!(store.remove("nope"), Err(SandboxError::NotFound(_))));
        assert!(matches!(store.vsock_socket("nope"), Err(SandboxError::NotFound(_))));
    }

    #[test]
    fn hidden_sandboxes_are_left_out_of_ls_but_found_by_name() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let store = Store::new(dir.as_path().join("sandboxes"), PathBuf::from("/nonexistent/ember"));
        for name in ["shown", ".sb-0123abcd"] {
            let image = "/i".into();
            let record = Record {
                name: name.into(),
                pid: i32::MAX,
                cid: 3,
                image,
                mem_mib: 256,
                vcpus: 1,
                created: 1,
                vmm_socket: None,
            };
            std::fs::create_dir_all(store.dir(name)).unwrap();
            std::fs::write(store.dir(name).join(RECORD), serde_json::to_vec(&record).unwrap()).unwrap();
        }
        let names: Vec<String> = store.list().unwrap().into_iter().map(|s| s.record.name).collect();
        assert_eq!(names, ["shown"]);
        assert_eq!(store.list_all().unwrap().len(), 2);
        assert!(matches!(store.check_new_name(".sb-0123abcd"), Err(SandboxError::BadName(_))));
        assert!(matches!(store.check_new_name("shown"), Err(SandboxError::Exists(_))));
        store.check_new_name("free").unwrap();
        assert!(matches!(store.record("..sb"), Err(SandboxError::BadName(_))));
        store.remove(".sb-0123abcd").unwrap();
        assert!(!store.dir(".sb-0123abcd").exists());
    }

    #[test]
    fn a_failed_start_leaves_nothing_behind() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let store = Store::new(dir.as_path().join("sandboxes"), PathBuf::from("/nonexistent/ember"));
        let spec = SandboxSpec {
            name: Some("t1".into()),
            kernel: PathBuf::from("/nonexistent/vmlinux"),
            image: dir.as_path().join("missing-base.ext4"),
            mem_mib: 128,
            vcpus: 1,
            boot_args: None,
            ready_timeout: Duration::from_secs(1),
        };
        let err = store.start(&spec).unwrap_err();
        assert!(err.to_string().contains("missing-base.ext4"), "{err}");
        assert!(!store.dir("t1").exists());
        let long = Store::new(dir.as_path().join("x".repeat(120)), PathBuf::from("/nonexistent/ember"));
        assert!(matches!(long.start(&spec), Err(SandboxError::PathTooLong(_))));
    }
}
