//! The embedded log's storage: records, topics, retention marks and group offsets in one fjall
//! database (`<dir>/db`), written in atomic batches by the writer thread and read by everyone.
//!
//! Keyspaces (fjall's column families; one journal for all, so a batch is atomic across them):
//! - `records`: `topic id u32 | partition u32 | offset u64` (big endian, so a partition's
//!   records sort by offset) → `append time ms i64 | key len u32 | key | headers len u32 |
//!   headers | payload` (little endian), the headers block as [`put_headers`] writes it.
//! - `topics`: topic name → [`TopicFile`] as JSON.
//! - `lows`: `topic id u32 | partition u32` → the first offset retention kept, `u64`; written with
//!   the removals, so a partition that retention emptied still knows where its offsets continue.
//! - `offsets`: `group len u16 | group | topic len u16 | topic | partition u32` → next offset to
//!   consume, `u64`; the latest write wins.
//!
//! Recovery after a crash is fjall's: its journal replays whole batches, never part of one.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode};
use serde::{Deserialize, Serialize};

use crate::bus::{BusError, Headers, Message};

/// The fjall database inside the bus directory.
pub(super) const DB_DIR: &str = "db";
/// fjall's format marker in its directory, written last (and synced) when it creates one.
const VERSION_MARKER: &str = "version";
/// fjall's folder of keyspaces; it holds the metadata keyspace once a creation succeeded.
const KEYSPACES_DIR: &str = "keyspaces";
/// A record longer than this is refused (records are bounded far below it by the edges).
const MAX_RECORD: usize = 1 << 30;
/// Records one retention pass removes from a partition at most, so a pass over a large backlog
/// is a bounded batch; the next pass (a second later) goes on.
const EXPIRE_PER_PASS: usize = 65_536;

/// Committed offsets: (group, topic) → partition → next offset to consume.
pub(super) type OffsetMap = HashMap<(String, String), BTreeMap<u32, u64>>;

/// A storage failure with what was being done.
fn fail<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BusError {
    move |e| BusError::Storage(format!("{what}: {e}"))
}

/// A failed write, saying what to do: fjall takes no write after an I/O failure (its own
/// "poisoned" state), whichever write met it, so only a restart brings the bus back.
fn write_failed(e: fjall::Error) -> BusError {
    let cause = match e {
        // The failure was a background flush's or an earlier write's; fjall logged it.
        fjall::Error::Poisoned => {
            "an earlier write or flush failed (see the error logged before this one)".to_string()
        }
        e => e.to_string(),
    };
    BusError::Storage(format!(
        "writing to the bus database: {cause}; it takes no more writes: free disk space or fix \
         the data directory, then restart nexus"
    ))
}

/// One topic as kept in the `topics` keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TopicFile {
    /// Prefix of the topic's record keys; never reused.
    pub(super) id: u32,
    pub(super) partitions: u32,
    pub(super) retention_ms: Option<u64>,
}

pub(super) fn retention_to_ms(retention: Option<Duration>) -> Option<u64> {
    retention.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads little-endian fields off the front of a value.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    /// A `len u32 | UTF-8` string.
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).ok().map(str::to_owned)
    }
}

/// `name len u32 | name | value len u32 | value` per header.
fn put_headers(b: &mut Vec<u8>, headers: &Headers) {
    for (n, v) in headers {
        for s in [n, v] {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
    }
}

fn read_headers(block: &[u8]) -> Option<Headers> {
    let mut c = Cursor(block);
    let mut headers = Headers::new();
    while !c.0.is_empty() {
        headers.push((c.string()?, c.string()?));
    }
    Some(headers)
}

/// The value of a record, or `None` past the size limit.
fn record_value(ts: i64, key: &str, headers: &Headers, payload: &[u8]) -> Option<Vec<u8>> {
    let headers_len: usize = headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
    let len = 16 + key.len() + headers_len + payload.len();
    if len > MAX_RECORD {
        return None;
    }
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&ts.to_le_bytes());
    b.extend_from_slice(&(key.len() as u32).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&(headers_len as u32).to_le_bytes());
    put_headers(&mut b, headers);
    b.extend_from_slice(payload);
    Some(b)
}

/// The append time at the front of a record's value.
fn value_ts(value: &[u8]) -> Option<i64> {
    Some(i64::from_le_bytes(value.get(..8)?.try_into().ok()?))
}

/// The message a record's value holds; the payload shares the value's buffer.
fn decode(value: Bytes, topic: &str, partition: u32, offset: u64) -> Option<Message> {
    let mut c = Cursor(&value);
    let ts = c.u64()? as i64;
    let key = c.string()?;
    let headers_len = c.u32()? as usize;
    let headers = read_headers(c.take(headers_len)?)?;
    let payload_at = value.len() - c.0.len();
    Some(Message {
        topic: topic.to_string(),
        partition,
        offset,
        timestamp_ms: ts,
        key,
        payload: value.slice(payload_at..),
        headers,
    })
}

/// Refuses a group whose committed-offset key would pass fjall's 64 KiB key limit (an
/// `assert!` in the writer thread, which would take the bus down at the first commit).
pub(super) fn check_offset_key(group: &str, topic: &str) -> Result<(), BusError> {
    let len = 8 + group.len() + topic.len();
    if len > usize::from(u16::MAX) {
        return Err(BusError::Config(format!(
            "consumer group name of {} bytes is too long for the embedded bus (group and topic \
             names together at most {} bytes)",
            group.len(),
            u16::MAX - 8
        )));
    }
    Ok(())
}

/// Refuses a topic name fjall cannot take as a key (empty, or past its 64 KiB key limit, less
/// what a committed offset's key adds): its `assert!`s would end the writer thread, and with
/// it the bus, when the topic is saved.
pub(super) fn check_topic_name(topic: &str) -> Result<(), BusError> {
    if topic.is_empty() {
        return Err(BusError::Config("a topic name cannot be empty".into()));
    }
    let max = usize::from(u16::MAX) - 8;
    if topic.len() > max {
        return Err(BusError::Config(format!(
            "topic name of {} bytes is too long for the embedded bus (at most {max} bytes)",
            topic.len()
        )));
    }
    Ok(())
}

/// `group len u16 | group | topic len u16 | topic | partition u32`.
fn offset_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + group.len() + topic.len());
    for s in [group, topic] {
        k.extend_from_slice(&(s.len() as u16).to_be_bytes());
        k.extend_from_slice(s.as_bytes());
    }
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn read_offset_entry(key: &[u8], value: &[u8]) -> Option<(String, String, u32, u64)> {
    let mut rest = key;
    let mut strings = Vec::with_capacity(2);
    for _ in 0..2 {
        let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        strings.push(std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_string());
        rest = rest.get(2 + len..)?;
    }
    let partition = u32::from_be_bytes(rest.try_into().ok()?);
    let offset = u64::from_le_bytes(value.try_into().ok()?);
    let topic = strings.pop()?;
    Some((strings.pop()?, topic, partition, offset))
}

fn u64_value(value: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(value.try_into().ok()?))
}

/// The open database and its keyspaces.
pub(super) struct Db {
    db: Database,
    records: Keyspace,
    topics: Keyspace,
    lows: Keyspace,
    offsets: Keyspace,
}

impl Db {
    /// Opens (or creates) the database in `dir`, replaying its journal after a crash.
    pub(super) fn open(dir: &Path) -> Result<Self, BusError> {
        if never_created(dir) {
            // Left by a nexus that created the database in place and was stopped doing it;
            // nothing was ever written to it (see [`never_created`]).
            tracing::warn!(path = %dir.display(), "removing a bus database whose creation was interrupted (it holds no events)");
            std::fs::remove_dir_all(dir).map_err(|e| {
                BusError::Storage(format!("removing the unfinished `{}`: {e}", dir.display()))
            })?;
        }
        if !dir.exists() {
            Self::create(dir)?;
        }
        Self::open_at(dir)
    }

    /// Creates the database beside `dir` and renames it into place once fjall has written it
    /// whole, with its keyspaces. fjall creates in place: a creation cut short (a full disk, a
    /// kill during the first start) leaves files it will neither open (an empty version
    /// marker) nor create again (`File exists`), so the directory stayed unusable for good.
    fn create(dir: &Path) -> Result<(), BusError> {
        let staging = dir.with_extension("new");
        // A leftover is an earlier creation that was cut short: never renamed, never used.
        match std::fs::remove_dir_all(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(BusError::Storage(format!(
                    "removing the unfinished `{}`: {e}",
                    staging.display()
                )))
            }
        }
        // Closed (its threads joined) before the rename, so nothing writes under the old name.
        drop(Self::open_at(&staging)?);
        std::fs::rename(&staging, dir).map_err(|e| {
            BusError::Storage(format!(
                "renaming `{}` to `{}`: {e}",
                staging.display(),
                dir.display()
            ))
        })?;
        // The rename is durable only once the directory holding both names is.
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| BusError::Storage(format!("syncing `{}`: {e}", parent.display())))
    }

    fn open_at(dir: &Path) -> Result<Self, BusError> {
        let db = Database::builder(dir)
            // Every batch is made durable by the writer (one fdatasync per batch), not by fjall.
            .manual_journal_persist(true)
            .open()
            .map_err(|e| {
                BusError::Storage(format!("opening the bus database `{}`: {e}", dir.display()))
            })?;
        let keyspace = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| BusError::Storage(format!("opening keyspace `{name}`: {e}")))
        };
        Ok(Self {
            records: keyspace("records")?,
            topics: keyspace("topics")?,
            lows: keyspace("lows")?,
            offsets: keyspace("offsets")?,
            db,
        })
    }

    /// Every topic.
    pub(super) fn load_topics(&self) -> Result<BTreeMap<String, TopicFile>, BusError> {
        let mut out = BTreeMap::new();
        for kv in self.topics.iter() {
            let (k, v) = kv.into_inner().map_err(fail("reading the topics"))?;
            let name = String::from_utf8(k.to_vec()).map_err(fail("reading a topic name"))?;
            let file = serde_json::from_slice(&v).map_err(fail("reading a topic"))?;
            out.insert(name, file);
        }
        Ok(out)
    }

    /// Writes a topic's shape durably.
    pub(super) fn save_topic(&self, name: &str, file: &TopicFile) -> Result<(), BusError> {
        let json = serde_json::to_vec(file).map_err(fail("encoding a topic"))?;
        let mut batch = self.batch();
        batch.inner.insert(&self.topics, name, json);
        batch.commit()
    }

    /// Every group's committed offsets.
    pub(super) fn load_offsets(&self) -> Result<OffsetMap, BusError> {
        let mut map = OffsetMap::new();
        for kv in self.offsets.iter() {
            let (k, v) = kv.into_inner().map_err(fail("reading the offsets"))?;
            let (group, topic, partition, offset) = read_offset_entry(&k, &v)
                .ok_or_else(|| BusError::Storage("a committed offset is corrupt".into()))?;
            map.entry((group, topic))
                .or_default()
                .insert(partition, offset);
        }
        Ok(map)
    }

    /// A partition's log: its bounds read from the records and the retention mark.
    pub(super) fn partition(&self, topic_id: u32, partition: u32) -> Result<PartLog, BusError> {
        let mut prefix = [0; 8];
        prefix[..4].copy_from_slice(&topic_id.to_be_bytes());
        prefix[4..].copy_from_slice(&partition.to_be_bytes());
        let mark = self
            .lows
            .get(prefix)
            .map_err(fail("reading a retention mark"))?
            .and_then(|v| u64_value(&v))
            .unwrap_or(0);
        // Nothing below the mark is kept; starting there skips retention's tombstones.
        let first = self
            .records
            .range(record_range(&prefix, mark..u64::MAX))
            .next()
            .map(|g| g.key().map_err(fail("reading a partition")))
            .transpose()?;
        let last = self
            .records
            .range(record_range(&prefix, 0..u64::MAX))
            .next_back()
            .map(|g| g.into_inner().map_err(fail("reading a partition")))
            .transpose()?;
        let (high, last_ts) = match &last {
            Some((k, v)) => ((record_offset(k)? + 1).max(mark), value_ts(v)),
            None => (mark, None),
        };
        let low = match &first {
            Some(k) => record_offset(k)?,
            None => high,
        };
        Ok(PartLog {
            prefix,
            bounds: Mutex::new(Bounds { low, high, last_ts }),
        })
    }

    /// Writes the records' memtable out to a table on disk (tests read across both).
    #[cfg(test)]
    pub(super) fn flush_records(&self) -> Result<(), BusError> {
        self.records
            .rotate_memtable_and_wait()
            .map_err(fail("flushing the records"))
    }

    /// A new batch; see [`Batch`].
    pub(super) fn batch(&self) -> Batch<'_> {
        Batch {
            db: self,
            inner: self.db.batch().durability(Some(PersistMode::SyncData)),
        }
    }

    /// Up to `max` of a partition's records from `from` on, below `high` (what readers may
    /// see). Records retention removed are skipped: the first one returned may be past `from`.
    pub(super) fn read(
        &self,
        log: &PartLog,
        topic: &str,
        partition: u32,
        from: u64,
        max: ReadMax,
        high: u64,
    ) -> Result<Vec<Message>, BusError> {
        // Below `low` are only retention's tombstones: start past them.
        let from = from.max(log.low());
        if from >= high || max.records == 0 || max.bytes == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(max.records.min((high - from) as usize));
        let mut bytes = 0usize;
        for kv in self
            .records
            .range(record_range(&log.prefix, from..high))
            .take(max.records)
        {
            let (k, v) = kv.into_inner().map_err(fail("reading a partition"))?;
            let offset = record_offset(&k)?;
            bytes = bytes.saturating_add(v.len());
            out.push(decode(v.into(), topic, partition, offset).ok_or_else(|| {
                BusError::Storage(format!(
                    "a record of {topic}/{partition} at or after {from} is corrupt on disk"
                ))
            })?);
            if bytes >= max.bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The first offset whose append time is at or after `ts_ms`, or `high`. Append times are
    /// monotonic per partition (the writer takes max(previous, now)), so a binary search over
    /// the kept offsets with point reads works.
    pub(super) fn offset_for_time(
        &self,
        log: &PartLog,
        ts_ms: i64,
        high: u64,
    ) -> Result<u64, BusError> {
        let (mut lo, mut hi) = (log.low().min(high), high);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let value = self
                .records
                .get(record_key(&log.prefix, mid))
                .map_err(fail("reading a record"))?;
            // A record that retention removed meanwhile is older than every kept one.
            let before = match value {
                Some(v) => {
                    value_ts(&v)
                        .ok_or_else(|| BusError::Storage("a record is corrupt on disk".into()))?
                        < ts_ms
                }
                None => true,
            };
            if before {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Adds to `batch` the removal of a partition's records older than `cutoff` (at most
    /// [`EXPIRE_PER_PASS`]) and its new retention mark; returns the new low offset, for
    /// [`PartLog::set_low`] once the batch is written, if it moves. Append times rise with the
    /// offset (one writer stamps them in order), so the cut is found by a binary search and
    /// the records before it are removed by key, unread: a pass after a long downtime costs a
    /// few reads, not one per record.
    pub(super) fn expire(
        &self,
        batch: &mut Batch<'_>,
        log: &PartLog,
        cutoff: i64,
    ) -> Result<Option<u64>, BusError> {
        let Bounds { low, high, .. } = log.bounds();
        let cut = self
            .offset_for_time(log, cutoff, high)?
            .min(low.saturating_add(EXPIRE_PER_PASS as u64));
        if cut <= low {
            return Ok(None);
        }
        for offset in low..cut {
            // Each key is written once, so a weak tombstone, which vanishes with the value it
            // meets in compaction, is enough.
            batch
                .inner
                .remove_weak(&self.records, record_key(&log.prefix, offset));
        }
        batch
            .inner
            .insert(&self.lows, log.prefix, cut.to_le_bytes());
        Ok(Some(cut))
    }
}

/// Whether `dir` is what an interrupted in-place creation by fjall leaves: a directory whose
/// version marker is missing or empty and which has not one keyspace. fjall writes the marker
/// and its metadata keyspace before an open returns, and nexus writes only after, so such a
/// directory never held an event.
fn never_created(dir: &Path) -> bool {
    let marker_empty = std::fs::metadata(dir.join(VERSION_MARKER)).map_or(true, |m| m.len() == 0);
    let no_keyspace = match std::fs::read_dir(dir.join(KEYSPACES_DIR)) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    dir.is_dir() && marker_empty && no_keyspace
}

fn record_key(prefix: &[u8; 8], offset: u64) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(prefix);
    k[8..].copy_from_slice(&offset.to_be_bytes());
    k
}

/// The offset in a record's key.
fn record_offset(key: &[u8]) -> Result<u64, BusError> {
    key.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| BusError::Storage("a record key is corrupt".into()))
}

fn record_range(prefix: &[u8; 8], offsets: Range<u64>) -> Range<[u8; 16]> {
    record_key(prefix, offsets.start)..record_key(prefix, offsets.end)
}

/// How much one [`Db::read`] takes at most: `records`, and the record whose value brings the
/// read to `bytes` is its last (one record is read whatever its size).
#[derive(Debug, Clone, Copy)]
pub(super) struct ReadMax {
    pub(super) records: usize,
    pub(super) bytes: usize,
}

impl ReadMax {
    /// `n` records, whatever their size.
    pub(super) fn records(n: usize) -> Self {
        Self {
            records: n,
            bytes: usize::MAX,
        }
    }
}

/// Writes gathered for one atomic, durable commit (journal write + fdatasync).
pub(super) struct Batch<'a> {
    db: &'a Db,
    inner: OwnedWriteBatch,
}

impl Batch<'_> {
    /// Adds a record at `offset` of a partition; `false` if it is past the size limit.
    pub(super) fn put_record(
        &mut self,
        log: &PartLog,
        offset: u64,
        ts: i64,
        key: &str,
        headers: &Headers,
        payload: &[u8],
    ) -> bool {
        let Some(value) = record_value(ts, key, headers, payload) else {
            return false;
        };
        self.inner
            .insert(&self.db.records, record_key(&log.prefix, offset), value);
        true
    }

    /// Adds a group's committed offset.
    pub(super) fn put_offset(&mut self, group: &str, topic: &str, partition: u32, offset: u64) {
        self.inner.insert(
            &self.db.offsets,
            offset_key(group, topic, partition),
            offset.to_le_bytes(),
        );
    }

    pub(super) fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Writes the batch atomically and makes it durable. Readers do not see its records until
    /// the writer moves the partitions' `high` past them.
    pub(super) fn commit(self) -> Result<(), BusError> {
        self.inner.commit().map_err(write_failed)
    }
}

/// Where a partition's records are kept, the writer's view of it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    /// First offset kept.
    pub(super) low: u64,
    /// Next offset to write.
    pub(super) high: u64,
    /// Append time of the newest record, if any is kept.
    pub(super) last_ts: Option<i64>,
}

/// One partition: its key prefix and bounds. Only the writer thread moves the bounds.
pub(super) struct PartLog {
    prefix: [u8; 8],
    bounds: Mutex<Bounds>,
}

impl PartLog {
    pub(super) fn bounds(&self) -> Bounds {
        *self.bounds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn low(&self) -> u64 {
        self.bounds().low
    }

    pub(super) fn high(&self) -> u64 {
        self.bounds().high
    }

    /// Records up to `high` (the newest appended at `last_ts`) are durable.
    pub(super) fn advance(&self, high: u64, last_ts: i64) {
        let mut b = self.bounds.lock().unwrap_or_else(PoisonError::into_inner);
        b.high = high;
        b.last_ts = Some(last_ts);
    }

    pub(super) fn set_low(&self, low: u64) {
        let mut b = self.bounds.lock().unwrap_or_else(PoisonError::into_inner);
        b.low = low;
        if b.high <= low {
            b.last_ts = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_offsets_read_back() {
        let hs: Headers = vec![
            ("b".into(), "2".into()),
            ("a".into(), "ünï\nx".into()),
            ("b".into(), String::new()),
        ];
        let value = record_value(1_700_000_000_000, "k", &hs, b"payload").unwrap();
        let m = decode(Bytes::from(value.clone()), "t", 3, 7).unwrap();
        assert_eq!(
            (m.offset, m.partition, m.timestamp_ms),
            (7, 3, 1_700_000_000_000)
        );
        assert_eq!((m.key.as_str(), &m.payload[..]), ("k", &b"payload"[..]));
        assert_eq!(m.headers, hs);
        assert!(
            decode(Bytes::from(value[..20].to_vec()), "t", 3, 7).is_none(),
            "cut short"
        );
        let none = record_value(1, "", &Headers::new(), b"").unwrap();
        assert_eq!(
            decode(Bytes::from(none), "t", 0, 0).unwrap().headers,
            Headers::new()
        );

        let k = offset_key("grüp", "nexus.inbound.v1", 9);
        assert_eq!(
            read_offset_entry(&k, &42u64.to_le_bytes()),
            Some(("grüp".into(), "nexus.inbound.v1".into(), 9, 42))
        );
        assert_eq!(
            read_offset_entry(&k[..k.len() - 1], &42u64.to_le_bytes()),
            None
        );
    }

    #[test]
    fn record_keys_sort_by_partition_then_offset() {
        let p = |t: u32, p: u32| {
            let mut prefix = [0; 8];
            prefix[..4].copy_from_slice(&t.to_be_bytes());
            prefix[4..].copy_from_slice(&p.to_be_bytes());
            prefix
        };
        let keys = [
            record_key(&p(1, 0), 255),
            record_key(&p(1, 0), 256),
            record_key(&p(1, 1), 0),
            record_key(&p(2, 0), 0),
        ];
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }
}
