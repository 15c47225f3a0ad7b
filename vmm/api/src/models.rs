//! The request and response bodies of the API, in Firecracker's shapes (field names, enum
//! spellings, which fields are optional), so that a Firecracker client can drive ember.
//! Fields ember cannot honour are accepted only at the value that asks for nothing
//! (e.g. `smt: false`); anything else is a 400 naming the field.

use serde::{Deserialize, Serialize};

/// Why a request body is refused: an option ember does not implement, or an inconsistent one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("vcpu_count must be at least 1")]
    NoVcpu,
    #[error("mem_size_mib must be at least 1")]
    NoMemory,
    #[error("smt: ember gives each vCPU its own core; only false is supported")]
    Smt,
    #[error("track_dirty_pages: ember takes full snapshots only; only false is supported")]
    TrackDirtyPages,
    #[error("cpu_template {0}: ember has no CPU templates; only \"None\" is supported")]
    CpuTemplate(String),
    #[error("huge_pages {0}: only \"None\" is supported")]
    HugePages(String),
    #[error("the drive_id in the body ({body}) differs from the one in the path ({path})")]
    DriveId { body: String, path: String },
    #[error("partuuid: ember's guests have no partition tables; the root drive is /dev/vda")]
    Partuuid,
    #[error("cache_type {0}: expected Unsafe or Writeback")]
    CacheType(String),
    #[error("io_engine {0}: only Sync is supported")]
    IoEngine(String),
    #[error("rate_limiter: ember has no block rate limiter")]
    RateLimiter,
    #[error("path_on_host is missing: it is the only drive property ember can update")]
    NoPathOnHost,
    #[error("snapshot_type Diff: ember takes full snapshots only")]
    DiffSnapshot,
    #[error("snapshot_path must not be empty")]
    NoSnapshotPath,
    #[error("mem_file_path must not be empty (or set freeze_memory)")]
    NoMemFilePath,
    #[error("freeze_memory writes no memory file: leave out mem_file_path")]
    FrozenMemFilePath,
    #[error("enable_diff_snapshots/track_dirty_pages: ember takes full snapshots only")]
    DiffLoad,
    #[error("give either mem_backend or mem_file_path, not both")]
    TwoMemFiles,
    #[error("the memory file is missing: give mem_backend (or mem_file_path)")]
    NoMemFile,
    #[error("mem_backend Uffd: ember maps the memory file itself; only File is supported")]
    Uffd,
    #[error("mem_fds: the memory comes as file descriptors attached to the request; leave out mem_backend and mem_file_path")]
    MemFdsAndPath,
    #[error("mem_fds must be at least 1: the memory file, then each of its layers")]
    NoMemFds,
    #[error("mem_fds is {expected}, but {got} file descriptors came with the request")]
    MemFdCount { expected: usize, got: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    /// Appended to ember's default command line (the last occurrence of a parameter wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        // Firecracker's defaults.
        Self { vcpu_count: 1, mem_size_mib: 128, smt: false, track_dirty_pages: false, cpu_template: None, huge_pages: None }
    }
}

impl MachineConfig {
    /// Rejects the options ember does not implement.
    pub fn check(&self) -> Result<(), RequestError> {
        if self.vcpu_count == 0 {
            return Err(RequestError::NoVcpu);
        }
        if self.mem_size_mib == 0 {
            return Err(RequestError::NoMemory);
        }
        if self.smt {
            return Err(RequestError::Smt);
        }
        if self.track_dirty_pages {
            return Err(RequestError::TrackDirtyPages);
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => {}
            Some(t) => return Err(RequestError::CpuTemplate(t.into())),
        }
        match self.huge_pages.as_deref() {
            None | Some("None") => Ok(()),
            Some(h) => Err(RequestError::HugePages(h.into())),
        }
    }
}

/// ember's own: the format of a drive's file. Firecracker's drives are raw files only, so a
/// drive without one is raw; the VMM never guesses a format from a file's content (a guest
/// writes every byte of a raw disk, a qcow2 header included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    /// ember's own; absent: raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

impl Drive {
    pub fn check(&self, id_in_path: &str) -> Result<(), RequestError> {
        if self.drive_id != id_in_path {
            return Err(RequestError::DriveId { body: self.drive_id.clone(), path: id_in_path.into() });
        }
        if self.partuuid.is_some() {
            return Err(RequestError::Partuuid);
        }
        // ember always honours the guest's flushes, which is what both Firecracker cache types
        // promise at least.
        match self.cache_type.as_deref() {
            None | Some("Unsafe") | Some("Writeback") => {}
            Some(c) => return Err(RequestError::CacheType(c.into())),
        }
        match self.io_engine.as_deref() {
            None | Some("Sync") => {}
            Some(e) => return Err(RequestError::IoEngine(e.into())),
        }
        if self.rate_limiter.as_ref().is_some_and(|r| !r.is_null()) {
            return Err(RequestError::RateLimiter);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
    /// Deprecated in Firecracker and ignored there too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub state: VmState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

/// PUT /metrics: the file FlushMetrics appends to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: String,
}

/// PUT /deadline (ember's own): when the VMM ends the VM, whatever the guest does, in
/// milliseconds since the Unix epoch; what a sandbox's lifetime (`ember run --ttl`) is. Before
/// or after the start; a later call replaces the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deadline {
    pub unix_ms: u64,
}

/// One line of the metrics file (Firecracker's shape, ember's few counters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub utc_timestamp_ms: u64,
    pub vcpu: VcpuMetrics,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuMetrics {
    /// VM exits of all vCPUs since the VMM started the VM (or loaded it).
    pub exits: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// The state file.
    pub snapshot_path: String,
    /// Where guest memory is written; empty with `freeze_memory`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mem_file_path: String,
    /// ember's own, for forks: instead of writing guest memory to a file, freeze it in place
    /// as a copy-on-write base that this VM and any VM loaded from the state share. The
    /// answer ([`FrozenMemory`]) carries the files to load it from as file descriptors.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_memory: bool,
}

impl PartialDrive {
    pub fn check(&self, id_in_path: &str) -> Result<(), RequestError> {
        if self.drive_id != id_in_path {
            return Err(RequestError::DriveId { body: self.drive_id.clone(), path: id_in_path.into() });
        }
        if self.rate_limiter.as_ref().is_some_and(|r| !r.is_null()) {
            return Err(RequestError::RateLimiter);
        }
        if self.path_on_host.as_deref().is_none_or(str::is_empty) {
            return Err(RequestError::NoPathOnHost);
        }
        Ok(())
    }
}

impl SnapshotCreateParams {
    pub fn check(&self) -> Result<(), RequestError> {
        if self.snapshot_type == SnapshotType::Diff {
            return Err(RequestError::DiffSnapshot);
        }
        if self.snapshot_path.is_empty() {
            return Err(RequestError::NoSnapshotPath);
        }
        match (self.freeze_memory, self.mem_file_path.is_empty()) {
            (false, true) => Err(RequestError::NoMemFilePath),
            (true, false) => Err(RequestError::FrozenMemFilePath),
            _ => Ok(()),
        }
    }
}

/// ember's own: the answer to a snapshot create with `freeze_memory`. The frozen memory comes
/// as `mem_fds` file descriptors attached to the response (`SCM_RIGHTS`, see `api::scm`): the
/// memory file, then each layer to map over it where it holds data, in order. A load takes
/// them the same way, in the same order ([`SnapshotLoadParams::mem_fds`]), so a child VMM needs
/// no access to its parent's files or `/proc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenMemory {
    pub mem_fds: usize,
}

/// Firecracker's PATCH /drives/{id}: put another file behind a running VM's drive. ember
/// needs the new file to be the same size and to hold what the drive held (a new overlay on
/// the frozen old one, as a fork does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// ember's own: the new file's format; absent: the drive's current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: String,
}

/// ember's own: the disk a restored VM uses for drive `index` (the order of the guest's
/// /dev/vdX, root drive first). Every drive of the snapshot needs one: a state file carries no
/// host paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    pub index: usize,
    pub path_on_host: String,
    /// Whether the guest may write the drive. The state can only make a drive more
    /// restrictive: a drive the snapshot had read-only stays so. Left out, the snapshot's flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// The file's format; absent: the format the snapshot saved for the drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

/// ember's own: the vsock socket and CID of a restored VM, so that several VMs can restore
/// from one snapshot. A snapshot with a vsock device needs `uds_path`: a state file carries no
/// host paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uds_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Firecracker's older spelling of a File `mem_backend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// ember's own: the memory comes as this many file descriptors attached to the request
    /// (`SCM_RIGHTS`), instead of `mem_backend`: the memory file, then each layer mapped over it
    /// where it holds data, in order (what a `freeze_memory` create answered with, see
    /// [`FrozenMemory`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_fds: Option<usize>,
}

/// Where a load's guest memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemSource<'a> {
    /// A memory file by path.
    Path(&'a str),
    /// This many descriptors attached to the request: the memory file, then its layers.
    Fds(usize),
}

impl SnapshotLoadParams {
    /// Where the memory comes from, after checking the options ember does not implement.
    pub fn mem_file(&self) -> Result<MemSource<'_>, RequestError> {
        if self.enable_diff_snapshots || self.track_dirty_pages {
            return Err(RequestError::DiffLoad);
        }
        match (&self.mem_backend, &self.mem_file_path, self.mem_fds) {
            (None, None, Some(0)) => Err(RequestError::NoMemFds),
            (None, None, Some(n)) => Ok(MemSource::Fds(n)),
            (_, _, Some(_)) => Err(RequestError::MemFdsAndPath),
            (Some(_), Some(_), None) => Err(RequestError::TwoMemFiles),
            (None, None, None) => Err(RequestError::NoMemFile),
            (Some(MemBackend { backend_type: MemBackendType::Uffd, .. }), None, None) => Err(RequestError::Uffd),
            (Some(MemBackend { backend_path, .. }), None, None) => Ok(MemSource::Path(backend_path)),
            (None, Some(path), None) => Ok(MemSource::Path(path)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_bodies_parse() {
        let d: Drive = serde_json::from_str(
            r#"{"drive_id":"rootfs","path_on_host":"/r.ext4","is_root_device":true,"is_read_only":false}"#,
        )
        .unwrap();
        assert!(d.check("rootfs").is_ok());
        assert!(d.check("other").unwrap_err().to_string().contains("differs"));
        let a: InstanceActionInfo = serde_json::from_str(r#"{"action_type":"InstanceStart"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::InstanceStart);
        let v: Vm = serde_json::from_str(r#"{"state":"Paused"}"#).unwrap();
        assert_eq!(v.state, VmState::Paused);
        let m: MachineConfig = serde_json::from_str(r#"{"vcpu_count":2,"mem_size_mib":1024,"smt":false}"#).unwrap();
        assert!(m.check().is_ok());
        assert_eq!(serde_json::to_string(&InstanceState::NotStarted).unwrap(), r#""Not started""#);
    }

    #[test]
    fn a_drive_format_is_raw_unless_said_and_only_raw_or_qcow2() {
        let drive = |format: &str| {
            serde_json::from_str::<Drive>(&format!(
                r#"{{"drive_id":"a","path_on_host":"p","is_root_device":false{format}}}"#
            ))
        };
        assert_eq!(drive("").unwrap().format, None);
        assert_eq!(DiskFormat::default(), DiskFormat::Raw);
        assert_eq!(drive(r#","format":"raw""#).unwrap().format, Some(DiskFormat::Raw));
        assert_eq!(drive(r#","format":"qcow2""#).unwrap().format, Some(DiskFormat::Qcow2));
        for bad in [r#","format":"vmdk""#, r#","format":"QCOW2""#, r#","format":1"#, r#","format":"""#] {
            assert!(drive(bad).is_err(), "{bad} was accepted");
        }
        let p: PartialDrive = serde_json::from_str(r#"{"drive_id":"a","path_on_host":"/n.qcow2","format":"qcow2"}"#).unwrap();
        assert_eq!(p.format, Some(DiskFormat::Qcow2));
        assert!(serde_json::from_str::<PartialDrive>(r#"{"drive_id":"a","format":"auto"}"#).is_err());
        let o: DriveOverride = serde_json::from_str(r#"{"index":0,"path_on_host":"d"}"#).unwrap();
        assert_eq!(o.format, None);
        assert!(serde_json::from_str::<DriveOverride>(r#"{"index":0,"path_on_host":"d","format":"probe"}"#).is_err());
        assert_eq!(serde_json::to_string(&DiskFormat::Qcow2).unwrap(), r#""qcow2""#);
    }

    #[test]
    fn unknown_fields_and_unsupported_options_are_refused() {
        assert!(serde_json::from_str::<BootSource>(r#"{"kernel_image_path":"k","bogus":1}"#).is_err());
        let m: MachineConfig = serde_json::from_str(r#"{"vcpu_count":2,"mem_size_mib":64,"smt":true}"#).unwrap();
        assert!(m.check().unwrap_err().to_string().contains("smt"));
        let m = MachineConfig { vcpu_count: 0, ..Default::default() };
        assert!(m.check().unwrap_err().to_string().contains("vcpu_count"));
        let d: Drive = serde_json::from_str(
            r#"{"drive_id":"a","path_on_host":"p","is_root_device":false,"rate_limiter":{"bandwidth":{}}}"#,
        )
        .unwrap();
        assert!(d.check("a").unwrap_err().to_string().contains("rate_limiter"));
    }

    #[test]
    fn snapshot_bodies_in_firecracker_shapes() {
        let c: SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_type":"Full","snapshot_path":"s","mem_file_path":"m"}"#).unwrap();
        assert!(c.check().is_ok());
        let c: SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_type":"Diff","snapshot_path":"s","mem_file_path":"m"}"#).unwrap();
        assert!(c.check().unwrap_err().to_string().contains("Diff"));
        let l: SnapshotLoadParams = serde_json::from_str(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"},"resume_vm":true}"#,
        )
        .unwrap();
        assert_eq!((l.mem_file().unwrap(), l.resume_vm), (MemSource::Path("m"), true));
        let l: SnapshotLoadParams = serde_json::from_str(r#"{"snapshot_path":"s","mem_file_path":"old"}"#).unwrap();
        assert_eq!((l.mem_file().unwrap(), l.resume_vm), (MemSource::Path("old"), false));
        let l: SnapshotLoadParams = serde_json::from_str(r#"{"snapshot_path":"s","mem_fds":3}"#).unwrap();
        assert_eq!(l.mem_file().unwrap(), MemSource::Fds(3));
        let l: SnapshotLoadParams = serde_json::from_str(r#"{"snapshot_path":"s","mem_fds":0}"#).unwrap();
        assert!(l.mem_file().unwrap_err().to_string().contains("at least 1"));
        let l: SnapshotLoadParams = serde_json::from_str(r#"{"snapshot_path":"s","mem_file_path":"m","mem_fds":1}"#).unwrap();
        assert!(l.mem_file().unwrap_err().to_string().contains("leave out mem_backend"));
        let l: SnapshotLoadParams = serde_json::from_str(r#"{"snapshot_path":"s"}"#).unwrap();
        assert!(l.mem_file().unwrap_err().to_string().contains("missing"));
        let l: SnapshotLoadParams = serde_json::from_str(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"u"}}"#,
        )
        .unwrap();
        assert!(l.mem_file().unwrap_err().to_string().contains("Uffd"));
        let l: SnapshotLoadParams = serde_json::from_str(
            r#"{"snapshot_path":"s","mem_file_path":"m","drive_overrides":[{"index":0,"path_on_host":"d","is_read_only":true,"format":"qcow2"}],
                "vsock_override":{"guest_cid":9,"uds_path":"v"}}"#,
        )
        .unwrap();
        assert_eq!((l.drive_overrides[0].index, l.drive_overrides[0].is_read_only), (0, Some(true)));
        assert_eq!(l.drive_overrides[0].format, Some(DiskFormat::Qcow2));
        assert_eq!(l.vsock_override.unwrap().guest_cid, Some(9));
    }
}
