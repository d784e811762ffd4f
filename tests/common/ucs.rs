//! A fake UCS on loopback: `POST /ucs/v1/{Service}/{Method}` records every call and applies
//! effects idempotently by the ids it is given, as UCS does (IdentifyContact finds by email or
//! phone or the proposed Id before creating; an existing interaction or document Id creates
//! nothing). It refuses calls that name objects it does not know (order matters), and fails
//! on command: a 5xx, a hang past the caller's timeout, or a 4xx for one email address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Up,
    /// Every call answers this status.
    Down(u16),
    /// Every call hangs (past any sane client timeout), then answers 503.
    Hang,
}

/// One received request, failed ones included.
#[derive(Debug, Clone)]
pub struct Call {
    pub service: String,
    pub method: String,
    pub body: Value,
    pub authorization: Option<String>,
}

/// An applied effect: what was created or changed, by which id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// `IdentifyContact` (a contact created), `InsertInteraction`, `AddDocument`,
    /// `SetInteractionStatus`.
    pub method: String,
    /// The object's id (contact, interaction, document, interaction).
    pub id: String,
    /// The interaction it belongs to ("" for a contact).
    pub interaction: String,
}

#[derive(Default)]
pub struct UcsState {
    pub calls: Vec<Call>,
    pub effects: Vec<Effect>,
    pub contacts: HashMap<String, Value>,
    pub interactions: HashMap<String, Value>,
    pub documents: HashMap<String, Value>,
    pub mode: Mode,
    /// IdentifyContact with this email answers 400.
    pub reject_email: Option<String>,
    /// IdentifyContact with this email answers 503 (UCS failing for one contact).
    pub fail_email: Option<String>,
    /// Added to every call answered while up (a UCS under load).
    pub delay: Duration,
    /// Calls of a method (`AddDocument`…) answered with this instead, while up.
    pub refusals: HashMap<String, Refusal>,
    /// Calls being answered now, by method (`AddDocument/<Kind>` for documents).
    pub in_flight: HashMap<String, usize>,
    /// The most calls answered at once, by the same key.
    pub most_in_flight: HashMap<String, usize>,
}

/// What [`UcsState::in_flight`] counts a call under.
fn flight_key(method: &str, body: &Value) -> String {
    match body["Parameters"]["Kind"].as_str() {
        Some(kind) => format!("{method}/{kind}"),
        None => method.to_string(),
    }
}

/// A canned answer to every call of one method: any status and body bytes.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
    /// The request's `Authorization` value is appended to the body (a gateway echoing it).
    pub echo_authorization: bool,
}

#[derive(Clone)]
pub struct FakeUcs {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<UcsState>>,
}

impl FakeUcs {
    pub async fn start() -> FakeUcs {
        let state: Arc<Mutex<UcsState>> = Arc::default();
        let app = Router::new()
            .route("/ucs/v1/{service}/{method}", post(call))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake ucs");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeUcs { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    pub fn calls(&self) -> usize {
        self.state.lock().unwrap().calls.len()
    }

    pub fn effects(&self) -> Vec<Effect> {
        self.state.lock().unwrap().effects.clone()
    }

    /// The effects of one interaction, in the order they were applied.
    pub fn effects_of(&self, interaction: &str) -> Vec<Effect> {
        self.effects()
            .into_iter()
            .filter(|e| e.interaction == interaction)
            .collect()
    }

    /// Whether the interaction is stopped.
    pub fn stopped(&self, interaction: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .interactions
            .get(interaction)
            .is_some_and(|i| i["Status"] == "Stopped")
    }
}

fn answer(code: u16, body: Value) -> (StatusCode, Json<Value>) {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
}

fn effect(s: &mut UcsState, method: &str, id: &str, interaction: &str) {
    s.effects.push(Effect {
        method: method.to_string(),
        id: id.to_string(),
        interaction: interaction.to_string(),
    })
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or("").to_string()
}

async fn call(
    State(state): State<Arc<Mutex<UcsState>>>,
    Path((service, method)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let refusal = {
        let s = state.lock().unwrap();
        (s.mode == Mode::Up)
            .then(|| s.refusals.get(&method).cloned())
            .flatten()
    };
    let Some(r) = refusal else {
        let key = flight_key(&method, &body);
        {
            let mut s = state.lock().unwrap();
            let now = s.in_flight.entry(key.clone()).or_default();
            *now += 1;
            let now = *now;
            let most = s.most_in_flight.entry(key.clone()).or_default();
            *most = (*most).max(now);
        }
        let answer = apply(state.clone(), service, method, headers, body).await;
        if let Some(n) = state.lock().unwrap().in_flight.get_mut(&key) {
            *n -= 1;
        }
        return answer.into_response();
    };
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state.lock().unwrap().calls.push(Call {
        service,
        method,
        body,
        authorization: authorization.clone(),
    });
    let mut answer = r.body.clone();
    if r.echo_authorization {
        answer.extend_from_slice(authorization.unwrap_or_default().as_bytes());
    }
    (
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
        [("content-type", r.content_type)],
        answer,
    )
        .into_response()
}

async fn apply(
    state: Arc<Mutex<UcsState>>,
    service: String,
    method: String,
    headers: HeaderMap,
    body: Value,
) -> (StatusCode, Json<Value>) {
    let (mode, delay) = {
        let mut s = state.lock().unwrap();
        s.calls.push(Call {
            service: service.clone(),
            method: method.clone(),
            body: body.clone(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
        (s.mode, s.delay)
    };
    match mode {
        Mode::Up => tokio::time::sleep(delay).await,
        Mode::Down(code) => return answer(code, json!({"error": "unavailable"})),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return answer(503, json!({"error": "slow"}));
        }
    }
    let p = &body["Parameters"];
    let mut s = state.lock().unwrap();
    match (service.as_str(), method.as_str()) {
        ("OMContacts", "IdentifyContact") => {
            let email = text(p, "EmailAddress");
            if !email.is_empty() && s.reject_email.as_deref() == Some(email.as_str()) {
                return answer(400, json!({"error": "contact refused"}));
            }
            if !email.is_empty() && s.fail_email.as_deref() == Some(email.as_str()) {
                return answer(503, json!({"error": "contact store unavailable"}));
            }
            let phone = text(p, "PhoneNumber");
            let found = s.contacts.iter().find(|(_, c)| {
                (!email.is_empty() && c["EmailAddress"] == email.as_str())
                    || (!phone.is_empty() && c["PhoneNumber"] == phone.as_str())
            });
            if let Some((id, _)) = found {
                return answer(200, json!({"ContactId": id, "Created": false}));
            }
            let id = text(p, "Id");
            if id.is_empty() {
                return answer(400, json!({"error": "no Id to create the contact with"}));
            }
            if s.contacts.contains_key(&id) {
                return answer(200, json!({"ContactId": id, "Created": false}));
            }
            s.contacts.insert(id.clone(), p.clone());
            effect(&mut s, "IdentifyContact", &id, "");
            answer(200, json!({"ContactId": id, "Created": true}))
        }
        ("OMInteractions", "InsertInteraction") => {
            let id = text(p, "Id");
            if !s.contacts.contains_key(&text(p, "ContactId")) {
                return answer(400, json!({"error": "unknown ContactId"}));
            }
            if !s.interactions.contains_key(&id) {
                s.interactions.insert(id.clone(), p.clone());
                effect(&mut s, "InsertInteraction", &id, &id);
            }
            answer(200, json!({"Id": id}))
        }
        ("OMInteractions", "AddDocument") => {
            let interaction = text(p, "InteractionId");
            if !s.interactions.contains_key(&interaction) {
                return answer(400, json!({"error": "unknown InteractionId"}));
            }
            let id = text(p, "Id");
            if !s.documents.contains_key(&id) {
                s.documents.insert(id.clone(), p.clone());
                effect(&mut s, "AddDocument", &id, &interaction);
            }
            answer(200, json!({"Id": id}))
        }
        ("OMInteractions", "SetInteractionStatus") => {
            let interaction = text(p, "InteractionId");
            let Some(i) = s.interactions.get_mut(&interaction) else {
                return answer(400, json!({"error": "unknown InteractionId"}));
            };
            let status = p["Status"].clone();
            if i["Status"] != status {
                i["Status"] = status;
                i["EndDate"] = p["EndDate"].clone();
                effect(&mut s, "SetInteractionStatus", &interaction, &interaction);
            }
            answer(200, json!({}))
        }
        _ => answer(404, json!({"error": "no such method"})),
    }
}
