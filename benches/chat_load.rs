//! Chat load: N concurrent customer sessions and M agents over WebSockets against a real
//! `nexus dev` process (embedded bus, embedded stores), customer messages sent open-loop at a
//! set aggregate rate. For each rate it reports customer-send (just before the HTTP request) →
//! agent-receive (the transcript push on the agent's socket) latency p50/p99/max and errors,
//! then the bus's own publish → consume latency at the same rate on the same embedded bus
//! configuration (in this process, consumer runtime with the default options), and the ratio
//! chat p99 / bus p99. Last, the highest rate held (no errors, every message delivered, the
//! rate reached, p99 ≤ 50 ms) as a multiple of the legacy chat server's 50 messages/s.
//! `make bench` (after bus_throughput), or `cargo bench --bench chat_load`.
//!
//! With NEXUS_BENCH_BUS (e.g. `nats://127.0.0.1:14222`, `kafka://127.0.0.1:19092`) the system
//! under load is instead a `nexus edge` and a `nexus worker conversation` process on that bus with
//! Redis (NEXUS_BENCH_REDIS_URL, else NEXUS_TEST_REDIS_URL, else 127.0.0.1:6379) and a fresh
//! database on NEXUS_BENCH_POSTGRES_URL's server; the bus run then uses that broker too.
//!
//! CPU is reported per process group as % of one core over the send phase, and per message in µs:
//! nexus's processes, and beside them the local broker, Redis and PostgreSQL ("peers"); a second
//! line splits the per-message figure by nexus role and by peer program.
//!
//! Env: NEXUS_BENCH_CHATS (default 1000), NEXUS_BENCH_AGENTS (20), NEXUS_BENCH_RATES
//! (messages/s, default `50,100,200,500,1000,2000,5000`; the ladder stops at the first rate not
//! held, since a backlog left behind would only spoil the next one), NEXUS_BENCH_SECONDS (per rate, default 10),
//! NEXUS_BENCH_BIN (the nexus binary; default the one cargo built for this bench),
//! NEXUS_BENCH_WORKER_THREADS (the nexus processes' async worker threads, `TOKIO_WORKER_THREADS`;
//! default one per core), NEXUS_BENCH_LOG (their `RUST_LOG`, default `warn`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{stream, SinkExt, StreamExt};
use nexus::bus::consumer::{Consumer, ConsumerOptions, HandleError, Handler};
use nexus::bus::{Message, OutRecord, TopicSpec};
use nexus::config::Config;
use nexus::events::{encode, Event};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "admin-token-for-bench";
const CLIENT_KEY_SECRET: &str = "client-key-secret-for-bench";
/// The legacy chat server's rate the issue compares against.
const LEGACY_RATE: f64 = 50.0;
/// The latency bound for a held rate.
const P99_BOUND: Duration = Duration::from_millis(50);
/// Requests in flight at most; a send that cannot start on time shows as client lag.
const MAX_IN_FLIGHT: usize = 2048;
/// HTTP clients, each with its own keep-alive pool, so no single pool lock is hot.
const CLIENTS: usize = 8;
/// Partitions of `nexus.inbound.v1` in the built-in topology, mirrored for the bus run.
const PARTITIONS: u32 = 16;
/// How long after the last send a step waits for the rest to arrive.
const DRAIN: Duration = Duration::from_secs(10);
const SETUP: Duration = Duration::from_secs(120);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of a process so far, from /proc (Linux); zero elsewhere.
fn cpu_time(pid: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Processes on this machine the nexus processes lean on (their CPU is reported beside nexus's).
const PEERS: &[&str] = &["nats-server", "redis-server", "postgres", "tansu"];

/// CPU time so far of the local broker, Redis and PostgreSQL, per program (all its processes).
fn peers_cpu() -> BTreeMap<&'static str, Duration> {
    let mut by = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return by;
    };
    for p in procs.filter_map(|p| p.ok()) {
        let Ok(comm) = std::fs::read_to_string(p.path().join("comm")) else {
            continue;
        };
        if let Some(name) = PEERS.iter().find(|name| comm.trim().starts_with(**name)) {
            let pid = p.file_name().to_string_lossy().to_string();
            *by.entry(*name).or_default() += cpu_time(&pid);
        }
    }
    by
}

/// CPU seconds spent per key (process or program) between two readings.
fn cpu_spent<K: Ord + Clone>(
    before: &BTreeMap<K, Duration>,
    after: &BTreeMap<K, Duration>,
) -> Vec<(K, f64)> {
    after
        .iter()
        .map(|(k, t)| {
            let was = before.get(k).copied().unwrap_or_default();
            (k.clone(), t.saturating_sub(was).as_secs_f64())
        })
        .collect()
}

/// Where the system under load runs: `nexus dev` (embedded bus and stores), or, with
/// `NEXUS_BENCH_BUS` set, a `nexus edge` and a `nexus worker conversation` process on that bus
/// with Redis and a fresh PostgreSQL database (the production shape, on one machine).
#[derive(Clone)]
struct Deployment {
    /// `None` = embedded (`nexus dev`).
    bus: Option<String>,
    redis: String,
    postgres: String,
}

impl Deployment {
    fn from_env() -> Deployment {
        Deployment {
            bus: std::env::var("NEXUS_BENCH_BUS")
                .ok()
                .filter(|b| !b.is_empty()),
            redis: std::env::var("NEXUS_BENCH_REDIS_URL")
                .or_else(|_| std::env::var("NEXUS_TEST_REDIS_URL"))
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            postgres: std::env::var("NEXUS_BENCH_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        }
    }

    fn describe(&self) -> String {
        match &self.bus {
            None => "nexus dev (embedded bus, SQLite, embedded session store)".into(),
            Some(bus) => {
                format!("nexus edge + nexus worker conversation on {bus}, Redis, PostgreSQL")
            }
        }
    }
}

fn psql(url: &str, sql: &str) {
    let status = Command::new("psql")
        .args([url, "-q", "-c", sql])
        .status()
        .expect("psql");
    assert!(status.success(), "psql {sql} failed");
}

/// The nexus processes under load; killed (and the bench database dropped) on drop.
struct Nexus {
    children: Vec<Child>,
    /// What each child runs (`dev`, `edge`, `worker`), in the order of `children`.
    roles: Vec<&'static str>,
    url: String,
    /// (server url, database) created for this run.
    database: Option<(String, String)>,
}

impl Drop for Nexus {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some((server, name)) = &self.database {
            psql(
                server,
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            );
        }
    }
}

fn free_listen() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    format!("127.0.0.1:{port}")
}

impl Nexus {
    async fn start(dir: &Path, deployment: &Deployment) -> Nexus {
        let bin = std::env::var("NEXUS_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_nexus").to_string());
        let spawn = |name: &'static str, args: &[&str], env: &[(&str, String)]| {
            let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
            Command::new(&bin)
                .args(args)
                .env(
                    "RUST_LOG",
                    std::env::var("NEXUS_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .env("NEXUS_HTTP__ADMIN_TOKEN", ADMIN)
                .env("NEXUS_CHAT__CLIENT_KEY_SECRET", CLIENT_KEY_SECRET)
                // Setup offers 1 000 chats at once; none may lapse on a loaded machine.
                .env("NEXUS_WORKERS__CONVERSATION__OFFER_TIMEOUT_MS", "120000")
                .env("NEXUS_WORKERS__CONVERSATION__REQUEUE_INTERVAL_MS", "300")
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .envs(
                    std::env::var("NEXUS_BENCH_WORKER_THREADS")
                        .ok()
                        .map(|n| ("TOKIO_WORKER_THREADS", n)),
                )
                .stdout(Stdio::from(log.try_clone().expect("log file")))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn nexus")
        };
        let listen = free_listen();
        let mut nexus = Nexus {
            children: Vec::new(),
            roles: Vec::new(),
            url: format!("http://{listen}"),
            database: None,
        };
        match &deployment.bus {
            None => {
                let data = dir.join("data").display().to_string();
                nexus.children.push(spawn(
                    "nexus",
                    &["dev", "--listen", &listen, "--data-dir", &data],
                    &[],
                ));
                nexus.roles.push("dev");
            }
            Some(bus) => {
                let name = format!("nexus_bench_{}", uuid::Uuid::new_v4().simple());
                psql(&deployment.postgres, &format!("CREATE DATABASE {name}"));
                let server = deployment.postgres.clone();
                let db_url = match server.rsplit_once('/') {
                    Some((head, _)) => format!("{head}/{name}"),
                    None => panic!("bad postgres url {server}"),
                };
                nexus.database = Some((server, name));
                let status = Command::new(&bin)
                    .args(["topology", "apply", "--bus", bus])
                    .status()
                    .expect("topology apply");
                assert!(status.success(), "nexus topology apply --bus {bus} failed");
                let env = [
                    ("NEXUS_BUS__URL", bus.clone()),
                    ("NEXUS_STORES__POSTGRES_URL", db_url),
                    ("NEXUS_STORES__PROVISIONING_KEY", "42".repeat(32)),
                    ("NEXUS_STORES__REDIS_URL", deployment.redis.clone()),
                    (
                        "NEXUS_STORES__DATA_DIR",
                        dir.join("data").display().to_string(),
                    ),
                ];
                let mut worker_env = env.to_vec();
                worker_env.push(("NEXUS_HTTP__LISTEN", free_listen()));
                nexus
                    .children
                    .push(spawn("worker", &["worker", "conversation"], &worker_env));
                nexus.roles.push("worker");
                let mut edge_env = env.to_vec();
                edge_env.push(("NEXUS_HTTP__LISTEN", listen.clone()));
                nexus.children.push(spawn("edge", &["edge"], &edge_env));
                nexus.roles.push("edge");
            }
        }
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", nexus.url)).send().await {
                if r.status().is_success() {
                    return nexus;
                }
            }
            for child in &mut nexus.children {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("nexus exited with {status}; logs in {}", dir.display());
                }
            }
            assert!(Instant::now() < deadline, "nexus not ready in 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// CPU time so far of each nexus process, by role.
    fn cpu(&self) -> BTreeMap<&'static str, Duration> {
        self.roles
            .iter()
            .zip(&self.children)
            .map(|(role, c)| (*role, cpu_time(&c.id().to_string())))
            .collect()
    }
}

async fn admin_post(http: &reqwest::Client, url: &str, path: &str, body: Value) -> Value {
    let r = http
        .post(format!("{url}/v1/admin{path}"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .expect("admin request");
    let status = r.status();
    let text = r.text().await.expect("admin body");
    assert!(status.is_success(), "POST {path}: {status} {text}");
    serde_json::from_str(&text).expect("admin json")
}

/// A tenant with a chat API key, one queue and a web-chat rule; returns (tenant id, api key).
async fn provision_tenant(http: &reqwest::Client, url: &str) -> (String, String) {
    let t = admin_post(http, url, "/tenants", json!({"name": "bench"})).await;
    let id = t["id"].as_str().expect("tenant id").to_string();
    let key = admin_post(
        http,
        url,
        &format!("/tenants/{id}/api-keys"),
        json!({"name": "widget", "permissions": ["chat"]}),
    )
    .await;
    let queue = admin_post(
        http,
        url,
        &format!("/tenants/{id}/queues"),
        json!({"name": "support"}),
    )
    .await;
    admin_post(
        http,
        url,
        &format!("/tenants/{id}/routing-rules"),
        json!({"channel": "WEB_CHAT", "queue_id": queue["id"], "priority": 1}),
    )
    .await;
    (id, key["key"].as_str().expect("api key").to_string())
}

/// What the agent sockets saw, shared by their reader tasks.
struct Seen {
    base: Instant,
    connected: AtomicUsize,
    /// Latencies in µs per rate step, from the send stamp carried in the message text.
    latencies: Vec<Mutex<Vec<u64>>>,
    /// Resyncs, error frames, closed or failed sockets.
    errors: AtomicU64,
}

/// One agent: connects, goes ready, accepts every offer and records customer messages.
async fn agent(url: &str, token: &str, http: &reqwest::Client, seen: Arc<Seen>) {
    let ws_url = format!(
        "{}/v1/agent/ws?token={token}",
        url.replacen("http", "ws", 1)
    );
    // A small read buffer, as the edge's sockets have: the codec zero-fills all of it before
    // every read, and at its 128 KiB default the load generator spends CPU the edge needs.
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(ws_url, Some(config), true)
        .await
        .expect("agent websocket");
    let (mut tx, mut rx) = ws.split();
    let ready = json!({"op": "ready", "request_id": "ready"});
    tx.send(WsMessage::Text(ready.to_string().into()))
        .await
        .expect("send ready");
    tokio::spawn(async move {
        while let Some(frame) = rx.next().await {
            let Ok(WsMessage::Text(t)) = frame else {
                if frame.is_err() {
                    seen.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                continue;
            };
            let v: Value = serde_json::from_str(t.as_str()).expect("json frame");
            match v["type"].as_str() {
                Some("transcript") if v["kind"] == "Message" && v["from"]["kind"] == "customer" => {
                    let now = seen.base.elapsed().as_micros() as u64;
                    let text = v["text"].as_str().unwrap_or_default();
                    let Some((step, sent)) = text.split_once(' ') else {
                        continue;
                    };
                    let (Ok(step), Ok(sent)) = (step.parse::<usize>(), sent.parse::<u64>()) else {
                        continue;
                    };
                    seen.latencies[step]
                        .lock()
                        .expect("latencies")
                        .push(now.saturating_sub(sent));
                }
                Some("offer") => {
                    let accept = json!({"op": "accept", "conversation_id": v["conversation_id"], "offer_id": v["offer_id"]});
                    if tx
                        .send(WsMessage::Text(accept.to_string().into()))
                        .await
                        .is_err()
                    {
                        seen.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                Some("state") if v["state"] == "connected" => {
                    seen.connected.fetch_add(1, Ordering::Relaxed);
                }
                Some("resync") | Some("error") => {
                    eprintln!("agent socket: {v}");
                    seen.errors.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        seen.errors.fetch_add(1, Ordering::Relaxed);
    });
    // The worker judges readiness asynchronously: chats started before it would queue.
    let deadline = Instant::now() + SETUP;
    loop {
        let me: Value = http
            .get(format!("{url}/v1/agent/me"))
            .bearer_auth(token)
            .send()
            .await
            .expect("agent me")
            .json()
            .await
            .expect("agent me json");
        if me["ready"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "agent not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Session {
    id: String,
    client_key: String,
}

/// Result of one open-loop run at a rate.
struct Run {
    sent: u64,
    /// Failed sends (status other than 202, transport errors) plus socket errors.
    errors: u64,
    /// Seconds from the first scheduled send to the last send's start.
    send_secs: f64,
    /// Latest start of a send after its scheduled instant (client saturation).
    max_lag: Duration,
    latencies: Vec<u64>,
    /// CPU seconds of (nexus, this process, the local broker + Redis + PostgreSQL) over the run.
    cpu: (f64, f64, f64),
    /// CPU seconds over the run per nexus role and per peer program.
    nexus_by_role: Vec<(&'static str, f64)>,
    peers_by_program: Vec<(&'static str, f64)>,
}

/// Sends `rate × secs` messages open-loop, chat after chat round robin; `send(k, stamp)`
/// performs message k carrying the send stamp (µs since `base`) taken just before it.
async fn open_loop<F, Fut>(rate: f64, secs: u64, base: Instant, send: F) -> (u64, f64, Duration)
where
    F: Fn(u64, u64) -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let total = (rate * secs as f64) as u64;
    let failed = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let start = tokio::time::Instant::now();
    let mut max_lag = Duration::ZERO;
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        tokio::time::sleep_until(due).await;
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        max_lag = max_lag.max(tokio::time::Instant::now().saturating_duration_since(due));
        let stamp = base.elapsed().as_micros() as u64;
        let fut = send(k, stamp);
        let failed = failed.clone();
        tokio::spawn(async move {
            if !fut.await {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    let send_secs = start.elapsed().as_secs_f64();
    let _all = sem
        .acquire_many(MAX_IN_FLIGHT as u32)
        .await
        .expect("semaphore");
    (failed.load(Ordering::Relaxed), send_secs, max_lag)
}

#[allow(clippy::too_many_arguments)]
async fn chat_run(
    nexus: &Nexus,
    clients: &[reqwest::Client],
    api_key: &str,
    sessions: &Arc<Vec<Session>>,
    seen: &Arc<Seen>,
    step: usize,
    rate: f64,
    secs: u64,
) -> Run {
    let errors_before = seen.errors.load(Ordering::Relaxed);
    let before = (nexus.cpu(), cpu_time("self"), peers_cpu());
    let (failed, send_secs, max_lag) = open_loop(rate, secs, seen.base, |k, stamp| {
        let http = clients[k as usize % clients.len()].clone();
        let session = &sessions[k as usize % sessions.len()];
        let req = http
            .post(format!(
                "{}/nexus/v3/chat/sessions/{}/messages",
                nexus.url, session.id
            ))
            .header("x-api-key", api_key)
            .header("x-nexus-client-key", &session.client_key)
            .json(&json!({"text": format!("{step} {stamp}")}));
        async move {
            match req.send().await {
                Ok(r) if r.status() == 202 => true,
                Ok(r) => {
                    eprintln!(
                        "send: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    );
                    false
                }
                Err(e) => {
                    eprintln!("send: {e}");
                    false
                }
            }
        }
    })
    .await;
    let total = (rate * secs as f64) as u64;
    let delivered_target = total - failed;
    let deadline = Instant::now() + DRAIN;
    while (seen.latencies[step].lock().expect("latencies").len() as u64) < delivered_target
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nexus_by_role = cpu_spent(&before.0, &nexus.cpu());
    let peers_by_program = cpu_spent(&before.2, &peers_cpu());
    let sum = |by: &[(&str, f64)]| by.iter().map(|(_, s)| s).sum::<f64>();
    let cpu = (
        sum(&nexus_by_role),
        (cpu_time("self").saturating_sub(before.1)).as_secs_f64(),
        sum(&peers_by_program),
    );
    let latencies = std::mem::take(&mut *seen.latencies[step].lock().expect("latencies"));
    let lost = delivered_target.saturating_sub(latencies.len() as u64);
    Run {
        sent: total,
        errors: failed + lost + (seen.errors.load(Ordering::Relaxed) - errors_before),
        send_secs,
        max_lag,
        latencies,
        cpu,
        nexus_by_role,
        peers_by_program,
    }
}

/// Records publish → handle latency from the stamp in the record's header.
struct BusProbe {
    base: Instant,
    latencies: Mutex<Vec<u64>>,
    warm: AtomicU64,
}

#[async_trait]
impl Handler for BusProbe {
    async fn handle(&self, _e: &Event, m: &Message) -> Result<(), HandleError> {
        let now = self.base.elapsed().as_micros() as u64;
        match m.header("bench-sent").and_then(|s| s.parse::<u64>().ok()) {
            Some(sent) => self
                .latencies
                .lock()
                .expect("latencies")
                .push(now.saturating_sub(sent)),
            None => {
                self.warm.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// A `MessageReceived` like the chat edge publishes.
fn bus_event(key: &str, text: &str) -> Vec<u8> {
    let body = json!({
        "message_id": uuid::Uuid::now_v7().to_string(),
        "channel": "WEB_CHAT",
        "participant_id": "customer-1",
        "participant_kind": "CUSTOMER",
        "kind": "TEXT",
        "text": text,
    });
    let Value::Object(body) = body else {
        unreachable!("literal object")
    };
    encode(&Event::new(
        "MessageReceived",
        "tenant-bench",
        key,
        "bench",
        body,
    ))
    .expect("encode")
}

/// The bus alone at `rate`: publish (stamped just before) → consumer runtime handle.
/// On the deployment's bus: embedded in `dir`, or a fresh topic and group on the broker.
async fn bus_run(
    dir: &Path,
    deployment: &Deployment,
    chats: usize,
    rate: f64,
    secs: u64,
    base: Instant,
) -> Run {
    let defaults = Config::defaults();
    let mut config = defaults.bus.clone();
    let run = uuid::Uuid::new_v4().simple().to_string();
    config.url = match &deployment.bus {
        None => format!("embedded://{}", dir.display()),
        Some(bus) => bus.clone(),
    };
    let bus = nexus::bus::connect(&config).await.expect("bus");
    let topic = format!("bench.inbound.{}", &run[..12]);
    for name in [topic.clone(), format!("{topic}.dlq")] {
        bus.apply_topic(&TopicSpec {
            name,
            partitions: PARTITIONS,
            retention: None,
        })
        .await
        .expect("topic");
    }
    let probe = Arc::new(BusProbe {
        base,
        latencies: Mutex::new(Vec::new()),
        warm: AtomicU64::new(0),
    });
    let stop = CancellationToken::new();
    let options = ConsumerOptions::from_config(&defaults.consumer, defaults.bus.start_from);
    let group = format!("bench-{}", &run[..12]);
    let consumer = Consumer::new(bus.clone(), &group, &topic, options);
    let running = tokio::spawn(consumer.run(probe.clone(), stop.clone()));
    bus.publish(&topic, OutRecord::new("warm", bus_event("warm", "warm")))
        .await
        .expect("publish");
    while probe.warm.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = cpu_time("self");
    let (failed, send_secs, max_lag) = open_loop(rate, secs, base, |k, stamp| {
        let bus = bus.clone();
        let topic = topic.clone();
        async move {
            let key = format!("conv-{}", k as usize % chats);
            let record = OutRecord::new(key.clone(), bus_event(&key, &format!("message {k}")))
                .with_header("bench-sent", stamp.to_string());
            bus.publish(&topic, record).await.is_ok()
        }
    })
    .await;
    let total = (rate * secs as f64) as u64;
    let deadline = Instant::now() + DRAIN;
    while (probe.latencies.lock().expect("latencies").len() as u64) < total - failed
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    running.await.expect("join").expect("consumer");
    let latencies = std::mem::take(&mut *probe.latencies.lock().expect("latencies"));
    let lost = (total - failed).saturating_sub(latencies.len() as u64);
    Run {
        sent: total,
        errors: failed + lost,
        send_secs,
        max_lag,
        latencies,
        cpu: (0.0, (cpu_time("self") - cpu).as_secs_f64(), 0.0),
        nexus_by_role: Vec::new(),
        peers_by_program: Vec::new(),
    }
}

/// (p50, p99, max) of µs samples, sorted in place.
fn percentiles(v: &mut [u64]) -> (Duration, Duration, Duration) {
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    v.sort_unstable();
    let at = |q: f64| Duration::from_micros(v[((v.len() - 1) as f64 * q).round() as usize]);
    (at(0.50), at(0.99), at(1.0))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let chats: usize = env_or("NEXUS_BENCH_CHATS", 1000);
    let agents: usize = env_or("NEXUS_BENCH_AGENTS", 20);
    let secs: u64 = env_or("NEXUS_BENCH_SECONDS", 10);
    let rates: Vec<f64> = std::env::var("NEXUS_BENCH_RATES")
        .unwrap_or_else(|_| "50,100,200,500,1000,2000,5000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let deployment = Deployment::from_env();
    let nexus = Nexus::start(dir.path(), &deployment).await;
    let clients: Vec<reqwest::Client> = (0..CLIENTS)
        .map(|_| {
            reqwest::Client::builder()
                .http1_only()
                .pool_idle_timeout(Duration::from_secs(300))
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client")
        })
        .collect();
    let http = &clients[0];
    let (tenant, api_key) = provision_tenant(http, &nexus.url).await;
    let seen = Arc::new(Seen {
        base: Instant::now(),
        connected: AtomicUsize::new(0),
        latencies: rates.iter().map(|_| Mutex::new(Vec::new())).collect(),
        errors: AtomicU64::new(0),
    });
    let capacity = chats.div_ceil(agents.max(1));
    for i in 0..agents {
        let a = admin_post(
            http,
            &nexus.url,
            &format!("/tenants/{tenant}/agents"),
            json!({"name": format!("agent {i}"), "skills": [], "capacity": {"chat": capacity}}),
        )
        .await;
        let token = a["token"].as_str().expect("agent token");
        agent(&nexus.url, token, http, seen.clone()).await;
    }
    let setup = Instant::now();
    let sessions: Vec<Session> = stream::iter(0..chats)
        .map(|n| {
            let http = clients[n % CLIENTS].clone();
            let (url, api_key) = (nexus.url.clone(), api_key.clone());
            async move {
                let v: Value = http
                    .post(format!("{url}/nexus/v3/chat/sessions"))
                    .header("x-api-key", api_key)
                    .json(&json!({"nickname": format!("customer {n}")}))
                    .send()
                    .await
                    .expect("start session")
                    .json()
                    .await
                    .expect("session json");
                Session {
                    id: v["session_id"].as_str().expect("session id").to_string(),
                    client_key: v["client_key"].as_str().expect("client key").to_string(),
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let sessions = Arc::new(sessions);
    while seen.connected.load(Ordering::Relaxed) < chats {
        assert!(
            setup.elapsed() < SETUP,
            "{} of {chats} chats connected",
            seen.connected.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen.errors.load(Ordering::Relaxed),
        0,
        "errors during setup"
    );
    println!("chat load on {}", deployment.describe());
    println!(
        "chat load: {chats} chats over {agents} agents ({capacity} chats each), connected in {:.1} s; \
         {secs} s per rate, {CLIENTS} HTTP/1.1 keep-alive clients, {MAX_IN_FLIGHT} sends in flight at most",
        setup.elapsed().as_secs_f64()
    );
    println!(
        "{:>7} {:>8} {:>7} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7} | {:>10} {:>10} {:>10} | {:>12} | {:>6}",
        "rate",
        "achieved",
        "errors",
        "chat p50",
        "p99",
        "max",
        "bus p50",
        "p99",
        "ratio",
        "nexus CPU",
        "peers CPU",
        "bench CPU",
        "CPU per msg",
        "held"
    );
    println!(
        "{:>7} {:>8} {:>7} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7} | {:>10} {:>10} {:>10} | {:>12} |",
        "msg/s", "msg/s", "", "ms", "ms", "ms", "ms", "ms", "chat/bus", "% of 1 core", "", "(chat/bus)", "nexus/peers µs"
    );
    let mut held: Option<f64> = None;
    for (step, &rate) in rates.iter().enumerate() {
        let mut chat = chat_run(
            &nexus, &clients, &api_key, &sessions, &seen, step, rate, secs,
        )
        .await;
        let bus_dir = tempfile::tempdir().expect("tempdir");
        let mut bus = bus_run(bus_dir.path(), &deployment, chats, rate, secs, seen.base).await;
        let (c50, c99, cmax) = percentiles(&mut chat.latencies);
        let (b50, b99, _) = percentiles(&mut bus.latencies);
        let achieved = chat.sent as f64 / chat.send_secs.max(1e-9);
        let ok = chat.errors == 0 && achieved >= 0.95 * rate && c99 <= P99_BOUND;
        if ok {
            held = Some(held.map_or(rate, |h: f64| h.max(rate)));
        }
        let pct = |cpu: f64, secs: f64| format!("{:.0}", cpu / secs * 100.0);
        let span = chat.send_secs;
        println!(
            "{rate:>7.0} {achieved:>8.0} {:>7} | {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>6.1}x | {:>10} {:>10} {:>4}/{:<5} | {:>12} | {:>6}",
            chat.errors,
            ms(c50),
            ms(c99),
            ms(cmax),
            ms(b50),
            ms(b99),
            c99.as_secs_f64() / b99.as_secs_f64().max(1e-9),
            pct(chat.cpu.0, span),
            pct(chat.cpu.2, span),
            pct(chat.cpu.1, span),
            pct(bus.cpu.1, bus.send_secs),
            format!(
                "{:.0}/{:.0}",
                chat.cpu.0 / chat.sent.max(1) as f64 * 1e6,
                chat.cpu.2 / chat.sent.max(1) as f64 * 1e6
            ),
            if ok { "yes" } else { "no" },
        );
        let per_msg = |by: &[(&str, f64)]| {
            by.iter()
                .map(|(name, s)| format!("{name} {:.0}", s / chat.sent.max(1) as f64 * 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:>7} µs CPU per message: nexus {}; peers {}",
            "",
            per_msg(&chat.nexus_by_role),
            per_msg(&chat.peers_by_program)
        );
        if bus.errors > 0 {
            println!("{:>7} bus run: {} errors", "", bus.errors);
        }
        if chat.max_lag > Duration::from_millis(20) {
            println!(
                "{:>7} client lag: a send started {} ms after its slot (the load generator fell behind)",
                "",
                ms(chat.max_lag)
            );
        }
        if !ok {
            if step + 1 < rates.len() {
                println!("{:>7} not held: higher rates not run", "");
            }
            break;
        }
    }
    match held {
        Some(r) => println!(
            "highest rate held (no errors, p99 ≤ {} ms): {r:.0} msg/s = {:.0}x the legacy {LEGACY_RATE:.0} msg/s",
            P99_BOUND.as_millis(),
            r / LEGACY_RATE
        ),
        None => println!(
            "no rate held (no errors, p99 ≤ {} ms); legacy is {LEGACY_RATE:.0} msg/s",
            P99_BOUND.as_millis()
        ),
    }
}
