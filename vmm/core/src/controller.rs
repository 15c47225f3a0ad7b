//! A VMM process driven through its API, as Firecracker is: it starts empty, takes the VM's
//! configuration piece by piece, builds and starts the VM on `InstanceStart`, then answers
//! runtime calls (pause, resume, info, snapshots) until the guest ends; or, instead of being
//! configured, restores a VM from a snapshot (`PUT /snapshot/load`).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::models::{ActionType, InstanceInfo, InstanceState, MachineConfig, SnapshotLoadParams};
use api::{ApiChannel, ApiRequest, ApiResponse};
use crate::builder::{self, BuiltVm};
use crate::resources::VmResources;
use crate::runtime::{self, RunError, RunOutcome, RuntimeApi};
use crate::snapshot::{self, Overrides, PreparedVm, SnapshotError};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("the API server stopped before the VM was started")]
    ApiGone,
    #[error(transparent)]
    Run(#[from] RunError),
}

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

fn info(id: &str) -> ApiResponse {
    ApiResponse::json(&InstanceInfo {
        id: id.to_string(),
        state: InstanceState::NotStarted,
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        app_name: "ember".into(),
    })
}

/// Serves `channel` until the VM has been started and has ended. The guest's console goes to
/// `console`.
pub fn serve(
    channel: ApiChannel,
    id: String,
    started: Instant,
    console: Box<dyn Write + Send>,
) -> Result<RunOutcome, ControllerError> {
    let console = SharedSink(Arc::new(Mutex::new(console)));
    let mut resources = VmResources::default();
    // KVM's first memory slot costs milliseconds; paid now, a snapshot load does not wait for it.
    let mut prepared = snapshot::prepare()
        .map_err(|e| tracing::warn!("cannot prepare a VM for a snapshot load: {e}"))
        .ok();
    loop {
        let call = channel.calls.recv().map_err(|_| ControllerError::ApiGone)?;
        let result = match call.request {
            ApiRequest::GetInfo => {
                let _ = call.reply.send(info(&id));
                continue;
            }
            ApiRequest::GetMachineConfig => {
                let _ = call.reply.send(ApiResponse::json(&resources.machine));
                continue;
            }
            ApiRequest::PutBootSource(boot) => resources.set_boot_source(boot),
            ApiRequest::PutMachineConfig(machine) => {
                resources.machine = machine;
                Ok(())
            }
            ApiRequest::PutDrive(drive) => resources.set_drive(drive),
            ApiRequest::PutVsock(vsock) => resources.set_vsock(vsock),
            ApiRequest::PutMetrics(metrics) => {
                resources.metrics_path = Some(metrics.metrics_path.into());
                Ok(())
            }
            ApiRequest::PatchDrive(_) => Err("The microVM is not running yet: configure its drives with PUT /drives.".into()),
            ApiRequest::PatchVm(_) => Err("The microVM is not running yet: start it first.".into()),
            ApiRequest::CreateSnapshot(_) => Err("The microVM is not running yet: there is nothing to snapshot.".into()),
            ApiRequest::LoadSnapshot(params) => {
                let received = Instant::now();
                match load(&params, &mut prepared, Box::new(console.clone())) {
                    Ok(vm) => {
                        tracing::info!("snapshot {} restored in {:?}", params.snapshot_path, received.elapsed());
                        let machine = MachineConfig {
                            vcpu_count: vm.vcpus.len() as u8,
                            mem_size_mib: vm.ram.size >> 20,
                            ..Default::default()
                        };
                        let _ = call.reply.send(ApiResponse::no_content());
                        let api = RuntimeApi {
                            channel,
                            id,
                            machine,
                            start_paused: !params.resume_vm,
                            loaded_at: params.resume_vm.then_some(received),
                            metrics_path: resources.metrics_path,
                        };
                        return Ok(runtime::run_with_api(vm, started, false, Some(api))?);
                    }
                    Err(e) => Err(format!("Cannot load the snapshot: {e}")),
                }
            }
            ApiRequest::Action(ActionType::InstanceStart) => {
                prepared = None;
                let built = resources.vm_config().and_then(|cfg| {
                    builder::build(&cfg, Box::new(console.clone())).map_err(|e| e.to_string())
                });
                match built {
                    Ok(vm) => {
                        tracing::info!("starting the VM");
                        let _ = call.reply.send(ApiResponse::no_content());
                        let api = RuntimeApi {
                            channel,
                            id,
                            machine: resources.machine,
                            start_paused: false,
                            loaded_at: None,
                            metrics_path: resources.metrics_path,
                        };
                        return Ok(runtime::run_with_api(vm, started, false, Some(api))?);
                    }
                    Err(e) => Err(format!("Cannot start the microVM: {e}")),
                }
            }
            ApiRequest::Action(other) => Err(format!("{other:?} is only possible once the microVM runs.")),
        };
        let _ = call.reply.send(match result {
            Ok(()) => ApiResponse::no_content(),
            Err(message) => ApiResponse::bad_request(message),
        });
    }
}

/// Restores the VM of a load request; `prepared` is used up once KVM is touched.
fn load(
    params: &SnapshotLoadParams,
    prepared: &mut Option<PreparedVm>,
    console: Box<dyn Write + Send>,
) -> Result<BuiltVm, SnapshotError> {
    let mem_file = params.mem_file().map_err(SnapshotError::Request)?;
    let mut overrides = Overrides::default();
    for drive in &params.drive_overrides {
        overrides.drives.insert(drive.index, drive.path_on_host.clone().into());
    }
    if let Some(vsock) = &params.vsock_override {
        overrides.vsock_cid = vsock.guest_cid;
        overrides.vsock_uds = vsock.uds_path.clone().map(Into::into);
    }
    let started = Instant::now();
    let state = snapshot::read_state(params.snapshot_path.as_ref())?;
    let read = started.elapsed();
    let devices = snapshot::open_devices(&state, &overrides)?;
    let opened = started.elapsed();
    let layers: Vec<std::path::PathBuf> = params.mem_layers.iter().map(Into::into).collect();
    let ram = snapshot::map_memory(mem_file.as_ref(), &layers, &state)?;
    let mapped = started.elapsed();
    let prepared = match prepared.take() {
        Some(p) => p,
        None => snapshot::prepare()?,
    };
    let vm = snapshot::restore_vm(prepared, &state, ram, devices, console)?;
    tracing::debug!(
        "snapshot load: state read {read:?}, devices opened {opened:?}, memory mapped {mapped:?}, VM restored {:?}",
        started.elapsed()
    );
    Ok(vm)
}
