//! Chat test harness: a running nexus (one `nexus dev` process, or edges and workers on a NATS
//! server of the test's own with PostgreSQL and Redis), provisioning through the admin API,
//! and customer/agent WebSocket clients.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::process::{free_port, listens_on, Nexus, LISTEN_ANY};

pub const ADMIN: &str = "admin-token-for-tests";
pub const CLIENT_KEY_SECRET: &str = "client-key-secret-for-tests";

/// A nats-server of the test's own, killed on drop.
pub struct OwnNats {
    child: std::process::Child,
    pub url: String,
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OwnNats {
    /// Kills the server now (a broker outage).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts nats-server on a port it picks itself (`-p -1`) and reads that port from the
    /// ports file it writes: a port chosen here and bound later by the child could meanwhile
    /// be taken by another test's server, and the test would talk to that one.
    pub async fn start(dir: &Path) -> OwnNats {
        let bin = std::env::var("NEXUS_TEST_NATS_SERVER")
            .expect("NEXUS_TEST_NATS_SERVER (run through `make test`: scripts/services.sh env)");
        let ports_dir = dir.join("nats-ports");
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let child = std::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
            .arg(dir.join("nats"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server");
        // Killed on drop, also if it never answers.
        let mut nats = OwnNats {
            child,
            url: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The one file in the directory, named after the binary and its pid, appears once
            // the server listens; read until it parses whole.
            let ports: Option<Value> = std::fs::read_dir(&ports_dir)
                .ok()
                .and_then(|mut d| d.find_map(|f| f.ok()))
                .and_then(|f| std::fs::read(f.path()).ok())
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(url) = ports.as_ref().and_then(|p| p["nats"][0].as_str()) {
                nats.url = url.to_string();
                return nats;
            }
            if let Ok(Some(status)) = nats.child.try_wait() {
                panic!("nats-server exited with {status}");
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A Tansu (Kafka-protocol) broker of the test's own, in memory, killed on drop.
pub struct OwnKafka {
    child: std::process::Child,
    pub brokers: String,
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OwnKafka {
    /// Tansu must be told its port, so the port is picked here and bound by the child a moment
    /// later; another process may take it in between. So the broker is the test's once the
    /// child itself holds the listening socket; if it exits (the port was taken), it is
    /// started again on another port.
    pub async fn start() -> OwnKafka {
        let bin = std::env::var("NEXUS_TEST_TANSU")
            .expect("NEXUS_TEST_TANSU (run through `make test`: scripts/services.sh env)");
        for _ in 0..5 {
            let port = free_port();
            let url = format!("tcp://127.0.0.1:{port}");
            let child = std::process::Command::new(&bin)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .args(["--storage-engine", "memory://tansu/"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start tansu");
            let mut kafka = OwnKafka {
                child,
                brokers: format!("127.0.0.1:{port}"),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if listens_on(kafka.child.id(), port) {
                    return kafka;
                }
                if kafka.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                assert!(Instant::now() < deadline, "tansu did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("tansu exited on five ports in a row");
    }
}

/// A fresh PostgreSQL database, dropped at the end.
pub struct TestDb {
    pub url: String,
    name: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let base = std::env::var("NEXUS_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("nexus_e2e_{}", uuid::Uuid::new_v4().simple());
        psql(&base, &format!("CREATE DATABASE {name}"));
        let url = match base.rsplit_once('/') {
            Some((head, _)) => format!("{head}/{name}"),
            None => panic!("bad postgres url {base}"),
        };
        TestDb { url, name }
    }

    /// Runs a statement on this database (to break or mend it under a running system).
    pub fn exec(&self, sql: &str) {
        psql(&self.url, sql);
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let base = std::env::var("NEXUS_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        psql(
            &base,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(url: &str, sql: &str) {
    let status = std::process::Command::new("psql")
        .args([url, "-q", "-c", sql])
        .status()
        .expect("psql");
    assert!(status.success(), "psql {sql} failed");
}

/// Env shared by every nexus process of a test system.
pub fn base_env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "RUST_LOG",
            "info,nexus::workers::conversation=debug".to_string(),
        ),
        ("NEXUS_HTTP__ADMIN_TOKEN", ADMIN.to_string()),
        (
            "NEXUS_CHAT__CLIENT_KEY_SECRET",
            CLIENT_KEY_SECRET.to_string(),
        ),
        ("NEXUS_STORES__DATA_DIR", dir.display().to_string()),
        // A Redis namespace per test system: test systems running at once on one Redis must not
        // fire each other's timers.
        (
            "NEXUS_STORES__REDIS_NAMESPACE",
            format!("nxt-{}", uuid::Uuid::new_v4().simple()),
        ),
        // Long enough that a loaded CI machine never lets an offer lapse by accident; the
        // lapse test sets its own.
        (
            "NEXUS_WORKERS__CONVERSATION__OFFER_TIMEOUT_MS",
            "20000".into(),
        ),
        (
            "NEXUS_WORKERS__CONVERSATION__REQUEUE_INTERVAL_MS",
            "300".into(),
        ),
        (
            "NEXUS_WORKERS__CONVERSATION__TIMER_INTERVAL_MS",
            "50".into(),
        ),
        ("NEXUS_CONSUMER__RETRY_INITIAL_MS", "20".into()),
        ("NEXUS_CONSUMER__LAG_INTERVAL_MS", "1000".into()),
    ]
}

/// [`base_env`] for processes on a NATS (test-sized group timeouts: a killed worker's records
/// come back in seconds), a PostgreSQL database and Redis, as the worker-kill tests run them.
pub fn shared_services_env(
    dir: &Path,
    nats_url: &str,
    postgres_url: &str,
) -> Vec<(&'static str, String)> {
    let mut env = base_env(dir);
    env.extend([
        ("NEXUS_BUS__URL", nats_url.to_string()),
        ("NEXUS_BUS__NATS__ACK_WAIT_MS", "1500".into()),
        ("NEXUS_BUS__NATS__LEASE_TTL_MS", "2500".into()),
        // Within JetStream's hand-over wait (twice the ack wait, at least 10 s).
        ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "10000".into()),
        ("NEXUS_STORES__POSTGRES_URL", postgres_url.to_string()),
        ("NEXUS_STORES__PROVISIONING_KEY", "5e".repeat(32)),
        (
            "NEXUS_STORES__REDIS_URL",
            std::env::var("NEXUS_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        ),
    ]);
    env
}

/// One running nexus process with its base URL; a failing test prints its log.
pub struct Node {
    pub nexus: Nexus,
    pub url: String,
    pub name: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.nexus.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            let kept = std::env::temp_dir().join(format!(
                "nexus-failed-{}-{}.log",
                std::process::id(),
                self.name
            ));
            let _ = std::fs::write(&kept, &log);
            eprintln!(
                "---- log of {} (last 60 lines; all of it in {}) ----\n{tail}",
                self.name,
                kept.display()
            );
        }
    }
}

pub async fn start_node(
    dir: &Path,
    name: &str,
    args: &[&str],
    mut env: Vec<(&'static str, String)>,
) -> Node {
    env.push(("NEXUS_HTTP__LISTEN", LISTEN_ANY.to_string()));
    let env: Vec<(&str, String)> = env.into_iter().collect();
    // `nexus dev` takes its data dir and address as flags (they win over the env).
    let data = dir.join(name).display().to_string();
    let mut args: Vec<&str> = args.to_vec();
    if args.first() == Some(&"dev") {
        args.extend(["--data-dir", data.as_str(), "--listen", LISTEN_ANY]);
    }
    let mut nexus = Nexus::start(dir, name, &args, &env);
    let url = format!(
        "http://{}",
        nexus.wait_listening(Duration::from_secs(60)).await
    );
    nexus
        .wait_ready(
            &reqwest::Client::new(),
            &format!("{url}/readyz"),
            Duration::from_secs(60),
        )
        .await;
    Node {
        nexus,
        url,
        name: name.to_string(),
    }
}

/// Admin API calls for a test tenant with one queue, one rule and agents.
pub struct Admin {
    pub http: reqwest::Client,
    pub url: String,
}

impl Admin {
    pub fn new(url: &str) -> Admin {
        Admin {
            http: reqwest::Client::new(),
            url: url.to_string(),
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, body).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::PATCH, path, body).await
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let r = self
            .http
            .request(method.clone(), format!("{}/v1/admin{path}", self.url))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .expect("admin request");
        let status = r.status();
        let text = r.text().await.expect("admin body");
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).expect("admin json")
    }
}

/// A tenant ready for chat: API key, a queue, a rule routing web chat there.
pub struct Tenant {
    pub id: String,
    pub api_key: String,
    pub queue_id: String,
}

pub async fn provision_tenant(admin: &Admin) -> Tenant {
    let name = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let tenant = admin.post("/tenants", json!({"name": name})).await;
    let id = tenant["id"].as_str().expect("tenant id").to_string();
    let key = admin
        .post(
            &format!("/tenants/{id}/api-keys"),
            json!({"name": "widget", "permissions": ["chat"]}),
        )
        .await;
    let queue = admin
        .post(&format!("/tenants/{id}/queues"), json!({"name": "support"}))
        .await;
    let queue_id = queue["id"].as_str().expect("queue id").to_string();
    admin
        .post(
            &format!("/tenants/{id}/routing-rules"),
            json!({"channel": "WEB_CHAT", "queue_id": queue_id, "priority": 1}),
        )
        .await;
    Tenant {
        id,
        api_key: key["key"].as_str().expect("api key").to_string(),
        queue_id,
    }
}

/// Creates an agent; returns (id, token).
pub async fn provision_agent(
    admin: &Admin,
    tenant: &Tenant,
    name: &str,
    chats: u32,
) -> (String, String) {
    let a = admin
        .post(
            &format!("/tenants/{}/agents", tenant.id),
            json!({"name": name, "skills": [], "capacity": {"chat": chats}}),
        )
        .await;
    (
        a["id"].as_str().expect("agent id").to_string(),
        a["token"].as_str().expect("agent token").to_string(),
    )
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A customer starts a chat through the v3 API; (session id, client key).
pub async fn start_session(url: &str, api_key: &str, body: Value) -> (String, String) {
    let v: Value = reqwest::Client::new()
        .post(format!("{url}/nexus/v3/chat/sessions"))
        .header("x-api-key", api_key)
        .json(&body)
        .send()
        .await
        .expect("start")
        .json()
        .await
        .expect("start json");
    (
        v["session_id"].as_str().expect("sid").to_string(),
        v["client_key"].as_str().expect("client key").to_string(),
    )
}

/// A customer's v3 session: where and with which keys it is reached.
#[derive(Clone)]
pub struct Customer {
    pub url: String,
    pub api_key: String,
    pub sid: String,
    pub ck: String,
}

impl Customer {
    /// Starts a v3 session with `nickname` through the edge at `url`.
    pub async fn start(url: &str, api_key: &str, nickname: &str) -> Customer {
        let (sid, ck) = start_session(url, api_key, json!({ "nickname": nickname })).await;
        Customer {
            url: url.to_string(),
            api_key: api_key.to_string(),
            sid,
            ck,
        }
    }

    /// Sends a message (202 expected).
    pub async fn send(&self, text: &str) {
        let r = reqwest::Client::new()
            .post(format!(
                "{}/nexus/v3/chat/sessions/{}/messages",
                self.url, self.sid
            ))
            .header("x-api-key", &self.api_key)
            .header("x-nexus-client-key", &self.ck)
            .json(&json!({"text": text}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 202);
    }

    /// Reads the transcript with `query` (`from=…&wait_s=…`), through the edge at `url`.
    pub async fn transcript_at(&self, url: &str, query: &str) -> Value {
        let r = reqwest::Client::new()
            .get(format!(
                "{url}/nexus/v3/chat/sessions/{}/messages?{query}",
                self.sid
            ))
            .header("x-api-key", &self.api_key)
            .header("x-nexus-client-key", &self.ck)
            .send()
            .await
            .expect("transcript");
        assert_eq!(r.status(), 200);
        r.json().await.expect("transcript json")
    }
}

/// `GET /v1/agent/me`; `None` if it cannot be read.
pub async fn agent_me(url: &str, token: &str) -> Option<Value> {
    reqwest::Client::new()
        .get(format!("{url}/v1/agent/me"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// An agent's WebSocket, signed in and ready (the worker applied it: `/v1/agent/me` says so).
pub async fn agent_ready(url: &str, token: &str) -> Ws {
    const WAIT: Duration = Duration::from_secs(60);
    let mut agent = ws_connect(&format!("{url}/v1/agent/ws?token={token}")).await;
    ws_until(&mut agent, WAIT, |v| v["type"] == "hello").await;
    ws_send(&mut agent, json!({"op": "ready", "request_id": "ready"})).await;
    let ack = ws_until(&mut agent, WAIT, |v| v["request_id"] == "ready").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    eventually(WAIT, "agent ready", || async {
        (agent_me(url, token).await?["ready"] == true).then_some(())
    })
    .await;
    agent
}

pub async fn ws_connect(url: &str) -> Ws {
    let url = url.replacen("http://", "ws://", 1);
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket");
    ws
}

/// The next JSON text frame matching `pred`, within `within`; others are skipped.
pub async fn ws_until(ws: &mut Ws, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let mut frames = ws_frames_until(ws, within, pred).await;
    frames.pop().expect("the matching frame")
}

/// Every JSON text frame up to and including the first matching `pred`, within `within`.
pub async fn ws_frames_until(
    ws: &mut Ws,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, ws.next())
            .await
            .expect("timed out waiting for a websocket message")
            .expect("websocket closed")
            .expect("websocket error");
        if let WsMessage::Text(t) = frame {
            let v: Value = serde_json::from_str(t.as_str()).expect("json frame");
            let done = pred(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
    }
}

/// Accepts `offer` of conversation `sid` on the agent's socket and waits until it is connected.
pub async fn accept_offer(ws: &mut Ws, sid: &str, offer: &Value) {
    ws_send(
        ws,
        serde_json::json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    ws_until(ws, Duration::from_secs(20), |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
}

pub async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(WsMessage::Text(v.to_string().into()))
        .await
        .expect("websocket send");
}

/// Polls `f` until it returns Some, within `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The multipart boundary of [`multipart`].
pub const BOUNDARY: &str = "nexus-test-boundary-7MA4YWxkTrZu0gW";

/// A multipart part: `(name, file name, content type, bytes)`.
pub type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

/// A `multipart/form-data` body (boundary [`BOUNDARY`]) of `parts`.
pub fn multipart(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, file_name, content_type, data) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(f) = file_name {
            disposition.push_str(&format!("; filename=\"{f}\""));
        }
        body.extend_from_slice(format!("{disposition}\r\n").as_bytes());
        if let Some(t) = content_type {
            body.extend_from_slice(format!("Content-Type: {t}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// The `Content-Type` of a [`multipart`] body.
pub fn multipart_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

/// A [`multipart`] body of one `file` part named `name`, of `content_type`, holding `data`.
pub fn file_part(name: &str, content_type: &str, data: &[u8]) -> Vec<u8> {
    multipart(&[("file", Some(name), Some(content_type), data)])
}

/// A PNG-looking file of `len` bytes (the signature, then filler).
pub fn png(len: usize) -> Vec<u8> {
    let mut data = b"\x89PNG\r\n\x1a\n".to_vec();
    data.extend((0..len.saturating_sub(8)).map(|i| (i % 251) as u8));
    data.truncate(len);
    data
}
