//! Issue 5's "Done when" end to end: one system of real processes (`nexus edge`, `nexus worker
//! conversation|history|gws|webhooks`) on a NATS of the test's own, PostgreSQL and Redis, with a
//! fake UCS, a fake GWS and webhook receivers on loopback. One chat produces each integration
//! effect exactly once and in order; then SIGKILLs of each integration worker mid-load lose and
//! repeat nothing at UCS, GWS or a receiver, and keep the order per conversation.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::chat::*;
use common::gws::FakeGws;
use common::process::metric_sum;
use common::ucs::FakeUcs;
use common::webhooks::{genesys_signature, verify_standard, Mode, Received, Receiver};
use futures::StreamExt;
use nexus::workers::history::ucs::object_id;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(30);
const GWS_TOKEN: &str = "gws-credential-for-e2e";
const UCS_CREDENTIAL: &str = "ucs-credential-for-e2e";

/// Every process of the system. Fields drop in order: processes first (printing their logs if
/// the test failed), then NATS, the database and the directory.
struct System {
    edge: Node,
    _conversation: Node,
    history: Option<Node>,
    gws: Option<Node>,
    webhooks: Option<Node>,
    env: Vec<(&'static str, String)>,
    admin: Admin,
    _nats: OwnNats,
    _db: TestDb,
    dir: tempfile::TempDir,
}

impl System {
    async fn start(ucs: &FakeUcs, gws: &FakeGws) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = OwnNats::start(dir.path()).await;
        let db = TestDb::create().await;
        let mut env = shared_services_env(dir.path(), &nats.url, &db.url);
        env.extend([
            ("NEXUS_CONSUMER__RETRY_MAX_MS", "400".into()),
            ("NEXUS_WORKERS__HISTORY__UCS__URL", ucs.url()),
            (
                "NEXUS_WORKERS__HISTORY__UCS__CREDENTIAL",
                UCS_CREDENTIAL.into(),
            ),
            ("NEXUS_WORKERS__HISTORY__UCS__TIMEOUT_MS", "1000".into()),
            ("NEXUS_WORKERS__HISTORY__TRANSCRIPT_SETTLE_MS", "500".into()),
            ("NEXUS_WORKERS__GWS__URL", gws.url()),
            ("NEXUS_WORKERS__GWS__CREDENTIAL", GWS_TOKEN.into()),
            ("NEXUS_WORKERS__GWS__TIMEOUT_MS", "1000".into()),
            // A try's two calls and two identity checks fit in the handler timeout.
            ("NEXUS_WORKERS__GWS__IDENTITY_TIMEOUT_MS", "500".into()),
            ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "4000".into()),
            ("NEXUS_WORKERS__WEBHOOKS__SUBSCRIPTION_CACHE_MS", "0".into()),
            (
                "NEXUS_WORKERS__WEBHOOKS__ALLOW_PRIVATE_TARGETS",
                "true".into(),
            ),
            (
                "NEXUS_WORKERS__WEBHOOKS__RETRY_SCHEDULE_MS",
                "[0, 300, 600]".into(),
            ),
            ("NEXUS_WORKERS__WEBHOOKS__TIMEOUT_MS", "1000".into()),
            ("NEXUS_WORKERS__WEBHOOKS__POLL_INTERVAL_MS", "100".into()),
            (
                "NEXUS_WORKERS__WEBHOOKS__MAX_IN_FLIGHT_PER_ENDPOINT",
                "4".into(),
            ),
        ]);
        let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
        assert!(ok, "topology apply: {out} {err}");
        let d = dir.path();
        let conversation =
            start_node(d, "conversation", &["worker", "conversation"], env.clone()).await;
        let history = start_node(d, "history-1", &["worker", "history"], env.clone()).await;
        let gws_worker = start_node(d, "gws-1", &["worker", "gws"], env.clone()).await;
        let webhooks = start_node(d, "webhooks-1", &["worker", "webhooks"], env.clone()).await;
        let edge = start_node(d, "edge", &["edge"], env.clone()).await;
        System {
            admin: Admin::new(&edge.url),
            edge,
            _conversation: conversation,
            history: Some(history),
            gws: Some(gws_worker),
            webhooks: Some(webhooks),
            env,
            _nats: nats,
            _db: db,
            dir,
        }
    }

    fn slot(&mut self, role: &str) -> &mut Option<Node> {
        match role {
            "history" => &mut self.history,
            "gws" => &mut self.gws,
            "webhooks" => &mut self.webhooks,
            other => panic!("no role {other}"),
        }
    }

    /// SIGKILLs the worker of `role` and starts another in its place.
    async fn kill_and_restart(&mut self, role: &str) {
        let mut node = self.slot(role).take().expect("a worker runs");
        node.nexus.child.kill().expect("SIGKILL");
        node.nexus.child.wait().expect("reap");
        let name = format!("{role}-2");
        let (dir, env) = (self.dir.path().to_path_buf(), self.env.clone());
        let next = start_node(&dir, &name, &["worker", role], env).await;
        *self.slot(role) = Some(next);
    }

    /// The sum of `metric` (labels containing `needles`) at the current worker of `role`.
    async fn metric(&self, role: &str, metric: &str, needles: &[&str]) -> f64 {
        let node = match role {
            "history" => &self.history,
            "gws" => &self.gws,
            _ => &self.webhooks,
        };
        let url = &node.as_ref().expect("a worker runs").url;
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        metric_sum(&text, metric, needles).unwrap_or(0.0)
    }

    /// A tenant with a `standard` and a `genesys` subscription at `rx`; the two secrets.
    async fn tenant_with_hooks(&self, rx: &Receiver, name: &str) -> (Tenant, String, String) {
        let tenant = provision_tenant(&self.admin).await;
        let mut secrets = Vec::new();
        for format in ["standard", "genesys"] {
            let v = self
                .admin
                .post(
                    &format!("/tenants/{}/webhooks", tenant.id),
                    json!({"url": rx.url(&format!("{name}-{format}")), "format": format}),
                )
                .await;
            secrets.push(v["secret"].as_str().expect("secret").to_string());
        }
        let genesys = secrets.pop().expect("genesys secret");
        let standard = secrets.pop().expect("standard secret");
        (tenant, standard, genesys)
    }
}

async fn customer_says(url: &str, api_key: &str, sid: &str, ck: &str, text: &str) {
    let r = reqwest::Client::new()
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
        .header("x-api-key", api_key)
        .header("x-nexus-client-key", ck)
        .json(&json!({"text": text}))
        .send()
        .await
        .expect("customer message");
    assert_eq!(r.status(), 202, "customer message");
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

async fn complete(url: &str, token: &str, sid: &str) {
    agent_post(
        url,
        token,
        sid,
        "complete",
        json!({"disposition": "resolved"}),
    )
    .await;
}

/// The key a receiver dedupes on: `webhook-id` (standard), the event id (genesys, which has
/// no id header).
fn delivery_key(r: &Received) -> String {
    match r.headers.get("webhook-id") {
        Some(id) => id.clone(),
        None => r.json()["operationId"].as_str().unwrap_or("").to_string(),
    }
}

/// What scenario 1 left at each peer, to see at the end that nothing came again.
struct Snapshot {
    sid: String,
    ucs_calls: usize,
    gws_requests: usize,
    standard: usize,
    genesys: usize,
}

/// Scenario 1, one chat from start to close: UCS contact, interaction, transcript, status;
/// GWS Accept, SendMessage, Complete; STARTED then FINISHED in both formats, correctly signed.
async fn one_chat_start_to_close(
    s: &System,
    ucs: &FakeUcs,
    gws: &FakeGws,
    rx: &Receiver,
) -> Snapshot {
    let url = s.edge.url.clone();
    let (tenant, std_secret, gen_secret) = s.tenant_with_hooks(rx, "one").await;
    let (alice, token) = provision_agent(&s.admin, &tenant, "alice", 2).await;
    let mut ws = agent_ready(&url, &token).await;

    let (sid, ck) = start_session(
        &url,
        &tenant.api_key,
        json!({"nickname": "Ann", "first_name": "Ann", "last_name": "Lee",
               "email_address": "ann.e2e@example.com", "subject": "order"}),
    )
    .await;
    let offer = ws_until(&mut ws, WAIT, |v| {
        v["type"] == "offer" && v["conversation_id"] == sid.as_str()
    })
    .await;
    ws_send(
        &mut ws,
        json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    ws_until(&mut ws, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected" && v["conversation_id"] == sid.as_str()
    })
    .await;
    let m1 = reply(&url, &token, &sid, "hello, how can I help?").await;
    ws_until(&mut ws, WAIT, |v| {
        v["type"] == "transcript" && v["text"] == "hello, how can I help?"
    })
    .await;
    customer_says(&url, &tenant.api_key, &sid, &ck, "my order is late").await;
    ws_until(&mut ws, WAIT, |v| {
        v["type"] == "transcript" && v["text"] == "my order is late"
    })
    .await;
    complete(&url, &token, &sid).await;

    // UCS: each call once, in order, with the chat's content.
    eventually(WAIT, "interaction stopped at UCS", || {
        let done = ucs.stopped(&sid);
        async move { done.then_some(()) }
    })
    .await;
    {
        let state = ucs.state.lock().unwrap();
        let calls: Vec<(&str, &str)> = state
            .calls
            .iter()
            .map(|c| (c.service.as_str(), c.method.as_str()))
            .collect();
        assert_eq!(
            calls,
            [
                ("OMContacts", "IdentifyContact"),
                ("OMInteractions", "InsertInteraction"),
                ("OMInteractions", "AddDocument"),
                ("OMInteractions", "SetInteractionStatus"),
            ],
            "UCS: each call once, in order"
        );
        assert!(state
            .calls
            .iter()
            .all(|c| c.authorization.as_deref() == Some(&format!("Bearer {UCS_CREDENTIAL}"))));
        let identify = &state.calls[0].body["Parameters"];
        assert_eq!(identify["EmailAddress"], "ann.e2e@example.com");
        assert_eq!(identify["LastName"], "Lee");
        let insert = &state.calls[1].body["Parameters"];
        assert_eq!(insert["Id"], sid.as_str());
        assert_eq!(insert["ContactId"], state.calls[0].body["Parameters"]["Id"]);
        let doc = &state.calls[2].body["Parameters"];
        assert_eq!(doc["InteractionId"], sid.as_str());
        let texts: Vec<&str> = doc["Content"]["Messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["Type"] == "Message")
            .filter_map(|m| m["Text"].as_str())
            .collect();
        assert_eq!(texts, ["hello, how can I help?", "my order is late"]);
        let status = &state.calls[3].body["Parameters"];
        assert_eq!(status["Status"], "Stopped");
        assert_eq!(status["Reason"], "AGENT_COMPLETED");
    }
    let effects: Vec<String> = ucs.effects().iter().map(|e| e.method.clone()).collect();
    assert_eq!(
        effects,
        [
            "IdentifyContact",
            "InsertInteraction",
            "AddDocument",
            "SetInteractionStatus"
        ]
    );

    // GWS: the agent's three actions, once each, in order.
    let want = [
        format!("Accept {alice}"),
        format!("SendMessage {alice} {m1}"),
        format!("Complete {alice} resolved"),
    ];
    eventually(WAIT, "GWS got the agent's actions", || async {
        (gws.applied(&sid).len() >= want.len()).then_some(())
    })
    .await;
    assert_eq!(gws.applied(&sid), want, "GWS: once each, in order");
    for op in ["Accept", "SendMessage", "Complete"] {
        assert_eq!(gws.received(&sid, "POST", op), 1, "one {op} POST");
    }
    let gws_requests = gws.state.lock().unwrap().requests.len();

    // Webhooks: STARTED then FINISHED in each format, signed.
    let std = rx.wait_for("one-standard", 2).await;
    let gen = rx.wait_for("one-genesys", 2).await;
    for got in [&std, &gen] {
        assert_eq!(
            got.iter().map(Received::event).collect::<Vec<_>>(),
            ["STARTED", "FINISHED"]
        );
        assert!(got.iter().all(|r| r.conversation() == sid));
    }
    assert_eq!(
        verify_standard(&[(&std_secret, &std[0]), (&std_secret, &std[1])]),
        ["ok", "ok"],
        "{std:?}"
    );
    assert_ne!(std[0].id(), std[1].id());
    for r in &gen {
        assert_eq!(
            r.headers.get("x-hub-signature"),
            Some(&genesys_signature(&gen_secret, &r.body)),
            "{r:?}"
        );
    }
    drop(ws);
    Snapshot {
        sid,
        ucs_calls: ucs.calls(),
        gws_requests,
        standard: std.len(),
        genesys: gen.len(),
    }
}

/// A chat of scenario 2 as the test drove it.
#[derive(Debug, Clone, Default)]
struct Driven {
    agent: String,
    replies: Vec<String>,
}

const CHATS: usize = 15;
const ROUNDS: usize = 4;

/// Scenario 2, ~15 chats in flight, started one after another; history, then gws, then
/// webhooks are SIGKILLed at different moments (each while its peer holds an unanswered call)
/// and restarted; then every chat closes: nothing lost, nothing repeated, order per
/// conversation kept at UCS, GWS and both receivers.
async fn kills_mid_load(s: &mut System, ucs: &FakeUcs, gws: &FakeGws, rx: &Receiver) {
    let url = s.edge.url.clone();
    let (tenant, std_secret, _) = s.tenant_with_hooks(rx, "load").await;
    // Peers that take a while: a kill lands while calls are in flight.
    ucs.state.lock().unwrap().delay = Duration::from_millis(40);
    gws.set_delay(Duration::from_millis(60));
    rx.set("load-standard", Mode::Slow(40));
    rx.set("load-genesys", Mode::Slow(40));

    // Agents accept every offer until told to stop; who holds which chat is shared.
    let held: Arc<Mutex<HashMap<String, (String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut agent_tasks = Vec::new();
    for n in 0..3 {
        let (id, token) = provision_agent(&s.admin, &tenant, &format!("agent{n}"), 8).await;
        let mut ws = agent_ready(&url, &token).await;
        let (held, stop) = (held.clone(), stop.clone());
        agent_tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let frame = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await
                {
                    Err(_) => continue,
                    Ok(Some(Ok(WsMessage::Text(t)))) => t,
                    Ok(Some(Ok(_))) => continue,
                    Ok(other) => panic!("agent websocket ended: {other:?}"),
                };
                let v: Value = serde_json::from_str(frame.as_str()).expect("json frame");
                if v["type"] == "offer" {
                    ws_send(
                        &mut ws,
                        json!({"op": "accept", "conversation_id": v["conversation_id"], "offer_id": v["offer_id"]}),
                    )
                    .await;
                } else if v["type"] == "state" && v["state"] == "connected" {
                    let sid = v["conversation_id"].as_str().expect("id").to_string();
                    held.lock()
                        .unwrap()
                        .insert(sid, (id.clone(), token.clone()));
                }
            }
        }));
    }

    // Chat i starts at i × 250 ms; each runs ROUNDS of customer message + agent reply, then
    // the agent completes. Pauses pace the load; nothing is asserted on time.
    let mut chats = Vec::new();
    for i in 0..CHATS {
        let (url, key, held) = (url.clone(), tenant.api_key.clone(), held.clone());
        chats.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250 * i as u64)).await;
            let (sid, ck) = start_session(
                &url,
                &key,
                json!({"nickname": format!("c{i}"), "first_name": format!("F{i}"), "last_name": "Doe"}),
            )
            .await;
            let (agent, token) = eventually(WAIT, "an agent holds the chat", || {
                let h = held.lock().unwrap().get(&sid).cloned();
                async move { h }
            })
            .await;
            let mut replies = Vec::new();
            for r in 0..ROUNDS {
                customer_says(&url, &key, &sid, &ck, &format!("question {r}")).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
                replies.push(reply(&url, &token, &sid, &format!("answer {r}")).await);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            complete(&url, &token, &sid).await;
            (sid, Driven { agent, replies })
        }));
    }

    // The kills, each once its peer has seen part of the load.
    let gws_total = CHATS * (ROUNDS + 2);
    let before_gws = gws.all_applied().len();
    // Each kill waits for a moment when the peer holds a call it has not answered yet.
    // History: while a closing chat's transcript or status call is in flight.
    eventually(WAIT, "a close written at UCS, another in flight", || {
        let state = ucs.state.lock().unwrap();
        let closed = state
            .effects
            .iter()
            .filter(|e| e.method == "SetInteractionStatus")
            .count();
        let closing = state.calls.len() > state.effects.len()
            && state
                .calls
                .last()
                .is_some_and(|c| c.method == "AddDocument" || c.method == "SetInteractionStatus");
        let ready = closed >= 2 && closing;
        async move { ready.then_some(()) }
    })
    .await;
    s.kill_and_restart("history").await;
    let at_history = ucs.effects().len();
    eventually(WAIT, "a third of the GWS calls, one in flight", || async {
        (gws.all_applied().len() >= before_gws + gws_total / 3 && gws.in_flight() > 0).then_some(())
    })
    .await;
    s.kill_and_restart("gws").await;
    let at_gws = gws.all_applied().len() - before_gws;
    eventually(WAIT, "some FINISHED webhooks", || async {
        let finished = rx
            .got("load-standard")
            .iter()
            .filter(|r| r.event() == "FINISHED")
            .count();
        let got = rx.got("load-standard").len() + rx.got("load-genesys").len();
        let answered = rx.state.lock().unwrap().answered.len();
        (finished >= 3 && got > answered).then_some(())
    })
    .await;
    let at_webhooks = rx.got("load-standard").len() + rx.got("load-genesys").len();
    let cut_off = at_webhooks - rx.state.lock().unwrap().answered.len();
    s.kill_and_restart("webhooks").await;

    let mut driven: HashMap<String, Driven> = HashMap::new();
    for c in chats {
        let (sid, d) = c.await.expect("chat task");
        driven.insert(sid, d);
    }
    stop.store(true, Ordering::Relaxed);
    for a in agent_tasks {
        a.await.expect("agent task");
    }
    assert_eq!(driven.len(), CHATS);

    // Everything arrives.
    for sid in driven.keys() {
        eventually(WAIT, "every interaction stopped at UCS", || {
            let done = ucs.stopped(sid);
            async move { done.then_some(()) }
        })
        .await;
    }
    eventually(WAIT, "every GWS call", || async {
        let n: usize = driven.keys().map(|sid| gws.applied(sid).len()).sum();
        (n >= gws_total).then_some(())
    })
    .await;
    // A receiver has a message once it answered 2xx to it (a request cut off by a kill is not
    // delivered).
    for name in ["load-standard", "load-genesys"] {
        eventually(WAIT, "both webhooks of every chat answered", || async {
            let path = format!("/r/{name}");
            let keys: HashSet<String> = rx
                .state
                .lock()
                .unwrap()
                .answered_requests
                .iter()
                .filter(|r| r.path == path)
                .map(delivery_key)
                .collect();
            (keys.len() >= 2 * CHATS).then_some(())
        })
        .await;
    }

    // UCS: per conversation its contact once, then interaction, transcript, status once each.
    let all = ucs.effects();
    for sid in driven.keys() {
        let contact = object_id(&tenant.id, sid, "contact");
        let contact_at: Vec<usize> = (0..all.len())
            .filter(|i| all[*i].method == "IdentifyContact" && all[*i].id == contact)
            .collect();
        assert_eq!(contact_at.len(), 1, "{sid}: one contact");
        let insert_at = all
            .iter()
            .position(|e| e.method == "InsertInteraction" && e.id == *sid)
            .expect("interaction");
        assert!(contact_at[0] < insert_at, "{sid}: contact first");
        let methods: Vec<String> = ucs.effects_of(sid).into_iter().map(|e| e.method).collect();
        assert_eq!(
            methods,
            ["InsertInteraction", "AddDocument", "SetInteractionStatus"],
            "{sid}: UCS effects once each, in order"
        );
    }
    assert_eq!(all.len(), 4 + 4 * CHATS, "no other UCS effect");

    // GWS: per chat, operation and message id, once each, in order.
    for (sid, d) in &driven {
        let mut want = vec![format!("Accept {}", d.agent)];
        want.extend(
            d.replies
                .iter()
                .map(|m| format!("SendMessage {} {m}", d.agent)),
        );
        want.push(format!("Complete {} resolved", d.agent));
        assert_eq!(
            gws.applied(sid),
            want,
            "{sid}: GWS calls once each, in order"
        );
    }
    assert_eq!(
        gws.all_applied().len(),
        3 + gws_total,
        "no other GWS effect"
    );

    // Receivers: per webhook-id (genesys: event id) exactly the chat's two messages, STARTED
    // before FINISHED; a repeat after a kill carries the same id.
    let mut repeats = 0;
    for name in ["load-standard", "load-genesys"] {
        let got = rx.got(name);
        let mut per: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for r in &got {
            per.entry(r.conversation())
                .or_default()
                .push((delivery_key(r), r.event()));
        }
        assert_eq!(per.len(), CHATS, "{name}: every chat");
        for (sid, seen) in &per {
            assert!(driven.contains_key(sid), "{name}: unknown chat {sid}");
            let distinct: HashSet<&(String, String)> = seen.iter().collect();
            let mut events: Vec<&str> = distinct.iter().map(|(_, e)| e.as_str()).collect();
            events.sort_unstable();
            assert_eq!(events, ["FINISHED", "STARTED"], "{name} {sid}: {seen:?}");
            let last_started = seen.iter().rposition(|(_, e)| e == "STARTED");
            let first_finished = seen.iter().position(|(_, e)| e == "FINISHED");
            assert!(
                last_started < first_finished,
                "{name} {sid}: order {seen:?}"
            );
        }
        repeats += got.len() - 2 * CHATS;
    }
    let std = rx.got("load-standard");
    let cases: Vec<(&str, &Received)> = std.iter().map(|r| (std_secret.as_str(), r)).collect();
    assert!(
        verify_standard(&cases).iter().all(|v| v == "ok"),
        "every standard delivery verifies"
    );
    for role in ["history", "gws", "webhooks"] {
        let dead = s
            .metric(role, "nexus_events_dead_lettered_total", &[])
            .await;
        assert_eq!(dead, 0.0, "{role} dead-lettered");
    }
    let reconciled = s
        .metric(
            "gws",
            "nexus_gws_operations_total",
            &["outcome=\"reconciled\""],
        )
        .await;
    eprintln!(
        "kills: history at {at_history} UCS effects of {}, gws at {at_gws}/{gws_total} calls, \
         webhooks at {at_webhooks}/{} deliveries ({cut_off} unanswered); {repeats} deliveries repeated under the same id; \
         {} UCS calls for {} effects; {reconciled} GWS calls reconciled after the restart",
        4 * CHATS + 4,
        4 * CHATS,
        ucs.calls(),
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn integrations_exactly_once_through_chats_and_sigkills() {
    let begun = Instant::now();
    let ucs = FakeUcs::start().await;
    let gws = FakeGws::start(GWS_TOKEN).await;
    let rx = Receiver::start().await;
    let mut s = System::start(&ucs, &gws).await;
    eprintln!("system up in {:?}", begun.elapsed());

    let one = one_chat_start_to_close(&s, &ucs, &gws, &rx).await;
    kills_mid_load(&mut s, &ucs, &gws, &rx).await;

    // Scenario 1's chat got nothing more meanwhile, through three restarts.
    let calls_of_one = ucs
        .state
        .lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| {
            let p = &c.body["Parameters"];
            p["InteractionId"] == one.sid.as_str() || p["Id"] == one.sid.as_str()
        })
        .count();
    assert_eq!(calls_of_one, 3, "UCS calls of the first chat");
    assert!(one.ucs_calls >= 4);
    let gws_of_one = gws
        .state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.chat == one.sid)
        .count();
    assert_eq!(gws_of_one, 3, "GWS requests of the first chat");
    assert!(one.gws_requests >= 3);
    assert_eq!(rx.got("one-standard").len(), one.standard);
    assert_eq!(rx.got("one-genesys").len(), one.genesys);
    eprintln!("done in {:?}", begun.elapsed());
}
