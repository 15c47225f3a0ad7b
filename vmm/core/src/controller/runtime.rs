//! The API of a started VM: pause and resume, snapshots (written, or with guest memory frozen
//! in place for a fork), a drive's disk replaced, metrics. Configuration is refused, as in
//! Firecracker.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

use api::models::{ActionType, FrozenMemory, InstanceState, MachineConfig, Metrics, PartialDrive, SnapshotCreateParams, VcpuMetrics, VmState};
use api::{ApiRequest, ApiResponse};

use super::error::{answer, ApiError};
use super::info;
use crate::device_manager::EventLoop;
use crate::snapshot::SnapshotFiles;
use crate::vmm::{Vmm, VmmError};

/// The file FlushMetrics appends to, opened by PUT /metrics (`files::open_metrics`).
#[derive(Debug)]
pub struct MetricsFile {
    pub path: PathBuf,
    pub file: File,
}

pub struct RuntimeController {
    pub id: String,
    /// What `GET /machine-config` reports.
    pub machine: MachineConfig,
    pub metrics: Option<MetricsFile>,
    /// Where the backing files of a drive's new disk may lie (PATCH /drives).
    pub backing: disk::BackingPolicy,
    /// When the run loop ends the VM (PUT /deadline).
    pub deadline: Option<std::time::SystemTime>,
}

impl RuntimeController {
    pub fn answer(&mut self, request: ApiRequest, vmm: &mut Vmm, events: &mut EventLoop) -> ApiResponse {
        let paused = vmm.is_paused();
        match request {
            ApiRequest::GetInfo => info(&self.id, if paused { InstanceState::Paused } else { InstanceState::Running }),
            ApiRequest::GetMachineConfig => ApiResponse::json(&self.machine),
            ApiRequest::PatchVm(VmState::Paused) if paused => ApiResponse::no_content(),
            ApiRequest::PatchVm(VmState::Paused) => answer(vmm.pause(events).map_err(ApiError::Pause)),
            ApiRequest::PatchVm(VmState::Resumed) => {
                vmm.resume(events);
                ApiResponse::no_content()
            }
            ApiRequest::CreateSnapshot(_) if !paused => ApiError::NotPaused.into(),
            ApiRequest::CreateSnapshot(params) => create_snapshot(&params, vmm),
            ApiRequest::PatchDrive(drive) => answer(update_drive(&drive, vmm, &self.backing)),
            ApiRequest::LoadSnapshot(_) => ApiError::LoadAfterStart.into(),
            ApiRequest::Action(ActionType::InstanceStart) => ApiError::AlreadyRunning.into(),
            ApiRequest::Action(ActionType::SendCtrlAltDel) => ApiError::CtrlAltDel.into(),
            ApiRequest::Action(ActionType::FlushMetrics) => answer(self.flush_metrics(vmm)),
            ApiRequest::PutMetrics(_) => ApiError::MetricsAfterStart.into(),
            ApiRequest::PutDeadline(deadline) => {
                self.deadline = Some(deadline_time(deadline));
                ApiResponse::no_content()
            }
            ApiRequest::PutBootSource(_) | ApiRequest::PutMachineConfig(_) | ApiRequest::PutDrive(_) | ApiRequest::PutVsock(_) => {
                ApiError::ConfigAfterStart.into()
            }
        }
    }

    /// Appends one line of metrics to the metrics file, as Firecracker's FlushMetrics does: the
    /// VM exits so far, which do not depend on the host's speed.
    fn flush_metrics(&self, vmm: &Vmm) -> Result<(), ApiError> {
        let metrics_file = self.metrics.as_ref().ok_or(ApiError::NoMetricsFile)?;
        let metrics = Metrics {
            utc_timestamp_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            vcpu: VcpuMetrics { exits: vmm.exits() },
        };
        let line = serde_json::to_string(&metrics).unwrap_or_default() + "\n";
        std::io::Write::write_all(&mut &metrics_file.file, line.as_bytes())
            .map_err(|source| ApiError::Metrics { path: metrics_file.path.clone(), source })
    }
}

/// Writes a snapshot of the paused VM with the vCPU states its threads saved as they parked;
/// with `freeze_memory`, freezes guest memory in place instead of writing it, and answers with
/// the files that hold it, as descriptors attached to the response: the base, then each layer.
fn create_snapshot(params: &SnapshotCreateParams, vmm: &mut Vmm) -> ApiResponse {
    let started = Instant::now();
    let vcpus = match vmm.save_vcpus() {
        Ok(states) => states,
        Err(e) => return ApiError::VcpuStates(e).into(),
    };
    let state_path = PathBuf::from(&params.snapshot_path);
    if params.freeze_memory {
        return match vmm.snapshot_frozen(&state_path, vcpus) {
            Ok(frozen) => {
                tracing::info!("state written and memory frozen in {:?}", started.elapsed());
                let files = std::iter::once(&frozen.base).chain(&frozen.layers);
                let fds = match files.map(|f| f.try_clone().map(OwnedFd::from)).collect::<Result<Vec<_>, _>>() {
                    Ok(fds) => fds,
                    Err(e) => return ApiError::FrozenFds(e).into(),
                };
                let mut response = ApiResponse::json(&FrozenMemory { mem_fds: fds.len() });
                response.fds = fds;
                response
            }
            Err(VmmError::Snapshot(e)) => ApiError::Snapshot(e).into(),
            Err(e) => ApiError::Freeze(e).into(),
        };
    }
    let files = SnapshotFiles { state: state_path, memory: params.mem_file_path.clone().into() };
    match vmm.snapshot(&files, vcpus) {
        Ok(info) => {
            tracing::info!(
                "snapshot written in {:?}: state {} bytes, {} KiB of memory data",
                started.elapsed(),
                info.state_bytes,
                info.memory_bytes >> 10
            );
            ApiResponse::no_content()
        }
        Err(e) => ApiError::Snapshot(e).into(),
    }
}

/// The moment a PUT /deadline names.
pub(super) fn deadline_time(deadline: api::models::Deadline) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(deadline.unix_ms)
}

/// Puts another file behind a drive (PATCH /drives/{id}).
fn update_drive(patch: &PartialDrive, vmm: &mut Vmm, backing: &disk::BackingPolicy) -> Result<(), ApiError> {
    let path = PathBuf::from(patch.path_on_host.as_deref().unwrap_or_default());
    vmm.update_drive(&patch.drive_id, &path, patch.format.map(crate::config::disk_format), backing)
        .map_err(|source| ApiError::UpdateDrive { id: patch.drive_id.clone(), source })?;
    tracing::info!("drive {} now on {}", patch.drive_id, path.display());
    Ok(())
}
