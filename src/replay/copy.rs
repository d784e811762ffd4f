//! Copy mode: re-publish a range of one topic to another, e.g. a dead-letter topic back to its
//! source once the cause is fixed, or a `.v1` topic into its `.v2` successor.
//!
//! Each record keeps its key (so it lands in its key's partition of the destination) and
//! payload. Headers are kept except the `nexus-dlq-*` ones, which describe a failure that the
//! copy leaves behind; `nexus-replayed-from` names the original record. A dead-letter record
//! written without its payload (`nexus-dlq-payload-omitted`) is not copied: its event is still
//! in the source topic, where a replay by offset reaches it.
//!
//! **Order.** Records are published one by one (a batch published concurrently could reorder
//! one key's records), and the selected partitions are merged by record time: each partition is
//! read in order, in batches, and the next record published is the earliest of the partitions'
//! next records (ties: the lower partition first). A key's records are not always in one
//! partition: after `topology apply` grew the topic, its older records are in its old partition
//! and its newer ones in its new partition, which may have the lower number; copying partition
//! after partition would publish the newer ones first. Only the partitions' next records are
//! compared, so a partition's own order is never changed, even where its times go backwards.
//! Record time is the append time on JetStream and the embedded log, rising within a partition,
//! so a key's records come out in the order they were appended. On Kafka it is the producer's
//! clock (CreateTime): records of one key written by two producers whose clocks disagree by
//! more than the time between the writes are copied in the clocks' order, and a record whose
//! time is ahead holds the rest of its partition back until the other partitions caught up.
//!
//! **Reads.** A partition is read with [`Bus::read`] from its next offset not yet copied, and
//! the copy relies on that method's contract alone, the same on every backend: offsets have
//! gaps (the next read starts after the last record read), an answer shorter than asked for
//! ends at the log end, and records the bus has but cannot fetch are an error
//! ([`BusError::ReadIncomplete`]), never a short answer.
//!
//! **Interruption.** A copy that fails part-way ([`ReplayError::CopyInterrupted`]) names per
//! partition the next offset not yet copied (everything before it was copied or deliberately
//! left out, nothing at or after it) and how to resume: see [`Resume`].

use std::collections::VecDeque;
use std::fmt;

use super::{
    format_time, partitions_of, target_offset, ReplayError, ReplayFrom, REPLAYED_FROM_HEADER,
};
use crate::bus::{headers, Bus, BusError, Message, OutRecord, PartitionOffsets};

/// Records read per `Bus::read` call: large enough to amortise the round trip to a remote
/// broker, small enough that a batch of large payloads stays a few megabytes. A copy holds at
/// most one batch per selected partition.
pub const READ_BATCH: usize = 256;

/// Prefix of the headers a dead-letter record carries about its failure.
const DLQ_HEADER_PREFIX: &str = "nexus-dlq-";

/// What to copy where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRequest {
    pub from_topic: String,
    pub to_topic: String,
    pub from: ReplayFrom,
    /// Copy records appended before this time (ms) only; `None` copies to the log end as it
    /// was when the copy started.
    pub to_time: Option<i64>,
    pub partition: Option<u32>,
}

/// One source partition of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionCopy {
    pub partition: u32,
    /// First offset considered.
    pub start: u64,
    /// Log end when the copy started; later records are not copied, so copying into a topic
    /// that is also being read cannot run forever.
    pub end: u64,
    /// Records copied (or, in a dry run, that would be).
    pub copied: u64,
    /// Offset of the last record copied.
    pub last_offset: Option<u64>,
    /// Dead-letter records without their payload, left out.
    pub without_payload: u64,
    /// The next offset not yet copied: every record of `[start, next_offset)` was copied (or
    /// left out on purpose), none at or after it. `end` once the partition is done.
    pub next_offset: u64,
    /// Whether every record of the range was taken.
    pub finished: bool,
}

/// What a copy did, per source partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub from_topic: String,
    pub to_topic: String,
    pub from: ReplayFrom,
    pub to_time: Option<i64>,
    pub partitions: Vec<PartitionCopy>,
    pub dry_run: bool,
}

impl CopyReport {
    pub fn total_copied(&self) -> u64 {
        self.partitions.iter().map(|p| p.copied).sum()
    }
}

/// How to resume an interrupted copy so that nothing is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Nothing was copied: run the same command again.
    Again,
    /// One partition is left: `--from-offset offset --partition partition` copies exactly
    /// what is left.
    Offset { partition: u32, offset: u64 },
    /// Several partitions are left: `--from-time` this time (ms) keeps them merged. Each
    /// partition starts at its first record at or after it, which is at or before its next
    /// record not yet copied (that record's time, or its predecessor's, is the bound taken),
    /// so nothing is lost; records of that time or later already copied are copied again.
    Time(i64),
}

/// Where an interrupted copy stood; the `Display` is the operator's instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyProgress {
    pub from_topic: String,
    pub to_topic: String,
    pub to_time: Option<i64>,
    pub dry_run: bool,
    pub partitions: Vec<PartitionCopy>,
    pub resume: Resume,
}

impl CopyProgress {
    pub fn total_copied(&self) -> u64 {
        self.partitions.iter().map(|p| p.copied).sum()
    }
}

/// The record to publish for a copied message.
pub fn copied_record(message: &Message) -> OutRecord {
    let mut headers: Vec<(String, String)> = message
        .headers
        .iter()
        .filter(|(name, _)| !name.starts_with(DLQ_HEADER_PREFIX) && name != REPLAYED_FROM_HEADER)
        .cloned()
        .collect();
    headers.push((
        REPLAYED_FROM_HEADER.to_owned(),
        format!("{}/{}/{}", message.topic, message.partition, message.offset),
    ));
    OutRecord {
        key: message.key.clone(),
        payload: message.payload.clone(),
        headers,
    }
}

/// One source partition under way: its progress and the records read but not yet taken.
struct Source {
    done: PartitionCopy,
    /// Read, not yet copied or left out; the front is the partition's next record.
    buffer: VecDeque<Message>,
    /// A read reached the recorded end, or came back short (the bus had nothing more, see
    /// [`Bus::read`]): nothing left to read.
    read_all: bool,
    /// Time of the last record taken (copied or left out), a bound for the next one's.
    last_time: Option<i64>,
}

impl Source {
    fn new(o: &PartitionOffsets, start: u64) -> Self {
        Source {
            done: PartitionCopy {
                partition: o.partition,
                start,
                end: o.high,
                copied: 0,
                last_offset: None,
                without_payload: 0,
                next_offset: start,
                finished: start >= o.high,
            },
            buffer: VecDeque::new(),
            read_all: start >= o.high,
            last_time: None,
        }
    }

    fn needs_read(&self) -> bool {
        self.buffer.is_empty() && !self.read_all
    }

    fn head_time(&self) -> Option<i64> {
        self.buffer.front().map(|m| m.timestamp_ms)
    }

    /// Takes a batch in, keeping only records before the recorded end. By the contract of
    /// [`Bus::read`] a batch shorter than asked for ends at the log end, which is at or past
    /// the recorded one, so nothing is left to read after it.
    fn fill(&mut self, batch: Vec<Message>) {
        if batch.len() < READ_BATCH {
            self.read_all = true;
        }
        for message in batch {
            if message.offset >= self.done.end {
                self.read_all = true;
                break;
            }
            self.buffer.push_back(message);
        }
        self.settle();
    }

    /// Marks the partition finished once nothing is left to take.
    fn settle(&mut self) {
        if self.buffer.is_empty() && (self.read_all || self.done.next_offset >= self.done.end) {
            self.read_all = true;
            self.done.finished = true;
            self.done.next_offset = self.done.end;
        }
    }

    /// The front record has been copied or left out.
    fn advance(&mut self) {
        if let Some(m) = self.buffer.pop_front() {
            self.done.next_offset = m.offset + 1;
            self.last_time = Some(m.timestamp_ms);
        }
        match self.buffer.front() {
            // Offsets between (markers, expired records) hold nothing to copy.
            Some(next) => self.done.next_offset = next.offset,
            None => self.settle(),
        }
    }
}

/// Copies `[from, to_time)` of the source partitions to the destination topic (or, with
/// `dry_run`, counts what would be copied), merged by record time (see the module doc). Both
/// topics must exist.
pub async fn copy(
    bus: &dyn Bus,
    req: &CopyRequest,
    dry_run: bool,
) -> Result<CopyReport, ReplayError> {
    check(req)?;
    let offsets = partitions_of(bus, &req.from_topic, req.partition).await?;
    if bus.topic_info(&req.to_topic).await?.is_none() {
        return Err(ReplayError::UnknownTopic(req.to_topic.clone()));
    }
    let mut sources = Vec::with_capacity(offsets.len());
    for o in &offsets {
        let start = target_offset(bus, &req.from_topic, o, req.from).await?;
        sources.push(Source::new(o, start));
    }
    merge(bus, req, &mut sources, dry_run)
        .await
        .map_err(|source| interrupted(req, &sources, dry_run, source))?;
    let partitions: Vec<PartitionCopy> = sources.iter().map(|s| s.done).collect();
    if !dry_run {
        tracing::warn!(
            from_topic = %req.from_topic,
            to_topic = %req.to_topic,
            copied = partitions.iter().map(|p| p.copied).sum::<u64>(),
            "records copied by replay"
        );
    }
    Ok(CopyReport {
        from_topic: req.from_topic.clone(),
        to_topic: req.to_topic.clone(),
        from: req.from,
        to_time: req.to_time,
        partitions,
        dry_run,
    })
}

fn check(req: &CopyRequest) -> Result<(), ReplayError> {
    if req.from_topic == req.to_topic {
        return Err(ReplayError::SameTopic(req.from_topic.clone()));
    }
    if let (ReplayFrom::Time(from), Some(to)) = (req.from, req.to_time) {
        if to <= from {
            return Err(ReplayError::EmptyTimeRange {
                from: format_time(from),
                to: format_time(to),
            });
        }
    }
    Ok(())
}

/// Takes the earliest next record of the partitions until every one is done. Before each
/// pick every partition that is not done holds its next record, so the pick is right.
async fn merge(
    bus: &dyn Bus,
    req: &CopyRequest,
    sources: &mut [Source],
    dry_run: bool,
) -> Result<(), BusError> {
    loop {
        for source in sources.iter_mut().filter(|s| s.needs_read()) {
            let (partition, from) = (source.done.partition, source.done.next_offset);
            let batch = bus
                .read(&req.from_topic, partition, from, READ_BATCH)
                .await?;
            source.fill(batch);
        }
        let Some(next) = earliest(sources) else {
            return Ok(());
        };
        take(bus, req, &mut sources[next], dry_run).await?;
    }
}

/// The partition whose next record is the earliest (the lower partition on a tie).
fn earliest(sources: &[Source]) -> Option<usize> {
    sources
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.head_time().map(|t| ((t, s.done.partition), i)))
        .min()
        .map(|(_, i)| i)
}

/// Copies (or leaves out) a partition's next record.
async fn take(
    bus: &dyn Bus,
    req: &CopyRequest,
    source: &mut Source,
    dry_run: bool,
) -> Result<(), BusError> {
    let Some(message) = source.buffer.front() else {
        return Ok(());
    };
    // Left out, not an end: on Kafka a record's time is its producer's clock, so a later
    // record may carry an earlier time than one past `to_time`.
    if req.to_time.is_some_and(|t| message.timestamp_ms >= t) {
        source.advance();
        return Ok(());
    }
    if message.header(headers::DLQ_PAYLOAD_OMITTED).is_some() {
        tracing::warn!(
            partition = message.partition,
            offset = message.offset,
            source_topic = message.header(headers::DLQ_SOURCE_TOPIC).unwrap_or(""),
            source_offset = message.header(headers::DLQ_SOURCE_OFFSET).unwrap_or(""),
            "a dead letter without its payload is not copied; replay its source offset"
        );
        source.done.without_payload += 1;
        source.advance();
        return Ok(());
    }
    if !dry_run {
        bus.publish(&req.to_topic, copied_record(message)).await?;
    }
    source.done.copied += 1;
    source.done.last_offset = Some(message.offset);
    source.advance();
    Ok(())
}

/// The error of a copy stopped by `source`, with where each partition stands.
fn interrupted(
    req: &CopyRequest,
    sources: &[Source],
    dry_run: bool,
    source: BusError,
) -> ReplayError {
    let progress = CopyProgress {
        from_topic: req.from_topic.clone(),
        to_topic: req.to_topic.clone(),
        to_time: req.to_time,
        dry_run,
        partitions: sources.iter().map(|s| s.done).collect(),
        resume: resume(sources, req.to_time),
    };
    tracing::error!(
        from_topic = %req.from_topic,
        to_topic = %req.to_topic,
        copied = progress.total_copied(),
        error = %source,
        "copy interrupted"
    );
    ReplayError::CopyInterrupted {
        progress: Box::new(progress),
        source,
    }
}

/// How to go on from where the sources stand (see [`Resume`]).
fn resume(sources: &[Source], to_time: Option<i64>) -> Resume {
    // `next_offset` moves at the end of an empty range too; a taken record sets `last_time`.
    if sources.iter().all(|s| s.last_time.is_none()) {
        return Resume::Again;
    }
    let left: Vec<&Source> = sources.iter().filter(|s| !s.done.finished).collect();
    if let [only] = left.as_slice() {
        return Resume::Offset {
            partition: only.done.partition,
            offset: only.done.next_offset,
        };
    }
    // Per partition left: its next record's time if read, else its last taken record's, which
    // is at or before its next offset. Every partition had a batch before the first record was
    // taken, so one without either has taken nothing: then only running it all again is safe.
    let bounds: Option<Vec<i64>> = left.iter().map(|s| s.head_time().or(s.last_time)).collect();
    match bounds.and_then(|b| b.into_iter().min()) {
        // Partitions stopped in their tails past `--to-time` (left out, read to find the end):
        // a resume from there would be an empty range, which the command refuses. An earlier
        // time is always safe (each partition starts earlier: more copied again, nothing
        // skipped), and the range's last millisecond is the latest one that is not empty.
        Some(t) => match to_time {
            Some(end) if t >= end => Resume::Time(end.saturating_sub(1)),
            _ => Resume::Time(t),
        },
        None => Resume::Again,
    }
}

impl fmt::Display for CopyProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "counted" } else { "copied" };
        writeln!(
            f,
            "{} → {}: {} record(s) {verb}; per partition (everything before the next offset was \
             {verb} or left out, nothing at or after it):",
            self.from_topic,
            self.to_topic,
            self.total_copied()
        )?;
        for p in &self.partitions {
            let state = if p.finished {
                "done".to_owned()
            } else if p.next_offset == p.start {
                format!("not started, next offset {}", p.next_offset)
            } else {
                format!("next offset not yet {verb} {}", p.next_offset)
            };
            writeln!(
                f,
                "  partition {}: {} {verb}, {state} (range {}..{})",
                p.partition, p.copied, p.start, p.end
            )?;
        }
        let to_time = self
            .to_time
            .map(|t| format!(" --to-time {}", format_time(t)))
            .unwrap_or_default();
        let command = format!(
            "nexus replay --topic {} --copy-to {}",
            self.from_topic, self.to_topic
        );
        if self.dry_run {
            return write!(f, "Dry run: nothing was published; run it again.");
        }
        match self.resume {
            Resume::Again => write!(f, "Nothing was {verb}: run the same command again."),
            Resume::Offset { partition, offset } => write!(
                f,
                "Only partition {partition} is left; resume exactly with (same --bus): \
                 {command} --from-offset {offset} --partition {partition}{to_time} --execute"
            ),
            Resume::Time(t) => write!(
                f,
                "Resume, keeping the partitions merged, with (same --bus): {command} \
                 --from-time {}{to_time} --execute\nEach partition then starts at its first \
                 record at or after that time, which is at or before its next offset above, so \
                 nothing is lost. Copied again are the records at or after that time before \
                 those offsets: on JetStream and the embedded log (append times) only those of \
                 that millisecond, on Kafka (producer clocks) possibly more, and any record \
                 before the first run's start at or after that time. Consumers are idempotent \
                 by event id, so the duplicates change nothing. Records appended to {} since \
                 the first run started are copied too.",
                format_time(t),
                self.from_topic
            ),
        }
    }
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "Would copy" } else { "Copied" };
        write!(
            f,
            "{verb} {} → {} from {}",
            self.from_topic, self.to_topic, self.from
        )?;
        if let Some(t) = self.to_time {
            write!(f, " to {}", format_time(t))?;
        }
        writeln!(f, ", partitions merged by record time")?;
        writeln!(
            f,
            "{:>9}  {:>12}  {:>12}  {:>12}",
            "PARTITION", "START", "LOG END", "COPIED"
        )?;
        for p in &self.partitions {
            writeln!(
                f,
                "{:>9}  {:>12}  {:>12}  {:>12}",
                p.partition, p.start, p.end, p.copied
            )?;
        }
        writeln!(
            f,
            "{:>9}  {:>12}  {:>12}  {:>12}",
            "TOTAL",
            "",
            "",
            self.total_copied()
        )?;
        let without_payload: u64 = self.partitions.iter().map(|p| p.without_payload).sum();
        if without_payload > 0 {
            writeln!(
                f,
                "{without_payload} dead letter(s) without their payload (too large for the \
                 dead-letter topic) are not copied: replay their source topic from the offsets \
                 in their nexus-dlq-source-* headers (logged)."
            )?;
        }
        if self.dry_run {
            write!(f, "Dry run: nothing was published (use --execute to copy).")
        } else {
            write!(
                f,
                "{} record(s) published to {}; consumers are idempotent, so copies of records \
                 already processed change nothing.",
                self.total_copied(),
                self.to_topic
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partition left with `last` taken and `head` read next (times in ms).
    fn left(partition: u32, last: Option<i64>, head: Option<i64>) -> Source {
        let offsets = PartitionOffsets {
            partition,
            low: 0,
            high: 100,
        };
        let mut s = Source::new(&offsets, 0);
        s.last_time = last;
        if let Some(t) = head {
            s.buffer.push_back(Message {
                topic: "t".into(),
                partition,
                offset: 10,
                timestamp_ms: t,
                key: "k".into(),
                payload: Default::default(),
                headers: Vec::new(),
            });
        }
        s
    }

    #[test]
    fn a_resume_time_is_the_earliest_next_record_and_never_an_empty_range() {
        let sources = [left(0, Some(100), Some(150)), left(1, Some(120), None)];
        assert_eq!(resume(&sources, None), Resume::Time(120));
        assert_eq!(resume(&sources, Some(1_000)), Resume::Time(120));
        // Both partitions stopped in their tails past `--to-time` 140: resuming from 150 would
        // be `--from-time 150 --to-time 140`, which the command refuses.
        let tails = [left(0, Some(145), Some(150)), left(1, Some(160), None)];
        assert_eq!(resume(&tails, Some(140)), Resume::Time(139));
        assert_eq!(
            resume(&[left(0, None, None), left(1, None, None)], Some(140)),
            Resume::Again
        );
    }
}
