//! The `webhooks` role: turns ConversationStarted / ConversationClosed on the interaction topic
//! into signed STARTED / FINISHED webhook messages, one per matching subscription.
//!
//! Each message has a deterministic id (subscription + event: the Standard Webhooks
//! `webhook-id`) and goes into the delivery log ([`store`]) insert-if-absent before the
//! consumer acks: a redelivered or replayed event is a no-op. The [`dispatcher`], a background
//! loop of the role, sends what is due (retries per `retry_schedule_ms`), so a slow receiver
//! never holds a partition. On PostgreSQL a new STARTED message this process has room for is
//! sent before its row is written and its first outcome usually goes into that insert
//! ([`intake`]).

pub mod config;
pub mod dispatcher;
pub mod intake;
pub mod payload;
pub mod signing;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;

pub use config::WebhooksConfig;
use dispatcher::Dispatcher;
use store::{MessageStore, NewMessage};

use crate::bus::consumer::{HandleError, Handler};
use crate::bus::{Bus, Message};
use crate::config::{HttpClientConfig, StoresConfig};
use crate::events::chat::{BodyError, Channel, ConversationClosed, ConversationStarted};
use crate::events::Event;
use crate::http_client::target;
use crate::stores::provisioning::{Provisioning, Webhook, WebhookEvent, WebhookMedia};
use crate::telemetry::metrics as m;

use super::RoleHandler;

#[derive(Debug, thiserror::Error)]
pub enum WebhooksError {
    #[error("[workers.webhooks] {0}")]
    Config(String),
    #[error(transparent)]
    Client(#[from] crate::http_client::ClientError),
}

/// How long the delivery log waits for a free connection before a call counts as failed.
const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Tenants whose subscription lists are cached before stale ones are swept.
const MAX_CACHED_TENANTS: usize = 10_000;

/// The role's handler and its two loops (dispatch, queue gauges).
/// How often each webhooks pod prunes the log (pods may overlap: the delete is idempotent).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub fn role(
    config: &WebhooksConfig,
    http: &HttpClientConfig,
    stores: &StoresConfig,
    bus: Arc<dyn Bus>,
    provisioning: Arc<Provisioning>,
) -> Result<RoleHandler, WebhooksError> {
    config
        .validate()
        .map_err(|(key, e)| WebhooksError::Config(format!("{key}: {e}")))?;
    let mut builder = crate::http_client::builder(http)?
        // A redirect could lead to an address the target policy refuses; receivers get none.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.timeout())
        // Several subscriptions often share a host: keep a connection per attempt in flight,
        // not per endpoint (a smaller pool closes and reopens connections at every burst).
        .pool_max_idle_per_host(config.max_in_flight);
    if let Some(resolver) = target::resolver(config.allow_private_targets) {
        // Through a proxy the proxy resolves the name, past this resolver: no proxy while
        // the target policy is on.
        builder = builder.dns_resolver(resolver).no_proxy();
    }
    let client = builder
        .build()
        .map_err(|e| WebhooksError::Config(format!("HTTP client: {e}")))?;
    // The log has a pool of its own on PostgreSQL: the provisioning pool is sized for short
    // admin and auth queries, the log writes every attempt.
    let store = if provisioning.kind() == "postgres" && !stores.postgres_url.is_empty() {
        // Plans made per execution: the log grows from empty, and a cached generic plan made
        // while it was small (a scan) would stay a scan as it grows.
        let options = |session: &'static str| {
            sqlx::any::AnyPoolOptions::new()
                .max_connections(config.db_connections)
                .acquire_timeout(DB_ACQUIRE_TIMEOUT)
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        sqlx::Executor::execute(conn, session).await?;
                        Ok(())
                    })
                })
        };
        let durable = options("SET plan_cache_mode = force_custom_plan")
            .connect_lazy(&stores.postgres_url)
            .map_err(|e| WebhooksError::Config(format!("delivery log pool: {e}")))?;
        let relaxed =
            options("SET plan_cache_mode = force_custom_plan; SET synchronous_commit = off")
                .connect_lazy(&stores.postgres_url)
                .map_err(|e| WebhooksError::Config(format!("delivery log pool: {e}")))?;
        MessageStore::new(durable, provisioning.kind())
            .relaxed(relaxed)
            .first_attempt_wait(config.first_attempt_wait())
    } else {
        MessageStore::new(provisioning.pool().clone(), provisioning.kind())
    };
    let dispatcher = Arc::new(Dispatcher::new(
        store.clone(),
        provisioning.clone(),
        bus,
        client,
        config.clone(),
    ));
    let handler = Arc::new(Webhooks {
        provisioning,
        store,
        dispatcher: dispatcher.clone(),
        cache_ttl: Duration::from_millis(config.subscription_cache_ms),
        cache: Mutex::new(HashMap::new()),
    });
    let stats = dispatcher.clone();
    let writer = dispatcher.clone();
    let log = handler.store.clone();
    let keep = Duration::from_millis(config.log_retention_ms);
    Ok(RoleHandler {
        handler,
        background: vec![
            Box::new(move |stop| dispatcher.run(stop).boxed()),
            Box::new(move |stop| stats.stats(stop).boxed()),
            Box::new(move |stop| writer.log_writer(stop).boxed()),
            Box::new(move |stop| {
                crate::workers::prune::run("webhooks", PRUNE_EVERY, keep, stop, move |before| {
                    let log = log.clone();
                    async move { log.prune_finished(before).await }
                })
                .boxed()
            }),
        ],
    })
}

/// A tenant's enabled subscriptions and when they were read.
type Cached = (Instant, Arc<Vec<Webhook>>);

pub struct Webhooks {
    provisioning: Arc<Provisioning>,
    store: MessageStore,
    dispatcher: Arc<Dispatcher>,
    cache_ttl: Duration,
    /// Enabled subscriptions per tenant, reused for `cache_ttl`.
    cache: Mutex<HashMap<String, Cached>>,
}

/// Media type and interaction subtype of a channel.
fn media_of(channel: &Channel) -> (WebhookMedia, &'static str) {
    match channel {
        Channel::Email => (WebhookMedia::Email, "email"),
        Channel::Messaging => (WebhookMedia::Chat, "messaging"),
        Channel::Sms => (WebhookMedia::Chat, "sms"),
        _ => (WebhookMedia::Chat, "webchat"),
    }
}

impl Webhooks {
    /// PostgreSQL: the leased new messages are sent at once and their rows written after (the
    /// first outcome with them when it comes in time, see [`intake`]); the event is acked only
    /// once the rows are committed.
    async fn send_then_write(
        &self,
        messages: Vec<NewMessage>,
        leases: Vec<Option<i64>>,
        now: i64,
    ) -> Result<(), HandleError> {
        let retry = |err: store::StoreError| HandleError::Retry(err.to_string());
        let admission = self
            .store
            .admit(&messages, &leases, now)
            .await
            .map_err(retry)?;
        let mut unleased = false;
        let mut mine = Vec::new();
        for ((msg, lease), admitted) in messages.into_iter().zip(leases).zip(&admission.messages) {
            match (admitted, lease) {
                (intake::Admitted::Exists, _) => {}
                (intake::Admitted::New(Some(first)), Some(lease)) => {
                    mine.push((store::Claimed::first(msg).unwritten(first.clone()), lease))
                }
                (intake::Admitted::New(_), _) => unleased = true,
            }
        }
        self.dispatcher.adopt(mine).await;
        let new = admission.written().await.map_err(retry)?;
        metrics::counter!(m::WEBHOOK_MESSAGES_QUEUED_TOTAL).increment(new.len() as u64);
        if unleased {
            self.dispatcher.wake();
        }
        Ok(())
    }

    /// The tenant's enabled subscriptions, from the cache while fresh.
    async fn subscriptions(&self, tenant_id: &str) -> Result<Arc<Vec<Webhook>>, HandleError> {
        if !self.cache_ttl.is_zero() {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, list)) = cache.get(tenant_id) {
                if at.elapsed() < self.cache_ttl {
                    return Ok(list.clone());
                }
            }
        }
        let list = Arc::new(
            self.provisioning
                .enabled_webhooks(tenant_id)
                .await
                .map_err(|err| HandleError::Retry(err.to_string()))?,
        );
        if !self.cache_ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded by the tenants with traffic; stale entries are dropped when it grows.
            if cache.len() > MAX_CACHED_TENANTS {
                let ttl = self.cache_ttl;
                cache.retain(|_, (at, _)| at.elapsed() < ttl);
            }
            cache.insert(tenant_id.to_string(), (Instant::now(), list.clone()));
        }
        Ok(list)
    }

    /// Media and subtype of the interaction: from the event's channel (the start's; the
    /// close's since its schema v2), else, for a close written before, from the STARTED
    /// message stored for it.
    async fn media(
        &self,
        event: &Event,
        kind: WebhookEvent,
    ) -> Result<(WebhookMedia, String), HandleError> {
        let invalid = |e: BodyError| HandleError::Reject {
            reason: "invalid_body",
            detail: e.to_string(),
        };
        let channel = if kind == WebhookEvent::Started {
            Some(
                event
                    .body_as::<ConversationStarted>()
                    .map_err(invalid)?
                    .channel,
            )
        } else {
            event
                .body_as::<ConversationClosed>()
                .map_err(invalid)?
                .channel
        };
        // A symbol this version does not know says nothing: the STARTED row may.
        if let Some(channel) = channel.filter(|c| *c != Channel::Unknown) {
            let (media, subtype) = media_of(&channel);
            return Ok((media, subtype.to_string()));
        }
        let e = &event.envelope;
        let stored = self
            .store
            .started_body(&e.tenant_id, &e.conversation_id)
            .await
            .map_err(|err| HandleError::Retry(err.to_string()))?;
        let parsed = stored
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .map(|v| v["data"]["entities"][0]["entity"].clone());
        let media = match parsed.as_ref().and_then(|v| v["mediaType"].as_str()) {
            Some("email") => WebhookMedia::Email,
            _ => WebhookMedia::Chat,
        };
        let subtype = parsed
            .as_ref()
            .and_then(|v| v["interactionSubtype"].as_str())
            .unwrap_or("webchat")
            .to_string();
        Ok((media, subtype))
    }
}

#[async_trait]
impl Handler for Webhooks {
    async fn handle(&self, event: &Event, _message: &Message) -> Result<(), HandleError> {
        let e = &event.envelope;
        let kind = match e.event_type.as_str() {
            "ConversationStarted" => WebhookEvent::Started,
            "ConversationClosed" => WebhookEvent::Finished,
            _ => return Ok(()),
        };
        let subscriptions = self.subscriptions(&e.tenant_id).await?;
        if subscriptions.is_empty() {
            return Ok(());
        }
        let (media, subtype) = self.media(event, kind).await?;
        let body = payload::body(&payload::Interaction {
            event_id: &e.event_id,
            event: kind,
            conversation_id: &e.conversation_id,
            media,
            subtype: &subtype,
        });
        let now = chrono::Utc::now().timestamp_millis();
        let messages: Vec<NewMessage> = subscriptions
            .iter()
            .filter(|w| w.wants(kind, media))
            .map(|w| NewMessage {
                id: payload::message_id(&w.id, &e.event_id),
                tenant_id: e.tenant_id.clone(),
                webhook_id: w.id.clone(),
                event_id: e.event_id.to_string(),
                conversation_id: e.conversation_id.clone(),
                event: kind,
                body: body.clone(),
            })
            .collect();
        // Messages this process has room for are leased in the insert and sent from here: no
        // claim query for a first attempt. The rest (and FINISHED) wait for a claim.
        let leases = self.dispatcher.offer(&messages);
        if self.store.sends_before_insert() && leases.iter().any(Option::is_some) {
            return self.send_then_write(messages, leases, now).await;
        }
        let new = self
            .store
            .queue(&messages, &leases, now)
            .await
            .map_err(|err| HandleError::Retry(err.to_string()))?;
        if new.is_empty() {
            return Ok(());
        }
        metrics::counter!(m::WEBHOOK_MESSAGES_QUEUED_TOTAL).increment(new.len() as u64);
        let mut unleased = false;
        let mut mine = Vec::new();
        for (msg, lease) in messages.into_iter().zip(leases) {
            if !new.contains(&msg.id) {
                continue;
            }
            match lease {
                Some(lease) if msg.event == WebhookEvent::Started => {
                    mine.push((store::Claimed::first(msg), lease))
                }
                _ => unleased = true,
            }
        }
        self.dispatcher.adopt(mine).await;
        if unleased {
            self.dispatcher.wake();
        }
        Ok(())
    }
}
