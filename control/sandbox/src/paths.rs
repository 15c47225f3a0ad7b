//! Where everything of the control plane lives under `$EMBER_STATE`: one directory per
//! sandbox (its files named here), and beside them the CID reservations, spare VMMs, templates
//! and the frozen layers of forks.

use std::path::PathBuf;

use crate::Store;

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

    /// Frozen disk layers of forked sandboxes: `$EMBER_STATE/layers`, beside the sandboxes.
    pub fn layers_dir(&self) -> PathBuf {
        self.root.with_file_name("layers")
    }
}
