//! The server's records of its boxes and captured snapshots, kept in one JSON file
//! (`$EMBER_STATE/../server/registry.json` for `ember serve`), so that a restarted server
//! adopts the sandboxes it made: nothing is lost when `ember serve` restarts. The file is
//! rewritten whole (a temporary file renamed over it) within [`SAVE_EVERY`] of any change to a
//! record; it is the server's own, mode 0600, in a directory only its owner reaches.
//!
//! Download links are kept with them (see `download_links`). What a restart cannot keep: commands (their processes run on in the guests, but their
//! output and ids were the old server's) and a create, start or capture in flight, which
//! are failed with that said.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, State};
use crate::boxes::{BoxRecord, Status};
use crate::download_links::Link;
use crate::grants::Held;
use crate::pool::Member;
use crate::snapshots::{SnapStatus, SnapshotRecord};

/// How soon a change to a record reaches the file.
pub const SAVE_EVERY: Duration = Duration::from_millis(100);

/// The file's layout; another is refused rather than misread.
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read the server's registry {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the server's registry {path} is not one this ember reads ({reason}); move it away to start with no sandboxes adopted")]
    Bad { path: PathBuf, reason: String },
    #[error("cannot write the server's registry {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// What the file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Records {
    pub boxes: Vec<BoxRecord>,
    pub snapshots: Vec<SnapshotRecord>,
    /// The warm pools' sandboxes.
    #[serde(default)]
    pub pool: Vec<Member>,
    #[serde(default)]
    pub download_links: Vec<Held<Link>>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    format: u32,
    #[serde(flatten)]
    records: Records,
}

pub struct Registry {
    path: PathBuf,
}

impl Registry {
    pub fn new(path: PathBuf) -> Registry {
        Registry { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records a previous run saved; none if it never saved.
    pub fn load(&self) -> Result<Records, RegistryError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Records::default()),
            Err(source) => return Err(RegistryError::Read { path: self.path.clone(), source }),
        };
        let bad = |reason: String| RegistryError::Bad { path: self.path.clone(), reason };
        let saved: Saved = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if saved.format != FORMAT {
            return Err(bad(format!("format {}, expected {FORMAT}", saved.format)));
        }
        Ok(saved.records)
    }

    pub fn save(&self, records: Records) -> Result<(), RegistryError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let write = |source| RegistryError::Write { path: self.path.clone(), source };
        let text = serde_json::to_vec(&Saved { format: FORMAT, records })
            .map_err(|e| write(std::io::Error::other(e)))?;
        let mut temp = self.path.clone().into_os_string();
        temp.push(".tmp");
        let temp = PathBuf::from(temp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(write)?;
        file.write_all(&text).map_err(write)?;
        std::fs::rename(&temp, &self.path).map_err(write)
    }
}

/// The records a previous run of the server left, made to match what the backend has now (the
/// pool's members are checked by `Pools::new`): a box whose sandbox runs is ready, one whose sandbox stopped is stopped,
/// one whose sandbox is gone or failed is failed, saying so; steps that were in flight failed.
pub fn adopt(backend: &dyn Backend, mut records: Records) -> Records {
    for record in &mut records.boxes {
        let Some(name) = record.backend.clone() else {
            if record.status != Status::Failed {
                fail(record, "the server restarted while the sandbox was being created".into());
            }
            continue;
        };
        match backend.state(&name) {
            Ok(State::Running) => {
                record.status = Status::Ready;
                record.status_message = None;
            }
            Ok(State::Stopped { .. }) => {
                record.status = Status::Stopped;
                record.stopped_ms.get_or_insert(record.updated_ms);
            }
            Ok(State::Failed) => fail(record, format!("its sandbox {name} failed while the server was down")),
            Err(BackendError::NotFound(_)) => {
                fail(record, format!("its sandbox {name} is gone (removed while the server was down)"))
            }
            Err(e) => fail(record, format!("cannot tell the state of its sandbox {name}: {e}")),
        }
    }
    for snapshot in &mut records.snapshots {
        if snapshot.status == SnapStatus::Building {
            snapshot.status = SnapStatus::Failed;
            snapshot.status_message = Some("the server restarted while the snapshot was being captured".into());
        }
    }
    records
}

fn fail(record: &mut BoxRecord, why: String) {
    tracing::warn!(sandbox = %record.name, tenant = %record.tenant, "{why}");
    record.status = Status::Failed;
    record.status_message = Some(why);
}
