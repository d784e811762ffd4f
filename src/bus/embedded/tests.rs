use std::collections::HashSet;
use std::time::Duration;

use super::*;
use crate::config::Config;

fn config(max_batch: usize) -> crate::config::BusConfig {
    let mut c = Config::defaults().bus;
    c.embedded.max_batch = max_batch;
    c
}

fn open(dir: &Path) -> EmbeddedBus {
    EmbeddedBus::open(dir, &config(64)).expect("open bus")
}

async fn topic(bus: &EmbeddedBus, name: &str, partitions: u32) {
    bus.apply_topic(&TopicSpec {
        name: name.into(),
        partitions,
        retention: None,
    })
    .await
    .unwrap();
}

fn opts(max_in_flight: usize) -> SubscribeOptions {
    SubscribeOptions {
        start: StartFrom::Earliest,
        max_in_flight,
        transient: false,
    }
}

/// The next delivery, failing the test if none comes within five seconds.
async fn next(sub: &mut Box<dyn Subscription>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
        .expect("delivery ok")
}

/// Whether nothing is delivered for a short while.
async fn quiet(sub: &mut Box<dyn Subscription>) -> bool {
    tokio::time::timeout(Duration::from_millis(150), sub.next())
        .await
        .is_err()
}

#[tokio::test]
async fn restart_keeps_records_and_acks() {
    let dir = tempfile::tempdir().unwrap();
    {
        let bus = open(dir.path());
        topic(&bus, "t", 1).await;
        for i in 0..5 {
            let p = bus
                .publish(
                    "t",
                    OutRecord::new("k", format!("m{i}")).with_header("h", "v"),
                )
                .await
                .unwrap();
            assert_eq!(
                p,
                Published {
                    partition: 0,
                    offset: i
                }
            );
        }
        let mut sub = bus.subscribe("g", "t", opts(16)).await.unwrap();
        for _ in 0..2 {
            next(&mut sub).await.ack().await.unwrap();
        }
        // Handed out but not acked: must come again after the restart.
        let _unacked = next(&mut sub).await;
        drop(sub);
    }
    let bus = open(dir.path());
    assert_eq!(bus.topic_info("t").await.unwrap().unwrap().partitions, 1);
    let pos = bus.group_positions("g", "t").await.unwrap();
    assert_eq!(
        pos[0],
        GroupPosition {
            partition: 0,
            committed: Some(2),
            high: 5,
            lag: 3
        }
    );
    let mut sub = bus.subscribe("g", "t", opts(16)).await.unwrap();
    for i in 2..5 {
        let d = next(&mut sub).await;
        assert_eq!(d.message.offset, i);
        assert_eq!(d.message.payload, format!("m{i}"));
        assert_eq!(d.message.header("h"), Some("v"));
        d.ack().await.unwrap();
    }
    assert!(quiet(&mut sub).await);
    sub.close().await.unwrap();
    // Offsets continue after a restart.
    assert_eq!(
        bus.publish("t", OutRecord::new("k", "m5"))
            .await
            .unwrap()
            .offset,
        5
    );
    assert_eq!(bus.group_positions("g", "t").await.unwrap()[0].lag, 1);
}

#[tokio::test]
async fn out_of_order_acks_commit_only_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 1).await;
    for i in 0..4 {
        bus.publish("t", OutRecord::new("k", format!("{i}")))
            .await
            .unwrap();
    }
    let mut sub = bus.subscribe("g", "t", opts(16)).await.unwrap();
    let mut ds = Vec::new();
    for _ in 0..4 {
        ds.push(next(&mut sub).await);
    }
    let d3 = ds.pop().unwrap();
    let d2 = ds.pop().unwrap();
    let d1 = ds.pop().unwrap();
    let d0 = ds.pop().unwrap();
    d1.ack().await.unwrap();
    d3.ack().await.unwrap();
    assert_eq!(
        bus.group_positions("g", "t").await.unwrap()[0].committed,
        None
    );
    d0.ack().await.unwrap();
    assert_eq!(
        bus.group_positions("g", "t").await.unwrap()[0].committed,
        Some(2)
    );
    drop(d2);
    sub.close().await.unwrap();
    // Durable after close: a restart sees the prefix and redelivers 2 (3 was acked but lies
    // past the gap, so it comes again too).
    drop(bus);
    let bus = open(dir.path());
    assert_eq!(
        bus.group_positions("g", "t").await.unwrap()[0].committed,
        Some(2)
    );
    let mut sub = bus.subscribe("g", "t", opts(16)).await.unwrap();
    assert_eq!(next(&mut sub).await.message.offset, 2);
    assert_eq!(next(&mut sub).await.message.offset, 3);
}

#[tokio::test]
async fn members_split_partitions_and_a_dead_members_work_moves() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 4).await;
    let mut a = bus.subscribe("g", "t", opts(64)).await.unwrap();
    let mut b = bus.subscribe("g", "t", opts(64)).await.unwrap();
    assert_eq!(bus.active_members("g", "t").await.unwrap(), 2);
    let mut per_partition = [0u32; 4];
    for i in 0..40 {
        let p = bus
            .publish("t", OutRecord::new(format!("k{i}"), "x"))
            .await
            .unwrap();
        per_partition[p.partition as usize] += 1;
    }
    assert!(per_partition.iter().all(|&n| n > 0), "{per_partition:?}");
    // Each member sees two partitions; A acks all, B acks nothing and dies.
    let (mut a_parts, mut b_parts) = (HashSet::new(), HashSet::new());
    let mut b_seen = Vec::new();
    let mut a_count = 0;
    while a_count + b_seen.len() < 40 {
        tokio::select! {
            d = next(&mut a) => { a_parts.insert(d.message.partition); a_count += 1; d.ack().await.unwrap(); }
            d = next(&mut b) => { b_parts.insert(d.message.partition); b_seen.push(d); }
        }
    }
    assert_eq!(a_parts.len(), 2);
    assert_eq!(b_parts.len(), 2);
    assert!(a_parts.is_disjoint(&b_parts));
    drop(b);
    assert_eq!(bus.active_members("g", "t").await.unwrap(), 1);
    // B's late acks must not count for A's new tracking.
    for d in b_seen.drain(..2) {
        d.ack().await.unwrap();
    }
    let mut redelivered = 0;
    while redelivered < 40 - a_count {
        let d = next(&mut a).await;
        assert!(b_parts.contains(&d.message.partition));
        redelivered += 1;
        d.ack().await.unwrap();
    }
    assert!(quiet(&mut a).await);
    let lag: u64 = bus
        .group_positions("g", "t")
        .await
        .unwrap()
        .iter()
        .map(|p| p.lag)
        .sum();
    assert_eq!(lag, 0);
}

#[tokio::test]
async fn max_in_flight_bounds_unacked_records() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 1).await;
    for i in 0..5 {
        bus.publish("t", OutRecord::new("k", format!("{i}")))
            .await
            .unwrap();
    }
    let mut sub = bus.subscribe("g", "t", opts(2)).await.unwrap();
    let d0 = next(&mut sub).await;
    let _d1 = next(&mut sub).await;
    assert!(quiet(&mut sub).await);
    d0.ack().await.unwrap();
    assert_eq!(next(&mut sub).await.message.offset, 2);
}

#[tokio::test]
async fn consumers_wake_on_append_and_latest_starts_at_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 2).await;
    bus.publish("t", OutRecord::new("old", "old"))
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(
            "tail",
            "t",
            SubscribeOptions {
                start: StartFrom::Latest,
                max_in_flight: 8,
                transient: false,
            },
        )
        .await
        .unwrap();
    assert!(quiet(&mut sub).await);
    bus.publish("t", OutRecord::new("new", "new"))
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.message.payload, "new");
}

#[tokio::test]
async fn offset_for_time_finds_the_first_record_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 1).await;
    let mut times = Vec::new();
    for i in 0..6 {
        bus.publish("t", OutRecord::new("k", format!("{i}")))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    for m in bus.read("t", 0, 0, 100).await.unwrap() {
        times.push(m.timestamp_ms);
    }
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(bus.offset_for_time("t", 0, i64::MIN).await.unwrap(), 0);
    assert_eq!(
        bus.offset_for_time("t", 0, times[3]).await.unwrap(),
        times.iter().position(|&t| t == times[3]).unwrap() as u64
    );
    assert_eq!(bus.offset_for_time("t", 0, times[5] + 1).await.unwrap(), 6);
    assert!(matches!(
        bus.offset_for_time("t", 7, 0).await,
        Err(BusError::UnknownPartition { .. })
    ));
}

#[tokio::test]
async fn retention_moves_low_and_consumers_and_lag_follow() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    let spec = TopicSpec {
        name: "t".into(),
        partitions: 1,
        retention: Some(Duration::from_millis(200)),
    };
    bus.apply_topic(&spec).await.unwrap();
    for i in 0..3 {
        bus.publish("t", OutRecord::new("k", format!("{i}")))
            .await
            .unwrap();
    }
    let mut sub = bus.subscribe("g", "t", opts(8)).await.unwrap();
    next(&mut sub).await.ack().await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    bus.publish("t", OutRecord::new("k", "fresh"))
        .await
        .unwrap();
    bus.enforce_retention().await.unwrap();
    let offs = bus.partition_offsets("t").await.unwrap();
    assert_eq!(
        offs[0],
        PartitionOffsets {
            partition: 0,
            low: 3,
            high: 4
        }
    );
    assert_eq!(bus.count_between("t", 0, 0, 4).await.unwrap(), 1);
    assert_eq!(bus.read("t", 0, 0, 10).await.unwrap().len(), 1);
    // Committed 1 < low 3: lag counts only what is still there.
    let lagger = bus.group_positions("g", "t").await.unwrap()[0];
    assert_eq!(lagger.committed, Some(1));
    assert_eq!(lagger.lag, 1);
    // A fresh member (after the old one died) skips the expired records and commits past them.
    drop(sub);
    let mut sub = bus.subscribe("g", "t", opts(8)).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.message.offset, 3);
    d.ack().await.unwrap();
    assert_eq!(
        bus.group_positions("g", "t").await.unwrap()[0].committed,
        Some(4)
    );
}

#[tokio::test]
async fn group_commit_answers_every_publisher() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Arc::new(EmbeddedBus::open(dir.path(), &config(7)).unwrap());
    topic(&bus, "t", 3).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let bus = bus.clone();
            tokio::spawn(
                async move { bus.publish("t", OutRecord::new(format!("k{i}"), "x")).await },
            )
        })
        .collect();
    let mut got = HashSet::new();
    for t in tasks {
        let p = t.await.unwrap().unwrap();
        assert!(got.insert((p.partition, p.offset)));
    }
    let offs = bus.partition_offsets("t").await.unwrap();
    assert_eq!(offs.iter().map(|o| o.high).sum::<u64>(), 200);
    // Dense per partition.
    for o in offs {
        for off in 0..o.high {
            assert!(got.contains(&(o.partition, off)));
        }
    }
}

#[tokio::test]
async fn topics_are_checked_and_only_grow() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    assert!(matches!(
        bus.publish("nope", OutRecord::new("k", "x")).await,
        Err(BusError::UnknownTopic(_))
    ));
    assert!(matches!(
        bus.subscribe("g", "nope", opts(1)).await,
        Err(BusError::UnknownTopic(_))
    ));
    assert!(bus.topic_info("nope").await.unwrap().is_none());
    topic(&bus, "t", 2).await;
    let mut sub = bus.subscribe("g", "t", opts(8)).await.unwrap();
    topic(&bus, "t", 4).await;
    assert!(matches!(
        bus.apply_topic(&TopicSpec {
            name: "t".into(),
            partitions: 3,
            retention: None
        })
        .await,
        Err(BusError::Conflict(_))
    ));
    let spec = TopicSpec {
        name: "t".into(),
        partitions: 4,
        retention: Some(Duration::from_secs(60)),
    };
    bus.apply_topic(&spec).await.unwrap();
    let info = bus.topic_info("t").await.unwrap().unwrap();
    assert_eq!(
        (info.partitions, info.retention),
        (4, Some(Duration::from_secs(60)))
    );
    // The new partitions are owned by the existing member.
    for i in 0..20 {
        bus.publish("t", OutRecord::new(format!("k{i}"), "x"))
            .await
            .unwrap();
    }
    for _ in 0..20 {
        next(&mut sub).await.ack().await.unwrap();
    }
    assert_eq!(bus.health().await.ok(), Some(()));
}

#[tokio::test]
async fn seek_moves_the_group_back_for_replay() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 1).await;
    for i in 0..3 {
        bus.publish("t", OutRecord::new("k", format!("{i}")))
            .await
            .unwrap();
    }
    let mut sub = bus.subscribe("g", "t", opts(8)).await.unwrap();
    for _ in 0..3 {
        next(&mut sub).await.ack().await.unwrap();
    }
    sub.close().await.unwrap();
    assert_eq!(bus.active_members("g", "t").await.unwrap(), 0);
    bus.seek_group("g", "t", 0, 1).await.unwrap();
    let mut sub = bus.subscribe("g", "t", opts(8)).await.unwrap();
    assert_eq!(next(&mut sub).await.message.offset, 1);
}

#[tokio::test]
async fn a_file_held_by_another_process_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    // What another process holds, redb's file lock reports; hold it the same way here.
    let other = redb::Database::create(dir.path().join(FILE_NAME)).unwrap();
    let err = EmbeddedBus::open(dir.path(), &config(8))
        .err()
        .expect("locked");
    assert!(
        matches!(&err, BusError::Storage(m) if m.contains("another nexus process")),
        "{err}"
    );
    drop(other);
    // Released: it opens again (a restart in the same process).
    open(dir.path());
}
