//! The HTTP side of the API: HTTP/1.1 on the VM's Unix socket, served by one thread for all
//! connections (`httparse` for the requests). It parses and routes requests and hands them to
//! the VMM thread; it never touches the VM. One thread, not one per connection: every thread's
//! pages stay resident in the VMM for the VM's whole life.
//!
//! No client can hold up another: sockets are non-blocking, each connection's response waits
//! in its own buffer until the client reads it, and nothing more is read from a client until it
//! has taken its last response (so a buffer holds one response at most); a client that takes
//! none for [`STALL`] is dropped. When `accept` fails for want of descriptors or memory, the
//! listener is left alone for [`ACCEPT_BACKOFF`] instead of being polled again at once.
//!
//! File descriptors sent with a request (`SCM_RIGHTS`, [`crate::scm`]) go with it to the VMM
//! thread: those that arrive with the bytes of a request are its own. A client sends them in
//! the same `sendmsg` as the request's bytes (the kernel then delivers them with those bytes);
//! any the handler does not take are closed. A response's descriptors go out with its first
//! byte.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::models::{
    BootSource, Deadline, Drive, InstanceActionInfo, MachineConfig, MetricsConfig, PartialDrive, SnapshotCreateParams, SnapshotLoadParams, Vm, Vsock,
};
use super::scm::{self, MAX_FDS};
use super::{ApiRequest, ApiResponse, ApiSender, SocketHome};

/// Firecracker's bodies are a few hundred bytes; anything much larger is not a request.
const MAX_BODY: usize = 64 << 10;
/// Request line and headers.
const MAX_HEAD: usize = 16 << 10;
/// How long a client may leave its response unread (or its request unfinished) before it is
/// dropped.
pub const STALL: Duration = if cfg!(test) { Duration::from_millis(300) } else { Duration::from_secs(10) };
/// Connections served at once; one more is answered 503 and closed.
pub const MAX_CONNS: usize = 64;
/// How long the listener is not polled after `accept` failed for want of descriptors or memory.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
    spawn(bind(path, &sender)?, sender)
}

/// Makes the API's socket at `path`: a VMM that jails itself binds it first, at the path the
/// control plane knows, and serves it from inside the jail. The socket's inode, recorded in
/// `sender`, marks the VMM's own directory (where the control plane links it into a jail).
pub fn bind(path: &Path, sender: &ApiSender) -> Result<UnixListener, ServerError> {
    if path.symlink_metadata().is_ok() {
        return Err(ServerError::Exists { path: path.to_path_buf() });
    }
    let bind = |e: std::io::Error| ServerError::Bind { path: path.to_path_buf(), reason: e.to_string() };
    let listener = UnixListener::bind(path).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let bound = path.symlink_metadata().map_err(bind)?;
    sender.set_home(SocketHome { bound_at: path.to_path_buf(), dev: bound.dev(), ino: bound.ino() });
    Ok(listener)
}

/// Serves the API on `listener` in a thread of its own, which installs its seccomp filter
/// before it accepts a connection.
pub fn spawn(listener: UnixListener, sender: ApiSender) -> Result<JoinHandle<()>, ServerError> {
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

/// A client connection.
struct Conn {
    stream: UnixStream,
    /// The bytes it sent that are not handled yet.
    input: Vec<u8>,
    /// Descriptors it sent, each with the offset in `input` of the last byte read with it.
    fds: Vec<(usize, OwnedFd)>,
    /// A `100 Continue` went out for the request in `input`.
    continued: bool,
    /// The response being sent, from `sent` on, and the descriptors for its first byte.
    output: Vec<u8>,
    sent: usize,
    out_fds: Vec<OwnedFd>,
    /// Close once `output` is sent.
    closing: bool,
    /// When it last made progress (bytes read or sent).
    progress: Instant,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            fds: Vec::new(),
            continued: false,
            output: Vec::new(),
            sent: 0,
            out_fds: Vec::new(),
            closing: false,
            progress: Instant::now(),
        }
    }

    /// Waiting on the client: a response it has not taken, or a request it has not finished.
    fn waiting(&self) -> bool {
        !self.output.is_empty() || !self.input.is_empty()
    }

    fn deadline(&self) -> Option<Instant> {
        self.waiting().then(|| self.progress + STALL)
    }

    /// Starts sending `response`; there is no other response in the buffer.
    fn queue(&mut self, response: ApiResponse) -> bool {
        self.output = encode(&response);
        self.sent = 0;
        self.out_fds = response.fds;
        self.flush()
    }

    /// Sends what the socket takes now; false if the connection is to be closed.
    fn flush(&mut self) -> bool {
        while self.sent < self.output.len() {
            let fds: Vec<BorrowedFd<'_>> = self.out_fds.iter().map(AsFd::as_fd).collect();
            match scm::send(self.stream.as_fd(), &self.output[self.sent..], &fds) {
                Ok(n) => {
                    self.sent += n;
                    self.out_fds.clear();
                    self.progress = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("cannot answer an API request: {e}");
                    return false;
                }
            }
        }
        self.output.clear();
        self.sent = 0;
        !self.closing
    }

    /// Answers a request that cannot be read to its end; the connection goes with it.
    fn reply_and_close(&mut self, response: ApiResponse) -> bool {
        self.closing = true;
        self.queue(response)
    }

    /// The descriptors that came with the first `len` bytes of input, which are consumed.
    fn take_request(&mut self, len: usize) -> Vec<OwnedFd> {
        self.input.drain(..len);
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fds).into_iter().partition(|(at, _)| *at < len);
        self.fds = rest.into_iter().map(|(at, fd)| (at - len, fd)).collect();
        mine.into_iter().map(|(_, fd)| fd).collect()
    }
}

fn serve(listener: UnixListener, sender: ApiSender) {
    let mut conns: Vec<Conn> = Vec::new();
    let mut listener_back_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if listener_back_at.is_some_and(|t| t <= now) {
            listener_back_at = None;
        }
        let listening = listener_back_at.is_none();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(conns.len() + 1);
        // While the listener backs off it stays in the array, unpolled (a negative fd).
        fds.push(libc::pollfd {
            fd: if listening { listener.as_raw_fd() } else { -1 },
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &conns {
            let events = if c.output.is_empty() { libc::POLLIN } else { libc::POLLOUT };
            fds.push(libc::pollfd { fd: c.stream.as_raw_fd(), events, revents: 0 });
        }
        let wake = conns.iter().filter_map(Conn::deadline).chain(listener_back_at).min();
        let timeout = wake.map_or(-1, |t| t.saturating_duration_since(now).as_millis().min(i32::MAX as u128) as i32 + 1);
        // SAFETY: fds is a valid array of fds.len() pollfd structures.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("the API server stops: poll failed: {e}");
            return;
        }
        for i in (0..conns.len()).rev() {
            let revents = fds[i + 1].revents;
            let keep = match revents {
                0 => conns[i].deadline().is_none_or(|t| Instant::now() < t),
                _ if !conns[i].output.is_empty() => conns[i].flush() && process(&mut conns[i], &sender),
                _ => on_readable(&mut conns[i], &sender),
            };
            if !keep {
                conns.swap_remove(i);
            }
        }
        if fds[0].revents != 0 {
            listener_back_at = accept_all(&listener, &mut conns);
        }
    }
}

/// Takes every pending connection; when out of descriptors or memory, when to try again.
fn accept_all(listener: &UnixListener, conns: &mut Vec<Conn>) -> Option<Instant> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nonblocking(true) {
                    tracing::debug!("cannot set up an API connection: {e}");
                    continue;
                }
                let mut conn = Conn::new(stream);
                if conns.len() >= MAX_CONNS {
                    let busy = format!("the API serves at most {MAX_CONNS} connections at once; close one and retry");
                    conn.reply_and_close(ApiResponse::fault(503, busy));
                    continue;
                }
                conns.push(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays queued, and polling the
                // listener again at once would only spin.
                tracing::warn!("the API cannot accept a connection ({e}); trying again in {ACCEPT_BACKOFF:?}");
                return Some(Instant::now() + ACCEPT_BACKOFF);
            }
        }
    }
}

/// Reads what the client sent (poll said it would not block) and answers every complete request
/// in it. Returns false once the connection is to be closed.
fn on_readable(conn: &mut Conn, sender: &ApiSender) -> bool {
    let had = conn.input.len();
    conn.input.resize(had + 4096, 0);
    let mut fds = Vec::new();
    let got = scm::recv(conn.stream.as_fd(), &mut conn.input[had..], &mut fds);
    conn.input.truncate(had + got.as_ref().map_or(0, |r| r.bytes));
    match got {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => return true,
        Err(_) => return false,
        Ok(r) if r.bytes == 0 => return false,
        Ok(r) if r.truncated || conn.fds.len() + fds.len() > MAX_FDS => {
            let message = format!("more than {MAX_FDS} file descriptors came with the request");
            return conn.reply_and_close(ApiResponse::bad_request(message));
        }
        Ok(_) => {}
    }
    conn.progress = Instant::now();
    let at = conn.input.len() - 1;
    conn.fds.extend(fds.into_iter().map(|fd| (at, fd)));
    process(conn, sender)
}

/// Answers the complete requests in the input while the client takes the answers. Returns false
/// once the connection is to be closed.
fn process(conn: &mut Conn, sender: &ApiSender) -> bool {
    while conn.output.is_empty() && !conn.input.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(&conn.input) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if conn.input.len() <= MAX_HEAD => return true,
            Ok(httparse::Status::Partial) => return conn.reply_and_close(ApiResponse::bad_request("the request headers are too long")),
            Err(e) => return conn.reply_and_close(ApiResponse::bad_request(format!("malformed HTTP request: {e}"))),
        };
        let header = |name: &str| {
            request.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value))
        };
        if header("transfer-encoding").is_some() {
            return conn.reply_and_close(ApiResponse::bad_request("chunked request bodies are not supported: send a Content-Length"));
        }
        let Some(body_len) = header("content-length").map_or(Some(0), |v| v.trim().parse::<usize>().ok()) else {
            return conn.reply_and_close(ApiResponse::bad_request("the Content-Length is not a number"));
        };
        if body_len > MAX_BODY {
            return conn.reply_and_close(ApiResponse::fault(413, format!("the request body is larger than {MAX_BODY} bytes")));
        }
        if conn.input.len() < head_len + body_len {
            let expects = header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
            if expects && !conn.continued {
                conn.continued = true;
                conn.output = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
                return conn.flush();
            }
            return true;
        }
        let close = match header("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => true,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => false,
            _ => request.version != Some(1),
        };
        let (method, url) = (request.method.unwrap_or_default(), request.path.unwrap_or_default());
        let routed = route(method, url, &conn.input[head_len..head_len + body_len]);
        let fds = conn.take_request(head_len + body_len);
        let response = match routed {
            Ok(api_request) => {
                tracing::debug!("API request: {api_request:?} with {} file descriptors", fds.len());
                sender.call_with_fds(api_request, fds)
            }
            Err(fault) => fault,
        };
        conn.continued = false;
        conn.closing = close;
        if !conn.queue(response) {
            return false;
        }
    }
    true
}

/// The HTTP/1.1 response.
fn encode(response: &ApiResponse) -> Vec<u8> {
    let reason = match response.status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
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
        ("PUT", ["deadline"]) => Ok(ApiRequest::PutDeadline(parse::<Deadline>(body)?)),
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
    use std::io::{Read, Write};

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
                let _ = call.reply.send(ApiResponse { status: 200, body: Some("{}".into()), fds: Vec::new() });
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

    /// A server on a new socket in `dir` whose VMM thread answers each call with `answer`.
    fn serve_with(dir: &Path, answer: impl Fn(crate::ApiCall) -> ApiResponse + Send + 'static) -> PathBuf {
        let socket = dir.join("api.sock");
        let (sender, channel) = crate::channel().unwrap();
        start(&socket, sender).unwrap();
        std::thread::spawn(move || {
            for call in channel.calls.iter() {
                let reply = call.reply.clone();
                let _ = reply.send(answer(call));
            }
        });
        socket
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array; the result is checked.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created and are owned by nobody else.
        unsafe { (std::os::fd::FromRawFd::from_raw_fd(fds[0]), std::os::fd::FromRawFd::from_raw_fd(fds[1])) }
    }

    /// Whether every write end of the pipe whose read end is `read` is closed, within 5 s.
    fn hung_up(read: &OwnedFd) -> bool {
        let mut p = libc::pollfd { fd: read.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 5000) };
        p.revents & libc::POLLHUP != 0
    }

    #[test]
    fn descriptors_sent_with_a_request_reach_the_handler_and_the_unused_are_closed() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let socket = serve_with(dir.as_path(), |call| {
            let body = format!("{{\"fds\":{}}}", call.fds.len());
            // The call, and with it every descriptor this handler did not take, is dropped here.
            ApiResponse { status: 200, body: Some(body), fds: Vec::new() }
        });
        let client = crate::client::ApiClient::new(&socket);
        let (read, write) = pipe();
        let (other_read, other_write) = pipe();
        let load = br#"{"snapshot_path":"s","mem_fds":2}"#;
        let (body, back) = client.request_with_fds("PUT", "/snapshot/load", Some(load), &[write.as_fd(), other_write.as_fd()]).unwrap();
        assert_eq!((String::from_utf8(body).unwrap().as_str(), back.len()), (r#"{"fds":2}"#, 0));
        drop((write, other_write));
        assert!(hung_up(&read) && hung_up(&other_read), "the server and the handler kept no copy");
        // A request that takes none: they are closed all the same.
        let (read, write) = pipe();
        client.request_with_fds("GET", "/", None, &[write.as_fd()]).unwrap();
        drop(write);
        assert!(hung_up(&read));
    }

    #[test]
    fn descriptors_of_a_response_reach_the_client() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let file = dir.as_path().join("memory");
        std::fs::write(&file, b"guest ram").unwrap();
        let socket = serve_with(dir.as_path(), move |_| {
            let fds = vec![OwnedFd::from(std::fs::File::open(&file).unwrap())];
            ApiResponse { status: 200, body: Some(r#"{"mem_fds":1}"#.into()), fds }
        });
        let client = crate::client::ApiClient::new(&socket);
        let freeze = crate::models::SnapshotCreateParams {
            snapshot_type: Default::default(),
            snapshot_path: "s".into(),
            mem_file_path: String::new(),
            freeze_memory: true,
        };
        let (frozen, fds): (crate::models::FrozenMemory, _) = client.put_for_with_fds("/snapshot/create", &freeze, &[]).unwrap();
        assert_eq!((frozen.mem_fds, fds.len()), (1, 1));
        let mut text = String::new();
        std::fs::File::from(fds.into_iter().next().unwrap()).read_to_string(&mut text).unwrap();
        assert_eq!(text, "guest ram");
    }

    #[test]
    fn a_client_that_never_reads_does_not_hold_up_another() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let big = format!("\"{}\"", "x".repeat(32 << 10));
        let socket = serve_with(dir.as_path(), move |_| ApiResponse { status: 200, body: Some(big.clone()), fds: Vec::new() });
        // 100 responses of 32 KiB are far more than a socket buffer holds.
        let mut stuck = UnixStream::connect(&socket).unwrap();
        stuck.write_all(&b"GET / HTTP/1.1\r\n\r\n".repeat(100)).unwrap();
        let queued = |s: &UnixStream| {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
            n as usize
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while queued(&stuck) < 64 << 10 {
            assert!(Instant::now() < deadline, "the server never answered the first client");
            std::thread::yield_now();
        }
        // The server is now answering a client that does not read; another is answered at once.
        let started = Instant::now();
        let mut other = UnixStream::connect(&socket).unwrap();
        other.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        other.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = Vec::new();
        other.read_to_end(&mut reply).unwrap();
        assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&reply[..reply.len().min(100)]));
        assert!(started.elapsed() < STALL, "answered in {:?}", started.elapsed());
        // The client that never read is dropped once it stalls: its stream ends early.
        let mut p = libc::pollfd { fd: stuck.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 10_000) };
        assert!(p.revents & libc::POLLRDHUP != 0, "the stalled client is still connected");
        let mut all = Vec::new();
        stuck.read_to_end(&mut all).unwrap();
        let answered = all.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
        assert!(answered < 100, "a stalled client was served to the end");
    }

    /// Run in a process of its own (a lowered descriptor limit would break other tests).
    const EMFILE_CHILD: &str = "EMBER_API_EMFILE_CHILD";

    #[test]
    fn accept_out_of_descriptors_backs_off_instead_of_spinning() {
        if std::env::var_os(EMFILE_CHILD).is_some() {
            return emfile_child();
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "server::tests::accept_out_of_descriptors_backs_off_instead_of_spinning", "--nocapture", "--test-threads=1"])
            .env(EMFILE_CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }

    fn cpu_time() -> Duration {
        // SAFETY: a zeroed rusage is valid for getrusage to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one rusage.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(usage.ru_utime) + tv(usage.ru_stime)
    }

    fn emfile_child() {
        let limit = libc::rlimit { rlim_cur: 128, rlim_max: 128 };
        // SAFETY: setrlimit reads one rlimit; this process is the test's own child.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-").unwrap();
        let socket = serve_with(dir.as_path(), |_| ApiResponse { status: 200, body: Some("{}".into()), fds: Vec::new() });
        // The client's socket exists before the descriptors run out; only the server's accept
        // then lacks one.
        // SAFETY: plain socket(2); the result is checked.
        let client = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(client >= 0);
        // SAFETY: the descriptor was just created and is owned by nobody else.
        let client: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(client) };
        let mut filler = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            filler.push(f);
        }
        let path = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a zeroed sockaddr_un is valid; the path fits (it was bound).
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as _;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: connect with a valid sockaddr_un of the given size.
        let r = unsafe {
            libc::connect(client.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), std::mem::size_of_val(&addr) as u32)
        };
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        // The connection is queued and the server cannot accept it: a server that polls the
        // listener again at once burns a core for the whole window.
        let before = cpu_time();
        let window = Instant::now();
        while window.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let spent = cpu_time() - before;
        assert!(spent < Duration::from_millis(100), "the server spent {spent:?} of CPU in 500 ms without descriptors");
        // Once descriptors are free again, the waiting client is served.
        drop(filler);
        let mut stream = UnixStream::from(client);
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    }

    #[test]
    fn routes_firecracker_endpoints() {
        assert_eq!(route("GET", "/", b"").unwrap(), ApiRequest::GetInfo);
        assert_eq!(
            route("PUT", "/actions", br#"{"action_type":"SendCtrlAltDel"}"#).unwrap(),
            ApiRequest::Action(ActionType::SendCtrlAltDel)
        );
        assert_eq!(route("PATCH", "/vm", br#"{"state":"Resumed"}"#).unwrap(), ApiRequest::PatchVm(VmState::Resumed));
        assert_eq!(
            route("PUT", "/deadline", br#"{"unix_ms":1700000000000}"#).unwrap(),
            ApiRequest::PutDeadline(Deadline { unix_ms: 1_700_000_000_000 })
        );
        assert!(route("PUT", "/deadline", br#"{"unix_ms":-1}"#).is_err());
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
        let by_fds = br#"{"snapshot_path":"s","mem_fds":2}"#;
        match route("PUT", "/snapshot/load", by_fds) {
            Ok(ApiRequest::LoadSnapshot(l)) => assert_eq!(l.mem_fds, Some(2)),
            other => panic!("{other:?}"),
        }
    }
}
