//! Settings of the `conversation` role (`[workers.conversation]`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationConfig {
    /// How long an agent has to accept an offer before it goes to the next agent.
    pub offer_timeout_ms: u64,
    /// An agent who lets an offer lapse is set not ready (reason `NOT_RESPONDING`) until it
    /// says ready again, so chats stop waiting on a desk nobody sits at.
    pub not_ready_on_lapse: bool,
    /// How often a queued conversation is tried again when no agent was free.
    pub requeue_interval_ms: u64,
    /// How often the timer loop looks for due timers.
    pub timer_interval_ms: u64,
    /// How long a closed conversation's record and transcript stay readable.
    pub closed_retention_s: u64,
    /// Async chat: a conversation whose customer was idle this long gets a notice...
    pub idle_timeout_s: u64,
    /// ...and is closed (`IDLE_TIMEOUT`) this much later unless the customer returns.
    pub close_grace_s: u64,
    /// A live (not async) chat whose customer showed no sign of life this long (no request,
    /// no open stream) is closed as left (`CUSTOMER_LEFT`); 0 keeps such chats until closed.
    /// Edges refresh the sign of life from the same setting.
    pub abandon_timeout_s: u64,
    /// How long a bot has to answer one message.
    pub bot_timeout_ms: u64,
    /// A bot that is down (unreachable, timeout, 5xx): `queue` hands the conversation to its
    /// rule's queue at once; `retry` tries the message again later (a timer, backing off from
    /// 1 s to 30 s) while the conversation waits with the bot, other conversations going on.
    /// A 429 is not a bot down: in either mode the message is tried again after its
    /// `Retry-After` (1 s to 5 min; the backoff without one).
    pub bot_fallback: BotFallback,
    /// With `retry`: how long one message is retried before the conversation goes to its
    /// queue after all, the last try being at this time. With `queue`, a bot answering 429 is
    /// waited for this long, at most 30 s.
    pub bot_retry_max_s: u64,
    /// Allow bot URLs in private, loopback and link-local ranges (refused otherwise when a
    /// bot is written and at call time, DNS answers included).
    pub allow_private_bots: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BotFallback {
    Queue,
    Retry,
}

impl Default for ConversationConfig {
    fn default() -> Self {
        Self {
            offer_timeout_ms: 30_000,
            not_ready_on_lapse: true,
            requeue_interval_ms: 2_000,
            timer_interval_ms: 200,
            closed_retention_s: 7 * 86_400,
            idle_timeout_s: 86_400,
            close_grace_s: 3_600,
            abandon_timeout_s: 600,
            bot_timeout_ms: 5_000,
            bot_fallback: BotFallback::Queue,
            bot_retry_max_s: 300,
            allow_private_bots: false,
        }
    }
}
