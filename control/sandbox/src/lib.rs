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

mod fork;
mod identity;
pub mod record;
mod snapshot;
mod spares;
pub mod template;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use record::{Record, API_SOCKET, CONSOLE_LOG, METRICS, OVERLAY, RECORD, VMM_LOG, VSOCK_SOCKET};

use api::client::{ApiClient, ApiClientError};
use api::models::{
    ActionType, BootSource, Drive, InstanceActionInfo, InstanceInfo, InstanceState, MachineConfig, Metrics,
    MetricsConfig, Vm, VmState, Vsock,
};
use disk::{overlay, DiskError};

/// Longest Unix socket path (sun_path holds 108 bytes with the NUL), less room for the
/// `_PORT` suffix of guest-initiated vsock connections.
const MAX_SOCKET_PATH: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("'{0}' is not a valid name: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadName(String),
    #[error("a sandbox named {0} already exists")]
    Exists(String),
    #[error("there is no sandbox named {0}")]
    NotFound(String),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the sandbox state directory {0} is too long for Unix socket paths; set EMBER_STATE to a shorter directory")]
    PathTooLong(PathBuf),
    #[error("the sandbox record {path} is unreadable: {reason}")]
    BadRecord { path: PathBuf, reason: String },
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Api(#[from] ApiClientError),
    #[error("the VMM of sandbox {name} exited during start-up ({how}); its log says:\n{log}\nthe guest console's last lines:\n{console}")]
    VmmDied { name: String, how: String, log: String, console: String },
    #[error("{0} already holds a snapshot")]
    SnapshotExists(PathBuf),
    #[error(transparent)]
    Snapshot(#[from] api::snapshot_meta::MetaError),
    #[error("sandbox {0} is not running")]
    NotRunning(String),
    #[error("a thread starting a forked sandbox panicked")]
    ForkPanicked,
    #[error("sandbox {name}: {what} within {secs} s; the guest console's last lines:\n{console}")]
    NotReady { name: String, what: &'static str, secs: u64, console: String },
    #[error("sandbox {name}: cannot give the guest its own identity: {source}")]
    Identity { name: String, source: agent_client::ClientError },
    #[error("cannot get random bytes from the host kernel: {0}")]
    HostRandom(std::io::Error),
    #[error("a template named {0} already exists")]
    TemplateExists(String),
    #[error("there is no template named {0} (`ember template ls` lists them)")]
    TemplateNotFound(String),
    #[error("template {name} is in use by sandbox {users}: remove those first")]
    TemplateInUse { name: String, users: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError {
    let path = path.to_path_buf();
    move |source| SandboxError::Io { what, path, source }
}

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
}

/// A sandbox as `ember ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub record: Record,
    /// "Running", "Paused", or "Stopped" when its VMM process is gone.
    pub state: String,
}

/// A sandbox's VMM process while the sandbox starts: spawned by this process, or a spare
/// taken over (some earlier ember's child).
enum VmmProcess {
    Child(std::process::Child),
    Adopted(spares::Adopted),
}

impl VmmProcess {
    fn pid(&self) -> i32 {
        match self {
            VmmProcess::Child(child) => child.id() as i32,
            VmmProcess::Adopted(spare) => spare.pid,
        }
    }

    /// How the VMM ended, if it has: a silent death (no log) is told apart from an error
    /// exit by its signal.
    fn exited(&mut self) -> Option<String> {
        match self {
            VmmProcess::Child(child) => child.try_wait().ok().flatten().map(|status| {
                use std::os::unix::process::ExitStatusExt;
                match status.signal() {
                    Some(signal) => format!("killed by signal {signal}"),
                    None => status.to_string(),
                }
            }),
            VmmProcess::Adopted(spare) => (!record::vmm_serves(spare.pid, &spare.started_as))
                .then(|| format!("process {} is gone", spare.pid)),
        }
    }
}

pub struct Store {
    root: PathBuf,
    /// The `ember` binary, which is also the VMM.
    vmm_binary: PathBuf,
    /// How many spare VMMs sandbox starts keep (see `spares`).
    spare_vmms: usize,
}

fn check_name(name: &str) -> Result<(), SandboxError> {
    let ok = (1..=63).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok { Ok(()) } else { Err(SandboxError::BadName(name.to_string())) }
}

/// A name as `check_name` takes it, or the same with a leading '.' (a hidden sandbox).
fn check_existing_name(name: &str) -> Result<(), SandboxError> {
    check_name(name.strip_prefix('.').unwrap_or(name)).map_err(|_| SandboxError::BadName(name.to_string()))
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Eight hex digits, for names that must not collide.
fn random_hex() -> String {
    let mut bytes = [0u8; 4];
    if identity::host_random(&mut bytes).is_err() {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        bytes = (nanos ^ std::process::id()).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_name() -> String {
    format!("sb-{}", random_hex())
}

/// The tail of a log file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Store {
    /// `$EMBER_STATE/sandboxes`, else `$XDG_STATE_HOME/ember/sandboxes`, else
    /// `~/.local/state/ember/sandboxes`.
    pub fn default_root() -> PathBuf {
        let env = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let base = env("EMBER_STATE")
            .or_else(|| env("XDG_STATE_HOME").map(|p| p.join("ember")))
            .or_else(|| env("HOME").map(|p| p.join(".local/state/ember")))
            .unwrap_or_else(|| PathBuf::from("/tmp/ember-state"));
        base.join("sandboxes")
    }

    pub fn new(root: PathBuf, vmm_binary: PathBuf) -> Self {
        Self { root, vmm_binary, spare_vmms: 0 }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
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

    /// Starts a sandbox and returns once its guest agent answers.
    pub fn start(&self, spec: &SandboxSpec) -> Result<Record, SandboxError> {
        self.create(spec.name.clone(), |name, dir| self.boot(name, dir, spec))
    }

    /// Boots a hidden sandbox as `spec` says (whatever name it gives) for this process's own
    /// use; its VMM dies with this process's thread that called this.
    fn start_hidden(&self, spec: &SandboxSpec) -> Result<Record, SandboxError> {
        self.create_as(format!(".{}", random_name()), |name, dir| self.boot(name, dir, spec))
    }

    /// Fails unless `name` is a valid name that no sandbox has (yet): a check before slow
    /// work whose only purpose is to start a sandbox by that name.
    fn check_new_name(&self, name: &str) -> Result<(), SandboxError> {
        check_name(name)?;
        match self.dir(name).exists() {
            true => Err(SandboxError::Exists(name.to_string())),
            false => Ok(()),
        }
    }

    /// Makes the state directory of a new sandbox and runs `make` in it; a failure leaves
    /// nothing behind.
    fn create(
        &self,
        name: Option<String>,
        make: impl FnOnce(&str, &Path) -> Result<Record, SandboxError>,
    ) -> Result<Record, SandboxError> {
        let name = name.unwrap_or_else(random_name);
        check_name(&name)?;
        self.create_as(name, make)
    }

    fn create_as(
        &self,
        name: String,
        make: impl FnOnce(&str, &Path) -> Result<Record, SandboxError>,
    ) -> Result<Record, SandboxError> {
        let dir = self.dir(&name);
        if dir.join(VSOCK_SOCKET).as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SandboxError::PathTooLong(self.root.clone()));
        }
        std::fs::create_dir_all(&self.root).map_err(io("cannot create", &self.root))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(SandboxError::Exists(name)),
            Err(e) => return Err(io("cannot create", &dir)(e)),
        }
        let result = make(&name, &dir);
        if result.is_err() {
            self.teardown(&name, &dir);
        }
        result
    }

    fn boot(&self, name: &str, dir: &Path, spec: &SandboxSpec) -> Result<Record, SandboxError> {
        let overlay_path = dir.join(OVERLAY);
        overlay::create(&spec.image, &overlay_path)?;
        let cid = self.reserve_cid(name)?;
        let shape = Shape { image: spec.image.clone(), mem_mib: spec.mem_mib, vcpus: spec.vcpus, cid };
        self.launch(name, dir, shape, spec.ready_timeout, |api| {
            api.put(
                "/boot-source",
                &BootSource {
                    kernel_image_path: spec.kernel.display().to_string(),
                    // Headless: no shell on a console that only goes to a log (ember-init).
                    boot_args: Some(format!(
                        "init=/sbin/ember-init ember_headless{}",
                        spec.boot_args.as_deref().map(|a| format!(" {a}")).unwrap_or_default()
                    )),
                    initrd_path: None,
                },
            )?;
            api.put(
                "/machine-config",
                &MachineConfig { vcpu_count: spec.vcpus, mem_size_mib: spec.mem_mib, ..Default::default() },
            )?;
            api.put(
                "/drives/rootfs",
                &Drive {
                    drive_id: "rootfs".into(),
                    path_on_host: overlay_path.display().to_string(),
                    is_root_device: true,
                    is_read_only: false,
                    partuuid: None,
                    cache_type: None,
                    io_engine: None,
                    rate_limiter: None,
                },
            )?;
            api.put("/vsock", &Vsock { guest_cid: cid, uds_path: dir.join(VSOCK_SOCKET).display().to_string(), vsock_id: None })?;
            api.put("/actions", &InstanceActionInfo { action_type: ActionType::InstanceStart })
        })
    }

    /// Spawns the sandbox's VMM, writes its record, has `configure` set it going through its
    /// API, waits until its guest agent answers, and gives the guest its own identity.
    fn launch(
        &self,
        name: &str,
        dir: &Path,
        shape: Shape,
        ready_timeout: Duration,
        configure: impl FnOnce(&ApiClient) -> Result<(), ApiClientError>,
    ) -> Result<Record, SandboxError> {
        let api_socket = dir.join(API_SOCKET);
        let started = Instant::now();
        // A hidden sandbox's VMM must die with this process, which a spare cannot promise.
        let adopted = if is_hidden(name) { None } else { self.adopt_spare(dir) };
        let mut vmm = match adopted {
            Some(spare) => {
                tracing::debug!("sandbox {name}: took over spare VMM {}", spare.pid);
                VmmProcess::Adopted(spare)
            }
            None => VmmProcess::Child(self.spawn_vmm(name, dir, is_hidden(name))?),
        };
        let record = Record {
            name: name.to_string(),
            pid: vmm.pid(),
            cid: shape.cid,
            image: shape.image,
            mem_mib: shape.mem_mib,
            vcpus: shape.vcpus,
            created: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs(),
            vmm_socket: match &vmm {
                VmmProcess::Adopted(spare) => Some(spare.started_as.clone()),
                VmmProcess::Child(_) => None,
            },
        };
        let record_path = dir.join(RECORD);
        let json = serde_json::to_vec_pretty(&record).map_err(|e| SandboxError::BadRecord {
            path: record_path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&record_path, json).map_err(io("cannot write", &record_path))?;

        let died = |vmm: &mut VmmProcess| -> Option<SandboxError> {
            vmm.exited().map(|how| SandboxError::VmmDied {
                name: name.to_string(),
                how,
                log: tail(&dir.join(VMM_LOG), 20),
                console: tail(&dir.join(CONSOLE_LOG), 20),
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&api_socket).is_err() {
            if let Some(e) = died(&mut vmm) {
                return Err(e);
            }
            if Instant::now() > deadline {
                return Err(SandboxError::NotReady {
                    name: name.into(),
                    what: "the VMM's API socket did not appear",
                    secs: 10,
                    console: tail(&dir.join(VMM_LOG), 20),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }

        tracing::debug!("sandbox {name}: API socket up {:?} into the start", started.elapsed());
        let api = ApiClient::new(&api_socket);
        let metrics = MetricsConfig { metrics_path: dir.join(METRICS).display().to_string() };
        if let Err(e) = api.put("/metrics", &metrics).and_then(|()| configure(&api)) {
            return Err(died(&mut vmm).unwrap_or(e.into()));
        }

        // In short rounds, so that a VMM that dies is noticed at once.
        tracing::debug!("sandbox {name}: VM configured and started {:?} into the start", started.elapsed());
        let deadline = Instant::now() + ready_timeout;
        loop {
            let round = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(1));
            match agent_client::wait_ready(&dir.join(VSOCK_SOCKET), agent_protocol::DEFAULT_PORT, round) {
                Ok((_, mut agent)) => {
                    tracing::debug!("sandbox {name}: agent ready {:?} into the start", started.elapsed());
                    identity::fix(&mut agent, name).map_err(|e| died(&mut vmm).unwrap_or(e))?;
                    tracing::debug!("sandbox {name}: identity set {:?} into the start", started.elapsed());
                    // Only now: a spare getting ready while the guest does would slow it down.
                    // A hidden sandbox is some command's scratch, made before those it serves.
                    if !is_hidden(name) {
                        if let Err(e) = self.refill_spares() {
                            tracing::warn!("cannot start a spare VMM: {e}");
                        }
                    }
                    return Ok(record);
                }
                Err(e @ agent_client::ClientError::NotReady { .. }) if Instant::now() < deadline => {
                    tracing::debug!("sandbox {name}: {e}");
                }
                Err(e) => {
                    tracing::debug!("sandbox {name}: {e}");
                    return Err(died(&mut vmm).unwrap_or_else(|| SandboxError::NotReady {
                        name: name.into(),
                        what: "the guest agent did not answer",
                        secs: ready_timeout.as_secs(),
                        console: tail(&dir.join(CONSOLE_LOG), 20),
                    }));
                }
            }
            if let Some(e) = died(&mut vmm) {
                return Err(e);
            }
        }
    }

    /// Starts a VMM process named `id` serving `dir`/api.sock, its console and log in `dir`;
    /// in its own session, so that it outlives the terminal and the command that started it,
    /// unless `tied` (a hidden sandbox's, that command's scratch): then it dies with this
    /// process even if that is killed.
    fn spawn_vmm(&self, id: &str, dir: &Path, tied: bool) -> Result<std::process::Child, SandboxError> {
        let console = std::fs::File::create(dir.join(CONSOLE_LOG)).map_err(io("cannot create", dir))?;
        let log = std::fs::File::create(dir.join(VMM_LOG)).map_err(io("cannot create", dir))?;
        let mut command = Command::new(&self.vmm_binary);
        command
            .arg("vmm")
            .arg("--api-sock")
            .arg(dir.join(API_SOCKET))
            .arg("--id")
            .arg(id)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(log);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: setsid, prctl and getppid are async-signal-safe and touch no memory of the
        // parent; the error is made without allocating.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                libc::setsid();
                if tied {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    // The parent may have died before the prctl, unnoticed by it.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                }
                Ok(())
            });
        }
        tracing::debug!("{id}: spawning the VMM");
        command.spawn().map_err(io("cannot start the VMM", &self.vmm_binary))
    }

    /// Runs `f` with sandbox `name`'s VM paused, then resumes it, whatever `f` returned; a
    /// sandbox that was paused already stays paused.
    fn while_paused<T>(&self, name: &str, f: impl FnOnce(&ApiClient) -> Result<T, SandboxError>) -> Result<T, SandboxError> {
        let api = self.api(name);
        let was_paused = api.get::<InstanceInfo>("/")?.state == InstanceState::Paused;
        if !was_paused {
            api.patch("/vm", &Vm { state: VmState::Paused })?;
        }
        let result = f(&api);
        let resumed = if was_paused { Ok(()) } else { api.patch("/vm", &Vm { state: VmState::Resumed }) };
        let value = result?;
        resumed?;
        Ok(value)
    }

    /// The VM exits of sandbox `name` so far, which measure its work independently of the
    /// host's speed (through the API's FlushMetrics).
    pub fn vm_exits(&self, name: &str) -> Result<u64, SandboxError> {
        self.record(name)?;
        self.api(name).put("/actions", &InstanceActionInfo { action_type: ActionType::FlushMetrics })?;
        let path = self.dir(name).join(METRICS);
        let text = std::fs::read_to_string(&path).map_err(io("cannot read", &path))?;
        let last = text.lines().last().unwrap_or_default();
        let metrics: Metrics = serde_json::from_str(last)
            .map_err(|e| SandboxError::BadRecord { path: path.clone(), reason: e.to_string() })?;
        Ok(metrics.vcpu.exits)
    }

    /// Reserves the smallest guest CID from 3 up that no other sandbox holds, for sandbox
    /// `owner`.
    fn reserve_cid(&self, owner: &str) -> Result<u32, SandboxError> {
        Ok(self.reserve_cids(&[owner])?[0])
    }

    /// Reserves one guest CID for each of `owners`, so that CIDs stay unique on the host (each
    /// VM has its own vsock socket, but guests see their CIDs) even when several `ember`
    /// processes start sandboxes at once. A reservation is a file `$EMBER_STATE/cids/CID`
    /// made with O_EXCL and naming its sandbox; it lapses once that sandbox's directory is
    /// gone, after a grace period for sandboxes still being made.
    fn reserve_cids(&self, owners: &[&str]) -> Result<Vec<u32>, SandboxError> {
        const GRACE: Duration = Duration::from_secs(60);
        let dir = self.root.with_file_name("cids");
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let mut cids = Vec::with_capacity(owners.len());
        let mut cid = 3u32;
        while cids.len() < owners.len() {
            let path = dir.join(cid.to_string());
            let owner = owners[cids.len()];
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    std::io::Write::write_all(&mut f, owner.as_bytes()).map_err(io("cannot write", &path))?;
                    cids.push(cid);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let age = std::fs::metadata(&path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                    let lapsed = !holder.is_empty() && !self.dir(&holder).exists() && age.is_some_and(|a| a > GRACE);
                    // Removed, then taken again with O_EXCL on the next turn: two processes
                    // that both find it lapsed cannot both get it.
                    if lapsed && std::fs::remove_file(&path).is_ok() {
                        continue;
                    }
                }
                Err(e) => return Err(io("cannot create", &path)(e)),
            }
            cid = cid.checked_add(1).ok_or_else(|| io("no free CID in", &dir)(std::io::ErrorKind::Other.into()))?;
        }
        Ok(cids)
    }

    /// Gives up sandbox `name`'s CID reservation.
    fn release_cid(&self, name: &str, cid: u32) {
        let path = self.root.with_file_name("cids").join(cid.to_string());
        if std::fs::read_to_string(&path).is_ok_and(|holder| holder == name) {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Stops the sandbox's VMM (if it runs) and deletes its state directory, overlay included.
    pub fn remove(&self, name: &str) -> Result<(), SandboxError> {
        self.record(name)?;
        self.teardown(name, &self.dir(name));
        let dir = self.dir(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))?;
        }
        self.collect_layers();
        Ok(())
    }

    fn teardown(&self, name: &str, dir: &Path) {
        if let Ok(record) = self.record(name) {
            self.release_cid(name, record.cid);
            if record.vmm_alive(dir) {
                // SAFETY: plain kill(2); vmm_alive checked that the pid is this sandbox's VMM.
                unsafe { libc::kill(record.pid, libc::SIGKILL) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while record.vmm_alive(dir) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "sb-01", "web.server_2", &"x".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".hidden", "a/b", "a b", "../up", &"x".repeat(64)] {
            assert!(matches!(check_name(bad), Err(SandboxError::BadName(_))), "{bad}");
        }
        let n = random_name();
        assert!(check_name(&n).is_ok() && n.len() == 11, "{n}");
    }

    #[test]
    fn cids_are_unique_among_concurrent_starts_and_lapsed_ones_come_back() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let root = dir.as_path().join("sandboxes");
        let mut all: Vec<u32> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let store = Store::new(root.clone(), PathBuf::from("/nonexistent/ember"));
                    s.spawn(move || {
                        let names: Vec<String> = (0..10).map(|i| format!("s{t}-{i}")).collect();
                        store.reserve_cids(&names.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
                    })
                })
                .collect();
            threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, (3..43).collect::<Vec<u32>>(), "40 reservations, 40 distinct CIDs");

        let store = Store::new(root, PathBuf::from("/nonexistent/ember"));
        // CID 3's sandbox never got a directory and its reservation is old: it lapsed. CID 4's
        // sandbox exists: it keeps it.
        let cids = store.root.with_file_name("cids");
        let holder_of_4 = std::fs::read_to_string(cids.join("4")).unwrap();
        std::fs::create_dir_all(store.dir(&holder_of_4)).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        for cid in [3, 4] {
            let f = std::fs::File::options().write(true).open(cids.join(cid.to_string())).unwrap();
            f.set_modified(old).unwrap();
        }
        assert_eq!(store.reserve_cid("new").unwrap(), 3);
        assert_eq!(store.reserve_cid("newer").unwrap(), 43);
        store.release_cid("someone-else", 4);
        assert_eq!(store.reserve_cid("newest").unwrap(), 44, "only its holder releases a CID");
        store.release_cid(&holder_of_4, 4);
        assert_eq!(store.reserve_cid("last").unwrap(), 4);
    }

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
