//! The edge's HTTP API, called in-process with `oneshot` on an embedded bus: the ingest
//! endpoint publishes valid events only after the bus ack and answers bad input with clear
//! 4xx codes, publishing nothing.

use crate::common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::ingest::{admin_state, admin_state_with, valid_event, TOKEN};
use common::inproc::{call, published, send};
use nexus::edge::{self, AppState};
use serde_json::json;
use tower::ServiceExt;

fn post(path: &str, token: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut r = Request::post(path).header("content-type", "application/json");
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    r.body(body.into()).expect("request")
}

#[tokio::test]
async fn a_valid_event_is_published_and_answered_with_its_id() {
    let (state, _dir) = admin_state().await;
    let (status, body) = call(
        &state,
        post(
            "/v1/events/nexus.inbound.v1",
            Some(TOKEN),
            valid_event().to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["event_id"].as_str().expect("event_id");
    assert_eq!(published(&state, "nexus.inbound.v1").await, 1);

    // The bytes on the bus decode to the same event, with a trace context added at the edge.
    let offsets = state
        .bus
        .partition_offsets("nexus.inbound.v1")
        .await
        .expect("offsets");
    let p = offsets
        .iter()
        .find(|p| p.high > p.low)
        .expect("a partition has it");
    let msg = state
        .bus
        .read("nexus.inbound.v1", p.partition, p.low, 1)
        .await
        .expect("read")
        .remove(0);
    let event = nexus::events::decode(&msg.payload).expect("decode");
    assert_eq!(event.envelope.event_id.to_string(), id);
    assert_eq!(event.envelope.conversation_id, msg.key);
    assert_eq!(event.body["text"], "hello");
    assert!(event
        .envelope
        .traceparent
        .as_deref()
        .is_some_and(|t| t.starts_with("00-")));
}

#[tokio::test]
async fn the_callers_trace_context_travels_in_the_envelope() {
    let (state, _dir) = admin_state().await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = Request::post("/v1/events/nexus.inbound.v1")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("traceparent", tp)
        .body(Body::from(valid_event().to_string()))
        .expect("request");
    let (status, _) = call(&state, req).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let offsets = state
        .bus
        .partition_offsets("nexus.inbound.v1")
        .await
        .expect("offsets");
    let p = offsets.iter().find(|p| p.high > p.low).expect("published");
    let msg = state
        .bus
        .read("nexus.inbound.v1", p.partition, p.low, 1)
        .await
        .expect("read")
        .remove(0);
    assert_eq!(
        nexus::events::decode(&msg.payload)
            .expect("decode")
            .envelope
            .traceparent
            .as_deref(),
        Some(tp)
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_publishes_nothing() {
    let (state, _dir) = admin_state().await;
    let topic = "/v1/events/nexus.inbound.v1";
    let mut wrong_type = valid_event();
    wrong_type["body"]["text"] = json!(42);
    let mut missing = valid_event();
    missing["body"]
        .as_object_mut()
        .expect("object")
        .remove("participant_id");
    let mut unknown_field = valid_event();
    unknown_field["body"]["surprise"] = json!(true);
    let mut not_allowed = valid_event();
    not_allowed["event_type"] = json!("DeliverySucceeded");
    let mut no_such_type = valid_event();
    no_such_type["event_type"] = json!("Nonsense");

    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post(topic, None, valid_event().to_string()),
            StatusCode::UNAUTHORIZED,
            "AUTHENTICATION_REQUIRED",
        ),
        (
            post(topic, Some("wrong"), valid_event().to_string()),
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN",
        ),
        // The token is checked before the path is parsed: no axum plain-text 400 for a
        // caller without one.
        (
            post("/v1/events/%FF", None, valid_event().to_string()),
            StatusCode::UNAUTHORIZED,
            "AUTHENTICATION_REQUIRED",
        ),
        (
            post(
                "/v1/events/no.such.topic",
                Some(TOKEN),
                valid_event().to_string(),
            ),
            StatusCode::NOT_FOUND,
            "UNKNOWN_TOPIC",
        ),
        (
            post(topic, Some(TOKEN), "{not json"),
            StatusCode::BAD_REQUEST,
            "INVALID_JSON",
        ),
        (
            post(topic, Some(TOKEN), wrong_type.to_string()),
            StatusCode::BAD_REQUEST,
            "SCHEMA_MISMATCH",
        ),
        (
            post(topic, Some(TOKEN), missing.to_string()),
            StatusCode::BAD_REQUEST,
            "SCHEMA_MISMATCH",
        ),
        (
            post(topic, Some(TOKEN), unknown_field.to_string()),
            StatusCode::BAD_REQUEST,
            "SCHEMA_MISMATCH",
        ),
        (
            post(topic, Some(TOKEN), not_allowed.to_string()),
            StatusCode::BAD_REQUEST,
            "EVENT_TYPE_NOT_ALLOWED",
        ),
        (
            post(topic, Some(TOKEN), no_such_type.to_string()),
            StatusCode::BAD_REQUEST,
            "INVALID_EVENT",
        ),
        (
            post(topic, Some(TOKEN), "[]"),
            StatusCode::BAD_REQUEST,
            "INVALID_EVENT",
        ),
    ];
    for (req, want_status, want_code) in cases {
        let (status, body) = call(&state, req).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (want_status, Some(want_code)),
            "{body}"
        );
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(
        published(&state, "nexus.inbound.v1").await,
        0,
        "nothing may be published"
    );
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_a_code() {
    let (state, _dir) = admin_state().await;
    let limit = state.config.http.max_body_bytes;
    let mut big = valid_event();
    big["body"]["text"] = json!("x".repeat(limit + 1));
    let (status, body) = call(
        &state,
        post("/v1/events/nexus.inbound.v1", Some(TOKEN), big.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "PAYLOAD_TOO_LARGE");
    assert_eq!(published(&state, "nexus.inbound.v1").await, 0);
}

#[tokio::test]
async fn ingest_is_off_without_an_admin_token() {
    let (mut state, _dir) = admin_state().await;
    let mut config = (*state.config).clone();
    config.http.admin_token = String::new();
    state.config = Arc::new(config);
    let (status, body) = call(
        &state,
        post(
            "/v1/events/nexus.inbound.v1",
            Some(""),
            valid_event().to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "ADMIN_DISABLED");
}

#[tokio::test]
async fn health_and_readiness() {
    let (state, _dir) = admin_state().await;
    let resp = edge::app(state.clone())
        .oneshot(Request::get("/healthz").body(Body::empty()).expect("req"))
        .await
        .expect("resp");
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = edge::app(state.clone())
        .oneshot(Request::get("/readyz").body(Body::empty()).expect("req"))
        .await
        .expect("resp");
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, body) = call(
        &state,
        Request::get("/nope").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NOT_FOUND"))
    );
}

/// A browser's preflight for a cross-origin call of `method` to `path` from `origin`.
fn preflight(path: &str, origin: &str, method: &str, headers: &str) -> Request<Body> {
    Request::options(path)
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", headers)
        .body(Body::empty())
        .expect("request")
}

/// The answer's CORS headers: allowed origin, methods, headers, max age.
async fn cors_of(state: &AppState, req: Request<Body>) -> (StatusCode, [Option<String>; 4]) {
    let resp = send(state, req).await;
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("ascii").to_ascii_lowercase())
    };
    let found = [
        h("access-control-allow-origin"),
        h("access-control-allow-methods"),
        h("access-control-allow-headers"),
        h("access-control-max-age"),
    ];
    (resp.status(), found)
}

const SHOP: &str = "https://shop.example";

#[tokio::test]
async fn pages_of_allowed_origins_reach_the_customer_and_agent_apis_only() {
    // Default: no other origin; the answers carry no CORS headers.
    let (closed, _d1) = admin_state().await;
    let (_, [origin, ..]) = cors_of(
        &closed,
        preflight(
            "/nexus/v3/chat/sessions",
            SHOP,
            "POST",
            "x-api-key,content-type",
        ),
    )
    .await;
    assert_eq!(origin, None, "no origin is allowed by default");

    // Written as an operator might: capitals, a trailing slash.
    let (open, _d2) = admin_state_with(|c| {
        c.http.cors_allowed_origins = vec!["https://Shop.example/".into()];
    })
    .await;
    for (path, method, headers) in [
        ("/nexus/v3/chat/sessions", "POST", "x-api-key,content-type"),
        (
            "/nexus/v3/chat/sessions/s1/messages",
            "GET",
            "x-api-key,x-nexus-client-key",
        ),
        ("/nexus/v3/chat/sessions/s1/events", "GET", "last-event-id"),
        ("/genesys/2/chat/svc", "POST", "apikey,content-type"),
        ("/genesys/2/chat/svc/c1/send", "POST", "apikey"),
        ("/v1/agent/state", "POST", "authorization,content-type"),
        ("/v1/agent/conversations", "GET", "authorization"),
    ] {
        let (status, [origin, methods, allowed, max_age]) =
            cors_of(&open, preflight(path, SHOP, method, headers)).await;
        assert!(status.is_success(), "{path}: preflight answered {status}");
        assert_eq!(origin.as_deref(), Some(SHOP), "{path}");
        assert!(
            methods
                .unwrap_or_default()
                .contains(&method.to_ascii_lowercase()),
            "{path}"
        );
        let allowed = allowed.unwrap_or_default();
        for h in headers.split(',') {
            assert!(
                allowed.contains(h),
                "{path}: `{h}` not allowed in `{allowed}`"
            );
        }
        assert_eq!(max_age.as_deref(), Some("600"), "{path}");
    }

    // The call itself, refused or not, carries the origin so the page can read the answer.
    let (status, [origin, ..]) = cors_of(
        &open,
        Request::post("/nexus/v3/chat/sessions")
            .header("origin", SHOP)
            .header("content-type", "application/json")
            .body(Body::from(r#"{"nickname":"Ann"}"#))
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no API key");
    assert_eq!(origin.as_deref(), Some(SHOP));

    // Another origin, and the server-to-server APIs, get nothing.
    let (_, [origin, ..]) = cors_of(
        &open,
        preflight(
            "/nexus/v3/chat/sessions",
            "https://evil.example",
            "POST",
            "x-api-key",
        ),
    )
    .await;
    assert_eq!(origin, None, "an origin not listed");
    for (path, headers) in [
        ("/v1/admin/tenants", "authorization,content-type"),
        ("/v1/events/nexus.inbound.v1", "authorization,content-type"),
    ] {
        let (_, [origin, ..]) = cors_of(&open, preflight(path, SHOP, "POST", headers)).await;
        assert_eq!(origin, None, "{path} must stay closed to pages");
        let (_, [origin, ..]) = cors_of(&open, post(path, Some(TOKEN), "{}")).await;
        assert_eq!(origin, None, "{path}");
    }

    // `*`: any page.
    let (any, _d3) = admin_state_with(|c| c.http.cors_allowed_origins = vec!["*".into()]).await;
    let (_, [origin, ..]) = cors_of(
        &any,
        preflight(
            "/nexus/v3/chat/sessions",
            "https://anyone.example",
            "POST",
            "x-api-key",
        ),
    )
    .await;
    assert_eq!(origin.as_deref(), Some("*"));
}
