//! What more than one bench builds the same way.

use nexus::events::Event;

/// The bus benchmarks' event: a `MessageReceived` of about 300 bytes encoded, keyed by one of
/// 512 conversations, with a trace context as every event an edge publishes has.
pub fn bus_event(i: u64) -> (String, Event) {
    let key = format!("conv-{}", i % 512);
    let body = serde_json::json!({
        "message_id": uuid::Uuid::now_v7().to_string(),
        "channel": "WEB_CHAT",
        "participant_id": "customer-1",
        "participant_kind": "CUSTOMER",
        "kind": "TEXT",
        "text": "x".repeat(140),
    });
    let serde_json::Value::Object(body) = body else {
        unreachable!("literal object")
    };
    let event = Event::new("MessageReceived", "tenant-bench", &key, "bench", body)
        .with_traceparent(format!("00-{:032x}-{:016x}-01", u128::from(i) + 1, i + 1));
    (key, event)
}
