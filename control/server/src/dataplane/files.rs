//! Files: `POST .../upload?path=P` (multipart, field `file`), `GET .../download?path=P` with
//! ranges (`Range`, `If-Range`) and `If-None-Match`, `HEAD` for a file's size and validators,
//! as `Sandbox.write`, `read`, `read_range` and `stat` call them (and a download link's
//! fetch, `routes::downloads`). Data streams through in chunks both ways; nothing holds a
//! whole file.
//!
//! The `ETag` is the file's size and modification time (ember keeps no content hashes), so a
//! rewrite of the same size within the file system's time resolution is not seen.

use std::io::Write;

use axum::body::{Body as HttpBody, Bytes};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::backend::{BackendError, FileKind, FileStat};
use crate::boxes::BoxRecord;
use crate::error::ApiError;
use crate::state::{blocking, Shared};
use crate::tenants::Tenant;

#[derive(Debug, Deserialize)]
pub struct PathQuery {
    path: String,
}

/// `path` in the box: a relative one is under its working directory (`/` without one).
pub fn resolve(record: &BoxRecord, path: &str) -> Result<String, ApiError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ApiError::invalid("path", "give a file path"));
    }
    if path.starts_with('/') {
        return Ok(path.to_string());
    }
    let dir = record.run_config.work_dir.as_deref().unwrap_or("/");
    Ok(format!("{}/{path}", dir.trim_end_matches('/')))
}

/// A file operation's failure as `handle_sandbox_http_error` maps it.
pub fn file_error(kind: &'static str, path: &str, e: BackendError) -> ApiError {
    match e {
        BackendError::NotFound(_) => ApiError::NotFound(format!("File '{path}' not found")),
        BackendError::NotReady(m) => ApiError::BadRequest {
            kind: "NotReady",
            message: m,
        },
        BackendError::Invalid(m) | BackendError::Failed(m) | BackendError::DialFailed(m) => {
            ApiError::BadRequest { kind, message: m }
        }
    }
}

/// A channel's chunks as a blocking reader (what the backend's upload takes).
struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

pub async fn upload(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(box_id): Path<String>,
    Query(q): Query<PathQuery>,
    mut multipart: Multipart,
) -> Result<impl IntoResponse, ApiError> {
    let record = super::running_box(&state, &tenant, &box_id).await?;
    let path = resolve(&record, &q.path)?;
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::invalid("file", format!("cannot read the upload: {e}"))
    };
    let mut field = loop {
        match multipart.next_field().await.map_err(bad)? {
            Some(field) if field.name() == Some("file") => break field,
            Some(_) => continue,
            None => return Err(ApiError::invalid("file", "the upload has no `file` part")),
        }
    };
    let (tx, rx) = mpsc::channel(8);
    let (backend, name, target) = (
        state.backend.clone(),
        record.backend.clone().unwrap_or_default(),
        path.clone(),
    );
    let writing = blocking(move || {
        backend.upload(
            &name,
            &target,
            &mut ChunkReader {
                rx,
                chunk: Bytes::new(),
            },
            0o644,
        )
    });
    let sending = async move {
        while let Some(chunk) = field.chunk().await.map_err(bad)? {
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        Ok::<(), ApiError>(())
    };
    let (written, sent) = tokio::join!(writing, sending);
    sent?;
    let size = written?.map_err(|e| file_error("WriteError", &path, e))?;
    state.metrics.file_operation();
    state.events.record(
        &record.id,
        json!({"kind": "file", "op": "write", "path": path, "bytes": size}),
    );
    Ok(axum::Json(json!({"path": path, "size": size})))
}

fn etag(stat: &FileStat) -> String {
    format!("\"{:x}-{:x}\"", stat.size, stat.mtime_ns)
}

fn last_modified(stat: &FileStat) -> String {
    let secs = u64::try_from(stat.mtime_ns.div_euclid(1_000_000_000)).unwrap_or(0);
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// The inclusive byte range a `Range` header asks of a file of `size` bytes: `Ok(None)` for
/// the whole file (no header, or one this server does not take, as RFC 9110 allows), `Err`
/// for a range that starts past the end (416).
pub fn byte_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>().ok(), last.parse::<u64>().ok()) {
        (None, Some(suffix)) if first.is_empty() && suffix > 0 => {
            Some((size.saturating_sub(suffix), size.saturating_sub(1)))
        }
        (Some(start), None) if last.is_empty() => Some((start, size.saturating_sub(1))),
        (Some(start), Some(end)) if end >= start => Some((start, end.min(size.saturating_sub(1)))),
        _ => return Ok(None),
    };
    match range {
        Some((start, _)) if start >= size => Err(()),
        range => Ok(range),
    }
}

/// Writes the bytes from `skip` on, `take` of them at most, then fails to stop the copy.
struct Window {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    skip: u64,
    take: u64,
}

impl Write for Window {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let skipped = self.skip.min(buf.len() as u64) as usize;
        self.skip -= skipped as u64;
        let rest = &buf[skipped..];
        let n = rest
            .len()
            .min(usize::try_from(self.take).unwrap_or(usize::MAX));
        if n > 0 {
            self.tx
                .blocking_send(Ok(Bytes::copy_from_slice(&rest[..n])))
                .map_err(|_| std::io::ErrorKind::BrokenPipe)?;
            self.take -= n as u64;
        }
        if self.take == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub async fn download(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(box_id): Path<String>,
    Query(q): Query<PathQuery>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = super::running_box(&state, &tenant, &box_id).await?;
    let path = resolve(&record, &q.path)?;
    send(&state, &record, path, &method, &headers, None).await
}

/// File `path` (absolute) of running box `record` as `GET` or `HEAD` with `headers` asks for
/// it (ranges, validators); `via` names what other than the data plane asked, for the trace.
pub async fn send(
    state: &Shared,
    record: &BoxRecord,
    path: String,
    method: &Method,
    headers: &HeaderMap,
    via: Option<&'static str>,
) -> Result<Response, ApiError> {
    let name = record.backend.clone().unwrap_or_default();
    let (backend, target, sandbox) = (state.backend.clone(), path.clone(), name.clone());
    let stat = blocking(move || backend.stat(&sandbox, &target))
        .await?
        .map_err(|e| file_error("ReadError", &path, e))?;
    if stat.kind == FileKind::Dir {
        return Err(ApiError::BadRequest {
            kind: "ReadError",
            message: format!("{path} is a directory"),
        });
    }
    let tag = etag(&stat);
    let mut response_headers = HeaderMap::new();
    let value = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
    response_headers.insert(header::ETAG, value(&tag));
    response_headers.insert(header::LAST_MODIFIED, value(&last_modified(&stat)));
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let given = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok()).map(str::trim);
    if given(header::IF_NONE_MATCH).is_some_and(|m| m == tag || m == "*") {
        return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
    }
    let ranged = given(header::IF_RANGE).is_none_or(|r| r == tag);
    let range = match byte_range(given(header::RANGE).filter(|_| ranged), stat.size) {
        Ok(range) => range,
        Err(()) => {
            response_headers.insert(
                header::CONTENT_RANGE,
                value(&format!("bytes */{}", stat.size)),
            );
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response());
        }
    };
    let (status, start, len) = match range {
        Some((start, end)) => {
            response_headers.insert(
                header::CONTENT_RANGE,
                value(&format!("bytes {start}-{end}/{}", stat.size)),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        None => (StatusCode::OK, 0, stat.size),
    };
    response_headers.insert(header::CONTENT_LENGTH, value(&len.to_string()));
    state.metrics.file_operation();
    let traced = |mut event: serde_json::Value| {
        if let Some(via) = via {
            event["via"] = json!(via);
        }
        state.events.record(&record.id, event);
    };
    if method == Method::HEAD {
        traced(json!({"kind": "file", "op": "stat", "path": path}));
        return Ok((status, response_headers).into_response());
    }
    traced(json!({"kind": "file", "op": "read", "path": path, "bytes": len}));
    let (tx, mut rx) = mpsc::channel(8);
    let backend = state.backend.clone();
    let errors = tx.clone();
    tokio::task::spawn_blocking(move || {
        let mut window = Window {
            tx,
            skip: start,
            take: len,
        };
        let result = backend.download(&name, &path, &mut window);
        if let (Err(e), true) = (result, window.take > 0) {
            let _ = errors.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok((status, response_headers, HttpBody::from_stream(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_as_the_sdk_sends_them() {
        assert_eq!(byte_range(None, 10), Ok(None));
        assert_eq!(byte_range(Some("bytes=2-5"), 10), Ok(Some((2, 5))));
        assert_eq!(byte_range(Some("bytes=2-"), 10), Ok(Some((2, 9))));
        assert_eq!(byte_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(byte_range(Some("bytes=-30"), 10), Ok(Some((0, 9))));
        assert_eq!(
            byte_range(Some("bytes=8-100"), 10),
            Ok(Some((8, 9))),
            "an end past the file is clamped"
        );
        assert_eq!(byte_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(byte_range(Some("bytes=5-2"), 10), Ok(None));
        assert_eq!(byte_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(byte_range(Some("lines=1-2"), 10), Ok(None));
    }

    #[test]
    fn a_window_passes_only_its_bytes_then_stops_the_copy() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Window {
            tx,
            skip: 3,
            take: 4,
        };
        assert_eq!(w.write(b"ab").unwrap(), 2);
        assert!(w.write(b"cdefghij").is_err(), "the window is full");
        drop(w);
        let mut got = Vec::new();
        while let Some(Ok(chunk)) = rx.blocking_recv() {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, b"defg");
    }

    #[test]
    fn relative_paths_are_under_the_working_directory() {
        let mut record = BoxRecord::new("t", "b");
        assert_eq!(resolve(&record, "a.txt").unwrap(), "/a.txt");
        record.run_config.work_dir = Some("/srv/app/".into());
        assert_eq!(resolve(&record, "a.txt").unwrap(), "/srv/app/a.txt");
        assert_eq!(resolve(&record, "/etc/x").unwrap(), "/etc/x");
        assert!(resolve(&record, "").is_err());
    }
}
