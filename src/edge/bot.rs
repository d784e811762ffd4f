//! The bot API (`/v1/bot/conversations/{id}/...`, bearer bot token): a bot posts messages, hands
//! off to a queue and reads the transcript at any time, not only in the answer to a turn.

// The edge refuses at once what the session record already rules out (an unknown or another
// tenant's conversation: 404; another bot's: 403; handed off or closed: 409); the conversation
// worker applies the rest only while the conversation is still with this bot, in its order.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::{
    bus_message_id, check_message_id, check_text, check_user_data, json_body, publish_event,
};
use super::{ApiError, AppState};
use crate::events::chat::{self as ev, ParticipantKind};
use crate::events::Event;
use crate::stores::provisioning::BotEndpoint;
use crate::stores::session::{Conversation, ConversationState};
use crate::workers::conversation::AGENT_TOPIC;

const PRODUCER: &str = "edge/bot";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/bot/conversations/{id}/messages",
            post(send).get(transcript),
        )
        .route("/v1/bot/conversations/{id}/handoff", post(handoff))
        .method_not_allowed_fallback(crate::edge::error::method_not_allowed)
        .route_layer(axum::middleware::from_fn(crate::edge::path::require_plain))
}

/// The bot of a bearer bot token.
async fn bot_of(state: &AppState, headers: &HeaderMap) -> Result<BotEndpoint, ApiError> {
    let raw = super::auth::bearer(headers)
        .ok_or_else(|| ApiError::unauthorized("send `Authorization: Bearer <bot token>`"))?;
    super::auth::bot(state, raw).await
}

/// The conversation if it was given to this bot; another tenant's reads as unknown (the record
/// is looked up under the bot's tenant), another bot's is 403.
async fn given_to(state: &AppState, bot: &BotEndpoint, id: &str) -> Result<Conversation, ApiError> {
    super::agent::check_id(id)?;
    let c = state
        .sessions()?
        .conversation(&bot.tenant_id, id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .ok_or_else(|| ApiError::not_found("CONVERSATION_NOT_FOUND", "no such conversation"))?;
    if c.bot_id.as_deref() != Some(bot.id.as_str()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "NOT_YOUR_CONVERSATION",
            "the conversation is not routed to this bot",
        ));
    }
    Ok(c)
}

/// [`given_to`], and still with the bot (not handed off, not closed).
async fn held_by(state: &AppState, bot: &BotEndpoint, id: &str) -> Result<Conversation, ApiError> {
    let c = given_to(state, bot, id).await?;
    match c.state {
        ConversationState::Bot => Ok(c),
        ConversationState::Closed => Err(ApiError::new(
            StatusCode::CONFLICT,
            "SESSION_CLOSED",
            "the chat has ended",
        )),
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "HANDED_OFF",
            "the conversation was handed off; the bot cannot act on it any more",
        )),
    }
}

async fn publish<B: ev::Body>(
    state: &AppState,
    bot: &BotEndpoint,
    id: &str,
    body: &B,
) -> Result<(), ApiError> {
    let event = Event::typed(body, &bot.tenant_id, id, PRODUCER)
        .map_err(|e| ApiError::bad_request("INVALID_FIELD", e.to_string()))?
        .with_traceparent(super::new_traceparent());
    publish_event(state, AGENT_TOPIC, &event).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    text: String,
    message_id: Option<String>,
}

/// A bot message into the conversation: a `MessageSent` from a bot participant. A retried post
/// with the same `message_id` is not a second message (the transcript dedups on it). Answers
/// the message id of the transcript entry.
async fn send(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let bot = bot_of(&state, &headers).await?;
    let r: SendRequest = json_body(body)?;
    check_text(&state, &r.text)?;
    check_message_id(r.message_id.as_deref())?;
    held_by(&state, &bot, &id).await?;
    let message_id = bus_message_id(&id, &format!("bot/{}", bot.id), r.message_id.as_deref());
    let sent = ev::MessageSent {
        message_id: message_id.clone(),
        participant_id: bot.id.clone(),
        participant_kind: ParticipantKind::Bot,
        nickname: bot.name.clone(),
        agent_id: None,
        kind: ev::MessageKind::Text,
        text: Some(r.text),
        media_ids: Vec::new(),
        in_reply_to: None,
        transcript_position: None,
        visibility: ev::Visibility::All,
    };
    publish(&state, &bot, &id, &sent).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "message_id": message_id })),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoffRequest {
    queue_id: Option<String>,
    #[serde(default)]
    user_data: BTreeMap<String, String>,
}

/// Hands the conversation to a queue (the named one, else its rule's) with context: a
/// `TransferRequested` whose requester is the bot.
async fn handoff(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let bot = bot_of(&state, &headers).await?;
    let r: HandoffRequest = match body {
        Ok(b) if b.is_empty() => HandoffRequest::default(),
        other => json_body(other)?,
    };
    check_user_data(&state, &r.user_data)?;
    if let Some(q) = &r.queue_id {
        super::agent::check_id(q)?;
        // 404 QUEUE_NOT_FOUND for a queue of another tenant too.
        state.provisioning.queue(&bot.tenant_id, q).await?;
    }
    let c = held_by(&state, &bot, &id).await?;
    check_merged_user_data(&state, &c, &r.user_data)?;
    let Some(queue_id) = r.queue_id.or(c.queue_id) else {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            "the conversation has no queue; give `queue_id`",
        ));
    };
    let transfer = ev::TransferRequested {
        agent_id: bot.id.clone(),
        participant_id: bot.id.clone(),
        target_kind: ev::TargetKind::Queue,
        target_id: queue_id,
        mode: ev::TransferMode::Transfer,
        note: None,
        user_data: r.user_data,
    };
    publish(&state, &bot, &id, &transfer).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Refuses a handoff whose context would take the chat past `chat.max_user_data_entries`:
/// the worker keeps the record bounded by leaving such a context out, so accepting it here
/// would answer 202 for a context the agent never gets. As for the customer's updates, the
/// worker checks again (updates racing this one).
fn check_merged_user_data(
    state: &AppState,
    c: &Conversation,
    context: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let max = state.config.chat.max_user_data_entries;
    let merged = crate::stores::session::merge_user_data(&c.user_data, context, &[]);
    if merged.len() > max.max(c.user_data.len()) {
        return Err(ApiError::bad_request(
            "INVALID_USER_DATA",
            format!(
                "a chat carries at most {max} user-data entries; this one has {} and the handoff would make {}",
                c.user_data.len(),
                merged.len()
            ),
        ));
    }
    Ok(())
}

/// The transcript of a conversation given to this bot (also after the handoff).
async fn transcript(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<super::chat::TranscriptQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let bot = bot_of(&state, &headers).await?;
    let Query(q) = query?;
    given_to(&state, &bot, &id).await?;
    let reader = super::chat::Reader::Customer;
    super::chat::transcript_page(&state, &bot.tenant_id, &id, &q, reader).await
}
