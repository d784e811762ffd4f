//! Records another producer wrote on Kafka. A header name that is not UTF-8 (rdkafka panics
//! reading one) is left out; the record is delivered, tailed and read like any other.

mod common;

use std::time::Duration;

use common::{next_within, test_bus};
use nexus::bus::{Message, OutRecord, StartFrom, SubscribeOptions};
use rdkafka::config::ClientConfig;
use rdkafka::message::{BorrowedHeaders, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const WAIT: Duration = Duration::from_secs(60);

/// Headers with a name that is not UTF-8 between two ordinary ones. rdkafka's own API takes
/// only `&str` names, so the odd one goes in through librdkafka.
fn headers_with_a_binary_name() -> OwnedHeaders {
    let headers = OwnedHeaders::new().insert(Header {
        key: "x-before",
        value: Some("1"),
    });
    let name = b"\xff\xfe";
    let value = b"v";
    let raw = headers.as_borrowed() as *const BorrowedHeaders
        as *mut rdkafka::bindings::rd_kafka_headers_t;
    // SAFETY: `raw` is the live header list `headers` owns; the name and value are copied.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_header_add(
            raw,
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        )
    };
    assert_eq!(
        err,
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    );
    headers.insert(Header {
        key: "x-after",
        value: Some("2"),
    })
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

fn header<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_stops_no_reader() {
    if !common::selected("kafka") {
        return;
    }
    let t = test_bus("kafka").await;
    let topic = t.fresh_topic(1).await;
    let mut tail = t.bus.tail(&topic).await.expect("tail");
    let brokers = t.config.url.trim_start_matches("kafka://").to_string();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(&topic)
                .key("k")
                .payload("foreign")
                .headers(headers_with_a_binary_name()),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    t.bus
        .publish(&topic, OutRecord::new("k", "ours"))
        .await
        .expect("publish");

    let check = |m: &Message| {
        assert_eq!(text(m), "foreign");
        assert_eq!(header(m, "x-before"), Some("1"), "{:?}", m.headers);
        assert_eq!(header(m, "x-after"), Some("2"), "{:?}", m.headers);
        assert_eq!(
            m.headers.len(),
            2,
            "only the odd header is left out: {:?}",
            m.headers
        );
    };
    // A group member.
    let options = SubscribeOptions {
        start: StartFrom::Earliest,
        ..SubscribeOptions::default()
    };
    let mut sub = t
        .bus
        .subscribe("g", &topic, options)
        .await
        .expect("subscribe");
    let first = next_within(&mut sub, WAIT)
        .await
        .expect("the foreign record");
    check(&first.message);
    first.ack().await.expect("ack");
    let second = next_within(&mut sub, WAIT)
        .await
        .expect("the record behind it");
    assert_eq!(text(&second.message), "ours");
    second.ack().await.expect("ack");
    sub.close().await.expect("close");
    // A tail (the edges' socket feed).
    let first = next_within(&mut tail, WAIT).await.expect("tailed");
    check(&first.message);
    let second = next_within(&mut tail, WAIT)
        .await
        .expect("tailed behind it");
    assert_eq!(text(&second.message), "ours");
    // A read (replay's copies and time lookups).
    let read = t.bus.read(&topic, 0, 0, 10).await.expect("read");
    assert_eq!(read.len(), 2);
    check(&read[0]);
}
