//! Codec and registry tests: every event type round-trips, bad input is rejected with the field
//! path, and a newer schema version reads older data.

use serde_json::{json, Map, Value};

use super::*;

fn body(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("body must be an object"),
    }
}

fn message_received() -> Event {
    Event::new(
        "MessageReceived",
        "tenant-acme",
        "0190f5e2-7c1a-7d3e-9a41-5b8c2d9e0f11",
        "edge/messaging",
        body(json!({
            "message_id": "0190f5e2-7c1a-7d3e-9a41-5b8c2d9e0f12",
            "client_message_id": "app-msg-881",
            "channel": "MESSAGING",
            "channel_id": "ch-whatsapp-eu",
            "participant_id": "p-customer-1",
            "participant_kind": "CUSTOMER",
            "nickname": "Ada",
            "contact": {"first_name": "Ada", "email_address": "ada@example.com"},
            "kind": "TEXT",
            "text": "Where is my parcel?",
            "media_ids": ["m-1", "m-2"],
            "sent_at": 1_732_540_000_000i64,
        })),
    )
}

#[test]
fn builtin_registry_passes_its_own_check() {
    let r = Registry::builtin();
    assert!(r.event_types().len() >= 22, "{:?}", r.event_types());
    let report = r.check().unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(report.versions, r.all().len());
    assert_eq!(
        r.lock_file(),
        Registry::builtin_files()
            .iter()
            .find(|(p, _)| *p == "fingerprints.lock")
            .unwrap()
            .1
    );
}

#[test]
fn every_event_type_round_trips() {
    let r = Registry::builtin();
    for t in r.event_types() {
        let event = r.example(t).unwrap();
        let bytes = encode(&event).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(bytes[..2], codec::MARKER);
        // The version a writer picks for this body (the oldest that carries it).
        let (writer, _) = r.writer_for(t, &event.body).unwrap();
        assert_eq!(fingerprint_of(&bytes), Some(writer.fingerprint));
        let back = decode(&bytes).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(back, event, "{t}");
        // Minimal bodies (only required fields) round-trip too, with defaults filled in.
        let schema = r.latest(t).unwrap();
        let minimal: Map<String, Value> = event
            .body
            .iter()
            .filter(|(k, _)| {
                schema
                    .node
                    .fields
                    .iter()
                    .any(|f| &f.name == *k && f.default.is_none())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let small = Event {
            body: minimal.into(),
            ..event.clone()
        };
        let back = decode(&encode(&small).unwrap()).unwrap();
        assert_eq!(back.body.len(), schema.node.fields.len() - 1, "{t}");
    }
}

#[test]
fn realistic_message_round_trips_with_defaults() {
    let event = message_received();
    let bytes = encode(&event).unwrap();
    assert!(bytes.len() < 400, "{} bytes", bytes.len());
    let back = decode(&bytes).unwrap();
    assert_eq!(back.envelope, event.envelope);
    assert_eq!(back.body["text"], "Where is my parcel?");
    assert_eq!(back.body["transcript_position"], Value::Null);
    assert_eq!(back.body["contact"]["last_name"], Value::Null);
    assert_eq!(back.body["contact"]["email_address"], "ada@example.com");
}

fn invalid_path(event: &Event) -> (String, String) {
    match encode(event) {
        Err(EncodeError::Invalid { path, message }) => (path, message),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn wrong_types_and_missing_or_unknown_fields_name_the_path() {
    let mut e = message_received();
    e.body.insert("text".into(), json!(42));
    assert_eq!(invalid_path(&e).0, "body.text");

    let mut e = message_received();
    e.body.insert("contact".into(), json!({"email_address": 7}));
    assert_eq!(invalid_path(&e).0, "body.contact.email_address");

    let mut e = message_received();
    e.body.insert("media_ids".into(), json!(["ok", null]));
    assert_eq!(invalid_path(&e).0, "body.media_ids[1]");

    let mut e = message_received();
    e.body.remove("participant_id");
    let (path, message) = invalid_path(&e);
    assert_eq!(path, "body.participant_id");
    assert!(message.contains("missing"), "{message}");

    let mut e = message_received();
    e.body.insert("colour".into(), json!("red"));
    let (path, message) = invalid_path(&e);
    assert_eq!(path, "body.colour");
    assert!(message.contains("unknown field"), "{message}");

    // Keys are matched to fields in one walk in name order: unknown keys before, between and
    // after the schema's names, and the envelope's own name, are all refused.
    for key in ["aaa", "client_message_idx", "zzz", "envelope"] {
        let mut e = message_received();
        e.body.insert(key.into(), json!("x"));
        assert_eq!(invalid_path(&e).0, format!("body.{key}"), "{key}");
    }

    // A field's own error comes before an unknown key's.
    let mut e = message_received();
    e.body.insert("aaa".into(), json!("x"));
    e.body.insert("text".into(), json!(42));
    assert_eq!(invalid_path(&e).0, "body.text");

    let mut e = message_received();
    e.body.insert("channel".into(), json!("CARRIER_PIGEON"));
    assert_eq!(invalid_path(&e).0, "body.channel");

    let mut e = message_received();
    e.body.insert("message_id".into(), json!("not-a-uuid"));
    assert_eq!(invalid_path(&e).0, "body.message_id");

    let mut e = message_received();
    e.body.insert("sent_at".into(), json!(1.5));
    assert_eq!(invalid_path(&e).0, "body.sent_at");

    let mut e = message_received();
    e.envelope.event_type = "NoSuchEvent".into();
    assert!(matches!(encode(&e), Err(EncodeError::UnknownEventType(_))));
}

#[test]
fn timestamps_accept_rfc3339_on_input() {
    let mut e = message_received();
    e.body
        .insert("sent_at".into(), json!("2024-11-25T12:00:00Z"));
    let back = decode(&encode(&e).unwrap()).unwrap();
    assert_eq!(back.body["sent_at"], json!(1_732_536_000_000i64));
}

#[test]
fn bad_payloads_are_rejected_with_a_reason() {
    assert!(matches!(decode(b""), Err(DecodeError::NotSingleObject)));
    assert!(matches!(
        decode(b"{\"json\":1}"),
        Err(DecodeError::NotSingleObject)
    ));

    let mut unknown = vec![0xC3, 0x01];
    unknown.extend_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
    unknown.push(0);
    let err = decode(&unknown).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::UnknownFingerprint(0x1234_5678_9abc_def0)
    ));
    assert_eq!(err.reason_code(), "unknown_fingerprint");

    let bytes = encode(&message_received()).unwrap();
    for cut in [11, bytes.len() / 2, bytes.len() - 1] {
        let err = decode(&bytes[..cut]).unwrap_err();
        assert!(matches!(err, DecodeError::Body(_)), "cut {cut}: {err:?}");
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(decode(&long), Err(DecodeError::Body(m)) if m.contains("trailing")));

    // Garbage after a valid header must never panic.
    let mut junk = bytes[..10].to_vec();
    junk.extend_from_slice(&[0xff; 40]);
    assert!(matches!(decode(&junk), Err(DecodeError::Body(_))));
}

/// A delivered body is decoded on first read, and `decode_lazy` accepts exactly the payloads
/// `decode` accepts: every cut and every single-byte change of a payload gets the same answer
/// from both, so a body that reaches a handler always decodes.
#[test]
fn lazy_bodies_decode_on_first_read_and_reject_what_decode_rejects() {
    let e = message_received();
    let bytes = encode(&e).unwrap();
    let lazy = decode_lazy(&bytes::Bytes::from(bytes.clone())).unwrap();
    assert_eq!(lazy.envelope, e.envelope);
    assert!(!lazy.body.is_decoded(), "not decoded before it is read");
    assert_eq!(lazy.body["text"], e.body["text"]);
    assert!(lazy.body.is_decoded());
    assert_eq!(lazy, decode(&bytes).unwrap());

    // Writes decode first; `into_map` on an unread body decodes too.
    let mut written = decode_lazy(&bytes::Bytes::from(bytes.clone())).unwrap();
    written.body.insert("nickname".into(), json!("Bea"));
    assert_eq!(written.body["nickname"], "Bea");
    assert_eq!(written.body["channel"], "MESSAGING");
    let unread = decode_lazy(&bytes::Bytes::from(bytes.clone())).unwrap();
    assert_eq!(
        unread.body.into_map(),
        decode(&bytes).unwrap().body.into_map()
    );

    let same = |b: &[u8], what: &str| {
        let lazy = decode_lazy(&bytes::Bytes::copy_from_slice(b));
        match (decode(b), lazy) {
            (Ok(eager), Ok(lazy)) => assert_eq!(lazy, eager, "{what}"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{what}"),
            (a, b) => panic!("{what}: decode {a:?} but decode_lazy {b:?}"),
        }
    };
    for cut in 0..bytes.len() {
        same(&bytes[..cut], &format!("cut at {cut}"));
    }
    let mut rejected = 0;
    for i in 0..bytes.len() {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff] {
            let mut b = bytes.clone();
            b[i] = v;
            rejected += usize::from(decode(&b).is_err());
            same(&b, &format!("byte {i} = {v:#x}"));
        }
    }
    assert!(
        rejected > bytes.len(),
        "the changes must reach the error paths"
    );
}

/// A `uuid` field another writer put in upper case reads as nexus writes it (lower case, so
/// ids compare equal); one that is no UUID at all is refused, as other Avro readers refuse it.
#[test]
fn uuid_fields_are_checked_and_read_in_canonical_form() {
    let e = message_received();
    let bytes = encode(&e).unwrap();
    let id = b"0190f5e2-7c1a-7d3e-9a41-5b8c2d9e0f12";
    let at = bytes
        .windows(id.len())
        .position(|w| w == id)
        .expect("the message id in the payload");
    let with = |text: &[u8; 36]| {
        let mut b = bytes.clone();
        b[at..at + 36].copy_from_slice(text);
        b
    };
    let upper = with(b"0190F5E2-7C1A-7D3E-9A41-5B8C2D9E0F12");
    let read = decode(&upper).unwrap();
    assert_eq!(read.body["message_id"], e.body["message_id"]);
    let lazy = decode_lazy(&bytes::Bytes::from(upper)).unwrap();
    assert_eq!(lazy.body["message_id"], e.body["message_id"]);
    let junk = with(b"not-a-uuid-at-all-but-36-chars-long!");
    let err = decode(&junk).unwrap_err().to_string();
    assert!(err.contains("message_id") || err.contains("UUID"), "{err}");
    assert!(decode_lazy(&bytes::Bytes::from(junk))
        .map(|l| l.body.into_map())
        .is_err());
}

#[test]
fn from_json_reads_the_ingest_shape_and_names_bad_fields() {
    let e = Event::from_json(&json!({
        "event_type": "TypingIndicated",
        "tenant_id": "t1",
        "conversation_id": "c1",
        "occurred_at": 1_732_540_000_000i64,
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "body": {"participant_id": "p1", "participant_kind": "CUSTOMER", "state": "STARTED"}
    }))
    .unwrap();
    assert_eq!(e.envelope.producer, "ingest");
    assert_eq!(e.envelope.occurred_at_ms, 1_732_540_000_000);
    let back = decode(&encode(&e).unwrap()).unwrap();
    assert_eq!(back, Event::from_json(&back.to_json()).unwrap());

    let bad = |v: Value| match Event::from_json(&v) {
        Err(EncodeError::Invalid { path, .. }) => path,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        bad(json!({"event_type": "TypingIndicated", "conversation_id": "c"})),
        "tenant_id"
    );
    assert_eq!(
        bad(
            json!({"event_type": "TypingIndicated", "tenant_id": "t", "conversation_id": "c", "event_id": "x"})
        ),
        "event_id"
    );
    assert_eq!(
        bad(
            json!({"event_type": "TypingIndicated", "tenant_id": "t", "conversation_id": "c", "traceparent": "nope"})
        ),
        "traceparent"
    );
    assert_eq!(
        bad(
            json!({"event_type": "TypingIndicated", "tenant_id": "t", "conversation_id": "c", "extra": 1})
        ),
        "extra"
    );
    assert!(matches!(
        Event::from_json(&json!({"event_type": "Nope", "tenant_id": "t", "conversation_id": "c"})),
        Err(EncodeError::UnknownEventType(_))
    ));
}

/// The built-in files plus extra (path, text) pairs: a test-only registry.
fn registry_with(extra: &[(&str, String)]) -> Result<Registry, Vec<SchemaError>> {
    let files = Registry::builtin_files()
        .iter()
        .map(|(p, t)| (*p, *t))
        .chain(extra.iter().map(|(p, t)| (*p, t.as_str())));
    Registry::from_sources(files)
}

fn typing_v1() -> Value {
    serde_json::from_str(
        Registry::builtin_files()
            .iter()
            .find(|(p, _)| *p == "events/typing_indicated/v1.avsc")
            .unwrap()
            .1,
    )
    .unwrap()
}

#[test]
fn a_v2_schema_reads_v1_data() {
    let mut v2 = typing_v1();
    let fields = v2["fields"].as_array_mut().unwrap();
    // Added with a default, an enum symbol added, an int→long style promotion via a new field.
    fields.push(json!({"name": "source_device", "type": ["null", "string"], "default": null, "doc": "Device."}));
    fields.push(
        json!({"name": "burst", "type": "long", "default": 1, "doc": "Keystroke burst count."}),
    );
    fields.iter_mut().find(|f| f["name"] == "state").unwrap()["type"]["symbols"]
        .as_array_mut()
        .unwrap()
        .push(json!("PAUSED"));
    // A removed field that had a default.
    fields.retain(|f| f["name"] != "preview");
    let r = registry_with(&[("events/typing_indicated/v2.avsc", v2.to_string())]).unwrap();
    assert_eq!(r.latest("TypingIndicated").unwrap().version, 2);

    // Written with v1 by the built-in registry, read by the v2 registry.
    let mut e = Registry::builtin().example("TypingIndicated").unwrap();
    e.body.insert("preview".into(), json!("Hel"));
    let v1_bytes = Registry::builtin().encode(&e).unwrap();
    let back = r.decode(&v1_bytes).unwrap();
    let lazy = r
        .decode_lazy(&bytes::Bytes::from(v1_bytes.clone()))
        .unwrap();
    assert!(!lazy.body.is_decoded());
    assert_eq!(
        lazy, back,
        "a lazy body resolves to the reader's version too"
    );
    assert_eq!(back.envelope, e.envelope);
    assert_eq!(back.body["source_device"], Value::Null);
    assert_eq!(back.body["burst"], json!(1));
    assert!(!back.body.contains_key("preview"));
    assert_eq!(back.body["state"], e.body["state"]);

    // The v2 registry writes v2; the check wants it locked, and nothing else.
    let v2_bytes = r.encode(&back).unwrap();
    assert_ne!(fingerprint_of(&v2_bytes), fingerprint_of(&v1_bytes));
    let errors = r.check().unwrap_err();
    assert_eq!(
        errors,
        vec![SchemaError::NotLocked {
            event_type: "TypingIndicated".into(),
            version: 2
        }]
    );
    assert!(errors[0].to_string().contains("nexus schemas lock"));
}

#[test]
fn removing_a_field_without_a_default_is_incompatible() {
    // v2 reads v1 data (a reader ignores a writer's extra field), but a reader still on v1
    // gets v2 data without `participant_id` and nothing to fill it in.
    let mut v2 = typing_v1();
    v2["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "participant_id");
    let r = registry_with(&[("events/typing_indicated/v2.avsc", v2.to_string())]).unwrap();
    let errors = r.check().unwrap_err();
    assert!(
        errors.iter().any(
            |e| matches!(e, SchemaError::Incompatible { version: 2, previous: 1, message, .. }
            if message.contains("participant_id"))
        ),
        "{errors:?}"
    );
}

#[test]
fn removing_a_nested_field_without_a_default_is_incompatible() {
    // Wherever record `Item` sits, the v2 writer leaves `sku` out and a reader still on v1 has
    // nothing to fill it in with; `qty` has a default, so removing it alone is fine.
    let positions: [fn(Value) -> Value; 4] = [
        |item| item,
        |item| json!(["null", item]),
        |item| json!({"type": "array", "items": item}),
        |item| json!({"type": "map", "values": item}),
    ];
    let sku = json!({"name": "sku", "type": "string", "doc": "Stock-keeping unit."});
    let qty = json!({"name": "qty", "type": "int", "default": 1, "doc": "Quantity."});
    for wrap in positions {
        let schema = |item_fields: Value| {
            let item =
                json!({"type": "record", "name": "Item", "doc": "An item.", "fields": item_fields});
            json!({
                "type": "record",
                "name": "NestedProbe",
                "namespace": "nexus.events",
                "doc": "Test event.",
                "fields": [
                    {"name": "envelope", "type": "nexus.Envelope", "doc": "Common envelope."},
                    {"name": "item", "type": wrap(item), "doc": "The item."}
                ]
            })
            .to_string()
        };
        let incompatible = |v2_fields: Value| {
            let r = registry_with(&[
                ("events/nested_probe/v1.avsc", schema(json!([sku, qty]))),
                ("events/nested_probe/v2.avsc", schema(v2_fields)),
            ])
            .unwrap();
            r.check()
                .unwrap_err()
                .into_iter()
                .filter(|e| matches!(e, SchemaError::Incompatible { event_type, .. } if event_type == "NestedProbe"))
                .collect::<Vec<_>>()
        };
        let position = wrap(json!("Item"));
        let errors = incompatible(json!([qty]));
        assert!(
            matches!(errors.as_slice(), [SchemaError::Incompatible { version: 2, previous: 1, message, .. }]
                if message.contains("`Item.sku`")),
            "{position}: {errors:?}"
        );
        assert_eq!(incompatible(json!([sku])), vec![], "{position}");
    }
}

#[test]
fn records_with_many_fields_encode_through_lookups() {
    // More fields than the writer matches on the stack: the lookup path, same rules.
    let mut v2 = typing_v1();
    let fields = v2["fields"].as_array_mut().unwrap();
    for i in 0..40 {
        fields.push(json!({"name": format!("extra_{i:02}"), "type": ["null", "string"], "default": null, "doc": "Padding."}));
    }
    let r = registry_with(&[("events/typing_indicated/v2.avsc", v2.to_string())]).unwrap();
    let encode_with = |body: &[(&str, Value)]| {
        let mut e = Registry::builtin().example("TypingIndicated").unwrap();
        for (k, v) in body {
            e.body.insert((*k).into(), v.clone());
        }
        (r.encode(&e), e)
    };

    let (bytes, e) = encode_with(&[("extra_05", json!("x"))]);
    let back = r.decode(&bytes.unwrap()).unwrap();
    assert_eq!(back.envelope, e.envelope);
    assert_eq!(back.body["extra_05"], json!("x"));
    assert_eq!(back.body["extra_39"], Value::Null);
    assert_eq!(back.body["state"], e.body["state"]);

    let path = |r: Result<Vec<u8>, EncodeError>| match r {
        Err(EncodeError::Invalid { path, .. }) => path,
        other => panic!("expected Invalid, got {other:?}"),
    };
    assert_eq!(path(encode_with(&[("zzz", json!(1))]).0), "body.zzz");
    assert_eq!(
        path(encode_with(&[("envelope", json!(1))]).0),
        "body.envelope"
    );
    assert_eq!(
        path(encode_with(&[("zzz", json!(1)), ("extra_07", json!(5))]).0),
        "body.extra_07",
        "a field's own error comes first"
    );
}

#[test]
fn incompatible_and_edited_versions_fail_the_check() {
    // A new required field without default: v2 cannot read v1.
    let mut v2 = typing_v1();
    v2["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "device", "type": "string", "doc": "Device."}));
    let r = registry_with(&[("events/typing_indicated/v2.avsc", v2.to_string())]).unwrap();
    let errors = r.check().unwrap_err();
    assert!(
        errors.iter().any(|e| matches!(
            e,
            SchemaError::Incompatible {
                version: 2,
                previous: 1,
                ..
            }
        )),
        "{errors:?}"
    );
    assert!(matches!(
        r.decode(
            &Registry::builtin()
                .encode(&Registry::builtin().example("TypingIndicated").unwrap())
                .unwrap()
        ),
        Err(DecodeError::Body(_))
    ));

    // A type change that is not a promotion.
    let mut v2 = typing_v1();
    for f in v2["fields"].as_array_mut().unwrap() {
        if f["name"] == "participant_id" {
            f["type"] = json!("long");
        }
    }
    let r = registry_with(&[("events/typing_indicated/v2.avsc", v2.to_string())]).unwrap();
    assert!(r
        .check()
        .unwrap_err()
        .iter()
        .any(|e| matches!(e, SchemaError::Incompatible { .. })));

    // Editing a released version: the fingerprint no longer matches the lock.
    let mut edited = typing_v1();
    edited["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "x", "type": ["null", "string"], "default": null, "doc": "x"}));
    let files: Vec<(&str, String)> = Registry::builtin_files()
        .iter()
        .map(|(p, t)| {
            (
                *p,
                if *p == "events/typing_indicated/v1.avsc" {
                    edited.to_string()
                } else {
                    t.to_string()
                },
            )
        })
        .collect();
    let r = Registry::from_sources(files.iter().map(|(p, t)| (*p, t.as_str()))).unwrap();
    assert!(r
        .check()
        .unwrap_err()
        .iter()
        .any(|e| matches!(e, SchemaError::LockMismatch { version: 1, .. })));

    // Deleting a released version.
    let files: Vec<(&str, &str)> = Registry::builtin_files()
        .iter()
        .copied()
        .filter(|(p, _)| *p != "events/typing_indicated/v1.avsc")
        .collect();
    let r = Registry::from_sources(files).unwrap();
    assert!(r
        .check()
        .unwrap_err()
        .iter()
        .any(|e| matches!(e, SchemaError::MissingVersion { version: 1, .. })));
}

#[test]
fn style_rules_are_checked() {
    let mut v2 = typing_v1();
    let fields = v2["fields"].as_array_mut().unwrap();
    fields.push(json!({"name": "mood", "type": ["null", {"type": "enum", "name": "Mood", "symbols": ["A"]}], "default": null}));
    let r = registry_with(&[("events/typing_indicated/v2.avsc", v2.to_string())]).unwrap();
    let errors: Vec<String> = r
        .check()
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("Mood has no `doc`")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("no `default` symbol")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("field TypingIndicated.mood has no `doc`")),
        "{errors:?}"
    );

    let no_envelope = json!({"type": "record", "name": "Foo", "namespace": "nexus.events", "doc": "d",
        "fields": [{"name": "a", "type": "string", "doc": "d"}]});
    let errors = registry_with(&[("events/foo/v1.avsc", no_envelope.to_string())]).unwrap_err();
    assert!(errors[0].to_string().contains("first field"), "{errors:?}");
    let misplaced = typing_v1();
    let errors = registry_with(&[("events/typing/v2.avsc", misplaced.to_string())]).unwrap_err();
    assert!(
        errors[0].to_string().contains("events/typing_indicated/"),
        "{errors:?}"
    );
}

#[test]
fn check_dir_and_write_lock_work_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in Registry::builtin_files() {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    Registry::check_dir(dir.path()).unwrap();
    let mut v2 = typing_v1();
    v2["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "x", "type": ["null", "string"], "default": null, "doc": "x"}));
    std::fs::write(
        dir.path().join("events/typing_indicated/v2.avsc"),
        v2.to_string(),
    )
    .unwrap();
    assert!(matches!(
        &Registry::check_dir(dir.path()).unwrap_err()[..],
        [SchemaError::NotLocked { version: 2, .. }]
    ));
    Registry::write_lock(dir.path()).unwrap();
    let report = Registry::check_dir(dir.path()).unwrap();
    assert!(report
        .event_types
        .iter()
        .any(|(t, v, _)| t == "TypingIndicated" && *v == 2));
}

/// A released version's defaults, logical types and aliases are not in the canonical form the
/// fingerprint covers; the lock's content digest catches an edit of them, and docs stay editable.
#[test]
fn editing_what_the_fingerprint_does_not_cover_fails_the_check() {
    let edited = |edit: &dyn Fn(&mut Value)| {
        let mut v1 = typing_v1();
        edit(&mut v1);
        let files: Vec<(&str, String)> = Registry::builtin_files()
            .iter()
            .map(|(p, t)| {
                let text = if *p == "events/typing_indicated/v1.avsc" {
                    v1.to_string()
                } else {
                    t.to_string()
                };
                (*p, text)
            })
            .collect();
        Registry::from_sources(files.iter().map(|(p, t)| (*p, t.as_str())))
            .unwrap()
            .check()
    };
    let field = |v: &mut Value, name: &str| -> Value {
        v["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap()
            .clone()
    };
    // A default given to a field after release would let a later version drop it.
    let errors = edited(&|v| {
        let f = field(v, "participant_id");
        for x in v["fields"].as_array_mut().unwrap() {
            if x["name"] == f["name"] {
                x["default"] = json!("");
            }
        }
    })
    .unwrap_err();
    assert!(
        matches!(
            &errors[..],
            [SchemaError::ContentMismatch { version: 1, event_type, .. }] if event_type == "TypingIndicated"
        ),
        "{errors:?}"
    );
    assert!(errors[0].to_string().contains("add v2"), "{errors:?}");
    // A doc is corrected freely.
    edited(&|v| v["doc"] = json!("Corrected wording.")).unwrap();

    // The envelope's logical type: every version's content changes, no fingerprint does.
    let files: Vec<(&str, String)> = Registry::builtin_files()
        .iter()
        .map(|(p, t)| {
            let text = if *p == "envelope.avsc" {
                t.replace("timestamp-millis", "timestamp-micros")
            } else {
                t.to_string()
            };
            assert!(
                *p != "envelope.avsc" || text != *t,
                "the envelope has a timestamp-millis"
            );
            (*p, text)
        })
        .collect();
    let errors = Registry::from_sources(files.iter().map(|(p, t)| (*p, t.as_str())))
        .unwrap()
        .check()
        .unwrap_err();
    assert!(
        !errors.is_empty()
            && errors
                .iter()
                .all(|e| matches!(e, SchemaError::ContentMismatch { .. })),
        "{errors:?}"
    );
}

#[test]
fn a_lock_line_without_content_is_refreshed_by_lock() {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in Registry::builtin_files() {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let text = if *path == "fingerprints.lock" {
            // The three-column lines of a lock written before the content digest.
            text.lines()
                .map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                    [t, v, fp, _] => format!("{t} {v} {fp}\n"),
                    _ => format!("{l}\n"),
                })
                .collect()
        } else {
            text.to_string()
        };
        std::fs::write(p, text).unwrap();
    }
    let errors = Registry::check_dir(dir.path()).unwrap_err();
    assert!(
        errors
            .iter()
            .all(|e| matches!(e, SchemaError::LockOutdated { .. })),
        "{errors:?}"
    );
    Registry::write_lock(dir.path()).unwrap();
    Registry::check_dir(dir.path()).unwrap();

    // Once the lock has digests, a line cut back to three columns (to slip an edit of its
    // schema through) is refused, not re-locked.
    let lock = dir.path().join("fingerprints.lock");
    let text = std::fs::read_to_string(&lock).unwrap();
    let cut: String = text
        .lines()
        .map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            ["TypingIndicated", v, fp, _] => format!("TypingIndicated {v} {fp}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&lock, cut).unwrap();
    let errors = Registry::write_lock(dir.path()).unwrap_err();
    assert!(
        matches!(&errors[..], [SchemaError::LockOutdated { event_type, .. }] if event_type == "TypingIndicated"),
        "{errors:?}"
    );
}

/// A rename through `aliases` would read old data as the default in nexus (fields match by
/// name), while other Avro readers map it: refused.
#[test]
fn aliases_are_refused() {
    let mut v2 = typing_v1();
    for f in v2["fields"].as_array_mut().unwrap() {
        if f["name"] == "preview" {
            f["name"] = json!("preview_text");
            f["aliases"] = json!(["preview"]);
        }
    }
    let errors: Vec<String> = registry_with(&[("events/typing_indicated/v2.avsc", v2.to_string())])
        .unwrap()
        .check()
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("TypingIndicated.preview_text") && e.contains("aliases")),
        "{errors:?}"
    );
}

/// An invalid traceparent (another producer's, or one built in process) is dropped: it would
/// otherwise go into the `traceparent` header of a peer call and fail it on every retry.
#[test]
fn invalid_traceparents_are_dropped() {
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let e = message_received().with_traceparent(valid);
    assert_eq!(e.envelope.traceparent.as_deref(), Some(valid));
    let e = message_received().with_traceparent("00-abc\n-01");
    assert_eq!(e.envelope.traceparent, None);
    // A later version may carry more fields, but no control character in them.
    let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-\nX";
    assert_eq!(
        message_received()
            .with_traceparent(later)
            .envelope
            .traceparent,
        None
    );
    let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-ab";
    assert!(message_received()
        .with_traceparent(later)
        .envelope
        .traceparent
        .is_some());

    // Bytes of another producer: written with a control character in the field.
    let mut e = message_received();
    e.envelope.traceparent = Some("x\ny".into());
    let bytes = encode(&e).unwrap();
    assert_eq!(decode(&bytes).unwrap().envelope.traceparent, None);
    let lazy = Registry::builtin()
        .decode_lazy(&bytes::Bytes::from(bytes))
        .unwrap();
    assert_eq!(lazy.envelope.traceparent, None);
}

fn varint(n: i64) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Hostile counts and lengths after a valid header are refused without allocating for them.
#[test]
fn hostile_counts_and_lengths_are_refused() {
    let mut v2 = typing_v1();
    let fields = v2["fields"].as_array_mut().unwrap();
    // Its default is not the empty array the event carries: written with v2.
    fields.push(json!({"name": "tags", "type": {"type": "array", "items": "string"}, "default": ["d"], "doc": "d"}));
    let r = registry_with(&[("events/typing_indicated/v2.avsc", v2.to_string())]).unwrap();
    let mut e = r.example("TypingIndicated").unwrap();
    e.body.insert("tags".into(), json!([]));
    let bytes = r.encode(&e).unwrap();
    assert_eq!(bytes.last(), Some(&0), "an empty array ends the body");
    let with_tail = |tail: &[u8]| {
        let mut b = bytes[..bytes.len() - 1].to_vec();
        b.extend_from_slice(tail);
        b
    };
    let huge_count = with_tail(&varint(1 << 62));
    let min_count = with_tail(&varint(i64::MIN));
    let mut huge_string = varint(1);
    huge_string.extend(varint(1 << 40));
    let huge_string = with_tail(&huge_string);
    for (what, b) in [
        ("count 2^62", huge_count),
        ("count i64::MIN", min_count),
        ("string of 2^40 bytes", huge_string),
    ] {
        assert!(matches!(r.decode(&b), Err(DecodeError::Body(_))), "{what}");
        assert!(
            matches!(
                r.decode_lazy(&bytes::Bytes::from(b)),
                Err(DecodeError::Body(_))
            ),
            "{what}"
        );
    }
}

/// A float beyond f32 is refused at the edge (it would be written as infinity, which readers
/// refuse); a two-branch union without null takes the branch that accepts the value.
#[test]
fn json_floats_in_range_and_unions_by_branch() {
    let mut v2 = typing_v1();
    let fields = v2["fields"].as_array_mut().unwrap();
    fields.push(json!({"name": "ratio", "type": "float", "default": 0.0, "doc": "d"}));
    fields.push(json!({"name": "ref", "type": ["string", "long"], "default": "", "doc": "d"}));
    let r = registry_with(&[("events/typing_indicated/v2.avsc", v2.to_string())]).unwrap();
    let mut e = r.example("TypingIndicated").unwrap();
    e.body.insert("ratio".into(), json!(1e39));
    e.body.insert("ref".into(), json!("a"));
    assert!(
        matches!(r.encode(&e), Err(EncodeError::Invalid { ref path, .. }) if path.contains("ratio")),
        "{:?}",
        r.encode(&e)
    );
    e.body.insert("ratio".into(), json!(0.5));
    for value in [json!("a"), json!(5)] {
        e.body.insert("ref".into(), value.clone());
        let back = r.decode(&r.encode(&e).unwrap()).unwrap();
        assert_eq!(back.body["ref"], value);
    }
}

/// Writers use the oldest version that carries the body: a `MessageSent` visible to all is
/// written as v1, which a pod knowing only v1 reads; one for agents only needs v2. Both read as
/// the latest version with the visibility they had.
#[test]
fn writers_use_the_oldest_version_that_carries_the_body() {
    let r = Registry::builtin();
    let v1 = r.get("MessageSent", 1).unwrap().fingerprint;
    let v2 = r.get("MessageSent", 2).unwrap().fingerprint;
    let mut e = r.example("MessageSent").unwrap();
    e.body.insert("visibility".into(), json!("ALL"));
    let all = r.encode(&e).unwrap();
    assert_eq!(fingerprint_of(&all), Some(v1));
    e.body.insert("visibility".into(), json!("AGENTS"));
    let agents = r.encode(&e).unwrap();
    assert_eq!(fingerprint_of(&agents), Some(v2));
    assert_eq!(r.decode(&all).unwrap().body["visibility"], "ALL");
    assert_eq!(r.decode(&agents).unwrap().body["visibility"], "AGENTS");
    // No visibility at all (a v1-shaped body) is the default too.
    e.body.remove("visibility");
    assert_eq!(fingerprint_of(&r.encode(&e).unwrap()), Some(v1));

    // A pod that knows only v1 (its registry built without v2) reads the first, and
    // dead-letters the second as an unknown fingerprint.
    let old = Registry::from_sources(
        Registry::builtin_files()
            .iter()
            .filter(|(p, _)| *p != "events/message_sent/v2.avsc")
            .map(|(p, t)| (*p, *t)),
    )
    .unwrap();
    assert_eq!(old.latest("MessageSent").unwrap().version, 1);
    assert_eq!(old.decode(&all).unwrap().body["text"], e.body["text"]);
    assert!(matches!(
        old.decode(&agents),
        Err(DecodeError::UnknownFingerprint(_))
    ));
}

/// A `long` that gains `timestamp-millis` decodes, but its old values (here a count) would be
/// read as instants: refused, naming the field. Dropping the logical type again is allowed.
#[test]
fn the_check_refuses_a_long_turned_timestamp() {
    let with_burst = |version: u32, ty: Value| {
        let mut v = typing_v1();
        v["fields"].as_array_mut().unwrap().push(
            json!({"name": "burst", "type": ty, "default": 1, "doc": "Keystroke burst count."}),
        );
        (
            format!("events/typing_indicated/v{version}.avsc"),
            v.to_string(),
        )
    };
    let millis = json!({"type": "long", "logicalType": "timestamp-millis"});
    let files = |a: Value, b: Value| {
        let (p2, t2) = with_burst(2, a);
        let (p3, t3) = with_burst(3, b);
        let owned = [(p2, t2), (p3, t3)];
        let extra: Vec<(&str, String)> =
            owned.iter().map(|(p, t)| (p.as_str(), t.clone())).collect();
        registry_with(&extra).unwrap().check()
    };
    let errors: Vec<String> = files(json!("long"), millis.clone())
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        errors.iter().any(|e| e.contains(
            "TypingIndicated v3 cannot read v2: field `burst` was a long and is now a `timestamp-millis`"
        )),
        "{errors:?}"
    );
    let dropped: Vec<String> = match files(millis, json!("long")) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    assert!(
        !dropped.iter().any(|e| e.contains("burst")),
        "dropping the logical type is allowed: {dropped:?}"
    );
}

/// A test event `nexus.events.<name>` whose body fields follow the envelope.
fn probe_schema(name: &str, fields: &[Value]) -> String {
    let mut all =
        vec![json!({"name": "envelope", "type": "nexus.Envelope", "doc": "Common envelope."})];
    all.extend(fields.iter().cloned());
    json!({
        "type": "record",
        "name": name,
        "namespace": "nexus.events",
        "doc": "Test event.",
        "fields": all
    })
    .to_string()
}

/// An earlier version is written in place of the latest only if each field it shares with the
/// latest is defined the same (type, default, order) and each field added since holds the
/// latest's default in nexus's JSON form (base64 for bytes): otherwise the reader would see the
/// old default, or a body the old version refuses.
#[test]
fn writers_downgrade_only_to_versions_that_define_their_fields_alike() {
    let tag = json!({"name": "tag", "type": ["null", "string"], "default": null, "doc": "Tag."});
    let probe = |v1: &[Value], v2: &[Value]| {
        let r = registry_with(&[
            (
                "events/downgrade_probe/v1.avsc",
                probe_schema("DowngradeProbe", v1),
            ),
            (
                "events/downgrade_probe/v2.avsc",
                probe_schema("DowngradeProbe", v2),
            ),
        ])
        .unwrap();
        let v2_fp = r.get("DowngradeProbe", 2).unwrap().fingerprint;
        (r, v2_fp)
    };
    let event = |r: &Registry, b: Value| {
        let mut e = r.example("DowngradeProbe").unwrap();
        e.body = body(b).into();
        e
    };

    // (a) `note` gains a default in v2: a body without it is valid for the latest only.
    let (r, v2) = probe(
        &[json!({"name": "note", "type": "string", "doc": "Note."})],
        &[
            json!({"name": "note", "type": "string", "default": "", "doc": "Note."}),
            tag.clone(),
        ],
    );
    let bytes = r
        .encode(&event(&r, json!({})))
        .unwrap_or_else(|e| panic!("the latest accepts a body without `note`: {e}"));
    assert_eq!(fingerprint_of(&bytes), Some(v2));
    assert_eq!(r.decode(&bytes).unwrap().body["note"], "");

    // (b) The default changed: v1 would write its own.
    let (r, v2) = probe(
        &[json!({"name": "note", "type": "string", "default": "a", "doc": "Note."})],
        &[
            json!({"name": "note", "type": "string", "default": "b", "doc": "Note."}),
            tag.clone(),
        ],
    );
    let bytes = r.encode(&event(&r, json!({}))).unwrap();
    assert_eq!(fingerprint_of(&bytes), Some(v2));
    assert_eq!(r.decode(&bytes).unwrap().body["note"], "b");

    // The sort order changed: a field defined differently, the latest is written.
    let (r, v2) = probe(
        &[json!({"name": "note", "type": "string", "default": "", "doc": "Note."})],
        &[
            json!({"name": "note", "type": "string", "default": "", "order": "descending", "doc": "Note."}),
            tag.clone(),
        ],
    );
    let bytes = r.encode(&event(&r, json!({"note": "x"}))).unwrap();
    assert_eq!(fingerprint_of(&bytes), Some(v2));

    // Docs aside the fields are alike: a body using nothing new is written as v1.
    let (r, v2) = probe(
        &[json!({"name": "note", "type": "string", "default": "", "doc": "Note."})],
        &[
            json!({"name": "note", "type": "string", "default": "", "doc": "A note."}),
            tag.clone(),
        ],
    );
    let v1 = r.get("DowngradeProbe", 1).unwrap().fingerprint;
    let bytes = r.encode(&event(&r, json!({"note": "x"}))).unwrap();
    assert_eq!(fingerprint_of(&bytes), Some(v1));
    let bytes = r
        .encode(&event(&r, json!({"note": "x", "tag": "t"})))
        .unwrap();
    assert_eq!(fingerprint_of(&bytes), Some(v2));

    // (c) A bytes default `abcd` is the base64 text `YWJjZA==` in a body; the body text `abcd`
    // is other bytes (69 b7 1d) and needs v2.
    let (r, v2) = probe(
        &[json!({"name": "note", "type": "string", "default": "", "doc": "Note."})],
        &[
            json!({"name": "note", "type": "string", "default": "", "doc": "Note."}),
            json!({"name": "blob", "type": "bytes", "default": "abcd", "doc": "Blob."}),
        ],
    );
    let v1 = r.get("DowngradeProbe", 1).unwrap().fingerprint;
    let other = r.encode(&event(&r, json!({"blob": "abcd"}))).unwrap();
    assert_eq!(fingerprint_of(&other), Some(v2));
    assert_eq!(r.decode(&other).unwrap().body["blob"], "abcd");
    let default = r.encode(&event(&r, json!({"blob": "YWJjZA=="}))).unwrap();
    assert_eq!(fingerprint_of(&default), Some(v1));
    assert_eq!(r.decode(&default).unwrap().body["blob"], "YWJjZA==");
}

/// apache-avro parses a `fixed` of 16 bytes with logical type `uuid` as its string-backed
/// `Uuid`: nexus would write 36 bytes of text where the fingerprint says 16 raw bytes. Refused
/// at load, naming the type.
#[test]
fn a_fixed_uuid_is_refused_at_load() {
    let fixed = json!({"type": "fixed", "name": "Id", "size": 16, "doc": "Id."});
    let mut annotated = fixed.clone();
    annotated["logicalType"] = json!("uuid");
    // Annotated, or wrapping the fixed (apache-avro parses the inner type first), in a union.
    let wrapped = json!({"type": fixed, "logicalType": "uuid"});
    for ty in [annotated, json!(["null", wrapped])] {
        let id = json!({"name": "id", "type": ty, "doc": "Id."});
        let errors = registry_with(&[(
            "events/fixed_uuid_probe/v1.avsc",
            probe_schema("FixedUuidProbe", &[id]),
        )])
        .unwrap_err();
        assert!(
            matches!(errors.as_slice(), [SchemaError::Invalid { file, message }]
                if file == "events/fixed_uuid_probe/v1.avsc"
                    && message.contains("fixed `Id` has logical type `uuid`")),
            "{ty}: {errors:?}"
        );
    }
    // Another size is no uuid to apache-avro either: a plain fixed, accepted.
    let id8 = json!({"name": "id", "doc": "Id.",
        "type": {"type": "fixed", "name": "Id", "size": 8, "logicalType": "uuid", "doc": "Id."}});
    registry_with(&[(
        "events/fixed_uuid_probe/v1.avsc",
        probe_schema("FixedUuidProbe", &[id8]),
    )])
    .unwrap();
}

/// A named type defined in a field v2 removes and referenced by a later field, which v2 now
/// defines inline: the same type to Avro resolution, so the check passes (apache-avro alone
/// answers "inconclusive" for a reference against a definition). A definition moved so that
/// it is no longer compared and changed incompatibly is still refused.
#[test]
fn the_check_resolves_named_type_references() {
    let participant = |name_type: &str| {
        json!({"type": "record", "name": "Participant", "doc": "Who.", "fields": [
            {"name": "name", "type": name_type, "doc": "Name."}
        ]})
    };
    let check = |versions: &[Vec<Value>]| {
        let owned: Vec<(String, String)> = versions
            .iter()
            .enumerate()
            .map(|(i, fields)| {
                (
                    format!("events/reference_probe/v{}.avsc", i + 1),
                    probe_schema("ReferenceProbe", fields),
                )
            })
            .collect();
        let extra: Vec<(&str, String)> =
            owned.iter().map(|(p, t)| (p.as_str(), t.clone())).collect();
        registry_with(&extra)
            .unwrap()
            .check()
            .unwrap_err()
            .into_iter()
            .filter(|e| {
                matches!(e, SchemaError::Incompatible { event_type, .. } if event_type == "ReferenceProbe")
            })
            .collect::<Vec<_>>()
    };
    let v1 = vec![
        json!({"name": "first", "type": ["null", participant("string")], "default": null, "doc": "First."}),
        json!({"name": "second", "type": "Participant", "doc": "Second."}),
    ];
    let v2 = vec![json!({"name": "second", "type": participant("string"), "doc": "Second."})];
    assert_eq!(check(&[v1.clone(), v2]), vec![]);

    // v2 moves the definition to a new field and turns `name` into an int; `second` is a
    // reference on both sides, only the definitions show that v2 cannot read v1.
    let v2 = vec![
        json!({"name": "third", "type": ["null", participant("int")], "default": null, "doc": "Third."}),
        json!({"name": "second", "type": "Participant", "doc": "Second."}),
    ];
    let v3 = {
        let mut v = v2.clone();
        v.push(json!({"name": "x", "type": ["null", "string"], "default": null, "doc": "X."}));
        v
    };
    let errors = check(&[v1, v2, v3]);
    assert!(
        errors.iter().any(|e| matches!(e,
            SchemaError::Incompatible { version: 2, previous: 1, message, .. } if message.contains("name"))),
        "{errors:?}"
    );
}
