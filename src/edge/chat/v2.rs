//! Legacy Chat API v2 (`/genesys/2/chat/{service}...`) for widgets and scripts in the field:
//! form POSTs (urlencoded or `multipart/form-data`), `apikey` header, `secureKey`/`userId`/
//! `alias` per request, transcript polling with `refresh`. It is a view of the same
//! conversation events as v3.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::v3::{
    check_user_data, customer_leaves, customer_message, customer_read, customer_typing,
    customer_user_data, ensure_open, nickname, open_session, traceparent, NewSession, PastEnd,
    SESSION_ENDED,
};
use super::{claims_for, Claims, CLIENT_KEY_EXPIRED};
use crate::edge::{ApiError, AppState};
use crate::events::chat::{Contact, MessageKind};
use crate::stores::provisioning::shown;
use crate::stores::session::{Entry, EntryKind, PartyKind};

/// The chat server alias v2 clients echo back.
pub const ALIAS: &str = "nexus";

/// A v2 error answer: the v2 body (`statusCode` 2, or 1 for a 5xx, with `errors`, `chatEnded`,
/// `nextPosition` and no `messages`) with the HTTP status of the error. Every v2 answer has
/// those fields, so a poller keeps its position through an error, a store outage included.
pub struct V2Error {
    error: ApiError,
    /// The error answers a start: see [`error_status_code`].
    start: bool,
    /// The request's `transcriptPosition` (1 when it had none or it was not read).
    next_position: u64,
    /// The transcript part of an answer (`chatEnded`, `nextPosition`, `messages`), when the
    /// error leaves entries to tell: see [`run`].
    page: Option<Value>,
}

impl From<ApiError> for V2Error {
    fn from(error: ApiError) -> Self {
        V2Error {
            error,
            start: false,
            next_position: 1,
            page: None,
        }
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let e = self.error;
        let status_code = error_status_code(&e, self.start);
        // What went wrong inside is logged, not told.
        let advice = if e.status.is_server_error() {
            e.log_if_server_error();
            "the chat service is unavailable; try again".to_string()
        } else {
            e.message
        };
        let mut body = json!({
            "statusCode": status_code,
            "chatEnded": e.code == "SESSION_CLOSED" || e.code == SESSION_ENDED,
            "nextPosition": self.next_position,
            "messages": [],
        });
        if let (Value::Object(b), Some(Value::Object(page))) = (&mut body, self.page) {
            for k in ["chatEnded", "nextPosition", "messages"] {
                if let Some(v) = page.get(k) {
                    b.insert(k.to_string(), v.clone());
                }
            }
        }
        body["errors"] = json!([{"code": e.code, "advice": advice}]);
        (e.status, Json(body)).into_response()
    }
}

/// `statusCode` of a v2 error answer that the client should retry: the service failed, not
/// the request (Genesys: "the request was unsuccessful; retry").
const STATUS_RETRY: u8 = 1;
/// `statusCode` of an unrecoverable v2 error: v2 clients end the chat session on it.
const STATUS_FAILED: u8 = 2;

/// The `statusCode` of an error answer. A widget ends the chat on 2, so a passing outage (a
/// 5xx: store or bus unreachable) is 1, which it retries, keeping its chat and position; a
/// retried send whose first publish may have landed shows the message twice, the lesser harm.
/// Except a start whose publish may have landed: its retry would open a second chat beside the
/// first, which would wait for an agent with nobody in it.
fn error_status_code(e: &ApiError, start: bool) -> u8 {
    if e.status.is_server_error() && !(start && e.may_have_published) {
        STATUS_RETRY
    } else {
        STATUS_FAILED
    }
}

type Answer = Result<Json<Value>, V2Error>;

/// The boundary of a `multipart/form-data` body; `None` for any other content type (multer
/// reads the type too), and for one without a boundary, which then fails as urlencoded.
fn multipart_boundary(headers: &HeaderMap) -> Option<String> {
    let content_type = headers.get(axum::http::header::CONTENT_TYPE)?;
    multer::parse_boundary(content_type.to_str().ok()?).ok()
}

/// The fields of a multipart form, in order. v2 has no file operation: a file part is refused
/// rather than dropped (its sender would think it was taken).
async fn multipart_pairs(body: Bytes, boundary: String) -> Result<Vec<(String, String)>, ApiError> {
    let bad = |message: String| ApiError::bad_request("INVALID_BODY", message);
    let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut parts = multer::Multipart::new(stream, boundary);
    let mut pairs = Vec::new();
    while let Some(part) = parts
        .next_field()
        .await
        .map_err(|e| bad(format!("not a multipart form: {e}")))?
    {
        let Some(name) = part.name().map(str::to_string) else {
            return Err(bad("a form part without a name".into()));
        };
        if part.file_name().is_some() {
            return Err(bad(format!(
                "`{}` is a file: Chat API v2 takes no files",
                shown(&name)
            )));
        }
        let bytes = part
            .bytes()
            .await
            .map_err(|e| bad(format!("`{}`: {e}", shown(&name))))?;
        // Strict, as a urlencoded value is: a replacement character would be stored as text.
        let value = String::from_utf8(bytes.to_vec())
            .map_err(|_| bad(format!("`{}` is not UTF-8 text", shown(&name))))?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Form fields in order; `userData[key]` pairs gathered apart.
struct Form {
    fields: BTreeMap<String, String>,
    user_data: BTreeMap<String, String>,
}

impl Form {
    /// The form of a request: `multipart/form-data` (a browser's `FormData`, which GMS takes
    /// too) by its parts, anything else as urlencoded (scripts in the field send that under
    /// other content types, or none).
    async fn read(headers: &HeaderMap, body: Bytes) -> Result<Form, ApiError> {
        let pairs = match multipart_boundary(headers) {
            Some(boundary) => multipart_pairs(body, boundary).await?,
            None => serde_urlencoded::from_bytes(&body).map_err(|e| {
                ApiError::bad_request("INVALID_BODY", format!("not a urlencoded form: {e}"))
            })?,
        };
        Ok(Form::of(pairs))
    }

    fn of(pairs: Vec<(String, String)>) -> Form {
        let mut form = Form {
            fields: BTreeMap::new(),
            user_data: BTreeMap::new(),
        };
        for (k, v) in pairs {
            match k
                .strip_prefix("userData[")
                .and_then(|r| r.strip_suffix(']'))
            {
                Some(key) => {
                    form.user_data.insert(key.to_string(), v);
                }
                None => {
                    form.fields.insert(k, v);
                }
            }
        }
        form
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.fields
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The position to answer from: refresh semantics, where 0 (or none) is the start.
    fn position(&self) -> Result<u64, ApiError> {
        Ok(self.given_position()?.unwrap_or(1).max(1))
    }

    /// `transcriptPosition` as sent, 0 included: a read receipt tells 0 apart from 1.
    fn given_position(&self) -> Result<Option<u64>, ApiError> {
        self.get("transcriptPosition")
            .map(|p| {
                p.parse::<u64>().map_err(|_| {
                    ApiError::bad_request("INVALID_FIELD", "transcriptPosition is a number")
                })
            })
            .transpose()
    }
}

async fn tenant(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    // v2 names the header `apikey`; v3's `x-api-key` works too.
    let mut h = headers.clone();
    if let Some(v) = headers.get("apikey").cloned() {
        h.entry("x-api-key").or_insert(v);
    }
    super::chat_tenant(state, &h).await
}

fn v2_type(kind: EntryKind) -> Option<&'static str> {
    Some(match kind {
        EntryKind::ParticipantJoined => "ParticipantJoined",
        EntryKind::ParticipantLeft => "ParticipantLeft",
        EntryKind::Message => "Message",
        EntryKind::Notice | EntryKind::FileUploaded => "Notice",
        EntryKind::CustomNotice => "CustomNotice",
        EntryKind::TypingStarted => "TypingStarted",
        EntryKind::TypingStopped => "TypingStopped",
        // Not v2 event types: left out of the v2 view.
        EntryKind::ReadReceipt | EntryKind::UserDataUpdated => return None,
    })
}

/// An entry in the v2 view: v2 clients are customers, who never see an agents-only entry.
fn v2_message(e: &Entry) -> Option<Value> {
    if e.entry.agents_only() {
        return None;
    }
    let from_type = match e.entry.from.kind {
        PartyKind::Customer => "Client",
        PartyKind::Agent => "Agent",
        PartyKind::Bot | PartyKind::System => "External",
    };
    Some(json!({
        "index": e.position,
        "type": v2_type(e.entry.kind)?,
        "from": {
            "nickname": e.entry.from.nickname,
            "participantId": e.entry.from.participant_id,
            "type": from_type,
        },
        "text": e.entry.text,
        "utcTime": e.entry.at_ms,
    }))
}

/// Most entries one v2 answer carries.
const V2_PAGE: usize = 1000;

/// The common answer: messages after `from`, the next position, whether the chat ended.
async fn answer(
    state: &AppState,
    c: &Claims,
    from: u64,
    extra: Value,
) -> Result<Json<Value>, ApiError> {
    // The record first (see v3's `read_transcript`); a poller stops at `chatEnded`, so it is
    // said only once the page holds the transcript's end.
    let closed = super::v3::closed_or_gone(state, &c.tid, &c.sid).await?;
    let store = state.sessions()?;
    let entries = store
        .transcript(&c.tid, &c.sid, from, V2_PAGE)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let ended = closed && entries.len() < V2_PAGE;
    let next = match entries.last() {
        Some(last) => last.position + 1,
        // A position past the end goes back to the end (v2 clients know no position error),
        // so the next refresh gets the entries up to it instead of skipping them.
        None if from > 1 => {
            let len = super::v3::transcript_len(state, &c.tid, &c.sid).await?;
            from.min(len.saturating_add(1))
        }
        None => from,
    };
    let messages = entries.iter().filter_map(v2_message).collect();
    Ok(v2_body(ended, next, messages, extra))
}

/// A successful v2 answer: `extra`'s fields beside the transcript part.
fn v2_body(ended: bool, next: u64, messages: Vec<Value>, extra: Value) -> Json<Value> {
    let mut body = json!({
        "statusCode": 0,
        "chatEnded": ended,
        "nextPosition": next,
        "messages": messages,
    });
    if let (Value::Object(b), Value::Object(x)) = (&mut body, extra) {
        b.extend(x);
    }
    Json(body)
}

pub async fn start(
    State(state): State<AppState>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    open_chat(state, service, headers, body)
        .await
        .map_err(|error| V2Error {
            start: true,
            ..V2Error::from(error)
        })
}

async fn open_chat(
    state: AppState,
    service: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let form = Form::read(&headers, body.map_err(ApiError::from)?).await?;
    let nick = nickname(
        &state,
        form.get("nickname"),
        form.get("firstName"),
        form.get("lastName"),
    )?;
    check_user_data(&state, &form.user_data)?;
    let text = form.get("text").map(str::to_string);
    if let Some(t) = &text {
        super::check_text(&state, t)?;
    }
    let session = NewSession {
        nickname: nick,
        contact: Contact {
            first_name: form.get("firstName").map(str::to_string),
            last_name: form.get("lastName").map(str::to_string),
            email_address: form.get("emailAddress").map(str::to_string),
            phone_number: None,
        },
        subject: form.get("subject").map(str::to_string),
        user_data: form.user_data.clone(),
        text,
        is_async: false,
        service: Some(service),
        // The v2 form has no idempotency field; its clients never sent one.
        request_id: None,
    };
    let claims = open_session(&state, &tenant, session, traceparent(&headers)).await?;
    let extra = json!({
        "chatId": claims.sid,
        "userId": claims.pid,
        "secureKey": state.client_keys.issue(&claims),
        "alias": ALIAS,
    });
    Ok(answer_after_write(&state, &claims, 1, extra).await)
}

pub async fn operation(
    State(state): State<AppState>,
    Path((_service, chat_id, op)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    // The form first (no I/O): every later error answers the request's position, so a poller
    // keeps its place through an unavailable store or a refused key.
    let form = Form::read(&headers, body.map_err(ApiError::from)?).await?;
    let at = form.position().unwrap_or(1);
    let with_position = |error| V2Error {
        error,
        start: false,
        next_position: at,
        page: None,
    };
    let tenant = tenant(&state, &headers).await.map_err(with_position)?;
    let claims = session(&state, &form, &tenant, &chat_id).map_err(with_position)?;
    match run(&state, &headers, &claims, &op, form).await {
        Ok(answer) => Ok(answer),
        // Refused because the chat ended: the entries up to its end (the agent's last words,
        // their leaving) come with it, since a client stops polling once told `chatEnded`.
        Err(error) if error.code == "SESSION_CLOSED" => {
            let page = answer(&state, &claims, at, json!({})).await.ok();
            Err(V2Error {
                page: page.map(|Json(p)| p),
                ..with_position(error)
            })
        }
        Err(error) => Err(with_position(error)),
    }
}

/// One operation on a chat, once its form and session are read.
async fn run(
    state: &AppState,
    headers: &HeaderMap,
    claims: &Claims,
    op: &str,
    form: Form,
) -> Result<Json<Value>, ApiError> {
    state.presence.seen(state, claims);
    let from = form.position()?;
    let tp = traceparent(headers);
    match op {
        "send" | "customNotice" => {
            let text = form
                .get("message")
                .ok_or_else(|| ApiError::bad_request("INVALID_MESSAGE", "`message` is required"))?
                .to_string();
            let kind = if op == "send" {
                MessageKind::Text
            } else {
                MessageKind::CustomNotice
            };
            customer_message(state, claims, text, kind, None, tp).await?;
        }
        "refresh" => {}
        "startTyping" => customer_typing(state, claims, true, tp).await?,
        "stopTyping" => customer_typing(state, claims, false, tp).await?,
        "disconnect" => customer_leaves(state, claims, tp).await?,
        "updateData" => {
            customer_user_data(state, claims, form.user_data.clone(), Vec::new(), tp).await?;
        }
        "readReceipt" => match form.given_position()? {
            // The read message's position: without one there is nothing to mark read.
            None => {
                return Err(ApiError::bad_request(
                    "INVALID_FIELD",
                    "readReceipt needs the transcriptPosition of the message read",
                ))
            }
            // Positions are 1-based, so 0 names no entry: nothing read yet. Marked nothing,
            // as a receipt before any entry is; v3 refuses it (its client names an entry),
            // but a v2 refusal (statusCode 2) would end the widget's chat. A closed chat is
            // still told, as for any receipt.
            Some(0) => {
                ensure_open(state, claims).await?;
            }
            Some(read) => {
                customer_read(state, claims, receipt_position(read), PastEnd::ReadAll, tp).await?
            }
        },
        other => {
            return Err(ApiError::not_found(
                "UNKNOWN_OPERATION",
                format!("no v2 operation `{other}`"),
            ))
        }
    }
    if op == "refresh" {
        return answer(state, claims, from, json!({})).await;
    }
    Ok(answer_after_write(state, claims, from, json!({})).await)
}

/// The largest position a transcript can have (the store counts in `i64`).
const MAX_POSITION: u64 = i64::MAX as u64;

/// The position a v2 read receipt names. Any position past the transcript's end marks its last
/// entry read (clients echo `nextPosition`), so one past what a transcript can hold is no
/// different: it is not a malformed field.
fn receipt_position(position: u64) -> u64 {
    position.min(MAX_POSITION)
}

/// The answer to an operation that already published: its transcript part read if it can be,
/// else empty (the next refresh brings it), since an error would make the client retry, and a
/// v2 retry (no message id) is a second message, or a second chat after `start`.
async fn answer_after_write(state: &AppState, c: &Claims, from: u64, extra: Value) -> Json<Value> {
    match answer(state, c, from, extra.clone()).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e.message, "transcript not read after a v2 operation; answered without it");
            v2_body(false, from, Vec::new(), extra)
        }
    }
}

/// The session of a v2 request: `secureKey` must be this chat's key, `userId` its customer and
/// `alias` ours; any mismatch is the same error, so other chats cannot be probed.
fn session(state: &AppState, form: &Form, tenant: &str, chat_id: &str) -> Result<Claims, ApiError> {
    let denied = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "INVALID_SECURE_KEY",
            "secureKey, userId and alias do not match this chat",
        )
    };
    let key = form.get("secureKey").ok_or_else(denied)?;
    let claims = match claims_for(state, key, tenant, chat_id) {
        Ok(c) => c,
        // This chat's own key, only expired: the client should start a new chat.
        Err(e) if e.code == CLIENT_KEY_EXPIRED => return Err(e),
        Err(_) => return Err(denied()),
    };
    if form.get("userId") != Some(claims.pid.as_str())
        || form.get("alias").is_some_and(|a| a != ALIAS)
    {
        return Err(denied());
    }
    Ok(claims)
}
