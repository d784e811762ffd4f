//! Records another producer wrote on Kafka. A header name that is not UTF-8 (rdkafka panics
//! reading one) is left out; the record is delivered, tailed and read like any other.
//!
//! A transactional producer leaves offsets that are no records: each commit or abort writes a
//! marker (a control record, never handed to a reader), and the records of an aborted
//! transaction stay in the log. A group member and a read (replay's copies) go past them:
//! every committed record once, lag back to 0, a read or copy that ends at a marker returns.
//! Which records of an aborted transaction a reader gets is the broker's part: nexus's clients
//! keep librdkafka's `isolation.level=read_committed`, which leaves them out on Kafka; Tansu
//! 0.6 lists no aborted transactions in its fetch answers, so there every reader gets them
//! too. The tests expect what a plain read_committed librdkafka consumer gets on the broker.

use crate::common;

use std::time::{Duration, Instant};

use common::{next_within, test_bus, TestBus};
use nexus::bus::{Message, OutRecord, StartFrom, SubscribeOptions};
use nexus::replay::{self, CopyRequest, ReplayFrom, ReplayRequest, REPLAYED_FROM_HEADER};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedHeaders, Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, Producer, ThreadedProducer,
};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

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

/// Payloads of the records of committed transactions, in log order.
const COMMITTED: [&str; 5] = [
    "committed-0",
    "committed-1",
    "committed-2",
    "committed-3",
    "committed-4",
];
/// Payloads of the records of the aborted transaction.
const ABORTED: [&str; 2] = ["aborted-0", "aborted-1"];

/// A partition written by a foreign transactional producer.
struct TransactionalLog {
    topic: String,
    /// Log end: records and markers.
    high: u64,
    /// What a librdkafka consumer with `isolation.level=read_committed` gets (the committed
    /// records; and the aborted ones too on a broker whose fetch answers list no aborted
    /// transactions, as Tansu 0.6's never do), as (offset, payload).
    visible: Vec<(u64, String)>,
}

impl TransactionalLog {
    fn offsets(&self) -> Vec<u64> {
        self.visible.iter().map(|(o, _)| *o).collect()
    }

    fn payloads(&self) -> Vec<String> {
        self.visible.iter().map(|(_, p)| p.clone()).collect()
    }
}

fn brokers(t: &TestBus) -> String {
    t.config.url.trim_start_matches("kafka://").to_string()
}

/// A fresh one-partition topic holding, from a transactional producer: a committed transaction
/// of three records, an aborted one of two, a committed one of two. On Kafka that is offsets
/// 0-2 committed, 3 commit marker, 4-5 aborted, 6 abort marker, 7-8 committed, 9 commit marker
/// (the last offset is a marker).
async fn transactional_log(t: &TestBus) -> TransactionalLog {
    let topic = t.fresh_topic(1).await;
    let brokers = brokers(t);
    let name = topic.clone();
    let servers = brokers.clone();
    tokio::task::spawn_blocking(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("transactional.id", format!("foreign-{name}"))
            .create()
            .expect("transactional producer");
        let timeout = Duration::from_secs(30);
        producer
            .init_transactions(timeout)
            .expect("init transactions");
        for (payloads, commit) in [
            (&COMMITTED[..3], true),
            (&ABORTED[..], false),
            (&COMMITTED[3..], true),
        ] {
            producer.begin_transaction().expect("begin transaction");
            for payload in payloads {
                producer
                    .send(
                        BaseRecord::to(&name)
                            .partition(0)
                            .key("k")
                            .payload(*payload),
                    )
                    .map_err(|(e, _)| e)
                    .expect("produce");
            }
            if commit {
                producer.commit_transaction(timeout).expect("commit");
            } else {
                producer.flush(timeout).expect("flush");
                producer.abort_transaction(timeout).expect("abort");
            }
        }
    })
    .await
    .expect("producer task");
    let high = t.bus.partition_offsets(&topic).await.expect("offsets")[0].high;
    let records = (COMMITTED.len() + ABORTED.len()) as u64;
    assert_eq!(
        high,
        records + 3,
        "the broker wrote no transaction markers: not the log this test is about"
    );
    let visible = read_committed(&brokers, &topic, high).await;
    let payloads: Vec<&str> = visible.iter().map(|(_, p)| p.as_str()).collect();
    let committed: Vec<&str> = payloads
        .iter()
        .copied()
        .filter(|p| COMMITTED.contains(p))
        .collect();
    assert_eq!(committed, COMMITTED, "every committed record, in order");
    let aborted = payloads.len() - committed.len();
    assert!(
        aborted == 0 || aborted == ABORTED.len(),
        "all or none of the aborted records: {payloads:?}"
    );
    TransactionalLog {
        topic,
        high,
        visible,
    }
}

/// The partition as a plain librdkafka consumer with `isolation.level=read_committed` reads it
/// from offset 0 to `high`.
async fn read_committed(brokers: &str, topic: &str, high: u64) -> Vec<(u64, String)> {
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "foreign-reference")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .create()
            .expect("reference consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(0))
            .expect("partition");
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        loop {
            let at = consumer
                .position()
                .expect("position")
                .find_partition(&topic, 0)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => u64::try_from(o).ok(),
                    _ => None,
                });
            if at.is_some_and(|o| o >= high) {
                return out;
            }
            assert!(Instant::now() < deadline, "reference read stuck at {at:?}");
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.expect("reference record");
                let offset = u64::try_from(rdkafka::Message::offset(&m)).expect("offset");
                let payload = rdkafka::Message::payload(&m).unwrap_or_default();
                out.push((offset, String::from_utf8_lossy(payload).into_owned()));
            }
        }
    })
    .await
    .expect("reference task")
}

/// A group member gets every record a read_committed consumer gets, once, and after acking
/// them its committed offset is the log end: past the trailing commit marker, so lag is 0.
/// Read from a second bus, which has no member to flush: the member's own background commits
/// are what another process (`nexus_consumer_lag` of a worker, the replay tool) sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reads_each_committed_record_once_and_its_lag_reaches_zero() {
    if !common::selected("kafka") {
        return;
    }
    let t = test_bus("kafka").await;
    let log = transactional_log(&t).await;
    let group = format!("g-{}", log.topic);
    let options = SubscribeOptions {
        start: StartFrom::Earliest,
        ..SubscribeOptions::default()
    };
    let mut sub = t
        .bus
        .subscribe(&group, &log.topic, options)
        .await
        .expect("subscribe");
    let mut got = Vec::new();
    for _ in 0..log.visible.len() {
        let d = next_within(&mut sub, WAIT)
            .await
            .unwrap_or_else(|| panic!("got {got:?}, want {:?}", log.visible));
        got.push((d.message.offset, text(&d.message)));
        d.ack().await.expect("ack");
    }
    assert_eq!(got, log.visible);
    assert!(
        next_within(&mut sub, Duration::from_secs(2))
            .await
            .is_none(),
        "nothing more: no record twice, no marker"
    );
    let observer = test_bus("kafka").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let positions = observer
            .bus
            .group_positions(&group, &log.topic)
            .await
            .expect("positions");
        let p = positions[0];
        if p.committed == Some(log.high) {
            assert_eq!(p.lag, 0, "{p:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed offset stays {:?}, lag {}: the trailing marker at {} was not passed",
            p.committed,
            p.lag,
            log.high - 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sub.close().await.expect("close");
    let p = t
        .bus
        .group_positions(&group, &log.topic)
        .await
        .expect("positions")[0];
    assert_eq!((p.committed, p.lag), (Some(log.high), 0), "after leaving");
}

/// `Bus::read` (replay's copies, time lookups) gives what a read_committed consumer gets and
/// returns at the log end even though the last offset is a marker; a read from a marker starts
/// at the next record, and one from the trailing marker is empty, not a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_goes_past_markers_and_returns_at_a_trailing_one() {
    if !common::selected("kafka") {
        return;
    }
    let t = test_bus("kafka").await;
    let log = transactional_log(&t).await;
    let started = Instant::now();
    let all = t.bus.read(&log.topic, 0, 0, 1000).await.expect("read all");
    // The reader's deadline is 10 s: a read that only ends there took that long.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the read waited {:?} for records past the trailing marker",
        started.elapsed()
    );
    let got: Vec<(u64, String)> = all.iter().map(|m| (m.offset, text(m))).collect();
    assert_eq!(got, log.visible);

    let head = t.bus.read(&log.topic, 0, 0, 3).await.expect("read three");
    assert_eq!(
        head.iter().map(|m| m.offset).collect::<Vec<_>>(),
        log.offsets()[..3]
    );
    // From the first commit marker (offset 3): the records after it.
    let after = t
        .bus
        .read(&log.topic, 0, 3, 1000)
        .await
        .expect("read from a marker");
    let after: Vec<u64> = after.iter().map(|m| m.offset).collect();
    let want: Vec<u64> = log.offsets().into_iter().filter(|o| *o > 3).collect();
    assert_eq!(after, want);
    // From the trailing marker: no record left below the log end.
    let tail = t
        .bus
        .read(&log.topic, 0, log.high - 1, 1000)
        .await
        .expect("a read from the trailing marker returns, not a timeout");
    assert!(tail.is_empty(), "{tail:?}");
}

/// `nexus replay --copy-to` copies a transactional topic completely (every record a
/// read_committed reader gets, in order) and finishes although the log ends with a marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_transactional_topic_is_complete_and_finishes() {
    if !common::selected("kafka") {
        return;
    }
    let t = test_bus("kafka").await;
    let log = transactional_log(&t).await;
    let to = t.fresh_topic(1).await;
    let request = CopyRequest {
        from_topic: log.topic.clone(),
        to_topic: to.clone(),
        from: ReplayFrom::Offset(0),
        to_time: None,
        partition: None,
    };
    let dry = tokio::time::timeout(WAIT, replay::copy(t.bus.as_ref(), &request, true))
        .await
        .expect("the dry run finishes")
        .expect("dry run");
    assert_eq!(dry.total_copied(), log.visible.len() as u64);
    let report = tokio::time::timeout(WAIT, replay::copy(t.bus.as_ref(), &request, false))
        .await
        .expect("the copy finishes")
        .expect("copy");
    let p = report.partitions[0];
    assert_eq!(
        (p.start, p.end, p.copied, p.last_offset),
        (
            0,
            log.high,
            log.visible.len() as u64,
            log.offsets().last().copied()
        )
    );
    let copies = t.bus.read(&to, 0, 0, 1000).await.expect("read the copies");
    assert_eq!(copies.iter().map(text).collect::<Vec<_>>(), log.payloads());
    let sources: Vec<String> = copies
        .iter()
        .map(|m| header(m, REPLAYED_FROM_HEADER).unwrap_or("").to_string())
        .collect();
    let want: Vec<String> = log
        .offsets()
        .iter()
        .map(|o| format!("{}/0/{o}", log.topic))
        .collect();
    assert_eq!(sources, want);
}

/// A replay plan's counts on Kafka are offset spans (`count_between` subtracts offsets, as
/// Kafka's own lag does), so transaction markers (and aborted records) count as events to
/// process: from offset 0 the group "processes" all 10 offsets though a read_committed consumer
/// gets 5 records (7 on a broker that hands out aborted ones). From the trailing marker it is 1,
/// which no record stands for. The figures are an upper bound of the events handled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_plan_counts_offsets_markers_included() {
    if !common::selected("kafka") {
        return;
    }
    let t = test_bus("kafka").await;
    let log = transactional_log(&t).await;
    let group = format!("g-{}", log.topic);
    // Where a member that handled everything leaves the group: past the trailing marker.
    t.bus
        .seek_group(&group, &log.topic, 0, log.high)
        .await
        .expect("seek");
    let request = |from| ReplayRequest {
        topic: log.topic.clone(),
        group: group.clone(),
        from,
        to_time: None,
        partition: None,
    };
    let plan = replay::plan(t.bus.as_ref(), &request(ReplayFrom::Offset(0)))
        .await
        .expect("plan");
    let p = plan.partitions[0];
    assert_eq!(
        (p.current, p.target, p.to_process, p.reprocess, p.skip),
        (Some(log.high), 0, log.high, log.high, 0)
    );
    let plan = replay::plan(t.bus.as_ref(), &request(ReplayFrom::Offset(log.high - 1)))
        .await
        .expect("plan");
    let p = plan.partitions[0];
    assert_eq!((p.target, p.to_process, p.reprocess), (log.high - 1, 1, 1));
}
