//! Settings of the `history` role (`[workers.history]`): where UCS is, globally or per tenant,
//! and when a target is paused.

use serde::{Deserialize, Serialize};

use crate::workers::peer::PeerConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// How long after a close its transcript is written: entries the conversation worker
    /// publishes just after `ConversationClosed` (a reply racing the close, from the other
    /// input topic) still make it into the document.
    pub transcript_settle_ms: u64,
    /// UCS: global target, per-tenant overrides and the pause circuit. A tenant without a
    /// target has its events acked without a call.
    pub ucs: PeerConfig,
}

/// The default of `transcript_settle_ms` (as in the embedded defaults).
pub const DEFAULT_TRANSCRIPT_SETTLE_MS: u64 = 10_000;

/// The longest settle time `nexus config check` takes (10 minutes): closes wait in the retry
/// backlog meanwhile, whose age alert fires at 30 minutes.
pub const MAX_TRANSCRIPT_SETTLE_MS: u64 = 600_000;

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            transcript_settle_ms: DEFAULT_TRANSCRIPT_SETTLE_MS,
            ucs: PeerConfig::default(),
        }
    }
}
