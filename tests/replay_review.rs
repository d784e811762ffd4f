//! Replay and topology edge cases on every backend (embedded always; NATS JetStream and Kafka
//! with the servers `scripts/services.sh` starts): dry-run counts at the edges of a log (an
//! empty partition, times before the first and after the last record, offsets out of range),
//! copies that keep every record, key and header, and `topology apply` run twice.

mod common;

use std::time::Duration;

use common::{take, TestBus};
use nexus::bus::{partition_for, Bus, Message, OutRecord, StartFrom, SubscribeOptions};
use nexus::replay::{self, CopyRequest, ReplayFrom, ReplayRequest};
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

per_backend!(
    copy_spans_several_reads,
    dry_run_counts_at_the_edges_of_the_log,
    copy_keeps_every_record_key_and_header,
    topology_apply_twice_changes_nothing,
    apply_updates_converge_or_name_the_missing_operation,
);
