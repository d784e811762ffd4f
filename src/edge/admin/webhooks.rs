//! `/v1/admin/tenants/{tenant}/webhooks`: a tenant's webhook subscriptions and their delivery
//! log. The secret is answered at creation and rotation (`POST .../{id}/secret`) only. Targets
//! in private ranges are refused (`WEBHOOK_TARGET_PRIVATE`) unless the deployment allows them.
//! Under each subscription: messages (filter by status), one message with its attempts,
//! resend, replay of failed/dead messages since a time; per tenant, recovery of what the
//! dead-letter topic holds.

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::Body;
use crate::edge::{ApiError, AppState};
use crate::events::webhook::{WebhookMessageDead, WEBHOOK_DEAD_TOPIC};
use crate::stores::provisioning::{
    CreatedWebhook, NewWebhook, Object, Page, PageRequest, ProvisioningError, SecretRotation,
    Webhook, WebhookEvent, WebhookPatch, WebhookSecret,
};
use crate::workers::webhooks::store::{
    MessageDetail, MessageStore, MessageView, NewMessage, StoreError,
};

/// Records read from the dead-letter topic per bus call.
const DLQ_READ_BATCH: usize = 500;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::BadStatus | StoreError::BadCursor => {
                ApiError::bad_request("INVALID_FIELD", e.to_string())
            }
            StoreError::Unavailable(_) | StoreError::Batched(_) => {
                ApiError::unavailable(e.to_string())
            }
        }
    }
}

fn store(state: &AppState) -> MessageStore {
    MessageStore::new(state.provisioning.pool().clone(), state.provisioning.kind())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Refuses a URL the store would refuse, or in an internal range unless
/// `workers.webhooks.allow_private_targets`.
async fn check_target(state: &AppState, url: &str) -> Result<(), ApiError> {
    let allow = state.config.workers.webhooks.allow_private_targets;
    super::check_target(url, allow, "WEBHOOK_TARGET_PRIVATE", "").await
}

pub async fn create(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Body(new): Body<NewWebhook>,
) -> Result<(StatusCode, Json<CreatedWebhook>), ApiError> {
    state.provisioning.tenant(&tenant).await?;
    check_target(&state, &new.url).await?;
    let created = state.provisioning.create_webhook(&tenant, new).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    listing: super::Listing,
) -> Result<Json<Page<Webhook>>, ApiError> {
    let page = listing.page()?;
    Ok(Json(
        state.provisioning.list_webhooks(&tenant, &page).await?,
    ))
}

pub async fn get(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<Webhook>, ApiError> {
    Ok(Json(state.provisioning.webhook(&tenant, &id).await?))
}

pub async fn update(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    Body(patch): Body<WebhookPatch>,
) -> Result<Json<Webhook>, ApiError> {
    state.provisioning.webhook(&tenant, &id).await?;
    if let Some(url) = &patch.url {
        check_target(&state, url).await?;
    }
    Ok(Json(
        state
            .provisioning
            .update_webhook(&tenant, &id, patch)
            .await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.provisioning.delete_webhook(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new secret (given or generated); the previous one keeps signing for the overlap.
pub async fn rotate_secret(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<WebhookSecret>, ApiError> {
    // The body is optional: none (or `{}`) generates the new secret. Its errors take the shape
    // and codes of every other body (too large: 413, malformed: INVALID_JSON).
    let body = body?;
    let rotation: SecretRotation = if body.iter().all(u8::is_ascii_whitespace) {
        SecretRotation::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| crate::edge::chat::body_error(&e))?
    };
    let overlap =
        i64::try_from(state.config.workers.webhooks.secret_overlap_ms).unwrap_or(i64::MAX);
    Ok(Json(
        state
            .provisioning
            .rotate_webhook_secret(&tenant, &id, rotation, overlap)
            .await?,
    ))
}

/// `?status=&limit=&after=` of the message list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageParams {
    status: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

pub struct MessageListing(MessageParams);

impl<S: Send + Sync> FromRequestParts<S> for MessageListing {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(params) = Query::<MessageParams>::from_request_parts(parts, state).await?;
        Ok(Self(params))
    }
}

pub async fn list_messages(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    MessageListing(params): MessageListing,
) -> Result<Json<Page<MessageView>>, ApiError> {
    let page = PageRequest::new(params.limit, params.after.as_deref())?;
    state.provisioning.webhook(&tenant, &id).await?;
    Ok(Json(
        store(&state)
            .list(&tenant, &id, params.status.as_deref(), &page)
            .await?,
    ))
}

pub async fn get_message(
    State(state): State<AppState>,
    Path((tenant, id, message)): Path<(String, String, String)>,
) -> Result<Json<MessageDetail>, ApiError> {
    state.provisioning.webhook(&tenant, &id).await?;
    store(&state)
        .get(&tenant, &id, &message)
        .await?
        .map(Json)
        .ok_or_else(|| ProvisioningError::NotFound(Object::WebhookMessage).into())
}

#[derive(Debug, Serialize)]
pub struct Queued {
    pub queued: u64,
}

/// Queues one message again (any status) for a fresh round of the schedule.
pub async fn resend(
    State(state): State<AppState>,
    Path((tenant, id, message)): Path<(String, String, String)>,
) -> Result<(StatusCode, Json<Queued>), ApiError> {
    state.provisioning.webhook(&tenant, &id).await?;
    if !store(&state)
        .resend(&tenant, &id, &message, now_ms())
        .await?
    {
        return Err(ProvisioningError::NotFound(Object::WebhookMessage).into());
    }
    Ok((StatusCode::ACCEPTED, Json(Queued { queued: 1 })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaySince {
    /// Unix milliseconds: messages created at or after this.
    pub since_ms: i64,
}

/// Queues again every failed or dead message of the subscription since a time.
pub async fn replay(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    Body(since): Body<ReplaySince>,
) -> Result<(StatusCode, Json<Queued>), ApiError> {
    state.provisioning.webhook(&tenant, &id).await?;
    let queued = store(&state)
        .replay_since(&tenant, &id, since.since_ms, now_ms())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Queued { queued })))
}

#[derive(Debug, Serialize)]
pub struct Recovered {
    /// Dead-letter records of this tenant read.
    pub read: u64,
    /// Messages queued again (a record applies once: while its message is still dead after
    /// the attempts it records, or when the log lost the message).
    pub queued: u64,
}

/// Reads the whole webhook dead-letter topic and queues again this tenant's messages.
pub async fn recover_dead_letters(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
) -> Result<(StatusCode, Json<Recovered>), ApiError> {
    state.provisioning.tenant(&tenant).await?;
    let bus = state.bus.clone();
    let unavailable = |e: crate::bus::BusError| ApiError::unavailable(e.to_string());
    let store = store(&state);
    let mut out = Recovered { read: 0, queued: 0 };
    for p in bus
        .partition_offsets(WEBHOOK_DEAD_TOPIC)
        .await
        .map_err(unavailable)?
    {
        let mut from = p.low;
        while from < p.high {
            let batch = bus
                .read(WEBHOOK_DEAD_TOPIC, p.partition, from, DLQ_READ_BATCH)
                .await
                .map_err(unavailable)?;
            let Some(last) = batch.last() else { break };
            from = last.offset + 1;
            for record in batch {
                let Ok(event) = crate::events::decode(&record.payload) else {
                    continue;
                };
                if event.envelope.tenant_id != tenant {
                    continue;
                }
                let Ok(dead) = event.body_as::<WebhookMessageDead>() else {
                    continue;
                };
                out.read += 1;
                // A record of a subscription deleted since has nothing to go to; a database
                // that does not answer fails the call (a skipped record would not be retried:
                // a second run is expected to queue nothing).
                match state.provisioning.webhook(&tenant, &dead.webhook_id).await {
                    Ok(_) => {}
                    Err(ProvisioningError::NotFound(_)) => continue,
                    Err(e) => return Err(e.into()),
                }
                let kind = match dead.event.as_str() {
                    "FINISHED" => WebhookEvent::Finished,
                    _ => WebhookEvent::Started,
                };
                let message = NewMessage {
                    id: dead.message_id.clone(),
                    tenant_id: tenant.clone(),
                    webhook_id: dead.webhook_id.clone(),
                    event_id: dead.source_event_id.clone(),
                    conversation_id: event.envelope.conversation_id.clone(),
                    event: kind,
                    body: dead.body.clone(),
                };
                if store
                    .requeue_dead(&message, dead.attempts, now_ms())
                    .await?
                {
                    out.queued += 1;
                }
            }
        }
    }
    Ok((StatusCode::ACCEPTED, Json(out)))
}
