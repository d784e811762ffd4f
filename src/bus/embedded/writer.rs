//! The single writer: group commit of publishes, offset commits, topic changes and retention.
//!
//! redb allows one write transaction at a time, so one thread owns all writing. It blocks on its
//! channel, then takes what else is queued, up to `max_batch` publishes, into one transaction
//! (one fsync), and answers every caller after the commit. Appends to one partition happen in
//! channel order, which is what makes a key's records ordered.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redb::{ReadableTable, Table, WriteTransaction};
use tokio::sync::{oneshot, watch};

use super::store::{
    self, PartMeta, RecordKey, RecordValue, TopicMeta, OFFSETS, PARTITIONS, RECORDS, TOPICS,
};
use super::{lock, now_ms, storage, DbHandle, PartShared, TopicShared, Topics};
use crate::bus::{partition_for, BusError, OutRecord, Published, TopicSpec};

/// How often retention runs. Retention is hours or days in practice; a pass only looks at the
/// oldest records of each partition, so a second is both cheap and far finer than needed.
const RETENTION_INTERVAL: Duration = Duration::from_secs(1);

/// Records one retention pass deletes per partition at most, so a long-overdue trim does not
/// hold the writer (and every publisher) in one huge transaction; the next pass continues.
const RETENTION_BATCH: u64 = 50_000;

/// Commands besides publishes taken into one transaction at most (commits are tiny, but a
/// transaction must end for anyone to be answered).
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
/// set into its next transaction. Every batch takes the set after receiving its commands, so a
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

type CommitSet = HashMap<(String, String), BTreeMap<u32, u64>>;

/// An answer held back until the transaction commits.
enum Pending {
    Published(Reply<Published>, Published),
    Done(Reply<()>),
    /// A publish of a batch that failed before it was appended.
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

/// Every caller of a failed transaction gets the same storage failure.
fn copy_err(e: &BusError) -> BusError {
    BusError::Storage(e.to_string())
}

pub(super) struct Writer {
    db: Arc<DbHandle>,
    topics: Arc<Topics>,
    rx: Receiver<Cmd>,
    commits: Arc<Mutex<PendingCommits>>,
    max_batch: usize,
    /// The writer's own view of the metadata, ahead of the shared one during a transaction.
    metas: HashMap<String, TopicMeta>,
    path: PathBuf,
}

/// What a transaction changed, published to readers after it committed.
#[derive(Default)]
struct Changes {
    /// Partitions whose `high` or `low` moved.
    partitions: BTreeMap<String, BTreeSet<u32>>,
    /// Topics created or reconfigured.
    topics: BTreeSet<String>,
}

impl Writer {
    pub(super) fn new(
        db: Arc<DbHandle>,
        topics: Arc<Topics>,
        rx: Receiver<Cmd>,
        commits: Arc<Mutex<PendingCommits>>,
        max_batch: usize,
        metas: HashMap<String, TopicMeta>,
        path: PathBuf,
    ) -> Self {
        Self {
            db,
            topics,
            rx,
            commits,
            max_batch,
            metas,
            path,
        }
    }

    pub(super) fn run(mut self) {
        let span = tracing::info_span!("embedded_bus_writer", path = %self.path.display());
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

    /// Writes one batch in one transaction and answers its callers.
    fn write_batch(&mut self, mut batch: Vec<Cmd>) {
        let mut pending = Vec::with_capacity(batch.len());
        let mut retention = Vec::new();
        let mut changes = Changes::default();
        let mut commits = CommitSet::new();
        let started = Instant::now();
        let n = batch.len();
        let result = self
            .db
            .db
            .begin_write()
            .map_err(storage("begin write"))
            .and_then(|txn| {
                self.apply(
                    &txn,
                    &mut batch,
                    &mut pending,
                    &mut retention,
                    &mut changes,
                    &mut commits,
                )?;
                txn.commit().map_err(storage("commit"))
            });
        match &result {
            Ok(()) => {
                self.publish_changes(&changes);
                tracing::trace!(
                    commands = n,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "batch committed"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, commands = n, "embedded bus write failed; the batch is rejected");
                self.reload();
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
            p.answer(result.as_ref().err());
        }
        // Commands not reached because the transaction could not even start.
        for cmd in batch {
            let e = || copy_err(result.as_ref().err().unwrap_or(&BusError::Closed));
            match cmd {
                Cmd::Publish { reply, .. } => {
                    let _ = reply.send(Err(e()));
                }
                Cmd::ApplyTopic { reply, .. } | Cmd::Flush { reply } | Cmd::Retention { reply } => {
                    let _ = reply.send(Err(e()));
                }
                Cmd::Commits | Cmd::Shutdown => {}
            }
        }
        for reply in retention {
            let _ = reply.send(self.retention());
        }
    }

    fn apply(
        &mut self,
        txn: &WriteTransaction,
        batch: &mut Vec<Cmd>,
        pending: &mut Vec<Pending>,
        retention: &mut Vec<Reply<()>>,
        changes: &mut Changes,
        commits: &mut CommitSet,
    ) -> Result<(), BusError> {
        let mut records = txn.open_table(RECORDS).map_err(storage("open records"))?;
        let mut offsets = txn
            .open_table(OFFSETS)
            .map_err(storage("open group offsets"))?;
        let mut topics = txn.open_table(TOPICS).map_err(storage("open topics"))?;
        let mut failure = None;
        for cmd in batch.drain(..) {
            // After a storage failure the transaction is dropped (rolled back); every caller of
            // the batch is still collected so that each gets the failure.
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
                    match self.append(&mut records, &topic, &record, changes) {
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
                Cmd::Commits => {}
                Cmd::ApplyTopic { spec, reply } => {
                    if failure.is_some() {
                        pending.push(Pending::Done(reply));
                        continue;
                    }
                    match self.apply_topic(&mut topics, &spec, changes) {
                        Ok(()) => pending.push(Pending::Done(reply)),
                        Err(e @ BusError::Storage(_)) => {
                            failure = Some(e);
                            pending.push(Pending::Done(reply));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Cmd::Flush { reply } => pending.push(Pending::Done(reply)),
                Cmd::Retention { reply } => retention.push(reply),
                Cmd::Shutdown => {}
            }
        }
        // Taken after every command of the batch was received: see [`PendingCommits`].
        {
            let mut pc = lock(&self.commits);
            *commits = std::mem::take(&mut pc.offsets);
            pc.nudged = false;
        }
        if failure.is_none() {
            'offsets: for ((group, topic), parts) in commits.iter() {
                for (&partition, &offset) in parts {
                    if let Err(e) =
                        offsets.insert((group.as_str(), topic.as_str(), partition), offset)
                    {
                        failure = Some(storage("write group offset")(e));
                        break 'offsets;
                    }
                }
            }
        }
        if failure.is_none() {
            let mut parts = txn
                .open_table(PARTITIONS)
                .map_err(storage("open partitions"))?;
            for (topic, ps) in &changes.partitions {
                for &p in ps {
                    self.write_part(&mut parts, topic, p)?;
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn append(
        &mut self,
        records: &mut Table<RecordKey, RecordValue>,
        topic: &str,
        record: &OutRecord,
        changes: &mut Changes,
    ) -> Result<Published, BusError> {
        let meta = self
            .metas
            .get_mut(topic)
            .ok_or_else(|| BusError::UnknownTopic(topic.to_string()))?;
        let partition = partition_for(&record.key, meta.partitions.len() as u32);
        let part = meta.partitions.get_mut(partition as usize).ok_or_else(|| {
            BusError::Storage(format!(
                "topic `{topic}` has no metadata for partition {partition}"
            ))
        })?;
        let offset = part.high;
        // Monotonic per partition, so offset_for_time can binary-search.
        let ts = part.last_ts.max(now_ms());
        let headers = serde_json::to_vec(&record.headers).map_err(storage("encoding headers"))?;
        records
            .insert(
                (topic, partition, offset),
                (
                    ts,
                    record.key.as_str(),
                    headers.as_slice(),
                    record.payload.as_ref(),
                ),
            )
            .map_err(storage("append record"))?;
        part.high += 1;
        part.last_ts = ts;
        match changes.partitions.get_mut(topic) {
            Some(ps) => {
                ps.insert(partition);
            }
            None => {
                changes
                    .partitions
                    .insert(topic.to_string(), BTreeSet::from([partition]));
            }
        }
        Ok(Published { partition, offset })
    }

    fn apply_topic(
        &mut self,
        topics: &mut Table<&str, (u32, Option<u64>)>,
        spec: &TopicSpec,
        changes: &mut Changes,
    ) -> Result<(), BusError> {
        let meta = self.metas.entry(spec.name.clone()).or_default();
        let have = meta.partitions.len() as u32;
        if spec.partitions < have {
            return Err(BusError::Conflict(format!(
                "topic `{}` has {have} partitions; partitions can only be added, not removed (asked for {})",
                spec.name, spec.partitions
            )));
        }
        if spec.partitions == have && meta.retention == spec.retention {
            return Ok(());
        }
        topics
            .insert(
                spec.name.as_str(),
                (spec.partitions, store::retention_to_ms(spec.retention)),
            )
            .map_err(storage("write topic"))?;
        meta.retention = spec.retention;
        let added = changes.partitions.entry(spec.name.clone()).or_default();
        for p in have..spec.partitions {
            meta.partitions.push(PartMeta::default());
            added.insert(p);
        }
        changes.topics.insert(spec.name.clone());
        tracing::info!(topic = %spec.name, partitions = spec.partitions, retention = ?spec.retention, "topic applied");
        Ok(())
    }

    fn write_part(
        &self,
        parts: &mut Table<(&str, u32), (u64, u64, i64)>,
        topic: &str,
        partition: u32,
    ) -> Result<(), BusError> {
        let Some(m) = self
            .metas
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize))
        else {
            return Ok(());
        };
        parts
            .insert((topic, partition), (m.low, m.high, m.last_ts))
            .map_err(storage("write partition"))?;
        Ok(())
    }

    /// Deletes records older than their topic's retention, moving `low` forward.
    fn retention(&mut self) -> Result<(), BusError> {
        let now = now_ms();
        let mut trims: Vec<(String, u32, u64)> = Vec::new();
        let txn = self.db.db.begin_write().map_err(storage("begin write"))?;
        {
            let mut records = txn.open_table(RECORDS).map_err(storage("open records"))?;
            for (topic, meta) in &self.metas {
                let Some(retention) = meta.retention else {
                    continue;
                };
                let cutoff =
                    now.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
                for (p, part) in meta.partitions.iter().enumerate() {
                    let p = p as u32;
                    if part.low >= part.high {
                        continue;
                    }
                    let mut new_low = part.low;
                    let limit = part.high.min(part.low.saturating_add(RETENTION_BATCH));
                    for entry in records
                        .range((topic.as_str(), p, part.low)..(topic.as_str(), p, limit))
                        .map_err(storage("scan records"))?
                    {
                        let (k, v) = entry.map_err(storage("read record"))?;
                        if v.value().0 >= cutoff {
                            break;
                        }
                        new_low = k.value().2 + 1;
                    }
                    if new_low > part.low {
                        records
                            .retain_in(
                                (topic.as_str(), p, part.low)..(topic.as_str(), p, new_low),
                                |_, _| false,
                            )
                            .map_err(storage("delete expired records"))?;
                        trims.push((topic.clone(), p, new_low));
                    }
                }
            }
        }
        if trims.is_empty() {
            // Nothing expired: dropping the transaction writes nothing.
            return Ok(());
        }
        let mut changes = Changes::default();
        for (topic, p, low) in &trims {
            if let Some(part) = self
                .metas
                .get_mut(topic)
                .and_then(|t| t.partitions.get_mut(*p as usize))
            {
                part.low = *low;
            }
            changes
                .partitions
                .entry(topic.clone())
                .or_default()
                .insert(*p);
        }
        let result = (|| {
            {
                let mut parts = txn
                    .open_table(PARTITIONS)
                    .map_err(storage("open partitions"))?;
                for (topic, p, _) in &trims {
                    self.write_part(&mut parts, topic, *p)?;
                }
            }
            txn.commit().map_err(storage("commit"))
        })();
        match result {
            Ok(()) => {
                self.publish_changes(&changes);
                tracing::debug!(partitions = trims.len(), "retention trimmed partitions");
                Ok(())
            }
            Err(e) => {
                self.reload();
                Err(e)
            }
        }
    }

    /// Makes a committed transaction visible to readers: topic shapes first, then offsets, then
    /// a tick per topic to wake its readers.
    fn publish_changes(&self, changes: &Changes) {
        let mut topics = self.topics.write().unwrap_or_else(PoisonError::into_inner);
        for name in &changes.topics {
            let Some(meta) = self.metas.get(name) else {
                continue;
            };
            let old = topics.get(name);
            let mut partitions: Vec<Arc<PartShared>> =
                old.map(|t| t.partitions.clone()).unwrap_or_default();
            for p in meta.partitions.iter().skip(partitions.len()) {
                partitions.push(PartShared::new(p.low, p.high));
            }
            let tick = old
                .map(|t| t.tick.clone())
                .unwrap_or_else(|| Arc::new(watch::channel(0).0));
            topics.insert(
                name.clone(),
                Arc::new(TopicShared {
                    partitions,
                    retention: meta.retention,
                    tick,
                }),
            );
        }
        for (name, ps) in &changes.partitions {
            let (Some(meta), Some(shared)) = (self.metas.get(name), topics.get(name)) else {
                continue;
            };
            for &p in ps {
                if let (Some(m), Some(s)) = (
                    meta.partitions.get(p as usize),
                    shared.partitions.get(p as usize),
                ) {
                    s.high.store(m.high, std::sync::atomic::Ordering::Release);
                    s.low.store(m.low, std::sync::atomic::Ordering::Release);
                }
            }
            shared.tick.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// After a failed transaction: the writer's view goes back to what is committed.
    fn reload(&mut self) {
        let loaded = self
            .db
            .db
            .begin_read()
            .map_err(storage("begin read"))
            .and_then(|t| store::load_topics(&t));
        match loaded {
            Ok(metas) => self.metas = metas,
            Err(e) => tracing::error!(error = %e, "reloading embedded bus metadata failed"),
        }
    }
}
