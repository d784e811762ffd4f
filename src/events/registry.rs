//! The schema registry: every version of every event schema in `schemas/`, embedded at compile
//! time (see `scripts/build.rs`), indexed by CRC-64-AVRO fingerprint; plus the checks behind
//! `nexus schemas check` and the lock behind `nexus schemas lock`.
//!
//! Layout of a schema directory (the rules are in `schemas/README.md`):
//! - `envelope.avsc`: record `nexus.Envelope`, the common envelope;
//! - `events/<snake_name>/v<N>.avsc`: record `nexus.events.<Name>`, first field
//!   `{"name": "envelope", "type": "nexus.Envelope"}`;
//! - `fingerprints.lock`: `<Name> <version> <fingerprint hex>` per released version.
//!
//! The *wire schema* of a version is the event schema with the envelope inlined, so it is
//! self-contained and its Parsing Canonical Form and fingerprint are the standard ones any Avro
//! implementation computes from the same JSON.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use apache_avro::schema::{ArraySchema, MapSchema, Name, RecordSchema, UnionSchema};
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::node::{fixed_uuid, Node, Plan, RecordNode, Step};
use super::pcf;

include!(concat!(env!("OUT_DIR"), "/schema_files.rs"));

/// File name of the lock inside a schema directory.
pub const LOCK_FILE: &str = "fingerprints.lock";

/// One version of one event type's schema, composed with the envelope.
#[derive(Debug, Clone)]
pub struct EventSchema {
    /// Short name, e.g. `MessageReceived`.
    pub event_type: String,
    /// Avro full name, e.g. `nexus.events.MessageReceived`.
    pub full_name: String,
    pub version: u32,
    /// CRC-64-AVRO of the Parsing Canonical Form; written little-endian after the marker.
    pub fingerprint: u64,
    pub schema: apache_avro::Schema,
    /// The composed schema as JSON (envelope inlined), as written on the wire's fingerprint.
    pub json: serde_json::Value,
    /// The Parsing Canonical Form the fingerprint is computed from.
    pub canonical_form: String,
    /// Digest of everything in the schema but its docs ([`content_digest`]): the canonical form
    /// leaves out defaults, logical types and aliases, which change what readers see too.
    pub content: u64,
    /// The file it came from, relative to the schema directory.
    pub file: String,
    /// Compiled form used by the codec.
    pub(crate) node: Arc<RecordNode>,
    /// How to read data of this version as the latest version of its type.
    pub(crate) to_latest: Result<Plan, String>,
}

/// A problem with the schema directory. Every variant names the file or the type and version.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum SchemaError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{event_type} v{version} cannot read v{previous}: {message}")]
    Incompatible {
        event_type: String,
        version: u32,
        previous: u32,
        message: String,
    },
    #[error("{event_type} v{version} is new, run `nexus schemas lock`")]
    NotLocked { event_type: String, version: u32 },
    #[error(
        "{event_type} v{version} was changed after release: fingerprint {actual:016x}, locked \
         {locked:016x}; never edit a released version, add v{} instead",
        version + 1
    )]
    LockMismatch {
        event_type: String,
        version: u32,
        locked: u64,
        actual: u64,
    },
    #[error(
        "{event_type} v{version} was changed after release: a default, logical type, alias or \
         other attribute differs from the locked content {locked:016x} (now {actual:016x}); \
         never edit a released version, add v{} instead",
        version + 1
    )]
    ContentMismatch {
        event_type: String,
        version: u32,
        locked: u64,
        actual: u64,
    },
    #[error(
        "{event_type} v{version} has no content digest in {LOCK_FILE}: run `nexus schemas lock` \
         if the whole lock predates digests, else restore the line's digest (a released line never \
         changes)"
    )]
    LockOutdated { event_type: String, version: u32 },
    #[error("{event_type} v{version} is in {LOCK_FILE} but its schema file is gone; released versions must be kept")]
    MissingVersion { event_type: String, version: u32 },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

/// What a successful check saw.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    /// Per event type: name, latest version, fingerprint of the latest version.
    pub event_types: Vec<(String, u32, u64)>,
    /// Number of schema versions checked.
    pub versions: usize,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} event types, {} schema versions: compatible and locked",
            self.event_types.len(),
            self.versions
        )?;
        for (t, v, fp) in &self.event_types {
            writeln!(f, "  {t:<28} v{v:<3} {fp:016x}")?;
        }
        Ok(())
    }
}

/// All known schemas.
pub struct Registry {
    pub(crate) schemas: Vec<EventSchema>,
    by_fingerprint: Lookup<u64>,
    latest: Lookup<String>,
    /// Per type, the earlier versions a writer may use instead of the latest, oldest first.
    earlier: Lookup<String>,
    downgrades: Vec<Vec<Downgrade>>,
    /// Entries of the lock file: (type, version) → fingerprint and content digest (absent in
    /// lines written before the digest existed).
    lock: HashMap<(String, u32), (u64, Option<u64>)>,
    /// Problems that do not stop the registry from working but fail `check`.
    lint: Vec<SchemaError>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("versions", &self.schemas.len())
            .finish()
    }
}

impl Registry {
    /// The registry built from `schemas/` at compile time, parsed on first use.
    ///
    /// # Panics
    /// If the embedded schemas do not load. They are compiled into the binary and the unit
    /// tests load them, so this is a build defect, not a run-time condition.
    pub fn builtin() -> &'static Registry {
        static R: LazyLock<Registry> = LazyLock::new(|| {
            Registry::from_sources(SCHEMA_FILES.iter().copied()).unwrap_or_else(|errors| {
                let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                panic!("embedded schemas are invalid:\n{}", list.join("\n"))
            })
        });
        &R
    }

    /// The files embedded at compile time: (path relative to `schemas/`, contents).
    pub fn builtin_files() -> &'static [(&'static str, &'static str)] {
        SCHEMA_FILES
    }

    /// Builds a registry from (path relative to the schema directory, contents) pairs. Files
    /// other than `*.avsc` and the lock are ignored. Errors are everything that makes a schema
    /// unusable; style and compatibility problems are left to [`Registry::check`].
    pub fn from_sources<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Registry, Vec<SchemaError>> {
        let files: Vec<(&str, &str)> = files.into_iter().collect();
        let mut errors = Vec::new();
        let mut lint = Vec::new();

        let Some((_, envelope_text)) = files.iter().find(|(p, _)| *p == "envelope.avsc") else {
            return Err(vec![invalid("envelope.avsc", "missing")]);
        };
        let envelope: Value = match serde_json::from_str(envelope_text) {
            Ok(v) => v,
            Err(e) => return Err(vec![invalid("envelope.avsc", format!("not JSON: {e}"))]),
        };
        if full_name_of(&envelope).as_deref() != Some("nexus.Envelope") {
            return Err(vec![invalid(
                "envelope.avsc",
                "must define record `nexus.Envelope`",
            )]);
        }
        lint_docs("envelope.avsc", &envelope, &mut lint);

        let mut schemas = Vec::new();
        let mut lock = HashMap::new();
        for (path, text) in &files {
            if *path == LOCK_FILE {
                lock = parse_lock(text, &mut lint);
            } else if *path != "envelope.avsc" && path.ends_with(".avsc") {
                match load_event(path, text, &envelope, &mut lint) {
                    Ok(s) => schemas.push(s),
                    Err(e) => errors.push(e),
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        schemas.sort_by(|a, b| (&a.event_type, a.version).cmp(&(&b.event_type, b.version)));

        let mut by_fingerprint = Lookup::default();
        let mut latest = Lookup::default();
        for (i, s) in schemas.iter().enumerate() {
            if let Some(j) = by_fingerprint.insert(s.fingerprint, i) {
                let other = &schemas[j];
                lint.push(invalid(
                    &s.file,
                    format!(
                        "same wire schema as {} v{}; a new version must differ",
                        other.event_type, other.version
                    ),
                ));
            }
            latest.insert(s.event_type.clone(), i);
        }
        for i in 0..schemas.len() {
            let reader = Node::Record(Arc::clone(&schemas[latest[&schemas[i].event_type]].node));
            schemas[i].to_latest =
                Plan::build(&Node::Record(Arc::clone(&schemas[i].node)), &reader);
        }
        let mut earlier = Lookup::default();
        let mut downgrades = Vec::new();
        for (event_type, &last) in latest.iter() {
            let found: Vec<Downgrade> = (0..last)
                .filter(|&i| &schemas[i].event_type == event_type)
                .filter_map(|i| Downgrade::between(i, &schemas[i], &schemas[last]))
                .collect();
            if !found.is_empty() {
                earlier.insert(event_type.clone(), downgrades.len());
                downgrades.push(found);
            }
        }
        Ok(Registry {
            schemas,
            by_fingerprint,
            latest,
            earlier,
            downgrades,
            lock,
            lint,
        })
    }

    /// Loads a schema directory from disk (what `nexus schemas check --dir` validates, so an
    /// edit can be checked before a rebuild embeds it).
    pub fn load_dir(dir: &Path) -> Result<Registry, Vec<SchemaError>> {
        let mut files = Vec::new();
        read_tree(dir, dir, &mut files).map_err(|e| vec![e])?;
        Registry::from_sources(files.iter().map(|(p, t)| (p.as_str(), t.as_str())))
    }

    /// Every schema version, by type then version.
    pub fn all(&self) -> &[EventSchema] {
        &self.schemas
    }

    /// The latest version of an event type (what readers see).
    pub fn latest(&self, event_type: &str) -> Option<&EventSchema> {
        self.latest.get(event_type).map(|&i| &self.schemas[i])
    }

    /// The version a writer uses for `body`, and the body fields that version leaves out: the
    /// oldest version whose readers see this body as it is, i.e. every field it has is defined
    /// as in the latest (type, default, order) and every field added since holds the latest's
    /// default, which a reader resolving to the latest fills in (else the latest). A pod that
    /// knows only that version then reads what a newer pod writes, as long as it uses nothing
    /// new: what makes a rolling upgrade of a role that reads its own events safe.
    pub fn writer_for(
        &self,
        event_type: &str,
        body: &serde_json::Map<String, Value>,
    ) -> Option<(&EventSchema, &[(String, Value)])> {
        let latest = self.latest(event_type)?;
        let Some(&at) = self.earlier.get(event_type) else {
            return Some((latest, &[]));
        };
        let found = self.downgrades[at].iter().find(|d| {
            d.added
                .iter()
                .all(|(k, default)| body.get(k).is_none_or(|v| v == default))
        });
        Some(match found {
            Some(d) => (&self.schemas[d.index], d.added.as_slice()),
            None => (latest, &[]),
        })
    }

    /// Every version of an event type, oldest first.
    pub fn versions<'a>(&'a self, event_type: &'a str) -> impl Iterator<Item = &'a EventSchema> {
        self.schemas
            .iter()
            .filter(move |s| s.event_type == event_type)
    }

    /// The earlier versions [`Registry::writer_for`] still writes, oldest first, each with the
    /// body fields it leaves out (used only when they hold these, the latest's, defaults).
    pub fn earlier_writers<'a>(
        &'a self,
        event_type: &str,
    ) -> impl Iterator<Item = (&'a EventSchema, &'a [(String, Value)])> {
        self.earlier
            .get(event_type)
            .map(|&at| self.downgrades[at].as_slice())
            .unwrap_or_default()
            .iter()
            .map(|d| (&self.schemas[d.index], d.added.as_slice()))
    }

    /// One version of an event type.
    pub fn get(&self, event_type: &str, version: u32) -> Option<&EventSchema> {
        self.schemas
            .iter()
            .find(|s| s.event_type == event_type && s.version == version)
    }

    /// The schema a payload was written with.
    pub fn by_fingerprint(&self, fingerprint: u64) -> Option<&EventSchema> {
        self.by_fingerprint
            .get(&fingerprint)
            .map(|&i| &self.schemas[i])
    }

    /// Short names of every event type, sorted.
    pub fn event_types(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.schemas.iter().map(|s| s.event_type.as_str()).collect();
        v.dedup();
        v
    }

    /// The rules of `schemas/README.md`: every released version is kept and unchanged (its
    /// fingerprint equals the lock), each version can read the data of every earlier version
    /// (`SchemaCompatibility::can_read(writer = old, reader = new)` on the schemas with named
    /// type references inlined, less the bytes → string and string → uuid reads nexus's reader
    /// refuses for some values) and a field of the event record or of a nested one is removed
    /// only if it had a default, versions are numbered 1..N, record names never change, the
    /// envelope comes first, every schema and field has a `doc`, every enum has a `default`. A
    /// version missing from the lock is reported as new.
    pub fn check(&self) -> Result<CheckReport, Vec<SchemaError>> {
        let mut errors = self.lint.clone();
        let mut by_type: Vec<(&str, Vec<&EventSchema>)> = Vec::new();
        for s in &self.schemas {
            match by_type.last_mut() {
                Some((t, v)) if *t == s.event_type => v.push(s),
                _ => by_type.push((&s.event_type, vec![s])),
            }
        }
        for (t, versions) in &by_type {
            for (i, s) in versions.iter().enumerate() {
                if s.version as usize != i + 1 {
                    errors.push(invalid(
                        &s.file,
                        format!("versions of {t} must be numbered 1, 2, ... without gaps"),
                    ));
                    break;
                }
            }
            let inlined: Vec<Schema> = versions
                .iter()
                .map(|s| inline_references(&s.schema))
                .collect();
            for (j, newer) in versions.iter().enumerate() {
                if newer.full_name != versions[0].full_name {
                    errors.push(invalid(
                        &newer.file,
                        format!("record name changed from {}", versions[0].full_name),
                    ));
                }
                for (i, older) in versions[..j].iter().enumerate() {
                    let removed = removed_without_default(&older.schema, &newer.schema);
                    let old_node = Node::Record(Arc::clone(&older.node));
                    let new_node = Node::Record(Arc::clone(&newer.node));
                    if let Err(e) = SchemaCompatibility::can_read(&inlined[i], &inlined[j]) {
                        errors.push(SchemaError::Incompatible {
                            event_type: t.to_string(),
                            version: newer.version,
                            previous: older.version,
                            message: compatibility_message(&e, &old_node, &new_node),
                        });
                    } else if let Some(message) = unsafe_read(&old_node, &new_node) {
                        // Avro resolves it, nexus's reader refuses part of the old data.
                        errors.push(SchemaError::Incompatible {
                            event_type: t.to_string(),
                            version: newer.version,
                            previous: older.version,
                            message,
                        });
                    } else if let Some(field) = removed {
                        // Readable by the new version, but a reader still on the old one
                        // would find the field missing with nothing to fill it in.
                        errors.push(SchemaError::Incompatible {
                            event_type: t.to_string(),
                            version: newer.version,
                            previous: older.version,
                            message: format!(
                                "field `{field}` is removed but has no default in v{}",
                                older.version
                            ),
                        });
                    }
                }
            }
            for s in versions {
                if let Err(e) = &s.to_latest {
                    let latest = versions.last().map_or(s.version, |l| l.version);
                    let dup = errors.iter().any(|x| {
                        matches!(x, SchemaError::Incompatible { event_type, version, previous, .. }
                            if event_type == t && *version == latest && *previous == s.version)
                    });
                    if !dup {
                        errors.push(SchemaError::Incompatible {
                            event_type: t.to_string(),
                            version: latest,
                            previous: s.version,
                            message: e.clone(),
                        });
                    }
                }
                match self.lock.get(&(s.event_type.clone(), s.version)) {
                    None => errors.push(SchemaError::NotLocked {
                        event_type: s.event_type.clone(),
                        version: s.version,
                    }),
                    Some(&(locked, _)) if locked != s.fingerprint => {
                        errors.push(SchemaError::LockMismatch {
                            event_type: s.event_type.clone(),
                            version: s.version,
                            locked,
                            actual: s.fingerprint,
                        })
                    }
                    Some(&(_, Some(locked))) if locked != s.content => {
                        errors.push(SchemaError::ContentMismatch {
                            event_type: s.event_type.clone(),
                            version: s.version,
                            locked,
                            actual: s.content,
                        })
                    }
                    Some((_, None)) => errors.push(SchemaError::LockOutdated {
                        event_type: s.event_type.clone(),
                        version: s.version,
                    }),
                    Some(_) => {}
                }
            }
        }
        let mut missing: Vec<&(String, u32)> = self
            .lock
            .keys()
            .filter(|(t, v)| self.get(t, *v).is_none())
            .collect();
        missing.sort();
        for (t, v) in missing {
            errors.push(SchemaError::MissingVersion {
                event_type: t.clone(),
                version: *v,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CheckReport {
            event_types: by_type
                .iter()
                .filter_map(|(t, v)| v.last().map(|l| (t.to_string(), l.version, l.fingerprint)))
                .collect(),
            versions: self.schemas.len(),
        })
    }

    /// The lock file for the versions present: one line per version, `<Name> <version>
    /// <fingerprint> <content>`, each 16 hex digits: the CRC-64-AVRO value (the wire carries it
    /// little-endian) and the [`content_digest`].
    pub fn lock_file(&self) -> String {
        let mut out = String::from(
            "# Released event schema versions and their CRC-64-AVRO fingerprints (Parsing Canonical\n\
             # Form of the wire schema, envelope inlined). Written by `nexus schemas lock`; checked by\n\
             # `nexus schemas check`. A line never changes once released: see README.md. The last\n\
             # column digests everything in the schema but its docs (defaults, logical types, aliases).\n",
        );
        for s in &self.schemas {
            out.push_str(&format!(
                "{} {} {:016x} {:016x}\n",
                s.event_type, s.version, s.fingerprint, s.content
            ));
        }
        out
    }
}

impl Registry {
    /// `nexus schemas check --dir <dir>`: loads the directory from disk and runs [`Registry::check`].
    pub fn check_dir(dir: &Path) -> Result<CheckReport, Vec<SchemaError>> {
        Registry::load_dir(dir)?.check()
    }

    /// `nexus schemas lock --dir <dir>`: records new versions in `<dir>/fingerprints.lock` and
    /// returns its path. Refuses (with the errors) when anything other than "new version" is wrong,
    /// so an incompatible or edited released schema cannot be locked in. To re-lock from scratch,
    /// delete the lock file first.
    pub fn write_lock(dir: &Path) -> Result<PathBuf, Vec<SchemaError>> {
        let registry = Registry::load_dir(dir)?;
        // A lock written before content digests is brought up to date whole; in a lock that
        // has them, a line without one was cut by hand (to let an edit through): refused.
        let before_digests = registry.lock.values().all(|(_, content)| content.is_none());
        if let Err(errors) = registry.check() {
            let blocking: Vec<SchemaError> = errors
                .into_iter()
                .filter(|e| match e {
                    SchemaError::NotLocked { .. } => false,
                    SchemaError::LockOutdated { .. } => !before_digests,
                    _ => true,
                })
                .collect();
            if !blocking.is_empty() {
                return Err(blocking);
            }
        }
        let path = dir.join(LOCK_FILE);
        std::fs::write(&path, registry.lock_file()).map_err(|e| {
            vec![SchemaError::Io {
                path: path.display().to_string(),
                message: e.to_string(),
            }]
        })?;
        Ok(path)
    }
}

/// An earlier version of a type that writes a body like the latest does when the fields added
/// since hold their defaults: its fields are the latest's minus those, each defined the same.
pub(crate) struct Downgrade {
    index: usize,
    /// The body fields added since, with the latest's defaults in nexus's JSON form (what a
    /// body holds: base64 for bytes and fixed).
    added: Vec<(String, Value)>,
}

impl Downgrade {
    fn between(index: usize, old: &EventSchema, latest: &EventSchema) -> Option<Downgrade> {
        let fields = |s: &EventSchema| -> Option<Vec<(String, Value)>> {
            s.json
                .get("fields")?
                .as_array()?
                .iter()
                .map(|f| Some((f.get("name")?.as_str()?.to_owned(), without_docs(f))))
                .collect()
        };
        let (old_fields, new_fields) = (fields(old)?, fields(latest)?);
        // Every old field is in the latest with the same definition, docs aside: the same type,
        // and the same default and order. A default the latest added or changed would have the
        // old version refuse a body without the field ("missing required field") or write its
        // own default where the latest writes another.
        let same = old_fields
            .iter()
            .all(|(name, f)| new_fields.iter().any(|(n, g)| n == name && f == g));
        if !same {
            return None;
        }
        let added = latest
            .node
            .fields
            .iter()
            .filter(|f| !old_fields.iter().any(|(o, _)| *o == f.name))
            .map(|f| Some((f.name.clone(), f.default.as_ref()?.0.clone())))
            .collect::<Option<Vec<_>>>()?;
        Some(Downgrade { index, added })
    }
}

/// A schema's JSON without its `doc` attributes (corrected freely between versions). Default
/// values are kept whole: a record default's `doc` key is data.
fn without_docs(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "doc")
                .map(|(k, v)| {
                    let v = if k == "default" {
                        v.clone()
                    } else {
                        without_docs(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_docs).collect()),
        other => other.clone(),
    }
}

/// The registry's indexes, looked up on every event encoded (by type) and decoded (by
/// fingerprint). Their keys are fixed once the registry is built, so they need no defence
/// against chosen keys (a lookup cannot add one): FNV-1a, a few instructions per byte, instead
/// of SipHash.
type Lookup<K> = HashMap<K, usize, BuildHasherDefault<Fnv>>;

/// FNV-1a, 64 bits.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn invalid(file: &str, message: impl Into<String>) -> SchemaError {
    SchemaError::Invalid {
        file: file.to_owned(),
        message: message.into(),
    }
}

fn full_name_of(v: &Value) -> Option<String> {
    let name = v.get("name")?.as_str()?;
    if name.contains('.') {
        return Some(name.to_owned());
    }
    Some(match v.get("namespace").and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_owned(),
    })
}

/// `MessageReceived` → `message_received`.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn load_event(
    path: &str,
    text: &str,
    envelope: &Value,
    lint: &mut Vec<SchemaError>,
) -> Result<EventSchema, SchemaError> {
    let parts: Vec<&str> = path.split('/').collect();
    let (dir, version) = match parts.as_slice() {
        ["events", dir, file] => {
            let v = file
                .strip_prefix('v')
                .and_then(|f| f.strip_suffix(".avsc"))
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| invalid(path, "schema files are named v<N>.avsc with N >= 1"))?;
            (*dir, v)
        }
        _ => {
            return Err(invalid(
                path,
                "event schemas live at events/<snake_name>/v<N>.avsc",
            ))
        }
    };
    let raw: Value =
        serde_json::from_str(text).map_err(|e| invalid(path, format!("not JSON: {e}")))?;
    let full_name = full_name_of(&raw).ok_or_else(|| invalid(path, "not a named record"))?;
    let event_type = full_name
        .strip_prefix("nexus.events.")
        .filter(|n| !n.contains('.'))
        .ok_or_else(|| {
            invalid(
                path,
                format!("record must be named nexus.events.<Name>, not {full_name}"),
            )
        })?
        .to_owned();
    if snake_case(&event_type) != dir {
        return Err(invalid(
            path,
            format!(
                "{event_type} belongs in events/{}/",
                snake_case(&event_type)
            ),
        ));
    }
    lint_docs(path, &raw, lint);

    // Inline the envelope so the wire schema is self-contained.
    let mut composed = raw;
    let first = composed
        .get_mut("fields")
        .and_then(Value::as_array_mut)
        .and_then(|f| f.first_mut())
        .ok_or_else(|| invalid(path, "record has no fields"))?;
    let is_envelope = first.get("name").and_then(Value::as_str) == Some("envelope")
        && first.get("type").and_then(Value::as_str) == Some("nexus.Envelope");
    if !is_envelope {
        return Err(invalid(
            path,
            r#"the first field must be {"name": "envelope", "type": "nexus.Envelope"}"#,
        ));
    }
    first["type"] = envelope.clone();

    if let Some(message) = fixed_uuid(&composed) {
        return Err(invalid(path, message));
    }
    let schema = apache_avro::Schema::parse(&composed).map_err(|e| invalid(path, e.to_string()))?;
    let canonical_form = pcf::canonical_form(&composed).map_err(|e| invalid(path, e))?;
    let fingerprint = pcf::crc64_avro(canonical_form.as_bytes());
    let content = content_digest(&composed);
    let node = match Node::compile(&schema).map_err(|e| invalid(path, e))? {
        Node::Record(r) => r,
        _ => return Err(invalid(path, "not a record")),
    };
    Ok(EventSchema {
        event_type,
        full_name,
        version,
        fingerprint,
        schema,
        json: composed,
        canonical_form,
        content,
        file: path.to_owned(),
        node,
        to_latest: Err("not resolved yet".into()),
    })
}

/// Why `aliases` are refused: Avro readers would map a renamed field's old data through them,
/// nexus's reader plan matches by name and would fill the default in instead.
const NO_ALIASES: &str = "`aliases` are not supported (nexus reads fields and types by name): \
                          add a new field with a default instead of renaming";

/// Every record, enum and fixed and every field carries a `doc` and no `aliases`; every enum has
/// a `default` (so a reader survives symbols added later).
fn lint_docs(file: &str, v: &Value, lint: &mut Vec<SchemaError>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| lint_docs(file, i, lint)),
        Value::Object(m) => {
            let ty = m.get("type").and_then(Value::as_str);
            if matches!(ty, Some("record" | "enum" | "fixed")) {
                let name = m.get("name").and_then(Value::as_str).unwrap_or("?");
                if !m.contains_key("doc") {
                    lint.push(invalid(file, format!("{name} has no `doc`")));
                }
                if m.contains_key("aliases") {
                    lint.push(invalid(file, format!("{name}: {NO_ALIASES}")));
                }
                if ty == Some("enum") && !m.contains_key("default") {
                    lint.push(invalid(
                        file,
                        format!("enum {name} has no `default` symbol"),
                    ));
                }
                if let Some(fields) = m.get("fields").and_then(Value::as_array) {
                    for f in fields {
                        if f.get("doc").is_none() {
                            let fname = f.get("name").and_then(Value::as_str).unwrap_or("?");
                            lint.push(invalid(file, format!("field {name}.{fname} has no `doc`")));
                        }
                        if f.get("aliases").is_some() {
                            let fname = f.get("name").and_then(Value::as_str).unwrap_or("?");
                            lint.push(invalid(file, format!("field {name}.{fname}: {NO_ALIASES}")));
                        }
                        if let Some(t) = f.get("type") {
                            lint_docs(file, t, lint);
                        }
                    }
                }
            }
            for key in ["items", "values"] {
                if let Some(t) = m.get(key) {
                    lint_docs(file, t, lint);
                }
            }
            if let Some(t @ (Value::Object(_) | Value::Array(_))) = m.get("type") {
                lint_docs(file, t, lint);
            }
        }
        _ => {}
    }
}

/// The first 8 bytes of SHA-256 over the schema's JSON without `doc` attributes, object keys
/// sorted: a released version's docs may be corrected, nothing else in it.
pub fn content_digest(schema: &Value) -> u64 {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().filter(|k| *k != "doc").collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = String::new();
    write(schema, &mut text);
    let digest = Sha256::digest(text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

fn parse_lock(
    text: &str,
    lint: &mut Vec<SchemaError>,
) -> HashMap<(String, u32), (u64, Option<u64>)> {
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let version = |v: &str| v.trim_start_matches('v').parse::<u32>().ok();
        let hex = |h: &str| u64::from_str_radix(h, 16).ok();
        let parsed = match parts.as_slice() {
            [t, v, fp] => version(v)
                .zip(hex(fp))
                .map(|(v, fp)| ((t.to_string(), v), (fp, None))),
            [t, v, fp, content] => version(v)
                .zip(hex(fp))
                .zip(hex(content))
                .map(|((v, fp), c)| ((t.to_string(), v), (fp, Some(c)))),
            _ => None,
        };
        match parsed {
            Some((key, fp)) => {
                if out.insert(key.clone(), fp).is_some() {
                    lint.push(invalid(
                        LOCK_FILE,
                        format!("line {}: {} v{} listed twice", n + 1, key.0, key.1),
                    ));
                }
            }
            None => lint.push(invalid(
                LOCK_FILE,
                format!(
                    "line {}: expected `<Name> <version> <fingerprint> <content>`",
                    n + 1
                ),
            )),
        }
    }
    out
}

fn read_tree(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<(), SchemaError> {
    let io = |p: &Path, e: std::io::Error| SchemaError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| io(dir, e))?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            read_tree(root, &path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("avsc" | "lock")
        ) {
            let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.push((rel, text));
        }
    }
    Ok(())
}

/// The first field, as `<Record>.<field>`, that a record of `older` has without a default and
/// the record of the same full name in `newer` no longer has. The event record comes first, then
/// nested records in the order `older` defines them: the new writer leaves the field out
/// wherever the record sits, and a reader still on `older` has nothing to fill it in with.
/// A record whose namespace changed is the same record to Avro (resolution matches unqualified
/// names), so it is matched by its unqualified name when that names one record of `newer`.
fn removed_without_default(older: &Schema, newer: &Schema) -> Option<String> {
    let mut new_records = Vec::new();
    records(newer, &mut new_records);
    let new_by_name: HashMap<String, &RecordSchema> = new_records
        .iter()
        .map(|r| (r.name.fullname(None), *r))
        .collect();
    let by_short_name = |name: &str| {
        let mut same = new_records.iter().filter(|r| r.name.name == name);
        match (same.next(), same.next()) {
            (Some(r), None) => Some(*r),
            _ => None,
        }
    };
    let mut old_records = Vec::new();
    records(older, &mut old_records);
    old_records.into_iter().find_map(|old| {
        let new = new_by_name
            .get(&old.name.fullname(None))
            .copied()
            .or_else(|| by_short_name(&old.name.name))?;
        old.fields
            .iter()
            .filter(|f| f.default.is_none())
            .find(|f| !new.fields.iter().any(|n| n.name == f.name))
            .map(|f| format!("{}.{}", old.name.name, f.name))
    })
}

/// `schema` with each reference to a named type replaced by the type's definition. apache-avro's
/// `can_read` takes a reference as equal to a reference of the same name without comparing the
/// definitions, and answers "inconclusive" for a reference against a definition: both happen
/// when a version moves where a type is defined (removes the field that defined it inline, so a
/// later field now does). Inlined, every use is compared by Avro's rules as a definition.
/// Recursive types, the only ones that must stay references, are refused at load.
fn inline_references(schema: &Schema) -> Schema {
    fn inline(schema: &Schema, defined: &mut HashMap<Name, Schema>) -> Schema {
        match schema {
            Schema::Ref { name } => defined.get(name).cloned().unwrap_or_else(|| schema.clone()),
            Schema::Record(r) => {
                let mut r = r.clone();
                for f in &mut r.fields {
                    f.schema = inline(&f.schema, defined);
                }
                defined.insert(r.name.clone(), Schema::Record(r.clone()));
                Schema::Record(r)
            }
            Schema::Enum(e) => {
                defined.insert(e.name.clone(), schema.clone());
                schema.clone()
            }
            Schema::Fixed(f) => {
                defined.insert(f.name.clone(), schema.clone());
                schema.clone()
            }
            Schema::Array(a) => Schema::Array(ArraySchema {
                items: Box::new(inline(&a.items, defined)),
                attributes: a.attributes.clone(),
            }),
            Schema::Map(m) => Schema::Map(MapSchema {
                types: Box::new(inline(&m.types, defined)),
                attributes: m.attributes.clone(),
            }),
            Schema::Union(u) => {
                let branches = u.variants().iter().map(|b| inline(b, defined)).collect();
                // Inlining keeps each branch's kind (a reference becomes the named type it
                // names), so the union stays valid; were it refused, the original is checked.
                UnionSchema::new(branches).map_or_else(|_| schema.clone(), Schema::Union)
            }
            other => other.clone(),
        }
    }
    inline(schema, &mut HashMap::new())
}

/// Every record `schema` defines, outermost first. A named type is defined once; its later
/// uses are `Schema::Ref`, so the walk ends even for recursive types.
fn records<'a>(schema: &'a Schema, out: &mut Vec<&'a RecordSchema>) {
    match schema {
        Schema::Record(r) => {
            out.push(r);
            r.fields.iter().for_each(|f| records(&f.schema, out));
        }
        Schema::Union(u) => u.variants().iter().for_each(|v| records(v, out)),
        Schema::Array(a) => records(&a.items, out),
        Schema::Map(m) => records(&m.types, out),
        _ => {}
    }
}

/// Where a reader of the new version, given old data, may fail although Avro's resolution
/// rules allow the pair: a `string` read as a `uuid` (old text need not be a UUID) and `bytes`
/// read as a `string` (old bytes need not be UTF-8). nexus's reader refuses such a value, so
/// every old event holding one would be dead-lettered once readers move to the new version.
/// Also a `long` read as a `timestamp-millis`: it decodes, but an old number (a count, a
/// duration) would be taken for an instant. Dropping a logical type is safe (the value keeps
/// its meaning, read as its plain type), so only adding one is refused.
fn unsafe_read(writer: &Node, reader: &Node) -> Option<String> {
    find_in_pair(writer, reader, "", &|w, r, at| match (w, r) {
        (Node::Long, Node::TimestampMillis) => Some(format!(
            "{at} was a long and is now a `timestamp-millis`: old numbers were not instants \
             (add a new field instead)"
        )),
        (Node::String, Node::Uuid) => Some(format!(
            "{at} was a string and is now a `uuid`: old values that are not UUIDs would not \
             decode (add a new field instead)"
        )),
        (Node::Bytes, Node::String) => Some(format!(
            "{at} was bytes and is now a string: old values that are not UTF-8 would not \
             decode (only string → bytes is allowed)"
        )),
        _ => None,
    })
}

/// The enum symbols a writer has and the reader lost, named with the field.
fn lost_symbols(writer: &Node, reader: &Node) -> Option<String> {
    find_in_pair(writer, reader, "", &|w, r, at| match (w, r) {
        (Node::Enum(w), Node::Enum(r)) => {
            let lost: Vec<&str> = w
                .symbols
                .iter()
                .filter(|s| !r.symbols.contains(s))
                .map(String::as_str)
                .collect();
            (!lost.is_empty()).then(|| {
                format!(
                    "{at}: enum {} lost the symbols {} (removed or renamed), which old data may \
                     hold; symbols are only ever added",
                    r.name,
                    lost.join(", ")
                )
            })
        }
        _ => None,
    })
}

/// The first answer of `leaf` for a (writer, reader) pair of nodes met while walking the two
/// schemas as [`Plan::build`] resolves them: each writer union branch, the reader union branch
/// resolution picks (the first of the writer's kind, else the first that resolves), record
/// fields matched by name, array items, map values. `leaf` gets "field `a.b`" (or "the
/// record") to name the place.
fn find_in_pair(
    writer: &Node,
    reader: &Node,
    path: &str,
    leaf: &dyn Fn(&Node, &Node, &str) -> Option<String>,
) -> Option<String> {
    use Node as N;
    match (writer, reader) {
        (N::Union(branches), _) => branches
            .iter()
            .find_map(|w| find_in_pair(w, reader, path, leaf)),
        (_, N::Union(branches)) => {
            let same_kind = branches
                .iter()
                .find(|r| std::mem::discriminant(*r) == std::mem::discriminant(writer));
            let chosen = same_kind
                .into_iter()
                .chain(branches.iter())
                .find(|r| Plan::build(writer, r).is_ok())?;
            find_in_pair(writer, chosen, path, leaf)
        }
        (N::Array(w), N::Array(r)) | (N::Map(w), N::Map(r)) => find_in_pair(w, r, path, leaf),
        (N::Record(w), N::Record(r)) => w.fields.iter().find_map(|wf| {
            let rf = r.fields.iter().find(|rf| rf.name == wf.name)?;
            let path = if path.is_empty() {
                wf.name.clone()
            } else {
                format!("{path}.{}", wf.name)
            };
            find_in_pair(&wf.node, &rf.node, &path, leaf)
        }),
        _ => {
            let at = if path.is_empty() {
                "the record".to_owned()
            } else {
                format!("field `{path}`")
            };
            leaf(writer, reader, &at)
        }
    }
}

/// Why `newer` cannot read `older`'s data, naming the field: the enum symbols it lost, else
/// nexus's own resolution error when it has one ("field `contact`: field `age`: string cannot be read as long"), else
/// apache-avro's error with its causes, whose first line alone names only the outermost field.
fn compatibility_message(error: &dyn std::error::Error, older: &Node, newer: &Node) -> String {
    if let Some(message) = lost_symbols(older, newer) {
        return message;
    }
    match Plan::build(older, newer) {
        Err(message) => return message,
        Ok(plan) => {
            if let Some(message) = unreadable_branch(&plan) {
                return message;
            }
        }
    }
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        message.push_str(": ");
        message.push_str(&e.to_string());
        cause = e.source();
    }
    message
}

/// The first writer union branch a plan cannot read (a plan holds those as errors, to fail only
/// on data that takes the branch), with the field path.
fn unreadable_branch(plan: &Plan) -> Option<String> {
    match plan {
        Plan::WriterUnion(branches) => branches.iter().find_map(|b| match b {
            Err(e) => Some(e.clone()),
            Ok(p) => unreadable_branch(p),
        }),
        Plan::Array(p) | Plan::Map(p) => unreadable_branch(p),
        Plan::Record(r) => r.steps.iter().find_map(|step| match step {
            Step::Read(field, p) => unreadable_branch(p).map(|e| format!("field `{field}`: {e}")),
            Step::Skip(_) => None,
        }),
        _ => None,
    }
}
