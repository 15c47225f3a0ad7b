//! What the proxy records: one [`Event`] for every connection it refuses or tunnels and for
//! every request it forwards or intercepts, given to an [`Audit`]. [`JsonLines`] appends them
//! to a file, one JSON object a line, as a sandbox's event log does.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// One connection or request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    pub host: String,
    pub port: u16,
    /// `CONNECT` for a tunnel or a refused CONNECT; the request's method otherwise.
    pub method: String,
    /// The request's path and query; none for a tunnel, whose requests the proxy cannot see.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The status the sandbox got: the upstream's, or the proxy's own 403, 502.
    pub status: u16,
    /// Body bytes from the sandbox (all bytes, for a tunnel).
    pub bytes_up: u64,
    /// Body bytes to the sandbox (all bytes, for a tunnel).
    pub bytes_down: u64,
    /// The list entry or reason that decided (`allow_list entry *.github.com`).
    pub decided_by: String,
    /// The rule whose headers were added to the request, if one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Refused by the policy.
    Denied,
    /// CONNECT, bytes passed through without interception.
    Tunnelled,
    /// An HTTPS request inside an intercepted CONNECT.
    Intercepted,
    /// A plain-HTTP proxy request.
    Forwarded,
}

fn rfc3339<S: Serializer>(at: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    let text = OffsetDateTime::from(*at)
        .format(&Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    serializer.serialize_str(&text)
}

/// Where events go. Recording must not block for long: it is called on the proxy's tasks.
pub trait Audit: Send + Sync {
    fn record(&self, event: Event);
}

/// Events appended to a file (mode 0600: it says where the sandbox went), one JSON object a
/// line.
pub struct JsonLines {
    file: Mutex<File>,
}

impl JsonLines {
    pub fn open(path: &Path) -> std::io::Result<JsonLines> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(JsonLines {
            file: Mutex::new(file),
        })
    }
}

impl Audit for JsonLines {
    fn record(&self, event: Event) {
        let mut line = serde_json::to_string(&event).expect("an event serializes");
        line.push('\n');
        // One write per line, under the lock: lines of concurrent connections never mix.
        if let Err(e) = self.file.lock().unwrap().write_all(line.as_bytes()) {
            tracing::warn!("cannot write the egress audit log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn events_are_appended_one_json_object_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let event = Event {
            at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            host: "api.github.com".into(),
            port: 443,
            method: "GET".into(),
            path: Some("/user".into()),
            status: 200,
            bytes_up: 0,
            bytes_down: 42,
            decided_by: "allow_list entry *.github.com".into(),
            rule: Some("github".into()),
            mode: Mode::Intercepted,
        };
        let audit = JsonLines::open(&path).unwrap();
        audit.record(event.clone());
        audit.record(Event {
            path: None,
            rule: None,
            mode: Mode::Tunnelled,
            ..event
        });
        drop(audit);
        JsonLines::open(&path).unwrap().record(Event {
            at: UNIX_EPOCH,
            host: "x".into(),
            port: 1,
            method: "CONNECT".into(),
            path: None,
            status: 403,
            bytes_up: 0,
            bytes_down: 0,
            decided_by: "not in the allow_list".into(),
            rule: None,
            mode: Mode::Denied,
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(lines[0]["path"], "/user");
        assert_eq!(lines[0]["rule"], "github");
        assert_eq!(lines[0]["mode"], "intercepted");
        assert!(lines[1].get("path").is_none());
        assert_eq!(lines[1]["mode"], "tunnelled");
        assert_eq!(lines[2]["status"], 403);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }
}
