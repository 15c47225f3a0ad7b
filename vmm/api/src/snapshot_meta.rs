//! The metadata file a VMM publishes beside every snapshot state file it writes.
//!
//! A control plane needs a few facts about a snapshot before it starts a VMM to load it (how
//! much memory and how many vCPUs the sandbox gets, which drives it has). The state file is the
//! VMM's private binary format; this small JSON file is the published one, so that the control
//! plane never decodes VM state. It is written before the state file is renamed into place, so
//! a state file always has its metadata.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::models::DiskFormat;

/// Version of this file's shape; bumped on an incompatible change.
pub const META_VERSION: u32 = 2;

/// `STATE.meta.json` for the state file `STATE`.
pub fn meta_path(state: &Path) -> PathBuf {
    let mut name = state.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".meta.json");
    state.with_file_name(name)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub meta_version: u32,
    /// The ember that wrote the snapshot (a VMM loads only its own state format).
    pub ember_version: String,
    /// The state file's format version.
    pub state_format: u32,
    pub mem_size_bytes: u64,
    pub vcpu_count: u8,
    /// In the order of the guest's /dev/vdX.
    pub drives: Vec<SnapshotDrive>,
    pub vsock_cid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDrive {
    pub drive_id: Option<String>,
    pub is_root_device: bool,
    pub is_read_only: bool,
    /// The size the guest knows; a disk put in its place on load must have it.
    pub size_bytes: u64,
    /// The format of the drive's file when the snapshot was taken.
    pub format: DiskFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path} is missing: {snapshot} is not a snapshot ember wrote (make one with `ember snapshot`)")]
    Missing { path: PathBuf, snapshot: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not ember snapshot metadata: {source}")]
    Malformed { path: PathBuf, source: serde_json::Error },
    #[error("{path} has metadata version {found}; this ember reads version {META_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// Largest metadata file read: a few drives take a few hundred bytes.
const MAX_META_BYTES: u64 = 64 << 10;

impl SnapshotMeta {
    /// Reads the metadata of the state file `state`.
    pub fn read(state: &Path) -> Result<Self, MetaError> {
        use std::io::Read;
        let path = meta_path(state);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MetaError::Missing { path, snapshot: state.to_owned() })
            }
            Err(source) => return Err(MetaError::Io { path, source }),
        };
        let mut bytes = Vec::new();
        file.take(MAX_META_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|source| MetaError::Io { path: path.clone(), source })?;
        let meta: Self =
            serde_json::from_slice(&bytes).map_err(|source| MetaError::Malformed { path: path.clone(), source })?;
        if meta.meta_version != META_VERSION {
            return Err(MetaError::Version { path, found: meta.meta_version });
        }
        Ok(meta)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("snapshot metadata always serializes");
        bytes.push(b'\n');
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            meta_version: META_VERSION,
            ember_version: "0.1.0".into(),
            state_format: 3,
            mem_size_bytes: 256 << 20,
            vcpu_count: 2,
            drives: vec![SnapshotDrive {
                drive_id: Some("rootfs".into()),
                is_root_device: true,
                is_read_only: false,
                size_bytes: 1 << 30,
                format: DiskFormat::Qcow2,
            }],
            vsock_cid: Some(3),
        }
    }

    #[test]
    fn the_meta_file_sits_beside_its_state_file() {
        assert_eq!(meta_path(Path::new("/s/state")), Path::new("/s/state.meta.json"));
        assert_eq!(meta_path(Path::new("fork.state")), Path::new("fork.state.meta.json"));
    }

    #[test]
    fn reads_back_what_was_written_and_names_what_is_wrong() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-meta-").unwrap();
        let state = dir.as_path().join("state");
        let err = SnapshotMeta::read(&state).unwrap_err();
        assert!(matches!(err, MetaError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("ember snapshot"), "{err}");

        std::fs::write(meta_path(&state), meta().to_json()).unwrap();
        assert_eq!(SnapshotMeta::read(&state).unwrap(), meta());

        std::fs::write(meta_path(&state), b"{\"meta_version\": 2}").unwrap();
        assert!(matches!(SnapshotMeta::read(&state), Err(MetaError::Malformed { .. })));

        let newer = SnapshotMeta { meta_version: 9, ..meta() };
        std::fs::write(meta_path(&state), newer.to_json()).unwrap();
        let err = SnapshotMeta::read(&state).unwrap_err();
        assert!(err.to_string().contains("metadata version 9"), "{err}");
    }
}
