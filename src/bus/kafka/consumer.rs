//! One consumer-group member per subscription.
//!
//! A dedicated thread owns the librdkafka consumer and polls it: records, rebalance callbacks and
//! group events all arrive on that thread, so a revoke can never interleave with handing out a
//! record. Records go to [`KafkaSubscription::next`] through a channel; acks come back through
//! [`Tracker`], which keeps per partition the records handed out in this ownership (its epoch)
//! and commits the contiguous acked prefix.
//!
//! Order: each partition's records are handed out in offset order; acks may come in any order
//! (the runtime works on different keys at once), the committed offset only moves over a prefix
//! that is entirely acked. Nothing is ordered across partitions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn};

use super::{blocking, lock, map_err, Settings};
use crate::bus::{Acker, BusError, Delivery, Message, StartFrom, SubscribeOptions, Subscription};

type Member = BaseConsumer<MemberContext>;

/// How long a revoke waits for the acks of records already handed out before it commits what
/// was acked and lets the partition go. Long enough for a normal handler to finish its effect;
/// short enough not to hold up the group's rebalance. What is still unacked then is redelivered
/// to the next owner (at-least-once).
const REVOKE_ACK_WAIT: Duration = Duration::from_secs(10);

/// Poll timeout of the member thread: bounds how late it notices `close` or a dropped
/// subscription. Rebalance callbacks and records wake it immediately.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Poll timeout while paused for backpressure: acks do not wake the poll, so resuming after
/// acks freed room is at most this late.
const PAUSED_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How long leaving waits for ackers that are committing at that moment to finish.
const LEAVE_WAIT: Duration = Duration::from_secs(5);

/// The state of one record handed out from a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// In the channel, not yet returned by `next`.
    Queued,
    /// Returned by `next`, not yet acked.
    Out,
    Acked,
    /// Delivery dropped without ack: never committed by this member, not waited for.
    Abandoned,
}

/// One owned partition during one ownership (epoch).
#[derive(Debug)]
struct PartTrack {
    epoch: u64,
    /// Being revoked: no more records of it are handed out.
    revoking: bool,
    /// Records handed out and not yet part of the acked prefix, by offset.
    pending: BTreeMap<i64, Slot>,
    /// End (next offset) of the contiguous acked prefix of this ownership.
    acked_upto: Option<i64>,
    /// What this member last committed for the partition.
    committed: Option<i64>,
}

impl PartTrack {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            revoking: false,
            pending: BTreeMap::new(),
            acked_upto: None,
            committed: None,
        }
    }

    /// Moves the acked prefix over leading acked records.
    fn advance(&mut self) {
        while let Some(first) = self.pending.first_entry() {
            if *first.get() != Slot::Acked {
                break;
            }
            let (offset, _) = first.remove_entry();
            self.acked_upto = Some(offset + 1);
        }
    }

    /// The offset to commit, if the acked prefix moved past what was committed.
    fn to_commit(&self) -> Option<i64> {
        match (self.acked_upto, self.committed) {
            (Some(a), Some(c)) if a <= c => None,
            (a, _) => a,
        }
    }

    fn has_out(&self) -> bool {
        self.pending.values().any(|s| *s == Slot::Out)
    }
}

/// Ack bookkeeping and commits of one subscription, shared by the member thread, its
/// rebalance callbacks, `next` and the ackers.
pub(super) struct Tracker {
    topic: String,
    group: String,
    parts: Mutex<HashMap<i32, PartTrack>>,
    /// Signalled whenever a record is acked or abandoned (a revoke waits on it).
    changed: Condvar,
    /// Serialises commits with revokes: a commit only covers partitions still owned, and a
    /// revoke removes a partition only under this lock, so no commit of an old ownership can
    /// land after the partition moved to another member.
    commit_lock: Mutex<()>,
    /// Records handed to the channel and not yet acked or dropped (backpressure).
    in_flight: AtomicUsize,
    next_epoch: AtomicU64,
    /// Set when the member leaves (close or drop): revokes then commit without waiting.
    leaving: AtomicBool,
    /// Partitions this member paused for backpressure.
    paused: Mutex<HashSet<i32>>,
    /// The last failed commit, reported by `close`.
    commit_error: Mutex<Option<BusError>>,
}

impl Tracker {
    fn new(topic: &str, group: &str) -> Self {
        Self {
            topic: topic.to_string(),
            group: group.to_string(),
            parts: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            commit_lock: Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            next_epoch: AtomicU64::new(1),
            leaving: AtomicBool::new(false),
            paused: Mutex::new(HashSet::new()),
            commit_error: Mutex::new(None),
        }
    }

    /// Registers a record about to be queued; `None` if its partition is not (or no longer)
    /// owned, in which case it must not be handed out.
    fn queue(&self, partition: i32, offset: i64) -> Option<u64> {
        let mut parts = lock(&self.parts);
        let t = parts.get_mut(&partition).filter(|t| !t.revoking)?;
        t.pending.insert(offset, Slot::Queued);
        Some(t.epoch)
    }

    /// Marks a queued record as handed out; false if its ownership ended meanwhile.
    fn hand_out(&self, partition: i32, offset: i64, epoch: u64) -> bool {
        let mut parts = lock(&self.parts);
        match parts.get_mut(&partition) {
            Some(t) if t.epoch == epoch && !t.revoking => match t.pending.get_mut(&offset) {
                Some(slot) if *slot == Slot::Queued => {
                    *slot = Slot::Out;
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Records the fate of a handed-out record; true if the acked prefix now needs a commit.
    /// Acks of an ownership that ended are ignored: the next owner got (or gets) the record.
    fn settle(&self, partition: i32, offset: i64, epoch: u64, slot: Slot) -> bool {
        let need = {
            let mut parts = lock(&self.parts);
            match parts.get_mut(&partition) {
                Some(t) if t.epoch == epoch => {
                    if let Some(s) = t.pending.get_mut(&offset) {
                        if *s == Slot::Out {
                            *s = slot;
                        }
                    }
                    t.advance();
                    t.to_commit().is_some()
                }
                _ => {
                    debug!(
                        topic = %self.topic, group = %self.group, partition, offset,
                        "ack of a partition no longer owned; ignored"
                    );
                    false
                }
            }
        };
        self.changed.notify_all();
        need
    }

    /// Commits the acked prefix of every owned partition (or of `only`) that moved.
    /// The caller holds `commit_lock`.
    fn commit_acked(&self, consumer: &Member, only: Option<&HashSet<i32>>) -> Result<(), BusError> {
        let targets: Vec<(i32, u64, i64)> = lock(&self.parts)
            .iter()
            .filter(|(p, _)| only.map_or(true, |o| o.contains(p)))
            .filter_map(|(p, t)| t.to_commit().map(|o| (*p, t.epoch, o)))
            .collect();
        if targets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(targets.len());
        for (p, _, o) in &targets {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o))
                .map_err(map_err)?;
        }
        consumer.commit(&tpl, CommitMode::Sync).map_err(map_err)?;
        let mut parts = lock(&self.parts);
        for (p, epoch, o) in targets {
            if let Some(t) = parts.get_mut(&p).filter(|t| t.epoch == epoch) {
                t.committed = Some(t.committed.map_or(o, |c| c.max(o)));
            }
        }
        debug!(topic = %self.topic, group = %self.group, "committed acked offsets");
        Ok(())
    }

    fn on_assign(&self, tpl: &TopicPartitionList) {
        let _commits = lock(&self.commit_lock);
        let mut parts = lock(&self.parts);
        for e in tpl.elements_for_topic(&self.topic) {
            // A fresh epoch: acks of an earlier ownership of the same partition are ignored,
            // and the records restart from the committed offset (librdkafka fetches it).
            let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
            parts.insert(e.partition(), PartTrack::new(epoch));
        }
        info!(
            topic = %self.topic, group = %self.group,
            assigned = ?tpl.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect::<Vec<_>>(),
            "partitions assigned"
        );
    }

    fn on_revoke(&self, consumer: &Member, tpl: &TopicPartitionList) {
        let revoked: HashSet<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let lost = consumer.assignment_lost();
        {
            let mut parts = lock(&self.parts);
            for p in &revoked {
                if let Some(t) = parts.get_mut(p) {
                    t.revoking = true;
                }
            }
        }
        // Partitions paused for backpressure are resumed before they go: librdkafka keeps the
        // application pause flag, and a later re-assignment must not start paused.
        let to_resume: Vec<i32> = {
            let mut paused = lock(&self.paused);
            revoked
                .iter()
                .copied()
                .filter(|p| paused.remove(p))
                .collect()
        };
        if !to_resume.is_empty() {
            let mut r = TopicPartitionList::new();
            for p in to_resume {
                r.add_partition(&self.topic, p);
            }
            if let Err(e) = consumer.resume(&r) {
                warn!(topic = %self.topic, group = %self.group, error = %e, "cannot resume revoked partitions");
            }
        }
        if lost {
            // The group already gave them to others: a commit now could move the new owner's
            // position, so nothing is committed; the unacked rest is redelivered there.
            warn!(topic = %self.topic, group = %self.group, partitions = ?revoked, "partitions lost; not committing");
        } else {
            if !self.leaving.load(Ordering::Acquire) {
                self.wait_for_acks(&revoked);
            }
            let _commits = lock(&self.commit_lock);
            if let Err(e) = self.commit_acked(consumer, Some(&revoked)) {
                warn!(topic = %self.topic, group = %self.group, error = %e, "commit on revoke failed; the next owner redelivers from the last commit");
                *lock(&self.commit_error) = Some(e);
            }
        }
        let _commits = lock(&self.commit_lock);
        lock(&self.parts).retain(|p, _| !revoked.contains(p));
        info!(topic = %self.topic, group = %self.group, revoked = ?revoked, "partitions revoked");
    }

    /// Waits (bounded) until no handed-out record of `revoked` is unacked.
    fn wait_for_acks(&self, revoked: &HashSet<i32>) {
        let deadline = Instant::now() + REVOKE_ACK_WAIT;
        let mut parts = lock(&self.parts);
        loop {
            let busy = revoked
                .iter()
                .any(|p| parts.get(p).is_some_and(PartTrack::has_out));
            if !busy {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                warn!(
                    topic = %self.topic, group = %self.group, wait = ?REVOKE_ACK_WAIT,
                    "records still unacked at revoke; they will be redelivered to the next owner"
                );
                return;
            }
            parts = self
                .changed
                .wait_timeout(parts, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// librdkafka callbacks of one member; they run on the member thread inside `poll`.
pub(super) struct MemberContext {
    tracker: Arc<Tracker>,
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    // Both run before librdkafka applies the change: partitions are tracked before their first
    // record can arrive, and a revoked partition's acks are waited for and committed before
    // another member can be given it.
    fn pre_rebalance(&self, consumer: &Member, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.tracker.on_assign(tpl),
            Rebalance::Revoke(tpl) => self.tracker.on_revoke(consumer, tpl),
            Rebalance::Error(e) => {
                warn!(topic = %self.tracker.topic, group = %self.tracker.group, error = %e, "rebalance error")
            }
        }
    }
}

/// Backend side of a delivery's ack.
struct KafkaAcker {
    tracker: Arc<Tracker>,
    consumer: Weak<Member>,
    partition: i32,
    offset: i64,
    epoch: u64,
    settled: bool,
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        self.settled = true;
        self.tracker.in_flight.fetch_sub(1, Ordering::AcqRel);
        if !self
            .tracker
            .settle(self.partition, self.offset, self.epoch, Slot::Acked)
        {
            return Ok(());
        }
        // The ack returns once the prefix it completed is committed. Concurrent acks queue on
        // `commit_lock` and find their offsets already covered by the commit before them, so
        // commits batch under load.
        let tracker = Arc::clone(&self.tracker);
        let consumer = self.consumer.clone();
        blocking(move || {
            if tracker.leaving.load(Ordering::Acquire) {
                // Leaving commits the acked prefix itself.
                return Ok(());
            }
            let Some(consumer) = consumer.upgrade() else {
                return Ok(());
            };
            let result = {
                let _commits = lock(&tracker.commit_lock);
                tracker.commit_acked(&consumer, None)
            };
            drop(consumer);
            result
        })
        .await
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.tracker.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.tracker
                .settle(self.partition, self.offset, self.epoch, Slot::Abandoned);
        }
    }
}

/// What the bus keeps of each member it started, to order a new join after a leave.
#[derive(Clone)]
pub(super) struct MemberHandle {
    topic: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
}

impl MemberHandle {
    /// Told to leave (closed or dropped) and not gone yet.
    pub(super) fn leaving(&self) -> bool {
        self.stop.load(Ordering::Acquire) && !self.done.load(Ordering::Acquire)
    }

    pub(super) fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Still a member (neither closed nor dropped), optionally of `topic`.
    pub(super) fn active(&self, topic: Option<&str>) -> bool {
        !self.stop.load(Ordering::Acquire) && topic.map_or(true, |t| t == self.topic)
    }
}

/// A subscription on Kafka: one group member.
pub(super) struct KafkaSubscription {
    rx: mpsc::Receiver<Item>,
    tracker: Arc<Tracker>,
    consumer: Weak<Member>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KafkaSubscription {
    /// Creates the member, subscribes and starts its thread.
    pub(super) fn start(
        settings: &Settings,
        group: &str,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<(Self, MemberHandle), BusError> {
        let k = &settings.config.kafka;
        let mut cc = settings.consumer_config(Some(group));
        let start = match options.start {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        };
        // Heartbeats must be well inside the session timeout (Kafka's rule of thumb: a third).
        let heartbeat = (k.session_timeout_ms / 3).clamp(100, 3000);
        cc.set("auto.offset.reset", start)
            .set(
                "partition.assignment.strategy",
                &k.partition_assignment_strategy,
            )
            .set("session.timeout.ms", k.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", heartbeat.to_string());
        let tracker = Arc::new(Tracker::new(topic, group));
        let context = MemberContext {
            tracker: Arc::clone(&tracker),
        };
        let consumer: Member = cc
            .create_with_context(context)
            .map_err(|e| BusError::Config(format!("kafka consumer: {e}")))?;
        consumer.subscribe(&[topic]).map_err(map_err)?;
        let consumer = Arc::new(consumer);
        let weak = Arc::downgrade(&consumer);
        let max_in_flight = options.max_in_flight.max(1);
        // The member never queues more than max_in_flight (+1 fetched while pausing).
        let (tx, rx) = mpsc::channel(max_in_flight + 1);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let handle = MemberHandle {
            topic: topic.to_string(),
            stop: Arc::clone(&stop),
            done: Arc::clone(&done),
        };
        let member = MemberThread {
            done,
            consumer,
            tracker: Arc::clone(&tracker),
            tx,
            stop: Arc::clone(&stop),
            max_in_flight,
        };
        // A dedicated thread, not spawn_blocking: it lives as long as the subscription.
        let thread = std::thread::Builder::new()
            .name(format!("kafka-{group}"))
            .spawn(move || member.run())
            .map_err(|e| BusError::Unavailable(format!("cannot start the consumer thread: {e}")))?;
        Ok((
            Self {
                rx,
                tracker,
                consumer: weak,
                stop,
                thread: Some(thread),
            },
            handle,
        ))
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        loop {
            let (message, epoch) = match self.rx.recv().await? {
                Item::Record(message, epoch) => (message, epoch),
                Item::Failed(e) => return Some(Err(e)),
            };
            let (partition, offset) = (message.partition as i32, message.offset as i64);
            if !self.tracker.hand_out(partition, offset, epoch) {
                // Its partition was revoked after it was queued: the next owner delivers it.
                self.tracker.in_flight.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let acker = KafkaAcker {
                tracker: Arc::clone(&self.tracker),
                consumer: self.consumer.clone(),
                partition,
                offset,
                epoch,
                settled: false,
            };
            return Some(Ok(Delivery::new(message, Box::new(acker))));
        }
    }

    async fn close(mut self: Box<Self>) -> Result<(), BusError> {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            blocking(move || {
                thread
                    .join()
                    .map_err(|_| BusError::Unavailable("kafka consumer thread panicked".into()))
            })
            .await?;
        }
        match lock(&self.tracker.commit_error).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for KafkaSubscription {
    /// Without `close` the member leaves in the background, committing nothing beyond what
    /// was acked.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The member thread's state.
struct MemberThread {
    /// Set once the member has left the group.
    done: Arc<AtomicBool>,
    consumer: Arc<Member>,
    tracker: Arc<Tracker>,
    tx: mpsc::Sender<Item>,
    stop: Arc<AtomicBool>,
    max_in_flight: usize,
}

impl MemberThread {
    fn run(self) {
        let span =
            info_span!("kafka_member", topic = %self.tracker.topic, group = %self.tracker.group);
        let _entered = span.enter();
        while !self.stop.load(Ordering::Acquire) && !self.tx.is_closed() {
            let over = self.tracker.in_flight.load(Ordering::Acquire) >= self.max_in_flight;
            self.apply_backpressure(over);
            let timeout = if over {
                PAUSED_POLL_INTERVAL
            } else {
                POLL_INTERVAL
            };
            match self.consumer.poll(timeout) {
                // `hand_over` is false once the subscription is gone.
                Some(Ok(m)) if !self.hand_over(&m) => break,
                None | Some(Ok(_)) => {}
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    let e = super::map_code(code, "kafka consumer failed fatally");
                    warn!(error = %e, "consumer stopped");
                    let _ = self.tx.blocking_send(Item::Failed(e));
                    break;
                }
                // librdkafka retries transport and coordinator errors itself; they are reported
                // here for visibility only.
                Some(Err(e)) => warn!(error = %e, "consumer error; librdkafka retries"),
            }
        }
        self.leave();
    }

    /// Queues one record; false if the subscription is gone.
    fn hand_over(&self, m: &BorrowedMessage<'_>) -> bool {
        let (partition, offset) = (m.partition(), m.offset());
        let (Ok(p), Ok(o)) = (u32::try_from(partition), u64::try_from(offset)) else {
            warn!(
                partition,
                offset, "record with an invalid position; skipped"
            );
            return true;
        };
        let Some(epoch) = self.tracker.queue(partition, offset) else {
            debug!(
                partition,
                offset, "record of a partition not owned; skipped"
            );
            return true;
        };
        let message = to_message(m, p, o);
        self.tracker.in_flight.fetch_add(1, Ordering::AcqRel);
        // Records of one partition enter the channel in offset order, so `next` hands them out
        // in offset order.
        if self.tx.blocking_send(Item::Record(message, epoch)).is_err() {
            self.tracker.in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Pauses every assigned partition while `max_in_flight` records are out, resumes after.
    /// librdkafka resumes a paused partition right after the last record it returned, so
    /// nothing is skipped or repeated.
    fn apply_backpressure(&self, over: bool) {
        let topic = &self.tracker.topic;
        if over {
            let Ok(assignment) = self.consumer.assignment() else {
                return;
            };
            let mut paused = lock(&self.tracker.paused);
            let mut tpl = TopicPartitionList::new();
            for e in assignment.elements_for_topic(topic) {
                if paused.insert(e.partition()) {
                    tpl.add_partition(topic, e.partition());
                }
            }
            if tpl.count() > 0 {
                if let Err(e) = self.consumer.pause(&tpl) {
                    warn!(error = %e, "cannot pause partitions");
                    for e in tpl.elements() {
                        paused.remove(&e.partition());
                    }
                }
            }
        } else {
            let mut paused = lock(&self.tracker.paused);
            if paused.is_empty() {
                return;
            }
            let mut tpl = TopicPartitionList::new();
            for p in paused.iter() {
                tpl.add_partition(topic, *p);
            }
            match self.consumer.resume(&tpl) {
                Ok(()) => paused.clear(),
                Err(e) => warn!(error = %e, "cannot resume partitions"),
            }
        }
    }

    /// Leaves the group: the revoke that closing triggers commits the acked prefix without
    /// waiting for records still out, then the member leaves so its partitions move at once.
    fn leave(self) {
        self.tracker.leaving.store(true, Ordering::Release);
        let MemberThread {
            consumer,
            tracker,
            tx,
            done,
            ..
        } = self;
        drop(tx);
        // An acker may hold the consumer for a moment while committing; closing happens here,
        // once this thread holds the only reference, so `close` returns after the member left.
        let deadline = Instant::now() + LEAVE_WAIT;
        let mut consumer = consumer;
        loop {
            match Arc::try_unwrap(consumer) {
                // Dropping the consumer closes it: librdkafka revokes (our callback commits),
                // leaves the group and waits until that is done.
                Ok(member) => {
                    drop(member);
                    break;
                }
                Err(shared) if Instant::now() < deadline => {
                    consumer = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(shared) => {
                    warn!("consumer still in use after {LEAVE_WAIT:?}; it closes when released");
                    drop(shared);
                    break;
                }
            }
        }
        lock(&tracker.parts).clear();
        done.store(true, Ordering::Release);
        info!("left the consumer group");
    }
}

/// What the member thread hands to `next`.
enum Item {
    /// A record and the epoch of its partition's ownership.
    Record(Message, u64),
    /// The consumer failed for good; the subscription ends after it.
    Failed(BusError),
}

pub(super) fn to_message(m: &BorrowedMessage<'_>, partition: u32, offset: u64) -> Message {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_string(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    Message {
        topic: m.topic().to_string(),
        partition,
        offset,
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        key: m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default(),
        payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::{PartTrack, Slot};

    #[test]
    fn prefix_moves_only_over_contiguous_acks() {
        let mut t = PartTrack::new(1);
        for o in [10, 11, 12, 13] {
            t.pending.insert(o, Slot::Out);
        }
        for o in [12, 11] {
            t.pending.insert(o, Slot::Acked);
            t.advance();
        }
        assert_eq!(t.to_commit(), None, "10 is still out");
        t.pending.insert(10, Slot::Acked);
        t.advance();
        assert_eq!(t.to_commit(), Some(13));
        t.committed = Some(13);
        assert_eq!(t.to_commit(), None);
        // An abandoned record stops the prefix for good in this ownership.
        t.pending.insert(13, Slot::Abandoned);
        t.pending.insert(14, Slot::Acked);
        t.advance();
        assert_eq!(t.to_commit(), None);
        assert!(!t.has_out());
    }
}
