//! Copy mode: re-publish a range of one topic to another, e.g. a dead-letter topic back to its
//! source once the cause is fixed, or a `.v1` topic into its `.v2` successor.
//!
//! Each record keeps its key (so it lands in its key's partition and stays in order) and
//! payload. Headers are kept except the `nexus-dlq-*` ones, which describe a failure that the
//! copy leaves behind; `nexus-replayed-from` names the original record. Records are published
//! one by one in offset order: a batch published concurrently could reorder one key's records.
//! A dead-letter record written without its payload (`nexus-dlq-payload-omitted`) is not copied:
//! its event is still in the source topic, where a replay by offset reaches it.

use std::fmt;

use super::{
    format_time, partitions_of, target_offset, ReplayError, ReplayFrom, REPLAYED_FROM_HEADER,
};
use crate::bus::{headers, Bus, Message, OutRecord};

/// Records read per `Bus::read` call: large enough to amortise the round trip to a remote
/// broker, small enough that a batch of large payloads stays a few megabytes.
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

/// Copies `[from, to_time)` of the source partitions to the destination topic (or, with
/// `dry_run`, counts what would be copied). Both topics must exist.
pub async fn copy(
    bus: &dyn Bus,
    req: &CopyRequest,
    dry_run: bool,
) -> Result<CopyReport, ReplayError> {
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
    let offsets = partitions_of(bus, &req.from_topic, req.partition).await?;
    if bus.topic_info(&req.to_topic).await?.is_none() {
        return Err(ReplayError::UnknownTopic(req.to_topic.clone()));
    }
    let mut partitions = Vec::with_capacity(offsets.len());
    for o in &offsets {
        let start = target_offset(bus, &req.from_topic, o, req.from).await?;
        let mut done = PartitionCopy {
            partition: o.partition,
            start,
            end: o.high,
            copied: 0,
            last_offset: None,
            without_payload: 0,
        };
        let mut cursor = start;
        'partition: while cursor < o.high {
            let batch = bus
                .read(&req.from_topic, o.partition, cursor, READ_BATCH)
                .await
                .map_err(|source| ReplayError::CopyInterrupted {
                    partition: o.partition,
                    copied: done.copied,
                    next_offset: cursor,
                    source,
                })?;
            if batch.is_empty() {
                break;
            }
            for message in batch {
                if message.offset >= o.high {
                    break 'partition;
                }
                // Skipped, not an end: on Kafka a record's time is its producer's clock, so a
                // later record may carry an earlier time than one past `to_time`.
                if req.to_time.is_some_and(|t| message.timestamp_ms >= t) {
                    cursor = message.offset + 1;
                    continue;
                }
                if message.header(headers::DLQ_PAYLOAD_OMITTED).is_some() {
                    tracing::warn!(
                        partition = o.partition,
                        offset = message.offset,
                        source_topic = message.header(headers::DLQ_SOURCE_TOPIC).unwrap_or(""),
                        source_offset = message.header(headers::DLQ_SOURCE_OFFSET).unwrap_or(""),
                        "a dead letter without its payload is not copied; replay its source offset"
                    );
                    done.without_payload += 1;
                    cursor = message.offset + 1;
                    continue;
                }
                if !dry_run {
                    bus.publish(&req.to_topic, copied_record(&message))
                        .await
                        .map_err(|source| ReplayError::CopyInterrupted {
                            partition: o.partition,
                            copied: done.copied,
                            next_offset: message.offset,
                            source,
                        })?;
                }
                done.copied += 1;
                done.last_offset = Some(message.offset);
                cursor = message.offset + 1;
            }
        }
        partitions.push(done);
    }
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
        writeln!(f)?;
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
