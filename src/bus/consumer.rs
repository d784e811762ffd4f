//! The consumer runtime every worker runs on: decodes deliveries, hands them to the handler on
//! per-key lanes, acks after the effect, retries failures in place and dead-letters what can
//! never succeed. Exports consumed/handle/dead-letter metrics and the group's lag.
//!
//! Ordering: a key always maps to the same lane and a lane handles one event at a time, retrying
//! it in place, so events of one conversation are handled in partition order. A record whose
//! partition was given away while it waited in a lane (or between its retries) is dropped
//! unacked: its next owner handles it, so two members never work through one key's backlog.
//! Different keys run concurrently: a slow conversation stalls only the keys sharing its lane,
//! until its lane's queue (`max_in_flight / concurrency`) is full, which then holds the intake
//! (bounded memory). Nothing is ordered across keys. Delivery is at-least-once: handlers must be idempotent by
//! event id.
//!
//! A broadcast consumer ([`Consumer::broadcast`]) reads the topic's tail without a group: same
//! lanes and metrics, but nothing is committed, and what cannot be decoded or is rejected is
//! skipped (counted, logged), since there is no group to replay it for.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use rand::Rng;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::halt::Halt;
use super::{
    dlq_topic, headers, Bus, BusError, Delivery, Message, OutRecord, Published, StartFrom,
    SubscribeOptions,
};
use crate::config::{ConsumerConfig, StartFromConfig};
use crate::events::{self, Event};
use crate::telemetry::metrics as m;

/// What a handler says about an event it could not apply.
#[derive(Debug, Error)]
pub enum HandleError {
    /// Worth another try later (peer down, timeout); the event is retried in place.
    #[error("retry: {0}")]
    Retry(String),
    /// Worth another try, but no earlier than `not_before_ms` (ms since the epoch; a peer's
    /// `Retry-After`, a previous call still possibly running). `counts` is false when the
    /// failure says nothing about this event (its peer was down for everyone), so retry limits
    /// do not count it.
    #[error("retry later: {reason}")]
    RetryLater {
        reason: String,
        not_before_ms: i64,
        counts: bool,
    },
    /// Nothing failed, but the effect must not run before `until_ms` (ms since the epoch): a
    /// role that waits for late events (the history worker settling a transcript). A role in a
    /// retry backlog parks the event there; elsewhere it waits in place like `RetryLater`.
    #[error("deferred ({reason})")]
    Defer { reason: &'static str, until_ms: i64 },
    /// Can never succeed (peer said 4xx, invalid content); the event goes to the dead-letter
    /// topic with `reason` (a short machine-readable code) and is acked.
    #[error("rejected ({reason}): {detail}")]
    Reject {
        reason: &'static str,
        detail: String,
    },
}

/// The effect of one worker role.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Applies the event's effect; must be idempotent by `event.envelope.event_id`.
    async fn handle(&self, event: &Event, message: &Message) -> Result<(), HandleError>;
}

/// Runtime settings of one consumer.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub concurrency: usize,
    pub max_in_flight: usize,
    pub handler_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub lag_interval: Duration,
    pub start: StartFrom,
}

impl ConsumerOptions {
    pub fn from_config(c: &ConsumerConfig, start: StartFromConfig) -> Self {
        Self {
            concurrency: c.concurrency,
            max_in_flight: c.max_in_flight,
            handler_timeout: Duration::from_millis(c.handler_timeout_ms),
            retry_initial: Duration::from_millis(c.retry_initial_ms),
            retry_max: Duration::from_millis(c.retry_max_ms),
            lag_interval: Duration::from_millis(c.lag_interval_ms),
            start: match start {
                StartFromConfig::Earliest => StartFrom::Earliest,
                StartFromConfig::Latest => StartFrom::Latest,
            },
        }
    }
}

/// Deliveries the intake takes from the subscription at once when they are ready, at most.
const INTAKE_BATCH: usize = 64;

/// How long lanes keep handling taken records after shutdown unless [`Consumer::drain_for`]
/// says otherwise (the default of `consumer.drain_ms`).
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

/// One consumer group member on one topic.
pub struct Consumer {
    bus: Arc<dyn Bus>,
    group: String,
    topic: String,
    options: ConsumerOptions,
    broadcast: bool,
    drain: Duration,
}

impl Consumer {
    pub fn new(bus: Arc<dyn Bus>, group: &str, topic: &str, options: ConsumerOptions) -> Self {
        Self {
            bus,
            group: group.to_string(),
            topic: topic.to_string(),
            options,
            broadcast: false,
            drain: DEFAULT_DRAIN,
        }
    }

    /// On shutdown, lanes keep handling the records already taken from the bus for up to
    /// `drain`, so the member leaves with everything it took acked (a contiguous committed
    /// prefix: the next owner redelivers nothing); after it they stop between events.
    pub fn drain_for(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// Reads the topic's tail ([`Bus::tail`]) instead of joining the group: every process sees
    /// every record appended while it runs. The group name then only labels metrics and logs;
    /// lag is what this reader has not taken yet.
    pub fn broadcast(mut self) -> Self {
        self.broadcast = true;
        self
    }

    /// Consumes until `shutdown` fires, then stops taking records, handles and acks the ones
    /// already taken (for up to the drain time; past it, the events being handled finish and the
    /// rest are left for redelivery) and leaves the group.
    pub async fn run(
        self,
        handler: Arc<dyn Handler>,
        shutdown: CancellationToken,
    ) -> Result<(), BusError> {
        let span = info_span!("consumer", topic = %self.topic, group = %self.group);
        self.run_inner(handler, shutdown).instrument(span).await
    }

    async fn run_inner(
        self,
        handler: Arc<dyn Handler>,
        shutdown: CancellationToken,
    ) -> Result<(), BusError> {
        let opts = SubscribeOptions {
            start: self.options.start,
            max_in_flight: self.options.max_in_flight,
        };
        let lag_stop = shutdown.child_token();
        // A broadcast reader's positions: the next offset to take, per partition.
        let taken: Option<Arc<Taken>> = if self.broadcast {
            Some(Arc::default())
        } else {
            None
        };
        let mut sub = match &taken {
            Some(taken) => {
                let sub = self.bus.tail(&self.topic).await?;
                // The tail starts at the log end of the call; read just after, a record
                // published in between counts as taken (lag reads low by it until it comes).
                for p in self.bus.partition_offsets(&self.topic).await? {
                    lock(taken).insert(p.partition, p.high);
                }
                info!("reading the topic's tail (broadcast)");
                sub
            }
            None => {
                let sub = self.bus.subscribe(&self.group, &self.topic, opts).await?;
                info!("joined consumer group");
                sub
            }
        };
        let lag = tokio::spawn(report_lag_of(
            self.bus.clone(),
            self.group.clone(),
            self.topic.clone(),
            self.options.lag_interval,
            lag_stop.clone(),
            taken.clone(),
        ));

        // Lanes and retries stop at the end of the drain, not at shutdown: records already taken
        // are handled and acked, because an unacked one would hold the committed offset back and
        // every record acked after it in its partition would be delivered again.
        let stop = Arc::new(Halt::default());
        // Set as soon as shutdown fires: the intake reads it per record without a lock.
        let shutting_down = Arc::new(Halt::default());
        // Shutdown, or the intake ending on its own (the subscription failed): either way the
        // lanes get the drain time and then stop, so a lane retrying a handler against a peer
        // that is down cannot keep a consumer that will never take a record again alive.
        let intake_done = shutdown.child_token();
        let drain_deadline = tokio::spawn({
            let (done, stop, drain) = (intake_done.clone(), stop.clone(), self.drain);
            let shutting_down = shutting_down.clone();
            async move {
                done.cancelled().await;
                shutting_down.fire();
                tokio::time::sleep(drain).await;
                stop.fire();
            }
        });
        let ctx = Arc::new(LaneContext {
            bus: self.bus.clone(),
            group: self.group.clone(),
            topic: self.topic.clone(),
            handler,
            options: self.options.clone(),
            stop: stop.clone(),
            metrics: LaneMetrics::new(&self.topic, &self.group),
            broadcast: self.broadcast,
        });
        let lanes = self.options.concurrency.max(1);
        let depth = (self.options.max_in_flight / lanes).max(1);
        let mut senders = Vec::with_capacity(lanes);
        let mut tasks = JoinSet::new();
        for lane in 0..lanes {
            let (tx, rx) = mpsc::channel::<Delivery>(depth);
            senders.push(tx);
            tasks.spawn(run_lane(ctx.clone(), rx).instrument(info_span!("lane", lane)));
        }

        let mut result = Ok(());
        let mut failures = 0u32;
        // Polled only while the intake waits: a token's checks take its lock, which per record
        // cost more than the record's hop to its lane.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        // An error the subscription yielded after a gathered batch, taken next.
        let mut carry: Option<BusError> = None;
        // Records of the batch being gathered, per lane.
        let mut queued = vec![0usize; lanes];
        'intake: loop {
            if shutting_down.is_set() {
                break;
            }
            let next = match carry.take() {
                Some(e) => Some(Err(e)),
                None => tokio::select! {
                    biased;
                    next = sub.next() => next,
                    _ = &mut cancelled => break,
                },
            };
            match next {
                None if shutdown.is_cancelled() => break,
                None => {
                    // Not asked to stop: the backend gave up (its read loop died). The process
                    // must restart rather than run on without this consumer.
                    error!("the subscription ended; consumer stops");
                    result = Err(BusError::Closed);
                    break;
                }
                Some(Ok(delivery)) => {
                    failures = 0;
                    // What else the subscription holds ready goes to the lanes in one go (a
                    // lane woken once takes all of its records), while each record taken still
                    // fits its lane's queue: the intake is the only sender, so all but the last
                    // record go in without waiting. Records go out in delivery order, and only
                    // the last may wait: at most one taken record waits in the intake, and what
                    // shutdown leaves unsent is never below a record handled and acked.
                    let mut batch = Vec::with_capacity(INTAKE_BATCH);
                    let mut fits = |lane: usize| {
                        queued[lane] += 1;
                        queued[lane] <= senders[lane].capacity()
                    };
                    let lane = lane_of(&delivery.message.key, lanes);
                    let mut open = fits(lane);
                    batch.push((lane, delivery));
                    while open && batch.len() < INTAKE_BATCH {
                        match sub.try_next() {
                            None => break,
                            Some(Ok(d)) => {
                                let lane = lane_of(&d.message.key, lanes);
                                open = fits(lane);
                                batch.push((lane, d));
                            }
                            Some(Err(e)) => {
                                carry = Some(e);
                                break;
                            }
                        }
                    }
                    for (lane, _) in &batch {
                        queued[*lane] = 0;
                    }
                    for (lane, delivery) in batch {
                        if let Some(taken) = &taken {
                            let m = &delivery.message;
                            lock(taken).insert(m.partition, m.offset + 1);
                        }
                        let sent = match senders[lane].try_send(delivery) {
                            Ok(()) => Ok(()),
                            // Shutdown first: a record that finds room only as shutdown
                            // fires stays unsent, so what shutdown leaves is the same suffix
                            // whichever wakes the intake.
                            Err(mpsc::error::TrySendError::Full(delivery)) => tokio::select! {
                                biased;
                                _ = &mut cancelled => break 'intake,
                                sent = senders[lane].send(delivery) => sent.map_err(|_| ()),
                            },
                            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
                        };
                        if sent.is_err() {
                            // A lane only ends on shutdown; anything else is a bug worth
                            // stopping for.
                            result = Err(BusError::Closed);
                            break 'intake;
                        }
                    }
                }
                Some(Err(e)) if e.is_transient() => {
                    failures += 1;
                    let wait = backoff(&self.options, failures);
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "bus receive failed; retrying");
                    tokio::select! {
                        _ = &mut cancelled => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Some(Err(e)) => {
                    error!(error = %e, "bus receive failed permanently; consumer stops");
                    result = Err(e);
                    break;
                }
            }
        }
        // Closing the lanes' queues lets each handle what it holds, until the drain ends; what
        // is still queued then is dropped unacked and comes back to the partition's next owner.
        intake_done.cancel();
        drop(senders);
        let drain_started = Instant::now();
        while tasks.join_next().await.is_some() {}
        let drained = !stop.is_set();
        stop.fire();
        drain_deadline.abort();
        info!(
            drain_ms = drain_started.elapsed().as_millis() as u64,
            complete = drained,
            "lanes drained"
        );
        lag_stop.cancel();
        let _ = lag.await;
        if let Err(e) = sub.close().await {
            warn!(error = %e, "leaving the consumer group failed; unacked events will be redelivered");
        }
        info!(broadcast = self.broadcast, "left consumer group");
        result
    }
}

struct LaneContext {
    bus: Arc<dyn Bus>,
    group: String,
    topic: String,
    handler: Arc<dyn Handler>,
    options: ConsumerOptions,
    /// Fires when the drain after shutdown ends: lanes stop between events, retries give up.
    stop: Arc<Halt>,
    metrics: LaneMetrics,
    /// A tail reader: what cannot be handled is skipped, not dead-lettered.
    broadcast: bool,
}

/// The next offset a broadcast reader takes, per partition.
type Taken = Mutex<BTreeMap<u32, u64>>;

/// Locks bookkeeping that stays consistent between statements, poisoned or not.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Metric handles resolved once per consumer: a per-event lookup with cloned label strings
/// cost more than the handler does in a light worker.
struct LaneMetrics {
    handle_seconds: metrics::Histogram,
    handled: metrics::Counter,
    dead_lettered: metrics::Counter,
    skipped: metrics::Counter,
    retried: metrics::Counter,
    revoked: metrics::Counter,
}

impl LaneMetrics {
    fn new(topic: &str, group: &str) -> Self {
        let consumed = |outcome: &'static str| metrics::counter!(m::EVENTS_CONSUMED_TOTAL, "topic" => topic.to_string(), "group" => group.to_string(), "outcome" => outcome);
        Self {
            handle_seconds: metrics::histogram!(m::EVENT_HANDLE_SECONDS, "topic" => topic.to_string(), "group" => group.to_string()),
            handled: consumed("ok"),
            dead_lettered: consumed("dead_lettered"),
            skipped: consumed("skipped"),
            retried: consumed("retried"),
            revoked: consumed("revoked"),
        }
    }
}

/// The lane of a key among `lanes`: same key → same lane, so one conversation is handled in
/// order (public for tests that need keys on distinct lanes).
pub fn lane_of(key: &str, lanes: usize) -> usize {
    // FNV-1a: stable and cheap; any stable hash works.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % lanes as u64) as usize
}

fn backoff(o: &ConsumerOptions, attempt: u32) -> Duration {
    retry_delay(o.retry_initial, o.retry_max, attempt)
}

/// The longest an in-place retry waits for a `RetryLater` time.
const LONGEST_IN_PLACE_WAIT: Duration = Duration::from_secs(300);

/// How often a record waiting to retry looks whether its partition is being given away.
const REVOKE_POLL: Duration = Duration::from_millis(250);

/// How long a lane waits before trying an event again after try `attempt` failed, the handler
/// having asked for `asked` (zero: no time named); and whether the try counts toward the
/// backoff. A wait that says nothing about the event (`counts` false: a peer down for
/// everyone, a write on another topic not landed yet) named its own time: the failure
/// backoff, which grows with the tries, would only add to it, nor does it grow it.
fn in_place_wait(
    o: &ConsumerOptions,
    attempt: u32,
    counts: bool,
    asked: Duration,
) -> (Duration, bool) {
    let (wait, counted) = if !counts && !asked.is_zero() {
        (asked, false)
    } else {
        (backoff(o, attempt).max(asked), true)
    };
    (wait.min(LONGEST_IN_PLACE_WAIT), counted)
}

/// The wait before try `attempt + 1`: `initial` doubled per failed attempt, capped at `max`,
/// with jitter on the upper half.
pub fn retry_delay(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(max);
    // Full jitter on the upper half keeps retrying members from moving in lockstep.
    let half = capped / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

async fn run_lane(ctx: Arc<LaneContext>, mut rx: mpsc::Receiver<Delivery>) {
    // The intake drops its senders as soon as shutdown fires, so a waiting lane wakes with
    // `None`; one with a queue stops between events when the drain ends (the current event
    // always finishes).
    while let Some(delivery) = rx.recv().await {
        if ctx.stop.is_set() {
            return;
        }
        process(&ctx, delivery).await;
    }
}

async fn process(ctx: &LaneContext, delivery: Delivery) {
    let started = Instant::now();
    let msg = &delivery.message;
    if delivery.revoking() {
        // Queued here before a rebalance gave its partition away (or while it does): the
        // next owner has it.
        debug!(
            partition = msg.partition,
            offset = msg.offset,
            "partition revoked; left to its next owner"
        );
        ctx.metrics.revoked.increment(1);
        return;
    }
    // The envelope is read and the whole body checked now (a bad body is dead-lettered here);
    // the body's JSON map is built only if the handler reads it.
    let outcome = match events::decode_lazy(&msg.payload) {
        Err(e) => {
            let span = info_span!(
                "dead_letter",
                partition = msg.partition,
                offset = msg.offset
            );
            match set_aside(ctx, &delivery, e.reason_code(), &e.to_string())
                .instrument(span)
                .await
            {
                Ok(o) => o,
                Err(()) => return, // shutting down or revoked; left for redelivery
            }
        }
        Ok(event) => {
            let span = info_span!(
                "handle",
                event_id = %event.envelope.event_id,
                event_type = %event.envelope.event_type,
                conversation_id = %event.envelope.conversation_id,
                tenant = %event.envelope.tenant_id,
                traceparent = event.envelope.traceparent.as_deref().unwrap_or(""),
                partition = msg.partition,
                offset = msg.offset,
            );
            match handle_with_retry(ctx, &event, &delivery)
                .instrument(span)
                .await
            {
                Some(o) => o,
                None => return,
            }
        }
    };
    ctx.metrics
        .handle_seconds
        .record(started.elapsed().as_secs_f64());
    match outcome {
        Outcome::Handled => ctx.metrics.handled.increment(1),
        Outcome::DeadLettered(reason) => {
            // Rare, and its reason label is open-ended: resolved per event.
            metrics::counter!(m::EVENTS_DEAD_LETTERED_TOTAL, "topic" => ctx.topic.clone(), "group" => ctx.group.clone(), "reason" => reason).increment(1);
            ctx.metrics.dead_lettered.increment(1);
        }
        Outcome::Skipped => ctx.metrics.skipped.increment(1),
    }
    if let Err(e) = delivery.ack().await {
        // The effect is done; a lost ack means a redelivery, which idempotent handlers absorb.
        warn!(error = %e, "ack failed; the event may be delivered again");
    }
}

enum Outcome {
    Handled,
    DeadLettered(&'static str),
    /// A broadcast reader's bad or rejected record.
    Skipped,
}

/// Runs the handler until it succeeds or rejects; `None` if shutdown interrupted the retries
/// or the partition was given away meanwhile (the next owner retries it).
async fn handle_with_retry(
    ctx: &LaneContext,
    event: &Event,
    delivery: &Delivery,
) -> Option<Outcome> {
    let msg = &delivery.message;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // A panic is a bug the event met, which the same event would meet again: it is set
        // aside like a rejection (replayed once fixed) instead of ending the lane, and with
        // it the consumer, in a restart loop on the same record.
        let handled = panic_rejected(ctx.handler.handle(event, msg));
        let result = tokio::time::timeout(ctx.options.handler_timeout, handled).await;
        let (failure, not_before_ms, counts) = match result {
            Ok(Ok(())) => return Some(Outcome::Handled),
            Ok(Err(HandleError::Reject { reason, detail })) => {
                warn!(reason, detail = %detail, "handler rejected the event");
                return set_aside(ctx, delivery, reason, &detail).await.ok();
            }
            Ok(Err(HandleError::Retry(e))) => (e, 0, true),
            Ok(Err(HandleError::RetryLater {
                reason,
                not_before_ms,
                counts,
            })) => (reason, not_before_ms, counts),
            Ok(Err(HandleError::Defer { reason, until_ms })) => {
                (reason.to_string(), until_ms, false)
            }
            Err(_) => (
                format!("handler timed out after {:?}", ctx.options.handler_timeout),
                0,
                true,
            ),
        };
        ctx.metrics.retried.increment(1);
        let until = not_before_ms.saturating_sub(chrono::Utc::now().timestamp_millis());
        let asked = Duration::from_millis(u64::try_from(until).unwrap_or(0));
        let (wait, counted) = in_place_wait(&ctx.options, attempt, counts, asked);
        if !counted {
            attempt -= 1;
        }
        warn!(attempt, error = %failure, retry_in_ms = wait.as_millis() as u64, "handler failed; retrying");
        // Looked at while waiting, not only after: a partition given away meanwhile is left
        // to its next owner now, not after a wait of up to minutes (that a revoke would wait
        // for, the record being under way).
        if !wait_unless_revoked(ctx, delivery, wait).await {
            return None;
        }
    }
}

/// Runs an effect, a panic in it becoming a `handler_panicked` rejection: a bug the event met,
/// which the same event would meet again, is set aside (dead-lettered, replayed once fixed)
/// instead of ending the task that runs it.
pub async fn panic_rejected(
    effect: impl std::future::Future<Output = Result<(), HandleError>>,
) -> Result<(), HandleError> {
    AssertUnwindSafe(effect)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Err(HandleError::Reject {
                reason: "handler_panicked",
                detail: panic_message(panic.as_ref()),
            })
        })
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// Takes a record that cannot be handled out of the way: dead-lettered, or for a broadcast
/// reader skipped. `Err` only when shutdown or a revoke interrupts.
async fn set_aside(
    ctx: &LaneContext,
    delivery: &Delivery,
    reason: &'static str,
    detail: &str,
) -> Result<Outcome, ()> {
    if ctx.broadcast {
        warn!(
            reason,
            detail, "broadcast reader skips the event (no group to replay it for)"
        );
        return Ok(Outcome::Skipped);
    }
    dead_letter(ctx, delivery, reason, detail).await?;
    Ok(Outcome::DeadLettered(reason))
}

/// Writes the record to the topic's dead-letter topic, retrying until the bus takes it: an
/// event is acked only once it is safe somewhere. A copy the bus refuses as too large goes
/// without its payload, which stays in the source topic at the offset the headers name (the
/// failure's headers made it larger than the source record the bus took). `Err` only when
/// shutdown interrupts or the partition was given away meanwhile (its next owner takes over).
async fn dead_letter(
    ctx: &LaneContext,
    delivery: &Delivery,
    reason: &str,
    detail: &str,
) -> Result<(), ()> {
    let msg = &delivery.message;
    let record = dead_letter_record(msg, &ctx.group, reason, detail);
    let dlq = dlq_topic(&msg.topic);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match publish_dead_letter(ctx.bus.as_ref(), &dlq, record.clone()).await {
            Ok(p) => {
                warn!(reason, dlq = %dlq, dlq_partition = p.partition, dlq_offset = p.offset, "event dead-lettered");
                return Ok(());
            }
            Err(e) => {
                let wait = backoff(&ctx.options, attempt);
                error!(error = %e, dlq = %dlq, "cannot write to the dead-letter topic; retrying (consumption of this key is held)");
                // Like a handler's retry wait: a partition given away meanwhile is left to its
                // next owner now, not after a back-off of up to `retry_max`, which the hand-over
                // would wait for (the record being under way).
                if !wait_unless_revoked(ctx, delivery, wait).await {
                    return Err(());
                }
            }
        }
    }
}

/// Waits `wait` before a record's next try, looking meanwhile whether its partition is being
/// given away (counted as revoked) or the drain ended: `false` then, and the record is left.
async fn wait_unless_revoked(ctx: &LaneContext, delivery: &Delivery, wait: Duration) -> bool {
    let until = tokio::time::Instant::now() + wait;
    loop {
        if delivery.revoking() {
            ctx.metrics.revoked.increment(1);
            return false;
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return true;
        }
        tokio::select! {
            _ = ctx.stop.fired() => return false,
            _ = tokio::time::sleep((until - now).min(REVOKE_POLL)) => {}
        }
    }
}

/// Publishes a dead-letter record; one the broker refuses as too large (the source record
/// fitted, the failure's headers did not) goes again without its payload.
pub async fn publish_dead_letter(
    bus: &dyn Bus,
    dlq: &str,
    record: OutRecord,
) -> Result<Published, BusError> {
    match bus.publish(dlq, record.clone()).await {
        Err(BusError::TooLarge(e)) if !record.payload.is_empty() => {
            warn!(error = %e, dlq = %dlq, "the dead-letter copy is too large; written without its payload");
            bus.publish(dlq, without_payload(record)).await
        }
        other => other,
    }
}

/// A dead-letter record without its payload, saying how large the payload was.
fn without_payload(mut record: OutRecord) -> OutRecord {
    let size = record.payload.len();
    record.payload = Bytes::new();
    record
        .headers
        .push((headers::DLQ_PAYLOAD_OMITTED.to_string(), size.to_string()));
    record
}

/// `msg` as its dead-letter record: the same key, payload and headers, plus why (`reason`,
/// `detail`), where it came from and which `group` set it aside.
pub fn dead_letter_record(msg: &Message, group: &str, reason: &str, detail: &str) -> OutRecord {
    let mut record = OutRecord::new(msg.key.clone(), msg.payload.clone());
    record.headers = msg.headers.clone();
    record.headers.extend([
        (headers::DLQ_REASON.to_string(), reason.to_string()),
        (headers::DLQ_ERROR.to_string(), truncate(detail, 1024)),
        (headers::DLQ_SOURCE_TOPIC.to_string(), msg.topic.clone()),
        (
            headers::DLQ_SOURCE_PARTITION.to_string(),
            msg.partition.to_string(),
        ),
        (
            headers::DLQ_SOURCE_OFFSET.to_string(),
            msg.offset.to_string(),
        ),
        (headers::DLQ_GROUP.to_string(), group.to_string()),
    ]);
    record
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Measures the group's lag on a timer, also while the consumer is idle or stuck, and exports
/// `nexus_consumer_lag{topic,partition,group}`. A broadcast reader (`taken`) has no group
/// position: its lag is what lies between what it took and the log end.
pub async fn report_lag(
    bus: Arc<dyn Bus>,
    group: String,
    topic: String,
    every: Duration,
    stop: CancellationToken,
) {
    report_lag_of(bus, group, topic, every, stop, None).await
}

async fn report_lag_of(
    bus: Arc<dyn Bus>,
    group: String,
    topic: String,
    every: Duration,
    stop: CancellationToken,
    taken: Option<Arc<Taken>>,
) {
    let span = info_span!("lag_reporter", topic = %topic, group = %group);
    async {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let positions = match &taken {
                Some(taken) => tail_lag(bus.as_ref(), &topic, taken).await,
                None => bus.group_positions(&group, &topic).await.map(|ps| {
                    ps.into_iter().map(|p| (p.partition, p.lag)).collect()
                }),
            };
            match positions {
                Ok(positions) => {
                    for (partition, lag) in positions {
                        metrics::gauge!(m::CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string(), "group" => group.clone())
                            .set(lag as f64);
                    }
                }
                Err(e) => {
                    metrics::counter!(m::CONSUMER_LAG_ERRORS_TOTAL, "topic" => topic.clone(), "group" => group.clone()).increment(1);
                    debug!(error = %e, "lag measurement failed");
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// A broadcast reader's lag per partition: records between its next offset and the log end.
async fn tail_lag(bus: &dyn Bus, topic: &str, taken: &Taken) -> Result<Vec<(u32, u64)>, BusError> {
    let mut out = Vec::new();
    for p in bus.partition_offsets(topic).await? {
        let next = lock(taken).get(&p.partition).copied().unwrap_or(p.low);
        let lag = if next >= p.high {
            0
        } else {
            bus.count_between(topic, p.partition, next.max(p.low), p.high)
                .await?
        };
        out.push((p.partition, lag));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_keeps_its_lane() {
        for k in ["a", "conv-1", "0190-uuid"] {
            assert_eq!(lane_of(k, 16), lane_of(k, 16));
            assert!(lane_of(k, 16) < 16);
        }
        let used: std::collections::HashSet<usize> =
            (0..200).map(|i| lane_of(&format!("k{i}"), 8)).collect();
        assert_eq!(used.len(), 8);
    }

    #[test]
    fn a_wait_for_something_else_takes_the_time_it_names() {
        let o = ConsumerOptions {
            concurrency: 1,
            max_in_flight: 1,
            handler_timeout: Duration::from_secs(1),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            lag_interval: Duration::from_secs(1),
            start: StartFrom::Earliest,
        };
        let soon = Duration::from_millis(50);
        // Late in a series of tries the failure backoff is seconds; a named wait is not.
        assert_eq!(in_place_wait(&o, 12, false, soon), (soon, false));
        let (failed, counted) = in_place_wait(&o, 12, true, soon);
        assert!(failed >= Duration::from_secs(15) && counted, "{failed:?}");
        // No time named: the backoff, whatever the failure says.
        let (unnamed, counted) = in_place_wait(&o, 1, false, Duration::ZERO);
        assert!(
            unnamed >= Duration::from_millis(50) && counted,
            "{unnamed:?}"
        );
        assert_eq!(
            in_place_wait(&o, 1, false, Duration::from_secs(3600)).0,
            LONGEST_IN_PLACE_WAIT
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let o = ConsumerOptions {
            concurrency: 1,
            max_in_flight: 1,
            handler_timeout: Duration::from_secs(1),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            lag_interval: Duration::from_secs(1),
            start: StartFrom::Earliest,
        };
        let first = backoff(&o, 1);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let late = backoff(&o, 30);
        assert!(late >= Duration::from_millis(500) && late <= Duration::from_millis(1000));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
