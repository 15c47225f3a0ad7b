//! A sandbox's life: its state directory made, its VMM started, configured and booted through
//! the API, waited for until its agent answers; paused around a step; stopped and removed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use api::client::ApiClient;
use api::models::{
    ActionType, BootSource, DiskFormat, Drive, InstanceActionInfo, InstanceInfo, InstanceState, MachineConfig, Metrics, MetricsConfig, Vm,
    VmState, Vsock,
};
use disk::overlay;

use crate::error::io;
use crate::jails::View;
use crate::names::{check_name, is_hidden, random_name};
use crate::paths::{API_SOCKET, CONSOLE_LOG, MAX_SOCKET_PATH, METRICS, OVERLAY, VMM_LOG, VSOCK_SOCKET};
use crate::process::{tail, VmmProcess};
use crate::record::{find_vmm_serving, Phase, Record, Starter};
use crate::{identity, SandboxError, SandboxSpec, Shape, Store};

/// The format of a base image the user named: qcow2 if its name ends `.qcow2`, else raw (what
/// every image `rootfs/build` makes is). Never taken from the file's content.
pub(crate) fn image_format(image: &Path) -> disk::Format {
    disk::Format::from_extension(image).unwrap_or(disk::Format::Raw)
}

impl Store {
    /// Starts a sandbox and returns once its guest agent answers.
    pub fn start(&self, spec: &SandboxSpec) -> Result<Record, SandboxError> {
        self.check_machine(spec)?;
        self.create(spec.name.clone(), |name, dir| self.boot(name, dir, spec))
    }

    /// Boots a hidden sandbox as `spec` says (whatever name it gives) for this process's own
    /// use; its VMM dies with this process's thread that called this.
    pub(crate) fn start_hidden(&self, spec: &SandboxSpec) -> Result<Record, SandboxError> {
        self.create_as(format!(".{}", random_name()), |name, dir| self.boot(name, dir, spec))
    }

    /// Fails unless `name` is a valid name that no sandbox has (yet): a check before slow
    /// work whose only purpose is to start a sandbox by that name.
    pub(crate) fn check_new_name(&self, name: &str) -> Result<(), SandboxError> {
        check_name(name)?;
        match self.dir(name).exists() {
            true => Err(SandboxError::Exists(name.to_string())),
            false => Ok(()),
        }
    }

    /// Makes the state directory of a new sandbox, records that this process is starting it,
    /// and runs `make` in it; a failure leaves nothing behind.
    pub(crate) fn create(
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
        let result = Record::starting(&name).and_then(|r| r.write(&dir)).and_then(|()| make(&name, &dir));
        if result.is_err() {
            self.teardown(&name, &dir);
        }
        result
    }

    fn boot(&self, name: &str, dir: &Path, spec: &SandboxSpec) -> Result<Record, SandboxError> {
        let overlay_path = dir.join(OVERLAY);
        let backing = self.disk_policy(&[&spec.image])?;
        let base = overlay::Base { path: &spec.image, format: image_format(&spec.image), policy: &backing };
        match spec.disk_gib {
            Some(gib) => overlay::create_sized(base, &overlay_path, gib << 30)?,
            None => overlay::create(base, &overlay_path)?,
        }
        let cid = self.reserve_cid(name)?;
        let shape =
            Shape { image: spec.image.clone(), backing, mem_mib: spec.mem_mib, vcpus: spec.vcpus, cid, resumes_agent_ms: None, origin: None };
        let kernel = std::path::absolute(&spec.kernel).map_err(io("cannot resolve", &spec.kernel))?;
        self.launch(name, dir, shape, spec.ready_timeout, std::slice::from_ref(&kernel), |api, view| {
            api.put(
                "/boot-source",
                &BootSource {
                    kernel_image_path: kernel.display().to_string(),
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
                    format: Some(DiskFormat::Qcow2),
                    partuuid: None,
                    cache_type: None,
                    io_engine: None,
                    rate_limiter: None,
                },
            )?;
            let uds_path = view.run_path(&dir.join(VSOCK_SOCKET))?;
            api.put("/vsock", &Vsock { guest_cid: cid, uds_path, vsock_id: None })?;
            Ok(api.put("/actions", &InstanceActionInfo { action_type: ActionType::InstanceStart })?)
        })
    }

    /// Spawns the sandbox's VMM, writes its record, has `configure` set it going through its
    /// API, waits until its guest agent answers, gives the guest its own identity, and records
    /// the start as complete (a hidden sandbox's never is: it is this process's scratch). The
    /// VMM gets the sandbox's overlay (`dir`/disk.qcow2) to write, and reads its backing chain
    /// and `inputs` (kernel, snapshot files).
    pub(crate) fn launch(
        &self,
        name: &str,
        dir: &Path,
        shape: Shape,
        ready_timeout: Duration,
        inputs: &[PathBuf],
        configure: impl FnOnce(&ApiClient, &View) -> Result<(), SandboxError>,
    ) -> Result<Record, SandboxError> {
        let api_socket = dir.join(API_SOCKET);
        let started = Instant::now();
        let resumes_agent_ms = shape.resumes_agent_ms;
        let overlay_path = dir.join(OVERLAY);
        let chain = overlay::info(&overlay_path, disk::Format::Qcow2, &shape.backing)?;
        let disk_size = chain.first().map_or(0, |l| l.virtual_size);
        let mut reads: Vec<PathBuf> = chain.into_iter().skip(1).map(|l| l.path).collect();
        reads.extend(inputs.iter().cloned());
        let (links, binds) = self.placement(&reads);
        // A hidden sandbox's VMM must die with this process, which a spare cannot promise.
        // A spare allows the store's own directories only, and sees only the installation's
        // files besides what is linked into its jail: one fits a sandbox whose disk chain
        // needs no other.
        let spare_fits = self.disk_policy(&[])?;
        let fits = binds.is_empty() && shape.backing.dirs().iter().all(|d| spare_fits.allows(d));
        let adopted = if is_hidden(name) || !fits { None } else { self.adopt_spare(dir) };
        let mut vmm = match adopted {
            Some(spare) => {
                tracing::debug!("sandbox {name}: took over spare VMM {}", spare.pid);
                VmmProcess::Adopted(spare)
            }
            None => VmmProcess::Child(self.spawn_vmm(name, dir, is_hidden(name), &shape.backing, &binds)?),
        };
        let (jail, cgroup) = vmm.confinement();
        let shape_mem_bytes = shape.mem_mib << 20;
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
            jail: jail.clone(),
            cgroup: cgroup.clone(),
            disk_dirs: shape.backing.dirs().to_vec(),
            phase: Phase::Starting,
            starter: Some(Starter::this_process()?),
            lifetime: None,
            origin: shape.origin,
            egress: None,
        };
        record.write(dir)?;

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
                    progress: "no VM was started yet".into(),
                    log: tail(&dir.join(VMM_LOG), 20),
                    console: tail(&dir.join(CONSOLE_LOG), 20),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }

        tracing::debug!("sandbox {name}: API socket up {:?} into the start", started.elapsed());
        let view = self.view_of(jail.as_deref());
        if let Some(cgroup) = &cgroup {
            // Where the state directory is in memory (tmpfs, as in the nested harness), the
            // overlay the VMM writes is memory charged to it, up to the disk's size.
            let disk_in_memory = if self.state_in_memory() { disk_size } else { 0 };
            jail::cgroup::Cgroup::open(cgroup)
                .and_then(|c| c.limit(jail::cgroup::Limits {
                    mem_bytes: shape_mem_bytes.saturating_add(disk_in_memory),
                    vcpus: u64::from(record.vcpus),
                }))
                .map_err(|e| SandboxError::Spawn { binary: self.vmm_binary.clone(), reason: e.to_string() })?;
        }
        let api = ApiClient::new(&api_socket);
        let configured = (|| {
            view.link_api_socket(&api_socket)?;
            view.expose(&overlay_path, true)?;
            for path in &links {
                view.expose(path, false)?;
            }
            for path in &binds {
                view.share(path)?;
            }
            let metrics = MetricsConfig { metrics_path: view.run_path(&dir.join(METRICS))? };
            api.put("/metrics", &metrics)?;
            configure(&api, &view)
        })();
        if let Err(e) = configured {
            // A VMM that broke off a request is usually dying: its log says why.
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                match died(&mut vmm) {
                    Some(died) => return Err(died),
                    None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    None => return Err(e),
                }
            }
        }

        // In short rounds, so that a VMM that dies is noticed at once.
        tracing::debug!("sandbox {name}: VM configured and started {:?} into the start", started.elapsed());
        let deadline = Instant::now() + ready_timeout;
        loop {
            let round = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(1));
            match agent_client::wait_ready(&dir.join(VSOCK_SOCKET), agent_protocol::DEFAULT_PORT, round) {
                Ok((health, mut agent)) => {
                    tracing::debug!("sandbox {name}: agent ready {:?} into the start", started.elapsed());
                    if let Some(expected_ms) = resumes_agent_ms.filter(|&ms| health.uptime_ms < ms) {
                        return Err(SandboxError::NotContinuation {
                            name: name.into(),
                            expected_ms,
                            found_ms: health.uptime_ms,
                            log: tail(&dir.join(VMM_LOG), 20),
                            console: tail(&dir.join(CONSOLE_LOG), 20),
                        });
                    }
                    identity::fix(&mut agent, name).map_err(|e| died(&mut vmm).unwrap_or(e))?;
                    tracing::debug!("sandbox {name}: identity set {:?} into the start", started.elapsed());
                    let record = if is_hidden(name) {
                        record
                    } else {
                        let ready = Record { phase: Phase::Ready, starter: None, ..record };
                        ready.write(dir)?;
                        ready
                    };
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
                        progress: progress(&api, &dir.join(METRICS), vmm.pid()),
                        log: tail(&dir.join(VMM_LOG), 20),
                        console: tail(&dir.join(CONSOLE_LOG), 20),
                    }));
                }
            }
            if let Some(e) = died(&mut vmm) {
                return Err(e);
            }
        }
    }

    /// How long sandbox `name`'s guest agent has been running (what a snapshot or fork of it
    /// taken from now on must resume at least).
    pub(crate) fn agent_uptime_ms(&self, name: &str) -> Result<u64, SandboxError> {
        let socket = self.dir(name).join(VSOCK_SOCKET);
        let unreachable = |source| SandboxError::AgentUnreachable { name: name.into(), source };
        let mut agent = agent_client::connect(&socket, agent_protocol::DEFAULT_PORT, Duration::from_secs(10)).map_err(unreachable)?;
        Ok(agent_client::health(&mut agent).map_err(unreachable)?.uptime_ms)
    }

    /// Runs `f` with sandbox `name`'s VM paused, then resumes it, whatever `f` returned; a
    /// sandbox that was paused already stays paused.
    pub(crate) fn while_paused<T>(&self, name: &str, f: impl FnOnce(&ApiClient) -> Result<T, SandboxError>) -> Result<T, SandboxError> {
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
        self.ready_record(name)?;
        vm_exits(&self.api(name), &self.dir(name).join(METRICS))
    }

    /// Stops the sandbox's VMM (if it runs) and keeps its state directory, overlay and record:
    /// `ls` shows it `Stopped`, and its disk chain still counts as in use until `remove`.
    pub fn stop(&self, name: &str) -> Result<(), SandboxError> {
        let record = self.ready_record(name)?;
        let dir = self.dir(name);
        self.stop_egress(&record);
        self.stop_vmm(&record, &dir);
        self.remove_confinement(record.jail.as_deref(), record.cgroup);
        Ok(())
    }

    /// Stops the sandbox's VMM (if it runs) and deletes its state directory, overlay included;
    /// also a directory left without a record by a start killed at its very beginning.
    pub fn remove(&self, name: &str) -> Result<(), SandboxError> {
        let dir = self.dir(name);
        match self.record(name) {
            Err(SandboxError::NotFound(_)) if dir.is_dir() => {}
            Err(e) => return Err(e),
            Ok(_) => self.teardown(name, &dir),
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))?;
        }
        self.collect_layers();
        Ok(())
    }

    pub(crate) fn teardown(&self, name: &str, dir: &Path) {
        if let Ok(record) = self.record(name) {
            self.release_cid(name, record.cid);
            self.stop_egress(&record);
            self.stop_vmm(&record, dir);
            self.remove_confinement(record.jail.as_deref(), record.cgroup);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Removes a dead VMM's jail directory and cgroup.
    pub(crate) fn remove_confinement(&self, jail: Option<&Path>, cgroup: Option<PathBuf>) {
        if let Some(jail) = jail.filter(|j| j.starts_with(self.jails_dir())) {
            let _ = std::fs::remove_dir_all(jail);
        }
        if let Some(cgroup) = cgroup.and_then(|c| jail::cgroup::Cgroup::open(&c).ok()) {
            cgroup.remove();
        }
    }

    /// Whether `$EMBER_STATE` is a file system in memory (tmpfs, ramfs), whose files count
    /// against the memory limit of the cgroup that wrote them.
    fn state_in_memory(&self) -> bool {
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        self.state_fs().is_some_and(|fs| matches!(fs.f_type, TMPFS_MAGIC | RAMFS_MAGIC))
    }

    /// Which of the files a VMM reads are hard-linked into its jail (on the state directory's
    /// file system, not seen by every VMM already) and which must be bind-mounted when it
    /// starts (on another file system).
    fn placement(&self, reads: &[PathBuf]) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let Some(settings) = &self.jail else { return (Vec::new(), Vec::new()) };
        let state_dev = std::fs::metadata(self.root.parent().unwrap_or(&self.root)).map(|m| m.dev()).ok();
        let (mut links, mut binds) = (Vec::new(), Vec::new());
        for path in reads {
            if settings.read_only.iter().any(|ro| path.starts_with(ro)) {
                continue;
            }
            if std::fs::metadata(path).map(|m| m.dev()).ok() == state_dev {
                links.push(path.clone());
            } else {
                binds.push(path.clone());
            }
        }
        (links, binds)
    }
    /// Kills the sandbox's VMM if it runs and waits (5 s at most) until it is gone. A start
    /// that had not recorded its VMM's pid yet (pid 0) may have spawned it: it is looked for
    /// by the socket it was started to serve.
    pub(crate) fn stop_vmm(&self, record: &Record, dir: &Path) {
        let socket = dir.join(API_SOCKET);
        let vmm = match record.pid {
            0 if record.phase == Phase::Starting => find_vmm_serving(&socket).map(|pid| Record { pid, ..record.clone() }),
            pid if pid > 0 && record.vmm_alive(dir) => Some(record.clone()),
            _ => None,
        };
        let Some(vmm) = vmm else { return };
        // SAFETY: plain kill(2); the pid was checked to be this sandbox's VMM.
        unsafe { libc::kill(vmm.pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while vmm.vmm_alive(dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The VM exits a VMM has counted, by its metrics file (`path`) once it flushed them.
fn vm_exits(api: &ApiClient, path: &Path) -> Result<u64, SandboxError> {
    api.put("/actions", &InstanceActionInfo { action_type: ActionType::FlushMetrics })?;
    let text = std::fs::read_to_string(path).map_err(io("cannot read", path))?;
    let last = text.lines().last().unwrap_or_default();
    let metrics: Metrics =
        serde_json::from_str(last).map_err(|e| SandboxError::BadRecord { path: path.into(), reason: e.to_string() })?;
    Ok(metrics.vcpu.exits)
}

/// Whether a guest that never became ready still runs, for the error that says so: its exits
/// to the VMM over a second. A guest doing I/O makes some; an idle one (halted, which KVM
/// handles itself) or a stuck one makes none.
/// Where the VMM's vCPU threads are, from /proc: in the kernel's KVM_RUN (the guest, or the
/// host's KVM, holds them) or somewhere in the VMM (its own doing).
fn vcpu_threads(pid: i32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return "its threads cannot be read".into() };
    let mut seen: Vec<String> = tasks
        .flatten()
        .filter_map(|t| {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).ok();
            let comm = read("comm")?.trim().to_string();
            if !comm.starts_with("ember-vcpu") {
                return None;
            }
            // The state follows the parenthesised name, which may hold spaces.
            let stat = read("stat")?;
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').next()).unwrap_or("?").to_string();
            let wchan = read("wchan").filter(|w| !w.is_empty() && w != "0").unwrap_or_else(|| "running".into());
            Some(format!("{comm} {state} in {wchan}"))
        })
        .collect();
    seen.sort();
    if seen.is_empty() {
        return "no vCPU thread".into();
    }
    format!("vCPU threads: {}", seen.join(", "))
}

fn progress(api: &ApiClient, metrics: &Path, pid: i32) -> String {
    let sample = || vm_exits(api, metrics);
    match sample().and_then(|before| {
        std::thread::sleep(Duration::from_secs(1));
        sample().map(|after| (before, after.saturating_sub(before)))
    }) {
        Ok((total, 0)) => format!(
            "its vCPUs made no VM exit to the VMM in a second ({total} in all): the guest is idle or stuck ({})",
            vcpu_threads(pid)
        ),
        Ok((total, n)) => format!("its vCPUs made {n} VM exits to the VMM in a second ({total} in all): the guest runs and does I/O"),
        Err(e) => format!("its VMM gave no VM exit count ({e})"),
    }
}


#[cfg(test)]
mod tests {
    use super::vcpu_threads;

    #[test]
    fn a_stuck_guest_s_report_says_where_each_vcpu_thread_is() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new().name("ember-vcpu7".into()).spawn(move || rx.recv()).unwrap();
        // SAFETY: getpid(2) has no preconditions.
        let me = unsafe { libc::getpid() };
        let mut seen = vcpu_threads(me);
        for _ in 0..100 {
            if seen.contains("ember-vcpu7 S in ") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            seen = vcpu_threads(me);
        }
        assert!(seen.starts_with("vCPU threads: ember-vcpu7 S in "), "{seen}");
        drop(tx);
        t.join().unwrap().unwrap_err();
        assert_eq!(vcpu_threads(i32::MAX), "its threads cannot be read");
    }
}
