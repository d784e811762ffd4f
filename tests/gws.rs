//! The gws worker against a fake GWS on loopback, with real processes (`nexus edge`,
//! `nexus worker conversation`, `nexus worker gws`) on a NATS JetStream of the test's own,
//! PostgreSQL and Redis: agent actions become GWS calls exactly once and in order per
//! conversation, through a timeout after GWS applied a call (reconciliation), a 4xx
//! (dead-letter), a GWS outage (the role pauses) and a SIGKILL of the worker mid-load.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::chat::*;
use common::gws::{Action, FakeGws};
use common::process::metric_sum;
use futures::future::join_all;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const GWS_TOKEN: &str = "gws-credential-for-tests";
/// The worker's GWS timeout (ms): short, so the hang case is quick.
const GWS_TIMEOUT_MS: u64 = 1000;

/// Both tests start four processes and a NATS server: one at a time on a two-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An edge, a conversation worker and a gws worker. Fields drop in order: processes first
/// (printing their logs if the test failed), then NATS, the database and the directory.
struct System {
    edge: Node,
    _conversation: Node,
    gws_worker: Option<Node>,
    env: Vec<(&'static str, String)>,
    _nats: OwnNats,
    _db: TestDb,
    dir: tempfile::TempDir,
}

impl System {
    async fn start(gws: &FakeGws) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = OwnNats::start(dir.path()).await;
        let db = TestDb::create().await;
        let mut env = shared_services_env(dir.path(), &nats.url, &db.url);
        env.extend([
            ("NEXUS_CONSUMER__RETRY_MAX_MS", "500".into()),
            ("NEXUS_WORKERS__GWS__URL", gws.url()),
            ("NEXUS_WORKERS__GWS__CREDENTIAL", GWS_TOKEN.into()),
            ("NEXUS_WORKERS__GWS__TIMEOUT_MS", GWS_TIMEOUT_MS.to_string()),
            // A try's two calls and two identity checks fit in the handler timeout.
            ("NEXUS_WORKERS__GWS__IDENTITY_TIMEOUT_MS", "500".into()),
            // A call that may still be in flight is looked at again after this plus the GWS
            // timeout.
            ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "4000".into()),
            ("NEXUS_WORKERS__GWS__PAUSE_AFTER_FAILURES", "3".into()),
            ("NEXUS_WORKERS__GWS__PAUSE_INITIAL_MS", "200".into()),
            ("NEXUS_WORKERS__GWS__PAUSE_MAX_MS", "800".into()),
            ("NEXUS_WORKERS__GWS__RETRY_INITIAL_MS", "200".into()),
            ("NEXUS_WORKERS__GWS__RETRY_MAX_MS", "1000".into()),
        ]);
        let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
        assert!(ok, "topology apply: {out} {err}");
        let conversation = start_node(
            dir.path(),
            "conversation",
            &["worker", "conversation"],
            env.clone(),
        )
        .await;
        let gws_worker = start_node(dir.path(), "gws-1", &["worker", "gws"], env.clone()).await;
        let edge = start_node(dir.path(), "edge", &["edge"], env.clone()).await;
        System {
            edge,
            _conversation: conversation,
            gws_worker: Some(gws_worker),
            env,
            _nats: nats,
            _db: db,
            dir,
        }
    }

    async fn gws_metric(&self, metric: &str, needles: &[&str]) -> f64 {
        let node = self.gws_worker.as_ref().expect("a gws worker runs");
        let text = reqwest::get(format!("{}/metrics", node.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        metric_sum(&text, metric, needles).unwrap_or(0.0)
    }
}

async fn start_chat(url: &str, api_key: &str) -> String {
    start_session(url, api_key, json!({"nickname": "Ann"}))
        .await
        .0
}

/// Waits for the offer of `sid` on `ws`, accepts it and waits until connected.
async fn accept(ws: &mut Ws, sid: &str) {
    let offer = ws_until(ws, WAIT, |v| {
        v["type"] == "offer" && v["conversation_id"] == sid
    })
    .await;
    ws_send(
        ws,
        json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    ws_until(ws, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected" && v["conversation_id"] == sid
    })
    .await;
}

/// An agent's HTTP call on a conversation; returns the JSON answer.
async fn agent_post(url: &str, token: &str, sid: &str, what: &str, body: Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/agent/conversations/{sid}/{what}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("agent call");
    assert_eq!(r.status(), 202, "{what}");
    r.json().await.unwrap_or(Value::Null)
}

/// A reply; returns nexus's message id (what GWS gets as `messageId`).
async fn reply(url: &str, token: &str, sid: &str, text: &str) -> String {
    let v = agent_post(url, token, sid, "messages", json!({"text": text})).await;
    v["message_id"].as_str().expect("message id").to_string()
}

async fn applied_eventually(gws: &FakeGws, sid: &str, want: &[String], what: &str) {
    eventually(WAIT, what, || async {
        (gws.applied(sid).len() >= want.len()).then_some(())
    })
    .await;
    assert_eq!(gws.applied(sid), want, "{what}");
}

/// 1: accept, two replies, transfer to a second agent who accepts and completes; 2: GWS applies
/// a SendMessage and then times out; 5: a 4xx; 3: GWS down for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_actions_reach_gws_once_each_in_order() {
    let _serial = SERIAL.lock().await;
    let gws = FakeGws::start(GWS_TOKEN).await;
    let sys = System::start(&gws).await;
    let url = sys.edge.url.clone();
    let admin = Admin::new(&url);
    let tenant = provision_tenant(&admin).await;
    let (alice, a_token) = provision_agent(&admin, &tenant, "alice", 10).await;
    let (bob, b_token) = provision_agent(&admin, &tenant, "bob", 10).await;
    let mut alice_ws = agent_ready(&url, &a_token).await;

    // 2. GWS applies the first reply, then hangs past the worker's timeout.
    let hung = start_chat(&url, &tenant.api_key).await;
    accept(&mut alice_ws, &hung).await;
    gws.rule(
        &hung,
        "SendMessage",
        Action::ApplyThenHang(Duration::from_millis(GWS_TIMEOUT_MS * 3)),
    );
    let mut hung_ids = Vec::new();
    for text in ["one", "two", "three"] {
        hung_ids.push(reply(&url, &a_token, &hung, text).await);
    }

    // 5. GWS refuses the first reply of another chat.
    let refused = start_chat(&url, &tenant.api_key).await;
    accept(&mut alice_ws, &refused).await;
    gws.rule(&refused, "SendMessage", Action::Status(400));
    let _lost = reply(&url, &a_token, &refused, "refused").await;
    let after = reply(&url, &a_token, &refused, "after").await;

    // 1. The whole life of a chat.
    let chat = start_chat(&url, &tenant.api_key).await;
    accept(&mut alice_ws, &chat).await;
    let m1 = reply(&url, &a_token, &chat, "hi, how can I help?").await;
    let m2 = reply(&url, &a_token, &chat, "let me get a colleague").await;
    let mut bob_ws = agent_ready(&url, &b_token).await;
    agent_post(&url, &a_token, &chat, "transfer", json!({"agent_id": bob})).await;
    accept(&mut bob_ws, &chat).await;
    agent_post(
        &url,
        &b_token,
        &chat,
        "complete",
        json!({"disposition": "resolved"}),
    )
    .await;
    // Bob steps away, so the next chats are Alice's.
    ws_send(
        &mut bob_ws,
        json!({"op": "not_ready", "request_id": "away"}),
    )
    .await;
    ws_until(&mut bob_ws, WAIT, |v| v["request_id"] == "away").await;
    eventually(WAIT, "bob not ready", || async {
        let me: Value = reqwest::Client::new()
            .get(format!("{url}/v1/agent/me"))
            .bearer_auth(&b_token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (me["ready"] == false).then_some(())
    })
    .await;

    applied_eventually(
        &gws,
        &chat,
        &[
            format!("Accept {alice}"),
            format!("SendMessage {alice} {m1}"),
            format!("SendMessage {alice} {m2}"),
            format!("Transfer {alice} Agent:{bob}"),
            format!("Accept {bob}"),
            format!("Complete {bob} resolved"),
        ],
        "the chat's calls, once each, in order",
    )
    .await;
    let mut want = vec![format!("Accept {alice}")];
    want.extend(hung_ids.iter().map(|m| format!("SendMessage {alice} {m}")));
    applied_eventually(
        &gws,
        &hung,
        &want,
        "a reply GWS applied before timing out is not sent again; the next ones follow",
    )
    .await;
    assert_eq!(
        gws.received(&hung, "POST", "SendMessage"),
        3,
        "one POST per reply"
    );
    assert!(
        gws.received(&hung, "GET", "") >= 1,
        "the timed-out call was reconciled by reading the chat"
    );
    applied_eventually(
        &gws,
        &refused,
        &[
            format!("Accept {alice}"),
            format!("SendMessage {alice} {after}"),
        ],
        "a refused call is dead-lettered and the next one goes on",
    )
    .await;
    assert_eq!(gws.received(&refused, "POST", "SendMessage"), 2);
    eventually(WAIT, "the refused event is dead-lettered", || async {
        let n = sys
            .gws_metric(
                "nexus_events_dead_lettered_total",
                &["group=\"nexus-gws\"", "reason=\"gws_rejected\""],
            )
            .await;
        (n == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        sys.gws_metric(
            "nexus_gws_operations_total",
            &["operation=\"SendMessage\"", "outcome=\"reconciled\""]
        )
        .await,
        1.0
    );

    // 3. GWS answers 503 for a while: retried from the backlog; failing for three chats (not
    // one) pauses the role; then everything goes through once.
    gws.fail_all(Some(503));
    let outage = start_chat(&url, &tenant.api_key).await;
    accept(&mut alice_ws, &outage).await;
    let during = reply(&url, &a_token, &outage, "during the outage").await;
    let mut others = Vec::new();
    for _ in 0..2 {
        let other = start_chat(&url, &tenant.api_key).await;
        accept(&mut alice_ws, &other).await;
        others.push(other);
    }
    eventually(WAIT, "the gws role pauses", || async {
        let paused = sys
            .gws_metric("nexus_worker_paused", &["role=\"gws\"", "peer=\"gws\""])
            .await;
        (paused == 1.0).then_some(())
    })
    .await;
    assert!(gws.answered(503) >= 3, "each outage chat's call failed");
    eventually(
        WAIT,
        "the outage chat's accept waits in the backlog",
        || async {
            let queued = sys
                .gws_metric("nexus_backlog_events", &["role=\"gws\""])
                .await;
            (queued >= 1.0).then_some(())
        },
    )
    .await;
    assert!(gws.applied(&outage).is_empty());
    gws.fail_all(None);
    applied_eventually(
        &gws,
        &outage,
        &[
            format!("Accept {alice}"),
            format!("SendMessage {alice} {during}"),
        ],
        "after the outage every call goes through once",
    )
    .await;
    for other in &others {
        applied_eventually(
            &gws,
            other,
            &[format!("Accept {alice}")],
            "the other outage chats' accepts go through once",
        )
        .await;
    }
    eventually(WAIT, "the gws role resumes", || async {
        let paused = sys
            .gws_metric("nexus_worker_paused", &["role=\"gws\"", "peer=\"gws\""])
            .await;
        let queued = sys
            .gws_metric("nexus_backlog_events", &["role=\"gws\""])
            .await;
        (paused == 0.0 && queued == 0.0).then_some(())
    })
    .await;

    // Nothing was applied twice anywhere (the per-chat lists above are exact).
    let all = gws.all_applied();
    assert_eq!(all.len(), 6 + 4 + 2 + 2 + 2, "{all:?}");
    drop((alice_ws, bob_ws));
}

/// 4: several agents reply in many chats; the gws worker is SIGKILLed mid-load and restarted:
/// every call exactly once (by chat, operation and message id), in order per conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_load_repeats_and_loses_no_call() {
    const AGENTS: usize = 3;
    const CHATS_EACH: usize = 4;
    const REPLIES: usize = 10;
    let _serial = SERIAL.lock().await;
    let gws = FakeGws::start(GWS_TOKEN).await;
    // Each call is applied, then answered 100 ms later: a kill lands inside the window.
    gws.set_delay(Duration::from_millis(100));
    let mut sys = System::start(&gws).await;
    let url = sys.edge.url.clone();
    let admin = Admin::new(&url);
    let tenant = provision_tenant(&admin).await;

    let mut agents = Vec::new();
    for n in 0..AGENTS {
        let (id, token) =
            provision_agent(&admin, &tenant, &format!("agent{n}"), CHATS_EACH as u32).await;
        let ws = agent_ready(&url, &token).await;
        agents.push((id, token, ws));
    }
    let mut chats = Vec::new();
    for _ in 0..AGENTS * CHATS_EACH {
        chats.push(start_chat(&url, &tenant.api_key).await);
    }
    // Each agent accepts offers until it holds its share.
    let held: Vec<(String, String, Vec<String>)> =
        join_all(agents.into_iter().map(|(id, token, mut ws)| async move {
            let mut mine = Vec::new();
            while mine.len() < CHATS_EACH {
                let v = ws_until(&mut ws, WAIT, |v| {
                    v["type"] == "offer" || (v["type"] == "state" && v["state"] == "connected")
                })
                .await;
                if v["type"] == "offer" {
                    ws_send(
                        &mut ws,
                        json!({"op": "accept", "conversation_id": v["conversation_id"], "offer_id": v["offer_id"]}),
                    )
                    .await;
                } else {
                    mine.push(v["conversation_id"].as_str().expect("id").to_string());
                }
            }
            (id, token, mine)
        }))
        .await;
    let total = AGENTS * CHATS_EACH * (1 + REPLIES);

    // Every agent replies in every chat it holds, all at once; each chat's replies in order.
    let replies = tokio::spawn({
        let url = url.clone();
        let held = held.clone();
        async move {
            let mut per_chat = Vec::new();
            for (_, token, mine) in &held {
                for sid in mine {
                    let (url, token, sid) = (url.clone(), token.clone(), sid.clone());
                    per_chat.push(async move {
                        let mut ids = Vec::new();
                        for n in 0..REPLIES {
                            ids.push(reply(&url, &token, &sid, &format!("reply {n}")).await);
                        }
                        (sid, ids)
                    });
                }
            }
            join_all(per_chat).await
        }
    });

    // Kill once a third of the calls went through: calls are in flight.
    eventually(Duration::from_secs(60), "a third of the calls", || async {
        (gws.all_applied().len() >= total / 3).then_some(())
    })
    .await;
    let mut first = sys.gws_worker.take().expect("gws worker");
    first.nexus.child.kill().expect("SIGKILL");
    first.nexus.child.wait().expect("reap");
    let at_kill = gws.all_applied().len();
    let sent: HashMap<String, Vec<String>> = replies.await.expect("replies").into_iter().collect();
    sys.gws_worker =
        Some(start_node(sys.dir.path(), "gws-2", &["worker", "gws"], sys.env.clone()).await);

    eventually(
        Duration::from_secs(60),
        "every call after the restart",
        || async { (gws.all_applied().len() >= total).then_some(()) },
    )
    .await;
    for (agent, _, mine) in &held {
        for sid in mine {
            let mut want = vec![format!("Accept {agent}")];
            want.extend(sent[sid].iter().map(|m| format!("SendMessage {agent} {m}")));
            assert_eq!(
                gws.applied(sid),
                want,
                "chat {sid}: every call once, in order"
            );
        }
    }
    assert_eq!(gws.all_applied().len(), total, "no call twice");
    let reconciled = sys
        .gws_metric("nexus_gws_operations_total", &["outcome=\"reconciled\""])
        .await;
    eprintln!("killed at {at_kill}/{total} applied; {reconciled} reconciled after the restart");
    drop(first);
}
