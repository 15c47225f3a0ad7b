//! `POST .../glob` and `.../grep`, as `Sandbox.glob`, `ls` and `grep` call them: a walk of the
//! box's file tree through the backend's listing (the guest agent's), and for grep a read of
//! each file, so that they work in any image. Both stop at a result cap, a walk budget or a
//! deadline and then say `truncated`.
//!
//! Glob patterns match an entry's path relative to the search root: `**` is any number of
//! segments, `*`, `?` and `[...]` match within one. Grep searches for a literal string; its
//! `glob`, bare (`*.py`), matches a file's name at any depth, else its relative path. Symbolic
//! links are listed, never followed; grep skips files over [`GREP_MAX_FILE`] and files with a
//! NUL byte (binary).

use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::files::{file_error, resolve};
use crate::backend::{Backend, DirEntry, FileKind};
use crate::clock::rfc3339;
use crate::error::ApiError;
use crate::routes::Body;
use crate::state::{blocking, Shared};
use crate::tenants::Tenant;

const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;
/// Directories a search lists at most.
const WALK_BUDGET: usize = 10_000;
const DEADLINE: Duration = Duration::from_secs(20);
pub const GREP_MAX_FILE: u64 = 8 << 20;

#[derive(Debug, Deserialize)]
pub struct SearchRequest {
    pattern: String,
    path: String,
    glob: Option<String>,
    limit: Option<usize>,
}

/// Whether `name` matches one glob segment (`*`, `?`, `[...]`, `[!...]`).
fn segment_matches(pattern: &[char], name: &[char]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some('*'), _) => {
            segment_matches(&pattern[1..], name)
                || (!name.is_empty() && segment_matches(pattern, &name[1..]))
        }
        (Some('?'), Some(_)) => segment_matches(&pattern[1..], &name[1..]),
        (Some('['), Some(&c)) => match pattern
            .iter()
            .position(|&p| p == ']')
            .filter(|&end| end > 1)
        {
            Some(end) => {
                let (negated, set) = match pattern[1] {
                    '!' | '^' => (true, &pattern[2..end]),
                    _ => (false, &pattern[1..end]),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= set[i] <= c && c <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == c;
                        i += 1;
                    }
                }
                hit != negated && segment_matches(&pattern[end + 1..], &name[1..])
            }
            None => name.first() == Some(&'[') && segment_matches(&pattern[1..], &name[1..]),
        },
        (Some(p), Some(n)) => p == n && segment_matches(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// Whether relative path `path` (segments) matches `pattern` (segments, `**` among them).
pub fn glob_matches(pattern: &[&str], path: &[&str]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            glob_matches(&pattern[1..], path)
                || (!path.is_empty() && glob_matches(pattern, &path[1..]))
        }
        (Some(p), Some(n)) => {
            let (p, n): (Vec<char>, Vec<char>) = (p.chars().collect(), n.chars().collect());
            segment_matches(&p, &n) && glob_matches(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

/// An entry met by a walk, with its path relative to the root.
struct Found {
    relative: Vec<String>,
    absolute: String,
    entry: DirEntry,
}

/// Walks `root` breadth-first, `max_depth` levels at most, calling `visit` on each entry until
/// it returns false; returns whether the walk was cut short (by `visit`, the budget or the
/// deadline).
fn walk(
    backend: &dyn Backend,
    sandbox: &str,
    root: &str,
    max_depth: usize,
    mut visit: impl FnMut(Found) -> bool,
) -> Result<bool, crate::backend::BackendError> {
    let deadline = Instant::now() + DEADLINE;
    let mut queue = std::collections::VecDeque::from([(
        root.trim_end_matches('/').to_string(),
        Vec::<String>::new(),
    )]);
    let mut listed = 0;
    while let Some((dir, relative)) = queue.pop_front() {
        if listed == WALK_BUDGET || Instant::now() > deadline {
            return Ok(true);
        }
        listed += 1;
        let entries = match backend.list_dir(sandbox, if dir.is_empty() { "/" } else { &dir }) {
            Ok(entries) => entries,
            // The root must be there; below it, what vanished or is unreadable is skipped.
            Err(e) if relative.is_empty() => return Err(e),
            Err(_) => continue,
        };
        for entry in entries {
            let mut path = relative.clone();
            path.push(entry.name.clone());
            let absolute = format!("{dir}/{}", entry.name);
            if entry.stat.kind == FileKind::Dir && path.len() < max_depth {
                queue.push_back((absolute.clone(), path.clone()));
            }
            if !visit(Found {
                relative: path,
                absolute,
                entry,
            }) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A glob pattern's segments (empty ones, from `//` or a leading `/`, dropped).
fn segments(pattern: &str) -> Vec<String> {
    pattern.split('/').filter(|s| !s.is_empty()).map(String::from).collect()
}

fn limit(req: &SearchRequest) -> Result<usize, ApiError> {
    match req.limit.unwrap_or(DEFAULT_LIMIT) {
        n if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        n => Err(ApiError::invalid(
            "limit",
            format!("limit {n}: give 1 to {MAX_LIMIT}"),
        )),
    }
}

pub async fn glob(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(box_id): Path<String>,
    Body(req): Body<SearchRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let record = super::running_box(&state, &tenant, &box_id).await?;
    let (root, limit) = (resolve(&record, &req.path)?, limit(&req)?);
    let pattern = segments(&req.pattern);
    let depth = if pattern.iter().any(|s| s == "**") {
        usize::MAX
    } else {
        pattern.len()
    };
    let (backend, name, walk_root) = (
        state.backend.clone(),
        record.backend.clone().unwrap_or_default(),
        root.clone(),
    );
    let result = blocking(move || {
        let pattern: Vec<&str> = pattern.iter().map(String::as_str).collect();
        let mut matches = Vec::new();
        let truncated = walk(backend.as_ref(), &name, &walk_root, depth, |found| {
            let relative: Vec<&str> = found.relative.iter().map(String::as_str).collect();
            if glob_matches(&pattern, &relative) {
                let ms = u64::try_from(found.entry.stat.mtime_ns / 1_000_000).unwrap_or(0);
                let is_dir = found.entry.stat.kind == FileKind::Dir;
                matches.push(json!({"path": found.absolute, "is_dir": is_dir, "size_bytes": found.entry.stat.size, "modified_at": rfc3339(ms)}));
            }
            matches.len() < limit
        })?;
        Ok(json!({"matches": matches, "truncated": truncated}))
    })
    .await?
    .map_err(|e| file_error("ReadError", &root, e))?;
    state.events.record(
        &record.id,
        json!({"kind": "file", "op": "glob", "path": root, "pattern": req.pattern}),
    );
    Ok(Json(result))
}

pub async fn grep(
    State(state): State<Shared>,
    tenant: Tenant,
    Path(box_id): Path<String>,
    Body(req): Body<SearchRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let record = super::running_box(&state, &tenant, &box_id).await?;
    let (root, limit) = (resolve(&record, &req.path)?, limit(&req)?);
    if req.pattern.is_empty() {
        return Err(ApiError::invalid("pattern", "give the text to search for"));
    }
    let filter = req.glob.as_deref().map(segments);
    let by_name = req
        .glob
        .as_ref()
        .is_some_and(|g| !g.contains('/') && !g.contains("**"));
    let (backend, name, walk_root, needle) = (
        state.backend.clone(),
        record.backend.clone().unwrap_or_default(),
        root.clone(),
        req.pattern.clone(),
    );
    let result = blocking(move || {
        let mut matches = Vec::new();
        let mut cut = false;
        let truncated = walk(backend.as_ref(), &name, &walk_root, usize::MAX, |found| {
            if found.entry.stat.kind != FileKind::File || found.entry.stat.size > GREP_MAX_FILE {
                return true;
            }
            if let Some(filter) = &filter {
                let filter: Vec<&str> = filter.iter().map(String::as_str).collect();
                let relative: Vec<&str> = found.relative.iter().map(String::as_str).collect();
                let subject = if by_name {
                    &relative[relative.len() - 1..]
                } else {
                    &relative[..]
                };
                if !glob_matches(&filter, subject) {
                    return true;
                }
            }
            let mut content = Vec::new();
            if backend
                .download(&name, &found.absolute, &mut content)
                .is_err()
                || content.contains(&0)
            {
                return true;
            }
            for (i, line) in String::from_utf8_lossy(&content).lines().enumerate() {
                if line.contains(needle.as_str()) {
                    if matches.len() == limit {
                        cut = true;
                        return false;
                    }
                    matches.push(json!({"path": found.absolute, "line": i + 1, "text": line}));
                }
            }
            true
        })?;
        Ok(json!({"matches": matches, "truncated": truncated || cut}))
    })
    .await?
    .map_err(|e| file_error("ReadError", &root, e))?;
    state.events.record(
        &record.id,
        json!({"kind": "file", "op": "grep", "path": root, "pattern": req.pattern}),
    );
    Ok(Json(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        let p: Vec<&str> = pattern.split('/').collect();
        let s: Vec<&str> = path.split('/').collect();
        glob_matches(&p, &s)
    }

    #[test]
    fn globs_match_segments_and_double_stars_match_any_depth() {
        assert!(m("*", "a.txt") && !m("*", "d/a.txt"));
        assert!(m("*.py", "x.py") && !m("*.py", "x.pyc"));
        assert!(m("**/*.py", "x.py") && m("**/*.py", "a/b/x.py") && !m("**/*.py", "a/b/x.rs"));
        assert!(m("src/**", "src/a/b") && m("src/**", "src"));
        assert!(m("d?/[abc].txt", "d1/b.txt") && !m("d?/[abc].txt", "d1/d.txt"));
        assert!(m("[!a]*", "bcd") && !m("[!a]*", "abc"));
        assert!(m("[a-c]x", "bx") && !m("[a-c]x", "dx"));
        assert!(m("a[", "a[") && !m("a[", "ab"));
    }
}
