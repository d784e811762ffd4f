//! Bot-first conversations: each customer message is POSTed to the tenant's bot endpoint,
//! signed under the bot's credential; the bot answers with replies and, when it is done, a
//! handoff to a queue with context.
//!
//! Request: `{"event": "message", "tenant_id", "conversation_id", "customer": {"participant_id",
//! "nickname"}, "user_data", "message": {"position", "message_id", "text"}}`, headers
//! `idempotency-key` (stable across redeliveries, so a bot that dedups on it answers a message
//! once), Standard Webhooks `webhook-id` (the same key), `webhook-timestamp` and
//! `webhook-signature` (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, the key being
//! the credential's bytes: a bot that checks the timestamp refuses a captured call replayed
//! later), and `x-nexus-signature: sha256=<hex HMAC-SHA256 of the body>` (earlier versions'
//! signature, kept for bots that check it; it does not cover the time). Answer (2xx): `{"replies": [{"text"}],
//! "handoff": {"queue_id"?, "user_data"?}}`, both optional; the bot may also post or hand off later
//! through the bot API (`edge::bot`).

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

use crate::http_client::target;
use crate::workers::webhooks::signing::standard_signature;

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
    /// A 429: the bot is up but asks to be called less, after `retry_after` if it said when
    /// (`Retry-After`, seconds or an HTTP date).
    #[error("bot throttled: {reason}")]
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
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

/// Bots this pod saw down lately, per (tenant, bot): a call within the window after a
/// failure is not made (it fails as the last one did), so a bot that times out costs one
/// handler a window per pod instead of one per conversation waiting on it.
#[derive(Debug)]
pub struct DownBots {
    window: Duration,
    seen:
        std::sync::Mutex<std::collections::HashMap<(String, String), (std::time::Instant, String)>>,
}

impl DownBots {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The failure a call now would repeat, while the bot's window lasts. Once it is over, one
    /// caller (the probe) is let through and the window starts again for the others: every
    /// turn due then calling a bot that still hangs would tie up a lane each for the call's
    /// timeout. The probe's outcome then closes the window or keeps it open.
    pub fn recently(&self, bot: &(String, String)) -> Option<BotError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (at, why) = seen.get_mut(bot)?;
        if at.elapsed() < self.window {
            return Some(BotError::Down(format!(
                "{why} (seen down, not called again yet)"
            )));
        }
        *at = std::time::Instant::now();
        None
    }

    /// Notes a call's outcome: a bot down opens its window, an answer (even a refusal or a
    /// 429, which says the bot is up) closes it.
    pub fn note(&self, bot: &(String, String), outcome: &Result<BotTurn, BotError>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Err(BotError::Down(why)) => {
                seen.insert(bot.clone(), (std::time::Instant::now(), why.clone()));
            }
            _ => {
                seen.remove(bot);
            }
        }
    }
}

/// Largest bot answer read; more is refused (the conversation falls back to its queue).
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Most replies one answer may carry.
pub const MAX_REPLIES: usize = 20;

/// Where a bot may be, and what its answer may hold: the limits the bot API and customers
/// have at the edge.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `chat.max_message_chars`.
    pub max_chars: usize,
    /// `chat.max_user_data_entries`.
    pub max_user_data_entries: usize,
    /// Bots at internal addresses are refused (`allow_private_bots` off).
    pub private_refused: bool,
}

impl BotTurn {
    /// Refuses an answer the bot API would refuse: an empty or too long reply, too many
    /// replies, a handoff with too much user data. Applied whole or not at all, so a handoff
    /// is never lost behind a reply that cannot be written.
    fn check(&self, limits: Limits) -> Result<(), BotError> {
        if self.replies.len() > MAX_REPLIES {
            return Err(BotError::Refused(format!(
                "bot answer: {} replies, at most {MAX_REPLIES}",
                self.replies.len()
            )));
        }
        for (i, r) in self.replies.iter().enumerate() {
            if r.text.trim().is_empty() || r.text.chars().count() > limits.max_chars {
                return Err(BotError::Refused(format!(
                    "bot answer: replies[{i}] is empty or longer than {} characters",
                    limits.max_chars
                )));
            }
        }
        if let Some(h) = &self.handoff {
            crate::stores::session::check_user_data(&h.user_data, limits.max_user_data_entries)
                .map_err(|e| BotError::Refused(format!("bot answer: handoff: {e}")))?;
        }
        Ok(())
    }
}

/// The client bot calls go through: no redirects (a 3xx is a refusal) and, unless private
/// targets are allowed, a resolver that answers only public addresses, without a proxy
/// (which would resolve past it), as for webhooks.
pub fn client(
    http: &crate::config::HttpClientConfig,
    allow_private: bool,
) -> Result<reqwest::Client, crate::http_client::ClientError> {
    let mut builder =
        crate::http_client::builder(http)?.redirect(reqwest::redirect::Policy::none());
    if let Some(resolver) = target::resolver(allow_private) {
        builder = builder.dns_resolver(resolver).no_proxy();
    }
    builder
        .build()
        .map_err(|e| crate::http_client::ClientError::Build(e.to_string()))
}

/// One bot turn: POSTs `body` and reads the answer.
pub async fn call(
    http: &reqwest::Client,
    bot: &BotTarget,
    body: &Value,
    idempotency_key: &str,
    timeout: Duration,
    limits: Limits,
) -> Result<BotTurn, BotError> {
    if let Some(ip) = reqwest::Url::parse(&bot.url)
        .ok()
        .as_ref()
        .and_then(target::literal_ip)
        .filter(|ip| limits.private_refused && target::is_internal(*ip))
    {
        // The resolver is not asked for an address written in the URL.
        return Err(BotError::Refused(format!(
            "the bot's address {ip} is in a private, loopback or link-local range"
        )));
    }
    let bytes = serde_json::to_vec(body).map_err(|e| BotError::Refused(e.to_string()))?;
    let timestamp = chrono::Utc::now().timestamp();
    let response = http
        .post(&bot.url)
        .timeout(timeout)
        .header("content-type", "application/json")
        .header("x-nexus-signature", signature(&bot.credential, &bytes))
        .header("idempotency-key", idempotency_key)
        .header("webhook-id", idempotency_key)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            standard_signature(
                bot.credential.as_bytes(),
                idempotency_key,
                timestamp,
                &bytes,
            ),
        )
        .body(bytes)
        .send()
        .await
        .map_err(|e| {
            // Neither the URL's credentials nor reqwest's copy of it in the error.
            let url = crate::http_client::shown_url(&bot.url);
            // A name the resolver would only answer with internal addresses is a refusal
            // (the bot cannot be called there), not a bot down to wait for.
            let private =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| e.downcast_ref::<target::TargetError>().is_some());
            if private {
                BotError::Refused(format!(
                    "POST {url}: the bot's name resolves to internal addresses only"
                ))
            } else {
                BotError::Down(format!("POST {url}: {}", e.without_url()))
            }
        })?;
    let status = response.status();
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        let retry_after = crate::http_client::retry_after(&response);
        return Err(BotError::Throttled {
            reason: match retry_after {
                Some(wait) => format!("bot answered {status}, Retry-After {}s", wait.as_secs()),
                None => format!("bot answered {status}"),
            },
            retry_after,
        });
    }
    if status.is_server_error() {
        return Err(BotError::Down(format!("bot answered {status}")));
    }
    if !status.is_success() {
        return Err(BotError::Refused(format!("bot answered {status}")));
    }
    let text = match crate::http_client::read_capped(response, MAX_ANSWER_BYTES).await {
        Ok(text) => text,
        Err(crate::http_client::BodyError::TooLarge(max)) => {
            return Err(BotError::Refused(format!(
                "bot answer larger than {max} bytes"
            )))
        }
        Err(crate::http_client::BodyError::Read(e)) => {
            return Err(BotError::Down(format!(
                "reading the answer: {}",
                e.without_url()
            )))
        }
    };
    if text.is_empty() {
        return Ok(BotTurn::default());
    }
    let turn: BotTurn =
        serde_json::from_slice(&text).map_err(|e| BotError::Refused(format!("bot answer: {e}")))?;
    turn.check(limits)?;
    Ok(turn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once a bot's window is over, one turn calls it (the probe) and the others keep failing
    /// as the last call did until that probe's outcome is noted. Before, every turn due after
    /// the window called a bot that still hung, each holding a lane for the call's timeout.
    #[test]
    fn one_probe_goes_once_a_down_bots_window_is_over() {
        let bots = DownBots::new(std::time::Duration::from_millis(50));
        let bot = ("t1".to_string(), "b1".to_string());
        assert!(bots.recently(&bot).is_none(), "never seen down");
        bots.note(&bot, &Err(BotError::Down("timed out".into())));
        assert!(matches!(bots.recently(&bot), Some(BotError::Down(_))));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(bots.recently(&bot).is_none(), "the probe goes");
        for _ in 0..3 {
            assert!(
                matches!(bots.recently(&bot), Some(BotError::Down(_))),
                "a second caller while the probe runs"
            );
        }
        bots.note(
            &bot,
            &Ok(BotTurn {
                replies: Vec::new(),
                handoff: None,
            }),
        );
        assert!(bots.recently(&bot).is_none(), "answered: no window");
    }

    fn limits() -> Limits {
        Limits {
            max_chars: 10,
            max_user_data_entries: 2,
            private_refused: false,
        }
    }

    fn target(url: String) -> BotTarget {
        BotTarget {
            name: "bot".into(),
            url,
            credential: "c".into(),
        }
    }

    /// An answer past 256 KiB is refused (the conversation falls back to its queue) without
    /// being read whole; an unreachable bot's error names no credential of its URL.
    #[tokio::test]
    async fn large_answers_are_refused_and_errors_hide_credentials() {
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(|| async { "x".repeat(MAX_ANSWER_BYTES + 1) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let body = serde_json::json!({});
        let timeout = Duration::from_secs(5);
        let answer = call(&http, &target(url), &body, "k", timeout, limits()).await;
        assert!(
            matches!(&answer, Err(BotError::Refused(m)) if m.contains("larger than")),
            "{answer:?}"
        );
        let down = "http://u:s3cret@127.0.0.1:9/?token=t0ken".to_string();
        let answer = call(&http, &target(down), &body, "k", timeout, limits()).await;
        match answer {
            Err(BotError::Down(m)) => {
                assert!(!m.contains("s3cret") && !m.contains("t0ken"), "{m}")
            }
            other => panic!("expected the bot down, got {other:?}"),
        }
    }

    /// With private targets refused, a bot at an internal address is not called: an address
    /// written in the URL at call time (the resolver is not asked for it), a name through the
    /// client's resolver; both are refusals (the conversation goes to its queue).
    #[tokio::test]
    async fn bots_at_internal_addresses_are_not_called() {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { "{}" }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let refused = Limits {
            private_refused: true,
            ..limits()
        };
        let http = client(&crate::config::Config::defaults().http_client, false).expect("client");
        let body = serde_json::json!({});
        let timeout = Duration::from_secs(5);
        for url in [
            format!("http://127.0.0.1:{port}/"),
            format!("http://localhost:{port}/"),
        ] {
            let answer = call(&http, &target(url.clone()), &body, "k", timeout, refused).await;
            assert!(
                matches!(&answer, Err(BotError::Refused(_))),
                "{url}: {answer:?}"
            );
        }
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "never called"
        );
        // Allowed: the same bot answers.
        let open = client(&crate::config::Config::defaults().http_client, true).expect("client");
        let url = format!("http://localhost:{port}/");
        let answer = call(&open, &target(url), &body, "k", timeout, limits()).await;
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn answers_past_the_limits_are_refused() {
        let limits = limits();
        let turn = |v: Value| serde_json::from_value::<BotTurn>(v).expect("turn");
        let ok = turn(serde_json::json!({"replies": [{"text": "0123456789"}],
            "handoff": {"user_data": {"a": "1", "b": "2"}}}));
        assert!(ok.check(limits).is_ok());
        for bad in [
            serde_json::json!({"replies": [{"text": "01234567890"}]}),
            serde_json::json!({"replies": [{"text": "  "}]}),
            serde_json::json!({"replies": vec![serde_json::json!({"text": "x"}); MAX_REPLIES + 1]}),
            serde_json::json!({"handoff": {"user_data": {"a": "1", "b": "2", "c": "3"}}}),
            serde_json::json!({"handoff": {"user_data": {"": "1"}}}),
        ] {
            assert!(
                matches!(turn(bad.clone()).check(limits), Err(BotError::Refused(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
