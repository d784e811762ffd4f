//! Calls to an edge in the test process: a request through `edge::app` with `oneshot` and its
//! answer (status and JSON), the edge served on a port of its own, the records a topic holds.

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use nexus::edge::{self, AppState};
use serde_json::Value;
use tower::ServiceExt;

/// The edge's answer to `req`.
pub async fn send(state: &AppState, req: Request<Body>) -> Response<Body> {
    edge::app(state.clone())
        .oneshot(req)
        .await
        .expect("response")
}

/// The edge's answer to `req`: its status and JSON body (`Null` when the body is not JSON).
pub async fn call(state: &AppState, req: Request<Body>) -> (StatusCode, Value) {
    let resp = send(state, req).await;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Serves the edge on a port of its own until the test ends; its `127.0.0.1:port`.
pub async fn serve(state: AppState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, edge::app(state)).await;
    });
    format!("127.0.0.1:{}", addr.port())
}

/// How many records `topic` holds, over all its partitions.
pub async fn published(state: &AppState, topic: &str) -> u64 {
    let offsets = state.bus.partition_offsets(topic).await.expect("offsets");
    offsets.iter().map(|p| p.high - p.low).sum()
}
