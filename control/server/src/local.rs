//! The server's own user, on the server's host: `ember serve` writes `local.json` into its
//! state directory (0700; the file 0600) with the URL it listens at and a key drawn afresh at
//! every start, so that `ember expose`/`unexpose`, run by the same user, find the server and
//! prove they are that user (reading the file is the proof: no other local user can). The key
//! opens only the `/api/v2/sandboxes/local/...` routes (`host_sandboxes`), never a tenant's
//! boxes. This module is both ends: the file, and the client the CLI sends its request with.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{header, Request};
/// The requests' methods, for callers without `http` of their own.
pub use axum::http::Method;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The header the local key travels in.
pub const KEY_HEADER: &str = "x-ember-local-key";

/// The file's name in the server's state directory.
pub const FILE: &str = "local.json";

/// The longest answer the client reads.
const MAX_ANSWER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("no `ember serve` of this user is running ({} is missing): start one with `ember serve`", .0.display())]
    NoServer(PathBuf),
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is not what `ember serve` writes ({source}): start the server again", path.display())]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{0} is not an http:// URL of a host and port")]
    Url(String),
    #[error("cannot reach ember serve at {url} ({source}): is it running?")]
    Connect { url: String, source: std::io::Error },
    #[error("ember serve at {url}: {message}")]
    Http { url: String, message: String },
    #[error("ember serve refused ({status}): {message}")]
    Refused { status: u16, message: String },
}

/// Where the server is and the key that proves its own user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalAccess {
    pub url: String,
    pub key: String,
}

/// A fresh key: 244 bits from the OS's random source (through uuid v4).
pub fn new_key() -> String {
    let part = || uuid::Uuid::new_v4().simple().to_string();
    format!("{}{}", part(), part())
}

/// The URL a client on this host reaches a listener on `addr` at (a wildcard address is
/// reached on loopback).
pub fn url_of(addr: SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

impl LocalAccess {
    /// Writes `dir/local.json` whole (a temporary file, 0600 whatever the umask, renamed into
    /// place), so that a reader never sees half of it.
    pub fn write(&self, dir: &Path) -> Result<(), LocalError> {
        let path = dir.join(FILE);
        let tmp = dir.join(format!("{FILE}.{}", std::process::id()));
        let failed = |source| LocalError::Write { path: path.clone(), source };
        let _ = std::fs::remove_file(&tmp);
        let text = serde_json::to_vec(self).expect("two strings serialize");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(failed)?;
        file.write_all(&text).and_then(|()| file.sync_all()).map_err(failed)?;
        std::fs::rename(&tmp, &path).map_err(failed)
    }

    /// Reads `dir/local.json`.
    pub fn read(dir: &Path) -> Result<LocalAccess, LocalError> {
        let path = dir.join(FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LocalError::NoServer(path)),
            Err(source) => return Err(LocalError::Read { path, source }),
        };
        serde_json::from_slice(&text).map_err(|source| LocalError::Corrupt { path, source })
    }

    /// Removes `dir/local.json` if it is still this server's (a later server on the same
    /// state directory may have written its own).
    pub fn remove_if_ours(&self, dir: &Path) {
        if LocalAccess::read(dir).is_ok_and(|on_disk| on_disk == *self) {
            let _ = std::fs::remove_file(dir.join(FILE));
        }
    }

    /// Sends `method path` (with a JSON `body`) to the server with the local key; its JSON
    /// answer, or the error it gave.
    pub async fn request(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, LocalError> {
        let authority = self
            .url
            .strip_prefix("http://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| LocalError::Url(self.url.clone()))?;
        let http = |e: &dyn std::fmt::Display| LocalError::Http { url: self.url.clone(), message: e.to_string() };
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|source| LocalError::Connect { url: self.url.clone(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| http(&e))?;
        tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority)
            .header(KEY_HEADER, &self.key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .map_err(|e| http(&e))?;
        let response = sender.send_request(request).await.map_err(|e| http(&e))?;
        let status = response.status();
        let bytes = axum::body::to_bytes(Body::new(response.into_body()), MAX_ANSWER).await.map_err(|e| http(&e))?;
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        if status.is_success() {
            return Ok(answer);
        }
        // The API's two error shapes (see `error`): `{error, message}`, or a field's `[{loc, msg}]`.
        let message = match &answer["detail"] {
            Value::Object(d) => d.get("message").and_then(Value::as_str).unwrap_or_default().to_string(),
            Value::Array(fields) => fields
                .iter()
                .map(|f| format!("{}: {}", f["loc"].as_array().and_then(|l| l.last()).and_then(Value::as_str).unwrap_or("?"), f["msg"].as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join("; "),
            _ => answer.to_string(),
        };
        Err(LocalError::Refused { status: status.as_u16(), message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_file_is_private_whole_and_removed_only_by_its_writer() {
        let dir = std::env::temp_dir().join(format!("ember-local-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(LocalAccess::read(&dir), Err(LocalError::NoServer(_))));
        let first = LocalAccess { url: url_of("0.0.0.0:8080".parse().unwrap()), key: new_key() };
        assert_eq!(first.url, "http://127.0.0.1:8080");
        first.write(&dir).unwrap();
        let mode = std::fs::metadata(dir.join(FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(LocalAccess::read(&dir).unwrap(), first);
        let second = LocalAccess { url: url_of("[::]:9000".parse().unwrap()), key: new_key() };
        assert_eq!(second.url, "http://[::1]:9000");
        assert_ne!(first.key, second.key);
        second.write(&dir).unwrap();
        first.remove_if_ours(&dir);
        assert_eq!(LocalAccess::read(&dir).unwrap(), second, "a later server's file stays");
        second.remove_if_ours(&dir);
        assert!(matches!(LocalAccess::read(&dir), Err(LocalError::NoServer(_))));
        std::fs::write(dir.join(FILE), "not json").unwrap();
        assert!(matches!(LocalAccess::read(&dir), Err(LocalError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
