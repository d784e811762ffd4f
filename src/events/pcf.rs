//! Avro Parsing Canonical Form and the CRC-64-AVRO (Rabin) fingerprint, computed from schema JSON.
//!
//! Why not `apache_avro::Schema::canonical_form`: in apache-avro 0.17 a logical type such as
//! `{"type":"string","logicalType":"uuid"}` canonicalises to `{"type":"string"}` instead of
//! `"string"`, so its fingerprints differ from Java, Python (fastavro) and the spec. This module
//! follows the spec's transformation rules ([PRIMITIVES], [FULLNAMES], [STRIP], [ORDER],
//! [STRINGS], [INTEGERS], [WHITESPACE]) on the composed JSON instead.

use serde_json::Value;

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// The Parsing Canonical Form of a schema given as JSON. Errors name what is malformed; a schema
/// that apache-avro accepts never fails here.
pub(crate) fn canonical_form(schema: &Value) -> Result<String, String> {
    let mut out = String::with_capacity(1024);
    write(schema, "", &mut out)?;
    Ok(out)
}

fn write(schema: &Value, namespace: &str, out: &mut String) -> Result<(), String> {
    match schema {
        Value::String(name) => {
            if PRIMITIVES.contains(&name.as_str()) {
                push_str(out, name);
            } else {
                push_str(out, &full_name(name, None, namespace));
            }
            Ok(())
        }
        Value::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(b, namespace, out)?;
            }
            out.push(']');
            Ok(())
        }
        Value::Object(map) => {
            let ty = map.get("type").ok_or("schema object without `type`")?;
            let ty = match ty {
                Value::String(t) => t.as_str(),
                // `{"type": {...}}` wraps another schema.
                other => return write(other, namespace, out),
            };
            match ty {
                "record" | "error" | "enum" | "fixed" => {
                    let name = map
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or("named type without `name`")?;
                    let ns = map.get("namespace").and_then(Value::as_str);
                    let full = full_name(name, ns, namespace);
                    let inner_ns = full
                        .rsplit_once('.')
                        .map(|(ns, _)| ns)
                        .unwrap_or("")
                        .to_owned();
                    out.push_str("{\"name\":");
                    push_str(out, &full);
                    out.push_str(",\"type\":");
                    push_str(out, if ty == "error" { "record" } else { ty });
                    match ty {
                        "enum" => {
                            let symbols = map
                                .get("symbols")
                                .and_then(Value::as_array)
                                .ok_or("enum without `symbols`")?;
                            out.push_str(",\"symbols\":[");
                            for (i, s) in symbols.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                push_str(out, s.as_str().ok_or("enum symbol is not a string")?);
                            }
                            out.push(']');
                        }
                        "fixed" => {
                            let size = match map.get("size") {
                                Some(Value::Number(n)) => n.as_u64(),
                                Some(Value::String(s)) => s.parse().ok(),
                                _ => None,
                            }
                            .ok_or("fixed without a valid `size`")?;
                            out.push_str(&format!(",\"size\":{size}"));
                        }
                        _ => {
                            let fields = map
                                .get("fields")
                                .and_then(Value::as_array)
                                .ok_or("record without `fields`")?;
                            out.push_str(",\"fields\":[");
                            for (i, field) in fields.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let fname = field
                                    .get("name")
                                    .and_then(Value::as_str)
                                    .ok_or("field without `name`")?;
                                let ftype = field.get("type").ok_or("field without `type`")?;
                                out.push_str("{\"name\":");
                                push_str(out, fname);
                                out.push_str(",\"type\":");
                                write(ftype, &inner_ns, out)?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                    Ok(())
                }
                "array" => {
                    out.push_str("{\"type\":\"array\",\"items\":");
                    write(
                        map.get("items").ok_or("array without `items`")?,
                        namespace,
                        out,
                    )?;
                    out.push('}');
                    Ok(())
                }
                "map" => {
                    out.push_str("{\"type\":\"map\",\"values\":");
                    write(
                        map.get("values").ok_or("map without `values`")?,
                        namespace,
                        out,
                    )?;
                    out.push('}');
                    Ok(())
                }
                // A primitive, possibly annotated with a logical type: reduce to its name.
                other => write(&Value::String(other.to_owned()), namespace, out),
            }
        }
        other => Err(format!("not a schema: {other}")),
    }
}

fn full_name(name: &str, explicit_ns: Option<&str>, enclosing: &str) -> String {
    if name.contains('.') {
        return name.to_owned();
    }
    match explicit_ns.unwrap_or(enclosing) {
        "" => name.to_owned(),
        ns => format!("{ns}.{name}"),
    }
}

fn push_str(out: &mut String, s: &str) {
    // Names and symbols are `[A-Za-z0-9_.]`; serde_json escapes anything else as JSON requires.
    out.push_str(&Value::String(s.to_owned()).to_string());
}

/// The empty value of CRC-64-AVRO (the Avro specification's `EMPTY`).
const EMPTY: u64 = 0xc15d_213a_a4d7_a795;

static TABLE: std::sync::LazyLock<[u64; 256]> = std::sync::LazyLock::new(|| {
    let mut table = [0u64; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let mut fp = i as u64;
        for _ in 0..8 {
            fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
        }
        *slot = fp;
    }
    table
});

/// CRC-64-AVRO of bytes (normally a Parsing Canonical Form), as the spec's 64-bit value; the
/// single-object encoding writes it little-endian.
pub(crate) fn crc64_avro(bytes: &[u8]) -> u64 {
    let table = &*TABLE;
    let mut fp = EMPTY;
    for &b in bytes {
        fp = (fp >> 8) ^ table[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn logical_types_reduce_to_primitives_and_names_are_qualified() {
        let s = json!({"type":"record","name":"X","namespace":"nexus","doc":"d","fields":[
            {"name":"a","type":{"type":"string","logicalType":"uuid"},"doc":"x"},
            {"name":"e","type":{"type":"enum","name":"K","symbols":["A","B"],"default":"A"}},
            {"name":"e2","type":["null","K"],"default":null},
            {"name":"r","type":{"type":"record","name":"R","namespace":"other","fields":[
                {"name":"z","type":{"type":"array","items":{"type":"enum","name":"Z","symbols":["Q"]}}}]}}]});
        assert_eq!(
            canonical_form(&s).unwrap(),
            r#"{"name":"nexus.X","type":"record","fields":[{"name":"a","type":"string"},{"name":"e","type":{"name":"nexus.K","type":"enum","symbols":["A","B"]}},{"name":"e2","type":["null","nexus.K"]},{"name":"r","type":{"name":"other.R","type":"record","fields":[{"name":"z","type":{"type":"array","items":{"name":"other.Z","type":"enum","symbols":["Q"]}}}]}}]}"#
        );
    }

    #[test]
    fn crc64_matches_reference_values() {
        // Reference values from the Java/Python implementations (fastavro.schema.fingerprint).
        assert_eq!(
            crc64_avro(b"\"int\""),
            u64::from_le_bytes(hex8("8f5c393f1ad57572"))
        );
        assert_eq!(
            crc64_avro(b"\"string\""),
            u64::from_le_bytes(hex8("c70345637248018f"))
        );
    }

    #[test]
    fn crc64_agrees_with_apache_avro_where_its_canonical_form_is_right() {
        use apache_avro::rabin::Rabin;
        let text = r#"{"type":"record","name":"nexus.Y","fields":[{"name":"a","type":"long"},{"name":"b","type":{"type":"map","values":"string"}}]}"#;
        let schema = apache_avro::Schema::parse_str(text).unwrap();
        let theirs = schema.fingerprint::<Rabin>().bytes;
        let pcf = canonical_form(&serde_json::from_str(text).unwrap()).unwrap();
        assert_eq!(pcf, schema.canonical_form());
        assert_eq!(crc64_avro(pcf.as_bytes()).to_le_bytes().to_vec(), theirs);
    }

    fn hex8(s: &str) -> [u8; 8] {
        let mut out = [0u8; 8];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
