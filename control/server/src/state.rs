//! What the server holds: its backend, its tenants, and the boxes, snapshots and commands it
//! made, shared by every request.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::Backend;
use crate::boxes::Boxes;
use crate::dataplane::commands::Commands;
use crate::download_links::DownloadLinks;
use crate::error::ApiError;
use crate::events::Events;
use crate::host_sandboxes::HostSandboxes;
use crate::metrics::Metrics;
use crate::service_tokens::ServiceTokens;
use crate::pool::{PoolSpec, Pools};
use crate::registry::{self, Records, Registry, RegistryError};
use crate::snapshots::Snapshots;
use crate::tenants::Tenants;

/// Bytes of output a command may have written that no client was sent yet before it is held
/// back (see `dataplane::commands`).
pub const DEFAULT_OUTPUT_CAPACITY: usize = 8 << 20;

pub struct Config {
    pub tenants: Tenants,
    /// The server's URL as clients reach it, for the data plane URLs it hands out; without it,
    /// `http://` and the request's Host.
    pub public_url: Option<String>,
    /// Where the boxes' event traces are kept; without it, in memory.
    pub events_dir: Option<PathBuf>,
    pub output_capacity: usize,
    /// Where a command's output past `output_capacity` goes while no client keeps up, and how
    /// much of it per command; without, the command is held back at `output_capacity`.
    pub spill: Option<(PathBuf, u64)>,
    /// How long a start or a fork may take when the request gives no timeout.
    pub ready_timeout: Duration,
    /// `idle_ttl_seconds` of a box whose create names none (0: never stopped for idling).
    pub default_idle_ttl_seconds: u64,
    /// `delete_after_stop_seconds` of a box whose create names none.
    pub default_delete_after_stop_seconds: Option<u64>,
    /// Warm pools to keep filled.
    pub pools: Vec<PoolSpec>,
    /// The key of the server's own user (see `local`); without it, no host sandbox is exposed.
    pub local_key: Option<String>,
    /// The domain under which `{port}-{box id}.DOMAIN` is that box's service (see
    /// `service_proxy::route_by_host`); without it, service URLs are path prefixes only.
    pub service_domain: Option<String>,
}

impl Config {
    pub fn new(tenants: Tenants) -> Config {
        Config {
            tenants,
            public_url: None,
            events_dir: None,
            output_capacity: DEFAULT_OUTPUT_CAPACITY,
            spill: None,
            ready_timeout: Duration::from_secs(120),
            // The SDK documents 600 s as the server's default when a create names none.
            default_idle_ttl_seconds: 600,
            default_delete_after_stop_seconds: None,
            pools: Vec::new(),
            local_key: None,
            service_domain: None,
        }
    }
}

pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub config: Config,
    pub boxes: Boxes,
    pub snapshots: Snapshots,
    pub commands: Commands,
    pub events: Events,
    pub metrics: Metrics,
    pub service_tokens: ServiceTokens,
    pub download_links: DownloadLinks,
    pub host_sandboxes: HostSandboxes,
    pub pools: Pools,
    /// Woken when a create took a pool's sandbox, for the filler.
    pub pool_wanted: tokio::sync::Notify,
    /// Where the records are kept across restarts, if anywhere; with the changes counts
    /// (boxes, snapshots, pools, download links) last saved.
    pub registry: Option<Registry>,
    saved: Mutex<(u64, u64, u64, u64)>,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(backend: Arc<dyn Backend>, config: Config) -> Shared {
        Self::with(backend, config, Records::default(), None)
    }

    /// A server whose records are kept in `registry`: the records a previous run saved there
    /// are adopted (see [`registry::adopt`]; this asks the backend, so it blocks).
    pub fn restore(backend: Arc<dyn Backend>, config: Config, registry: Registry) -> Result<Shared, RegistryError> {
        let records = registry::adopt(&*backend, registry.load()?);
        let state = Self::with(backend, config, records, Some(registry));
        // What adoption changed is saved at once.
        *state.saved.lock().unwrap() = (u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        state.save_if_changed();
        Ok(state)
    }

    fn with(backend: Arc<dyn Backend>, config: Config, mut records: Records, registry: Option<Registry>) -> Shared {
        // A link whose box the records no longer have ended with it.
        let boxes = &records.boxes;
        records.download_links.retain(|l| boxes.iter().any(|b| b.id == l.grant.box_id));
        let events = Events::new(config.events_dir.clone());
        let pools = Pools::new(config.pools.clone(), records.pool, &*backend);
        Arc::new(AppState {
            backend,
            config,
            boxes: Boxes::with(records.boxes),
            snapshots: Snapshots::with(records.snapshots),
            pools,
            pool_wanted: tokio::sync::Notify::new(),
            commands: Commands::default(),
            events,
            metrics: Metrics::default(),
            service_tokens: ServiceTokens::default(),
            download_links: DownloadLinks::with(records.download_links),
            host_sandboxes: HostSandboxes::default(),
            registry,
            saved: Mutex::new((0, 0, 0, 0)),
        })
    }

    /// Writes the records to the registry if they changed since it was last written (a
    /// failure is logged, and tried again at the next change).
    pub fn save_if_changed(&self) {
        let Some(registry) = &self.registry else { return };
        let mut saved = self.saved.lock().unwrap();
        let now = (self.boxes.changes(), self.snapshots.changes(), self.pools.changes(), self.download_links.changes());
        if *saved == now {
            return;
        }
        let records = Records {
            boxes: self.boxes.all(),
            snapshots: self.snapshots.all(),
            pool: self.pools.members(),
            download_links: self.download_links.all(),
        };
        match registry.save(records) {
            Ok(()) => *saved = now,
            Err(e) => tracing::error!("{e}"),
        }
    }
}

/// Runs blocking backend work on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("a backend call failed: {e}")))
}
