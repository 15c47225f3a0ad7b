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
pub mod jails;
mod lifecycle;
mod names;
pub mod paths;
mod process;
pub mod record;
mod snapshot;
mod spares;
pub mod template;

pub use error::SandboxError;

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
    /// Where its VMM allows backing files (its chain's directories).
    backing: disk::BackingPolicy,
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
    /// How VMMs are jailed; `None`: not at all (this process is not root).
    jail: Option<jails::JailSettings>,
    /// Directories besides `$EMBER_STATE` that backing files may lie under: the images
    /// directory, and what the user allowed (see [`Store::disk_policy`]).
    disk_dirs: Vec<PathBuf>,
}

impl Store {
    pub fn new(root: PathBuf, vmm_binary: PathBuf) -> Self {
        Self { root, vmm_binary, spare_vmms: 0, jail: None, disk_dirs: Vec::new() }
    }

    /// Jails the VMMs this store starts as `settings` say.
    pub fn with_jail(self, settings: Option<jails::JailSettings>) -> Self {
        Self { jail: settings, ..self }
    }

    /// Allows backing files under `dirs` too (those that do not exist are left out).
    pub fn with_disk_dirs(self, dirs: Vec<PathBuf>) -> Self {
        Self { disk_dirs: dirs, ..self }
    }

    /// Where the backing files of a sandbox's disk chain may lie, for its VMM and for this
    /// process: `$EMBER_STATE` (the sandboxes' overlays, templates, fork layers), the store's
    /// disk directories, and the directory of each file in `named`, files the user named
    /// explicitly (an `--image`, a snapshot's disk) or that ember recorded itself (a
    /// template's image), both as given and with symlinks resolved. Paths a layer's header
    /// names are never added: a copied or handed-over image could name any host file.
    pub(crate) fn disk_policy(&self, named: &[&std::path::Path]) -> Result<disk::BackingPolicy, SandboxError> {
        let mut policy = disk::BackingPolicy::default();
        let state = self.root.parent().map(PathBuf::from);
        let parents = named.iter().flat_map(|p| {
            let real = p.canonicalize().ok();
            [p.parent().map(PathBuf::from), real.and_then(|r| r.parent().map(PathBuf::from))]
        });
        for dir in state.into_iter().chain(self.disk_dirs.iter().cloned()).chain(parents.flatten()) {
            if dir.is_dir() {
                policy.allow(&dir)?;
            }
        }
        Ok(policy)
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

    /// Where the backing files of the sandbox's disk may lie: the directories its VMM was
    /// given, or for a record from before they were kept, as for a new sandbox on its image.
    pub(crate) fn record_policy(&self, record: &Record) -> Result<disk::BackingPolicy, SandboxError> {
        if record.disk_dirs.is_empty() {
            return self.disk_policy(&[&record.image]);
        }
        let dirs = record.disk_dirs.iter().filter(|d| d.is_dir());
        Ok(disk::BackingPolicy::new(dirs)?)
    }

    /// The backing chain of sandbox `name`'s disk, top first (for a sandbox still being made,
    /// which has no record yet, as far as the store's own directories go).
    pub(crate) fn sandbox_chain(&self, name: &str) -> Result<Vec<disk::overlay::LayerInfo>, SandboxError> {
        let backing = match self.record(name) {
            Ok(record) => self.record_policy(&record)?,
            Err(_) => self.disk_policy(&[])?,
        };
        Ok(disk::overlay::info(&self.dir(name).join(paths::OVERLAY), disk::Format::Qcow2, &backing)?)
    }

    /// The vsock socket through which the host reaches the sandbox's guest agent.
    pub fn vsock_socket(&self, name: &str) -> Result<PathBuf, SandboxError> {
        self.record(name)?;
        Ok(self.dir(name).join(VSOCK_SOCKET))
    }

    /// What sandbox `name`'s VMM sees of the host's files.
    pub(crate) fn view(&self, name: &str) -> Result<jails::View, SandboxError> {
        Ok(match self.record(name)?.jail {
            Some(root) => self.jail_at(&root),
            None => jails::View::Host,
        })
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
/// Makes an overlay `top` on `base` (its format from its name) for a test, as ember would.
#[cfg(test)]
pub(crate) fn test_overlay(base: &std::path::Path, top: &std::path::Path) {
    let policy = disk::BackingPolicy::new(["/tmp"]).unwrap();
    let format = disk::Format::from_extension(base).unwrap();
    disk::overlay::create(disk::overlay::Base { path: base, format, policy: &policy }, top).unwrap();
}

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
    fn backing_files_are_allowed_in_the_state_the_store_dirs_and_the_named_files_dirs() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let mk = |name: &str| {
            let d = dir.as_path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            d.canonicalize().unwrap()
        };
        let (state, images, user, real, other) = (mk("state"), mk("images"), mk("user"), mk("real"), mk("other"));
        std::fs::write(real.join("base.ext4"), b"").unwrap();
        std::os::unix::fs::symlink(real.join("base.ext4"), user.join("link.ext4")).unwrap();
        let store = Store::new(state.join("sandboxes"), PathBuf::from("/nonexistent/ember"))
            .with_disk_dirs(vec![images.clone(), dir.as_path().join("missing")]);
        let policy = store.disk_policy(&[&user.join("link.ext4")]).unwrap();
        assert_eq!(policy.dirs(), [state.clone(), images.clone(), user, real]);
        assert!(!policy.allows(&other.join("x.raw")));
        assert_eq!(store.disk_policy(&[]).unwrap().dirs(), [state, images]);
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
                jail: None,
                cgroup: None,
                disk_dirs: Vec::new(),
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
