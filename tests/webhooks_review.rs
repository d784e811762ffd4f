//! Review of the webhooks worker: end to end with real processes (`nexus edge`, `nexus worker
//! webhooks`) on NATS JetStream + PostgreSQL, and real loopback receivers
//! (`tests/common/webhooks.rs`). Events are published on the interaction topic directly.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::chat::*;
use common::webhooks::{Mode, Receiver};
use nexus::bus::Bus;
use nexus::events::chat::{Channel, CloseReason, ConversationClosed, ConversationStarted};
use nexus::events::publish::publish;
use nexus::events::Event;
use serde_json::{json, Value};

const INTERACTION: &str = "nexus.interaction.v1";

struct System {
    _webhooks: Node,
    _edge: Node,
    bus: Arc<dyn Bus>,
    admin: Admin,
    _nats: OwnNats,
    _db: TestDb,
}

impl System {
    async fn start(dir: &std::path::Path, extra: &[(&'static str, &str)]) -> System {
        let nats = OwnNats::start(dir).await;
        let db = TestDb::create().await;
        let mut env = shared_services_env(dir, &nats.url, &db.url);
        env.push(("NEXUS_WORKERS__WEBHOOKS__SUBSCRIPTION_CACHE_MS", "0".into()));
        env.push((
            "NEXUS_WORKERS__WEBHOOKS__ALLOW_PRIVATE_TARGETS",
            "true".into(),
        ));
        env.push((
            "NEXUS_WORKERS__WEBHOOKS__RETRY_SCHEDULE_MS",
            "[0, 300, 600]".into(),
        ));
        env.push(("NEXUS_WORKERS__WEBHOOKS__POLL_INTERVAL_MS", "100".into()));
        env.push(("NEXUS_WORKERS__WEBHOOKS__STATS_INTERVAL_MS", "200".into()));
        for (k, v) in extra {
            env.push((k, v.to_string()));
        }
        let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
        assert!(ok, "topology apply: {out} {err}");
        let edge = start_node(dir, "edge", &["edge"], env.clone()).await;
        let webhooks = start_node(dir, "webhooks", &["worker", "webhooks"], env.clone()).await;
        let mut bus_config = common::bus_config("jetstream", None);
        bus_config.url = nats.url.clone();
        let bus = nexus::bus::connect(&bus_config).await.expect("bus");
        System {
            admin: Admin::new(&edge.url),
            _webhooks: webhooks,
            _edge: edge,
            bus,
            _nats: nats,
            _db: db,
        }
    }

    async fn subscribe(&self, tenant: &str, body: Value) -> String {
        let v = self
            .admin
            .post(&format!("/tenants/{tenant}/webhooks"), body)
            .await;
        v["id"].as_str().expect("id").to_string()
    }

    async fn started(&self, tenant: &str, conversation: &str) {
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
    }

    async fn closed(&self, tenant: &str, conversation: &str) {
        let e = Event::typed(
            &ConversationClosed {
                reason: CloseReason::CustomerLeft,
                closed_by_participant_id: None,
                transcript_length: 2,
                channel: Some(Channel::WebChat),
            },
            tenant,
            conversation,
            "test",
        )
        .expect("event");
        self.publish(&e).await;
    }

    async fn publish(&self, e: &Event) {
        publish(self.bus.as_ref(), INTERACTION, e)
            .await
            .expect("publish");
    }
}

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
    s.closed(&other.id, "other-0").await;
    let got = rx.wait_for("fast", 2).await;
    let events: Vec<String> = got.iter().map(|r| r.event()).collect();
    assert_eq!(events, ["STARTED", "FINISHED"]);
    let waited = got[1].at - published;
    assert!(
        waited < Duration::from_millis(2_500),
        "the FINISHED of a healthy endpoint waited {waited:?} behind another tenant's hanging endpoint"
    );
}
