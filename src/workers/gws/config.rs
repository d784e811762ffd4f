//! Settings of the `gws` role (`[workers.gws]`): where GWS is, globally and per tenant, the
//! bearer credential, the call and identity-check timeouts and the pause circuit
//! ([`PeerConfig`]).

use std::time::Duration;

use crate::workers::peer::PeerConfig;

/// `[workers.gws]` is a [`PeerConfig`]: `url`, `credential`, `timeout_ms`,
/// `identity_timeout_ms` (the `GET /api/v2/me` that tells whose a 403 or a POST's 404 is; at
/// most the target's `timeout_ms`), `pause_after_failures`, `pause_initial_ms`, `pause_max_ms`
/// and `[workers.gws.tenants.<tenant id>]` overrides. A tenant without a URL has no GWS: its
/// agent events are acked and counted as skipped.
pub type GwsConfig = PeerConfig;

/// The config key, for error messages.
pub const KEY: &str = "workers.gws";

/// Startup checks: every URL is http(s) and the timeouts are not zero.
pub fn validate(c: &GwsConfig) -> Result<(), String> {
    c.validate(KEY)?;
    if c.timeout_ms == 0 {
        return Err(format!("{KEY}.timeout_ms: must be at least 1"));
    }
    if c.identity_timeout_ms == Some(0) {
        return Err(format!("{KEY}.identity_timeout_ms: must be at least 1"));
    }
    Ok(())
}

/// Most HTTP calls one try of an event makes, one after another, besides identity checks: a
/// retried try reads the chat, then makes the call.
const CALLS_PER_TRY: u64 = 2;

/// Startup check against `try_time`, how long one try of an event may run (the consumer's
/// handler timeout, which the backlog gives each try): the calls of a try, each taking all its
/// timeout, must end within it. A try cut short does not count against its event, so an event
/// whose tries can never end in time would be tried for good.
///
/// The rule: 2 × (`timeout_ms` + identity timeout) < `try_time`, for every target. A retried
/// try may read the chat, then call; either answered 403 (the POST also 404) is followed by
/// `GET /api/v2/me` to tell whose refusal it is: two calls of up to `timeout_ms` and two
/// checks of up to the identity timeout.
pub fn validate_try(c: &GwsConfig, try_time: Duration) -> Result<(), String> {
    let calls_are = format!(
        "one try may make {CALLS_PER_TRY} calls and {CALLS_PER_TRY} identity checks one after \
         another"
    );
    c.validate_try(KEY, CALLS_PER_TRY, &calls_are, try_time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::peer::PeerTarget;

    fn gws(timeout_ms: u64, identity_timeout_ms: Option<u64>) -> GwsConfig {
        GwsConfig {
            url: "http://gws.example.com".into(),
            timeout_ms,
            identity_timeout_ms,
            ..GwsConfig::default()
        }
    }

    /// Every call of a try, back to back, fits in the handler timeout: the identity checks
    /// included, each at most the call's own timeout. Before, only the read and the call were
    /// counted (`timeout_ms` under half the handler timeout), so a try that also asked
    /// `/api/v2/me` twice could be cut short on every try, and cut tries do not count.
    #[test]
    fn the_calls_of_a_gws_try_fit_in_the_handler_timeout() {
        let try_time = Duration::from_millis(3_000);
        // The default identity timeout (2 s) is cut to the call's: 2 × (1400 + 1400) ms.
        assert!(validate_try(&gws(1_400, None), try_time).is_err());
        // 2 × (1400 + 99) ms fits; 2 × (1400 + 100) ms takes all of it, with no room left.
        validate_try(&gws(1_400, Some(99)), try_time).expect("fits");
        let e = validate_try(&gws(1_400, Some(100)), try_time).unwrap_err();
        assert!(
            e.contains("workers.gws.timeout_ms") && e.contains("workers.gws.identity_timeout_ms"),
            "{e}"
        );
        // A long identity timeout is cut to the call's, not refused: 2 × (700 + 700) ms.
        validate_try(&gws(700, Some(60_000)), try_time).expect("cut to the call's");
        // A tenant's own timeout is checked with the identity timeout too.
        let mut c = gws(500, Some(500));
        c.tenants.insert(
            "t1".into(),
            PeerTarget {
                url: "http://gws-t1.example.com".into(),
                credential: String::new(),
                timeout_ms: 1_200,
            },
        );
        let e = validate_try(&c, try_time).unwrap_err();
        assert!(e.contains("workers.gws.tenants.t1.timeout_ms"), "{e}");
        // No target, nothing to fit.
        validate_try(&GwsConfig::default(), try_time).expect("GWS off");
    }

    #[test]
    fn the_embedded_default_identity_timeout_is_the_codes() {
        assert_eq!(
            crate::config::Config::defaults()
                .workers
                .gws
                .identity_timeout_ms,
            Some(crate::workers::peer::DEFAULT_IDENTITY_TIMEOUT_MS)
        );
    }

    #[test]
    fn a_zero_identity_timeout_is_refused() {
        let e = validate(&gws(1_000, Some(0))).unwrap_err();
        assert!(e.contains("workers.gws.identity_timeout_ms"), "{e}");
        validate(&gws(1_000, Some(1))).expect("1 ms");
    }
}
