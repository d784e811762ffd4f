//! Settings of the `history` role (`[workers.history]`): where UCS is, globally or per tenant,
//! and when a target is paused.

use serde::{Deserialize, Serialize};

use crate::workers::peer::PeerConfig;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// UCS: global target, per-tenant overrides and the pause circuit. A tenant without a
    /// target has its events acked without a call.
    pub ucs: PeerConfig,
}
