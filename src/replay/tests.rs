//! Replay and copy against the embedded bus.

use std::time::Duration;

use super::*;
use crate::bus::{OutRecord, StartFrom, SubscribeOptions, TopicSpec};
use crate::topology::test_support::embedded_bus;

async fn topic(bus: &dyn Bus, name: &str, partitions: u32) {
    bus.apply_topic(&TopicSpec {
        name: name.into(),
        partitions,
        retention: None,
    })
    .await
    .unwrap();
}

/// Publishes `n` records with keys `k0..kn` and returns how many landed in each partition.
async fn publish(bus: &dyn Bus, topic: &str, range: std::ops::Range<usize>) -> Vec<(u32, u64)> {
    let mut landed = Vec::new();
    for i in range {
        let p = bus
            .publish(
                topic,
                OutRecord::new(format!("k{i}"), format!("payload {i}")),
            )
            .await
            .unwrap();
        landed.push((p.partition, p.offset));
    }
    landed
}

fn per_partition(landed: &[(u32, u64)], partition: u32) -> u64 {
    landed.iter().filter(|(p, _)| *p == partition).count() as u64
}

/// Consumes and acks `n` records as `group`, then leaves the group (committing).
async fn consume(bus: &dyn Bus, group: &str, topic: &str, n: usize) {
    let options = SubscribeOptions {
        start: StartFrom::Earliest,
        ..Default::default()
    };
    let mut sub = bus.subscribe(group, topic, options).await.unwrap();
    for _ in 0..n {
        let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("delivery in time")
            .expect("subscription open")
            .unwrap();
        delivery.ack().await.unwrap();
    }
    sub.close().await.unwrap();
}

fn request(topic: &str, group: &str, from: ReplayFrom) -> ReplayRequest {
    ReplayRequest {
        topic: topic.into(),
        group: group.into(),
        from,
        to_time: None,
        partition: None,
    }
}

#[tokio::test]
async fn dry_run_counts_per_partition_from_offset_and_time() {
    let (bus, _dir) = embedded_bus();
    let bus = bus.as_ref();
    topic(bus, "t", 3).await;
    let first = publish(bus, "t", 0..30).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = publish(bus, "t", 30..42).await;
    consume(bus, "g", "t", 42).await;

    let plan = super::plan(bus, &request("t", "g", ReplayFrom::Offset(0)))
        .await
        .unwrap();
    assert_eq!(plan.partitions.len(), 3);
    for p in &plan.partitions {
        let n = per_partition(&first, p.partition) + per_partition(&second, p.partition);
        assert_eq!(p.current, Some(p.high), "group consumed everything");
        assert_eq!(p.target, p.low);
        assert_eq!(p.to_process, n, "partition {}", p.partition);
        assert_eq!(p.reprocess, n, "all of it processed before");
        assert_eq!(p.skip, 0);
    }
    assert_eq!(plan.total_reprocess(), 42);
    let text = plan.to_string();
    assert!(text.contains("PARTITION"), "{text}");
    assert!(
        text.ends_with("Dry run: nothing was changed (use --execute to move the group)."),
        "{text}"
    );

    let plan = super::plan(bus, &request("t", "g", ReplayFrom::Time(t)))
        .await
        .unwrap();
    for p in &plan.partitions {
        assert_eq!(
            p.reprocess,
            per_partition(&second, p.partition),
            "partition {}",
            p.partition
        );
    }
    assert_eq!(plan.total_reprocess(), 12);

    // Nothing moved by a dry run.
    let positions = bus.group_positions("g", "t").await.unwrap();
    assert!(positions.iter().all(|p| p.committed == Some(p.high)));

    // An offset past the end is clamped to the end: nothing to reprocess.
    let plan = super::plan(bus, &request("t", "g", ReplayFrom::Offset(1_000_000)))
        .await
        .unwrap();
    assert!(plan
        .partitions
        .iter()
        .all(|p| p.target == p.high && p.to_process == 0 && p.reprocess == 0));
}

#[tokio::test]
async fn a_target_ahead_of_the_group_is_reported_as_skipped() {
    let (bus, _dir) = embedded_bus();
    let bus = bus.as_ref();
    topic(bus, "one", 1).await;
    publish(bus, "one", 0..10).await;
    consume(bus, "g", "one", 2).await;

    let plan = super::plan(bus, &request("one", "g", ReplayFrom::Offset(7)))
        .await
        .unwrap();
    let p = plan.partition(0).unwrap();
    // Events 7-9 were never processed: processed, not reprocessed.
    assert_eq!(
        (p.current, p.target, p.to_process, p.reprocess, p.skip),
        (Some(2), 7, 3, 0, 5)
    );
    assert!(
        plan.to_string()
            .contains("warning: 5 event(s) will be skipped"),
        "{plan}"
    );

    // A group that never committed shows `-` and what it could skip from the log start.
    let plan = super::plan(bus, &request("one", "fresh", ReplayFrom::Offset(4)))
        .await
        .unwrap();
    let p = plan.partition(0).unwrap();
    assert_eq!(
        (p.current, p.to_process, p.reprocess, p.skip),
        (None, 6, 0, 4)
    );
    let row = plan.to_string().lines().nth(2).unwrap().to_owned();
    assert!(
        row.split_whitespace().eq(["0", "-", "4", "6", "0", "4"]),
        "{row}"
    );
}

/// A lagging group moved back processes again only what it had processed: the backlog beyond
/// its position it would have processed anyway.
#[tokio::test]
async fn only_what_the_group_processed_counts_as_reprocessed() {
    let (bus, _dir) = embedded_bus();
    let bus = bus.as_ref();
    topic(bus, "one", 1).await;
    publish(bus, "one", 0..10).await;
    consume(bus, "g", "one", 8).await;

    let plan = super::plan(bus, &request("one", "g", ReplayFrom::Offset(2)))
        .await
        .unwrap();
    let p = plan.partition(0).unwrap();
    assert_eq!(
        (p.current, p.target, p.to_process, p.reprocess, p.skip),
        (Some(8), 2, 8, 6, 0)
    );
    let total = plan.to_string().lines().nth(3).unwrap().to_owned();
    assert!(
        total.split_whitespace().eq(["TOTAL", "8", "6", "0"]),
        "{total}"
    );
}

#[tokio::test]
async fn execute_refuses_active_members_unless_forced() {
    let (bus, _dir) = embedded_bus();
    let bus = bus.as_ref();
    topic(bus, "t", 2).await;
    publish(bus, "t", 0..10).await;
    consume(bus, "g", "t", 10).await;
    let req = request("t", "g", ReplayFrom::Offset(0));

    let member = bus
        .subscribe("g", "t", SubscribeOptions::default())
        .await
        .unwrap();
    let e = execute(bus, &req, false).await.unwrap_err();
    assert!(
        matches!(&e, ReplayError::ActiveMembers { group, members: 1, .. } if group == "g"),
        "{e}"
    );
    let positions = bus.group_positions("g", "t").await.unwrap();
    assert!(
        positions.iter().all(|p| p.committed == Some(p.high)),
        "refused means unchanged"
    );

    let forced = execute(bus, &req, true).await.unwrap();
    assert!(forced.executed && forced.forced);
    member.close().await.unwrap();

    // Without members it just works, and the group is where the plan said.
    let moved = execute(bus, &req, false).await.unwrap();
    assert!(moved.executed && !moved.forced);
    // The forced move already put it at the start: nothing processed since, so nothing again.
    assert_eq!((moved.total_to_process(), moved.total_reprocess()), (10, 0));
    let positions = bus.group_positions("g", "t").await.unwrap();
    for p in &moved.partitions {
        let pos = positions
            .iter()
            .find(|q| q.partition == p.partition)
            .unwrap();
        assert_eq!(pos.committed, Some(p.target));
    }
    // The replayed events are delivered again.
    consume(bus, "g", "t", 10).await;
}

/// A group whose position is the target already can still have acks above it (one record
/// left unacked, the ones after it acked): executing moves it all the same, so everything the
/// plan counts is processed again, not only the unacked record.
#[tokio::test]
async fn execute_at_the_current_position_replays_what_was_acked_above_it() {
    let (bus, _dir) = embedded_bus();
    let bus = bus.as_ref();
    topic(bus, "t", 1).await;
    publish(bus, "t", 0..10).await;
    let mut sub = bus
        .subscribe("g", "t", SubscribeOptions::default())
        .await
        .unwrap();
    let mut unacked = None;
    for _ in 0..10 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("delivery in time")
            .expect("subscription open")
            .unwrap();
        if delivery.message.offset == 1 {
            unacked = Some(delivery);
        } else {
            delivery.ack().await.unwrap();
        }
    }
    drop(unacked);
    sub.close().await.unwrap();

    let req = request("t", "g", ReplayFrom::Offset(1));
    let moved = execute(bus, &req, false).await.unwrap();
    let p = moved.partition(0).unwrap();
    assert_eq!((p.current, p.target, p.to_process), (Some(1), 1, 9));

    let mut sub = bus
        .subscribe("g", "t", SubscribeOptions::default())
        .await
        .unwrap();
    let mut offsets = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        let delivery = delivery.unwrap();
        offsets.push(delivery.message.offset);
        delivery.ack().await.unwrap();
    }
    sub.close().await.unwrap();
    assert_eq!(offsets, (1..10).collect::<Vec<u64>>());
}

#[tokio::test]
async fn requests_are_checked() {
    let (bus, _dir) = embedded_bus();
    let bus = bus.as_ref();
    topic(bus, "t", 2).await;

    let mut req = request("t", "g", ReplayFrom::Offset(0));
    req.to_time = Some(1);
    assert!(matches!(
        super::plan(bus, &req).await,
        Err(ReplayError::ToTimeNeedsCopy)
    ));

    let mut req = request("t", "g", ReplayFrom::Offset(0));
    req.partition = Some(2);
    assert!(matches!(
        super::plan(bus, &req).await,
        Err(ReplayError::UnknownPartition {
            partition: 2,
            partitions: 2,
            ..
        })
    ));
    req.partition = Some(1);
    assert_eq!(super::plan(bus, &req).await.unwrap().partitions.len(), 1);

    let req = request("nope", "g", ReplayFrom::Offset(0));
    assert!(
        matches!(super::plan(bus, &req).await, Err(ReplayError::UnknownTopic(t)) if t == "nope")
    );
}

#[test]
fn times_parse_as_rfc3339() {
    assert_eq!(parse_time("1970-01-01T00:00:01.5Z").unwrap(), 1500);
    assert_eq!(
        parse_time("2024-05-01T14:00:00+02:00").unwrap(),
        parse_time("2024-05-01T12:00:00Z").unwrap()
    );
    assert!(matches!(
        parse_time("yesterday"),
        Err(ReplayError::InvalidTime { .. })
    ));
    assert_eq!(format_time(1500), "1970-01-01T00:00:01.500Z");
}

#[tokio::test]
async fn copy_from_a_dead_letter_topic_keeps_keys_and_payloads_and_drops_dlq_headers() {
    let (bus, _dir) = embedded_bus();
    let bus = bus.as_ref();
    topic(bus, "src", 2).await;
    topic(bus, "src.dlq", 2).await;
    for i in 0..6 {
        let record = OutRecord::new(format!("conv-{i}"), format!("body {i}"))
            .with_header("nexus-event-type", "MessageReceived")
            .with_header("nexus-dlq-reason", "undecodable_body")
            .with_header("nexus-dlq-source-offset", "42")
            .with_header("traceparent", "00-abc-def-01");
        bus.publish("src.dlq", record).await.unwrap();
    }
    // A dead letter the bus took only without its payload: nothing to copy back.
    let bare = OutRecord::new("conv-big", Vec::new())
        .with_header("nexus-dlq-reason", "not_single_object")
        .with_header("nexus-dlq-payload-omitted", "1048000");
    bus.publish("src.dlq", bare).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(20)).await;
    bus.publish("src.dlq", OutRecord::new("late", "late body"))
        .await
        .unwrap();

    let req = CopyRequest {
        from_topic: "src.dlq".into(),
        to_topic: "src".into(),
        from: ReplayFrom::Offset(0),
        to_time: Some(cut),
        partition: None,
    };
    let dry = copy(bus, &req, true).await.unwrap();
    assert_eq!(dry.total_copied(), 6);
    let without: u64 = dry.partitions.iter().map(|p| p.without_payload).sum();
    assert_eq!(without, 1);
    assert!(
        dry.to_string()
            .contains("1 dead letter(s) without their payload"),
        "{dry}"
    );
    assert!(dry
        .to_string()
        .ends_with("Dry run: nothing was published (use --execute to copy)."));
    assert!(bus
        .partition_offsets("src")
        .await
        .unwrap()
        .iter()
        .all(|o| o.high == o.low));

    let report = copy(bus, &req, false).await.unwrap();
    assert_eq!(report.total_copied(), 6, "{report}");

    let mut copied = Vec::new();
    for o in bus.partition_offsets("src").await.unwrap() {
        let messages = bus.read("src", o.partition, o.low, 100).await.unwrap();
        let expected = report
            .partitions
            .iter()
            .find(|p| p.partition == o.partition)
            .unwrap()
            .copied;
        assert_eq!(messages.len() as u64, expected, "partition {}", o.partition);
        copied.extend(messages);
    }
    copied.sort_by_key(|m| m.key.clone());
    assert_eq!(copied.len(), 6);
    for (i, m) in copied.iter().enumerate() {
        assert_eq!(m.key, format!("conv-{i}"));
        assert_eq!(&m.payload[..], format!("body {i}").as_bytes());
        assert!(
            m.headers.iter().all(|(k, _)| !k.starts_with("nexus-dlq-")),
            "{:?}",
            m.headers
        );
        assert_eq!(m.header("nexus-event-type"), Some("MessageReceived"));
        assert_eq!(m.header("traceparent"), Some("00-abc-def-01"));
        let from = m.header(REPLAYED_FROM_HEADER).unwrap();
        assert!(from.starts_with("src.dlq/"), "{from}");
        // Same key, same partition count: back in the partition it came from.
        assert_eq!(from.split('/').nth(1).unwrap(), m.partition.to_string());
    }

    // Without the time bound the late record comes too.
    let all = CopyRequest {
        to_time: None,
        ..req.clone()
    };
    assert_eq!(copy(bus, &all, true).await.unwrap().total_copied(), 7);

    let same = CopyRequest {
        to_topic: "src.dlq".into(),
        ..req.clone()
    };
    assert!(matches!(
        copy(bus, &same, true).await,
        Err(ReplayError::SameTopic(_))
    ));
    let missing = CopyRequest {
        to_topic: "elsewhere".into(),
        ..req
    };
    assert!(
        matches!(copy(bus, &missing, true).await, Err(ReplayError::UnknownTopic(t)) if t == "elsewhere")
    );
}

#[test]
fn copied_record_replaces_an_earlier_replay_header() {
    let message = crate::bus::Message {
        topic: "a.dlq".into(),
        partition: 3,
        offset: 9,
        timestamp_ms: 0,
        key: "k".into(),
        payload: bytes::Bytes::from_static(b"p"),
        headers: vec![
            (REPLAYED_FROM_HEADER.into(), "x/0/0".into()),
            ("nexus-dlq-error".into(), "boom".into()),
            ("h".into(), "v".into()),
        ],
    };
    let record = copied_record(&message);
    assert_eq!(
        record.headers,
        vec![
            ("h".to_owned(), "v".to_owned()),
            (REPLAYED_FROM_HEADER.to_owned(), "a.dlq/3/9".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_directory_without_an_embedded_bus_is_refused_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo").join("bus");
    let mut config = crate::config::Config::defaults().bus;
    config.url = format!("embedded://{}", missing.display());
    let e = connect_existing(&config).await.err().expect("refused");
    assert!(matches!(&e, ReplayError::NoEmbeddedBus(d) if d == &missing.display().to_string()));
    let text = e.to_string();
    assert!(
        text.contains("--data-dir") && text.contains("bus.url"),
        "{text}"
    );
    assert!(!missing.exists(), "created {}", missing.display());

    // An empty directory is no bus either; one that holds a bus opens.
    std::fs::create_dir_all(&missing).unwrap();
    assert!(connect_existing(&config).await.is_err());
    drop(crate::bus::embedded::EmbeddedBus::open(&missing, &config).unwrap());
    connect_existing(&config)
        .await
        .expect("an existing bus opens");
}
