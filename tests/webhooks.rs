//! The webhooks worker end to end with real processes (`nexus edge`, `nexus worker
//! conversation`, `nexus worker webhooks`) on NATS JetStream + PostgreSQL + Redis, and real
//! receivers (`tests/common/webhooks.rs`) that record every request and fail on command (5xx,
//! hang, abort header). Standard Webhooks signatures are verified with the reference Python
//! package `standardwebhooks` (`pip install standardwebhooks`), genesys ones by recomputing.

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::chat::*;
use common::process::metric_sum;
use common::webhooks::{genesys_signature, verify_standard, Mode, Received, Receiver};
use nexus::bus::Bus;
use nexus::events::chat::{Channel, CloseReason, ConversationClosed, ConversationStarted};
use nexus::events::publish::publish;
use nexus::events::Event;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const INTERACTION: &str = "nexus.interaction.v1";

// ---- the system ------------------------------------------------------------------------

struct System {
    webhooks: Option<Node>,
    _conversation: Node,
    edge: Node,
    env: Vec<(&'static str, String)>,
    bus: Arc<dyn Bus>,
    admin: Admin,
    nats: OwnNats,
    _db: TestDb,
    db_url: String,
}

impl System {
    async fn start(dir: &std::path::Path, extra: &[(&'static str, &str)]) -> System {
        let nats = OwnNats::start(dir).await;
        let db = TestDb::create().await;
        let mut env = shared_services_env(dir, &nats.url, &db.url);
        // Subscriptions created mid-test apply at once.
        env.push(("NEXUS_WORKERS__WEBHOOKS__SUBSCRIPTION_CACHE_MS", "0".into()));
        env.push((
            "NEXUS_WORKERS__WEBHOOKS__ALLOW_PRIVATE_TARGETS",
            "true".into(),
        ));
        env.push((
            "NEXUS_WORKERS__WEBHOOKS__RETRY_SCHEDULE_MS",
            "[0, 300, 600]".into(),
        ));
        env.push(("NEXUS_WORKERS__WEBHOOKS__TIMEOUT_MS", "1000".into()));
        env.push(("NEXUS_WORKERS__WEBHOOKS__POLL_INTERVAL_MS", "100".into()));
        env.push(("NEXUS_WORKERS__WEBHOOKS__STATS_INTERVAL_MS", "200".into()));
        env.push((
            "NEXUS_WORKERS__WEBHOOKS__MAX_IN_FLIGHT_PER_ENDPOINT",
            "4".into(),
        ));
        for (k, v) in extra {
            env.push((k, v.to_string()));
        }
        let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
        assert!(ok, "topology apply: {out} {err}");
        let edge = start_node(dir, "edge", &["edge"], env.clone()).await;
        let conversation = start_node(
            dir,
            "conversation",
            &["worker", "conversation"],
            env.clone(),
        )
        .await;
        let webhooks = start_node(dir, "webhooks", &["worker", "webhooks"], env.clone()).await;
        let mut bus_config = common::bus_config("jetstream", None);
        bus_config.url = nats.url.clone();
        let bus = nexus::bus::connect(&bus_config).await.expect("bus");
        System {
            admin: Admin::new(&edge.url),
            webhooks: Some(webhooks),
            _conversation: conversation,
            edge,
            env,
            bus,
            nats,
            db_url: db.url.clone(),
            _db: db,
        }
    }

    async fn restart_webhooks(&mut self, dir: &std::path::Path, name: &str) {
        self.webhooks =
            Some(start_node(dir, name, &["worker", "webhooks"], self.env.clone()).await);
    }

    async fn tenant(&self) -> Tenant {
        provision_tenant(&self.admin).await
    }

    /// Creates a subscription; (id, secret).
    async fn subscribe(&self, tenant: &str, body: Value) -> (String, String) {
        let v = self
            .admin
            .post(&format!("/tenants/{tenant}/webhooks"), body)
            .await;
        (
            v["id"].as_str().expect("id").to_string(),
            v["secret"].as_str().expect("secret").to_string(),
        )
    }

    async fn admin_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self
            .admin
            .http
            .request(method, format!("{}/v1/admin{path}", self.edge.url))
            .bearer_auth(ADMIN);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.expect("admin call");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn started(&self, tenant: &str, conversation: &str) -> Event {
        let e = Event::typed(
            &ConversationStarted {
                channel: Channel::WebChat,
                channel_id: None,
                customer_participant_id: "p1".into(),
                customer_nickname: "Ann".into(),
                contact: Default::default(),
                contact_id: None,
                subject: None,
                user_data: BTreeMap::new(),
                is_async: false,
            },
            tenant,
            conversation,
            "test",
        )
        .expect("event");
        self.publish(&e).await;
        e
    }

    /// A close; `channel` `None` as written before the closed event carried it.
    async fn closed(&self, tenant: &str, conversation: &str, channel: Option<Channel>) -> Event {
        let e = Event::typed(
            &ConversationClosed {
                reason: CloseReason::CustomerLeft,
                closed_by_participant_id: None,
                transcript_length: 2,
                channel,
            },
            tenant,
            conversation,
            "test",
        )
        .expect("event");
        self.publish(&e).await;
        e
    }

    async fn publish(&self, e: &Event) {
        publish(self.bus.as_ref(), INTERACTION, e)
            .await
            .expect("publish");
    }

    async fn metrics(&self) -> String {
        let url = &self.webhooks.as_ref().expect("webhooks worker").url;
        reqwest::get(format!("{url}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits until the message log of a subscription shows `message` in `status`.
    async fn message_in(&self, tenant: &str, hook: &str, message: &str, status: &str) -> Value {
        eventually(WAIT, &format!("{message} {status}"), || async {
            let (code, v) = self
                .admin_call(
                    reqwest::Method::GET,
                    &format!("/tenants/{tenant}/webhooks/{hook}/messages/{message}"),
                    None,
                )
                .await;
            (code == 200 && v["status"] == status).then_some(v)
        })
        .await
    }
}

// ---- scenarios ---------------------------------------------------------------------------

/// A real chat (edge + conversation worker) starts and ends: STARTED then FINISHED, once each,
/// in both formats, correctly signed; a redelivered event is a no-op; a rotation signs with
/// both secrets; resend repeats the same webhook-id.
async fn both_formats_exactly_once(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    let (std_hook, std_secret) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("std"), "format": "standard"}),
        )
        .await;
    let (gen_hook, gen_secret) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("gen"), "format": "genesys"}),
        )
        .await;
    // Email-only: a chat must not reach it.
    s.subscribe(
        &tenant.id,
        json!({"url": rx.url("email"), "format": "standard", "media": ["email"]}),
    )
    .await;

    let http = reqwest::Client::new();
    let started: Value = http
        .post(format!("{}/nexus/v3/chat/sessions", s.edge.url))
        .header("x-api-key", &tenant.api_key)
        .json(&json!({"nickname": "Ann"}))
        .send()
        .await
        .expect("start chat")
        .json()
        .await
        .expect("start json");
    let sid = started["session_id"].as_str().expect("session").to_string();
    let ck = started["client_key"]
        .as_str()
        .expect("client key")
        .to_string();
    let first = rx.wait_for("std", 1).await;
    assert_eq!(first[0].event(), "STARTED");
    let r = http
        .post(format!(
            "{}/nexus/v3/chat/sessions/{sid}/disconnect",
            s.edge.url
        ))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .send()
        .await
        .expect("disconnect");
    assert_eq!(r.status(), 202);
    let std = rx.wait_for("std", 2).await;
    let gen = rx.wait_for("gen", 2).await;
    for got in [&std, &gen] {
        assert_eq!(
            got.iter().map(Received::event).collect::<Vec<_>>(),
            ["STARTED", "FINISHED"]
        );
        let entity = &got[1].json()["data"]["entities"][0]["entity"];
        assert_eq!(entity["id"], sid.as_str());
        assert_eq!(entity["mediaType"], "chat");
        assert_eq!(entity["interactionSubtype"], "webchat");
        assert!(entity["selfUri"].as_str().is_some_and(|u| u.contains(&sid)));
    }
    // Standard: verified by the reference implementation; distinct, stable ids.
    let verdicts = verify_standard(&[(&std_secret, &std[0]), (&std_secret, &std[1])]);
    assert_eq!(verdicts, ["ok", "ok"], "{std:?}");
    assert!(std[0].id().starts_with("msg_") && std[0].id() != std[1].id());
    // Genesys: recomputed.
    for r in &gen {
        assert_eq!(
            r.headers.get("x-hub-signature"),
            Some(&genesys_signature(&gen_secret, &r.body)),
            "{r:?}"
        );
        assert!(!r.headers.contains_key("webhook-id"));
    }

    // Redelivery: the same events again change nothing; a marker after them (same
    // conversation, so the same lane) proves they were handled.
    let conv = format!("c-{}", uuid::Uuid::new_v4().simple());
    let e1 = s.started(&tenant.id, &conv).await;
    let e2 = s.closed(&tenant.id, &conv, None).await;
    rx.wait_for("std", 4).await;
    s.publish(&e1).await;
    s.publish(&e2).await;
    let marker = s.started(&tenant.id, &conv).await;
    let std = rx.wait_for("std", 5).await;
    let ids: Vec<&str> = std.iter().map(Received::id).collect();
    let distinct: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "a webhook-id came twice: {ids:?}"
    );
    assert_eq!(
        std.last()
            .map(Received::json)
            .map(|v| v["operationId"].clone()),
        Some(json!(marker.envelope.event_id.to_string()))
    );
    assert!(
        rx.got("email").is_empty(),
        "the email-only subscription got a chat"
    );

    // Rotation: both the new and the previous secret verify the next delivery.
    let (code, rotated) = s
        .admin_call(
            reqwest::Method::POST,
            &format!("/tenants/{}/webhooks/{std_hook}/secret", tenant.id),
            None,
        )
        .await;
    assert_eq!(code, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().expect("secret").to_string();
    // The worker reads subscriptions again within a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.started(&tenant.id, &format!("c-{}", uuid::Uuid::new_v4().simple()))
        .await;
    let std = rx.wait_for("std", 6).await;
    let last = &std[5];
    assert_eq!(
        last.headers["webhook-signature"].split(' ').count(),
        2,
        "{last:?}"
    );
    let verdicts = verify_standard(&[(&new_secret, last), (&std_secret, last)]);
    assert_eq!(verdicts, ["ok", "ok"]);

    // Resend: the same message again, same webhook-id, logged as a further attempt.
    let (code, v) = s
        .admin_call(
            reqwest::Method::POST,
            &format!(
                "/tenants/{}/webhooks/{std_hook}/messages/{}/resend",
                tenant.id,
                std[0].id()
            ),
            None,
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let std = rx.wait_for("std", 7).await;
    assert_eq!(std[6].id(), std[0].id());
    assert_eq!(std[6].body, std[0].body);
    let m = s
        .message_in(&tenant.id, &std_hook, std[0].id(), "delivered")
        .await;
    assert_eq!(m["attempts"], 2, "{m}");
    // The list filters by status and pages.
    let (code, page) = s
        .admin_call(
            reqwest::Method::GET,
            &format!(
                "/tenants/{}/webhooks/{std_hook}/messages?status=delivered&limit=2",
                tenant.id
            ),
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));
    let next = page["next"].as_str().expect("a next page");
    let (code, more) = s
        .admin_call(
            reqwest::Method::GET,
            &format!(
                "/tenants/{}/webhooks/{std_hook}/messages?status=delivered&after={next}",
                tenant.id
            ),
            None,
        )
        .await;
    assert_eq!(code, 200, "{more}");
    assert!(
        !more["items"].as_array().expect("items").is_empty(),
        "{more}"
    );
    // A cursor is a position in its own subscription's list: another's refuses it rather than
    // skipping its messages before that id.
    let (code, refused) = s
        .admin_call(
            reqwest::Method::GET,
            &format!(
                "/tenants/{}/webhooks/{gen_hook}/messages?after={next}",
                tenant.id
            ),
            None,
        )
        .await;
    assert_eq!(code, 400, "{refused}");
    assert_eq!(refused["error"]["code"], "INVALID_FIELD", "{refused}");

    // A close naming its channel needs no STARTED: an email conversation whose start this
    // worker never saw reaches the email-only subscription as email.
    let conv = format!("c-{}", uuid::Uuid::new_v4().simple());
    s.closed(&tenant.id, &conv, Some(Channel::Email)).await;
    let email = rx.wait_for("email", 1).await;
    assert_eq!(email[0].event(), "FINISHED");
    let entity = &email[0].json()["data"]["entities"][0]["entity"];
    assert_eq!(entity["id"], conv.as_str());
    assert_eq!(entity["mediaType"], "email");
    assert_eq!(entity["interactionSubtype"], "email");
}

/// A new message is sent before its row is written (PostgreSQL): a first attempt that ends
/// within the intake's settle wait goes into the row's insert, a slower one updates the row
/// written meanwhile. Either way: one request, one logged attempt, `delivered`; the fast
/// endpoint's outcomes went in with their inserts; a redelivered event sends nothing.
async fn first_attempts_written_with_their_rows(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    let (fast_hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("fold-fast"), "format": "standard"}),
        )
        .await;
    // Well past the 150 ms first-attempt wait, well inside the 1 s attempt timeout.
    rx.set("fold-slow", Mode::Slow(600));
    let (slow_hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("fold-slow"), "format": "standard"}),
        )
        .await;
    let settled =
        |m: &str| metric_sum(m, "nexus_webhook_settled_at_insert_total", &[]).unwrap_or(0.0);
    let before = settled(&s.metrics().await);
    // One conversation: one lane, so the marker below comes after the redeliveries.
    let conv = format!("c-{}", uuid::Uuid::new_v4().simple());
    let mut events = Vec::new();
    for _ in 0..5 {
        events.push(s.started(&tenant.id, &conv).await);
    }
    let fast = rx.wait_for("fold-fast", 5).await;
    let slow = rx.wait_for("fold-slow", 5).await;
    for (hook, got) in [(&fast_hook, &fast), (&slow_hook, &slow)] {
        for r in got.iter() {
            let m = s.message_in(&tenant.id, hook, r.id(), "delivered").await;
            assert_eq!(m["attempts"], 1, "{m}");
            let log = m["attempts_log"].as_array().expect("attempts log");
            assert_eq!(log.len(), 1, "{m}");
            assert_eq!(log[0]["outcome"], "ok", "{m}");
            assert_eq!(log[0]["attempt"], 1, "{m}");
        }
    }
    // At least the fast endpoint's five went in with their rows (the slow one's cannot have).
    let after = settled(&s.metrics().await);
    assert!(
        after - before >= 5.0,
        "settled at insert: {before} → {after}"
    );
    // Redelivered: the rows exist, nothing is sent again (a marker proves the lane moved on).
    for e in &events {
        s.publish(e).await;
    }
    s.started(&tenant.id, &conv).await;
    let fast = rx.wait_for("fold-fast", 6).await;
    let slow = rx.wait_for("fold-slow", 6).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, got) in [("fold-fast", fast), ("fold-slow", slow)] {
        assert_eq!(got.len(), 6, "{name}: {got:?}");
        assert_eq!(
            rx.got(name).len(),
            6,
            "{name} got a redelivered event again"
        );
        let ids: HashSet<&str> = got.iter().map(Received::id).collect();
        assert_eq!(ids.len(), 6, "{name}: a webhook-id came twice");
    }
}

/// A receiver that answers 429 with Retry-After holds its whole endpoint: messages that come
/// after the 429 (new conversations, not retries) wait out the pause too, then all arrive once.
async fn throttling_holds_the_endpoint(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    s.subscribe(
        &tenant.id,
        json!({"url": rx.url("hold"), "format": "standard"}),
    )
    .await;
    rx.set("hold", Mode::ThrottleOnce(2));
    s.started(&tenant.id, "hold-1").await;
    let first = rx.wait_for("hold", 1).await;
    let throttled_at = first[0].at;
    for conv in ["hold-2", "hold-3", "hold-4"] {
        s.started(&tenant.id, conv).await;
    }
    let got = rx.wait_for("hold", 5).await;
    let early: Vec<Duration> = got[1..]
        .iter()
        .map(|r| r.at - throttled_at)
        .filter(|gap| *gap < Duration::from_millis(1900))
        .collect();
    assert!(
        early.is_empty(),
        "sent during the 2 s pause: {early:?} after the 429"
    );
    let delivered: HashSet<String> = got[1..].iter().map(Received::conversation).collect();
    assert_eq!(
        delivered.len(),
        4,
        "every conversation once after the pause: {got:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.got("hold").len(), 5, "nothing sent twice");
    let m = s.metrics().await;
    assert!(
        metric_sum(&m, "nexus_webhook_endpoint_pauses_total", &[]).unwrap_or(0.0) >= 1.0,
        "the pause is counted"
    );
}

/// 5xx twice then success, on the scaled schedule (0, 300, 600 ms); the attempt log shows it.
async fn retries_then_success_and_abort(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    let (hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("flaky"), "format": "standard"}),
        )
        .await;
    rx.set("flaky", Mode::FailTimes(503, 2));
    s.started(&tenant.id, "flaky-1").await;
    let got = rx.wait_for("flaky", 3).await;
    let id = got[0].id().to_string();
    assert!(
        got.iter().all(|r| r.id() == id),
        "one webhook-id for every retry"
    );
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    assert!(gap1 >= Duration::from_millis(250), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(550), "{gap2:?}");
    let m = s.message_in(&tenant.id, &hook, &id, "delivered").await;
    let log = m["attempts_log"].as_array().expect("attempts");
    assert_eq!(
        log.iter()
            .map(|a| a["status_code"].clone())
            .collect::<Vec<_>>(),
        [json!(503), json!(503), json!(204)]
    );
    assert!(log[0]["next_attempt_at_ms"].is_i64() && log[2]["next_attempt_at_ms"].is_null());
    assert!(log.iter().all(|a| a["latency_ms"].is_i64()));

    // A receiver that throttles with Retry-After gets its next attempt no earlier than it
    // asked (1 s), not after the schedule's 300 ms.
    let (hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("throttled"), "format": "standard"}),
        )
        .await;
    rx.set("throttled", Mode::ThrottleOnce(1));
    s.started(&tenant.id, "throttled-1").await;
    let got = rx.wait_for("throttled", 2).await;
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    let m = s
        .message_in(&tenant.id, &hook, got[0].id(), "delivered")
        .await;
    let log = m["attempts_log"].as_array().expect("attempts");
    assert_eq!(log[0]["status_code"], 429, "{m}");
    let waited = log[0]["next_attempt_at_ms"].as_i64().expect("next attempt")
        - log[0]["started_at_ms"].as_i64().expect("started");
    assert!(waited >= 1000, "next attempt {waited} ms after the 429");

    // The receiver can stop the retries.
    let (hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("abort"), "format": "standard"}),
        )
        .await;
    rx.set("abort", Mode::Abort);
    s.started(&tenant.id, "abort-1").await;
    let got = rx.wait_for("abort", 1).await;
    let m = s.message_in(&tenant.id, &hook, got[0].id(), "failed").await;
    assert_eq!(m["attempts"], 1, "{m}");
    assert_eq!(rx.got("abort").len(), 1);
}

/// After the last attempt a message is dead and on the dead-letter topic; recovery from the
/// topic queues it again once; replay-since queues failed and dead messages again.
async fn dead_letters_recovery_and_replay(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    let since = chrono::Utc::now().timestamp_millis();
    let (hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("dead"), "format": "genesys"}),
        )
        .await;
    rx.set("dead", Mode::Always(500));
    // FINISHED waits while STARTED is pending, then follows it once STARTED is dead.
    s.started(&tenant.id, "dead-1").await;
    s.closed(&tenant.id, "dead-1", Some(Channel::WebChat)).await;
    let got = rx.wait_for("dead", 6).await;
    assert_eq!(
        got.iter().map(Received::event).collect::<Vec<_>>(),
        ["STARTED", "STARTED", "STARTED", "FINISHED", "FINISHED", "FINISHED"]
    );
    let (code, page) = s
        .admin_call(
            reqwest::Method::GET,
            &format!("/tenants/{}/webhooks/{hook}/messages", tenant.id),
            None,
        )
        .await;
    assert_eq!(code, 200);
    let ids: Vec<String> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        s.message_in(&tenant.id, &hook, id, "dead").await;
    }
    eventually(WAIT, "dead-letter metric", || async {
        let m = s.metrics().await;
        (metric_sum(&m, "nexus_webhook_dead_lettered_total", &[]).unwrap_or(0.0) >= 2.0)
            .then_some(())
    })
    .await;

    // Recovery from the topic: both queued again and delivered; a second run queues nothing.
    rx.set("dead", Mode::Ok);
    let recover = format!("/tenants/{}/webhook-dead-letters/recover", tenant.id);
    let (code, v) = s.admin_call(reqwest::Method::POST, &recover, None).await;
    assert_eq!((code, v["queued"].clone()), (202, json!(2)), "{v}");
    rx.wait_for("dead", 8).await;
    for id in &ids {
        s.message_in(&tenant.id, &hook, id, "delivered").await;
    }
    let (code, v) = s.admin_call(reqwest::Method::POST, &recover, None).await;
    assert_eq!(
        (code, v["queued"].clone(), v["read"].clone()),
        (202, json!(0), json!(2)),
        "{v}"
    );

    // Replay-since: dead again, then all failed/dead since `since` go again.
    let (hook2, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("dead2"), "format": "standard"}),
        )
        .await;
    rx.set("dead2", Mode::Always(502));
    s.started(&tenant.id, "dead-2").await;
    s.started(&tenant.id, "dead-3").await;
    let got = rx.wait_for("dead2", 6).await;
    let ids: HashSet<String> = got.iter().map(|r| r.id().to_string()).collect();
    for id in &ids {
        s.message_in(&tenant.id, &hook2, id, "dead").await;
    }
    rx.set("dead2", Mode::Ok);
    let (code, v) = s
        .admin_call(
            reqwest::Method::POST,
            &format!("/tenants/{}/webhooks/{hook2}/replay", tenant.id),
            Some(json!({"since_ms": since})),
        )
        .await;
    assert_eq!((code, v["queued"].clone()), (202, json!(2)), "{v}");
    for id in &ids {
        s.message_in(&tenant.id, &hook2, id, "delivered").await;
    }
}

/// The `WebhookEndpointDisabled` events of one subscription on `nexus.webhooks.v1`, in order.
async fn disabled_events(s: &System, webhook_id: &str) -> Vec<nexus::events::Event> {
    let mut found = Vec::new();
    for p in s
        .bus
        .partition_offsets("nexus.webhooks.v1")
        .await
        .expect("offsets")
    {
        for rec in s
            .bus
            .read("nexus.webhooks.v1", p.partition, p.low, 100)
            .await
            .expect("read")
        {
            let e = nexus::events::decode(&rec.payload).expect("decode");
            if e.envelope.event_type == "WebhookEndpointDisabled"
                && e.body["webhook_id"] == webhook_id
            {
                found.push(e);
            }
        }
    }
    found
}

/// A disable whose event the bus never took (its publish failed, or the pod died between the
/// two) is announced by the worker's periodic pass, once, and its mark cleared.
async fn a_disable_owing_its_event_is_announced(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    let (hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("owed"), "format": "standard"}),
        )
        .await;
    let db = sqlx::PgPool::connect(&s.db_url).await.expect("database");
    sqlx::query(
        "UPDATE webhooks SET enabled = 0, failing_since_ms = 123, disabled_reason = 'down', \
         disable_event_pending = 1 WHERE id = $1",
    )
    .bind(&hook)
    .execute(&db)
    .await
    .expect("disable without its event");
    let events = eventually(WAIT, "the owed disable event", || async {
        let found = disabled_events(s, &hook).await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(events[0].body["failing_since_ms"], 123);
    assert_eq!(events[0].body["reason"], "down");
    let pending: i64 = eventually(WAIT, "the mark cleared", || async {
        let p: i64 = sqlx::query_scalar("SELECT disable_event_pending FROM webhooks WHERE id = $1")
            .bind(&hook)
            .fetch_one(&db)
            .await
            .ok()?;
        (p == 0).then_some(p)
    })
    .await;
    assert_eq!(pending, 0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(disabled_events(s, &hook).await.len(), 1, "announced once");
}

/// Standard Webhooks' 410 Gone: the endpoint is disabled at once (an event, the reason
/// named), its messages are not retried while it is off, and a re-enable delivers them.
async fn gone_disables_the_endpoint_at_once(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    let (hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("gone"), "format": "standard"}),
        )
        .await;
    rx.set("gone", Mode::Always(410));
    s.started(&tenant.id, "gone-1").await;
    let first = rx.wait_for("gone", 1).await;
    let id = first[0].id().to_string();
    let path = format!("/tenants/{}/webhooks/{hook}", tenant.id);
    let v = eventually(WAIT, "endpoint disabled by 410", || async {
        let (_, v) = s.admin_call(reqwest::Method::GET, &path, None).await;
        (v["enabled"] == false).then_some(v)
    })
    .await;
    assert!(
        v["disabled_reason"]
            .as_str()
            .is_some_and(|r| r.contains("410")),
        "{v}"
    );
    let disabled = disabled_events(s, &hook).await;
    assert_eq!(disabled.len(), 1, "one disable, one event");
    // The schedule's next attempt (300 ms) would have come by now: none while disabled.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(rx.got("gone").len(), 1, "no retry to a retired endpoint");
    s.message_in(&tenant.id, &hook, &id, "pending").await;

    rx.set("gone", Mode::Ok);
    let (status, v) = s
        .admin_call(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let got = rx.wait_for("gone", 2).await;
    assert_eq!(got[1].id(), id, "the same message, under its webhook-id");
    s.message_in(&tenant.id, &hook, &id, "delivered").await;
}

/// A subscription turned off while this process holds a backlog of it: what it holds goes
/// back untried instead of being sent (each start reads the subscription at most a second old).
async fn a_disabled_endpoint_gets_nothing_more(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    let (hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("off"), "format": "standard"}),
        )
        .await;
    // Every attempt takes the 1 s timeout: 4 at once, the rest held behind them.
    rx.set("off", Mode::Hang);
    for i in 0..16 {
        s.started(&tenant.id, &format!("off-{i}")).await;
    }
    rx.wait_for("off", 4).await;
    let path = format!("/tenants/{}/webhooks/{hook}", tenant.id);
    let (status, v) = s
        .admin_call(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let off_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let late: Vec<Duration> = rx
        .got("off")
        .iter()
        .filter(|r| r.at > off_at)
        .map(|r| r.at - off_at)
        .filter(|d| *d > Duration::from_millis(1500))
        .collect();
    assert!(
        late.is_empty(),
        "attempts started {late:?} after the subscription was disabled"
    );
}

/// A subscription the worker cannot read (here: a secret that no longer decrypts) charges no
/// attempt after the first and does not kill the message: it waits, and is delivered once the
/// subscription reads again (before, every try counted, and the message was dead within a
/// second).
async fn an_unreadable_subscription_charges_no_attempt(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    let (hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("unread"), "format": "standard"}),
        )
        .await;
    let db = sqlx::PgPool::connect(&s.db_url).await.expect("database");
    let secret: String = sqlx::query_scalar("SELECT secret FROM webhooks WHERE id = $1")
        .bind(&hook)
        .fetch_one(&db)
        .await
        .expect("secret");
    sqlx::query("UPDATE webhooks SET secret = 'AAAA' WHERE id = $1")
        .bind(&hook)
        .execute(&db)
        .await
        .expect("garble");
    s.started(&tenant.id, "unread-1").await;
    // The schedule's three attempts would all have run by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, attempts): (String, i64) =
        sqlx::query_as("SELECT status, attempts FROM webhook_messages WHERE webhook_id = $1")
            .bind(&hook)
            .fetch_one(&db)
            .await
            .expect("message");
    assert_eq!(status, "pending");
    assert!(attempts <= 1, "{attempts} attempts charged");
    let since: Option<i64> =
        sqlx::query_scalar("SELECT failing_since_ms FROM webhooks WHERE id = $1")
            .bind(&hook)
            .fetch_one(&db)
            .await
            .expect("clock");
    assert_eq!(since, None, "the endpoint's failure clock did not run");
    assert!(rx.got("unread").is_empty());
    sqlx::query("UPDATE webhooks SET secret = $2 WHERE id = $1")
        .bind(&hook)
        .bind(&secret)
        .execute(&db)
        .await
        .expect("restore");
    let got = rx.wait_for("unread", 1).await;
    s.message_in(&tenant.id, &hook, got[0].id(), "delivered")
        .await;
    let m = s.metrics().await;
    assert!(
        metric_sum(
            &m,
            "nexus_webhook_dispatch_errors_total",
            &["stage=\"target\""]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "counted"
    );
}

/// One hanging endpoint and one healthy one on the same events: the healthy one's deliveries
/// stay fast; the hanging one is disabled after `disable_after`, which is an event.
async fn dead_endpoint_does_not_slow_a_healthy_one(s: &System, rx: &Receiver) {
    let tenant = s.tenant().await;
    let (hang_hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("hang"), "format": "standard"}),
        )
        .await;
    s.subscribe(
        &tenant.id,
        json!({"url": rx.url("fast"), "format": "standard"}),
    )
    .await;
    rx.set("hang", Mode::Hang);
    let mut sent = HashMap::new();
    for i in 0..20 {
        let conv = format!("hang-{i}");
        s.started(&tenant.id, &conv).await;
        sent.insert(conv, Instant::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fast = rx.wait_for("fast", 20).await;
    let mut worst = Duration::ZERO;
    for r in &fast {
        worst = worst.max(r.at - sent[&r.conversation()]);
    }
    assert!(
        worst < Duration::from_millis(800),
        "a healthy endpoint waited {worst:?} behind a hanging one"
    );
    // The hanging endpoint holds at most its own limit (4) of attempts at once: none of them
    // ends before the 1 s timeout, so no fifth one starts before.
    let hang = rx.got("hang");
    let first = hang.first().expect("the hanging endpoint was called").at;
    let early = hang
        .iter()
        .filter(|r| r.at - first < Duration::from_millis(900))
        .count();
    assert!(
        early <= 4,
        "{early} attempts at once at the hanging endpoint"
    );

    // disable_after (2.5 s here): the hanging endpoint is disabled, once, as an event.
    let hook = eventually(WAIT, "endpoint disabled", || async {
        let (_, v) = s
            .admin_call(
                reqwest::Method::GET,
                &format!("/tenants/{}/webhooks/{hang_hook}", tenant.id),
                None,
            )
            .await;
        (v["enabled"] == false).then_some(v)
    })
    .await;
    assert!(hook["disabled_reason"].is_string(), "{hook}");
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "nexus_webhook_endpoints_disabled_total", &[]),
        Some(1.0)
    );
    assert!(
        metric_sum(&m, "nexus_webhook_attempts_total", &["outcome=\"timeout\""]).unwrap_or(0.0)
            >= 1.0
    );
    let disabled = disabled_events(s, &hang_hook).await;
    assert_eq!(disabled.len(), 1, "one disable, one event");
    assert_eq!(disabled[0].envelope.tenant_id, tenant.id);

    // Enabled again and still hanging: disabled again, a new event (consumers dedup by id).
    let hook_path = format!("/tenants/{}/webhooks/{hang_hook}", tenant.id);
    let (status, v) = s
        .admin_call(
            reqwest::Method::PATCH,
            &hook_path,
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for i in 0..10 {
        s.started(&tenant.id, &format!("hang-again-{i}")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Distinct ids: a publish repeated after a lost ack is the same event (at-least-once).
    let ids = eventually(WAIT, "endpoint disabled again", || async {
        let mut ids: Vec<_> = disabled_events(s, &hang_hook)
            .await
            .into_iter()
            .map(|e| e.envelope.event_id)
            .collect();
        ids.dedup();
        (ids.len() >= 2).then_some(ids)
    })
    .await;
    assert_eq!(ids.len(), 2, "two disables, two event ids: {ids:?}");
}

/// A tenant whose endpoints all hang holds only its own share of the process's slots
/// (`max_in_flight_per_tenant`, 6 of 10 here): another tenant's deliveries stay fast. Its
/// three hanging endpoints (4 each) would take every slot without that bound.
async fn a_tenant_cannot_take_every_slot(s: &System, rx: &Receiver) {
    let (greedy, other) = (s.tenant().await, s.tenant().await);
    for i in 0..3 {
        let name = format!("greedy-{i}");
        rx.set(&name, Mode::Hang);
        s.subscribe(
            &greedy.id,
            json!({"url": rx.url(&name), "format": "standard"}),
        )
        .await;
    }
    s.subscribe(
        &other.id,
        json!({"url": rx.url("other"), "format": "standard"}),
    )
    .await;
    let mut sent = HashMap::new();
    for i in 0..20 {
        s.started(&greedy.id, &format!("greedy-{i}")).await;
        let conv = format!("other-{i}");
        s.started(&other.id, &conv).await;
        sent.insert(conv, Instant::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fast = rx.wait_for("other", 20).await;
    let mut waits: Vec<Duration> = fast
        .iter()
        .map(|r| r.at - sent[&r.conversation()])
        .collect();
    waits.sort();
    let worst = waits.last().copied().unwrap_or_default();
    // Without the bound it waited 3.9 s (all slots hung for the 1 s timeout, again and
    // again). With it, what remains is the greedy tenant's events holding consumer lanes
    // while their first attempts are awaited (`first_attempt_wait_ms`, 150 ms here), which
    // delays the events behind them: up to 0.8 s seen on a slow VM.
    assert!(
        worst < Duration::from_millis(1_500),
        "a tenant waited {worst:?} behind another tenant's hanging endpoints: {waits:?}"
    );
    // No hanging attempt ends before the 1 s timeout: at most the tenant's 6 start before.
    let hung: Vec<Instant> = (0..3)
        .flat_map(|i| rx.got(&format!("greedy-{i}")))
        .map(|r| r.at)
        .collect();
    let first = hung
        .iter()
        .min()
        .expect("the hanging endpoints were called");
    let early = hung
        .iter()
        .filter(|at| **at - *first < Duration::from_millis(900))
        .count();
    assert!(
        early <= 6,
        "{early} attempts at once for one tenant, over its limit of 6"
    );
    // Its slots come back as the hung attempts time out: more attempts start (retries and
    // the messages still waiting), which a count that never went down would stop at 6.
    let this = rx.clone();
    eventually(WAIT, "the tenant's next attempts", move || {
        let n: usize = (0..3).map(|i| this.got(&format!("greedy-{i}")).len()).sum();
        async move { (n > 6).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_deliver_retry_dead_letter_and_recover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start().await;
    let s = System::start(
        dir.path(),
        &[
            ("NEXUS_WORKERS__WEBHOOKS__DISABLE_AFTER_MS", "2500"),
            ("NEXUS_WORKERS__WEBHOOKS__MAX_IN_FLIGHT", "10"),
            ("NEXUS_WORKERS__WEBHOOKS__MAX_IN_FLIGHT_PER_TENANT", "6"),
            // Room for a loaded CI machine: the fast endpoint's attempts end within this.
            ("NEXUS_WORKERS__WEBHOOKS__FIRST_ATTEMPT_WAIT_MS", "150"),
        ],
    )
    .await;
    both_formats_exactly_once(&s, &rx).await;
    first_attempts_written_with_their_rows(&s, &rx).await;
    retries_then_success_and_abort(&s, &rx).await;
    throttling_holds_the_endpoint(&s, &rx).await;
    dead_letters_recovery_and_replay(&s, &rx).await;
    dead_endpoint_does_not_slow_a_healthy_one(&s, &rx).await;
    a_tenant_cannot_take_every_slot(&s, &rx).await;
    gone_disables_the_endpoint_at_once(&s, &rx).await;
    a_disabled_endpoint_gets_nothing_more(&s, &rx).await;
    an_unreadable_subscription_charges_no_attempt(&s, &rx).await;
    a_disable_owing_its_event_is_announced(&s, &rx).await;
    let m = s.metrics().await;
    assert!(
        metric_sum(&m, "nexus_webhook_attempts_total", &["outcome=\"ok\""]).unwrap_or(0.0) >= 10.0
    );
    assert!(
        metric_sum(&m, "nexus_webhook_attempt_duration_seconds_count", &[]).unwrap_or(0.0) >= 10.0
    );
    assert!(
        m.contains("nexus_webhook_retry_queue_depth"),
        "queue depth gauge"
    );
    assert!(
        m.contains("nexus_webhook_oldest_pending_age_seconds"),
        "oldest age gauge"
    );
}

/// SIGKILL of the webhooks worker mid-load, then a restart: every message is delivered,
/// webhook-ids are the expected ones, STARTED before FINISHED in every conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_webhooks_worker_loses_nothing() {
    const CONVERSATIONS: usize = 60;
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start().await;
    let mut s = System::start(dir.path(), &[]).await;
    let tenant = s.tenant().await;
    s.subscribe(
        &tenant.id,
        json!({"url": rx.url("load"), "format": "standard"}),
    )
    .await;
    // 4 at once, 40 ms each: about 1.2 s of deliveries, so the kill lands mid-load.
    rx.set("load", Mode::Slow(40));
    for i in 0..CONVERSATIONS {
        s.started(&tenant.id, &format!("load-{i}")).await;
        s.closed(&tenant.id, &format!("load-{i}"), Some(Channel::WebChat))
            .await;
    }
    rx.wait_for("load", CONVERSATIONS / 3).await;
    let mut worker = s.webhooks.take().expect("worker");
    worker.nexus.child.kill().expect("SIGKILL");
    let _ = worker.nexus.child.wait();
    let at_kill = rx.got("load").len();
    assert!(at_kill < 2 * CONVERSATIONS, "the kill came after the load");
    s.restart_webhooks(dir.path(), "webhooks-2").await;
    let this = rx.clone();
    eventually(
        Duration::from_secs(40),
        "every message answered",
        move || {
            let answered: HashSet<String> = this
                .state
                .lock()
                .unwrap()
                .answered
                .iter()
                .cloned()
                .collect();
            async move { (answered.len() >= 2 * CONVERSATIONS).then_some(()) }
        },
    )
    .await;
    let got = rx.got("load");
    let ids: HashSet<&str> = got.iter().map(Received::id).collect();
    assert_eq!(ids.len(), 2 * CONVERSATIONS, "distinct webhook-ids");
    let duplicates = got.len() - ids.len();
    eprintln!("killed after {at_kill} requests; {duplicates} repeated after the restart");
    assert!(
        duplicates <= 16,
        "{duplicates} repeats: more than was in flight at the kill ({at_kill} delivered then)"
    );
    // The log agrees: nothing pending, every message delivered.
    let hooks = s
        .admin_call(
            reqwest::Method::GET,
            &format!("/tenants/{}/webhooks", tenant.id),
            None,
        )
        .await
        .1;
    let hook = hooks["items"][0]["id"].as_str().expect("hook").to_string();
    let delivered = eventually(WAIT, "log shows all delivered", || async {
        let (_, v) = s
            .admin_call(
                reqwest::Method::GET,
                &format!(
                    "/tenants/{}/webhooks/{hook}/messages?status=delivered&limit=500",
                    tenant.id
                ),
                None,
            )
            .await;
        let n = v["items"].as_array().map(Vec::len).unwrap_or(0);
        (n == 2 * CONVERSATIONS).then_some(n)
    })
    .await;
    assert_eq!(delivered, 2 * CONVERSATIONS);
    // Per conversation: the first FINISHED comes after the last STARTED attempt began.
    let mut per: HashMap<String, Vec<String>> = HashMap::new();
    for r in &got {
        per.entry(r.conversation()).or_default().push(r.event());
    }
    assert_eq!(per.len(), CONVERSATIONS);
    for (conv, events) in per {
        let first_finished = events
            .iter()
            .position(|e| e == "FINISHED")
            .expect("finished");
        let last_started = events
            .iter()
            .rposition(|e| e == "STARTED")
            .expect("started");
        assert!(last_started < first_finished, "{conv}: {events:?}");
    }
}

const DEAD_TOPIC: &str = nexus::events::webhook::WEBHOOK_DEAD_TOPIC;

/// The records on the webhook dead-letter topic, decoded, in order.
async fn dead_records(s: &System) -> Vec<nexus::events::Event> {
    let mut found = Vec::new();
    for p in s.bus.partition_offsets(DEAD_TOPIC).await.expect("offsets") {
        for rec in s
            .bus
            .read(DEAD_TOPIC, p.partition, p.low, 1000)
            .await
            .expect("read")
        {
            found.push(nexus::events::decode(&rec.payload).expect("decode"));
        }
    }
    found
}

/// Messages found exhausted at a claim (their last attempt logged, their dead-letter publish
/// failed) are published by at most `DEAD_LETTERS_IN_FLIGHT` (4) tasks at once per process; the
/// others are given back and taken by later claims, none marked dead before the topic took it,
/// and once the topic takes them each is dead-lettered once.
///
/// The dead-letter stream is set to store records without acknowledging them, so every publish
/// stays in flight for the bus's 5 s acknowledgement timeout and then fails: a record stored and
/// not yet counted as a failed publish is a publish under way. Then the stream is deleted and
/// made again by `nexus topology apply`: empty, and acknowledging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_messages_are_dead_lettered_a_few_at_a_time() {
    /// `DEAD_LETTERS_IN_FLIGHT` in `src/workers/webhooks/dispatcher.rs`.
    const BOUND: usize = 4;
    /// More than twice the bound: at least three rounds of claims.
    const N: usize = 9;
    /// The dead-letter topic's JetStream stream.
    const STREAM: &str = "nexus_webhooks_dead_v1";
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start().await;
    let s = System::start(dir.path(), &[]).await;
    let tenant = s.tenant().await;
    let (hook, _) = s
        .subscribe(
            &tenant.id,
            json!({"url": rx.url("spent"), "format": "standard"}),
        )
        .await;
    rx.set("spent", Mode::Always(500));
    let js = async_nats::jetstream::new(async_nats::connect(&s.nats.url).await.expect("nats"));
    let mut config = js
        .get_stream(STREAM)
        .await
        .expect("the dead-letter stream")
        .info()
        .await
        .expect("stream info")
        .config
        .clone();
    config.no_ack = true;
    js.update_stream(&config)
        .await
        .expect("stream without acks");
    let db = sqlx::PgPool::connect(&s.db_url).await.expect("database");
    let publish_failures = |m: &str| {
        metric_sum(
            m,
            "nexus_webhook_dispatch_errors_total",
            &["stage=\"publish\""],
        )
        .unwrap_or(0.0) as usize
    };

    // One STARTED per conversation: nine messages, three failed attempts each.
    for i in 0..N {
        s.started(&tenant.id, &format!("spent-{i}")).await;
    }
    rx.wait_for("spent", 3 * N).await;
    let last_attempt = Instant::now();
    // Each sender's own publish after the last attempt times out.
    eventually(
        Duration::from_secs(30),
        "every sender's publish failed",
        || async { (publish_failures(&s.metrics().await) >= N).then_some(()) },
    )
    .await;
    // Claims' failures count in the same metric: on a loaded machine a slow sender's publish
    // could still wait when the count is reached. Each started within moments of its last
    // attempt and fails 5 s later, so 8 s after the last attempt all of them are over.
    tokio::time::sleep_until((last_attempt + Duration::from_secs(8)).into()).await;
    // From here every publish comes from a claim that found the message exhausted (the
    // senders' own publishes are not under the claims' bound, so it is watched only once they
    // are over). Watch two rounds of them: what was
    // stored (read first) less what failed (read after) is at most the publishes under way,
    // which never exceed the bound.
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let stored = dead_records(&s).await.len();
        let failed = publish_failures(&s.metrics().await);
        let under_way = stored.saturating_sub(failed);
        assert!(
            under_way <= BOUND,
            "{under_way} dead-letter publishes under way ({stored} stored, {failed} failed)"
        );
        most = most.max(under_way);
        if failed >= N + 2 * BOUND {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "claims did not publish again: {failed} failed publishes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        most, BOUND,
        "the claims never had the bound's publishes under way"
    );
    let dead: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM webhook_messages WHERE webhook_id = $1 AND status <> 'pending'",
    )
    .bind(&hook)
    .fetch_one(&db)
    .await
    .expect("count");
    assert_eq!(
        dead, 0,
        "a message was settled before the topic took its record"
    );
    let spent: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM webhook_messages WHERE webhook_id = $1 AND round_attempts = 3",
    )
    .bind(&hook)
    .fetch_one(&db)
    .await
    .expect("count");
    assert_eq!(spent, N as i64);

    // A dead-letter topic that takes records again (empty, so what it holds below is only
    // what it acknowledged): every message dead, each on the topic once.
    js.delete_stream(STREAM).await.expect("delete the stream");
    let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &s.nats.url], &[]);
    assert!(ok, "topology apply: {out} {err}");
    eventually(Duration::from_secs(30), "every message dead", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM webhook_messages WHERE webhook_id = $1 AND status = 'dead'",
        )
        .bind(&hook)
        .fetch_one(&db)
        .await
        .ok()?;
        (n == N as i64).then_some(())
    })
    .await;
    eventually(WAIT, "the dead-letter metric", || async {
        let m = s.metrics().await;
        (metric_sum(&m, "nexus_webhook_dead_lettered_total", &[]).unwrap_or(0.0) >= N as f64)
            .then_some(())
    })
    .await;
    // A few more claims' time: nothing more is published.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let records = dead_records(&s).await;
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT id FROM webhook_messages WHERE webhook_id = $1")
            .bind(&hook)
            .fetch_all(&db)
            .await
            .expect("ids");
    let mut per: HashMap<String, usize> = HashMap::new();
    for r in &records {
        assert_eq!(r.envelope.event_type, "WebhookMessageDead");
        assert_eq!(r.body["webhook_id"], hook.as_str());
        assert_eq!(r.body["attempts"], 3, "{:?}", r.body);
        assert_eq!(r.body["last_status_code"], 500, "{:?}", r.body);
        let id = r.body["message_id"]
            .as_str()
            .expect("message id")
            .to_string();
        *per.entry(id).or_default() += 1;
    }
    assert_eq!(records.len(), N, "{per:?}");
    for id in &ids {
        assert_eq!(per.get(id), Some(&1), "{id}: {per:?}");
    }
    let events: HashSet<_> = records.iter().map(|r| r.envelope.event_id).collect();
    assert_eq!(events.len(), N);
    let m = s.metrics().await;
    assert_eq!(
        metric_sum(&m, "nexus_webhook_dead_lettered_total", &[]),
        Some(N as f64)
    );
    assert_eq!(
        rx.got("spent").len(),
        3 * N,
        "a dead message was sent again"
    );
}

/// `nexus dev` (embedded bus, SQLite delivery log): a chat's STARTED and FINISHED reach a
/// standard and a genesys subscriber, signed, the standard one after a 5xx retry.
/// One hanging endpoint with a burst of new messages leased to this process (up to 16× its
/// in-flight limit wait in its lane) must not stop the claims of every other endpoint: a
/// healthy endpoint of another tenant gets its FINISHED (which always goes through a claim)
/// at once, not after the hanging endpoint's backlog has timed out attempt by attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoints_backlog_does_not_stop_other_endpoints_claims() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start().await;
    let s = System::start(
        dir.path(),
        &[
            ("NEXUS_WORKERS__WEBHOOKS__TIMEOUT_MS", "3000"),
            ("NEXUS_WORKERS__WEBHOOKS__MAX_IN_FLIGHT", "10"),
            ("NEXUS_WORKERS__WEBHOOKS__MAX_IN_FLIGHT_PER_ENDPOINT", "2"),
        ],
    )
    .await;
    let (greedy, other) = (
        provision_tenant(&s.admin).await,
        provision_tenant(&s.admin).await,
    );
    rx.set("hang", Mode::Hang);
    s.subscribe(
        &greedy.id,
        json!({"url": rx.url("hang"), "format": "standard"}),
    )
    .await;
    s.subscribe(
        &other.id,
        json!({"url": rx.url("fast"), "format": "standard"}),
    )
    .await;
    // 30 new messages for the hanging endpoint: 2 in flight, the rest held in its lane.
    for i in 0..30 {
        s.started(&greedy.id, &format!("hang-{i}")).await;
    }
    rx.wait_for("hang", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Another tenant's conversation starts and ends.
    let published = Instant::now();
    s.started(&other.id, "other-0").await;
    s.closed(&other.id, "other-0", Some(Channel::WebChat)).await;
    let got = rx.wait_for("fast", 2).await;
    let events: Vec<String> = got.iter().map(|r| r.event()).collect();
    assert_eq!(events, ["STARTED", "FINISHED"]);
    let waited = got[1].at - published;
    assert!(
        waited < Duration::from_millis(2_500),
        "the FINISHED of a healthy endpoint waited {waited:?} behind another tenant's hanging endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_delivers_from_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start().await;
    let mut env = base_env(dir.path());
    env.push((
        "NEXUS_WORKERS__WEBHOOKS__ALLOW_PRIVATE_TARGETS",
        "true".into(),
    ));
    env.push((
        "NEXUS_WORKERS__WEBHOOKS__RETRY_SCHEDULE_MS",
        "[0, 200, 200]".into(),
    ));
    env.push(("NEXUS_WORKERS__WEBHOOKS__POLL_INTERVAL_MS", "100".into()));
    let node = start_node(dir.path(), "dev", &["dev"], env).await;
    let admin = Admin::new(&node.url);
    let tenant = provision_tenant(&admin).await;
    let std = admin
        .post(
            &format!("/tenants/{}/webhooks", tenant.id),
            json!({"url": rx.url("dev-std"), "format": "standard"}),
        )
        .await;
    let gen = admin
        .post(
            &format!("/tenants/{}/webhooks", tenant.id),
            json!({"url": rx.url("dev-gen"), "format": "genesys"}),
        )
        .await;
    rx.set("dev-std", Mode::FailTimes(500, 1));
    let http = reqwest::Client::new();
    let started: Value = http
        .post(format!("{}/nexus/v3/chat/sessions", node.url))
        .header("x-api-key", &tenant.api_key)
        .json(&json!({"nickname": "Dee"}))
        .send()
        .await
        .expect("start chat")
        .json()
        .await
        .expect("start json");
    let sid = started["session_id"].as_str().expect("session").to_string();
    let ck = started["client_key"]
        .as_str()
        .expect("client key")
        .to_string();
    rx.wait_for("dev-gen", 1).await;
    let r = http
        .post(format!(
            "{}/nexus/v3/chat/sessions/{sid}/disconnect",
            node.url
        ))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .send()
        .await
        .expect("disconnect");
    assert_eq!(r.status(), 202);
    let got = rx.wait_for("dev-std", 3).await;
    assert_eq!(
        got.iter().map(Received::event).collect::<Vec<_>>(),
        ["STARTED", "STARTED", "FINISHED"]
    );
    assert_eq!(got[0].id(), got[1].id());
    let secret = std["secret"].as_str().expect("secret");
    assert_eq!(
        verify_standard(&[(secret, &got[1]), (secret, &got[2])]),
        ["ok", "ok"]
    );
    let gen_got = rx.wait_for("dev-gen", 2).await;
    let gen_secret = gen["secret"].as_str().expect("secret");
    for r in &gen_got {
        assert_eq!(
            r.headers.get("x-hub-signature"),
            Some(&genesys_signature(gen_secret, &r.body))
        );
    }
}

// ---- the delivery log on its own ---------------------------------------------------------

mod log {
    use super::*;
    use nexus::stores::provisioning::secrets::EncryptionKey;
    use nexus::stores::provisioning::{Provisioning, WebhookEvent};
    use nexus::workers::webhooks::intake::Admitted;
    use nexus::workers::webhooks::store::{
        After, AttemptRecord, Claimed, MessageStore, NewMessage,
    };

    async fn store(db: &TestDb) -> (Provisioning, MessageStore) {
        let prov = Provisioning::connect(&db.url, &EncryptionKey::generate())
            .await
            .expect("provisioning on PostgreSQL");
        let store = MessageStore::new(prov.pool().clone(), prov.kind());
        (prov, store)
    }

    async fn sqlite_store(dir: &std::path::Path) -> (Provisioning, MessageStore) {
        let path = dir.join("log.db");
        let prov = Provisioning::connect(&path.to_string_lossy(), &EncryptionKey::generate())
            .await
            .expect("provisioning on SQLite");
        let store = MessageStore::new(prov.pool().clone(), prov.kind());
        (prov, store)
    }

    fn message() -> NewMessage {
        let id = uuid::Uuid::new_v4().to_string();
        NewMessage {
            id: format!("msg_{id}"),
            tenant_id: "t1".into(),
            webhook_id: "wh1".into(),
            event_id: id.clone(),
            conversation_id: format!("c-{id}"),
            event: WebhookEvent::Started,
            body: "{}".into(),
        }
    }

    fn delivered() -> AttemptRecord {
        AttemptRecord {
            started_at_ms: 1,
            outcome: "ok",
            status_code: Some(204),
            latency_ms: 3,
            error: None,
        }
    }

    async fn attempts_of(prov: &Provisioning, id: &str) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM webhook_attempts WHERE message_id = $1")
            .bind(id.to_string())
            .fetch_one(prov.pool())
            .await
            .expect("count")
    }

    /// An outcome logged for a message whose row was never written (its insert failed) leaves
    /// no attempt row: such a row made every later insert of the message with its first attempt
    /// fail on the attempt's key, so the event was retried, and the webhook sent, forever.
    #[tokio::test]
    async fn an_outcome_without_its_message_row_is_not_logged() {
        let db = TestDb::create().await;
        let (prov, store) = store(&db).await;
        let m = message();
        let now = chrono::Utc::now().timestamp_millis();
        store
            .record(
                &Claimed::first(m.clone()),
                &delivered(),
                After::Delivered,
                now,
            )
            .await
            .expect("record");
        assert_eq!(attempts_of(&prov, &m.id).await, 0, "no orphan attempt row");
        store
            .record_batch(
                &[(&Claimed::first(m.clone()), &delivered(), After::Delivered)],
                now,
            )
            .await
            .expect("record_batch");
        assert_eq!(attempts_of(&prov, &m.id).await, 0, "no orphan attempt row");
    }

    /// A stray attempt row (as an older release could leave) does not fail the message's
    /// insert with its first attempt.
    #[tokio::test]
    async fn a_stray_attempt_row_does_not_fail_the_insert_with_the_first_attempt() {
        let db = TestDb::create().await;
        let (prov, store) = store(&db).await;
        let m = message();
        sqlx::query("INSERT INTO webhook_attempts (message_id, attempt, started_at_ms, outcome, latency_ms) VALUES ($1, 1, 1, 'ok', 1)")
            .bind(m.id.clone())
            .execute(prov.pool())
            .await
            .expect("stray row");
        let now = chrono::Utc::now().timestamp_millis();
        let admission = store
            .admit(std::slice::from_ref(&m), &[Some(now + 30_000)], now)
            .await
            .expect("admit");
        let Some(Admitted::New(Some(first))) = admission.messages.first() else {
            panic!("a new leased message has a first attempt");
        };
        let logged = first
            .settle(&delivered(), After::Delivered)
            .await
            .expect("an outcome before the write goes with the row");
        let new = admission.written().await.expect("the insert commits");
        assert_eq!(new, vec![m.id.clone()]);
        assert_eq!(logged.await.expect("answered"), Ok(()));
        let status: String =
            sqlx::query_scalar("SELECT status FROM webhook_messages WHERE id = $1")
                .bind(m.id.clone())
                .fetch_one(prov.pool())
                .await
                .expect("row");
        assert_eq!(status, "delivered");
    }

    /// A sender whose lease lapsed while it sent (a slow log write) and whose message another
    /// sender claimed writes nothing back: no attempt row, no status, no release, so the
    /// message is neither sent a third time nor set back; the holder's outcome is written.
    #[tokio::test]
    async fn a_sender_whose_lease_lapsed_changes_nothing() {
        let db = TestDb::create().await;
        lapsed_sender_changes_nothing(store(&db).await).await;
        let dir = tempfile::tempdir().expect("tempdir");
        lapsed_sender_changes_nothing(sqlite_store(dir.path()).await).await;
    }

    async fn lapsed_sender_changes_nothing((prov, store): (Provisioning, MessageStore)) {
        let m = message();
        let now = chrono::Utc::now().timestamp_millis();
        let (old, new) = (now + 30_000, now + 60_000);
        assert!(store.insert(&m, now).await.expect("insert"));
        let lease = |until: i64| {
            sqlx::query("UPDATE webhook_messages SET lease_until_ms = $2 WHERE id = $1")
                .bind(m.id.clone())
                .bind(until)
                .execute(prov.pool())
        };
        // Claimed until `old`; another sender took the message over once that lapsed.
        lease(old).await.expect("claimed");
        lease(new).await.expect("taken over");
        let row = || async {
            sqlx::query_as::<_, (String, Option<i64>)>(
                "SELECT status, lease_until_ms FROM webhook_messages WHERE id = $1",
            )
            .bind(m.id.clone())
            .fetch_one(prov.pool())
            .await
            .expect("row")
        };
        let mut late = Claimed::first(m.clone());
        late.lease_until_ms = old;
        store
            .record(&late, &delivered(), After::Delivered, now)
            .await
            .expect("record");
        store
            .record_batch(&[(&late, &delivered(), After::Retry(now))], now)
            .await
            .expect("record_batch");
        store
            .release(&[(m.id.clone(), old)], now)
            .await
            .expect("release");
        assert_eq!(row().await, ("pending".to_string(), Some(new)));
        assert_eq!(attempts_of(&prov, &m.id).await, 0);
        let mut holder = Claimed::first(m.clone());
        holder.lease_until_ms = new;
        store
            .record(&holder, &delivered(), After::Delivered, now)
            .await
            .expect("record");
        assert_eq!(row().await, ("delivered".to_string(), None));
        assert_eq!(attempts_of(&prov, &m.id).await, 1);
    }

    async fn due_of(prov: &Provisioning, id: &str) -> Option<i64> {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT next_attempt_at_ms FROM webhook_messages WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_one(prov.pool())
        .await
        .expect("row")
    }

    /// Replaying dead messages keeps a conversation's order: its FINISHED waits until its
    /// STARTED is no longer pending, as when both were new.
    #[tokio::test]
    async fn a_replayed_finished_waits_for_its_started() {
        let db = TestDb::create().await;
        replayed_finished_waits(store(&db).await).await;
        let dir = tempfile::tempdir().expect("tempdir");
        replayed_finished_waits(sqlite_store(dir.path()).await).await;
    }

    async fn replayed_finished_waits((prov, store): (Provisioning, MessageStore)) {
        let started = message();
        let finished = NewMessage {
            id: format!("{}-finished", started.id),
            event: WebhookEvent::Finished,
            ..started.clone()
        };
        let now = chrono::Utc::now().timestamp_millis();
        for m in [&started, &finished] {
            assert!(store.insert(m, now).await.expect("insert"));
        }
        sqlx::query("UPDATE webhook_messages SET status = 'dead', next_attempt_at_ms = NULL")
            .execute(prov.pool())
            .await
            .expect("both dead");
        let replayed = store
            .replay_since(&started.tenant_id, &started.webhook_id, 0, now + 1)
            .await
            .expect("replay");
        assert_eq!(replayed, 2);
        assert_eq!(due_of(&prov, &started.id).await, Some(now + 1));
        assert_eq!(due_of(&prov, &finished.id).await, None, "waits for STARTED");
        assert!(store
            .resend(
                &finished.tenant_id,
                &finished.webhook_id,
                &finished.id,
                now + 2
            )
            .await
            .expect("resend"));
        assert_eq!(due_of(&prov, &finished.id).await, None, "still waits");
        // A sender claims the STARTED (as a claim does, its lease on the row) and delivers it.
        let lease = now + 30_000;
        sqlx::query("UPDATE webhook_messages SET lease_until_ms = $2 WHERE id = $1")
            .bind(started.id.clone())
            .bind(lease)
            .execute(prov.pool())
            .await
            .expect("claimed");
        let mut claimed = Claimed::first(started.clone());
        claimed.lease_until_ms = lease;
        store
            .record(&claimed, &delivered(), After::Delivered, now + 3)
            .await
            .expect("STARTED delivered");
        assert_eq!(due_of(&prov, &finished.id).await, Some(now + 3), "released");
    }
}

// ---- dead letters on a slow bus ----------------------------------------------------------

mod dead_letter_hold {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use common::faulty::{Faults, FaultyBus};
    use nexus::bus::{BusError, TopicSpec};
    use nexus::events::webhook::WEBHOOK_DEAD_TOPIC;
    use nexus::stores::provisioning::secrets::EncryptionKey;
    use nexus::stores::provisioning::{
        NewTenant, NewWebhook, Provisioning, WebhookEvent, WebhookFormat,
    };
    use nexus::workers::webhooks::dispatcher::Dispatcher;
    use nexus::workers::webhooks::store::{
        After, AttemptRecord, Left, MessageStore, NewMessage, EXHAUSTED_RECLAIM_MS,
    };
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// Publishes that take `delay` before they reach the bus (and its acknowledgement),
    /// recording each one's topic.
    struct SlowPublish {
        delay: Duration,
        published: Mutex<Vec<String>>,
    }

    impl SlowPublish {
        fn on(&self, topic: &str) -> usize {
            let published = self.published.lock().expect("lock");
            published.iter().filter(|t| *t == topic).count()
        }
    }

    #[async_trait]
    impl Faults for SlowPublish {
        async fn publish(&self, topic: &str) -> Result<(), BusError> {
            self.published.lock().expect("lock").push(topic.to_string());
            tokio::time::sleep(self.delay).await;
            Ok(())
        }
    }

    /// A tenant with one Standard Webhooks subscription to `url`: (tenant id, webhook id).
    async fn subscription(prov: &Provisioning, url: &str) -> (String, String) {
        let tenant = prov
            .create_tenant(NewTenant { name: "t".into() })
            .await
            .expect("tenant");
        let hook = prov
            .create_webhook(
                &tenant.id,
                NewWebhook {
                    url: url.into(),
                    events: None,
                    media: None,
                    format: WebhookFormat::Standard,
                    enabled: None,
                    secret: None,
                },
            )
            .await
            .expect("webhook")
            .webhook
            .id;
        (tenant.id, hook)
    }

    fn started(tenant: &str, hook: &str) -> NewMessage {
        let id = uuid::Uuid::new_v4();
        NewMessage {
            id: format!("msg_{}", id.simple()),
            tenant_id: tenant.into(),
            webhook_id: hook.into(),
            event_id: id.to_string(),
            conversation_id: format!("c-{id}"),
            event: WebhookEvent::Started,
            body: "{}".into(),
        }
    }

    async fn status_of(prov: &Provisioning, id: &str) -> String {
        sqlx::query_scalar::<_, String>("SELECT status FROM webhook_messages WHERE id = $1")
            .bind(id.to_string())
            .fetch_one(prov.pool())
            .await
            .expect("status")
    }

    /// An exhausted message whose dead-letter publish waits longer than the reclaim delay
    /// (7 s against 5 s: a bus slow to acknowledge) is published once, though two dispatchers
    /// poll the log all along: its sender holds it while the publish waits. (Before, the claim
    /// after 5 s found it exhausted and published it a second time beside the first.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_dead_letter_publish_is_not_repeated_by_another_claim() {
        const DELAY: Duration = Duration::from_secs(7);
        assert!(DELAY.as_millis() as i64 > EXHAUSTED_RECLAIM_MS);
        let db = TestDb::create().await;
        let prov = Arc::new(
            Provisioning::connect(&db.url, &EncryptionKey::generate())
                .await
                .expect("provisioning on PostgreSQL"),
        );
        let store = MessageStore::new(prov.pool().clone(), prov.kind());
        let rx = Receiver::start().await;
        rx.set("slow-bus", Mode::Always(500));
        let (tenant, hook) = subscription(&prov, &rx.url("slow-bus")).await;
        let embedded = common::test_bus("embedded").await;
        embedded
            .bus
            .apply_topic(&TopicSpec {
                name: WEBHOOK_DEAD_TOPIC.into(),
                partitions: 1,
                retention: None,
            })
            .await
            .expect("dead-letter topic");
        let bus = Arc::new(FaultyBus::new(
            embedded.bus.clone(),
            SlowPublish {
                delay: DELAY,
                published: Mutex::new(Vec::new()),
            },
        ));
        let mut config = nexus::config::Config::defaults().workers.webhooks;
        config.allow_private_targets = true;
        config.retry_schedule_ms = vec![0];
        config.timeout_ms = 1000;
        config.poll_interval_ms = 100;
        let http = nexus::config::Config::defaults().http_client;
        let stop = CancellationToken::new();
        let mut dispatchers = Vec::new();
        for _ in 0..2 {
            let client = nexus::http_client::builder(&http)
                .expect("client")
                .build()
                .expect("client");
            let d = Arc::new(Dispatcher::new(
                store.clone(),
                prov.clone(),
                bus.clone(),
                client,
                config.clone(),
            ));
            tokio::spawn(d.clone().run(stop.clone()));
            tokio::spawn(d.clone().log_writer(stop.clone()));
            dispatchers.push(d);
        }
        let m = started(&tenant, &hook);
        let now = chrono::Utc::now().timestamp_millis();
        assert!(store.insert(&m, now).await.expect("insert"));
        for d in &dispatchers {
            d.wake();
        }
        rx.wait_for("slow-bus", 1).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while status_of(&prov, &m.id).await != "dead" {
            assert!(
                Instant::now() < deadline,
                "not dead after 30 s, {} dead-letter publishes",
                bus.faults.on(WEBHOOK_DEAD_TOPIC)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Two more reclaim delays of polling: nothing else is published.
        tokio::time::sleep(Duration::from_millis(2 * EXHAUSTED_RECLAIM_MS as u64)).await;
        stop.cancel();
        assert_eq!(
            bus.faults.on(WEBHOOK_DEAD_TOPIC),
            1,
            "dead-letter publishes"
        );
        assert_eq!(rx.got("slow-bus").len(), 1, "attempts");
        assert_eq!(status_of(&prov, &m.id).await, "dead");
    }

    /// The hold keeps claims off an exhausted message only while its publisher renews it: one
    /// that died (no renewal) leaves the message to the claim after the hold, which
    /// dead-letters it (at least once), and the dead publisher's late mark changes nothing.
    #[tokio::test]
    async fn a_dead_publishers_hold_lapses_for_a_claim() {
        let db = TestDb::create().await;
        let prov = Provisioning::connect(&db.url, &EncryptionKey::generate())
            .await
            .expect("provisioning on PostgreSQL");
        hold_lapses(prov).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        let prov = Provisioning::connect(&path.to_string_lossy(), &EncryptionKey::generate())
            .await
            .expect("provisioning on SQLite");
        hold_lapses(prov).await;
    }

    async fn hold_lapses(prov: Provisioning) {
        let store = MessageStore::new(prov.pool().clone(), prov.kind());
        let (tenant, hook) = subscription(&prov, "https://hooks.example.com/in").await;
        let m = started(&tenant, &hook);
        let t = chrono::Utc::now().timestamp_millis();
        assert!(store.insert(&m, t).await.expect("insert"));
        let claimed = store
            .claim(t, t + 1_000, 10, &[], &[])
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        let sender = &claimed[0];
        let failed = AttemptRecord {
            started_at_ms: t,
            outcome: "failed",
            status_code: Some(500),
            latency_ms: 1,
            error: None,
        };
        store
            .record(sender, &failed, After::Exhausted, t)
            .await
            .expect("last attempt");
        let left = Left {
            attempts: 1,
            round_attempts: 1,
            lease_until_ms: None,
        };
        let claim_at = |at: i64| store.claim(at, at + 1_000, 10, &[], &[]);
        // Held for the publish, then renewed: no claim past the reclaim delay, nor past the
        // first hold.
        assert!(store
            .hold_exhausted(sender, &left, t + 10_000)
            .await
            .expect("hold"));
        assert!(!store
            .hold_exhausted(sender, &left, t + 10_000)
            .await
            .expect("held once"));
        assert!(claim_at(t + EXHAUSTED_RECLAIM_MS + 1)
            .await
            .expect("claim")
            .is_empty());
        assert!(store
            .renew(&m.id, t + 10_000, t + 20_000)
            .await
            .expect("renew"));
        assert!(claim_at(t + 15_000).await.expect("claim").is_empty());
        // The publisher dies: the hold lapses and a claim takes the exhausted message over.
        let taken = claim_at(t + 20_001).await.expect("claim");
        assert_eq!(taken.len(), 1);
        let other = &taken[0];
        assert_eq!(other.round_attempts, 1, "exhausted");
        let others = Left {
            lease_until_ms: Some(other.lease_until_ms),
            ..left
        };
        assert!(store
            .hold_exhausted(other, &others, t + 31_000)
            .await
            .expect("the claim's hold"));
        let dead_publisher = Left {
            lease_until_ms: Some(t + 20_000),
            ..left
        };
        assert!(!store
            .mark_dead(sender, &dead_publisher, t + 30_000)
            .await
            .expect("late mark"));
        assert_eq!(status_of(&prov, &m.id).await, "pending");
        let held = Left {
            lease_until_ms: Some(t + 31_000),
            ..left
        };
        assert!(store
            .mark_dead(other, &held, t + 30_500)
            .await
            .expect("mark"));
        assert_eq!(status_of(&prov, &m.id).await, "dead");
    }
}
