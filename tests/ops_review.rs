//! Operations review: `/readyz` against the chart's probe timeout, the metrics the alert rules
//! need from the start, and further promtool unit tests of the rules
//! (`tests/promtool/ops_review_test.yaml`).
//!
//! Real services (`scripts/services.sh env`): NATS JetStream, PostgreSQL and Redis, reached
//! through a TCP relay of the test's own that can stop passing bytes (a hung dependency).

use crate::common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus::config::Config;
use nexus::edge::AppState;
use nexus::stores::provisioning::secrets::EncryptionKey;
use nexus::stores::provisioning::Provisioning;
use nexus::stores::session::SessionStore;
use nexus::topology::Topology;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A TCP relay to `upstream`; while frozen it passes no byte either way but keeps every
/// connection open, as a hung server or a black-holed network does.
struct Relay {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let frozen = Arc::new(AtomicBool::new(false));
        let held = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, held.clone()));
                tokio::spawn(pump(sr, cw, held.clone()));
            }
        });
        Relay { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `url` with its host and port replaced by the relay's.
fn via(url: &str, relay: &Relay) -> String {
    let mut u = reqwest::Url::parse(url).expect("service url");
    u.set_host(Some("127.0.0.1")).expect("host");
    u.set_port(Some(relay.addr.port())).expect("port");
    u.to_string()
}

/// `host:port` of a service url.
fn host_port(url: &str) -> String {
    let u = reqwest::Url::parse(url).expect("service url");
    format!(
        "{}:{}",
        u.host_str().expect("host"),
        u.port_or_known_default().expect("port")
    )
}

/// The readiness probe's `timeoutSeconds` the chart sets by default.
fn chart_readiness_timeout() -> Duration {
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("charts/nexus/values.yaml")).expect("values.yaml"),
    )
    .expect("values yaml");
    let secs = values["probes"]["readiness"]["timeoutSeconds"]
        .as_u64()
        .expect("probes.readiness.timeoutSeconds");
    Duration::from_secs(secs)
}

/// Serves the edge's routes for `state` on a free port; its base url.
async fn serve(state: AppState) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind edge");
    let addr = listener.local_addr().expect("edge addr");
    tokio::spawn(async move { axum::serve(listener, nexus::edge::app(state)).await });
    format!("http://{addr}")
}

/// With the bus, the provisioning database and the session store all hanging, `/readyz` still
/// answers 503 within the probe timeout the chart gives the kubelet (checks one after the
/// other took one timeout each), and `nexus_bus_up` drops to 0 (a request the kubelet gave
/// up on never set it).
#[tokio::test]
async fn readyz_answers_within_the_chart_probe_timeout_when_every_dependency_hangs() {
    let nats_url =
        std::env::var("NEXUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:14222".into());
    let redis_url =
        std::env::var("NEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let db = common::chat::TestDb::create().await;
    let nats = Relay::start(host_port(&nats_url)).await;
    let pg = Relay::start(host_port(&db.url)).await;
    let redis = Relay::start(host_port(&redis_url)).await;

    let mut config = Config::defaults();
    config.bus = common::bus_config("jetstream", None);
    config.bus.url = via(&nats_url, &nats);
    let bus = nexus::bus::connect(&config.bus).await.expect("bus");
    let provisioning = Provisioning::connect(&via(&db.url, &pg), &EncryptionKey::generate())
        .await
        .expect("provisioning");
    let namespace = format!("nxops-{}", uuid::Uuid::new_v4().simple());
    let sessions: Arc<dyn SessionStore> = Arc::new(
        nexus::stores::session::redis::RedisStore::connect_in(&via(&redis_url, &redis), &namespace)
            .await
            .expect("redis"),
    );
    let state = AppState::new(
        Arc::new(config),
        bus,
        Arc::new(Topology::builtin()),
        nexus::telemetry::init_metrics(),
        Arc::new(provisioning),
        sessions,
    );
    let url = serve(state.clone()).await;
    let probe = reqwest::Client::builder()
        .timeout(chart_readiness_timeout())
        .build()
        .expect("client");
    let ready = probe
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);

    for relay in [&nats, &pg, &redis] {
        relay.freeze();
    }
    let started = Instant::now();
    let answer = probe.get(format!("{url}/readyz")).send().await;
    let took = started.elapsed();
    let answer = answer.unwrap_or_else(|e| {
        panic!("/readyz gave no answer within the chart's probe timeout ({took:?}): {e}")
    });
    assert_eq!(answer.status(), 503);
    let rendered = state.metrics.render();
    assert!(
        rendered.lines().any(|l| l == "nexus_bus_up 0"),
        "nexus_bus_up not 0 after a failed check:\n{rendered}"
    );
}

/// Counters an alert takes `increase()` of must exist at 0 before the first event: a series
/// that first appears at 1 has no increase, and the alert never fires for it.
#[test]
fn unlabelled_counters_the_alerts_use_are_exported_at_zero_from_the_start() {
    let rendered = nexus::telemetry::init_metrics().render();
    assert!(
        rendered
            .lines()
            .any(|l| l == "nexus_webhook_endpoints_disabled_total 0"),
        "nexus_webhook_endpoints_disabled_total is not exported before its first event:\n{rendered}"
    );
}

fn promtool() -> Option<PathBuf> {
    let found = Command::new("sh")
        .args(["-c", "command -v promtool"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if found.is_none() {
        assert!(
            std::env::var("NEXUS_TEST_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "promtool is required (NEXUS_TEST_REQUIRE_TOOLS=1): apt-get install prometheus"
        );
        eprintln!("SKIPPED: promtool not found (apt-get install prometheus); rules not tested");
    }
    found
}

/// The rule cases of `tests/promtool/ops_review_test.yaml`.
#[test]
fn alert_rules_pass_the_ops_review_promtool_cases() {
    let Some(promtool) = promtool() else { return };
    let out = Command::new(&promtool)
        .args(["test", "rules", "ops_review_test.yaml"])
        .current_dir(root().join("tests/promtool"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
