//! The on-disk layout of the embedded log: segment files per partition, the topics file and
//! the group offsets log, with the frame format and the reads every caller shares.
//!
//! Layout of the bus directory:
//! - `topics.json`: name → partitions and retention; replaced atomically (temp file, fsync, rename).
//! - `log/<topic>-<partition>/<base offset, 20 digits>.log`: segments; a partition's records are
//!   dense from the first segment's base to the end of the last one. Only the last is written.
//! - `offsets.log`: appended (group, topic, partition, offset) entries, the latest wins;
//!   compacted on open and when it grows past [`OFFSETS_COMPACT_BYTES`].
//!
//! A frame is `len u32 | crc32(len, body) u32 | body`, little endian. A record's body is
//! `offset u64 | append time ms i64 | key len u32 | key | headers len u32 | headers | payload`,
//! the headers block as [`put_headers`] writes it (logs from before it hold JSON there).
//! Opening scans every segment into an in-memory index (offset → file position); a torn frame at
//! the end of the last segment (a crash mid-write) is cut off, anywhere else it is an error.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::storage;
use crate::bus::{BusError, Headers, Message};

/// Topics and their shapes.
pub(super) const TOPICS_FILE: &str = "topics.json";
/// Group offsets.
pub(super) const OFFSETS_FILE: &str = "offsets.log";
/// Segments live under this folder.
const LOG_DIR: &str = "log";
/// Frame header: length and CRC.
const HEADER: usize = 8;
/// A frame longer than this is garbage (records are bounded far below it by the edges).
const MAX_FRAME: u32 = 1 << 30;
/// Positions inside a segment are `u32`; a batch that would pass this is cut short.
pub(super) const MAX_SEGMENT: u64 = u32::MAX as u64;
/// Rewrite the offsets log once this many bytes were appended to it: commits are ~50 bytes and
/// come every batch, so this compacts every ~20k batches into a file of one entry per partition.
pub(super) const OFFSETS_COMPACT_BYTES: u64 = 1 << 20;

/// Committed offsets: (group, topic) → partition → next offset to consume.
pub(super) type OffsetMap = HashMap<(String, String), BTreeMap<u32, u64>>;

/// One topic as kept in `topics.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TopicFile {
    pub(super) partitions: u32,
    pub(super) retention_ms: Option<u64>,
}

pub(super) fn retention_to_ms(retention: Option<Duration>) -> Option<u64> {
    retention.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `name` in `dir` atomically: a reader (or a crash) sees the old or the new content.
pub(super) fn write_atomic(dir: &Path, name: &str, content: &[u8]) -> Result<(), BusError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(storage("creating a temp file"))?;
    f.write_all(content)
        .map_err(storage("writing a temp file"))?;
    f.sync_all().map_err(storage("syncing a temp file"))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(storage("renaming a temp file"))?;
    sync_dir(dir)
}

/// Makes file creations, renames and deletions in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), BusError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(storage("syncing a directory"))
}

/// Every topic of the bus directory.
pub(super) fn load_topics(dir: &Path) -> Result<BTreeMap<String, TopicFile>, BusError> {
    match std::fs::read(dir.join(TOPICS_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(storage("reading topics.json")),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(storage("reading topics.json")(e)),
    }
}

pub(super) fn save_topics(
    dir: &Path,
    topics: &BTreeMap<String, TopicFile>,
) -> Result<(), BusError> {
    let json = serde_json::to_vec_pretty(topics).map_err(storage("encoding topics.json"))?;
    write_atomic(dir, TOPICS_FILE, &json)
}

/// The folder of a partition. Topic names are escaped to `[A-Za-z0-9._-]` (`%XX` otherwise),
/// and the `-<partition>` suffix keeps `.` and `..` from naming a real folder.
pub(super) fn partition_dir(dir: &Path, topic: &str, partition: u32) -> PathBuf {
    let mut name = String::with_capacity(topic.len() + 4);
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    dir.join(LOG_DIR).join(format!("{name}-{partition}"))
}

/// Appends a frame around `body` (written by `fill`) to `buf`.
fn put_frame(buf: &mut Vec<u8>, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    fill(buf);
    let len = (buf.len() - start - HEADER) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(&buf[start + HEADER..]);
    buf[start + 4..start + HEADER].copy_from_slice(&crc.finalize().to_le_bytes());
}

/// The body of the frame at `pos` of `buf`, or `None` if it is torn or corrupt there.
fn frame_at(buf: &[u8], pos: usize) -> Option<&[u8]> {
    let header = buf.get(pos..pos + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?);
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if len > MAX_FRAME {
        return None;
    }
    let body = buf.get(pos + HEADER..pos + HEADER + len as usize)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(body);
    (h.finalize() == crc).then_some(body)
}

/// Reads little-endian fields off the front of a body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
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

/// First byte of a headers block in the binary form. Blocks written before it are JSON
/// (`[["name","value"],...]`, never starting with this byte) and are still read as such.
const BINARY_HEADERS: u8 = 0;

/// Bytes of a record's headers block: nothing without headers, else the marker and
/// `name len u32 | name | value len u32 | value` per header.
fn headers_size(headers: &Headers) -> usize {
    if headers.is_empty() {
        return 0;
    }
    1 + headers
        .iter()
        .map(|(n, v)| 8 + n.len() + v.len())
        .sum::<usize>()
}

fn put_headers(b: &mut Vec<u8>, headers: &Headers) {
    if headers.is_empty() {
        return;
    }
    b.push(BINARY_HEADERS);
    for (n, v) in headers {
        for s in [n, v] {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
    }
}

/// Reads a headers block of either form.
fn read_headers(block: &[u8]) -> Result<Headers, String> {
    match block.split_first() {
        None => Ok(Headers::new()),
        Some((&BINARY_HEADERS, rest)) => {
            let mut c = Cursor(rest);
            let mut headers = Headers::new();
            while !c.0.is_empty() {
                let (Some(n), Some(v)) = (c.string(), c.string()) else {
                    return Err("a header is cut short or not UTF-8".into());
                };
                headers.push((n, v));
            }
            Ok(headers)
        }
        Some(_) => serde_json::from_slice(block).map_err(|e| e.to_string()),
    }
}

/// Bytes of a record's frame, or `None` past the frame limit.
pub(super) fn record_size(key: &str, headers: &Headers, payload: &[u8]) -> Option<u64> {
    let body = 24 + key.len() + headers_size(headers) + payload.len();
    (body <= MAX_FRAME as usize).then_some((HEADER + body) as u64)
}

/// Appends one record frame to `buf`.
pub(super) fn put_record(
    buf: &mut Vec<u8>,
    offset: u64,
    ts: i64,
    key: &str,
    headers: &Headers,
    payload: &[u8],
) {
    put_frame(buf, |b| {
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&ts.to_le_bytes());
        b.extend_from_slice(&(key.len() as u32).to_le_bytes());
        b.extend_from_slice(key.as_bytes());
        b.extend_from_slice(&(headers_size(headers) as u32).to_le_bytes());
        put_headers(b, headers);
        b.extend_from_slice(payload);
    });
}

/// A record body's (offset, append time).
fn record_head(body: &[u8]) -> Option<(u64, i64)> {
    let mut c = Cursor(body);
    Some((c.u64()?, c.u64()? as i64))
}

/// One segment file: records from `base` on, `index[i]` the position of record `base + i`.
struct Segment {
    base: u64,
    file: Arc<File>,
    index: Vec<u32>,
    /// Bytes of whole frames (the file may hold more only while a batch is being written).
    len: u64,
    first_ts: Option<i64>,
    last_ts: Option<i64>,
    path: PathBuf,
}

impl Segment {
    fn end(&self) -> u64 {
        self.base + self.index.len() as u64
    }

    /// The byte range of records `from..to` (both inside this segment).
    fn span(&self, from: u64, to: u64) -> (u64, u64) {
        let pos = |o: u64| {
            self.index
                .get((o - self.base) as usize)
                .map_or(self.len, |&p| u64::from(p))
        };
        (pos(from), pos(to))
    }
}

/// A tail appended to the active segment by one writer batch; see [`PartLog::write`].
#[derive(Default)]
pub(super) struct Append {
    pub(super) buf: Vec<u8>,
    /// Position of each record inside `buf`.
    pub(super) positions: Vec<u32>,
    pub(super) first_ts: Option<i64>,
    pub(super) last_ts: i64,
}

/// The segments of one partition. The writer thread is the only one to change them; readers
/// copy what they need under the read lock and read the files outside it.
pub(super) struct PartLog {
    dir: PathBuf,
    segments: RwLock<Vec<Segment>>,
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn open_segment_file(path: &Path) -> Result<File, BusError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| BusError::Storage(format!("opening `{}`: {e}", path.display())))
}

impl PartLog {
    /// Opens (creating if needed) the partition folder and indexes its segments.
    pub(super) fn open(dir: PathBuf) -> Result<Self, BusError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| BusError::Storage(format!("creating `{}`: {e}", dir.display())))?;
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(storage("listing a partition"))? {
            let name = entry.map_err(storage("listing a partition"))?.file_name();
            let name = name.to_string_lossy();
            if let Some(base) = name
                .strip_suffix(".log")
                .filter(|b| b.len() == 20)
                .and_then(|b| b.parse::<u64>().ok())
            {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        if bases.is_empty() {
            bases.push(0);
        }
        let mut segments: Vec<Segment> = Vec::with_capacity(bases.len());
        let last = bases.len() - 1;
        for (i, base) in bases.into_iter().enumerate() {
            if let Some(prev) = segments.last() {
                if prev.end() != base {
                    return Err(BusError::Storage(format!(
                        "`{}`: segment {base} follows one ending at {}",
                        dir.display(),
                        prev.end()
                    )));
                }
            }
            segments.push(Self::scan(&segment_path(&dir, base), base, i == last)?);
        }
        sync_dir(&dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(Self {
            dir,
            segments: RwLock::new(segments),
        })
    }

    /// Indexes a segment; cuts a torn tail off the last one.
    fn scan(path: &Path, base: u64, last: bool) -> Result<Segment, BusError> {
        let file = open_segment_file(path)?;
        let bytes = std::fs::read(path)
            .map_err(|e| BusError::Storage(format!("reading `{}`: {e}", path.display())))?;
        let mut seg = Segment {
            base,
            file: Arc::new(file),
            index: Vec::new(),
            len: 0,
            first_ts: None,
            last_ts: None,
            path: path.to_path_buf(),
        };
        let mut pos = 0;
        while let Some(body) = frame_at(&bytes, pos) {
            match record_head(body) {
                Some((offset, ts)) if offset == seg.end() => {
                    seg.index.push(pos as u32);
                    seg.first_ts.get_or_insert(ts);
                    seg.last_ts = Some(ts);
                    pos += HEADER + body.len();
                }
                _ => break,
            }
        }
        seg.len = pos as u64;
        if pos < bytes.len() {
            if !last {
                return Err(BusError::Storage(format!(
                    "`{}` is corrupt at byte {pos} and is not the last segment",
                    path.display()
                )));
            }
            tracing::warn!(
                path = %path.display(),
                kept = pos,
                dropped = bytes.len() - pos,
                "embedded bus segment ends in a torn record (a crash mid-write); cutting it off"
            );
            seg.file
                .set_len(seg.len)
                .and_then(|()| seg.file.sync_data())
                .map_err(storage("truncating a torn segment"))?;
        }
        Ok(seg)
    }

    fn read_segs(&self) -> std::sync::RwLockReadGuard<'_, Vec<Segment>> {
        self.segments.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_segs(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Segment>> {
        self.segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// First offset kept.
    pub(super) fn low(&self) -> u64 {
        self.read_segs().first().map_or(0, |s| s.base)
    }

    /// Next offset to write.
    pub(super) fn high(&self) -> u64 {
        self.read_segs().last().map_or(0, Segment::end)
    }

    /// Append time of the newest record, if any is kept.
    pub(super) fn last_ts(&self) -> Option<i64> {
        self.read_segs().iter().rev().find_map(|s| s.last_ts)
    }

    /// Bytes and first append time of the segment being written.
    pub(super) fn active(&self) -> (u64, Option<i64>) {
        self.read_segs()
            .last()
            .map_or((0, None), |s| (s.len, s.first_ts))
    }

    /// Starts a new segment at the current end (the old one is then never written again).
    pub(super) fn roll(&self) -> Result<(), BusError> {
        let base = self.high();
        let path = segment_path(&self.dir, base);
        let file = open_segment_file(&path)?;
        sync_dir(&self.dir)?;
        self.write_segs().push(Segment {
            base,
            file: Arc::new(file),
            index: Vec::new(),
            len: 0,
            first_ts: None,
            last_ts: None,
            path,
        });
        Ok(())
    }

    /// Writes a batch's tail to the active segment and makes it durable (one write, one
    /// fdatasync). Readers do not see it until [`Self::publish`]; on failure the file is cut
    /// back so nothing of it survives.
    pub(super) fn write(&self, append: &Append) -> Result<(), BusError> {
        let (file, len) = {
            let segs = self.read_segs();
            let s = segs
                .last()
                .ok_or_else(|| BusError::Storage("partition without a segment".into()))?;
            (s.file.clone(), s.len)
        };
        let result = file
            .write_all_at(&append.buf, len)
            .and_then(|()| file.sync_data());
        if let Err(e) = result {
            self.undo(len);
            return Err(BusError::Storage(format!(
                "appending to `{}`: {e}",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Cuts the active segment back to what readers know (a batch written but not kept).
    pub(super) fn unwrite(&self) {
        let len = self.read_segs().last().map_or(0, |s| s.len);
        self.undo(len);
    }

    fn undo(&self, len: u64) {
        if let Some(s) = self.read_segs().last() {
            if let Err(e) = s.file.set_len(len) {
                tracing::error!(error = %e, dir = %self.dir.display(), "cutting back a failed append failed");
            }
        }
    }

    /// Makes a written tail readable.
    pub(super) fn publish(&self, append: Append) {
        let mut segs = self.write_segs();
        if let Some(s) = segs.last_mut() {
            let at = s.len as u32;
            s.index.extend(append.positions.iter().map(|p| at + p));
            s.len += append.buf.len() as u64;
            if s.first_ts.is_none() {
                s.first_ts = append.first_ts;
            }
            if append.first_ts.is_some() {
                s.last_ts = Some(append.last_ts);
            }
        }
    }

    /// Deletes the oldest segments whose newest record is older than `cutoff`, never the one
    /// being written; returns the new low offset if it moved.
    pub(super) fn expire(&self, cutoff: i64) -> Result<Option<u64>, BusError> {
        let removed: Vec<Segment> = {
            let mut segs = self.write_segs();
            let n = segs
                .iter()
                .take(segs.len().saturating_sub(1))
                .take_while(|s| !s.last_ts.is_some_and(|t| t >= cutoff))
                .count();
            segs.drain(..n).collect()
        };
        if removed.is_empty() {
            return Ok(None);
        }
        for s in &removed {
            // Readers holding the file still read it; the space goes with the last of them.
            std::fs::remove_file(&s.path).map_err(storage("deleting an expired segment"))?;
        }
        Ok(Some(self.low()))
    }

    /// Up to `max` records from `from` on, below `high` (what readers may see).
    pub(super) fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        high: u64,
    ) -> Result<Vec<Message>, BusError> {
        let mut out = Vec::new();
        let mut next = from;
        while out.len() < max && next < high {
            // The file and byte range of the next run of records, taken under the lock.
            let run = {
                let segs = self.read_segs();
                let i = segs.partition_point(|s| s.base <= next);
                let Some(s) = i.checked_sub(1).and_then(|i| segs.get(i)) else {
                    // Below low (expired): continue at the first kept record.
                    match segs.first() {
                        Some(s) if s.base > next => {
                            next = s.base;
                            continue;
                        }
                        _ => break,
                    }
                };
                let to = s.end().min(high).min(next + (max - out.len()) as u64);
                if to <= next {
                    break;
                }
                let (a, b) = s.span(next, to);
                let positions: Vec<u32> = s.index[(next - s.base) as usize..(to - s.base) as usize]
                    .iter()
                    .map(|&p| p - a as u32)
                    .collect();
                (s.file.clone(), a, b, positions)
            };
            let (file, a, b, positions) = run;
            let mut buf = vec![0; (b - a) as usize];
            file.read_exact_at(&mut buf, a)
                .map_err(storage("reading a segment"))?;
            let buf = Bytes::from(buf);
            for p in positions {
                let m = decode(&buf, p as usize, topic, partition).ok_or_else(|| {
                    BusError::Storage(format!(
                        "record {topic}/{partition}/{next} is corrupt on disk"
                    ))
                })??;
                next = m.offset + 1;
                out.push(m);
            }
        }
        Ok(out)
    }

    /// The first offset whose append time is at or after `ts_ms`, or the end. Append times are
    /// monotonic per partition (the writer takes max(previous, now)), so a binary search over
    /// the segments and then over a segment's records (reading each probed frame) works.
    pub(super) fn offset_for_time(&self, ts_ms: i64, high: u64) -> Result<u64, BusError> {
        // A few preads from the page cache: cheap enough to hold the lock over.
        let segs = self.read_segs();
        let Some(s) = segs.iter().find(|s| s.last_ts.is_some_and(|t| t >= ts_ms)) else {
            return Ok(high);
        };
        let (mut lo, mut hi) = (0, s.index.len());
        let mut head = [0u8; HEADER + 16];
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            s.file
                .read_exact_at(&mut head, u64::from(s.index[mid]))
                .map_err(storage("reading a segment"))?;
            let (_, ts) = record_head(&head[HEADER..])
                .ok_or_else(|| BusError::Storage("a record header is corrupt on disk".into()))?;
            if ts < ts_ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok((s.base + lo as u64).min(high))
    }
}

/// The message in the frame at `pos` of `buf` (`None` if the frame is corrupt).
fn decode(
    buf: &Bytes,
    pos: usize,
    topic: &str,
    partition: u32,
) -> Option<Result<Message, BusError>> {
    let body = frame_at(buf, pos)?;
    let start = pos + HEADER;
    let mut c = Cursor(body);
    let (offset, ts) = (c.u64()?, c.u64()? as i64);
    let key = c.string()?;
    let headers_len = c.u32()? as usize;
    let headers = match read_headers(c.take(headers_len)?) {
        Ok(h) => h,
        Err(e) => {
            return Some(Err(BusError::Storage(format!(
                "record {topic}/{partition}/{offset}: bad headers: {e}"
            ))))
        }
    };
    let payload_at = start + body.len() - c.0.len();
    Some(Ok(Message {
        topic: topic.to_string(),
        partition,
        offset,
        timestamp_ms: ts,
        key,
        payload: buf.slice(payload_at..start + body.len()),
        headers,
    }))
}

/// Appends one offset commit frame to `buf`.
pub(super) fn put_offset(buf: &mut Vec<u8>, group: &str, topic: &str, partition: u32, offset: u64) {
    put_frame(buf, |b| {
        b.extend_from_slice(&partition.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&(group.len() as u16).to_le_bytes());
        b.extend_from_slice(group.as_bytes());
        b.extend_from_slice(topic.as_bytes());
    });
}

/// The offsets log: committed offsets of every group, appended per writer batch.
pub(super) struct OffsetsLog {
    dir: PathBuf,
    file: File,
    /// Bytes appended since the last compaction.
    appended: u64,
}

impl OffsetsLog {
    /// Reads the log (a torn tail is ignored) and rewrites it compacted.
    pub(super) fn open(dir: &Path) -> Result<(Self, OffsetMap), BusError> {
        let path = dir.join(OFFSETS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(storage("reading offsets.log")(e)),
        };
        let mut map = OffsetMap::new();
        let mut pos = 0;
        while let Some(body) = frame_at(&bytes, pos) {
            pos += HEADER + body.len();
            let mut c = Cursor(body);
            let entry = (|| {
                let (partition, offset) = (c.u32()?, c.u64()?);
                let group_len = c.u16()? as usize;
                let group = std::str::from_utf8(c.take(group_len)?).ok()?;
                let topic = std::str::from_utf8(c.0).ok()?;
                Some((group.to_string(), topic.to_string(), partition, offset))
            })();
            let Some((group, topic, partition, offset)) = entry else {
                break;
            };
            map.entry((group, topic))
                .or_default()
                .insert(partition, offset);
        }
        if pos < bytes.len() {
            tracing::warn!(path = %path.display(), "embedded bus offsets log ends in a torn entry; ignoring it");
        }
        let log = Self {
            dir: dir.to_path_buf(),
            file: Self::rewrite(dir, &map)?,
            appended: 0,
        };
        Ok((log, map))
    }

    /// Replaces the log with one entry per partition.
    pub(super) fn compact(&mut self, map: &OffsetMap) -> Result<(), BusError> {
        self.file = Self::rewrite(&self.dir, map)?;
        self.appended = 0;
        Ok(())
    }

    /// Writes `map` as the whole log; returns it opened for appending.
    fn rewrite(dir: &Path, map: &OffsetMap) -> Result<File, BusError> {
        let mut buf = Vec::new();
        for ((group, topic), parts) in map {
            for (&p, &o) in parts {
                put_offset(&mut buf, group, topic, p, o);
            }
        }
        write_atomic(dir, OFFSETS_FILE, &buf)?;
        OpenOptions::new()
            .append(true)
            .open(dir.join(OFFSETS_FILE))
            .map_err(storage("opening offsets.log"))
    }

    /// Appends entries and makes them durable; cuts a failed append back.
    pub(super) fn append(&mut self, buf: &[u8]) -> Result<(), BusError> {
        let before = self
            .file
            .metadata()
            .map_err(storage("reading offsets.log"))?
            .len();
        if let Err(e) = self
            .file
            .write_all(buf)
            .and_then(|()| self.file.sync_data())
        {
            let _ = self.file.set_len(before);
            return Err(storage("appending to offsets.log")(e));
        }
        self.appended += buf.len() as u64;
        Ok(())
    }

    pub(super) fn needs_compaction(&self) -> bool {
        self.appended >= OFFSETS_COMPACT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_in_both_forms() {
        let hs: Headers = vec![
            ("b".into(), "2".into()),
            ("a".into(), "ünï\nx".into()),
            ("b".into(), String::new()),
        ];
        let mut block = Vec::new();
        put_headers(&mut block, &hs);
        assert_eq!(block.len(), headers_size(&hs));
        assert_eq!(read_headers(&block).unwrap(), hs);
        assert!(
            read_headers(&block[..block.len() - 1]).is_err(),
            "cut short"
        );
        // Logs written before the binary form hold JSON there, `[]` for no headers.
        assert_eq!(read_headers(&serde_json::to_vec(&hs).unwrap()).unwrap(), hs);
        assert_eq!(read_headers(b"[]").unwrap(), Headers::new());
        let mut none = Vec::new();
        put_headers(&mut none, &Headers::new());
        assert!(none.is_empty());
        assert_eq!(read_headers(&none).unwrap(), Headers::new());
    }

    #[test]
    fn a_record_written_with_json_headers_still_decodes() {
        let mut buf = Vec::new();
        put_frame(&mut buf, |b| {
            b.extend_from_slice(&7u64.to_le_bytes());
            b.extend_from_slice(&1_700_000_000_000i64.to_le_bytes());
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(b"k");
            let json = br#"[["nexus-event-type","MessageReceived"]]"#;
            b.extend_from_slice(&(json.len() as u32).to_le_bytes());
            b.extend_from_slice(json);
            b.extend_from_slice(b"payload");
        });
        let m = decode(&Bytes::from(buf), 0, "t", 0)
            .expect("a whole frame")
            .expect("a record");
        assert_eq!((m.offset, m.timestamp_ms), (7, 1_700_000_000_000));
        assert_eq!((m.key.as_str(), &m.payload[..]), ("k", &b"payload"[..]));
        assert_eq!(m.header("nexus-event-type"), Some("MessageReceived"));
    }
}
