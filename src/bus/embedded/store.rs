//! The redb layout of the embedded log and the reads every caller shares.
//!
//! Tables:
//! - `topics`: name → (partitions, retention in ms).
//! - `partitions`: (topic, partition) → (low, high, last append time): `low` is the first kept
//!   offset, `high` the next to write, the time keeps append times monotonic across restarts.
//! - `records`: (topic, partition, offset) → (append time ms, key, headers as JSON, payload);
//!   offsets are dense between `low` and `high`.
//! - `group_offsets`: (group, topic, partition) → committed offset (the next to consume).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use redb::{Database, ReadTransaction, ReadableTable, TableDefinition};

use super::storage;
use crate::bus::{BusError, Headers, Message};

pub(super) const TOPICS: TableDefinition<&str, (u32, Option<u64>)> = TableDefinition::new("topics");
pub(super) const PARTITIONS: TableDefinition<(&str, u32), (u64, u64, i64)> =
    TableDefinition::new("partitions");
/// Key of `records`: (topic, partition, offset).
pub(super) type RecordKey<'a> = (&'a str, u32, u64);
/// Value of `records`: (append time ms, key, headers as JSON, payload).
pub(super) type RecordValue<'a> = (i64, &'a str, &'a [u8], &'a [u8]);
pub(super) const RECORDS: TableDefinition<RecordKey, RecordValue> = TableDefinition::new("records");
pub(super) const OFFSETS: TableDefinition<(&str, &str, u32), u64> =
    TableDefinition::new("group_offsets");

/// One partition as stored in `partitions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct PartMeta {
    pub(super) low: u64,
    pub(super) high: u64,
    pub(super) last_ts: i64,
}

/// One topic with its partitions.
#[derive(Debug, Clone, Default)]
pub(super) struct TopicMeta {
    pub(super) partitions: Vec<PartMeta>,
    pub(super) retention: Option<Duration>,
}

pub(super) fn retention_to_ms(retention: Option<Duration>) -> Option<u64> {
    retention.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Creates the tables if needed and loads every topic.
pub(super) fn init(db: &Database) -> Result<HashMap<String, TopicMeta>, BusError> {
    let txn = db.begin_write().map_err(storage("begin write"))?;
    {
        txn.open_table(TOPICS)
            .map_err(storage("creating topics table"))?;
        txn.open_table(PARTITIONS)
            .map_err(storage("creating partitions table"))?;
        txn.open_table(RECORDS)
            .map_err(storage("creating records table"))?;
        txn.open_table(OFFSETS)
            .map_err(storage("creating group offsets table"))?;
    }
    txn.commit().map_err(storage("commit"))?;
    let txn = db.begin_read().map_err(storage("begin read"))?;
    load_topics(&txn)
}

/// Every topic with its partitions, as committed.
pub(super) fn load_topics(txn: &ReadTransaction) -> Result<HashMap<String, TopicMeta>, BusError> {
    let topics = txn.open_table(TOPICS).map_err(storage("open topics"))?;
    let parts = txn
        .open_table(PARTITIONS)
        .map_err(storage("open partitions"))?;
    let mut out = HashMap::new();
    for entry in topics.iter().map_err(storage("scan topics"))? {
        let (name, value) = entry.map_err(storage("read topic"))?;
        let name = name.value().to_string();
        let (count, retention_ms) = value.value();
        let mut partitions = Vec::with_capacity(count as usize);
        for p in 0..count {
            let (low, high, last_ts) = parts
                .get((name.as_str(), p))
                .map_err(storage("read partition"))?
                .ok_or_else(|| {
                    BusError::Storage(format!("topic `{name}` lacks metadata of partition {p}"))
                })?
                .value();
            if low > high {
                return Err(BusError::Storage(format!(
                    "topic `{name}` partition {p}: low {low} is past high {high}"
                )));
            }
            partitions.push(PartMeta { low, high, last_ts });
        }
        out.insert(
            name,
            TopicMeta {
                partitions,
                retention: retention_ms.map(Duration::from_millis),
            },
        );
    }
    Ok(out)
}

/// Up to `max` records of a partition from `from` on, in offset order.
pub(super) fn read_records(
    txn: &ReadTransaction,
    topic: &str,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<Message>, BusError> {
    let records = txn.open_table(RECORDS).map_err(storage("open records"))?;
    let mut out = Vec::with_capacity(max.min(256));
    if max == 0 {
        return Ok(out);
    }
    let range = records
        .range((topic, partition, from)..=(topic, partition, u64::MAX))
        .map_err(storage("scan records"))?;
    for entry in range {
        let (k, v) = entry.map_err(storage("read record"))?;
        let (_, _, offset) = k.value();
        let (timestamp_ms, key, headers, payload) = v.value();
        let headers: Headers = serde_json::from_slice(headers).map_err(|e| {
            BusError::Storage(format!(
                "record {topic}/{partition}/{offset}: bad headers: {e}"
            ))
        })?;
        out.push(Message {
            topic: topic.to_string(),
            partition,
            offset,
            timestamp_ms,
            key: key.to_string(),
            payload: Bytes::copy_from_slice(payload),
            headers,
        });
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

/// The first offset whose append time is at or after `ts_ms`, or the log end. Append times are
/// monotonic per partition (the writer takes max(previous, now)), so a binary search works.
pub(super) fn offset_for_time(
    db: &Database,
    topic: &str,
    partition: u32,
    ts_ms: i64,
) -> Result<u64, BusError> {
    let txn = db.begin_read().map_err(storage("begin read"))?;
    let parts = txn
        .open_table(PARTITIONS)
        .map_err(storage("open partitions"))?;
    let (mut lo, mut hi, _) = parts
        .get((topic, partition))
        .map_err(storage("read partition"))?
        .ok_or_else(|| BusError::UnknownPartition {
            topic: topic.to_string(),
            partition,
        })?
        .value();
    let records = txn.open_table(RECORDS).map_err(storage("open records"))?;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let ts = records
            .get((topic, partition, mid))
            .map_err(storage("read record"))?
            .ok_or_else(|| {
                BusError::Storage(format!(
                    "record {topic}/{partition}/{mid} missing inside the log"
                ))
            })?
            .value()
            .0;
        if ts < ts_ms {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// The committed offsets of a group on a topic, by partition.
pub(super) fn load_offsets(
    db: &Database,
    group: &str,
    topic: &str,
    partitions: u32,
) -> Result<Vec<Option<u64>>, BusError> {
    let txn = db.begin_read().map_err(storage("begin read"))?;
    let offsets = txn
        .open_table(OFFSETS)
        .map_err(storage("open group offsets"))?;
    (0..partitions)
        .map(|p| {
            Ok(offsets
                .get((group, topic, p))
                .map_err(storage("read group offset"))?
                .map(|v| v.value()))
        })
        .collect()
}
