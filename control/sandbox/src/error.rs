//! What can go wrong with sandboxes, in words that say what to do.

use std::path::{Path, PathBuf};

use api::client::ApiClientError;
use disk::DiskError;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("'{0}' is not a valid name: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadName(String),
    #[error("a sandbox named {0} already exists")]
    Exists(String),
    #[error("there is no sandbox named {0} (`ember ls` lists them)")]
    NotFound(String),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the sandbox state directory {0} is too long for Unix socket paths; set EMBER_STATE to a shorter directory")]
    PathTooLong(PathBuf),
    #[error("the sandbox record {path} is unreadable: {reason}")]
    BadRecord { path: PathBuf, reason: String },
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Api(#[from] ApiClientError),
    #[error("the VMM of sandbox {name} exited during start-up ({how}); its log says:\n{log}\nthe guest console's last lines:\n{console}")]
    VmmDied { name: String, how: String, log: String, console: String },
    #[error("the state directory {path} is not a directory of yours (owner uid {owner}): ember keeps sandboxes only where no other user can reach them; set EMBER_STATE to a directory of your own")]
    ForeignState { path: PathBuf, owner: u32 },
    #[error("cannot start the VMM {binary}: {reason}")]
    Spawn { binary: PathBuf, reason: String },
    #[error("{0} is not a snapshot directory (it has no snapshot state): give a directory `ember snapshot` wrote")]
    NotASnapshot(PathBuf),
    #[error("{0} already holds a snapshot")]
    SnapshotExists(PathBuf),
    #[error(transparent)]
    Snapshot(#[from] api::snapshot_meta::MetaError),
    #[error("sandbox {0} is not running: its VMM has exited (`ember rm {0}` removes what is left)")]
    NotRunning(String),
    #[error("a thread starting a forked sandbox panicked")]
    ForkPanicked,
    #[error("sandbox {name}: its VMM froze its memory into {said} files but passed {got} file descriptors")]
    FrozenFds { name: String, said: usize, got: usize },
    #[error("sandbox {name}: {what} within {secs} s; {progress}; its VMM log says:\n{log}\nthe guest console's last lines:\n{console}")]
    NotReady { name: String, what: &'static str, secs: u64, progress: String, log: String, console: String },
    #[error("sandbox {name}: its guest agent does not answer: {source}")]
    AgentUnreachable { name: String, source: agent_client::ClientError },
    #[error("sandbox {name} is not the continuation of its snapshot: its agent has run {found_ms} ms, the snapshot's had run {expected_ms} ms; its VMM log says:\n{log}\nthe guest console's last lines:\n{console}")]
    NotContinuation { name: String, expected_ms: u64, found_ms: u64, log: String, console: String },
    #[error("sandbox {name}: cannot give the guest its own identity: {source}")]
    Identity { name: String, source: agent_client::ClientError },
    #[error("cannot get random bytes from the host kernel: {0}")]
    HostRandom(std::io::Error),
    #[error("a template named {0} already exists")]
    TemplateExists(String),
    #[error("there is no template named {0} (`ember template ls` lists them)")]
    TemplateNotFound(String),
    #[error("template {name} is in use by sandbox {users}: remove those first")]
    TemplateInUse { name: String, users: String },
    #[error("sandbox {name} is still starting (ember process {pid} is starting it): try again once it is ready")]
    Starting { name: String, pid: i32 },
    #[error("sandbox {name} did not finish starting: the ember process that started it ({pid}) is gone; remove it with `ember rm {name}`")]
    FailedStart { name: String, pid: i32 },
    #[error("guest memory of {mem_mib} MiB is refused: {}", crate::limits::memory_advice(*mem_mib, *max_mib, bound))]
    BadMemory { mem_mib: u64, max_mib: u64, bound: &'static str },
    #[error("{vcpus} vCPUs are refused: give --vcpus from 1 to {max} ({bound})")]
    BadVcpus { vcpus: u8, max: u32, bound: &'static str },
    #[error(
        "a disk of {gib} GiB is refused: give --disk-gib from 1 to {max_gib} (the size of the file \
         system holding {state}), and at least the image's size"
    )]
    BadDisk { gib: u64, max_gib: u64, state: PathBuf },
    #[error("a lifetime of {secs} s is refused: it ends past what the clock can say")]
    BadTtl { secs: u64 },
    #[error(
        "sandbox {name}'s lifetime (--ttl) is over: its VMM was stopped{}",
        if *removed { " and its state removed" } else { "; `ember rm` removes its state" }
    )]
    Expired { name: String, removed: bool },
    #[error("the egress policy (proxy_config) is refused: {0}")]
    EgressPolicy(String),
    #[error("cannot make or load the egress CA: {0}")]
    EgressCa(String),
    #[error("sandbox {name}: its egress proxy {reason}; its log says:\n{log}")]
    EgressProxy { name: String, reason: String, log: String },
    // Not a `source`: the message says it, once.
    #[error("sandbox {name}: its guest agent did not take egress: {error}")]
    EgressGuest { name: String, error: agent_client::ClientError },
}

pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError {
    let path = path.to_path_buf();
    move |source| SandboxError::Io { what, path, source }
}
