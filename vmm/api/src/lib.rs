//! The per-VM API: HTTP/1.1 + JSON over a Unix socket, with Firecracker's endpoints and bodies,
//! so that a control plane embeds one ember VMM process per VM the way it would embed
//! Firecracker.
//!
//! The HTTP side ([`server`]) runs on a thread of its own and only parses and routes; every
//! request is handed as an [`ApiRequest`] to the VMM's main thread ([`ApiChannel`]), which owns
//! the VM and answers. [`client`] is the matching client the `ember` CLI uses. Requests and
//! responses can carry file descriptors ([`scm`]): a fork's frozen memory travels that way.

pub mod client;
pub mod models;
pub mod scm;
pub mod server;
pub mod snapshot_meta;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, OnceLock};

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
    PutDeadline(models::Deadline),
    Action(models::ActionType),
    PatchVm(models::VmState),
    CreateSnapshot(models::SnapshotCreateParams),
    LoadSnapshot(models::SnapshotLoadParams),
}

/// An HTTP status, an optional JSON body, and the file descriptors that go with it (attached to
/// the response's first byte; the body says what they are).
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Option<String>,
    pub fds: Vec<OwnedFd>,
}

impl ApiResponse {
    pub fn no_content() -> Self {
        Self { status: 204, body: None, fds: Vec::new() }
    }

    pub fn json<T: serde::Serialize>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self { status: 200, body: Some(body), fds: Vec::new() },
            Err(e) => Self::fault(500, format!("cannot encode the response: {e}")),
        }
    }

    /// Firecracker's error shape: `{"fault_message": ...}`.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        let fault = models::Fault { fault_message: message.into() };
        Self { status, body: serde_json::to_string(&fault).ok(), fds: Vec::new() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::fault(400, message)
    }
}

/// One request on its way to the VMM thread, with the file descriptors that came with it and
/// where to send the answer. Descriptors the handler does not take are closed with the call.
pub struct ApiCall {
    pub request: ApiRequest,
    pub fds: Vec<OwnedFd>,
    pub reply: mpsc::Sender<ApiResponse>,
}

/// The API socket as the server bound it. Its inode identifies the VMM's own directory (the
/// one holding the socket) wherever the socket has been moved since: a spare VMM's socket is
/// moved into the sandbox's directory after the VMM started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketHome {
    /// The path the socket was bound at.
    pub bound_at: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

/// The VMM thread's end: calls arrive on `calls`, and `evt` becomes readable when one has
/// arrived, so the event loop can wait on it with everything else.
pub struct ApiChannel {
    pub calls: mpsc::Receiver<ApiCall>,
    pub evt: EventFd,
    home: Arc<OnceLock<SocketHome>>,
}

impl ApiChannel {
    /// The API socket, once the server has bound it.
    pub fn home(&self) -> Option<SocketHome> {
        self.home.get().cloned()
    }
}

/// The HTTP thread's end.
#[derive(Clone)]
pub struct ApiSender {
    calls: mpsc::Sender<ApiCall>,
    evt: Arc<EventFd>,
    home: Arc<OnceLock<SocketHome>>,
}

impl ApiSender {
    /// Hands `request` to the VMM thread and waits for its answer.
    pub fn call(&self, request: ApiRequest) -> ApiResponse {
        self.call_with_fds(request, Vec::new())
    }

    /// Hands `request` and the descriptors that came with it to the VMM thread and waits for
    /// its answer.
    pub fn call_with_fds(&self, request: ApiRequest, fds: Vec<OwnedFd>) -> ApiResponse {
        let (reply, answer) = mpsc::channel();
        if self.calls.send(ApiCall { request, fds, reply }).is_err() || self.evt.write(1).is_err() {
            return ApiResponse::fault(503, "the VMM is shutting down");
        }
        answer.recv().unwrap_or_else(|_| ApiResponse::fault(503, "the VMM is shutting down"))
    }

    /// Records where the server bound the socket, for the VMM thread ([`ApiChannel::home`]).
    pub(crate) fn set_home(&self, home: SocketHome) {
        let _ = self.home.set(home);
    }
}

pub fn channel() -> std::io::Result<(ApiSender, ApiChannel)> {
    let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    let home = Arc::new(OnceLock::new());
    Ok((
        ApiSender { calls: tx, evt: Arc::new(evt.try_clone()?), home: home.clone() },
        ApiChannel { calls: rx, evt, home },
    ))
}
