//! Settings of the `webhooks` role (`[workers.webhooks]`): retry schedule, timeouts, limits
//! and the outbound target policy. The admin API reads the target policy and the overlap too.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Allow subscription URLs in private, loopback and link-local ranges (tests, labs).
    pub allow_private_targets: bool,
    /// Delay before each attempt (ms): the first entry is the first attempt (0 = at once); a
    /// message fails for good after the last one.
    pub retry_schedule_ms: Vec<u64>,
    /// Longest delay a receiver's `Retry-After` (on 429 or 503) may put before the next
    /// attempt, ms; a longer one is cut to this.
    pub retry_after_max_ms: u64,
    /// Timeout of one attempt (connect to end of the answer), ms.
    pub timeout_ms: u64,
    /// An endpoint whose every attempt failed for this long is disabled (ms).
    pub disable_after_ms: u64,
    /// How long the previous secret keeps signing after a rotation (ms).
    pub secret_overlap_ms: u64,
    /// Attempts in flight per process, all endpoints together.
    pub max_in_flight: usize,
    /// Attempts in flight per endpoint (subscription) per process: a slow endpoint holds only these.
    pub max_in_flight_per_endpoint: usize,
    /// Attempts in flight per tenant per process, all its endpoints together: a tenant with
    /// many slow or dead endpoints holds only these, the rest of `max_in_flight` stays for
    /// the others.
    pub max_in_flight_per_tenant: usize,
    /// How often the dispatcher looks for due retries (new messages wake it at once), ms.
    pub poll_interval_ms: u64,
    /// How often queue depth and oldest pending age are measured, ms.
    pub stats_interval_ms: u64,
    /// Subscriptions that get their own metric label per process; later ones share `other`.
    pub metric_subscriptions: usize,
    /// Database connections of the delivery log per process (PostgreSQL; SQLite shares the
    /// provisioning store's).
    pub db_connections: u32,
    /// How long a group of new messages' insert waits for their first attempts (PostgreSQL,
    /// ms): an attempt that ends in time is written with its row, one write instead of three.
    pub first_attempt_wait_ms: u64,
    /// How long a tenant's subscription list is reused by the handler (ms; 0 = read per
    /// event): a new or changed subscription applies to events handled this much later.
    pub subscription_cache_ms: u64,
    /// How long delivered, aborted and dead messages (with their attempts) stay in the log
    /// after their last change (ms); every pod prunes hourly. Keep it above the retention of
    /// `nexus.interaction.v1` and its dead-letter topic, so a replayed event finds its message.
    pub log_retention_ms: u64,
}

impl WebhooksConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn first_attempt_wait(&self) -> Duration {
        Duration::from_millis(self.first_attempt_wait_ms)
    }

    /// The delay before attempt `n` of a round (0-based), or `None` once the schedule is spent.
    pub fn delay_before(&self, n: usize) -> Option<Duration> {
        self.retry_schedule_ms
            .get(n)
            .map(|ms| Duration::from_millis(*ms))
    }

    /// The delay before the next attempt of a round after attempt `n - 1` failed: the
    /// schedule's, or longer when the receiver asked to wait (`Retry-After`, capped at
    /// `retry_after_max_ms`); `None` once the schedule is spent, whatever the receiver asked.
    pub fn delay_after_failure(&self, n: usize, retry_after: Option<Duration>) -> Option<Duration> {
        let scheduled = self.delay_before(n)?;
        let asked = retry_after
            .unwrap_or_default()
            .min(Duration::from_millis(self.retry_after_max_ms));
        Some(scheduled.max(asked))
    }

    /// Cross-field checks, run at config load and when the role starts: the key and what
    /// is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = |key: &'static str, v: u64| {
            if v == 0 {
                Err((key, "must be > 0".to_string()))
            } else {
                Ok(())
            }
        };
        if self.log_retention_ms < 24 * 3600 * 1000 {
            return Err((
                "workers.webhooks.log_retention_ms",
                "must be at least a day (86400000)".into(),
            ));
        }
        if self.retry_schedule_ms.is_empty() {
            return Err((
                "workers.webhooks.retry_schedule_ms",
                "must have at least one entry".into(),
            ));
        }
        // Delays are added to the clock in ms as i64: a year bounds them far from overflow (and
        // from any schedule a receiver would still be waiting for).
        const YEAR_MS: u64 = 365 * 86_400_000;
        if self.retry_schedule_ms.iter().any(|d| *d > YEAR_MS) {
            return Err((
                "workers.webhooks.retry_schedule_ms",
                format!("each delay must be at most a year ({YEAR_MS} ms)"),
            ));
        }
        if self.retry_after_max_ms > YEAR_MS {
            return Err((
                "workers.webhooks.retry_after_max_ms",
                format!("must be at most a year ({YEAR_MS} ms)"),
            ));
        }
        positive("workers.webhooks.timeout_ms", self.timeout_ms)?;
        positive("workers.webhooks.max_in_flight", self.max_in_flight as u64)?;
        positive(
            "workers.webhooks.max_in_flight_per_endpoint",
            self.max_in_flight_per_endpoint as u64,
        )?;
        positive(
            "workers.webhooks.max_in_flight_per_tenant",
            self.max_in_flight_per_tenant as u64,
        )?;
        positive(
            "workers.webhooks.db_connections",
            self.db_connections as u64,
        )?;
        positive("workers.webhooks.poll_interval_ms", self.poll_interval_ms)?;
        positive("workers.webhooks.stats_interval_ms", self.stats_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_past_a_year_are_refused() {
        let mut c = crate::config::Config::defaults().workers.webhooks;
        c.retry_after_max_ms = u64::MAX;
        assert_eq!(
            c.validate().map_err(|e| e.0),
            Err("workers.webhooks.retry_after_max_ms")
        );
        let mut c = crate::config::Config::defaults().workers.webhooks;
        c.retry_schedule_ms = vec![0, u64::MAX / 2];
        assert_eq!(
            c.validate().map_err(|e| e.0),
            Err("workers.webhooks.retry_schedule_ms")
        );
    }

    #[test]
    fn retry_after_lengthens_the_schedule_up_to_its_cap() {
        let mut c = crate::config::Config::defaults().workers.webhooks;
        c.retry_schedule_ms = vec![0, 5_000, 60_000];
        c.retry_after_max_ms = 30_000;
        let s = Duration::from_secs;
        assert_eq!(c.delay_after_failure(1, None), Some(s(5)));
        assert_eq!(c.delay_after_failure(1, Some(s(2))), Some(s(5)));
        assert_eq!(c.delay_after_failure(1, Some(s(20))), Some(s(20)));
        assert_eq!(c.delay_after_failure(1, Some(s(600))), Some(s(30)));
        assert_eq!(c.delay_after_failure(2, Some(s(20))), Some(s(60)));
        assert_eq!(
            c.delay_after_failure(3, Some(s(20))),
            None,
            "the schedule is spent"
        );
    }
}
