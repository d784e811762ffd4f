//! Review cases of the history worker against a loopback UCS (a real HTTP server started here),
//! with real processes (`nexus edge`, `nexus worker history`) on NATS JetStream and PostgreSQL:
//! a refusal whose body carries a NUL or the request's credential is dead-lettered once, clean
//! and naming the call; an event whose ids the state store cannot key is dead-lettered instead
//! of holding its consumer lane; a UCS answering 404 to everything (a wrong base path) is paused,
//! not a dead letter per event, while one event's 404 is still dead-lettered.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::chat::*;
use common::process::metric_sum;
use common::ucs::{FakeUcs, Mode, Refusal};
use nexus::bus::{dlq_topic, headers, Bus, Message};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const TOPIC: &str = "nexus.interaction.v1";
const CREDENTIAL: &str = "ucs-secret-for-review";
/// The own credential of tenant `echo`, whose UCS echoes it back.
const ECHO_CREDENTIAL: &str = "echo-tenant-secret-4711";

/// NATS, a fresh database, the edge (for ingest) and the history role.
struct System {
    history: Node,
    edge: Node,
    bus: Arc<dyn Bus>,
    db_url: String,
    _nats: OwnNats,
    _db: TestDb,
    _dir: tempfile::TempDir,
}

impl System {
    async fn start(ucs: &FakeUcs, extra: Vec<(&'static str, String)>) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = OwnNats::start(dir.path()).await;
        let db = TestDb::create().await;
        let mut env = shared_services_env(dir.path(), &nats.url, &db.url);
        env.extend([
            ("NEXUS_CONSUMER__RETRY_MAX_MS", "400".into()),
            ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "4000".into()),
            ("NEXUS_WORKERS__HISTORY__UCS__URL", ucs.url()),
            ("NEXUS_WORKERS__HISTORY__UCS__CREDENTIAL", CREDENTIAL.into()),
            ("NEXUS_WORKERS__HISTORY__UCS__TIMEOUT_MS", "1000".into()),
            (
                "NEXUS_WORKERS__HISTORY__UCS__RETRY_INITIAL_MS",
                "200".into(),
            ),
            ("NEXUS_WORKERS__HISTORY__UCS__RETRY_MAX_MS", "1000".into()),
            ("NEXUS_WORKERS__HISTORY__TRANSCRIPT_SETTLE_MS", "300".into()),
        ]);
        env.extend(extra);
        let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
        assert!(ok, "topology apply: {out} {err}");
        let edge = start_node(dir.path(), "edge", &["edge"], env.clone()).await;
        let history = start_node(dir.path(), "history", &["worker", "history"], env).await;
        let mut bus_config = nexus::config::Config::defaults().bus;
        bus_config.url = nats.url.clone();
        let bus = nexus::bus::connect(&bus_config).await.expect("bus");
        System {
            history,
            edge,
            bus,
            db_url: db.url.clone(),
            _nats: nats,
            _db: db,
            _dir: dir,
        }
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.history.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    async fn dead_lettered(&self, reason: &str) -> f64 {
        let m = self.metrics().await;
        metric_sum(
            &m,
            "nexus_events_dead_lettered_total",
            &[TOPIC, &format!("reason=\"{reason}\"")],
        )
        .unwrap_or(0.0)
    }

    async fn backlog(&self) -> Option<f64> {
        let m = self.metrics().await;
        metric_sum(&m, "nexus_backlog_events", &["role=\"history\""])
    }

    /// Every record of the interaction topic's dead-letter topic.
    async fn dead_letters(&self) -> Vec<Message> {
        common::read_topic(self.bus.as_ref(), &dlq_topic(TOPIC)).await
    }
}

/// The conversation a dead letter is of (its record key).
fn dead_letter_of<'a>(dead: &'a [Message], conv: &str) -> Vec<&'a Message> {
    dead.iter().filter(|m| m.key == conv).collect()
}

/// Publishes an interaction event through the edge's ingest endpoint.
async fn ingest(url: &str, tenant: &str, conv: &str, event_type: &str, body: Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/events/{TOPIC}"))
        .bearer_auth(ADMIN)
        .json(&json!({"event_type": event_type, "tenant_id": tenant,
            "conversation_id": conv, "body": body}))
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
}

fn started(email: &str) -> Value {
    json!({"customer_participant_id": "customer", "customer_nickname": "Sam",
        "contact": {"email_address": email}})
}

fn closed() -> Value {
    json!({"reason": "CUSTOMER_LEFT", "closed_by_participant_id": "customer"})
}

fn message(position: i64, text: &str) -> Value {
    json!({"message_id": uuid::Uuid::new_v4().to_string(), "participant_id": "customer",
        "participant_kind": "CUSTOMER", "nickname": "Sam", "text": text,
        "transcript_position": position})
}

/// A new conversation id the history consumer runs on the same lane as `conversation` (32
/// lanes, topology).
fn on_the_lane_of(conversation: &str) -> String {
    let lane = nexus::bus::consumer::lane_of(conversation, 32);
    std::iter::repeat_with(|| uuid::Uuid::new_v4().to_string())
        .find(|c| nexus::bus::consumer::lane_of(c, 32) == lane)
        .expect("a key on the same lane")
}

/// `text` as UTF-16LE, as some gateways answer: every other byte a NUL.
fn utf16le(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// UCS refuses a call with a body that is no clean text and echoes the request's
/// `Authorization`: a UTF-16 page (NUL bytes) at the global UCS, a text with line breaks (a
/// forged log line) at tenant `echo`'s own. The refusals reach the history role on both paths:
/// from the backlog (a close's transcript, after the settle wait) and on the consumer's lane (a
/// start). Each event is dead-lettered once as `ucs_rejected`, its detail naming the call, with
/// no credential and no control character in the dead-letter headers or the log. Before,
/// PostgreSQL refused the NUL in the backlog's `last_error`, so the close was never marked
/// dead-lettered: UCS was called again at every lease, for good, and the conversation never
/// went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_with_nul_bytes_or_the_credential_in_its_body_is_dead_lettered_clean() {
    let ucs = FakeUcs::start().await;
    let echo = FakeUcs::start().await;
    ucs.state.lock().unwrap().refusals.insert(
        "AddDocument".into(),
        Refusal {
            status: 400,
            content_type: "text/plain; charset=utf-16le".into(),
            body: utf16le("document refused; credential: "),
            echo_authorization: true,
        },
    );
    echo.state.lock().unwrap().refusals.insert(
        "IdentifyContact".into(),
        Refusal {
            status: 400,
            content_type: "text/plain".into(),
            body: b"contact refused\r\nX-Forged: 1\ncredential: ".to_vec(),
            echo_authorization: true,
        },
    );
    let system = System::start(
        &ucs,
        vec![
            (
                "NEXUS_WORKERS__HISTORY__UCS__TENANTS__ECHO__URL",
                echo.url(),
            ),
            (
                "NEXUS_WORKERS__HISTORY__UCS__TENANTS__ECHO__CREDENTIAL",
                ECHO_CREDENTIAL.into(),
            ),
        ],
    )
    .await;
    let url = system.edge.url.clone();

    // From the backlog: the close's transcript is refused after the settle wait.
    let conv = uuid::Uuid::new_v4().to_string();
    ingest(
        &url,
        "t1",
        &conv,
        "ConversationStarted",
        started("a@example.com"),
    )
    .await;
    ingest(&url, "t1", &conv, "MessageReceived", message(1, "hello")).await;
    ingest(&url, "t1", &conv, "ConversationClosed", closed()).await;
    // On the lane: the echo tenant's start is refused at its own UCS.
    let echoed = uuid::Uuid::new_v4().to_string();
    ingest(
        &url,
        "echo",
        &echoed,
        "ConversationStarted",
        started("b@example.com"),
    )
    .await;

    eventually(WAIT, "both refusals dead-lettered", || async {
        (system.dead_lettered("ucs_rejected").await >= 2.0).then_some(())
    })
    .await;
    eventually(WAIT, "the backlog emptied", || async {
        (system.backlog().await == Some(0.0)).then_some(())
    })
    .await;
    // Nothing more is tried: the close's refusal was settled, not run again at each lease.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let documents = {
        let s = ucs.state.lock().unwrap();
        s.calls.iter().filter(|c| c.method == "AddDocument").count()
    };
    assert_eq!(
        documents, 1,
        "the refused transcript was sent {documents} times"
    );
    assert_eq!(system.dead_lettered("ucs_rejected").await, 2.0);

    let dead = system.dead_letters().await;
    for (c, call) in [
        (&conv, "OMInteractions/AddDocument"),
        (&echoed, "OMContacts/IdentifyContact"),
    ] {
        let letters = dead_letter_of(&dead, c);
        assert_eq!(letters.len(), 1, "{c}: {letters:?}");
        let m = letters[0];
        assert_eq!(m.header(headers::DLQ_REASON), Some("ucs_rejected"));
        let error = m.header(headers::DLQ_ERROR).expect("error header");
        assert!(error.contains(call), "the detail names the call: {error}");
        assert!(error.contains("400"), "{error}");
        assert!(
            !error.contains(CREDENTIAL) && !error.contains(ECHO_CREDENTIAL),
            "a credential in a dead-letter header: {error}"
        );
        assert!(
            !error.chars().any(char::is_control),
            "a control character in a dead-letter header: {error:?}"
        );
    }
    let log = system.history.nexus.log_text();
    assert!(
        !log.contains(CREDENTIAL) && !log.contains(ECHO_CREDENTIAL),
        "a credential in the log"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("X-Forged")),
        "a forged log line"
    );
}

/// An event whose conversation id holds a NUL (PostgreSQL text refuses it) or is too long for
/// an index key (PostgreSQL refuses a btree key over ~2.7 kB) fails the same way on every
/// try. Retried in place, it held its consumer lane for good: every conversation behind it on
/// that lane waited, unwritten, with the lag growing. It is dead-lettered as
/// `history_bad_event` at once; the conversations behind it are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_ids_the_store_cannot_key_holds_no_lane() {
    let ucs = FakeUcs::start().await;
    let system = System::start(&ucs, Vec::new()).await;
    let url = system.edge.url.clone();
    // Random, so PostgreSQL cannot compress it under its index limit.
    let long: String = std::iter::repeat_with(|| uuid::Uuid::new_v4().simple().to_string())
        .take(125)
        .collect();
    let bad = [
        ("nul-start\u{0}id".to_string(), "ConversationStarted"),
        ("nul-entry\u{0}id".to_string(), "MessageReceived"),
        (long, "ConversationStarted"),
    ];
    let mut behind = Vec::new();
    for (conv, event_type) in &bad {
        let body = match *event_type {
            "MessageReceived" => message(1, "hi"),
            _ => started("c@example.com"),
        };
        ingest(&url, "t1", conv, event_type, body).await;
        // A conversation on the same lane, right behind it.
        let next = on_the_lane_of(conv);
        ingest(
            &url,
            "t1",
            &next,
            "ConversationStarted",
            started("d@example.com"),
        )
        .await;
        ingest(&url, "t1", &next, "ConversationClosed", closed()).await;
        behind.push(next);
    }
    for conv in &behind {
        eventually(WAIT, "the conversation behind a bad event written", || {
            let done = ucs.stopped(conv);
            async move { done.then_some(()) }
        })
        .await;
    }
    eventually(WAIT, "the bad events dead-lettered", || async {
        (system.dead_lettered("history_bad_event").await >= 3.0).then_some(())
    })
    .await;
    let dead = system.dead_letters().await;
    for (conv, _) in &bad {
        let letters = dead_letter_of(&dead, conv);
        assert_eq!(letters.len(), 1, "one dead letter of each bad event");
        assert_eq!(
            letters[0].header(headers::DLQ_REASON),
            Some("history_bad_event")
        );
    }
    // Nothing of them reached UCS: the four calls of each conversation behind them, no more.
    assert_eq!(
        ucs.calls(),
        4 * behind.len(),
        "UCS was called for a bad event"
    );
}

/// Many conversations closing at once, each with a chat file (a backlog drained after a UCS
/// outage, or a busy minute): the history role sends at most
/// [`nexus::workers::history::ATTACHMENTS_AT_ONCE`] files to UCS at once, each once and whole.
/// Before, every backlog drive (16) and consumer lane sent its own, each file in memory about
/// three times over (up to 10 MB a file): over a gigabyte in a pod the chart gives 512 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_files_go_to_ucs_a_few_at_a_time() {
    const CONVERSATIONS: usize = 12;
    let ucs = FakeUcs::start().await;
    // Slow answers, so that calls made at once overlap at UCS.
    ucs.state.lock().unwrap().delay = Duration::from_millis(400);
    let system = System::start(&ucs, Vec::new()).await;
    let url = system.edge.url.clone();
    let tenant = provision_tenant(&Admin::new(&url)).await;
    let key =
        nexus::stores::provisioning::secrets::EncryptionKey::parse(&"5e".repeat(32)).expect("key");
    let files = nexus::stores::provisioning::Provisioning::connect(&system.db_url, &key)
        .await
        .expect("provisioning");
    let mut convs = Vec::new();
    for n in 0..CONVERSATIONS {
        let conv = uuid::Uuid::new_v4().to_string();
        let data = png(200_000 + n);
        let file = files
            .put_file(
                nexus::stores::provisioning::NewChatFile {
                    id: None,
                    tenant_id: tenant.id.clone(),
                    conversation_id: conv.clone(),
                    name: format!("f{n}.png"),
                    content_type: "image/png".into(),
                    data: data.clone(),
                    expires_at_ms: None,
                },
                10,
            )
            .await
            .expect("put file")
            .expect("stored");
        ingest(
            &url,
            &tenant.id,
            &conv,
            "ConversationStarted",
            started("f@example.com"),
        )
        .await;
        let mut m = message(1, "see attached");
        m["media_ids"] = json!([file.id]);
        ingest(&url, &tenant.id, &conv, "MessageReceived", m).await;
        convs.push((conv, file.id, data));
    }
    // The closes last, close together: their transcripts settle and go at about one time.
    for (conv, _, _) in &convs {
        ingest(&url, &tenant.id, conv, "ConversationClosed", closed()).await;
    }
    for (conv, _, _) in &convs {
        eventually(Duration::from_secs(60), "the conversation written", || {
            let done = ucs.stopped(conv);
            async move { done.then_some(()) }
        })
        .await;
    }
    let m = system.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "nexus_history_attachments_total",
            &["outcome=\"added\""]
        ),
        Some(CONVERSATIONS as f64)
    );
    let s = ucs.state.lock().unwrap();
    let most = s.most_in_flight.get("AddDocument/Attachment").copied();
    assert!(
        most.is_some_and(|n| n <= nexus::workers::history::ATTACHMENTS_AT_ONCE),
        "{most:?} files sent to UCS at once"
    );
    use base64::Engine;
    for (conv, file_id, data) in &convs {
        let id = nexus::workers::history::ucs::object_id(
            &tenant.id,
            conv,
            &format!("attachment/{file_id}"),
        );
        let sent: Vec<&common::ucs::Call> = s
            .calls
            .iter()
            .filter(|c| c.body["Parameters"]["Id"] == id.as_str())
            .collect();
        assert_eq!(sent.len(), 1, "{conv}: its file sent once");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(
                sent[0].body["Parameters"]["Content"]
                    .as_str()
                    .expect("content"),
            )
            .expect("base64");
        assert_eq!(&bytes, data, "{conv}: the file's bytes");
        assert_eq!(sent[0].body["Parameters"]["Size"], data.len());
    }
}

/// Quick probes, so a UCS that answers again is found within the test's wait.
fn quick_probes() -> Vec<(&'static str, String)> {
    vec![
        (
            "NEXUS_WORKERS__HISTORY__UCS__PAUSE_INITIAL_MS",
            "300".into(),
        ),
        ("NEXUS_WORKERS__HISTORY__UCS__PAUSE_MAX_MS", "800".into()),
    ]
}

impl System {
    async fn metric(&self, name: &str, needles: &[&str]) -> f64 {
        metric_sum(&self.metrics().await, name, needles).unwrap_or(0.0)
    }

    async fn misconfigured(&self) -> f64 {
        self.metric(
            "nexus_peer_calls_total",
            &["role=\"history\"", "outcome=\"misconfigured\""],
        )
        .await
    }

    async fn paused(&self) -> f64 {
        self.metric("nexus_worker_paused", &["role=\"history\""])
            .await
    }

    /// Dead letters of the interaction topic, every reason.
    async fn all_dead_lettered(&self) -> f64 {
        self.metric("nexus_events_dead_lettered_total", &[TOPIC])
            .await
    }
}

/// IdentifyContact calls UCS got for the contact `email`.
fn identify_calls(ucs: &FakeUcs, email: &str) -> usize {
    let s = ucs.state.lock().unwrap();
    s.calls
        .iter()
        .filter(|c| c.method == "IdentifyContact" && c.body["Parameters"]["EmailAddress"] == email)
        .count()
}

/// UCS configured at a wrong base path (or behind a proxy with no such route) answers 404 to
/// every call. Before, each 404 was taken for UCS refusing the event: every start and close was
/// dead-lettered as `ucs_rejected`, the whole history stream set aside by a one-character
/// config mistake. Now the target is taken for misconfigured, as for a 401: the role pauses,
/// the calls are counted `misconfigured`, the events wait in the backlog, nothing is
/// dead-lettered, and once the right UCS answers every conversation is written once, in order.
/// Both 404s are met: a start's IdentifyContact (find or create: UCS has no 404 for it) and the
/// transcript of a conversation UCS had opened before (a call that can miss its interaction,
/// told by asking the conversation's IdentifyContact again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ucs_answering_404_to_everything_pauses_and_dead_letters_nothing() {
    let ucs = FakeUcs::start().await;
    let system = System::start(&ucs, quick_probes()).await;
    let url = system.edge.url.clone();
    // Opened at UCS while it answered.
    let open = uuid::Uuid::new_v4().to_string();
    ingest(
        &url,
        "t1",
        &open,
        "ConversationStarted",
        started("open@example.com"),
    )
    .await;
    ingest(&url, "t1", &open, "MessageReceived", message(1, "hello")).await;
    eventually(WAIT, "the first conversation opened at UCS", || {
        let opened = ucs
            .effects_of(&open)
            .iter()
            .any(|e| e.method == "InsertInteraction");
        async move { opened.then_some(()) }
    })
    .await;

    ucs.set_mode(Mode::Down(404));
    ingest(&url, "t1", &open, "ConversationClosed", closed()).await;
    let mut convs = vec![open.clone()];
    for n in 0..3 {
        let conv = uuid::Uuid::new_v4().to_string();
        ingest(
            &url,
            "t1",
            &conv,
            "ConversationStarted",
            started(&format!("c{n}@example.com")),
        )
        .await;
        ingest(&url, "t1", &conv, "MessageReceived", message(1, "hi")).await;
        ingest(&url, "t1", &conv, "ConversationClosed", closed()).await;
        convs.push(conv);
    }
    // The first close's transcript, three starts and the closes queued behind them.
    eventually(
        WAIT,
        "history paused, the events in the backlog",
        || async {
            (system.paused().await == 1.0 && system.backlog().await == Some(7.0)).then_some(())
        },
    )
    .await;
    eventually(
        WAIT,
        "the first transcript refused with a 404 and told",
        || async {
            let asked = {
                let s = ucs.state.lock().unwrap();
                s.calls.iter().any(|c| {
                    c.method == "AddDocument"
                        && c.body["Parameters"]["InteractionId"] == open.as_str()
                })
            };
            (asked && identify_calls(&ucs, "open@example.com") >= 2).then_some(())
        },
    )
    .await;
    let misconfigured = system.misconfigured().await;
    assert!(
        misconfigured >= 4.0,
        "{misconfigured} calls counted misconfigured"
    );
    // A few probes more: still nothing set aside.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(system.all_dead_lettered().await, 0.0, "dead-lettered");
    assert!(system.dead_letters().await.is_empty(), "a dead letter");
    assert_eq!(system.paused().await, 1.0, "resumed while 404");

    // The right UCS answers (the path fixed): everything is written once, in order.
    ucs.set_mode(Mode::Up);
    for conv in &convs {
        eventually(WAIT, "the conversation written", || {
            let done = ucs.stopped(conv);
            async move { done.then_some(()) }
        })
        .await;
        let methods: Vec<String> = ucs.effects_of(conv).into_iter().map(|e| e.method).collect();
        assert_eq!(
            methods,
            ["InsertInteraction", "AddDocument", "SetInteractionStatus"],
            "{conv}: once, in order"
        );
    }
    let contacts = ucs
        .effects()
        .iter()
        .filter(|e| e.method == "IdentifyContact")
        .count();
    assert_eq!(contacts, convs.len(), "one contact per conversation");
    eventually(WAIT, "the backlog drained, history resumed", || async {
        (system.backlog().await == Some(0.0) && system.paused().await == 0.0).then_some(())
    })
    .await;
    assert_eq!(system.all_dead_lettered().await, 0.0, "dead-lettered");
}

/// One event's 404 (UCS does not know the interaction its transcript names, while it answers
/// the conversation's IdentifyContact) is still that event's refusal: dead-lettered once as
/// `ucs_rejected`, naming the call, nothing paused or counted `misconfigured`. UCS is asked
/// whose 404 it is first (the conversation's IdentifyContact again), which the test sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_events_404_is_dead_lettered_while_ucs_answers_its_contact() {
    let ucs = FakeUcs::start().await;
    ucs.state.lock().unwrap().refusals.insert(
        "AddDocument".into(),
        Refusal {
            status: 404,
            content_type: "application/json".into(),
            body: br#"{"error": "unknown InteractionId"}"#.to_vec(),
            echo_authorization: false,
        },
    );
    let system = System::start(&ucs, quick_probes()).await;
    let url = system.edge.url.clone();
    let conv = uuid::Uuid::new_v4().to_string();
    ingest(
        &url,
        "t1",
        &conv,
        "ConversationStarted",
        started("gone@example.com"),
    )
    .await;
    ingest(&url, "t1", &conv, "MessageReceived", message(1, "hello")).await;
    ingest(&url, "t1", &conv, "ConversationClosed", closed()).await;
    eventually(WAIT, "the refused transcript dead-lettered", || async {
        (system.dead_lettered("ucs_rejected").await >= 1.0).then_some(())
    })
    .await;
    let dead = system.dead_letters().await;
    let letters = dead_letter_of(&dead, &conv);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let error = letters[0].header(headers::DLQ_ERROR).unwrap_or_default();
    assert!(
        error.contains("OMInteractions/AddDocument") && error.contains("404"),
        "{error}"
    );
    assert_eq!(
        identify_calls(&ucs, "gone@example.com"),
        2,
        "the start's IdentifyContact, then once more to tell whose 404 it was"
    );
    assert_eq!(system.misconfigured().await, 0.0, "taken for misconfigured");
    assert_eq!(system.paused().await, 0.0, "one event's 404 paused UCS");

    // UCS goes on for the others.
    ucs.state.lock().unwrap().refusals.clear();
    let next = uuid::Uuid::new_v4().to_string();
    ingest(
        &url,
        "t1",
        &next,
        "ConversationStarted",
        started("next@example.com"),
    )
    .await;
    ingest(&url, "t1", &next, "ConversationClosed", closed()).await;
    eventually(WAIT, "the next conversation written", || {
        let done = ucs.stopped(&next);
        async move { done.then_some(()) }
    })
    .await;
    assert_eq!(system.all_dead_lettered().await, 1.0);
}
