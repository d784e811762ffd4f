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

/// A bus whose moved partitions wait for old deliveries `wait` at most.
fn open_with_handover(dir: &Path, wait: Duration) -> EmbeddedBus {
    let mut c = config(64);
    c.embedded.handover_wait_ms = wait.as_millis() as u64;
    EmbeddedBus::open(dir, &c).expect("open bus")
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

/// Acks every delivery until none comes for `idle`; their (partition, offset) in order.
async fn drain(sub: &mut Box<dyn Subscription>, idle: Duration) -> Vec<(u32, u64)> {
    let mut got = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(idle, sub.next()).await {
        got.push((d.message.partition, d.message.offset));
        d.ack().await.unwrap();
    }
    got
}

/// The group's lag over all partitions of topic `t`.
async fn total_lag(bus: &EmbeddedBus, group: &str) -> u64 {
    bus.group_positions(group, "t")
        .await
        .unwrap()
        .iter()
        .map(|p| p.lag)
        .sum()
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
    // B's handlers end after it left: two finish (their acks count, as A reads B's partitions
    // only once B's deliveries are done), the rest are dropped and come again to A.
    let mut acked_late = HashSet::new();
    for d in b_seen.drain(..2) {
        acked_late.insert((d.message.partition, d.message.offset));
        d.ack().await.unwrap();
    }
    drop(b_seen);
    let mut redelivered = 0;
    while redelivered < 40 - a_count - 2 {
        let d = next(&mut a).await;
        assert!(b_parts.contains(&d.message.partition));
        assert!(
            !acked_late.contains(&(d.message.partition, d.message.offset)),
            "an acked record came again"
        );
        redelivered += 1;
        d.ack().await.unwrap();
    }
    assert!(quiet(&mut a).await);
    assert_eq!(total_lag(&bus, "g").await, 0);
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

/// A `latest` group reads a partition added to the topic after it began from the partition's
/// start, as JetStream does (before, it started at the end, skipping what was published to it
/// before a member got it).
#[tokio::test]
async fn a_latest_group_reads_a_partition_added_since_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 1).await;
    let latest = SubscribeOptions {
        start: StartFrom::Latest,
        max_in_flight: 8,
    };
    bus.publish("t", OutRecord::new("old", "old"))
        .await
        .unwrap();
    let mut sub = bus.subscribe("g", "t", latest.clone()).await.unwrap();
    assert!(quiet(&mut sub).await, "a new group starts at the end");
    sub.close().await.unwrap();
    topic(&bus, "t", 2).await;
    let key_on_1 = crate::bus::partitioner::key_in(1, 2, "k");
    let added = bus
        .publish("t", OutRecord::new(key_on_1, "added"))
        .await
        .unwrap();
    assert_eq!(added.partition, 1);
    let mut sub = bus.subscribe("g", "t", latest).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(
        (d.message.partition, d.message.payload.as_ref()),
        (1, b"added".as_slice())
    );
    d.ack().await.unwrap();
    assert!(quiet(&mut sub).await, "partition 0 stays at the end");
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
async fn a_directory_held_by_another_process_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    // Another process holds the flock; an open file description of this process holds it alike.
    let other = std::fs::File::open(dir.path().join(LOCK_FILE)).unwrap();
    rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
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

#[tokio::test]
async fn a_group_name_past_the_key_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 1).await;
    let long = "g".repeat(70_000);
    let err = bus
        .subscribe(&long, "t", opts(1))
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, BusError::Config(m) if m.contains("too long")),
        "{err}"
    );
    bus.subscribe(&"g".repeat(1_000), "t", opts(1))
        .await
        .unwrap();
    // Under 64 KiB itself, past it with the topic and lengths: refused at join, not left to
    // fjall's assert in the writer thread at the first commit (which closed the bus).
    let near = "g".repeat(65_530);
    let err = bus
        .subscribe(&near, "t", opts(1))
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, BusError::Config(m) if m.contains("too long")),
        "{err}"
    );
    let err = bus.seek_group(&near, "t", 0, 0).await.expect_err("refused");
    assert!(
        matches!(&err, BusError::Config(m) if m.contains("too long")),
        "{err}"
    );
    bus.publish("t", OutRecord::new("k", "still up"))
        .await
        .expect("the bus still takes publishes");
}

#[tokio::test]
async fn older_bus_formats_are_refused() {
    // One redb file; then the segment log's topics and offsets files.
    for old in OLD_FILES {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(old), b"old").unwrap();
        let err = EmbeddedBus::open(dir.path(), &config(8))
            .err()
            .expect("refused");
        assert!(
            matches!(&err, BusError::Storage(m) if m.contains(old) && m.contains("older")),
            "{err}"
        );
    }
}

async fn publish_n(bus: &EmbeddedBus, from: u64, to: u64) {
    for i in from..to {
        let p = bus
            .publish(
                "t",
                OutRecord::new("k", format!("m{i}")).with_header("n", i.to_string()),
            )
            .await
            .unwrap();
        assert_eq!(p.offset, i);
    }
}

fn assert_records(got: &[Message], from: u64, to: u64) {
    let want: Vec<(u64, String, String)> = (from..to)
        .map(|i| (i, format!("m{i}"), i.to_string()))
        .collect();
    let got: Vec<(u64, String, String)> = got
        .iter()
        .map(|m| {
            (
                m.offset,
                String::from_utf8(m.payload.to_vec()).unwrap(),
                m.header("n").unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(got, want);
}

/// Runs this test binary again as a child running only `test`, told `dir` through `var`,
/// reads its `acked N` lines until N reaches `at_least`, then SIGKILLs it; the last N.
fn run_child_until_acked(test: &str, var: &str, dir: &Path, at_least: u64) -> u64 {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &format!("bus::embedded::tests::{test}"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(var, dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = None;
    while acked.is_none_or(|n| n < at_least) {
        let line = lines
            .next()
            .expect("the child ends before it is killed")
            .unwrap();
        if let Some(n) = line.strip_prefix("acked ") {
            acked = Some(n.parse::<u64>().unwrap());
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    acked.unwrap()
}

/// Env var naming the directory the child of [`a_killed_process_keeps_every_acked_record`]
/// publishes into.
const CRASH_CHILD_DIR: &str = "NEXUS_EMBEDDED_CRASH_CHILD_DIR";

/// The child's half: publishes until killed, printing each offset once it is acknowledged.
async fn crash_child(dir: &str) {
    let bus = open(Path::new(dir));
    topic(&bus, "t", 1).await;
    for i in 0.. {
        publish_n(&bus, i, i + 1).await;
        println!("acked {i}");
    }
}

#[tokio::test]
async fn a_killed_process_keeps_every_acked_record() {
    if let Ok(dir) = std::env::var(CRASH_CHILD_DIR) {
        return crash_child(&dir).await;
    }
    let dir = tempfile::tempdir().unwrap();
    // SIGKILL mid-stream: no destructor runs, nothing is flushed on the way out.
    let last = run_child_until_acked(
        "a_killed_process_keeps_every_acked_record",
        CRASH_CHILD_DIR,
        dir.path(),
        300,
    );
    let bus = open(dir.path());
    let high = bus.partition_offsets("t").await.unwrap()[0].high;
    assert!(high > last, "acked up to {last}, kept below {high}");
    let kept = bus.read("t", 0, 0, high as usize + 1).await.unwrap();
    assert_records(&kept, 0, high);
    // Appends go on right after the last record kept.
    publish_n(&bus, high, high + 2).await;
    assert_records(&bus.read("t", 0, high, 10).await.unwrap(), high, high + 2);
}

/// Env var naming the directory the child of [`a_killed_consumer_keeps_its_acks`] works in.
const ACK_CHILD_DIR: &str = "NEXUS_EMBEDDED_ACK_CHILD_DIR";

/// The child's half: handles records until killed; after each ack, a publish (whose batch
/// carries the commits queued before it) makes the ack durable, then it says so.
async fn ack_child(dir: &str) {
    let bus = open(Path::new(dir));
    topic(&bus, "t", 1).await;
    topic(&bus, "sync", 1).await;
    let mut sub = bus.subscribe("g", "t", opts(16)).await.unwrap();
    for i in 0.. {
        publish_n(&bus, i, i + 1).await;
        let d = next(&mut sub).await;
        assert_eq!(d.message.offset, i);
        d.ack().await.unwrap();
        bus.publish("sync", OutRecord::new("k", "x")).await.unwrap();
        println!("acked {i}");
    }
}

/// The group's committed offsets survive a SIGKILL: a reopened bus has every ack made
/// durable before the kill, so the group goes on after them (only acks of the last batch
/// may come again).
#[tokio::test]
async fn a_killed_consumer_keeps_its_acks() {
    if let Ok(dir) = std::env::var(ACK_CHILD_DIR) {
        return ack_child(&dir).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let last = run_child_until_acked(
        "a_killed_consumer_keeps_its_acks",
        ACK_CHILD_DIR,
        dir.path(),
        200,
    );
    let bus = open(dir.path());
    let p = bus.group_positions("g", "t").await.unwrap()[0];
    let committed = p.committed.expect("the group's position survived");
    assert!(
        committed > last && committed <= p.high,
        "acked up to {last} durably, committed {committed}, log end {}",
        p.high
    );
    // The group goes on from there.
    let mut sub = bus.subscribe("g", "t", opts(16)).await.unwrap();
    if committed < p.high {
        assert_eq!(next(&mut sub).await.message.offset, committed);
    } else {
        assert!(quiet(&mut sub).await);
    }
}

#[tokio::test]
async fn reads_cross_flushed_tables_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let bus = open(dir.path());
        topic(&bus, "t", 1).await;
        publish_n(&bus, 0, 5).await;
        // Records 0..5 leave the memtable for a table on disk; 5..9 stay in memory.
        bus.inner.store().unwrap().db.flush_records().unwrap();
        publish_n(&bus, 5, 9).await;
        assert_records(&bus.read("t", 0, 0, 100).await.unwrap(), 0, 9);
        assert_records(&bus.read("t", 0, 3, 4).await.unwrap(), 3, 7);
        let mut sub = bus.subscribe("g", "t", opts(100)).await.unwrap();
        for i in 0..9 {
            let d = next(&mut sub).await;
            assert_eq!(d.message.offset, i);
            d.ack().await.unwrap();
        }
        sub.close().await.unwrap();
    }
    let bus = open(dir.path());
    assert_records(&bus.read("t", 0, 1, 100).await.unwrap(), 1, 9);
    let times: Vec<i64> = bus
        .read("t", 0, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|m| m.timestamp_ms)
        .collect();
    assert_eq!(
        bus.offset_for_time("t", 0, times[5]).await.unwrap(),
        times.iter().position(|&t| t == times[5]).unwrap() as u64
    );
    assert_eq!(bus.offset_for_time("t", 0, times[8] + 1).await.unwrap(), 9);
    assert_eq!(bus.offset_for_time("t", 0, i64::MIN).await.unwrap(), 0);
    assert_eq!(
        bus.group_positions("g", "t").await.unwrap()[0].committed,
        Some(9)
    );
    publish_n(&bus, 9, 10).await;
    assert_records(&bus.read("t", 0, 8, 100).await.unwrap(), 8, 10);
}

#[tokio::test]
async fn retention_removes_expired_records() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    bus.apply_topic(&TopicSpec {
        name: "t".into(),
        partitions: 1,
        retention: Some(Duration::from_millis(300)),
    })
    .await
    .unwrap();
    publish_n(&bus, 0, 5).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    publish_n(&bus, 5, 6).await;
    bus.enforce_retention().await.unwrap();
    let offs = bus.partition_offsets("t").await.unwrap()[0];
    assert_eq!((offs.low, offs.high), (5, 6));
    assert_records(&bus.read("t", 0, 0, 10).await.unwrap(), 5, 6);
    // A reader that asks for a removed offset gets the first one kept.
    assert_records(&bus.read("t", 0, 2, 10).await.unwrap(), 5, 6);
    // The removed records stay removed: a reopen starts at the same low.
    drop(bus);
    let bus = open(dir.path());
    let offs = bus.partition_offsets("t").await.unwrap()[0];
    assert_eq!((offs.low, offs.high), (5, 6));
    // All of an idle partition expires; its offsets still continue where they were.
    tokio::time::sleep(Duration::from_millis(350)).await;
    bus.enforce_retention().await.unwrap();
    let offs = bus.partition_offsets("t").await.unwrap()[0];
    assert_eq!((offs.low, offs.high), (6, 6));
    assert!(bus.read("t", 0, 0, 10).await.unwrap().is_empty());
    drop(bus);
    let bus = open(dir.path());
    let offs = bus.partition_offsets("t").await.unwrap()[0];
    assert_eq!((offs.low, offs.high), (6, 6));
    publish_n(&bus, 6, 7).await;
    drop(bus);
    let bus = open(dir.path());
    assert_records(&bus.read("t", 0, 0, 10).await.unwrap(), 6, 7);
}

/// (committed, high) of each partition.
async fn positions(bus: &EmbeddedBus, group: &str, topic: &str) -> Vec<(Option<u64>, u64)> {
    bus.group_positions(group, topic)
        .await
        .unwrap()
        .iter()
        .map(|p| (p.committed, p.high))
        .collect()
}

#[tokio::test]
async fn offsets_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let bus = open(dir.path());
        topic(&bus, "t", 2).await;
        topic(&bus, "u", 1).await;
        for i in 0..20 {
            bus.publish("t", OutRecord::new(format!("k{i}"), "x"))
                .await
                .unwrap();
        }
        bus.publish("u", OutRecord::new("k", "x")).await.unwrap();
        for (group, topic, n) in [("a", "t", 20), ("b", "t", 20), ("a", "u", 1)] {
            let mut sub = bus.subscribe(group, topic, opts(100)).await.unwrap();
            for _ in 0..n {
                next(&mut sub).await.ack().await.unwrap();
            }
            sub.close().await.unwrap();
        }
        bus.seek_group("b", "t", 0, 0).await.unwrap();
    }
    let bus = open(dir.path());
    let highs: Vec<u64> = bus
        .partition_offsets("t")
        .await
        .unwrap()
        .iter()
        .map(|o| o.high)
        .collect();
    assert_eq!(highs.iter().sum::<u64>(), 20);
    assert_eq!(
        positions(&bus, "a", "t").await,
        highs.iter().map(|&h| (Some(h), h)).collect::<Vec<_>>()
    );
    assert_eq!(
        positions(&bus, "b", "t").await,
        vec![(Some(0), highs[0]), (Some(highs[1]), highs[1])]
    );
    assert_eq!(positions(&bus, "a", "u").await, vec![(Some(1), 1)]);
    assert_eq!(positions(&bus, "c", "t").await[0].0, None);
}

/// Deliveries a member holds for a partition a rebalance gave away say so; the others do not.
#[tokio::test]
async fn held_deliveries_of_a_moved_partition_are_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 2).await;
    for p in 0..2u32 {
        let key = crate::bus::partitioner::key_in(p, 2, "k");
        bus.publish("t", OutRecord::new(key, "x")).await.unwrap();
    }
    let mut a = bus.subscribe("g", "t", opts(16)).await.unwrap();
    let held = [next(&mut a).await, next(&mut a).await];
    assert!(
        held.iter().all(|d| !d.revoked()),
        "both owned by the only member"
    );
    let _b = bus.subscribe("g", "t", opts(16)).await.unwrap();
    let revoked: Vec<u32> = held
        .iter()
        .filter(|d| d.revoked())
        .map(|d| d.message.partition)
        .collect();
    assert_eq!(revoked.len(), 1, "one of two partitions moved: {revoked:?}");
}

/// A moved partition is read by its new owner only once the old owner's deliveries of it are
/// done: an acked one counts (the new owner starts after it), a dropped one comes again.
#[tokio::test]
async fn a_moved_partition_waits_for_its_old_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 2).await;
    let publish = |n: usize| {
        let bus = &bus;
        async move {
            for _ in 0..n {
                for p in 0..2u32 {
                    let key = crate::bus::partitioner::key_in(p, 2, "k");
                    bus.publish("t", OutRecord::new(key, "x")).await.unwrap();
                }
            }
        }
    };
    // A holds offset 0 of each partition (at most two in flight), then more come.
    publish(1).await;
    let mut a = bus.subscribe("g", "t", opts(2)).await.unwrap();
    let held = [next(&mut a).await, next(&mut a).await];
    publish(2).await;
    let mut b = bus.subscribe("g", "t", opts(16)).await.unwrap();
    let (moved, kept): (Vec<_>, Vec<_>) = held.into_iter().partition(|d| d.revoked());
    let (moved, kept) = (
        moved.into_iter().next().expect("one moved"),
        kept.into_iter().next().expect("one kept"),
    );
    let partition = moved.message.partition;
    assert_eq!(moved.message.offset, 0);
    // A still handles offset 0 of the moved partition: B reads nothing of it meanwhile.
    assert!(quiet(&mut b).await, "read before the old owner was done");
    kept.ack().await.unwrap();
    assert!(quiet(&mut b).await, "read before the old owner was done");
    // A finishes it: B starts after it.
    moved.ack().await.unwrap();
    let d = next(&mut b).await;
    assert_eq!((d.message.partition, d.message.offset), (partition, 1));
    // Once more the other way round: B holds offset 1, drops it when it moves back, and A
    // gets offset 1 again.
    drop(b);
    let d2 = next(&mut a).await;
    assert!(
        d2.message.partition != partition || d2.message.offset >= 1,
        "an acked record came again: {:?}",
        (d2.message.partition, d2.message.offset)
    );
    drop(d);
    let mut again = vec![(d2.message.partition, d2.message.offset)];
    d2.ack().await.unwrap();
    again.extend(drain(&mut a, Duration::from_millis(300)).await);
    assert!(again.contains(&(partition, 1)), "{again:?}");
    assert!(!again.contains(&(partition, 0)), "{again:?}");
}

/// Acks the old owner made out of order (past a record still being handled) count across a
/// hand-over: the new owner does not handle those records again.
#[tokio::test]
async fn a_hand_over_keeps_acks_made_past_the_committed_offset() {
    hand_over_past_the_committed_offset(16).await;
    // Reads of 2: the second read finds only records A acked, and B reads on rather than
    // waiting for an append that may never come.
    hand_over_past_the_committed_offset(2).await;
}

async fn hand_over_past_the_committed_offset(b_in_flight: usize) {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 1).await;
    publish_n(&bus, 0, 6).await;
    let mut a = bus.subscribe("g", "t", opts(4)).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(next(&mut a).await);
    }
    // 1..3 done, 0 still being handled when A leaves.
    let first = held.remove(0);
    for d in held {
        d.ack().await.unwrap();
    }
    drop(a);
    let mut b = bus.subscribe("g", "t", opts(b_in_flight)).await.unwrap();
    assert!(quiet(&mut b).await, "read before A was done with offset 0");
    // A's handler of 0 ends without an ack: 0 comes again, then 4 and 5, not 1..3; 4 while
    // B still handles 0 (B reads on past A's acks rather than waiting for an append).
    drop(first);
    let zero = next(&mut b).await;
    let four = next(&mut b).await;
    let mut got = vec![
        (zero.message.partition, zero.message.offset),
        (four.message.partition, four.message.offset),
    ];
    zero.ack().await.unwrap();
    four.ack().await.unwrap();
    got.extend(drain(&mut b, Duration::from_millis(300)).await);
    assert_eq!(
        got,
        [(0, 0), (0, 4), (0, 5)],
        "B reading {b_in_flight} at a time"
    );
    assert_eq!(total_lag(&bus, "g").await, 0);
}

/// After a seek, acks of records handed out before it do not move the committed offset: the
/// replay starts where the seek put it.
#[tokio::test]
async fn acks_from_before_a_seek_do_not_count() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 1).await;
    publish_n(&bus, 0, 3).await;
    let mut a = bus.subscribe("g", "t", opts(8)).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut a).await);
    }
    // A forced replay from 0 while all three are in flight; their acks come after it.
    bus.seek_group("g", "t", 0, 0).await.unwrap();
    for d in held {
        d.ack().await.unwrap();
    }
    let positions = bus.group_positions("g", "t").await.unwrap();
    assert_eq!(
        positions[0].committed,
        Some(0),
        "{:?}",
        positions[0].committed
    );
    let d = next(&mut a).await;
    assert_eq!(d.message.offset, 0, "the replay starts at the seek");
}

/// A hand-over does not wait forever for a delivery that is never done.
#[tokio::test]
async fn a_hand_over_reads_anyway_after_its_wait() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open_with_handover(dir.path(), Duration::from_millis(600));
    topic(&bus, "t", 1).await;
    bus.publish("t", OutRecord::new("k", "x")).await.unwrap();
    bus.publish("t", OutRecord::new("k", "y")).await.unwrap();
    let mut a = bus.subscribe("g", "t", opts(1)).await.unwrap();
    let stuck = next(&mut a).await;
    drop(a); // the member leaves; its handler hangs on
    let mut b = bus.subscribe("g", "t", opts(16)).await.unwrap();
    assert!(quiet(&mut b).await);
    let d = next(&mut b).await;
    assert_eq!(d.message.offset, 0, "the stuck record comes again");
    drop(stuck);
}

/// A consumer's lanes leave records of a partition given away while they were queued to the
/// next owner instead of handling them too, and the next owner starts only once the record
/// being handled at that moment is done: every record is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_leaves_queued_records_of_a_moved_partition() {
    use crate::bus::consumer::{Consumer, HandleError, Handler};
    use crate::events::Event;
    use std::sync::{Arc, Mutex};
    use tokio_util::sync::CancellationToken;

    struct Gate {
        open: tokio::sync::Semaphore,
        handled: Mutex<Vec<(u32, u64)>>,
    }
    #[async_trait::async_trait]
    impl Handler for Gate {
        async fn handle(&self, _e: &Event, m: &Message) -> Result<(), HandleError> {
            // The first record holds the lane until the test opens the gate.
            let _ = self.open.acquire().await;
            self.handled.lock().unwrap().push((m.partition, m.offset));
            Ok(())
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open(dir.path()));
    bus.apply_topic(&TopicSpec {
        name: "t".into(),
        partitions: 2,
        retention: None,
    })
    .await
    .unwrap();
    for _ in 0..3 {
        for p in 0..2u32 {
            bus.publish("t", crate::bus::test_support::event_on(p, 2))
                .await
                .unwrap();
        }
    }
    let gate = Arc::new(Gate {
        open: tokio::sync::Semaphore::new(0),
        handled: Mutex::new(Vec::new()),
    });
    let options = crate::bus::test_support::options(1);
    let stop = CancellationToken::new();
    let run =
        tokio::spawn(Consumer::new(bus.clone(), "g", "t", options).run(gate.clone(), stop.clone()));
    // Everything is queued in the one lane behind the first record.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b = bus
        .subscribe("g", "t", SubscribeOptions::default())
        .await
        .unwrap();
    // The lane still holds records of the moved partition: B waits for them.
    assert!(quiet(&mut b).await, "B read while A was not done");
    gate.open.add_permits(100);
    let taken_by_b: HashSet<_> = drain(&mut b, Duration::from_millis(500))
        .await
        .into_iter()
        .collect();
    stop.cancel();
    run.await.unwrap().unwrap();
    let handled = gate.handled.lock().unwrap().clone();
    let both: Vec<_> = handled.iter().filter(|r| taken_by_b.contains(r)).collect();
    assert!(
        both.is_empty(),
        "handled by both members: {both:?} (A handled {handled:?})"
    );
    let mut all: Vec<_> = handled.iter().copied().chain(taken_by_b).collect();
    all.sort_unstable();
    let want: Vec<_> = (0..2u32)
        .flat_map(|p| (0..3u64).map(move |o| (p, o)))
        .collect();
    assert_eq!(all, want, "every record handled once (A: {handled:?})");
}

/// A record waiting minutes to retry (a peer asked for later) is left to the next owner as soon
/// as its partition moves, instead of at the end of its wait: the new member reads it within
/// moments, not after the hand-over wait (the test's 20 s), and the old member tries it no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_waiting_to_retry_is_left_when_its_partition_moves() {
    use crate::bus::consumer::Consumer;
    use crate::bus::test_support::{event_on, options, Later};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn Bus> = Arc::new(open_with_handover(dir.path(), Duration::from_secs(20)));
    bus.apply_topic(&TopicSpec {
        name: "t".into(),
        partitions: 2,
        retention: None,
    })
    .await
    .unwrap();
    for p in 0..2u32 {
        bus.publish("t", event_on(p, 2)).await.unwrap();
    }
    let handler = Arc::new(Later::default());
    let options = options(2);
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        Consumer::new(bus.clone(), "g", "t", options).run(handler.clone(), stop.clone()),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while handler.tries() < 2 {
        assert!(std::time::Instant::now() < deadline, "both records tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut b = bus
        .subscribe("g", "t", SubscribeOptions::default())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), b.next())
        .await
        .expect("the moved partition's waiting record comes to the new member at once")
        .expect("open")
        .expect("delivery");
    assert_eq!(got.message.offset, 0);
    assert_eq!(
        handler.tries(),
        2,
        "nothing is tried again while the minute runs"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// Acks past a record that stays unacked (a handler retrying in place against a peer that is
/// down) are kept as runs, not one entry each: the tracking of a busy partition stays small
/// however long the gap lasts, and the committed offset still jumps over all of them at once.
#[tokio::test]
async fn acks_past_a_gap_are_kept_as_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Arc::new(open(dir.path()));
    topic(&bus, "t", 1).await;
    let n = 600u64;
    let publishes: Vec<_> = (0..n)
        .map(|i| {
            let bus = bus.clone();
            tokio::spawn(async move {
                bus.publish("t", OutRecord::new("k", format!("m{i}")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for p in publishes {
        p.await.unwrap();
    }
    let mut sub = bus.subscribe("g", "t", opts(8)).await.unwrap();
    let stuck = next(&mut sub).await;
    assert_eq!(stuck.message.offset, 0);
    for i in 1..n {
        let d = next(&mut sub).await;
        assert_eq!(d.message.offset, i);
        d.ack().await.unwrap();
    }
    let key = ("g".to_string(), "t".to_string());
    assert_eq!(bus.inner.done_runs(&key, 0), 1, "acks 1..{n} past offset 0");
    assert_eq!(total_lag(&bus, "g").await, n);
    stuck.ack().await.unwrap();
    assert_eq!(bus.inner.done_runs(&key, 0), 0);
    assert_eq!(
        bus.group_positions("g", "t").await.unwrap()[0].committed,
        Some(n)
    );
}

/// What fjall leaves when its in-place creation of `db` is cut short (the first start of
/// `nexus dev` on a full disk, or killed during it): an empty version marker or none, a
/// journal file and no keyspace. Such a database never held an event; the bus starts it
/// again instead of failing at every start (`InvalidVersion(None)` or `File exists`).
#[tokio::test]
async fn a_database_whose_creation_was_cut_short_is_created_again() {
    for marker in [Some(""), None] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(store::DB_DIR);
        std::fs::create_dir_all(db.join("keyspaces")).unwrap();
        std::fs::write(db.join("lock"), b"").unwrap();
        std::fs::write(db.join("0.jnl"), b"").unwrap();
        if let Some(m) = marker {
            std::fs::write(db.join("version"), m).unwrap();
        }
        // And a staging copy of a later creation that was cut short too.
        std::fs::create_dir_all(dir.path().join("db.new/keyspaces")).unwrap();
        std::fs::write(dir.path().join("db.new/0.jnl"), b"").unwrap();
        {
            let bus = EmbeddedBus::open(dir.path(), &config(8))
                .unwrap_or_else(|e| panic!("marker {marker:?}: {e}"));
            topic(&bus, "t", 1).await;
            publish_n(&bus, 0, 2).await;
        }
        assert!(!dir.path().join("db.new").exists());
        let bus = open(dir.path());
        assert_records(&bus.read("t", 0, 0, 10).await.unwrap(), 0, 2);
    }
}

/// A database that holds data is never taken for an unfinished one, whatever its marker says.
#[tokio::test]
async fn a_database_with_keyspaces_is_never_recreated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let bus = open(dir.path());
        topic(&bus, "t", 1).await;
        publish_n(&bus, 0, 2).await;
    }
    let marker = dir.path().join(store::DB_DIR).join("version");
    std::fs::write(&marker, b"").unwrap();
    let err = EmbeddedBus::open(dir.path(), &config(8))
        .err()
        .expect("refused, not recreated");
    assert!(matches!(err, BusError::Storage(_)), "{err}");
    assert!(dir.path().join(store::DB_DIR).join("keyspaces").exists());
}

/// A topic name fjall cannot key (empty, or past its key limit) is refused: saving it hit
/// fjall's `assert!` in the writer thread, which stopped the bus for every caller. Names with
/// any other characters work, across a reopen.
#[tokio::test]
async fn topic_names_are_checked_and_odd_ones_work() {
    let dir = tempfile::tempdir().unwrap();
    let odd = [
        "ünï/cöde .\n\u{0}x",
        "a\\b:c*d?e|f\"g<h>i",
        &"t".repeat(1_000),
    ];
    {
        let bus = open(dir.path());
        for bad in [String::new(), "x".repeat(70_000)] {
            let err = bus
                .apply_topic(&TopicSpec {
                    name: bad.clone(),
                    partitions: 1,
                    retention: None,
                })
                .await
                .expect_err("refused");
            assert!(matches!(err, BusError::Config(_)), "{err}");
        }
        bus.health().await.expect("the bus is still up");
        for name in odd {
            topic(&bus, name, 3).await;
            bus.publish(name, OutRecord::new("k", "v")).await.unwrap();
            let mut sub = bus.subscribe("g", name, opts(4)).await.unwrap();
            next(&mut sub).await.ack().await.unwrap();
            sub.close().await.unwrap();
        }
    }
    let bus = open(dir.path());
    for name in odd {
        let info = bus.topic_info(name).await.unwrap().expect("kept");
        assert_eq!(info.partitions, 3);
        let lag: u64 = bus
            .group_positions("g", name)
            .await
            .unwrap()
            .iter()
            .map(|p| p.lag)
            .sum();
        assert_eq!(lag, 0, "{name:?}");
    }
}

/// A backlog of large records is read a few megabytes at a time: a fetch read 256 records
/// whatever their size, so handing out one of 30 records of 64 MiB took 2 GiB of memory (and a
/// backlog at the log's 1 GiB record limit, far more than a machine has).
#[tokio::test]
async fn a_backlog_of_large_records_is_read_a_few_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let bus = open(dir.path());
    topic(&bus, "t", 1).await;
    let mb = |n: usize| vec![b'x'; n << 20];
    for i in 0..10 {
        // One record past the whole budget is still read, alone.
        let size = if i == 5 { mb(12) } else { mb(3) };
        bus.publish("t", OutRecord::new("k", size)).await.unwrap();
    }
    let mut sub =
        subscription::EmbeddedSubscription::join(bus.inner.clone(), "g", "t", opts(1024)).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("ok");
    assert_eq!(first.message.offset, 0);
    // 3 + 3 + 3 MiB passes 8 MiB: three read, one handed out.
    assert_eq!(sub.buffered(), 2, "read ahead of one delivery");
    first.ack().await.unwrap();
    let mut sub: Box<dyn Subscription> = Box::new(sub);
    let got: Vec<u64> = drain(&mut sub, Duration::from_millis(300))
        .await
        .into_iter()
        .map(|(_, o)| o)
        .collect();
    assert_eq!(got, (1..10).collect::<Vec<_>>());
    assert_eq!(total_lag(&bus, "g").await, 0);
}
