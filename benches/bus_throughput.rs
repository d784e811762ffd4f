//! Bus throughput, side by side in one run on the same brokers: produce + consume of N
//! 300-byte keyed events with the plain client (rdkafka, async-nats with the key in a header, a
//! sequential file; bytes encoded beforehand) against the nexus `Bus` with Avro encode (timed)
//! and decode and ack-after-effect through the consumer runtime. Both sides' records carry the
//! two headers every nexus publish sets (event type, trace context).
//! Prints events/s for each phase (produce until every ack; consume from the first record to
//! the last, so the one-off group join is left out) and the ratio nexus/raw. Each side's topics
//! are deleted after it ran, so both start on a broker holding the same data. The embedded log is
//! also set beside fjall used directly, the store it is built on. `make bench`.
//!
//! Env: NEXUS_BENCH_EVENTS (default 100000), NEXUS_BENCH_BACKENDS (default
//! `embedded,jetstream,kafka`), NEXUS_TEST_KAFKA_BROKERS, NEXUS_TEST_NATS_URL.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{stream, StreamExt};
use nexus::bus::consumer::{Consumer, ConsumerOptions, HandleError, Handler};
use nexus::bus::headers;
use nexus::bus::{Bus, Message, StartFrom, TopicSpec};
use nexus::config::Config;
use nexus::events::{encode, publish::publish, Event};
use tokio_util::sync::CancellationToken;

mod common;

// The allocator of the `nexus` binary, so the Bus side runs as it does in a pod (both sides
// of the comparison share it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WINDOW: usize = 1000;
const PARTITIONS: u32 = 4;
const BODY_BYTES: usize = 300;

fn events_n() -> u64 {
    std::env::var("NEXUS_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// A raw client's record: the same event, encoded beforehand, with the headers a nexus
/// publish sets (`nexus::events::publish`).
struct RawRecord {
    key: String,
    headers: [(&'static str, String); 2],
    payload: Vec<u8>,
}

impl RawRecord {
    /// The record as the raw baselines store it: key, header names and values, payload, each
    /// prefixed with its length.
    fn write_fields(&self, out: &mut impl Write) {
        let headers = self.headers.iter();
        let fields = std::iter::once(self.key.as_bytes())
            .chain(headers.flat_map(|(name, value)| [name.as_bytes(), value.as_bytes()]))
            .chain(std::iter::once(self.payload.as_slice()));
        for b in fields {
            out.write_all(&(b.len() as u32).to_le_bytes())
                .expect("write");
            out.write_all(b).expect("write");
        }
    }
}

fn payload(i: u64) -> RawRecord {
    let (key, event) = common::bus_event(i);
    RawRecord {
        key,
        headers: [
            (headers::EVENT_TYPE, event.envelope.event_type.clone()),
            (
                headers::TRACEPARENT,
                event.envelope.traceparent.clone().expect("traceparent"),
            ),
        ],
        payload: encode(&event).expect("encode"),
    }
}

struct Count(AtomicU64);

#[async_trait]
impl Handler for Count {
    async fn handle(&self, _e: &Event, _m: &Message) -> Result<(), HandleError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Produce and consume phases; the consume phase starts at the first record handled, so the
/// one-off consumer-group join is not counted (it is broker latency, the same for both).
struct Phases {
    produce: Duration,
    consume: Duration,
    /// Process CPU time (user + system, every thread) spent in the consume phase.
    consume_cpu: Duration,
}

/// CPU time of this process so far, from /proc (Linux); zero elsewhere.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the command; 100 Hz.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

async fn nexus_run(bus: Arc<dyn Bus>, topic: &str, n: u64) -> Phases {
    let topic = topic.to_string();
    for t in [topic.clone(), format!("{topic}.dlq")] {
        bus.apply_topic(&TopicSpec {
            name: t,
            partitions: PARTITIONS,
            retention: None,
        })
        .await
        .expect("topic");
    }
    // Encoding is part of the nexus side's produce time, as in a producer: the events go
    // through the publish every role uses (encode, headers, keyed by conversation).
    let events: Vec<Event> = (0..n).map(|i| common::bus_event(i).1).collect();
    let started = Instant::now();
    stream::iter(events)
        .map(|e| {
            let bus = bus.clone();
            let topic = topic.clone();
            async move { publish(bus.as_ref(), &topic, &e).await.expect("publish") }
        })
        .buffer_unordered(WINDOW)
        .for_each(|_| async {})
        .await;
    let produce = started.elapsed();
    let count = Arc::new(Count(AtomicU64::new(0)));
    let stop = CancellationToken::new();
    let options = ConsumerOptions {
        concurrency: 16,
        max_in_flight: 4096,
        handler_timeout: Duration::from_secs(30),
        retry_initial: Duration::from_millis(10),
        retry_max: Duration::from_millis(100),
        lag_interval: Duration::from_secs(5),
        start: StartFrom::Earliest,
    };
    let consumer = Consumer::new(bus.clone(), &format!("g-{topic}"), &topic, options);
    let run = tokio::spawn(consumer.run(count.clone(), stop.clone()));
    while count.0.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let (first, cpu) = (Instant::now(), cpu_time());
    while count.0.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let consume = first.elapsed();
    let consume_cpu = cpu_time().saturating_sub(cpu);
    stop.cancel();
    run.await.expect("join").expect("consumer");
    Phases {
        produce,
        consume,
        consume_cpu,
    }
}

/// Sequential file append (length-prefixed key, headers and payload, fsync per 1024 records
/// like the embedded log's group commit) and read back.
fn raw_file(n: u64) -> Phases {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raw.log");
    let records: Vec<RawRecord> = (0..n).map(payload).collect();
    let started = Instant::now();
    let file = std::fs::File::create(&path).expect("create");
    let mut w = BufWriter::new(file);
    for (i, r) in records.iter().enumerate() {
        r.write_fields(&mut w);
        if (i + 1) % 1024 == 0 {
            w.flush().expect("flush");
            w.get_ref().sync_data().expect("fsync");
        }
    }
    w.flush().expect("flush");
    w.get_ref().sync_data().expect("fsync");
    let produce = started.elapsed();
    let (started, cpu) = (Instant::now(), cpu_time());
    let mut r = BufReader::new(std::fs::File::open(&path).expect("open"));
    let mut read = 0u64;
    let mut len = [0u8; 4];
    let mut buf = Vec::new();
    // A record is six fields: key, two headers (name, value) and payload.
    let mut fields = 0u64;
    while r.read_exact(&mut len).is_ok() {
        buf.resize(u32::from_le_bytes(len) as usize, 0);
        r.read_exact(&mut buf).expect("read field");
        fields += 1;
        if fields.is_multiple_of(6) {
            read += 1;
        }
    }
    assert_eq!(read, n);
    Phases {
        produce,
        consume: started.elapsed(),
        consume_cpu: cpu_time().saturating_sub(cpu),
    }
}

/// The store the embedded log is built on, used directly: records keyed by partition and offset,
/// 1 024 per fjall batch made durable (the writer's group commit makes one per batch too), then
/// read back with a range scan per partition, counting fields as [`raw_file`] does. What nexus
/// adds on top of fjall, beside what fjall adds on top of a file.
fn raw_fjall(n: u64) -> Phases {
    use fjall::{Database, KeyspaceCreateOptions, PersistMode};
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::builder(dir.path())
        .manual_journal_persist(true)
        .open()
        .expect("fjall");
    let ks = db
        .keyspace("records", KeyspaceCreateOptions::default)
        .expect("keyspace");
    let records: Vec<RawRecord> = (0..n).map(payload).collect();
    let started = Instant::now();
    let mut next = [0u64; PARTITIONS as usize];
    let mut batch = db.batch().durability(Some(PersistMode::SyncData));
    for (i, r) in records.iter().enumerate() {
        let p = nexus::bus::partition_for(&r.key, PARTITIONS);
        let mut key = [0u8; 12];
        key[..4].copy_from_slice(&p.to_be_bytes());
        key[4..].copy_from_slice(&next[p as usize].to_be_bytes());
        next[p as usize] += 1;
        let mut value = Vec::with_capacity(r.payload.len() + 128);
        r.write_fields(&mut value);
        batch.insert(&ks, key, value);
        if (i + 1) % 1024 == 0 {
            batch.commit().expect("commit");
            batch = db.batch().durability(Some(PersistMode::SyncData));
        }
    }
    batch.commit().expect("commit");
    let produce = started.elapsed();
    let (started, cpu) = (Instant::now(), cpu_time());
    let mut read = 0u64;
    // A partition's keys run from its number followed by zeros to the next one's.
    let bound = |p: u32| {
        let mut k = [0u8; 12];
        k[..4].copy_from_slice(&p.to_be_bytes());
        k
    };
    for p in 0..PARTITIONS {
        for kv in ks.range(bound(p)..bound(p + 1)) {
            let (_, v) = kv.into_inner().expect("read");
            let (mut at, mut fields) = (0, 0);
            while at + 4 <= v.len() {
                let len = u32::from_le_bytes(v[at..at + 4].try_into().expect("len")) as usize;
                at += 4 + len;
                fields += 1;
            }
            assert_eq!(fields, 6);
            read += 1;
        }
    }
    assert_eq!(read, n);
    Phases {
        produce,
        consume: started.elapsed(),
        consume_cpu: cpu_time().saturating_sub(cpu),
    }
}

async fn raw_kafka(brokers: &str, topic: &str, n: u64) -> Phases {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
    use rdkafka::ClientConfig;

    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    admin
        .create_topics(
            &[NewTopic::new(
                topic,
                PARTITIONS as i32,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    // The producer settings nexus uses (acks from all replicas, idempotent, 1 ms linger, no
    // Nagle), so the ratio measures nexus and not a setting: with librdkafka's default 5 ms
    // linger, or an idempotent producer's few requests in flight held back by Nagle, the raw
    // side published at a half to a quarter of its speed here.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("socket.nagle.disable", "true")
        .create()
        .expect("producer");
    // As nexus does before its first publish: the producer knows the topic's partitions and
    // leaders, so no timed send meets an unknown topic (an idempotent producer's retries of
    // those stall everything it has in flight).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let known = producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .is_ok_and(|m| {
                m.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error().is_none()
                        && t.partitions().len() == PARTITIONS as usize
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                })
            });
        if known {
            break;
        }
        assert!(Instant::now() < deadline, "topic {topic} not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records: Vec<RawRecord> = (0..n).map(payload).collect();
    let started = Instant::now();
    stream::iter(records.iter().enumerate())
        .map(|(i, r)| {
            let producer = &producer;
            async move {
                let mut h = OwnedHeaders::new_with_capacity(r.headers.len());
                for (key, value) in &r.headers {
                    h = h.insert(Header {
                        key,
                        value: Some(value.as_str()),
                    });
                }
                let rec = FutureRecord::to(topic)
                    .key(&r.key)
                    .payload(&r.payload)
                    .headers(h)
                    .partition((i as u32 % PARTITIONS) as i32);
                producer
                    .send(rec, Duration::from_secs(30))
                    .await
                    .expect("send")
            }
        })
        .buffer_unordered(WINDOW)
        .for_each(|_| async {})
        .await;
    let produce = started.elapsed();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("g-{topic}"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer.recv().await.expect("recv");
    let (first, cpu) = (Instant::now(), cpu_time());
    let mut got = 1u64;
    while got < n {
        consumer.recv().await.expect("recv");
        got += 1;
    }
    consumer
        .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .expect("commit");
    Phases {
        produce,
        consume: first.elapsed(),
        consume_cpu: cpu_time().saturating_sub(cpu),
    }
}

async fn raw_nats(url: &str, name: &str, n: u64) -> Phases {
    use async_nats::jetstream::{self, consumer::pull};
    let client = async_nats::connect(url).await.expect("nats");
    let js = jetstream::new(client);
    let subjects: Vec<String> = (0..PARTITIONS).map(|p| format!("{name}.{p}")).collect();
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.to_string(),
            subjects: subjects.clone(),
            ..Default::default()
        })
        .await
        .expect("stream");
    let records: Vec<RawRecord> = (0..n).map(payload).collect();
    let started = Instant::now();
    stream::iter(records.into_iter().enumerate())
        .map(|(i, r)| {
            let js = js.clone();
            let subject = subjects[i % subjects.len()].clone();
            // NATS has no record key: a keyed record carries it in a header, as the Kafka
            // records carry theirs, so both raw sides move the same data.
            let mut h = async_nats::HeaderMap::new();
            h.insert("key", r.key.as_str());
            for (name, value) in &r.headers {
                h.insert(*name, value.as_str());
            }
            async move {
                js.publish_with_headers(subject, h, r.payload.into())
                    .await
                    .expect("publish")
                    .await
                    .expect("ack")
            }
        })
        .buffer_unordered(WINDOW)
        .for_each(|_| async {})
        .await;
    let produce = started.elapsed();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .expect("messages");
    let m = messages.next().await.expect("message").expect("message ok");
    m.ack().await.expect("ack");
    let (first, cpu) = (Instant::now(), cpu_time());
    let mut got = 1u64;
    while got < n {
        let m = messages.next().await.expect("message").expect("message ok");
        m.ack().await.expect("ack");
        got += 1;
    }
    Phases {
        produce,
        consume: first.elapsed(),
        consume_cpu: cpu_time().saturating_sub(cpu),
    }
}

/// Deletes a phase's topics (with the nexus groups' lease buckets), so every phase starts on a
/// broker holding the same data: Tansu slows as it fills, which would favour whichever side
/// runs first.
async fn drop_topics(backend: &str, brokers: &str, nats: &str, topics: &[String]) {
    match backend {
        "kafka" => {
            use rdkafka::admin::{AdminClient, AdminOptions};
            use rdkafka::client::DefaultClientContext;
            let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .create()
                .expect("admin");
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            admin
                .delete_topics(&names, &AdminOptions::new())
                .await
                .expect("delete topics");
        }
        "jetstream" => {
            let js = async_nats::jetstream::new(async_nats::connect(nats).await.expect("nats"));
            for t in topics {
                let stream = t.replace('.', "_");
                let _ = js.delete_stream(&stream).await;
                let _ = js.delete_key_value(format!("nexus_leases_{stream}")).await;
            }
        }
        _ => {}
    }
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    nexus::memory::disable_transparent_huge_pages();
    let n = events_n();
    let backends =
        std::env::var("NEXUS_BENCH_BACKENDS").unwrap_or_else(|_| "embedded,jetstream,kafka".into());
    let kafka =
        std::env::var("NEXUS_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let nats =
        std::env::var("NEXUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:14222".into());
    println!("bus throughput: {n} events of ~{BODY_BYTES} bytes, {PARTITIONS} partitions, {WINDOW} publishes in flight");
    println!(
        "{:<10} {:>10} {:>10} {:>7} | {:>10} {:>10} {:>7} | {:>10} {:>10} {:>7}",
        "backend",
        "produce",
        "nexus",
        "ratio",
        "consume",
        "nexus",
        "ratio",
        "total",
        "nexus",
        "ratio"
    );
    println!("{:<10} (events/s: raw client, nexus Bus, nexus/raw)", "");
    for backend in backends.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        let mut config = Config::defaults().bus;
        let dir = tempfile::tempdir().expect("tempdir");
        let id = uuid::Uuid::new_v4().simple();
        let (raw_topic, topic) = (format!("rawbench{id}"), format!("bench{id}"));
        let mut store = None;
        let raw = match backend {
            "embedded" => {
                config.url = format!("embedded://{}", dir.path().display());
                store = Some(raw_fjall(n));
                raw_file(n)
            }
            "kafka" => {
                config.url = format!("kafka://{kafka}");
                config.kafka.session_timeout_ms = 6000;
                raw_kafka(&kafka, &raw_topic, n).await
            }
            "jetstream" => {
                config.url = nats.clone();
                raw_nats(&nats, &raw_topic, n).await
            }
            other => panic!("unknown backend {other}"),
        };
        drop_topics(backend, &kafka, &nats, &[raw_topic]).await;
        let bus = nexus::bus::connect(&config).await.expect("connect");
        let ours = nexus_run(bus, &topic, n).await;
        drop_topics(backend, &kafka, &nats, &[format!("{topic}.dlq"), topic]).await;
        let row = |raw: Duration, ours: Duration| {
            let (r, o) = (rate(n, raw), rate(n, ours));
            format!("{r:>10.0} {o:>10.0} {:>6.2}x", o / r)
        };
        println!(
            "{backend:<10} {} | {} | {}",
            row(raw.produce, ours.produce),
            row(raw.consume, ours.consume),
            row(raw.produce + raw.consume, ours.produce + ours.consume)
        );
        if let Some(store) = &store {
            println!(
                "{:<10} {} | {} | {}",
                "  vs fjall",
                row(store.produce, ours.produce),
                row(store.consume, ours.consume),
                row(store.produce + store.consume, ours.produce + ours.consume)
            );
        }
        let per_event = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "{:<10} consume CPU (this process, µs/event): raw {:.2}, nexus {:.2}",
            "",
            per_event(raw.consume_cpu),
            per_event(ours.consume_cpu)
        );
    }
}
