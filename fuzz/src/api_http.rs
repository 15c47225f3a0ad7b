//! The per-VM API over its socket, both ends. Mode 0: bytes a local client sends to the real
//! API server (one thread, non-blocking, `httparse`), in pieces, then the end of its
//! stream; every request it completes is answered by a VMM thread that says yes, and what
//! the server sends back must be a sequence of whole HTTP responses. Mode 1: bytes a (jailed,
//! maybe compromised) VMM answers the control plane's API client with.
//!
//! Input: the mode and piece size in one byte, then the bytes.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use api::client::ApiClient;
use api::{ApiRequest, ApiResponse};

const LIMIT: Duration = Duration::from_secs(5);

fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = root.join(format!("ember-fuzz-api.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the work directory");
        dir
    })
}

/// The API server of this process, started once, with a VMM thread that accepts everything.
fn server() -> &'static Path {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        // The API thread's seccomp filter would also trap the sanitizer's own calls.
        std::env::set_var("EMBER_SECCOMP", "off");
        let path = workdir().join("api.sock");
        let (sender, channel) = api::channel().expect("an API channel");
        api::server::start(&path, sender).expect("the API server");
        std::thread::spawn(move || {
            for call in channel.calls.iter() {
                let _ = channel.evt.read();
                let response = match call.request {
                    ApiRequest::GetInfo | ApiRequest::GetMachineConfig => {
                        ApiResponse::json(&serde_json::json!({"id": "fuzz"}))
                    }
                    _ => ApiResponse::no_content(),
                };
                let _ = call.reply.send(response);
            }
        });
        path
    })
}

/// Panics unless `out` is whole HTTP responses, one after another.
fn check_responses(mut out: &[u8]) {
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let head = match response.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("the server sent a broken response {other:?}: {:?}", String::from_utf8_lossy(out)),
        };
        let length = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| std::str::from_utf8(h.value).expect("an ASCII length").parse::<usize>().expect("a length"))
            .unwrap_or(0);
        assert!(out.len() >= head + length, "a response is cut short");
        out = &out[head + length..];
    }
}

fn to_server(data: &[u8], piece: usize) {
    let Ok(mut s) = UnixStream::connect(server()) else { return };
    s.set_read_timeout(Some(LIMIT)).expect("a read timeout");
    s.set_write_timeout(Some(LIMIT)).expect("a write timeout");
    for chunk in data.chunks(piece) {
        if s.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    check_responses(&out);
}

fn to_client(data: &[u8]) {
    let path = workdir().join("vmm.sock");
    let _ = std::fs::remove_file(&path);
    let Ok(listener) = UnixListener::bind(&path) else { return };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            if let Ok((mut peer, _)) = listener.accept() {
                let _ = peer.set_read_timeout(Some(LIMIT));
                let mut request = [0u8; 4096];
                let _ = peer.read(&mut request);
                let _ = peer.write_all(data);
            }
        });
        let client = ApiClient::new(&path);
        let _ = client.get::<serde_json::Value>("/");
    });
}

pub fn run(data: &[u8]) {
    crate::like_the_vmm();
    let Some((&mode, data)) = data.split_first() else { return };
    if mode & 1 == 0 {
        to_server(data, usize::from(mode >> 1) * 8 + 1);
    } else {
        to_client(data);
    }
}
