//! Names and wire format of the JetStream backend: how topics, partitions, groups and members
//! map to streams, subjects, consumers and lease keys, and how a record's key and ordered
//! headers travel in NATS headers.

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use crate::bus::{BusError, Headers, Message, OutRecord};

/// Header carrying the record key (percent-escaped, see [`escape_value`]).
pub(super) const KEY_HEADER: &str = "nexus-bus-key";
/// Header listing the record's header names in publish order, space-separated: NATS keeps
/// headers in a hash map, and the bus contract keeps them in order. Sent only where the names
/// alone do not give that order (see `order_implied`).
pub(super) const ORDER_HEADER: &str = "nexus-bus-headers";

/// Topic names become subjects and (with `.` → `_`) stream and bucket names, so they are
/// restricted to what all three accept.
pub(super) fn validate_topic(topic: &str) -> Result<(), BusError> {
    let ok = !topic.is_empty()
        && topic.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(BusError::Config(format!(
            "topic `{topic}` cannot be a JetStream stream: use dot-separated tokens of [A-Za-z0-9_-]"
        )))
    }
}

/// Stream names cannot contain `.`: `nexus.inbound.v1` → `nexus_inbound_v1`. The mapping is
/// not injective (`a.b` and `a_b` meet); the stream's subjects tell which topic owns it.
pub(super) fn stream_name(topic: &str) -> String {
    topic.replace('.', "_")
}

/// The topic a stream belongs to if nexus's naming could have made it: the topic its
/// `nexus.topic` metadata names (`metadata_topic`; streams nexus created), else the one its
/// subjects name when each is `<topic>.<token>` of one topic (a stream made by hand for a
/// topic, wildcard subjects included); either way only if the stream's name is that topic's
/// [`stream_name`]. Any other stream (a key-value bucket's `KV_…`, another application's) is
/// not a topic.
pub(super) fn topic_of_stream(
    stream: &str,
    subjects: &[String],
    metadata_topic: Option<&str>,
) -> Option<String> {
    let topic = match metadata_topic {
        Some(topic) => topic,
        None => {
            let mut topics = subjects.iter().map(|s| s.rsplit_once('.').map(|(t, _)| t));
            let first = topics.next()??;
            if !topics.all(|t| t == Some(first)) {
                return None;
            }
            first
        }
    };
    (validate_topic(topic).is_ok() && stream_name(topic) == stream).then(|| topic.to_owned())
}

/// The subject of one partition: `<topic>.<partition>`.
pub(super) fn subject(topic: &str, partition: u32) -> String {
    format!("{topic}.{partition}")
}

/// The partition a stream subject names, if it is `<topic>.<n>`.
pub(super) fn partition_of_subject(topic: &str, subject: &str) -> Option<u32> {
    let rest = subject.strip_prefix(topic)?.strip_prefix('.')?;
    if rest.is_empty()
        || !rest.bytes().all(|b| b.is_ascii_digit())
        || (rest.len() > 1 && rest.starts_with('0'))
    {
        return None;
    }
    rest.parse().ok()
}

/// The lease bucket of a stream (one per topic, shared by every group on it).
pub(super) fn lease_bucket(stream: &str) -> String {
    format!("nexus_leases_{stream}")
}

/// The group-state bucket of a stream (one per topic, shared by every group on it): what must
/// outlive the members, which the lease bucket's `max_age` would expire.
pub(super) fn groups_bucket(stream: &str) -> String {
    format!("nexus_groups_{stream}")
}

/// The key of a group's restart mark on one partition, in the group-state bucket.
pub(super) fn restart_key(group_key: &str, partition: u32) -> String {
    format!("{group_key}.restart.{partition}")
}

/// The key of a group's join record on a topic, in the group-state bucket.
pub(super) fn joined_key(group_key: &str) -> String {
    format!("{group_key}.joined")
}

/// A group name made safe for KV keys and consumer names: `[A-Za-z0-9_-]` stay, every other
/// byte becomes `=XX`, so distinct groups never meet.
pub(super) fn group_key(group: &str) -> Result<String, BusError> {
    if group.is_empty() {
        return Err(BusError::Config("consumer group name is empty".into()));
    }
    let mut out = String::with_capacity(group.len());
    for b in group.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    Ok(out)
}

/// The durable consumer of a group on one partition. The partition follows the last `_`, so
/// names stay unique although group keys may contain `_`.
pub(super) fn consumer_name(group_key: &str, partition: u32) -> String {
    format!("{group_key}_{partition}")
}

/// The KV key leasing a partition to one member of a group.
pub(super) fn lease_key(group_key: &str, partition: u32) -> String {
    format!("{group_key}.p.{partition}")
}

/// The KV key of a member's heartbeat.
pub(super) fn member_key(group_key: &str, member: &str) -> String {
    format!("{group_key}.m.{member}")
}

/// The bucket-stream subject filter matching every member heartbeat of a group.
pub(super) fn members_filter(bucket: &str, group_key: &str) -> String {
    format!("$KV.{bucket}.{group_key}.m.*")
}

/// The bucket-stream subject of one KV key.
pub(super) fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// NATS header values cannot hold CR/LF and lose surrounding whitespace, so those (and `%`
/// itself, and other control characters) are percent-escaped; plain values pass unchanged, so
/// other tools still read them.
pub(super) fn escape_value(value: &str) -> String {
    // Most values (ids, event types, trace contexts) are printable ASCII: copied as they are.
    let plain = value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'%')
        && !value.starts_with(' ')
        && !value.ends_with(' ');
    if plain {
        return value.to_owned();
    }
    let lead = value.len() - value.trim_start().len();
    let trail_from = value.trim_end().len();
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.char_indices() {
        let edge = i < lead || i >= trail_from;
        if c == '%' || c.is_control() || (edge && c.is_whitespace()) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reverses [`escape_value`]; a `%` not followed by two hex digits is kept as is.
pub(super) fn unescape_value(value: &str) -> String {
    if !value.contains('%') {
        return value.to_string();
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a record's headers come back in publish order from the name-sorted reading that
/// [`decode_headers`] falls back to, so the order header can be left out: names unique and in
/// ascending order (as nexus's own `nexus-event-type`, `traceparent` are).
fn order_implied(headers: &Headers) -> bool {
    headers.windows(2).all(|w| w[0].0 < w[1].0)
}

/// NATS's own headers (`Nats-Msg-Id`, ...): the server acts on them (deduplication, expected
/// sequences), so records may not carry them, and the sorted reading leaves them out.
fn is_nats_own(name: &str) -> bool {
    name.as_bytes()
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"nats-"))
}

/// The NATS headers of a record: its key, its headers, and their order (when the names alone
/// do not give it, see [`order_implied`]).
pub(super) fn encode_headers(record: &OutRecord) -> Result<HeaderMap, BusError> {
    let mut map = HeaderMap::new();
    map.insert(KEY_HEADER, HeaderValue::from(escape_value(&record.key)));
    if record.headers.is_empty() {
        return Ok(map);
    }
    for (name, value) in &record.headers {
        if name == KEY_HEADER || name == ORDER_HEADER || is_nats_own(name) {
            return Err(BusError::Config(format!(
                "header `{name}` is reserved by the JetStream bus"
            )));
        }
        if name.is_empty() {
            return Err(BusError::Config("a header name is empty".into()));
        }
        let header = HeaderName::from_str(name).map_err(|_| {
            BusError::Config(format!(
                "header name `{name}` is not valid on NATS (visible ASCII, no `:`)"
            ))
        })?;
        map.append(header, HeaderValue::from(escape_value(value)));
    }
    if !order_implied(&record.headers) {
        let mut order = String::new();
        for (name, _) in &record.headers {
            if !order.is_empty() {
                order.push(' ');
            }
            order.push_str(name);
        }
        map.insert(ORDER_HEADER, HeaderValue::from(order));
    }
    Ok(map)
}

/// The bytes `headers` take in a message as the server counts them against `max_payload`:
/// `NATS/1.0`, one `name: value` line per value, a blank line.
pub(super) fn headers_wire_len(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + 2
}

/// Names no record's headers come back with: this codec's own and NATS's. Another tool's
/// record that lists them would otherwise be refused when copied on (a dead letter that can
/// never be written holds its key's lane).
fn is_reserved(name: &str) -> bool {
    name == KEY_HEADER || name == ORDER_HEADER || is_nats_own(name)
}

/// The record key and headers back from NATS headers. Without the order header (a record whose
/// names give the order, or one published by another tool) every header but NATS's own comes
/// back, sorted by name. NATS's own never come back: a record copied on (dead-lettered,
/// replayed) could not be published with them.
pub(super) fn decode_headers(map: Option<&HeaderMap>) -> (String, Headers) {
    let Some(map) = map else {
        return (String::new(), Vec::new());
    };
    let key = map
        .get(KEY_HEADER)
        .map(|v| unescape_value(v.as_str()))
        .unwrap_or_default();
    let mut headers = Vec::new();
    match map.get(ORDER_HEADER) {
        Some(order) => {
            // The n-th occurrence of a name takes that name's n-th value (a record has a few
            // headers: counting the earlier ones beats a map).
            let names: Vec<&str> = order
                .as_str()
                .split(' ')
                .filter(|n| !n.is_empty() && !is_reserved(n))
                .collect();
            for (i, name) in names.iter().enumerate() {
                let n = names[..i].iter().filter(|earlier| *earlier == name).count();
                if let Some(v) = map.get_all(*name).nth(n) {
                    headers.push((name.to_string(), unescape_value(v.as_str())));
                }
            }
        }
        None => {
            let mut names: Vec<(&str, &Vec<HeaderValue>)> = map
                .iter()
                .map(|(n, v)| (AsRef::<str>::as_ref(n), v))
                .filter(|(n, _)| !is_reserved(n))
                .collect();
            names.sort_by(|a, b| a.0.cmp(b.0));
            for (name, values) in names {
                for v in values {
                    headers.push((name.to_string(), unescape_value(v.as_str())));
                }
            }
        }
    }
    (key, headers)
}

/// A bus message from a stream record. Offsets are stream sequences minus one, so a topic's
/// first record has offset 0 as on the other backends.
pub(super) fn message(
    topic: &str,
    partition: u32,
    sequence: u64,
    timestamp_ms: i64,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Message {
    let (key, headers) = decode_headers(headers);
    Message {
        topic: topic.to_string(),
        partition,
        offset: sequence.saturating_sub(1),
        timestamp_ms,
        key,
        payload,
        headers,
    }
}
