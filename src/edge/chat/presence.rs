//! The customer's sign of life: requests and open streams refresh a short-lived mark per chat
//! in the session store (at most every quarter of the abandon timeout per edge), so the
//! conversation worker can close a live chat whose customer left without saying so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::debug;

use super::Claims;
use crate::edge::AppState;
use crate::stores::session::customer_mark;

/// Entries kept before the throttle drops those it no longer needs.
const PRUNE_ABOVE: usize = 4_096;

/// Refreshes the customer marks of one edge.
pub struct Presence {
    /// The abandon timeout; `None` = off.
    timeout: Option<Duration>,
    /// When this edge last refreshed each chat's mark (`tenant/session`).
    refreshed: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Presence {
    /// Marks live for `abandon_timeout_s` (0 = off).
    pub fn new(abandon_timeout_s: u64) -> Self {
        Self {
            timeout: (abandon_timeout_s > 0).then(|| Duration::from_secs(abandon_timeout_s)),
            refreshed: Arc::default(),
        }
    }

    /// How often an open stream should call [`Self::seen`] to keep its chat's mark fresh.
    pub fn every(&self) -> Option<Duration> {
        self.timeout.map(|t| t / 4)
    }

    /// Refreshes the mark of `claims`'s chat unless this edge did within a quarter of the
    /// timeout. The write runs on its own task: no request waits for it, and a caller that is
    /// cancelled (a stream's select) cannot cut it short. A store that cannot be written only
    /// skips this refresh (the next request or stream tick tries again).
    pub fn seen(&self, state: &AppState, claims: &Claims) {
        let Some(timeout) = self.timeout else { return };
        let Ok(store) = state.sessions() else { return };
        let key = format!("{}/{}", claims.tid, claims.sid);
        let every = timeout / 4;
        // A sign of life skipped by the throttle is at most `every` younger than the last
        // write: the mark outlives that write by the timeout plus `every`, so it never lapses
        // sooner than the timeout after the customer's last sign of life.
        let ttl = timeout + every;
        // A stream calls every `every`: a tenth of slack, so its timer ticking a little early
        // still refreshes.
        let every = every - every / 10;
        {
            let mut refreshed = lock(&self.refreshed);
            if refreshed.get(&key).is_some_and(|at| at.elapsed() < every) {
                return;
            }
            if refreshed.len() >= PRUNE_ABOVE {
                refreshed.retain(|_, at| at.elapsed() < every);
            }
            // Taken before the write, so concurrent requests of one chat write once.
            refreshed.insert(key.clone(), Instant::now());
        }
        let (store, refreshed) = (store.clone(), self.refreshed.clone());
        let mark = customer_mark(&claims.tid, &claims.sid);
        tokio::spawn(async move {
            if let Err(e) = store.refresh(&mark, ttl).await {
                debug!(error = %e, "cannot refresh a customer's sign of life");
                lock(&refreshed).remove(&key);
            }
        });
    }
}

fn lock(
    m: &Mutex<HashMap<String, Instant>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
