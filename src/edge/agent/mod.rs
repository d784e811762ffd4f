//! The agent desktop API (`/v1/agent...`, agent token): readiness, offers, replies, file
//! messages, typing, completion, transfer, consultants (invite, leave), own conversations, their
//! transcripts and files, and the agent WebSocket (`ws`), whose operations are the same functions as the HTTP
//! routes.
//!
//! The edge publishes what the agent does and answers 202; the conversation worker judges it in
//! the conversation's order (a stale accept gets an `offer_closed` push, a reply to a
//! conversation the agent does not hold is dropped), so the edge never races the worker.

mod feed;
mod files;
mod ws;

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::chat::publish_event;
use super::{ApiError, AppState};
use crate::events::chat::{self as ev, ParticipantKind};
use crate::events::Event;
use crate::stores::provisioning::Agent;
use crate::stores::session::Conversation;
use crate::workers::conversation::AGENT_TOPIC;

const PRODUCER: &str = "edge/agent";
/// Longest disposition code (characters): a code from the tenant's list, not free text.
const MAX_DISPOSITION_CHARS: usize = 128;

/// The agent routes; the upload route takes bodies up to `max_file_bytes` plus multipart
/// framing, as the customer's.
pub fn routes(max_file_bytes: usize) -> Router<AppState> {
    Router::new()
        .route("/v1/agent/me", get(me))
        .route("/v1/agent/state", post(set_state))
        .route("/v1/agent/conversations", get(conversations))
        .route("/v1/agent/conversations/{id}/accept", post(accept))
        .route("/v1/agent/conversations/{id}/reject", post(reject))
        .route(
            "/v1/agent/conversations/{id}/messages",
            post(reply).get(transcript),
        )
        .route("/v1/agent/conversations/{id}/typing", post(typing))
        .route(
            "/v1/agent/conversations/{id}/files/{file_id}",
            get(download),
        )
        .route(
            "/v1/agent/conversations/{id}/files",
            post(files::upload).layer(super::chat::upload_limit(max_file_bytes)),
        )
        .route("/v1/agent/conversations/{id}/complete", post(complete))
        .route("/v1/agent/conversations/{id}/transfer", post(transfer))
        .route("/v1/agent/conversations/{id}/consult", post(consult))
        .route("/v1/agent/conversations/{id}/leave", post(leave))
        .route("/v1/agent/ws", get(ws::websocket))
        .method_not_allowed_fallback(crate::edge::error::method_not_allowed)
        .route_layer(axum::middleware::from_fn(crate::edge::path::require_plain))
}

/// The agent of a bearer agent token.
async fn agent_of(state: &AppState, headers: &HeaderMap) -> Result<Agent, ApiError> {
    super::auth::agent(state, bearer(headers)?).await
}

/// The agent token of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    crate::edge::auth::bearer(headers)
        .ok_or_else(|| ApiError::unauthorized("send `Authorization: Bearer <agent token>`"))
}

async fn publish(state: &AppState, event: Event) -> Result<(), ApiError> {
    publish_event(
        state,
        AGENT_TOPIC,
        &event.with_traceparent(super::new_traceparent()),
    )
    .await
}

fn event<B: ev::Body>(body: &B, agent: &Agent, conversation_id: &str) -> Result<Event, ApiError> {
    Event::typed(body, &agent.tenant_id, conversation_id, PRODUCER)
        .map_err(|e| ApiError::bad_request("INVALID_FIELD", e.to_string()))
}

pub(crate) fn check_id(id: &str) -> Result<(), ApiError> {
    check_id_of("conversation", id)
}

/// An id of `what` (a conversation, queue, agent): 1 to 64 of `A-Z a-z 0-9 -`.
fn check_id_of(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            format!("not a {what} id"),
        ));
    }
    Ok(())
}

/// Readiness: an `AgentStateChanged` keyed by the agent id. A not-ready state may say why
/// (`reason_code`); a state may lower the agent's capacity per media below what it is
/// provisioned with, until its next state change.
pub(crate) async fn do_set_state(
    state: &AppState,
    agent: &Agent,
    ready: bool,
    reason_code: Option<String>,
    capacity: BTreeMap<String, u32>,
) -> Result<(), ApiError> {
    check_state(agent, ready, reason_code.as_deref(), &capacity)?;
    let body = ev::AgentStateChanged {
        agent_id: agent.id.clone(),
        state: if ready {
            ev::AgentState::Ready
        } else {
            ev::AgentState::NotReady
        },
        reason_code,
        capacity: capacity
            .into_iter()
            .map(|(media, n)| (media, i32::try_from(n).unwrap_or(i32::MAX)))
            .collect(),
    };
    let e = event(&body, agent, &agent.id)?;
    publish(state, e).await
}

/// A not-ready state of an agent that provisioning no longer has: the worker, finding no
/// agent, sets it not ready and hands its conversations back to their queues.
pub(crate) async fn publish_deleted(
    state: &AppState,
    tenant_id: &str,
    agent_id: &str,
) -> Result<(), ApiError> {
    let body = ev::AgentStateChanged {
        agent_id: agent_id.to_string(),
        state: ev::AgentState::NotReady,
        reason_code: None,
        capacity: BTreeMap::new(),
    };
    let e = Event::typed(&body, tenant_id, agent_id, PRODUCER)
        .map_err(|e| ApiError::bad_request("INVALID_FIELD", e.to_string()))?;
    publish(state, e).await
}

/// An admin's change of the agent's skills or capacity, keyed like its states: the routing
/// state applies it at once, under whatever caps the agent's last state asked for.
pub(crate) async fn publish_profile(state: &AppState, agent: &Agent) -> Result<(), ApiError> {
    let body = ev::AgentProfileChanged {
        agent_id: agent.id.clone(),
        skills: agent.skills.clone(),
        capacity: agent
            .capacity
            .iter()
            .map(|(media, n)| (media.clone(), i32::try_from(*n).unwrap_or(i32::MAX)))
            .collect(),
    };
    let e = event(&body, agent, &agent.id)?;
    publish(state, e).await
}

/// Longest not-ready reason code.
const MAX_REASON_CODE: usize = 64;

fn check_state(
    agent: &Agent,
    ready: bool,
    reason_code: Option<&str>,
    capacity: &BTreeMap<String, u32>,
) -> Result<(), ApiError> {
    if let Some(code) = reason_code {
        if ready {
            return Err(ApiError::bad_request(
                "INVALID_FIELD",
                "`reason_code` goes with `not_ready`",
            ));
        }
        let printable = code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if code.is_empty() || code.len() > MAX_REASON_CODE || !printable {
            return Err(ApiError::bad_request(
                "INVALID_FIELD",
                format!("`reason_code` is 1 to {MAX_REASON_CODE} of A-Z a-z 0-9 _ - ."),
            ));
        }
    }
    for (media, n) in capacity {
        match agent.capacity.get(media) {
            Some(max) if n <= max => {}
            Some(max) => {
                return Err(ApiError::bad_request(
                    "INVALID_FIELD",
                    format!(
                        "`capacity.{media}` is at most {max} (the agent's provisioned capacity)"
                    ),
                ))
            }
            None => {
                return Err(ApiError::bad_request(
                    "INVALID_FIELD",
                    "`capacity` names a media the agent has no capacity for",
                ))
            }
        }
    }
    Ok(())
}

pub(crate) async fn do_accept(
    state: &AppState,
    agent: &Agent,
    id: &str,
    offer_id: &str,
) -> Result<(), ApiError> {
    check_id(id)?;
    let body = ev::AgentAccepted {
        offer_id: offer_uuid(offer_id)?,
        agent_id: agent.id.clone(),
        participant_id: agent.id.clone(),
        nickname: agent.name.clone(),
    };
    let e = event(&body, agent, id)?;
    publish(state, e).await
}

pub(crate) async fn do_reject(
    state: &AppState,
    agent: &Agent,
    id: &str,
    offer_id: &str,
) -> Result<(), ApiError> {
    check_id(id)?;
    let body = ev::AgentRejected {
        offer_id: offer_uuid(offer_id)?,
        agent_id: agent.id.clone(),
        reason: ev::RejectReason::Declined,
    };
    let e = event(&body, agent, id)?;
    publish(state, e).await
}

fn offer_uuid(offer_id: &str) -> Result<String, ApiError> {
    Uuid::parse_str(offer_id)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::bad_request("INVALID_FIELD", "offer_id is not a UUID"))
}

/// `visibility`: `all` (the default) or `agents` (an internal note: the conversation's agents
/// only, never the customer).
pub(crate) async fn do_reply(
    state: &AppState,
    agent: &Agent,
    id: &str,
    text: String,
    message_id: Option<String>,
    visibility: Option<&str>,
) -> Result<String, ApiError> {
    check_id(id)?;
    super::chat::check_text(state, &text)?;
    super::chat::check_message_id(message_id.as_deref())?;
    let mut visibility = parse_visibility(visibility)?;
    if visibility == ev::Visibility::All && private_consultant(state, agent, id).await? {
        // The worker would make it agents only anyway, but the GWS worker reads this request
        // as published: marked here, GWS is not sent it (its chat would show it).
        visibility = ev::Visibility::Agents;
    }
    send_message(state, agent, id, text, message_id, Vec::new(), visibility).await
}

/// Whether the agent is invited to, or in, the conversation as a private consultant. A store
/// that cannot be read fails the request (503): a reply is not sent unmarked on a guess.
async fn private_consultant(state: &AppState, agent: &Agent, id: &str) -> Result<bool, ApiError> {
    let me = Some(agent.id.as_str());
    Ok(conversation_of(state, agent, id).await?.is_some_and(|c| {
        c.routing.consult_private
            && (c.routing.consultant.as_deref() == me || c.routing.consult_invited.as_deref() == me)
    }))
}

/// The `visibility` field of a reply or consult: `all` when absent.
fn parse_visibility(v: Option<&str>) -> Result<ev::Visibility, ApiError> {
    match v {
        None | Some("all") => Ok(ev::Visibility::All),
        Some("agents") => Ok(ev::Visibility::Agents),
        Some(_) => Err(ApiError::bad_request(
            "INVALID_FIELD",
            "`visibility` must be `all` or `agents`",
        )),
    }
}

/// Publishes the agent's message (a reply, or the files it uploaded: their name as the text);
/// answers its message id. A client id that is not a UUID maps to one of its own, the same on
/// every retry, apart for replies and files; a UUID is the message's id as given. The
/// transcript keeps replies' and files' ids apart either way.
async fn send_message(
    state: &AppState,
    agent: &Agent,
    id: &str,
    text: String,
    message_id: Option<String>,
    media_ids: Vec<String>,
    visibility: ev::Visibility,
) -> Result<String, ApiError> {
    let sender = if media_ids.is_empty() {
        format!("agent/{}", agent.id)
    } else {
        format!("agent/{}/file", agent.id)
    };
    let message_id = super::chat::bus_message_id(id, &sender, message_id.as_deref());
    let body = ev::MessageSent {
        message_id: message_id.clone(),
        participant_id: agent.id.clone(),
        participant_kind: ParticipantKind::Agent,
        nickname: agent.name.clone(),
        agent_id: Some(agent.id.clone()),
        kind: ev::MessageKind::Text,
        text: Some(text),
        media_ids,
        in_reply_to: None,
        transcript_position: None,
        visibility,
    };
    let e = event(&body, agent, id)?;
    publish(state, e).await?;
    Ok(message_id)
}

pub(crate) async fn do_typing(
    state: &AppState,
    agent: &Agent,
    id: &str,
    started: bool,
) -> Result<(), ApiError> {
    check_id(id)?;
    let body = ev::TypingIndicated {
        participant_id: agent.id.clone(),
        participant_kind: ParticipantKind::Agent,
        state: if started {
            ev::TypingState::Started
        } else {
            ev::TypingState::Stopped
        },
        preview: None,
        transcript_position: None,
    };
    let e = event(&body, agent, id)?;
    publish(state, e).await
}

pub(crate) async fn do_complete(
    state: &AppState,
    agent: &Agent,
    id: &str,
    disposition: Option<String>,
    note: Option<String>,
) -> Result<(), ApiError> {
    check_id(id)?;
    if disposition
        .as_ref()
        .is_some_and(|d| d.trim().is_empty() || d.chars().count() > MAX_DISPOSITION_CHARS)
    {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            format!("disposition is 1 to {MAX_DISPOSITION_CHARS} characters"),
        ));
    }
    check_note(state, note.as_deref())?;
    let body = ev::ConversationCompleted {
        agent_id: agent.id.clone(),
        participant_id: agent.id.clone(),
        disposition,
        note,
        user_data: Default::default(),
        close_conversation: true,
    };
    let e = event(&body, agent, id)?;
    publish(state, e).await
}

/// An agent's note (completion, transfer, consult) is at most a message long.
fn check_note(state: &AppState, note: Option<&str>) -> Result<(), ApiError> {
    let max_note = state.config.chat.max_message_chars;
    if note.is_some_and(|n| n.chars().count() > max_note) {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            format!("note is at most {max_note} characters"),
        ));
    }
    Ok(())
}

/// Hands a connected conversation to a queue or another agent of the tenant.
pub(crate) async fn do_transfer(
    state: &AppState,
    agent: &Agent,
    id: &str,
    queue_id: Option<String>,
    agent_id: Option<String>,
    note: Option<String>,
) -> Result<(), ApiError> {
    check_id(id)?;
    let (target_kind, target_id) = match (queue_id, agent_id) {
        (Some(q), None) => (ev::TargetKind::Queue, q),
        (None, Some(a)) => (ev::TargetKind::Agent, a),
        _ => {
            return Err(ApiError::bad_request(
                "INVALID_FIELD",
                "give exactly one of `queue_id` or `agent_id`",
            ))
        }
    };
    let what = match target_kind {
        ev::TargetKind::Queue => "queue",
        _ => "agent",
    };
    check_id_of(what, &target_id)?;
    check_note(state, note.as_deref())?;
    let body = ev::TransferRequested {
        agent_id: agent.id.clone(),
        participant_id: agent.id.clone(),
        target_kind,
        target_id,
        mode: ev::TransferMode::Transfer,
        note,
        user_data: Default::default(),
    };
    let e = event(&body, agent, id)?;
    publish(state, e).await
}

/// Invites another agent of the tenant into a conversation the agent holds, as a consultant:
/// in conference (`visibility` `all`, the default: the customer sees what the consultant
/// writes) or in private (`agents`: the consultant's messages, typing, joining and leaving
/// reach the conversation's agents only).
pub(crate) async fn do_consult(
    state: &AppState,
    agent: &Agent,
    id: &str,
    agent_id: &str,
    note: Option<String>,
    visibility: Option<&str>,
) -> Result<(), ApiError> {
    check_id(id)?;
    check_id_of("agent", agent_id)?;
    check_note(state, note.as_deref())?;
    let mode = match parse_visibility(visibility)? {
        ev::Visibility::All => ev::TransferMode::Conference,
        _ => ev::TransferMode::Consult,
    };
    let body = ev::TransferRequested {
        agent_id: agent.id.clone(),
        participant_id: agent.id.clone(),
        target_kind: ev::TargetKind::Agent,
        target_id: agent_id.to_string(),
        mode,
        note,
        user_data: Default::default(),
    };
    let e = event(&body, agent, id)?;
    publish(state, e).await
}

/// A consultant leaves the conversation (or withdraws from an invitation); it goes on.
pub(crate) async fn do_leave(state: &AppState, agent: &Agent, id: &str) -> Result<(), ApiError> {
    check_id(id)?;
    let body = ev::ParticipantLeft {
        participant_id: agent.id.clone(),
        participant_kind: ParticipantKind::Agent,
        nickname: Some(agent.name.clone()),
        reason: ev::LeftReason::Left,
        transcript_position: None,
        visibility: ev::Visibility::All,
    };
    let e = event(&body, agent, id)?;
    publish(state, e).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsultRequest {
    agent_id: String,
    note: Option<String>,
    visibility: Option<String>,
}

async fn consult(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let r: ConsultRequest = super::chat::json_body(body)?;
    do_consult(
        &state,
        &agent,
        &id,
        &r.agent_id,
        r.note,
        r.visibility.as_deref(),
    )
    .await?;
    Ok(StatusCode::ACCEPTED)
}

async fn leave(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    do_leave(&state, &agent, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    queue_id: Option<String>,
    agent_id: Option<String>,
    note: Option<String>,
}

async fn transfer(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let r: TransferRequest = super::chat::json_body(body)?;
    do_transfer(&state, &agent, &id, r.queue_id, r.agent_id, r.note).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn me(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let presence = state
        .sessions()?
        .presence(&agent.tenant_id, &agent.id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(json!({
        "id": agent.id,
        "tenant_id": agent.tenant_id,
        "name": agent.name,
        "skills": agent.skills,
        "capacity": agent.capacity,
        "ready": presence.as_ref().is_some_and(|p| p.ready),
        "active": presence.map(|p| p.active).unwrap_or_default(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateRequest {
    /// `ready` or `not_ready`.
    state: String,
    /// Why not ready (a code of the tenant's choosing, e.g. `BREAK`).
    reason_code: Option<String>,
    /// Capacity per media for this state, at most the provisioned one.
    #[serde(default)]
    capacity: BTreeMap<String, u32>,
}

fn parse_ready(s: &str) -> Result<bool, ApiError> {
    match s {
        "ready" => Ok(true),
        "not_ready" => Ok(false),
        _ => Err(ApiError::bad_request(
            "INVALID_FIELD",
            "state is `ready` or `not_ready`",
        )),
    }
}

async fn set_state(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let r: StateRequest = super::chat::json_body(body)?;
    let ready = parse_ready(&r.state)?;
    do_set_state(&state, &agent, ready, r.reason_code, r.capacity).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OfferRequest {
    offer_id: String,
}

async fn accept(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let r: OfferRequest = super::chat::json_body(body)?;
    do_accept(&state, &agent, &id, &r.offer_id).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn reject(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let r: OfferRequest = super::chat::json_body(body)?;
    do_reject(&state, &agent, &id, &r.offer_id).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyRequest {
    text: String,
    message_id: Option<String>,
    visibility: Option<String>,
}

async fn reply(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let r: ReplyRequest = super::chat::json_body(body)?;
    let message_id = do_reply(
        &state,
        &agent,
        &id,
        r.text,
        r.message_id,
        r.visibility.as_deref(),
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "message_id": message_id })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TypingRequest {
    state: String,
}

async fn typing(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let r: TypingRequest = super::chat::json_body(body)?;
    let started = super::chat::typing_started(&r.state)?;
    do_typing(&state, &agent, &id, started).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteRequest {
    disposition: Option<String>,
    note: Option<String>,
}

async fn complete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let r: CompleteRequest = match body {
        Ok(b) if b.is_empty() => CompleteRequest::default(),
        other => super::chat::json_body(other)?,
    };
    do_complete(&state, &agent, &id, r.disposition, r.note).await?;
    Ok(StatusCode::ACCEPTED)
}

/// The agent's conversations (offered or connected).
async fn conversations(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    Ok(Json(
        json!({ "items": conversation_items(&state, &agent).await? }),
    ))
}

/// The conversations the agent holds, is offered (with the offer's id and expiry) or
/// consults: the list of `GET /v1/agent/conversations` and of the socket's `hello`.
pub(super) async fn conversation_items(
    state: &AppState,
    agent: &Agent,
) -> Result<Vec<Value>, ApiError> {
    let ids = state
        .sessions()?
        .agent_conversations(&agent.tenant_id, &agent.id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let mut items = Vec::new();
    let me = Some(agent.id.as_str());
    for id in ids {
        let c = state
            .sessions()?
            .conversation(&agent.tenant_id, &id)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        // A slot is also held by a reservation whose offer is not applied yet (or never
        // will be): only what the record gives this agent is listed, as `ensure_mine` allows.
        let Some(c) = c.filter(|c| is_mine(c, &agent.id)) else {
            continue;
        };
        let (offer_id, expires_at) = if c.offered_to.as_deref() == me {
            (c.routing.offer_id.clone(), c.routing.offer_expires_at_ms)
        } else if c.routing.consult_invited.as_deref() == me {
            (
                c.routing.consult_offer_id.clone(),
                c.routing.consult_expires_at_ms,
            )
        } else {
            (None, None)
        };
        let owner = c.agent_id.as_deref() == me || c.offered_to.as_deref() == me;
        let consulting = c.routing.consultant.is_some() || c.routing.consult_invited.is_some();
        let consult_visibility = consulting.then_some(if c.routing.consult_private {
            "agents"
        } else {
            "all"
        });
        items.push(json!({
            "conversation_id": c.conversation_id,
            "state": c.state,
            "nickname": c.customer.nickname,
            "queue_id": c.queue_id,
            "offer_id": offer_id,
            "expires_at": expires_at,
            "role": if owner { "owner" } else { "consultant" },
            "consult_visibility": consult_visibility,
            "created_at": c.created_at_ms,
        }));
    }
    Ok(items)
}

/// Whether the record gives the conversation to `agent`: holding it, offered it, or its
/// consultant (joined or invited).
fn is_mine(c: &Conversation, agent: &str) -> bool {
    let me = Some(agent);
    c.agent_id.as_deref() == me
        || c.offered_to.as_deref() == me
        || c.routing.consultant.as_deref() == me
        || c.routing.consult_invited.as_deref() == me
}

/// The conversation `id` of the agent's tenant, as the session store has it.
async fn conversation_of(
    state: &AppState,
    agent: &Agent,
    id: &str,
) -> Result<Option<Conversation>, ApiError> {
    check_id(id)?;
    state
        .sessions()?
        .conversation(&agent.tenant_id, id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))
}

/// Refuses a conversation the agent neither holds nor was offered (as owner or consultant),
/// with the same 404 as one that does not exist.
async fn ensure_mine(state: &AppState, agent: &Agent, id: &str) -> Result<(), ApiError> {
    let c = conversation_of(state, agent, id).await?;
    if !c.is_some_and(|c| is_mine(&c, &agent.id)) {
        return Err(ApiError::not_found(
            "CONVERSATION_NOT_FOUND",
            "no such conversation of yours",
        ));
    }
    Ok(())
}

/// A file uploaded into a conversation the agent holds or was offered.
async fn download(
    State(state): State<AppState>,
    Path((id, file_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    ensure_mine(&state, &agent, &id).await?;
    let file = super::chat::stored_file(&state, &agent.tenant_id, &id, &file_id).await?;
    Ok(super::chat::file_response(file))
}

/// A transcript the agent holds or was offered; anything else is 404.
async fn transcript(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<super::chat::TranscriptQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let Query(q) = query?;
    ensure_mine(&state, &agent, &id).await?;
    let reader = super::chat::Reader::Agent;
    super::chat::transcript_page(&state, &agent.tenant_id, &id, &q, reader).await
}
