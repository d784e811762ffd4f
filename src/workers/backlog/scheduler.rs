//! The loop that re-drives a role's backlog: claims due conversation heads under a lease, runs
//! the effect again and works down each conversation's queue in order (on every pod).
//!
//! A pod that dies mid-drive leaves its heads leased until the lease (the handler timeout plus
//! a margin) ends; then any pod claims them again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use super::{now_ms, Backlog, Effect, Failure, Item, RetryPolicy, EXHAUSTED};
use crate::bus::consumer::{dead_letter_record, panic_rejected, publish_dead_letter, HandleError};
use crate::bus::{dlq_topic, Bus};
use crate::events;
use crate::telemetry::metrics as m;

/// How often due heads are looked for.
const POLL: Duration = Duration::from_millis(250);
/// Conversations driven at once by one pod.
const MAX_DRIVES: usize = 16;
/// Added to the handler timeout for the lease, so a drive that times out still owns its head.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// How often the depth gauges are refreshed.
const STATS_EVERY: Duration = Duration::from_secs(5);
/// Wait before trying again when the dead-letter topic did not take an event.
const DEAD_LETTER_RETRY_MS: i64 = 5_000;

/// Dead-letter reason of a backlog row that could not be read.
const UNREADABLE: &str = "backlog_row_unreadable";
/// How long running drives may finish their current try after shutdown.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

pub struct Scheduler<E> {
    backlog: Backlog,
    effect: Arc<E>,
    bus: Arc<dyn Bus>,
    /// The role's consumer group, named in dead-letter headers.
    group: String,
    policy: RetryPolicy,
    /// Longest run of one try (the consumer's handler timeout).
    timeout: Duration,
}

impl<E: Effect> Scheduler<E> {
    pub fn new(
        backlog: Backlog,
        effect: Arc<E>,
        bus: Arc<dyn Bus>,
        group: &str,
        policy: RetryPolicy,
        timeout: Duration,
    ) -> Self {
        Self {
            backlog,
            effect,
            bus,
            group: group.to_string(),
            policy,
            timeout,
        }
    }

    fn role(&self) -> &'static str {
        self.backlog.role()
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from((self.timeout + LEASE_MARGIN).as_millis()).unwrap_or(i64::MAX)
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!(m::BACKLOG_REDRIVEN_TOTAL, "role" => self.role(), "outcome" => outcome)
            .increment(1);
    }

    fn failed(&self, stage: &'static str, e: &dyn std::fmt::Display) {
        metrics::counter!(m::BACKLOG_ERRORS_TOTAL, "role" => self.role(), "stage" => stage)
            .increment(1);
        warn!(role = self.role(), stage, error = %e, "effect backlog store failed; tried again later");
    }

    /// Claims and drives due heads until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let permits = Arc::new(Semaphore::new(MAX_DRIVES));
        let mut drives = JoinSet::new();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stats_at: Option<Instant> = None;
        // A claim that took as many heads as it could leaves more due: the next claim goes as
        // soon as a drive ends, not at the next tick, so a backlog gathered in an outage
        // drains at the peer's pace.
        let mut more = false;
        loop {
            let eager = more && !drives.is_empty();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = drives.join_next(), if eager => {}
                _ = tick.tick(), if !eager => {}
            }
            while drives.try_join_next().is_some() {}
            if stats_at.is_none_or(|at| at.elapsed() >= STATS_EVERY) {
                self.stats().await;
                stats_at = Some(Instant::now());
            }
            let free = permits.available_permits();
            if free == 0 {
                more = !drives.is_empty();
                continue;
            }
            let now = now_ms();
            let claimed = self
                .backlog
                .claim_due(now, self.lease_ms(), free)
                .instrument(info_span!("backlog_claim", role = self.role()))
                .await;
            let items = match claimed {
                Ok(items) => items,
                Err(e) => {
                    more = false;
                    self.failed("claim", &e);
                    continue;
                }
            };
            more = items.len() >= free;
            for item in items {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    break; // cannot happen: no more were claimed than permits were free
                };
                let me = self.clone();
                let stop = stop.clone();
                drives.spawn(async move {
                    me.drive(item, stop).await;
                    drop(permit);
                });
            }
        }
        // Running tries may finish; what is cut off comes back when its lease ends.
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, async {
            while drives.join_next().await.is_some() {}
        })
        .await;
        drives.abort_all();
    }

    /// Works down one conversation's queue from `item` until it is empty or a try fails.
    async fn drive(&self, mut item: Item, stop: CancellationToken) {
        loop {
            let span = info_span!(
                "backlog_drive",
                role = self.role(),
                tenant = %item.tenant_id,
                conversation_id = %item.conversation_id,
                event_id = %item.event_id,
                attempts = item.attempts,
            );
            if !self.try_once(&item).instrument(span).await || stop.is_cancelled() {
                return;
            }
            let next = self
                .backlog
                .claim_next(
                    &item.tenant_id,
                    &item.conversation_id,
                    now_ms(),
                    self.lease_ms(),
                )
                .await;
            item = match next {
                Ok(Some(next)) => next,
                Ok(None) => return,
                // The next head is due: a later claim takes it.
                Err(e) => return self.failed("claim", &e),
            };
        }
    }

    /// One try of the head; whether it is settled (applied or dead-lettered) and out, and
    /// this pod still owns the conversation.
    async fn try_once(&self, item: &Item) -> bool {
        if let Some((reason, detail)) = item.pending_dead_letter() {
            return self.dead_letter(item, reason, detail).await;
        }
        if let Some(column) = item.unreadable {
            metrics::counter!(m::BACKLOG_ERRORS_TOTAL, "role" => self.role(), "stage" => "unreadable")
                .increment(1);
            let detail =
                format!("the backlog row's `{column}` could not be read; the record is as stored");
            return self.dead_letter(item, UNREADABLE, &detail).await;
        }
        let outcome = match events::decode_lazy(&item.message.payload) {
            Err(e) => Err(HandleError::Reject {
                reason: e.reason_code(),
                detail: e.to_string(),
            }),
            Ok(event) => {
                let applied = panic_rejected(self.effect.apply(&event, &item.message));
                match tokio::time::timeout(self.timeout, applied).await {
                    Ok(r) => r,
                    // The calls have timeouts of their own, which count; a whole try running
                    // this long waited on something else (a slow store): not the event's
                    // failure.
                    Err(_) => Err(HandleError::RetryLater {
                        reason: format!("timed out after {:?}", self.timeout),
                        not_before_ms: 0,
                        counts: false,
                    }),
                }
            }
        };
        let Err(e) = outcome else {
            self.count("applied");
            debug!("backlogged event applied");
            return self.remove(item).await;
        };
        let failure = match Failure::of(e) {
            Ok(failure) => failure,
            Err(HandleError::Reject { reason, detail }) => {
                return self.dead_letter(item, reason, &detail).await
            }
            Err(other) => Failure {
                reason: other.to_string(),
                not_before_ms: 0,
                counts: true,
                deferred: false,
            },
        };
        let attempts = item.attempts + i64::from(failure.counts);
        if failure.counts && self.policy.exhausted(attempts) {
            let detail = format!("{attempts} tries failed; the last: {}", failure.reason);
            return self.dead_letter(item, EXHAUSTED, &detail).await;
        }
        let due = self.policy.due_ms(attempts, &failure);
        match self
            .backlog
            .reschedule(item, due, &failure.reason, failure.counts)
            .await
        {
            Ok(true) if failure.deferred => {
                self.count("deferred");
                debug!(reason = %failure.reason, due_ms = due, "backlogged event deferred again");
            }
            Ok(true) => {
                self.count("retried");
                warn!(error = %failure.reason, attempts, counts = failure.counts, "backlogged event failed again");
            }
            Ok(false) => warn!("lease ran out during the try; another pod has the event now"),
            Err(e) => self.failed("reschedule", &e),
        }
        false
    }

    /// Takes a settled head out; whether this pod still held it.
    async fn remove(&self, item: &Item) -> bool {
        match self.backlog.remove(item).await {
            Ok(true) => true,
            Ok(false) => {
                // Another pod claimed it after the lease ran out and runs it again: a repeat
                // the effect absorbs. The conversation is that pod's now.
                warn!("lease ran out during the try; another pod has the event now");
                false
            }
            Err(e) => {
                // Runs again when the lease ends; the effect is done, so that is a no-op.
                self.failed("remove", &e);
                false
            }
        }
    }

    /// Sets the head aside on the source topic's dead-letter topic, then takes it out. A
    /// publish that fails is tried again later, the item marked settled so that only the
    /// publish is (see [`Item::pending_dead_letter`]).
    async fn dead_letter(&self, item: &Item, reason: &str, detail: &str) -> bool {
        if item.pending_dead_letter().is_none() {
            // Marked settled before the publish, keeping the lease: if the row is not removed
            // after it (the store down, a crash), the next try only publishes again instead
            // of running the effect a second time (a refused GWS call made again).
            let marked = Item::pending_dead_letter_error(reason, detail);
            match self
                .backlog
                .reschedule(item, item.lease_until_ms, &marked, false)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    warn!("lease ran out before the dead letter; another pod has the event now");
                    return false;
                }
                Err(e) => {
                    // Nothing published: the head runs again when the lease ends.
                    self.failed("reschedule", &e);
                    return false;
                }
            }
        }
        let record = dead_letter_record(&item.message, &self.group, reason, detail);
        let dlq = dlq_topic(&item.message.topic);
        if let Err(e) = publish_dead_letter(self.bus.as_ref(), &dlq, record).await {
            let due = now_ms().saturating_add(DEAD_LETTER_RETRY_MS);
            let pending = Item::pending_dead_letter_error(reason, detail);
            if let Err(e) = self.backlog.reschedule(item, due, &pending, false).await {
                self.failed("reschedule", &e);
            }
            warn!(error = %e, dlq = %dlq, "the dead-letter topic did not take a backlogged event; its publish is tried again later");
            return false;
        }
        metrics::counter!(m::EVENTS_DEAD_LETTERED_TOTAL, "topic" => item.message.topic.clone(), "group" => self.group.clone(), "reason" => reason.to_string()).increment(1);
        self.count("dead_lettered");
        warn!(reason, detail, dlq = %dlq, "backlogged event dead-lettered; its conversation goes on");
        // Not removed (lease lost, store down): published again later, so the dead-letter
        // topic may hold it twice.
        self.remove(item).await
    }

    async fn stats(&self) {
        match self.backlog.promote_queued_heads().await {
            Ok(0) => {}
            Ok(n) => debug!(role = self.role(), heads = n, "queued heads made due"),
            Err(e) => self.failed("promote", &e),
        }
        match self.backlog.depth().await {
            Ok(d) => {
                let role = self.role();
                metrics::gauge!(m::BACKLOG_EVENTS, "role" => role).set(d.events as f64);
                let age = d
                    .oldest_created_at_ms
                    .map(|at| (now_ms() - at).max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                metrics::gauge!(m::BACKLOG_OLDEST_AGE_SECONDS, "role" => role).set(age);
            }
            Err(e) => self.failed("stats", &e),
        }
    }
}
