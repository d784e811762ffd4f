//! The delivery engine: a background loop of the role that claims due messages (woken at once
//! by new ones, else every `poll_interval_ms`), sends each as one signed attempt under global
//! and per-endpoint limits, logs the attempt and schedules the next, dead-letters exhausted
//! messages and disables endpoints that keep failing.
//!
//! A receiver that answers 429 or 503 with `Retry-After` holds its endpoint, not only the
//! message: this process sends it nothing more until then, gives back what it held, and marks
//! the endpoint paused in the database so no pod claims its messages before the time. (Another
//! pod's own new messages, sent before they are written, learn it from their own answer.)
//!
//! A stop drains: nothing new is leased or started, what the process held goes back due at
//! once, and the attempts under way finish and are logged (up to `timeout_ms` + 5 s), so a
//! rolling restart neither repeats them nor leaves held messages waiting out their leases.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::config::WebhooksConfig;
use super::signing;
use super::store::{After, AttemptRecord, Claimed, Left, MessageStore, NewMessage};
use crate::bus::Bus;
use crate::events::publish::publish;
use crate::events::webhook::{
    WebhookEndpointDisabled, WebhookMessageDead, WEBHOOK_DEAD_TOPIC, WEBHOOK_EVENTS_TOPIC,
};
use crate::events::Event;
use crate::http_client::target;
use crate::stores::provisioning::{PendingDisable, Provisioning, WebhookFormat, WebhookTarget};
use crate::telemetry::metrics as m;

/// Beyond the attempt timeout, how long a claim holds a message: covers the log write after
/// the answer, so a live sender never loses its claim; a dead sender's claim lapses this late.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Most messages one claim query takes: keeps each query short.
const MAX_BATCH: usize = 256;
/// A busy loop claims at most this often when attempts finish (new messages claim at once).
const CLAIM_EVERY: Duration = Duration::from_millis(10);
/// An endpoint holds at most this many times its in-flight limit of claimed messages.
const HELD_FACTOR: usize = 4;
/// New messages leased at insert an endpoint may hold, as a multiple of its in-flight limit,
/// and the process, as a multiple of `max_in_flight`: more than a claim takes, since a message
/// leased at insert costs no claim statement (a burst mostly skips the claim).
const ADOPT_FACTOR: usize = 16;
const ADOPT_GLOBAL_FACTOR: usize = 4;
/// A held message waiting longer than this renews its lease before it is sent.
const RENEW_AFTER: Duration = Duration::from_secs(1);
/// How long a subscription's URL and secrets are reused before reading them again: rotations
/// and URL changes take effect within this.
const TARGET_TTL: Duration = Duration::from_secs(1);
/// How often, at most, expired subscriptions leave the cache.
const TARGET_SWEEP: Duration = Duration::from_secs(10);
/// Dead-letter publishes of exhausted messages run at once per process (see `dead_letters`).
const DEAD_LETTERS_IN_FLIGHT: usize = 4;
/// A message whose subscription could not be read is tried again this much later, uncharged.
const TARGET_UNREADABLE_WAIT_MS: i64 = 5_000;

/// Subscriptions (with their decrypted secrets) read within [`TARGET_TTL`], by id.
struct Targets {
    map: HashMap<String, (Instant, Arc<WebhookTarget>)>,
    swept: Instant,
}
/// How often a healthy endpoint's failure clock is cleared at most (one write, not one per
/// delivery).
const CLEAR_EVERY: Duration = Duration::from_secs(1);
/// Pending messages from which a change of 4× refreshes the log's planner statistics.
const ANALYZE_MIN: i64 = 1000;
/// Largest answer body read from a receiver (the rest is dropped).
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Most attempt outcomes one log statement writes.
const MAX_LOG_BATCH: usize = 512;
/// Log statements in flight at once: the next batch gathers while one is written.
const LOG_WRITERS: usize = 2;
/// Once the drain after a stop is over, how long the log writer still waits for an outcome
/// (one sent as the last permits came back) before it stops.
const LOG_DRAIN: Duration = Duration::from_millis(500);
/// How long a failed dead-letter publish waits before the next try (the bus is down).
const DEAD_LETTER_RETRY_MS: i64 = super::store::EXHAUSTED_RECLAIM_MS;
/// How long a dead-letter publish holds its message past its last renewal: no claim takes the
/// message (for a second publish of the same record) before, and one whose publisher died is
/// taken over this late at most. However long the bus takes to acknowledge, the hold is
/// renewed every [`DEAD_LETTER_RENEW`] while the publish waits.
const DEAD_LETTER_HOLD_MS: i64 = 10_000;
/// Renewal period of a dead-letter hold, counted from when the hold last ran until (not from
/// when the write answered): under a third of it, so a renewal that waits its 5 s for a pool
/// connection (`DB_ACQUIRE_TIMEOUT`) still lands before the hold lapses.
const DEAD_LETTER_RENEW: Duration = Duration::from_secs(3);
/// How long until a hold running until `held_ms` is due for renewal: [`DEAD_LETTER_RENEW`]
/// after it was taken or last renewed, however long that write itself waited; a renewal that
/// failed (past due) is tried again after a short pause, not in a busy loop.
fn renew_in(held_ms: i64) -> Duration {
    let period = i64::try_from(DEAD_LETTER_RENEW.as_millis()).unwrap_or(i64::MAX);
    let due = held_ms - DEAD_LETTER_HOLD_MS + period;
    Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0).max(100))
}

/// How long a disable is its disabler's to announce before the periodic pass publishes its
/// event: longer than that announce takes (a subscription read, then a bus publish: JetStream
/// 5 s, Kafka up to `bus.kafka.message_timeout_ms`, 30 s by default), so the two do not both
/// put one disable on the topic.
const DISABLE_EVENT_GRACE_MS: i64 = 60_000;

/// The producer name on events this role publishes.
const PRODUCER: &str = "webhooks";

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Per-subscription metric labels as a bounded set: the first `max` subscriptions a process
/// sees are labelled by id, every later one shares `other`.
pub struct Labels {
    max: usize,
    known: Mutex<HashSet<String>>,
}

impl Labels {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            known: Mutex::new(HashSet::new()),
        }
    }

    pub fn of(&self, webhook_id: &str) -> String {
        let mut known = match self.known.lock() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        if known.contains(webhook_id) {
            return webhook_id.to_string();
        }
        if known.len() < self.max {
            known.insert(webhook_id.to_string());
            return webhook_id.to_string();
        }
        "other".to_string()
    }
}

/// A claimed message waiting for a slot of its endpoint.
struct Held {
    /// Carries the lease it is held under (`lease_until_ms`).
    msg: Claimed,
    claimed_at: Instant,
}

/// One endpoint's share of the process.
#[derive(Default)]
struct Lane {
    /// The endpoint's tenant (set by the first message held).
    tenant: String,
    in_flight: usize,
    held: VecDeque<Held>,
    /// The receiver asked for a pause (Retry-After) until then: nothing is started.
    paused_until: Option<Instant>,
}

impl Lane {
    fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|t| t > now)
    }

    fn hold(&mut self, msg: Claimed) {
        if self.tenant.is_empty() {
            self.tenant.clone_from(&msg.tenant_id);
        }
        self.held.push_back(Held {
            msg,
            claimed_at: Instant::now(),
        });
    }
}

/// The endpoints' lanes and, per tenant, its attempts in flight (all its endpoints together).
#[derive(Default)]
struct Lanes {
    endpoints: HashMap<String, Lane>,
    tenants: HashMap<String, usize>,
    /// Where the next [`Dispatcher::start_held`] begins among the lanes with held work, so
    /// freed slots go round the endpoints instead of to the same first ones.
    turn: usize,
}

impl Lanes {
    fn tenant_full(&self, tenant: &str, limit: usize) -> bool {
        self.tenants.get(tenant).is_some_and(|n| *n >= limit)
    }

    /// Takes the held messages to start now, each with the slot `permit` gives (none left ends
    /// it): one per lane per round, within the per-endpoint and per-tenant limits, the rounds
    /// beginning at a lane that moves on each call, so a slot that frees goes round the
    /// endpoints with held work instead of to the same first ones.
    fn take_starts<P>(
        &mut self,
        now: Instant,
        per: usize,
        per_tenant: usize,
        mut permit: impl FnMut() -> Option<P>,
    ) -> Vec<(Held, P)> {
        let Lanes {
            endpoints,
            tenants,
            turn,
        } = self;
        let mut ids: Vec<String> = endpoints
            .iter()
            .filter(|(_, l)| !l.held.is_empty() && !l.paused(now))
            .map(|(id, _)| id.clone())
            .collect();
        if !ids.is_empty() {
            ids.sort_unstable();
            let first = *turn % ids.len();
            ids.rotate_left(first);
            *turn = turn.wrapping_add(1);
        }
        let mut starts = Vec::new();
        'rounds: loop {
            let mut started = false;
            for id in &ids {
                let Some(lane) = endpoints.get_mut(id) else {
                    continue;
                };
                let busy = tenants.entry(lane.tenant.clone()).or_default();
                if lane.held.is_empty() || lane.in_flight >= per || *busy >= per_tenant {
                    continue;
                }
                let Some(p) = permit() else {
                    break 'rounds;
                };
                if let Some(h) = lane.held.pop_front() {
                    lane.in_flight += 1;
                    *busy += 1;
                    starts.push((h, p));
                    started = true;
                }
            }
            if !started {
                break;
            }
        }
        endpoints.retain(|_, l| l.in_flight > 0 || !l.held.is_empty() || l.paused(now));
        tenants.retain(|_, n| *n > 0);
        starts
    }

    /// Held messages that can start now and so will take process slots: per endpoint, no more
    /// than its free slots. What a busy or paused endpoint, or a full tenant, holds waits for
    /// its own slots, not the process's: counting it would shrink the claim for everyone
    /// else (a hanging endpoint holding 16× its limit of new messages stopped every claim).
    fn startable(&self, now: Instant, per: usize, full_tenants: &[String]) -> usize {
        self.endpoints
            .values()
            .filter(|l| !l.paused(now) && !full_tenants.contains(&l.tenant))
            .map(|l| l.held.len().min(per.saturating_sub(l.in_flight)))
            .sum()
    }

    /// Tenants at their in-flight limit: their messages would only wait in this process.
    fn full_tenants(&self, limit: usize) -> Vec<String> {
        self.tenants
            .iter()
            .filter(|(_, n)| **n >= limit)
            .map(|(t, _)| t.clone())
            .collect()
    }
}

/// A finished attempt waiting for the log writer; `done` answers once it is committed.
struct Outcome {
    msg: Claimed,
    record: AttemptRecord,
    after: After,
    done: oneshot::Sender<Result<(), String>>,
}

/// The result of one HTTP attempt.
struct Sent {
    record: AttemptRecord,
    ok: bool,
    abort: bool,
    /// How long the receiver asked us to wait (`Retry-After` on a 429 or 503).
    retry_after: Option<Duration>,
}

pub struct Dispatcher {
    store: MessageStore,
    provisioning: Arc<Provisioning>,
    bus: Arc<dyn Bus>,
    client: reqwest::Client,
    config: WebhooksConfig,
    /// New messages (handler) wake the loop to claim at once.
    wake: Notify,
    /// A finished attempt wakes the loop to start the next held message.
    done: Notify,
    global: Arc<Semaphore>,
    /// Dead-letter publishes of messages found exhausted at claim (a publish that failed
    /// before): few at once, the rest given back, so a bus that refuses them does not turn
    /// each claim into a task per message.
    dead_letters: Arc<Semaphore>,
    /// Per endpoint: attempts in flight and claimed messages waiting for a slot; per tenant:
    /// attempts in flight.
    lanes: Mutex<Lanes>,
    targets: Mutex<Targets>,
    /// When this process last cleared an endpoint's failure clock; a failure forgets it.
    cleared: Mutex<HashMap<String, Instant>>,
    labels: Labels,
    /// Finished attempts to the log writer, which writes them in batches.
    outcomes: mpsc::UnboundedSender<Outcome>,
    outcomes_rx: Mutex<Option<mpsc::UnboundedReceiver<Outcome>>>,
    /// Set when the dispatch loop stops: no new message is leased or started.
    stopping: AtomicBool,
    /// Cancelled once the attempts under way at the stop have ended (or the drain gave up on
    /// them): the log writer then writes what is left and stops.
    drained: CancellationToken,
}

impl Dispatcher {
    pub fn new(
        store: MessageStore,
        provisioning: Arc<Provisioning>,
        bus: Arc<dyn Bus>,
        client: reqwest::Client,
        config: WebhooksConfig,
    ) -> Self {
        // Unbounded, yet bounded by `max_in_flight`: each waiting outcome holds a permit.
        let (outcomes, rx) = mpsc::unbounded_channel();
        Self {
            outcomes,
            outcomes_rx: Mutex::new(Some(rx)),
            global: Arc::new(Semaphore::new(config.max_in_flight)),
            dead_letters: Arc::new(Semaphore::new(DEAD_LETTERS_IN_FLIGHT)),
            labels: Labels::new(config.metric_subscriptions),
            store,
            provisioning,
            bus,
            client,
            config,
            wake: Notify::new(),
            done: Notify::new(),
            lanes: Mutex::new(Lanes::default()),
            targets: Mutex::new(Targets {
                map: HashMap::new(),
                swept: Instant::now(),
            }),
            cleared: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            drained: CancellationToken::new(),
        }
    }

    /// New messages are due: claim them now rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Leases for new messages this process sends itself, without a claim: per message, the
    /// lease when it is due at once and its endpoint and the process hold fewer than
    /// [`ADOPT_FACTOR`] / [`ADOPT_GLOBAL_FACTOR`] allow, else `None` (a claim finds it later;
    /// a held message waiting past [`RENEW_AFTER`] renews its lease before it goes). The caller writes the
    /// leases with the messages, then hands the new ones to [`Dispatcher::adopt`].
    pub fn offer(&self, ms: &[NewMessage]) -> Vec<Option<i64>> {
        let per = self.config.max_in_flight_per_endpoint;
        let per_tenant = self.config.max_in_flight_per_tenant;
        let lease = self.lease_until(now_ms());
        let lanes = self.lock_lanes();
        if self.stopping.load(Ordering::SeqCst) {
            // The loop is draining: other pods claim them, at once (no lease to lapse).
            return vec![None; ms.len()];
        }
        let mut room = (ADOPT_GLOBAL_FACTOR * self.config.max_in_flight)
            .saturating_sub(lanes.endpoints.values().map(|l| l.held.len()).sum());
        let mut taken: HashMap<&str, usize> = HashMap::new();
        let now = Instant::now();
        ms.iter()
            .map(|m| {
                let lane = lanes.endpoints.get(&m.webhook_id);
                let held = lane.map_or(0, |l| l.held.len());
                let mine = taken.entry(m.webhook_id.as_str()).or_default();
                if m.event != crate::stores::provisioning::WebhookEvent::Started
                    || room == 0
                    || held + *mine >= ADOPT_FACTOR * per
                    || lane.is_some_and(|l| l.paused(now))
                    || lanes.tenant_full(&m.tenant_id, per_tenant)
                {
                    return None;
                }
                room -= 1;
                *mine += 1;
                Some(lease)
            })
            .collect()
    }

    /// Holds new messages this process leased at insert (see [`Dispatcher::offer`]) and
    /// starts them as their endpoints allow.
    pub async fn adopt(self: &Arc<Self>, ms: Vec<(Claimed, i64)>) {
        if ms.is_empty() {
            return;
        }
        {
            let mut lanes = self.lock_lanes();
            for (mut msg, lease_until) in ms {
                msg.lease_until_ms = lease_until;
                lanes
                    .endpoints
                    .entry(msg.webhook_id.clone())
                    .or_default()
                    .hold(msg);
            }
        }
        // Started from here: the loop may be waiting on a claim round trip.
        self.start_held().await;
    }

    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The dispatch loop, until `stop` fires. New messages and the poll claim at once; a
    /// finished attempt starts the next held message of its endpoint and claims at most every
    /// [`CLAIM_EVERY`], so a busy worker claims in batches, not once per delivery.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        async {
            let mut last_claim = Instant::now();
            let mut claim = true;
            // A finished attempt asked for a claim inside CLAIM_EVERY: claim when it is over.
            let mut owed = false;
            loop {
                self.start_held().await;
                if claim {
                    self.claim().await;
                    last_claim = Instant::now();
                    owed = false;
                }
                let since = last_claim.elapsed();
                let wait = if owed {
                    CLAIM_EVERY.saturating_sub(since)
                } else {
                    poll.saturating_sub(since)
                };
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.wake.notified() => claim = true,
                    _ = self.done.notified() => {
                        claim = last_claim.elapsed() >= CLAIM_EVERY;
                        owed = owed || !claim;
                    }
                    _ = tokio::time::sleep(wait) => claim = true,
                }
            }
            self.drain().await;
            tracing::info!("webhook dispatcher stopped");
        }
        .instrument(tracing::info_span!("webhooks.dispatch"))
        .await
    }

    /// After the stop (SIGTERM of a rolling deploy): what this process holds goes back at once,
    /// due now, for the other pods (rather than after its lease, `timeout_ms` + 5 s), and the
    /// attempts under way finish and are logged, for at most `timeout_ms` + 5 s (an attempt
    /// cut off by the exit would be sent again under the same webhook-id once its lease
    /// lapsed). Then the log writer may stop.
    async fn drain(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let held: Vec<(String, i64)> = {
            let mut lanes = self.lock_lanes();
            lanes
                .endpoints
                .values_mut()
                .flat_map(|l| l.held.drain(..))
                .map(|h| (h.msg.id, h.msg.lease_until_ms))
                .collect()
        };
        if !held.is_empty() {
            tracing::info!(
                given_back = held.len(),
                "stopping; held webhook messages given back"
            );
            self.give_back(&held, now_ms()).await;
        }
        // Each attempt holds a process-wide permit until its outcome is logged and followed up.
        let all = u32::try_from(self.config.max_in_flight).unwrap_or(u32::MAX);
        let limit = self.config.timeout() + LEASE_MARGIN;
        if tokio::time::timeout(limit, self.global.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("webhook attempts still under way after the drain; they go again under the same webhook-id");
        }
        self.drained.cancel();
    }

    /// The log writer, until `stop` and then until the attempts under way at the stop have
    /// logged (see [`Dispatcher::drain`]; without a dispatch loop, at most `timeout_ms` + 5 s):
    /// writes finished attempts in batches of what gathered while the previous statement ran,
    /// [`LOG_WRITERS`] statements at a time.
    pub async fn log_writer(self: Arc<Self>, stop: CancellationToken) {
        let taken = self
            .outcomes_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(mut rx) = taken else { return };
        let writers = Arc::new(Semaphore::new(LOG_WRITERS));
        async {
            let mut give_up = None;
            loop {
                let Ok(slot) = writers.clone().acquire_owned().await else {
                    break;
                };
                let first = if self.drained.is_cancelled() {
                    // Every attempt under way at the stop has logged: what is left, then stop.
                    match tokio::time::timeout(LOG_DRAIN, rx.recv()).await {
                        Ok(Some(o)) => o,
                        _ => break,
                    }
                } else if stop.is_cancelled() {
                    let until = *give_up.get_or_insert_with(|| {
                        tokio::time::Instant::now()
                            + self.config.timeout()
                            + LEASE_MARGIN
                            + LOG_DRAIN
                    });
                    tokio::select! {
                        _ = self.drained.cancelled() => continue,
                        _ = tokio::time::sleep_until(until) => break,
                        o = rx.recv() => match o { Some(o) => o, None => break },
                    }
                } else {
                    tokio::select! {
                        _ = stop.cancelled() => continue,
                        o = rx.recv() => match o { Some(o) => o, None => break },
                    }
                };
                let mut batch = vec![first];
                while batch.len() < MAX_LOG_BATCH {
                    match rx.try_recv() {
                        Ok(o) => batch.push(o),
                        Err(_) => break,
                    }
                }
                let me = self.clone();
                tokio::spawn(async move {
                    me.write_outcomes(batch).await;
                    drop(slot);
                });
            }
            // Let the last statements finish before the role stops.
            let _ = writers.acquire_many(LOG_WRITERS as u32).await;
        }
        .instrument(tracing::info_span!("webhooks.log_writer"))
        .await
    }

    async fn write_outcomes(&self, batch: Vec<Outcome>) {
        metrics::histogram!(m::WEBHOOK_LOG_BATCH_SIZE).record(batch.len() as f64);
        let items: Vec<_> = batch.iter().map(|o| (&o.msg, &o.record, o.after)).collect();
        let result = self
            .store
            .record_batch(&items, now_ms())
            .await
            .map_err(|e| e.to_string());
        for o in batch {
            let _ = o.done.send(result.clone());
        }
    }

    /// Logs one finished attempt through the log writer; once committed, Ok.
    async fn log(&self, msg: &Claimed, record: &AttemptRecord, after: After) -> Result<(), String> {
        let (done, answer) = oneshot::channel();
        let outcome = Outcome {
            msg: msg.clone(),
            record: record.clone(),
            after,
            done,
        };
        if self.outcomes.send(outcome).is_err() {
            return Err("the log writer stopped".into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err("the log writer stopped".into()))
    }

    fn lock_lanes(&self) -> std::sync::MutexGuard<'_, Lanes> {
        match self.lanes.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn lease_until(&self, now: i64) -> i64 {
        now + i64::try_from((self.config.timeout() + LEASE_MARGIN).as_millis())
            .unwrap_or(i64::MAX / 2)
    }

    /// Claims due messages into the endpoints' held queues, as many as free capacity allows,
    /// skipping endpoints that already hold a full share and tenants at their limit.
    async fn claim(self: &Arc<Self>) {
        let per = self.config.max_in_flight_per_endpoint;
        let per_tenant = self.config.max_in_flight_per_tenant;
        loop {
            let (held, saturated, full, room) = {
                let lanes = self.lock_lanes();
                let full = lanes.full_tenants(per_tenant);
                let now = Instant::now();
                let held = lanes.startable(now, per, &full);
                let saturated: Vec<String> = lanes
                    .endpoints
                    .iter()
                    .filter(|(_, l)| l.held.len() >= per || l.paused(now))
                    .map(|(id, _)| id.clone())
                    .collect();
                // What the busy endpoints can still hold, plus a share for endpoints this
                // process holds nothing of: a larger claim would be given back in part.
                let room: usize = lanes
                    .endpoints
                    .values()
                    .filter(|l| l.held.len() < per)
                    .map(|l| HELD_FACTOR * per - l.held.len())
                    .sum::<usize>()
                    + HELD_FACTOR * per;
                (held, saturated, full, room)
            };
            let want = self
                .global
                .available_permits()
                .saturating_sub(held)
                .min(room)
                .min(MAX_BATCH);
            if want == 0 {
                return;
            }
            let now = now_ms();
            let lease = self.lease_until(now);
            let batch = match self.store.claim(now, lease, want, &saturated, &full).await {
                Ok(b) => b,
                Err(e) => {
                    metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "claim")
                        .increment(1);
                    tracing::warn!(error = %e, "claiming due webhook messages failed; next poll retries");
                    return;
                }
            };
            let got = batch.len();
            let mut give_back = Vec::new();
            {
                let mut lanes = self.lock_lanes();
                for msg in batch {
                    if msg.round_attempts as usize >= self.config.retry_schedule_ms.len() {
                        // Exhausted earlier, but the dead-letter publish did not complete.
                        let Ok(permit) = self.dead_letters.clone().try_acquire_owned() else {
                            give_back.push((msg.id, msg.lease_until_ms));
                            continue;
                        };
                        let me = self.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            let left = Left {
                                attempts: msg.attempts,
                                round_attempts: msg.round_attempts,
                                lease_until_ms: Some(msg.lease_until_ms),
                            };
                            let (code, error) = (msg.last_status_code, msg.last_error.clone());
                            me.dead_letter(&msg, left, code, error).await;
                        });
                        continue;
                    }
                    let lane = lanes.endpoints.entry(msg.webhook_id.clone()).or_default();
                    // One claim can bring many messages of one endpoint: hold a bounded
                    // number, give the rest back for later claims (or other pods).
                    if lane.held.len() >= HELD_FACTOR * per {
                        give_back.push((msg.id, msg.lease_until_ms));
                    } else {
                        lane.hold(msg);
                    }
                }
            }
            if !give_back.is_empty() {
                if let Err(e) = self.store.release(&give_back, now_ms()).await {
                    metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "release")
                        .increment(1);
                    tracing::warn!(error = %e, "releasing webhook messages failed; their lease lapses");
                }
            }
            self.start_held().await;
            if got < want || !give_back.is_empty() {
                return;
            }
        }
    }

    /// Starts held messages while their endpoint, its tenant and the process have room. A
    /// message held longer than [`RENEW_AFTER`] renews its lease first (and is dropped if it
    /// lost it).
    async fn start_held(self: &Arc<Self>) {
        if self.stopping.load(Ordering::SeqCst) {
            // Draining: nothing new starts (it would be cut off by the exit); what is held was
            // given back, and a message adopted since keeps its lease until it lapses.
            return;
        }
        let per = self.config.max_in_flight_per_endpoint;
        let per_tenant = self.config.max_in_flight_per_tenant;
        let starts = self
            .lock_lanes()
            .take_starts(Instant::now(), per, per_tenant, || {
                self.global.clone().try_acquire_owned().ok()
            });
        for (mut h, permit) in starts {
            let me = self.clone();
            // The lease renewal of a message held a while runs in its own task: waiting on
            // the database here would hold back the other starts (and the consumer lane that
            // called this through `adopt`).
            tokio::spawn(async move {
                if h.claimed_at.elapsed() > RENEW_AFTER {
                    let lease = me.lease_until(now_ms());
                    let renewed = me.store.renew(&h.msg.id, h.msg.lease_until_ms, lease).await;
                    if !matches!(renewed, Ok(true)) {
                        // Another sender has it (or the log is down): leave it to the lease.
                        drop(permit);
                        me.finished(&h.msg.webhook_id);
                        me.done.notify_one();
                        return;
                    }
                    h.msg.lease_until_ms = lease;
                }
                me.attempt(h.msg, permit).await
            });
        }
    }

    /// The receiver asked for `wait` (capped by `retry_after_max_ms`): the endpoint starts
    /// nothing until then, what this process held of it is given back due then, and the
    /// database pause keeps every pod's claims off it.
    async fn pause(&self, webhook_id: &str, wait: Duration) {
        let wait = wait.min(Duration::from_millis(self.config.retry_after_max_ms));
        let until = Instant::now() + wait;
        let until_ms = now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        let given_back: Vec<(String, i64)> = {
            let mut lanes = self.lock_lanes();
            let lane = lanes.endpoints.entry(webhook_id.to_string()).or_default();
            if lane.paused_until.is_some_and(|t| t >= until) {
                return;
            }
            lane.paused_until = Some(until);
            lane.held
                .drain(..)
                .map(|h| (h.msg.id, h.msg.lease_until_ms))
                .collect()
        };
        metrics::counter!(m::WEBHOOK_ENDPOINT_PAUSES_TOTAL, "subscription" => self.labels.of(webhook_id))
            .increment(1);
        tracing::info!(
            webhook_id,
            pause_ms = wait.as_millis() as u64,
            given_back = given_back.len(),
            "the receiver asked for a pause; endpoint held"
        );
        if let Err(e) = self.store.pause_endpoint(webhook_id, until_ms).await {
            metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "pause").increment(1);
            tracing::warn!(error = %e, "recording the endpoint's pause failed; other pods may send before it ends");
        }
        self.give_back(&given_back, until_ms).await;
    }

    /// Releases held messages to the log, due at `due_ms`; on failure their lease lapses.
    async fn give_back(&self, held: &[(String, i64)], due_ms: i64) {
        if let Err(e) = self.store.release(held, due_ms).await {
            metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "release").increment(1);
            tracing::warn!(error = %e, "giving back held webhook messages failed; their lease lapses");
        }
    }

    /// An attempt of `webhook_id` ended: its slot, and its tenant's, is free.
    fn finished(&self, webhook_id: &str) {
        let mut lanes = self.lock_lanes();
        let Lanes {
            endpoints, tenants, ..
        } = &mut *lanes;
        if let Some(lane) = endpoints.get_mut(webhook_id) {
            lane.in_flight = lane.in_flight.saturating_sub(1);
            if let Some(n) = tenants.get_mut(&lane.tenant) {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// The subscription's URL, format and secrets, reused for [`TARGET_TTL`]; `None` when it
    /// is gone, an error when it could not be read (the database, a secret that does not
    /// decrypt).
    async fn target(&self, webhook_id: &str) -> Result<Option<Arc<WebhookTarget>>, String> {
        {
            let cache = match self.targets.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some((at, t)) = cache.map.get(webhook_id) {
                if at.elapsed() < TARGET_TTL {
                    return Ok(Some(t.clone()));
                }
            }
        }
        match self.provisioning.webhook_target(webhook_id, now_ms()).await {
            Ok(Some(t)) => {
                let t = Arc::new(t);
                let mut cache = match self.targets.lock() {
                    Ok(c) => c,
                    Err(poisoned) => poisoned.into_inner(),
                };
                // Entries past their TTL go at most once per TARGET_SWEEP, so the map does
                // not grow with subscription churn and deleted or rotated subscriptions'
                // decrypted secrets do not stay in memory.
                if cache.swept.elapsed() >= TARGET_SWEEP {
                    cache.map.retain(|_, (at, _)| at.elapsed() < TARGET_TTL);
                    cache.swept = Instant::now();
                }
                cache
                    .map
                    .insert(webhook_id.to_string(), (Instant::now(), t.clone()));
                Ok(Some(t))
            }
            Ok(None) => {
                // Gone: its secrets leave the cache at once.
                match self.targets.lock() {
                    Ok(mut c) => c.map.remove(webhook_id),
                    Err(poisoned) => poisoned.into_inner().map.remove(webhook_id),
                };
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(webhook_id, error = %e, "reading the webhook subscription failed");
                Err(e.to_string())
            }
        }
    }

    /// One attempt of a claimed message, logged, then the next step.
    async fn attempt(self: Arc<Self>, msg: Claimed, permit: OwnedSemaphorePermit) {
        let mut permit = Some(permit);
        let span = tracing::info_span!(
            "webhooks.attempt",
            message_id = %msg.id,
            webhook_id = %msg.webhook_id,
            tenant = %msg.tenant_id,
            conversation_id = %msg.conversation_id,
            status_code = tracing::field::Empty,
        );
        async {
            // Turned off since it was claimed or adopted (an operator, or a 410 seen by
            // another attempt): given back untried, with what this process holds of it; claims
            // skip disabled subscriptions, so it waits for a re-enable. (One whose row is not
            // written yet is not found by the give-back: its lease lapses instead, and its
            // group's write goes on without its outcome after the first-attempt wait.)
            let mut unreadable = false;
            let target = match self.target(&msg.webhook_id).await {
                Ok(t) => t,
                // Nothing was sent: no attempt is charged, and the endpoint's failure clock
                // does not run for this worker's trouble. (A first attempt whose row is not
                // written yet goes on as failed, the endpoint's clock untouched: it has every
                // retry left.)
                Err(_) if msg.first.is_none() => {
                    metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "target")
                        .increment(1);
                    self.finished(&msg.webhook_id);
                    if let Err(e) = self.store.postpone(&msg, now_ms() + TARGET_UNREADABLE_WAIT_MS).await {
                        tracing::warn!(error = %e, "giving back a message whose subscription could not be read failed; its lease lapses");
                    }
                    return;
                }
                Err(_) => {
                    unreadable = true;
                    None
                }
            };
            if target.as_ref().is_some_and(|t| !t.webhook.enabled) {
                self.finished(&msg.webhook_id);
                self.give_back_disabled(&msg).await;
                return;
            }
            let sent = self.send(&msg, target).await;
            if let Some(wait) = sent.retry_after.filter(|w| !sent.ok && !w.is_zero()) {
                self.pause(&msg.webhook_id, wait).await;
            }
            // The endpoint's slot bounds requests to it, not log writes: free it now so the
            // next held message goes while this one is logged (the lease still holds it, and
            // the process-wide permit bounds the writes in flight).
            self.finished(&msg.webhook_id);
            self.done.notify_one();
            if let Some(code) = sent.record.status_code {
                tracing::Span::current().record("status_code", code);
            }
            let now = now_ms();
            let after = if sent.ok {
                After::Delivered
            } else if sent.abort {
                After::Aborted
            } else {
                let n = msg.round_attempts as usize + 1;
                match self.config.delay_after_failure(n, sent.retry_after) {
                    Some(d) => After::Retry(now + i64::try_from(d.as_millis()).unwrap_or(0)),
                    None => After::Exhausted,
                }
            };
            // Standard Webhooks: 410 Gone means the endpoint is retired; it is disabled at once
            // (the message stays pending for a re-enable, like the rest of its backlog).
            let gone = !sent.ok && !sent.abort && sent.record.status_code == Some(410);
            let label = self.labels.of(&msg.webhook_id);
            metrics::counter!(m::WEBHOOK_ATTEMPTS_TOTAL, "subscription" => label, "outcome" => sent.record.outcome)
                .increment(1);
            metrics::histogram!(m::WEBHOOK_ATTEMPT_SECONDS, "outcome" => sent.record.outcome)
                .record(sent.record.latency_ms as f64 / 1000.0);
            // Sent before its row was written: the outcome goes into the row if it is not
            // written yet, else it is logged like any other.
            let settled = match &msg.first {
                Some(first) => first.settle(&sent.record, after).await,
                None => None,
            };
            let written = match settled {
                // The intake writes it (its lanes bound those writes): the slot is free now.
                Some(answer) => {
                    drop(permit.take());
                    self.done.notify_one();
                    answer
                        .await
                        .unwrap_or_else(|_| Err("the message intake stopped".into()))
                }
                None => self.log(&msg, &sent.record, after).await,
            };
            if let Err(e) = written {
                metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "record")
                    .increment(1);
                // The lease lapses and the message is tried again under the same webhook-id.
                tracing::warn!(error = %e, "logging a webhook attempt failed; the message will be tried again");
            } else {
                match after {
                    After::Delivered => self.endpoint_succeeded(&msg.webhook_id).await,
                    After::Retry(at) => {
                        tracing::debug!(outcome = sent.record.outcome, next_attempt_at_ms = at, error = ?sent.record.error, "webhook attempt failed; retry scheduled");
                        if !unreadable {
                            self.endpoint_failed(&msg, now, gone).await;
                        }
                    }
                    After::Aborted => {
                        tracing::info!("receiver answered abort-message; no more retries");
                    }
                    After::Exhausted => {
                        if !unreadable {
                            self.endpoint_failed(&msg, now, gone).await;
                        }
                        let left = Left {
                            attempts: msg.attempts + 1,
                            round_attempts: msg.round_attempts + 1,
                            lease_until_ms: None,
                        };
                        self.dead_letter(
                            &msg,
                            left,
                            sent.record.status_code,
                            sent.record.error.clone(),
                        )
                        .await;
                    }
                }
            }
        }
        .instrument(span)
        .await;
        drop(permit);
        self.done.notify_one();
    }

    /// POSTs the message, signed, within the timeout.
    async fn send(&self, msg: &Claimed, target: Option<Arc<WebhookTarget>>) -> Sent {
        let started_at_ms = now_ms();
        let fail = |outcome: &'static str, error: String| Sent {
            record: AttemptRecord {
                started_at_ms,
                outcome,
                status_code: None,
                latency_ms: 0,
                error: Some(error),
            },
            ok: false,
            abort: false,
            retry_after: None,
        };
        let Some(target) = target else {
            return fail("failed", "the subscription could not be read".into());
        };
        let Ok(url) = reqwest::Url::parse(&target.webhook.url) else {
            return fail("refused", "the subscription URL does not parse".into());
        };
        if !self.config.allow_private_targets {
            if let Some(ip) = target::literal_ip(&url) {
                if target::is_internal(ip) {
                    return fail("refused", format!("the target {ip} is in a private range"));
                }
            }
        }
        let body = msg.body.clone().into_bytes();
        let mut request = self
            .client
            .post(url)
            .timeout(self.config.timeout())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        match target.webhook.format {
            WebhookFormat::Genesys => {
                request = request.header(
                    "x-hub-signature",
                    signing::hub_signature(&target.secrets.current, &body),
                );
            }
            WebhookFormat::Standard => {
                let ts = started_at_ms / 1000;
                request = request
                    .header("webhook-id", msg.id.clone())
                    .header("webhook-timestamp", ts.to_string())
                    .header(
                        "webhook-signature",
                        signing::standard_header(&target.secrets, &msg.id, ts, &body),
                    );
            }
        }
        let clock = Instant::now();
        let answer = request.body(body).send().await;
        let mut retry_after = None;
        let (outcome, status_code, error, ok, abort) = match answer {
            Ok(r) => {
                let status = r.status();
                retry_after = crate::http_client::retry_after(&r);
                let abort = r
                    .headers()
                    .get("webhook-delivery")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.eq_ignore_ascii_case("abort-message"));
                // Read (a bounded part of) the answer so the connection can be reused.
                let _ = read_bounded(r).await;
                if status.is_success() {
                    ("ok", Some(i64::from(status.as_u16())), None, true, false)
                } else if abort {
                    (
                        "aborted",
                        Some(i64::from(status.as_u16())),
                        Some(format!("answered {status} with abort-message")),
                        false,
                        true,
                    )
                } else {
                    (
                        "failed",
                        Some(i64::from(status.as_u16())),
                        Some(format!("answered {status}")),
                        false,
                        false,
                    )
                }
            }
            // The resolver refused the name (every address internal, DNS rebinding among
            // them): the policy's refusal, as for an internal IP literal, and said so in the
            // attempt log, where a generic connection failure would send the tenant looking
            // for a receiver that is down.
            Err(e) => match target::refused_name(&e) {
                Some(name) => (
                    "refused",
                    None,
                    Some(format!(
                        "the name {name} resolves only to internal addresses (private, loopback, link-local or reserved)"
                    )),
                    false,
                    false,
                ),
                None => {
                    let outcome = if e.is_timeout() { "timeout" } else { "failed" };
                    let error = crate::http_client::describe(e);
                    (outcome, None, Some(error), false, false)
                }
            },
        };
        Sent {
            record: AttemptRecord {
                started_at_ms,
                outcome,
                status_code,
                latency_ms: i64::try_from(clock.elapsed().as_millis()).unwrap_or(i64::MAX),
                error,
            },
            ok,
            abort,
            retry_after,
        }
    }

    /// Stops the endpoint's failure clock: a write at most every [`CLEAR_EVERY`] per endpoint
    /// unless this process saw it fail since (another pod's failures are cleared that late).
    async fn endpoint_succeeded(&self, webhook_id: &str) {
        {
            let mut cleared = self.cleared.lock().unwrap_or_else(|p| p.into_inner());
            if cleared
                .get(webhook_id)
                .is_some_and(|at| at.elapsed() < CLEAR_EVERY)
            {
                return;
            }
            cleared.insert(webhook_id.to_string(), Instant::now());
        }
        if let Err(e) = self.provisioning.webhook_succeeded(webhook_id).await {
            self.cleared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(webhook_id);
            tracing::warn!(error = %e, "clearing the endpoint's failure clock failed");
        }
    }

    /// A claimed message of a subscription turned off: it and what this process holds of the
    /// endpoint go back to the log untried, due now (no pod claims them while disabled).
    async fn give_back_disabled(&self, msg: &Claimed) {
        let mut given_back: Vec<(String, i64)> = {
            let mut lanes = self.lock_lanes();
            match lanes.endpoints.get_mut(&msg.webhook_id) {
                Some(lane) => lane
                    .held
                    .drain(..)
                    .map(|h| (h.msg.id, h.msg.lease_until_ms))
                    .collect(),
                None => Vec::new(),
            }
        };
        given_back.push((msg.id.clone(), msg.lease_until_ms));
        tracing::info!(
            given_back = given_back.len(),
            "the subscription is disabled; its held messages are given back untried"
        );
        self.give_back(&given_back, now_ms()).await;
    }

    /// Runs the endpoint's failure clock; disables it once the clock passes `disable_after`,
    /// or at once when the receiver answered 410 Gone (`gone`).
    async fn endpoint_failed(&self, msg: &Claimed, now: i64, gone: bool) {
        self.cleared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&msg.webhook_id);
        let since = match self.provisioning.webhook_failed(&msg.webhook_id, now).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "recording the endpoint failure failed");
                return;
            }
        };
        let limit = i64::try_from(self.config.disable_after_ms).unwrap_or(i64::MAX);
        if !gone && now.saturating_sub(since) < limit {
            return;
        }
        let reason = if gone {
            "the receiver answered 410 Gone".to_string()
        } else {
            format!(
                "every attempt failed for {} s since {since} (disable_after_ms = {limit})",
                (now - since) / 1000
            )
        };
        match self
            .provisioning
            .disable_webhook(&msg.webhook_id, &reason, since)
            .await
        {
            Ok(true) => {
                metrics::counter!(m::WEBHOOK_ENDPOINTS_DISABLED_TOTAL).increment(1);
                tracing::warn!(webhook_id = %msg.webhook_id, failing_since_ms = since, gone, "webhook endpoint disabled");
                // Credentials a tenant put in its URL stay out of the event.
                let url = self
                    .target(&msg.webhook_id)
                    .await
                    .ok()
                    .flatten()
                    .map(|t| crate::http_client::shown_url(&t.webhook.url))
                    .unwrap_or_default();
                // Read again at the next start: what this process holds of it goes back.
                self.targets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .map
                    .remove(&msg.webhook_id);
                self.announce_disabled(PendingDisable {
                    webhook_id: msg.webhook_id.clone(),
                    tenant_id: msg.tenant_id.clone(),
                    url,
                    failing_since_ms: since,
                    reason,
                })
                .await;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "disabling the webhook endpoint failed"),
        }
    }

    /// Publishes the message to the dead-letter topic, then marks it dead. The message is held
    /// (and the hold renewed) while the publish waits, so no claim publishes it beside this
    /// one; a crash before it is marked dead leaves it to the claim after the hold, which
    /// publishes it again (recovery is idempotent per record).
    async fn dead_letter(
        &self,
        msg: &Claimed,
        left: Left,
        last_status_code: Option<i64>,
        last_error: Option<String>,
    ) {
        let attempts = left.attempts;
        // Another sender took it over (this one's lease lapsed mid-attempt), or an operator
        // resent it: theirs to settle. (A failed write: a later claim dead-letters it.)
        let mut held = now_ms() + DEAD_LETTER_HOLD_MS;
        if !still_ours(msg, self.store.hold_exhausted(msg, &left, held).await) {
            return;
        }
        let body = WebhookMessageDead {
            webhook_id: msg.webhook_id.clone(),
            message_id: msg.id.clone(),
            source_event_id: msg.event_id.clone(),
            event: msg.event.clone(),
            body: msg.body.clone(),
            attempts,
            last_status_code,
            last_error,
        };
        let what = format!("dead/{}/{attempts}", msg.id);
        let publish = self.publish(
            &body,
            &msg.tenant_id,
            &msg.conversation_id,
            WEBHOOK_DEAD_TOPIC,
            &what,
        );
        let published = self.renewing_hold(msg, &mut held, publish).await;
        if !published {
            // Leave it pending and exhausted: a later claim tries the publish again.
            if let Err(e) = self
                .store
                .release(&[(msg.id.clone(), held)], now_ms() + DEAD_LETTER_RETRY_MS)
                .await
            {
                tracing::warn!(message_id = %msg.id, error = %e, "could not give back a webhook message after its dead-letter publish failed; its hold lapses");
            }
            return;
        }
        // Resent (or its hold lost) since: the published record stands for an exhaustion that
        // was real, the message goes on.
        let held = Left {
            lease_until_ms: Some(held),
            ..left
        };
        if !still_ours(msg, self.store.mark_dead(msg, &held, now_ms()).await) {
            return;
        }
        metrics::counter!(m::WEBHOOK_DEAD_LETTERED_TOTAL, "subscription" => self.labels.of(&msg.webhook_id))
            .increment(1);
        tracing::warn!(message_id = %msg.id, webhook_id = %msg.webhook_id, attempts, "webhook message dead after its last attempt; sent to the dead-letter topic");
    }

    /// Waits for `publish` (a dead-letter publish of `msg`), renewing the message's hold
    /// (`held`, updated) every [`DEAD_LETTER_RENEW`] meanwhile. A renewal is never cut short
    /// by the publish ending, so `held` is always what the row carries. A hold found lost (an
    /// operator resent the message) is not renewed again: marking it dead then finds it
    /// moved on.
    async fn renewing_hold(
        &self,
        msg: &Claimed,
        held: &mut i64,
        publish: impl std::future::Future<Output = bool>,
    ) -> bool {
        tokio::pin!(publish);
        let mut renew = true;
        loop {
            tokio::select! {
                published = &mut publish => return published,
                () = tokio::time::sleep(renew_in(*held)), if renew => {}
            }
            let next = now_ms() + DEAD_LETTER_HOLD_MS;
            let renewal = self.store.renew(&msg.id, *held, next);
            tokio::pin!(renewal);
            let mut ended = None;
            let renewed = tokio::select! {
                r = &mut renewal => r,
                published = &mut publish => {
                    ended = Some(published);
                    renewal.await
                }
            };
            match renewed {
                Ok(true) => *held = next,
                Ok(false) => {
                    tracing::info!(message_id = %msg.id, "exhausted webhook message moved on during its dead-letter publish");
                    renew = false;
                }
                // Tried again at the next period, in time while the hold lasts. (A renewal that
                // failed yet was written leaves the row's hold unknown here: marking dead then
                // finds it moved, and the claim after the hold publishes again: at least once.)
                Err(e) => {
                    metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "mark_dead")
                        .increment(1);
                    tracing::warn!(message_id = %msg.id, error = %e, "renewing a webhook message's dead-letter hold failed");
                }
            }
            if let Some(published) = ended {
                return published;
            }
        }
    }

    /// Publishes one of this role's events; whether the bus took it.
    async fn publish<B: crate::events::chat::Body>(
        &self,
        body: &B,
        tenant_id: &str,
        key: &str,
        topic: &str,
        what: &str,
    ) -> bool {
        let event = match Event::typed(body, tenant_id, key, PRODUCER) {
            Ok(e) => e.with_derived_id(&Uuid::nil(), &format!("{topic}/{key}/{what}")),
            Err(e) => {
                tracing::error!(error = %e, "building a webhooks event failed");
                return false;
            }
        };
        match publish(self.bus.as_ref(), topic, &event).await {
            Ok(_) => true,
            Err(e) => {
                metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "publish")
                    .increment(1);
                tracing::warn!(topic, error = %e, "publishing a webhooks event failed; tried again later");
                false
            }
        }
    }

    /// Publishes a disable's `WebhookEndpointDisabled`, then clears its pending mark; one the
    /// bus did not take stays marked for [`Self::republish_disables`]. `url` is as shown
    /// (no credentials).
    async fn announce_disabled(&self, d: PendingDisable) {
        let body = WebhookEndpointDisabled {
            webhook_id: d.webhook_id.clone(),
            url: d.url,
            failing_since_ms: d.failing_since_ms,
            reason: d.reason,
        };
        // One id per failing streak: pods disabling the same streak agree, a disable after a
        // re-enable is a new event (not deduplicated away by consumers).
        let what = format!("disabled/{}", d.failing_since_ms);
        if !self
            .publish(
                &body,
                &d.tenant_id,
                &d.webhook_id,
                WEBHOOK_EVENTS_TOPIC,
                &what,
            )
            .await
        {
            return;
        }
        if let Err(e) = self
            .provisioning
            .disable_event_published(&d.webhook_id, d.failing_since_ms)
            .await
        {
            // Published again by the next pass: the same event id.
            tracing::warn!(error = %e, "clearing a disable's pending event failed");
        }
    }

    /// Publishes the events of disables still owing them (a publish that failed, a pod that
    /// died between the disable and its publish), once [`DISABLE_EVENT_GRACE_MS`] old.
    async fn republish_disables(&self) {
        let owed_before = now_ms() - DISABLE_EVENT_GRACE_MS;
        match self
            .provisioning
            .pending_disable_events(16, owed_before)
            .await
        {
            Ok(pending) => {
                for mut d in pending {
                    d.url = crate::http_client::shown_url(&d.url);
                    self.announce_disabled(d).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading disables owing their event failed"),
        }
    }

    /// Measures queue depth and oldest pending age every `stats_interval_ms`, until `stop`.
    pub async fn stats(self: Arc<Self>, stop: CancellationToken) {
        let every = Duration::from_millis(self.config.stats_interval_ms);
        async {
            let mut shown: HashSet<String> = HashSet::new();
            // Pending count when the statistics were last refreshed.
            let mut analyzed_at: i64 = 0;
            loop {
                self.republish_disables().await;
                match self.store.unblock_all(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(released = n, "waiting FINISHED messages released by the sweep"),
                    Err(e) => tracing::warn!(error = %e, "sweeping waiting webhook messages failed"),
                }
                match self.store.pending_stats().await {
                    Ok(rows) => {
                        let now = now_ms();
                        let mut per: HashMap<String, (i64, i64)> = HashMap::new();
                        for r in rows {
                            let e = per
                                .entry(self.labels.of(&r.webhook_id))
                                .or_insert((0, i64::MAX));
                            e.0 += r.count;
                            e.1 = e.1.min(r.oldest_created_at_ms);
                        }
                        for gone in shown.iter().filter(|l| !per.contains_key(*l)) {
                            metrics::gauge!(m::WEBHOOK_QUEUE_DEPTH, "subscription" => gone.clone())
                                .set(0.0);
                            metrics::gauge!(m::WEBHOOK_OLDEST_PENDING_SECONDS, "subscription" => gone.clone())
                                .set(0.0);
                        }
                        shown = per.keys().cloned().collect();
                        let total: i64 = per.values().map(|(n, _)| n).sum();
                        if total >= ANALYZE_MIN && (total > 4 * analyzed_at || 4 * total < analyzed_at) {
                            match self.store.analyze().await {
                                Ok(()) => analyzed_at = total,
                                Err(e) => tracing::warn!(error = %e, "refreshing the log's statistics failed"),
                            }
                        }
                        for (label, (count, oldest)) in per {
                            let age = (now - oldest).max(0) as f64 / 1000.0;
                            metrics::gauge!(m::WEBHOOK_QUEUE_DEPTH, "subscription" => label.clone())
                                .set(count as f64);
                            metrics::gauge!(m::WEBHOOK_OLDEST_PENDING_SECONDS, "subscription" => label)
                                .set(age);
                        }
                    }
                    Err(e) => {
                        metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "stats")
                            .increment(1);
                        tracing::warn!(error = %e, "measuring the webhook queue failed");
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        }
        .instrument(tracing::info_span!("webhooks.stats"))
        .await
    }
}

/// Reads at most [`MAX_ANSWER_BYTES`] of an answer.
async fn read_bounded(mut r: reqwest::Response) -> usize {
    let mut n = 0;
    while let Ok(Some(chunk)) = r.chunk().await {
        n += chunk.len();
        if n >= MAX_ANSWER_BYTES {
            break;
        }
    }
    n
}

/// Whether an exhausted message is still as its sender left it, as the store answered; a
/// message that moved on is logged, a failed store call counted and logged.
fn still_ours(msg: &Claimed, answer: Result<bool, super::store::StoreError>) -> bool {
    match answer {
        Ok(ours) => {
            if !ours {
                tracing::info!(message_id = %msg.id, "exhausted webhook message moved on meanwhile; left as it is");
            }
            ours
        }
        Err(e) => {
            metrics::counter!(m::WEBHOOK_DISPATCH_ERRORS_TOTAL, "stage" => "mark_dead")
                .increment(1);
            tracing::warn!(error = %e, "dead-lettering a webhook message failed; a later claim tries again");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stores::provisioning::webhooks::NewWebhook;
    use crate::stores::provisioning::{NewTenant, Tenant};

    fn claimed(tenant: &str, webhook: &str, n: usize) -> Claimed {
        Claimed::first(NewMessage {
            id: format!("{webhook}-{n}"),
            tenant_id: tenant.into(),
            webhook_id: webhook.into(),
            event_id: format!("e{n}"),
            conversation_id: "c".into(),
            event: crate::stores::provisioning::WebhookEvent::Started,
            body: "{}".into(),
        })
    }

    fn lanes(spec: &[(&str, &str, usize)]) -> Lanes {
        let mut lanes = Lanes::default();
        for (tenant, webhook, held) in spec {
            let lane = lanes.endpoints.entry((*webhook).into()).or_default();
            for n in 0..*held {
                lane.hold(claimed(tenant, webhook, n));
            }
        }
        lanes
    }

    /// Starts `budget` at most (the process's free slots) and names what started.
    fn take(lanes: &mut Lanes, budget: usize, per: usize, per_tenant: usize) -> Vec<String> {
        let mut left = budget;
        let starts = lanes.take_starts(Instant::now(), per, per_tenant, || {
            left.checked_sub(1).map(|l| left = l)
        });
        starts.into_iter().map(|(h, ())| h.msg.id).collect()
    }

    fn finish(lanes: &mut Lanes, tenant: &str, webhook: &str) {
        if let Some(l) = lanes.endpoints.get_mut(webhook) {
            l.in_flight -= 1;
        }
        if let Some(n) = lanes.tenants.get_mut(tenant) {
            *n -= 1;
        }
    }

    /// A dispatcher over a SQLite log and an embedded bus in `dir`, sending through the
    /// worker's client under `allow_private_targets`.
    /// A tenant with one standard subscription at `url`; its id.
    async fn tenant_with_webhook(prov: &Provisioning, url: &str) -> (Tenant, String) {
        let tenant = prov
            .create_tenant(NewTenant { name: "t".into() })
            .await
            .expect("tenant");
        let hook = prov
            .create_webhook(
                &tenant.id,
                NewWebhook {
                    url: url.into(),
                    events: None,
                    media: None,
                    format: WebhookFormat::Standard,
                    enabled: None,
                    secret: None,
                },
            )
            .await
            .expect("webhook")
            .webhook
            .id;
        (tenant, hook)
    }

    async fn dispatcher(dir: &std::path::Path, allow_private: bool) -> Dispatcher {
        dispatcher_with(dir, allow_private).await.0
    }

    /// [`dispatcher`], with its provisioning store and bus.
    async fn dispatcher_with(
        dir: &std::path::Path,
        allow_private: bool,
    ) -> (
        Dispatcher,
        Arc<Provisioning>,
        Arc<crate::bus::embedded::EmbeddedBus>,
    ) {
        let defaults = crate::config::Config::defaults();
        let prov = Arc::new(Provisioning::temporary(&dir.join("db")).await);
        let store = MessageStore::new(prov.pool().clone(), prov.kind());
        let bus = Arc::new(
            crate::bus::embedded::EmbeddedBus::open(&dir.join("bus"), &defaults.bus)
                .expect("embedded bus"),
        );
        let mut config = defaults.workers.webhooks;
        config.allow_private_targets = allow_private;
        config.timeout_ms = 5_000;
        let mut builder = crate::http_client::builder(&defaults.http_client)
            .expect("client")
            .redirect(reqwest::redirect::Policy::none());
        if let Some(resolver) = target::resolver(allow_private) {
            builder = builder.dns_resolver(resolver).no_proxy();
        }
        let client = builder.build().expect("client");
        let d = Dispatcher::new(store, prov.clone(), bus.clone(), client, config);
        (d, prov, bus)
    }

    /// The periodic pass publishes the `WebhookEndpointDisabled` of a disable whose sender did
    /// not (its publish failed, or it died), once; not that of a disable made a moment ago,
    /// whose sender is publishing it: both would put the event on the topic twice, where one
    /// disable is one event.
    #[tokio::test]
    async fn the_periodic_pass_leaves_a_fresh_disable_to_its_sender() {
        use crate::bus::{Bus, TopicSpec};

        let dir = tempfile::tempdir().expect("tempdir");
        let (d, prov, bus) = dispatcher_with(dir.path(), false).await;
        bus.apply_topic(&TopicSpec {
            name: WEBHOOK_EVENTS_TOPIC.into(),
            partitions: 1,
            retention: None,
        })
        .await
        .expect("topic");
        let records = || async {
            let mut n = 0;
            for p in bus
                .partition_offsets(WEBHOOK_EVENTS_TOPIC)
                .await
                .expect("offsets")
            {
                n += bus
                    .read(WEBHOOK_EVENTS_TOPIC, p.partition, p.low, 100)
                    .await
                    .expect("read")
                    .len();
            }
            n
        };
        let (_, hook) = tenant_with_webhook(&prov, "https://hooks.example.com/in").await;
        let since = prov.webhook_failed(&hook, now_ms()).await.expect("failed");
        assert!(prov
            .disable_webhook(&hook, "down", since)
            .await
            .expect("disable"));
        d.republish_disables().await;
        assert_eq!(
            records().await,
            0,
            "a fresh disable is its sender's to announce"
        );
        // Owed for long (as a disable written before the mark carried its time).
        sqlx::query("UPDATE webhooks SET disable_event_pending = 1 WHERE id = $1")
            .bind(hook.clone())
            .execute(prov.pool())
            .await
            .expect("owed");
        d.republish_disables().await;
        d.republish_disables().await;
        assert_eq!(records().await, 1, "an owed disable is announced, once");
    }

    fn target_at(url: &str) -> Arc<WebhookTarget> {
        use crate::stores::provisioning::webhooks::generate_secret;
        use crate::stores::provisioning::{SigningSecrets, Webhook, WebhookMedia};
        Arc::new(WebhookTarget {
            webhook: Webhook {
                id: "wh".into(),
                tenant_id: "t".into(),
                url: url.into(),
                events: vec![crate::stores::provisioning::WebhookEvent::Started],
                media: vec![WebhookMedia::Chat],
                format: WebhookFormat::Standard,
                enabled: true,
                disabled_reason: None,
                created_at_ms: 0,
            },
            secrets: SigningSecrets {
                current: generate_secret(WebhookFormat::Standard),
                previous: vec![],
            },
        })
    }

    /// What the attempt log says of an attempt that never reached a receiver: a name the
    /// send-time resolver answers only with internal addresses is `refused` and says so (not
    /// a receiver down, which the tenant would go looking for); a connection that failed says
    /// why (refused, DNS, TLS), not only "error sending request".
    #[tokio::test]
    async fn an_attempt_that_reached_no_receiver_is_logged_with_its_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let guarded = dispatcher(&dir.path().join("guarded"), false).await;
        let sent = guarded
            .send(
                &claimed("t", "wh", 1),
                Some(target_at("http://localhost:9/in")),
            )
            .await;
        assert_eq!(sent.record.outcome, "refused", "{:?}", sent.record);
        let error = sent.record.error.unwrap_or_default();
        assert!(
            error.contains("localhost") && error.contains("internal"),
            "{error}"
        );
        // A port nobody listens on (bound, then freed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let open = dispatcher(&dir.path().join("open"), true).await;
        let sent = open
            .send(
                &claimed("t", "wh", 2),
                Some(target_at(&format!("http://127.0.0.1:{port}/in?key=s3cret"))),
            )
            .await;
        assert_eq!(sent.record.outcome, "failed", "{:?}", sent.record);
        let error = sent.record.error.unwrap_or_default();
        assert!(error.to_lowercase().contains("connect"), "{error}");
        assert!(error.len() > "error sending request".len(), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    /// A graceful stop (SIGTERM of a rolling deploy) drains: the attempt under way finishes and
    /// is logged, so the next pod does not send it again once its lease lapses, and what the
    /// process held goes back at once instead of waiting out its lease (timeout + 5 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_finishes_the_attempts_under_way_and_gives_back_the_held_ones() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        // A receiver that answers after 1.5 s: longer than the log writer's drain used to wait.
        let got = Arc::new(AtomicUsize::new(0));
        let app = {
            let got = got.clone();
            axum::Router::new().route(
                "/slow",
                axum::routing::post(move || {
                    let got = got.clone();
                    async move {
                        got.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        axum::http::StatusCode::NO_CONTENT
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });

        let dir = tempfile::tempdir().expect("tempdir");
        let defaults = crate::config::Config::defaults();
        let prov = Arc::new(Provisioning::temporary(&dir.path().join("db")).await);
        let (tenant, hook) = tenant_with_webhook(&prov, &format!("http://{addr}/slow")).await;
        let store = MessageStore::new(prov.pool().clone(), prov.kind());
        let now = now_ms();
        for n in 1..=2 {
            let mut m = claimed(&tenant.id, &hook, n);
            m.conversation_id = format!("c{n}");
            let m = NewMessage {
                id: m.id,
                tenant_id: m.tenant_id,
                webhook_id: m.webhook_id,
                event_id: m.event_id,
                conversation_id: m.conversation_id,
                event: crate::stores::provisioning::WebhookEvent::Started,
                body: m.body,
            };
            assert!(store.insert(&m, now).await.expect("insert"));
        }
        let bus = crate::bus::embedded::EmbeddedBus::open(&dir.path().join("bus"), &defaults.bus)
            .expect("embedded bus");
        let mut config = defaults.workers.webhooks;
        config.allow_private_targets = true;
        config.timeout_ms = 5_000;
        config.poll_interval_ms = 50;
        // One at a time: the second message waits in the endpoint's lane.
        config.max_in_flight_per_endpoint = 1;
        let client = crate::http_client::builder(&defaults.http_client)
            .expect("client")
            .build()
            .expect("client");
        let d = Arc::new(Dispatcher::new(
            store.clone(),
            prov.clone(),
            Arc::new(bus),
            client,
            config,
        ));
        let stop = CancellationToken::new();
        let run = tokio::spawn(d.clone().run(stop.clone()));
        let writer = tokio::spawn(d.clone().log_writer(stop.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no attempt started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.cancel();
        for task in [run, writer] {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the dispatcher stops within its drain")
                .expect("task");
        }
        let row = |id: String| {
            let pool = prov.pool().clone();
            async move {
                sqlx::query_as::<_, (String, Option<i64>)>(
                    "SELECT status, lease_until_ms FROM webhook_messages WHERE id = $1",
                )
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("row")
            }
        };
        assert_eq!(
            row(format!("{hook}-1")).await,
            ("delivered".to_string(), None),
            "the attempt under way was logged"
        );
        assert_eq!(
            row(format!("{hook}-2")).await,
            ("pending".to_string(), None),
            "the held message was given back"
        );
        assert_eq!(got.load(Ordering::SeqCst), 1, "nothing new started");
    }

    #[test]
    fn freed_slots_go_round_the_endpoints() {
        let mut l = lanes(&[("t", "a", 3), ("t", "b", 3), ("t", "c", 3)]);
        // One slot freeing at a time: each goes to the next endpoint, not always to "a".
        let mut order = Vec::new();
        for _ in 0..6 {
            let started = take(&mut l, 1, 10, 100);
            assert_eq!(started.len(), 1);
            let webhook = started[0].split('-').next().unwrap_or_default().to_string();
            finish(&mut l, "t", &webhook);
            order.push(started[0].clone());
        }
        assert_eq!(order, ["a-0", "b-0", "c-0", "a-1", "b-1", "c-1"]);
        // Several slots at once: one per endpoint per round, each endpoint's own in order.
        let mut l = lanes(&[("t", "a", 3), ("t", "b", 1), ("t", "c", 3)]);
        assert_eq!(
            take(&mut l, 5, 10, 100),
            ["a-0", "b-0", "c-0", "a-1", "c-1"]
        );
    }

    #[test]
    fn only_held_messages_that_can_start_shrink_the_claim() {
        // "a" is at its limit of 2 with 30 held (a hanging endpoint's burst), "b" has one free
        // slot and 3 held, "c" is paused, "d"'s tenant is full.
        let mut l = lanes(&[
            ("t1", "a", 30),
            ("t2", "b", 3),
            ("t3", "c", 5),
            ("t4", "d", 4),
        ]);
        if let Some(a) = l.endpoints.get_mut("a") {
            a.in_flight = 2;
        }
        if let Some(b) = l.endpoints.get_mut("b") {
            b.in_flight = 1;
        }
        if let Some(c) = l.endpoints.get_mut("c") {
            c.paused_until = Some(Instant::now() + Duration::from_secs(60));
        }
        let full = ["t4".to_string()];
        assert_eq!(l.startable(Instant::now(), 2, &full), 1);
    }

    #[test]
    fn starts_keep_the_endpoint_and_tenant_limits_and_skip_paused_endpoints() {
        let mut l = lanes(&[("t1", "a", 3), ("t1", "b", 3), ("t2", "c", 3)]);
        // Two per endpoint, three per tenant: t1 gets three over a and b, t2 two on c.
        let mut started = take(&mut l, 100, 2, 3);
        started.sort();
        assert_eq!(started, ["a-0", "a-1", "b-0", "c-0", "c-1"]);
        assert_eq!(l.tenants.get("t1"), Some(&3));
        assert!(take(&mut l, 100, 2, 3).is_empty(), "every limit is reached");
        finish(&mut l, "t1", "a");
        assert_eq!(take(&mut l, 100, 2, 3), ["a-2"]);
        // A paused endpoint starts nothing until its pause ends.
        let mut l = lanes(&[("t", "a", 1), ("t", "b", 1)]);
        if let Some(a) = l.endpoints.get_mut("a") {
            a.paused_until = Some(Instant::now() + Duration::from_secs(60));
        }
        assert_eq!(take(&mut l, 100, 10, 100), ["b-0"]);
        finish(&mut l, "t", "b");
        assert!(take(&mut l, 100, 10, 100).is_empty());
        assert!(l.endpoints.contains_key("a"), "a paused lane is kept");
        assert!(!l.endpoints.contains_key("b"), "an idle lane is dropped");
    }
}
