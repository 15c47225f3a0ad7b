//! The HTTP side of the API: a `tiny_http` server on the VM's Unix socket, on its own thread.
//! It parses and routes requests and hands them to the VMM thread; it never touches the VM.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use serde::de::DeserializeOwned;
use tiny_http::{Header, Method, Response, Server};

use super::models::{
    BootSource, Drive, InstanceActionInfo, MachineConfig, MetricsConfig, PartialDrive, SnapshotCreateParams, SnapshotLoadParams, Vm, Vsock,
};
use super::{ApiRequest, ApiResponse, ApiSender};

/// Firecracker's bodies are a few hundred bytes; anything much larger is not a request.
const MAX_BODY: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot serve the API on {path}: it already exists (another VMM's socket, or a stale one)")]
    Exists { path: PathBuf },
    #[error("cannot serve the API on {path}: {reason}")]
    Bind { path: PathBuf, reason: String },
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// Starts serving the API on a new Unix socket at `path`.
pub fn start(path: &Path, sender: ApiSender) -> Result<JoinHandle<()>, ServerError> {
    if path.symlink_metadata().is_ok() {
        return Err(ServerError::Exists { path: path.to_path_buf() });
    }
    let server = Server::http_unix(path)
        .map_err(|e| ServerError::Bind { path: path.to_path_buf(), reason: e.to_string() })?;
    std::thread::Builder::new()
        .name("ember-api".into())
        .spawn(move || serve(server, sender))
        .map_err(ServerError::Thread)
}

fn serve(server: Server, sender: ApiSender) {
    for mut request in server.incoming_requests() {
        let mut body = Vec::new();
        let read = request.as_reader().take(MAX_BODY + 1).read_to_end(&mut body);
        let response = match read {
            Err(e) => ApiResponse::bad_request(format!("cannot read the request body: {e}")),
            Ok(_) if body.len() as u64 > MAX_BODY => {
                ApiResponse::fault(413, format!("the request body is larger than {MAX_BODY} bytes"))
            }
            Ok(_) => match route(request.method(), request.url(), &body) {
                Ok(api_request) => {
                    tracing::debug!("API request: {api_request:?}");
                    sender.call(api_request)
                }
                Err(fault) => fault,
            },
        };
        let mut reply = Response::from_data(response.body.unwrap_or_default().into_bytes())
            .with_status_code(response.status);
        if response.status != 204 {
            reply.add_header(Header::from_bytes("Content-Type", "application/json").expect("a valid header"));
        }
        if let Err(e) = request.respond(reply) {
            tracing::debug!("cannot answer an API request: {e}");
        }
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiResponse> {
    if body.is_empty() {
        return Err(ApiResponse::bad_request("the request has no body"));
    }
    serde_json::from_slice(body).map_err(|e| ApiResponse::bad_request(format!("the request body is not valid: {e}")))
}

/// Maps a method, path and body to an [`ApiRequest`], or to the 400 that says why not.
pub fn route(method: &Method, url: &str, body: &[u8]) -> Result<ApiRequest, ApiResponse> {
    let path = url.split('?').next().unwrap_or(url).trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (method, segments.as_slice()) {
        (Method::Get, []) => Ok(ApiRequest::GetInfo),
        (Method::Get, ["machine-config"]) => Ok(ApiRequest::GetMachineConfig),
        (Method::Put, ["boot-source"]) => Ok(ApiRequest::PutBootSource(parse::<BootSource>(body)?)),
        (Method::Put, ["machine-config"]) => {
            let config: MachineConfig = parse(body)?;
            config.check().map_err(ApiResponse::bad_request)?;
            Ok(ApiRequest::PutMachineConfig(config))
        }
        (Method::Put, ["drives", id]) => {
            let drive: Drive = parse(body)?;
            drive.check(id).map_err(ApiResponse::bad_request)?;
            Ok(ApiRequest::PutDrive(drive))
        }
        (Method::Patch, ["drives", id]) => {
            let drive: PartialDrive = parse(body)?;
            drive.check(id).map_err(ApiResponse::bad_request)?;
            Ok(ApiRequest::PatchDrive(drive))
        }
        (Method::Put, ["metrics"]) => Ok(ApiRequest::PutMetrics(parse::<MetricsConfig>(body)?)),
        (Method::Put, ["vsock"]) => Ok(ApiRequest::PutVsock(parse::<Vsock>(body)?)),
        (Method::Put, ["actions"]) => Ok(ApiRequest::Action(parse::<InstanceActionInfo>(body)?.action_type)),
        (Method::Patch, ["vm"]) => Ok(ApiRequest::PatchVm(parse::<Vm>(body)?.state)),
        (Method::Put, ["snapshot", "create"]) => {
            let params: SnapshotCreateParams = parse(body)?;
            params.check().map_err(ApiResponse::bad_request)?;
            Ok(ApiRequest::CreateSnapshot(params))
        }
        (Method::Put, ["snapshot", "load"]) => {
            let params: SnapshotLoadParams = parse(body)?;
            params.mem_file().map_err(ApiResponse::bad_request)?;
            Ok(ApiRequest::LoadSnapshot(params))
        }
        _ => Err(ApiResponse::bad_request(format!("Invalid request method and/or path: {method} {url}."))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::{ActionType, VmState};

    fn fault_of(r: Result<ApiRequest, ApiResponse>) -> String {
        let response = r.unwrap_err();
        assert_eq!(response.status, 400);
        response.body.unwrap()
    }

    #[test]
    fn routes_firecracker_endpoints() {
        assert_eq!(route(&Method::Get, "/", b"").unwrap(), ApiRequest::GetInfo);
        assert_eq!(
            route(&Method::Put, "/actions", br#"{"action_type":"SendCtrlAltDel"}"#).unwrap(),
            ApiRequest::Action(ActionType::SendCtrlAltDel)
        );
        assert_eq!(route(&Method::Patch, "/vm", br#"{"state":"Resumed"}"#).unwrap(), ApiRequest::PatchVm(VmState::Resumed));
        let drive = br#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true,"is_read_only":true}"#;
        match route(&Method::Put, "/drives/rootfs", drive).unwrap() {
            ApiRequest::PutDrive(d) => assert!(d.is_root_device && d.is_read_only),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_400_with_a_fault_message() {
        assert!(fault_of(route(&Method::Delete, "/vm", b"")).contains("Invalid request method and/or path"));
        assert!(fault_of(route(&Method::Put, "/boot-source", b"")).contains("no body"));
        assert!(fault_of(route(&Method::Put, "/boot-source", b"{nope")).contains("not valid"));
        assert!(fault_of(route(&Method::Patch, "/vm", br#"{"state":"Sleeping"}"#)).contains("unknown variant"));
        let mismatched = br#"{"drive_id":"a","path_on_host":"/x","is_root_device":false}"#;
        assert!(fault_of(route(&Method::Put, "/drives/b", mismatched)).contains("differs"));
        let diff = br#"{"snapshot_type":"Diff","snapshot_path":"s","mem_file_path":"m"}"#;
        assert!(fault_of(route(&Method::Put, "/snapshot/create", diff)).contains("full snapshots only"));
        let uffd = br#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"u"}}"#;
        assert!(fault_of(route(&Method::Put, "/snapshot/load", uffd)).contains("only File"));
        assert!(matches!(
            route(&Method::Put, "/snapshot/load", br#"{"snapshot_path":"s","mem_file_path":"m"}"#),
            Ok(ApiRequest::LoadSnapshot(_))
        ));
    }

    #[test]
    fn fork_requests_route_and_are_checked() {
        match route(&Method::Patch, "/drives/rootfs", br#"{"drive_id":"rootfs","path_on_host":"/new.qcow2"}"#) {
            Ok(ApiRequest::PatchDrive(d)) => assert_eq!(d.path_on_host.as_deref(), Some("/new.qcow2")),
            other => panic!("{other:?}"),
        }
        assert!(fault_of(route(&Method::Patch, "/drives/b", br#"{"drive_id":"a","path_on_host":"/x"}"#)).contains("differs"));
        assert!(fault_of(route(&Method::Patch, "/drives/a", br#"{"drive_id":"a"}"#)).contains("path_on_host is missing"));
        let freeze = br#"{"snapshot_path":"s","freeze_memory":true}"#;
        match route(&Method::Put, "/snapshot/create", freeze) {
            Ok(ApiRequest::CreateSnapshot(c)) => assert!(c.freeze_memory && c.mem_file_path.is_empty()),
            other => panic!("{other:?}"),
        }
        let both = br#"{"snapshot_path":"s","mem_file_path":"m","freeze_memory":true}"#;
        assert!(fault_of(route(&Method::Put, "/snapshot/create", both)).contains("leave out mem_file_path"));
        let neither = br#"{"snapshot_path":"s"}"#;
        assert!(fault_of(route(&Method::Put, "/snapshot/create", neither)).contains("mem_file_path must not be empty"));
        let layered = br#"{"snapshot_path":"s","mem_file_path":"/proc/1/fd/9","mem_layers":["/proc/1/fd/10"]}"#;
        match route(&Method::Put, "/snapshot/load", layered) {
            Ok(ApiRequest::LoadSnapshot(l)) => assert_eq!(l.mem_layers, ["/proc/1/fd/10"]),
            other => panic!("{other:?}"),
        }
    }
}
