//! A counting HTTP sink: records every POST's `idempotency-key` and JSON body, applying each
//! key's effect once (as an idempotent receiver does), and can fail on command.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;

#[derive(Default)]
pub struct SinkState {
    /// Requests per idempotency key (deliveries, duplicates included).
    pub deliveries: HashMap<String, u32>,
    /// Effects applied, in order: one per key.
    pub effects: Vec<Value>,
    /// Answer this status instead of 200 while set.
    pub fail_with: Option<u16>,
}

#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<SinkState>>,
}

impl Sink {
    pub async fn start() -> Sink {
        let state: Arc<Mutex<SinkState>> = Arc::default();
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Sink { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    pub fn distinct(&self) -> usize {
        self.state.lock().unwrap().deliveries.len()
    }

    pub fn total(&self) -> u32 {
        self.state.lock().unwrap().deliveries.values().sum()
    }
}

async fn receive(
    State(state): State<Arc<Mutex<SinkState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    let mut s = state.lock().unwrap();
    if let Some(code) = s.fail_with {
        return StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let n = s.deliveries.entry(key).or_insert(0);
    *n += 1;
    if *n == 1 {
        s.effects.push(body);
    }
    StatusCode::OK
}
