//! SIGKILL of a worker process mid-stream, then a restart: nothing is lost, no effect is
//! applied twice (the sink applies one effect per event id; redeliveries are counted and
//! bounded by what was in flight), and each conversation's events arrive in order.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::process::{run, Nexus, LISTEN_ANY};
use common::sink::Sink;

const EVENTS: u64 = 1500;
const CONVERSATIONS: u64 = 30;

async fn kill_mid_stream(backend: &'static str) {
    if !common::selected(backend) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let bus_config = common::bus_config(backend, None);
    let topic = format!("t{}", uuid::Uuid::new_v4().simple());
    let topology = dir.path().join("topology.yaml");
    std::fs::write(
        &topology,
        format!(
            "topics:\n  - name: {topic}\n    partitions: 4\n    retention: 1d\n    dlq: true\n    events: [MessageReceived]\nroles:\n  - name: tap\n    group: g-{topic}\n    topics: [{topic}]\n    concurrency: 8\n"
        ),
    )
    .expect("topology");
    let sink = Sink::start().await;
    let env = vec![
        ("NEXUS_BUS__URL", bus_config.url.clone()),
        (
            "NEXUS_BUS__KAFKA__SESSION_TIMEOUT_MS",
            bus_config.kafka.session_timeout_ms.to_string(),
        ),
        (
            "NEXUS_BUS__NATS__ACK_WAIT_MS",
            bus_config.nats.ack_wait_ms.to_string(),
        ),
        (
            "NEXUS_BUS__NATS__LEASE_TTL_MS",
            bus_config.nats.lease_ttl_ms.to_string(),
        ),
        ("NEXUS_TOPOLOGY__FILE", topology.display().to_string()),
        ("NEXUS_WORKERS__TAP__URL", sink.url()),
        // Within JetStream's hand-over wait (twice the ack wait, at least 10 s).
        ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "10000".to_string()),
    ];
    let (ok, out, err) = run(&["topology", "apply"], &env);
    assert!(ok, "{out}{err}");
    let (ok, again, err) = run(&["topology", "apply"], &env);
    assert!(
        ok && again.contains("Applied: 0 created, 0 updated"),
        "second apply changes nothing:\n{again}{err}"
    );

    let with_port = |mut env: Vec<(&'static str, String)>| {
        env.push(("NEXUS_HTTP__LISTEN", LISTEN_ANY.to_string()));
        env
    };
    let mut first = Nexus::start(
        dir.path(),
        "worker-1",
        &["worker", "tap"],
        &with_port(env.clone()),
    );

    let t = common::test_bus(backend).await;
    let publisher = tokio::spawn({
        let bus = t.bus.clone();
        let topic = topic.clone();
        async move {
            for n in 0..EVENTS {
                let key = format!("conv-{}", n % CONVERSATIONS);
                bus.publish(&topic, common::event_record(&key, n / CONVERSATIONS))
                    .await
                    .expect("publish");
            }
        }
    });

    // Kill the worker once a third has been applied: some events are in flight, unacked.
    let deadline = Instant::now() + Duration::from_secs(120);
    while sink.distinct() < (EVENTS / 3) as usize {
        if let Ok(Some(status)) = first.child.try_wait() {
            panic!("worker exited early ({status}):\n{}", first.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "worker too slow: {} applied\n{}",
            sink.distinct(),
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reap");
    let at_kill = sink.distinct();
    publisher.await.expect("publisher");

    let second = Nexus::start(
        dir.path(),
        "worker-2",
        &["worker", "tap"],
        &with_port(env.clone()),
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    while sink.distinct() < EVENTS as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {EVENTS} arrived after restart\n{}",
            sink.distinct(),
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let state = sink.state.lock().unwrap();
    assert_eq!(
        state.effects.len(),
        EVENTS as usize,
        "every event applied exactly once"
    );
    let redelivered: u32 = state.deliveries.values().map(|n| n - 1).sum();
    // Only what was in flight at the kill may come again (lanes × queue depth bound it).
    assert!(
        redelivered <= 1024,
        "{redelivered} redeliveries after killing at {at_kill}"
    );
    // Per conversation, effects were applied in publish order.
    let mut last: HashMap<String, u64> = HashMap::new();
    for effect in &state.effects {
        let text = effect["body"]["text"].as_str().expect("text");
        let (key, seq) = text.rsplit_once(':').expect("key:seq");
        let seq: u64 = seq.parse().expect("seq");
        let prev = last.insert(key.to_string(), seq);
        assert_eq!(
            prev.map_or(0, |p| p + 1),
            seq,
            "conversation {key} out of order"
        );
    }
    eprintln!("{backend}: killed at {at_kill} applied, {redelivered} redeliveries absorbed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_worker_survives_sigkill() {
    kill_mid_stream("jetstream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_worker_survives_sigkill() {
    kill_mid_stream("kafka").await;
}
