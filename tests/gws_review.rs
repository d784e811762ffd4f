//! Review cases of the gws worker against a fake GWS on loopback (a real HTTP server started
//! here), with real processes (`nexus edge` for ingest, `nexus worker gws`) on NATS JetStream
//! and PostgreSQL:
//! - an event whose ids no store can key (a NUL, an id too long for an index) is dead-lettered
//!   at once as `gws_bad_event` instead of holding its consumer lane (or its conversation) for
//!   good;
//! - GWS refusing nexus itself (a rotated credential: 401) is GWS down, not a refusal of each
//!   event: the role pauses, the events wait in the backlog, nothing is dead-lettered, and
//!   everything goes once GWS takes nexus again. A 403 or 404 for an agent GWS refuses (its own
//!   user refused with a 403 or 404 too), or for one event, is still that event's refusal;
//! - a slow GWS whose `/api/v2/me` hangs: every try ends within the handler timeout (the
//!   identity check has its own short timeout), so its failures count and the event is set
//!   aside after `retry_max_attempts` instead of being cut short, uncounted, for good.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::chat::*;
use common::gws::{Action, FakeGws};
use common::process::metric_sum;
use nexus::bus::{dlq_topic, headers, Bus, Message};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const TOPIC: &str = "nexus.agent.v1";
const GWS_TOKEN: &str = "gws-credential-for-review";
/// The gws role's consumer lanes (topology: concurrency 16).
const LANES: usize = 16;

/// Each test starts two processes and a NATS server: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// NATS, a fresh database, the edge (for ingest) and the gws role.
struct System {
    gws_worker: Node,
    edge: Node,
    bus: Arc<dyn Bus>,
    _nats: OwnNats,
    _db: TestDb,
    _dir: tempfile::TempDir,
}

impl System {
    async fn start(gws: &FakeGws) -> System {
        Self::start_with(gws, Vec::new()).await
    }

    /// [`System::start`] with `overrides` after the usual settings (the later wins).
    async fn start_with(gws: &FakeGws, overrides: Vec<(&'static str, String)>) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = OwnNats::start(dir.path()).await;
        let db = TestDb::create().await;
        let mut env = shared_services_env(dir.path(), &nats.url, &db.url);
        env.extend([
            ("NEXUS_CONSUMER__RETRY_MAX_MS", "400".into()),
            ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "4000".into()),
            ("NEXUS_WORKERS__GWS__URL", gws.url()),
            ("NEXUS_WORKERS__GWS__CREDENTIAL", GWS_TOKEN.into()),
            ("NEXUS_WORKERS__GWS__TIMEOUT_MS", "1000".into()),
            // A try's two calls and two identity checks fit in the handler timeout.
            ("NEXUS_WORKERS__GWS__IDENTITY_TIMEOUT_MS", "500".into()),
            ("NEXUS_WORKERS__GWS__PAUSE_AFTER_FAILURES", "3".into()),
            ("NEXUS_WORKERS__GWS__PAUSE_INITIAL_MS", "200".into()),
            ("NEXUS_WORKERS__GWS__PAUSE_MAX_MS", "800".into()),
            ("NEXUS_WORKERS__GWS__RETRY_INITIAL_MS", "200".into()),
            ("NEXUS_WORKERS__GWS__RETRY_MAX_MS", "1000".into()),
        ]);
        env.extend(overrides);
        let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
        assert!(ok, "topology apply: {out} {err}");
        let edge = start_node(dir.path(), "edge", &["edge"], env.clone()).await;
        let gws_worker = start_node(dir.path(), "gws", &["worker", "gws"], env).await;
        let mut bus_config = nexus::config::Config::defaults().bus;
        bus_config.url = nats.url.clone();
        let bus = nexus::bus::connect(&bus_config).await.expect("bus");
        System {
            gws_worker,
            edge,
            bus,
            _nats: nats,
            _db: db,
            _dir: dir,
        }
    }

    async fn metric(&self, metric: &str, needles: &[&str]) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.gws_worker.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        metric_sum(&text, metric, needles).unwrap_or(0.0)
    }

    /// Events the role dead-lettered with `reason` ("" for any).
    async fn dead_lettered(&self, reason: &str) -> f64 {
        let reason = format!("reason=\"{reason}");
        self.metric(
            "nexus_events_dead_lettered_total",
            &["group=\"nexus-gws\"", &reason],
        )
        .await
    }

    async fn paused(&self) -> f64 {
        self.metric("nexus_worker_paused", &["role=\"gws\"", "peer=\"gws\""])
            .await
    }

    async fn backlog(&self) -> f64 {
        self.metric("nexus_backlog_events", &["role=\"gws\""]).await
    }

    /// Every record of the agent topic's dead-letter topic.
    async fn dead_letters(&self) -> Vec<Message> {
        common::read_topic(self.bus.as_ref(), &dlq_topic(TOPIC)).await
    }

    /// Publishes an agent event through the edge's ingest endpoint.
    async fn ingest(&self, tenant: &str, conv: &str, event_type: &str, body: Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/events/{TOPIC}", self.edge.url))
            .bearer_auth(ADMIN)
            .json(&json!({"event_type": event_type, "tenant_id": tenant,
                "conversation_id": conv, "producer": "edge/agent", "body": body}))
            .send()
            .await
            .expect("ingest");
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    }

    /// Agent `agent` accepts `conv`, sends the replies `messages` and completes it.
    async fn whole_chat(&self, tenant: &str, conv: &str, agent: &str, messages: &[String]) {
        self.ingest(tenant, conv, "AgentAccepted", accepted(agent))
            .await;
        for m in messages {
            self.ingest(tenant, conv, "MessageSent", sent(agent, m))
                .await;
        }
        self.ingest(tenant, conv, "ConversationCompleted", completed(agent))
            .await;
    }
}

fn accepted(agent: &str) -> Value {
    json!({"offer_id": uuid::Uuid::new_v4().to_string(), "agent_id": agent,
        "participant_id": agent, "nickname": "Alice"})
}

fn sent(agent: &str, message_id: &str) -> Value {
    json!({"message_id": message_id, "participant_id": agent, "participant_kind": "AGENT",
        "nickname": "Alice", "agent_id": agent, "kind": "TEXT", "text": "hello",
        "media_ids": [], "in_reply_to": null, "transcript_position": null})
}

fn completed(agent: &str) -> Value {
    json!({"agent_id": agent, "participant_id": agent, "disposition": null, "note": null,
        "user_data": {}, "close_conversation": true})
}

/// What the fake GWS applies for [`System::whole_chat`].
fn whole_chat_effects(agent: &str, messages: &[String]) -> Vec<String> {
    let mut want = vec![format!("Accept {agent}")];
    want.extend(messages.iter().map(|m| format!("SendMessage {agent} {m}")));
    want.push(format!("Complete {agent} -"));
    want
}

/// A new conversation id the gws consumer runs on the same lane as `key`.
fn on_the_lane_of(key: &str) -> String {
    let lane = nexus::bus::consumer::lane_of(key, LANES);
    std::iter::repeat_with(|| uuid::Uuid::new_v4().to_string())
        .find(|c| nexus::bus::consumer::lane_of(c, LANES) == lane)
        .expect("a key on the same lane")
}

/// Random text of `bytes` bytes (PostgreSQL cannot compress it under its index limit).
fn random_id(bytes: usize) -> String {
    std::iter::repeat_with(|| uuid::Uuid::new_v4().simple().to_string())
        .flat_map(|u| u.chars().collect::<Vec<_>>())
        .take(bytes)
        .collect()
}

async fn applied_eventually(gws: &FakeGws, conv: &str, want: &[String], what: &str) {
    eventually(WAIT, what, || async {
        (gws.applied(conv).len() >= want.len()).then_some(())
    })
    .await;
    assert_eq!(gws.applied(conv), want, "{what}");
}

/// An agent event whose tenant or conversation id holds a NUL (PostgreSQL text refuses it, so
/// the backlog's look-up failed before the worker's own checks ran) or whose tenant id is too
/// long for an index key (the effect log's and the backlog's inserts failed) was retried in
/// place for good: every conversation behind it on its consumer lane waited, and the lag grew.
/// An accept whose agent id (part of the effect's key) is too long for the effect log's index
/// failed its conversation for 20 tries before it was dead-lettered as `retries_exhausted`, the
/// conversation's later events waiting behind it. Each is now
/// dead-lettered at once as `gws_bad_event`, with no GWS call; the conversations behind them go
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_ids_no_store_can_key_holds_no_gws_lane() {
    let _serial = SERIAL.lock().await;
    let gws = FakeGws::start(GWS_TOKEN).await;
    let system = System::start(&gws).await;
    let good = uuid::Uuid::new_v4().to_string();
    // (tenant, conversation): the event's ids.
    let bad_ids = [
        ("t\u{0}1".to_string(), good.clone()),
        ("t1".to_string(), "nul\u{0}conversation".to_string()),
        (random_id(4000), uuid::Uuid::new_v4().to_string()),
    ];
    let mut behind = Vec::new();
    for (tenant, conv) in &bad_ids {
        system
            .ingest(tenant, conv, "AgentAccepted", accepted("a1"))
            .await;
        // A conversation on the same lane, right behind it.
        let next = on_the_lane_of(conv);
        system
            .ingest("t1", &next, "AgentAccepted", accepted("a1"))
            .await;
        behind.push(next);
    }
    // An accept whose agent id (in the effect's key) is too long for the effect log's index;
    // the conversation's next events wait behind it.
    let conv = uuid::Uuid::new_v4().to_string();
    let after = uuid::Uuid::new_v4().to_string();
    system
        .ingest("t1", &conv, "AgentAccepted", accepted(&random_id(4000)))
        .await;
    system
        .ingest("t1", &conv, "AgentAccepted", accepted("a1"))
        .await;
    system
        .ingest("t1", &conv, "MessageSent", sent("a1", &after))
        .await;
    let replies = [(conv, after)];
    for conv in &behind {
        applied_eventually(
            &gws,
            conv,
            &["Accept a1".to_string()],
            "the conversation behind a bad event is handled",
        )
        .await;
    }
    for (conv, after) in &replies {
        applied_eventually(
            &gws,
            conv,
            &["Accept a1".to_string(), format!("SendMessage a1 {after}")],
            "the conversation's events behind a bad one go",
        )
        .await;
    }
    eventually(WAIT, "the bad events dead-lettered", || async {
        (system.dead_lettered("gws_bad_event").await >= 4.0).then_some(())
    })
    .await;
    assert_eq!(
        system.dead_lettered("").await,
        4.0,
        "each bad event dead-lettered once, as a bad event"
    );
    let dead = system.dead_letters().await;
    assert_eq!(dead.len(), 4, "{dead:?}");
    for m in &dead {
        assert_eq!(m.header(headers::DLQ_REASON), Some("gws_bad_event"));
        let error = m.header(headers::DLQ_ERROR).unwrap_or_default();
        assert!(
            !error.chars().any(char::is_control),
            "a control character in a dead-letter header: {error:?}"
        );
    }
    // None of them reached GWS: the accepts behind them and the good replies, no more.
    let calls = gws.all_applied().len();
    assert_eq!(
        calls,
        behind.len() + 2 * replies.len(),
        "GWS was called for a bad event"
    );
    assert_eq!(system.backlog().await, 0.0, "nothing waits in the backlog");
}

/// nexus pointed at a wrong GWS base path: everything answers 404, the agent's own user too,
/// with or without an agent's id. That is nexus's address to fix, not every agent's refusal:
/// GWS is taken for down (paused, counted `misconfigured`), the events wait in the backlog,
/// nothing is dead-lettered, and once the address answers every event goes through once, in
/// order. Before, the 404 to the agent's own user was taken for the agent's: every event was
/// dead-lettered as `gws_rejected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_base_url_pauses_gws_until_it_answers() {
    let _serial = SERIAL.lock().await;
    let gws = FakeGws::start(GWS_TOKEN).await;
    let system = System::start(&gws).await;
    gws.wrong_address(true);
    let chats = refused_outage(&system, &gws, "a wrong base URL", 404).await;
    gws.wrong_address(false);
    recovered(&system, &gws, &chats).await;
}

/// GWS stops taking nexus's credential (rotated at GWS, not yet in nexus's config): every call
/// is answered 401. Before, each event was dead-lettered as `gws_rejected` (to be replayed by
/// hand) and the circuit took the 401s for GWS being up. Now GWS is taken for down: the role
/// pauses (`nexus_worker_paused` 1, calls counted `misconfigured`), the events wait in the
/// backlog, nothing is dead-lettered, and once GWS takes the credential again every event goes
/// through once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_credential_pauses_gws_until_it_is_taken_again() {
    let _serial = SERIAL.lock().await;
    let gws = FakeGws::start(GWS_TOKEN).await;
    let system = System::start(&gws).await;
    // GWS has answered nexus before the rotation.
    let before = uuid::Uuid::new_v4().to_string();
    system.whole_chat("t1", &before, "a0", &[]).await;
    applied_eventually(
        &gws,
        &before,
        &whole_chat_effects("a0", &[]),
        "before the rotation",
    )
    .await;

    gws.set_token("the-rotated-credential");
    let chats = refused_outage(&system, &gws, "the rotated credential", 401).await;

    gws.set_token(GWS_TOKEN);
    recovered(&system, &gws, &chats).await;
}

/// A 403 or 404 whose agent's own user GWS refuses with a 403 or 404 too (a 404 only when
/// asked for that agent) is that agent's refusal (an agent GWS no longer knows), not GWS
/// refusing nexus: the check carries the agent's id, so pausing GWS for every tenant over one
/// agent would be wrong. Such events are
/// dead-lettered (`gws_rejected`), nothing paused, nothing counted `misconfigured`. A 403 to one
/// event while GWS answers the agent's own user is that event's refusal too: dead-lettered at
/// once, its conversation going on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_or_event_refused_is_dead_lettered_and_pauses_nobody() {
    let _serial = SERIAL.lock().await;
    let gws = FakeGws::start(GWS_TOKEN).await;
    let system = System::start(&gws).await;
    let misconfigured = || async {
        system
            .metric("nexus_peer_calls_total", &["outcome=\"misconfigured\""])
            .await
    };
    let before = misconfigured().await;
    for (i, status) in [403u16, 404].into_iter().enumerate() {
        gws.fail_all(Some(status));
        let conv = uuid::Uuid::new_v4().to_string();
        system
            .ingest("t1", &conv, "AgentAccepted", accepted("a1"))
            .await;
        let want = (i + 1) as f64;
        eventually(
            WAIT,
            &format!("{status}: the refused accept dead-lettered"),
            || async { (system.dead_lettered("gws_rejected").await >= want).then_some(()) },
        )
        .await;
        assert!(
            gws.me_answered(status) >= 1,
            "{status}: GWS's own user was asked whose refusal it was"
        );
        gws.fail_all(None);
        assert!(gws.applied(&conv).is_empty(), "{status}: applied");
    }
    assert_eq!(system.dead_lettered("gws_rejected").await, 2.0);
    assert_eq!(
        system.paused().await,
        0.0,
        "one agent refused pauses nobody"
    );
    assert_eq!(
        misconfigured().await,
        before,
        "nothing taken for nexus refused"
    );

    let conv = uuid::Uuid::new_v4().to_string();
    gws.rule(&conv, "SendMessage", Action::Status(403));
    let (refused, after) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    system
        .ingest("t1", &conv, "AgentAccepted", accepted("a1"))
        .await;
    system
        .ingest("t1", &conv, "MessageSent", sent("a1", &refused))
        .await;
    system
        .ingest("t1", &conv, "MessageSent", sent("a1", &after))
        .await;
    applied_eventually(
        &gws,
        &conv,
        &["Accept a1".to_string(), format!("SendMessage a1 {after}")],
        "the refused reply is set aside and the next one goes",
    )
    .await;
    eventually(WAIT, "the one refused event dead-lettered", || async {
        (system.dead_lettered("gws_rejected").await == 3.0).then_some(())
    })
    .await;
    assert_eq!(system.dead_lettered("").await, 3.0);
    assert_eq!(
        system.paused().await,
        0.0,
        "one event's refusal pauses nobody"
    );
}

/// GWS slow on one conversation (each read and POST answered after 1.3 s of a 1.6 s timeout)
/// refuses its accept with a 403, and its `/api/v2/me`, asked whose refusal that is, hangs;
/// other conversations' calls go through. A retried try reads the chat, POSTs and asks
/// `/api/v2/me`: 1.3 + 1.3 s plus the check. With the check under the call's timeout (1.6 s),
/// the try took 4.2 s and the 4 s handler timeout cut it; a cut try does not count, so the
/// event was tried for good (and its conversation held behind it), though the config check
/// (the timeout under half the handler timeout) passed. Now the check has its own timeout
/// (300 ms here) and the config check counts every call of a try: each try ends with the
/// check's timeout, a failure that counts (GWS answers the others meanwhile), and after
/// `retry_max_attempts` (2) the event is dead-lettered as `retries_exhausted`: GWS refused it
/// and never said whether it was nexus it refused, so it is neither `gws_rejected` (the
/// agent's refusal) nor GWS taken for down (a refusal of nexus).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_identity_check_ends_within_the_try() {
    let _serial = SERIAL.lock().await;
    let gws = FakeGws::start(GWS_TOKEN).await;
    let system = System::start_with(
        &gws,
        vec![
            ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "4000".into()),
            ("NEXUS_WORKERS__GWS__TIMEOUT_MS", "1600".into()),
            ("NEXUS_WORKERS__GWS__IDENTITY_TIMEOUT_MS", "300".into()),
            ("NEXUS_WORKERS__GWS__RETRY_MAX_ATTEMPTS", "2".into()),
        ],
    )
    .await;
    gws.delay_me(Duration::from_secs(60));
    let slow = uuid::Uuid::new_v4().to_string();
    gws.slow_chat(&slow, Duration::from_millis(1300));
    gws.refuse_chat(&slow, 403);
    // GWS answers other conversations, before and all along: a failure of the slow one counts.
    let other = || async {
        let conv = uuid::Uuid::new_v4().to_string();
        system
            .ingest("t1", &conv, "AgentAccepted", accepted("a2"))
            .await;
        conv
    };
    let first = other().await;
    applied_eventually(&gws, &first, &["Accept a2".to_string()], "GWS answers").await;
    system
        .ingest("t1", &slow, "AgentAccepted", accepted("a1"))
        .await;
    let started = std::time::Instant::now();
    while system
        .dead_lettered(nexus::workers::backlog::EXHAUSTED)
        .await
        < 1.0
    {
        assert!(
            started.elapsed() < WAIT,
            "the refused accept was never set aside: {} calls, {} identity checks asked",
            gws.received(&slow, "POST", "Accept"),
            gws.me_asked()
        );
        other().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = system.gws_worker.nexus.log_text();
    for cut in ["still running after", "timed out after"] {
        assert!(
            !log.contains(cut),
            "a try was cut by the handler timeout (`{cut}` in the worker's log)"
        );
    }
    assert_eq!(
        system.dead_lettered("").await,
        1.0,
        "only the refused accept"
    );
    let dead = system.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].key, slow);
    assert_eq!(
        dead[0].header(headers::DLQ_REASON),
        Some(nexus::workers::backlog::EXHAUSTED)
    );
    let error = dead[0].header(headers::DLQ_ERROR).unwrap_or_default();
    assert!(error.contains("/api/v2/me"), "{error}");
    assert_eq!(
        gws.received(&slow, "POST", "Accept"),
        2,
        "each of the two tries made its call"
    );
    assert!(gws.applied(&slow).is_empty());
}

/// Conversations whose events GWS refuses with `status` while it refuses nexus itself: the
/// role pauses, counts the calls `misconfigured`, keeps the events in the backlog and
/// dead-letters nothing. Returns the conversations with their message ids.
async fn refused_outage(
    system: &System,
    gws: &FakeGws,
    what: &str,
    status: u16,
) -> Vec<(String, Vec<String>)> {
    let before = system
        .metric("nexus_peer_calls_total", &["outcome=\"misconfigured\""])
        .await;
    let mut chats = Vec::new();
    for _ in 0..4 {
        let conv = uuid::Uuid::new_v4().to_string();
        let messages: Vec<String> = (0..2).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        system.whole_chat("t1", &conv, "a1", &messages).await;
        chats.push((conv, messages));
    }
    eventually(WAIT, &format!("{what}: the gws role pauses"), || async {
        (system.paused().await == 1.0).then_some(())
    })
    .await;
    eventually(WAIT, &format!("{what}: the events wait"), || async {
        (system.backlog().await >= 16.0).then_some(())
    })
    .await;
    let misconfigured = system
        .metric("nexus_peer_calls_total", &["outcome=\"misconfigured\""])
        .await;
    assert!(
        misconfigured - before >= 3.0,
        "{what}: {misconfigured} calls counted misconfigured (before: {before})"
    );
    // A few probes more: still nothing set aside.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(system.dead_lettered("").await, 0.0, "{what}: dead-lettered");
    assert_eq!(system.paused().await, 1.0, "{what}: resumed while refused");
    for (conv, _) in &chats {
        assert!(
            gws.applied(conv).is_empty(),
            "{what}: applied while refused"
        );
    }
    assert!(
        gws.answered(status) >= 3,
        "{what}: GWS was asked and said {status}"
    );
    chats
}

/// Once GWS takes nexus again: every event of `chats` goes through once, in order; the backlog
/// empties, the role resumes, nothing was dead-lettered.
async fn recovered(system: &System, gws: &FakeGws, chats: &[(String, Vec<String>)]) {
    for (conv, messages) in chats {
        applied_eventually(
            gws,
            conv,
            &whole_chat_effects("a1", messages),
            "every event once, in order, after the fix",
        )
        .await;
    }
    eventually(WAIT, "the backlog drained", || async {
        (system.backlog().await == 0.0).then_some(())
    })
    .await;
    eventually(WAIT, "the gws role resumes", || async {
        (system.paused().await == 0.0).then_some(())
    })
    .await;
    assert_eq!(system.dead_lettered("").await, 0.0, "dead-lettered");
}
