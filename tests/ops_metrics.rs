//! The alert rules and the dashboard of `charts/nexus/files/` against nexus itself: every metric
//! they use is one a live `nexus dev` exports (scraped after a little chat traffic), and the rules
//! pass `promtool check rules` and their unit tests (`tests/promtool/alerts_test.yaml`).
//!
//! promtool comes from Debian's `prometheus` package; without it the promtool test skips with a
//! message, unless NEXUS_TEST_REQUIRE_TOOLS=1 (set by `.ci/run`).

use crate::common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::chat::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// Metrics nexus only exports once the thing they count has happened (a dead letter, a failed
/// publish or lag measurement, a peer call): a short run cannot show them, so for these the name
/// must be one `src/telemetry/metrics.rs` declares.
const EVENT_ONLY: &[&str] = &[
    "nexus_events_dead_lettered_total",
    "nexus_bus_publish_errors_total",
    "nexus_consumer_lag_errors_total",
    "nexus_peer_calls_total",
    "nexus_peer_call_duration_seconds",
    "nexus_worker_paused",
    // A dev run without webhook subscriptions sends nothing.
    "nexus_webhook_attempts_total",
    "nexus_webhook_attempt_duration_seconds",
    "nexus_webhook_retry_queue_depth",
    "nexus_webhook_oldest_pending_age_seconds",
    "nexus_webhook_dead_lettered_total",
    "nexus_webhook_endpoints_disabled_total",
    "nexus_webhook_endpoint_pauses_total",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `nexus_*` identifier in a PromQL text.
fn metric_names(text: &str, into: &mut BTreeSet<String>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("nexus_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            into.insert(text[start..end].to_string());
        }
        i = end;
    }
}

/// Metric names used by the alert rules (`expr`) and the dashboard (targets, variables).
fn used_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("charts/nexus/files/alerts.yaml")).unwrap(),
    )
    .unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            metric_names(rule["expr"].as_str().expect("expr"), &mut names);
        }
    }
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("charts/nexus/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    fn walk(v: &Value, names: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if let (Some(s), true) = (v.as_str(), k == "expr" || k == "query") {
                        metric_names(s, names);
                    }
                    walk(v, names);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, names)),
            _ => {}
        }
    }
    walk(&dash, &mut names);
    names
}

/// Sample names in a Prometheus text exposition (histograms as `_bucket`/`_sum`/`_count`).
fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The metric names `src/telemetry/metrics.rs` declares.
fn declared_names() -> BTreeSet<String> {
    let src = std::fs::read_to_string(root().join("src/telemetry/metrics.rs")).unwrap();
    src.lines()
        .filter(|l| l.trim_start().starts_with("pub const") && l.contains("&str"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect()
}

/// A histogram sample name's metric: `x_bucket` / `x_sum` / `x_count` → `x`.
fn base_name(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return base;
        }
    }
    name
}

/// A customer starts a chat on a fresh tenant: the edge publishes, the conversation worker
/// consumes and publishes the interaction stream, the other roles consume that.
async fn drive_chat(url: &str) {
    let http = reqwest::Client::new();
    let admin = Admin::new(url);
    let tenant = provision_tenant(&admin).await;
    let (_id, _token) = provision_agent(&admin, &tenant, "alice", 1).await;
    let started: Value = http
        .post(format!("{url}/nexus/v3/chat/sessions"))
        .header("x-api-key", &tenant.api_key)
        .json(&json!({"nickname": "Ann"}))
        .send()
        .await
        .expect("start chat")
        .json()
        .await
        .expect("start json");
    let sid = started["session_id"].as_str().expect("session id");
    let ck = started["client_key"].as_str().expect("client key");
    let r = http
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", ck)
        .json(&json!({"text": "hello", "message_id": "m-1"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    // One 4xx on a templated route too, for the errors-by-route panel.
    let r = http
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/typing"))
        .json(&json!({}))
        .send()
        .await
        .expect("unauthenticated typing");
    assert!(r.status().is_client_error(), "{}", r.status());
}

#[tokio::test]
async fn dashboard_and_alert_metrics_are_exported_by_a_live_nexus() {
    let used = used_names();
    assert!(used.len() >= 10, "too few metric names found: {used:?}");
    let declared = declared_names();

    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "dev", &["dev"], base_env(dir.path())).await;
    drive_chat(&node.url).await;

    let http = reqwest::Client::new();
    let metrics_url = format!("{}/metrics", node.url);
    // Wait for the interaction stream to be consumed and the lag to be measured.
    let scraped = eventually(WAIT, "the chat's events handled and lag measured", || {
        let (http, url) = (http.clone(), metrics_url.clone());
        async move {
            let text = http.get(&url).send().await.ok()?.text().await.ok()?;
            let handled = common::process::metric_sum(
                &text,
                "nexus_event_handle_seconds_count",
                &["group=\"nexus-conversation\""],
            )?;
            let lag = common::process::metric_sum(
                &text,
                "nexus_consumer_lag",
                &["group=\"nexus-history\""],
            );
            let interaction_consumed = common::process::metric_sum(
                &text,
                "nexus_events_consumed_total",
                &["topic=\"nexus.interaction.v1\"", "outcome=\"ok\""],
            )?;
            (handled >= 2.0 && lag.is_some() && interaction_consumed >= 1.0)
                .then(|| scraped_names(&text))
        }
    })
    .await;

    let mut missing = Vec::new();
    for name in &used {
        if scraped.contains(name) {
            continue;
        }
        let base = base_name(name);
        if EVENT_ONLY.contains(&base) && declared.contains(base) {
            continue;
        }
        missing.push(name.clone());
    }
    assert!(
        missing.is_empty(),
        "the rules/dashboard use metrics nexus does not export: {missing:?}\nexported: {scraped:?}"
    );
    // The lists above must not hide a typo: each event-only name is declared by nexus.
    for name in EVENT_ONLY {
        assert!(
            declared.contains(*name),
            "{name} is not in src/telemetry/metrics.rs"
        );
    }
    // The dashboard's core panels are backed by samples a live system has, not just names.
    for name in [
        "nexus_consumer_lag",
        "nexus_events_consumed_total",
        "nexus_event_handle_seconds_bucket",
        "nexus_http_requests_total",
        "nexus_http_request_duration_seconds_bucket",
        "nexus_events_published_total",
        "nexus_bus_up",
    ] {
        assert!(used.contains(name), "the dashboard/rules do not use {name}");
        assert!(scraped.contains(name), "nexus dev does not export {name}");
    }
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
        eprintln!("SKIPPED: promtool not found (apt-get install prometheus); rules not checked");
    }
    found
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let rules = root().join("charts/nexus/files/alerts.yaml");
    let out = Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&promtool)
        .current_dir(root().join("tests/promtool"))
        .args(["test", "rules", "alerts_test.yaml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every alert has at least one unit test.
    let tests = std::fs::read_to_string(root().join("tests/promtool/alerts_test.yaml")).unwrap();
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&rules).unwrap()).unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "alert {name} has no promtool unit test"
            );
        }
    }
}
