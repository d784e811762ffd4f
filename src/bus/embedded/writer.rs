//! The single writer: group commit of publishes, offset commits, topic changes and retention.
//!
//! One thread owns all writing. It blocks on its channel, then takes what else is queued, up to
//! `max_batch` publishes, into one batch: one atomic fjall write batch with the records and the
//! committed offsets, one journal write and one fdatasync, and it answers every caller after it
//! is durable. Appends to one partition happen in channel order, which is what makes a key's
//! records ordered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::store::{self, Batch, TopicFile};
use super::{lock, now_ms, PartShared, StoreHandle, TopicShared, Topics};
use crate::bus::{partition_for, BusError, OutRecord, Published, TopicSpec};

/// How often retention runs. Retention is hours or days in practice; a pass reads each
/// partition's oldest records until one is young enough, so a second is cheap and fine enough.
const RETENTION_INTERVAL: Duration = Duration::from_secs(1);

/// Commands besides publishes taken into one batch at most (commits are tiny, but a batch must
/// end for anyone to be answered).
const MAX_OTHER_PER_BATCH: usize = 4096;

type Reply<T> = oneshot::Sender<Result<T, BusError>>;

pub(super) enum Cmd {
    Publish {
        topic: String,
        record: OutRecord,
        reply: Reply<Published>,
    },
    /// Committed offsets are waiting in [`PendingCommits`]: write them. Sent only when the
    /// pending set turns non-empty, so a burst of acks costs one command.
    Commits,
    ApplyTopic {
        spec: TopicSpec,
        reply: Reply<()>,
    },
    /// Answered once everything queued before it is durable.
    Flush {
        reply: Reply<()>,
    },
    /// Runs a retention pass now.
    Retention {
        reply: Reply<()>,
    },
    /// Writes what came before and stops.
    Shutdown,
}

/// Committed offsets decided by the consumer groups and not yet written, latest per partition.
///
/// Acks record here (under the groups lock, so a partition's offsets are decided in order and
/// the latest decision wins) instead of queueing one command each; the writer takes the whole
/// set into its next batch. Every batch takes the set after receiving its commands, so a
/// `Flush` sent after an offset was recorded is answered only once that offset is durable.
#[derive(Default)]
pub(super) struct PendingCommits {
    offsets: HashMap<(String, String), BTreeMap<u32, u64>>,
    /// A `Cmd::Commits` is queued and the writer has not taken the set since.
    nudged: bool,
}

impl PendingCommits {
    /// Records the committed offset of a partition; returns whether the writer must be nudged.
    pub(super) fn record(&mut self, key: &(String, String), partition: u32, offset: u64) -> bool {
        match self.offsets.get_mut(key) {
            Some(parts) => {
                parts.insert(partition, offset);
            }
            None => {
                self.offsets
                    .insert(key.clone(), BTreeMap::from([(partition, offset)]));
            }
        }
        !std::mem::replace(&mut self.nudged, true)
    }

    /// The writer lost a nudge (closed channel): let the next record send one.
    pub(super) fn unnudge(&mut self) {
        self.nudged = false;
    }
}

type CommitSet = store::OffsetMap;

/// An answer held back until the batch is durable.
enum Pending {
    Published(Reply<Published>, Published),
    Done(Reply<()>),
    /// A publish of a batch that failed.
    Rejected(Reply<Published>),
}

impl Pending {
    fn answer(self, failure: Option<&BusError>) {
        // A caller that went away no longer wants the answer; nothing to do about it.
        match (self, failure) {
            (Pending::Published(reply, p), None) => {
                let _ = reply.send(Ok(p));
            }
            (Pending::Published(reply, _), Some(e)) => {
                let _ = reply.send(Err(copy_err(e)));
            }
            (Pending::Done(reply), None) => {
                let _ = reply.send(Ok(()));
            }
            (Pending::Done(reply), Some(e)) => {
                let _ = reply.send(Err(copy_err(e)));
            }
            (Pending::Rejected(reply), failure) => {
                let e = failure.map(copy_err);
                let _ = reply.send(Err(
                    e.unwrap_or_else(|| BusError::Storage("batch rejected".into()))
                ));
            }
        }
    }
}

/// Every caller of a failed batch gets the same storage failure.
fn copy_err(e: &BusError) -> BusError {
    match e {
        // Its text as is: `to_string` would prefix "embedded log: " a second time.
        BusError::Storage(m) => BusError::Storage(m.clone()),
        e => BusError::Storage(e.to_string()),
    }
}

/// A topic as the writer sees it.
pub(super) struct TopicMeta {
    pub(super) partitions: Vec<Arc<PartShared>>,
    pub(super) retention: Option<Duration>,
}

/// What one batch appends to one partition, before it is durable.
struct Tail {
    part: Arc<PartShared>,
    /// Offset of the next record appended.
    next: u64,
    last_ts: i64,
}

pub(super) struct Writer {
    store: Arc<StoreHandle>,
    topics: Arc<Topics>,
    rx: Receiver<Cmd>,
    commits: Arc<Mutex<PendingCommits>>,
    max_batch: usize,
    /// The writer's view of the topics, ahead of the shared one within a batch.
    metas: HashMap<String, TopicMeta>,
    /// What the `topics` keyspace holds.
    files: BTreeMap<String, TopicFile>,
    dir: PathBuf,
}

/// What a batch changed, published to readers after it is durable.
#[derive(Default)]
struct Changes {
    /// Partitions whose `high` or `low` moved.
    partitions: BTreeMap<String, BTreeSet<u32>>,
    /// Topics created or reconfigured.
    topics: BTreeSet<String>,
}

impl Changes {
    fn partition(&mut self, topic: &str, partition: u32) {
        match self.partitions.get_mut(topic) {
            Some(ps) => {
                ps.insert(partition);
            }
            None => {
                self.partitions
                    .insert(topic.to_string(), BTreeSet::from([partition]));
            }
        }
    }
}

/// Everything [`Writer::new`] needs besides the channel ends.
pub(super) struct Opened {
    pub(super) metas: HashMap<String, TopicMeta>,
    pub(super) files: BTreeMap<String, TopicFile>,
}

impl Writer {
    pub(super) fn new(
        store: Arc<StoreHandle>,
        topics: Arc<Topics>,
        rx: Receiver<Cmd>,
        commits: Arc<Mutex<PendingCommits>>,
        max_batch: usize,
        opened: Opened,
        dir: PathBuf,
    ) -> Self {
        Self {
            store,
            topics,
            rx,
            commits,
            max_batch,
            metas: opened.metas,
            files: opened.files,
            dir,
        }
    }

    pub(super) fn run(mut self) {
        let span = tracing::info_span!("embedded_bus_writer", path = %self.dir.display());
        let _entered = span.enter();
        let mut next_retention = Instant::now() + RETENTION_INTERVAL;
        loop {
            // Checked on every turn, not only when the channel is idle: a writer that is never
            // idle must still trim.
            if Instant::now() >= next_retention {
                if let Err(e) = self.retention() {
                    tracing::warn!(error = %e, "retention pass failed; retrying next pass");
                }
                next_retention = Instant::now() + RETENTION_INTERVAL;
            }
            let wait = next_retention.saturating_duration_since(Instant::now());
            let first = match self.rx.recv_timeout(wait) {
                Ok(cmd) => cmd,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            let (mut publishes, mut others) = (0, 0);
            let count = |cmd: &Cmd, publishes: &mut usize, others: &mut usize| match cmd {
                Cmd::Publish { .. } => *publishes += 1,
                _ => *others += 1,
            };
            count(&batch[0], &mut publishes, &mut others);
            while publishes < self.max_batch
                && others < MAX_OTHER_PER_BATCH
                && !matches!(batch.last(), Some(Cmd::Shutdown))
            {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        count(&cmd, &mut publishes, &mut others);
                        batch.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            let stop = matches!(batch.last(), Some(Cmd::Shutdown));
            self.write_batch(batch);
            if stop {
                break;
            }
        }
        tracing::debug!("embedded bus writer stopped");
    }

    /// Writes one batch and answers its callers once it is durable.
    fn write_batch(&mut self, batch: Vec<Cmd>) {
        let mut pending = Vec::with_capacity(batch.len());
        let mut retention = Vec::new();
        let mut changes = Changes::default();
        let mut tails: BTreeMap<(String, u32), Tail> = BTreeMap::new();
        let store = self.store.clone();
        let mut writes = store.db.batch();
        let started = Instant::now();
        let n = batch.len();
        let mut failure = None;
        for cmd in batch {
            match cmd {
                Cmd::Publish {
                    topic,
                    record,
                    reply,
                } => {
                    if failure.is_some() {
                        pending.push(Pending::Rejected(reply));
                        continue;
                    }
                    match self.append(&mut writes, &mut tails, &topic, &record) {
                        Ok(p) => pending.push(Pending::Published(reply, p)),
                        Err(e @ BusError::Storage(_)) => {
                            failure = Some(e);
                            pending.push(Pending::Rejected(reply));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                // Topic changes are written at once, on their own; a failure fails only them.
                Cmd::ApplyTopic { spec, reply } => {
                    let _ = reply.send(self.apply_topic(&spec));
                }
                Cmd::Flush { reply } => pending.push(Pending::Done(reply)),
                Cmd::Retention { reply } => retention.push(reply),
                Cmd::Commits | Cmd::Shutdown => {}
            }
        }
        // Taken after every command of the batch was received: see [`PendingCommits`].
        let commits = {
            let mut pc = lock(&self.commits);
            pc.nudged = false;
            std::mem::take(&mut pc.offsets)
        };
        if failure.is_none() {
            for ((group, topic), parts) in &commits {
                for (&p, &o) in parts {
                    writes.put_offset(group, topic, p, o);
                }
            }
            if !writes.is_empty() {
                failure = writes.commit().err();
                // Readiness follows the last write: fjall refuses every write after an I/O
                // failure of its journal, so a failing bus stays not ready until restarted.
                store.failing.store(failure.is_some(), Ordering::Relaxed);
            }
        }
        match &failure {
            None => {
                for ((topic, partition), tail) in tails {
                    tail.part.log.advance(tail.next, tail.last_ts);
                    changes.partition(&topic, partition);
                }
                self.committed(commits);
                self.publish_changes(&changes);
                tracing::trace!(
                    commands = n,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "batch written"
                );
            }
            Some(e) => {
                // Readers never see the batch's records (no `high` moved past them). A batch
                // whose journal write reached the disk but whose sync failed may still come
                // back on reopen: its publishers were told it failed, so a retry duplicates
                // it, which at-least-once consumers absorb.
                tracing::error!(error = %e, commands = n, "embedded bus write failed; the batch is rejected");
                // Offsets taken but not written go back, unless a newer one was decided since;
                // the next decided offset nudges the writer again.
                let mut pc = lock(&self.commits);
                for (key, parts) in commits {
                    let entry = pc.offsets.entry(key).or_default();
                    for (p, o) in parts {
                        entry.entry(p).or_insert(o);
                    }
                }
                pc.nudged = false;
            }
        }
        for p in pending {
            p.answer(failure.as_ref());
        }
        for reply in retention {
            let _ = reply.send(self.retention());
        }
    }

    /// Records durable offsets for new group members.
    fn committed(&mut self, commits: CommitSet) {
        if commits.is_empty() {
            return;
        }
        let mut map = lock(&self.store.offsets);
        for (key, parts) in commits {
            map.entry(key).or_default().extend(parts);
        }
    }

    fn append(
        &mut self,
        writes: &mut Batch<'_>,
        tails: &mut BTreeMap<(String, u32), Tail>,
        topic: &str,
        record: &OutRecord,
    ) -> Result<Published, BusError> {
        let meta = self
            .metas
            .get(topic)
            .ok_or_else(|| BusError::UnknownTopic(topic.to_string()))?;
        let partition = partition_for(&record.key, meta.partitions.len() as u32);
        let key = (topic.to_string(), partition);
        if !tails.contains_key(&key) {
            let part = meta.partitions.get(partition as usize).ok_or_else(|| {
                BusError::Storage(format!("topic `{topic}` lacks partition {partition}"))
            })?;
            let bounds = part.log.bounds();
            let tail = Tail {
                part: part.clone(),
                next: bounds.high,
                last_ts: bounds.last_ts.unwrap_or(i64::MIN),
            };
            tails.insert(key.clone(), tail);
        }
        let Some(tail) = tails.get_mut(&key) else {
            return Err(BusError::Storage("lost a partition tail".into()));
        };
        // Monotonic per partition, so offset_for_time can binary-search.
        let ts = tail.last_ts.max(now_ms());
        let offset = tail.next;
        if !writes.put_record(
            &tail.part.log,
            offset,
            ts,
            &record.key,
            &record.headers,
            &record.payload,
        ) {
            // TooLarge, as the brokers': a dead letter goes out without its payload.
            return Err(BusError::TooLarge(format!(
                "a record of {} bytes is past the embedded log's 1 GiB limit",
                record.payload.len()
            )));
        }
        tail.last_ts = ts;
        tail.next += 1;
        Ok(Published { partition, offset })
    }

    /// Creates or grows a topic, durable and visible to readers when it returns.
    fn apply_topic(&mut self, spec: &TopicSpec) -> Result<(), BusError> {
        let have = self
            .metas
            .get(&spec.name)
            .map_or(0, |m| m.partitions.len() as u32);
        let retention = self.metas.get(&spec.name).and_then(|m| m.retention);
        if spec.partitions < have {
            return Err(BusError::Conflict(format!(
                "topic `{}` has {have} partitions; partitions can only be added, not removed (asked for {})",
                spec.name, spec.partitions
            )));
        }
        if spec.partitions == have && retention == spec.retention {
            return Ok(());
        }
        // Ids are never reused: a new topic takes one past every topic's.
        let id = match self.files.get(&spec.name) {
            Some(f) => f.id,
            None => self.files.values().map(|f| f.id + 1).max().unwrap_or(0),
        };
        let mut added = Vec::new();
        for p in have..spec.partitions {
            added.push(PartShared::new(self.store.db.partition(id, p)?));
        }
        let file = TopicFile {
            id,
            partitions: spec.partitions,
            retention_ms: store::retention_to_ms(spec.retention),
        };
        self.store.db.save_topic(&spec.name, &file)?;
        self.files.insert(spec.name.clone(), file);
        let meta = self
            .metas
            .entry(spec.name.clone())
            .or_insert_with(|| TopicMeta {
                partitions: Vec::new(),
                retention: None,
            });
        meta.partitions.extend(added);
        meta.retention = spec.retention;
        let mut changes = Changes::default();
        changes.topics.insert(spec.name.clone());
        self.publish_changes(&changes);
        tracing::info!(topic = %spec.name, partitions = spec.partitions, retention = ?spec.retention, "topic applied");
        Ok(())
    }

    /// Removes the records older than their topic's retention, moving `low` forward.
    fn retention(&mut self) -> Result<(), BusError> {
        let now = now_ms();
        let mut changes = Changes::default();
        // Every partition's removals and marks in one batch: one fdatasync per pass.
        let store = self.store.clone();
        let mut batch = store.db.batch();
        let mut moved = Vec::new();
        for (topic, meta) in &self.metas {
            let Some(retention) = meta.retention else {
                continue;
            };
            let cutoff =
                now.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
            for (p, part) in meta.partitions.iter().enumerate() {
                match store.db.expire(&mut batch, &part.log, cutoff) {
                    Ok(Some(low)) => moved.push((topic.clone(), p as u32, part.clone(), low)),
                    Ok(None) => {}
                    // One partition that cannot be trimmed stops only itself.
                    Err(e) => {
                        metrics::counter!(crate::telemetry::metrics::BUS_RETENTION_ERRORS_TOTAL, "topic" => topic.clone())
                            .increment(1);
                        tracing::warn!(topic = %topic, partition = p, error = %e, "retention cannot trim this partition");
                    }
                }
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        if let Err(e) = batch.commit() {
            // As for a failed write batch: fjall refuses every write after a journal failure,
            // so readiness reports it until the process restarts.
            store.failing.store(true, Ordering::Relaxed);
            return Err(e);
        }
        for (topic, p, part, low) in moved {
            part.log.set_low(low);
            changes.partition(&topic, p);
        }
        self.publish_changes(&changes);
        tracing::debug!(
            partitions = changes.partitions.len(),
            "retention removed records"
        );
        Ok(())
    }

    /// Makes a durable batch visible to readers: topic shapes first, then offsets, then a tick
    /// per topic to wake its readers.
    fn publish_changes(&self, changes: &Changes) {
        let mut topics = self.topics.write().unwrap_or_else(PoisonError::into_inner);
        for name in &changes.topics {
            let Some(meta) = self.metas.get(name) else {
                continue;
            };
            let tick = topics
                .get(name)
                .map(|t| t.tick.clone())
                .unwrap_or_else(|| Arc::new(watch::channel(0).0));
            topics.insert(
                name.clone(),
                Arc::new(TopicShared {
                    partitions: meta.partitions.clone(),
                    retention: meta.retention,
                    tick,
                }),
            );
        }
        for (name, ps) in &changes.partitions {
            let Some(shared) = topics.get(name) else {
                continue;
            };
            for &p in ps {
                if let Some(s) = shared.partitions.get(p as usize) {
                    s.refresh();
                }
            }
            shared.tick.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}
