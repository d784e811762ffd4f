//! The periodic pruning loop of a role's effect state (the gws effect log, the history worker's
//! finished conversations): every pod runs it, deletes are idempotent, a failure waits a tick.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::telemetry::metrics as m;

/// Every `every`, deletes what is older than `keep` through `prune(before_ms)` (which answers
/// the rows deleted), counting them in `nexus_effect_state_pruned_total{role}`, until `stop`.
pub async fn run<F, Fut, E>(
    role: &'static str,
    every: Duration,
    keep: Duration,
    stop: CancellationToken,
    prune: F,
) where
    F: Fn(i64) -> Fut,
    Fut: Future<Output = Result<u64, E>>,
    E: std::fmt::Display,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = chrono::Utc::now().timestamp_millis()
            - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        async {
            match prune(before).await {
                Ok(n) => {
                    metrics::counter!(m::EFFECT_STATE_PRUNED_TOTAL, "role" => role).increment(n);
                    if n > 0 {
                        info!(deleted = n, "old effect-state rows pruned");
                    }
                }
                // Retried on the next tick; old rows only take space meanwhile.
                Err(e) => warn!(error = %e, "effect-state prune failed; retried"),
            }
        }
        .instrument(tracing::info_span!("effect_state_prune", role))
        .await;
    }
}
