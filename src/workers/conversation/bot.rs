//! Bot-first conversations: each customer message is POSTed to the tenant's bot endpoint,
//! signed with HMAC-SHA256 of the body under the bot's credential; the bot answers with
//! replies and, when it is done, a handoff to a queue with context.
//!
//! Request: `{"event": "message", "tenant_id", "conversation_id", "customer": {"participant_id",
//! "nickname"}, "user_data", "message": {"position", "message_id", "text"}}`, headers
//! `x-nexus-signature: sha256=<hex>` and `idempotency-key` (stable across redeliveries, so a bot
//! that dedups on it answers a message once). Answer (2xx): `{"replies": [{"text"}],
//! "handoff": {"queue_id"?, "user_data"?}}`, both optional; the bot may also post or hand off later
//! through the bot API (`edge::bot`).

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

/// Where a bot is and how calls to it are signed.
#[derive(Clone)]
pub struct BotTarget {
    pub name: String,
    pub url: String,
    pub credential: String,
}

impl std::fmt::Debug for BotTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotTarget")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct BotTurn {
    #[serde(default)]
    pub replies: Vec<BotReply>,
    pub handoff: Option<Handoff>,
}

#[derive(Debug, Deserialize)]
pub struct BotReply {
    pub text: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct Handoff {
    pub queue_id: Option<String>,
    #[serde(default)]
    pub user_data: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BotError {
    /// Unreachable, timed out or 5xx: the bot is down.
    #[error("bot unavailable: {0}")]
    Down(String),
    /// A 4xx or an answer that is not the protocol: the bot refuses this conversation.
    #[error("bot refused: {0}")]
    Refused(String),
}

/// `sha256=<hex HMAC-SHA256 of body>` under `credential`.
pub fn signature(credential: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(credential.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts every key length"),
    };
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// One bot turn: POSTs `body` and reads the answer.
pub async fn call(
    http: &reqwest::Client,
    bot: &BotTarget,
    body: &Value,
    idempotency_key: &str,
    timeout: Duration,
) -> Result<BotTurn, BotError> {
    let bytes = serde_json::to_vec(body).map_err(|e| BotError::Refused(e.to_string()))?;
    let response = http
        .post(&bot.url)
        .timeout(timeout)
        .header("content-type", "application/json")
        .header("x-nexus-signature", signature(&bot.credential, &bytes))
        .header("idempotency-key", idempotency_key)
        .body(bytes)
        .send()
        .await
        .map_err(|e| BotError::Down(format!("POST {}: {e}", bot.url)))?;
    let status = response.status();
    if status.is_server_error() || status.as_u16() == 429 {
        return Err(BotError::Down(format!("bot answered {status}")));
    }
    if !status.is_success() {
        return Err(BotError::Refused(format!("bot answered {status}")));
    }
    let text = response
        .bytes()
        .await
        .map_err(|e| BotError::Down(e.to_string()))?;
    if text.is_empty() {
        return Ok(BotTurn::default());
    }
    serde_json::from_slice(&text).map_err(|e| BotError::Refused(format!("bot answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
