//! A sandbox's lifetime (`ember run --ttl`). Its VMM ends the VM when the lifetime is over
//! (PUT /deadline: the VMM's run loop, not a process of the control plane, so the end comes on
//! time with no ember command running and whatever the guest does). What remains, the state
//! directory, is removed by the next command that meets the sandbox, or kept, as the record
//! says: `ls` then shows it as `Expired` and `rm` removes it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::models::Deadline;
use serde::{Deserialize, Serialize};

use crate::record::Record;
use crate::{SandboxError, Store};

/// What `ls` says of a sandbox whose lifetime is over and whose state is kept.
pub(crate) const EXPIRED: &str = "Expired";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifetime {
    /// When it ends, in milliseconds since the Unix epoch.
    pub ends_unix_ms: u64,
    /// Keep the state directory (the disk) once it has ended, rather than remove it.
    pub keep: bool,
}

impl Lifetime {
    pub fn has_ended(&self) -> bool {
        SystemTime::now() >= UNIX_EPOCH + Duration::from_millis(self.ends_unix_ms)
    }
}

impl Store {
    /// Ends sandbox `name` `ttl` from now (replacing any lifetime it had): its VMM stops then,
    /// and its state is removed then (by the next command that meets it) unless `keep`.
    pub fn set_lifetime(&self, name: &str, ttl: Duration, keep: bool) -> Result<Record, SandboxError> {
        let mut record = self.ready_record(name)?;
        let ends = SystemTime::now().checked_add(ttl).ok_or(SandboxError::BadTtl { secs: ttl.as_secs() })?;
        let ends_unix_ms = u64::try_from(ends.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis())
            .map_err(|_| SandboxError::BadTtl { secs: ttl.as_secs() })?;
        record.lifetime = Some(Lifetime { ends_unix_ms, keep });
        record.write(&self.dir(name))?;
        self.api(name).put("/deadline", &Deadline { unix_ms: ends_unix_ms })?;
        Ok(record)
    }

    /// What becomes of a sandbox met after its lifetime: its VMM stopped if it has not yet
    /// noticed, its state removed unless kept. `Some(removed)` when its lifetime is over.
    pub(crate) fn end_if_expired(&self, record: &Record) -> Option<bool> {
        let lifetime = record.lifetime.filter(Lifetime::has_ended)?;
        let dir = self.dir(&record.name);
        // A teardown stops the VMM itself.
        match lifetime.keep {
            true => self.stop_vmm(record, &dir),
            false => self.teardown(&record.name, &dir),
        }
        Some(!lifetime.keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lifetime_ends_at_its_moment() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(Lifetime { ends_unix_ms: now - 1, keep: false }.has_ended());
        assert!(!Lifetime { ends_unix_ms: now + 60_000, keep: false }.has_ended());
    }
}
