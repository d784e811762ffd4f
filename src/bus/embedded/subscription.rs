//! A member of a consumer group: reads its partitions in batches and hands records out, at
//! most `max_in_flight` unacked at a time.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::group::{FetchPlan, GroupKey};
use super::store::ReadMax;
use super::{storage, Inner};
use crate::bus::{Acker, BusError, Delivery, Message, SubscribeOptions, Subscription};

/// Records read per fetch at most. Large enough that a busy member reads in few transactions,
/// small enough that a rebalance throws little read-ahead away.
const READ_BATCH: usize = 256;

/// Bytes read per fetch at most (the record that passes it is the last; one record at least),
/// as Kafka's prefetch (`bus.kafka.prefetch_kbytes`, 8 MiB) bounds what a member holds ahead of
/// its handlers. Without it a fetch read [`READ_BATCH`] records whatever their size: a backlog
/// of large records (the log takes up to 1 GiB each) was read whole to hand out one.
const READ_BYTES: usize = 8 << 20;

pub(super) struct EmbeddedSubscription {
    inner: Arc<Inner>,
    key: Arc<GroupKey>,
    member: u64,
    /// Assignment changes of the group.
    assignment: watch::Receiver<u64>,
    /// Appends to the topic.
    appends: watch::Receiver<u64>,
    /// One permit per handed-out, unacked record.
    in_flight: Arc<Semaphore>,
    batch: usize,
    /// Read ahead, with the epoch each record was read under.
    buffer: VecDeque<(u64, Message)>,
    /// Rotates which partition a fetch starts with, so one busy partition cannot starve others.
    cursor: usize,
    /// When a partition held back by a hand-over is read anyway (see `group`).
    held_until: Option<tokio::time::Instant>,
    left: bool,
    span: tracing::Span,
}

impl EmbeddedSubscription {
    pub(super) fn join(
        inner: Arc<Inner>,
        group: &str,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Self, BusError> {
        super::store::check_offset_key(group, topic)?;
        let appends = inner.topic(topic)?.tick.subscribe();
        let (member, assignment) = inner.join(group, topic, options.start)?;
        let max_in_flight = options.max_in_flight.max(1);
        Ok(Self {
            inner,
            key: Arc::new((group.to_string(), topic.to_string())),
            member,
            assignment,
            appends,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            batch: max_in_flight.min(READ_BATCH),
            buffer: VecDeque::new(),
            cursor: 0,
            held_until: None,
            left: false,
            span: tracing::info_span!("embedded_subscription", group, topic, member),
        })
    }

    /// Records read ahead and not handed out yet (tests).
    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Reads the next batch of the member's partitions into the buffer; returns how many
    /// records it read, some of which may have been left out (acked by a previous owner after
    /// its committed offset): a read of only those still moved the member on.
    async fn fetch(&mut self) -> Result<usize, BusError> {
        let (mut plan, held_until) = self.inner.plan(&self.key, self.member)?;
        self.held_until = held_until.map(tokio::time::Instant::from_std);
        if plan.is_empty() {
            return Ok(0);
        }
        self.cursor = (self.cursor + 1) % plan.len();
        plan.rotate_left(self.cursor);
        let open = self.inner.store()?;
        let shared = self.inner.topic(&self.key.1)?;
        let topic = self.key.1.clone();
        let budget = self.batch;
        let read = tokio::task::spawn_blocking(
            move || -> Result<Vec<(FetchPlan, Vec<Message>)>, BusError> {
                let mut left = ReadMax {
                    records: budget,
                    bytes: READ_BYTES,
                };
                let mut out = Vec::with_capacity(plan.len());
                for p in plan {
                    if left.records == 0 || left.bytes == 0 {
                        break;
                    }
                    let part = shared.partition(&topic, p.partition)?;
                    let records =
                        open.db
                            .read(&part.log, &topic, p.partition, p.from, left, part.high())?;
                    left.records -= records.len();
                    let bytes: usize = records.iter().map(|m| m.payload.len()).sum();
                    left.bytes = left.bytes.saturating_sub(bytes);
                    out.push((p, records));
                }
                Ok(out)
            },
        )
        .await
        .map_err(storage("read task"))??;
        let mut n = 0;
        for (p, records) in read {
            n += records.len();
            for m in self.inner.fetched(&self.key, self.member, &p, records) {
                self.buffer.push_back((p.epoch, m));
            }
        }
        Ok(n)
    }

    /// A delivery of the buffered record at the front, holding `permit`; `None` (the permit
    /// returned) if the buffer is empty. Records of partitions no longer owned are dropped
    /// on the way: their next owner reads them.
    fn hand_out(&mut self, permit: OwnedSemaphorePermit) -> Option<Delivery> {
        while let Some((epoch, message)) = self.buffer.pop_front() {
            if !self
                .inner
                .hand_out(&self.key, self.member, message.partition, epoch)
            {
                continue;
            }
            let acker = EmbeddedAcker {
                inner: self.inner.clone(),
                key: self.key.clone(),
                member: self.member,
                partition: message.partition,
                offset: message.offset,
                epoch,
                acked: false,
                _permit: permit,
            };
            return Some(Delivery::new(message, Box::new(acker)));
        }
        None
    }

    async fn next_delivery(&mut self) -> Option<Result<Delivery, BusError>> {
        loop {
            if self.left || self.inner.closed.is_set() {
                return None;
            }
            // Cancel-safe: a record leaves the buffer only together with its permit, so a
            // caller that gives up waiting (select!, timeout) loses nothing. The ownership is
            // checked after the wait, which may have spanned a rebalance.
            if !self.buffer.is_empty() {
                let permit = tokio::select! {
                    permit = self.in_flight.clone().acquire_owned() => permit.ok()?,
                    () = self.inner.closed.fired() => return None,
                };
                if let Some(delivery) = self.hand_out(permit) {
                    return Some(Ok(delivery));
                }
                continue;
            }
            // Mark both signals seen before looking, so a change after the look wakes the wait.
            self.assignment.borrow_and_update();
            self.appends.borrow_and_update();
            match self.fetch().await {
                Ok(0) => {}
                Ok(_) => continue,
                Err(BusError::Closed) => return None,
                Err(e) => return Some(Err(e)),
            }
            tokio::select! {
                changed = self.assignment.changed() => changed.ok()?,
                changed = self.appends.changed() => changed.ok()?,
                () = self.inner.closed.fired() => return None,
                // A hand-over whose old deliveries did not finish in time: read anyway.
                () = sleep_until(self.held_until) => {}
            }
        }
    }
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        let span = self.span.clone();
        self.next_delivery().instrument(span).await
    }

    /// What the last read brought, while the in-flight limit has room; never reads.
    fn try_next(&mut self) -> Option<Result<Delivery, BusError>> {
        if self.left || self.buffer.is_empty() || self.inner.closed.is_set() {
            return None;
        }
        let permit = self.in_flight.clone().try_acquire_owned().ok()?;
        self.hand_out(permit).map(Ok)
    }

    async fn close(mut self: Box<Self>) -> Result<(), BusError> {
        self.left = true;
        self.buffer.clear();
        self.inner.leave(&self.key, self.member);
        // Everything acked so far was queued before this flush.
        self.inner.flush().await
    }
}

impl Drop for EmbeddedSubscription {
    fn drop(&mut self) {
        // Dropped without close: the member "dies". What it acked is already queued; what it
        // did not goes to the next owner from the committed offset.
        if !self.left {
            self.inner.leave(&self.key, self.member);
        }
    }
}

struct EmbeddedAcker {
    inner: Arc<Inner>,
    key: Arc<GroupKey>,
    member: u64,
    partition: u32,
    offset: u64,
    epoch: u64,
    /// The ack told the group the delivery is done; otherwise dropping it does.
    acked: bool,
    /// Frees the in-flight slot when acked or dropped.
    _permit: OwnedSemaphorePermit,
}

/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Drop for EmbeddedAcker {
    fn drop(&mut self) {
        // Dropped unacked: no longer being handled either (see `group`'s hand-over).
        if !self.acked {
            self.inner.release(&self.key, self.partition, self.epoch);
        }
    }
}

#[async_trait]
impl Acker for EmbeddedAcker {
    /// Returns once the resulting commit (if the prefix moved) is queued to the writer.
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        let acked = self
            .inner
            .ack(&self.key, self.partition, self.offset, self.epoch);
        // A closed bus tracks nothing more; either way the drop need not release.
        self.acked = true;
        acked
    }

    fn revoked(&self) -> bool {
        !self
            .inner
            .owns(&self.key, self.member, self.partition, self.epoch)
    }
}
