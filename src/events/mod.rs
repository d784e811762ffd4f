//! Typed events: the Avro schema registry built from `schemas/` at compile time, the common
//! envelope, and the single-object codec (marker, CRC-64-AVRO fingerprint, body).

pub mod codec;
mod json;
pub mod registry;

pub use codec::{decode, encode, DecodeError, EncodeError, Envelope, Event};
pub use registry::{EventSchema, Registry, SchemaError};
