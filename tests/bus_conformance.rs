//! The bus conformance suite: the same cases against every backend (embedded always; NATS
//! JetStream and Kafka with the servers `scripts/services.sh` starts). `NEXUS_TEST_BUS=<backend>`
//! runs one backend only.

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{next_within, take, TestBus};
use nexus::bus::consumer::{lane_of, Consumer, ConsumerOptions, HandleError, Handler};
use nexus::bus::{
    dlq_topic, headers, partition_for, Bus, BusError, Message, OutRecord, StartFrom,
    SubscribeOptions,
};
use nexus::events::Event;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

fn opts() -> SubscribeOptions {
    SubscribeOptions {
        start: StartFrom::Earliest,
        max_in_flight: 256,
    }
}

fn consumer_options(concurrency: usize) -> ConsumerOptions {
    ConsumerOptions {
        concurrency,
        max_in_flight: 256,
        handler_timeout: Duration::from_secs(30),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        lag_interval: Duration::from_millis(200),
        start: StartFrom::Earliest,
    }
}

/// A consumer runtime running in the background until [`Running::stop`].
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), nexus::bus::BusError>>,
}

impl Running {
    fn start(
        t: &TestBus,
        group: &str,
        topic: &str,
        handler: Arc<dyn Handler>,
        lanes: usize,
    ) -> Running {
        let stop = CancellationToken::new();
        let consumer = Consumer::new(t.bus.clone(), group, topic, consumer_options(lanes));
        let task = tokio::spawn(consumer.run(handler, stop.clone()));
        Running { stop, task }
    }

    /// Drains and leaves the group; the consumer must have ended without error.
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("join").expect("consumer");
    }
}

fn seq_record(key: &str, seq: u64) -> OutRecord {
    OutRecord::new(key, format!("{key}:{seq}").into_bytes())
}

fn parse_seq(m: &Message) -> (String, u64) {
    let s = std::str::from_utf8(&m.payload).expect("utf8");
    let (k, n) = s.rsplit_once(':').expect("key:seq");
    (k.to_string(), n.parse().expect("seq"))
}

/// Two members of one group: every key's records arrive complete and in publish order (a
/// redelivery after a handover may repeat a record, never skip or reorder), and both members
/// get work.
async fn keyed_order_with_two_members(t: TestBus) {
    let topic = t.fresh_topic(4).await;
    let group = format!("g-{topic}");
    let received: Arc<Mutex<Vec<(usize, String, u64)>>> = Arc::default();
    let stop = CancellationToken::new();
    let mut members = Vec::new();
    for id in 0..2 {
        let mut sub = t
            .bus
            .subscribe(&group, &topic, opts())
            .await
            .expect("subscribe");
        let received = received.clone();
        let stop = stop.clone();
        members.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    d = sub.next() => match d {
                        Some(Ok(d)) => {
                            let (k, n) = parse_seq(&d.message);
                            received.lock().unwrap().push((id, k, n));
                            d.ack().await.expect("ack");
                        }
                        Some(Err(e)) => panic!("member {id}: {e}"),
                        None => break,
                    }
                }
            }
            sub.close().await.expect("close");
        }));
    }
    t.wait_members(&group, &topic, 2).await;
    tokio::time::sleep(t.settle_time()).await;

    let keys: Vec<String> = (0..20).map(|i| format!("conv-{i}")).collect();
    let per_key = 25u64;
    for n in 0..per_key {
        for k in &keys {
            t.bus
                .publish(&topic, seq_record(k, n))
                .await
                .expect("publish");
        }
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let distinct: HashSet<(String, u64)> = received
            .lock()
            .unwrap()
            .iter()
            .map(|(_, k, n)| (k.clone(), *n))
            .collect();
        if distinct.len() == keys.len() * per_key as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} distinct records arrived",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    for m in members {
        m.await.expect("member task");
    }
    let got = received.lock().unwrap().clone();
    let mut by_key: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut by_member = [0usize; 2];
    for (id, k, n) in &got {
        by_key.entry(k.as_str()).or_default().push(*n);
        by_member[*id] += 1;
    }
    for (k, seqs) in by_key {
        let mut max_seen: Option<u64> = None;
        for &n in &seqs {
            let next = max_seen.map_or(0, |m| m + 1);
            assert!(
                n <= next,
                "key {k} skipped ahead to {n} (expected at most {next}): {seqs:?}"
            );
            max_seen = Some(max_seen.map_or(n, |m| m.max(n)));
        }
        assert_eq!(max_seen, Some(per_key - 1), "key {k} incomplete");
    }
    assert!(
        by_member[0] > 0 && by_member[1] > 0,
        "both members should get partitions: {by_member:?}"
    );
}

/// A member that dies without acking: the group's next member gets every unacked record, and
/// none of the acked ones.
async fn redelivery_after_member_dies(t: TestBus) {
    let topic = t.fresh_topic(1).await;
    let group = format!("g-{topic}");
    for n in 0..20 {
        t.bus
            .publish(&topic, seq_record("k", n))
            .await
            .expect("publish");
    }
    let mut a = t
        .bus
        .subscribe(&group, &topic, opts())
        .await
        .expect("subscribe a");
    let first = take(&mut a, 5, WAIT, true).await;
    assert_eq!(
        first.iter().map(|m| parse_seq(m).1).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    // Take more without acking, then die: no close, no commit.
    let unacked = take(&mut a, 5, WAIT, false).await;
    assert_eq!(parse_seq(&unacked[0]).1, 5);
    drop(a);

    let mut b = t
        .bus
        .subscribe(&group, &topic, opts())
        .await
        .expect("subscribe b");
    let rest = take(&mut b, 15, WAIT + t.failover_time(), true).await;
    let seqs: Vec<u64> = rest.iter().map(|m| parse_seq(m).1).collect();
    assert_eq!(
        seqs,
        (5..20).collect::<Vec<_>>(),
        "the new member must resume at the first unacked record"
    );
    b.close().await.expect("close");
}

/// Acked records are never delivered again to the same group.
async fn acked_records_are_not_redelivered(t: TestBus) {
    let topic = t.fresh_topic(2).await;
    let group = format!("g-{topic}");
    for n in 0..10 {
        t.bus
            .publish(&topic, seq_record(&format!("k{n}"), n))
            .await
            .expect("publish");
    }
    consume_and_leave(&t, &group, &topic, 10).await;

    let mut b = t
        .bus
        .subscribe(&group, &topic, opts())
        .await
        .expect("subscribe again");
    t.bus
        .publish(&topic, seq_record("marker", 99))
        .await
        .expect("publish marker");
    let d = next_within(&mut b, WAIT + t.failover_time())
        .await
        .expect("the marker arrives");
    assert_eq!(
        parse_seq(&d.message),
        ("marker".to_string(), 99),
        "an acked record came back"
    );
    d.ack().await.expect("ack");
    assert!(
        next_within(&mut b, Duration::from_millis(1500))
            .await
            .is_none(),
        "nothing else may arrive"
    );
    b.close().await.expect("close");
}

struct SlowOnce {
    slow_key: String,
    slow_for: Duration,
    done: Mutex<Vec<(String, Instant)>>,
}

#[async_trait]
impl Handler for SlowOnce {
    async fn handle(&self, event: &Event, _m: &Message) -> Result<(), HandleError> {
        if event.envelope.conversation_id == self.slow_key {
            tokio::time::sleep(self.slow_for).await;
        }
        self.done
            .lock()
            .unwrap()
            .push((event.envelope.conversation_id.clone(), Instant::now()));
        Ok(())
    }
}

/// A slow handler on one key does not stall other keys, even in the same partition.
async fn slow_handler_does_not_stall_other_keys(t: TestBus) {
    let topic = t.fresh_topic(1).await;
    let group = format!("g-{topic}");
    let lanes = 8;
    let slow_key = "slow-conversation".to_string();
    let others: Vec<String> = (0..200)
        .map(|i| format!("conv-{i}"))
        .filter(|k| lane_of(k, lanes) != lane_of(&slow_key, lanes))
        .take(20)
        .collect();
    t.bus
        .publish(&topic, common::event_record(&slow_key, 0))
        .await
        .expect("publish");
    for k in &others {
        t.bus
            .publish(&topic, common::event_record(k, 0))
            .await
            .expect("publish");
    }
    let handler = Arc::new(SlowOnce {
        slow_key: slow_key.clone(),
        slow_for: Duration::from_secs(6),
        done: Mutex::default(),
    });
    let running = Running::start(&t, &group, &topic, handler.clone(), lanes);

    let deadline = Instant::now() + WAIT;
    while handler.done.lock().unwrap().len() < others.len() + 1 {
        assert!(Instant::now() < deadline, "events not handled in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = handler.done.lock().unwrap().clone();
    let slow_at = done
        .iter()
        .find(|(k, _)| *k == slow_key)
        .map(|(_, at)| *at)
        .expect("slow handled");
    let others_before_slow = done
        .iter()
        .filter(|(k, at)| *k != slow_key && *at < slow_at)
        .count();
    assert_eq!(
        others_before_slow,
        others.len(),
        "every other key must finish while the slow one runs"
    );

    // Everything was acked: the committed offset reaches the log end.
    wait_lag(&t, &group, &topic, 0).await;
    running.stop().await;
}

/// Holds every event of `slow_key` until the gate opens; records where each event landed.
struct Gated {
    slow_key: String,
    gate: tokio::sync::watch::Receiver<bool>,
    slow_entered: tokio::sync::Notify,
    handled: Mutex<Vec<(u32, u64)>>,
}

#[async_trait]
impl Handler for Gated {
    async fn handle(&self, event: &Event, m: &Message) -> Result<(), HandleError> {
        if event.envelope.conversation_id == self.slow_key {
            self.slow_entered.notify_one();
            let mut gate = self.gate.clone();
            gate.wait_for(|open| *open).await.expect("gate kept");
        }
        self.handled.lock().unwrap().push((m.partition, m.offset));
        Ok(())
    }
}

/// Shutdown while a full lane holds up the intake: what the member handled is a prefix of its
/// partition (the record the intake took but could not queue, and everything after it, are
/// left whole), so the next member handles exactly the rest, none twice. A runtime that sent a
/// taken batch out of delivery order, or dropped part of it below a sent record, leaves a gap
/// that the committed offset cannot pass.
async fn shutdown_behind_a_full_lane_leaves_a_suffix(t: TestBus) {
    let topic = t.fresh_topic(1).await;
    let group = format!("g-{topic}");
    let lanes = 4;
    let slow_key = "slow-conversation".to_string();
    let fast: Vec<String> = (0..200)
        .map(|i| format!("conv-{i}"))
        .filter(|k| lane_of(k, lanes) != lane_of(&slow_key, lanes))
        .take(3)
        .collect();
    // slow, fast, slow, fast, ...: the slow lane holds its first record in the handler and
    // two queued (8 in flight over 4 lanes), so the intake waits with the fourth slow record
    // (the seventh record) once the fast ones before it are handled.
    let mut published = Vec::new();
    for i in 0..24u64 {
        let key = if i % 2 == 0 {
            &slow_key
        } else {
            &fast[(i as usize / 2) % fast.len()]
        };
        let p = t
            .bus
            .publish(&topic, common::event_record(key, i))
            .await
            .expect("publish");
        published.push((p.partition, p.offset));
    }
    let (open, gate) = tokio::sync::watch::channel(false);
    let handler = Arc::new(Gated {
        slow_key: slow_key.clone(),
        gate,
        slow_entered: tokio::sync::Notify::new(),
        handled: Mutex::default(),
    });
    let stop = CancellationToken::new();
    let options = ConsumerOptions {
        max_in_flight: 8,
        ..consumer_options(lanes)
    };
    let consumer = Consumer::new(t.bus.clone(), &group, &topic, options);
    let task = tokio::spawn(consumer.run(handler.clone(), stop.clone()));
    tokio::time::timeout(WAIT, handler.slow_entered.notified())
        .await
        .expect("the slow record reaches its handler");
    let fast_before_wait: Vec<(u32, u64)> = [1, 3, 5].map(|i| published[i]).to_vec();
    let deadline = Instant::now() + WAIT;
    while !fast_before_wait
        .iter()
        .all(|r| handler.handled.lock().unwrap().contains(r))
    {
        assert!(
            Instant::now() < deadline,
            "fast records not handled in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    open.send(true).expect("gate open");
    task.await.expect("join").expect("consumer");
    let mut first = handler.handled.lock().unwrap().clone();
    first.sort();
    // The intake held the seventh record when shutdown fired (a record it took only as the
    // gate opened would make the prefix longer, never gapped).
    assert!(
        first.len() >= 6 && first == published[..first.len()],
        "the member must have handled a prefix reaching the record its intake held: {first:?}"
    );

    // The next member resumes at the committed offset: exactly the rest, none again.
    let (_open, gate) = tokio::sync::watch::channel(true);
    let second = Arc::new(Gated {
        slow_key,
        gate,
        slow_entered: tokio::sync::Notify::new(),
        handled: Mutex::default(),
    });
    let running = Running::start(&t, &group, &topic, second.clone(), lanes);
    wait_lag(&t, &group, &topic, 0).await;
    running.stop().await;
    let mut rest = second.handled.lock().unwrap().clone();
    rest.sort();
    assert_eq!(rest, published[first.len()..], "the rest, each once");
}

struct Counting {
    seen: Mutex<Vec<String>>,
}

#[async_trait]
impl Handler for Counting {
    async fn handle(&self, event: &Event, _m: &Message) -> Result<(), HandleError> {
        self.seen
            .lock()
            .unwrap()
            .push(event.envelope.event_id.to_string());
        Ok(())
    }
}

/// Undecodable payloads go to the dead-letter topic with the reason in headers, are counted,
/// and the consumer goes on.
async fn bad_payloads_are_dead_lettered(t: TestBus) {
    nexus::telemetry::init_metrics();
    let topic = t.fresh_topic(1).await;
    let group = format!("g-{topic}");
    t.bus
        .publish(&topic, OutRecord::new("k", b"not avro at all".to_vec()))
        .await
        .expect("publish");
    let mut unknown = vec![0xC3, 0x01];
    unknown.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    unknown.extend_from_slice(b"\x02body");
    t.bus
        .publish(&topic, OutRecord::new("k", unknown))
        .await
        .expect("publish");
    // A known schema and a sound envelope, but a body field that is not UTF-8: handlers read
    // bodies lazily, so this must be caught on consume all the same.
    let mut bad_body = nexus::events::encode(&common::event("k", 999)).expect("encode");
    let at = bad_body
        .windows(5)
        .position(|w| w == b"k:999")
        .expect("text in payload");
    bad_body[at + 1..at + 5].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
    t.bus
        .publish(&topic, OutRecord::new("k", bad_body))
        .await
        .expect("publish");
    t.bus
        .publish(&topic, common::event_record("k", 1))
        .await
        .expect("publish");

    let handler = Arc::new(Counting {
        seen: Mutex::default(),
    });
    let running = Running::start(&t, &group, &topic, handler.clone(), 4);
    wait_lag(&t, &group, &topic, 0).await;
    assert_eq!(
        handler.seen.lock().unwrap().len(),
        1,
        "the valid event is handled once"
    );

    let dead = read_all(&t, &dlq_topic(&topic)).await;
    let reasons: Vec<&str> = dead
        .iter()
        .filter_map(|m| m.header(headers::DLQ_REASON))
        .collect();
    assert_eq!(
        reasons,
        vec![
            "not_single_object",
            "unknown_fingerprint",
            "undecodable_body"
        ]
    );
    assert_eq!(
        dead[0].payload.as_ref(),
        b"not avro at all",
        "the original bytes are kept"
    );
    assert_eq!(
        dead[0].header(headers::DLQ_SOURCE_TOPIC),
        Some(topic.as_str())
    );
    assert_eq!(dead[0].header(headers::DLQ_SOURCE_OFFSET), Some("0"));
    running.stop().await;

    let rendered = nexus::telemetry::init_metrics().render();
    let line = rendered
        .lines()
        .find(|l| {
            l.starts_with("nexus_events_dead_lettered_total")
                && l.contains(&topic)
                && l.contains("unknown_fingerprint")
        })
        .unwrap_or_else(|| panic!("dead-letter counter missing:\n{rendered}"));
    assert!(line.ends_with(" 1"), "{line}");
}

/// Every record a topic holds, partition by partition.
async fn read_all(t: &TestBus, topic: &str) -> Vec<Message> {
    let offsets = t.bus.partition_offsets(topic).await.expect("offsets");
    let mut all = Vec::new();
    for p in offsets {
        all.extend(
            t.bus
                .read(topic, p.partition, p.low, 100)
                .await
                .expect("read"),
        );
    }
    all
}

/// The text of a test event (`key:seq`).
fn text_of(event: &Event) -> String {
    event.to_json()["body"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Handles events by their text, panicking on one.
struct PanicsOn {
    text: &'static str,
    seen: Mutex<Vec<String>>,
}

#[async_trait]
impl Handler for PanicsOn {
    async fn handle(&self, event: &Event, _m: &Message) -> Result<(), HandleError> {
        let text = text_of(event);
        if text == self.text {
            panic!("a handler bug met {text}");
        }
        self.seen.lock().unwrap().push(text);
        Ok(())
    }
}

/// A handler that panics on an event: the event is dead-lettered (`handler_panicked`, the
/// panic's message as the error) and the consumer goes on, the same key's later events included.
async fn a_handler_panic_dead_letters_the_event(t: TestBus) {
    let topic = t.fresh_topic(1).await;
    let group = format!("g-{topic}");
    for seq in 1..=3 {
        t.bus
            .publish(&topic, common::event_record("k", seq))
            .await
            .expect("publish");
    }
    let handler = Arc::new(PanicsOn {
        text: "k:2",
        seen: Mutex::default(),
    });
    let running = Running::start(&t, &group, &topic, handler.clone(), 2);
    wait_lag(&t, &group, &topic, 0).await;
    assert_eq!(*handler.seen.lock().unwrap(), vec!["k:1", "k:3"]);
    let dead = read_all(&t, &dlq_topic(&topic)).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].header(headers::DLQ_REASON),
        Some("handler_panicked")
    );
    assert!(
        dead[0]
            .header(headers::DLQ_ERROR)
            .is_some_and(|e| e.contains("a handler bug met k:2")),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(dead[0].header(headers::DLQ_SOURCE_OFFSET), Some("1"));
    running.stop().await;
}

/// Payloads tried when looking for a bus's size limit; a bus taking this has none that matters.
const NO_LIMIT: usize = 2 << 20;

/// The largest payload (key `k`, no headers) the bus takes, found by publishing to a scratch
/// topic; `None` when it takes [`NO_LIMIT`] bytes (the embedded log takes up to 1 GiB).
async fn largest_payload(t: &TestBus) -> Option<usize> {
    let scratch = t.fresh_topic(1).await;
    let fits = |n: usize| {
        let (bus, scratch) = (t.bus.clone(), scratch.clone());
        async move {
            match bus
                .publish(&scratch, OutRecord::new("k", vec![b'x'; n]))
                .await
            {
                Ok(_) => true,
                Err(BusError::TooLarge(_)) => false,
                Err(e) => panic!("publishing {n} bytes: {e}"),
            }
        }
    };
    if fits(NO_LIMIT).await {
        return None;
    }
    // `lo` fits, `hi` does not.
    let (mut lo, mut hi) = (1, NO_LIMIT);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid).await {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// A record as large as the bus takes, which cannot be decoded: its dead-letter copy, larger
/// by the headers saying why, goes without its payload (marked with the payload's size; the
/// source offset says where it is) and the consumer goes on. A bus without a limit keeps the
/// payload.
async fn an_oversized_dead_letter_copy_goes_without_its_payload(t: TestBus) {
    let limit = largest_payload(&t).await;
    let size = limit.unwrap_or(NO_LIMIT);
    let topic = t.fresh_topic(1).await;
    let group = format!("g-{topic}");
    t.bus
        .publish(&topic, OutRecord::new("k", vec![b'x'; size]))
        .await
        .expect("the largest record the bus takes");
    t.bus
        .publish(&topic, common::event_record("k", 1))
        .await
        .expect("publish");
    let handler = Arc::new(Counting {
        seen: Mutex::default(),
    });
    let running = Running::start(&t, &group, &topic, handler.clone(), 2);
    wait_lag(&t, &group, &topic, 0).await;
    assert_eq!(handler.seen.lock().unwrap().len(), 1, "the event after it");
    let dead = read_all(&t, &dlq_topic(&topic)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].header(headers::DLQ_REASON),
        Some("not_single_object")
    );
    assert_eq!(dead[0].header(headers::DLQ_SOURCE_OFFSET), Some("0"));
    let omitted = dead[0].header(headers::DLQ_PAYLOAD_OMITTED);
    if limit.is_some() {
        assert!(
            dead[0].payload.is_empty(),
            "{} bytes",
            dead[0].payload.len()
        );
        assert_eq!(omitted, Some(size.to_string().as_str()));
    } else {
        assert_eq!(dead[0].payload.len(), size);
        assert_eq!(omitted, None);
    }
    running.stop().await;
}

/// Two tails (broadcast readers) each get every record published after they started, from
/// every partition, each key in publish order, and nothing published before; no group exists
/// afterwards.
async fn tails_get_everything_published_after_they_start(t: TestBus) {
    let topic = t.fresh_topic(3).await;
    let keys: Vec<String> = (0..6).map(|i| format!("key-{i}")).collect();
    for k in &keys {
        t.bus
            .publish(&topic, seq_record(k, 999))
            .await
            .expect("publish");
    }
    let mut a = t.bus.tail(&topic).await.expect("tail a");
    let mut b = t.bus.tail(&topic).await.expect("tail b");
    const PER_KEY: u64 = 10;
    for seq in 0..PER_KEY {
        for k in &keys {
            t.bus
                .publish(&topic, seq_record(k, seq))
                .await
                .expect("publish");
        }
    }
    let total = keys.len() * PER_KEY as usize;
    for (name, sub) in [("a", &mut a), ("b", &mut b)] {
        let got = take(sub, total, WAIT, true).await;
        let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut partitions = HashSet::new();
        for m in &got {
            let (k, seq) = parse_seq(m);
            partitions.insert(m.partition);
            per_key.entry(k).or_default().push(seq);
        }
        for k in &keys {
            assert_eq!(
                per_key.get(k),
                Some(&(0..PER_KEY).collect::<Vec<_>>()),
                "tail {name}: key {k} complete, in order, nothing from before the tail"
            );
        }
        assert!(
            partitions.len() > 1,
            "tail {name} reads every partition: {partitions:?}"
        );
        assert!(
            next_within(sub, Duration::from_millis(500)).await.is_none(),
            "tail {name}: nothing more"
        );
    }
    a.close().await.expect("close a");
    b.close().await.expect("close b");
}

/// A broadcast consumer skips what it cannot decode (no dead-letter topic is written: there is
/// no group to replay it for), handles the rest and reports its lag back to 0.
async fn broadcast_consumer_skips_bad_payloads(t: TestBus) {
    nexus::telemetry::init_metrics();
    let topic = t.fresh_topic(2).await;
    let group = format!("edge-{topic}");
    let handler = Arc::new(Counting {
        seen: Mutex::default(),
    });
    let stop = CancellationToken::new();
    let consumer = Consumer::new(t.bus.clone(), &group, &topic, consumer_options(2)).broadcast();
    let task = tokio::spawn(consumer.run(handler.clone(), stop.clone()));
    // The tail starts when the runtime runs: publish until it has seen a first event.
    let deadline = Instant::now() + WAIT;
    while handler.seen.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the broadcast consumer never started"
        );
        t.bus
            .publish(&topic, common::event_record("warm-up", 0))
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = handler.seen.lock().unwrap().len();
    t.bus
        .publish(&topic, OutRecord::new("k", b"not avro at all".to_vec()))
        .await
        .expect("publish");
    for seq in 1..=5 {
        t.bus
            .publish(&topic, common::event_record("k", seq))
            .await
            .expect("publish");
    }
    let deadline = Instant::now() + WAIT;
    while handler.seen.lock().unwrap().len() < before + 5 {
        assert!(
            Instant::now() < deadline,
            "events after a bad one are handled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gauge_sum = || {
        nexus::telemetry::init_metrics()
            .render()
            .lines()
            .filter(|l| l.starts_with("nexus_consumer_lag{") && l.contains(&group))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .collect::<Vec<f64>>()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let lags = gauge_sum();
        if lags.len() == 2 && lags.iter().all(|l| *l == 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "broadcast lag per partition: {lags:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.expect("join").expect("consumer");
    let dlq = t
        .bus
        .partition_offsets(&dlq_topic(&topic))
        .await
        .expect("dlq offsets");
    assert!(
        dlq.iter().all(|p| p.high == 0),
        "nothing dead-lettered: {dlq:?}"
    );
    let skipped = nexus::telemetry::init_metrics()
        .render()
        .lines()
        .find(|l| {
            l.starts_with("nexus_events_consumed_total")
                && l.contains(&group)
                && l.contains("outcome=\"skipped\"")
        })
        .map(str::to_string);
    assert!(
        skipped.as_deref().is_some_and(|l| l.ends_with(" 1")),
        "one skipped event counted: {skipped:?}"
    );
}

/// Replay by offset and by time: positions and counts are right and the group re-reads them.
async fn replay_by_offset_and_time(t: TestBus) {
    let topic = t.fresh_topic(2).await;
    let group = format!("g-{topic}");
    for n in 0..6 {
        t.bus
            .publish(&topic, seq_record(&format!("early{n}"), n))
            .await
            .expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in 0..4 {
        t.bus
            .publish(&topic, seq_record(&format!("late{n}"), n))
            .await
            .expect("publish");
    }
    consume_and_leave(&t, &group, &topic, 10).await;
    wait_lag(&t, &group, &topic, 0).await;

    // By time: only the late records lie after the cut.
    let mut by_time = 0;
    for p in t.bus.partition_offsets(&topic).await.expect("offsets") {
        let target = t
            .bus
            .offset_for_time(&topic, p.partition, cut)
            .await
            .expect("offset for time");
        by_time += t
            .bus
            .count_between(&topic, p.partition, target, p.high)
            .await
            .expect("count");
    }
    assert_eq!(by_time, 4);

    // By offset: back to the start of every partition, the group reads all ten again.
    for p in t.bus.partition_offsets(&topic).await.expect("offsets") {
        t.bus
            .seek_group(&group, &topic, p.partition, p.low)
            .await
            .expect("seek");
    }
    let lag: u64 = t
        .bus
        .group_positions(&group, &topic)
        .await
        .expect("positions")
        .iter()
        .map(|p| p.lag)
        .sum();
    assert_eq!(lag, 10);
    let mut sub = t
        .bus
        .subscribe(&group, &topic, opts())
        .await
        .expect("subscribe");
    let again = take(&mut sub, 10, WAIT, true).await;
    let keys: HashSet<String> = again.iter().map(|m| m.key.clone()).collect();
    assert_eq!(keys.len(), 10);
    sub.close().await.expect("close");
}

/// Lag is the number of records behind the log end, per partition, before and after consuming.
async fn lag_figures_are_correct(t: TestBus) {
    nexus::telemetry::init_metrics();
    let topic = t.fresh_topic(2).await;
    let group = format!("g-{topic}");
    // One record per request: some brokers misreport the log end after a batched produce.
    let mut per_partition: BTreeMap<u32, u64> = BTreeMap::new();
    for n in 0..10 {
        let p = t
            .bus
            .publish(&topic, seq_record(&format!("k{n}"), n))
            .await
            .expect("publish");
        *per_partition.entry(p.partition).or_default() += 1;
    }
    let positions = t
        .bus
        .group_positions(&group, &topic)
        .await
        .expect("positions");
    for p in &positions {
        assert_eq!(
            p.lag,
            per_partition.get(&p.partition).copied().unwrap_or(0),
            "partition {}",
            p.partition
        );
    }
    let mut sub = t
        .bus
        .subscribe(&group, &topic, opts())
        .await
        .expect("subscribe");
    take(&mut sub, 4, WAIT, true).await;
    sub.close().await.expect("close");
    wait_lag(&t, &group, &topic, 6).await;

    // The exported gauge follows, also with no consumer running.
    let stop = CancellationToken::new();
    let reporter = tokio::spawn(nexus::bus::consumer::report_lag(
        t.bus.clone(),
        group.clone(),
        topic.clone(),
        Duration::from_millis(100),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    reporter.await.expect("reporter");
    let rendered = nexus::telemetry::init_metrics().render();
    let sum: f64 = rendered
        .lines()
        .filter(|l| l.starts_with("nexus_consumer_lag{") && l.contains(&topic))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(sum, 6.0, "exported lag:\n{rendered}");
}

/// An idempotent effect: per conversation, the set of event ids applied.
struct Idempotent {
    calls: std::sync::atomic::AtomicU64,
    state: Mutex<BTreeMap<String, std::collections::BTreeSet<String>>>,
}

#[async_trait]
impl Handler for Idempotent {
    async fn handle(&self, event: &Event, _m: &Message) -> Result<(), HandleError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let e = &event.envelope;
        self.state
            .lock()
            .unwrap()
            .entry(e.conversation_id.clone())
            .or_default()
            .insert(e.event_id.to_string());
        Ok(())
    }
}

/// `nexus replay`: the dry run counts what will be reprocessed, execution refuses while the
/// group is live, and reprocessing everything leaves the idempotent end state unchanged.
async fn replay_changes_no_end_state(t: TestBus) {
    let topic = t.fresh_topic(3).await;
    let group = format!("g-{topic}");
    for n in 0..40u64 {
        t.bus
            .publish(
                &topic,
                common::event_record(&format!("conv-{}", n % 8), n / 8),
            )
            .await
            .expect("publish");
    }
    let handler = Arc::new(Idempotent {
        calls: Default::default(),
        state: Mutex::default(),
    });
    let running = Running::start(&t, &group, &topic, handler.clone(), 4);
    wait_lag(&t, &group, &topic, 0).await;
    let before = handler.state.lock().unwrap().clone();
    assert_eq!(before.values().map(|s| s.len()).sum::<usize>(), 40);

    let request = nexus::replay::ReplayRequest {
        topic: topic.clone(),
        group: group.clone(),
        from: nexus::replay::ReplayFrom::Offset(0),
        to_time: None,
        partition: None,
    };
    let dry = nexus::replay::plan(t.bus.as_ref(), &request)
        .await
        .expect("dry run");
    assert_eq!(dry.total_reprocess(), 40, "{dry}");
    t.wait_members(&group, &topic, 1).await;
    assert!(
        nexus::replay::execute(t.bus.as_ref(), &request, false)
            .await
            .is_err(),
        "a live group must not be moved"
    );
    running.stop().await;
    t.wait_members(&group, &topic, 0).await;

    let executed = nexus::replay::execute(t.bus.as_ref(), &request, false)
        .await
        .expect("execute");
    assert_eq!(executed.total_reprocess(), 40);
    wait_lag(&t, &group, &topic, 40).await;
    let running = Running::start(&t, &group, &topic, handler.clone(), 4);
    wait_lag(&t, &group, &topic, 0).await;
    running.stop().await;
    assert_eq!(
        handler.calls.load(std::sync::atomic::Ordering::SeqCst),
        80,
        "every event was handled again"
    );
    assert_eq!(
        *handler.state.lock().unwrap(),
        before,
        "the end state is unchanged"
    );
}

/// A key that lands in `partition` of a topic of `partitions`.
fn key_in(partition: u32, partitions: u32, tag: &str) -> String {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .find(|k| partition_for(k, partitions) == partition)
        .unwrap_or_default()
}

/// Deletes records of a topic by offset where the backend can (JetStream; Kafka and the
/// embedded log only drop a log's start, by retention), and returns the offsets deleted.
async fn delete_records(t: &TestBus, topic: &str, offsets: &[u64]) -> Vec<u64> {
    if t.backend != "jetstream" {
        return Vec::new();
    }
    let client = async_nats::connect(t.config.url.as_str())
        .await
        .expect("connect to NATS");
    // `fresh_topic` names have no `.`, so the stream has the topic's name.
    let stream = async_nats::jetstream::new(client)
        .get_stream(topic)
        .await
        .expect("the topic's stream");
    for offset in offsets {
        // Offsets are stream sequences minus one.
        stream.delete_message(offset + 1).await.expect("delete");
    }
    offsets.to_vec()
}

/// A ranged read over a partition whose offsets have gaps (on JetStream the partitions share
/// one sequence, and deleted records leave holes, at the start of the range too): from any
/// offset, a read returns the next records in order, as many as asked for unless the log end
/// comes first (a read from an offset without a record starts at the next record); reads that
/// go on from the last record + 1 take each record once; `count_between` counts what is read;
/// a read from the log end is empty.
async fn a_range_read_crosses_gaps(t: TestBus) {
    let topic = t.fresh_topic(2).await;
    let (k0, k1) = (key_in(0, 2, "g"), key_in(1, 2, "g"));
    let mut mine = Vec::new();
    for n in 0..12u64 {
        let at = t
            .bus
            .publish(&topic, seq_record(&k0, n))
            .await
            .expect("publish");
        mine.push(at.offset);
        // Partition 1's records between partition 0's: apart by 0, 1 or 2 sequences.
        for _ in 0..n % 3 {
            t.bus
                .publish(&topic, seq_record(&k1, n))
                .await
                .expect("publish");
        }
    }
    let deleted = delete_records(&t, &topic, &[mine[0], mine[1], mine[5], mine[6]]).await;
    let kept: Vec<u64> = mine
        .iter()
        .copied()
        .filter(|o| !deleted.contains(o))
        .collect();
    let offsets = t.bus.partition_offsets(&topic).await.expect("offsets");
    let high = offsets[0].high;
    let offsets_of = |ms: &[Message]| ms.iter().map(|m| m.offset).collect::<Vec<_>>();

    let all = t.bus.read(&topic, 0, 0, 100).await.expect("read all");
    assert_eq!(offsets_of(&all), kept, "{}", t.backend);
    assert_eq!(
        t.bus
            .count_between(&topic, 0, 0, high)
            .await
            .expect("count"),
        kept.len() as u64
    );
    for from in 0..=high {
        let want: Vec<u64> = kept
            .iter()
            .copied()
            .filter(|o| *o >= from)
            .take(2)
            .collect();
        let read = t.bus.read(&topic, 0, from, 2).await.expect("read");
        assert_eq!(offsets_of(&read), want, "{}: from {from}", t.backend);
    }
    // Reads of 3 from the last record read + 1: 3 each until the last.
    let (mut at, mut taken) = (0, Vec::new());
    loop {
        let batch = t.bus.read(&topic, 0, at, 3).await.expect("read");
        let Some(last) = batch.last() else { break };
        assert_eq!(
            batch.len(),
            3.min(kept.len() - taken.len()),
            "{}",
            t.backend
        );
        at = last.offset + 1;
        taken.extend(offsets_of(&batch));
    }
    assert_eq!(taken, kept, "{}", t.backend);
    assert!(t
        .bus
        .read(&topic, 0, high, 10)
        .await
        .expect("read at the end")
        .is_empty());
}

/// A read whose first fetch from the broker comes back empty while records are pending gets
/// them all the same, and fetches that keep coming back empty are `ReadIncomplete` naming what
/// was pending, not an empty answer that would read as the end. On JetStream a proxy answers
/// the read's pull requests with `404 No Messages` itself (the server's answer when it has
/// nothing to give; it never sees them, so no record is taken or lost). Kafka and the embedded
/// log have no such fetch to intercept (librdkafka's first poll commonly comes back empty: the
/// read polls until its position reaches the log end), so there the read is only checked whole.
async fn a_read_whose_first_fetch_comes_back_empty(t: TestBus) {
    let topic = t.fresh_topic(1).await;
    for n in 0..5 {
        t.bus
            .publish(&topic, seq_record("k", n))
            .await
            .expect("publish");
    }
    let proxy = match t.backend {
        "jetstream" => EmptyFetches::start(&t.config.url, &topic).await,
        _ => None,
    };
    let reader: Arc<dyn Bus> = match &proxy {
        Some(proxy) => nexus::bus::connect(&nexus::config::BusConfig {
            url: proxy.url.clone(),
            ..t.config.clone()
        })
        .await
        .expect("connect through the proxy"),
        None => t.bus.clone(),
    };
    if let Some(proxy) = &proxy {
        proxy.answer_empty(1);
    }
    let read = reader.read(&topic, 0, 0, 5).await.expect("read");
    assert_eq!(
        read.iter().map(|m| parse_seq(m).1).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4],
        "{}",
        t.backend
    );
    // A lookup by time meets the same: one empty fetch is tried again, and fetches that keep
    // coming back empty are an error, never the log end (a replay would move a group past its
    // backlog, a copy would skip the partition).
    let at = read[2].timestamp_ms;
    let first_at = read
        .iter()
        .find(|m| m.timestamp_ms >= at)
        .map(|m| m.offset)
        .expect("record 2 is at or after its own time");
    if let Some(proxy) = &proxy {
        proxy.answer_empty(1);
    }
    assert_eq!(
        reader
            .offset_for_time(&topic, 0, at)
            .await
            .expect("offset for time"),
        first_at,
        "{}",
        t.backend
    );
    let Some(proxy) = proxy else { return };
    assert_eq!(
        proxy.answered(),
        2,
        "one read and one lookup came back empty"
    );
    proxy.answer_empty(usize::MAX);
    let err = reader
        .offset_for_time(&topic, 0, at)
        .await
        .expect_err("nothing can be fetched");
    assert!(
        matches!(err, BusError::Unavailable(_)) && err.to_string().contains("came back empty"),
        "{err}"
    );
    proxy.answer_empty(0);

    proxy.answer_empty(usize::MAX);
    let err = reader
        .read(&topic, 0, read[1].offset, 5)
        .await
        .expect_err("nothing can be fetched");
    let BusError::ReadIncomplete {
        partition,
        offset,
        pending,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(
        (*partition, *offset, *pending),
        (0, read[1].offset, 4),
        "{err}"
    );
}

/// A loopback proxy in front of a NATS server that answers pull requests for one stream's
/// consumers itself, with `404 No Messages`, while armed ([`EmptyFetches::answer_empty`]);
/// everything else passes. Stops when dropped.
struct EmptyFetches {
    url: String,
    /// Pull requests still to answer empty.
    left: Arc<AtomicUsize>,
    /// Pull requests answered empty so far.
    answered: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl EmptyFetches {
    /// `None` (with a note) unless `url` is one plain `nats://` server: the proxy reads the
    /// protocol.
    async fn start(url: &str, topic: &str) -> Option<Self> {
        let Some(server) = url.strip_prefix("nats://").filter(|s| !s.contains(',')) else {
            eprintln!("{url}: the empty-fetch proxy needs one plain nats:// server; not run");
            return None;
        };
        let server = server.to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let url = format!("nats://{}", listener.local_addr().expect("proxy address"));
        // `fresh_topic` names have no `.`, so the stream has the topic's name.
        let pulls = format!("$JS.API.CONSUMER.MSG.NEXT.{topic}.");
        let (left, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counters = (left.clone(), answered.clone());
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: the relays end with the proxy.
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(upstream) = tokio::net::TcpStream::connect(&server).await {
                    let (pulls, counters) = (pulls.clone(), counters.clone());
                    relays.spawn(empty_fetch_relay(client, upstream, pulls, counters));
                }
            }
        });
        Some(EmptyFetches {
            url,
            left,
            answered,
            task,
        })
    }

    /// Answers the next `n` pull requests empty.
    fn answer_empty(&self, n: usize) {
        self.left.store(n, Ordering::SeqCst);
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

impl Drop for EmptyFetches {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The length of the first whole protocol operation in `buf` and its words; `None` while
/// incomplete. `MSG`, `HMSG`, `PUB` and `HPUB` carry a payload whose size is their last word.
fn nats_op(buf: &[u8]) -> Option<(usize, Vec<String>)> {
    let eol = buf.windows(2).position(|w| w == b"\r\n")?;
    let words: Vec<String> = String::from_utf8_lossy(&buf[..eol])
        .split_ascii_whitespace()
        .map(str::to_string)
        .collect();
    let op = words
        .first()
        .map(|w| w.to_ascii_uppercase())
        .unwrap_or_default();
    let mut len = eol + 2;
    if ["MSG", "HMSG", "PUB", "HPUB"].contains(&op.as_str()) {
        let size: usize = words.last().and_then(|w| w.parse().ok()).expect("size");
        len += size + 2;
    }
    (buf.len() >= len).then_some((len, words))
}

/// Relays one connection; pull requests for the stream's consumers, while some are left to
/// answer, are answered on the client's inbox subscription instead of passed on. Each
/// direction writes whole operations only, so an answer never lands inside a server message.
async fn empty_fetch_relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    pulls: String,
    (left, answered): (Arc<AtomicUsize>, Arc<AtomicUsize>),
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let client_tx = Arc::new(tokio::sync::Mutex::new(client_tx));
    let to_client = client_tx.clone();
    let upstream = async move {
        let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
        let mut sids: HashMap<String, String> = HashMap::new();
        loop {
            match client_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            let mut out = Vec::new();
            while let Some((len, words)) = nats_op(&buf) {
                let op = words.first().map(|w| w.to_ascii_uppercase());
                if let (Some("SUB"), [_, subject, .., sid]) = (op.as_deref(), words.as_slice()) {
                    sids.insert(subject.clone(), sid.clone());
                }
                // PUB <subject> <reply> <size>: a pull request, answered on the reply's
                // subscription.
                let answer_to = match (op.as_deref(), words.as_slice()) {
                    (Some("PUB"), [_, subject, reply, _]) if subject.starts_with(&pulls) => {
                        sids.get(reply).map(|sid| (reply.clone(), sid.clone()))
                    }
                    _ => None,
                };
                let take = answer_to.filter(|_| {
                    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                });
                match take {
                    Some((reply, sid)) => {
                        let head = "NATS/1.0 404 No Messages\r\n\r\n";
                        let n = head.len();
                        let answer = format!("HMSG {reply} {sid} {n} {n}\r\n{head}\r\n");
                        answered.fetch_add(1, Ordering::SeqCst);
                        if to_client
                            .lock()
                            .await
                            .write_all(answer.as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    None => out.extend_from_slice(&buf[..len]),
                }
                buf.drain(..len);
            }
            if server_tx.write_all(&out).await.is_err() {
                return;
            }
        }
    };
    let downstream = async move {
        let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
        loop {
            match server_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            let mut whole = 0;
            while let Some((len, _)) = nats_op(&buf[whole..]) {
                whole += len;
            }
            if client_tx
                .lock()
                .await
                .write_all(&buf[..whole])
                .await
                .is_err()
            {
                return;
            }
            buf.drain(..whole);
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

/// Joins the group, acks `n` records, and leaves cleanly (everything acked committed).
async fn consume_and_leave(t: &TestBus, group: &str, topic: &str, n: usize) {
    let mut sub = t
        .bus
        .subscribe(group, topic, opts())
        .await
        .expect("subscribe");
    take(&mut sub, n, WAIT, true).await;
    sub.close().await.expect("close");
}

async fn wait_lag(t: &TestBus, group: &str, topic: &str, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let lag: u64 = t
            .bus
            .group_positions(group, topic)
            .await
            .expect("positions")
            .iter()
            .map(|p| p.lag)
            .sum();
        if lag == want {
            return;
        }
        assert!(Instant::now() < deadline, "lag stays {lag}, want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

per_backend!(
    keyed_order_with_two_members,
    redelivery_after_member_dies,
    acked_records_are_not_redelivered,
    slow_handler_does_not_stall_other_keys,
    shutdown_behind_a_full_lane_leaves_a_suffix,
    bad_payloads_are_dead_lettered,
    replay_by_offset_and_time,
    lag_figures_are_correct,
    replay_changes_no_end_state,
    tails_get_everything_published_after_they_start,
    broadcast_consumer_skips_bad_payloads,
    a_handler_panic_dead_letters_the_event,
    an_oversized_dead_letter_copy_goes_without_its_payload,
    a_range_read_crosses_gaps,
    a_read_whose_first_fetch_comes_back_empty,
);
