//! The edge: the HTTP/WebSocket API of nexus. It validates, authenticates, turns requests into
//! events, publishes them and answers only after the bus acknowledged. It keeps no state.

mod admin;
mod auth;
pub mod error;
mod health;
mod ingest;
pub mod server;
mod telemetry;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::bus::Bus;
use crate::config::Config;
use crate::stores::provisioning::Provisioning;
use crate::topology::Topology;

pub use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub bus: Arc<dyn Bus>,
    pub topology: Arc<Topology>,
    pub metrics: PrometheusHandle,
    pub provisioning: Arc<Provisioning>,
}

/// The edge's routes; tests call it with `oneshot`.
pub fn app(state: AppState) -> Router {
    let limit = state.config.http.max_body_bytes;
    Router::new()
        .merge(admin::router(state.clone()))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/v1/events/{topic}", post(ingest::ingest))
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn(telemetry::track))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
