//! `/healthz` (the process is alive), `/readyz` (bus and stores answer) and `/metrics`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::AppState;
use crate::telemetry::metrics as m;

/// Readiness must answer faster than a probe's timeout even when the bus hangs.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let bus = match tokio::time::timeout(READY_TIMEOUT, state.bus.health()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_string()),
    };
    let provisioning = match tokio::time::timeout(READY_TIMEOUT, state.provisioning.health()).await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_string()),
    };
    let sessions = match &state.sessions {
        None => Ok(()),
        Some(store) => match tokio::time::timeout(READY_TIMEOUT, store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_string()),
        },
    };
    metrics::gauge!(m::BUS_UP).set(if bus.is_ok() { 1.0 } else { 0.0 });
    if bus.is_ok() && provisioning.is_ok() && sessions.is_ok() {
        return (
            StatusCode::OK,
            Json(json!({
                "status": "ready",
                "bus": state.bus.kind(),
                "provisioning": state.provisioning.kind(),
            })),
        );
    }
    let check = |kind: &str, result: Result<(), String>| match result {
        Ok(()) => json!({"kind": kind, "ok": true}),
        Err(e) => json!({"kind": kind, "ok": false, "error": e}),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "not_ready", "checks": {
            "bus": check(state.bus.kind(), bus),
            "provisioning": check(state.provisioning.kind(), provisioning),
            "sessions": check("session store", sessions),
        }})),
    )
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
