//! What the server holds: its backend, its tenants, and the boxes, snapshots and commands it
//! made, shared by every request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
use crate::boxes::Boxes;
use crate::dataplane::commands::Commands;
use crate::error::ApiError;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::service_tokens::ServiceTokens;
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
    /// How long a start or a fork may take when the request gives no timeout.
    pub ready_timeout: Duration,
}

impl Config {
    pub fn new(tenants: Tenants) -> Config {
        Config {
            tenants,
            public_url: None,
            events_dir: None,
            output_capacity: DEFAULT_OUTPUT_CAPACITY,
            ready_timeout: Duration::from_secs(120),
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
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(backend: Arc<dyn Backend>, config: Config) -> Shared {
        let events = Events::new(config.events_dir.clone());
        Arc::new(AppState {
            backend,
            config,
            boxes: Boxes::default(),
            snapshots: Snapshots::default(),
            commands: Commands::default(),
            events,
            metrics: Metrics::default(),
            service_tokens: ServiceTokens::default(),
        })
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
