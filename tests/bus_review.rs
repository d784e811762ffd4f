//! Review cases for the consumer runtime's at-least-once and per-key order guarantees around
//! retries, dead letters and hand-overs.

use crate::common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::faulty::{Faults, FaultyBus};
use common::{next_within, TestBus};
use nexus::bus::consumer::{lane_of, Consumer, ConsumerOptions, HandleError, Handler};
use nexus::bus::{
    dlq_topic, partition_for, BusError, Message, OutRecord, StartFrom, SubscribeOptions,
};
use nexus::events::Event;
use tokio_util::sync::CancellationToken;

/// Refuses every write to the dead-letter topic `dlq`, counting the attempts.
struct DlqDown {
    dlq: String,
    attempts: AtomicUsize,
}

#[async_trait]
impl Faults for DlqDown {
    async fn publish(&self, topic: &str) -> Result<(), BusError> {
        if topic == self.dlq {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            return Err(BusError::Unavailable(
                "injected: dead-letter topic down".into(),
            ));
        }
        Ok(())
    }
}

/// Never called: every record of the case is undecodable.
struct Unused;

#[async_trait]
impl Handler for Unused {
    async fn handle(&self, _e: &Event, _m: &Message) -> Result<(), HandleError> {
        Ok(())
    }
}

/// One key per partition, each on its own lane among `lanes`.
fn keys_on_distinct_lanes(partitions: u32, lanes: usize) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let (mut parts, mut used) = (HashSet::new(), HashSet::new());
    for i in 0.. {
        let k = format!("k{i}");
        let (p, l) = (partition_for(&k, partitions), lane_of(&k, lanes));
        if !parts.contains(&p) && !used.contains(&l) {
            parts.insert(p);
            used.insert(l);
            keys.push(k);
            if keys.len() == partitions as usize {
                break;
            }
        }
    }
    keys
}

/// A lane retrying a dead-letter write that the bus refuses waits between tries; a partition
/// given away meanwhile must be left to its next owner at once, as a handler's retry wait
/// does, not after the back-off (here a minute or more, longer than the hand-over wait), which
/// would hold the hand-over for that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_retry_leaves_a_revoked_partition_at_once() {
    if !common::selected("embedded") {
        return;
    }
    let t: TestBus = common::test_bus("embedded").await;
    let partitions = 4;
    let topic = t.fresh_topic(partitions).await;
    let group = format!("g-{topic}");
    let down = Arc::new(FaultyBus::new(
        t.bus.clone(),
        DlqDown {
            dlq: dlq_topic(&topic),
            attempts: AtomicUsize::new(0),
        },
    ));
    let lanes = 16;
    let keys = keys_on_distinct_lanes(partitions, lanes);
    for k in &keys {
        // Not an event: dead-lettered as undecodable.
        t.bus
            .publish(&topic, OutRecord::new(k.as_str(), b"not an event".to_vec()))
            .await
            .expect("publish");
    }
    let options = ConsumerOptions {
        concurrency: lanes,
        max_in_flight: 64,
        handler_timeout: Duration::from_secs(30),
        // The first back-off after a failed dead-letter write: 60–120 s.
        retry_initial: Duration::from_secs(120),
        retry_max: Duration::from_secs(120),
        lag_interval: Duration::from_secs(1),
        start: StartFrom::Earliest,
    };
    let stop = CancellationToken::new();
    let first = Consumer::new(down.clone(), &group, &topic, options).drain_for(Duration::ZERO);
    let first = tokio::spawn(first.run(Arc::new(Unused), stop.clone()));

    // Every record's lane has tried the dead-letter topic once and waits to try again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while down.faults.attempts.load(Ordering::SeqCst) < keys.len() {
        assert!(Instant::now() < deadline, "dead-letter writes not tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A second member takes some of the partitions; their records must come to it without
    // the first member's back-off (nor the hand-over wait, 30 s) running out first.
    let started = Instant::now();
    let mut second = t
        .bus
        .subscribe(
            &group,
            &topic,
            SubscribeOptions {
                start: StartFrom::Earliest,
                max_in_flight: 64,
            },
        )
        .await
        .expect("subscribe");
    let d = next_within(&mut second, Duration::from_secs(90))
        .await
        .expect("the second member receives its partitions' records");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the hand-over waited {took:?} for a lane waiting to retry a dead-letter write"
    );
    assert_eq!(&d.message.payload[..], b"not an event");
    drop(d);
    second.close().await.expect("close");
    stop.cancel();
    first.await.expect("join").expect("consumer");
}
