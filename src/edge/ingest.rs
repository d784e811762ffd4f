//! `POST /v1/events/{topic}`: a JSON event for tools and tests. It is validated against the
//! topic's schema, published as Avro, and answered 202 with the event id after the bus ack.
//! Nothing is published when anything is wrong, including an `occurred_at` no clock gives
//! (before 2000, or more than a day ahead: `OCCURRED_AT_OUT_OF_RANGE`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::bus::headers;
use crate::events::{self, Event};
use crate::workers::conversation::event_time;

/// The route, behind the admin token and the plain-path check like `/v1/admin` (no path is
/// parsed, and no answer shape given away, before the token is checked).
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/events/{topic}", post(ingest))
        .method_not_allowed_fallback(super::error::method_not_allowed)
        .route_layer(axum::middleware::from_fn(super::path::require_plain))
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            super::admin::require_admin,
        ))
}

async fn ingest(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    request_headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let declared = state.topology.topic(&topic).ok_or_else(|| {
        ApiError::not_found(
            "UNKNOWN_TOPIC",
            format!("topic `{topic}` is not in the topology"),
        )
    })?;
    let body =
        body.map_err(|e| ApiError::new(e.status(), body_error_code(e.status()), e.body_text()))?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("INVALID_JSON", format!("body is not valid JSON: {e}"))
    })?;
    let mut event = Event::from_json_owned(value)
        .map_err(|e| ApiError::bad_request("INVALID_EVENT", e.to_string()))?;
    if !declared.events.contains(&event.envelope.event_type) {
        return Err(ApiError::bad_request(
            "EVENT_TYPE_NOT_ALLOWED",
            format!(
                "topic `{topic}` does not carry `{}` (it carries: {})",
                event.envelope.event_type,
                declared.events.join(", ")
            ),
        ));
    }
    check_occurred_at(&event)?;
    if event.envelope.traceparent.is_none() {
        event.envelope.traceparent = request_headers
            .get(headers::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .filter(|v| events::is_traceparent(v))
            .map(str::to_string)
            .or_else(|| Some(new_traceparent()));
    }
    let published = match events::publish::publish(state.bus.as_ref(), &topic, &event).await {
        Ok(p) => p,
        Err(e) => return Err(ApiError::publish_failed(e, "SCHEMA_MISMATCH")),
    };
    tracing::debug!(event_id = %event.envelope.event_id, topic = %topic, partition = published.partition, offset = published.offset, "event ingested");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"event_id": event.envelope.event_id.to_string()})),
    ))
}

/// Refuses a time the conversation role would dead-letter (`bad_time`), by the same rule
/// ([`event_time::check`]): a tool's typo (seconds for milliseconds, a sign) is told to its
/// caller now instead of turning up in a dead-letter topic. Only here: events from the edges'
/// own APIs carry their clock's time.
fn check_occurred_at(event: &Event) -> Result<(), ApiError> {
    let now = chrono::Utc::now().timestamp_millis();
    event_time::check(event.envelope.occurred_at_ms, now)
        .map_err(|e| ApiError::bad_request("OCCURRED_AT_OUT_OF_RANGE", e.to_string()))
}

/// The machine-readable code of a body that could not be read.
fn body_error_code(status: StatusCode) -> &'static str {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        "PAYLOAD_TOO_LARGE"
    } else {
        "INVALID_BODY"
    }
}

/// A new trace context rooted at the edge.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::is_traceparent;

    #[test]
    fn traceparent_format() {
        assert!(is_traceparent(&new_traceparent()));
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent("garbage"));
    }
}
