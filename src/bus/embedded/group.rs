//! Consumer groups of this process: who owns which partition, what each owner has been handed
//! and acked, and the committed offset that follows the contiguous acked prefix.
//!
//! Every change happens under the one `groups` mutex, and commits are queued to the writer
//! while it is held, so the writer sees a partition's commits in the order they were decided
//! (a seek that moves back is never overtaken by an older forward commit).
//!
//! Each assignment of a partition gets a fresh epoch. Deliveries and buffered records carry the
//! epoch they were read under; anything carrying an older epoch (a member that lost the
//! partition, or a partition that was seeked) is ignored once the hand-over below is over, so
//! a stale member's late acks cannot move the new owner's committed offset.
//!
//! A partition that moves waits for its old owner's deliveries: the new owner reads it only
//! once every record handed out under older epochs is acked or dropped (or after
//! `bus.embedded.handover_wait_ms`), so a record still being handled never finishes after its
//! successor's, as the brokers' revoke waits do. The old owner's acks count meanwhile, and
//! the new owner skips records acked past the committed offset. A seek waits for nothing and
//! counts no earlier ack.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::writer::Cmd;
use super::{lock, Inner, TopicShared};
use crate::bus::{BusError, GroupPosition, Message, StartFrom};

/// (group, topic).
pub(super) type GroupKey = (String, String);

pub(super) struct GroupState {
    members: Vec<Member>,
    parts: Vec<PartTrack>,
    next_epoch: u64,
    /// Bumped on every assignment change: members re-check what they own.
    changed: watch::Sender<u64>,
}

struct Member {
    id: u64,
    start: StartFrom,
}

#[derive(Default)]
struct PartTrack {
    owner: Option<u64>,
    epoch: u64,
    /// The group's committed offset (the next to consume), as last queued to the writer.
    committed: Option<u64>,
    /// The first offset not yet acked by the current owner: the committed offset to be.
    base: u64,
    /// The next offset to read for the current owner.
    next_fetch: u64,
    /// Acked (or expired) ranges `[start, end)` at or past `base`, waiting for the gap; kept
    /// merged (see [`Self::mark_done`]), so one entry per run between unacked records.
    done: BTreeMap<u64, u64>,
    /// Deliveries handed out under `epoch` and not yet acked or dropped.
    out: u64,
    /// The same for earlier epochs (epoch → count): the partition is not read until they are
    /// done or `drain_until` passed.
    draining: BTreeMap<u64, u64>,
    drain_until: Option<Instant>,
}

impl PartTrack {
    /// Starts `epoch` for a new owner: what is still out under the old one is waited for,
    /// `wait` at most, and its acks still count.
    fn hand_over(&mut self, epoch: u64, wait: Duration) {
        if self.out > 0 {
            self.draining.insert(self.epoch, self.out);
            self.drain_until = Some(Instant::now() + wait);
        }
        self.out = 0;
        self.epoch = epoch;
    }

    /// Starts `epoch` after a seek: nothing earlier is waited for or counts any more.
    fn reset(&mut self, epoch: u64) {
        self.draining.clear();
        self.drain_until = None;
        self.out = 0;
        self.epoch = epoch;
        self.done.clear();
    }

    /// Marks `[start, end)` done, merged with every range it overlaps or touches. A record
    /// that stays unacked (a handler retrying in place against a peer that is down) holds
    /// `base` back while the acks past it go on: merged, they cost an entry per gap (at most
    /// one per record in flight), not one per ack, however long the gap lasts.
    fn mark_done(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // A range starting before `start` that reaches it takes the new one in.
        if let Some((&s, &e)) = self.done.range(..start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Ranges starting inside `[start, end]` (that one included) are absorbed.
        while let Some((&s, &e)) = self.done.range(start..=end).next() {
            self.done.remove(&s);
            end = end.max(e);
        }
        self.done.insert(start, end);
    }

    /// Whether `offset` was acked (or skipped by retention) already.
    fn is_done(&self, offset: u64) -> bool {
        offset < self.base
            || self
                .done
                .range(..=offset)
                .next_back()
                .is_some_and(|(_, &end)| offset < end)
    }

    /// A delivery handed out under `epoch` is done; true if that ended a hand-over's wait (the
    /// new owner may read).
    fn release(&mut self, epoch: u64) -> bool {
        if self.epoch == epoch {
            self.out = self.out.saturating_sub(1);
            return false;
        }
        let Some(left) = self.draining.get_mut(&epoch) else {
            return false;
        };
        *left = left.saturating_sub(1);
        if *left > 0 {
            return false;
        }
        self.draining.remove(&epoch);
        if !self.draining.is_empty() {
            return false;
        }
        self.drain_until = None;
        true
    }

    /// Whether deliveries of earlier epochs still hold the partition back.
    fn held(&mut self) -> bool {
        if self
            .drain_until
            .is_some_and(|until| Instant::now() >= until)
        {
            tracing::warn!(
                records = self.draining.values().sum::<u64>(),
                "a moved partition's old deliveries not done in time; read by its new owner"
            );
            self.draining.clear();
        }
        if self.draining.is_empty() {
            self.drain_until = None;
        }
        !self.draining.is_empty()
    }
}

/// A partition a member should read: where, under which epoch.
pub(super) struct FetchPlan {
    pub(super) partition: u32,
    pub(super) epoch: u64,
    pub(super) from: u64,
}

impl Inner {
    /// Adds a member to the group, loading the group's committed offsets on first use.
    pub(super) fn join(
        &self,
        group: &str,
        topic: &str,
        start: StartFrom,
    ) -> Result<(u64, watch::Receiver<u64>), BusError> {
        let shared = self.topic(topic)?;
        let key: GroupKey = (group.to_string(), topic.to_string());
        let mut groups = lock(&self.groups);
        let gs = self.group_entry(&mut groups, &key, &shared)?;
        let id = self
            .next_member
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        gs.members.push(Member { id, start });
        let rx = gs.changed.subscribe();
        self.rebalance(&key, gs, &shared);
        tracing::debug!(
            group,
            topic,
            member = id,
            members = gs.members.len(),
            "member joined"
        );
        Ok((id, rx))
    }

    /// Removes a member; its partitions go to the others, starting from the committed offset.
    pub(super) fn leave(&self, key: &GroupKey, member: u64) {
        let Ok(shared) = self.topic(&key.1) else {
            return;
        };
        let mut groups = lock(&self.groups);
        if let Some(gs) = groups.get_mut(key) {
            let before = gs.members.len();
            gs.members.retain(|m| m.id != member);
            if gs.members.len() != before {
                self.rebalance(key, gs, &shared);
                tracing::debug!(group = %key.0, topic = %key.1, member, members = gs.members.len(), "member left");
            }
        }
    }

    /// Re-runs assignment for every group of a topic whose partitions changed.
    pub(super) fn rebalance_topic(&self, topic: &str) {
        let Ok(shared) = self.topic(topic) else {
            return;
        };
        let mut groups = lock(&self.groups);
        for (key, gs) in groups.iter_mut().filter(|(k, _)| k.1 == topic) {
            self.rebalance(key, gs, &shared);
        }
    }

    fn group_entry<'a>(
        &self,
        groups: &'a mut HashMap<GroupKey, GroupState>,
        key: &GroupKey,
        shared: &TopicShared,
    ) -> Result<&'a mut GroupState, BusError> {
        if !groups.contains_key(key) {
            let committed =
                self.store()?
                    .load_offsets(&key.0, &key.1, shared.partitions.len() as u32);
            let parts = committed
                .into_iter()
                .map(|committed| PartTrack {
                    committed,
                    ..PartTrack::default()
                })
                .collect();
            groups.insert(
                key.clone(),
                GroupState {
                    members: Vec::new(),
                    parts,
                    next_epoch: 1,
                    changed: watch::channel(0).0,
                },
            );
        }
        let gs = groups
            .get_mut(key)
            .ok_or_else(|| BusError::Storage("group state vanished under its lock".into()))?;
        // Partitions added since the group was loaded start uncommitted.
        while gs.parts.len() < shared.partitions.len() {
            gs.parts.push(PartTrack::default());
        }
        Ok(gs)
    }

    /// Sticky, balanced assignment: every member gets ⌊P/M⌋ or ⌈P/M⌉ partitions (earlier
    /// members the larger share); an owner keeps what fits its share, the rest is handed out.
    fn rebalance(&self, key: &GroupKey, gs: &mut GroupState, shared: &TopicShared) {
        while gs.parts.len() < shared.partitions.len() {
            gs.parts.push(PartTrack::default());
        }
        let (n, m) = (gs.parts.len(), gs.members.len());
        let quota = |i: usize| n.checked_div(m).map_or(0, |q| q + usize::from(i < n % m));
        let mut counts = vec![0usize; m];
        let mut want: Vec<Option<usize>> = vec![None; n];
        for (p, t) in gs.parts.iter().enumerate() {
            let Some(i) = t
                .owner
                .and_then(|o| gs.members.iter().position(|mm| mm.id == o))
            else {
                continue;
            };
            if counts[i] < quota(i) {
                counts[i] += 1;
                want[p] = Some(i);
            }
        }
        let mut next = 0;
        for w in want.iter_mut().filter(|w| w.is_none()) {
            if m == 0 {
                break;
            }
            while counts[next] >= quota(next) {
                next = (next + 1) % m;
            }
            counts[next] += 1;
            *w = Some(next);
        }
        // A partition without a commit in a group that has begun was added to the topic since:
        // a `latest` group reads it from its start (at its end, what was published to it
        // before this rebalance would be skipped), as on JetStream and Kafka.
        let begun = gs.parts.iter().any(|t| t.committed.is_some());
        let mut moved = false;
        for (p, w) in want.into_iter().enumerate() {
            let new_owner = w.map(|i| (gs.members[i].id, gs.members[i].start));
            if gs.parts[p].owner == new_owner.map(|(id, _)| id) {
                continue;
            }
            moved = true;
            let epoch = gs.next_epoch;
            gs.next_epoch += 1;
            let t = &mut gs.parts[p];
            t.owner = new_owner.map(|(id, _)| id);
            // Acks made past the committed offset stay done: the new owner skips them.
            t.hand_over(epoch, self.handover_wait);
            let Some((_, start)) = new_owner else {
                continue;
            };
            let Some(ps) = shared.partitions.get(p) else {
                continue;
            };
            let position = match (t.committed, start) {
                (Some(c), _) => c,
                (None, StartFrom::Earliest) => ps.low(),
                (None, StartFrom::Latest) if begun => ps.low(),
                (None, StartFrom::Latest) => {
                    // Remember the tail now: a member dying before its first ack must not make
                    // the next one skip what was published in between.
                    let high = ps.high();
                    t.committed = Some(high);
                    self.queue_commit(key, p as u32, high);
                    high
                }
            };
            t.base = position;
            t.next_fetch = position;
            t.done.retain(|_, end| *end > position);
        }
        if moved {
            gs.changed.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Queues a commit to the writer; the caller holds the groups lock (see the module doc).
    /// The latest offset of a partition replaces any not yet written.
    fn queue_commit(&self, key: &GroupKey, partition: u32, offset: u64) {
        let mut pending = lock(&self.commits);
        if pending.record(key, partition, offset) {
            match self.send(Cmd::Commits) {
                Ok(()) => {}
                Err(BusError::Closed) => {
                    pending.unnudge();
                    tracing::debug!(group = %key.0, topic = %key.1, partition, offset, "bus closed; commit not queued");
                }
                Err(e) => {
                    pending.unnudge();
                    tracing::error!(group = %key.0, topic = %key.1, partition, offset, error = %e, "commit not queued: what was acked since is delivered again after a restart");
                }
            }
        }
    }

    /// Moves `base` over the contiguous done prefix and queues the new committed offset.
    fn advance(&self, key: &GroupKey, partition: u32, t: &mut PartTrack) {
        let before = t.base;
        while let Some((&start, &end)) = t.done.first_key_value() {
            if start > t.base {
                break;
            }
            t.done.pop_first();
            t.base = t.base.max(end);
        }
        if t.base > before {
            t.committed = Some(t.base);
            self.queue_commit(key, partition, t.base);
        }
    }

    /// Records the ack of `offset` read under `epoch`; a stale epoch is ignored (the record is
    /// redelivered to the partition's current owner).
    pub(super) fn ack(
        &self,
        key: &GroupKey,
        partition: u32,
        offset: u64,
        epoch: u64,
    ) -> Result<(), BusError> {
        if self.closed.is_set() {
            return Err(BusError::Closed);
        }
        let mut groups = lock(&self.groups);
        let Some(gs) = groups.get_mut(key) else {
            return Ok(());
        };
        let Some(t) = gs.parts.get_mut(partition as usize) else {
            return Ok(());
        };
        // The old owner's acks while a moved partition waits for them still count: its new
        // owner has read nothing yet and starts after them.
        let draining = t.draining.contains_key(&epoch);
        if draining || (t.epoch == epoch && t.owner.is_some()) {
            if offset >= t.base {
                t.mark_done(offset, offset + 1);
                self.advance(key, partition, t);
            }
            // Everything below the committed offset is done: a new owner whose ack joined the
            // old owner's acks past it reads on after them, not from where it was.
            t.next_fetch = t.next_fetch.max(t.base);
        } else {
            tracing::debug!(group = %key.0, topic = %key.1, partition, offset, "ack of a revoked partition ignored");
        }
        // The delivery is done (under the same lock, so the new owner starts after its ack).
        if t.release(epoch) {
            gs.changed.send_modify(|g| *g = g.wrapping_add(1));
        }
        Ok(())
    }

    /// Hands out a record of `partition` read under `epoch` if `member` still owns it there;
    /// the delivery counts until it is acked or [`Self::release`]d.
    pub(super) fn hand_out(&self, key: &GroupKey, member: u64, partition: u32, epoch: u64) -> bool {
        let mut groups = lock(&self.groups);
        let Some(t) = groups
            .get_mut(key)
            .and_then(|gs| gs.parts.get_mut(partition as usize))
        else {
            return false;
        };
        let owned = t.owner == Some(member) && t.epoch == epoch;
        if owned {
            t.out += 1;
        }
        owned
    }

    /// A delivery handed out under `epoch` is done without an ack (dropped).
    pub(super) fn release(&self, key: &GroupKey, partition: u32, epoch: u64) {
        let mut groups = lock(&self.groups);
        let Some(gs) = groups.get_mut(key) else {
            return;
        };
        let released = gs
            .parts
            .get_mut(partition as usize)
            .is_some_and(|t| t.release(epoch));
        if released {
            gs.changed.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Whether `member` still owns `partition` under `epoch`.
    pub(super) fn owns(&self, key: &GroupKey, member: u64, partition: u32, epoch: u64) -> bool {
        let groups = lock(&self.groups);
        groups
            .get(key)
            .and_then(|gs| gs.parts.get(partition as usize))
            .is_some_and(|t| t.owner == Some(member) && t.epoch == epoch)
    }

    /// The member's partitions with records to read, and the earliest time a partition held
    /// back by a hand-over is read anyway. Records that retention removed before they were
    /// read count as done, so the committed offset can pass them.
    pub(super) fn plan(
        &self,
        key: &GroupKey,
        member: u64,
    ) -> Result<(Vec<FetchPlan>, Option<Instant>), BusError> {
        let shared = self.topic(&key.1)?;
        let mut groups = lock(&self.groups);
        let Some(gs) = groups.get_mut(key) else {
            return Ok((Vec::new(), None));
        };
        let mut plan = Vec::new();
        let mut held_until: Option<Instant> = None;
        for (p, t) in gs.parts.iter_mut().enumerate() {
            if t.owner != Some(member) {
                continue;
            }
            let Some(ps) = shared.partitions.get(p) else {
                continue;
            };
            if t.held() {
                if let Some(until) = t.drain_until {
                    held_until = Some(held_until.map_or(until, |h| h.min(until)));
                }
                continue;
            }
            let (high, low) = (ps.high(), ps.low());
            if t.next_fetch < low {
                let from = t.next_fetch;
                t.mark_done(from, low);
                t.next_fetch = low;
                self.advance(key, p as u32, t);
            }
            if t.next_fetch < high {
                plan.push(FetchPlan {
                    partition: p as u32,
                    epoch: t.epoch,
                    from: t.next_fetch,
                });
            }
        }
        Ok((plan, held_until))
    }

    /// Takes the records read for `plan` into the member's tracking; returns those still valid.
    pub(super) fn fetched(
        &self,
        key: &GroupKey,
        member: u64,
        plan: &FetchPlan,
        records: Vec<Message>,
    ) -> Vec<Message> {
        let mut groups = lock(&self.groups);
        let Some(t) = groups
            .get_mut(key)
            .and_then(|gs| gs.parts.get_mut(plan.partition as usize))
        else {
            return Vec::new();
        };
        // A rebalance or seek since the plan: what was read belongs to someone else now.
        if t.owner != Some(member) || t.epoch != plan.epoch || t.next_fetch != plan.from {
            return Vec::new();
        }
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return records;
        };
        if first.offset > plan.from {
            // Dense offsets: a hole at the start was trimmed by retention meanwhile.
            t.mark_done(plan.from, first.offset);
            self.advance(key, plan.partition, t);
        }
        t.next_fetch = last.offset + 1;
        // Records a previous owner acked after the committed offset are not handled again.
        let mut records = records;
        records.retain(|m| !t.is_done(m.offset));
        records
    }

    /// Sets the committed offset; the receiver answers once it is durable. The owner (if any)
    /// continues from there under a new epoch.
    pub(super) fn seek_group(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<oneshot::Receiver<Result<(), BusError>>, BusError> {
        super::store::check_offset_key(group, topic)?;
        let shared = self.topic(topic)?;
        shared.partition(topic, partition)?;
        let key: GroupKey = (group.to_string(), topic.to_string());
        let mut groups = lock(&self.groups);
        let gs = self.group_entry(&mut groups, &key, &shared)?;
        let epoch = gs.next_epoch;
        gs.next_epoch += 1;
        let t = gs
            .parts
            .get_mut(partition as usize)
            .ok_or_else(|| BusError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            })?;
        t.committed = Some(offset);
        t.reset(epoch);
        t.base = offset;
        t.next_fetch = offset;
        if self.closed.is_set() {
            return Err(BusError::Closed);
        }
        self.queue_commit(&key, partition, offset);
        // Answered once everything recorded before it, this offset included, is durable.
        let (reply, durable) = oneshot::channel();
        self.send(Cmd::Flush { reply })?;
        gs.changed.send_modify(|g| *g = g.wrapping_add(1));
        tracing::info!(group, topic, partition, offset, "group offset set");
        Ok(durable)
    }

    pub(super) fn group_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<GroupPosition>, BusError> {
        let shared = self.topic(topic)?;
        let key: GroupKey = (group.to_string(), topic.to_string());
        let mut groups = lock(&self.groups);
        let gs = self.group_entry(&mut groups, &key, &shared)?;
        Ok(shared
            .partitions
            .iter()
            .zip(&gs.parts)
            .enumerate()
            .map(|(p, (ps, t))| {
                let high = ps.high();
                let low = ps.low().min(high);
                // Records below `low` are gone: they cannot be consumed, so they are no lag.
                let from = t.committed.unwrap_or(low).max(low);
                GroupPosition {
                    partition: p as u32,
                    committed: t.committed,
                    high,
                    lag: high.saturating_sub(from),
                }
            })
            .collect())
    }

    /// How many runs of acks past the committed offset a partition's tracking holds (tests).
    #[cfg(test)]
    pub(super) fn done_runs(&self, key: &GroupKey, partition: u32) -> usize {
        lock(&self.groups)
            .get(key)
            .and_then(|gs| gs.parts.get(partition as usize))
            .map_or(0, |t| t.done.len())
    }

    pub(super) fn active_members(&self, group: &str, topic: &str) -> usize {
        let groups = lock(&self.groups);
        groups
            .get(&(group.to_string(), topic.to_string()))
            .map_or(0, |gs| gs.members.len())
    }
}
