//! Web chat for customers: Chat API v3 (`/nexus/v3/chat/sessions...`, JSON, WebSocket and
//! SSE streams or long polls, multipart file upload). Requests become events on the inbound topic; reads
//! come from the session store (files: the provisioning database).

pub mod client_key;
mod files;
mod poll;
mod presence;
mod stream;
mod v2;
mod v3;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::{ApiError, AppState};
use crate::events::publish::publish;
use crate::events::Event;
use crate::stores::provisioning::Permission;
pub use client_key::{Claims, ClientKeys};
pub use files::sweep as sweep_files;
pub(crate) use files::{
    file_response, published_or_released, receive as receive_upload, rejection as upload_rejection,
    stable_file_id, store as store_upload, stored_file, uploaded,
};
pub use presence::Presence;
pub(crate) use v3::{
    body_error, bus_message_id, check_message_id, check_text, check_user_data, json_body,
    transcript_page, typing_started, Reader, TranscriptQuery,
};

pub use crate::topology::topics::INBOUND as INBOUND_TOPIC;

/// The body limit of an upload route: `max_file_bytes` plus multipart framing, above the
/// edge's general body limit.
pub(crate) fn upload_limit(max_file_bytes: usize) -> DefaultBodyLimit {
    DefaultBodyLimit::max(max_file_bytes.saturating_add(files::FRAMING_BYTES))
}

/// The chat routes; the upload route takes bodies up to `max_file_bytes` plus multipart
/// framing, above the edge's general body limit.
pub fn routes(max_file_bytes: usize) -> Router<AppState> {
    let upload_limit = upload_limit(max_file_bytes);
    let v3 = Router::new()
        .route("/nexus/v3/chat/sessions", post(v3::start))
        .route(
            "/nexus/v3/chat/sessions/{id}/messages",
            post(v3::send).get(poll::transcript),
        )
        .route("/nexus/v3/chat/sessions/{id}/typing", post(v3::typing))
        .route(
            "/nexus/v3/chat/sessions/{id}/user-data",
            post(v3::user_data),
        )
        .route(
            "/nexus/v3/chat/sessions/{id}/read-receipt",
            post(v3::read_receipt),
        )
        .route("/nexus/v3/chat/sessions/{id}/notices", post(v3::notice))
        .route(
            "/nexus/v3/chat/sessions/{id}/client-key",
            post(v3::renew_key),
        )
        .route(
            "/nexus/v3/chat/sessions/{id}/files",
            post(files::upload).layer(upload_limit),
        )
        .route(
            "/nexus/v3/chat/sessions/{id}/files/{file_id}",
            get(files::download),
        )
        .route(
            "/nexus/v3/chat/sessions/{id}/disconnect",
            post(v3::disconnect),
        )
        .route(
            "/nexus/v3/chat/sessions/{id}/stream",
            get(stream::websocket),
        )
        .route("/nexus/v3/chat/sessions/{id}/events", get(stream::sse))
        .method_not_allowed_fallback(crate::edge::error::method_not_allowed)
        .route_layer(middleware::from_fn(crate::edge::path::require_plain));
    let v2 = Router::new()
        .route("/genesys/2/chat/{service}", post(v2::start))
        .route("/genesys/2/chat/{service}/", post(v2::start))
        .route(
            "/genesys/2/chat/{service}/{chat_id}/{op}",
            post(v2::operation),
        )
        // A widget configured with the service URL's accepted trailing slash appends
        // `/{chatId}/{op}` to it: its chat must go on past the start.
        .route(
            "/genesys/2/chat/{service}//{chat_id}/{op}",
            post(v2::operation),
        )
        .method_not_allowed_fallback(v2_method_not_allowed)
        .route_layer(middleware::from_fn(v2_plain_path));
    v3.merge(v2)
}

/// v2 clients read every answer in the v2 shape, a wrong method's too.
async fn v2_method_not_allowed() -> v2::V2Error {
    v2::V2Error::from(crate::edge::error::method_not_allowed().await)
}

/// The edge's answer to a path no route has: in the v2 shape under the v2 API's prefix (a
/// v2 client reads `statusCode`), in the API's error shape elsewhere.
pub(crate) async fn not_found(uri: axum::http::Uri) -> Response {
    let e = crate::edge::error::not_found().await;
    if uri.path().starts_with("/genesys/2/chat/") {
        v2::V2Error::from(e).into_response()
    } else {
        e.into_response()
    }
}

async fn v2_plain_path(request: Request, next: Next) -> Response {
    match crate::edge::path::refused(&request) {
        Some(e) => v2::V2Error::from(e).into_response(),
        None => next.run(request).await,
    }
}

/// The tenant of a request's `x-api-key`, which must have the chat permission.
pub(crate) async fn chat_tenant(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    chat_tenant_within(state, headers, std::time::Duration::MAX).await
}

/// [`chat_tenant`] from a lookup of the key at most `max_age` old (an open stream's periodic
/// check bounds it).
pub(crate) async fn chat_tenant_within(
    state: &AppState,
    headers: &HeaderMap,
    max_age: std::time::Duration,
) -> Result<String, ApiError> {
    let raw = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("send the tenant's API key in `x-api-key`"))?;
    let grant = super::auth::api_key(state, raw, max_age).await?;
    if !grant.permissions.contains(&Permission::Chat) {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "this API key has no chat permission",
        ));
    }
    Ok(grant.tenant_id)
}

/// The session a request may act on: its API key's tenant and a client key for this session.
/// The request counts as the customer's sign of life.
pub(crate) async fn session_claims(
    state: &AppState,
    headers: &HeaderMap,
    session_id: &str,
) -> Result<Claims, ApiError> {
    let tenant = chat_tenant(state, headers).await?;
    let raw = headers
        .get("x-nexus-client-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized("send the session's client key in `x-nexus-client-key`")
        })?;
    let claims = claims_for(state, raw, &tenant, session_id)?;
    state.presence.seen(state, &claims);
    Ok(claims)
}

/// The code of a client key that was valid for the session but has expired.
pub(crate) const CLIENT_KEY_EXPIRED: &str = "CLIENT_KEY_EXPIRED";

/// Checks a client key against the tenant and session; a key of another session or tenant is
/// the same answer as a wrong key, so nothing about other sessions leaks. Expiry is checked
/// last: only the holder of this session's key learns that it expired.
pub(crate) fn claims_for(
    state: &AppState,
    raw: &str,
    tenant: &str,
    session_id: &str,
) -> Result<Claims, ApiError> {
    match state.client_keys.verify(raw) {
        Some(c) if c.tid == tenant && c.sid == session_id => {
            if state
                .client_keys
                .expired(&c, chrono::Utc::now().timestamp())
            {
                return Err(ApiError::new(
                    axum::http::StatusCode::UNAUTHORIZED,
                    CLIENT_KEY_EXPIRED,
                    "the client key has expired; start a new session",
                ));
            }
            Ok(c)
        }
        _ => Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "INVALID_CLIENT_KEY",
            "the client key is not valid for this session",
        )),
    }
}

/// Publishes an event the edge built, answering 503 if the bus does not take it.
pub(crate) async fn publish_event(
    state: &AppState,
    topic: &str,
    event: &Event,
) -> Result<(), ApiError> {
    match publish(state.bus.as_ref(), topic, event).await {
        Ok(_) => Ok(()),
        Err(e) => Err(ApiError::publish_failed(e, "INVALID_FIELD")),
    }
}
