//! Webhook subscriptions of a tenant: URL, event and media filters, body format and the signing
//! secret (encrypted at rest, answered only at creation and rotation; the previous secret keeps
//! signing for an overlap after a rotation). The delivery log lives with the worker.

use std::fmt;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use super::models::{self, invalid, Page, PageRequest};
use super::sql::{self, get, get_json, Keyed, Set};
use super::{Object, Provisioning, ProvisioningError};

/// Prefix of Standard Webhooks secrets.
pub const STANDARD_SECRET_PREFIX: &str = "whsec_";
/// Random bytes of a generated secret (Standard Webhooks asks for 24 to 64).
const SECRET_BYTES: usize = 32;
/// Bounds of a given secret's key material, in bytes.
const MIN_SECRET_BYTES: usize = 24;
const MAX_SECRET_BYTES: usize = 64;
/// Bounds of a given genesys secret, in characters.
const MIN_GENESYS_SECRET: usize = 16;
const MAX_GENESYS_SECRET: usize = 256;

const SELECT: &str = "SELECT id, tenant_id, url, events, media, format, enabled, disabled_reason, created_at_ms FROM webhooks";

/// What a subscriber is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WebhookEvent {
    Started,
    Finished,
}

impl WebhookEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Started => "STARTED",
            WebhookEvent::Finished => "FINISHED",
        }
    }
}

/// The media types an interaction can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookMedia {
    Chat,
    Email,
}

impl WebhookMedia {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookMedia::Chat => "chat",
            WebhookMedia::Email => "email",
        }
    }
}

/// How bodies are signed: the seed's `X-Hub-Signature`, or Standard Webhooks headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    Genesys,
    Standard,
}

impl WebhookFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Genesys => "genesys",
            WebhookFormat::Standard => "standard",
        }
    }

    fn parse(text: &str) -> Result<Self, ProvisioningError> {
        match text {
            "genesys" => Ok(WebhookFormat::Genesys),
            "standard" => Ok(WebhookFormat::Standard),
            other => Err(ProvisioningError::Unavailable(format!(
                "webhooks.format holds `{other}`"
            ))),
        }
    }
}

/// A subscription, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub tenant_id: String,
    /// Whole, as the worker calls it; answered as [`models::shown_endpoint_url`] shows it.
    #[serde(serialize_with = "models::serialize_endpoint_url")]
    pub url: String,
    pub events: Vec<WebhookEvent>,
    pub media: Vec<WebhookMedia>,
    pub format: WebhookFormat,
    pub enabled: bool,
    /// Why the worker disabled it (`failing_since ...`), until it is enabled again.
    pub disabled_reason: Option<String>,
    pub created_at_ms: i64,
}

impl Webhook {
    pub fn wants(&self, event: WebhookEvent, media: WebhookMedia) -> bool {
        self.enabled && self.events.contains(&event) && self.media.contains(&media)
    }
}

/// A subscription as answered at creation: the only time `secret` is shown.
#[derive(Clone, Serialize)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    pub webhook: Webhook,
    pub secret: String,
}

/// A rotated secret, shown once; the previous one signs too until `previous_valid_until_ms`.
#[derive(Clone, Serialize)]
pub struct WebhookSecret {
    pub webhook_id: String,
    pub secret: String,
    pub previous_valid_until_ms: i64,
}

// The secrets are shown once, in the answer: never in a log line.
super::models::debug_without_secret!(CreatedWebhook { webhook } hides secret);
super::models::debug_without_secret!(WebhookSecret { webhook_id, previous_valid_until_ms } hides secret);

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    pub url: String,
    /// Default: every event.
    pub events: Option<Vec<WebhookEvent>>,
    /// Default: every media type.
    pub media: Option<Vec<WebhookMedia>>,
    pub format: WebhookFormat,
    /// Default: true.
    pub enabled: Option<bool>,
    /// Default: generated.
    pub secret: Option<String>,
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookPatch {
    pub url: Option<String>,
    pub events: Option<Vec<WebhookEvent>>,
    pub media: Option<Vec<WebhookMedia>>,
    /// `true` also clears the failure clock of a disabled endpoint.
    pub enabled: Option<bool>,
}

/// `POST .../secret`: a given new secret, or none to generate one.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRotation {
    pub secret: Option<String>,
}

// Secrets must never reach a log line through `{:?}`.
impl fmt::Debug for NewWebhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewWebhook")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("media", &self.media)
            .field("format", &self.format)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Debug for SecretRotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretRotation").finish_non_exhaustive()
    }
}

/// The secrets that sign a subscription's messages now: the current one, and the previous one
/// while its overlap lasts. Only the webhooks worker asks for them.
#[derive(Clone)]
pub struct SigningSecrets {
    pub current: String,
    /// Earlier secrets whose overlap has not ended, newest first.
    pub previous: Vec<String>,
}

/// A secret replaced by a rotation, still signing until `until_ms` (`older_secrets`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Retired {
    /// Sealed like the current secret.
    secret: String,
    until_ms: i64,
}

/// Most retired secrets kept signing at once: rotations in a burst past this drop the one
/// ending first (each signature is a header entry and an HMAC per delivery).
const MAX_RETIRED: usize = 8;

impl fmt::Debug for SigningSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecrets(<redacted>)")
    }
}

/// A subscription with what the worker needs to send to it.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    pub webhook: Webhook,
    pub secrets: SigningSecrets,
}

impl Keyed for Webhook {
    fn key(&self) -> &str {
        &self.id
    }
}

fn from_row(row: &AnyRow) -> Result<Webhook, ProvisioningError> {
    let enabled: i64 = get(row, "enabled")?;
    let format: String = get(row, "format")?;
    Ok(Webhook {
        id: get(row, "id")?,
        tenant_id: get(row, "tenant_id")?,
        url: get(row, "url")?,
        events: get_json(row, "events")?,
        media: get_json(row, "media")?,
        format: WebhookFormat::parse(&format)?,
        enabled: enabled != 0,
        disabled_reason: get(row, "disabled_reason")?,
        created_at_ms: get(row, "created_at_ms")?,
    })
}

/// Binds a ciphertext to its row, so a secret copied to another webhook does not decrypt.
fn aad(tenant_id: &str, webhook_id: &str) -> String {
    format!("nexus/webhook/{tenant_id}/{webhook_id}")
}

/// A new secret in the format's shape.
pub fn generate_secret(format: WebhookFormat) -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    match format {
        WebhookFormat::Standard => format!("{STANDARD_SECRET_PREFIX}{}", STANDARD.encode(bytes)),
        WebhookFormat::Genesys => URL_SAFE_NO_PAD.encode(bytes),
    }
}

/// The HMAC key of a secret: the decoded bytes after `whsec_` (Standard Webhooks), else the
/// secret's own bytes.
pub fn secret_key(format: WebhookFormat, secret: &str) -> Option<Vec<u8>> {
    match format {
        WebhookFormat::Standard => STANDARD
            .decode(secret.strip_prefix(STANDARD_SECRET_PREFIX)?)
            .ok(),
        WebhookFormat::Genesys => Some(secret.as_bytes().to_vec()),
    }
}

/// A given secret, checked against its format; or a generated one.
fn secret(format: WebhookFormat, given: Option<&str>) -> Result<String, ProvisioningError> {
    let Some(given) = given else {
        return Ok(generate_secret(format));
    };
    match format {
        WebhookFormat::Standard => {
            let bytes = secret_key(format, given).ok_or_else(|| {
                invalid("secret", "must be `whsec_` followed by base64 of the key")
            })?;
            if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&bytes.len()) {
                return Err(invalid(
                    "secret",
                    format!("must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes of key"),
                ));
            }
        }
        WebhookFormat::Genesys => {
            let n = given.chars().count();
            if !(MIN_GENESYS_SECRET..=MAX_GENESYS_SECRET).contains(&n)
                || given.chars().any(char::is_control)
            {
                return Err(invalid(
                    "secret",
                    format!(
                        "must be {MIN_GENESYS_SECRET} to {MAX_GENESYS_SECRET} printable characters"
                    ),
                ));
            }
        }
    }
    Ok(given.to_string())
}

fn filter<T: Ord + Copy>(field: &'static str, values: &[T]) -> Result<Vec<T>, ProvisioningError> {
    let mut v = values.to_vec();
    v.sort();
    v.dedup();
    if v.is_empty() {
        return Err(invalid(field, "must name at least one value"));
    }
    Ok(v)
}

fn no_conflict() -> String {
    "conflict".to_string()
}

impl Provisioning {
    /// Creates a subscription; the answer holds its secret, never available again.
    pub async fn create_webhook(
        &self,
        tenant_id: &str,
        new: NewWebhook,
    ) -> Result<CreatedWebhook, ProvisioningError> {
        let webhook = Webhook {
            id: sql::new_id(),
            tenant_id: self.tenant(tenant_id).await?.id,
            url: models::url(&new.url)?,
            events: filter(
                "events",
                new.events
                    .as_deref()
                    .unwrap_or(&[WebhookEvent::Started, WebhookEvent::Finished]),
            )?,
            media: filter(
                "media",
                new.media
                    .as_deref()
                    .unwrap_or(&[WebhookMedia::Chat, WebhookMedia::Email]),
            )?,
            format: new.format,
            enabled: new.enabled.unwrap_or(true),
            disabled_reason: None,
            created_at_ms: sql::now_ms(),
        };
        let secret = secret(new.format, new.secret.as_deref())?;
        let sealed = self
            .cipher
            .encrypt(&secret, &aad(&webhook.tenant_id, &webhook.id));
        sqlx::query(
            "INSERT INTO webhooks (id, tenant_id, url, events, media, format, enabled, secret, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(webhook.id.clone())
        .bind(webhook.tenant_id.clone())
        .bind(webhook.url.clone())
        .bind(sql::to_json(&webhook.events))
        .bind(sql::to_json(&webhook.media))
        .bind(webhook.format.as_str())
        .bind(sql::flag(webhook.enabled))
        .bind(sealed)
        .bind(webhook.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| sql::insert_error(e, no_conflict))?;
        Ok(CreatedWebhook { webhook, secret })
    }

    pub async fn webhook(&self, tenant_id: &str, id: &str) -> Result<Webhook, ProvisioningError> {
        self.one(SELECT, tenant_id, id, Object::Webhook, from_row)
            .await
    }

    pub async fn list_webhooks(
        &self,
        tenant_id: &str,
        page: &PageRequest,
    ) -> Result<Page<Webhook>, ProvisioningError> {
        self.tenant(tenant_id).await?;
        sql::page(
            &self.pool,
            "webhooks",
            SELECT,
            Some(tenant_id),
            page,
            from_row,
        )
        .await
    }

    /// The enabled subscriptions of a tenant (the worker's fan-out).
    pub async fn enabled_webhooks(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<Webhook>, ProvisioningError> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE tenant_id = $1 AND enabled = 1 ORDER BY id"
        ))
        .bind(tenant_id.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        rows.iter().map(from_row).collect()
    }

    /// A subscription (any tenant, by id) with its signing secrets, for the worker only.
    pub async fn webhook_target(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<WebhookTarget>, ProvisioningError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, url, events, media, format, enabled, disabled_reason, created_at_ms, secret, previous_secret, previous_until_ms, older_secrets FROM webhooks WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let webhook = from_row(&row)?;
        let aad = aad(&webhook.tenant_id, &webhook.id);
        let open = |sealed: &str| {
            self.cipher
                .decrypt(sealed, &aad)
                .map_err(|e| ProvisioningError::Unavailable(e.to_string()))
        };
        let current = open(&get::<String>(&row, "secret")?)?;
        let previous = retired(&row, now_ms)?
            .iter()
            .map(|r| open(&r.secret))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(WebhookTarget {
            webhook,
            secrets: SigningSecrets { current, previous },
        }))
    }

    /// Changes URL, filters or enabled; enabling clears the failure clock.
    pub async fn update_webhook(
        &self,
        tenant_id: &str,
        id: &str,
        patch: WebhookPatch,
    ) -> Result<Webhook, ProvisioningError> {
        self.webhook(tenant_id, id).await?;
        let mut sets = Vec::new();
        if let Some(url) = &patch.url {
            sets.push(("url", Set::Text(Some(models::url(url)?))));
        }
        if let Some(events) = &patch.events {
            let events = filter("events", events)?;
            sets.push(("events", Set::Text(Some(sql::to_json(&events)))));
        }
        if let Some(media) = &patch.media {
            let media = filter("media", media)?;
            sets.push(("media", Set::Text(Some(sql::to_json(&media)))));
        }
        if let Some(enabled) = patch.enabled {
            sets.push(("enabled", Set::Int(Some(sql::flag(enabled)))));
        }
        // Enabling clears why it was disabled, the failure clock and an event still owed for
        // the disable (it would describe a disable that no longer holds).
        let fixed: &[&str] = if patch.enabled == Some(true) {
            &[
                "disabled_reason = NULL",
                "failing_since_ms = NULL",
                "disable_event_pending = 0",
            ]
        } else {
            &[]
        };
        sql::patch(&self.pool, "webhooks", tenant_id, id, sets, fixed)
            .await
            .map_err(sql::unavailable)?;
        self.webhook(tenant_id, id).await
    }

    /// Deletes the subscription and its delivery log, in one transaction.
    pub async fn delete_webhook(&self, tenant_id: &str, id: &str) -> Result<(), ProvisioningError> {
        let mut tx = self.pool.begin().await.map_err(sql::unavailable)?;
        let done = sqlx::query("DELETE FROM webhooks WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(sql::unavailable)?;
        if done.rows_affected() == 0 {
            drop(tx);
            return Err(self.missing(tenant_id, Object::Webhook).await);
        }
        delete_log(&mut tx, LogOf::Webhook, id).await?;
        tx.commit().await.map_err(sql::unavailable)
    }

    /// A new secret; the current one keeps signing for `overlap_ms`, and so do the ones
    /// replaced earlier until their own overlap ends (a second rotation within the overlap
    /// does not cut the first one's short).
    pub async fn rotate_webhook_secret(
        &self,
        tenant_id: &str,
        id: &str,
        rotation: SecretRotation,
        overlap_ms: i64,
    ) -> Result<WebhookSecret, ProvisioningError> {
        let webhook = self.webhook(tenant_id, id).await?;
        let secret = secret(webhook.format, rotation.secret.as_deref())?;
        let sealed = self
            .cipher
            .encrypt(&secret, &aad(&webhook.tenant_id, &webhook.id));
        // Compare-and-set on the current secret: of rotations racing, each keeps the others'.
        for _ in 0..5 {
            let now = sql::now_ms();
            let until = now.saturating_add(overlap_ms);
            let row = sqlx::query(
                "SELECT secret, previous_secret, previous_until_ms, older_secrets FROM webhooks WHERE tenant_id = $1 AND id = $2",
            )
            .bind(webhook.tenant_id.clone())
            .bind(webhook.id.clone())
            .fetch_optional(&self.pool)
            .await
            .map_err(sql::unavailable)?;
            let Some(row) = row else {
                return Err(self.missing(tenant_id, Object::Webhook).await);
            };
            let current: String = get(&row, "secret")?;
            // The ciphertexts move as they are: their binding is to the row, not the column.
            let mut older = retired(&row, now)?;
            older.truncate(MAX_RETIRED - 1);
            let done = sqlx::query(
                "UPDATE webhooks SET previous_secret = secret, previous_until_ms = $3, secret = $4, older_secrets = $5 WHERE tenant_id = $1 AND id = $2 AND secret = $6",
            )
            .bind(webhook.tenant_id.clone())
            .bind(webhook.id.clone())
            .bind(until)
            .bind(sealed.clone())
            .bind((!older.is_empty()).then(|| sql::to_json(&older)))
            .bind(current)
            .execute(&self.pool)
            .await
            .map_err(sql::unavailable)?;
            if done.rows_affected() == 1 {
                return Ok(WebhookSecret {
                    webhook_id: webhook.id,
                    secret,
                    previous_valid_until_ms: until,
                });
            }
        }
        Err(ProvisioningError::Conflict(
            "the secret is being rotated by another call; try again".into(),
        ))
    }

    /// Starts the failure clock of an endpoint if not running; its start.
    pub async fn webhook_failed(&self, id: &str, now_ms: i64) -> Result<i64, ProvisioningError> {
        sqlx::query(
            "UPDATE webhooks SET failing_since_ms = $2 WHERE id = $1 AND failing_since_ms IS NULL",
        )
        .bind(id.to_string())
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        let row = sqlx::query("SELECT failing_since_ms FROM webhooks WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(sql::unavailable)?;
        match row {
            Some(row) => Ok(get::<Option<i64>>(&row, "failing_since_ms")?.unwrap_or(now_ms)),
            None => Ok(now_ms),
        }
    }

    /// Stops the failure clock after a success.
    pub async fn webhook_succeeded(&self, id: &str) -> Result<(), ProvisioningError> {
        sqlx::query(
            "UPDATE webhooks SET failing_since_ms = NULL WHERE id = $1 AND failing_since_ms IS NOT NULL",
        )
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        Ok(())
    }

    /// Disables an enabled endpoint whose failure clock still runs from `failing_since_ms`;
    /// whether this call did it (so one disable is one event). A failure of the streak before
    /// a re-enable (an attempt still in flight then) does not disable it again: the re-enable
    /// reset the clock. The disable owes its event from now (`disable_event_pending` holds
    /// that time; a row an earlier release marked 1 counts as owed long ago): the caller
    /// publishes it, [`Provisioning::pending_disable_events`] finds it should the caller not.
    pub async fn disable_webhook(
        &self,
        id: &str,
        reason: &str,
        failing_since_ms: i64,
    ) -> Result<bool, ProvisioningError> {
        let done = sqlx::query(
            "UPDATE webhooks SET enabled = 0, disabled_reason = $2, disable_event_pending = $4 \
             WHERE id = $1 AND enabled = 1 AND failing_since_ms = $3",
        )
        .bind(id.to_string())
        .bind(reason.to_string())
        .bind(failing_since_ms)
        .bind(sql::now_ms().max(1))
        .execute(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        Ok(done.rows_affected() > 0)
    }
}

/// A subscription the worker disabled whose `WebhookEndpointDisabled` the bus has not taken.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDisable {
    pub webhook_id: String,
    pub tenant_id: String,
    pub url: String,
    pub failing_since_ms: i64,
    pub reason: String,
}

impl Provisioning {
    /// Disables owing their event since `owed_before_ms` or earlier (see migration 0016), at
    /// most `limit`: a later one is still its disabler's to publish.
    pub async fn pending_disable_events(
        &self,
        limit: usize,
        owed_before_ms: i64,
    ) -> Result<Vec<PendingDisable>, ProvisioningError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, url, failing_since_ms, disabled_reason FROM webhooks \
             WHERE disable_event_pending > 0 AND disable_event_pending <= $2 AND enabled = 0 \
             AND failing_since_ms IS NOT NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(owed_before_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        rows.iter()
            .map(|row| {
                Ok(PendingDisable {
                    webhook_id: get(row, "id")?,
                    tenant_id: get(row, "tenant_id")?,
                    url: get(row, "url")?,
                    failing_since_ms: get(row, "failing_since_ms")?,
                    reason: get::<Option<String>>(row, "disabled_reason")?.unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The bus took the disable's event (of the streak that began at `failing_since_ms`).
    pub async fn disable_event_published(
        &self,
        id: &str,
        failing_since_ms: i64,
    ) -> Result<(), ProvisioningError> {
        sqlx::query(
            "UPDATE webhooks SET disable_event_pending = 0 WHERE id = $1 AND failing_since_ms = $2",
        )
        .bind(id.to_string())
        .bind(failing_since_ms)
        .execute(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        Ok(())
    }
}

/// The row's replaced secrets still signing at `now_ms` (the last rotation's, then older
/// ones), newest first.
fn retired(row: &AnyRow, now_ms: i64) -> Result<Vec<Retired>, ProvisioningError> {
    let mut all: Vec<Retired> = match get::<Option<String>>(row, "older_secrets")? {
        Some(text) => serde_json::from_str(&text).map_err(|e| {
            ProvisioningError::Unavailable(format!("column `older_secrets` holds bad JSON: {e}"))
        })?,
        None => Vec::new(),
    };
    if let (Some(secret), Some(until_ms)) = (
        get::<Option<String>>(row, "previous_secret")?,
        get::<Option<i64>>(row, "previous_until_ms")?,
    ) {
        all.push(Retired { secret, until_ms });
    }
    all.retain(|r| r.until_ms > now_ms);
    all.sort_by_key(|r| std::cmp::Reverse(r.until_ms));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_generated_in_their_format_and_checked_when_given() {
        let s = generate_secret(WebhookFormat::Standard);
        assert!(s.starts_with("whsec_"), "{s}");
        assert_eq!(
            secret_key(WebhookFormat::Standard, &s).map(|k| k.len()),
            Some(32)
        );
        assert_ne!(s, generate_secret(WebhookFormat::Standard));
        let g = generate_secret(WebhookFormat::Genesys);
        assert!(!g.starts_with("whsec_") && g.len() >= 32);
        assert!(secret(WebhookFormat::Standard, Some("nope")).is_err());
        assert!(secret(WebhookFormat::Standard, Some("whsec_AAAA")).is_err());
        let ok = format!("whsec_{}", STANDARD.encode([7u8; 24]));
        assert_eq!(secret(WebhookFormat::Standard, Some(&ok)).ok(), Some(ok));
        assert!(secret(WebhookFormat::Genesys, Some("short")).is_err());
        assert!(secret(WebhookFormat::Genesys, Some("a-long-enough-secret")).is_ok());
    }
}

/// Whose delivery log [`delete_log`] deletes.
#[derive(Clone, Copy)]
pub(super) enum LogOf {
    Webhook,
    Tenant,
}

/// Deletes the delivery log (messages and attempts) of a subscription or a tenant: the log has
/// no foreign keys (migration 0009), so deleting its owner does not cascade to it.
pub(super) async fn delete_log(
    conn: &mut sqlx::AnyConnection,
    of: LogOf,
    id: &str,
) -> Result<(), ProvisioningError> {
    let column = match of {
        LogOf::Webhook => "webhook_id",
        LogOf::Tenant => "tenant_id",
    };
    sqlx::query(&format!(
        "DELETE FROM webhook_attempts WHERE message_id IN (SELECT id FROM webhook_messages WHERE {column} = $1)"
    ))
    .bind(id.to_string())
    .execute(&mut *conn)
    .await
    .map_err(sql::unavailable)?;
    sqlx::query(&format!("DELETE FROM webhook_messages WHERE {column} = $1"))
        .bind(id.to_string())
        .execute(&mut *conn)
        .await
        .map_err(sql::unavailable)?;
    Ok(())
}
