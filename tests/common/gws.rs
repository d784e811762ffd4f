//! A fake GWS on loopback: keeps each chat's state (participants, messages, completed), applies
//! every call it accepts (it is NOT idempotent: a repeated call acts twice, which is what the
//! tests look for), records every request, and fails on command: a status for every request,
//! a one-shot status or "apply, then hang past the client's timeout" for one chat's operation,
//! a status for every POST to one chat, an optional delay after applying (to widen the crash
//! window), and slowness: before one chat's requests, or of `GET /api/v2/me`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

/// What a one-shot rule does to the matching call.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// Answer this status without applying.
    Status(u16),
    /// Apply, then answer only after this long (past the client's timeout).
    ApplyThenHang(Duration),
}

#[derive(Debug, Clone, Default)]
pub struct Chat {
    pub state: String,
    /// (agent id, Invited | Connected | Left), latest last.
    pub participants: Vec<(String, String)>,
    /// (message id, agent id, text).
    pub messages: Vec<(String, String, String)>,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: &'static str,
    pub chat: String,
    pub operation: String,
    pub agent: String,
    /// The answer's status.
    pub status: u16,
    /// Whether the operation was applied.
    pub applied: bool,
    /// `Accept alice`, `SendMessage alice <message id>`, `Transfer alice Agent:<id>`,
    /// `Complete bob resolved`: what an applied call did.
    pub effect: String,
}

#[derive(Default)]
pub struct GwsState {
    pub chats: HashMap<String, Chat>,
    pub requests: Vec<Request>,
    /// Answer every request with this while set (the agent's own user: only when asked for an
    /// agent, as a GWS refusing that agent would).
    pub fail_all: Option<u16>,
    /// Answer everything 404, as a server asked at a wrong base path does.
    pub wrong_address: bool,
    /// One-shot rules by (chat, operation).
    pub rules: Vec<(String, String, Action)>,
    /// Wait this long after applying before answering.
    pub delay: Duration,
    pub token: String,
    /// Calls applied and not yet answered (inside the delay).
    pub in_flight: usize,
    /// Reads of the agent's own user (`GET /api/v2/me`), by status answered.
    pub me_answered: Vec<u16>,
    /// Reads of the agent's own user asked, answered or not.
    pub me_asked: usize,
    /// Reads of the agent's own user answer only after this long (a GWS whose `/api/v2/me`
    /// hangs).
    pub me_delay: Duration,
    /// Requests asked, then answered only after this long, by chat (a GWS slow on that chat).
    pub slow_chats: HashMap<String, Duration>,
    /// Every POST to these chats answered with this status, without applying.
    pub refused_chats: HashMap<String, u16>,
}

#[derive(Clone)]
pub struct FakeGws {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<GwsState>>,
}

impl FakeGws {
    pub async fn start(token: &str) -> FakeGws {
        let state = Arc::new(Mutex::new(GwsState {
            token: token.to_string(),
            ..GwsState::default()
        }));
        let app = Router::new()
            .route("/api/v2/me", get(me))
            .route("/api/v2/me/chats/{id}", get(read).post(operate))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake gws");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeGws { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn fail_all(&self, status: Option<u16>) {
        self.state.lock().unwrap().fail_all = status;
    }

    /// Makes every request answered 404 (nexus pointed at a wrong base path) while set.
    pub fn wrong_address(&self, wrong: bool) {
        self.state.lock().unwrap().wrong_address = wrong;
    }

    /// Makes GWS take only `token` as the credential from now on (a rotated key: every call
    /// with another is answered 401).
    pub fn set_token(&self, token: &str) {
        self.state.lock().unwrap().token = token.to_string();
    }

    /// Reads of the agent's own user answered with `status`.
    pub fn me_answered(&self, status: u16) -> usize {
        let s = self.state.lock().unwrap();
        s.me_answered.iter().filter(|&&st| st == status).count()
    }

    pub fn rule(&self, chat: &str, operation: &str, action: Action) {
        self.state
            .lock()
            .unwrap()
            .rules
            .push((chat.to_string(), operation.to_string(), action));
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// Makes `GET /api/v2/me` answer only after `delay` (recorded when answered).
    pub fn delay_me(&self, delay: Duration) {
        self.state.lock().unwrap().me_delay = delay;
    }

    /// Makes every request for `chat` (reads and POSTs) wait `delay` before it is handled.
    pub fn slow_chat(&self, chat: &str, delay: Duration) {
        self.state
            .lock()
            .unwrap()
            .slow_chats
            .insert(chat.to_string(), delay);
    }

    /// Answers every POST to `chat` with `status`, applying nothing.
    pub fn refuse_chat(&self, chat: &str, status: u16) {
        self.state
            .lock()
            .unwrap()
            .refused_chats
            .insert(chat.to_string(), status);
    }

    /// Reads of the agent's own user asked so far (answered or not yet).
    pub fn me_asked(&self) -> usize {
        self.state.lock().unwrap().me_asked
    }

    /// The effects applied to `chat`, in order (a repeated call appears twice).
    pub fn applied(&self, chat: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.applied && r.chat == chat)
            .map(|r| r.effect.clone())
            .collect()
    }

    /// Every applied effect, in order, as (chat, effect).
    pub fn all_applied(&self) -> Vec<(String, String)> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.applied)
            .map(|r| (r.chat.clone(), r.effect.clone()))
            .collect()
    }

    /// Requests received for `chat` with `method` and `operation` ("" for GETs), any outcome.
    pub fn received(&self, chat: &str, method: &str, operation: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.chat == chat && r.method == method && r.operation == operation)
            .count()
    }

    /// Calls applied whose answer is still being held back.
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap().in_flight
    }

    /// Requests answered with `status`.
    pub fn answered(&self, status: u16) -> usize {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.status == status)
            .count()
    }
}

/// Waits as long as `chat` is slow ([`FakeGws::slow_chat`]).
async fn slow(state: &Mutex<GwsState>, chat: &str) {
    let delay = state.lock().unwrap().slow_chats.get(chat).copied();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
}

fn bearer_ok(s: &GwsState, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        == Some(s.token.as_str())
}

fn agent_of(headers: &HeaderMap) -> String {
    headers
        .get("x-agent-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn answer(status: u16, body: Value) -> (StatusCode, Json<Value>) {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
}

async fn read(
    State(state): State<Arc<Mutex<GwsState>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> (StatusCode, Json<Value>) {
    slow(&state, &id).await;
    let mut s = state.lock().unwrap();
    let status = if s.wrong_address {
        404
    } else if !bearer_ok(&s, &headers) {
        401
    } else if let Some(code) = s.fail_all {
        code
    } else if s.chats.contains_key(&id) {
        200
    } else {
        404
    };
    s.requests.push(Request {
        method: "GET",
        chat: id.clone(),
        operation: String::new(),
        agent: agent_of(&headers),
        status,
        applied: false,
        effect: String::new(),
    });
    if status != 200 {
        return answer(status, json!({"status": {"code": status}}));
    }
    let chat = &s.chats[&id];
    answer(
        200,
        json!({"status": {"code": 0}, "data": {
            "id": id,
            "state": chat.state,
            "participants": chat.participants.iter().map(|(a, st)| json!({"agentId": a, "state": st})).collect::<Vec<_>>(),
            "messages": chat.messages.iter().map(|(m, a, t)| json!({"messageId": m, "agentId": a, "text": t})).collect::<Vec<_>>(),
        }}),
    )
}

/// `GET /api/v2/me`: the agent's own user, for any agent id, to a caller with the credential;
/// `fail_all` answers it too when asked for an agent, `wrong_address` always (not recorded
/// among the chat requests).
async fn me(
    State(state): State<Arc<Mutex<GwsState>>>,
    headers: HeaderMap,
) -> (StatusCode, Json<Value>) {
    let delay = {
        let mut s = state.lock().unwrap();
        s.me_asked += 1;
        s.me_delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut s = state.lock().unwrap();
    let status = if s.wrong_address {
        404
    } else if !bearer_ok(&s, &headers) {
        401
    } else if agent_of(&headers).is_empty() {
        200
    } else {
        s.fail_all.unwrap_or(200)
    };
    s.me_answered.push(status);
    if status != 200 {
        return answer(status, json!({"status": {"code": status}}));
    }
    answer(
        200,
        json!({"status": {"code": 0}, "data": {"id": agent_of(&headers)}}),
    )
}

fn agent_state(chat: &Chat, agent: &str) -> Option<String> {
    chat.participants
        .iter()
        .rev()
        .find(|(a, _)| a == agent)
        .map(|(_, s)| s.clone())
}

fn set_agent(chat: &mut Chat, agent: &str, state: &str) {
    match chat.participants.iter_mut().rev().find(|(a, _)| a == agent) {
        Some(p) if p.1 != "Left" => p.1 = state.to_string(),
        _ => chat
            .participants
            .push((agent.to_string(), state.to_string())),
    }
}

/// Applies `body` to the chat; `Err(status)` when GWS would refuse it.
fn apply(s: &mut GwsState, id: &str, agent: &str, body: &Value) -> Result<String, u16> {
    let op = body["operationName"].as_str().unwrap_or("");
    let chat = s.chats.entry(id.to_string()).or_insert_with(|| Chat {
        state: "Active".into(),
        ..Chat::default()
    });
    let connected = agent_state(chat, agent).as_deref() == Some("Connected");
    match op {
        "Accept" => {
            set_agent(chat, agent, "Connected");
            Ok(format!("Accept {agent}"))
        }
        "SendMessage" if connected => {
            let m = body["messageId"].as_str().unwrap_or("").to_string();
            let text = body["text"].as_str().unwrap_or("").to_string();
            chat.messages.push((m.clone(), agent.to_string(), text));
            Ok(format!("SendMessage {agent} {m}"))
        }
        "Transfer" if connected => {
            set_agent(chat, agent, "Left");
            let (kind, target) = (
                body["targetKind"].as_str().unwrap_or(""),
                body["targetId"].as_str().unwrap_or(""),
            );
            if kind == "Agent" {
                chat.participants
                    .push((target.to_string(), "Invited".to_string()));
            }
            Ok(format!("Transfer {agent} {kind}:{target}"))
        }
        "Complete" if connected => {
            set_agent(chat, agent, "Left");
            chat.state = "Completed".into();
            Ok(format!(
                "Complete {agent} {}",
                body["disposition"].as_str().unwrap_or("-")
            ))
        }
        "SendMessage" | "Transfer" | "Complete" => Err(409),
        _ => Err(400),
    }
}

async fn operate(
    State(state): State<Arc<Mutex<GwsState>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    slow(&state, &id).await;
    let agent = agent_of(&headers);
    let operation = body["operationName"].as_str().unwrap_or("").to_string();
    let (status, wait) = {
        let mut s = state.lock().unwrap();
        let rule = s
            .rules
            .iter()
            .position(|(c, o, _)| *c == id && *o == operation)
            .map(|i| s.rules.remove(i).2);
        let mut wait = s.delay;
        let outcome = if s.wrong_address {
            Err(404)
        } else if !bearer_ok(&s, &headers) {
            Err(401)
        } else if agent.is_empty() {
            Err(400)
        } else if let Some(code) = s.fail_all {
            Err(code)
        } else if let Some(&code) = s.refused_chats.get(&id) {
            Err(code)
        } else {
            match rule {
                Some(Action::Status(code)) => Err(code),
                Some(Action::ApplyThenHang(d)) => {
                    wait = d;
                    apply(&mut s, &id, &agent, &body)
                }
                None => apply(&mut s, &id, &agent, &body),
            }
        };
        let (status, applied, effect) = match outcome {
            Ok(effect) => (200, true, effect),
            Err(code) => (code, false, String::new()),
        };
        s.requests.push(Request {
            method: "POST",
            chat: id.clone(),
            operation,
            agent,
            status,
            applied,
            effect,
        });
        let wait = if applied { wait } else { Duration::ZERO };
        if !wait.is_zero() {
            s.in_flight += 1;
        }
        (status, wait)
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
        state.lock().unwrap().in_flight -= 1;
    }
    answer(
        status,
        json!({"status": {"code": if status == 200 { 0 } else { status }}}),
    )
}
