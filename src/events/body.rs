//! An event's own fields ([`EventBody`]): a JSON map that a consumed event decodes from its
//! Avro bytes only when a handler first reads it, so a role that acts on the envelope alone
//! (an event type it ignores, a duplicate it skips) never builds the map.
//!
//! The bytes were checked when the event was consumed, by the same reader with an output that
//! builds nothing ([`super::json::Out`] for `()`): a body that reaches a handler decodes, and a
//! payload that cannot was dead-lettered before any handler saw it.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use super::codec::HEADER_LEN;
use super::node::RecordPlan;

type Fields = Map<String, Value>;

/// The body of an [`super::Event`]. Reads go through `Deref` to the map; writes through
/// `DerefMut` (which decodes first). Equality, `Debug` and serialisation see the map.
#[derive(Clone, Default)]
pub struct EventBody(Repr);

#[derive(Clone)]
enum Repr {
    Map(Fields),
    Lazy(Box<Lazy>),
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Map(Fields::new())
    }
}

#[derive(Clone)]
struct Lazy {
    /// The whole single-object payload (a reference-counted view of the delivery's bytes).
    payload: Bytes,
    plan: Arc<RecordPlan>,
    map: OnceLock<Fields>,
}

impl EventBody {
    /// A body read from the single-object `payload` with `plan` on first use. The caller has
    /// checked that the bytes decode with that plan.
    pub(crate) fn lazy(payload: Bytes, plan: Arc<RecordPlan>) -> EventBody {
        EventBody(Repr::Lazy(Box::new(Lazy {
            payload,
            plan,
            map: OnceLock::new(),
        })))
    }

    /// Whether the map has been built (false only for a consumed body nobody has read yet).
    pub fn is_decoded(&self) -> bool {
        match &self.0 {
            Repr::Map(_) => true,
            Repr::Lazy(l) => l.map.get().is_some(),
        }
    }

    /// The map, decoding it if needed.
    pub fn into_map(self) -> Fields {
        match self.0 {
            Repr::Map(m) => m,
            Repr::Lazy(mut l) => l.map.take().unwrap_or_else(|| l.decode()),
        }
    }
}

impl Lazy {
    fn decode(&self) -> Fields {
        let mut buf = self.payload.get(HEADER_LEN..).unwrap_or_default();
        match super::codec::read_body(&self.plan, &mut buf) {
            Ok(m) => m,
            // Unreachable by construction: the bytes passed the same reader on consume. An
            // empty map fails the handler's own field checks loudly rather than panicking.
            Err(e) => {
                tracing::error!(error = %e, "a checked event body failed to decode");
                Fields::new()
            }
        }
    }
}

impl From<Fields> for EventBody {
    fn from(m: Fields) -> Self {
        EventBody(Repr::Map(m))
    }
}

impl Deref for EventBody {
    type Target = Fields;
    fn deref(&self) -> &Fields {
        match &self.0 {
            Repr::Map(m) => m,
            Repr::Lazy(l) => l.map.get_or_init(|| l.decode()),
        }
    }
}

impl DerefMut for EventBody {
    fn deref_mut(&mut self) -> &mut Fields {
        if let Repr::Lazy(l) = &mut self.0 {
            let m = l.map.take().unwrap_or_else(|| l.decode());
            self.0 = Repr::Map(m);
        }
        match &mut self.0 {
            Repr::Map(m) => m,
            Repr::Lazy(_) => unreachable!("replaced by the map above"),
        }
    }
}

impl PartialEq for EventBody {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl fmt::Debug for EventBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl Serialize for EventBody {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}
