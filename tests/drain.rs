//! SIGTERM under load: the process drains (edge requests finish, sockets get a reconnect close,
//! workers finish and ack their current events and leave the group) and exits by itself within the
//! grace; the next process resumes at the committed offset: every accepted event is handled once,
//! none twice, in order per conversation. On the embedded bus (`nexus dev`, load through the HTTP
//! ingest) and on NATS JetStream (`nexus worker`, load straight on the bus).

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::Value;

use common::chat::{provision_agent, provision_tenant, ws_connect, ws_until, Admin, ADMIN};
use common::process::{run, Nexus, LISTEN_ANY};

/// How long a drained process may take to exit (the pods' grace is 40–60 s; here nothing is slow).
const EXIT_WITHIN: Duration = Duration::from_secs(15);
const CONVERSATIONS: u64 = 12;

/// A receiver that takes a few milliseconds per event, so SIGTERM finds events in flight. Counts
/// deliveries per idempotency key and keeps (partition, offset, text) of each.
#[derive(Clone, Default)]
struct SlowSink {
    state: Arc<Mutex<SinkLog>>,
}

#[derive(Default)]
struct SinkLog {
    deliveries: HashMap<String, u32>,
    /// (partition, offset, "conv:seq") in arrival order, duplicates included.
    arrivals: Vec<(u64, u64, String)>,
}

impl SlowSink {
    async fn start() -> (SlowSink, String) {
        let sink = SlowSink::default();
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(sink.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (sink, url)
    }

    fn distinct(&self) -> usize {
        self.state.lock().unwrap().deliveries.len()
    }
}

async fn receive(
    State(sink): State<SlowSink>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut s = sink.state.lock().unwrap();
    *s.deliveries.entry(key).or_insert(0) += 1;
    s.arrivals.push((
        body["partition"].as_u64().unwrap_or(u64::MAX),
        body["offset"].as_u64().unwrap_or(u64::MAX),
        body["body"]["text"].as_str().unwrap_or("").to_string(),
    ));
    StatusCode::OK
}

fn topology_file(dir: &Path, topic: &str) -> String {
    let path = dir.join("topology.yaml");
    std::fs::write(
        &path,
        format!(
            "topics:\n  - name: {topic}\n    partitions: 4\n    retention: 1d\n    dlq: true\n    events: [MessageReceived]\nroles:\n  - name: tap\n    group: g-{topic}\n    topics: [{topic}]\n    concurrency: 8\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// Waits for the process to exit by itself; its status and how long it took.
async fn wait_exit(nexus: &mut Nexus, within: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = nexus.child.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "still running {within:?} after SIGTERM:\n{}",
            nexus.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for(what: &str, within: Duration, log: impl Fn() -> String, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After both processes: every accepted event handled exactly once (nothing lost, nothing
/// redelivered: the second process started at the first's committed offsets), per partition
/// offsets seen once each, and each conversation in publish order.
fn check_resumed(sink: &SlowSink, accepted: &[String], backend: &str) {
    let s = sink.state.lock().unwrap();
    for id in accepted {
        assert!(s.deliveries.contains_key(id), "{backend}: event {id} lost");
    }
    let twice: Vec<(&String, &u32)> = s.deliveries.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{backend}: {} events handled again after the drain (not resumed at the committed offset): {:?}",
        twice.len(),
        twice.iter().take(5).collect::<Vec<_>>()
    );
    let mut offsets: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    for (partition, offset, text) in &s.arrivals {
        offsets.entry(*partition).or_default().push(*offset);
        let (key, seq) = text.rsplit_once(':').expect("key:seq");
        let seq: u64 = seq.parse().expect("seq");
        if let Some(prev) = last.insert(key.to_string(), seq) {
            assert!(
                seq > prev,
                "{backend}: conversation {key} went back from {prev} to {seq}"
            );
        }
    }
    for (p, list) in offsets {
        let mut sorted = list.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            list.len(),
            "{backend}: partition {p} offsets repeated"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_dev_drains_on_sigterm_and_resumes_at_the_committed_offset() {
    if !common::selected("embedded") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let (sink, sink_url) = SlowSink::start().await;
    let data = dir.path().join("data").display().to_string();
    let mut env = common::chat::base_env(dir.path());
    env.push(("NEXUS_TOPOLOGY__FILE", topology_file(dir.path(), &topic)));
    env.push(("NEXUS_WORKERS__TAP__URL", sink_url));
    let args = ["dev", "--data-dir", data.as_str(), "--listen", LISTEN_ANY];
    let http = reqwest::Client::new();

    let mut first = Nexus::start(dir.path(), "dev-1", &args, &env);
    let url = format!(
        "http://{}",
        first.wait_listening(Duration::from_secs(60)).await
    );
    first
        .wait_ready(&http, &format!("{url}/readyz"), Duration::from_secs(60))
        .await;

    // An agent socket: on SIGTERM it must be closed with the reconnect hint.
    let admin = Admin::new(&url);
    let tenant = provision_tenant(&admin).await;
    let (_, token) = provision_agent(&admin, &tenant, "alice", 1).await;
    let mut agent = ws_connect(&format!("{url}/v1/agent/ws?token={token}")).await;
    ws_until(&mut agent, Duration::from_secs(10), |v| {
        v["type"] == "hello"
    })
    .await;

    // Load: one task per conversation posts its events in order through the ingest API until
    // the edge stops answering. Accepted (202) ids must all be handled; a request that failed
    // without an answer must not have been published (checked at the end).
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let unknown = Arc::new(Mutex::new(0u32));
    let mut load = Vec::new();
    for c in 0..CONVERSATIONS {
        let (http, url, topic) = (http.clone(), url.clone(), topic.clone());
        let (accepted, unknown) = (accepted.clone(), unknown.clone());
        load.push(tokio::spawn(async move {
            let key = format!("conv-{c}");
            for seq in 0u64.. {
                let event = common::event(&key, seq);
                let id = event.envelope.event_id.to_string();
                let r = http
                    .post(format!("{url}/v1/events/{topic}"))
                    .bearer_auth(ADMIN)
                    .json(&event.to_json())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == StatusCode::ACCEPTED => {
                        accepted.lock().unwrap().push(id)
                    }
                    Ok(r) => {
                        // 503 while draining: refused, not accepted; the edge is going away.
                        assert!(
                            r.status().is_server_error(),
                            "ingest answered {}",
                            r.status()
                        );
                        return;
                    }
                    Err(e) => {
                        if !e.is_connect() {
                            *unknown.lock().unwrap() += 1;
                        }
                        return;
                    }
                }
            }
        }));
    }
    wait_for(
        "300 events handled before SIGTERM",
        Duration::from_secs(60),
        || first.log_text(),
        || sink.distinct() >= 300,
    )
    .await;
    first.terminate();

    let close = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = agent.next().await {
            if let Ok(tokio_tungstenite::tungstenite::Message::Close(frame)) = msg {
                return frame;
            }
        }
        None
    })
    .await
    .expect("agent socket closed after SIGTERM")
    .expect("a close frame, not a dropped connection");
    assert_eq!(u16::from(close.code), 1012, "service restart close code");
    assert!(close.reason.contains("reconnect"), "{}", close.reason);

    let (status, took) = wait_exit(&mut first, EXIT_WITHIN).await;
    let log = first.log_text();
    assert!(status.success(), "exit {status} after SIGTERM:\n{log}");
    assert!(log.contains("left consumer group"), "{log}");
    for task in load {
        task.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let unknown = *unknown.lock().unwrap();
    // At most one per connection: the request that met the server's close.
    assert!(
        unknown <= CONVERSATIONS as u32,
        "{unknown} requests failed without an answer"
    );
    let at_stop = sink.distinct();

    let second = Nexus::start(dir.path(), "dev-2", &args, &env);
    wait_for(
        "every accepted event handled after the restart",
        Duration::from_secs(60),
        || second.log_text(),
        || {
            let s = sink.state.lock().unwrap();
            accepted.iter().all(|id| s.deliveries.contains_key(id))
        },
    )
    .await;
    // Anything still to come would be a redelivery: give it a moment to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    check_resumed(&sink, &accepted, "embedded");
    // In-flight requests finished with their answer: no event was published whose request did
    // not get its 202. (A request that fails without one is a keep-alive connection the server
    // closed as the client reused it: never read, so never published.)
    let answered: std::collections::HashSet<&String> = accepted.iter().collect();
    let unanswered = sink
        .state
        .lock()
        .unwrap()
        .deliveries
        .keys()
        .filter(|k| !answered.contains(k))
        .count();
    assert_eq!(
        unanswered, 0,
        "events published by requests that lost their answer"
    );
    eprintln!(
        "embedded: {} accepted, {at_stop} handled before exit ({took:?} to drain), {unknown} unanswered",
        accepted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_worker_drains_on_sigterm_and_resumes_at_the_committed_offset() {
    if !common::selected("jetstream") {
        return;
    }
    const EVENTS: u64 = 1200;
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("t{}", uuid::Uuid::new_v4().simple());
    let (sink, sink_url) = SlowSink::start().await;
    let bus = common::bus_config("jetstream", None);
    let env = vec![
        ("NEXUS_BUS__URL", bus.url.clone()),
        (
            "NEXUS_BUS__NATS__ACK_WAIT_MS",
            bus.nats.ack_wait_ms.to_string(),
        ),
        (
            "NEXUS_BUS__NATS__LEASE_TTL_MS",
            bus.nats.lease_ttl_ms.to_string(),
        ),
        ("NEXUS_TOPOLOGY__FILE", topology_file(dir.path(), &topic)),
        ("NEXUS_WORKERS__TAP__URL", sink_url),
        ("NEXUS_CONSUMER__LAG_INTERVAL_MS", "500".to_string()),
        // Within JetStream's hand-over wait (twice the ack wait, at least 10 s).
        ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "10000".to_string()),
    ];
    let (ok, out, err) = run(&["topology", "apply"], &env);
    assert!(ok, "{out}{err}");
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
    let t = common::test_bus("jetstream").await;
    let publisher = tokio::spawn({
        let (bus, topic) = (t.bus.clone(), topic.clone());
        async move {
            let mut ids = Vec::new();
            for n in 0..EVENTS {
                let key = format!("conv-{}", n % CONVERSATIONS);
                let event = common::event(&key, n / CONVERSATIONS);
                ids.push(event.envelope.event_id.to_string());
                let payload = nexus::events::encode(&event).unwrap();
                bus.publish(&topic, nexus::bus::OutRecord::new(&key, payload))
                    .await
                    .expect("publish");
            }
            ids
        }
    });
    wait_for(
        "a third handled before SIGTERM",
        Duration::from_secs(60),
        || first.log_text(),
        || sink.distinct() >= (EVENTS / 3) as usize,
    )
    .await;
    first.terminate();
    let (status, took) = wait_exit(&mut first, EXIT_WITHIN).await;
    let log = first.log_text();
    assert!(status.success(), "exit {status} after SIGTERM:\n{log}");
    assert!(log.contains("left consumer group"), "{log}");
    let at_stop = sink.distinct();
    let ids = publisher.await.unwrap();

    let second = Nexus::start(
        dir.path(),
        "worker-2",
        &["worker", "tap"],
        &with_port(env.clone()),
    );
    wait_for(
        "every event handled after the restart",
        Duration::from_secs(90),
        || second.log_text(),
        || sink.distinct() >= EVENTS as usize,
    )
    .await;
    // A redelivery of an unacked record would come after ack_wait: wait past it.
    tokio::time::sleep(Duration::from_millis(bus.nats.ack_wait_ms + 500)).await;
    check_resumed(&sink, &ids, "jetstream");
    eprintln!("jetstream: {at_stop} handled before exit ({took:?} to drain)");
}
