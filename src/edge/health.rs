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

/// One readiness check: `Err` with what the unauthenticated answer may say (`unavailable`,
/// `timed out`); the error itself (hosts, user names, server messages) goes to the log only.
async fn check<E: std::fmt::Display>(
    what: &'static str,
    probe: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), &'static str> {
    check_as(what, probe, |_| "unavailable").await
}

/// [`check`] whose failure answers `word(error)`, one of a fixed set of words.
async fn check_as<E: std::fmt::Display>(
    what: &'static str,
    probe: impl std::future::Future<Output = Result<(), E>>,
    word: impl Fn(&E) -> &'static str,
) -> Result<(), &'static str> {
    match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(check = what, error = %e, "not ready");
            Err(word(&e))
        }
        Err(_) => {
            tracing::warn!(check = what, "not ready: timed out");
            Err("timed out")
        }
    }
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    // A certificate the bus's TLS refused is not an outage: the answer says so (the log
    // line names the certificate problem and the `bus.*` setting).
    let bus = check_as("bus", state.bus.health(), |e| match e {
        crate::bus::BusError::Tls(_) => "tls handshake failed",
        _ => "unavailable",
    });
    let provisioning = check("provisioning", state.provisioning.health());
    let sessions = async {
        match &state.sessions {
            None => Ok(()),
            Some(store) => check("sessions", store.ping()).await,
        }
    };
    // Together, not one after the other: each check may take READY_TIMEOUT, and in turn two
    // hanging stores took longer than the chart's probe timeout (3 s), so the kubelet dropped
    // the request before `nexus_bus_up` was set.
    let (bus, provisioning, sessions) = tokio::join!(bus, provisioning, sessions);
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
    let shown = |kind: &str, result: Result<(), &str>| match result {
        Ok(()) => json!({"kind": kind, "ok": true}),
        Err(e) => json!({"kind": kind, "ok": false, "error": e}),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "not_ready", "checks": {
            "bus": shown(state.bus.kind(), bus),
            "provisioning": shown(state.provisioning.kind(), provisioning),
            "sessions": shown("session store", sessions),
        }})),
    )
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a failing check answers is one of two fixed words: never the error, which can
    /// name hosts and users (`/readyz` is unauthenticated).
    #[tokio::test]
    async fn a_failing_check_answers_no_detail() {
        let failed = check("provisioning", async {
            Err::<(), _>("password authentication failed for user \"nexus\" at db.internal")
        })
        .await;
        assert_eq!(failed, Err("unavailable"));
        assert_eq!(check("bus", async { Ok::<(), String>(()) }).await, Ok(()));
    }
}
