//! Single-object encoding of events: `C3 01`, the writer schema's CRC-64-AVRO fingerprint
//! (8 bytes, little-endian), then the Avro binary body. Decoding resolves to the latest version.

use serde_json::{Map, Value};
use thiserror::Error;
use uuid::Uuid;

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
    pub body: Map<String, Value>,
}

#[derive(Debug, Error)]
pub enum EncodeError {
    #[error("unknown event type `{0}`")]
    UnknownEventType(String),
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

pub fn encode(_event: &Event) -> Result<Vec<u8>, EncodeError> {
    Err(EncodeError::UnknownEventType("codec not built yet".into()))
}

pub fn decode(_bytes: &[u8]) -> Result<Event, DecodeError> {
    Err(DecodeError::NotSingleObject)
}
