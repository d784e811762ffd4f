//! Unit tests of the ack bookkeeping, and tests against a Kafka-protocol broker at
//! `NEXUS_TEST_KAFKA_BROKERS` (default 127.0.0.1:19092, started by `scripts/services.sh`).
//! Without the variable and without a broker on the default address the broker tests skip.

use std::time::{Duration, Instant};

use super::*;
use crate::config::Config;

fn brokers() -> Option<String> {
    if let Ok(b) = std::env::var("NEXUS_TEST_KAFKA_BROKERS") {
        return Some(b);
    }
    let default = "127.0.0.1:19092";
    match std::net::TcpStream::connect_timeout(&default.parse().ok()?, Duration::from_millis(300)) {
        Ok(_) => Some(default.to_string()),
        Err(_) => {
            eprintln!("no Kafka broker at {default} and NEXUS_TEST_KAFKA_BROKERS unset; skipping");
            None
        }
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn bus() -> Option<KafkaBus> {
    bus_with(|_| {}).await
}

async fn bus_with(change: impl FnOnce(&mut crate::config::BusConfig)) -> Option<KafkaBus> {
    init_logs();
    let brokers = brokers()?;
    let mut config = Config::defaults().bus;
    change(&mut config);
    config.url = format!("kafka://{brokers}");
    // Tansu's first group join takes about half the session timeout.
    config.kafka.session_timeout_ms = 6000;
    Some(
        KafkaBus::connect(&brokers, false, &config)
            .await
            .expect("connect"),
    )
}

fn name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

async fn topic(bus: &KafkaBus, partitions: u32) -> String {
    let t = name("t");
    bus.apply_topic(&TopicSpec {
        name: t.clone(),
        partitions,
        retention: None,
    })
    .await
    .expect("apply");
    t
}

async fn next(sub: &mut Box<dyn Subscription>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("a delivery in time")
        .expect("open")
        .expect("no error")
}

async fn committed(bus: &KafkaBus, group: &str, topic: &str, partition: u32) -> Option<u64> {
    bus.group_positions(group, topic).await.unwrap()[partition as usize].committed
}

#[test]
fn parses_subscription_metadata() {
    // version 1, two topics, then user data the parser ignores.
    let mut data = vec![0, 1, 0, 0, 0, 2];
    for t in ["a.v1", "bb"] {
        data.extend_from_slice(&(t.len() as i16).to_be_bytes());
        data.extend_from_slice(t.as_bytes());
    }
    data.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(
        admin::subscribed_topics(&data),
        Some(vec!["a.v1".into(), "bb".into()])
    );
    assert_eq!(admin::subscribed_topics(&[0, 1, 0, 0, 0, 5, 0]), None);
}

/// A topic is created with every setting the plan compares at nexus's value, so a broker
/// whose defaults differ (`log.cleanup.policy=compact`, a `log.retention.bytes`) does not make
/// the first apply see an update and fail as not converged.
#[test]
fn a_new_topic_has_every_setting_nexus_needs() {
    let new = admin::new_topic("t", 3, "604800000");
    assert_eq!((new.name, new.num_partitions), ("t", 3));
    let mut config = new.config.clone();
    config.sort_unstable();
    assert_eq!(
        config,
        [
            ("cleanup.policy", "delete"),
            ("retention.bytes", "-1"),
            ("retention.ms", "604800000"),
        ]
    );
    // What the topic was created with is what the plan reads as required.
    let described: HashMap<String, (String, rdkafka::admin::ConfigSource)> = config
        .iter()
        .map(|(k, v)| {
            let source = rdkafka::admin::ConfigSource::DynamicTopic;
            (k.to_string(), (v.to_string(), source))
        })
        .collect();
    assert!(admin::stale_configs(&described).is_empty());
}

/// AlterConfigs replaces a topic's whole dynamic config: apply writes nexus's values of the
/// stale settings and retention, sends the operator's other dynamic topic entries along
/// unchanged, and does not make the broker's defaults or static configs the topic's own.
#[test]
fn alter_configs_sets_nexus_values_and_keeps_the_operators() {
    use rdkafka::admin::{ConfigSource, ResourceSpecifier};
    let configs: HashMap<String, (String, ConfigSource)> = [
        ("cleanup.policy", "compact", ConfigSource::DynamicTopic),
        ("retention.bytes", "1048576", ConfigSource::DynamicTopic),
        ("retention.ms", "604800000", ConfigSource::DynamicTopic),
        ("min.insync.replicas", "2", ConfigSource::DynamicTopic),
        ("segment.bytes", "1073741824", ConfigSource::Default),
        (
            "message.timestamp.type",
            "CreateTime",
            ConfigSource::StaticBroker,
        ),
        ("max.message.bytes", "2000000", ConfigSource::DynamicBroker),
        (
            "compression.type",
            "producer",
            ConfigSource::DynamicDefaultBroker,
        ),
    ]
    .into_iter()
    .map(|(k, v, source)| (k.to_owned(), (v.to_owned(), source)))
    .collect();
    let stale = admin::stale_configs(&configs);
    let alter = admin::alter_config("t", &configs, "86400000", &stale);
    assert_eq!(alter.specifier, ResourceSpecifier::Topic("t"));
    assert_eq!(
        alter.entries,
        HashMap::from([
            ("cleanup.policy", "delete"),
            ("retention.bytes", "-1"),
            ("retention.ms", "86400000"),
            ("min.insync.replicas", "2"),
        ])
    );

    // Only retention differs: the settings already right are kept as they are, and one the
    // broker gives by default is still not written.
    let configs: HashMap<String, (String, ConfigSource)> = [
        ("cleanup.policy", "delete", ConfigSource::DynamicTopic),
        ("retention.bytes", "-1", ConfigSource::Default),
        ("retention.ms", "604800000", ConfigSource::DynamicTopic),
    ]
    .into_iter()
    .map(|(k, v, source)| (k.to_owned(), (v.to_owned(), source)))
    .collect();
    let stale = admin::stale_configs(&configs);
    assert!(stale.is_empty());
    let alter = admin::alter_config("t", &configs, "-1", &stale);
    assert_eq!(
        alter.entries,
        HashMap::from([("cleanup.policy", "delete"), ("retention.ms", "-1")])
    );
}

#[tokio::test]
async fn publish_places_keys_like_every_backend() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 4).await;
    let mut last = std::collections::HashMap::new();
    for i in 0..20 {
        let key = format!("conv-{}", i % 5);
        let p = bus
            .publish(
                &t,
                OutRecord::new(key.clone(), format!("m{i}")).with_header("nexus-x", "1"),
            )
            .await
            .unwrap();
        assert_eq!(p.partition, partition_for(&key, 4));
        if let Some(prev) = last.insert(p.partition, p.offset) {
            assert!(p.offset > prev, "offsets grow per partition");
        }
    }
    let e = bus
        .publish("no-such-topic-x", OutRecord::new("k", "v"))
        .await
        .unwrap_err();
    assert!(matches!(e, BusError::UnknownTopic(_)), "{e:?}");
    assert!(bus.topic_info("no-such-topic-x").await.unwrap().is_none());
}

#[tokio::test]
async fn apply_topic_creates_grows_and_refuses_to_shrink() {
    let Some(bus) = bus().await else { return };
    let t = name("t");
    let day = Some(Duration::from_secs(86_400));
    let spec = |partitions, retention| TopicSpec {
        name: t.clone(),
        partitions,
        retention,
    };
    bus.apply_topic(&spec(2, day)).await.unwrap();
    let info = bus.topic_info(&t).await.unwrap().unwrap();
    assert_eq!((info.partitions, info.retention), (2, day));
    // Created with nexus's settings, not the broker's defaults (and so described even by a
    // broker that describes only what a topic was created with).
    assert!(
        !info.settings.is_empty() && info.settings.iter().all(TopicSetting::is_required),
        "{:?}",
        info.settings
    );
    // Re-applying the same spec changes nothing (no admin call the broker may lack).
    bus.apply_topic(&spec(2, day)).await.unwrap();
    match bus.apply_topic(&spec(3, day)).await {
        Ok(()) => {
            assert_eq!(bus.topic_info(&t).await.unwrap().unwrap().partitions, 3);
            // The publisher sees the new partition count.
            let p = bus.publish(&t, OutRecord::new("k", "v")).await.unwrap();
            assert_eq!(p.partition, partition_for("k", 3));
        }
        // Tansu 0.6 has no CreatePartitions: a clear, non-transient error.
        Err(BusError::Conflict(m)) if m.contains("does not implement") => {
            eprintln!("broker cannot add partitions: {m}")
        }
        Err(e) => panic!("{e:?}"),
    }
    let e = bus.apply_topic(&spec(1, day)).await;
    assert!(matches!(e, Err(BusError::Conflict(_))), "{e:?}");
}

#[tokio::test]
async fn commits_only_the_contiguous_acked_prefix() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 1).await;
    let g = name("g");
    for i in 0..3 {
        bus.publish(
            &t,
            OutRecord::new("k", format!("m{i}")).with_header("h", "v"),
        )
        .await
        .unwrap();
    }
    let mut sub = bus
        .subscribe(&g, &t, SubscribeOptions::default())
        .await
        .unwrap();
    let d0 = next(&mut sub).await;
    let d1 = next(&mut sub).await;
    let d2 = next(&mut sub).await;
    assert_eq!(
        (d0.message.offset, d1.message.offset, d2.message.offset),
        (0, 1, 2)
    );
    assert_eq!(d0.message.header("h"), Some("v"));
    assert_eq!(d0.message.payload.as_ref(), b"m0");
    d2.ack().await.unwrap();
    d1.ack().await.unwrap();
    assert_eq!(committed(&bus, &g, &t, 0).await, None);
    d0.ack().await.unwrap();
    assert_eq!(committed(&bus, &g, &t, 0).await, Some(3));
    assert_eq!(bus.active_members(&g, &t).await.unwrap(), 1);
    sub.close().await.unwrap();
    assert_eq!(bus.active_members(&g, &t).await.unwrap(), 0);
    let pos = bus.group_positions(&g, &t).await.unwrap();
    assert_eq!(pos[0].lag, 0);
}

#[tokio::test]
async fn a_dead_member_leaves_unacked_records_to_the_next() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 1).await;
    let g = name("g");
    for i in 0..4 {
        bus.publish(&t, OutRecord::new("k", format!("m{i}")))
            .await
            .unwrap();
    }
    let mut sub = bus
        .subscribe(&g, &t, SubscribeOptions::default())
        .await
        .unwrap();
    let d0 = next(&mut sub).await;
    let d1 = next(&mut sub).await;
    let d2 = next(&mut sub).await;
    d0.ack().await.unwrap();
    d2.ack().await.unwrap();
    drop(d1);
    drop(sub);
    let mut sub = bus
        .subscribe(&g, &t, SubscribeOptions::default())
        .await
        .unwrap();
    let again = next(&mut sub).await;
    assert_eq!(
        again.message.offset, 1,
        "redelivered from the first unacked record"
    );
    again.ack().await.unwrap();
    sub.close().await.unwrap();
    assert_eq!(committed(&bus, &g, &t, 0).await, Some(2));
}

/// A group starting at `latest` is placed at the log end when it is given a partition, not
/// at its first ack: a member that leaves before acking anything, and the records published
/// before the next one joins, are not skipped (before, the next member resolved `latest`
/// again, past them), and lag counts from there, not the whole log.
#[tokio::test]
async fn a_latest_group_is_placed_at_the_end_when_assigned() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 1).await;
    let g = name("g");
    for i in 0..3 {
        bus.publish(&t, OutRecord::new("k", format!("old{i}")))
            .await
            .unwrap();
    }
    let latest = SubscribeOptions {
        start: StartFrom::Latest,
        ..SubscribeOptions::default()
    };
    let sub = bus.subscribe(&g, &t, latest.clone()).await.unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while committed(&bus, &g, &t, 0).await.is_none() {
        assert!(Instant::now() < until, "the group was placed when assigned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(committed(&bus, &g, &t, 0).await, Some(3));
    let lag: u64 = bus
        .group_positions(&g, &t)
        .await
        .unwrap()
        .iter()
        .map(|p| p.lag)
        .sum();
    assert_eq!(lag, 0, "nothing behind a group that starts at the end");
    sub.close().await.unwrap();
    for i in 0..2 {
        bus.publish(&t, OutRecord::new("k", format!("new{i}")))
            .await
            .unwrap();
    }
    let mut sub = bus.subscribe(&g, &t, latest).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(
        d.message.payload.as_ref(),
        b"new0",
        "the first record after the end"
    );
    d.ack().await.unwrap();
    sub.close().await.unwrap();
}

/// A `latest` group that has begun (a commit on some partition) reads a partition it never
/// committed on (one added to the topic since) from its start, as JetStream does: what was
/// published to it before a member got it is not skipped. A new group places every partition
/// of the topic at its end, its own and the others'. (Tansu cannot add partitions: a commit
/// on partition 0 alone stands for a group that began before partition 1 existed.)
#[tokio::test]
async fn a_latest_group_reads_a_partition_added_since_it_began_from_its_start() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 2).await;
    let key_on = |p: u32| crate::bus::partitioner::key_in(p, 2, "k");
    for p in [0, 1] {
        bus.publish(&t, OutRecord::new(key_on(p), format!("before-{p}")))
            .await
            .unwrap();
    }
    let latest = SubscribeOptions {
        start: StartFrom::Latest,
        ..SubscribeOptions::default()
    };

    // A new group: both partitions at their end.
    let fresh = name("g");
    let sub = bus.subscribe(&fresh, &t, latest.clone()).await.unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while committed(&bus, &fresh, &t, 1).await.is_none() {
        assert!(Instant::now() < until, "the group was placed when assigned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(committed(&bus, &fresh, &t, 0).await, Some(1));
    assert_eq!(committed(&bus, &fresh, &t, 1).await, Some(1));
    sub.close().await.unwrap();

    // A group that began with partition 0 only.
    let g = name("g");
    bus.seek_group(&g, &t, 0, 1).await.unwrap();
    let mut sub = bus.subscribe(&g, &t, latest).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(
        (d.message.partition, d.message.payload.as_ref()),
        (1, b"before-1".as_slice()),
        "the partition added since is read from its start"
    );
    d.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .is_err(),
        "partition 0 stays where the group was"
    );
    sub.close().await.unwrap();
}

/// A `latest` group whose commit fell below the log start (stopped longer than the retention)
/// resumes at the oldest record kept, as on JetStream and the embedded log; before, the commit
/// was left to librdkafka, which takes it as out of range and resets it to the log end,
/// skipping every record still kept. Tansu 0.6 never moves a log start (DeleteRecords is
/// `todo!()` in its memory storage, which enforces no retention either), so the decision the
/// member makes at assignment is tested here; `a_latest_group_resumes_at_its_commit` runs it
/// against the broker.
#[test]
fn a_latest_group_below_the_log_start_resumes_at_the_oldest_record_kept() {
    use consumer::{placement, to_decide};
    // (commit, new group, log start, log end): records 0..10 deleted, 10..20 kept.
    assert_eq!(placement(Some(3), false, 10, 20), Some(10));
    assert_eq!(placement(Some(9), false, 10, 20), Some(10));
    // Everything deleted: the log start is its end.
    assert_eq!(placement(Some(0), false, 20, 20), Some(20));
    // A commit in the log, at its start or at its end, is where the group resumes.
    for c in [10, 15, 20] {
        assert_eq!(placement(Some(c), false, 10, 20), None, "commit {c}");
    }
    // Past the end (a log cut back): librdkafka's reset, as before.
    assert_eq!(placement(Some(25), false, 10, 20), None);
    // No commit: as before, a new group at the end, a partition added since at its start.
    assert_eq!(placement(None, true, 10, 20), Some(20));
    assert_eq!(placement(None, false, 10, 20), Some(10));

    // A member of a group that has begun places its own partitions only: partition 1's commit
    // is below the log start too, but another member was given it.
    let commits = [
        (0, Some(3)),
        (1, Some(3)),
        (2, None),
        (3, None),
        (4, Some(12)),
    ];
    let own = [0, 2, 4];
    let plan: Vec<(i32, i64)> = to_decide(&commits, &own, false)
        .into_iter()
        .filter_map(|(p, c)| placement(c, false, 10, 20).map(|at| (p, at)))
        .collect();
    assert_eq!(plan, vec![(0, 10), (2, 10)]);
    // A new group places every partition at its end, its own and the others'.
    let fresh = [(0, None), (1, None)];
    assert_eq!(to_decide(&fresh, &[1], true), fresh.to_vec());
}

/// A `latest` group with a commit inside the log resumes there: the member reads the log
/// bounds of its partitions at assignment and leaves a commit at or above the log start alone.
#[tokio::test]
async fn a_latest_group_resumes_at_its_commit() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 1).await;
    let g = name("g");
    for i in 0..4 {
        bus.publish(&t, OutRecord::new("k", format!("m{i}")))
            .await
            .unwrap();
    }
    bus.seek_group(&g, &t, 0, 2).await.unwrap();
    let latest = SubscribeOptions {
        start: StartFrom::Latest,
        ..SubscribeOptions::default()
    };
    let mut sub = bus.subscribe(&g, &t, latest).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.message.offset, 2, "where the group committed");
    d.ack().await.unwrap();
    sub.close().await.unwrap();
    assert_eq!(committed(&bus, &g, &t, 0).await, Some(3));
}

#[tokio::test]
async fn max_in_flight_holds_back_records() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 2).await;
    let g = name("g");
    for i in 0..10 {
        bus.publish(&t, OutRecord::new(format!("k{i}"), "v"))
            .await
            .unwrap();
    }
    let opts = SubscribeOptions {
        start: StartFrom::Earliest,
        max_in_flight: 3,
    };
    let mut sub = bus.subscribe(&g, &t, opts).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut sub).await);
    }
    let extra = tokio::time::timeout(Duration::from_millis(1500), sub.next()).await;
    // At most one record fetched while pausing may be queued beyond the limit.
    if let Ok(Some(Ok(d))) = extra {
        held.push(d);
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), sub.next())
                .await
                .is_err()
        );
    }
    let mut seen = held.len();
    for d in held {
        d.ack().await.unwrap();
    }
    while seen < 10 {
        next(&mut sub).await.ack().await.unwrap();
        seen += 1;
    }
    sub.close().await.unwrap();
    let pos = bus.group_positions(&g, &t).await.unwrap();
    assert!(pos.iter().all(|p| p.lag == 0), "{pos:?}");
}

#[tokio::test]
async fn a_rebalance_hands_over_without_loss_or_double_commit() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 4).await;
    let g = name("g");
    for i in 0..40 {
        bus.publish(&t, OutRecord::new(format!("k{i}"), format!("{i}")))
            .await
            .unwrap();
    }
    let mut a = bus
        .subscribe(&g, &t, SubscribeOptions::default())
        .await
        .unwrap();
    let mut got = std::collections::HashSet::new();
    for _ in 0..10 {
        let d = next(&mut a).await;
        got.insert((d.message.partition, d.message.offset));
        d.ack().await.unwrap();
    }
    // A second member joins; both keep consuming until all 40 are acked once.
    let b = bus
        .subscribe(&g, &t, SubscribeOptions::default())
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for mut sub in [a, b] {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(20), sub.next()).await
            {
                let key = (d.message.partition, d.message.offset);
                d.ack().await.unwrap();
                if tx.send(key).is_err() {
                    break;
                }
            }
            sub
        }));
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while got.len() < 40 && tokio::time::Instant::now() < deadline {
        if let Ok(Some(key)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            got.insert(key);
        }
    }
    assert_eq!(got.len(), 40, "every record delivered");
    let positions = bus.group_positions(&g, &t).await.unwrap();
    for task in tasks {
        task.abort();
    }
    let offsets = bus.partition_offsets(&t).await.unwrap();
    for (p, o) in positions.iter().zip(&offsets) {
        assert!(p.committed.unwrap_or(0) <= o.high, "{p:?} {o:?}");
    }
}

/// A partition moves to a joining member only once the old owner acked what it handed out,
/// however long its handlers take within `handover_wait_ms`: the two never handle a key at
/// once, and the new owner gets none of the old owner's records.
#[tokio::test]
async fn a_revoke_waits_for_slow_handlers_within_the_handover_wait() {
    const HANDLER: Duration = Duration::from_secs(20);
    let Some(bus) = bus_with(|c| c.kafka.handover_wait_ms = 30_000).await else {
        return;
    };
    let t = topic(&bus, 2).await;
    let g = name("g");
    for i in 0..40 {
        bus.publish(&t, OutRecord::new(format!("k{i}"), format!("{i}")))
            .await
            .unwrap();
    }
    let mut a = bus
        .subscribe(&g, &t, SubscribeOptions::default())
        .await
        .unwrap();
    // The first record of each partition stays in a slow handler; the rest A takes is acked.
    let mut handed_out = std::collections::HashSet::new();
    let mut slow: HashMap<u32, Delivery> = HashMap::new();
    while slow.len() < 2 {
        let d = next(&mut a).await;
        handed_out.insert((d.message.partition, d.message.offset));
        match slow.entry(d.message.partition) {
            std::collections::hash_map::Entry::Occupied(_) => d.ack().await.unwrap(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(d);
            }
        }
    }
    let mut b = bus
        .subscribe(&g, &t, SubscribeOptions::default())
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(40), b.next()).await {
            let _ = tx.send((Instant::now(), d.message.partition, d.message.offset));
            d.ack().await.unwrap();
        }
    });
    tokio::time::sleep(HANDLER).await;
    let done_at = Instant::now();
    for d in slow.into_values() {
        d.ack().await.unwrap();
    }
    // More for both partitions, so B surely gets some of the one it took over.
    for i in 40..80 {
        bus.publish(&t, OutRecord::new(format!("k{i}"), format!("{i}")))
            .await
            .unwrap();
    }
    // B's deliveries: the first may wait for the group's second join round; then until B
    // has been quiet for a while.
    let mut got = Vec::new();
    let mut quiet = Duration::from_secs(40);
    while let Ok(Some(x)) = tokio::time::timeout(quiet, rx.recv()).await {
        got.push(x);
        quiet = Duration::from_secs(3);
    }
    reader.abort();
    drop(a);
    assert!(
        !got.is_empty(),
        "B got nothing of the partition it took over"
    );
    for (at, partition, offset) in &got {
        assert!(
            *at >= done_at,
            "B got ({partition}, {offset}) {:?} before A's handlers ended",
            done_at - *at
        );
        assert!(
            !handed_out.contains(&(*partition, *offset)),
            "B got ({partition}, {offset}), which A handled"
        );
    }
}

#[tokio::test]
async fn offsets_reads_and_seeks() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 1).await;
    let g = name("g");
    let before = chrono::Utc::now().timestamp_millis() - 1;
    for i in 0..5 {
        bus.publish(&t, OutRecord::new("k", format!("m{i}")))
            .await
            .unwrap();
    }
    let offs = bus.partition_offsets(&t).await.unwrap();
    assert_eq!((offs[0].low, offs[0].high), (0, 5));
    assert_eq!(bus.offset_for_time(&t, 0, before).await.unwrap(), 0);
    assert_eq!(bus.offset_for_time(&t, 0, i64::MAX / 2).await.unwrap(), 5);
    let read = bus.read(&t, 0, 2, 10).await.unwrap();
    assert_eq!(
        read.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert_eq!(read[0].payload.as_ref(), b"m2");
    assert!(bus.read(&t, 0, 5, 10).await.unwrap().is_empty());
    assert!(matches!(
        bus.read(&t, 3, 0, 1).await,
        Err(BusError::UnknownPartition { .. })
    ));
    let pos = bus.group_positions(&g, &t).await.unwrap();
    assert_eq!((pos[0].committed, pos[0].lag), (None, 5));
    bus.seek_group(&g, &t, 0, 3).await.unwrap();
    let pos = bus.group_positions(&g, &t).await.unwrap();
    assert_eq!((pos[0].committed, pos[0].lag), (Some(3), 2));
    let mut sub = bus
        .subscribe(&g, &t, SubscribeOptions::default())
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.message.offset, 3);
    let e = bus.seek_group(&g, &t, 0, 0).await;
    assert!(matches!(e, Err(BusError::Conflict(_))), "{e:?}");
    sub.close().await.unwrap();
    bus.health().await.unwrap();
}

#[tokio::test]
async fn a_tail_takes_partitions_it_did_not_know_from_their_start() {
    let Some(bus) = bus().await else { return };
    let t = topic(&bus, 2).await;
    let key_on = |p: u32| crate::bus::partitioner::key_in(p, 2, "k");
    // Tansu has no CreatePartitions: the tail is told the topic had one partition at its start,
    // so partition 1 stands for a partition added while it runs.
    let mut tail: Box<dyn Subscription> = Box::new(
        tail::start_with(&bus, &t, Duration::from_millis(300), Some(1))
            .await
            .unwrap(),
    );
    // Published before the tail looks again: read all the same, a new partition is read whole.
    let new = bus
        .publish(&t, OutRecord::new(key_on(1), "on-the-new-partition"))
        .await
        .unwrap();
    assert_eq!(new.partition, 1);
    bus.publish(&t, OutRecord::new(key_on(0), "on-the-old-partition"))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next(&mut tail).await;
        got.push((d.message.partition, d.message.payload.to_vec()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            (0, b"on-the-old-partition".to_vec()),
            (1, b"on-the-new-partition".to_vec())
        ]
    );
    tail.close().await.unwrap();
}

#[test]
fn consumers_bound_their_prefetch_and_refill_it_soon() {
    let mut config = Config::defaults().bus;
    config.kafka.prefetch_kbytes = 4096;
    let settings = Settings {
        brokers: "127.0.0.1:1".into(),
        tls: false,
        config,
    };
    for group in [Some("g"), None] {
        let c = settings.consumer_config(group);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("4096"));
        // librdkafka's 1 s default left a consumer behind a backlog idle most of each second.
        assert_eq!(
            c.get("fetch.queue.backoff.ms"),
            Some(FETCH_QUEUE_BACKOFF_MS)
        );
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
    }
}

/// A record waiting to retry (a peer asked for a minute) does not hold a revoke for the whole
/// hand-over wait: the revoke marks its partitions as moving at once, the waiting record is
/// left to the next owner, and the joining member reads it within seconds, not after 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_waiting_to_retry_does_not_hold_a_revoke() {
    use crate::bus::consumer::Consumer;
    use crate::bus::test_support::{event_on, options, Later};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let Some(kafka) = bus_with(|c| c.kafka.handover_wait_ms = 30_000).await else {
        return;
    };
    let t = topic(&kafka, 2).await;
    let g = name("g");
    let bus: Arc<dyn Bus> = Arc::new(kafka);
    for p in 0..2u32 {
        bus.publish(&t, event_on(p, 2)).await.unwrap();
    }
    let handler = Arc::new(Later::default());
    let options = options(2);
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        Consumer::new(bus.clone(), &g, &t, options).run(handler.clone(), stop.clone()),
    );
    let until = Instant::now() + Duration::from_secs(30);
    while handler.tries() < 2 {
        assert!(Instant::now() < until, "both records tried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let joined = Instant::now();
    let mut b = bus
        .subscribe(&g, &t, SubscribeOptions::default())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), b.next())
        .await
        .expect("the moved partition's waiting record reaches the new member before the 30 s hand-over wait")
        .expect("open")
        .expect("delivery");
    assert_eq!(got.message.offset, 0, "the record A was waiting to retry");
    assert!(
        joined.elapsed() < Duration::from_secs(20),
        "{:?}",
        joined.elapsed()
    );
    drop(got);
    drop(b);
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// A counter as /metrics renders it, summed over the series whose labels contain `labels`.
fn counter(name: &str, labels: &str) -> f64 {
    crate::telemetry::init_metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A publish that failed finds the producer dead when librdkafka raised a fatal error on it,
/// whatever code the record itself failed with (`_FATAL` for a record produced after it,
/// `_PURGE_QUEUE` for one queued at that moment, the broker's for one in flight); the same
/// broker codes without a fatal error are ones librdkafka recovers from, and keep the producer.
#[test]
fn a_fatal_producer_error_is_told_apart() {
    use RDKafkaErrorCode as C;
    let fatal = || {
        Some((
            C::OutOfOrderSequenceNumber,
            "sequence desynchronized".to_string(),
        ))
    };
    for code in [
        Some(C::Fatal),
        Some(C::PurgeQueue),
        Some(C::OutOfOrderSequenceNumber),
        Some(C::UnknownProducerId),
        Some(C::MessageTimedOut),
        None,
    ] {
        assert_eq!(
            fatal_error_of(code, fatal()),
            fatal(),
            "{code:?} on a producer with a fatal error"
        );
    }
    for code in [
        Some(C::OutOfOrderSequenceNumber),
        Some(C::UnknownProducerId),
        Some(C::InvalidProducerEpoch),
        Some(C::MessageTimedOut),
        Some(C::QueueFull),
        Some(C::MessageSizeTooLarge),
        None,
    ] {
        assert_eq!(fatal_error_of(code, None), None, "{code:?}");
    }
    // `_FATAL` always means the producer is dead, even if its reason could not be read.
    assert_eq!(
        fatal_error_of(Some(C::Fatal), None).map(|f| f.0),
        Some(C::Fatal)
    );
}

/// Replacing the producer (what a publish that meets a fatal error does; no broker can be made
/// to raise one on purpose) keeps publishing working: publishes before, during and after it are
/// answered, none hangs on the producer being replaced, concurrent replacements of the same
/// producer make one new producer, the replacement is counted and readiness holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_producer_keeps_publishing() {
    let Some(bus) = bus().await else { return };
    let bus = Arc::new(bus);
    let t = topic(&bus, 2).await;
    bus.publish(&t, OutRecord::new("k", "before"))
        .await
        .unwrap();
    let counted = counter(PRODUCER_RECREATED_TOTAL, "code=\"Fatal\"");

    let failed = bus.producer();
    let in_flight: Vec<_> = (0..200)
        .map(|i| {
            let bus = Arc::clone(&bus);
            let t = t.clone();
            tokio::spawn(async move {
                bus.publish(&t, OutRecord::new(format!("k{i}"), "during"))
                    .await
            })
        })
        .collect();
    // Replaced while records of those publishes wait in it for the broker's answer.
    let until = Instant::now() + Duration::from_secs(10);
    while failed.in_flight_count() == 0 {
        assert!(Instant::now() < until, "publishes in flight");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let fatal = (RDKafkaErrorCode::Fatal, "replaced by a test".to_string());
    // Several publishes meeting the same fatal error at once replace the producer once.
    let replaced: Vec<bool> = std::thread::scope(|s| {
        let tries: Vec<_> = (0..4)
            .map(|_| s.spawn(|| bus.recreate_producer(&failed, &fatal).unwrap()))
            .collect();
        tries.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(replaced.iter().filter(|r| **r).count(), 1, "{replaced:?}");
    assert!(!Arc::ptr_eq(&failed, &bus.producer()), "a new producer");
    let retired = Arc::downgrade(&failed);
    drop(failed);

    for p in in_flight {
        let r = tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("a publish in flight during the replacement is answered")
            .unwrap();
        if let Err(e) = r {
            assert!(e.is_transient(), "retryable: {e}");
        }
    }
    let after = bus.publish(&t, OutRecord::new("k", "after")).await.unwrap();
    let read = bus
        .read(&t, after.partition, after.offset, 1)
        .await
        .unwrap();
    assert_eq!(&read[0].payload[..], b"after");
    bus.health().await.unwrap();
    // The replaced producer is dropped once its publishes are answered, not kept.
    let until = Instant::now() + Duration::from_secs(10);
    while retired.upgrade().is_some() {
        assert!(Instant::now() < until, "the replaced producer is dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        counter(PRODUCER_RECREATED_TOTAL, "code=\"Fatal\"") - counted,
        1.0,
        "one replacement counted"
    );
}

/// A member's `max.poll.interval.ms` covers a revoke's hand-over wait and commit and a
/// placement: librdkafka makes a member that spends longer between two polls (rebalance
/// callbacks run there) leave the group, and another member would then read from the last
/// commit while this one's handlers still run. Before, it was librdkafka's 5 minutes whatever
/// the hand-over wait.
#[test]
fn a_member_polls_within_its_handover_wait() {
    use consumer::{max_poll_interval_ms, member_config};
    // The defaults stay at librdkafka's default.
    assert_eq!(max_poll_interval_ms(30_000, 10_000), 300_000);
    assert_eq!(max_poll_interval_ms(0, 10_000), 300_000);
    // A long hand-over wait: the wait plus a commit, a placement and a margin.
    let long = max_poll_interval_ms(600_000, 10_000);
    assert!(long >= 600_000 + 60_000 + 15_000 + 60_000, "{long}");
    assert!(long < 600_000 + 300_000, "{long}");
    // A 5-minute wait is no longer cut at librdkafka's 5 minutes.
    assert!(max_poll_interval_ms(300_000, 10_000) > 300_000 + 60_000);
    // Never below the session timeout (librdkafka refuses that), never past its maximum.
    assert_eq!(max_poll_interval_ms(0, 3_600_000), 3_600_000);
    assert_eq!(max_poll_interval_ms(u64::MAX, 10_000), 86_400_000);

    let mut config = Config::defaults().bus;
    config.kafka.handover_wait_ms = 600_000;
    let settings = Settings {
        brokers: "127.0.0.1:1".into(),
        tls: false,
        config,
    };
    let cc = member_config(&settings, "g", StartFrom::Earliest);
    assert_eq!(
        cc.get("max.poll.interval.ms"),
        Some(long.to_string().as_str()),
        "the member's config carries it"
    );
    // librdkafka takes it (it refuses a value below session.timeout.ms when creating).
    let created: Result<rdkafka::consumer::BaseConsumer, _> = cc.create();
    assert!(created.is_ok(), "{:?}", created.err());
}

/// Group members and the tail share one rule: only an error librdkafka flagged fatal ends the
/// reader; the others (a broker down, an SSL or SASL handshake failing while it restarts, a
/// fetch refused) librdkafka retries itself, so they are logged and counted. Before, the tail
/// handed every one to the runtime, which stopped on any it took for permanent (an SSL error
/// maps to a configuration error) and with it the edge process and every WebSocket.
#[test]
fn only_a_fatal_consumer_error_ends_a_reader() {
    use consumer::{stopping_error, CONSUMER_ERRORS_TOTAL};
    let before = counter(CONSUMER_ERRORS_TOTAL, "reader=\"tail\",code=\"SSL\"");
    for code in [
        RDKafkaErrorCode::SSL,
        RDKafkaErrorCode::Authentication,
        RDKafkaErrorCode::AllBrokersDown,
        RDKafkaErrorCode::BrokerTransportFailure,
        RDKafkaErrorCode::TopicAuthorizationFailed,
        RDKafkaErrorCode::UnknownTopicOrPartition,
    ] {
        assert!(
            stopping_error(&KafkaError::MessageConsumption(code), "tail").is_none(),
            "{code:?} is ridden out"
        );
    }
    assert_eq!(
        counter(CONSUMER_ERRORS_TOTAL, "reader=\"tail\",code=\"SSL\"") - before,
        1.0,
        "counted"
    );
    let fatal = stopping_error(
        &KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::Fatal),
        "member",
    );
    assert!(fatal.is_some(), "a fatal error ends the reader");
}

/// A partition the broker could not answer in a committed-offsets request comes back from
/// librdkafka as `Offset::Invalid` with the partition's error, the request succeeding: it fails
/// the whole answer instead of reading as "never committed" (a `latest` group would place the
/// partition anew, lag would count from the log start). Tansu never fails a single partition
/// (it answers unknown partitions and topics as uncommitted), so the rule is tested on entries.
#[test]
fn an_errored_partition_fails_the_committed_offsets() {
    use admin::commits_of;
    use rdkafka::Offset;
    let ok = commits_of([(0, Offset::Offset(5), Ok(())), (1, Offset::Invalid, Ok(()))]).unwrap();
    assert_eq!(ok, vec![(0, Offset::Offset(5)), (1, Offset::Invalid)]);
    let failed = commits_of([
        (0, Offset::Offset(5), Ok(())),
        (
            1,
            Offset::Invalid,
            Err(KafkaError::OffsetFetch(
                RDKafkaErrorCode::UnstableOffsetCommit,
            )),
        ),
    ])
    .expect_err("an errored partition fails the answer");
    assert!(failed.is_transient(), "retried as placement is: {failed}");
    assert!(failed.to_string().contains("partition 1"), "{failed}");
}
