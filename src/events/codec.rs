//! Single-object encoding of events: `C3 01`, the writer schema's CRC-64-AVRO fingerprint
//! (8 bytes, little-endian), then the Avro binary body. Decoding resolves to the latest version.
//!
//! Writers use the oldest version that carries the event's body (every field added since holds
//! its default; else the latest); readers accept any registered version and see it as the
//! latest (fields added since take their defaults). The registry is compiled in, so a reader
//! built before a version existed dead-letters an event that needs it as an unknown
//! fingerprint: roll out readers before writers (charts/operations.md, "With a schema change").

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value};
use thiserror::Error;
use uuid::Uuid;

use super::body::EventBody;
use super::json::{self, Out, Path};
use super::node::{Node, Plan, RecordNode, RecordPlan, Step};
use super::registry::Registry;

/// The two marker bytes that open every single-object payload.
pub const MARKER: [u8; 2] = [0xC3, 0x01];

/// Marker plus fingerprint.
pub const HEADER_LEN: usize = 10;

/// The common envelope every event carries (schemas/envelope.avsc).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub event_id: Uuid,
    /// Short event type name, e.g. `MessageReceived`.
    pub event_type: String,
    pub tenant_id: String,
    /// The partition key.
    pub conversation_id: String,
    pub occurred_at_ms: i64,
    /// W3C traceparent of the producing request.
    pub traceparent: Option<String>,
    /// Which component produced it, e.g. `edge`, `worker/conversation`.
    pub producer: String,
}

/// An event: the envelope plus the type's own fields as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub envelope: Envelope,
    pub body: EventBody,
}

#[derive(Debug, Error)]
pub enum EncodeError {
    #[error("unknown event type `{0}`")]
    UnknownEventType(String),
    /// `path` names the field: `body.contact.email_address`, `body.media_ids[2]`, `tenant_id`.
    #[error("field `{path}`: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("not an Avro single-object payload")]
    NotSingleObject,
    #[error("unknown schema fingerprint {0:016x}")]
    UnknownFingerprint(u64),
    #[error("undecodable body: {0}")]
    Body(String),
}

impl DecodeError {
    /// Machine-readable reason, used in dead-letter headers and metric labels.
    pub fn reason_code(&self) -> &'static str {
        match self {
            DecodeError::NotSingleObject => "not_single_object",
            DecodeError::UnknownFingerprint(_) => "unknown_fingerprint",
            DecodeError::Body(_) => "undecodable_body",
        }
    }
}

/// Encodes with the built-in registry, using the latest version of `envelope.event_type`.
pub fn encode(event: &Event) -> Result<Vec<u8>, EncodeError> {
    Registry::builtin().encode(event)
}

/// Decodes with the built-in registry; the result is shaped as the latest version of its type.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    Registry::builtin().decode(bytes)
}

/// [`decode`] for a delivered payload, with the body decoded on first read: the envelope is
/// read now and the body's bytes are checked now (a payload that would not decode fails here,
/// with the same error), but its JSON map is built only if a handler reads it.
pub fn decode_lazy(payload: &Bytes) -> Result<Event, DecodeError> {
    Registry::builtin().decode_lazy(payload)
}

/// The fingerprint a payload names, if it is a single-object payload (for logs and DLQ headers).
pub fn fingerprint_of(bytes: &[u8]) -> Option<u64> {
    let header = bytes.get(..HEADER_LEN)?;
    if header[..2] != MARKER {
        return None;
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&header[2..]);
    Some(u64::from_le_bytes(fp))
}

impl Registry {
    /// Encodes an event with this registry (see [`encode`]).
    pub fn encode(&self, event: &Event) -> Result<Vec<u8>, EncodeError> {
        // Most events fit (a chat line with its envelope and trace context is 220-360 bytes):
        // one allocation, no copy while growing.
        let mut out = Vec::with_capacity(512);
        self.encode_into(event, &mut out)?;
        Ok(out)
    }

    /// Appends the encoded event to `out` (reuse one buffer on hot paths). On error `out` may
    /// hold a partial payload after its original length.
    pub fn encode_into(&self, event: &Event, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let (schema, left_out) = self
            .writer_for(&event.envelope.event_type, &event.body)
            .ok_or_else(|| EncodeError::UnknownEventType(event.envelope.event_type.clone()))?;
        out.extend_from_slice(&MARKER);
        out.extend_from_slice(&schema.fingerprint.to_le_bytes());
        let record = &schema.node;
        let env = match record.fields.first().map(|f| &f.node) {
            Some(Node::Record(env)) => env,
            // The registry only admits schemas whose first field is the envelope record.
            _ => return Err(invalid("envelope", "schema has no envelope")),
        };
        write_envelope(env, &event.envelope, out)?;
        // Keys of the fields `left_out` hold their defaults (see `writer_for`): not written.
        let body = &Path::Root("body");
        json::write_record_fields(record, 1, &event.body, body, out, left_out)
    }

    /// Decodes a payload with this registry (see [`decode`]).
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, DecodeError> {
        let (envelope, fields, _) = self.read_payload::<Value>(bytes)?;
        Ok(Event {
            envelope,
            body: fields.into_iter().collect::<Map<_, _>>().into(),
        })
    }

    /// Decodes a delivered payload (see [`decode_lazy`]).
    pub fn decode_lazy(&self, payload: &Bytes) -> Result<Event, DecodeError> {
        let (envelope, (), plan) = self.read_payload::<()>(payload)?;
        Ok(Event {
            envelope,
            body: EventBody::lazy(payload.clone(), plan.clone()),
        })
    }

    /// Reads the envelope and the body fields as `O` (`()` checks them only), and checks what
    /// every event must satisfy: a known fingerprint, no trailing bytes, an envelope whose type
    /// is the schema's.
    fn read_payload<O: Out>(
        &self,
        bytes: &[u8],
    ) -> Result<(Envelope, O::Obj, &Arc<RecordPlan>), DecodeError> {
        let fingerprint = fingerprint_of(bytes).ok_or(DecodeError::NotSingleObject)?;
        let schema = self
            .by_fingerprint(fingerprint)
            .ok_or(DecodeError::UnknownFingerprint(fingerprint))?;
        let plan = schema
            .to_latest
            .as_ref()
            .map_err(|e| DecodeError::Body(e.clone()))?;
        // The registry admits only record schemas, and a record resolves to a record plan.
        let Plan::Record(plan) = plan else {
            return Err(DecodeError::Body("the event schema is not a record".into()));
        };
        let mut body = &bytes[HEADER_LEN..];
        let (envelope, fields) =
            read_event::<O>(plan, &mut body, true).map_err(DecodeError::Body)?;
        if !body.is_empty() {
            return Err(DecodeError::Body(format!("{} trailing bytes", body.len())));
        }
        let envelope = match envelope {
            Some(Some(env)) => env.into_envelope().map_err(DecodeError::Body)?,
            _ => return Err(DecodeError::Body("no envelope".into())),
        };
        if envelope.event_type != schema.event_type {
            return Err(DecodeError::Body(format!(
                "envelope says {} but the schema is {}",
                envelope.event_type, schema.event_type
            )));
        }
        Ok((envelope, fields, plan))
    }
}

/// The body fields of a record checked by [`Registry::decode_lazy`] (the envelope is skipped).
pub(crate) fn read_body(plan: &RecordPlan, buf: &mut &[u8]) -> Result<Map<String, Value>, String> {
    let (_, fields) = read_event::<Value>(plan, buf, false)?;
    Ok(fields.into_iter().collect())
}

impl Event {
    /// A new event happening now, with a fresh UUID v7 id and no trace context.
    pub fn new(
        event_type: impl Into<String>,
        tenant_id: impl Into<String>,
        conversation_id: impl Into<String>,
        producer: impl Into<String>,
        body: Map<String, Value>,
    ) -> Event {
        Event {
            envelope: Envelope {
                event_id: Uuid::now_v7(),
                event_type: event_type.into(),
                tenant_id: tenant_id.into(),
                conversation_id: conversation_id.into(),
                occurred_at_ms: now_ms(),
                traceparent: None,
                producer: producer.into(),
            },
            body: body.into(),
        }
    }

    /// Sets the W3C traceparent; a value that is not one is dropped (W3C: ignore an invalid
    /// traceparent), since it travels on into HTTP headers of peer calls.
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Event {
        let traceparent = traceparent.into();
        self.envelope.traceparent = is_traceparent(&traceparent).then_some(traceparent);
        self
    }

    /// The event from the ingest endpoint's JSON: `{"event_type", "tenant_id",
    /// "conversation_id", "event_id"?, "occurred_at"? (ms or RFC 3339), "traceparent"?,
    /// "producer"? (default `ingest`), "body"? (default `{}`)}`. The event type must be known to
    /// the built-in registry; the body is checked against its schema by [`encode`].
    pub fn from_json(value: &Value) -> Result<Event, EncodeError> {
        Event::from_json_owned(value.clone())
    }

    /// [`Event::from_json`] taking ownership, which saves copying the body.
    pub fn from_json_owned(value: Value) -> Result<Event, EncodeError> {
        let Value::Object(mut m) = value else {
            return Err(invalid("", "expected a JSON object"));
        };
        let event_type = required_string(&mut m, "event_type")?;
        if Registry::builtin().latest(&event_type).is_none() {
            return Err(EncodeError::UnknownEventType(event_type));
        }
        let tenant_id = required_string(&mut m, "tenant_id")?;
        let conversation_id = required_string(&mut m, "conversation_id")?;
        let event_id = match m.remove("event_id") {
            None | Some(Value::Null) => Uuid::now_v7(),
            Some(Value::String(s)) => Uuid::parse_str(&s)
                .map_err(|e| invalid("event_id", format!("expected a UUID: {e}")))?,
            Some(_) => return Err(invalid("event_id", "expected a UUID string")),
        };
        let occurred_at_ms = match m.remove("occurred_at") {
            None | Some(Value::Null) => now_ms(),
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| invalid("occurred_at", "expected milliseconds since the epoch"))?,
            Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(&s)
                .map_err(|e| {
                    invalid(
                        "occurred_at",
                        format!("expected an RFC 3339 timestamp: {e}"),
                    )
                })?
                .timestamp_millis(),
            Some(_) => {
                return Err(invalid(
                    "occurred_at",
                    "expected milliseconds or an RFC 3339 string",
                ))
            }
        };
        let traceparent = match m.remove("traceparent") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if is_traceparent(&s) => Some(s),
            Some(_) => {
                return Err(invalid(
                    "traceparent",
                    "expected a W3C traceparent `00-<32 hex>-<16 hex>-<2 hex>`",
                ))
            }
        };
        let producer = match m.remove("producer") {
            None | Some(Value::Null) => "ingest".to_owned(),
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(_) => return Err(invalid("producer", "expected a non-empty string")),
        };
        let body = match m.remove("body") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(b)) => b,
            Some(_) => return Err(invalid("body", "expected an object")),
        };
        if let Some(k) = m.keys().next() {
            return Err(invalid(k, "unknown field"));
        }
        Ok(Event {
            envelope: Envelope {
                event_id,
                event_type,
                tenant_id,
                conversation_id,
                occurred_at_ms,
                traceparent,
                producer,
            },
            body: body.into(),
        })
    }

    /// The event as the ingest JSON that [`Event::from_json`] reads.
    pub fn to_json(&self) -> Value {
        let e = &self.envelope;
        serde_json::json!({
            "event_type": e.event_type,
            "tenant_id": e.tenant_id,
            "conversation_id": e.conversation_id,
            "event_id": e.event_id.to_string(),
            "occurred_at": e.occurred_at_ms,
            "traceparent": e.traceparent,
            "producer": e.producer,
            "body": self.body,
        })
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn invalid(path: &str, message: impl Into<String>) -> EncodeError {
    EncodeError::Invalid {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn required_string(m: &mut Map<String, Value>, key: &str) -> Result<String, EncodeError> {
    match m.remove(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(invalid(key, "must not be empty")),
        Some(_) => Err(invalid(key, "expected a string")),
        None => Err(invalid(key, "missing required field")),
    }
}

/// `version-traceid-parentid-flags`, lower-case hex, ids not all zero, per W3C Trace Context.
/// A later version's extra fields are taken only as lower-case hex too: the value goes into
/// HTTP headers of peer calls, where a control character would fail every call.
///
/// Checked on every consumed event, so by position (the parts have fixed lengths) rather than
/// by splitting.
pub fn is_traceparent(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 55 || b.len() > 512 {
        return false;
    }
    // A fold, not `all`: without an early exit the compiler checks many bytes at a time.
    let hex = |part: &[u8]| {
        part.iter()
            .fold(true, |ok, c| ok & matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |part: &[u8]| part.iter().any(|&c| c != b'0');
    let (version, trace_id, parent_id, flags) = (&b[..2], &b[3..35], &b[36..52], &b[53..55]);
    let more_fields = match &b[55..] {
        [] => true,
        // Only a later version has more, each after a hyphen.
        [b'-', rest @ ..] => {
            version != b"00"
                && rest
                    .iter()
                    .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f' | b'-'))
        }
        _ => false,
    };
    b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(version)
        && version != b"ff"
        && hex(trace_id)
        && hex(parent_id)
        && hex(flags)
        && nonzero(trace_id)
        && nonzero(parent_id)
        && more_fields
}

/// Writes the envelope straight from the struct, guided by the envelope schema (no JSON
/// detour on the hot path). Fields the struct lacks take their schema defaults.
fn write_envelope(env: &RecordNode, e: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    for f in &env.fields {
        match (f.name.as_str(), &f.node) {
            ("event_id", Node::Uuid | Node::String) => {
                let mut buf = Uuid::encode_buffer();
                json::write_bytes(
                    e.event_id.hyphenated().encode_lower(&mut buf).as_bytes(),
                    out,
                );
            }
            ("event_type", Node::String) => json::write_bytes(e.event_type.as_bytes(), out),
            ("tenant_id", Node::String) => json::write_bytes(e.tenant_id.as_bytes(), out),
            ("conversation_id", Node::String) => {
                json::write_bytes(e.conversation_id.as_bytes(), out)
            }
            ("producer", Node::String) => json::write_bytes(e.producer.as_bytes(), out),
            ("occurred_at", Node::TimestampMillis | Node::Long) => {
                json::write_long(e.occurred_at_ms, out)
            }
            ("traceparent", Node::Union(branches)) => {
                let want_null = e.traceparent.is_none();
                let i = branches
                    .iter()
                    .position(|b| {
                        matches!((b, want_null), (Node::Null, true) | (Node::String, false))
                    })
                    .ok_or_else(|| {
                        invalid("envelope.traceparent", "schema cannot hold this value")
                    })?;
                json::write_long(i as i64, out);
                if let Some(t) = &e.traceparent {
                    json::write_bytes(t.as_bytes(), out);
                }
            }
            (name, _) => match &f.default {
                Some((_, bytes)) => out.extend_from_slice(bytes),
                None => {
                    return Err(invalid(
                        &format!("envelope.{name}"),
                        "envelope field unknown to nexus",
                    ))
                }
            },
        }
    }
    Ok(())
}

/// `None` = no `envelope` field; `Some(None)` = an `envelope` that is not a record.
type EnvelopeSlot<'a> = Option<Option<RawEnvelope<'a>>>;

/// Reads a whole event record: the `envelope` field into a [`RawEnvelope`] (only checked when
/// `want_envelope` is false), every other field into the body as `O`. Same result as reading
/// the record as a map and removing `envelope` (a later duplicate name wins), without building
/// the envelope's map.
fn read_event<'a, O: Out>(
    r: &RecordPlan,
    buf: &mut &'a [u8],
    want_envelope: bool,
) -> Result<(EnvelopeSlot<'a>, O::Obj), String> {
    let mut envelope = None;
    let mut fields = O::obj(r.steps.len() + r.defaults.len());
    for step in &r.steps {
        match step {
            Step::Read(name, p) if name == "envelope" => match p {
                _ if !want_envelope => json::read::<()>(p, buf)?,
                Plan::Record(env) => envelope = Some(Some(RawEnvelope::read(env, buf)?)),
                _ => envelope = Some(RawEnvelope::from_value(json::read(p, buf)?)),
            },
            Step::Read(name, p) => O::insert(&mut fields, name, json::read(p, buf)?),
            Step::Skip(node) => json::skip(node, buf)?,
        }
    }
    for (name, d) in &r.defaults {
        if name != "envelope" {
            O::insert(&mut fields, name, O::default(d));
        } else if want_envelope {
            envelope = Some(RawEnvelope::from_value(d.clone()));
        }
    }
    Ok((envelope, fields))
}

/// An envelope field as read: the common shapes borrowed from the payload (no allocation
/// until the [`Envelope`] is built), anything else (a reader default, a resolved type) as JSON.
enum Raw<'a> {
    Str(&'a str),
    /// A `uuid` field's text that parses (what nexus writes), parsed once.
    Uuid(Uuid),
    Long(i64),
    Null,
    /// Boxed: rare, and it would double the size of every field read.
    Json(Box<Value>),
}

impl<'a> Raw<'a> {
    /// Reads one value with `plan`, borrowing strings; the same checks as [`json::read`], but
    /// for a uuid's text that does not parse, which fails where it is parsed (`event_id`, the
    /// envelope's only one), after the other fields' checks.
    fn read(plan: &Plan, buf: &mut &'a [u8]) -> Result<Raw<'a>, String> {
        Ok(match plan {
            Plan::Same(Node::String) => Raw::Str(json::read_str(buf)?),
            Plan::Same(Node::Uuid) => {
                let mut text = *buf;
                match json::read_uuid(buf) {
                    Ok(u) => Raw::Uuid(u),
                    Err(_) => Raw::Str(json::read_str(&mut text)?),
                }
            }
            Plan::Same(Node::Long | Node::TimestampMillis) => Raw::Long(json::read_long(buf)?),
            Plan::Same(Node::Null) => Raw::Null,
            Plan::WriterUnion(branches) => {
                let i = json::read_long(buf)?;
                let branch = usize::try_from(i)
                    .ok()
                    .and_then(|i| branches.get(i))
                    .ok_or_else(|| format!("union index {i} out of range"))?;
                Raw::read(branch.as_ref().map_err(Clone::clone)?, buf)?
            }
            _ => Raw::Json(Box::new(json::read(plan, buf)?)),
        })
    }

    fn string(self, k: &str) -> Result<String, String> {
        match self {
            Raw::Str(s) => Ok(s.to_owned()),
            Raw::Uuid(u) => Ok(u.hyphenated().to_string()),
            Raw::Json(v) => match *v {
                Value::String(s) => Ok(s),
                _ => Err(format!("envelope.{k} is not a string")),
            },
            _ => Err(format!("envelope.{k} is not a string")),
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Raw::Str(s) => Some(s),
            Raw::Json(v) => v.as_str(),
            _ => None,
        }
    }
}

/// The envelope fields as read, before their types are checked (in [`RawEnvelope::into_envelope`],
/// after the whole body has been read, so errors come in the same order as before).
#[derive(Default)]
struct RawEnvelope<'a> {
    event_id: Option<Raw<'a>>,
    event_type: Option<Raw<'a>>,
    tenant_id: Option<Raw<'a>>,
    conversation_id: Option<Raw<'a>>,
    occurred_at: Option<Raw<'a>>,
    traceparent: Option<Raw<'a>>,
    producer: Option<Raw<'a>>,
}

impl<'a> RawEnvelope<'a> {
    /// The slot for a reader envelope field; `None` for fields [`Envelope`] does not carry.
    fn slot(&mut self, name: &str) -> Option<&mut Option<Raw<'a>>> {
        Some(match name {
            "event_id" => &mut self.event_id,
            "event_type" => &mut self.event_type,
            "tenant_id" => &mut self.tenant_id,
            "conversation_id" => &mut self.conversation_id,
            "occurred_at" => &mut self.occurred_at,
            "traceparent" => &mut self.traceparent,
            "producer" => &mut self.producer,
            _ => return None,
        })
    }

    fn read(r: &RecordPlan, buf: &mut &'a [u8]) -> Result<RawEnvelope<'a>, String> {
        let mut env = RawEnvelope::default();
        for step in &r.steps {
            match step {
                Step::Read(name, p) => {
                    let v = Raw::read(p, buf)?;
                    if let Some(slot) = env.slot(name) {
                        *slot = Some(v);
                    }
                }
                Step::Skip(node) => json::skip(node, buf)?,
            }
        }
        for (name, d) in &r.defaults {
            if let Some(slot) = env.slot(name) {
                *slot = Some(Raw::Json(Box::new(d.clone())));
            }
        }
        Ok(env)
    }

    /// `None` unless `v` is an object.
    fn from_value(v: Value) -> Option<RawEnvelope<'a>> {
        let Value::Object(m) = v else { return None };
        let mut env = RawEnvelope::default();
        for (k, v) in m {
            if let Some(slot) = env.slot(&k) {
                *slot = Some(Raw::Json(Box::new(v)));
            }
        }
        Some(env)
    }

    fn into_envelope(self) -> Result<Envelope, String> {
        fn string(k: &str, v: Option<Raw<'_>>) -> Result<String, String> {
            v.ok_or_else(|| format!("envelope.{k} is not a string"))?
                .string(k)
        }
        // Parsed already (`Ok`) when the text of a uuid field parsed; else the text (`Err`).
        let event_id = match &self.event_id {
            Some(Raw::Uuid(u)) => Ok(*u),
            Some(v) => Err(v.str().ok_or("envelope.event_id is not a string")?),
            None => return Err("envelope.event_id is not a string".into()),
        };
        // Checked in the order the fields were always checked: strings first, then the id.
        let event_type = string("event_type", self.event_type)?;
        let tenant_id = string("tenant_id", self.tenant_id)?;
        let conversation_id = string("conversation_id", self.conversation_id)?;
        let producer = string("producer", self.producer)?;
        let event_id = match event_id {
            Ok(u) => u,
            Err(text) => Uuid::parse_str(text).map_err(|e| format!("envelope.event_id: {e}"))?,
        };
        let occurred_at_ms = match self.occurred_at {
            Some(Raw::Long(i)) => Some(i),
            Some(Raw::Json(v)) => v.as_i64(),
            _ => None,
        }
        .ok_or("envelope.occurred_at is not a number")?;
        let traceparent = match self.traceparent {
            None | Some(Raw::Null) => None,
            Some(Raw::Json(v)) if v.is_null() => None,
            // Another producer's invalid value is ignored (W3C), not carried into the
            // `traceparent` header of a peer call, where a control character fails the call.
            Some(v) => Some(
                v.string("traceparent")
                    .map_err(|_| "envelope.traceparent is not a string".to_string())?,
            )
            .filter(|t| is_traceparent(t)),
        };
        Ok(Envelope {
            event_id,
            event_type,
            tenant_id,
            conversation_id,
            occurred_at_ms,
            traceparent,
            producer,
        })
    }
}

impl Registry {
    /// An example event of the latest version of `event_type` with every field set to a
    /// plausible value (optional fields included): for documentation, load generators and tests.
    pub fn example(&self, event_type: &str) -> Option<Event> {
        let schema = self.latest(event_type)?;
        let mut body = Map::new();
        for f in schema.node.fields.iter().skip(1) {
            body.insert(f.name.clone(), example_value(&f.name, &f.node));
        }
        let mut event = Event::new(
            event_type,
            "tenant-acme",
            Uuid::now_v7().to_string(),
            "edge/chat",
            body,
        );
        event.envelope.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        Some(event)
    }
}

fn example_value(name: &str, node: &Node) -> Value {
    match node {
        Node::Null => Value::Null,
        Node::Boolean => Value::Bool(true),
        Node::Int if name.contains("status") => 200.into(),
        Node::Int => 3.into(),
        Node::Long if name.contains("position") => 7.into(),
        Node::Long => 1250.into(),
        Node::Float | Node::Double => 1.5.into(),
        Node::TimestampMillis => now_ms().into(),
        Node::Uuid => Uuid::now_v7().to_string().into(),
        Node::Bytes => "aGVsbG8=".into(),
        Node::Fixed(n) => json::base64_encode(&vec![7u8; *n]).into(),
        Node::String => {
            let s = if name.contains("email") {
                "ada@example.com".to_owned()
            } else if name.contains("phone") || name == "recipient" || name == "sender" {
                "+15551234567".to_owned()
            } else if name.contains("name") {
                "Ada".to_owned()
            } else if [
                "text",
                "preview",
                "note",
                "first_message",
                "subject",
                "error",
            ]
            .contains(&name)
            {
                "Hello, I need help with order 1234 — it has not arrived 📦".to_owned()
            } else if name.contains("uri") {
                "https://nexus.example.com/interactions/8f2c".to_owned()
            } else {
                format!("{name}-8f2c")
            };
            Value::String(s)
        }
        Node::Enum(e) => e
            .symbols
            .iter()
            .find(|s| *s != "UNKNOWN")
            .or_else(|| e.symbols.first())
            .map_or(Value::Null, |s| Value::String(s.clone())),
        Node::Array(items) => {
            Value::Array(vec![example_value(name, items), example_value(name, items)])
        }
        Node::Map(values) => {
            let mut m = Map::new();
            m.insert("order_id".into(), example_value(name, values));
            m.insert("vip".into(), example_value(name, values));
            Value::Object(m)
        }
        Node::Union(branches) => branches
            .iter()
            .find(|b| !matches!(b, Node::Null))
            .map_or(Value::Null, |b| example_value(name, b)),
        Node::Record(r) => Value::Object(
            r.fields
                .iter()
                .map(|f| (f.name.clone(), example_value(&f.name, &f.node)))
                .collect(),
        ),
    }
}
