//! Review of the ingest endpoint (`POST /v1/events/{topic}`): an `occurred_at` no clock gives
//! (before 2000, or more than a day ahead of the edge's clock) is refused with 400
//! `OCCURRED_AT_OUT_OF_RANGE` and nothing is published, since the conversation role would only
//! dead-letter it (`bad_time`). Times in the range, or none (the edge's clock), still go
//! through. The edge runs in-process as in `edge_http.rs`, on the embedded bus.

use crate::common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::ingest::{admin_state, valid_event, TOKEN};
use common::inproc::call;
use nexus::edge::AppState;
use serde_json::{json, Value};

const TOPIC: &str = "nexus.inbound.v1";
const DAY_MS: i64 = 86_400_000;

/// Posts `event` to the ingest endpoint of the inbound topic.
async fn ingest(state: &AppState, event: &Value) -> (StatusCode, Value) {
    let req = Request::post(format!("/v1/events/{TOPIC}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(event.to_string()))
        .expect("request");
    call(state, req).await
}

/// A customer message dated `occurred_at` (left out when `None`).
fn message_at(occurred_at: Option<Value>) -> Value {
    let mut event = valid_event();
    if let Some(at) = occurred_at {
        event["occurred_at"] = at;
    }
    event
}

async fn published(state: &AppState) -> u64 {
    common::inproc::published(state, TOPIC).await
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[tokio::test]
async fn an_occurred_at_no_clock_gives_is_refused_and_not_published() {
    let (state, _dir) = admin_state().await;
    let refused = [
        json!(0),
        json!(-1),
        json!(i64::MIN),
        json!(i64::MAX),
        // Seconds where milliseconds are meant: January 1970.
        json!(now_ms() / 1_000),
        json!(946_684_799_999i64),
        json!("1999-12-31T23:59:59.999Z"),
        json!(now_ms() + DAY_MS + 60_000),
        json!("9999-12-31T23:59:59Z"),
    ];
    for at in refused {
        let (status, body) = ingest(&state, &message_at(Some(at.clone()))).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("OCCURRED_AT_OUT_OF_RANGE")),
            "occurred_at {at}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("occurred_at"), "{message}");
    }
    assert_eq!(published(&state).await, 0, "nothing may be published");
}

#[tokio::test]
async fn an_occurred_at_in_the_range_or_none_is_published() {
    let (state, _dir) = admin_state().await;
    let taken = [
        None,
        Some(json!(946_684_800_000i64)),
        Some(json!("2000-01-01T00:00:00Z")),
        Some(json!(now_ms() - 365 * DAY_MS)),
        Some(json!(now_ms())),
        // A clock ahead, within the day the range allows.
        Some(json!(now_ms() + DAY_MS - 60_000)),
    ];
    let n = taken.len();
    for at in taken {
        let (status, body) = ingest(&state, &message_at(at.clone())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "occurred_at {at:?}: {body}");
    }
    assert_eq!(published(&state).await, n as u64);
}
