//! The `tap` role: POSTs every event of its topics as JSON to one HTTP endpoint, with the event
//! id as `Idempotency-Key`, for debugging and simple integrations. 2xx is done; 5xx, 429 and
//! timeouts are retried in place (the key's lane waits); other 4xx dead-letter the event.

pub mod config;

use async_trait::async_trait;
use serde_json::json;

pub use config::TapConfig;

use crate::bus::consumer::{HandleError, Handler};
use crate::bus::Message;
use crate::config::HttpClientConfig;
use crate::events::Event;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("workers.tap.url is empty; set it to the endpoint that receives the events")]
    NoUrl,
    #[error("workers.tap.url `{0}` is not an http(s) URL")]
    BadUrl(String),
    #[error(transparent)]
    Client(#[from] crate::http_client::ClientError),
}

pub struct Tap {
    url: reqwest::Url,
    client: reqwest::Client,
}

impl Tap {
    pub fn new(config: &TapConfig, client: &HttpClientConfig) -> Result<Self, TapError> {
        if config.url.is_empty() {
            return Err(TapError::NoUrl);
        }
        let url =
            reqwest::Url::parse(&config.url).map_err(|_| TapError::BadUrl(config.url.clone()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TapError::BadUrl(config.url.clone()));
        }
        Ok(Self {
            url,
            client: crate::http_client::build(client)?,
        })
    }
}

#[async_trait]
impl Handler for Tap {
    async fn handle(&self, event: &Event, message: &Message) -> Result<(), HandleError> {
        let e = &event.envelope;
        let body = json!({
            "event_id": e.event_id.to_string(),
            "event_type": e.event_type,
            "tenant_id": e.tenant_id,
            "conversation_id": e.conversation_id,
            "occurred_at": e.occurred_at_ms,
            "producer": e.producer,
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "body": event.body,
        });
        let mut request = self
            .client
            .post(self.url.clone())
            .header("idempotency-key", e.event_id.to_string())
            .json(&body);
        if let Some(tp) = &e.traceparent {
            request = request.header("traceparent", tp);
        }
        let response = request
            .send()
            .await
            .map_err(|err| HandleError::Retry(format!("POST {}: {err}", self.url)))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(HandleError::Retry(format!(
                "POST {} answered {status}",
                self.url
            )))
        } else {
            Err(HandleError::Reject {
                reason: "tap_rejected",
                detail: format!("POST {} answered {status}", self.url),
            })
        }
    }
}
