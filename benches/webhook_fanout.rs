//! Webhook fan-out: interaction events published on the bus → signed Standard Webhooks
//! deliveries at a loopback receiver, through a real `nexus worker webhooks` process with its
//! attempt log in PostgreSQL, against a plain reqwest (hyper) client posting bodies of the same
//! size to the same receiver with the same concurrency.
//!
//! Runs, in order:
//! 1. throughput, three rounds, each side by side with the plain client: NEXUS_BENCH_EVENTS
//!    ConversationStarted events published at once, fanned out to NEXUS_BENCH_SUBSCRIPTIONS
//!    subscriptions (deliveries/s from the first publish to the last delivery), then the same
//!    number of POSTs of same-size bodies from a plain reqwest client at the worker's
//!    concurrency (subscriptions × max_in_flight_per_endpoint); the ratio is of the medians;
//! 2. latency: events at NEXUS_BENCH_RATE per second for NEXUS_BENCH_SECONDS; publish →
//!    receiver p50/p99/max;
//! 3. 1 % injected 5xx (every 100th request answers 503): lost messages (must be 0) and
//!    repeated deliveries of one webhook-id after a 2xx (duplicates).
//!
//! `make bench`, or `cargo bench --bench webhook_fanout` with NATS (NEXUS_BENCH_BUS; else a
//! nats-server of its own from NEXUS_TEST_NATS_SERVER; else NEXUS_TEST_NATS_URL or
//! nats://127.0.0.1:14222) and PostgreSQL (NEXUS_BENCH_POSTGRES_URL,
//! else NEXUS_TEST_POSTGRES_URL, else postgres://postgres@127.0.0.1:5432/test: a fresh database
//! is created there and dropped). NEXUS_BENCH_BIN picks the nexus binary.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use nexus::bus::Bus;
use nexus::events::chat::{Channel, ConversationStarted};
use nexus::events::publish::publish;
use nexus::events::Event;
use nexus::stores::provisioning::secrets::EncryptionKey;
use nexus::stores::provisioning::{NewTenant, NewWebhook, Provisioning, WebhookFormat};
use tokio::sync::Semaphore;

const KEY: &str = "4242424242424242424242424242424242424242424242424242424242424242";
const PER_ENDPOINT: usize = 16;
const DRAIN: Duration = Duration::from_secs(60);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn psql(url: &str, sql: &str) {
    let status = Command::new("psql")
        .args([url, "-q", "-c", sql])
        .status()
        .expect("psql");
    assert!(status.success(), "psql {sql} failed");
}

fn free_listen() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    format!("127.0.0.1:{port}")
}

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Arrival of the first 2xx-answered request per webhook-id (or per plain request id).
    first_ok: HashMap<String, Instant>,
    /// 2xx answers per id.
    ok_count: HashMap<String, u32>,
    requests: u64,
    /// (conversation id, arrival) of each first 2xx delivery of a webhook-id.
    deliveries: Vec<(String, Instant)>,
    /// Answer every `fail_every`-th request with 503 (0 = never).
    fail_every: u64,
}

type Shared = Arc<Mutex<Seen>>;

async fn receive(State(seen): State<Shared>, headers: HeaderMap, body: String) -> StatusCode {
    let id = headers
        .get("webhook-id")
        .or_else(|| headers.get("x-request-id"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut s = seen.lock().expect("lock");
    s.requests += 1;
    if s.fail_every > 0 && s.requests % s.fail_every == 0 {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if !s.first_ok.contains_key(&id) {
        let now = Instant::now();
        s.first_ok.insert(id.clone(), now);
        if headers.contains_key("webhook-id") {
            let conv = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v["data"]["entities"][0]["entity"]["id"]
                        .as_str()
                        .map(String::from)
                })
                .unwrap_or_default();
            s.deliveries.push((conv, now));
        }
    }
    *s.ok_count.entry(id).or_insert(0) += 1;
    StatusCode::NO_CONTENT
}

struct System {
    worker: Child,
    /// The bench's own nats-server, if it started one.
    nats: Option<Child>,
    bus: Arc<dyn Bus>,
    tenant: String,
    /// The worker's HTTP address (metrics).
    listen: String,
    database: (String, String),
    _provisioning: Provisioning,
}

impl Drop for System {
    fn drop(&mut self) {
        let _ = self.worker.kill();
        let _ = self.worker.wait();
        if let Some(nats) = &mut self.nats {
            let _ = nats.kill();
            let _ = nats.wait();
        }
        psql(
            &self.database.0,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database.1),
        );
    }
}

async fn start(dir: &Path, receiver: &str, subscriptions: usize) -> System {
    let bin =
        std::env::var("NEXUS_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_nexus").into());
    // A nats-server of its own when one is installed: a shared server keeps earlier runs'
    // events on the interaction topic, which a fresh group would read first.
    let (bus_url, nats) = match (
        std::env::var("NEXUS_BENCH_BUS"),
        std::env::var("NEXUS_TEST_NATS_SERVER"),
    ) {
        (Ok(url), _) => (url, None),
        (Err(_), Ok(server)) => {
            let listen = free_listen();
            let port = listen.rsplit(':').next().unwrap_or("4222").to_string();
            let child = Command::new(server)
                .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
                .arg(dir.join("nats"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nats-server");
            let deadline = Instant::now() + Duration::from_secs(10);
            while tokio::net::TcpStream::connect(&listen).await.is_err() {
                assert!(Instant::now() < deadline, "nats-server did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (format!("nats://{listen}"), Some(child))
        }
        (Err(_), Err(_)) => (
            std::env::var("NEXUS_TEST_NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:14222".into()),
            None,
        ),
    };
    let server = std::env::var("NEXUS_BENCH_POSTGRES_URL")
        .or_else(|_| std::env::var("NEXUS_TEST_POSTGRES_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("nexus_bench_{}", uuid::Uuid::new_v4().simple());
    psql(&server, &format!("CREATE DATABASE {name}"));
    let db_url = match server.rsplit_once('/') {
        Some((head, _)) => format!("{head}/{name}"),
        None => panic!("bad postgres url {server}"),
    };
    let status = Command::new(&bin)
        .args(["topology", "apply", "--bus", &bus_url])
        .stdout(Stdio::null())
        .status()
        .expect("topology apply");
    assert!(status.success(), "topology apply failed");

    let provisioning = Provisioning::connect(&db_url, &EncryptionKey::parse(KEY).expect("key"))
        .await
        .expect("provisioning");
    let tenant = provisioning
        .create_tenant(NewTenant {
            name: format!("bench-{}", uuid::Uuid::new_v4().simple()),
        })
        .await
        .expect("tenant")
        .id;
    for _ in 0..subscriptions {
        provisioning
            .create_webhook(
                &tenant,
                NewWebhook {
                    url: receiver.to_string(),
                    events: None,
                    media: None,
                    format: WebhookFormat::Standard,
                    enabled: None,
                    secret: None,
                },
            )
            .await
            .expect("subscription");
    }
    let listen = free_listen();
    let log = std::fs::File::create(dir.join("webhooks.log")).expect("log");
    let worker = Command::new(&bin)
        .args(["worker", "webhooks"])
        .env("RUST_LOG", "warn")
        .env("NEXUS_BUS__URL", &bus_url)
        .env("NEXUS_STORES__POSTGRES_URL", &db_url)
        .env("NEXUS_STORES__PROVISIONING_KEY", KEY)
        .env("NEXUS_STORES__DATA_DIR", dir.join("data"))
        .env("NEXUS_HTTP__LISTEN", &listen)
        .env("NEXUS_WORKERS__WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true")
        .env(
            "NEXUS_WORKERS__WEBHOOKS__MAX_IN_FLIGHT_PER_ENDPOINT",
            PER_ENDPOINT.to_string(),
        )
        // Retries at 0, 100, 200 ms: the 5xx run measures loss, not the default hours.
        .env(
            "NEXUS_WORKERS__WEBHOOKS__RETRY_SCHEDULE_MS",
            "[0, 100, 200, 400, 800]",
        )
        .env("NEXUS_WORKERS__WEBHOOKS__POLL_INTERVAL_MS", "50")
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn nexus worker webhooks");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("http://{listen}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "worker not ready; log in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut config = nexus::config::Config::defaults().bus;
    config.url = bus_url;
    let bus = nexus::bus::connect(&config).await.expect("bus");
    System {
        worker,
        nats,
        bus,
        tenant,
        listen,
        database: (server, name),
        _provisioning: provisioning,
    }
}

/// The sum of a counter's series on the worker's `/metrics`.
async fn counter(s: &System, name: &str) -> f64 {
    let Ok(r) = reqwest::get(format!("http://{}/metrics", s.listen)).await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn started(tenant: &str, conversation: &str) -> Event {
    Event::typed(
        &ConversationStarted {
            channel: Channel::WebChat,
            channel_id: None,
            customer_participant_id: "p".into(),
            customer_nickname: "Bench".into(),
            contact: Default::default(),
            contact_id: None,
            subject: None,
            user_data: Default::default(),
            is_async: false,
        },
        tenant,
        conversation,
        "bench",
    )
    .expect("event")
}

/// Publishes `n` events (64 publishes in flight), at `rate` per second if given; returns the
/// publish time per conversation id.
async fn publish_events(
    s: &System,
    prefix: &str,
    n: usize,
    rate: Option<f64>,
) -> HashMap<String, Instant> {
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let gate = Arc::new(Semaphore::new(64));
    let begin = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        if let Some(rate) = rate {
            let due = begin + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = gate.clone().acquire_owned().await.expect("gate");
        let conv = format!("{prefix}-{i}");
        let event = started(&s.tenant, &conv);
        let bus = s.bus.clone();
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            sent.lock().expect("lock").insert(conv, Instant::now());
            publish(bus.as_ref(), "nexus.interaction.v1", &event)
                .await
                .expect("publish");
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.expect("publish task");
    }
    let map = sent.lock().expect("lock").clone();
    map
}

/// Waits until `want` distinct ids were answered 2xx (or the drain time passes).
async fn wait_ids(seen: &Shared, want: usize) -> bool {
    let deadline = Instant::now() + DRAIN;
    loop {
        if seen.lock().expect("lock").first_ok.len() >= want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Throughput and plain-client rounds, side by side.
const ROUNDS: usize = 3;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `events` published at once; deliveries/s from the first publish to the last delivery.
async fn burst(
    s: &System,
    seen: &Shared,
    prefix: &str,
    events: usize,
    subscriptions: usize,
) -> f64 {
    reset(seen, 0);
    let begin = Instant::now();
    publish_events(s, prefix, events, None).await;
    let complete = wait_ids(seen, events * subscriptions).await;
    let (last, delivered) = {
        let s = seen.lock().expect("lock");
        (
            s.first_ok.values().max().copied().unwrap_or(begin),
            s.first_ok.len(),
        )
    };
    let secs = (last - begin).as_secs_f64();
    assert!(
        complete,
        "burst {prefix}: {delivered} of {} delivered",
        events * subscriptions
    );
    delivered as f64 / secs
}

/// The plain client: `total` POSTs of `body` at `concurrency`; requests/s and latencies (ms).
async fn plain(
    seen: &Shared,
    url: &str,
    body: &str,
    total: usize,
    concurrency: usize,
) -> (f64, Vec<f64>) {
    reset(seen, 0);
    let client = reqwest::Client::new();
    let counter = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let begin = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, counter, latencies, body, url) = (
            client.clone(),
            counter.clone(),
            latencies.clone(),
            body.to_string(),
            url.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if i >= total as u64 {
                    break;
                }
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("x-request-id", i.to_string())
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                if r.is_ok() {
                    latencies
                        .lock()
                        .expect("lock")
                        .push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("plain task");
    }
    let rate = total as f64 / begin.elapsed().as_secs_f64();
    let lat = latencies.lock().expect("lock").clone();
    (rate, lat)
}

fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), at(1.0))
}

fn reset(seen: &Shared, fail_every: u64) {
    let mut s = seen.lock().expect("lock");
    *s = Seen {
        fail_every,
        ..Seen::default()
    };
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let events: usize = env_or("NEXUS_BENCH_EVENTS", 5000);
    let subscriptions: usize = env_or("NEXUS_BENCH_SUBSCRIPTIONS", 4);
    let rate: f64 = env_or("NEXUS_BENCH_RATE", 500.0);
    let secs: f64 = env_or("NEXUS_BENCH_SECONDS", 5.0);
    let dir = tempfile::tempdir().expect("tempdir");

    let seen: Shared = Arc::default();
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let receiver = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let s = start(dir.path(), &receiver, subscriptions).await;
    let body_len = {
        let e = started(&s.tenant, "size");
        nexus::workers::webhooks::payload::body(&nexus::workers::webhooks::payload::Interaction {
            event_id: &e.envelope.event_id,
            event: nexus::stores::provisioning::WebhookEvent::Started,
            conversation_id: "bench-throughput-0000",
            media: nexus::stores::provisioning::WebhookMedia::Chat,
            subtype: "webchat",
        })
        .len()
    };
    println!(
        "webhook fan-out: {events} events × {subscriptions} subscriptions (standard, signed), \
         nexus worker webhooks on NATS + PostgreSQL log, body {body_len} B, \
         {PER_ENDPOINT} in flight per endpoint"
    );

    // 1. The burst through nexus, then the plain client, ROUNDS times; the
    // ratio is of the medians, since either side alone moves by ±30 % between runs on a shared VM.
    let concurrency = subscriptions * PER_ENDPOINT;
    let body = "x".repeat(body_len);
    let (mut nexus_rates, mut plain_rates) = (Vec::new(), Vec::new());
    let mut plain_lat = Vec::new();
    for round in 0..ROUNDS {
        let nexus_rate = burst(&s, &seen, &format!("tp{round}"), events, subscriptions).await;
        let (plain_rate, lat) =
            plain(&seen, &receiver, &body, events * subscriptions, concurrency).await;
        println!(
            "  round {}: nexus {nexus_rate:.0} deliveries/s, plain client {plain_rate:.0} requests/s, ratio {:.3}×",
            round + 1,
            nexus_rate / plain_rate
        );
        nexus_rates.push(nexus_rate);
        plain_rates.push(plain_rate);
        plain_lat = lat;
    }
    // How many new messages went in with their first attempt (one write instead of three).
    let queued = counter(&s, "nexus_webhook_messages_queued_total").await;
    let settled = counter(&s, "nexus_webhook_settled_at_insert_total").await;
    println!("  written with their first attempt: {settled:.0} of {queued:.0} messages");
    let (nexus_rate, plain_rate) = (median(&mut nexus_rates), median(&mut plain_rates));
    let (pp50, pp99, _) = percentiles(&mut plain_lat);
    println!(
        "  nexus throughput (median of {ROUNDS}): {nexus_rate:.0} deliveries/s; plain reqwest client (median): {plain_rate:.0} requests/s, last run p50 {pp50:.1} ms, p99 {pp99:.1} ms"
    );
    println!(
        "  ratio nexus / plain: {:.3}× (issue target ≥ 0.16×; svix-server ≈ 0.016×)",
        nexus_rate / plain_rate
    );

    // 2. Latency at a set rate.
    reset(&seen, 0);
    let n = (rate * secs) as usize;
    let sent = publish_events(&s, "lat", n, Some(rate)).await;
    wait_ids(&seen, n * subscriptions).await;
    let mut lat: Vec<f64> = seen
        .lock()
        .expect("lock")
        .deliveries
        .iter()
        .filter_map(|(conv, at)| {
            sent.get(conv)
                .map(|t| at.saturating_duration_since(*t).as_secs_f64() * 1e3)
        })
        .collect();
    let (p50, p99, max) = percentiles(&mut lat);
    println!(
        "  nexus latency at {rate:.0} events/s ({:.0} deliveries/s): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
        rate * subscriptions as f64
    );

    // 3. 1 % injected 5xx: nothing lost, duplicates counted by webhook-id.
    reset(&seen, 100);
    let n5 = events;
    publish_events(&s, "fail", n5, None).await;
    let complete = wait_ids(&seen, n5 * subscriptions).await;
    let s2 = seen.lock().expect("lock");
    let lost = (n5 * subscriptions).saturating_sub(s2.first_ok.len());
    let duplicates: u32 = s2.ok_count.values().map(|c| c.saturating_sub(1)).sum();
    let failed = s2.requests / 100;
    println!(
        "  1% 5xx: {} messages, {failed} answered 503, lost {lost}, duplicates {duplicates} ({:.3}%){}",
        n5 * subscriptions,
        duplicates as f64 * 100.0 / (n5 * subscriptions) as f64,
        if complete { "" } else { " (INCOMPLETE)" }
    );
    drop(s2);
    drop(s);
}
