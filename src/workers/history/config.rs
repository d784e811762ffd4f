//! Settings of the `history` role (`[workers.history]`): where UCS is, globally or per tenant,
//! and when a target is paused.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::workers::peer::PeerConfig;

/// The config table of the role's UCS target.
pub const KEY: &str = "workers.history.ucs";

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

/// Checks that one step of a try fits in `try_time` (the handler timeout) for every target:
/// its call and, after a 404, the IdentifyContact asked again to tell whose the 404 is
/// (bounded by `identity_timeout_ms`, at most the call's timeout). A step cut short by the
/// handler timeout does not count, so one that never fits would be tried for good. The error
/// names the key to change.
pub fn validate_try(c: &PeerConfig, try_time: Duration) -> Result<(), (&'static str, String)> {
    if c.identity_timeout_ms == Some(0) {
        return Err((
            "workers.history.ucs.identity_timeout_ms",
            "must be at least 1".into(),
        ));
    }
    c.validate_try(
        KEY,
        1,
        "a step may make its call and then, after a 404, IdentifyContact again",
        try_time,
    )
    .map_err(|e| ("workers.history.ucs.timeout_ms", e))
}
