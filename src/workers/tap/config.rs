//! Settings of the `tap` role (`[workers.tap]`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapConfig {
    /// Endpoint that receives every event as JSON; the role refuses to start without it.
    pub url: String,
}
