//! A VMM process driven through its API, as Firecracker is: it starts empty, takes the VM's
//! configuration piece by piece ([`preboot`]), builds and starts the VM on `InstanceStart` or
//! restores one from a snapshot (`PUT /snapshot/load`), then answers runtime calls
//! ([`runtime`]: pause, resume, info, snapshots) until the guest ends.

mod error;
mod preboot;
pub mod runtime;

use std::io::Write;
use std::time::Instant;

use api::models::{InstanceInfo, InstanceState};
use api::{ApiChannel, ApiResponse};

pub use self::error::ApiError;
use self::preboot::PrebootController;
use crate::runtime::{self as runner, RunError, RunOutcome};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("the API server stopped before the VM was started")]
    ApiGone,
    #[error(transparent)]
    Run(#[from] RunError),
}

/// `GET /`, before and after the start.
fn info(id: &str, state: InstanceState) -> ApiResponse {
    ApiResponse::json(&InstanceInfo {
        id: id.to_string(),
        state,
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        app_name: "ember".into(),
    })
}

/// Serves `channel` until the VM has been started and has ended. The guest's console goes to
/// `console`; the backing files of the drives' qcow2 layers may lie only where `backing`
/// allows. The calling thread becomes the VMM's main thread: it installs the main seccomp
/// filter before it takes the first request.
pub fn serve(
    channel: ApiChannel,
    id: String,
    started: Instant,
    backing: disk::BackingPolicy,
    console: Box<dyn Write + Send>,
) -> Result<RunOutcome, ControllerError> {
    runner::confine_main_thread()?;
    let mut preboot = PrebootController::new(id, backing, console, channel.home());
    loop {
        let call = channel.calls.recv().map_err(|_| ControllerError::ApiGone)?;
        if let Some(start) = preboot.answer(call) {
            let (vmm, api) = start.into_parts(channel);
            return Ok(runner::run_with_api(vmm, started, false, Some(api))?);
        }
    }
}
