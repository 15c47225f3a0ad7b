//! A client for a VM's API socket: one HTTP/1.1 request per connection, JSON bodies, and
//! Firecracker's `{"fault_message"}` errors turned into [`ApiClientError::Fault`]. A request can
//! carry file descriptors and a response can bring some back ([`crate::scm`]).

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::models::Fault;
use super::scm;

/// Responses are small JSON documents; a peer that sends more is not an ember API.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("cannot reach the VMM's API socket {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("talking to the VMM's API socket {path} failed: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the VMM's API socket {path} sent a malformed response: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{method} {endpoint} failed ({status}): {message}")]
    Fault { method: &'static str, endpoint: String, status: u16, message: String },
}

pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), timeout: Duration::from_secs(30) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get<T: DeserializeOwned>(&self, endpoint: &str) -> Result<T, ApiClientError> {
        let body = self.request("GET", endpoint, None)?;
        serde_json::from_slice(&body).map_err(|e| self.malformed(format!("GET {endpoint}: {e}")))
    }

    pub fn put<T: Serialize>(&self, endpoint: &str, body: &T) -> Result<(), ApiClientError> {
        self.send("PUT", endpoint, body)
    }

    /// A PUT whose answer has a JSON body.
    pub fn put_for<T: Serialize, R: DeserializeOwned>(&self, endpoint: &str, body: &T) -> Result<R, ApiClientError> {
        Ok(self.put_for_with_fds(endpoint, body, &[])?.0)
    }

    /// A PUT with `fds` attached to the request.
    pub fn put_with_fds<T: Serialize>(&self, endpoint: &str, body: &T, fds: &[BorrowedFd<'_>]) -> Result<(), ApiClientError> {
        let json = serde_json::to_vec(body).map_err(|e| self.malformed(format!("cannot encode the body: {e}")))?;
        self.request_with_fds("PUT", endpoint, Some(&json), fds).map(drop)
    }

    /// A PUT with `fds` attached, whose answer has a JSON body and the descriptors that came
    /// with it.
    pub fn put_for_with_fds<T: Serialize, R: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(R, Vec<OwnedFd>), ApiClientError> {
        let json = serde_json::to_vec(body).map_err(|e| self.malformed(format!("cannot encode the body: {e}")))?;
        let (answer, fds) = self.request_with_fds("PUT", endpoint, Some(&json), fds)?;
        let value = serde_json::from_slice(&answer).map_err(|e| self.malformed(format!("PUT {endpoint}: {e}")))?;
        Ok((value, fds))
    }

    pub fn patch<T: Serialize>(&self, endpoint: &str, body: &T) -> Result<(), ApiClientError> {
        self.send("PATCH", endpoint, body)
    }

    fn send<T: Serialize>(&self, method: &'static str, endpoint: &str, body: &T) -> Result<(), ApiClientError> {
        let json = serde_json::to_vec(body).map_err(|e| self.malformed(format!("cannot encode the body: {e}")))?;
        self.request(method, endpoint, Some(&json)).map(drop)
    }

    fn malformed(&self, reason: String) -> ApiClientError {
        ApiClientError::Malformed { path: self.path.clone(), reason }
    }

    /// Sends one request and returns the body of a 2xx response.
    pub fn request(&self, method: &'static str, endpoint: &str, body: Option<&[u8]>) -> Result<Vec<u8>, ApiClientError> {
        Ok(self.request_with_fds(method, endpoint, body, &[])?.0)
    }

    /// Sends one request with `fds` attached (in the same `sendmsg` as its first bytes, as the
    /// server expects) and returns the body of a 2xx response and the descriptors that came with
    /// the response.
    pub fn request_with_fds(
        &self,
        method: &'static str,
        endpoint: &str,
        body: Option<&[u8]>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), ApiClientError> {
        let io = |source| ApiClientError::Io { path: self.path.clone(), source };
        let mut stream = UnixStream::connect(&self.path)
            .map_err(|source| ApiClientError::Connect { path: self.path.clone(), source })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let body = body.unwrap_or_default();
        let mut message = format!(
            "{method} {endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n"
        );
        if !body.is_empty() {
            message.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        message.push_str("\r\n");
        let mut bytes = message.into_bytes();
        bytes.extend_from_slice(body);
        let first = scm::send(stream.as_fd(), &bytes, fds).map_err(io)?;
        stream.write_all(&bytes[first..]).map_err(io)?;

        let mut raw = Vec::new();
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let got = match scm::recv(stream.as_fd(), &mut buf, &mut received) {
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            };
            if got.truncated {
                return Err(self.malformed(format!("more than {} file descriptors came with the response", scm::MAX_FDS)));
            }
            if got.bytes == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..got.bytes]);
            if raw.len() > MAX_RESPONSE {
                return Err(self.malformed(format!("the response is larger than {MAX_RESPONSE} bytes")));
            }
        }
        let (status, body) = parse_response(&raw).map_err(|e| self.malformed(e.to_string()))?;
        if (200..300).contains(&status) {
            return Ok((body.to_vec(), received));
        }
        let message = serde_json::from_slice::<Fault>(body)
            .map(|f| f.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
        Err(ApiClientError::Fault { method, endpoint: endpoint.to_string(), status, message })
    }
}

#[derive(Debug, thiserror::Error)]
enum ResponseError {
    #[error("the connection closed inside the headers")]
    Partial,
    #[error(transparent)]
    Http(#[from] httparse::Error),
    #[error("no status code")]
    NoStatus,
    #[error("an unreadable Content-Length")]
    ContentLength,
    #[error("the body is shorter than its Content-Length {0}")]
    ShortBody(usize),
}

/// The status and body of a complete response (`Connection: close`, so the body runs to the
/// end unless Content-Length says otherwise).
fn parse_response(raw: &[u8]) -> Result<(u16, &[u8]), ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(ResponseError::Partial),
        Err(e) => return Err(e.into()),
    };
    let status = response.code.ok_or(ResponseError::NoStatus)?;
    let body = &raw[head_len..];
    let length = response.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"));
    match length {
        Some(h) => {
            let n: usize = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(ResponseError::ContentLength)?;
            body.get(..n).map(|b| (status, b)).ok_or(ResponseError::ShortBody(n))
        }
        None => Ok((status, body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses_and_rejects_broken_ones() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}trailing";
        assert_eq!(parse_response(ok).unwrap(), (200, &b"{}"[..]));
        assert_eq!(parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(), (204, &b""[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap_err().to_string().contains("inside the headers"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").unwrap_err().to_string().contains("shorter"));
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
