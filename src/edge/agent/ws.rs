//! The agent WebSocket: pushes (offers, transcript entries, state changes) of the agent's
//! conversations out; the same operations as the HTTP routes in, as JSON requests with an
//! optional `request_id` echoed in the answer.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::feed::{self, Sent, Step};
use super::{
    do_accept, do_complete, do_consult, do_leave, do_reject, do_reply, do_set_state, do_transfer,
    do_typing,
};
use crate::edge::hub::Push;
use crate::edge::socket::{
    close_cleanly, finish_close, read_up_to_limit, refusal, send_text, Liveness,
};
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::{Agent, AuthError};
use crate::telemetry::metrics as m;
use crate::workers::conversation::notify::entry_json;

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    /// Browsers cannot set headers on a WebSocket: the agent token may come as a parameter.
    pub token: Option<String>,
}

pub async fn websocket(
    State(state): State<AppState>,
    query: Result<Query<WsQuery>, QueryRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let token = match q.token {
        Some(t) => t,
        None => super::bearer(&headers)?.to_string(),
    };
    let agent = crate::edge::auth::agent(&state, &token).await?;
    // A request is a small JSON object: the HTTP body limit bounds it here too. The socket
    // reads larger frames (up to its read limit), so one above the body limit is answered
    // (`PAYLOAD_TOO_LARGE`, as HTTP's 413) rather than ending the socket with a reset.
    let ws = read_up_to_limit(state.socket(ws?), state.config.http.max_body_bytes);
    let open = state.sockets.enter();
    Ok(ws.on_upgrade(move |socket| async move {
        let _open = open;
        serve(socket, state, agent, token).await
    }))
}

/// WebSocket close code when the agent's token stops being valid (rotated, agent deleted).
const TOKEN_REVOKED_CLOSE: u16 = 4001;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    op: String,
    request_id: Option<String>,
    conversation_id: Option<String>,
    offer_id: Option<String>,
    text: Option<String>,
    message_id: Option<String>,
    state: Option<String>,
    disposition: Option<String>,
    note: Option<String>,
    queue_id: Option<String>,
    agent_id: Option<String>,
    reason_code: Option<String>,
    capacity: Option<BTreeMap<String, u32>>,
    visibility: Option<String>,
}

impl Request {
    /// The fields given that the op's HTTP request has no place for (HTTP refuses them with
    /// `deny_unknown_fields`). Empty for an unknown op, which `run` refuses.
    fn foreign_fields(&self) -> Vec<&'static str> {
        let Some(allowed) = fields_of(&self.op) else {
            return Vec::new();
        };
        let given = [
            ("conversation_id", self.conversation_id.is_some()),
            ("offer_id", self.offer_id.is_some()),
            ("text", self.text.is_some()),
            ("message_id", self.message_id.is_some()),
            ("state", self.state.is_some()),
            ("disposition", self.disposition.is_some()),
            ("note", self.note.is_some()),
            ("queue_id", self.queue_id.is_some()),
            ("agent_id", self.agent_id.is_some()),
            ("reason_code", self.reason_code.is_some()),
            ("capacity", self.capacity.is_some()),
            ("visibility", self.visibility.is_some()),
        ];
        given
            .into_iter()
            .filter(|(name, set)| *set && !allowed.contains(name))
            .map(|(name, _)| name)
            .collect()
    }
}

/// The fields of each op besides `op` and `request_id`: those of its HTTP request, plus the
/// conversation the HTTP path names.
fn fields_of(op: &str) -> Option<&'static [&'static str]> {
    Some(match op {
        // `reason_code` with `ready` is refused as over HTTP (INVALID_FIELD).
        "ready" | "not_ready" => &["reason_code", "capacity"],
        "accept" | "reject" => &["conversation_id", "offer_id"],
        "reply" => &["conversation_id", "text", "message_id", "visibility"],
        "typing" => &["conversation_id", "state"],
        "complete" => &["conversation_id", "disposition", "note"],
        "transfer" => &["conversation_id", "queue_id", "agent_id", "note"],
        "consult" => &["conversation_id", "agent_id", "note", "visibility"],
        "leave" => &["conversation_id"],
        _ => return None,
    })
}

async fn serve(mut socket: WebSocket, state: AppState, mut agent: Agent, token: String) {
    let mut feed = state.hub.agent(&agent.tenant_id, &agent.id);
    let mut sent = Sent::default();
    let shutdown = state.shutdown.clone();
    // The token is checked again on this period, as cached API keys are: a rotated token or a
    // deleted agent ends its open sockets too, not only its next HTTP call.
    let every = Duration::from_millis(state.config.stores.auth_cache_ttl_ms.max(1_000));
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // What the agent holds and is offered now, read after the feed above was opened: a
    // reconnecting desk misses nothing pushed while it had no socket (an offer would lapse).
    // Without the store, the desk is told to re-read.
    let conversations = super::conversation_items(&state, &agent).await.ok();
    let hello = json!({
        "type": "hello",
        "agent_id": agent.id,
        "name": agent.name,
        "conversations": conversations,
    });
    let mut greeting = vec![hello];
    if conversations.is_none() {
        greeting.push(json!({"type": "resync"}));
    }
    for frame in greeting {
        if !send_text(&mut socket, frame.to_string()).await {
            return;
        }
    }
    let mut live = Liveness::new(Duration::from_millis(state.config.http.ws_ping_interval_ms));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                close_cleanly(&mut socket, 1012, "edge restarting; reconnect").await;
                return;
            }
            alive = live.due() => {
                if !Liveness::ping(&mut socket, alive).await {
                    return;
                }
            }
            _ = recheck.tick() => {
                match state.provisioning.authenticate_agent(&token).await {
                    // The profile as it is now: a capacity or name an admin changed applies to
                    // this socket's requests from here on, as to HTTP's.
                    Ok(a) if a.id == agent.id => agent = a,
                    // The store being down is no reason to drop a working agent.
                    Err(AuthError::Unavailable(_)) => {}
                    _ => {
                        close_cleanly(&mut socket, TOKEN_REVOKED_CLOSE, "AGENT_TOKEN_REVOKED: sign in again").await;
                        return;
                    }
                }
            }
            push = feed.rx.recv() => match push {
                Ok(p) => {
                    if !forward(&mut socket, &state, &agent, &mut sent, &p).await {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    // The desktop re-reads its conversations (GET /v1/agent/conversations);
                    // offers and leaves may be among the missed pushes.
                    sent.clear();
                    let note = json!({"type": "resync", "missed": n});
                    if !send_text(&mut socket, note.to_string()).await {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            },
            incoming = socket.recv() => {
                if matches!(incoming, Some(Ok(_))) {
                    live.heard();
                }
                match incoming {
                Some(Ok(WsMessage::Text(text))) => {
                    let answer = handle(&state, &agent, text.as_bytes()).await;
                    if !send_text(&mut socket, answer.to_string()).await {
                        return;
                    }
                }
                // A request sent as a binary frame is answered too (UTF-8 JSON, as a text one;
                // bytes that are not UTF-8 are refused as an HTTP body's are).
                Some(Ok(WsMessage::Binary(bytes))) => {
                    let answer = handle(&state, &agent, &bytes).await;
                    if !send_text(&mut socket, answer.to_string()).await {
                        return;
                    }
                }
                Some(Ok(WsMessage::Close(_))) => {
                    finish_close(&mut socket).await;
                    return;
                }
                // A frame that could not be read (past the read limit, a text frame that is
                // not UTF-8, a protocol violation) is refused with its close code.
                Some(Err(e)) => {
                    if let Some((code, reason)) = refusal(&e) {
                        close_cleanly(&mut socket, code, reason).await;
                    }
                    return;
                }
                None => return,
                Some(Ok(_)) => {}
                }
            }
        }
    }
}

/// Sends a push, after the entries of a gap before it and unless it was sent already; `false`
/// once the socket is gone.
async fn forward(
    socket: &mut WebSocket,
    state: &AppState,
    agent: &Agent,
    sent: &mut Sent,
    push: &Push,
) -> bool {
    match sent.step(push) {
        Step::Skip => return true,
        Step::Send => {}
        Step::Fill { from, to } => {
            let filled = match state.sessions() {
                Ok(store) => {
                    feed::fill(
                        store.as_ref(),
                        &agent.tenant_id,
                        &push.conversation_id,
                        from,
                        to,
                    )
                    .await
                }
                Err(_) => Ok(None),
            };
            match filled {
                Ok(Some(entries)) => {
                    for e in entries {
                        let json = entry_json(&push.conversation_id, &e).to_string();
                        if !send_text(socket, json).await {
                            return false;
                        }
                    }
                }
                // Too large a gap, or the store not answering: the console re-reads.
                Ok(None) | Err(_) => {
                    let note = json!({"type": "resync", "conversation_id": push.conversation_id});
                    if !send_text(socket, note.to_string()).await {
                        return false;
                    }
                }
            }
        }
    }
    send_text(socket, push.data.to_string()).await
}

async fn handle(state: &AppState, agent: &Agent, frame: &[u8]) -> Value {
    let request = match parse(frame, state.config.http.max_body_bytes) {
        Ok(r) => r,
        Err((id, e)) => {
            return json!({"type": "error", "request_id": id, "code": e.code, "message": e.message})
        }
    };
    let id = request.request_id.clone();
    match run(state, agent, request).await {
        Ok(extra) => json!({"type": "ack", "request_id": id, "result": extra}),
        // As over HTTP: a server error's cause is logged, not told.
        Err(e) => {
            json!({"type": "error", "request_id": id, "code": e.code, "message": e.shown_message()})
        }
    }
}

/// The request of a frame; a refusal carries the frame's `request_id`, if it is a JSON object
/// that has one (whatever its type), so the desk can match it.
fn parse(frame: &[u8], max_bytes: usize) -> Result<Request, (Option<Value>, ApiError)> {
    let request_id = || {
        serde_json::from_slice::<Value>(frame)
            .ok()
            .and_then(|v| v.get("request_id").cloned())
    };
    if frame.len() > max_bytes {
        // Not parsed: reading its id would cost what the limit is there to bound.
        let e = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("a request is at most {max_bytes} bytes (http.max_body_bytes)"),
        );
        return Err((None, e));
    }
    // Bytes, not text: a binary frame that is not UTF-8 is refused as an HTTP body is.
    let request: Request = serde_json::from_slice(frame)
        .map_err(|e| (request_id(), crate::edge::chat::body_error(&e)))?;
    for field in request.foreign_fields() {
        // A visibility the op has no place for would change what the desk meant (a private
        // transfer that is not): refused, as over HTTP. Any other field of another op is
        // ignored, as sockets have always done (desks send one envelope for every op), and
        // counted, so an operator sees which desks would break if HTTP's rule applied here.
        if field == "visibility" {
            let e = ApiError::bad_request(
                "INVALID_BODY",
                format!("body: unknown field `{field}` for op `{}`", request.op),
            );
            return Err((request.request_id.map(Value::String), e));
        }
        metrics::counter!(m::AGENT_WS_FIELDS_IGNORED_TOTAL, "field" => field).increment(1);
    }
    Ok(request)
}

fn need(v: Option<String>, name: &str) -> Result<String, ApiError> {
    v.ok_or_else(|| ApiError::bad_request("INVALID_FIELD", format!("`{name}` is required")))
}

async fn run(state: &AppState, agent: &Agent, r: Request) -> Result<Value, ApiError> {
    match r.op.as_str() {
        op @ ("ready" | "not_ready") => {
            let capacity = r.capacity.unwrap_or_default();
            do_set_state(state, agent, op == "ready", r.reason_code, capacity)
                .await
                .map(|_| Value::Null)
        }
        "accept" => {
            let id = need(r.conversation_id, "conversation_id")?;
            do_accept(state, agent, &id, &need(r.offer_id, "offer_id")?)
                .await
                .map(|_| Value::Null)
        }
        "reject" => {
            let id = need(r.conversation_id, "conversation_id")?;
            do_reject(state, agent, &id, &need(r.offer_id, "offer_id")?)
                .await
                .map(|_| Value::Null)
        }
        "reply" => {
            let id = need(r.conversation_id, "conversation_id")?;
            let text = need(r.text, "text")?;
            let visibility = r.visibility.as_deref();
            let m = do_reply(state, agent, &id, text, r.message_id, visibility).await?;
            Ok(json!({"message_id": m}))
        }
        "typing" => {
            let id = need(r.conversation_id, "conversation_id")?;
            let started = crate::edge::chat::typing_started(&need(r.state, "state")?)?;
            do_typing(state, agent, &id, started)
                .await
                .map(|_| Value::Null)
        }
        "complete" => {
            let id = need(r.conversation_id, "conversation_id")?;
            do_complete(state, agent, &id, r.disposition, r.note)
                .await
                .map(|_| Value::Null)
        }
        "transfer" => {
            let id = need(r.conversation_id, "conversation_id")?;
            do_transfer(state, agent, &id, r.queue_id, r.agent_id, r.note)
                .await
                .map(|_| Value::Null)
        }
        "consult" => {
            let id = need(r.conversation_id, "conversation_id")?;
            let target = need(r.agent_id, "agent_id")?;
            do_consult(state, agent, &id, &target, r.note, r.visibility.as_deref())
                .await
                .map(|_| Value::Null)
        }
        "leave" => {
            let id = need(r.conversation_id, "conversation_id")?;
            do_leave(state, agent, &id).await.map(|_| Value::Null)
        }
        other => Err(ApiError::bad_request(
            "UNKNOWN_OPERATION",
            format!("unknown op `{other}`"),
        )),
    }
}
