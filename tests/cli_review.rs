//! CLI traps found in review, against the `nexus` binary: `replay` and `topology plan` refuse an
//! embedded directory that holds no bus (instead of creating one and calling every topic
//! missing), a topology with an absurd partition count is refused at start (instead of hanging),
//! and a second Ctrl-C during a drain exits at once.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{run, Nexus, LISTEN_ANY};

const TOKEN: &str = "cli-review-token";

#[test]
fn replay_and_plan_refuse_a_directory_without_an_embedded_bus() {
    let dir = tempfile::tempdir().unwrap();
    // As after `nexus dev --data-dir elsewhere` with the default pointing here, or a typo.
    let missing = dir.path().join("nexus-typo").join("bus");
    let url = format!("embedded://{}", missing.display());
    let replays: [&[&str]; 2] = [
        &[
            "replay",
            "--bus",
            &url,
            "--topic",
            "nexus.inbound.v1",
            "--group",
            "g",
            "--from-offset",
            "0",
            "--dry-run",
        ],
        &[
            "replay",
            "--bus",
            &url,
            "--topic",
            "nexus.inbound.v1.dlq",
            "--copy-to",
            "nexus.inbound.v1",
            "--from-offset",
            "0",
            "--execute",
        ],
    ];
    let says_so = |err: &str| {
        err.contains(&missing.display().to_string())
            && err.contains("holds no embedded bus")
            && err.contains("--data-dir")
            && err.contains("bus.url")
    };
    for args in replays {
        let (ok, out, err) = run(args, &[]);
        assert!(!ok, "{args:?} succeeded:\n{out}\n{err}");
        assert!(says_so(&err), "{args:?}:\n{err}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
    // A plan is made against the empty bus apply would create, with the same warning, and
    // creates nothing.
    let (ok, out, err) = run(&["topology", "plan", "--bus", &url], &[]);
    assert!(ok, "{out}\n{err}");
    assert!(says_so(&err), "plan:\n{err}");
    assert!(out.contains("nexus.inbound.v1"), "{out}");
    assert!(!missing.exists(), "plan created {}", missing.display());

    // Once a bus exists there (apply creates it), the same commands read it.
    let (ok, _, err) = run(&["topology", "apply", "--bus", &url], &[]);
    assert!(ok, "apply: {err}");
    let (ok, out, err) = run(&["topology", "plan", "--bus", &url], &[]);
    assert!(
        ok && !err.contains("holds no embedded bus"),
        "plan after apply: {out}\n{err}"
    );
    let (ok, out, err) = run(replays[0], &[]);
    assert!(ok, "replay after apply: {out}\n{err}");
}

#[tokio::test]
async fn dev_refuses_a_topology_with_too_many_partitions_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.yaml");
    std::fs::write(
        &file,
        "topics:\n  - name: t.huge\n    partitions: 4000000000\n    retention: 1d\n",
    )
    .unwrap();
    let data = dir.path().join("data").display().to_string();
    let mut nexus = Nexus::start(
        dir.path(),
        "dev",
        &["dev", "--data-dir", &data, "--listen", LISTEN_ANY],
        &[("NEXUS_TOPOLOGY__FILE", file.display().to_string())],
    );
    let status = wait_exit(&mut nexus, Duration::from_secs(30)).await;
    let log = nexus.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&file.display().to_string())
            && log.contains("t.huge")
            && log.contains("10000"),
        "{log}"
    );
}

/// A peer that accepts connections and never answers: a tap delivery to it stays in flight, so
/// a drain waits for it.
/// Returns its URL and how many connections it took.
async fn silent_peer() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    (url, calls)
}

async fn wait_calls(calls: &AtomicUsize, n: usize, nexus: &Nexus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while calls.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "the tap made no call {n}:\n{}",
            nexus.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tap_topology(dir: &Path) -> String {
    let path = dir.join("topology.yaml");
    std::fs::write(
        &path,
        "topics:\n  - name: t.tap\n    partitions: 1\n    retention: 1d\n    dlq: true\n    events: [MessageReceived]\nroles:\n  - name: tap\n    group: g-tap\n    topics: [t.tap]\n    concurrency: 1\n",
    )
    .unwrap();
    path.display().to_string()
}

async fn wait_exit(nexus: &mut Nexus, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = nexus.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < within,
            "still running after {within:?}:\n{}",
            nexus.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sigint(nexus: &Nexus) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &nexus.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_interrupt_during_the_drain_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (peer, calls) = silent_peer().await;
    let data = dir.path().join("data").display().to_string();
    // A drain of two minutes: the handler in flight (a tap call that never gets an answer) is
    // waited for that long.
    let long = "120000".to_string();
    let env = [
        ("NEXUS_HTTP__ADMIN_TOKEN", TOKEN.to_string()),
        ("NEXUS_TOPOLOGY__FILE", tap_topology(dir.path())),
        ("NEXUS_WORKERS__TAP__URL", peer),
        ("NEXUS_CONSUMER__DRAIN_MS", long.clone()),
        ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", long.clone()),
        ("NEXUS_BUS__EMBEDDED__HANDOVER_WAIT_MS", long.clone()),
        ("NEXUS_HTTP_CLIENT__TIMEOUT_MS", "110000".to_string()),
        ("NEXUS_HTTP__SHUTDOWN_GRACE_MS", long),
    ];
    let mut nexus = Nexus::start(
        dir.path(),
        "dev",
        &["dev", "--data-dir", &data, "--listen", LISTEN_ANY],
        &env,
    );
    let base = format!(
        "http://{}",
        nexus.wait_listening(Duration::from_secs(60)).await
    );
    let http = reqwest::Client::new();
    nexus
        .wait_ready(&http, &format!("{base}/readyz"), Duration::from_secs(60))
        .await;
    let resp = http
        .post(format!("{base}/v1/events/t.tap"))
        .bearer_auth(TOKEN)
        .json(&common::event("conv-1", 0).to_json())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    // The tap took the event and calls the peer, which never answers.
    wait_calls(&calls, 1, &nexus).await;

    sigint(&nexus);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        nexus.child.try_wait().unwrap().is_none(),
        "exited on the first interrupt: the drain was not long:\n{}",
        nexus.log_text()
    );
    assert!(nexus.log_text().contains("interrupt: draining"));

    sigint(&nexus);
    let status = wait_exit(&mut nexus, Duration::from_secs(10)).await;
    let log = nexus.log_text();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("skipping the drain"), "{log}");

    // The event was never acked: the next start delivers it again (nothing lost).
    let mut again = Nexus::start(
        dir.path(),
        "dev-2",
        &["dev", "--data-dir", &data, "--listen", LISTEN_ANY],
        &env,
    );
    again.wait_listening(Duration::from_secs(60)).await;
    wait_calls(&calls, 2, &again).await;
}
