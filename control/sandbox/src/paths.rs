//! Where everything of the control plane lives under `$EMBER_STATE`: one directory per
//! sandbox (its files named here), and beside them the CID reservations, spare VMMs, templates,
//! the frozen layers of forks and the egress CA.

use std::path::PathBuf;

use crate::error::io;
use crate::{SandboxError, Store};

/// Longest Unix socket path (sun_path holds 108 bytes with the NUL), less room for the
/// `_PORT` suffix of guest-initiated vsock connections.
pub(crate) const MAX_SOCKET_PATH: usize = 100;

/// Files in a sandbox's state directory.
pub const RECORD: &str = "sandbox.json";
pub const API_SOCKET: &str = "api.sock";
pub const VSOCK_SOCKET: &str = "vsock.sock";
pub const OVERLAY: &str = "disk.qcow2";
pub const CONSOLE_LOG: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";
pub const METRICS: &str = "metrics.json";
/// The sandbox's egress policy (its `proxy_config`), which its proxy reads.
pub const EGRESS_POLICY: &str = "egress.json";
/// The egress proxy's audit events, one JSON object a line.
pub const EGRESS_AUDIT: &str = "egress.jsonl";
/// The egress proxy's own log (its stderr).
pub const EGRESS_LOG: &str = "egress.log";

impl Store {
    /// `$EMBER_STATE/sandboxes`, else `$XDG_STATE_HOME/ember/sandboxes`, else
    /// `~/.local/state/ember/sandboxes`.
    pub fn default_root() -> PathBuf {
        let env = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let base = env("EMBER_STATE")
            .or_else(|| env("XDG_STATE_HOME").map(|p| p.join("ember")))
            .or_else(|| env("HOME").map(|p| p.join(".local/state/ember")))
            .unwrap_or_else(|| PathBuf::from("/tmp/ember-state"));
        base.join("sandboxes")
    }


    /// Makes `$EMBER_STATE` (the directory holding `sandboxes/` and the rest) if missing, and
    /// checks it is this user's alone: owned by them, mode 0700, so that no other local user
    /// can reach a sandbox's sockets, disks or memory files whatever their modes.
    pub fn check_state_dir(&self) -> Result<(), SandboxError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        let state = self.root.parent().unwrap_or(&self.root);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(state).map_err(io("cannot create", state))?;
        let meta = std::fs::symlink_metadata(state).map_err(io("cannot look at", state))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me {
            return Err(SandboxError::ForeignState { path: state.to_path_buf(), owner: meta.uid() });
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700)).map_err(io("cannot make private", state))?;
        }
        Ok(())
    }

    /// Sandbox `name`'s state directory.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }


    /// CID reservations (`cids`), beside the sandboxes.
    pub(crate) fn cids_dir(&self) -> PathBuf {
        self.root.with_file_name("cids")
    }

    /// Spare VMMs waiting to be taken over (`spares`).
    pub(crate) fn spares_dir(&self) -> PathBuf {
        self.root.with_file_name("spares")
    }

    /// Templates: `$EMBER_STATE/templates`, beside the sandboxes.
    pub fn templates_dir(&self) -> PathBuf {
        self.root.with_file_name("templates")
    }

    pub fn template_dir(&self, name: &str) -> PathBuf {
        self.templates_dir().join(name)
    }

    /// The egress proxies' CA (`$EMBER_STATE/egress-ca`), made by the first sandbox with
    /// egress.
    pub fn egress_ca_dir(&self) -> PathBuf {
        self.root.with_file_name("egress-ca")
    }

    /// Frozen disk layers of forked sandboxes: `$EMBER_STATE/layers`, beside the sandboxes.
    pub fn layers_dir(&self) -> PathBuf {
        self.root.with_file_name("layers")
    }
}
