//! The API before the start: the VM's configuration piece by piece, then `InstanceStart`
//! (build) or `PUT /snapshot/load` (restore on the VM made ahead).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::models::{ActionType, InstanceState, MachineConfig, SnapshotLoadParams};
use api::{ApiCall, ApiChannel, ApiRequest, ApiResponse};

use super::error::{answer, ApiError};
use super::info;
use super::runtime::RuntimeController;
use crate::builder;
use crate::config::disk_format;
use disk::BackingPolicy;
use crate::resources::VmResources;
use crate::runtime::RuntimeApi;
use crate::snapshot::{self, Overrides, PreparedVm, SnapshotError};
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
    pub fn new(id: String, backing: BackingPolicy, console: Box<dyn Write + Send>) -> Self {
        let prepared = snapshot::prepare()
            .map_err(|e| tracing::warn!("cannot prepare a VM for a snapshot load: {e}"))
            .ok();
        Self { id, backing, console: SharedSink(Arc::new(Mutex::new(console))), resources: VmResources::default(), prepared }
    }

    /// Answers `call`; once it has started a VM, the VM.
    pub fn answer(&mut self, call: ApiCall) -> Option<Started> {
        let response = match call.request {
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
                self.resources.metrics_path = Some(metrics.metrics_path.into());
                ApiResponse::no_content()
            }
            ApiRequest::PatchDrive(_) => ApiError::DriveUpdateBeforeStart.into(),
            ApiRequest::PatchVm(_) => ApiError::NotStarted.into(),
            ApiRequest::CreateSnapshot(_) => ApiError::NothingToSnapshot.into(),
            ApiRequest::LoadSnapshot(params) => match self.load(&params) {
                Ok(started) => {
                    let _ = call.reply.send(ApiResponse::no_content());
                    return Some(started);
                }
                Err(e) => e.into(),
            },
            ApiRequest::Action(ActionType::InstanceStart) => match self.start() {
                Ok(started) => {
                    tracing::info!("starting the VM");
                    let _ = call.reply.send(ApiResponse::no_content());
                    return Some(started);
                }
                Err(e) => e.into(),
            },
            ApiRequest::Action(other) => ApiError::ActionBeforeStart(other).into(),
        };
        let _ = call.reply.send(response);
        None
    }

    fn runtime_controller(&mut self, machine: MachineConfig) -> RuntimeController {
        RuntimeController {
            id: self.id.clone(),
            machine,
            metrics_path: self.resources.metrics_path.take(),
            backing: self.backing.clone(),
        }
    }

    fn start(&mut self) -> Result<Started, ApiError> {
        self.prepared = None;
        let cfg = self.resources.vm_config(&self.backing).map_err(ApiError::Configuration)?;
        let vmm = builder::build(&cfg, Box::new(self.console.clone()))?;
        let controller = self.runtime_controller(self.resources.machine.clone());
        Ok(Started { vmm, controller, start_paused: false, loaded_at: None })
    }

    fn load(&mut self, params: &SnapshotLoadParams) -> Result<Started, ApiError> {
        let received = Instant::now();
        let vmm = self.restore(params)?;
        tracing::info!("snapshot {} restored in {:?}", params.snapshot_path, received.elapsed());
        let machine =
            MachineConfig { vcpu_count: vmm.vcpus().len() as u8, mem_size_mib: vmm.ram().size >> 20, ..Default::default() };
        let controller = self.runtime_controller(machine);
        Ok(Started { vmm, controller, start_paused: !params.resume_vm, loaded_at: params.resume_vm.then_some(received) })
    }

    /// Restores the VM of a load request; the prepared VM is used up once KVM is touched.
    fn restore(&mut self, params: &SnapshotLoadParams) -> Result<Vmm, SnapshotError> {
        let mem_file = params.mem_file().map_err(SnapshotError::Request)?;
        let mut overrides = Overrides::default();
        for drive in &params.drive_overrides {
            overrides.drives.insert(drive.index, drive.path_on_host.clone().into());
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
        let devices = snapshot::open_devices(&state, &overrides, &self.backing)?;
        let opened = started.elapsed();
        let layers: Vec<PathBuf> = params.mem_layers.iter().map(Into::into).collect();
        let ram = snapshot::map_memory(mem_file.as_ref(), &layers, &state)?;
        let mapped = started.elapsed();
        let prepared = match self.prepared.take() {
            Some(p) => p,
            None => snapshot::prepare()?,
        };
        let vmm = Vmm::restore(prepared, &state, ram, devices, Box::new(self.console.clone()))?;
        tracing::debug!(
            "snapshot load: state read {read:?}, devices opened {opened:?}, memory mapped {mapped:?}, VM restored {:?}",
            started.elapsed()
        );
        Ok(vmm)
    }
}
