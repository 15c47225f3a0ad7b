//! The per-VM API: HTTP/1.1 + JSON over a Unix socket, with Firecracker's endpoints and bodies,
//! so that a control plane embeds one ember VMM process per VM the way it would embed
//! Firecracker.
//!
//! The HTTP side ([`server`]) runs on a thread of its own and only parses and routes; every
//! request is handed as an [`ApiRequest`] to the VMM's main thread ([`ApiChannel`]), which owns
//! the VM and answers. [`client`] is the matching client the `ember` CLI uses.

pub mod client;
pub mod models;
pub mod server;
pub mod snapshot_meta;

use std::sync::mpsc;

use vmm_sys_util::eventfd::EventFd;

/// A routed, parsed request.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    GetInfo,
    GetMachineConfig,
    PutBootSource(models::BootSource),
    PutMachineConfig(models::MachineConfig),
    PutDrive(models::Drive),
    PatchDrive(models::PartialDrive),
    PutVsock(models::Vsock),
    PutMetrics(models::MetricsConfig),
    Action(models::ActionType),
    PatchVm(models::VmState),
    CreateSnapshot(models::SnapshotCreateParams),
    LoadSnapshot(models::SnapshotLoadParams),
}

/// An HTTP status and an optional JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Option<String>,
}

impl ApiResponse {
    pub fn no_content() -> Self {
        Self { status: 204, body: None }
    }

    pub fn json<T: serde::Serialize>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self { status: 200, body: Some(body) },
            Err(e) => Self::fault(500, format!("cannot encode the response: {e}")),
        }
    }

    /// Firecracker's error shape: `{"fault_message": ...}`.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        let fault = models::Fault { fault_message: message.into() };
        Self { status, body: serde_json::to_string(&fault).ok() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::fault(400, message)
    }
}

/// One request on its way to the VMM thread, with where to send the answer.
pub struct ApiCall {
    pub request: ApiRequest,
    pub reply: mpsc::Sender<ApiResponse>,
}

/// The VMM thread's end: calls arrive on `calls`, and `evt` becomes readable when one has
/// arrived, so the event loop can wait on it with everything else.
pub struct ApiChannel {
    pub calls: mpsc::Receiver<ApiCall>,
    pub evt: EventFd,
}

/// The HTTP thread's end.
#[derive(Clone)]
pub struct ApiSender {
    calls: mpsc::Sender<ApiCall>,
    evt: std::sync::Arc<EventFd>,
}

impl ApiSender {
    /// Hands `request` to the VMM thread and waits for its answer.
    pub fn call(&self, request: ApiRequest) -> ApiResponse {
        let (reply, answer) = mpsc::channel();
        if self.calls.send(ApiCall { request, reply }).is_err() || self.evt.write(1).is_err() {
            return ApiResponse::fault(503, "the VMM is shutting down");
        }
        answer.recv().unwrap_or_else(|_| ApiResponse::fault(503, "the VMM is shutting down"))
    }
}

pub fn channel() -> std::io::Result<(ApiSender, ApiChannel)> {
    let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    Ok((ApiSender { calls: tx, evt: std::sync::Arc::new(evt.try_clone()?) }, ApiChannel { calls: rx, evt }))
}
