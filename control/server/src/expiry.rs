//! Boxes that end on their own, as the SDK's create and update describe: a ready box with an
//! `idle_ttl_seconds` is stopped once it has been idle that long — no request to its data
//! plane, no command running and no client attached to one — and a stopped box with a
//! `delete_after_stop_seconds` is deleted that long after it stopped. 0 (or none) is never.
//!
//! The reaper decides from a copy of each record, and each step checks again under the box's
//! lifecycle lock, since a request may have used, started or deleted the box meanwhile.

use crate::boxes::{BoxRecord, Status};
use crate::clock::now_ms;
use crate::lifecycle;
use crate::state::Shared;

/// Whether `record`, at `now` (ms since the epoch), has been idle for its idle TTL.
fn idle_out(state: &Shared, record: &BoxRecord, now: u64) -> bool {
    record.status == Status::Ready
        && record.idle_ttl_seconds > 0
        && now.saturating_sub(record.last_active_ms) >= record.idle_ttl_seconds.saturating_mul(1000)
        && !state.commands.busy(&record.id)
}

/// Whether `record`, at `now`, has been stopped for its `delete_after_stop_seconds`.
fn stopped_out(record: &BoxRecord, now: u64) -> bool {
    match (record.status, record.stopped_ms, record.delete_after_stop_seconds) {
        (Status::Stopped, Some(at), Some(after)) if after > 0 => {
            now.saturating_sub(at) >= after.saturating_mul(1000)
        }
        _ => false,
    }
}

/// One round over every box: stops those idle too long and deletes those stopped too long.
pub async fn reap(state: &Shared) {
    for record in state.boxes.all() {
        let now = now_ms();
        let done = if idle_out(state, &record, now) {
            lifecycle::stop_when(state, &record.id, "idle", |r| idle_out(state, r, now_ms()))
                .await
                .map(|_| ())
        } else if stopped_out(&record, now) {
            lifecycle::delete_when(state, &record.id, "delete_after_stop_seconds", |r| {
                stopped_out(r, now_ms())
            })
            .await
            .map(|_| ())
        } else {
            Ok(())
        };
        if let Err(e) = done {
            tracing::warn!(sandbox = %record.name, tenant = %record.tenant, "cannot end an expired sandbox: {e}");
        }
    }
}
