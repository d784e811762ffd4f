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

/// Entries kept before the throttle first drops those it no longer needs.
const PRUNE_ABOVE: usize = 4_096;

/// When this edge last refreshed each chat's mark (`tenant/session`).
#[derive(Default)]
struct Refreshed {
    at: HashMap<String, Instant>,
    /// The size at which stale entries are dropped next: twice what a pass kept, so a pass
    /// costs O(1) per insert however many chats are live.
    prune_at: usize,
}

impl Refreshed {
    /// Whether `key` is due a write (none within `every`); if so it counts as written now.
    fn take(&mut self, key: &str, every: Duration) -> bool {
        if self.at.get(key).is_some_and(|at| at.elapsed() < every) {
            return false;
        }
        if self.at.len() >= self.prune_at.max(PRUNE_ABOVE) {
            self.at.retain(|_, at| at.elapsed() < every);
            self.prune_at = self.at.len() * 2;
        }
        self.at.insert(key.to_string(), Instant::now());
        true
    }
}

/// Refreshes the customer marks of one edge.
pub struct Presence {
    /// The abandon timeout; `None` = off.
    timeout: Option<Duration>,
    refreshed: Arc<Mutex<Refreshed>>,
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
        let ttl = timeout.saturating_add(every);
        // A stream calls every `every`: a tenth of slack, so its timer ticking a little early
        // still refreshes.
        let every = every - every / 10;
        {
            // Taken before the write, so concurrent requests of one chat write once.
            if !lock(&self.refreshed).take(&key, every) {
                return;
            }
        }
        let (store, refreshed) = (store.clone(), self.refreshed.clone());
        let mark = customer_mark(&claims.tid, &claims.sid);
        tokio::spawn(async move {
            if let Err(e) = store.refresh(&mark, ttl).await {
                debug!(error = %e, "cannot refresh a customer's sign of life");
                lock(&refreshed).at.remove(&key);
            }
        });
    }
}

fn lock(m: &Mutex<Refreshed>) -> std::sync::MutexGuard<'_, Refreshed> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_is_written_once_per_interval_and_stale_entries_go() {
        let mut r = Refreshed::default();
        let every = Duration::from_millis(300);
        assert!(r.take("t/a", every));
        assert!(!r.take("t/a", every), "again within the interval");
        assert!(r.take("t/b", every), "another chat");
        std::thread::sleep(Duration::from_millis(320));
        assert!(r.take("t/a", every), "due again after the interval");
        // Many chats: a pass drops the stale entries once the map has doubled since the last.
        for i in 0..PRUNE_ABOVE {
            r.take(&format!("t/{i}"), every);
        }
        let prune_at = r.prune_at;
        assert!(prune_at >= PRUNE_ABOVE, "{prune_at}");
        std::thread::sleep(Duration::from_millis(320));
        let mut fresh = 0;
        while r.at.keys().any(|k| k.starts_with("t/")) {
            assert!(r.take(&format!("u/{fresh}"), every));
            fresh += 1;
            assert!(fresh <= prune_at, "no pass by twice the size");
        }
        assert_eq!(r.at.len(), fresh, "only the fresh entries are kept");
    }
}
