//! Why the API refuses a request, and the one place that turns a refusal into an HTTP answer.

use api::models::ActionType;
use api::ApiResponse;

use crate::builder::BuildError;
use crate::device_manager::DeviceError;
use crate::resources::ResourceError;
use crate::snapshot::SnapshotError;
use crate::vmm::VmmError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("The microVM is not running yet: configure its drives with PUT /drives.")]
    DriveUpdateBeforeStart,
    #[error("The microVM is not running yet: start it first.")]
    NotStarted,
    #[error("The microVM is not running yet: there is nothing to snapshot.")]
    NothingToSnapshot,
    #[error("{0:?} is only possible once the microVM runs.")]
    ActionBeforeStart(ActionType),
    #[error(transparent)]
    Resources(#[from] ResourceError),
    #[error("Cannot start the microVM: {0}")]
    Configuration(ResourceError),
    #[error("Cannot start the microVM: {0}")]
    Build(#[from] BuildError),
    #[error("Cannot load the snapshot: {0}")]
    Load(#[from] SnapshotError),
    #[error("{0}")]
    Pause(VmmError),
    #[error("Cannot create a snapshot: the microVM is not paused; pause it first (PATCH /vm)")]
    NotPaused,
    #[error("Cannot create the snapshot: {0}")]
    VcpuStates(VmmError),
    #[error("Cannot create the snapshot: {0}")]
    Snapshot(SnapshotError),
    #[error("{0}")]
    Freeze(VmmError),
    #[error("Cannot pass the frozen memory on: {0}")]
    FrozenFds(std::io::Error),
    #[error("Cannot update drive {id}: {source}")]
    UpdateDrive { id: String, source: DeviceError },
    #[error("Loading a snapshot is not allowed after the microVM started.")]
    LoadAfterStart,
    #[error("The microVM is already running.")]
    AlreadyRunning,
    #[error(
        "SendCtrlAltDel needs an i8042 keyboard driver in the guest, which ember's guest kernel does not have; \
         stop the VM by powering it off from inside or by ending its VMM process"
    )]
    CtrlAltDel,
    #[error("There is no metrics file to flush to: set one with PUT /metrics before the start.")]
    NoMetricsFile,
    #[error("Cannot write the metrics to {}: {source}", path.display())]
    Metrics { path: std::path::PathBuf, source: std::io::Error },
    #[error("{0}")]
    MetricsFile(crate::files::FileError),
    #[error("The metrics file can only be set before the microVM starts.")]
    MetricsAfterStart,
    #[error("The requested operation is not supported after starting the microVM.")]
    ConfigAfterStart,
}

impl ApiError {
    /// 500 for failures of the VMM itself, 400 for requests it cannot do.
    fn status(&self) -> u16 {
        match self {
            Self::Pause(_) | Self::VcpuStates(_) | Self::Freeze(_) | Self::FrozenFds(_) => 500,
            _ => 400,
        }
    }
}

impl From<ApiError> for ApiResponse {
    fn from(e: ApiError) -> Self {
        ApiResponse::fault(e.status(), e.to_string())
    }
}

/// What a request that needs no body answers.
pub fn answer(result: Result<(), ApiError>) -> ApiResponse {
    match result {
        Ok(()) => ApiResponse::no_content(),
        Err(e) => e.into(),
    }
}
