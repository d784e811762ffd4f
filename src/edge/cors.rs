//! Cross-origin calls from browsers (CORS) to the customer and agent APIs: a chat widget embedded
//! on the company's own site, an agent desktop served from elsewhere (`http.cors_allowed_origins`).
//!
//! Only those APIs: the admin, ingest and bot APIs are for servers and stay closed to pages of
//! other origins. No credentials (cookies) are involved: every API authenticates with headers or
//! query parameters the page sets itself, so the answers never allow credentials. WebSockets are
//! not subject to CORS; their keys in the query are what protects them.

use std::time::Duration;

use axum::http::{header, HeaderName, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::{cors_origins, CorsOrigins, HttpConfig};

/// How long a browser may reuse a preflight answer (browsers cap it: Chromium at 2 h).
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// Request headers the customer and agent APIs read, besides the CORS-safelisted ones.
const ALLOWED_HEADERS: [&str; 8] = [
    "x-api-key",
    "x-nexus-client-key",
    // Chat API v2's API key header.
    "apikey",
    "authorization",
    "content-type",
    "traceparent",
    "tracestate",
    // An SSE client resuming by hand (EventSource sends it itself on a reconnect).
    "last-event-id",
];

/// The CORS layer for the customer and agent routes; `None` when no other origin is allowed
/// (the default), so those answers carry no CORS headers at all.
pub fn layer(http: &HttpConfig) -> Option<CorsLayer> {
    // Checked when the config was loaded; a value that fails here allows nothing.
    let origin = match cors_origins(&http.cors_allowed_origins).ok()? {
        CorsOrigins::None => return None,
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(origins) => AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| header::HeaderValue::from_str(o).ok()),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
            // A file download's name, and when to come back after a 503.
            .expose_headers([header::CONTENT_DISPOSITION, header::RETRY_AFTER])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}
