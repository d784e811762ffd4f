//! Chat API v3 handlers: start, send, typing, transcript, disconnect (files: [`super::files`]). Each validates, builds
//! the event, publishes it and answers after the bus ack; nothing is published on bad input.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{chat_tenant, publish_event, session_claims, Claims, INBOUND_TOPIC};
use crate::edge::{ApiError, AppState};
use crate::events::chat::{self as ev, Channel, Contact, MessageKind, ParticipantKind};
use crate::events::Event;
use crate::stores::session::{
    merge_user_data, start_mark, start_request_key, Conversation, ConversationState, Entry,
};
use crate::workers::conversation::notify::entry_json;

const PRODUCER: &str = "edge/chat";

/// Reads a JSON body, rejecting malformed JSON and unknown fields with a 400.
pub(crate) fn json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body?;
    serde_json::from_slice(&body).map_err(|e| body_error(&e))
}

/// A body serde could not read: `INVALID_JSON` when it is not JSON at all, `INVALID_BODY` when
/// it is JSON of the wrong shape (unknown or missing field, wrong type) — the same codes as the
/// admin and ingest APIs.
pub(crate) fn body_error(e: &serde_json::Error) -> ApiError {
    match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::bad_request("INVALID_JSON", format!("body is not valid JSON: {e}"))
        }
        _ => ApiError::bad_request("INVALID_BODY", format!("body: {e}")),
    }
}

/// A typing state: `started` or `stopped` (customer and agent alike).
pub(crate) fn typing_started(state: &str) -> Result<bool, ApiError> {
    match state {
        "started" => Ok(true),
        "stopped" => Ok(false),
        _ => Err(ApiError::bad_request(
            "INVALID_FIELD",
            "state is `started` or `stopped`",
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub nickname: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email_address: Option<String>,
    pub phone_number: Option<String>,
    pub subject: Option<String>,
    #[serde(default)]
    pub user_data: BTreeMap<String, String>,
    /// A first message.
    pub text: Option<String>,
    /// Async chat: the session stays open while the customer is away.
    #[serde(default, rename = "async")]
    pub is_async: bool,
    /// The client's id of this start: a retried start with the same id is not a second chat.
    pub request_id: Option<String>,
}

pub(crate) fn check_text(state: &AppState, text: &str) -> Result<(), ApiError> {
    let max = state.config.chat.max_message_chars;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "INVALID_MESSAGE",
            "the message text is empty",
        ));
    }
    if text.chars().count() > max {
        return Err(ApiError::bad_request(
            "MESSAGE_TOO_LONG",
            format!("the message text is longer than {max} characters"),
        ));
    }
    Ok(())
}

/// The nickname a start request gives (or first + last name), validated.
pub(crate) fn nickname(
    state: &AppState,
    nickname: Option<&str>,
    first: Option<&str>,
    last: Option<&str>,
) -> Result<String, ApiError> {
    let given = match nickname.map(str::trim).filter(|n| !n.is_empty()) {
        Some(n) => n.to_string(),
        None => [first, last]
            .iter()
            .flatten()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    };
    let max = state.config.chat.max_nickname_chars;
    if given.is_empty() || given.chars().count() > max || given.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "INVALID_NICKNAME",
            format!("give a nickname (or first and last name) of 1 to {max} printable characters"),
        ));
    }
    Ok(given)
}

pub(crate) fn check_user_data(
    state: &AppState,
    data: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    crate::stores::session::check_user_data(data, state.config.chat.max_user_data_entries)
        .map_err(|e| ApiError::bad_request("INVALID_USER_DATA", e))
}

/// What starting a session needs, shared by v3 and the legacy v2 API.
pub(crate) struct NewSession {
    pub nickname: String,
    pub contact: Contact,
    pub subject: Option<String>,
    pub user_data: BTreeMap<String, String>,
    pub text: Option<String>,
    pub is_async: bool,
    pub service: Option<String>,
    /// The client's id of this start: a retry with the same id gets the same session.
    pub request_id: Option<String>,
}

/// Longest contact field or subject (characters): they end up in the record and on every
/// agent desktop, so they are bounded like the nickname.
const MAX_CONTACT_CHARS: usize = 256;

fn check_contact(s: &NewSession) -> Result<(), ApiError> {
    let fields = [
        ("first_name", &s.contact.first_name),
        ("last_name", &s.contact.last_name),
        ("email_address", &s.contact.email_address),
        ("phone_number", &s.contact.phone_number),
        ("subject", &s.subject),
    ];
    for (name, value) in fields {
        if value
            .as_deref()
            .is_some_and(|v| v.chars().count() > MAX_CONTACT_CHARS)
        {
            return Err(ApiError::bad_request(
                "INVALID_FIELD",
                format!("{name} is at most {MAX_CONTACT_CHARS} characters"),
            ));
        }
    }
    Ok(())
}

/// Client ids of a start request: printable ASCII of this many bytes. The id answers with the
/// session's client key, so it is a secret, long enough not to be guessed (a UUID is 36).
const MIN_REQUEST_ID: usize = 16;
const MAX_REQUEST_ID: usize = 128;

/// Publishes the conversation request; returns the claims of the new session. A start with a
/// client `request_id` is idempotent: a retry within the client key's lifetime (and the
/// record's retention) gets the first start's session and key, and publishes the request
/// again, at its own time, only while that session has no record yet (the first publish may
/// have failed; the worker applies a conversation's first request only).
pub(crate) async fn open_session(
    state: &AppState,
    tenant: &str,
    s: NewSession,
    traceparent: Option<String>,
) -> Result<Claims, ApiError> {
    check_contact(&s)?;
    let sessions = state.sessions()?;
    let unavailable = |e: crate::stores::session::StoreError| ApiError::unavailable(e.to_string());
    let retention = Duration::from_secs(state.config.workers.conversation.closed_retention_s);
    // A retry past the key's lifetime would get a dead key it cannot renew: a new chat then.
    let claimed_for = retention.min(Duration::from_secs(state.config.chat.client_key_ttl_s));
    let mut ids = StartIds {
        conversation_id: Uuid::now_v7().to_string(),
        participant_id: Uuid::now_v7().to_string(),
        at_ms: chrono::Utc::now().timestamp_millis(),
    };
    if let Some(request_id) = &s.request_id {
        check_request_id(request_id)?;
        let key = start_request_key(tenant, request_id);
        if let Some(held) = sessions
            .claim(&key, &ids.to_string(), claimed_for)
            .await
            .map_err(unavailable)?
        {
            // The id itself stays out of the message: it is a secret.
            ids = held.parse().map_err(|()| {
                ApiError::unavailable("the stored start of this request_id is unreadable")
            })?;
            let record = sessions
                .conversation(tenant, &ids.conversation_id)
                .await
                .map_err(unavailable)?;
            if record.is_some() {
                return Ok(ids.claims(state, tenant));
            }
        }
    }
    let body = ev::ConversationRequested {
        channel: Channel::WebChat,
        channel_id: None,
        service: s.service,
        participant_id: ids.participant_id.clone(),
        nickname: s.nickname,
        contact: s.contact,
        subject: s.subject,
        first_message: s.text,
        user_data: s.user_data,
        is_async: s.is_async,
    };
    let mut event = Event::typed(&body, tenant, &ids.conversation_id, PRODUCER)
        .map_err(|e| ApiError::bad_request("INVALID_FIELD", e.to_string()))?;
    event.envelope.traceparent = traceparent;
    // Marked before the request is published, so a missing record is either a start not yet
    // applied (marked) or a session the store lost (not marked): see [`ensure_open`]. The
    // worker drops the mark once the record exists; it expires with the retention otherwise.
    sessions
        .remember(&start_mark(tenant, &ids.conversation_id), retention)
        .await
        .map_err(unavailable)?;
    publish_event(state, INBOUND_TOPIC, &event).await?;
    Ok(ids.claims(state, tenant))
}

fn check_request_id(id: &str) -> Result<(), ApiError> {
    let fits = (MIN_REQUEST_ID..=MAX_REQUEST_ID).contains(&id.len());
    if !fits || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            format!(
                "request_id is {MIN_REQUEST_ID} to {MAX_REQUEST_ID} printable ASCII characters, \
                 random (a UUID): a retry with it gets the session's key"
            ),
        ));
    }
    Ok(())
}

/// What a start chose, kept under its request id so a retry chooses the same.
struct StartIds {
    conversation_id: String,
    participant_id: String,
    at_ms: i64,
}

impl StartIds {
    /// The session's claims: the same key for every retry of one start.
    fn claims(self, state: &AppState, tenant: &str) -> Claims {
        let iat = self.at_ms / 1000;
        Claims {
            tid: tenant.to_string(),
            sid: self.conversation_id,
            pid: self.participant_id,
            iat,
            exp: Some(state.client_keys.expiry(iat)),
        }
    }
}

impl std::fmt::Display for StartIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.conversation_id, self.participant_id, self.at_ms
        )
    }
}

impl std::str::FromStr for StartIds {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.split(' ');
        let (Some(c), Some(p), Some(at), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(());
        };
        Ok(Self {
            conversation_id: c.to_string(),
            participant_id: p.to_string(),
            at_ms: at.parse().map_err(|_| ())?,
        })
    }
}

/// The client's trace context, or a new one when it sent none or a malformed one (which
/// would otherwise travel on in every event derived from this one).
pub(crate) fn traceparent(headers: &HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::events::is_traceparent(v))
        .map(str::to_string)
        .or_else(|| Some(crate::edge::new_traceparent()))
}

pub async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let tenant = chat_tenant(&state, &headers).await?;
    let r: StartRequest = json_body(body)?;
    let nick = nickname(
        &state,
        r.nickname.as_deref(),
        r.first_name.as_deref(),
        r.last_name.as_deref(),
    )?;
    if let Some(t) = &r.text {
        check_text(&state, t)?;
    }
    check_user_data(&state, &r.user_data)?;
    let session = NewSession {
        nickname: nick,
        contact: Contact {
            first_name: r.first_name,
            last_name: r.last_name,
            email_address: r.email_address,
            phone_number: r.phone_number,
        },
        subject: r.subject,
        user_data: r.user_data,
        text: r.text,
        is_async: r.is_async,
        service: None,
        request_id: r.request_id,
    };
    let claims = open_session(&state, &tenant, session, traceparent(&headers)).await?;
    let id = claims.sid.clone();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "session_id": id,
            "participant_id": claims.pid,
            "client_key": state.client_keys.issue(&claims),
            "client_key_expires_at": claims.exp,
            "stream": {
                "websocket": format!("/nexus/v3/chat/sessions/{id}/stream"),
                "sse": format!("/nexus/v3/chat/sessions/{id}/events"),
            },
        })),
    ))
}

/// A fresh client key for the session, for the holder of a valid key while the chat is open:
/// an async chat can outlive `chat.client_key_ttl_s`, while a closed chat's keys still die.
pub async fn renew_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    ensure_open(&state, &c).await?;
    let iat = chrono::Utc::now().timestamp();
    let exp = state.client_keys.expiry(iat);
    let key = state.client_keys.issue(&Claims {
        iat,
        exp: Some(exp),
        ..c
    });
    Ok((
        StatusCode::CREATED,
        Json(json!({ "client_key": key, "client_key_expires_at": exp })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    pub text: String,
    /// The client's id of the message: a retried send with the same id is not a second one.
    pub message_id: Option<String>,
}

/// The code of a session whose record the store no longer has (closed and expired).
pub(crate) const SESSION_ENDED: &str = "SESSION_ENDED";

/// Refuses actions on a session the worker already closed (409 `SESSION_CLOSED`) or whose
/// record is gone (410 `SESSION_ENDED`). The record read is the one this check always made, so
/// the send path gains no store round trip.
pub(crate) async fn ensure_open(
    state: &AppState,
    c: &Claims,
) -> Result<Option<Conversation>, ApiError> {
    let sessions = state.sessions()?;
    let read = || async {
        sessions
            .conversation(&c.tid, &c.sid)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))
    };
    let record = match read().await? {
        Some(r) => r,
        None if record_gone(state, c, chrono::Utc::now().timestamp()) => {
            return Err(session_ended())
        }
        // Absent: the worker has not applied the start yet, or the store lost the session (a
        // Redis restart without persistence); only the start's mark tells them apart. A lost
        // session refuses sends rather than accepting messages the worker would drop.
        None => {
            let started = sessions
                .seen(&start_mark(&c.tid, &c.sid))
                .await
                .map_err(|e| ApiError::unavailable(e.to_string()))?;
            if started {
                return Ok(None);
            }
            // The worker saves the record before it drops the mark: a start applied between
            // the two reads above has its record now.
            read().await?.ok_or_else(session_ended)?
        }
    };
    if record.state == ConversationState::Closed {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "SESSION_CLOSED",
            "the chat has ended",
        ));
    }
    Ok(Some(record))
}

/// Whether a reader should see the chat as ended: its record says closed, or the record is gone
/// (expired, or lost by the store) and the session is not a start still on its way (see
/// [`ensure_open`]). A poller must learn this, or it polls a lost chat until its key expires.
pub(crate) async fn closed_or_gone(
    state: &AppState,
    tenant: &str,
    conversation_id: &str,
) -> Result<bool, ApiError> {
    let sessions = state.sessions()?;
    let read = || async {
        sessions
            .conversation(tenant, conversation_id)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))
    };
    if let Some(record) = read().await? {
        return Ok(record.state == ConversationState::Closed);
    }
    let starting = sessions
        .seen(&start_mark(tenant, conversation_id))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    if starting {
        return Ok(false);
    }
    // The worker saves the record before it drops the mark.
    Ok(read()
        .await?
        .is_none_or(|r| r.state == ConversationState::Closed))
}

fn session_ended() -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        SESSION_ENDED,
        "the chat has ended and is no longer kept",
    )
}

/// Whether a missing record surely means the session is over, without asking the store: only
/// a closed record expires, `closed_retention_s` after the close, and the start's mark lives
/// at most that long from the start, so a key older than that has nothing left to prove its
/// session.
fn record_gone(state: &AppState, c: &Claims, now_s: i64) -> bool {
    let retention = state.config.workers.conversation.closed_retention_s;
    let retention = i64::try_from(retention).unwrap_or(i64::MAX);
    now_s.saturating_sub(c.iat) > retention.saturating_add(super::client_key::CLOCK_SKEW_S)
}

/// A client's message id, when given, is 1 to 128 characters.
pub(crate) fn check_message_id(id: Option<&str>) -> Result<(), ApiError> {
    if id.is_some_and(|m| m.is_empty() || m.chars().count() > 128) {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            "message_id is 1 to 128 characters",
        ));
    }
    Ok(())
}

/// The message id on the bus (a UUID) for a sender's optional client id: a new UUID v7 when there
/// is none, the id itself when it is a UUID, else a UUID v5 of conversation, sender and id, so a
/// retried send maps to the same message (the transcript dedups on it).
pub(crate) fn bus_message_id(
    conversation_id: &str,
    sender: &str,
    client_id: Option<&str>,
) -> String {
    match client_id {
        None => Uuid::now_v7(),
        Some(m) => Uuid::parse_str(m).unwrap_or_else(|_| {
            Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("{conversation_id}/{sender}/{m}").as_bytes(),
            )
        }),
    }
    .to_string()
}

/// Publishes a customer message; returns its message id.
pub(crate) async fn customer_message(
    state: &AppState,
    c: &Claims,
    text: String,
    kind: MessageKind,
    client_message_id: Option<String>,
    traceparent: Option<String>,
) -> Result<String, ApiError> {
    check_text(state, &text)?;
    check_message_id(client_message_id.as_deref())?;
    ensure_open(state, c).await?;
    publish_customer_message(
        state,
        c,
        text,
        kind,
        client_message_id,
        Vec::new(),
        traceparent,
    )
    .await
}

/// Publishes a customer's `MessageReceived` the caller validated; returns its message id.
pub(crate) async fn publish_customer_message(
    state: &AppState,
    c: &Claims,
    text: String,
    kind: MessageKind,
    client_message_id: Option<String>,
    media_ids: Vec<String>,
    traceparent: Option<String>,
) -> Result<String, ApiError> {
    let message_id = Uuid::now_v7().to_string();
    let body = ev::MessageReceived {
        message_id: message_id.clone(),
        client_message_id: client_message_id.clone(),
        channel: Channel::WebChat,
        channel_id: None,
        participant_id: c.pid.clone(),
        participant_kind: ParticipantKind::Customer,
        nickname: None,
        contact: Contact::default(),
        kind,
        text: Some(text),
        media_ids,
        sent_at: None,
        transcript_position: None,
    };
    let mut event = Event::typed(&body, &c.tid, &c.sid, PRODUCER)
        .map_err(|e| ApiError::bad_request("INVALID_FIELD", e.to_string()))?;
    event.envelope.traceparent = traceparent;
    publish_event(state, INBOUND_TOPIC, &event).await?;
    Ok(client_message_id.unwrap_or(message_id))
}

pub async fn send(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    let r: SendRequest = json_body(body)?;
    let message_id = customer_message(
        &state,
        &c,
        r.text,
        MessageKind::Text,
        r.message_id,
        traceparent(&headers),
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "message_id": message_id })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypingRequest {
    /// `started` or `stopped`.
    pub state: String,
}

pub(crate) async fn customer_typing(
    state: &AppState,
    c: &Claims,
    started: bool,
    traceparent: Option<String>,
) -> Result<(), ApiError> {
    ensure_open(state, c).await?;
    let body = ev::TypingIndicated {
        participant_id: c.pid.clone(),
        participant_kind: ParticipantKind::Customer,
        state: if started {
            ev::TypingState::Started
        } else {
            ev::TypingState::Stopped
        },
        preview: None,
        transcript_position: None,
    };
    publish_customer(state, c, &body, traceparent).await
}

pub async fn typing(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    let r: TypingRequest = json_body(body)?;
    let started = typing_started(&r.state)?;
    customer_typing(&state, &c, started, traceparent(&headers)).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Publishes a customer event of the session `c` on the inbound topic.
async fn publish_customer<B: ev::Body>(
    state: &AppState,
    c: &Claims,
    body: &B,
    traceparent: Option<String>,
) -> Result<(), ApiError> {
    let mut event = Event::typed(body, &c.tid, &c.sid, PRODUCER)
        .map_err(|e| ApiError::bad_request("INVALID_FIELD", e.to_string()))?;
    event.envelope.traceparent = traceparent;
    publish_event(state, INBOUND_TOPIC, &event).await
}

pub(crate) async fn customer_leaves(
    state: &AppState,
    c: &Claims,
    traceparent: Option<String>,
) -> Result<(), ApiError> {
    ensure_open(state, c).await?;
    let body = ev::ParticipantLeft {
        participant_id: c.pid.clone(),
        participant_kind: ParticipantKind::Customer,
        nickname: None,
        reason: ev::LeftReason::Left,
        transcript_position: None,
        visibility: ev::Visibility::All,
    };
    publish_customer(state, c, &body, traceparent).await
}

pub async fn disconnect(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    customer_leaves(&state, &c, traceparent(&headers)).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
pub struct TranscriptQuery {
    /// First position to return (1-based); default 1.
    pub from: Option<u64>,
    pub limit: Option<usize>,
}

/// Who reads a transcript: agents see every entry; customers and bots not those for agents
/// only (whose positions they skip: `next_position` goes past them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reader {
    Agent,
    Customer,
}

impl Reader {
    pub(crate) fn sees(self, e: &Entry) -> bool {
        self == Reader::Agent || !e.entry.agents_only()
    }
}

/// A transcript page as every reader's API answers it (customer, agent, bot).
pub(crate) async fn transcript_page(
    state: &AppState,
    tenant: &str,
    conversation_id: &str,
    q: &TranscriptQuery,
    reader: Reader,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let from = q.from.unwrap_or(1);
    let (messages, next, ended) =
        read_transcript(state, tenant, conversation_id, from, limit, reader).await?;
    Ok(Json(json!({
        "messages": messages,
        "next_position": next,
        "chat_ended": ended,
    })))
}

/// The transcript's last position (0 for none).
pub(crate) async fn transcript_len(
    state: &AppState,
    tenant: &str,
    conversation_id: &str,
) -> Result<u64, ApiError> {
    state
        .sessions()?
        .transcript_len(tenant, conversation_id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))
}

/// Transcript entries from a position, the next position and whether the chat ended.
pub(crate) async fn read_transcript(
    state: &AppState,
    tenant: &str,
    conversation_id: &str,
    from: u64,
    limit: usize,
    reader: Reader,
) -> Result<(Vec<Value>, u64, bool), ApiError> {
    // The record first: the worker appends a close's last entries before it saves the record
    // closed, so an answer saying "ended" holds them, when it is the last page (a full page
    // may have more behind it: "ended" tells a reader to stop reading).
    let closed = closed_or_gone(state, tenant, conversation_id).await?;
    let store = state.sessions()?;
    let entries = store
        .transcript(tenant, conversation_id, from.max(1), limit)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    if entries.is_empty() && from > 1 && !closed {
        // Past the end, as a stream refuses it: a reader going on from there would never get
        // the entries up to it (the length only grows, so one read after the page is safe).
        let len = transcript_len(state, tenant, conversation_id).await?;
        if from > len.saturating_add(1) {
            return Err(ApiError::bad_request(
                "INVALID_POSITION",
                format!(
                    "position {from} is past the end of the transcript ({len} entries); read \
                     from the position after the last one received"
                ),
            ));
        }
    }
    let ended = closed && entries.len() < limit;
    let next = entries
        .last()
        .map(|e| e.position + 1)
        .unwrap_or(from.max(1));
    let json = entries
        .iter()
        .filter(|e| reader.sees(e))
        .map(|e| entry_json(conversation_id, e))
        .collect();
    Ok((json, next, ended))
}

/// Merges user data into the conversation (and removes `removed` keys).
pub(crate) async fn customer_user_data(
    state: &AppState,
    c: &Claims,
    user_data: BTreeMap<String, String>,
    removed: Vec<String>,
    traceparent: Option<String>,
) -> Result<(), ApiError> {
    check_user_data(state, &user_data)?;
    // Keys to remove name entries the conversation can hold: as many, as long.
    let max = state.config.chat.max_user_data_entries;
    if removed.len() > max || removed.iter().any(|k| k.is_empty() || k.len() > 256) {
        return Err(ApiError::bad_request(
            "INVALID_USER_DATA",
            format!("at most {max} keys to remove, each 1 to 256 bytes"),
        ));
    }
    if user_data.is_empty() && removed.is_empty() {
        return Err(ApiError::bad_request(
            "INVALID_USER_DATA",
            "give user data to set or keys to remove",
        ));
    }
    // What the chat would carry: at most `max` entries (checked again by the worker, which
    // sees updates that race each other).
    if let Some(record) = ensure_open(state, c).await? {
        let keys = merge_user_data(&record.user_data, &user_data, &removed);
        if keys.len() > max.max(record.user_data.len()) {
            return Err(ApiError::bad_request(
                "INVALID_USER_DATA",
                format!(
                    "a chat carries at most {max} user-data entries; this one has {} and the update would make {}",
                    record.user_data.len(),
                    keys.len()
                ),
            ));
        }
    }
    let body = ev::UserDataUpdated {
        participant_id: c.pid.clone(),
        participant_kind: ParticipantKind::Customer,
        user_data,
        removed_keys: removed,
    };
    publish_customer(state, c, &body, traceparent).await
}

/// What a read receipt's position past the transcript's end means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PastEnd {
    /// v3: a 400, since the client names the entry it read.
    Refuse,
    /// v2: everything read, since clients send back the `nextPosition` they were given.
    ReadAll,
}

/// The customer read the transcript up to `position`.
pub(crate) async fn customer_read(
    state: &AppState,
    c: &Claims,
    position: u64,
    past_end: PastEnd,
    traceparent: Option<String>,
) -> Result<(), ApiError> {
    if position == 0 {
        return Err(ApiError::bad_request(
            "INVALID_FIELD",
            "position is a transcript position (>= 1)",
        ));
    }
    ensure_open(state, c).await?;
    // A receipt is stored as an entry pointing at the message read: one that is not there
    // would point at nothing. Compared as sent: a position too large for the event is past
    // the end like any other.
    let length = transcript_len(state, &c.tid, &c.sid).await?;
    let read = match position {
        p if p > length && past_end == PastEnd::ReadAll && length > 0 => length,
        // Everything read of nothing yet: no entry to point at, and nothing wrong (a v2 client
        // echoes the `nextPosition` 1 of a chat the worker has not applied yet); a refusal
        // would end its chat.
        p if p > length && past_end == PastEnd::ReadAll => return Ok(()),
        p if p > length => {
            return Err(ApiError::bad_request(
                "INVALID_POSITION",
                format!("position {position} is past the end of the transcript ({length})"),
            ))
        }
        p => p,
    };
    // At most the transcript's length, which the store keeps far below `i64::MAX`.
    let position = i64::try_from(read)
        .map_err(|_| ApiError::unavailable(format!("transcript length {length} out of range")))?;
    let body = ev::ReceiptReceived {
        participant_id: c.pid.clone(),
        participant_kind: ParticipantKind::Customer,
        kind: ev::ReceiptKind::Read,
        message_id: None,
        client_message_id: None,
        transcript_position: Some(position),
        read_at: Some(chrono::Utc::now().timestamp_millis()),
    };
    publish_customer(state, c, &body, traceparent).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDataRequest {
    #[serde(default)]
    pub user_data: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

pub async fn user_data(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    let r: UserDataRequest = json_body(body)?;
    customer_user_data(&state, &c, r.user_data, r.remove, traceparent(&headers)).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadRequest {
    pub position: u64,
}

pub async fn read_receipt(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    let r: ReadRequest = json_body(body)?;
    customer_read(
        &state,
        &c,
        r.position,
        PastEnd::Refuse,
        traceparent(&headers),
    )
    .await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoticeRequest {
    pub text: String,
    /// The client's id of the notice: a retried post with the same id is not a second one.
    pub message_id: Option<String>,
}

/// A custom notice from the widget (shown to the agent as a notice, not a message).
pub async fn notice(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    let r: NoticeRequest = json_body(body)?;
    let id = customer_message(
        &state,
        &c,
        r.text,
        MessageKind::CustomNotice,
        r.message_id,
        traceparent(&headers),
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "message_id": id }))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_trace_context_is_replaced_not_passed_on() {
        let mut headers = HeaderMap::new();
        let theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", theirs.parse().expect("header"));
        assert_eq!(traceparent(&headers).as_deref(), Some(theirs));
        for bad in [
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            headers.insert("traceparent", bad.parse().expect("header"));
            let ours = traceparent(&headers).expect("a trace context");
            assert!(crate::events::is_traceparent(&ours), "{bad} → {ours}");
            assert_ne!(ours, bad);
        }
    }
}
