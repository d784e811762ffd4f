//! HTTP request metrics and spans, labelled by route template (never by raw path).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::telemetry::metrics as m;

pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = method_label(req.method());
    let span = tracing::info_span!("http", method = %method, route = %route, status = tracing::field::Empty);
    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("status", status);
    metrics::counter!(m::HTTP_REQUESTS_TOTAL, "method" => method, "route" => route.clone(), "status" => status.to_string()).increment(1);
    metrics::histogram!(m::HTTP_REQUEST_SECONDS, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The method as a label: the standard ones by name, anything else `other` (a client can send
/// any token as a method, and each would be a new series).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_methods_share_one_label() {
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for made_up in [&b"FOO1"[..], b"FOO2", b"get"] {
            let m = Method::from_bytes(made_up).expect("a token");
            assert_eq!(method_label(&m), "other");
        }
    }
}
