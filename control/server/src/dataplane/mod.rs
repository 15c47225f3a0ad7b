//! Each box's data plane, at the `dataplane_url` the control plane hands out
//! (`/dataplane/{box id}`): commands over the WebSocket (`execute/ws`) and over SSE
//! (`execute/stream/{start,resume}`), files (`upload`, `download`, `glob`, `grep`), and TCP
//! tunnels into the box's ports (`tunnel`).
//! Every request carries the tenant's key like the control plane's; a box of another tenant
//! is a 404, and a stopped box is started first (except for a tunnel: see `ports`).

pub mod commands;
mod exec_sse;
mod exec_ws;
pub mod execute;
pub(crate) mod files;
pub mod output;
mod search;
pub mod spill;
mod tunnel;
mod ws_io;

use axum::routing::{get, post};
use axum::Router;

use crate::boxes::BoxRecord;
use crate::error::ApiError;
use crate::lifecycle;
use crate::state::Shared;
use crate::tenants::Tenant;

/// Tenant's box `box_id`, running; its idle time starts over.
async fn running_box(state: &Shared, tenant: &Tenant, box_id: &str) -> Result<BoxRecord, ApiError> {
    let record = state.boxes.by_id(&tenant.name, box_id)?;
    state.boxes.touch(box_id);
    lifecycle::running(state, record).await
}

pub fn router() -> Router<Shared> {
    Router::new()
        .route("/execute/ws", get(exec_ws::upgrade))
        .route("/execute/stream/start", post(exec_sse::start))
        .route("/execute/stream/resume", post(exec_sse::resume))
        // An upload streams to the guest in bounded chunks (see `files`): axum's 2 MiB limit on
        // bodies it would buffer would only refuse files larger than that.
        .route("/upload", post(files::upload).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/download", get(files::download).head(files::download))
        .route("/glob", post(search::glob))
        .route("/grep", post(search::grep))
        .route("/tunnel", get(tunnel::upgrade))
}
