//! Conversion between JSON values and Avro binary, guided by the compiled schema.
//!
//! JSON mapping (both directions): null, boolean, numbers for int/long/float/double, strings for
//! string and enum symbols, `bytes`/`fixed` as standard base64 text, arrays, objects for maps and
//! records. A union takes the plain JSON value (no `{"type": value}` wrapper): `null` picks the
//! null branch, anything else the first branch that accepts it. Logical types: `uuid` is the
//! hyphenated text (normalised to lower case), `timestamp-millis` is a number of milliseconds
//! (an RFC 3339 string is accepted on input). Writing fails with the path of the offending field;
//! reading fails with a message only (the bytes, not the caller, are at fault).

use std::cmp::Ordering;

use serde_json::{Map, Number, Value};

use super::codec::EncodeError;
use super::node::{FieldNode, Node, Plan, RecordNode, RecordPlan, Step};

/// Where a value sits in the input, built on the stack and rendered only for an error.
#[derive(Clone, Copy)]
pub(crate) enum Path<'a> {
    Root(&'a str),
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
    Key(&'a Path<'a>, &'a str),
}

impl Path<'_> {
    pub(crate) fn render(&self) -> String {
        match self {
            Path::Root(r) => (*r).to_owned(),
            Path::Field(p, f) => {
                let parent = p.render();
                if parent.is_empty() {
                    (*f).to_owned()
                } else {
                    format!("{parent}.{f}")
                }
            }
            Path::Index(p, i) => format!("{}[{i}]", p.render()),
            Path::Key(p, k) => format!("{}[{k:?}]", p.render()),
        }
    }

    fn err(&self, message: impl Into<String>) -> EncodeError {
        EncodeError::Invalid {
            path: self.render(),
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Records with at most this many fields match keys to fields on the stack.
const MATCH_ON_STACK: usize = 32;

/// Writes the fields of `record` (from `skip` on) from a JSON object: a missing field takes its
/// default, a missing field without default or a key the schema lacks is an error (reported
/// after the fields' own errors, in schema order), but for keys in `ignore` (fields of a later
/// version holding their defaults, when an earlier one is written: see `Registry::writer_for`).
pub(crate) fn write_record_fields(
    record: &RecordNode,
    skip: usize,
    obj: &Map<String, Value>,
    path: &Path<'_>,
    out: &mut Vec<u8>,
    ignore: &[(String, Value)],
) -> Result<(), EncodeError> {
    let fields = record.fields.get(skip..).unwrap_or_default();
    if record.fields.len() > MATCH_ON_STACK {
        return write_looked_up(record, fields, obj, path, out, ignore);
    }
    let mut values: [Option<&Value>; MATCH_ON_STACK] = [None; MATCH_ON_STACK];
    let mut unknown = None;
    // Keys and `by_name` are both in name order, so each key is found by moving forward (a
    // binary search per key measured 25 % slower on the encode bench); a key out of that order
    // (a map that keeps insertion order) is searched for instead.
    let name = |i: usize| record.fields[record.by_name[i]].name.as_str();
    let mut j = 0;
    for (k, v) in obj {
        // One comparison per field passed (names are compared often: each is a `memcmp`).
        let mut at = None;
        while j < record.by_name.len() {
            match name(j).cmp(k) {
                Ordering::Less => j += 1,
                Ordering::Equal => {
                    at = Some(j);
                    j += 1;
                    break;
                }
                Ordering::Greater => break,
            }
        }
        let at = at.or_else(|| {
            record
                .by_name
                .binary_search_by(|&i| record.fields[i].name.as_str().cmp(k))
                .ok()
        });
        match at.map(|i| record.by_name[i]).filter(|&i| i >= skip) {
            Some(i) => values[i] = Some(v),
            None if ignored(ignore, k) => {}
            None => {
                unknown.get_or_insert(k);
            }
        }
    }
    for (i, field) in fields.iter().enumerate() {
        write_field(field, values[skip + i], path, out)?;
    }
    match unknown {
        Some(k) => Err(Path::Field(path, k).err(format!("unknown field (not in {})", record.name))),
        None => Ok(()),
    }
}

/// [`write_record_fields`] for records too large to match on the stack: a lookup per field.
fn write_looked_up(
    record: &RecordNode,
    fields: &[FieldNode],
    obj: &Map<String, Value>,
    path: &Path<'_>,
    out: &mut Vec<u8>,
    ignore: &[(String, Value)],
) -> Result<(), EncodeError> {
    let mut seen = 0usize;
    for field in fields {
        let v = obj.get(&field.name);
        seen += usize::from(v.is_some());
        write_field(field, v, path, out)?;
    }
    if seen != obj.len() {
        if let Some(k) = obj
            .keys()
            .find(|k| !fields.iter().any(|f: &FieldNode| &f.name == *k) && !ignored(ignore, k))
        {
            return Err(Path::Field(path, k).err(format!("unknown field (not in {})", record.name)));
        }
    }
    Ok(())
}

fn ignored(ignore: &[(String, Value)], key: &str) -> bool {
    ignore.iter().any(|(k, _)| k == key)
}

/// Writes one field's value, or its default when the object lacks it.
fn write_field(
    field: &FieldNode,
    v: Option<&Value>,
    path: &Path<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let fpath = Path::Field(path, &field.name);
    match (v, &field.default) {
        (Some(v), _) => write_value(&field.node, v, &fpath, out),
        (None, Some((_, bytes))) => {
            out.extend_from_slice(bytes);
            Ok(())
        }
        (None, None) => Err(fpath.err(format!(
            "missing required field of type {}",
            describe(&field.node)
        ))),
    }
}

/// Writes one JSON value as `node`.
pub(crate) fn write_value(
    node: &Node,
    v: &Value,
    path: &Path<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    match (node, v) {
        (Node::Null, Value::Null) => {}
        (Node::Boolean, Value::Bool(b)) => out.push(u8::from(*b)),
        (Node::Int, Value::Number(n)) => {
            let i = n
                .as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| path.err(format!("expected int (32-bit integer), got {n}")))?;
            write_long(i64::from(i), out);
        }
        (Node::Long, Value::Number(n)) | (Node::TimestampMillis, Value::Number(n)) => {
            let i = n.as_i64().ok_or_else(|| {
                path.err(format!(
                    "expected {} (64-bit integer), got {n}",
                    node.kind()
                ))
            })?;
            write_long(i, out);
        }
        (Node::TimestampMillis, Value::String(s)) => {
            let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
                path.err(format!(
                    "expected milliseconds or an RFC 3339 timestamp: {e}"
                ))
            })?;
            write_long(t.timestamp_millis(), out);
        }
        (Node::Float, Value::Number(n)) => {
            let f = n.as_f64().ok_or_else(|| path.err("expected float"))?;
            // `as` would turn 1e39 into infinity, which no reader accepts back.
            if f.abs() > f64::from(f32::MAX) {
                return Err(path.err("number out of the float range"));
            }
            out.extend_from_slice(&(f as f32).to_le_bytes());
        }
        (Node::Double, Value::Number(n)) => {
            let f = n.as_f64().ok_or_else(|| path.err("expected double"))?;
            out.extend_from_slice(&f.to_le_bytes());
        }
        (Node::String, Value::String(s)) => write_bytes(s.as_bytes(), out),
        (Node::Uuid, Value::String(s)) => {
            let u =
                uuid::Uuid::parse_str(s).map_err(|e| path.err(format!("expected a UUID: {e}")))?;
            // 36 characters that parse are the hyphenated form: written as they are unless
            // upper case (what nexus itself writes is not).
            if s.len() == 36 && !s.bytes().any(|b| b.is_ascii_uppercase()) {
                write_bytes(s.as_bytes(), out);
            } else {
                let mut buf = uuid::Uuid::encode_buffer();
                write_bytes(u.hyphenated().encode_lower(&mut buf).as_bytes(), out);
            }
        }
        (Node::Bytes, Value::String(s)) => {
            let b = base64_decode(s).ok_or_else(|| path.err("expected base64 text"))?;
            write_bytes(&b, out);
        }
        (Node::Fixed(size), Value::String(s)) => {
            let b = base64_decode(s).ok_or_else(|| path.err("expected base64 text"))?;
            if b.len() != *size {
                return Err(path.err(format!("expected {size} bytes, got {}", b.len())));
            }
            out.extend_from_slice(&b);
        }
        (Node::Enum(e), Value::String(s)) => {
            let i = e.symbols.iter().position(|x| x == s).ok_or_else(|| {
                path.err(format!(
                    "unknown symbol `{s}`, expected one of {}",
                    e.symbols.join(", ")
                ))
            })?;
            write_long(i as i64, out);
        }
        (Node::Array(items), Value::Array(a)) => {
            if !a.is_empty() {
                write_long(a.len() as i64, out);
                for (i, item) in a.iter().enumerate() {
                    write_value(items, item, &Path::Index(path, i), out)?;
                }
            }
            out.push(0);
        }
        (Node::Map(values), Value::Object(m)) => {
            if !m.is_empty() {
                write_long(m.len() as i64, out);
                for (k, item) in m {
                    write_bytes(k.as_bytes(), out);
                    write_value(values, item, &Path::Key(path, k), out)?;
                }
            }
            out.push(0);
        }
        (Node::Record(r), Value::Object(m)) => write_record_fields(r, 0, m, path, out, &[])?,
        (Node::Union(branches), v) => write_union(branches, v, path, out)?,
        (node, v) => {
            return Err(path.err(format!("expected {}, got {}", describe(node), json_kind(v))))
        }
    }
    Ok(())
}

fn write_union(
    branches: &[Node],
    v: &Value,
    path: &Path<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if v.is_null() {
        let i = branches
            .iter()
            .position(|b| matches!(b, Node::Null))
            .ok_or_else(|| path.err(format!("expected {}, got null", describe_union(branches))))?;
        write_long(i as i64, out);
        return Ok(());
    }
    let mut candidates = branches
        .iter()
        .enumerate()
        .filter(|(_, b)| !matches!(b, Node::Null));
    // The common `["null", T]`: write directly so a nested error keeps its own path.
    if branches.len() == 2 && branches.iter().any(|b| matches!(b, Node::Null)) {
        if let Some((i, b)) = candidates.next() {
            write_long(i as i64, out);
            return write_value(b, v, path, out);
        }
    }
    let mark = out.len();
    for (i, b) in candidates {
        write_long(i as i64, out);
        if write_value(b, v, path, out).is_ok() {
            return Ok(());
        }
        out.truncate(mark);
    }
    Err(path.err(format!(
        "expected {}, got {}",
        describe_union(branches),
        json_kind(v)
    )))
}

/// A default in nexus's JSON form: Avro writes `bytes`/`fixed` defaults as strings of code points
/// 0-255, and a union's default belongs to its first branch.
pub(crate) fn normalize_default(node: &Node, v: &Value) -> Result<Value, String> {
    Ok(match (node, v) {
        (Node::Union(b), v) => normalize_default(b.first().ok_or("empty union")?, v)?,
        (Node::Bytes | Node::Fixed(_), Value::String(s)) => {
            let bytes: Option<Vec<u8>> =
                s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
            Value::String(base64_encode(
                &bytes.ok_or("bytes default has a code point above 255")?,
            ))
        }
        (Node::Array(items), Value::Array(a)) => Value::Array(
            a.iter()
                .map(|x| normalize_default(items, x))
                .collect::<Result<_, _>>()?,
        ),
        (Node::Map(values), Value::Object(m)) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), normalize_default(values, x)?)))
                .collect::<Result<_, String>>()?,
        ),
        (Node::Record(r), Value::Object(m)) => {
            let mut out = Map::new();
            for f in &r.fields {
                let x = match (m.get(&f.name), &f.default) {
                    (Some(x), _) => normalize_default(&f.node, x)?,
                    (None, Some((d, _))) => d.clone(),
                    (None, None) => return Err(format!("record default lacks field `{}`", f.name)),
                };
                out.insert(f.name.clone(), x);
            }
            Value::Object(out)
        }
        (_, v) => v.clone(),
    })
}

/// Writes a normalised default; a union's default is written as its first branch.
pub(crate) fn write_default(node: &Node, v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    let root = Path::Root("default");
    match node {
        Node::Union(b) => {
            out.push(0); // branch index 0, zig-zag encoded
            write_value(b.first().ok_or("empty union")?, v, &root, out)
        }
        _ => write_value(node, v, &root, out),
    }
    .map_err(|e| e.to_string())
}

pub(crate) fn write_long(v: i64, out: &mut Vec<u8>) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

pub(crate) fn write_bytes(b: &[u8], out: &mut Vec<u8>) {
    write_long(b.len() as i64, out);
    out.extend_from_slice(b);
}

fn describe(node: &Node) -> String {
    match node {
        Node::Union(b) => describe_union(b),
        Node::Enum(e) => format!("enum {}", e.name),
        Node::Record(r) => format!("record {} (object)", r.name),
        other => other.kind().to_owned(),
    }
}

fn describe_union(branches: &[Node]) -> String {
    let kinds: Vec<String> = branches.iter().map(describe).collect();
    format!("one of [{}]", kinds.join(", "))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// What a read produces. [`Value`] builds the JSON value; `()` builds nothing: it walks the
/// same code with the same checks and errors, so bytes that pass it are known to decode (the
/// lazy event body relies on that) without a single allocation.
pub(crate) trait Out: Sized {
    /// An array or object being filled.
    type Seq;
    type Obj;
    fn null() -> Self;
    fn bool(b: bool) -> Self;
    fn long(i: i64) -> Self;
    /// Fails for a non-finite number (JSON has no form for it), in both outputs.
    fn float(f: f64) -> Result<Self, String>;
    fn string(s: &str) -> Self;
    /// A `uuid` string, given back as nexus writes it, lowercase and hyphenated, so ids compare
    /// equal whoever wrote them.
    fn uuid(u: uuid::Uuid) -> Self;
    /// `bytes` and `fixed`: base64 text.
    fn bytes(b: &[u8]) -> Self;
    /// A default value from the reader schema.
    fn default(v: &Value) -> Self;
    fn seq() -> Self::Seq;
    fn push(seq: &mut Self::Seq, v: Self);
    fn array(seq: Self::Seq) -> Self;
    fn obj(capacity: usize) -> Self::Obj;
    fn insert(obj: &mut Self::Obj, key: &str, v: Self);
    fn object(obj: Self::Obj) -> Self;
}

impl Out for Value {
    type Seq = Vec<Value>;
    /// Gathered first and built in one go: a sorted bulk build is cheaper than one B-tree
    /// insert per field; as with inserts, a later duplicate name wins.
    type Obj = Vec<(String, Value)>;
    fn null() -> Self {
        Value::Null
    }
    fn bool(b: bool) -> Self {
        Value::Bool(b)
    }
    fn long(i: i64) -> Self {
        Value::Number(i.into())
    }
    fn float(f: f64) -> Result<Self, String> {
        Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("non-finite number {f} has no JSON form"))
    }
    fn string(s: &str) -> Self {
        Value::String(s.to_owned())
    }
    fn uuid(u: uuid::Uuid) -> Self {
        let mut buf = uuid::Uuid::encode_buffer();
        Value::String(u.hyphenated().encode_lower(&mut buf).to_owned())
    }
    fn bytes(b: &[u8]) -> Self {
        Value::String(base64_encode(b))
    }
    fn default(v: &Value) -> Self {
        v.clone()
    }
    fn seq() -> Self::Seq {
        Vec::new()
    }
    fn push(seq: &mut Self::Seq, v: Self) {
        seq.push(v);
    }
    fn array(seq: Self::Seq) -> Self {
        Value::Array(seq)
    }
    fn obj(capacity: usize) -> Self::Obj {
        Vec::with_capacity(capacity)
    }
    fn insert(obj: &mut Self::Obj, key: &str, v: Self) {
        obj.push((key.to_owned(), v));
    }
    fn object(obj: Self::Obj) -> Self {
        Value::Object(obj.into_iter().collect())
    }
}

impl Out for () {
    type Seq = ();
    type Obj = ();
    fn null() -> Self {}
    fn bool(_: bool) -> Self {}
    fn long(_: i64) -> Self {}
    fn float(f: f64) -> Result<Self, String> {
        finite(f)
    }
    fn string(_: &str) -> Self {}
    fn uuid(_: uuid::Uuid) -> Self {}
    fn bytes(_: &[u8]) -> Self {}
    fn default(_: &Value) -> Self {}
    fn seq() -> Self::Seq {}
    fn push(_: &mut Self::Seq, _: Self) {}
    fn array(_: Self::Seq) -> Self {}
    fn obj(_: usize) -> Self::Obj {}
    fn insert(_: &mut Self::Obj, _: &str, _: Self) {}
    fn object(_: Self::Obj) -> Self {}
}

/// The rule `Number::from_f64` applies, for the output that builds no number.
fn finite(f: f64) -> Result<(), String> {
    if f.is_finite() {
        Ok(())
    } else {
        Err(format!("non-finite number {f} has no JSON form"))
    }
}

/// Reads one value written with the plan's writer schema, shaped as its reader schema.
pub(crate) fn read<O: Out>(plan: &Plan, buf: &mut &[u8]) -> Result<O, String> {
    Ok(match plan {
        Plan::Same(node) => read_node(node, buf)?,
        Plan::IntToFloat | Plan::LongToFloat => O::float(read_long(buf)? as f64)?,
        Plan::FloatToDouble => O::float(f64::from(read_f32(buf)?))?,
        Plan::StringToBytes => O::bytes(read_slice(buf)?),
        Plan::BytesToString => O::string(read_str(buf)?),
        Plan::Enum(map) => {
            let i = read_long(buf)?;
            let sym = usize::try_from(i)
                .ok()
                .and_then(|i| map.get(i))
                .ok_or_else(|| format!("enum index {i} out of range"))?;
            O::string(
                sym.as_deref()
                    .ok_or_else(|| format!("enum symbol #{i} unknown to the reader"))?,
            )
        }
        Plan::Array(items) => {
            let mut out = O::seq();
            read_blocks(buf, |buf| {
                O::push(&mut out, read(items, buf)?);
                Ok(())
            })?;
            O::array(out)
        }
        Plan::Map(values) => {
            let mut out = O::obj(0);
            read_blocks(buf, |buf| {
                let k = read_str(buf)?;
                O::insert(&mut out, k, read(values, buf)?);
                Ok(())
            })?;
            O::object(out)
        }
        Plan::WriterUnion(branches) => {
            let i = read_long(buf)?;
            let branch = usize::try_from(i)
                .ok()
                .and_then(|i| branches.get(i))
                .ok_or_else(|| format!("union index {i} out of range"))?;
            read(branch.as_ref().map_err(Clone::clone)?, buf)?
        }
        Plan::Record(r) => read_record(r, buf)?,
    })
}

/// Reads a record into its reader-shaped object.
pub(crate) fn read_record<O: Out>(r: &RecordPlan, buf: &mut &[u8]) -> Result<O, String> {
    let mut fields = O::obj(r.steps.len() + r.defaults.len());
    for step in &r.steps {
        match step {
            Step::Read(name, p) => O::insert(&mut fields, name, read(p, buf)?),
            Step::Skip(node) => skip(node, buf)?,
        }
    }
    for (name, d) in &r.defaults {
        O::insert(&mut fields, name, O::default(d));
    }
    Ok(O::object(fields))
}

/// Reads a value with no resolution (writer schema = reader schema).
pub(crate) fn read_node<O: Out>(node: &Node, buf: &mut &[u8]) -> Result<O, String> {
    Ok(match node {
        Node::Null => O::null(),
        Node::Boolean => match take(buf, 1)?[0] {
            0 => O::bool(false),
            1 => O::bool(true),
            b => return Err(format!("invalid boolean byte {b}")),
        },
        Node::Int => {
            let i = read_long(buf)?;
            i32::try_from(i).map_err(|_| format!("int out of range: {i}"))?;
            O::long(i)
        }
        Node::Long | Node::TimestampMillis => O::long(read_long(buf)?),
        Node::Float => O::float(f64::from(read_f32(buf)?))?,
        Node::Double => {
            let b = take(buf, 8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            O::float(f64::from_le_bytes(a))?
        }
        Node::String => O::string(read_str(buf)?),
        Node::Uuid => O::uuid(read_uuid(buf)?),
        Node::Bytes => O::bytes(read_slice(buf)?),
        Node::Fixed(n) => O::bytes(take(buf, *n)?),
        Node::Enum(e) => {
            let i = read_long(buf)?;
            let sym = usize::try_from(i)
                .ok()
                .and_then(|i| e.symbols.get(i))
                .ok_or_else(|| format!("enum index {i} out of range for {}", e.name))?;
            O::string(sym)
        }
        Node::Array(items) => {
            let mut out = O::seq();
            read_blocks(buf, |buf| {
                O::push(&mut out, read_node(items, buf)?);
                Ok(())
            })?;
            O::array(out)
        }
        Node::Map(values) => {
            let mut out = O::obj(0);
            read_blocks(buf, |buf| {
                let k = read_str(buf)?;
                O::insert(&mut out, k, read_node(values, buf)?);
                Ok(())
            })?;
            O::object(out)
        }
        Node::Union(branches) => {
            let i = read_long(buf)?;
            let b = usize::try_from(i)
                .ok()
                .and_then(|i| branches.get(i))
                .ok_or_else(|| format!("union index {i} out of range"))?;
            read_node(b, buf)?
        }
        Node::Record(r) => {
            let mut fields = O::obj(r.fields.len());
            for f in &r.fields {
                O::insert(&mut fields, &f.name, read_node(&f.node, buf)?);
            }
            O::object(fields)
        }
    })
}

/// Skips a value of a writer field the reader does not have.
pub(crate) fn skip(node: &Node, buf: &mut &[u8]) -> Result<(), String> {
    match node {
        Node::Null => {}
        Node::Boolean => {
            take(buf, 1)?;
        }
        Node::Int | Node::Long | Node::TimestampMillis | Node::Enum(_) => {
            read_long(buf)?;
        }
        Node::Float => {
            take(buf, 4)?;
        }
        Node::Double => {
            take(buf, 8)?;
        }
        Node::Bytes | Node::String | Node::Uuid => {
            read_slice(buf)?;
        }
        Node::Fixed(n) => {
            take(buf, *n)?;
        }
        Node::Array(items) => read_blocks(buf, |buf| skip(items, buf))?,
        Node::Map(values) => read_blocks(buf, |buf| {
            read_slice(buf)?;
            skip(values, buf)
        })?,
        Node::Union(branches) => {
            let i = read_long(buf)?;
            let b = usize::try_from(i)
                .ok()
                .and_then(|i| branches.get(i))
                .ok_or_else(|| format!("union index {i} out of range"))?;
            skip(b, buf)?;
        }
        Node::Record(r) => {
            for f in &r.fields {
                skip(&f.node, buf)?;
            }
        }
    }
    Ok(())
}

/// Array and map blocks: a count, (if negative: its absolute value, then the block's byte size),
/// items; a zero count ends the sequence.
fn read_blocks(
    buf: &mut &[u8],
    mut item: impl FnMut(&mut &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    loop {
        let mut count = read_long(buf)?;
        if count == 0 {
            return Ok(());
        }
        if count < 0 {
            count = count.checked_neg().ok_or("invalid block count")?;
            read_long(buf)?;
        }
        // Every item takes at least one byte except nulls; this bounds hostile counts.
        if count as u64 > buf.len() as u64 + 1 {
            return Err(format!("block count {count} exceeds the remaining input"));
        }
        for _ in 0..count {
            item(buf)?;
        }
    }
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if buf.len() < n {
        return Err("unexpected end of input".into());
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

/// Called for every length, number, union branch and enum symbol: its one-byte case is inlined
/// where it is called (a few instructions), the rest is a call.
#[inline]
pub(crate) fn read_long(buf: &mut &[u8]) -> Result<i64, String> {
    let z = match buf.split_first() {
        // One byte: small numbers, and most lengths, union branches and enum symbols.
        Some((&b, rest)) if b < 0x80 => {
            *buf = rest;
            u64::from(b)
        }
        _ => read_varint(buf)?,
    };
    Ok((z >> 1) as i64 ^ -((z & 1) as i64))
}

/// A varint of any length, before zig-zag decoding.
#[inline(never)]
fn read_varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut z: u64 = 0;
    for shift in (0..70).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or("unexpected end of input")?;
        *buf = rest;
        if shift == 63 && b > 1 {
            return Err("varint overflows 64 bits".into());
        }
        z |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(z);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn read_f32(buf: &mut &[u8]) -> Result<f32, String> {
    let b = take(buf, 4)?;
    Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_slice<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = read_long(buf)?;
    let len = usize::try_from(len).map_err(|_| format!("negative length {len}"))?;
    take(buf, len)
}

pub(crate) fn read_str<'a>(buf: &mut &'a [u8]) -> Result<&'a str, String> {
    std::str::from_utf8(read_slice(buf)?).map_err(|_| "string is not valid UTF-8".into())
}

/// A `uuid` string: RFC 4122 text (what other Avro readers refuse is refused here too).
pub(crate) fn read_uuid(buf: &mut &[u8]) -> Result<uuid::Uuid, String> {
    let text = read_slice(buf)?;
    // Text that parses is ASCII, so valid UTF-8: no separate check. What does not parse fails
    // as it did with that check first.
    uuid::Uuid::try_parse_ascii(text).or_else(|_| {
        let s = std::str::from_utf8(text).map_err(|_| "string is not valid UTF-8")?;
        uuid::Uuid::parse_str(s).map_err(|e| format!("not a UUID: {e}"))
    })
}

// ---------------------------------------------------------------------------------------------
// base64 (standard alphabet, padded), for bytes and fixed values

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (ci, chunk) in s.chunks(4).enumerate() {
        let last = ci + 1 == s.len() / 4;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            let v = B64.iter().position(|&x| x == c)? as u32;
            n = (n << 6) | v;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_round_trips() {
        for v in [
            0i64,
            -1,
            1,
            63,
            -64,
            64,
            i32::MAX as i64,
            i64::MAX,
            i64::MIN,
        ] {
            let mut out = Vec::new();
            write_long(v, &mut out);
            let mut s = out.as_slice();
            assert_eq!(read_long(&mut s).unwrap(), v);
            assert!(s.is_empty());
        }
        let mut out = Vec::new();
        write_long(-3, &mut out);
        assert_eq!(out, [5]);
    }

    #[test]
    fn base64_round_trips() {
        for data in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0, 255, 128],
        ] {
            let e = base64_encode(data);
            assert_eq!(base64_decode(&e).as_deref(), Some(data));
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert!(base64_decode("Zm9=v").is_none());
        assert!(base64_decode("Z=8=").is_none());
    }
}
