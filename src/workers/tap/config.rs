//! Settings of the `tap` role (`[workers.tap]`).

use serde::{Deserialize, Serialize};

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapConfig {
    /// Endpoint that receives every event as JSON; the role refuses to start without it.
    pub url: String,
}

/// The receiver's key often rides in the URL's query: shown as `config check` shows it.
impl std::fmt::Debug for TapConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapConfig")
            .field("url", &crate::http_client::shown_url(&self.url))
            .finish()
    }
}
