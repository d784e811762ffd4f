//! The `webhooks` role: turns ConversationStarted / ConversationClosed on the interaction topic
//! into signed STARTED / FINISHED webhook messages, one per matching subscription.
//!
//! The handler only writes each message to the delivery log ([`store`]) under a deterministic
//! id (subscription + event: the Standard Webhooks `webhook-id`), insert-if-absent, and then
//! the consumer acks: a redelivered or replayed event is a no-op. The [`dispatcher`], a
//! background loop of the role, sends what is due (the first attempt at once, retries per
//! `retry_schedule_ms`), so a slow receiver never holds a partition. See `docs-webhooks.md`.

pub mod config;
pub mod dispatcher;
pub mod payload;
pub mod signing;
pub mod store;
pub mod target;

use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;

pub use config::WebhooksConfig;
use dispatcher::Dispatcher;
use store::{MessageStore, NewMessage};

use crate::bus::consumer::{HandleError, Handler};
use crate::bus::{Bus, Message};
use crate::config::HttpClientConfig;
use crate::events::chat::{Channel, ConversationStarted};
use crate::events::Event;
use crate::stores::provisioning::{Provisioning, WebhookEvent, WebhookMedia};
use crate::telemetry::metrics as m;

use super::RoleHandler;

#[derive(Debug, thiserror::Error)]
pub enum WebhooksError {
    #[error("[workers.webhooks] {0}")]
    Config(String),
    #[error(transparent)]
    Client(#[from] crate::http_client::ClientError),
}

/// The role's handler and its two loops (dispatch, queue gauges).
pub fn role(
    config: &WebhooksConfig,
    http: &HttpClientConfig,
    bus: Arc<dyn Bus>,
    provisioning: Arc<Provisioning>,
) -> Result<RoleHandler, WebhooksError> {
    config.validate().map_err(WebhooksError::Config)?;
    let mut builder = crate::http_client::builder(http)?
        // A redirect could lead to an address the target policy refuses; receivers get none.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.timeout())
        .pool_max_idle_per_host(config.max_in_flight_per_endpoint);
    if let Some(resolver) = target::resolver(config.allow_private_targets) {
        builder = builder.dns_resolver(resolver);
    }
    let client = builder
        .build()
        .map_err(|e| WebhooksError::Config(format!("HTTP client: {e}")))?;
    let store = MessageStore::new(provisioning.pool().clone(), provisioning.kind());
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
    });
    let stats = dispatcher.clone();
    Ok(RoleHandler {
        handler,
        background: vec![
            Box::new(move |stop| dispatcher.run(stop).boxed()),
            Box::new(move |stop| stats.stats(stop).boxed()),
        ],
    })
}

pub struct Webhooks {
    provisioning: Arc<Provisioning>,
    store: MessageStore,
    dispatcher: Arc<Dispatcher>,
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
    /// Media and subtype of the interaction: from the start event, or for the close (which
    /// does not carry the channel) from the STARTED message stored for it.
    async fn media(
        &self,
        event: &Event,
        kind: WebhookEvent,
    ) -> Result<(WebhookMedia, String), HandleError> {
        if kind == WebhookEvent::Started {
            let started: ConversationStarted =
                event.body_as().map_err(|e| HandleError::Reject {
                    reason: "invalid_body",
                    detail: e.to_string(),
                })?;
            let (media, subtype) = media_of(&started.channel);
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
        let subscriptions = self
            .provisioning
            .enabled_webhooks(&e.tenant_id)
            .await
            .map_err(|err| HandleError::Retry(err.to_string()))?;
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
        let mut queued = 0u64;
        for w in subscriptions.iter().filter(|w| w.wants(kind, media)) {
            let message = NewMessage {
                id: payload::message_id(&w.id, &e.event_id),
                tenant_id: e.tenant_id.clone(),
                webhook_id: w.id.clone(),
                event_id: e.event_id.to_string(),
                conversation_id: e.conversation_id.clone(),
                event: kind,
                body: body.clone(),
            };
            if self
                .store
                .insert(&message, now)
                .await
                .map_err(|err| HandleError::Retry(err.to_string()))?
            {
                queued += 1;
            }
        }
        if queued > 0 {
            metrics::counter!(m::WEBHOOK_MESSAGES_QUEUED_TOTAL).increment(queued);
            self.dispatcher.wake();
        }
        Ok(())
    }
}
