//! The HTTP side of the API: HTTP/1.1 on the VM's Unix socket, served by one thread for all
//! connections (`httparse` for the requests). It parses and routes requests and hands them to
//! the VMM thread; it never touches the VM. One thread, not one per connection: every thread's
//! pages stay resident in the VMM for the VM's whole life.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::models::{
    BootSource, Drive, InstanceActionInfo, MachineConfig, MetricsConfig, PartialDrive, SnapshotCreateParams, SnapshotLoadParams, Vm, Vsock,
};
use super::{ApiRequest, ApiResponse, ApiSender};

/// Firecracker's bodies are a few hundred bytes; anything much larger is not a request.
const MAX_BODY: usize = 64 << 10;
/// Request line and headers.
const MAX_HEAD: usize = 16 << 10;
/// How long a client that does not read its response may hold the API up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot serve the API on {path}: it already exists (another VMM's socket, or a stale one)")]
    Exists { path: PathBuf },
    #[error("cannot serve the API on {path}: {reason}")]
    Bind { path: PathBuf, reason: String },
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

/// Starts serving the API on a new Unix socket at `path`, from a thread that has installed its
/// seccomp filter (the API one) before it accepts a connection.
pub fn start(path: &Path, sender: ApiSender) -> Result<JoinHandle<()>, ServerError> {
    if path.symlink_metadata().is_ok() {
        return Err(ServerError::Exists { path: path.to_path_buf() });
    }
    let bind = |e: std::io::Error| ServerError::Bind { path: path.to_path_buf(), reason: e.to_string() };
    let listener = UnixListener::bind(path).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let (filtered, installed) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("ember-api".into())
        .spawn(move || {
            let result = seccomp::install(seccomp::Thread::Api);
            let ok = result.is_ok();
            let _ = filtered.send(result);
            if ok {
                serve(listener, sender);
            }
        })
        .map_err(ServerError::Thread)?;
    installed.recv().map_err(|_| ServerError::Thread(std::io::Error::other("the API thread ended at its start")))??;
    Ok(thread)
}

/// A client connection: the bytes it sent that are not handled yet.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// A `100 Continue` went out for the request in `buf`.
    continued: bool,
}

fn serve(listener: UnixListener, sender: ApiSender) {
    let mut conns: Vec<Conn> = Vec::new();
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(conns.iter().map(|c| c.stream.as_raw_fd()))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: fds is a valid array of fds.len() pollfd structures.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("the API server stops: poll failed: {e}");
            return;
        }
        for i in (0..conns.len()).rev() {
            if fds[i + 1].revents != 0 && !serve_conn(&mut conns[i], &sender) {
                conns.swap_remove(i);
            }
        }
        if fds[0].revents != 0 {
            while let Ok((stream, _)) = listener.accept() {
                let ready = stream.set_nonblocking(false).and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
                match ready {
                    Ok(()) => conns.push(Conn { stream, buf: Vec::new(), continued: false }),
                    Err(e) => tracing::debug!("cannot set up an API connection: {e}"),
                }
            }
        }
    }
}

/// Reads what the client sent (poll said it would not block) and answers every complete request
/// in it. Returns false once the connection is to be closed.
fn serve_conn(conn: &mut Conn, sender: &ApiSender) -> bool {
    let had = conn.buf.len();
    conn.buf.resize(had + 4096, 0);
    match conn.stream.read(&mut conn.buf[had..]) {
        Ok(0) | Err(_) => return false,
        Ok(n) => conn.buf.truncate(had + n),
    }
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(&conn.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if conn.buf.len() <= MAX_HEAD => return true,
            Ok(httparse::Status::Partial) => return reply_and_close(conn, ApiResponse::bad_request("the request headers are too long")),
            Err(e) => return reply_and_close(conn, ApiResponse::bad_request(format!("malformed HTTP request: {e}"))),
        };
        let header = |name: &str| {
            request.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value))
        };
        if header("transfer-encoding").is_some() {
            return reply_and_close(conn, ApiResponse::bad_request("chunked request bodies are not supported: send a Content-Length"));
        }
        let Some(body_len) = header("content-length").map_or(Some(0), |v| v.trim().parse::<usize>().ok()) else {
            return reply_and_close(conn, ApiResponse::bad_request("the Content-Length is not a number"));
        };
        if body_len > MAX_BODY {
            return reply_and_close(conn, ApiResponse::fault(413, format!("the request body is larger than {MAX_BODY} bytes")));
        }
        if conn.buf.len() < head_len + body_len {
            let expects = header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
            if expects && !conn.continued {
                conn.continued = true;
                return conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_ok();
            }
            return true;
        }
        let close = match header("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => true,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => false,
            _ => request.version != Some(1),
        };
        let (method, url) = (request.method.unwrap_or_default(), request.path.unwrap_or_default());
        let response = match route(method, url, &conn.buf[head_len..head_len + body_len]) {
            Ok(api_request) => {
                tracing::debug!("API request: {api_request:?}");
                sender.call(api_request)
            }
            Err(fault) => fault,
        };
        conn.buf.drain(..head_len + body_len);
        conn.continued = false;
        if let Err(e) = conn.stream.write_all(&encode(&response)) {
            tracing::debug!("cannot answer an API request: {e}");
            return false;
        }
        if close {
            return false;
        }
    }
}

/// Answers a request that cannot be read to its end; the connection goes with it.
fn reply_and_close(conn: &mut Conn, response: ApiResponse) -> bool {
    let _ = conn.stream.write_all(&encode(&response));
    false
}

/// The HTTP/1.1 response.
fn encode(response: &ApiResponse) -> Vec<u8> {
    let reason = match response.status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "",
    };
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    if response.status != 204 {
        let body = response.body.as_deref().unwrap_or_default();
        out += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    } else {
        out += "\r\n";
    }
    out.into_bytes()
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiResponse> {
    if body.is_empty() {
        return Err(ApiResponse::bad_request("the request has no body"));
    }
    serde_json::from_slice(body).map_err(|e| ApiResponse::bad_request(format!("the request body is not valid: {e}")))
}

/// Maps a method, path and body to an [`ApiRequest`], or to the 400 that says why not.
pub fn route(method: &str, url: &str, body: &[u8]) -> Result<ApiRequest, ApiResponse> {
    let path = url.split('?').next().unwrap_or(url).trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (method, segments.as_slice()) {
        ("GET", []) => Ok(ApiRequest::GetInfo),
        ("GET", ["machine-config"]) => Ok(ApiRequest::GetMachineConfig),
        ("PUT", ["boot-source"]) => Ok(ApiRequest::PutBootSource(parse::<BootSource>(body)?)),
        ("PUT", ["machine-config"]) => {
            let config: MachineConfig = parse(body)?;
            config.check().map_err(|e| ApiResponse::bad_request(e.to_string()))?;
            Ok(ApiRequest::PutMachineConfig(config))
        }
        ("PUT", ["drives", id]) => {
            let drive: Drive = parse(body)?;
            drive.check(id).map_err(|e| ApiResponse::bad_request(e.to_string()))?;
            Ok(ApiRequest::PutDrive(drive))
        }
        ("PATCH", ["drives", id]) => {
            let drive: PartialDrive = parse(body)?;
            drive.check(id).map_err(|e| ApiResponse::bad_request(e.to_string()))?;
            Ok(ApiRequest::PatchDrive(drive))
        }
        ("PUT", ["metrics"]) => Ok(ApiRequest::PutMetrics(parse::<MetricsConfig>(body)?)),
        ("PUT", ["vsock"]) => Ok(ApiRequest::PutVsock(parse::<Vsock>(body)?)),
        ("PUT", ["actions"]) => Ok(ApiRequest::Action(parse::<InstanceActionInfo>(body)?.action_type)),
        ("PATCH", ["vm"]) => Ok(ApiRequest::PatchVm(parse::<Vm>(body)?.state)),
        ("PUT", ["snapshot", "create"]) => {
            let params: SnapshotCreateParams = parse(body)?;
            params.check().map_err(|e| ApiResponse::bad_request(e.to_string()))?;
            Ok(ApiRequest::CreateSnapshot(params))
        }
        ("PUT", ["snapshot", "load"]) => {
            let params: SnapshotLoadParams = parse(body)?;
            params.mem_file().map_err(|e| ApiResponse::bad_request(e.to_string()))?;
            Ok(ApiRequest::LoadSnapshot(params))
        }
        _ => Err(ApiResponse::bad_request(format!("Invalid request method and/or path: {method} {url}."))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{ActionType, VmState};

    fn fault_of(r: Result<ApiRequest, ApiResponse>) -> String {
        let response = r.unwrap_err();
        assert_eq!(response.status, 400);
        response.body.unwrap()
    }

    /// Reads from `s` until `want` responses (each ending in its body, `{}` here) have come.
    fn read_responses(s: &mut UnixStream, want: usize) -> String {
        let mut out = String::new();
        let mut buf = [0u8; 1024];
        while out.matches("HTTP/1.1 200").count() < want || !out.ends_with('}') {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the connection closed early: {out}");
            out += std::str::from_utf8(&buf[..n]).unwrap();
        }
        out
    }

    #[test]
    fn one_thread_serves_kept_alive_connections_side_by_side() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let socket = dir.as_path().join("api.sock");
        let (sender, channel) = crate::channel().unwrap();
        start(&socket, sender).unwrap();
        std::thread::spawn(move || {
            for call in channel.calls.iter() {
                let _ = call.reply.send(ApiResponse { status: 200, body: Some("{}".into()) });
            }
        });
        // Two clients that keep their connections open, served in turn; one sends two
        // requests at once.
        let mut a = UnixStream::connect(&socket).unwrap();
        let mut b = UnixStream::connect(&socket).unwrap();
        a.write_all(b"GET / HTTP/1.1\r\n\r\nGET /machine-config HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_responses(&mut a, 2).matches("Content-Length: 2\r\n").count(), 2);
        b.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        read_responses(&mut b, 1);
        // A client that waits for 100 Continue before the body (curl does, for bodies over 1 KiB).
        a.write_all(b"PATCH /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 20\r\n\r\n").unwrap();
        let mut continued = [0u8; 25];
        a.read_exact(&mut continued).unwrap();
        assert_eq!(&continued, b"HTTP/1.1 100 Continue\r\n\r\n");
        a.write_all(br#"{"state":"Resumed"}"#).unwrap();
        a.write_all(b" ").unwrap();
        read_responses(&mut a, 1);
        // HTTP/1.0 closes after the response unless asked otherwise.
        let mut c = UnixStream::connect(&socket).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n") && reply.ends_with("{}"), "{reply}");
    }

    #[test]
    fn routes_firecracker_endpoints() {
        assert_eq!(route("GET", "/", b"").unwrap(), ApiRequest::GetInfo);
        assert_eq!(
            route("PUT", "/actions", br#"{"action_type":"SendCtrlAltDel"}"#).unwrap(),
            ApiRequest::Action(ActionType::SendCtrlAltDel)
        );
        assert_eq!(route("PATCH", "/vm", br#"{"state":"Resumed"}"#).unwrap(), ApiRequest::PatchVm(VmState::Resumed));
        let drive = br#"{"drive_id":"rootfs","path_on_host":"/x","is_root_device":true,"is_read_only":true}"#;
        match route("PUT", "/drives/rootfs", drive).unwrap() {
            ApiRequest::PutDrive(d) => assert!(d.is_root_device && d.is_read_only),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_400_with_a_fault_message() {
        assert!(fault_of(route("DELETE", "/vm", b"")).contains("Invalid request method and/or path"));
        assert!(fault_of(route("PUT", "/boot-source", b"")).contains("no body"));
        assert!(fault_of(route("PUT", "/boot-source", b"{nope")).contains("not valid"));
        assert!(fault_of(route("PATCH", "/vm", br#"{"state":"Sleeping"}"#)).contains("unknown variant"));
        let mismatched = br#"{"drive_id":"a","path_on_host":"/x","is_root_device":false}"#;
        assert!(fault_of(route("PUT", "/drives/b", mismatched)).contains("differs"));
        let diff = br#"{"snapshot_type":"Diff","snapshot_path":"s","mem_file_path":"m"}"#;
        assert!(fault_of(route("PUT", "/snapshot/create", diff)).contains("full snapshots only"));
        let uffd = br#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"u"}}"#;
        assert!(fault_of(route("PUT", "/snapshot/load", uffd)).contains("only File"));
        assert!(matches!(
            route("PUT", "/snapshot/load", br#"{"snapshot_path":"s","mem_file_path":"m"}"#),
            Ok(ApiRequest::LoadSnapshot(_))
        ));
    }

    #[test]
    fn fork_requests_route_and_are_checked() {
        match route("PATCH", "/drives/rootfs", br#"{"drive_id":"rootfs","path_on_host":"/new.qcow2"}"#) {
            Ok(ApiRequest::PatchDrive(d)) => assert_eq!(d.path_on_host.as_deref(), Some("/new.qcow2")),
            other => panic!("{other:?}"),
        }
        assert!(fault_of(route("PATCH", "/drives/b", br#"{"drive_id":"a","path_on_host":"/x"}"#)).contains("differs"));
        assert!(fault_of(route("PATCH", "/drives/a", br#"{"drive_id":"a"}"#)).contains("path_on_host is missing"));
        let freeze = br#"{"snapshot_path":"s","freeze_memory":true}"#;
        match route("PUT", "/snapshot/create", freeze) {
            Ok(ApiRequest::CreateSnapshot(c)) => assert!(c.freeze_memory && c.mem_file_path.is_empty()),
            other => panic!("{other:?}"),
        }
        let both = br#"{"snapshot_path":"s","mem_file_path":"m","freeze_memory":true}"#;
        assert!(fault_of(route("PUT", "/snapshot/create", both)).contains("leave out mem_file_path"));
        let neither = br#"{"snapshot_path":"s"}"#;
        assert!(fault_of(route("PUT", "/snapshot/create", neither)).contains("mem_file_path must not be empty"));
        let layered = br#"{"snapshot_path":"s","mem_file_path":"/proc/1/fd/9","mem_layers":["/proc/1/fd/10"]}"#;
        match route("PUT", "/snapshot/load", layered) {
            Ok(ApiRequest::LoadSnapshot(l)) => assert_eq!(l.mem_layers, ["/proc/1/fd/10"]),
            other => panic!("{other:?}"),
        }
    }
}
