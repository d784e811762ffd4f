//! Shared test harness: a bus of each backend with test-sized timeouts, fresh topics, and
//! helpers to drain subscriptions. Addresses come from env with loopback defaults
//! (`scripts/services.sh env` prints them).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus::bus::{self, Bus, Delivery, Subscription, TopicSpec};
use nexus::config::{BusConfig, Config};

pub mod chat;
pub mod edge;
pub mod faulty;
pub mod fixtures;
pub mod gws;
pub mod ingest;
pub mod inproc;
pub mod process;
pub mod sink;
pub mod ucs;
pub mod webhooks;
pub mod ws;

/// A bus plus whatever must live as long as it (the embedded bus's directory).
pub struct TestBus {
    pub bus: Arc<dyn Bus>,
    pub config: BusConfig,
    pub dir: Option<tempfile::TempDir>,
    pub backend: &'static str,
}

/// Test-sized bus settings for a backend: short group timeouts so death and handover are
/// seen in seconds.
pub fn bus_config(backend: &str, dir: Option<&std::path::Path>) -> BusConfig {
    let mut c = Config::defaults().bus;
    c.kafka.session_timeout_ms = 6000;
    c.nats.ack_wait_ms = 1500;
    c.nats.lease_ttl_ms = 2500;
    c.url = match backend {
        "embedded" => format!(
            "embedded://{}",
            dir.expect("embedded needs a dir").display()
        ),
        "kafka" => format!(
            "kafka://{}",
            std::env::var("NEXUS_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
        ),
        "jetstream" => {
            std::env::var("NEXUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:14222".into())
        }
        other => panic!("unknown backend {other}"),
    };
    c
}

/// Whether a test for `backend` should run: all run unless `NEXUS_TEST_BUS` names another.
pub fn selected(backend: &str) -> bool {
    match std::env::var("NEXUS_TEST_BUS") {
        Ok(only) if !only.is_empty() && only != backend => {
            eprintln!("NEXUS_TEST_BUS={only}: not running the {backend} case");
            false
        }
        _ => true,
    }
}

pub async fn test_bus(backend: &'static str) -> TestBus {
    let dir = (backend == "embedded").then(|| tempfile::tempdir().expect("tempdir"));
    let config = bus_config(backend, dir.as_ref().map(|d| d.path()));
    let bus = bus::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the {backend} bus ({}): {e}", config.url));
    TestBus {
        bus,
        config,
        dir,
        backend,
    }
}

impl TestBus {
    /// A new topic with a unique name, and its dead-letter topic.
    pub async fn fresh_topic(&self, partitions: u32) -> String {
        let name = format!("t{}", uuid::Uuid::new_v4().simple());
        for n in [name.clone(), bus::dlq_topic(&name)] {
            self.bus
                .apply_topic(&TopicSpec {
                    name: n,
                    partitions,
                    retention: None,
                })
                .await
                .expect("create topic");
        }
        name
    }

    /// How long a group takes to notice a member that died (plus margin).
    pub fn failover_time(&self) -> Duration {
        match self.backend {
            "kafka" => Duration::from_millis(self.config.kafka.session_timeout_ms * 3),
            "jetstream" => Duration::from_millis(self.config.nats.lease_ttl_ms * 4),
            _ => Duration::from_secs(5),
        }
    }

    /// Time for a group to settle after members joined.
    pub fn settle_time(&self) -> Duration {
        match self.backend {
            "kafka" => Duration::from_secs(4),
            "jetstream" => Duration::from_millis(self.config.nats.lease_ttl_ms),
            _ => Duration::from_millis(100),
        }
    }

    /// Waits until the group has `n` live members.
    pub async fn wait_members(&self, group: &str, topic: &str, n: usize) {
        let deadline = Instant::now() + self.failover_time() * 2;
        loop {
            let have = self.bus.active_members(group, topic).await.unwrap_or(0);
            if have == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "group {group} has {have} members, want {n}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Every record of `topic` still kept, partition by partition, each in offset order.
pub async fn read_topic(bus: &dyn Bus, topic: &str) -> Vec<bus::Message> {
    let mut all = Vec::new();
    for p in bus.partition_offsets(topic).await.expect("offsets") {
        let mut from = p.low;
        loop {
            let got = bus.read(topic, p.partition, from, 100).await.expect("read");
            let Some(last) = got.last() else { break };
            from = last.offset + 1;
            all.extend(got);
        }
    }
    all
}

/// The next delivery within `within`, or `None`.
pub async fn next_within(sub: &mut Box<dyn Subscription>, within: Duration) -> Option<Delivery> {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        Ok(Some(Err(e))) => panic!("subscription error: {e}"),
        Ok(None) | Err(_) => None,
    }
}

/// Receives `n` deliveries (panics after `within`), acking each if `ack`.
pub async fn take(
    sub: &mut Box<dyn Subscription>,
    n: usize,
    within: Duration,
    ack: bool,
) -> Vec<nexus::bus::Message> {
    let deadline = Instant::now() + within;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = next_within(sub, left)
            .await
            .unwrap_or_else(|| panic!("received {} of {n} records in {within:?}", out.len()));
        out.push(d.message.clone());
        if ack {
            d.ack().await.expect("ack");
        }
    }
    out
}

/// Generates one `#[tokio::test]` per backend from an `async fn(TestBus)` case.
#[macro_export]
macro_rules! per_backend {
    ($($case:ident),* $(,)?) => {
        mod embedded { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $case() { if $crate::common::selected("embedded") { super::$case($crate::common::test_bus("embedded").await).await } } )* }
        mod jetstream { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $case() { if $crate::common::selected("jetstream") { super::$case($crate::common::test_bus("jetstream").await).await } } )* }
        mod kafka { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $case() { if $crate::common::selected("kafka") { super::$case($crate::common::test_bus("kafka").await).await } } )* }
    };
}

/// A valid `MessageReceived` event of conversation `key` carrying `seq` in its text.
pub fn event(key: &str, seq: u64) -> nexus::events::Event {
    let body = serde_json::json!({
        "message_id": uuid::Uuid::now_v7().to_string(),
        "channel": "WEB_CHAT",
        "participant_id": "customer-1",
        "participant_kind": "CUSTOMER",
        "kind": "TEXT",
        "text": format!("{key}:{seq}"),
    });
    let serde_json::Value::Object(body) = body else {
        unreachable!("literal object")
    };
    nexus::events::Event::new("MessageReceived", "tenant-test", key, "test", body)
}

/// [`event`] encoded as a record keyed by its conversation.
pub fn event_record(key: &str, seq: u64) -> nexus::bus::OutRecord {
    let payload = nexus::events::encode(&event(key, seq)).expect("encode test event");
    nexus::bus::OutRecord::new(key, payload)
}
