//! The `tap` role: POSTs every event of its topics as JSON to one HTTP endpoint, with the event
//! id as `Idempotency-Key`, for debugging and simple integrations. 2xx is done; 5xx, 429, 408,
//! a redirect (not followed) and timeouts are retried in place (the key's lane waits); other 4xx
//! dead-letter the event.

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
    /// The URL as errors and dead-letter headers show it: no credentials.
    shown: String,
    client: reqwest::Client,
}

impl TapConfig {
    /// The endpoint, parsed; `None` when none is set (only the role needs one).
    pub fn endpoint(&self) -> Result<Option<reqwest::Url>, TapError> {
        if self.url.is_empty() {
            return Ok(None);
        }
        let bad = || TapError::BadUrl(crate::http_client::shown_url(&self.url));
        let url = reqwest::Url::parse(&self.url).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad());
        }
        Ok(Some(url))
    }
}

impl Tap {
    pub fn new(config: &TapConfig, client: &HttpClientConfig) -> Result<Self, TapError> {
        let url = config.endpoint()?.ok_or(TapError::NoUrl)?;
        Ok(Self {
            shown: crate::http_client::shown_url(url.as_str()),
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
        let url = &self.shown;
        // Without reqwest's copy of the URL, which keeps its credentials.
        let response = request
            .send()
            .await
            .map_err(|err| HandleError::Retry(format!("POST {url}: {}", err.without_url())))?;
        match outcome(response.status()) {
            Outcome::Done => Ok(()),
            Outcome::Retry => Err(HandleError::Retry(format!(
                "POST {url} answered {}",
                response.status()
            ))),
            Outcome::Redirected => Err(HandleError::Retry(format!(
                "POST {url} answered {}; redirects are not followed: set workers.tap.url to the address it points to",
                response.status()
            ))),
            Outcome::Reject => Err(HandleError::Reject {
                reason: "tap_rejected",
                detail: format!("POST {url} answered {}", response.status()),
            }),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Done,
    Retry,
    /// A 3xx: the URL is to fix, and every event would meet it, so none is dead-lettered.
    Redirected,
    Reject,
}

fn outcome(status: reqwest::StatusCode) -> Outcome {
    if status.is_success() {
        Outcome::Done
    } else if status.is_redirection() {
        Outcome::Redirected
    } else if status.is_server_error() || matches!(status.as_u16(), 408 | 429) {
        Outcome::Retry
    } else {
        Outcome::Reject
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_done_retry_or_reject() {
        for (code, want) in [
            (200, Outcome::Done),
            (204, Outcome::Done),
            (301, Outcome::Redirected),
            (308, Outcome::Redirected),
            (408, Outcome::Retry),
            (429, Outcome::Retry),
            (500, Outcome::Retry),
            (503, Outcome::Retry),
            (400, Outcome::Reject),
            (404, Outcome::Reject),
            (410, Outcome::Reject),
        ] {
            let status = reqwest::StatusCode::from_u16(code).expect("status");
            assert_eq!(outcome(status), want, "{code}");
        }
    }

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        let config = |url: &str| TapConfig { url: url.into() };
        assert!(config("").endpoint().expect("empty is unset").is_none());
        assert!(config("https://tap.example/in").endpoint().is_ok());
        let err = config("ftp://u:s3cret@tap.example/in")
            .endpoint()
            .expect_err("not http");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let tap = Tap::new(
            &config("http://u:s3cret@127.0.0.1:9/in?token=t0ken"),
            &crate::config::Config::defaults().http_client,
        )
        .expect("tap");
        assert!(!tap.shown.contains("s3cret") && !tap.shown.contains("t0ken"));
    }

    /// An unreachable endpoint's error (logged, and in dead-letter headers after a reject)
    /// carries no credentials of the URL.
    #[tokio::test]
    async fn errors_carry_no_credentials() {
        let tap = Tap::new(
            &TapConfig {
                url: "http://u:s3cret@127.0.0.1:9/in?token=t0ken".into(),
            },
            &crate::config::Config::defaults().http_client,
        )
        .expect("tap");
        let event = crate::events::Registry::builtin()
            .example("TypingIndicated")
            .expect("example");
        let message = Message {
            topic: "nexus.interaction.v1".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: "k".into(),
            payload: bytes::Bytes::new(),
            headers: Vec::new(),
        };
        match tap.handle(&event, &message).await {
            Err(HandleError::Retry(detail)) => {
                assert!(
                    !detail.contains("s3cret") && !detail.contains("t0ken"),
                    "{detail}"
                );
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }
}
