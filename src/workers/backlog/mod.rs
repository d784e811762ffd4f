//! Retries that never block a partition, for the roles that call a peer (history → UCS,
//! gws → GWS): a failed call's event is recorded with its next try and acked.
//!
//! [`Backlogged`] wraps a role's [`Effect`] as its consumer handler:
//! - an event whose conversation has events in the backlog is queued behind them ([`store`])
//!   and acked, without running: **order per conversation is kept** because a conversation's
//!   events run one at a time, in arrival order, whether on the consumer's lane or here;
//! - otherwise the effect runs; a retryable failure (`Retry`, `RetryLater`: peer 5xx, timeout)
//!   puts the event in the backlog as its conversation's head, due after `retry_initial_ms`,
//!   and acks it. Rejections are dead-lettered by the consumer as before.
//! - an effect that asks to run later with nothing failed ([`HandleError::Defer`]: history's
//!   close waiting for late entries) waits there the same way, due exactly when it asked.
//!
//! The [`scheduler`] (a background loop of the role, on every pod) claims due heads with a
//! lease, runs the effect again and on success moves straight on to the conversation's next
//! queued event. Failures wait longer each time (up to `retry_max_ms`, and no less than a
//! `RetryLater` asks); after `retry_max_attempts` counted failures the event is dead-lettered
//! (`retries_exhausted`) and the conversation goes on, as it would after a 4xx. Failures that
//! say nothing about the event (`RetryLater` with `counts: false`: the peer down for everyone,
//! a previous call still running) never count. Across conversations there is no order.
//!
//! Effects are idempotent by event (the history steps, the gws effect log), so a head run
//! twice (a lease that ran out, a crash before the row was removed) repeats no effect.
//!
//! An event whose tenant or conversation id no store can key ([`unkeyable`]: a control
//! character, over [`MAX_ID_BYTES`]) is dead-lettered at once with the role's
//! [`Effect::bad_event_reason`], before the backlog is looked at: the look-up would fail on it
//! on every try, and the consumer retrying it in place would hold its lane for good.

pub mod scheduler;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{debug, warn};

pub use scheduler::Scheduler;
pub use store::{Backlog, BacklogError, Item, Key};

use crate::bus::consumer::{retry_delay, HandleError, Handler};
use crate::bus::Message;
use crate::events::Event;
use crate::telemetry::metrics as m;
use crate::workers::peer::PeerConfig;

/// Dead-letter reason of an event whose tries ran out.
pub const EXHAUSTED: &str = "retries_exhausted";
/// Dead-letter reason of an event whose ids cannot key the backlog, for a role that names none
/// of its own ([`Effect::bad_event_reason`]).
pub const UNKEYABLE: &str = "unkeyable_event";

/// The longest tenant or conversation id a backlogged role keeps state for (nexus's are
/// 36-byte UUIDs). PostgreSQL refuses a btree key over ~2.7 kB, and the backlog's key (like
/// the roles' own state) holds both ids.
pub const MAX_ID_BYTES: usize = 512;

/// Why the event's ids cannot key a backlogged role's state, if they cannot: a NUL (PostgreSQL
/// text refuses it) or any control character, or an id too long for an index. Such an event
/// fails the same way on every try; retried in place, it would hold its consumer lane for good.
pub fn unkeyable(event: &Event) -> Option<String> {
    let e = &event.envelope;
    [
        ("tenant", &e.tenant_id),
        ("conversation", &e.conversation_id),
    ]
    .into_iter()
    .find_map(|(what, id)| {
        if id.len() > MAX_ID_BYTES {
            Some(format!(
                "{what} id of {} bytes; at most {MAX_ID_BYTES}",
                id.len()
            ))
        } else if id.chars().any(char::is_control) {
            Some(format!("{what} id holds a control character"))
        } else {
            None
        }
    })
}

/// A role's effect of one event, as the backlog runs it (first on the consumer's lane, then
/// from the backlog).
#[async_trait]
pub trait Effect: Send + Sync + 'static {
    /// Whether the event's effect keeps its place in its conversation's order (it calls the
    /// peer); others are applied at once, without a backlog check.
    fn concerns(&self, event: &Event) -> bool;
    /// The effect. `Retry` and `RetryLater` put the event in the backlog; `Reject`
    /// dead-letters it.
    async fn apply(&self, event: &Event, message: &Message) -> Result<(), HandleError>;
    /// The dead-letter reason of an event it concerns whose ids cannot key the backlog
    /// ([`unkeyable`]): the role's own bad-event reason (`gws_bad_event`, `history_bad_event`).
    fn bad_event_reason(&self) -> &'static str {
        UNKEYABLE
    }
}

/// A retryable outcome, as the backlog schedules it.
#[derive(Debug)]
pub(crate) struct Failure {
    pub reason: String,
    /// No try before this (ms since the epoch; 0 = the policy's delay alone).
    pub not_before_ms: i64,
    /// Whether it counts against `retry_max_attempts`.
    pub counts: bool,
    /// Nothing failed: the effect asked to run at `not_before_ms` ([`HandleError::Defer`]).
    pub deferred: bool,
}

impl Failure {
    /// The retryable failure in `e`, or `e` itself when it is not one.
    pub(crate) fn of(e: HandleError) -> Result<Failure, HandleError> {
        match e {
            HandleError::Retry(reason) => Ok(Failure {
                reason,
                not_before_ms: 0,
                counts: true,
                deferred: false,
            }),
            HandleError::Defer { reason, until_ms } => Ok(Failure {
                reason: reason.to_string(),
                not_before_ms: until_ms,
                counts: false,
                deferred: true,
            }),
            HandleError::RetryLater {
                reason,
                not_before_ms,
                counts,
            } => Ok(Failure {
                reason,
                not_before_ms,
                counts,
                deferred: false,
            }),
            other => Err(other),
        }
    }
}

/// When backlogged events are tried again, from `[workers.<role>]` peer settings.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// Counted failures before dead-lettering; 0 = never.
    pub max_attempts: u32,
}

impl RetryPolicy {
    pub fn of(c: &PeerConfig) -> Self {
        Self {
            initial: Duration::from_millis(c.retry_initial_ms.max(1)),
            max: Duration::from_millis(c.retry_max_ms.max(c.retry_initial_ms).max(1)),
            max_attempts: c.retry_max_attempts,
        }
    }

    /// The wait after the `attempts`-th counted failure (at least the first delay).
    pub fn delay_ms(&self, attempts: i64) -> i64 {
        let attempts = u32::try_from(attempts.max(1)).unwrap_or(u32::MAX);
        let d = retry_delay(self.initial, self.max, attempts);
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }

    /// Whether `attempts` counted failures exhaust the tries.
    pub fn exhausted(&self, attempts: i64) -> bool {
        self.max_attempts > 0 && attempts >= i64::from(self.max_attempts)
    }

    /// When a try after `attempts` counted failures may go: the policy's delay from now, or
    /// later if the failure asked for it; a deferred effect at the time it asked for.
    pub(crate) fn due_ms(&self, attempts: i64, failure: &Failure) -> i64 {
        if failure.deferred {
            return now_ms().max(failure.not_before_ms);
        }
        now_ms()
            .saturating_add(self.delay_ms(attempts))
            .max(failure.not_before_ms)
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The consumer handler of a backlogged role.
pub struct Backlogged<E> {
    effect: Arc<E>,
    backlog: Backlog,
    policy: RetryPolicy,
    /// How long an effect may run here before its event goes to the backlog instead.
    deadline: Duration,
}

impl<E: Effect> Backlogged<E> {
    /// `handler_timeout` is the consumer's: an effect still running at two thirds of it (peer
    /// calls one after another, each within its own timeout) goes to the backlog, so the
    /// consumer never cuts the handling short and retries it in place, holding the partition.
    pub fn new(
        effect: Arc<E>,
        backlog: Backlog,
        policy: RetryPolicy,
        handler_timeout: Duration,
    ) -> Self {
        Self {
            effect,
            backlog,
            policy,
            deadline: handler_timeout * 2 / 3,
        }
    }

    fn queued(&self, reason: &'static str) {
        metrics::counter!(m::BACKLOG_QUEUED_TOTAL, "role" => self.backlog.role(), "reason" => reason)
            .increment(1);
    }
}

#[async_trait]
impl<E: Effect> Handler for Backlogged<E> {
    async fn handle(&self, event: &Event, message: &Message) -> Result<(), HandleError> {
        if !self.effect.concerns(event) {
            return self.effect.apply(event, message).await;
        }
        // Checked before the backlog is: its look-up (and any store of the role) would refuse
        // these ids on every try, holding the lane for good.
        if let Some(why) = unkeyable(event) {
            return Err(HandleError::Reject {
                reason: self.effect.bad_event_reason(),
                detail: why,
            });
        }
        let e = &event.envelope;
        let event_id = e.event_id.to_string();
        let key = Key {
            tenant_id: &e.tenant_id,
            conversation_id: &e.conversation_id,
            event_id: &event_id,
        };
        let backlog_failed = |e: BacklogError| HandleError::Retry(e.to_string());
        // An earlier event of this conversation waits in the backlog: this one waits behind it.
        // Most conversations have none: the check carries no record. If the backlog empties
        // between the two, `queue_behind` writes nothing and the event runs here, after it.
        if self
            .backlog
            .holds(key.tenant_id, key.conversation_id)
            .await
            .map_err(backlog_failed)?
            && self
                .backlog
                .queue_behind(key, message, now_ms())
                .await
                .map_err(backlog_failed)?
        {
            self.queued("behind");
            return Ok(());
        }
        let applied = tokio::time::timeout(self.deadline, self.effect.apply(event, message))
            .await
            .unwrap_or_else(|_| {
                // As the scheduler counts a whole try that long: not against the event.
                Err(HandleError::RetryLater {
                    reason: format!("still running after {:?}", self.deadline),
                    not_before_ms: 0,
                    counts: false,
                })
            });
        let Err(e) = applied else {
            return Ok(());
        };
        let failure = Failure::of(e)?;
        let attempts = i64::from(failure.counts);
        if failure.counts && self.policy.exhausted(attempts) {
            return Err(HandleError::Reject {
                reason: EXHAUSTED,
                detail: failure.reason,
            });
        }
        let due = self.policy.due_ms(attempts, &failure);
        // The backlog unavailable too (the same database): retry in place instead, with the
        // consumer's short backoff (the next try may only have to queue the event).
        if let Err(e) = self
            .backlog
            .push(key, message, due, &failure.reason, attempts, now_ms())
            .await
        {
            return Err(HandleError::Retry(format!(
                "{} (and the backlog: {e})",
                failure.reason
            )));
        }
        if failure.deferred {
            self.queued("deferred");
            debug!(reason = %failure.reason, due_ms = due, "effect deferred; the event waits in the backlog");
        } else {
            self.queued("failed");
            warn!(error = %failure.reason, counts = failure.counts, "effect failed; the event waits in the backlog for another try");
        }
        Ok(())
    }
}
