//! Proves nexus payloads are standard Avro single-object encoding: fastavro (Python), an
//! independent implementation, parses each composed wire schema, recomputes its CRC-64-AVRO
//! fingerprint, checks the header bytes and decodes the body; and nexus decodes payloads that
//! fastavro wrote. Requires `python3` with `fastavro` (CI installs it): a missing interpreter or
//! module fails the test rather than skipping it.

use std::path::Path;
use std::process::Command;

use nexus::events::{decode, encode, Event, Registry};
use serde_json::Value;

#[test]
fn fastavro_reads_nexus_payloads_and_nexus_reads_fastavro_payloads() {
    let registry = Registry::builtin();
    let dir = tempfile::tempdir().expect("temp dir");
    // Each event with the body fields its writer's version leaves out (see `writer_for`).
    let mut sent: Vec<(Event, Vec<String>)> = Vec::new();
    for t in registry.event_types() {
        let event = registry.example(t).expect("example");
        let bytes = encode(&event).unwrap_or_else(|e| panic!("{t}: {e}"));
        let (schema, left_out) = registry.writer_for(t, &event.body).expect("writer");
        let left_out = left_out.iter().map(|(k, _)| k.clone()).collect();
        std::fs::write(dir.path().join(format!("{t}.bin")), &bytes).expect("write payload");
        std::fs::write(
            dir.path().join(format!("{t}.avsc")),
            schema.json.to_string(),
        )
        .expect("write schema");
        sent.push((event, left_out));
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/decode.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("python3 must be installed for the Avro interop test");
    assert!(
        output.status.success(),
        "decode.py failed (is fastavro installed? `pip install fastavro`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let decoded: Value = serde_json::from_slice(&output.stdout).expect("decode.py prints JSON");

    for (event, left_out) in &sent {
        let t = &event.envelope.event_type;
        let theirs = decoded
            .get(t)
            .unwrap_or_else(|| panic!("fastavro did not decode {t}"));
        // fastavro's view: the envelope as a nested record, the body fields beside it.
        let mut ours = event.body.clone().into_map();
        ours.retain(|k, _| !left_out.contains(k));
        let e = &event.envelope;
        ours.insert(
            "envelope".into(),
            serde_json::json!({
                "event_id": e.event_id.to_string(),
                "event_type": e.event_type,
                "tenant_id": e.tenant_id,
                "conversation_id": e.conversation_id,
                "occurred_at": e.occurred_at_ms,
                "traceparent": e.traceparent,
                "producer": e.producer,
            }),
        );
        assert_eq!(
            theirs,
            &Value::Object(ours),
            "{t}: fastavro decoded something else"
        );

        // The reverse: fastavro re-encoded the datum; nexus must decode it to the same event.
        let py = std::fs::read(dir.path().join(format!("{t}.py.bin"))).expect("fastavro payload");
        let back = decode(&py)
            .unwrap_or_else(|e| panic!("{t}: nexus cannot decode fastavro's payload: {e}"));
        assert_eq!(&back, event, "{t}");
    }

    let hand = std::fs::read(dir.path().join("hand_built.bin")).expect("hand-built payload");
    let event = decode(&hand).expect("nexus decodes a MessageReceived built by fastavro");
    assert_eq!(event.envelope.producer, "python/fastavro");
    assert_eq!(event.envelope.occurred_at_ms, 1_732_536_000_000);
    assert_eq!(event.envelope.traceparent, None);
    assert_eq!(event.body["channel"], "SMS");
    assert_eq!(event.body["text"], "STOP");
    assert_eq!(event.body["contact"]["phone_number"], "+15550001111");
    assert_eq!(event.body["transcript_position"], 3);
}
