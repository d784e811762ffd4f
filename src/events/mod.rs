//! Typed events: the Avro schema registry built from `schemas/` at compile time, the common
//! envelope, and the single-object codec (marker, CRC-64-AVRO fingerprint, body).
//!
//! - [`codec`]: [`Event`], [`Envelope`], [`encode`], [`decode`], [`decode_lazy`],
//!   [`Event::from_json`]; `body`: [`EventBody`], the body map built on first read.
//! - [`registry`]: [`Registry`] (embedded schemas by fingerprint, [`Registry::check`],
//!   [`Registry::lock_file`], [`Registry::check_dir`] and [`Registry::write_lock`] for
//!   `nexus schemas check|lock`).
//! - `json`: JSON ⇄ Avro binary guided by the schema; `node`: the compiled schema and the
//!   writer→reader resolution plan; `pcf`: Parsing Canonical Form and CRC-64-AVRO.
//!
//! The evolution rule is written down in `schemas/README.md`.

mod body;
pub mod chat;
pub mod codec;
mod json;
mod node;
mod pcf;
pub mod publish;
pub mod registry;
pub mod webhook;

#[cfg(test)]
mod tests;

pub use body::EventBody;
pub use codec::{
    decode, decode_lazy, encode, fingerprint_of, is_traceparent, DecodeError, EncodeError,
    Envelope, Event,
};
pub use registry::{CheckReport, EventSchema, Registry, SchemaError};
