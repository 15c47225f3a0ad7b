//! The server's only view of sandboxes: [`Backend`].
//!
//! The methods block. The one real implementation, [`sandbox::SandboxBackend`], is the control
//! plane's blocking library (`Store`, the agent client on std Unix sockets, start-ups that
//! poll and sleep): an async trait would only move a `spawn_blocking` into each of its
//! methods. The server calls lifecycle and file methods on tokio's blocking pool, and pumps
//! each command's output on a thread of its own (a command may run for hours). A test
//! backend is then plain threads and processes too.
//!
//! Sandboxes are named by the backend (`Created::name`), never by the API's names: the API's
//! names are each tenant's own, so the server maps them.

pub mod sandbox;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// What went wrong, in the classes the API answers differently.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No such sandbox, snapshot, file or directory.
    #[error("{0}")]
    NotFound(String),
    /// A request the backend refuses as given: a size over the host's limits, a bad path.
    #[error("{0}")]
    Invalid(String),
    /// The sandbox is in no state to do it (stopped, still starting).
    #[error("{0}")]
    NotReady(String),
    /// The sandbox or its guest failed doing it.
    #[error("{0}")]
    Failed(String),
    /// Nothing accepts connections on the port dialed in the sandbox (the message names it).
    #[error("{0}")]
    DialFailed(String),
}

impl From<agent_client::ClientError> for BackendError {
    fn from(e: agent_client::ClientError) -> BackendError {
        use agent_client::ClientError as E;
        match e {
            E::NotFound { .. } | E::NotADirectory { .. } => BackendError::NotFound(e.to_string()),
            E::IsADirectory { .. } | E::PermissionDenied { .. } => BackendError::Invalid(e.to_string()),
            E::DialFailed { .. } => BackendError::DialFailed(e.to_string()),
            e => BackendError::Failed(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// What a new sandbox starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The installation's default: the default image, restored from its automatic template.
    Default,
    /// A template the backend lists (see [`Backend::templates`]).
    Template(String),
    /// A snapshot this server captured (see [`Backend::snapshot`]), by its backend id.
    Snapshot(String),
}

#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub source: Source,
    /// For a boot from the default image: its shape (a restore keeps its snapshot's).
    pub vcpus: Option<u8>,
    pub mem_bytes: Option<u64>,
    /// How long the guest has to become ready.
    pub ready_timeout: std::time::Duration,
}

/// What a created sandbox is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The backend's name for it, what every other call takes.
    pub name: String,
    pub vcpus: u8,
    pub mem_bytes: u64,
    /// The size of its root file system, when known.
    pub disk_bytes: Option<u64>,
}

/// Where a sandbox's machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    /// Its VMM is gone; with `memory`, a start resumes its processes.
    Stopped {
        memory: bool,
    },
    /// Gone wrong: its VMM died, its start failed.
    Failed,
}

/// What an image says its commands run with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub user: Option<String>,
    pub work_dir: Option<String>,
    pub env: Vec<(String, String)>,
}

/// A template the installation offers every tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    pub vcpus: u8,
    pub mem_bytes: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// A command to run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid`.
    pub user: Option<String>,
    /// Whether the command gets a stdin to write to (else /dev/null).
    pub stdin: bool,
    /// Run on a pseudo-terminal (its output comes as stdout).
    pub pty: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// Where a running command's output goes, chunk by chunk, as it arrives. `write` may block:
/// that is how a reader that falls behind holds the command back.
pub trait OutputSink: Send + Sync {
    fn write(&self, stream: Stream, data: &[u8]);
}

/// A started command.
pub trait Running: Send {
    /// Its pid in the guest.
    fn pid(&self) -> u32;
    /// A handle to steer it from other threads while [`Running::wait`] runs.
    fn control(&self) -> Arc<dyn Control>;
    /// Copies its output to `sink` until it ends.
    fn wait(self: Box<Self>, sink: &dyn OutputSink) -> Result<Exit>;
}

/// Steering a running command. Failures (it has just ended) are not errors: the caller
/// learns how the command ended from [`Running::wait`].
pub trait Control: Send + Sync {
    fn write_stdin(&self, data: &[u8]);
    fn close_stdin(&self);
    /// SIGKILL to its whole process group.
    fn kill(&self);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    /// Nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub stat: FileStat,
}

/// A sandbox backend: what `ember serve` drives.
pub trait Backend: Send + Sync + 'static {
    /// Starts a sandbox and returns once it is ready.
    fn create(&self, spec: &CreateSpec) -> Result<Created>;
    /// Stops it if it runs and deletes it with all it has (its stopped states included).
    fn remove(&self, name: &str) -> Result<()>;
    fn state(&self, name: &str) -> Result<State>;
    /// What tells sandbox `name` from an earlier or later one of the same name (a removed
    /// sandbox's name may be given again).
    fn instance(&self, name: &str) -> Result<String>;
    /// Stops its VMM; with `keep_memory`, so that [`Backend::start`] resumes its processes,
    /// else keeping its disk only.
    fn stop(&self, name: &str, keep_memory: bool) -> Result<()>;
    /// Starts a stopped sandbox again; returns once it is ready, with the name it has from
    /// then on (a backend may start a successor in its place).
    fn start(&self, name: &str, ready_timeout: std::time::Duration) -> Result<String>;
    /// Captures a running sandbox as snapshot `id` (a fresh id the caller chose), which
    /// [`Source::Snapshot`] then starts sandboxes from.
    fn snapshot(&self, name: &str, id: &str) -> Result<()>;
    fn remove_snapshot(&self, id: &str) -> Result<()>;
    /// Makes snapshot `id` from a Docker image (`REF` as `ember image pull` takes it): the image
    /// built into a base image of `capacity` bytes (or its default), a sandbox booted from it and
    /// snapshotted. Returns the image's Env, WorkingDir and User, the defaults of its sandboxes.
    fn snapshot_from_image(&self, id: &str, image: &str, capacity: Option<u64>) -> Result<ImageDefaults> {
        let _ = (id, capacity);
        Err(BackendError::Invalid(format!("this backend cannot build snapshots from Docker images ({image})")))
    }
    fn templates(&self) -> Result<Vec<Template>>;
    /// Forks a running sandbox into `count` children; returns them, each ready.
    fn fork(
        &self,
        name: &str,
        count: usize,
        ready_timeout: std::time::Duration,
    ) -> Result<Vec<Created>>;
    fn exec(&self, name: &str, spec: &ExecSpec) -> Result<Box<dyn Running>>;
    /// Writes everything `data` yields to `path` (created or truncated, with `mode`; its
    /// parent directories made); returns the size written.
    fn upload(
        &self,
        name: &str,
        path: &str,
        data: &mut (dyn Read + Send),
        mode: u32,
    ) -> Result<u64>;
    /// Copies `path` into `out`; an error from `out` ends the copy early and is returned as
    /// `Failed` (a ranged read stops that way).
    fn download(&self, name: &str, path: &str, out: &mut dyn Write) -> Result<u64>;
    fn stat(&self, name: &str, path: &str) -> Result<FileStat>;
    fn list_dir(&self, name: &str, path: &str) -> Result<Vec<DirEntry>>;
    /// Connects to TCP `port` on the running sandbox's loopback; the stream then carries that
    /// connection's bytes both ways (shutting its write side is the service's end of file).
    /// Nothing listening there is [`BackendError::DialFailed`].
    fn dial(&self, name: &str, port: u16) -> Result<UnixStream>;
}
