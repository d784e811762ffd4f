//! Chat API v3 files: a customer uploads a file into the session (multipart field `file`,
//! optional `message_id`), and the customer or the agent of the conversation downloads it.
//!
//! The upload is checked before anything is kept: the type against `chat.file_types` (and the
//! first bytes against the type, for types with a signature), the size against
//! `chat.max_file_bytes`, the session's count against `chat.max_files_per_session`. Then the
//! bytes go to the provisioning database (every edge pod can serve them) and a customer
//! `MessageReceived` carrying the file id is published; the conversation worker turns it into
//! a `FileUploaded` transcript entry.
//!
//! A file expires `chat.file_retention_s` after upload: downloads answer 410 `FILE_EXPIRED`,
//! it no longer counts against the limit, and [`sweep`] empties it (its row stays a while).

use std::time::Duration;

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::{Multipart, Path, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument};

use super::session_claims;
use super::v3::{check_message_id, ensure_open, publish_customer_message, traceparent};
use crate::edge::{ApiError, AppState};
use crate::events::chat::MessageKind;
use crate::stores::provisioning::{ChatFile, NewChatFile, Object, ProvisioningError};
use crate::telemetry::metrics as m;

/// Room for the multipart framing above `chat.max_file_bytes`: part headers, boundaries and
/// the `message_id` field are a few hundred bytes; 64 KiB leaves slack for long file names
/// without letting a body grow much past the file limit.
pub(super) const FRAMING_BYTES: usize = 64 * 1024;

/// How long an upload waits for a place among `chat.max_uploads_in_flight`.
const UPLOAD_PERMIT_WAIT: Duration = Duration::from_secs(5);
/// Longest an upload's body may take to arrive (10 MiB at about 1 Mbit/s takes 80 s): a
/// client sending slowly holds a place, and its bytes, no longer.
const UPLOAD_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest file name kept (characters); longer names are cut.
const MAX_NAME_CHARS: usize = 255;

/// The first bytes of the allowed types that have a signature: a part declaring one of these
/// types must start with it, and a `text/*` part must start with none of them.
const SIGNATURES: [(&str, &[u8]); 5] = [
    ("image/png", b"\x89PNG\r\n\x1a\n"),
    ("image/jpeg", b"\xff\xd8\xff"),
    ("image/gif", b"GIF87a"),
    ("image/gif", b"GIF89a"),
    ("application/pdf", b"%PDF-"),
];

fn invalid_type(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("INVALID_FILE_TYPE", message)
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "LIMIT_FILE_SIZE",
        format!("the file is larger than {max} bytes"),
    )
}

fn too_many(max: usize) -> ApiError {
    ApiError::bad_request(
        "LIMIT_FILE_COUNT",
        format!("a session may upload at most {max} files"),
    )
}

/// A body that is not multipart/form-data (or has no boundary).
pub(crate) fn rejection(r: MultipartRejection) -> ApiError {
    ApiError::bad_request(
        "INVALID_BODY",
        format!(
            "send multipart/form-data with a `file` part: {}",
            r.body_text()
        ),
    )
}

/// A multipart body that cannot be read: over the route's body limit is the file size limit.
fn read_error(e: MultipartError, max: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(max)
    } else {
        ApiError::bad_request("INVALID_BODY", format!("multipart body: {}", e.body_text()))
    }
}

/// `type/subtype`, lowercased, without parameters.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The type a part declares, without parameters, read from its `Content-Type` as sent. Not
/// the multipart parser's: it drops the whole type when a parameter does not parse (`; x`, a
/// quoted non-ASCII value), and an allowed type would then be refused as ``.
fn declared_type(headers: &HeaderMap) -> String {
    let raw = headers
        .get(CONTENT_TYPE)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let head = raw.split(|b| *b == b';').next().unwrap_or_default();
    essence(&String::from_utf8_lossy(head))
}

/// Whether the bytes visibly contradict the declared type.
fn mismatch(content_type: &str, data: &[u8]) -> bool {
    let declared: Vec<&[u8]> = SIGNATURES
        .iter()
        .filter(|(t, _)| *t == content_type)
        .map(|(_, magic)| *magic)
        .collect();
    if !declared.is_empty() {
        return !declared.iter().any(|magic| data.starts_with(magic));
    }
    content_type.starts_with("text/")
        && (data.contains(&0) || SIGNATURES.iter().any(|(_, m)| data.starts_with(m)))
}

/// The name to keep: the last path component of what the client sent, without control or
/// invisible formatting characters (a right-to-left override shows `invtxt.exe` as
/// `invexe.txt`), at most [`MAX_NAME_CHARS`]; `file` when nothing (or only dots) is left. A name
/// whose extension does not belong to the checked type gets the type's (`run.hta` sent as
/// `text/plain` is kept as `run.hta.txt`), so a saved download opens as what was checked.
fn file_name(given: Option<&str>, content_type: &str) -> String {
    let base = given
        .unwrap_or_default()
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default();
    let name: String = base
        .chars()
        .filter(|c| !c.is_control() && !invisible(*c))
        .collect();
    let name = match name.trim() {
        n if n.chars().all(|c| c == '.') => "file",
        n => n,
    };
    let Some(&(_, extensions)) = EXTENSIONS.iter().find(|(t, _)| *t == content_type) else {
        return name.chars().take(MAX_NAME_CHARS).collect();
    };
    let (stem, suffix) = match name.rsplit_once('.') {
        Some((stem, ext)) if extensions.iter().any(|e| e.eq_ignore_ascii_case(ext)) => {
            (stem, format!(".{ext}"))
        }
        _ => (name, format!(".{}", extensions[0])),
    };
    // Cut the stem, not the whole name: a long name keeps the type's extension, its own
    // included (cut whole, `x…x.png` would lose it and be saved as no type at all).
    let room = MAX_NAME_CHARS - suffix.chars().count();
    let stem: String = stem.chars().take(room).collect();
    stem + &suffix
}

/// The extensions of the types nexus knows, the usual one first; a type not listed keeps the
/// client's name as sent.
const EXTENSIONS: [(&str, &[&str]); 7] = [
    ("image/png", &["png"]),
    ("image/jpeg", &["jpg", "jpeg", "jpe", "jfif"]),
    ("image/gif", &["gif"]),
    ("image/webp", &["webp"]),
    ("application/pdf", &["pdf"]),
    ("text/plain", &["txt", "text", "log"]),
    ("text/csv", &["csv"]),
];

/// Unicode format characters that change how a name is shown without showing themselves:
/// bidirectional overrides and isolates, zero-width characters, the soft hyphen, the BOM, the
/// deprecated shaping controls, interlinear annotations, shorthand and musical format
/// controls; and the characters drawn as blank space (the Hangul fillers, the combining
/// grapheme joiner, the Khmer inherent vowels).
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{ad}' | '\u{34f}' | '\u{61c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}'
        | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}'
        | '\u{feff}' | '\u{ffa0}' | '\u{fff9}'..='\u{fffb}' | '\u{1bca0}'..='\u{1bca3}'
        | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e007f}')
}

/// `attachment` with an ASCII fallback name and the exact name as RFC 5987 `filename*`.
fn disposition(name: &str) -> HeaderValue {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// The download answer: the bytes with their type, as an attachment the browser does not sniff.
pub(crate) fn file_response(f: ChatFile) -> Response {
    let content_type = HeaderValue::from_str(&f.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    (
        [
            (CONTENT_TYPE, content_type),
            (CONTENT_DISPOSITION, disposition(&f.name)),
            (CONTENT_LENGTH, HeaderValue::from(f.data.len())),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (CACHE_CONTROL, HeaderValue::from_static("private, no-store")),
        ],
        f.data,
    )
        .into_response()
}

/// What the multipart body carried.
pub(crate) struct Upload {
    name: String,
    content_type: String,
    data: Vec<u8>,
    pub message_id: Option<String>,
}

/// Reads the parts: exactly one `file` (checked for type and size while it streams in) and an
/// optional `message_id`; anything else is refused.
async fn read_upload(state: &AppState, mut multipart: Multipart) -> Result<Upload, ApiError> {
    let chat = &state.config.chat;
    let max = chat.max_file_bytes;
    let mut file = None;
    let mut message_id = None;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| read_error(e, max))?
    {
        match field.name() {
            Some("file") if file.is_none() => {
                let content_type = declared_type(field.headers());
                if !chat
                    .file_types
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(&content_type))
                {
                    return Err(invalid_type(format!(
                        "files of type `{content_type}` are not accepted; allowed: {}",
                        chat.file_types.join(", ")
                    )));
                }
                let name = file_name(field.file_name(), &content_type);
                let mut data = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|e| read_error(e, max))? {
                    if data.len() + chunk.len() > max {
                        return Err(too_large(max));
                    }
                    data.extend_from_slice(&chunk);
                }
                file = Some((name, content_type, data));
            }
            Some("file") => {
                return Err(ApiError::bad_request(
                    "INVALID_BODY",
                    "send one `file` part per request",
                ))
            }
            Some("message_id") if message_id.is_none() => {
                message_id = Some(field.text().await.map_err(|e| read_error(e, max))?);
            }
            _ => {
                return Err(ApiError::bad_request(
                    "INVALID_BODY",
                    "the parts are `file` and an optional `message_id`",
                ))
            }
        }
    }
    let Some((name, content_type, data)) = file else {
        return Err(ApiError::bad_request(
            "INVALID_BODY",
            "send the file in a multipart part named `file`",
        ));
    };
    if data.is_empty() {
        return Err(ApiError::bad_request("INVALID_FIELD", "the file is empty"));
    }
    if mismatch(&content_type, &data) {
        return Err(invalid_type(format!(
            "the file's content is not `{content_type}`"
        )));
    }
    check_message_id(message_id.as_deref())?;
    Ok(Upload {
        name,
        content_type,
        data,
        message_id,
    })
}

/// Refuses an upload when the conversation already holds its files.
async fn ensure_room(state: &AppState, tenant: &str, conversation: &str) -> Result<(), ApiError> {
    let max = state.config.chat.max_files_per_session;
    if state.provisioning.count_files(tenant, conversation).await? >= max {
        return Err(too_many(max));
    }
    Ok(())
}

/// The file a twin of this upload (same `message_id`, sent at the same time) stored after
/// this one looked for it: the session is full with it, and the client's retry must not be
/// told the upload failed while its file went out.
async fn stored_by_twin(
    state: &AppState,
    tenant: &str,
    conversation: &str,
    stable: Option<&str>,
) -> Result<Option<ChatFile>, ApiError> {
    let Some(id) = stable else {
        return Ok(None);
    };
    match state.provisioning.file(tenant, conversation, id).await {
        Ok(file) => Ok(Some(file)),
        Err(ProvisioningError::NotFound(_) | ProvisioningError::Expired(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The id a file uploaded under a client's `message_id` keeps on every retry; `sender` names
/// whose ids they are (a customer's and an agent's may be equal).
pub(crate) fn stable_file_id(tenant: &str, conversation: &str, sender: &str, m: &str) -> String {
    let name = format!("{tenant}/{conversation}/{sender}file/{m}");
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

pub async fn upload(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    let multipart = multipart.map_err(rejection)?;
    ensure_open(&state, &c).await?;
    let (_permit, upload) = receive(&state, multipart).await?;
    // Again once the body is in: a slow upload can outlast the chat, whose closed transcript
    // would drop its message while the file took a place.
    ensure_open(&state, &c).await?;
    let stable = upload
        .message_id
        .as_deref()
        .map(|m| stable_file_id(&c.tid, &c.sid, "", m));
    let message_id = upload.message_id.clone();
    let file = store(&state, &c.tid, &c.sid, stable, upload).await?;
    let published = publish_customer_message(
        &state,
        &c,
        file.name.clone(),
        MessageKind::Text,
        message_id.clone(),
        vec![file.id.clone()],
        traceparent(&headers),
    );
    let url = format!("/nexus/v3/chat/sessions/{}/files/{}", c.sid, file.id);
    let message_id = published_or_released(
        &state,
        &c.tid,
        &c.sid,
        &file,
        message_id.is_some(),
        published,
    )
    .await?;
    Ok(uploaded(&file, url, message_id))
}

/// Takes a place among the uploads in flight (503 `UPLOADS_BUSY` after a wait), then reads the
/// body within its time (408 `UPLOAD_TIMEOUT`). The place is held until the file is stored:
/// its bytes are in memory until then.
pub(crate) async fn receive(
    state: &AppState,
    multipart: Multipart,
) -> Result<(OwnedSemaphorePermit, Upload), ApiError> {
    let permit = tokio::time::timeout(UPLOAD_PERMIT_WAIT, state.uploads.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UPLOADS_BUSY",
                "too many uploads at once; retry shortly",
            )
        })?;
    let upload = tokio::time::timeout(UPLOAD_READ_TIMEOUT, read_upload(state, multipart))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "UPLOAD_TIMEOUT",
                format!(
                    "the upload took longer than {} s",
                    UPLOAD_READ_TIMEOUT.as_secs()
                ),
            )
        })??;
    Ok((permit, upload))
}

/// Stores an upload into the conversation's files, or finds it stored: a retried upload (same
/// `message_id`, so the same `stable` id) is the same file, stored once, and its message is
/// published again (the worker appends a message id once), since the first try may have stored
/// it and then failed, or died, before its publish was acknowledged.
pub(crate) async fn store(
    state: &AppState,
    tenant: &str,
    conversation: &str,
    stable: Option<String>,
    upload: Upload,
) -> Result<ChatFile, ApiError> {
    let max = state.config.chat.max_files_per_session;
    if let Some(id) = &stable {
        match state.provisioning.file(tenant, conversation, id).await {
            Ok(file) => return Ok(file),
            Err(ProvisioningError::NotFound(_)) => {}
            // Past retention (swept or not; the sweeper keeps the row): the transcript names
            // this id for the first upload's bytes, which are gone. Storing new bytes under it
            // would put them behind that old entry; the client sends the file again under a
            // new `message_id`.
            Err(ProvisioningError::Expired(_)) => {
                return Err(ApiError::new(
                    StatusCode::GONE,
                    "FILE_EXPIRED",
                    "this upload's file expired; send it again under a new message_id",
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Err(full) = ensure_room(state, tenant, conversation).await {
        return match stored_by_twin(state, tenant, conversation, stable.as_deref()).await? {
            Some(file) => Ok(file),
            None => Err(full),
        };
    }
    let new = NewChatFile {
        id: stable.clone(),
        tenant_id: tenant.to_string(),
        conversation_id: conversation.to_string(),
        name: upload.name,
        content_type: upload.content_type,
        data: upload.data,
        expires_at_ms: Some(expires_at_ms(state.config.file_retention_s(), now_ms())),
    };
    match state.provisioning.put_file(new, max).await {
        Ok(Some(file)) => Ok(file),
        Ok(None) => match stored_by_twin(state, tenant, conversation, stable.as_deref()).await? {
            Some(file) => Ok(file),
            None => Err(too_many(max)),
        },
        // The same upload, retried at once, stored it first.
        Err(ProvisioningError::Conflict(detail)) => {
            match stored_by_twin(state, tenant, conversation, stable.as_deref()).await? {
                Some(file) => Ok(file),
                None => Err(ProvisioningError::Conflict(detail).into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Awaits the publish of a stored upload's message. Without a client message id (`retriable`)
/// nobody can retry into the file, so a publish refused for certain (4xx: the event cannot be
/// encoded or is too large for the bus) gives its place back; with one the file stays for the
/// retry (a retry racing this one may already have published it). A bus failure (5xx) may come
/// after the broker stored the event (a timeout), so the file stays too: the transcript may
/// name it. Its place is taken until the file's retention ends.
pub(crate) async fn published_or_released(
    state: &AppState,
    tenant: &str,
    conversation: &str,
    file: &ChatFile,
    retriable: bool,
    publish: impl std::future::Future<Output = Result<String, ApiError>>,
) -> Result<String, ApiError> {
    let e = match publish.await {
        Ok(message_id) => return Ok(message_id),
        Err(e) => e,
    };
    if !retriable && !e.status.is_server_error() {
        if let Err(d) = state
            .provisioning
            .delete_file(tenant, conversation, &file.id)
            .await
        {
            tracing::warn!(file_id = %file.id, error = %d, "unpublished upload not deleted");
        }
    }
    Err(e)
}

/// The answer to an upload; `url` is where its uploader downloads it.
pub(crate) fn uploaded(
    file: &ChatFile,
    url: String,
    message_id: String,
) -> (StatusCode, Json<Value>) {
    (
        StatusCode::CREATED,
        Json(json!({
            "file_id": file.id,
            "name": file.name,
            "content_type": file.content_type,
            "size": file.size,
            "url": url,
            "message_id": message_id,
        })),
    )
}

pub async fn download(
    State(state): State<AppState>,
    Path((id, file_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    let file = stored_file(&state, &c.tid, &c.sid, &file_id).await?;
    Ok(file_response(file))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// When a file uploaded at `now_ms` expires.
fn expires_at_ms(retention_s: u64, now_ms: i64) -> i64 {
    let retention_ms = i64::try_from(retention_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    now_ms.saturating_add(retention_ms)
}

/// A file to download (customer or agent): 410 `FILE_EXPIRED` past its expiry, and still after
/// the sweeper emptied it (its row stays while a transcript may name it); an id of no file
/// that is older than the retention (a UUID v7 carries its time) answers the same, so a probe
/// through another session learns nothing.
pub(crate) async fn stored_file(
    state: &AppState,
    tenant: &str,
    conversation: &str,
    file_id: &str,
) -> Result<ChatFile, ApiError> {
    let retention_s = state.config.file_retention_s();
    match state.provisioning.file(tenant, conversation, file_id).await {
        Err(ProvisioningError::NotFound(Object::File))
            if id_expired(file_id, retention_s, now_ms()) =>
        {
            Err(ProvisioningError::Expired(Object::File).into())
        }
        found => Ok(found?),
    }
}

/// Whether a file with this id, uploaded at the time its UUID v7 carries, is past retention.
fn id_expired(file_id: &str, retention_s: u64, now_ms: i64) -> bool {
    let Some(uploaded) = uuid::Uuid::parse_str(file_id)
        .ok()
        .filter(|u| u.get_version_num() == 7)
        .and_then(|u| u.get_timestamp())
    else {
        return false;
    };
    let (secs, nanos) = uploaded.to_unix();
    let uploaded_ms = i64::try_from(secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000)
        .saturating_add(i64::from(nanos / 1_000_000));
    expires_at_ms(retention_s, uploaded_ms) <= now_ms
}

/// Files emptied or forgotten per statement: bounds each statement's locks and work; a sweep
/// repeats until a batch comes back short.
const SWEEP_BATCH: usize = 500;

/// Empties expired files (and forgets old tombstones) every `chat.file_sweep_interval_ms`
/// until `stop`. Every edge pod runs it; the statements are idempotent, so pods sweeping at once
/// empty each file once.
pub async fn sweep(state: AppState, stop: CancellationToken) {
    let every = Duration::from_millis(state.config.chat.file_sweep_interval_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        sweep_once(&state, &stop)
            .instrument(info_span!("chat_file_sweep"))
            .await;
    }
}

/// One sweep, batch by batch until done or `stop` (a backlog of expired files must not hold a
/// stopping edge past its grace; the next pod's sweep goes on).
async fn sweep_once(state: &AppState, stop: &CancellationToken) {
    let now = now_ms();
    // A transcript names a file until `closed_retention_s` after its chat closed, which comes
    // after the file expired: a live chat closes within 30 days of its last activity (async:
    // idle + grace, kept under that), so its tombstone is kept that much past the expiry. (A
    // chat its customer keeps active longer than that outlives it: see README.)
    let keep_s = state
        .config
        .workers
        .conversation
        .closed_retention_s
        .saturating_add(crate::workers::history::DONE_RETENTION.as_secs());
    let keep_ms = i64::try_from(keep_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let p = &state.provisioning;
    let (swept, forgotten) = (
        in_batches(stop, || p.sweep_files(now, SWEEP_BATCH)).await,
        in_batches(stop, || {
            p.forget_swept_files(now.saturating_sub(keep_ms), SWEEP_BATCH)
        })
        .await,
    );
    metrics::counter!(m::CHAT_FILES_EXPIRED_TOTAL).increment(swept.0);
    for ((n, outcome), what) in [(swept, "emptied"), (forgotten, "forgotten")] {
        match outcome {
            Ok(()) if n > 0 => tracing::info!(files = n, what, "expired chat files swept"),
            Ok(()) => {}
            // Retried on the next tick; what is expired stays refused meanwhile.
            Err(e) => {
                tracing::warn!(files = n, what, error = %e, "chat file sweep failed; retried")
            }
        }
    }
}

/// Runs `step` (one statement of up to [`SWEEP_BATCH`] rows) until a batch comes back short or
/// `stop`; the rows it took in all, and how it ended.
async fn in_batches<F, Fut>(
    stop: &CancellationToken,
    mut step: F,
) -> (u64, Result<(), ProvisioningError>)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, ProvisioningError>>,
{
    let mut total = 0;
    loop {
        if stop.is_cancelled() {
            return (total, Ok(()));
        }
        match step().await {
            Ok(n) => {
                total += n;
                if n < SWEEP_BATCH as u64 {
                    return (total, Ok(()));
                }
            }
            Err(e) => return (total, Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep of a large backlog stops between two batches once the process stops (the
    /// next pod's sweep goes on), instead of running statement after statement past the
    /// pod's grace.
    #[tokio::test]
    async fn a_sweep_stops_between_batches() {
        let stop = CancellationToken::new();
        let steps = std::sync::atomic::AtomicUsize::new(0);
        let swept = tokio::time::timeout(
            Duration::from_secs(5),
            in_batches(&stop, || {
                let n = steps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n == 0 {
                    stop.cancel();
                }
                // Full batches for ever: only the stop ends it.
                async { Ok(SWEEP_BATCH as u64) }
            }),
        )
        .await
        .expect("the sweep stopped");
        assert!(matches!(swept, (500, Ok(()))), "{swept:?}");
        assert_eq!(steps.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn names_keep_the_last_component_without_controls() {
        let name = |given: Option<&str>| file_name(given, "application/octet-stream");
        assert_eq!(name(Some("../../etc/passwd")), "passwd");
        assert_eq!(name(Some("C:\\Users\\a\\report.pdf")), "report.pdf");
        assert_eq!(name(Some("a\r\nb.txt")), "ab.txt");
        assert_eq!(name(Some("  ")), "file");
        assert_eq!(name(Some("..")), "file");
        assert_eq!(name(None), "file");
        assert_eq!(name(Some(&"x".repeat(300))).len(), MAX_NAME_CHARS);
        // A right-to-left override would show `inv\u{202e}txt.exe` as `invexe.txt`.
        assert_eq!(name(Some("inv\u{202e}txt.exe")), "invtxt.exe");
        assert_eq!(name(Some("a\u{200b}b\u{feff}.txt")), "ab.txt");
    }

    #[test]
    fn names_carry_the_checked_types_extension() {
        assert_eq!(file_name(Some("notes.TXT"), "text/plain"), "notes.TXT");
        assert_eq!(file_name(Some("server.log"), "text/plain"), "server.log");
        assert_eq!(file_name(Some("run.hta"), "text/plain"), "run.hta.txt");
        assert_eq!(file_name(Some("page.html"), "text/plain"), "page.html.txt");
        assert_eq!(file_name(Some("photo.jpeg"), "image/jpeg"), "photo.jpeg");
        assert_eq!(file_name(Some("photo"), "image/png"), "photo.png");
        assert_eq!(file_name(None, "application/pdf"), "file.pdf");
        let long = file_name(Some(&format!("{}.exe", "x".repeat(300))), "image/gif");
        assert_eq!(long.chars().count(), MAX_NAME_CHARS);
        assert!(long.ends_with("xxx.gif"), "{long}");
        // A long name with the type's own extension keeps it (as sent).
        let own = file_name(Some(&format!("{}.JPEG", "é".repeat(300))), "image/jpeg");
        assert_eq!(own.chars().count(), MAX_NAME_CHARS);
        assert!(own.ends_with("ééé.JPEG"), "{own}");
        assert_eq!(file_name(Some(".png"), "image/png"), ".png");
    }

    #[test]
    fn signatures_must_match_the_declared_type() {
        assert!(!mismatch("image/png", b"\x89PNG\r\n\x1a\nrest"));
        assert!(mismatch("image/png", b"GIF89a..."));
        assert!(!mismatch("image/gif", b"GIF87a"));
        assert!(mismatch("application/pdf", b"hello"));
        assert!(!mismatch("text/plain", b"hello"));
        assert!(mismatch("text/plain", b"%PDF-1.7"));
        assert!(mismatch("text/plain", b"a\0b"));
        assert!(!mismatch("application/zip", b"PK"));
        assert_eq!(essence("Image/PNG; charset=x"), "image/png");
        let declared = |raw: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_bytes(raw).expect("header"));
            declared_type(&h)
        };
        assert_eq!(declared(b"Text/Plain; x"), "text/plain");
        assert_eq!(declared(b"text/plain; name=\"\xc3\xa9.txt\""), "text/plain");
        assert_eq!(declared(b"image/png;;"), "image/png");
        assert_eq!(declared_type(&HeaderMap::new()), "");
    }

    #[test]
    fn a_file_id_tells_whether_its_retention_passed() {
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        assert!(!id_expired(&id, 60, now));
        assert!(!id_expired(&id, 60, now + 58_000));
        assert!(id_expired(&id, 60, now + 61_000));
        // Only our UUID v7 ids carry a time.
        assert!(!id_expired(&uuid::Uuid::new_v4().to_string(), 60, i64::MAX));
        assert!(!id_expired("nope", 60, i64::MAX));
        assert_eq!(expires_at_ms(60, 1_000), 61_000);
        assert_eq!(expires_at_ms(u64::MAX, 1_000), i64::MAX);
    }

    #[test]
    fn disposition_is_an_attachment_with_both_names() {
        let v = disposition("résumé \"1\".pdf");
        assert_eq!(
            v.to_str().expect("ascii"),
            "attachment; filename=\"r_sum_ _1_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.pdf"
        );
    }
}
