//! Typed bodies of the webhooks worker's own events: a message that exhausted its retries
//! (dead-letter topic) and an endpoint disabled after failing for `disable_after`.

use serde::{Deserialize, Serialize};

use super::chat::Body;

/// Topic of [`WebhookMessageDead`]: the webhook dead-letter topic.
pub const WEBHOOK_DEAD_TOPIC: &str = crate::topology::topics::WEBHOOKS_DEAD;
/// Topic of [`WebhookEndpointDisabled`].
pub const WEBHOOK_EVENTS_TOPIC: &str = crate::topology::topics::WEBHOOKS;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookMessageDead {
    pub webhook_id: String,
    pub message_id: String,
    pub source_event_id: String,
    pub event: String,
    pub body: String,
    pub attempts: i64,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
}

impl Body for WebhookMessageDead {
    const TYPE: &'static str = "WebhookMessageDead";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEndpointDisabled {
    pub webhook_id: String,
    pub url: String,
    pub failing_since_ms: i64,
    pub reason: String,
}

impl Body for WebhookEndpointDisabled {
    const TYPE: &'static str = "WebhookEndpointDisabled";
}
