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
//!
//! A start that never completed because its `ember` was killed (the record says `starting`,
//! its starter is gone) is found by the next command that meets it: its VMM is stopped, `ls`
//! shows it as `Failed` (and removes a hidden one), other commands refuse it, and `rm`
//! removes it (see `record`).
//!
//! A sandbox may have a lifetime (see `lifetime`): its VMM ends it on time, and the next
//! command that meets it removes its state (or `ls` shows it as `Expired`, if it is kept).
//!
//! A sandbox has no network. Given an egress policy (see `egress`), it reaches what the
//! policy allows through a proxy process of its own on the host.

mod cids;
pub mod egress;
mod error;
mod fork;
mod identity;
pub mod jails;
mod lifecycle;
pub mod lifetime;
mod limits;
mod names;
pub mod paths;
mod process;
pub mod record;
mod snapshot;
mod spares;
pub mod template;

pub use error::SandboxError;
pub use limits::{check_memory_step, HostLimits};
pub use snapshot::{MEMORY_FILE, SNAPSHOT_DISK};

use std::path::PathBuf;
use std::time::Duration;

use api::client::ApiClient;
use api::models::InstanceInfo;

use error::io;
use names::{check_existing_name, is_hidden};
use paths::{API_SOCKET, RECORD, VSOCK_SOCKET};
use record::{Record, StartState};

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
    /// The disk's size when larger than the image: the guest's root file system is grown to
    /// fill it, and the sandbox's overlay never grows past it.
    pub disk_gib: Option<u64>,
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
    origin: Option<record::Origin>,
}

/// A sandbox as `ember ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub record: Record,
    /// "Running", "Paused", "Stopped" when its VMM process is gone, "Starting" while an ember
    /// process starts it, "Failed" when that process died before the start completed,
    /// "Expired" when its lifetime is over (and its state kept).
    pub state: String,
}

/// What `ls` says of a start that will never complete.
const FAILED: &str = "Failed";

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
    /// What sandboxes are bounded by, when not this host's limits (see `limits`).
    limits: Option<HostLimits>,
    /// A bound on sandboxes' memory below the host's RAM.
    mem_cap_mib: Option<u64>,
    /// What the sandboxes' egress proxies are given (see `egress`).
    egress: egress::EgressSettings,
}

impl Store {
    pub fn new(root: PathBuf, vmm_binary: PathBuf) -> Self {
        Self {
            root,
            vmm_binary,
            spare_vmms: 0,
            jail: None,
            disk_dirs: Vec::new(),
            limits: None,
            mem_cap_mib: None,
            egress: egress::EgressSettings::default(),
        }
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

    /// The record of sandbox `name` if it is there to be used: its start completed, or it is
    /// this process's own, being started. A failed start's VMM is stopped on the way.
    pub(crate) fn ready_record(&self, name: &str) -> Result<Record, SandboxError> {
        let (record, state) = self.start_state(self.record(name)?);
        match state {
            StartState::Ready => match self.end_if_expired(&record) {
                Some(removed) => Err(SandboxError::Expired { name: name.into(), removed }),
                None => Ok(record),
            },
            StartState::Starting { by_this_process: true } => Ok(record),
            StartState::Starting { by_this_process: false } => {
                Err(SandboxError::Starting { name: name.into(), pid: record.starter.map_or(0, |s| s.pid) })
            }
            StartState::Failed => {
                self.stop_vmm(&record, &self.dir(name));
                Err(SandboxError::FailedStart { name: name.into(), pid: record.starter.map_or(0, |s| s.pid) })
            }
        }
    }

    /// The vsock socket through which the host reaches the sandbox's guest agent.
    pub fn vsock_socket(&self, name: &str) -> Result<PathBuf, SandboxError> {
        let dir = self.dir(name);
        // A dead VMM's socket refuses connections: say what that means.
        if !self.ready_record(name)?.vmm_alive(&dir) {
            return Err(SandboxError::NotRunning(name.into()));
        }
        Ok(dir.join(VSOCK_SOCKET))
    }

    /// What sandbox `name`'s VMM sees of the host's files.
    pub(crate) fn view(&self, name: &str) -> Result<jails::View, SandboxError> {
        Ok(self.view_of(self.record(name)?.jail.as_deref()))
    }

    pub fn api(&self, name: &str) -> ApiClient {
        ApiClient::new(self.dir(name).join(API_SOCKET))
    }

    /// The sandboxes, hidden ones left out; a hidden one whose command died making it or
    /// using it is removed (no one else can name it).
    pub fn list(&self) -> Result<Vec<Status>, SandboxError> {
        let mut all = self.list_all()?;
        all.retain(|s| {
            if s.state == lifetime::EXPIRED && s.record.lifetime.is_some_and(|l| !l.keep) {
                return false;
            }
            if !is_hidden(&s.record.name) {
                return true;
            }
            if s.state == FAILED {
                self.teardown(&s.record.name, &self.dir(&s.record.name));
            }
            false
        });
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

    /// Where `record`'s start stands. A start that looks failed is read again: its starter
    /// may have recorded it complete and exited since the record was read.
    fn start_state(&self, record: Record) -> (Record, StartState) {
        let state = record.start_state();
        if state != StartState::Failed {
            return (record, state);
        }
        match self.record(&record.name) {
            Ok(again) => {
                let state = again.start_state();
                (again, state)
            }
            Err(_) => (record, state),
        }
    }

    fn status(&self, record: Record) -> Status {
        let dir = self.dir(&record.name);
        let (record, state) = self.start_state(record);
        let state = match state {
            StartState::Starting { .. } => "Starting".to_string(),
            StartState::Failed => {
                self.stop_vmm(&record, &dir);
                FAILED.to_string()
            }
            StartState::Ready if self.end_if_expired(&record).is_some() => lifetime::EXPIRED.to_string(),
            StartState::Ready => self.ready_state(&record, &dir),
        };
        Status { record, state }
    }

    /// The state of a sandbox whose start completed, as its VMM says.
    fn ready_state(&self, record: &Record, dir: &std::path::Path) -> String {
        if !record.vmm_alive(dir) {
            "Stopped".to_string()
        } else {
            match ApiClient::new(dir.join(API_SOCKET)).get::<InstanceInfo>("/") {
                Ok(info) => serde_json::to_value(info.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                Err(_) => "Unresponsive".to_string(),
            }
        }
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
    use std::path::Path;

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
    fn a_sandbox_whose_vmm_died_is_not_running_and_an_unknown_one_points_at_ls() {
        let o = orphan("gone");
        let record = Record { pid: i32::MAX, phase: record::Phase::Ready, starter: None, ..Record::starting("gone").unwrap() };
        record.write(&o.store.dir("gone")).unwrap();
        assert_eq!(
            o.store.vsock_socket("gone").unwrap_err().to_string(),
            "sandbox gone is not running: its VMM has exited (`ember rm gone` removes what is left)"
        );
        let alive = Record { pid: o.vmm.id() as i32, ..record };
        alive.write(&o.store.dir("gone")).unwrap();
        assert_eq!(o.store.vsock_socket("gone").unwrap(), o.store.dir("gone").join(VSOCK_SOCKET));
        assert_eq!(o.store.vsock_socket("nosuch").unwrap_err().to_string(), "there is no sandbox named nosuch (`ember ls` lists them)");
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
                phase: crate::record::Phase::Ready,
                starter: None,
                lifetime: None,
                origin: None,
                egress: None,
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
            disk_gib: None,
            ready_timeout: Duration::from_secs(1),
        };
        let err = store.start(&spec).unwrap_err();
        assert!(err.to_string().contains("missing-base.ext4"), "{err}");
        assert!(!store.dir("t1").exists());
        let long = Store::new(dir.as_path().join("x".repeat(120)), PathBuf::from("/nonexistent/ember"));
        assert!(matches!(long.start(&spec), Err(SandboxError::PathTooLong(_))));
    }

    /// A store with sandbox `name`'s directory, and a stand-in for its VMM: a shell whose
    /// command line names the sandbox's API socket, as `ember vmm` started for it does.
    struct Orphan {
        _tmp: vmm_sys_util::tempdir::TempDir,
        store: Store,
        vmm: std::process::Child,
    }

    fn orphan(name: &str) -> Orphan {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from("/bin/sh"));
        std::fs::create_dir_all(store.dir(name)).unwrap();
        let socket = store.dir(name).join(API_SOCKET);
        // The trailing `:` keeps the shell from exec'ing sleep, so its argv stays in /proc.
        let vmm = std::process::Command::new("/bin/sh").args(["-c", "sleep 60; :", "sh"]).arg(&socket).spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !record::vmm_serves(vmm.id() as i32, &socket) {
            assert!(std::time::Instant::now() < deadline, "the stand-in VMM did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Orphan { _tmp: tmp, store, vmm }
    }

    impl Orphan {
        /// Writes sandbox `name`'s record: `starting`, by `starter`; the VMM's pid recorded
        /// unless `pid_known` is false (a start killed before it wrote it).
        fn starting(&self, name: &str, starter: Option<record::Starter>, pid_known: bool) {
            let record = Record {
                pid: if pid_known { self.vmm.id() as i32 } else { 0 },
                cid: 3,
                image: "/i".into(),
                mem_mib: 256,
                vcpus: 1,
                starter,
                ..Record::starting(name).unwrap()
            };
            record.write(&self.store.dir(name)).unwrap();
        }

        /// Whether the stand-in VMM was killed (waited for, 5 s at most).
        fn vmm_killed(&mut self) -> bool {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(status) = self.vmm.try_wait().unwrap() {
                    return std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL);
                }
                if std::time::Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        fn state(&self, name: &str) -> String {
            let all = self.store.list_all().unwrap();
            all.into_iter().find(|s| s.record.name == name).map(|s| s.state).unwrap_or_else(|| "absent".into())
        }
    }

    impl Drop for Orphan {
        fn drop(&mut self) {
            let _ = self.vmm.kill();
            let _ = self.vmm.wait();
        }
    }

    /// A process that lived and is gone: a starter killed during the start.
    fn dead_starter() -> record::Starter {
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let starter = record::Starter::of(child.id() as i32).expect("a live process has a start time");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!starter.alive());
        starter
    }

    #[test]
    fn a_start_whose_starter_died_is_failed_its_vmm_stopped_and_rm_removes_it() {
        let mut o = orphan("orphan");
        o.starting("orphan", Some(dead_starter()), true);
        assert_eq!(o.state("orphan"), "Failed");
        assert!(o.vmm_killed(), "ls left the orphan VMM running");
        assert_eq!(o.state("orphan"), "Failed", "it stays failed, never running");
        let err = o.store.vsock_socket("orphan").unwrap_err();
        assert!(matches!(err, SandboxError::FailedStart { .. }) && err.to_string().contains("ember rm orphan"), "{err}");
        o.store.remove("orphan").unwrap();
        assert!(!o.store.dir("orphan").exists());
    }

    #[test]
    fn a_failed_start_is_stopped_by_any_lookup_even_before_its_vmm_pid_was_recorded() {
        let mut o = orphan("early");
        o.starting("early", Some(dead_starter()), false);
        assert!(matches!(o.store.snapshot("early", Path::new("/nonexistent")), Err(SandboxError::FailedStart { .. })));
        assert!(o.vmm_killed(), "the VMM was found by its socket and stopped");
        // A starter's pid taken by a later process is no starter.
        let me = record::Starter::this_process().unwrap();
        let recycled = record::Starter { start_time: me.start_time + 1, ..me };
        o.starting("early", Some(recycled), false);
        assert_eq!(o.state("early"), "Failed");
        o.starting("early", None, false);
        assert_eq!(o.state("early"), "Failed", "a start with no starter recorded");
    }

    #[test]
    fn a_start_under_way_is_starting_and_left_alone() {
        let mut o = orphan("young");
        let mut starter_process = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let starter = record::Starter::of(starter_process.id() as i32).unwrap();
        o.starting("young", Some(starter), true);
        assert_eq!(o.state("young"), "Starting");
        let err = o.store.vsock_socket("young").unwrap_err();
        assert!(matches!(err, SandboxError::Starting { .. }), "{err}");
        assert!(o.vmm.try_wait().unwrap().is_none(), "the VMM of a start under way was stopped");
        // This process's own start is its to use.
        o.starting("young", Some(record::Starter::this_process().unwrap()), true);
        o.store.vsock_socket("young").unwrap();
        // Once its starter is killed, it is a failed start.
        o.starting("young", Some(starter), true);
        starter_process.kill().unwrap();
        starter_process.wait().unwrap();
        assert_eq!(o.state("young"), "Failed");
        assert!(o.vmm_killed());
    }

    #[test]
    fn a_sandbox_met_after_its_lifetime_is_stopped_and_removed_or_kept() {
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let ready = |o: &Orphan, name: &str, lifetime| {
            std::fs::create_dir_all(o.store.dir(name)).unwrap();
            let record = Record {
                pid: o.vmm.id() as i32,
                phase: record::Phase::Ready,
                starter: None,
                lifetime: Some(lifetime),
                ..Record::starting(name).unwrap()
            };
            record.write(&o.store.dir(name)).unwrap();
        };
        let mut o = orphan("long");
        ready(&o, "long", lifetime::Lifetime { ends_unix_ms: now_ms + 600_000, keep: false });
        assert_ne!(o.state("long"), "Expired");
        o.store.vsock_socket("long").expect("a sandbox within its lifetime is there to use");
        assert!(o.vmm.try_wait().unwrap().is_none());

        ready(&o, "long", lifetime::Lifetime { ends_unix_ms: now_ms - 1, keep: false });
        let err = o.store.vsock_socket("long").unwrap_err();
        assert!(matches!(err, SandboxError::Expired { removed: true, .. }) && err.to_string().contains("--ttl"), "{err}");
        assert!(o.vmm_killed(), "the VMM of an expired sandbox was left running");
        assert!(!o.store.dir("long").exists(), "the state of an expired sandbox was kept");
        assert!(matches!(o.store.record("long"), Err(SandboxError::NotFound(_))));

        let o = orphan("kept");
        ready(&o, "kept", lifetime::Lifetime { ends_unix_ms: now_ms - 1, keep: true });
        assert_eq!(o.state("kept"), "Expired");
        assert!(o.store.list().unwrap().iter().any(|s| s.record.name == "kept" && s.state == "Expired"));
        assert!(o.store.dir("kept").join(RECORD).exists(), "a kept state was removed");
        let err = o.store.vsock_socket("kept").unwrap_err();
        assert!(matches!(err, SandboxError::Expired { removed: false, .. }) && err.to_string().contains("ember rm"), "{err}");
        o.store.remove("kept").unwrap();

        let o = orphan("gone");
        ready(&o, "gone", lifetime::Lifetime { ends_unix_ms: now_ms - 1, keep: false });
        assert!(o.store.list().unwrap().is_empty(), "ls shows a sandbox whose lifetime is over");
        assert!(!o.store.dir("gone").exists(), "ls leaves an expired sandbox's state");
    }

    #[test]
    fn leftovers_of_killed_starts_are_cleaned() {
        let o = orphan(".sb-0badc0de");
        o.starting(".sb-0badc0de", Some(dead_starter()), true);
        assert!(o.store.list().unwrap().is_empty());
        assert!(!o.store.dir(".sb-0badc0de").exists(), "ls removes a hidden sandbox whose command died");
        // Killed between making the directory and writing the first record.
        std::fs::create_dir_all(o.store.dir("bare")).unwrap();
        o.store.remove("bare").unwrap();
        assert!(!o.store.dir("bare").exists());
        // Records from before phases were kept are ready ones.
        let old = br#"{"name":"old","pid":0,"cid":3,"image":"/i","mem_mib":256,"vcpus":1,"created":1}"#;
        std::fs::create_dir_all(o.store.dir("old")).unwrap();
        std::fs::write(o.store.dir("old").join(RECORD), old).unwrap();
        assert_eq!(o.store.record("old").unwrap().phase, record::Phase::Ready);
        assert_eq!(o.state("old"), "Stopped");
    }
}
