//! The edge: the HTTP/WebSocket API of nexus. It validates, authenticates, turns requests into
//! events, publishes them and answers only after the bus acknowledged. It keeps no state.

mod admin;
mod agent;
mod auth;
mod bot;
pub mod chat;
mod cors;
pub mod demo;
pub mod error;
mod health;
pub mod hub;
mod ingest;
pub(crate) mod path;
pub mod server;
mod socket;
mod telemetry;

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::config::Config;
use crate::stores::provisioning::Provisioning;
use crate::stores::session::SessionStore;
use crate::topology::Topology;

pub use error::ApiError;
pub use ingest::new_traceparent;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub bus: Arc<dyn Bus>,
    pub topology: Arc<Topology>,
    pub metrics: PrometheusHandle,
    pub provisioning: Arc<Provisioning>,
    /// Live sessions; `None` in worker processes without the conversation role (they serve
    /// no chat API).
    pub sessions: Option<Arc<dyn SessionStore>>,
    /// Sockets of this process, fed from the delivery topic.
    pub hub: Arc<hub::Hub>,
    pub client_keys: chat::ClientKeys,
    /// Customers' signs of life (live chats whose customer vanished are closed).
    pub presence: Arc<chat::Presence>,
    /// The demo tenant (`nexus dev` only).
    pub demo: Option<Arc<demo::DemoTenant>>,
    /// Fires on shutdown: sockets close with a reconnect hint.
    pub shutdown: CancellationToken,
    /// Uploads this process reads at once (`chat.max_uploads_in_flight`): each holds up to
    /// `chat.max_file_bytes` in memory until it is stored.
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// WebSocket tasks still running (shutdown waits for their close frames).
    pub sockets: socket::OpenSockets,
}

impl AppState {
    /// The state with an empty hub, no demo and client keys from `chat.client_key_secret`
    /// (a random secret per process when empty).
    pub fn new(
        config: Arc<Config>,
        bus: Arc<dyn Bus>,
        topology: Arc<Topology>,
        metrics: PrometheusHandle,
        provisioning: Arc<Provisioning>,
        sessions: impl Into<Option<Arc<dyn SessionStore>>>,
    ) -> Self {
        let secret = if config.chat.client_key_secret.is_empty() {
            uuid::Uuid::new_v4().as_bytes().repeat(2)
        } else {
            config.chat.client_key_secret.as_bytes().to_vec()
        };
        let uploads = Arc::new(tokio::sync::Semaphore::new(
            config.chat.max_uploads_in_flight.max(1),
        ));
        Self {
            client_keys: chat::ClientKeys::new(&secret, config.chat.client_key_ttl_s),
            presence: Arc::new(chat::Presence::new(
                config.workers.conversation.abandon_timeout_s,
            )),
            config,
            bus,
            topology,
            metrics,
            provisioning,
            sessions: sessions.into(),
            hub: hub::Hub::new(),
            demo: None,
            shutdown: CancellationToken::new(),
            uploads,
            sockets: socket::OpenSockets::default(),
        }
    }
}

/// First read buffer of a socket. The WebSocket codec zero-fills its whole free buffer
/// before every read attempt, and a socket is read again after every push it sends: at the
/// codec's 128 KiB default that was a 128 KiB `memset` per push. Client frames are small
/// requests; the buffer grows for a larger one (up to the body limit).
const SOCKET_READ_BUFFER: usize = 4 * 1024;

impl AppState {
    /// A socket upgrade with the edge's limits: frames and messages no larger than the HTTP
    /// body limit, a small read buffer.
    pub fn socket(&self, ws: WebSocketUpgrade) -> WebSocketUpgrade {
        let limit = self.config.http.max_body_bytes;
        ws.max_message_size(limit)
            .max_frame_size(limit)
            .read_buffer_size(SOCKET_READ_BUFFER)
    }

    /// The session store, or 503 in a process that has none.
    pub fn sessions(&self) -> Result<&Arc<dyn SessionStore>, ApiError> {
        self.sessions.as_ref().ok_or_else(|| {
            ApiError::unavailable("this process serves no chat API (no session store)")
        })
    }
}

/// What a worker pod serves: health, readiness and metrics only.
pub fn ops_app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn(telemetry::track))
        .with_state(state)
}

/// The routes browsers call: the customer chat APIs and the agent API, open to the pages of
/// `http.cors_allowed_origins`.
/// API answers carry credentials (a client key, an agent token, a secret shown once) and a
/// tenant's conversations: no browser or proxy cache along the way may keep them. An answer
/// that says how it may be cached itself (a file download) keeps its own.
pub(crate) async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    response
        .headers_mut()
        .entry(axum::http::header::CACHE_CONTROL)
        .or_insert(axum::http::HeaderValue::from_static("no-store"));
    response
}

fn browser_routes(state: &AppState) -> Router<AppState> {
    let max_file_bytes = state.config.chat.max_file_bytes;
    let routes = chat::routes(max_file_bytes)
        .merge(agent::routes(max_file_bytes))
        .layer(axum::middleware::map_response(no_store));
    match cors::layer(&state.config.http) {
        Some(cors) => routes.layer(cors),
        None => routes,
    }
}

/// The edge's routes; tests call it with `oneshot`.
pub fn app(state: AppState) -> Router {
    let limit = state.config.http.max_body_bytes;
    Router::new()
        .merge(admin::router(state.clone()))
        .merge(ingest::routes(state.clone()))
        .merge(browser_routes(&state))
        .merge(bot::routes().layer(axum::middleware::map_response(no_store)))
        .merge(demo::routes())
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(chat::not_found)
        .layer(axum::middleware::from_fn(telemetry::track))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
