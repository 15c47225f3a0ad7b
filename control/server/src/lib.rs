//! `ember serve`: a server that speaks the LangSmith Sandboxes API, so that the unmodified
//! `langsmith` Python SDK (`from langsmith.sandbox import SandboxClient`) drives ember.
//!
//! The control plane is under `/api/v2/sandboxes` (boxes, snapshots), each box's data plane
//! under `/dataplane/{box id}` (commands over WebSocket or SSE, files), and `/metrics` has the
//! server in Prometheus' text format. ember adds `POST .../boxes/{name}/fork` and
//! `GET .../boxes/{name}/events`, and `ember expose` its routes for this host's own sandboxes
//! (see [`host_sandboxes`], [`local`]). Sandboxes are reached only through a [`backend::Backend`]:
//! `ember serve` uses [`backend::sandbox::SandboxBackend`], the control plane's own library.
//! Tenancy: see [`tenants`].

pub mod backend;
pub mod boxes;
pub mod clock;
pub mod dataplane;
pub mod download_links;
pub mod error;
pub mod events;
pub mod expiry;
pub mod grants;
pub mod host_sandboxes;
pub mod lifecycle;
pub mod local;
pub mod metrics;
pub mod models;
pub mod pool;
pub mod ports;
pub mod registry;
pub mod routes;
pub mod service_proxy;
pub mod service_tokens;
pub mod snapshots;
pub mod state;
pub mod tenants;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

pub use state::{AppState, Config, Shared};

/// How often commands are checked for their timeouts and expiry, and boxes for their idle and
/// stopped time.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// How long after a failed fill of a warm pool it is tried again.
const POOL_RETRY: Duration = Duration::from_secs(10);

/// Refuses to serve every tenant's sandboxes beyond this host without keys.
pub fn check_listen(addr: &SocketAddr, tenants: &tenants::Tenants) -> Result<(), String> {
    if !tenants.required() && !addr.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on {addr} without API keys: anyone who reaches it would run code in your sandboxes; \
             pass --keys FILE, or listen on a loopback address"
        ));
    }
    Ok(())
}

/// Completes when the process is asked to end (SIGINT or SIGTERM).
pub async fn until_signalled() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Serves `state` on `listener` until `shutdown` completes. Sandboxes are left as they are.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reaper_state = state.clone();
    let reaper = tokio::spawn(async move {
        let mut every = tokio::time::interval(REAP_EVERY);
        loop {
            every.tick().await;
            reaper_state.commands.reap();
            expiry::reap(&reaper_state).await;
        }
    });
    let saver = state.registry.is_some().then(|| {
        let state = state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(registry::SAVE_EVERY);
            loop {
                every.tick().await;
                let saving = state.clone();
                let _ = tokio::task::spawn_blocking(move || saving.save_if_changed()).await;
            }
        })
    });
    let filler_state = state.clone();
    let filler = tokio::spawn(async move {
        loop {
            pool::fill(&filler_state).await;
            // A failed fill is tried again a while later.
            let _ = tokio::time::timeout(POOL_RETRY, filler_state.pool_wanted.notified()).await;
        }
    });
    // The peer's address is what the service proxy's X-Forwarded-For says.
    let app = routes::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    reaper.abort();
    filler.abort();
    if let Some(saver) = saver {
        saver.abort();
    }
    // The pools' sandboxes are nobody's: they go with the server.
    let spares = state.pools.drain();
    let backend = state.backend.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for sandbox in spares {
            if let Err(e) = backend.remove(&sandbox.name) {
                tracing::warn!("cannot remove the warm pool's sandbox {}: {e}", sandbox.name);
            }
        }
    })
    .await;
    state.save_if_changed();
    served
}
