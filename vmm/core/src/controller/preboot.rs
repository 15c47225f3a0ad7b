//! The API before the start: the VM's configuration piece by piece, then `InstanceStart`
//! (build) or `PUT /snapshot/load` (restore on the VM made ahead).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::models::{ActionType, InstanceState, MachineConfig, MemSource, RequestError, SnapshotLoadParams};
use api::{ApiCall, ApiChannel, ApiRequest, ApiResponse, SocketHome};

use super::error::{answer, ApiError};
use super::info;
use super::runtime::{deadline_time, MetricsFile, RuntimeController};
use crate::builder;
use crate::config::disk_format;
use crate::files;
use disk::BackingPolicy;
use crate::resources::VmResources;
use crate::runtime::RuntimeApi;
use crate::snapshot::{self, DriveOverride, MemoryFiles, Overrides, PreparedVm, SnapshotError};
use crate::vmm::Vmm;

/// The console sink, shared so that a start that fails does not use it up for the next try.
#[derive(Clone)]
struct SharedSink(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

pub struct PrebootController {
    id: String,
    /// Where the backing files of the drives' qcow2 layers may lie (`ember vmm --disk-dir`).
    backing: BackingPolicy,
    console: SharedSink,
    resources: VmResources,
    /// The API socket, whose directory is the only one PUT /metrics may name.
    home: Option<SocketHome>,
    metrics: Option<MetricsFile>,
    /// When the VM is to end (PUT /deadline), once started.
    deadline: Option<std::time::SystemTime>,
    /// KVM's first memory slot costs milliseconds; paid at start, a snapshot load does not
    /// wait for it.
    prepared: Option<PreparedVm>,
}

/// A VM built or restored, and what its runtime API starts from.
pub struct Started {
    vmm: Vmm,
    controller: RuntimeController,
    start_paused: bool,
    loaded_at: Option<Instant>,
}

impl Started {
    /// The VM, and its API on `channel`.
    pub fn into_parts(self, channel: ApiChannel) -> (Vmm, RuntimeApi) {
        let api =
            RuntimeApi { channel, controller: self.controller, start_paused: self.start_paused, loaded_at: self.loaded_at };
        (self.vmm, api)
    }
}

impl PrebootController {
    pub fn new(id: String, backing: BackingPolicy, console: Box<dyn Write + Send>, home: Option<SocketHome>) -> Self {
        let prepared = snapshot::prepare()
            .map_err(|e| tracing::warn!("cannot prepare a VM for a snapshot load: {e}"))
            .ok();
        Self {
            id,
            backing,
            console: SharedSink(Arc::new(Mutex::new(console))),
            resources: VmResources::default(),
            home,
            metrics: None,
            deadline: None,
            prepared,
        }
    }

    /// Answers `call`; once it has started a VM, the VM. The descriptors that came with the
    /// call and that its handler does not take are closed.
    pub fn answer(&mut self, call: ApiCall) -> Option<Started> {
        let ApiCall { request, fds, reply } = call;
        let response = match request {
            ApiRequest::GetInfo => info(&self.id, InstanceState::NotStarted),
            ApiRequest::GetMachineConfig => ApiResponse::json(&self.resources.machine),
            ApiRequest::PutBootSource(boot) => answer(self.resources.set_boot_source(boot).map_err(ApiError::from)),
            ApiRequest::PutMachineConfig(machine) => {
                self.resources.machine = machine;
                ApiResponse::no_content()
            }
            ApiRequest::PutDrive(drive) => answer(self.resources.set_drive(drive.into()).map_err(ApiError::from)),
            ApiRequest::PutVsock(vsock) => answer(self.resources.set_vsock(vsock.into()).map_err(ApiError::from)),
            ApiRequest::PutMetrics(metrics) => {
                let path = PathBuf::from(metrics.metrics_path);
                match files::open_metrics(self.home.as_ref(), &path) {
                    Ok(file) => {
                        self.metrics = Some(MetricsFile { path, file });
                        ApiResponse::no_content()
                    }
                    Err(e) => ApiError::MetricsFile(e).into(),
                }
            }
            ApiRequest::PutDeadline(deadline) => {
                self.deadline = Some(deadline_time(deadline));
                ApiResponse::no_content()
            }
            ApiRequest::PatchDrive(_) => ApiError::DriveUpdateBeforeStart.into(),
            ApiRequest::PatchVm(_) => ApiError::NotStarted.into(),
            ApiRequest::CreateSnapshot(_) => ApiError::NothingToSnapshot.into(),
            ApiRequest::LoadSnapshot(params) => match self.load(&params, fds) {
                Ok(started) => {
                    let _ = reply.send(ApiResponse::no_content());
                    return Some(started);
                }
                Err(e) => e.into(),
            },
            ApiRequest::Action(ActionType::InstanceStart) => match self.start() {
                Ok(started) => {
                    tracing::info!("starting the VM");
                    let _ = reply.send(ApiResponse::no_content());
                    return Some(started);
                }
                Err(e) => e.into(),
            },
            ApiRequest::Action(other) => ApiError::ActionBeforeStart(other).into(),
        };
        let _ = reply.send(response);
        None
    }

    fn runtime_controller(&mut self, machine: MachineConfig) -> RuntimeController {
        RuntimeController {
            id: self.id.clone(),
            machine,
            metrics: self.metrics.take(),
            backing: self.backing.clone(),
            deadline: self.deadline,
        }
    }

    fn start(&mut self) -> Result<Started, ApiError> {
        self.prepared = None;
        let cfg = self.resources.vm_config(&self.backing).map_err(ApiError::Configuration)?;
        let vmm = builder::build(&cfg, Box::new(self.console.clone()))?;
        let controller = self.runtime_controller(self.resources.machine.clone());
        Ok(Started { vmm, controller, start_paused: false, loaded_at: None })
    }

    fn load(&mut self, params: &SnapshotLoadParams, fds: Vec<OwnedFd>) -> Result<Started, ApiError> {
        let received = Instant::now();
        let vmm = self.restore(params, fds)?;
        tracing::info!("snapshot {} restored in {:?}", params.snapshot_path, received.elapsed());
        let machine =
            MachineConfig { vcpu_count: vmm.vcpus().len() as u8, mem_size_mib: vmm.ram().size >> 20, ..Default::default() };
        let controller = self.runtime_controller(machine);
        Ok(Started { vmm, controller, start_paused: !params.resume_vm, loaded_at: params.resume_vm.then_some(received) })
    }

    /// Restores the VM of a load request (its memory from a path or from the descriptors
    /// `fds` that came with it); the prepared VM is used up once KVM is touched. The state's
    /// sizes are checked against the host before anything is opened or mapped.
    fn restore(&mut self, params: &SnapshotLoadParams, fds: Vec<OwnedFd>) -> Result<Vmm, SnapshotError> {
        let memory = match params.mem_file()? {
            MemSource::Path(path) => MemoryFiles::Path(path.into()),
            MemSource::Fds(n) if n == fds.len() => MemoryFiles::Fds(fds),
            MemSource::Fds(n) => return Err(RequestError::MemFdCount { expected: n, got: fds.len() }.into()),
        };
        let mut overrides = Overrides::default();
        for drive in &params.drive_overrides {
            let o = DriveOverride { path: drive.path_on_host.clone().into(), read_only: drive.is_read_only };
            overrides.drives.insert(drive.index, o);
            if let Some(format) = drive.format {
                overrides.drive_formats.insert(drive.index, disk_format(format));
            }
        }
        if let Some(vsock) = &params.vsock_override {
            overrides.vsock_cid = vsock.guest_cid;
            overrides.vsock_uds = vsock.uds_path.clone().map(Into::into);
        }
        let started = Instant::now();
        let state = snapshot::read_state(params.snapshot_path.as_ref())?;
        let read = started.elapsed();
        let prepared = match self.prepared.take() {
            Some(p) => p,
            None => snapshot::prepare()?,
        };
        let opened = snapshot::check_limits(&state, prepared.max_vcpus()).and_then(|()| {
            let devices = snapshot::open_devices(&state, &overrides, &self.backing)?;
            let opened = started.elapsed();
            Ok((devices, opened, snapshot::map_memory(memory, &state)?))
        });
        let (devices, opened, ram) = match opened {
            Ok(o) => o,
            Err(e) => {
                // Nothing touched KVM yet: the next load can use it.
                self.prepared = Some(prepared);
                return Err(e);
            }
        };
        let mapped = started.elapsed();
        let vmm = Vmm::restore(prepared, &state, ram, devices, Box::new(self.console.clone()))?;
        tracing::debug!(
            "snapshot load: state read {read:?}, devices opened {opened:?}, memory mapped {mapped:?}, VM restored {:?}",
            started.elapsed()
        );
        Ok(vmm)
    }
}
