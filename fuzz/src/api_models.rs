//! The per-VM API's routing and JSON models: a method, a path and a body, through `route`
//! (path segments, every Firecracker body with `deny_unknown_fields`, and each model's own
//! checks), and the snapshot metadata file a control plane reads (whatever decodes encodes
//! back to itself).
//!
//! Input: a method selector, the path's length, the path, then the body.

use api::server::route;
use api::snapshot_meta::SnapshotMeta;

pub const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "put"];

pub fn decode(data: &[u8]) -> Option<(&'static str, String, &[u8])> {
    let (&method, rest) = data.split_first()?;
    let (&url_len, rest) = rest.split_first()?;
    let url_len = usize::from(url_len).min(rest.len());
    let (url, body) = rest.split_at(url_len);
    Some((METHODS[usize::from(method) % METHODS.len()], String::from_utf8_lossy(url).into_owned(), body))
}

pub fn encode(method: &str, url: &str, body: &[u8]) -> Vec<u8> {
    let m = METHODS.iter().position(|&x| x == method).expect("a known method") as u8;
    let mut out = vec![m, url.len() as u8];
    out.extend_from_slice(url.as_bytes());
    out.extend_from_slice(body);
    out
}

pub fn run(data: &[u8]) {
    let Some((method, url, body)) = decode(data) else { return };
    let _ = route(method, &url, body);
    if let Ok(meta) = serde_json::from_slice::<SnapshotMeta>(body) {
        let back: SnapshotMeta = serde_json::from_slice(&meta.to_json()).expect("written metadata reads back");
        assert_eq!(back, meta, "snapshot metadata changed through a write and a read");
    }
}
