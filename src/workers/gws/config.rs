//! Settings of the `gws` role (`[workers.gws]`): where GWS is, globally and per tenant, the
//! bearer credential, the call timeout and the pause circuit ([`PeerConfig`]).

use crate::workers::peer::PeerConfig;

/// `[workers.gws]` is a [`PeerConfig`]: `url`, `credential`, `timeout_ms`,
/// `pause_after_failures`, `pause_initial_ms`, `pause_max_ms` and
/// `[workers.gws.tenants.<tenant id>]` overrides. A tenant without a URL has no GWS: its agent
/// events are acked and counted as skipped.
pub type GwsConfig = PeerConfig;

/// The config key, for error messages.
pub const KEY: &str = "workers.gws";

/// Startup checks: every URL is http(s) and the timeout is not zero.
pub fn validate(c: &GwsConfig) -> Result<(), String> {
    c.validate(KEY)?;
    if c.timeout_ms == 0 {
        return Err(format!("{KEY}.timeout_ms: must be at least 1"));
    }
    Ok(())
}
