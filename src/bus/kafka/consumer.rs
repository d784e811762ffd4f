//! One consumer-group member per subscription.
//!
//! A dedicated thread owns the librdkafka consumer and polls it: records, rebalance callbacks and
//! group events all arrive on that thread, so a revoke never interleaves with taking a record
//! (one served between two records of a batch leaves the earlier ones behind by their epoch).
//! Records go to [`KafkaSubscription::next`] through a channel, in batches of what one poll and
//! the records librdkafka already holds bring (one wake-up of the runtime per batch, not per
//! record); acks come back through [`Tracker`], which keeps per partition the records handed out
//! in this ownership (its epoch) and the contiguous acked prefix.
//!
//! Commits: an ack only records itself in the tracker and returns, without a broker round trip.
//! The member thread commits the acked prefix in the background, asynchronously, every
//! [`COMMIT_INTERVAL`] (sooner after [`COMMIT_BATCH`] newly committable records). Commits are
//! synchronous where the position must be on the broker before going on: before a revoke
//! completes, when the member leaves (`close` or drop), and when this process asks for the
//! group's positions ([`MemberHandle::flush`]), so lag read here includes every ack made here.
//!
//! Durability window: a record acked but not yet committed when the process dies is delivered
//! again to the next owner (at-least-once, as for unacked records). The window is bounded by
//! the commit interval: at most about [`COMMIT_INTERVAL`] or [`COMMIT_BATCH`] records of acks,
//! whichever is smaller. A clean leave or revoke loses nothing of what was acked.
//!
//! Order: each partition's records are handed out in offset order; acks may come in any order
//! (the runtime works on different keys at once), the committed offset only moves over a prefix
//! that is entirely acked. Nothing is ordered across partitions.
//!
//! Start: a partition resumes at the group's commit. Without one it starts where
//! `bus.start_from` says; a commit below the log start (records deleted by retention before the
//! group read them) resumes at the log start, the oldest record kept, as on the other backends:
//! librdkafka's `earliest` reset does that, and a `latest` group's member commits the log start
//! before it reads (`MemberContext::place_partitions`), or librdkafka would reset it to the end.
//!
//! Offsets that are no records (transaction markers, which librdkafka consumes without handing
//! them out; aborted records a read_committed fetch leaves out) are committed past from the
//! consumer's position once every record taken is acked (`PartTrack::commit_point`): a log
//! that ends with a marker, as a transactional producer's does, leaves the group's lag at 0.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn};

use super::{blocking, lock, map_err, Settings};
use crate::bus::{Acker, BusError, Delivery, Message, StartFrom, SubscribeOptions, Subscription};

type Member = BaseConsumer<MemberContext>;

/// Poll timeout of the member thread: bounds how late it notices `close` or a dropped
/// subscription. Rebalance callbacks and records wake it immediately.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Poll timeout while paused for backpressure: acks do not wake the poll, so resuming after
/// acks freed room is at most this late.
const PAUSED_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How long the member holds off polling, once `max_in_flight` records are out, before it pauses
/// its partitions. Pausing makes librdkafka drop every record it prefetched (and any fetch
/// response in flight) and fetch them again on resume, which on a loaded broker takes hundreds
/// of milliseconds (measured: 0.5 to 1 s per pause on Tansu, the whole difference between 16k
/// and 100k records/s). Not polling keeps the prefetched records in librdkafka's queue (bounded
/// by its `queued.*` limits, as when polling), so a runtime that catches up within this time
/// costs no refetch. Rebalance callbacks and records are only served by polling, so this also
/// bounds how late a rebalance is served while the runtime is full; after it the member pauses
/// and polls as before, which serves them and lets a revoke go (see `Tracker::revoke_wait`).
const HOLD_BEFORE_PAUSE: Duration = Duration::from_millis(500);

/// How often a holding member (see [`HOLD_BEFORE_PAUSE`]) looks whether acks freed room.
const HOLD_CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// Records handed to the runtime in one channel send, at most.
const HAND_OVER_BATCH: usize = 64;

/// How long leaving waits for a position flush ([`MemberHandle::flush`]) that is committing at
/// that moment to finish.
const LEAVE_WAIT: Duration = Duration::from_secs(5);

/// Longest time an ack waits for its background commit, which bounds what a crash redelivers.
/// 100 ms is far below Kafka's default auto-commit interval (5 s) and below a human-visible
/// delay in lag figures, while at a few hundred commits per second at most it costs the broker
/// (and Tansu's storage) little; commits are asynchronous, so the interval costs no throughput.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// Newly committable records that trigger a commit before [`COMMIT_INTERVAL`] is up. Under load
/// (hundreds of thousands of records per second) this caps the redelivery after a crash to about
/// one runtime queue (the default `max_in_flight` is 1024), at one small commit request per
/// thousand records, which is negligible next to fetching them.
const COMMIT_BATCH: usize = 1000;

/// In-flight count at or below which a member holding or paused for backpressure polls again:
/// half of `max_in_flight`, so it wakes once per half a queue rather than per record.
/// After a pause librdkafka fetches again what it dropped; resuming at half overlaps that fetch
/// round trip with handling the other half.
fn resume_below(max_in_flight: usize) -> usize {
    max_in_flight / 2
}

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

/// Records of one partition handed out and not yet part of the acked prefix, by offset. A
/// partition's records are polled in offset order, so they append at the back and the acked
/// prefix leaves at the front: a ring with a binary search, no allocation per record.
#[derive(Debug, Default)]
struct Pending(VecDeque<(i64, Slot)>);

impl Pending {
    /// Adds `offset` with `slot`; false if it is already there. Appended as a rule; a record
    /// polled again after its position was reset below takes its place in order.
    fn insert(&mut self, offset: i64, slot: Slot) -> bool {
        match self.0.back() {
            Some(&(last, _)) if last >= offset => {
                match self.0.binary_search_by_key(&offset, |e| e.0) {
                    Ok(_) => return false,
                    Err(i) => self.0.insert(i, (offset, slot)),
                }
            }
            _ => self.0.push_back((offset, slot)),
        }
        true
    }

    fn get_mut(&mut self, offset: i64) -> Option<&mut Slot> {
        // A partition's offsets are consecutive as a rule (gaps only after compaction or
        // transaction markers), so the record is usually at its distance from the front.
        let first = self.0.front()?.0;
        let guess = usize::try_from(offset - first).ok()?;
        let i = match self.0.get(guess) {
            Some(&(o, _)) if o == offset => guess,
            _ => self.0.binary_search_by_key(&offset, |e| e.0).ok()?,
        };
        self.0.get_mut(i).map(|e| &mut e.1)
    }

    /// Removes the first record if it is acked; its offset.
    fn pop_acked(&mut self) -> Option<i64> {
        match self.0.front() {
            Some(&(offset, Slot::Acked)) => {
                self.0.pop_front();
                Some(offset)
            }
            _ => None,
        }
    }

    fn any(&self, slot: Slot) -> bool {
        self.0.iter().any(|e| e.1 == slot)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One owned partition during one ownership (epoch).
#[derive(Debug)]
struct PartTrack {
    epoch: u64,
    /// Records handed out and not yet part of the acked prefix.
    pending: Pending,
    /// End (next offset) of the contiguous acked prefix of this ownership.
    acked_upto: Option<i64>,
    /// The consumer's position (next offset to fetch) read after a poll that left nothing more
    /// to take, and after the last record of the partition was admitted (admitting a record
    /// clears it): every offset below it is a record this ownership already holds or no record
    /// at all: a transaction marker (librdkafka consumes those without handing them out and
    /// moves the position past them), an aborted record a read_committed fetch leaves out, a
    /// compacted gap. See [`PartTrack::commit_point`].
    polled_to: Option<i64>,
    /// What this member last committed for the partition (asynchronous commits count when
    /// requested; a failed one resets this to `synced`).
    committed: Option<i64>,
    /// What this member last committed synchronously (known to be on the broker).
    synced: Option<i64>,
    /// True while this ownership lasts (cleared when the track is dropped): deliveries hold
    /// it, so `revoked` is a load instead of a lock shared with the member thread.
    owned: Arc<AtomicBool>,
    /// Being revoked: no more records of it are handed out, and deliveries (which hold it)
    /// not started yet, or waiting to retry, are dropped at once instead of holding the revoke
    /// for the whole hand-over wait. Set under the parts lock.
    moving: Arc<AtomicBool>,
}

impl PartTrack {
    fn revoking(&self) -> bool {
        self.moving.load(Ordering::Acquire)
    }

    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            pending: Pending::default(),
            acked_upto: None,
            polled_to: None,
            committed: None,
            synced: None,
            owned: Arc::new(AtomicBool::new(true)),
            moving: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Queues `offset` if this is ownership `epoch`, not being revoked, and the record is
    /// neither below the acked prefix nor pending already (see [`Tracker::queue_all`]).
    fn admit(&mut self, epoch: u64, offset: i64) -> bool {
        self.epoch == epoch
            && !self.revoking()
            && self.acked_upto.is_none_or(|upto| offset >= upto)
            && self.pending.insert(offset, Slot::Queued)
    }

    /// Moves the acked prefix over leading acked records; returns how many it moved over.
    fn advance(&mut self) -> usize {
        let mut moved = 0;
        while let Some(offset) = self.pending.pop_acked() {
            self.acked_upto = Some(offset + 1);
            moved += 1;
        }
        moved
    }

    /// How far a commit may go: the end of the acked prefix, or the consumer's position past
    /// it once every record admitted in this ownership is acked. Offsets between the last
    /// record and the position are no records (a transaction marker above all: a foreign
    /// transactional producer ends each transaction with one, so the log usually ends with
    /// one); committing only the acked prefix would leave the group below a trailing marker,
    /// its lag at 1 for good.
    ///
    /// Only after a record of this ownership was acked: the position is then read after a
    /// record librdkafka handed out in this ownership (admitting one clears `polled_to`), so it
    /// cannot be one left from an earlier assignment of the partition. A partition whose
    /// ownership got no record at all (only markers and aborted records since the commit) keeps
    /// its commit, and so its lag, until a record comes.
    fn commit_point(&self) -> Option<i64> {
        match (self.acked_upto, self.polled_to) {
            (Some(acked), Some(polled)) if polled > acked && self.pending.is_empty() => {
                Some(polled)
            }
            (acked, _) => acked,
        }
    }

    /// The offset to commit, if the committable range moved past what was committed.
    fn to_commit(&self) -> Option<i64> {
        Self::past(self.commit_point(), self.committed)
    }

    /// The offset to commit synchronously: also what asynchronous commits may still have in
    /// flight, so a synchronous commit leaves the whole acked prefix on the broker.
    fn to_sync(&self) -> Option<i64> {
        Self::past(self.commit_point(), self.synced)
    }

    fn past(acked: Option<i64>, done: Option<i64>) -> Option<i64> {
        match (acked, done) {
            (Some(a), Some(c)) if a <= c => None,
            (a, _) => a,
        }
    }

    fn has_out(&self) -> bool {
        self.pending.any(Slot::Out)
    }
}

impl Drop for PartTrack {
    /// However the ownership ends (revoked, replaced by a new assignment, the member left).
    fn drop(&mut self) {
        self.owned.store(false, Ordering::Release);
    }
}

/// Ack bookkeeping and commits of one subscription, shared by the member thread, its
/// rebalance callbacks, `next` and the ackers.
pub(super) struct Tracker {
    topic: String,
    group: String,
    parts: Mutex<HashMap<i32, PartTrack>>,
    /// The epoch of each owned partition that is not being revoked, as the member thread sees
    /// it: only that thread touches it (its rebalance callbacks and `take`; the last revoke may
    /// run where the consumer is finally dropped), so a record is stamped with the ownership it
    /// was polled in without the lock the ackers share.
    owners: Mutex<HashMap<i32, u64>>,
    /// Signalled whenever a record is acked or abandoned (a revoke waits on it).
    changed: Condvar,
    /// Serialises commits with revokes: a commit only covers partitions still owned, and a
    /// revoke removes a partition only under this lock, so no commit of an old ownership can
    /// land after the partition moved to another member.
    commit_lock: Mutex<()>,
    /// Records taken by the member thread (for its next batch, in the channel or handed out)
    /// and not yet acked or dropped (backpressure).
    in_flight: AtomicUsize,
    /// Records the acked prefixes moved over since the last background commit (a failed
    /// commit adds one so the next tick retries).
    uncommitted: AtomicUsize,
    next_epoch: AtomicU64,
    /// Set when the member leaves (close or drop): revokes then commit without waiting.
    leaving: AtomicBool,
    /// Partitions this member paused for backpressure.
    paused: Mutex<HashSet<i32>>,
    /// The last failed commit, reported by `close`.
    commit_error: Mutex<Option<BusError>>,
    /// How long a revoke waits for the acks of records already handed out before it commits
    /// what was acked and lets the partition go (`bus.kafka.handover_wait_ms`): as long as a
    /// handler may run, so the next owner never handles a key this member still handles.
    /// What is still unacked then is redelivered to the next owner (at-least-once).
    revoke_wait: Duration,
}

impl Tracker {
    fn new(topic: &str, group: &str, revoke_wait: Duration) -> Self {
        Self {
            revoke_wait,
            topic: topic.to_string(),
            group: group.to_string(),
            parts: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            commit_lock: Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            uncommitted: AtomicUsize::new(0),
            next_epoch: AtomicU64::new(1),
            leaving: AtomicBool::new(false),
            paused: Mutex::new(HashSet::new()),
            commit_error: Mutex::new(None),
        }
    }

    /// Registers records about to be queued, each under the ownership (epoch) its partition
    /// had when it was polled, in one lock; drops those that must not be handed out: the
    /// ownership ended (revoked, or replaced by a new one, whose position librdkafka fetches
    /// again), or it already has the record (polled again after its position was reset below:
    /// a second copy beside one still out could be handled concurrently with it, and one below
    /// the acked prefix was handled already). Counts the rest in flight.
    fn queue_all(&self, batch: &mut Vec<(Message, u64)>) {
        let mut parts = lock(&self.parts);
        batch.retain(|(m, epoch)| {
            let (partition, offset) = (m.partition as i32, m.offset as i64);
            let admitted = parts.get_mut(&partition).is_some_and(|t| {
                let admitted = t.admit(*epoch, offset);
                if admitted {
                    // A position read before this record is no bound for it.
                    t.polled_to = None;
                }
                admitted
            });
            if !admitted {
                debug!(
                    topic = %self.topic, group = %self.group, partition, offset,
                    "record of a partition not owned, or already taken; skipped"
                );
            }
            admitted
        });
        drop(parts);
        self.in_flight.fetch_add(batch.len(), Ordering::AcqRel);
    }

    /// Takes the consumer's positions of its owned partitions (see [`PartTrack::polled_to`]).
    /// Called by the member thread after a poll that left nothing more to take and after the
    /// records it took were admitted, so a position is never ahead of a record still in the
    /// member thread's hands. A position that lets a commit go further (past a trailing
    /// transaction marker) counts as uncommitted, so the background commit takes it without
    /// waiting for another ack.
    fn note_positions(&self, positions: &TopicPartitionList) {
        let mut moved = false;
        let mut parts = lock(&self.parts);
        for e in positions.elements_for_topic(&self.topic) {
            let Offset::Offset(position) = e.offset() else {
                continue; // not fetched yet in this assignment
            };
            let Some(t) = parts.get_mut(&e.partition()) else {
                continue;
            };
            if t.revoking() || t.polled_to == Some(position) {
                continue;
            }
            let before = t.to_commit();
            t.polled_to = Some(position);
            moved |= t.to_commit() != before;
        }
        drop(parts);
        if moved {
            self.uncommitted.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Marks a queued record as handed out and returns its ownership's flags (see
    /// [`PartTrack::owned`] and [`PartTrack::moving`]: a revoke in progress still owns the
    /// partition and waits for handed-out records under way; those not started yet, or
    /// waiting to retry, are dropped by the consumer); `None` if the ownership ended meanwhile.
    fn hand_out(&self, partition: i32, offset: i64, epoch: u64) -> Option<Ownership> {
        let mut parts = lock(&self.parts);
        match parts.get_mut(&partition) {
            Some(t) if t.epoch == epoch && !t.revoking() => match t.pending.get_mut(offset) {
                Some(slot) if *slot == Slot::Queued => {
                    *slot = Slot::Out;
                    Some(Ownership {
                        owned: Arc::clone(&t.owned),
                        moving: Arc::clone(&t.moving),
                    })
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Records the fate of a handed-out record; the member thread commits the acked prefix.
    /// Acks of an ownership that ended are ignored: the next owner got (or gets) the record.
    fn settle(&self, partition: i32, offset: i64, epoch: u64, slot: Slot) {
        let (moved, revoking) = {
            let mut parts = lock(&self.parts);
            match parts.get_mut(&partition) {
                Some(t) if t.epoch == epoch => {
                    if let Some(s) = t.pending.get_mut(offset) {
                        if *s == Slot::Out {
                            *s = slot;
                        }
                    }
                    (t.advance(), t.revoking())
                }
                _ => {
                    debug!(
                        topic = %self.topic, group = %self.group, partition, offset,
                        "ack of a partition no longer owned; ignored"
                    );
                    (0, false)
                }
            }
        };
        if moved > 0 {
            self.uncommitted.fetch_add(moved, Ordering::AcqRel);
        }
        // Only a revoke waits, and it marks the partition revoking under the same lock before
        // it waits; waking nobody on every ack saves a futex syscall per record.
        if revoking {
            self.changed.notify_all();
        }
    }

    /// Commits the acked prefix of every owned partition (or of `only`) that moved.
    /// `Async` only requests the commit (the result comes to [`MemberContext`]); `Sync` returns
    /// once the broker has it, including what asynchronous commits before it requested.
    /// The caller holds `commit_lock`.
    fn commit_acked(
        &self,
        consumer: &Member,
        only: Option<&HashSet<i32>>,
        mode: CommitMode,
    ) -> Result<(), BusError> {
        let sync = matches!(mode, CommitMode::Sync);
        let targets: Vec<(i32, u64, i64)> = lock(&self.parts)
            .iter()
            .filter(|(p, _)| only.is_none_or(|o| o.contains(p)))
            .filter_map(|(p, t)| {
                let o = if sync { t.to_sync() } else { t.to_commit() };
                o.map(|o| (*p, t.epoch, o))
            })
            .collect();
        if targets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(targets.len());
        for (p, _, o) in &targets {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o))
                .map_err(map_err)?;
        }
        consumer.commit(&tpl, mode).map_err(map_err)?;
        let mut parts = lock(&self.parts);
        for (p, epoch, o) in targets {
            if let Some(t) = parts.get_mut(&p).filter(|t| t.epoch == epoch) {
                t.committed = Some(t.committed.map_or(o, |c| c.max(o)));
                if sync {
                    t.synced = Some(t.synced.map_or(o, |c| c.max(o)));
                }
            }
        }
        debug!(topic = %self.topic, group = %self.group, sync, "committed acked offsets");
        Ok(())
    }

    /// A commit failed on the broker: what it covered counts as uncommitted again, so the next
    /// background commit retries it.
    fn commit_failed(&self, tpl: &TopicPartitionList) {
        let mut parts = lock(&self.parts);
        for e in tpl.elements_for_topic(&self.topic) {
            if let Some(t) = parts.get_mut(&e.partition()) {
                t.committed = t.synced;
            }
        }
        drop(parts);
        self.uncommitted.fetch_add(1, Ordering::AcqRel);
    }

    fn on_assign(&self, tpl: &TopicPartitionList) {
        let _commits = lock(&self.commit_lock);
        let mut parts = lock(&self.parts);
        let mut owners = lock(&self.owners);
        for e in tpl.elements_for_topic(&self.topic) {
            // A fresh epoch: acks of an earlier ownership of the same partition are ignored,
            // and the records restart from the committed offset (librdkafka fetches it).
            let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
            parts.insert(e.partition(), PartTrack::new(epoch));
            owners.insert(e.partition(), epoch);
        }
        drop(owners);
        info!(
            topic = %self.topic, group = %self.group,
            assigned = ?tpl.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect::<Vec<_>>(),
            "partitions assigned"
        );
    }

    /// Resumes partitions paused for backpressure before they go: librdkafka keeps the
    /// application pause flag, and a later re-assignment must not start paused.
    fn resume_leaving(&self, consumer: &Member, leaving: impl Iterator<Item = i32>) {
        let to_resume: Vec<i32> = {
            let mut paused = lock(&self.paused);
            leaving.filter(|p| paused.remove(p)).collect()
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
    }

    /// Ends, as lost, the ownership of every partition not in `assigned`; returns them.
    fn keep_only(&self, assigned: &TopicPartitionList) -> Vec<i32> {
        let kept: HashSet<i32> = assigned
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let _commits = lock(&self.commit_lock);
        lock(&self.owners).retain(|p, _| kept.contains(p));
        let mut parts = lock(&self.parts);
        let lost: Vec<i32> = parts
            .keys()
            .filter(|p| !kept.contains(p))
            .copied()
            .collect();
        if !lost.is_empty() {
            warn!(topic = %self.topic, group = %self.group, partitions = ?lost, "partitions unassigned by a rebalance error; taken as lost, not committing");
            parts.retain(|p, _| kept.contains(p));
        }
        lost
    }

    fn on_revoke(&self, consumer: &Member, tpl: &TopicPartitionList) {
        let revoked: HashSet<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let lost = consumer.assignment_lost();
        lock(&self.owners).retain(|p, _| !revoked.contains(p));
        {
            let mut parts = lock(&self.parts);
            for p in &revoked {
                if let Some(t) = parts.get_mut(p) {
                    t.moving.store(true, Ordering::Release);
                }
            }
        }
        self.resume_leaving(consumer, revoked.iter().copied());
        if lost {
            // The group already gave them to others: a commit now could move the new owner's
            // position, so nothing is committed; the unacked rest is redelivered there.
            warn!(topic = %self.topic, group = %self.group, partitions = ?revoked, "partitions lost; not committing");
        } else {
            if !self.leaving.load(Ordering::Acquire) {
                self.wait_for_acks(&revoked);
            }
            let _commits = lock(&self.commit_lock);
            if let Err(e) = self.commit_acked(consumer, Some(&revoked), CommitMode::Sync) {
                warn!(topic = %self.topic, group = %self.group, error = %e, "commit on revoke failed; the next owner redelivers from the last commit");
                // `close` reports the leave's own commit; an earlier rebalance's is logged only.
                if self.leaving.load(Ordering::Acquire) {
                    *lock(&self.commit_error) = Some(e);
                }
            }
        }
        let _commits = lock(&self.commit_lock);
        lock(&self.parts).retain(|p, _| !revoked.contains(p));
        info!(topic = %self.topic, group = %self.group, revoked = ?revoked, "partitions revoked");
    }

    /// Waits (bounded) until no handed-out record of `revoked` is unacked.
    fn wait_for_acks(&self, revoked: &HashSet<i32>) {
        let deadline = Instant::now() + self.revoke_wait;
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
                    topic = %self.topic, group = %self.group, wait = ?self.revoke_wait,
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
    /// The group starts at the log end (`bus.start_from = latest`).
    start_latest: bool,
}

impl MemberContext {
    /// Places, before their first record, the partitions of a `latest` group that librdkafka
    /// would otherwise start where `auto.offset.reset = latest` says (see [`placement`]):
    ///
    /// - Partitions the group never committed on. librdkafka resolves `latest` at the first
    ///   fetch and keeps it nowhere until the first ack: a member restarting before that would
    ///   start at the new end, skipping what was published meanwhile, and lag would count the
    ///   whole log. (The embedded log commits its end at join the same way.) A new group (no
    ///   commit on any partition of the topic) commits the log end of **every** partition, its
    ///   own and the others': a partition that has no commit once the group has begun was added
    ///   to the topic since, and starts at its beginning, as on JetStream (at its end, what was
    ///   published to it before a member got it would be skipped). Members of a new group
    ///   joining together each place the whole topic; the later commit of a partition another
    ///   member already reads from moves its position on only by what was published between the
    ///   two commits, which matters only if that member dies before its first ack.
    /// - Its own partitions whose commit is below the log start (retention deleted records the
    ///   group had not read: it was stopped longer than the retention). librdkafka takes such a
    ///   commit as out of range and resets it to the log end, skipping every record still kept;
    ///   committed up to the log start, the group resumes at the oldest record kept, as on
    ///   JetStream and the embedded log. An `earliest` group needs none of this: librdkafka's
    ///   `earliest` reset is that log start. Left to librdkafka's `latest` reset (the log end):
    ///   a log start that passes the commit between this check and the first fetch (one round
    ///   trip), and a member that, while it owns the partition, falls so far behind that
    ///   retention deletes records it has not fetched yet.
    ///
    /// Why here and not by `auto.offset.reset = error` on the member thread: librdkafka leaves a
    /// partition it refused to reset in a fetch state that `seek` refuses (only a new assignment
    /// starts it again, outside the rebalance bookkeeping), rust-rdkafka's consumer error does
    /// not say which partition, and the error would come for every partition without a commit
    /// as well. Here the partition is not fetched yet, and nobody else commits on it: a revoke
    /// committed before it was given to this member. The cost is the log bounds of the assigned
    /// partitions, one request per leader and bound, at each assignment, nothing per record.
    fn place_partitions(&self, consumer: &Member, tpl: &TopicPartitionList) {
        let t = &self.tracker;
        let assigned: Vec<i32> = tpl
            .elements_for_topic(&t.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if assigned.is_empty() {
            return;
        }
        // Tried again on a failure, within a deadline (the member thread fetches and commits
        // nothing meanwhile): a new group's partition left without a commit would be taken for
        // one added later at the next rebalance, and read from its start. The plan (new group
        // or not, and where each partition goes) is made once: a commit that failed part way
        // must not make a retry take the group for an old one.
        let deadline = std::time::Instant::now() + PLACE_DEADLINE;
        let mut failure = String::new();
        let mut plan = None;
        for wait_ms in PLACE_RETRY_MS {
            std::thread::sleep(Duration::from_millis(wait_ms));
            if std::time::Instant::now() >= deadline {
                break;
            }
            if plan.is_none() {
                match self.plan_placement(consumer, &assigned) {
                    Ok(p) => plan = Some(p),
                    Err(e) => {
                        failure = e;
                        continue;
                    }
                }
            }
            let Some(plan) = &plan else { continue };
            if plan.place.count() == 0 {
                return;
            }
            match consumer.commit(&plan.place, CommitMode::Sync) {
                Ok(()) => {
                    plan.log(t);
                    return;
                }
                Err(e) => failure = format!("commit: {e}"),
            }
        }
        tracing::error!(
            topic = %t.topic, group = %t.group, error = %failure,
            "placing partitions failed; they start where librdkafka resolves latest (a new \
             group's partition left without a commit is read from its start at the next \
             rebalance; a commit below the log start resumes at the log end)"
        );
    }

    /// Where the partitions this member places go (see [`place_partitions`] and
    /// [`placement`]).
    ///
    /// [`place_partitions`]: MemberContext::place_partitions
    fn plan_placement(&self, consumer: &Member, assigned: &[i32]) -> Result<Placement, String> {
        let t = &self.tracker;
        let known = consumer
            .fetch_metadata(Some(&t.topic), super::REQUEST_TIMEOUT)
            .map_err(|e| format!("partitions unknown: {e}"))?
            .topics()
            .iter()
            .find(|x| x.name() == t.topic)
            .map_or(0, |x| x.partitions().len());
        let mut asked = TopicPartitionList::new();
        let every = (0..i32::try_from(known).unwrap_or(i32::MAX)).chain(assigned.iter().copied());
        let mut seen = std::collections::BTreeSet::new();
        for p in every {
            if seen.insert(p) {
                asked.add_partition(&t.topic, p);
            }
        }
        let committed = consumer
            .committed_offsets(asked, super::REQUEST_TIMEOUT)
            .map_err(|e| format!("committed offsets unknown: {e}"))?;
        // A partition the broker failed reads as "no commit" unless its error is checked.
        let elements = super::admin::committed_of(&committed, &t.topic)
            .map_err(|e| format!("committed offsets unknown: {e}"))?;
        let new_group = elements.iter().all(|e| e.1 == Offset::Invalid);
        let commits: Vec<(i32, Option<i64>)> = elements
            .iter()
            .filter_map(|&(p, offset)| match offset {
                Offset::Invalid => Some((p, None)),
                Offset::Offset(c) => Some((p, Some(c))),
                // Not an offset a commit leaves: librdkafka resolves it.
                _ => None,
            })
            .collect();
        let decide = to_decide(&commits, assigned, new_group);
        let mut plan = Placement {
            place: TopicPartitionList::new(),
            new_group,
            fresh: 0,
            below_start: Vec::new(),
        };
        if decide.is_empty() {
            return Ok(plan);
        }
        let partitions: Vec<i32> = decide.iter().map(|d| d.0).collect();
        let bounds = log_bounds(consumer, &t.topic, &partitions)?;
        for (p, c) in decide {
            let (low, high) = *bounds
                .get(&p)
                .ok_or_else(|| format!("partition {p}'s offsets unknown"))?;
            let Some(at) = placement(c, new_group, low, high) else {
                continue;
            };
            match c {
                None => plan.fresh += 1,
                Some(c) => plan.below_start.push((p, c, at)),
            }
            plan.place
                .add_partition_offset(&t.topic, p, Offset::Offset(at))
                .map_err(|e| format!("cannot place partition {p}: {e}"))?;
        }
        Ok(plan)
    }
}

/// What [`MemberContext::plan_placement`] decided: the commits to make before the assignment.
struct Placement {
    place: TopicPartitionList,
    new_group: bool,
    /// Partitions without a commit among them.
    fresh: usize,
    /// Partitions whose commit was below the log start: (partition, commit, log start).
    below_start: Vec<(i32, i64, i64)>,
}

impl Placement {
    /// Logs a placement once committed.
    fn log(&self, t: &Tracker) {
        if self.fresh > 0 {
            let at = if self.new_group { "end" } else { "start" };
            info!(topic = %t.topic, group = %t.group, partitions = self.fresh, at, "new partitions placed");
        }
        if !self.below_start.is_empty() {
            warn!(
                topic = %t.topic, group = %t.group, moved = ?self.below_start,
                "the group's commit was below the log start (retention deleted records it had \
                 not read); resuming at the oldest record kept"
            );
        }
    }
}

/// The partitions whose placement a member of a `latest` group decides, each with the group's
/// commit on it: every partition of a new group (no commit on any), its own otherwise (another
/// member's partition is that member's to place).
pub(super) fn to_decide(
    commits: &[(i32, Option<i64>)],
    assigned: &[i32],
    new_group: bool,
) -> Vec<(i32, Option<i64>)> {
    commits
        .iter()
        .filter(|(p, _)| new_group || assigned.contains(p))
        .copied()
        .collect()
}

/// Where a member of a `latest` group commits a partition before reading it, if anywhere, from
/// the group's commit on it and its log start (`low`) and end (`high`): a partition without a
/// commit goes to the end in a new group and to the start in one that has begun (it was added
/// since); a commit below the log start goes up to it (the oldest record kept). A commit at or
/// above the log start stays: librdkafka resumes there (one past the end is reset as
/// `auto.offset.reset` says).
pub(super) fn placement(
    committed: Option<i64>,
    new_group: bool,
    low: i64,
    high: i64,
) -> Option<i64> {
    match committed {
        None if new_group => Some(high),
        None => Some(low),
        Some(c) if c < low => Some(low),
        Some(_) => None,
    }
}

/// The log start and end of each of `partitions`: one ListOffsets request per leader and bound
/// (the same requests as librdkafka's watermark query, which asks for one partition at a time).
fn log_bounds(
    consumer: &Member,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, (i64, i64)>, String> {
    let query = |bound: Offset| -> Result<HashMap<i32, i64>, String> {
        let mut tpl = TopicPartitionList::with_capacity(partitions.len());
        for p in partitions {
            tpl.add_partition_offset(topic, *p, bound)
                .map_err(|e| format!("partition {p}'s offsets: {e}"))?;
        }
        let found = consumer
            .offsets_for_times(tpl, super::REQUEST_TIMEOUT)
            .map_err(|e| format!("log offsets unknown: {e}"))?;
        found
            .elements_for_topic(topic)
            .iter()
            .map(|e| {
                let p = e.partition();
                e.error()
                    .map_err(|err| format!("partition {p}'s offsets unknown: {err}"))?;
                match e.offset() {
                    Offset::Offset(o) => Ok((p, o)),
                    other => Err(format!("partition {p}'s offsets unknown: {other:?}")),
                }
            })
            .collect()
    };
    let lows = query(Offset::Beginning)?;
    let highs = query(Offset::End)?;
    Ok(lows
        .into_iter()
        .filter_map(|(p, low)| highs.get(&p).map(|high| (p, (low, *high))))
        .collect())
}

/// Waits before each try of a placement (the first at once).
const PLACE_RETRY_MS: [u64; 3] = [0, 200, 1_000];
/// The longest a placement is tried.
const PLACE_DEADLINE: Duration = Duration::from_secs(15);

/// The longest one synchronous commit can take: librdkafka's `socket.timeout.ms` (its default,
/// which nexus keeps) bounds the request.
const SYNC_COMMIT_BUDGET: Duration = Duration::from_secs(60);

/// The longest a placement can keep the member in its assign callback: tries start until
/// [`PLACE_DEADLINE`], and one started just before it asks metadata, committed offsets and both
/// log bounds (each bounded by `REQUEST_TIMEOUT`) and commits.
const PLACE_BUDGET: Duration = PLACE_DEADLINE
    .saturating_add(super::REQUEST_TIMEOUT.saturating_mul(4))
    .saturating_add(SYNC_COMMIT_BUDGET);

/// Slack on top of the callbacks' budgets for the member loop between two polls.
const MAX_POLL_MARGIN: Duration = Duration::from_secs(30);

/// librdkafka's default `max.poll.interval.ms`: a member never polls less often than that allows.
const MAX_POLL_DEFAULT_MS: u64 = 300_000;
/// The largest `max.poll.interval.ms` librdkafka accepts (a day).
const MAX_POLL_LIMIT_MS: u64 = 86_400_000;

/// `max.poll.interval.ms` for a member. The rebalance callbacks run on the member thread between
/// two polls (rust-rdkafka serves them after librdkafka's poll returned), and librdkafka makes a
/// member that does not poll for this long leave the group: its partitions would go to another
/// member, which reads from the last commit while this member's handlers still run, the very
/// overlap the hand-over wait is there to prevent. So it covers a revoke's wait for acks
/// (`handover_wait_ms`) and its commit, plus a placement, plus a margin; never below librdkafka's
/// default, nor below `session.timeout.ms` (librdkafka refuses that), nor above its maximum.
pub(super) fn max_poll_interval_ms(handover_wait_ms: u64, session_timeout_ms: u64) -> u64 {
    let callbacks = SYNC_COMMIT_BUDGET + PLACE_BUDGET + MAX_POLL_MARGIN;
    handover_wait_ms
        .saturating_add(u64::try_from(callbacks.as_millis()).unwrap_or(u64::MAX))
        .max(MAX_POLL_DEFAULT_MS)
        .max(session_timeout_ms)
        .min(MAX_POLL_LIMIT_MS)
}

/// The librdkafka settings of a group member of `group` starting at `start`.
pub(super) fn member_config(settings: &Settings, group: &str, start: StartFrom) -> ClientConfig {
    let k = &settings.config.kafka;
    let mut cc = settings.consumer_config(Some(group));
    let start = match start {
        StartFrom::Earliest => "earliest",
        StartFrom::Latest => "latest",
    };
    // Heartbeats must be well inside the session timeout (Kafka's rule of thumb: a third).
    let heartbeat = (k.session_timeout_ms / 3).clamp(100, 3000);
    // Where a partition has no usable commit. A `latest` group's member commits its
    // partitions' places before reading them (`MemberContext::place_partitions`), so the
    // `latest` reset only applies where that failed or came too late (see there).
    cc.set("auto.offset.reset", start)
        .set(
            "partition.assignment.strategy",
            &k.partition_assignment_strategy,
        )
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", heartbeat.to_string())
        .set(
            "max.poll.interval.ms",
            max_poll_interval_ms(k.handover_wait_ms, k.session_timeout_ms).to_string(),
        );
    cc
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    /// Results of commits, served by `poll` on the member thread. Synchronous commits report
    /// their errors to the caller as well; resetting after them only causes one more commit.
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            warn!(
                topic = %self.tracker.topic, group = %self.tracker.group, error = %e,
                "commit failed; retried with the next commit"
            );
            self.tracker.commit_failed(offsets);
        }
    }

    // Both run before librdkafka applies the change: partitions are tracked before their first
    // record can arrive, and a revoked partition's acks are waited for and committed before
    // another member can be given it.
    fn pre_rebalance(&self, consumer: &Member, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                if self.start_latest {
                    self.place_partitions(consumer, tpl);
                }
                self.tracker.on_assign(tpl)
            }
            Rebalance::Revoke(tpl) => self.tracker.on_revoke(consumer, tpl),
            Rebalance::Error(e) => {
                warn!(topic = %self.tracker.topic, group = %self.tracker.group, error = %e, "rebalance error")
            }
        }
    }

    /// After a failed rebalance librdkafka has unassigned partitions it names to nobody here:
    /// the ones no longer assigned end as lost (nothing committed, their records left to the
    /// next owner), or their acks would commit over the next owner's position.
    fn post_rebalance(&self, consumer: &Member, rebalance: &Rebalance<'_>) {
        if let Rebalance::Error(_) = rebalance {
            let lost = match consumer.assignment() {
                Ok(tpl) => self.tracker.keep_only(&tpl),
                Err(e) => {
                    warn!(topic = %self.tracker.topic, group = %self.tracker.group, error = %e, "assignment unknown after a rebalance error; every partition taken as lost");
                    self.tracker.keep_only(&TopicPartitionList::new())
                }
            };
            self.tracker.resume_leaving(consumer, lost.into_iter());
        }
    }
}

/// A delivery's view of its partition's ownership.
struct Ownership {
    owned: Arc<AtomicBool>,
    moving: Arc<AtomicBool>,
}

/// Backend side of a delivery's ack.
struct KafkaAcker {
    tracker: Arc<Tracker>,
    partition: i32,
    offset: i64,
    epoch: u64,
    ownership: Ownership,
    settled: bool,
}

#[async_trait]
impl Acker for KafkaAcker {
    /// Records the ack and returns: the member thread commits the acked prefix in the
    /// background (see the module docs for the durability window). Like before, an ack after the
    /// member left, or of a partition it no longer owns, is ignored and returns `Ok`.
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        self.settled = true;
        self.tracker.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.tracker
            .settle(self.partition, self.offset, self.epoch, Slot::Acked);
        Ok(())
    }

    fn revoked(&self) -> bool {
        !self.ownership.owned.load(Ordering::Acquire)
    }

    /// From the start of a revoke: it waits for the records under way, not for these.
    fn revoking(&self) -> bool {
        self.ownership.moving.load(Ordering::Acquire) || self.revoked()
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

/// What the bus keeps of each member it started, to order a new join after a leave and to
/// flush its acks before reading the group's positions.
#[derive(Clone)]
pub(super) struct MemberHandle {
    topic: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    tracker: Arc<Tracker>,
    consumer: Weak<Member>,
}

impl MemberHandle {
    /// Of `topic` (any group: the bus keeps handles per group).
    pub(super) fn is_of(&self, topic: &str) -> bool {
        self.topic == topic
    }

    /// Commits this member's acked prefix synchronously, so positions read next include every
    /// ack made in this process. Blocking (a broker round trip when there is something to
    /// commit). A member that is leaving commits by itself.
    pub(super) fn flush(&self) -> Result<(), BusError> {
        if !self.active(None) || self.tracker.leaving.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(consumer) = self.consumer.upgrade() else {
            return Ok(());
        };
        let result = {
            let _commits = lock(&self.tracker.commit_lock);
            self.tracker.commit_acked(&consumer, None, CommitMode::Sync)
        };
        drop(consumer);
        result
    }

    /// Told to leave (closed or dropped) and not gone yet.
    pub(super) fn leaving(&self) -> bool {
        self.stop.load(Ordering::Acquire) && !self.done.load(Ordering::Acquire)
    }

    pub(super) fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Still a member (neither closed nor dropped), optionally of `topic`.
    pub(super) fn active(&self, topic: Option<&str>) -> bool {
        !self.stop.load(Ordering::Acquire) && topic.is_none_or(|t| t == self.topic)
    }
}

/// A subscription on Kafka: one group member.
pub(super) struct KafkaSubscription {
    rx: mpsc::Receiver<Item>,
    /// The rest of the last batch received, in order.
    buffer: VecDeque<(Message, u64)>,
    tracker: Arc<Tracker>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KafkaSubscription {
    /// Hands out the first buffered record whose ownership still holds (records of a partition
    /// revoked after they were queued are dropped: the next owner delivers them).
    fn take_buffered(&mut self) -> Option<Delivery> {
        while let Some((message, epoch)) = self.buffer.pop_front() {
            let (partition, offset) = (message.partition as i32, message.offset as i64);
            let Some(ownership) = self.tracker.hand_out(partition, offset, epoch) else {
                self.tracker.in_flight.fetch_sub(1, Ordering::AcqRel);
                continue;
            };
            let acker = KafkaAcker {
                tracker: Arc::clone(&self.tracker),
                partition,
                offset,
                epoch,
                ownership,
                settled: false,
            };
            return Some(Delivery::new(message, Box::new(acker)));
        }
        None
    }

    /// Creates the member, subscribes and starts its thread.
    pub(super) fn start(
        settings: &Settings,
        group: &str,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<(Self, MemberHandle), BusError> {
        let k = &settings.config.kafka;
        let cc = member_config(settings, group, options.start);
        let tracker = Arc::new(Tracker::new(
            topic,
            group,
            Duration::from_millis(k.handover_wait_ms),
        ));
        let context = MemberContext {
            tracker: Arc::clone(&tracker),
            start_latest: options.start == StartFrom::Latest,
        };
        let consumer: Member = cc
            .create_with_context(context)
            .map_err(|e| BusError::Config(format!("kafka consumer: {e}")))?;
        consumer.subscribe(&[topic]).map_err(map_err)?;
        let consumer = Arc::new(consumer);
        let weak = Arc::downgrade(&consumer);
        let max_in_flight = options.max_in_flight.max(1);
        // The member never queues more than max_in_flight records (+1 taken while pausing),
        // sent in batches.
        let (tx, rx) = mpsc::channel(max_in_flight + 1);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let handle = MemberHandle {
            topic: topic.to_string(),
            stop: Arc::clone(&stop),
            done: Arc::clone(&done),
            tracker: Arc::clone(&tracker),
            consumer: weak,
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
                buffer: VecDeque::new(),
                tracker,
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
            if let Some(delivery) = self.take_buffered() {
                return Some(Ok(delivery));
            }
            // Cancel-safe: a batch is moved into the buffer whole before anything is taken.
            match self.rx.recv().await? {
                Item::Records(batch) => self.buffer.extend(batch),
                Item::Failed(e) => return Some(Err(e)),
            }
        }
    }

    fn try_next(&mut self) -> Option<Result<Delivery, BusError>> {
        loop {
            if let Some(delivery) = self.take_buffered() {
                return Some(Ok(delivery));
            }
            match self.rx.try_recv().ok()? {
                Item::Records(batch) => self.buffer.extend(batch),
                Item::Failed(e) => return Some(Err(e)),
            }
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
    /// Without `close` the member leaves in the background; it commits what was acked (and
    /// nothing beyond) before it leaves the group.
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
        let mut last_commit = Instant::now();
        let mut over = false;
        // Since when `max_in_flight` records are out, while they are.
        let mut over_since: Option<Instant> = None;
        while !self.stop.load(Ordering::Acquire) && !self.tx.is_closed() {
            let in_flight = self.tracker.in_flight.load(Ordering::Acquire);
            over = if over {
                in_flight > resume_below(self.max_in_flight)
            } else {
                in_flight >= self.max_in_flight
            };
            if over {
                let since = *over_since.get_or_insert_with(Instant::now);
                if since.elapsed() < HOLD_BEFORE_PAUSE {
                    // Hold: no poll, so nothing is handed out and librdkafka keeps what it
                    // prefetched; pausing only if the runtime does not catch up soon.
                    self.commit_if_due(&mut last_commit);
                    std::thread::sleep(HOLD_CHECK_INTERVAL);
                    continue;
                }
            } else {
                over_since = None;
            }
            self.apply_backpressure(over);
            let mut timeout = if over {
                PAUSED_POLL_INTERVAL
            } else {
                POLL_INTERVAL
            };
            if self.commit_if_due(&mut last_commit) {
                // Acks wait: wake up when their commit is due.
                let due = COMMIT_INTERVAL.saturating_sub(last_commit.elapsed());
                timeout = timeout.min(due.max(Duration::from_millis(1)));
            }
            // A record, then whatever librdkafka already holds (up to a batch), handed over
            // in one send: one wake-up of the runtime per batch instead of per record.
            let mut batch = Vec::new();
            let mut next = self.consumer.poll(timeout);
            // Whether the poll left nothing more to take: the position is then past every
            // record taken and every marker consumed behind them.
            let mut drained = false;
            let failed = loop {
                match next {
                    Some(Ok(m)) => self.take(&m, &mut batch),
                    None => {
                        drained = true;
                        break None;
                    }
                    Some(Err(e)) => break Some(e),
                }
                if batch.len() >= HAND_OVER_BATCH
                    || self.tracker.in_flight.load(Ordering::Acquire) + batch.len()
                        >= self.max_in_flight
                {
                    break None;
                }
                next = self.consumer.poll(Duration::ZERO);
            };
            self.tracker.queue_all(&mut batch);
            // After the records polled are admitted (see `Tracker::note_positions`). Only when
            // drained: a busy partition's prefix passes its markers with the records behind
            // them, and the position costs a call to librdkafka's main thread (its assignment)
            // and a lookup per partition: every 100 ms while idle.
            if drained {
                match self.consumer.position() {
                    Ok(positions) => self.tracker.note_positions(&positions),
                    Err(e) => debug!(error = %e, "consumer positions unknown"),
                }
            }
            // `hand_over` is false once the subscription is gone.
            if !self.hand_over(batch) {
                break;
            }
            if let Some(e) = failed.and_then(|e| stopping_error(&e, "member")) {
                warn!(error = %e, "consumer stopped");
                let _ = self.tx.blocking_send(Item::Failed(e));
                break;
            }
        }
        self.leave();
    }

    /// Commits the acked prefix asynchronously once [`COMMIT_INTERVAL`] passed since the last
    /// commit or [`COMMIT_BATCH`] records became committable; true if acks are left waiting.
    fn commit_if_due(&self, last: &mut Instant) -> bool {
        let tracker = &self.tracker;
        let n = tracker.uncommitted.load(Ordering::Acquire);
        if n == 0 {
            return false;
        }
        if n < COMMIT_BATCH && last.elapsed() < COMMIT_INTERVAL {
            return true;
        }
        // Acks counted after the swap are in the next commit.
        tracker.uncommitted.swap(0, Ordering::AcqRel);
        *last = Instant::now();
        let result = {
            let _commits = lock(&tracker.commit_lock);
            tracker.commit_acked(&self.consumer, None, CommitMode::Async)
        };
        if let Err(e) = result {
            warn!(error = %e, "cannot request a commit; retried with the next one");
            tracker.uncommitted.fetch_add(1, Ordering::AcqRel);
        }
        false
    }

    /// Adds one polled record to `batch` with the epoch of its partition's ownership as it is
    /// now (a rebalance served by a later poll of the same batch leaves it behind, as one
    /// served while it waits in the channel). [`Tracker::queue_all`] registers the batch.
    fn take(&self, m: &BorrowedMessage<'_>, batch: &mut Vec<(Message, u64)>) {
        let (partition, offset) = (m.partition(), m.offset());
        let (Ok(p), Ok(o)) = (u32::try_from(partition), u64::try_from(offset)) else {
            warn!(
                partition,
                offset, "record with an invalid position; skipped"
            );
            return;
        };
        let Some(epoch) = lock(&self.tracker.owners).get(&partition).copied() else {
            debug!(
                partition,
                offset, "record of a partition not owned; skipped"
            );
            return;
        };
        batch.push((to_message(m, p, o), epoch));
    }

    /// Sends taken records to `next`; false if the subscription is gone.
    fn hand_over(&self, batch: Vec<(Message, u64)>) -> bool {
        if batch.is_empty() {
            return true;
        }
        let n = batch.len();
        // Records of one partition enter the channel in offset order, so `next` hands them out
        // in offset order.
        if self.tx.blocking_send(Item::Records(batch)).is_err() {
            self.tracker.in_flight.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Pauses every assigned partition while `max_in_flight` records are out, resumes once
    /// they fell to [`resume_below`].
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

    /// Leaves the group: commits the acked prefix synchronously, then the revoke that closing
    /// triggers commits what was acked meanwhile without waiting for records still out, and the
    /// member leaves so its partitions move at once.
    fn leave(self) {
        self.tracker.leaving.store(true, Ordering::Release);
        // Lost partitions belong to others already: nothing is committed for them (the revoke
        // callback knows which; the whole commit waits for it then).
        if !self.consumer.assignment_lost() {
            let result = {
                let _commits = lock(&self.tracker.commit_lock);
                self.tracker
                    .commit_acked(&self.consumer, None, CommitMode::Sync)
            };
            if let Err(e) = result {
                warn!(error = %e, "commit before leaving failed; the revoke commits again");
            }
        }
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
    /// Records, each with the epoch of its partition's ownership, in the order polled.
    Records(Vec<(Message, u64)>),
    /// The consumer failed for good; the subscription ends after it.
    Failed(BusError),
}

/// Consumer errors librdkafka reported and recovers from by itself, by reader (`member` or
/// `tail`) and code.
pub(crate) use crate::telemetry::metrics::BUS_CONSUMER_ERRORS_TOTAL as CONSUMER_ERRORS_TOTAL;

/// What a consumer (a group member or the tail) does with an error its poll returned: the error
/// that ends it if librdkafka flagged it fatal (the client is then unusable); otherwise `None`,
/// after a WARN and a count of [`CONSUMER_ERRORS_TOTAL`]: librdkafka reports transport,
/// coordinator and a partition's fetch errors for visibility and retries them itself, so the
/// consumer rides them out. `reader` labels the count.
pub(super) fn stopping_error(e: &KafkaError, reader: &'static str) -> Option<BusError> {
    if let KafkaError::MessageConsumptionFatal(code) = e {
        return Some(super::map_code(*code, "kafka consumer failed fatally"));
    }
    let code = e
        .rdkafka_error_code()
        .map_or_else(|| "other".to_string(), |c| format!("{c:?}"));
    warn!(error = %e, reader, "consumer error; librdkafka retries");
    metrics::counter!(CONSUMER_ERRORS_TOTAL, "reader" => reader, "code" => code).increment(1);
    None
}

/// A record's headers. rdkafka panics on a header name that is not UTF-8, which any producer
/// can write: such a header is left out (it is none of nexus's own), not the reader's thread.
fn read_headers(hs: &rdkafka::message::BorrowedHeaders) -> Vec<(String, String)> {
    (0..hs.count())
        .filter_map(|i| {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hs.try_get(i))) {
                Ok(h) => h.map(|h| {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_string(), value.into_owned())
                }),
                Err(_) => {
                    warn!(
                        index = i,
                        "a record header whose name is not UTF-8 is left out"
                    );
                    None
                }
            }
        })
        .collect()
}

pub(super) fn to_message(m: &BorrowedMessage<'_>, partition: u32, offset: u64) -> Message {
    let headers = m.headers().map(read_headers).unwrap_or_default();
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
    use super::{PartTrack, Pending, Slot};

    #[test]
    fn pending_stays_in_offset_order_when_records_come_again() {
        let mut p = Pending::default();
        for o in [5, 6, 7] {
            assert!(p.insert(o, Slot::Queued));
        }
        *p.get_mut(6).expect("6 is pending") = Slot::Out;
        // The position was reset below what was polled: earlier records come again.
        assert!(p.insert(3, Slot::Queued));
        assert!(!p.insert(6, Slot::Queued), "a second copy of 6 is refused");
        let offsets: Vec<i64> = p.0.iter().map(|e| e.0).collect();
        assert_eq!(offsets, vec![3, 5, 6, 7]);
        assert_eq!(
            p.get_mut(6).copied(),
            Some(Slot::Out),
            "the first copy stays out"
        );
        assert_eq!(p.get_mut(4), None);
        assert_eq!(p.pop_acked(), None, "3 is not acked");
        *p.get_mut(3).expect("3 is pending") = Slot::Acked;
        assert_eq!(p.pop_acked(), Some(3));
        assert_eq!(p.pop_acked(), None);
        assert!(p.any(Slot::Out));
    }

    #[test]
    fn a_record_polled_again_is_not_queued_twice() {
        let tracker = super::Tracker::new("t", "g", std::time::Duration::from_secs(1));
        let mut track = PartTrack::new(7);
        assert!(track.pending.insert(10, Slot::Acked));
        track.advance();
        assert!(track.pending.insert(11, Slot::Out));
        tracker.parts.lock().unwrap().insert(0, track);
        let record = |partition: u32, offset: u64, epoch: u64| {
            let m = crate::bus::Message {
                topic: "t".into(),
                partition,
                offset,
                timestamp_ms: 0,
                key: String::new(),
                payload: bytes::Bytes::new(),
                headers: Default::default(),
            };
            (m, epoch)
        };
        let mut batch = vec![
            record(0, 10, 7), // below the acked prefix: handled
            record(0, 11, 7), // its first copy is still out
            record(0, 12, 6), // polled in an earlier ownership
            record(0, 12, 7),
            record(0, 12, 7), // the same record twice in one batch
            record(1, 13, 7), // partition not owned
        ];
        tracker.queue_all(&mut batch);
        let kept: Vec<(u32, u64, u64)> = batch
            .iter()
            .map(|(m, e)| (m.partition, m.offset, *e))
            .collect();
        assert_eq!(kept, vec![(0, 12, 7)]);
        assert_eq!(
            tracker.in_flight.load(std::sync::atomic::Ordering::Acquire),
            1
        );
    }

    /// Partitions a rebalance error unassigned end as lost: their deliveries read revoked and
    /// nothing of them is committed any more; the ones still assigned stay.
    #[test]
    fn a_rebalance_error_ends_the_partitions_it_unassigned() {
        use rdkafka::TopicPartitionList;
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let tracker = super::Tracker::new("t", "g", std::time::Duration::from_secs(1));
        let mut owned = Vec::new();
        for p in 0..2 {
            let mut track = PartTrack::new(p as u64);
            assert!(track.pending.insert(5, Slot::Acked));
            owned.push(Arc::clone(&track.owned));
            tracker.parts.lock().unwrap().insert(p, track);
            tracker.owners.lock().unwrap().insert(p, p as u64);
        }
        let mut still = TopicPartitionList::new();
        still.add_partition("t", 1);
        assert_eq!(tracker.keep_only(&still), vec![0]);
        assert!(!owned[0].load(Ordering::Acquire), "partition 0 lost");
        assert!(owned[1].load(Ordering::Acquire), "partition 1 kept");
        let parts = tracker.parts.lock().unwrap();
        assert_eq!(parts.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            tracker
                .owners
                .lock()
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![1]
        );
    }

    /// A transactional producer's log ends with a commit marker: the commit goes past it to
    /// the consumer's position once every record taken is acked, and never past a record
    /// still pending or taken after the position was read.
    #[test]
    fn a_commit_goes_past_markers_only_when_every_record_taken_is_acked() {
        use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
        use std::sync::atomic::Ordering;
        let tracker = super::Tracker::new("t", "g", std::time::Duration::from_secs(1));
        let positions = |at: i64| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset("t", 0, Offset::Offset(at))
                .expect("partition");
            tpl
        };
        let mut track = PartTrack::new(1);
        // Records 7 and 8, then a marker at 9 (the position is 10).
        for o in [7, 8] {
            assert!(track.pending.insert(o, Slot::Out));
        }
        tracker.parts.lock().unwrap().insert(0, track);
        tracker.note_positions(&positions(10));
        let settle = |o: i64| {
            let mut parts = tracker.parts.lock().unwrap();
            let t = parts.get_mut(&0).expect("owned");
            *t.pending.get_mut(o).expect("pending") = Slot::Acked;
            t.advance();
            t.to_commit()
        };
        assert_eq!(settle(8), None, "7 is still out");
        assert_eq!(settle(7), Some(10), "both acked: past the marker");
        // Nothing acked in this ownership yet: the position alone moves nothing.
        let mut fresh = PartTrack::new(2);
        fresh.polled_to = Some(10);
        assert_eq!(fresh.to_commit(), None);
        // A record admitted after the position was read clears it.
        let mut t = PartTrack::new(3);
        assert!(t.pending.insert(3, Slot::Acked));
        t.advance();
        t.polled_to = Some(6);
        assert_eq!(t.to_commit(), Some(6));
        tracker.parts.lock().unwrap().insert(0, t);
        let m = crate::bus::Message {
            topic: "t".into(),
            partition: 0,
            offset: 8,
            timestamp_ms: 0,
            key: String::new(),
            payload: bytes::Bytes::new(),
            headers: Default::default(),
        };
        tracker.uncommitted.store(0, Ordering::Release);
        tracker.queue_all(&mut vec![(m, 3)]);
        let parts = tracker.parts.lock().unwrap();
        let t = parts.get(&0).expect("owned");
        assert_eq!(t.polled_to, None);
        assert_eq!(t.to_commit(), Some(4), "only the acked prefix");
        drop(parts);
        // A position further than the commit counts as uncommitted, so it is committed.
        tracker.note_positions(&positions(8));
        assert_eq!(
            tracker.uncommitted.load(Ordering::Acquire),
            0,
            "8 is pending"
        );
        {
            let mut parts = tracker.parts.lock().unwrap();
            let t = parts.get_mut(&0).expect("owned");
            *t.pending.get_mut(8).expect("pending") = Slot::Acked;
            t.advance();
            t.committed = Some(9);
        }
        tracker.note_positions(&positions(10));
        assert_eq!(tracker.uncommitted.load(Ordering::Acquire), 1);
        assert_eq!(tracker.parts.lock().unwrap()[&0].to_commit(), Some(10));
    }

    #[test]
    fn prefix_moves_only_over_contiguous_acks() {
        let mut t = PartTrack::new(1);
        for o in [10, 11, 12, 13] {
            t.pending.insert(o, Slot::Out);
        }
        let set = |t: &mut PartTrack, o: i64, slot: Slot| {
            *t.pending.get_mut(o).expect("pending") = slot;
            t.advance();
        };
        for o in [12, 11] {
            set(&mut t, o, Slot::Acked);
        }
        assert_eq!(t.to_commit(), None, "10 is still out");
        set(&mut t, 10, Slot::Acked);
        assert_eq!(t.to_commit(), Some(13));
        t.committed = Some(13);
        assert_eq!(t.to_commit(), None);
        // An abandoned record stops the prefix for good in this ownership.
        set(&mut t, 13, Slot::Abandoned);
        t.pending.insert(14, Slot::Acked);
        t.advance();
        assert_eq!(t.to_commit(), None);
        assert!(!t.has_out());
    }
}
