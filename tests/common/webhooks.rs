//! Webhook receivers for tests: an axum server on loopback that records every request and
//! answers per path as told (ok, 5xx, hang, abort header, slow), plus signature checks
//! (Standard Webhooks through the reference Python package, genesys `X-Hub-Signature` recomputed).

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

use super::chat::eventually;

/// How long [`Receiver::wait_for`] waits.
pub const WAIT: Duration = Duration::from_secs(20);

// ---- receivers ---------------------------------------------------------------------------

/// How a receiver path answers.
#[derive(Clone, Debug)]
pub enum Mode {
    Ok,
    /// Answer this status `n` times, then 200.
    FailTimes(u16, u32),
    /// Always this status.
    Always(u16),
    /// 429 with `Retry-After: <seconds>` once, then 200.
    ThrottleOnce(u64),
    /// 500 with `webhook-delivery: abort-message`.
    Abort,
    /// Never answer.
    Hang,
    /// 200 after this many milliseconds.
    Slow(u64),
}

#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub at: Instant,
}

impl Received {
    pub fn id(&self) -> &str {
        self.headers
            .get("webhook-id")
            .map(String::as_str)
            .unwrap_or("")
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("json body")
    }
    pub fn event(&self) -> String {
        self.json()["data"]["entities"][0]["event"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    pub fn conversation(&self) -> String {
        self.json()["data"]["entities"][0]["entity"]["id"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

#[derive(Default)]
pub struct ReceiverState {
    pub modes: HashMap<String, Mode>,
    /// Every request, at its arrival.
    pub got: Vec<Received>,
    /// webhook-ids of requests answered 2xx (a request cut off by a dying sender is not).
    pub answered: Vec<String>,
    /// The requests answered 2xx in [`Mode::Slow`], in the order answered.
    pub answered_requests: Vec<Received>,
}

#[derive(Clone)]
pub struct Receiver {
    pub base: String,
    pub state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state: Arc<Mutex<ReceiverState>> = Arc::default();
        let app = Router::new()
            .route("/r/{name}", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            base: format!("http://{addr}"),
            state,
        }
    }

    pub fn url(&self, name: &str) -> String {
        format!("{}/r/{name}", self.base)
    }

    pub fn set(&self, name: &str, mode: Mode) {
        self.state
            .lock()
            .unwrap()
            .modes
            .insert(format!("/r/{name}"), mode);
    }

    pub fn got(&self, name: &str) -> Vec<Received> {
        let path = format!("/r/{name}");
        self.state
            .lock()
            .unwrap()
            .got
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `name` has received at least `n` requests; returns them.
    pub async fn wait_for(&self, name: &str, n: usize) -> Vec<Received> {
        let this = self.clone();
        let name = name.to_string();
        eventually(WAIT, &format!("{n} requests at {name}"), move || {
            let got = this.got(&name);
            async move { (got.len() >= n).then_some(got) }
        })
        .await
    }
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let path = format!("/r/{name}");
    let (mode, received) = {
        let mut s = state.lock().unwrap();
        let received = Received {
            path: path.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body,
            at: Instant::now(),
        };
        s.got.push(received.clone());
        let mode = s.modes.get(&path).cloned().unwrap_or(Mode::Ok);
        if let Mode::FailTimes(code, n) = mode {
            let next = if n <= 1 {
                Mode::Ok
            } else {
                Mode::FailTimes(code, n - 1)
            };
            s.modes.insert(path, next);
        } else if let Mode::ThrottleOnce(_) = mode {
            s.modes.insert(path, Mode::Ok);
        }
        (mode, received)
    };
    match mode {
        Mode::Ok => StatusCode::NO_CONTENT.into_response(),
        Mode::FailTimes(code, _) | Mode::Always(code) => {
            StatusCode::from_u16(code).expect("status").into_response()
        }
        Mode::ThrottleOnce(seconds) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", seconds.to_string())],
        )
            .into_response(),
        Mode::Abort => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("webhook-delivery", "abort-message")],
        )
            .into_response(),
        Mode::Slow(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let mut s = state.lock().unwrap();
            s.answered.push(id);
            s.answered_requests.push(received);
            StatusCode::OK.into_response()
        }
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
    }
}

// ---- signatures ------------------------------------------------------------------------

/// Verifies each (secret, request) with the Python `standardwebhooks` package.
pub fn verify_standard(cases: &[(&str, &Received)]) -> Vec<String> {
    let input: Vec<Value> = cases
        .iter()
        .map(|(secret, r)| json!({"secret": secret, "headers": r.headers, "body": r.body}))
        .collect();
    let mut child = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/interop/verify_webhooks.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed for the webhook signature test");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(Value::from(input).to_string().as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "verify_webhooks.py failed (is standardwebhooks installed? `pip install standardwebhooks`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("verifier output")
}

pub fn genesys_signature(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(body.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha1={hex}")
}
