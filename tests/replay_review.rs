//! Replay and topology edge cases on every backend (embedded always; NATS JetStream and Kafka
//! with the servers `scripts/services.sh` starts): dry-run counts at the edges of a log (an
//! empty partition, times before the first and after the last record, offsets out of range),
//! copies that keep every record, key and header, and `topology apply` run twice. Copies merge
//! the partitions by record time (a key's records in two partitions of a grown topic stay in
//! order), say how to resume when interrupted, and rely on the contract of `Bus::read` alone: a
//! short read is the log end, and a read that cannot get the records pending interrupts the
//! copy.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::faulty::{Faults, FaultyBus};
use common::{take, TestBus};
use nexus::bus::{
    partition_for, Bus, BusError, Message, OutRecord, PartitionOffsets, StartFrom,
    SubscribeOptions, TopicSpec,
};
use nexus::replay::{self, CopyRequest, ReplayError, ReplayFrom, ReplayRequest, Resume};
use nexus::topology::{self, Topology};

const WAIT: Duration = Duration::from_secs(60);

/// A key that lands in `partition` of a topic of `partitions`.
fn key_in(partition: u32, partitions: u32, tag: &str) -> String {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .find(|k| partition_for(k, partitions) == partition)
        .unwrap_or_default()
}

fn request(topic: &str, group: &str, from: ReplayFrom, partition: Option<u32>) -> ReplayRequest {
    ReplayRequest {
        topic: topic.into(),
        group: group.into(),
        from,
        to_time: None,
        partition,
    }
}

async fn consume(t: &TestBus, group: &str, topic: &str, n: usize) {
    let options = SubscribeOptions {
        start: StartFrom::Earliest,
        max_in_flight: 256,
    };
    let mut sub = t
        .bus
        .subscribe(group, topic, options)
        .await
        .expect("subscribe");
    take(&mut sub, n, WAIT, true).await;
    sub.close().await.expect("close");
}

/// Every record of a topic, partition by partition.
async fn read_all(bus: &dyn Bus, topic: &str) -> Vec<Message> {
    let mut out = Vec::new();
    for o in bus.partition_offsets(topic).await.expect("offsets") {
        let mut at = o.low;
        while at < o.high {
            let batch = bus.read(topic, o.partition, at, 100).await.expect("read");
            let Some(last) = batch.last() else { break };
            at = last.offset + 1;
            out.extend(batch);
        }
    }
    out
}

/// Partition 2 of 3 stays empty; the others get records before and after a cut. The dry run
/// counts right whatever the start: the log start, the cut, before the first record, after
/// the last, an offset past the end, one partition only.
async fn dry_run_counts_at_the_edges_of_the_log(t: TestBus) {
    let topic = t.fresh_topic(3).await;
    let group = format!("g-{topic}");
    let (k0, k1) = (key_in(0, 3, "a"), key_in(1, 3, "b"));
    let first_ms = chrono::Utc::now().timestamp_millis() - 1;
    for n in 0..4 {
        t.bus
            .publish(&topic, OutRecord::new(k0.clone(), format!("early {n}")))
            .await
            .expect("publish");
    }
    t.bus
        .publish(&topic, OutRecord::new(k1.clone(), "early b"))
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in 0..2 {
        t.bus
            .publish(&topic, OutRecord::new(k0.clone(), format!("late {n}")))
            .await
            .expect("publish");
    }
    consume(&t, &group, &topic, 7).await;

    let plan_of = |from: ReplayFrom, partition: Option<u32>| {
        let bus = t.bus.clone();
        let req = request(&topic, &group, from, partition);
        async move { replay::plan(bus.as_ref(), &req).await.expect("plan") }
    };
    let counts = |plan: &replay::ReplayPlan| -> Vec<(u32, u64, u64, u64)> {
        plan.partitions
            .iter()
            .map(|p| (p.partition, p.to_process, p.reprocess, p.skip))
            .collect()
    };

    let all = vec![(0, 6, 6, 0), (1, 1, 1, 0), (2, 0, 0, 0)];
    assert_eq!(counts(&plan_of(ReplayFrom::Offset(0), None).await), all);
    assert_eq!(
        counts(&plan_of(ReplayFrom::Time(first_ms - 60_000), None).await),
        all,
        "a time before the first record is the log start"
    );
    assert_eq!(
        counts(&plan_of(ReplayFrom::Time(cut), None).await),
        vec![(0, 2, 2, 0), (1, 0, 0, 0), (2, 0, 0, 0)]
    );
    let future = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let none = vec![(0, 0, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0)];
    assert_eq!(
        counts(&plan_of(ReplayFrom::Time(future), None).await),
        none,
        "a time after the last record is the log end"
    );
    let past_end = plan_of(ReplayFrom::Offset(u64::MAX), None).await;
    assert_eq!(counts(&past_end), none);
    assert!(past_end.partitions.iter().all(|p| p.target == p.high));
    assert_eq!(
        counts(&plan_of(ReplayFrom::Time(cut), Some(0)).await),
        vec![(0, 2, 2, 0)]
    );
    assert_eq!(
        counts(&plan_of(ReplayFrom::Offset(0), Some(2)).await),
        vec![(2, 0, 0, 0)]
    );

    // Executing a move to the end changes nothing to process; to the cut, the group reads the
    // two late records again.
    let moved = replay::execute(
        t.bus.as_ref(),
        &request(&topic, &group, ReplayFrom::Time(cut), None),
        false,
    )
    .await
    .expect("execute");
    assert_eq!(moved.total_to_process(), 2, "{moved}");
    let lag: u64 = t
        .bus
        .group_positions(&group, &topic)
        .await
        .expect("positions")
        .iter()
        .map(|p| p.lag)
        .sum();
    assert_eq!(lag, 2);
    let again = replay::plan(
        t.bus.as_ref(),
        &request(&topic, &group, ReplayFrom::Time(cut), None),
    )
    .await
    .expect("plan");
    assert_eq!(
        counts(&again),
        vec![(0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0)]
    );
}

/// A dead-letter topic of 2 partitions copied into a topic of 3: every record once, each key's
/// records in order, keys, payloads and headers (order and repeats included) kept but the
/// dead-letter ones; a time after the last record copies nothing.
async fn copy_keeps_every_record_key_and_header(t: TestBus) {
    let source = t.fresh_topic(2).await;
    let dest = t.fresh_topic(3).await;
    let keys: Vec<String> = (0..5).map(|i| format!("conv-{i}")).collect();
    for n in 0..4 {
        for key in &keys {
            let record = OutRecord::new(key.clone(), format!("{key}:{n}"))
                .with_header("b-first", "1")
                .with_header("a-second", "2")
                .with_header("b-first", "3")
                .with_header("nexus-dlq-reason", "handler_failed")
                .with_header("nexus-dlq-source-offset", "7");
            t.bus.publish(&source, record).await.expect("publish");
        }
    }
    let req = CopyRequest {
        from_topic: source.clone(),
        to_topic: dest.clone(),
        from: ReplayFrom::Offset(0),
        to_time: None,
        partition: None,
    };
    let dry = replay::copy(t.bus.as_ref(), &req, true)
        .await
        .expect("dry run");
    assert_eq!(dry.total_copied(), 20, "{dry}");
    let done = replay::copy(t.bus.as_ref(), &req, false)
        .await
        .expect("copy");
    assert_eq!(done.total_copied(), 20, "{done}");

    let copied = read_all(t.bus.as_ref(), &dest).await;
    assert_eq!(copied.len(), 20);
    for key in &keys {
        let payloads: Vec<String> = copied
            .iter()
            .filter(|m| &m.key == key)
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        let want: Vec<String> = (0..4).map(|n| format!("{key}:{n}")).collect();
        assert_eq!(payloads, want, "{key}");
    }
    for m in &copied {
        assert_eq!(m.partition, partition_for(&m.key, 3));
        let names: Vec<&str> = m.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "b-first",
                "a-second",
                "b-first",
                replay::REPLAYED_FROM_HEADER
            ],
            "{:?}",
            m.headers
        );
        let values: Vec<&str> = m.headers.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(&values[..3], ["1", "2", "3"]);
    }

    let future = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let late = CopyRequest {
        from: ReplayFrom::Time(future),
        ..req.clone()
    };
    assert_eq!(
        replay::copy(t.bus.as_ref(), &late, true)
            .await
            .expect("copy")
            .total_copied(),
        0
    );
}

fn yaml(prefix: &str, retention: &str, dlq: bool, dlq_retention: Option<&str>) -> String {
    let dlq_retention = dlq_retention
        .map(|r| format!("\n    dlq_retention: {r}"))
        .unwrap_or_default();
    format!(
        "topics:\n  - name: {prefix}.a\n    partitions: 2\n    retention: {retention}\n    dlq: {dlq}{dlq_retention}\n  - name: {prefix}.b\n    partitions: 1\n    retention: forever\n"
    )
}

/// `topology apply` twice changes nothing the second time, with retention `forever`, a DLQ
/// turned on later, or the DLQ's own retention.
async fn topology_apply_twice_changes_nothing(t: TestBus) {
    let prefix = format!("r{}", uuid::Uuid::new_v4().simple());
    for (retention, dlq, dlq_retention) in [
        ("7d", false, None),
        ("7d", true, None),
        ("7d", true, Some("forever")),
    ] {
        let text = yaml(&prefix, retention, dlq, dlq_retention);
        let topo = Topology::from_yaml_with(&text, None).expect("topology");
        let applied = match topology::apply(t.bus.as_ref(), &topo).await {
            Ok(p) => p,
            // A broker without AlterConfigs (Tansu 0.6) cannot change the DLQ's retention.
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains("AlterConfigs"), "{}: {message}", t.backend);
                continue;
            }
        };
        assert!(applied.applied, "{}: {applied}", t.backend);
        let second = topology::apply(t.bus.as_ref(), &topo)
            .await
            .expect("second apply");
        assert!(second.is_noop(), "{}: {second}", t.backend);
    }
}

/// Growing a topic and changing its retention converge, and a second apply changes nothing;
/// a broker without the operation (Tansu 0.6 has no CreatePartitions or AlterConfigs) refuses
/// with a message naming the topic and the missing operation, not a bare "admin operation".
async fn apply_updates_converge_or_name_the_missing_operation(t: TestBus) {
    let prefix = format!("u{}", uuid::Uuid::new_v4().simple());
    let first = Topology::from_yaml_with(&yaml(&prefix, "7d", false, None), None).expect("yaml");
    topology::apply(t.bus.as_ref(), &first)
        .await
        .expect("first apply");
    let topic = format!("{prefix}.a");
    let cases = [
        (
            "retention",
            yaml(&prefix, "3d", false, None),
            "AlterConfigs",
        ),
        (
            "partitions",
            yaml(&prefix, "3d", false, None).replace("partitions: 2", "partitions: 4"),
            "CreatePartitions",
        ),
    ];
    for (what, text, operation) in cases {
        let topo = Topology::from_yaml_with(&text, None).expect("yaml");
        match topology::apply(t.bus.as_ref(), &topo).await {
            Ok(applied) => {
                assert_eq!(applied.updates(), 1, "{}: {what}: {applied}", t.backend);
                let second = topology::apply(t.bus.as_ref(), &topo)
                    .await
                    .expect("second apply");
                assert!(second.is_noop(), "{}: {what}: {second}", t.backend);
            }
            Err(e) => {
                let message = e.to_string();
                assert!(
                    message.contains(&topic) && message.contains(operation),
                    "{}: {what}: the error names neither the topic nor {operation}: {message}",
                    t.backend
                );
                // Nothing else happened: the plan still shows the update.
                let plan = topology::plan(t.bus.as_ref(), &topo).await.expect("plan");
                assert!(!plan.is_noop(), "{plan}");
            }
        }
    }
}

/// More records than one read takes: every one copied once, in order.
async fn copy_spans_several_reads(t: TestBus) {
    let source = t.fresh_topic(2).await;
    let dest = t.fresh_topic(2).await;
    let n = replay::copy::READ_BATCH * 2 + 10;
    for i in 0..n {
        let key = format!("k{}", i % 3);
        t.bus
            .publish(&source, OutRecord::new(key.clone(), format!("{key}:{i}")))
            .await
            .expect("publish");
    }
    let req = CopyRequest {
        from_topic: source.clone(),
        to_topic: dest.clone(),
        from: ReplayFrom::Offset(0),
        to_time: None,
        partition: None,
    };
    let done = replay::copy(t.bus.as_ref(), &req, false)
        .await
        .expect("copy");
    assert_eq!(done.total_copied(), n as u64, "{done}");
    let copied = read_all(t.bus.as_ref(), &dest).await;
    assert_eq!(copied.len(), n);
    let original = read_all(t.bus.as_ref(), &source).await;
    let payloads = |ms: &[Message]| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = ms
            .iter()
            .map(|m| (m.key.clone(), m.payload.to_vec()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(payloads(&copied), payloads(&original));
}

fn copy_request(source: &str, dest: &str) -> CopyRequest {
    CopyRequest {
        from_topic: source.into(),
        to_topic: dest.into(),
        from: ReplayFrom::Offset(0),
        to_time: None,
        partition: None,
    }
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

/// The records of `key` in `topic`, in offset order (a key is in one partition of the
/// destination).
async fn payloads_of(bus: &dyn Bus, topic: &str, key: &str) -> Vec<String> {
    read_all(bus, topic)
        .await
        .iter()
        .filter(|m| m.key == key)
        .map(text)
        .collect()
}

/// A Kafka producer writing to a partition chosen by hand, with the record time given: what a
/// grown topic looks like where the broker cannot grow one (Tansu 0.6 has no CreatePartitions),
/// and the producers' clocks a Kafka record time is.
fn kafka_producer(t: &TestBus) -> rdkafka::producer::FutureProducer {
    let brokers = t.config.url.trim_start_matches("kafka://");
    rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("kafka producer")
}

async fn kafka_send(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    partition: u32,
    key: &str,
    payload: &str,
    time_ms: i64,
) {
    let record = rdkafka::producer::FutureRecord::to(topic)
        .partition(partition as i32)
        .key(key)
        .payload(payload)
        .timestamp(time_ms);
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("kafka send");
}

/// The reported defect: key published "0", "1", the topic grown from 3 to 5 partitions, "2",
/// "3" published, and the key's new partition numbered lower than its old one. The copy gives
/// the destination the key's records in publish order.
async fn copy_keeps_a_keys_order_across_a_grown_topic(t: TestBus) {
    let source = t.fresh_topic(3).await;
    let dest = t.fresh_topic(5).await;
    let key = (0..)
        .map(|i| format!("conv-{i}"))
        .find(|k| partition_for(k, 5) < partition_for(k, 3))
        .unwrap_or_default();
    let (old, new) = (partition_for(&key, 3), partition_for(&key, 5));
    let other = key_in(old, 3, "other");
    for n in ["0", "1"] {
        let at = t
            .bus
            .publish(&source, OutRecord::new(key.clone(), n))
            .await
            .expect("publish");
        assert_eq!(at.partition, old);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let grown = TopicSpec {
        name: source.clone(),
        partitions: 5,
        retention: None,
    };
    match t.bus.apply_topic(&grown).await {
        Ok(()) => {
            for n in ["2", "3"] {
                let at = t
                    .bus
                    .publish(&source, OutRecord::new(key.clone(), n))
                    .await
                    .expect("publish");
                assert_eq!(at.partition, new, "{}", t.backend);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Err(e) if t.backend == "kafka" && e.to_string().contains("CreatePartitions") => {
            let producer = kafka_producer(&t);
            let now = chrono::Utc::now().timestamp_millis();
            kafka_send(&producer, &source, new, &key, "2", now).await;
            kafka_send(&producer, &source, new, &key, "3", now + 1).await;
        }
        Err(e) => panic!("{}: growing {source}: {e}", t.backend),
    }
    // Another key after them in the old partition: the merge must not wait on it.
    t.bus
        .publish(&source, OutRecord::new(other.clone(), "x"))
        .await
        .expect("publish");

    let done = replay::copy(t.bus.as_ref(), &copy_request(&source, &dest), false)
        .await
        .expect("copy");
    assert_eq!(done.total_copied(), 5, "{}: {done}", t.backend);
    assert_eq!(
        payloads_of(t.bus.as_ref(), &dest, &key).await,
        ["0", "1", "2", "3"],
        "{}: key {key}, old partition {old}, new {new}",
        t.backend
    );
    assert_eq!(payloads_of(t.bus.as_ref(), &dest, &other).await, ["x"]);
}

/// Records published one after the other across three partitions reach a one-partition
/// destination in publish order, across several reads per partition.
async fn copy_merges_partitions_by_record_time(t: TestBus) {
    let source = t.fresh_topic(3).await;
    let dest = t.fresh_topic(1).await;
    let keys: Vec<String> = (0..3).map(|p| key_in(p, 3, "m")).collect();
    let mut published = Vec::new();
    for n in 0..12 {
        // Partitions in an order that is not theirs: 2, 0, 1, 1, 2, 0, ...
        let key = &keys[[2, 0, 1, 1][n % 4]];
        let payload = format!("{n}");
        t.bus
            .publish(&source, OutRecord::new(key.clone(), payload.clone()))
            .await
            .expect("publish");
        published.push(payload);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = replay::copy(t.bus.as_ref(), &copy_request(&source, &dest), false)
        .await
        .expect("copy");
    assert_eq!(done.total_copied(), 12, "{done}");
    assert!(done
        .partitions
        .iter()
        .all(|p| p.finished && p.next_offset == p.end));
    let copied: Vec<String> = read_all(t.bus.as_ref(), &dest)
        .await
        .iter()
        .map(text)
        .collect();
    assert_eq!(copied, published, "{}", t.backend);
}

/// Kafka record times are the producers' clocks and may go backwards within a partition: the
/// copy still takes a partition's records in offset order, and merges by the partitions' next
/// records only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_copy_keeps_a_partitions_order_when_its_times_go_back() {
    if !common::selected("kafka") {
        return;
    }
    let t = common::test_bus("kafka").await;
    let source = t.fresh_topic(2).await;
    let dest = t.fresh_topic(1).await;
    let producer = kafka_producer(&t);
    let base = chrono::Utc::now().timestamp_millis() - 60_000;
    kafka_send(&producer, &source, 0, "a", "a1", base + 10).await;
    kafka_send(&producer, &source, 0, "a", "a2", base).await;
    kafka_send(&producer, &source, 1, "b", "b1", base + 5).await;
    let done = replay::copy(t.bus.as_ref(), &copy_request(&source, &dest), false)
        .await
        .expect("copy");
    assert_eq!(done.total_copied(), 3, "{done}");
    let copied: Vec<String> = read_all(t.bus.as_ref(), &dest)
        .await
        .iter()
        .map(text)
        .collect();
    // Partition by partition gives a1 a2 b1; sorting every record by time gives a2 b1 a1.
    assert_eq!(copied, ["b1", "a1", "a2"]);
}

/// Faults the services cannot be made to show on demand, on one topic of a real bus: the
/// n-th publish to it fails, every read of one partition of it fails as a read that cannot get
/// the records pending does (`ReadIncomplete`), or its log ends lie past the partitions' last
/// records (as on Kafka where transaction markers come last). It counts the reads of the topic.
struct Faulty {
    topic: String,
    /// The publish (1-based, to `topic`) that fails; 0 = none.
    fail_publish: usize,
    published: AtomicUsize,
    /// The partition of `topic` whose reads fail.
    failing_reads: Option<u32>,
    /// Offsets without a record reported after each partition's last record of `topic`.
    markers_last: u64,
    reads: AtomicUsize,
}

impl Faulty {
    fn new(topic: &str) -> Self {
        Faulty {
            topic: topic.to_owned(),
            fail_publish: 0,
            published: AtomicUsize::new(0),
            failing_reads: None,
            markers_last: 0,
            reads: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Faults for Faulty {
    async fn publish(&self, topic: &str) -> Result<(), BusError> {
        if topic == self.topic
            && self.published.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_publish
        {
            return Err(BusError::Unavailable("injected publish failure".into()));
        }
        Ok(())
    }
    fn read(&self, topic: &str, partition: u32, from: u64) -> Result<(), BusError> {
        if topic == self.topic {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.failing_reads == Some(partition) {
                return Err(BusError::ReadIncomplete {
                    topic: topic.to_owned(),
                    partition,
                    offset: from,
                    pending: 3,
                    detail: "injected".into(),
                });
            }
        }
        Ok(())
    }
    fn offsets(&self, topic: &str, offsets: &mut [PartitionOffsets]) {
        if topic == self.topic {
            for o in offsets {
                o.high += self.markers_last;
            }
        }
    }
}

/// A copy interrupted part-way names every partition's next offset not yet copied, the ones
/// not started included, and following its resume instruction yields every record, each key's
/// in order; what comes twice is only what the instruction says may.
async fn an_interrupted_copy_says_how_to_resume_without_loss(t: TestBus) {
    let source = t.fresh_topic(3).await;
    let dest = t.fresh_topic(2).await;
    let keys: Vec<String> = (0..3).map(|p| key_in(p, 3, "r")).collect();
    for n in 0..15 {
        let key = &keys[[1, 2, 0][n % 3]];
        t.bus
            .publish(&source, OutRecord::new(key.clone(), format!("{key}:{n}")))
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let faulty = FaultyBus::new(
        t.bus.clone(),
        Faulty {
            fail_publish: 6,
            ..Faulty::new(&dest)
        },
    );
    let req = copy_request(&source, &dest);
    let err = replay::copy(&faulty, &req, false)
        .await
        .expect_err("the 6th publish fails");
    let ReplayError::CopyInterrupted { progress, .. } = &err else {
        panic!("{}: {err}", t.backend);
    };
    assert_eq!(progress.total_copied(), 5, "{err}");
    assert_eq!(progress.partitions.len(), 3, "{err}");
    let message = err.to_string();
    for p in &progress.partitions {
        assert!(
            p.start <= p.next_offset && p.next_offset <= p.end,
            "{message}"
        );
        assert!(
            message.contains(&format!("partition {}: {} copied", p.partition, p.copied)),
            "{message}"
        );
    }
    let Resume::Time(at) = progress.resume else {
        panic!("{}: several partitions are left: {message}", t.backend);
    };
    assert!(message.contains(&replay::format_time(at)), "{message}");
    assert!(message.contains("--from-time"), "{message}");

    let resumed = CopyRequest {
        from: ReplayFrom::Time(at),
        ..req
    };
    replay::copy(t.bus.as_ref(), &resumed, false)
        .await
        .expect("resume");

    let original = read_all(t.bus.as_ref(), &source).await;
    let copies = read_all(t.bus.as_ref(), &dest).await;
    let origin = |m: &Message| {
        m.header(replay::REPLAYED_FROM_HEADER)
            .unwrap_or("")
            .to_owned()
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &copies {
        *seen.entry(origin(m)).or_default() += 1;
    }
    for m in &original {
        let id = format!("{}/{}/{}", m.topic, m.partition, m.offset);
        let times = seen.get(&id).copied().unwrap_or(0);
        assert!(times >= 1, "{}: {id} was lost", t.backend);
        // Copied twice only if the resume took it again: at or after the resume time.
        assert!(
            times == 1 || m.timestamp_ms >= at,
            "{}: {id} copied {times} times, before the resume time",
            t.backend
        );
    }
    for key in &keys {
        let mut first_seen = Vec::new();
        for m in copies.iter().filter(|m| &m.key == key) {
            let p = text(m);
            if !first_seen.contains(&p) {
                first_seen.push(p);
            }
        }
        let want: Vec<String> = original
            .iter()
            .filter(|m| &m.key == key)
            .map(text)
            .collect();
        assert_eq!(first_seen, want, "{}: {key}", t.backend);
    }

    // One partition left: resumed by offset, every record exactly once.
    let dest = t.fresh_topic(1).await;
    let one = CopyRequest {
        partition: Some(1),
        ..copy_request(&source, &dest)
    };
    let faulty = FaultyBus::new(
        t.bus.clone(),
        Faulty {
            fail_publish: 3,
            ..Faulty::new(&dest)
        },
    );
    let err = replay::copy(&faulty, &one, false)
        .await
        .expect_err("the 3rd publish fails");
    let ReplayError::CopyInterrupted { progress, .. } = &err else {
        panic!("{}: {err}", t.backend);
    };
    let Resume::Offset { partition, offset } = progress.resume else {
        panic!("{}: one partition is left: {err}", t.backend);
    };
    assert_eq!(partition, 1, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("--from-offset {offset} --partition 1")),
        "{err}"
    );
    let resumed = CopyRequest {
        from: ReplayFrom::Offset(offset),
        ..one
    };
    replay::copy(t.bus.as_ref(), &resumed, false)
        .await
        .expect("resume");
    let copied: Vec<String> = read_all(t.bus.as_ref(), &dest)
        .await
        .iter()
        .map(text)
        .collect();
    let want: Vec<String> = original
        .iter()
        .filter(|m| m.partition == 1)
        .map(text)
        .collect();
    assert_eq!(copied, want, "{}", t.backend);
}

/// A copy relies on the contract of `Bus::read`, the same on every backend: a read shorter
/// than asked for ends at the log end, so a partition whose records fit in one read is read
/// once, also where the log end lies past its last record (offsets without a record last, as
/// transaction markers on Kafka): no read again to find the end, no backend's case apart, and
/// every record is copied.
async fn a_short_read_ends_a_partition(t: TestBus) {
    let source = t.fresh_topic(2).await;
    let dest = t.fresh_topic(2).await;
    let (k0, k1) = (key_in(0, 2, "s"), key_in(1, 2, "s"));
    for n in 0..4 {
        for key in [&k0, &k1] {
            t.bus
                .publish(&source, OutRecord::new(key.clone(), format!("{n}")))
                .await
                .expect("publish");
        }
    }
    let faulty = FaultyBus::new(
        t.bus.clone(),
        Faulty {
            markers_last: 3,
            ..Faulty::new(&source)
        },
    );
    let done = replay::copy(&faulty, &copy_request(&source, &dest), false)
        .await
        .expect("copy");
    assert_eq!(done.total_copied(), 8, "{}: {done}", t.backend);
    assert!(done.partitions.iter().all(|p| p.finished), "{done}");
    assert_eq!(
        faulty.faults.reads.load(Ordering::SeqCst),
        2,
        "{}: one read per partition",
        t.backend
    );
    assert_eq!(read_all(t.bus.as_ref(), &dest).await.len(), 8);
}

/// A read that cannot get the records the bus has pending (`ReadIncomplete`) interrupts the
/// copy, the bus error kept as its cause and the partitions' progress with it, rather than the
/// copy reporting a partition complete that is not.
async fn a_read_that_cannot_get_pending_records_interrupts_the_copy(t: TestBus) {
    let source = t.fresh_topic(2).await;
    let dest = t.fresh_topic(2).await;
    let (k0, k1) = (key_in(0, 2, "e"), key_in(1, 2, "e"));
    for n in 0..3 {
        for key in [&k0, &k1] {
            t.bus
                .publish(&source, OutRecord::new(key.clone(), format!("{n}")))
                .await
                .expect("publish");
        }
    }
    let faulty = FaultyBus::new(
        t.bus.clone(),
        Faulty {
            failing_reads: Some(1),
            ..Faulty::new(&source)
        },
    );
    let err = replay::copy(&faulty, &copy_request(&source, &dest), false)
        .await
        .expect_err("partition 1 cannot be read");
    let ReplayError::CopyInterrupted {
        progress,
        source: BusError::ReadIncomplete { partition, .. },
    } = &err
    else {
        panic!("{}: {err}", t.backend);
    };
    assert_eq!(*partition, 1, "{err}");
    assert_eq!(progress.total_copied(), 0, "{err}");
    assert_eq!(progress.resume, Resume::Again, "{err}");
    assert!(
        progress.partitions.iter().all(|p| !p.finished),
        "{}: no partition is reported done: {err}",
        t.backend
    );
}

per_backend!(
    copy_keeps_a_keys_order_across_a_grown_topic,
    copy_merges_partitions_by_record_time,
    an_interrupted_copy_says_how_to_resume_without_loss,
    a_short_read_ends_a_partition,
    a_read_that_cannot_get_pending_records_interrupts_the_copy,
    copy_spans_several_reads,
    dry_run_counts_at_the_edges_of_the_log,
    copy_keeps_every_record_key_and_header,
    topology_apply_twice_changes_nothing,
    apply_updates_converge_or_name_the_missing_operation,
);
