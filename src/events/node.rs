//! A compiled form of a parsed Avro schema that the codec walks on the hot path, and the
//! resolution plan from a writer schema to a reader schema (Avro schema resolution, computed once
//! per registered version instead of per message).
//!
//! apache-avro parses and validates the schemas and checks compatibility; encoding and decoding
//! go straight between JSON and Avro binary through these trees, which avoids its intermediate
//! `Value`, per-call name resolution and field-name allocation.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::schema::Name;
use apache_avro::Schema;
use serde_json::Value;

/// One node of a compiled schema.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    /// `string` with logical type `uuid`: JSON is the hyphenated text.
    Uuid,
    /// `long` with logical type `timestamp-millis`: JSON is the number of milliseconds.
    TimestampMillis,
    Fixed(usize),
    Enum(Arc<EnumNode>),
    Array(Box<Node>),
    Map(Box<Node>),
    Union(Vec<Node>),
    Record(Arc<RecordNode>),
}

#[derive(Debug)]
pub(crate) struct EnumNode {
    pub name: String,
    pub symbols: Vec<String>,
    pub default: Option<usize>,
}

#[derive(Debug)]
pub(crate) struct RecordNode {
    pub name: String,
    pub fields: Vec<FieldNode>,
    /// Indices of `fields` in name order: the writer matches a JSON object's keys (a B-tree
    /// map, so in name order too) to fields in one merged walk instead of a lookup per field.
    pub by_name: Vec<usize>,
}

#[derive(Debug)]
pub(crate) struct FieldNode {
    pub name: String,
    pub node: Node,
    /// The default in nexus's JSON form (bytes as base64) and pre-encoded as Avro binary.
    pub default: Option<(Value, Vec<u8>)>,
}

impl Node {
    /// Compiles a parsed schema. Recursive types are rejected: event schemas have no use for
    /// them and the codec can then recurse without cycle checks.
    pub(crate) fn compile(schema: &Schema) -> Result<Node, String> {
        let mut names = HashMap::new();
        compile(schema, &mut names)
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Boolean => "boolean",
            Node::Int => "int",
            Node::Long => "long",
            Node::Float => "float",
            Node::Double => "double",
            Node::Bytes => "bytes",
            Node::String => "string",
            Node::Uuid => "uuid",
            Node::TimestampMillis => "timestamp-millis",
            Node::Fixed(_) => "fixed",
            Node::Enum(_) => "enum",
            Node::Array(_) => "array",
            Node::Map(_) => "map",
            Node::Union(_) => "union",
            Node::Record(_) => "record",
        }
    }
}

/// The first `fixed` of 16 bytes with logical type `uuid` in a schema's JSON, as an error.
/// apache-avro parses it as the same `Schema::Uuid` as a `string` with that logical type, which
/// the codec writes as 36 characters of text, while the Parsing Canonical Form, hence the
/// fingerprint and every other Avro implementation, says 16 raw bytes: so it is refused. (A
/// `fixed` of another size keeps no logical type in apache-avro and is an ordinary `fixed`.)
pub(crate) fn fixed_uuid(schema: &Value) -> Option<String> {
    /// The fixed of 16 bytes `m` is, directly or wrapped as `{"type": {...}}`, and its name.
    fn fixed_16(m: &serde_json::Map<String, Value>) -> Option<&str> {
        match m.get("type")? {
            Value::String(t) if t == "fixed" => {
                let size = m.get("size").and_then(Value::as_u64);
                (size == Some(16)).then(|| m.get("name").and_then(Value::as_str).unwrap_or("?"))
            }
            Value::Object(inner) => fixed_16(inner),
            _ => None,
        }
    }
    match schema {
        Value::Array(branches) => branches.iter().find_map(fixed_uuid),
        Value::Object(m) => {
            let uuid = m.get("logicalType").and_then(Value::as_str) == Some("uuid");
            if let Some(name) = fixed_16(m).filter(|_| uuid) {
                return Some(format!(
                    "fixed `{name}` has logical type `uuid`, which nexus cannot encode as the 16 \
                     bytes its fingerprint says; use {{\"type\": \"string\", \"logicalType\": \
                     \"uuid\"}}"
                ));
            }
            let fields = m.get("fields").and_then(Value::as_array);
            let field_types = fields.into_iter().flatten().filter_map(|f| f.get("type"));
            ["type", "items", "values"]
                .iter()
                .filter_map(|k| m.get(*k))
                .chain(field_types)
                .find_map(fixed_uuid)
        }
        _ => None,
    }
}

/// Named types seen so far; `None` while a record is being compiled (a reference then is a cycle).
type Names = HashMap<Name, Option<Node>>;

fn compile(schema: &Schema, names: &mut Names) -> Result<Node, String> {
    Ok(match schema {
        Schema::Null => Node::Null,
        Schema::Boolean => Node::Boolean,
        Schema::Int | Schema::Date | Schema::TimeMillis => Node::Int,
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => Node::Long,
        Schema::Float => Node::Float,
        Schema::Double => Node::Double,
        Schema::Bytes => Node::Bytes,
        Schema::String => Node::String,
        // A string with logical type `uuid` (`fixed_uuid` refuses the fixed kind at load).
        Schema::Uuid => Node::Uuid,
        Schema::TimestampMillis => Node::TimestampMillis,
        Schema::Fixed(f) => {
            let node = Node::Fixed(f.size);
            names.insert(f.name.clone(), Some(node.clone()));
            node
        }
        Schema::Enum(e) => {
            let default =
                match &e.default {
                    Some(d) => Some(e.symbols.iter().position(|s| s == d).ok_or_else(|| {
                        format!("enum {}: default `{d}` is not a symbol", e.name)
                    })?),
                    None => None,
                };
            let node = Node::Enum(Arc::new(EnumNode {
                name: e.name.fullname(None),
                symbols: e.symbols.clone(),
                default,
            }));
            names.insert(e.name.clone(), Some(node.clone()));
            node
        }
        Schema::Array(a) => Node::Array(Box::new(compile(&a.items, names)?)),
        Schema::Map(m) => Node::Map(Box::new(compile(&m.types, names)?)),
        Schema::Union(u) => Node::Union(
            u.variants()
                .iter()
                .map(|v| compile(v, names))
                .collect::<Result<_, _>>()?,
        ),
        Schema::Record(r) => {
            names.insert(r.name.clone(), None);
            let mut fields = Vec::with_capacity(r.fields.len());
            for f in &r.fields {
                let node = compile(&f.schema, names)?;
                let default = match &f.default {
                    Some(d) => {
                        let json = super::json::normalize_default(&node, d).map_err(|m| {
                            format!("field `{}.{}`: invalid default: {m}", r.name, f.name)
                        })?;
                        let mut bytes = Vec::new();
                        super::json::write_default(&node, &json, &mut bytes).map_err(|m| {
                            format!("field `{}.{}`: invalid default: {m}", r.name, f.name)
                        })?;
                        Some((json, bytes))
                    }
                    None => None,
                };
                fields.push(FieldNode {
                    name: f.name.clone(),
                    node,
                    default,
                });
            }
            let mut by_name: Vec<usize> = (0..fields.len()).collect();
            by_name.sort_by(|&a, &b| fields[a].name.cmp(&fields[b].name));
            let node = Node::Record(Arc::new(RecordNode {
                name: r.name.fullname(None),
                fields,
                by_name,
            }));
            names.insert(r.name.clone(), Some(node.clone()));
            node
        }
        Schema::Ref { name } => match names.get(name) {
            Some(Some(node)) => node.clone(),
            Some(None) => return Err(format!("recursive type `{name}` is not supported")),
            None => return Err(format!("unknown type `{name}`")),
        },
        Schema::Decimal(_) | Schema::BigDecimal | Schema::Duration => {
            return Err(format!(
                "logical type `{schema}` is not supported in nexus schemas"
            ))
        }
    })
}

/// How to read a value written with one schema so it looks as if written with another.
#[derive(Debug, Clone)]
pub(crate) enum Plan {
    /// Read the writer's value as is (writer and reader agree).
    Same(Node),
    /// int or long read as a JSON float (promotion to float/double).
    IntToFloat,
    LongToFloat,
    FloatToDouble,
    /// string read as bytes (base64 in JSON) or bytes read as string (must be UTF-8).
    StringToBytes,
    BytesToString,
    /// Writer symbol index to reader symbol; `None` = unknown to the reader and no default.
    Enum(Arc<Vec<Option<String>>>),
    Array(Box<Plan>),
    Map(Box<Plan>),
    /// Writer union: a plan per writer branch; `Err` = the reader cannot take that branch.
    WriterUnion(Vec<Result<Plan, String>>),
    Record(Arc<RecordPlan>),
}

#[derive(Debug)]
pub(crate) struct RecordPlan {
    /// Writer fields in order: read into a reader field, or skip.
    pub steps: Vec<Step>,
    /// Reader fields the writer lacks, with their defaults.
    pub defaults: Vec<(String, Value)>,
}

#[derive(Debug)]
pub(crate) enum Step {
    Read(String, Plan),
    Skip(Node),
}

impl Plan {
    /// The Avro resolution rules, from the specification's "Schema Resolution" section.
    pub(crate) fn build(writer: &Node, reader: &Node) -> Result<Plan, String> {
        use Node as N;
        Ok(match (writer, reader) {
            (N::Union(wb), _) => {
                Plan::WriterUnion(wb.iter().map(|w| Plan::build(w, reader)).collect())
            }
            (_, N::Union(rb)) => {
                // The first reader branch that matches the writer's type (exact kind first).
                let exact = rb
                    .iter()
                    .find(|r| std::mem::discriminant(*r) == std::mem::discriminant(writer));
                let candidates = exact.into_iter().chain(rb.iter());
                let mut last = None;
                for r in candidates {
                    match Plan::build(writer, r) {
                        Ok(p) => return Ok(p),
                        Err(e) => last = Some(e),
                    }
                }
                return Err(last.unwrap_or_else(|| "empty union".into()));
            }
            (N::Null, N::Null)
            | (N::Boolean, N::Boolean)
            | (N::Int, N::Int)
            | (N::Long, N::Long)
            | (N::Float, N::Float)
            | (N::Double, N::Double)
            | (N::Bytes, N::Bytes)
            | (N::String, N::String)
            | (N::Uuid, N::Uuid)
            | (N::Uuid, N::String)
            | (N::TimestampMillis, N::TimestampMillis)
            | (N::TimestampMillis, N::Long)
            | (N::Long, N::TimestampMillis)
            | (N::Int, N::Long) => Plan::Same(writer.clone()),
            // The same bytes, read as the reader's uuid: checked as one.
            (N::String, N::Uuid) => Plan::Same(N::Uuid),
            (N::Int, N::Float | N::Double) => Plan::IntToFloat,
            (N::Long | N::TimestampMillis, N::Float | N::Double) => Plan::LongToFloat,
            (N::Float, N::Double) => Plan::FloatToDouble,
            (N::String | N::Uuid, N::Bytes) => Plan::StringToBytes,
            (N::Bytes, N::String) => Plan::BytesToString,
            (N::Fixed(a), N::Fixed(b)) if a == b => Plan::Same(writer.clone()),
            (N::Enum(w), N::Enum(r)) => Plan::Enum(Arc::new(
                w.symbols
                    .iter()
                    .map(|s| {
                        if r.symbols.contains(s) {
                            Some(s.clone())
                        } else {
                            r.default.map(|i| r.symbols[i].clone())
                        }
                    })
                    .collect(),
            )),
            (N::Array(w), N::Array(r)) => Plan::Array(Box::new(Plan::build(w, r)?)),
            (N::Map(w), N::Map(r)) => Plan::Map(Box::new(Plan::build(w, r)?)),
            (N::Record(w), N::Record(r)) => {
                if short(&w.name) != short(&r.name) {
                    return Err(format!("record {} cannot be read as {}", w.name, r.name));
                }
                let mut steps = Vec::with_capacity(w.fields.len());
                for wf in &w.fields {
                    match r.fields.iter().find(|rf| rf.name == wf.name) {
                        Some(rf) => steps.push(Step::Read(
                            wf.name.clone(),
                            Plan::build(&wf.node, &rf.node)
                                .map_err(|e| format!("field `{}`: {e}", wf.name))?,
                        )),
                        None => steps.push(Step::Skip(wf.node.clone())),
                    }
                }
                let mut defaults = Vec::new();
                for rf in &r.fields {
                    if !w.fields.iter().any(|wf| wf.name == rf.name) {
                        let (json, _) = rf.default.as_ref().ok_or_else(|| {
                            format!(
                                "field `{}` is new in {} and has no default",
                                rf.name, r.name
                            )
                        })?;
                        defaults.push((rf.name.clone(), json.clone()));
                    }
                }
                Plan::Record(Arc::new(RecordPlan { steps, defaults }))
            }
            (w, r) => return Err(format!("{} cannot be read as {}", w.kind(), r.kind())),
        })
    }
}

fn short(full: &str) -> &str {
    full.rsplit_once('.').map(|(_, n)| n).unwrap_or(full)
}
