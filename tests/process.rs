//! The `nexus` binary end to end: `nexus dev` serves health and metrics, consumes what the
//! ingest endpoint publishes (lag back to 0), serves HTTPS when configured; the CLI's config,
//! topology and schema commands behave as documented.

use crate::common;

use std::time::{Duration, Instant};

use common::process::{metric_sum, run, Nexus, LISTEN_ANY};
use serde_json::json;

const TOKEN: &str = "dev-admin-token";

/// Starts `nexus dev` on a port the kernel picks; returns it with the port.
async fn dev(dir: &std::path::Path, extra: &[(&str, String)]) -> (Nexus, u16) {
    let data = dir.join("data");
    let mut env = vec![
        ("NEXUS_HTTP__ADMIN_TOKEN", TOKEN.to_string()),
        ("NEXUS_CONSUMER__LAG_INTERVAL_MS", "200".to_string()),
    ];
    env.extend(extra.iter().cloned());
    let mut nexus = Nexus::start(
        dir,
        "dev",
        &[
            "dev",
            "--data-dir",
            data.to_str().expect("utf8"),
            "--listen",
            LISTEN_ANY,
        ],
        &env,
    );
    let addr = nexus.wait_listening(Duration::from_secs(60)).await;
    let port = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("a port in the listening address");
    (nexus, port)
}

/// Without the flags, `nexus dev` takes its address and data dir from the config (env here).
#[tokio::test]
async fn dev_without_flags_uses_the_configured_address_and_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("from-env");
    let mut nexus = Nexus::start(
        dir.path(),
        "dev",
        &["dev"],
        &[
            ("NEXUS_HTTP__LISTEN", LISTEN_ANY.to_string()),
            ("NEXUS_STORES__DATA_DIR", data.display().to_string()),
        ],
    );
    let addr = nexus.wait_listening(Duration::from_secs(60)).await;
    assert!(!addr.ends_with(":8080"), "listening on {addr}");
    assert!(data.join("bus").is_dir(), "no bus under {}", data.display());
}

#[tokio::test]
async fn dev_consumes_ingested_events_and_lag_returns_to_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut nexus, port) = dev(dir.path(), &[]).await;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    nexus
        .wait_ready(&client, &format!("{base}/readyz"), Duration::from_secs(60))
        .await;

    let event = json!({
        "event_type": "MessageReceived",
        "tenant_id": "tenant-a",
        "conversation_id": "0193a4b2-0000-7000-8000-000000000001",
        "body": {"message_id": "0193a4b2-0000-7000-8000-0000000000aa", "participant_id": "c1", "text": "hi"}
    });
    let resp = client
        .post(format!("{base}/v1/events/nexus.inbound.v1"))
        .bearer_auth(TOKEN)
        .json(&event)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 202);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let group = "group=\"nexus-conversation\"";
        let topic = "topic=\"nexus.inbound.v1\"";
        let consumed = metric_sum(
            &metrics,
            "nexus_events_consumed_total",
            &[topic, group, "outcome=\"ok\""],
        );
        let lag = metric_sum(&metrics, "nexus_consumer_lag", &[topic, group]);
        let published = metric_sum(&metrics, "nexus_events_published_total", &[topic]);
        if consumed == Some(1.0) && lag == Some(0.0) && published == Some(1.0) {
            assert!(
                metrics.contains("nexus_event_handle_seconds_bucket"),
                "histogram exported"
            );
            assert!(
                metrics.contains("nexus_bus_publish_seconds_bucket"),
                "histogram exported"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumed={consumed:?} lag={lag:?} published={published:?}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn https_edge_when_a_certificate_is_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("cert");
    let cert_pem = cert.cert.pem();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, &cert_pem).expect("write cert");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("write key");
    let (mut nexus, port) = dev(
        dir.path(),
        &[
            ("NEXUS_HTTP__TLS_CERT_FILE", cert_path.display().to_string()),
            ("NEXUS_HTTP__TLS_KEY_FILE", key_path.display().to_string()),
        ],
    )
    .await;
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("pem"))
        .build()
        .expect("client");
    let url = format!("https://localhost:{port}/healthz");
    nexus
        .wait_ready(&client, &url, Duration::from_secs(60))
        .await;
    let body: serde_json::Value = client
        .get(&url)
        .send()
        .await
        .expect("https")
        .json()
        .await
        .expect("json");
    assert_eq!(body["status"], "ok");
    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
}

#[test]
fn config_check_redacts_secrets_and_names_bad_keys() {
    let (ok, out, err) = run(
        &["config", "check"],
        &[("NEXUS_HTTP__ADMIN_TOKEN", "very-secret".into())],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("admin_token = \"<redacted>\"") && !out.contains("very-secret"),
        "{out}"
    );
    // Secrets made of digits or brackets are strings like any other, and are not printed.
    let (ok, out, err) = run(
        &["config", "check"],
        &[
            ("NEXUS_HTTP__ADMIN_TOKEN", "0123456789".into()),
            ("NEXUS_BUS__NATS__TOKEN", "true".into()),
            ("NEXUS_CONSUMER__CONCURRENCY", "3".into()),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        !out.contains("0123456789") && !err.contains("0123456789"),
        "{out}{err}"
    );
    assert!(out.contains("concurrency = 3"), "{out}");

    let (ok, _, err) = run(
        &["config", "check"],
        &[("NEXUS_BUS__URL", "carrier-pigeon://x:1".into())],
    );
    assert!(!ok);
    assert!(err.contains("bus.url"), "{err}");

    // What Kubernetes puts in a pod for a Service named nexus-edge is not config.
    let (ok, _, err) = run(
        &["config", "check"],
        &[
            ("NEXUS_EDGE_SERVICE_HOST", "10.0.0.7".into()),
            ("NEXUS_EDGE_SERVICE_PORT", "8080".into()),
            ("NEXUS_EDGE_PORT", "tcp://10.0.0.7:8080".into()),
            ("NEXUS_EDGE_PORT_8080_TCP_ADDR", "10.0.0.7".into()),
        ],
    );
    assert!(ok, "{err}");
    // The webhooks role's own rules are checked at load too, naming the key.
    let (ok, _, err) = run(
        &["config", "check"],
        &[("NEXUS_WORKERS__WEBHOOKS__RETRY_SCHEDULE_MS", "[]".into())],
    );
    assert!(!ok, "an empty retry schedule must fail");
    assert!(err.contains("workers.webhooks.retry_schedule_ms"), "{err}");

    let (ok, _, err) = run(
        &["config", "check"],
        &[("NEXUS_CONSUMER__CONCURENCY", "3".into())],
    );
    assert!(!ok, "an unknown key must fail");
    assert!(err.contains("concurency"), "{err}");

    // Pods on a broker bus that would keep state of their own (sessions, provisioning, the
    // client-key secret) are refused before anything starts, naming the key.
    let broker = ("NEXUS_BUS__URL", "nats://127.0.0.1:1".to_string());
    let redis = ("NEXUS_STORES__REDIS_URL", "redis://127.0.0.1:1".to_string());
    let postgres = (
        "NEXUS_STORES__POSTGRES_URL",
        "postgres://127.0.0.1:1/x".to_string(),
    );
    let key = ("NEXUS_STORES__PROVISIONING_KEY", "5e".repeat(32));
    let secret = ("NEXUS_CHAT__CLIENT_KEY_SECRET", "s".to_string());
    type Env<'a> = Vec<(&'a str, String)>;
    let cases: [(&[&str], Env, &str); 5] = [
        (&["edge"], vec![broker.clone()], "stores.redis_url"),
        (
            &["worker", "conversation"],
            vec![broker.clone()],
            "stores.redis_url",
        ),
        (
            &["edge"],
            vec![broker.clone(), redis.clone()],
            "stores.postgres_url",
        ),
        (
            &["worker", "gws"],
            vec![broker.clone()],
            "stores.postgres_url",
        ),
        (
            &["edge"],
            vec![broker.clone(), redis.clone(), postgres.clone(), key.clone()],
            "chat.client_key_secret",
        ),
    ];
    for (args, env, want) in cases {
        let (ok, _, err) = run(args, &env);
        assert!(!ok, "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // With all of them set it goes on, as far as the (absent) broker.
    let (ok, _, err) = run(&["edge"], &[broker, redis, postgres, key, secret]);
    assert!(!ok);
    assert!(!err.contains("is not set"), "{err}");
    let (ok, _, err) = run(
        &["worker", "tap"],
        &[
            ("NEXUS_BUS__URL", "nats://127.0.0.1:1".into()),
            ("NEXUS_WORKERS__TAP__URL", "http://127.0.0.1:9/".into()),
        ],
    );
    assert!(!ok, "no broker there");
    assert!(!err.contains("stores.redis_url"), "{err}");
}

#[test]
fn topology_plan_apply_twice_and_asyncapi_on_the_embedded_bus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = format!("embedded://{}", dir.path().join("bus").display());
    let (ok, plan, err) = run(&["topology", "plan", "--bus", &bus], &[]);
    assert!(ok, "{err}");
    let topology = nexus::topology::Topology::builtin();
    for t in &topology.topics {
        assert!(plan.contains(&t.name), "plan lists {}:\n{plan}", t.name);
    }
    let (ok, first, err) = run(&["topology", "apply", "--bus", &bus], &[]);
    assert!(ok, "{err}");
    let (ok, second, err) = run(&["topology", "apply", "--bus", &bus], &[]);
    assert!(ok, "{err}");
    assert_ne!(first, second);
    assert!(
        second.contains("Applied: 0 created, 0 updated"),
        "second apply changes nothing:\n{second}"
    );

    let (ok, doc, err) = run(&["topology", "asyncapi"], &[]);
    assert!(ok, "{err}");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&doc).expect("asyncapi is YAML");
    assert_eq!(yaml["asyncapi"].as_str(), Some("3.0.0"));
    let channels = yaml["channels"].as_mapping().expect("channels");
    for t in &topology.topics {
        assert!(
            channels
                .values()
                .any(|c| c["address"].as_str() == Some(t.name.as_str())),
            "asyncapi has {}",
            t.name
        );
    }
}

#[test]
fn schemas_check_passes_on_the_built_in_schemas() {
    let (ok, out, err) = run(&["schemas", "check"], &[]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(
        &[
            "schemas",
            "check",
            "--dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/schemas"),
        ],
        &[],
    );
    assert!(ok, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refuses_to_start_when_topics_are_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bus");
    let bus = format!("embedded://{}", path.display());
    let env = |bus: &str| {
        [
            ("NEXUS_BUS__URL", bus.to_string()),
            ("NEXUS_HTTP__LISTEN", LISTEN_ANY.to_string()),
        ]
    };
    // No bus in that directory (a misspelt path): refused, and nothing created there (before,
    // an empty bus was, and `topology apply` on it gave the worker a bus nobody writes to).
    let (ok, _, err) = run(&["worker", "conversation"], &env(&bus));
    assert!(!ok);
    assert!(
        err.contains("holds no embedded bus") && err.contains("nexus topology apply"),
        "{err}"
    );
    assert!(!path.exists(), "a bus was created at {}", path.display());
    // A bus without the role's topics: refused, saying to run apply.
    let mut config = nexus::config::Config::defaults().bus;
    config.url = bus.clone();
    drop(nexus::bus::connect(&config).await.expect("an empty bus"));
    let (ok, _, err) = run(&["worker", "conversation"], &env(&bus));
    assert!(!ok);
    assert!(
        err.contains("nexus topology apply") && !err.contains("holds no embedded bus"),
        "{err}"
    );
    // The edges' broadcast read is no worker role.
    let (ok, _, err) = run(&["worker", "edge"], &env(&bus));
    assert!(!ok);
    assert!(err.contains("broadcast role"), "{err}");
}

/// `nexus replay` from the command line on an embedded bus: the dry run prints the counts and
/// changes nothing, `--execute` moves the group, `--copy-to` copies a range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_cli_dry_run_execute_and_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("embedded://{}", dir.path().join("bus").display());
    let t = {
        let mut config = nexus::config::Config::defaults().bus;
        config.url = url.clone();
        nexus::bus::connect(&config).await.expect("bus")
    };
    for name in ["orders", "orders.dlq", "copy"] {
        t.apply_topic(&nexus::bus::TopicSpec {
            name: name.into(),
            partitions: 2,
            retention: None,
        })
        .await
        .expect("topic");
    }
    for n in 0..10 {
        t.publish("orders", common::event_record(&format!("conv-{n}"), n))
            .await
            .expect("publish");
    }
    let mut sub = t
        .subscribe("g", "orders", nexus::bus::SubscribeOptions::default())
        .await
        .expect("subscribe");
    common::take(&mut sub, 10, Duration::from_secs(10), true).await;
    sub.close().await.expect("close");
    drop(t);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let lag = |url: String| async move {
        let mut config = nexus::config::Config::defaults().bus;
        config.url = url;
        let bus = nexus::bus::connect(&config).await.expect("bus");
        let lag: u64 = bus
            .group_positions("g", "orders")
            .await
            .expect("positions")
            .iter()
            .map(|p| p.lag)
            .sum();
        lag
    };
    let replay = |mode: &str| {
        run(
            &[
                "replay",
                "--bus",
                &url,
                "--topic",
                "orders",
                "--group",
                "g",
                "--from-offset",
                "0",
                mode,
            ],
            &[],
        )
    };
    let (ok, out, err) = replay("--dry-run");
    assert!(ok, "{err}");
    let total = out
        .lines()
        .find(|l| l.trim_start().starts_with("TOTAL"))
        .expect("TOTAL line");
    assert_eq!(
        total.split_whitespace().collect::<Vec<_>>(),
        vec!["TOTAL", "10", "10", "0"],
        "{out}"
    );
    assert_eq!(lag(url.clone()).await, 0, "a dry run changes nothing");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (ok, out, err) = replay("--execute");
    assert!(ok, "{out}{err}");
    assert_eq!(
        lag(url.clone()).await,
        10,
        "the group will reprocess all ten"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let copy = |mode: &[&str]| {
        let mut args = vec![
            "replay",
            "--bus",
            url.as_str(),
            "--topic",
            "orders",
            "--copy-to",
            "copy",
            "--from-offset",
            "0",
        ];
        args.extend_from_slice(mode);
        run(&args, &[])
    };
    // A copy moves no group: naming one (or --force) is a mistake said, not ignored.
    for mode in [
        &["--group", "g", "--dry-run"][..],
        &["--force", "--dry-run"],
    ] {
        let (ok, out, err) = copy(mode);
        assert!(!ok && err.contains("cannot be used with"), "{out}{err}");
    }
    let (ok, out, err) = copy(&["--execute"]);
    assert!(ok, "{out}{err}");
    let mut config = nexus::config::Config::defaults().bus;
    config.url = url.clone();
    let bus = nexus::bus::connect(&config).await.expect("bus");
    let copied: u64 = bus
        .partition_offsets("copy")
        .await
        .expect("offsets")
        .iter()
        .map(|p| p.high - p.low)
        .sum();
    assert_eq!(copied, 10);
}
