//! The history worker against a fake UCS (a real HTTP server on loopback), with real processes
//! (`nexus edge`, `nexus worker conversation`, `nexus worker history`) on NATS JetStream,
//! PostgreSQL and Redis: a chat is written once and in order; an outage pauses the target and
//! nothing is lost; a tenant's failing UCS holds no other tenant; a SIGKILL mid-load repeats no
//! effect; a 4xx dead-letters one event only; an entry that comes just after the close is in
//! the transcript.

use crate::common;

use std::time::Duration;

use common::chat::*;
use common::process::metric_sum;
use common::ucs::{Effect, FakeUcs, Mode};
use nexus::workers::history::ucs::object_id;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const CREDENTIAL: &str = "ucs-secret-for-tests";

/// NATS, a fresh database, Redis and the three roles; fields drop processes first.
struct System {
    history: Node,
    edge: Node,
    _conversation: Node,
    env: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
    _nats: OwnNats,
    _db: TestDb,
}

impl System {
    async fn start(ucs: &FakeUcs) -> System {
        System::start_with(ucs, Vec::new()).await
    }

    /// The system with `extra` settings on top of the suite's.
    async fn start_with(ucs: &FakeUcs, extra: Vec<(&'static str, String)>) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = OwnNats::start(dir.path()).await;
        let db = TestDb::create().await;
        let mut env = shared_services_env(dir.path(), &nats.url, &db.url);
        env.extend([
            ("NEXUS_CONSUMER__RETRY_MAX_MS", "400".into()),
            // A backlog head leased by a killed pod comes back after this + 5 s.
            ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "4000".into()),
            ("NEXUS_WORKERS__HISTORY__UCS__URL", ucs.url()),
            ("NEXUS_WORKERS__HISTORY__UCS__CREDENTIAL", CREDENTIAL.into()),
            ("NEXUS_WORKERS__HISTORY__UCS__TIMEOUT_MS", "1000".into()),
            (
                "NEXUS_WORKERS__HISTORY__UCS__PAUSE_AFTER_FAILURES",
                "3".into(),
            ),
            (
                "NEXUS_WORKERS__HISTORY__UCS__PAUSE_INITIAL_MS",
                "300".into(),
            ),
            ("NEXUS_WORKERS__HISTORY__UCS__PAUSE_MAX_MS", "800".into()),
            (
                "NEXUS_WORKERS__HISTORY__UCS__RETRY_INITIAL_MS",
                "200".into(),
            ),
            ("NEXUS_WORKERS__HISTORY__UCS__RETRY_MAX_MS", "1000".into()),
            // Short, so every close here goes through the settle wait and the tests stay quick.
            ("NEXUS_WORKERS__HISTORY__TRANSCRIPT_SETTLE_MS", "300".into()),
        ]);
        env.extend(extra);
        let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
        assert!(ok, "topology apply: {out} {err}");
        let conversation = start_node(
            dir.path(),
            "conversation",
            &["worker", "conversation"],
            env.clone(),
        )
        .await;
        let edge = start_node(dir.path(), "edge", &["edge"], env.clone()).await;
        let history = start_node(dir.path(), "history", &["worker", "history"], env.clone()).await;
        System {
            history,
            edge,
            _conversation: conversation,
            env,
            dir,
            _nats: nats,
            _db: db,
        }
    }

    /// The history role's backlog depth and its group's lag on `nexus.interaction.v1`.
    async fn backlog_and_lag(&self) -> (Option<f64>, Option<f64>) {
        let m = self.metrics().await;
        let queued = metric_sum(&m, "nexus_backlog_events", &["role=\"history\""]);
        let lag = metric_sum(
            &m,
            "nexus_consumer_lag",
            &["nexus.interaction.v1", "nexus-history"],
        );
        (queued, lag)
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.history.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

/// A customer chat: started with `start` (contact fields, first message), then the customer
/// leaves. Returns the conversation id.
async fn chat_and_leave(url: &str, tenant: &Tenant, start: Value) -> String {
    let (sid, ck) = start_session(url, &tenant.api_key, start).await;
    let r = reqwest::Client::new()
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/disconnect"))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .send()
        .await
        .expect("disconnect");
    assert_eq!(r.status(), 202);
    sid
}

fn methods(effects: &[Effect]) -> Vec<&str> {
    effects.iter().map(|e| e.method.as_str()).collect()
}

/// The conversation's effects at UCS, exactly once each and in order: its contact created,
/// then interaction, `documents` documents (transcript, attachments), status.
fn assert_written_once_in_order(ucs: &FakeUcs, tenant: &str, conv: &str, documents: usize) {
    let all = ucs.effects();
    let contact = object_id(tenant, conv, "contact");
    let contact_at: Vec<usize> = (0..all.len())
        .filter(|i| all[*i].method == "IdentifyContact" && all[*i].id == contact)
        .collect();
    let insert_at = all
        .iter()
        .position(|e| e.method == "InsertInteraction" && e.id == conv)
        .unwrap_or_else(|| panic!("{conv}: no interaction at UCS"));
    assert_eq!(contact_at.len(), 1, "{conv}: one contact created");
    assert!(
        contact_at[0] < insert_at,
        "{conv}: contact before interaction"
    );
    let mut want = vec!["InsertInteraction"];
    want.extend(std::iter::repeat_n("AddDocument", documents));
    want.push("SetInteractionStatus");
    assert_eq!(methods(&ucs.effects_of(conv)), want, "{conv}: effects");
    let state = ucs.state.lock().unwrap();
    let transcript = &state.documents[&object_id(tenant, conv, "transcript")];
    assert_eq!(transcript["InteractionId"], conv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_is_written_once_in_order_and_a_4xx_dead_letters_only_its_event() {
    let ucs = FakeUcs::start().await;
    let system = System::start(&ucs).await;
    let url = system.edge.url.clone();
    let http = reqwest::Client::new();
    let admin = Admin::new(&url);
    let tenant = provision_tenant(&admin).await;
    let (_agent, token) = provision_agent(&admin, &tenant, "alice", 4).await;
    let mut agent = ws_connect(&format!("{url}/v1/agent/ws?token={token}")).await;
    ws_until(&mut agent, WAIT, |v| v["type"] == "hello").await;
    ws_send(&mut agent, json!({"op": "ready", "request_id": "r1"})).await;
    ws_until(&mut agent, WAIT, |v| v["request_id"] == "r1").await;

    // 1. A chat with contact fields; the agent accepts and replies; the agent completes.
    let (sid, ck) = start_session(
        &url,
        &tenant.api_key,
        json!({"nickname": "Ann", "first_name": "Ann", "last_name": "Lee",
            "email_address": "ann@example.com", "subject": "billing",
            "user_data": {"lang": "fr"}}),
    )
    .await;
    let offer = ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await;
    ws_send(
        &mut agent,
        json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    ws_until(&mut agent, WAIT, |v| {
        v["type"] == "transcript"
            && v["kind"] == "ParticipantJoined"
            && v["from"]["kind"] == "agent"
    })
    .await;
    let r = http
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .json(&json!({"text": "my invoice is wrong"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    ws_until(&mut agent, WAIT, |v| {
        v["type"] == "transcript" && v["text"] == "my invoice is wrong"
    })
    .await;
    let data = png(2000);
    let up: Value = http
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/files"))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(multipart(&[(
            "file",
            Some("invoice.png"),
            Some("image/png"),
            &data,
        )]))
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("upload json");
    let file_id = up["file_id"].as_str().expect("file_id").to_string();
    ws_until(&mut agent, WAIT, |v| {
        v["type"] == "transcript" && v["kind"] == "FileUploaded"
    })
    .await;
    ws_send(
        &mut agent,
        json!({"op": "reply", "conversation_id": sid, "text": "let me check", "message_id": "r-1"}),
    )
    .await;
    ws_until(&mut agent, WAIT, |v| {
        v["type"] == "transcript" && v["text"] == "let me check"
    })
    .await;
    ws_send(
        &mut agent,
        json!({"op": "complete", "conversation_id": sid, "disposition": "resolved"}),
    )
    .await;
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
                ("OMInteractions", "AddDocument"),
                ("OMInteractions", "SetInteractionStatus"),
            ],
            "each call once, in order"
        );
        let attachment = &state.calls[3].body["Parameters"];
        assert_eq!(
            attachment["Id"],
            object_id(&tenant.id, &sid, &format!("attachment/{file_id}"))
        );
        assert_eq!(attachment["FileName"], "invoice.png");
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(attachment["Content"].as_str().expect("content"))
            .expect("base64");
        assert_eq!(bytes, data, "the file's bytes");
        let identify = &state.calls[0].body;
        assert_eq!(identify["Parameters"]["EmailAddress"], "ann@example.com");
        assert_eq!(identify["Parameters"]["FirstName"], "Ann");
        assert_eq!(identify["UserData"]["lang"], "fr");
        assert!(state
            .calls
            .iter()
            .all(|c| c.authorization.as_deref() == Some(&format!("Bearer {CREDENTIAL}"))));
        let insert = &state.calls[1].body["Parameters"];
        assert_eq!(insert["Id"], sid.as_str());
        assert_eq!(insert["Subject"], "billing");
        assert_eq!(insert["MediaTypeId"], "chat");
        assert_eq!(insert["TenantId"], tenant.id.as_str());
        let doc = &state.calls[2].body["Parameters"];
        let texts: Vec<&str> = doc["Content"]["Messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["Type"] == "Message" && m["Attachments"] == json!([]))
            .filter_map(|m| m["Text"].as_str())
            .collect();
        assert_eq!(texts, ["my invoice is wrong", "let me check"]);
        assert!(
            doc["Content"]["Messages"]
                .as_array()
                .expect("messages")
                .iter()
                .any(|m| m["Attachments"] == json!([file_id])),
            "the upload is in the transcript: {doc}"
        );
        let positions: Vec<i64> = doc["Content"]["Messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["Position"].as_i64())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        let status = &state.calls[4].body["Parameters"];
        assert_eq!(status["Status"], "Stopped");
        assert_eq!(status["Reason"], "AGENT_COMPLETED");
    }
    assert_written_once_in_order(&ucs, &tenant.id, &sid, 2);

    // 4. UCS refuses one customer's contact (400): that conversation's events are
    // dead-lettered; the next conversation is written.
    ucs.state.lock().unwrap().reject_email = Some("mallory@example.com".into());
    let bad = chat_and_leave(
        &url,
        &tenant,
        json!({"nickname": "M", "email_address": "mallory@example.com", "text": "hi"}),
    )
    .await;
    let good = chat_and_leave(
        &url,
        &tenant,
        json!({"nickname": "Bo", "email_address": "bo@example.com", "text": "hello"}),
    )
    .await;
    eventually(WAIT, "the next conversation written", || {
        let done = ucs.stopped(&good);
        async move { done.then_some(()) }
    })
    .await;
    assert_written_once_in_order(&ucs, &tenant.id, &good, 1);
    let dead = eventually(WAIT, "ucs_rejected dead letters", || async {
        let m = system.metrics().await;
        metric_sum(
            &m,
            "nexus_events_dead_lettered_total",
            &["nexus.interaction.v1", "ucs_rejected"],
        )
        .filter(|n| *n >= 2.0)
    })
    .await;
    // The start and the close of the bad chat, plus once more for each duplicate delivery the
    // worker saw (the conversation worker can publish a close twice; a duplicate still runs the
    // conversation's pending step, which UCS rejects again): nothing of the good chat.
    let m = system.metrics().await;
    let duplicates =
        metric_sum(&m, "nexus_history_events_total", &["outcome=\"duplicate\""]).unwrap_or(0.0);
    assert!(
        dead >= 2.0 && dead <= 2.0 + duplicates,
        "dead letters {dead} for the start and the close of {bad} ({duplicates} duplicates)"
    );
    assert!(ucs.effects_of(&bad).is_empty(), "nothing written for {bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ucs_outage_pauses_the_role_then_everything_is_written() {
    let ucs = FakeUcs::start().await;
    // Two counted failures would dead-letter an event: calls refused while paused and probes
    // must not count.
    let system = System::start_with(
        &ucs,
        vec![(
            "NEXUS_WORKERS__HISTORY__UCS__RETRY_MAX_ATTEMPTS",
            "2".into(),
        )],
    )
    .await;
    let url = system.edge.url.clone();
    let tenant = provision_tenant(&Admin::new(&url)).await;

    ucs.set_mode(Mode::Down(503));
    let mut convs = Vec::new();
    for n in 0..5 {
        let start = json!({"nickname": format!("c{n}"), "email_address": format!("c{n}@example.com"),
            "text": format!("message {n}")});
        convs.push(chat_and_leave(&url, &tenant, start).await);
    }
    // Paused: the events wait in the backlog, acked, not as lag on the topic.
    eventually(
        WAIT,
        "history paused, the events in the backlog",
        || async {
            let (queued, lag) = system.backlog_and_lag().await;
            let m = system.metrics().await;
            let paused = metric_sum(&m, "nexus_worker_paused", &["role=\"history\""]);
            (paused == Some(1.0) && queued.is_some_and(|q| q >= 5.0) && lag == Some(0.0))
                .then_some(())
        },
    )
    .await;
    // While paused only probes reach UCS (one at a time, 300-800 ms apart): a spinning worker
    // (5 lanes retrying every 400 ms at most) would make about 60 calls in this time.
    // Half the time UCS answers 503, half it hangs past the 1 s call timeout.
    let at_pause = ucs.calls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ucs.set_mode(Mode::Hang);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = ucs.calls() - at_pause;
    assert!(
        during <= 15,
        "{during} calls to a down UCS in 5 s while paused"
    );
    let m = system.metrics().await;
    assert_eq!(
        metric_sum(&m, "nexus_worker_paused", &["role=\"history\""]),
        Some(1.0)
    );
    let peer = |outcome: &str| {
        metric_sum(
            &m,
            "nexus_peer_calls_total",
            &["role=\"history\"", &format!("outcome=\"{outcome}\"")],
        )
        .unwrap_or(0.0)
    };
    assert!(peer("failed") >= 3.0, "5xx counted as failed");
    assert!(peer("timeout") >= 1.0, "hangs counted as timeouts");
    assert!(peer("paused") >= 1.0, "calls refused unsent while paused");

    ucs.set_mode(Mode::Up);
    for conv in &convs {
        eventually(WAIT, "written after the outage", || {
            let done = ucs.stopped(conv);
            async move { done.then_some(()) }
        })
        .await;
    }
    for conv in &convs {
        assert_written_once_in_order(&ucs, &tenant.id, conv, 1);
    }
    // The starts ran again from the backlog: their own retries, not redeliveries.
    let m = system.metrics().await;
    let started = |outcome: &str| {
        metric_sum(
            &m,
            "nexus_history_events_total",
            &["event=\"started\"", &format!("outcome=\"{outcome}\"")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (started("applied"), started("duplicate")),
        (5.0, 0.0),
        "starts retried from the backlog counted as duplicates"
    );
    eventually(WAIT, "resumed", || async {
        let m = system.metrics().await;
        (metric_sum(&m, "nexus_worker_paused", &["role=\"history\""]) == Some(0.0)).then_some(())
    })
    .await;
}

/// A tenant whose own UCS is down holds back no other tenant: once its target is paused, its
/// events wait in the backlog instead of on their lanes, so another tenant's conversation on the
/// same consumer lane is written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_ucs_is_down_holds_no_other_tenant() {
    let ucs = FakeUcs::start().await;
    let own = FakeUcs::start().await;
    own.set_mode(Mode::Down(503));
    // A long pause (20-40 s): an event that waited on its lane for the probe would hold the
    // lane well past the 10 s the other tenant is given below (it takes milliseconds).
    let system = System::start_with(
        &ucs,
        vec![
            ("NEXUS_WORKERS__HISTORY__UCS__TENANTS__DOWN__URL", own.url()),
            (
                "NEXUS_WORKERS__HISTORY__UCS__TENANTS__DOWN__CREDENTIAL",
                CREDENTIAL.into(),
            ),
            (
                "NEXUS_WORKERS__HISTORY__UCS__PAUSE_INITIAL_MS",
                "40000".into(),
            ),
            ("NEXUS_WORKERS__HISTORY__UCS__PAUSE_MAX_MS", "40000".into()),
        ],
    )
    .await;
    let url = system.edge.url.clone();
    let tenant = provision_tenant(&Admin::new(&url)).await;
    // Three of the failing tenant's conversations fail: its target is paused.
    let mut down = Vec::new();
    for n in 0..3 {
        let conv = uuid::Uuid::new_v4().to_string();
        down.push(conv.clone());
        ingest(
            &url,
            "down",
            &conv,
            "ConversationStarted",
            started(&format!("d{n}@example.com")),
        )
        .await;
    }
    eventually(WAIT, "the failing tenant's UCS paused", || async {
        let m = system.metrics().await;
        (metric_sum(&m, "nexus_worker_paused", &["role=\"history\""]) == Some(1.0)).then_some(())
    })
    .await;
    let calls = own.calls();
    // Another of its conversations, then the other tenant's on the same lane.
    let waiting = uuid::Uuid::new_v4().to_string();
    let other = on_the_lane_of(&waiting);
    ingest(
        &url,
        "down",
        &waiting,
        "ConversationStarted",
        started("d3@example.com"),
    )
    .await;
    start_and_close(&url, &tenant.id, &other, "fine@example.com").await;

    down.push(waiting.clone());
    eventually(
        Duration::from_secs(10),
        "the other tenant's conversation written",
        || {
            let done = ucs.stopped(&other);
            async move { done.then_some(()) }
        },
    )
    .await;
    assert_written_once_in_order(&ucs, &tenant.id, &other, 1);
    // The paused tenant's four starts wait in the backlog, acked; its UCS was not called again.
    eventually(WAIT, "the paused tenant's events backlogged", || async {
        let (queued, lag) = system.backlog_and_lag().await;
        (queued == Some(4.0) && lag == Some(0.0)).then_some(())
    })
    .await;
    assert_eq!(own.calls(), calls, "a paused target was called");
    assert!(own.effects().is_empty() && ucs.effects_of(&waiting).is_empty());

    // Its UCS back: the next probe (at most 40 s after the pause began) closes the circuit and
    // every waiting start is written there, once.
    own.set_mode(Mode::Up);
    for conv in &down {
        eventually(
            Duration::from_secs(60),
            "the paused tenant's start written",
            || {
                let written = methods(&own.effects_of(conv)) == ["InsertInteraction"];
                async move { written.then_some(()) }
            },
        )
        .await;
    }
    assert!(
        ucs.effects_of(&down[0]).is_empty(),
        "written at the global UCS"
    );
}

/// A `ConversationStarted` body with the customer's email address.
fn started(email: &str) -> Value {
    json!({"customer_participant_id": "customer", "customer_nickname": "Sam",
        "contact": {"email_address": email}})
}

/// A `ConversationClosed` body: the customer left.
fn closed() -> Value {
    json!({"reason": "CUSTOMER_LEFT", "closed_by_participant_id": "customer"})
}

/// A new conversation id the history consumer runs on the same lane as `conversation` (32
/// lanes, topology).
fn on_the_lane_of(conversation: &str) -> String {
    let lane = nexus::bus::consumer::lane_of(conversation, 32);
    std::iter::repeat_with(|| uuid::Uuid::new_v4().to_string())
        .find(|c| nexus::bus::consumer::lane_of(c, 32) == lane)
        .expect("a key on the same lane")
}

/// A whole conversation of `tenant` through ingest: started, then closed.
async fn start_and_close(url: &str, tenant: &str, conversation: &str, email: &str) {
    ingest(
        url,
        tenant,
        conversation,
        "ConversationStarted",
        started(email),
    )
    .await;
    ingest(url, tenant, conversation, "ConversationClosed", closed()).await;
}

/// Publishes an interaction event through the edge's ingest endpoint.
async fn ingest(url: &str, tenant: &str, conv: &str, event_type: &str, body: Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/events/nexus.interaction.v1"))
        .bearer_auth(ADMIN)
        .json(&json!({"event_type": event_type, "tenant_id": tenant,
            "conversation_id": conv, "body": body}))
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
}

/// UCS failing for one contact (503 every time) holds only that conversation: another one on
/// the same consumer lane is written meanwhile, the failing one's close waits behind its start,
/// and once UCS takes the contact everything is written once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_ucs_keeps_failing_holds_no_other() {
    let ucs = FakeUcs::start().await;
    ucs.state.lock().unwrap().fail_email = Some("stuck@example.com".into());
    let system = System::start(&ucs).await;
    let url = system.edge.url.clone();
    let tenant = provision_tenant(&Admin::new(&url)).await;
    // Two conversations the history consumer runs on one lane.
    let stuck = uuid::Uuid::new_v4().to_string();
    let other = on_the_lane_of(&stuck);
    ingest(
        &url,
        &tenant.id,
        &stuck,
        "ConversationStarted",
        started("stuck@example.com"),
    )
    .await;
    // A message: only recorded (no UCS call), so it does not wait in the backlog, and the
    // transcript written after the outage has it.
    let message = json!({"message_id": uuid::Uuid::new_v4().to_string(),
        "participant_id": "customer", "participant_kind": "CUSTOMER", "nickname": "Sam",
        "text": "still waiting", "transcript_position": 1});
    ingest(&url, &tenant.id, &stuck, "MessageReceived", message).await;
    ingest(&url, &tenant.id, &stuck, "ConversationClosed", closed()).await;
    // The other conversation's events reach the lane only after the stuck one failed there.
    eventually(WAIT, "the stuck contact refused", || {
        let refused = ucs.calls() > 0;
        async move { refused.then_some(()) }
    })
    .await;
    start_and_close(&url, &tenant.id, &other, "fine@example.com").await;

    eventually(WAIT, "the other conversation written", || {
        let done = ucs.stopped(&other);
        async move { done.then_some(()) }
    })
    .await;
    assert_written_once_in_order(&ucs, &tenant.id, &other, 1);
    assert!(
        ucs.effects_of(&stuck).is_empty(),
        "the stuck one got past its contact"
    );
    // Its two events wait in the backlog, acked: no lag, the role is not paused.
    eventually(WAIT, "the stuck conversation backlogged", || async {
        let (queued, lag) = system.backlog_and_lag().await;
        let m = system.metrics().await;
        let paused = metric_sum(&m, "nexus_worker_paused", &["role=\"history\""]);
        (queued == Some(2.0) && lag == Some(0.0) && paused == Some(0.0)).then_some(())
    })
    .await;
    let m = system.metrics().await;
    assert!(
        metric_sum(&m, "nexus_backlog_redriven_total", &["outcome=\"retried\""])
            .is_some_and(|n| n >= 1.0),
        "tried again from the backlog"
    );

    ucs.state.lock().unwrap().fail_email = None;
    eventually(WAIT, "the stuck conversation written after all", || {
        let done = ucs.stopped(&stuck);
        async move { done.then_some(()) }
    })
    .await;
    assert_written_once_in_order(&ucs, &tenant.id, &stuck, 1);
    {
        let state = ucs.state.lock().unwrap();
        let transcript = &state.documents[&object_id(&tenant.id, &stuck, "transcript")];
        let texts: Vec<&str> = transcript["Content"]["Messages"]
            .as_array()
            .map(|m| m.iter().filter_map(|e| e["Text"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(texts, ["still waiting"], "{transcript}");
    }
    eventually(WAIT, "the backlog emptied", || async {
        let m = system.metrics().await;
        (metric_sum(&m, "nexus_backlog_events", &["role=\"history\""]) == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_repeats_no_effect_at_ucs() {
    const CONVERSATIONS: usize = 24;
    let ucs = FakeUcs::start().await;
    // A UCS under load: the kill lands while calls are in flight.
    ucs.state.lock().unwrap().delay = Duration::from_millis(40);
    let mut system = System::start(&ucs).await;
    let url = system.edge.url.clone();
    let tenant = provision_tenant(&Admin::new(&url)).await;

    // No email or phone: only the deterministic contact Id keeps a repeated IdentifyContact
    // from creating a second contact.
    let starts = (0..CONVERSATIONS).map(|n| {
        let (url, tenant) = (url.clone(), &tenant);
        async move {
            let start = json!({"nickname": format!("n{n}"), "first_name": format!("F{n}"),
                "last_name": "Doe", "text": format!("question {n}")});
            chat_and_leave(&url, tenant, start).await
        }
    });
    let convs: Vec<String> = futures::future::join_all(starts).await;

    eventually(WAIT, "some effects before the kill", || {
        let n = ucs.effects().len();
        async move { (n >= CONVERSATIONS).then_some(()) }
    })
    .await;
    system.history.nexus.child.kill().expect("SIGKILL");
    system.history.nexus.child.wait().expect("reap");
    let at_kill = ucs.effects().len();
    let dir = system.dir.path().to_path_buf();
    system.history = start_node(
        &dir,
        "history-2",
        &["worker", "history"],
        system.env.clone(),
    )
    .await;

    for conv in &convs {
        eventually(WAIT, "written after the restart", || {
            let done = ucs.stopped(conv);
            async move { done.then_some(()) }
        })
        .await;
    }
    for conv in &convs {
        assert_written_once_in_order(&ucs, &tenant.id, conv, 1);
    }
    let contacts = ucs.state.lock().unwrap().contacts.len();
    assert_eq!(contacts, CONVERSATIONS, "one contact per conversation");
    eprintln!(
        "killed at {at_kill} of {} effects; {} calls in all",
        CONVERSATIONS * 4,
        ucs.calls()
    );
}

/// `nexus dev` (embedded bus, SQLite): the same steps through the same SQL; and without UCS
/// configured every event is acked without a call and counted as skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_dev_writes_on_sqlite_and_skips_without_ucs() {
    let ucs = FakeUcs::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = |name: &'static str, ucs_url: String| {
        let mut env = base_env(dir.path());
        env.push((
            "NEXUS_BUS__URL",
            format!("embedded://{}", dir.path().join(name).join("bus").display()),
        ));
        env.push(("NEXUS_WORKERS__HISTORY__UCS__URL", ucs_url));
        env.push(("NEXUS_WORKERS__HISTORY__TRANSCRIPT_SETTLE_MS", "300".into()));
        let path = dir.path().to_path_buf();
        async move { start_node(&path, name, &["dev"], env).await }
    };

    let node = dev("with-ucs", ucs.url()).await;
    let tenant = provision_tenant(&Admin::new(&node.url)).await;
    let conv = chat_and_leave(
        &node.url,
        &tenant,
        json!({"nickname": "D", "phone_number": "+15550100", "text": "hi"}),
    )
    .await;
    eventually(WAIT, "written from nexus dev", || {
        let done = ucs.stopped(&conv);
        async move { done.then_some(()) }
    })
    .await;
    assert_written_once_in_order(&ucs, &tenant.id, &conv, 1);
    drop(node);

    let node = dev("without-ucs", String::new()).await;
    let tenant = provision_tenant(&Admin::new(&node.url)).await;
    chat_and_leave(&node.url, &tenant, json!({"nickname": "E", "text": "hi"})).await;
    let calls = ucs.calls();
    eventually(WAIT, "events skipped", || {
        let url = node.url.clone();
        async move {
            let m = reqwest::get(format!("{url}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let skipped = metric_sum(&m, "nexus_history_events_total", &["skipped"])?;
            (skipped >= 3.0).then_some(())
        }
    })
    .await;
    assert_eq!(ucs.calls(), calls, "no call without UCS");
}

/// The texts of a conversation's transcript document at UCS, in order.
fn transcript_texts(ucs: &FakeUcs, tenant: &str, conv: &str) -> Vec<String> {
    let state = ucs.state.lock().unwrap();
    let transcript = &state.documents[&object_id(tenant, conv, "transcript")];
    transcript["Content"]["Messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|e| e["Text"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// An agent's reply racing the customer's leaving reaches the interaction stream just after
/// `ConversationClosed` (the two come from different input topics). The transcript waits
/// `transcript_settle_ms` after the close, so the reply is in it; an entry later than that is
/// left out and counted `late`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_just_after_the_close_is_in_the_transcript() {
    let ucs = FakeUcs::start().await;
    let settle = Duration::from_millis(2_000);
    let system = System::start_with(
        &ucs,
        vec![(
            "NEXUS_WORKERS__HISTORY__TRANSCRIPT_SETTLE_MS",
            settle.as_millis().to_string(),
        )],
    )
    .await;
    let url = system.edge.url.clone();
    let tenant = provision_tenant(&Admin::new(&url)).await;
    let conv = uuid::Uuid::new_v4().to_string();
    let message = |position: i64, kind: &str, text: &str| {
        json!({"message_id": uuid::Uuid::new_v4().to_string(), "participant_id": kind,
            "participant_kind": kind.to_uppercase(), "nickname": kind,
            "text": text, "transcript_position": position})
    };
    ingest(
        &url,
        &tenant.id,
        &conv,
        "ConversationStarted",
        started("race@example.com"),
    )
    .await;
    ingest(
        &url,
        &tenant.id,
        &conv,
        "MessageReceived",
        message(1, "customer", "bye"),
    )
    .await;
    // Before the close is published: the wait counts from when history took it.
    let closed_at = std::time::Instant::now();
    ingest(&url, &tenant.id, &conv, "ConversationClosed", closed()).await;
    // The racing reply, published after the close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ingest(
        &url,
        &tenant.id,
        &conv,
        "MessageSent",
        message(2, "agent", "thanks, goodbye"),
    )
    .await;
    eventually(WAIT, "the conversation written", || {
        let done = ucs.stopped(&conv);
        async move { done.then_some(()) }
    })
    .await;
    assert!(
        closed_at.elapsed() >= settle,
        "the transcript went before the settle time"
    );
    assert_written_once_in_order(&ucs, &tenant.id, &conv, 1);
    assert_eq!(
        transcript_texts(&ucs, &tenant.id, &conv),
        ["bye", "thanks, goodbye"]
    );
    // Past the settle time: not written again, counted.
    ingest(
        &url,
        &tenant.id,
        &conv,
        "MessageSent",
        message(3, "agent", "too late"),
    )
    .await;
    eventually(WAIT, "the late entry counted", || async {
        let m = system.metrics().await;
        metric_sum(
            &m,
            "nexus_history_events_total",
            &["event=\"entry\"", "outcome=\"late\""],
        )
        .filter(|n| *n >= 1.0)
    })
    .await;
    assert_written_once_in_order(&ucs, &tenant.id, &conv, 1);
    let m = system.metrics().await;
    assert!(
        metric_sum(&m, "nexus_backlog_queued_total", &["reason=\"deferred\""])
            .is_some_and(|n| n >= 1.0),
        "the close waited in the backlog"
    );
}
