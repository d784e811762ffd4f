//! The session store conformance suite: the same cases against Redis (`NEXUS_TEST_REDIS_URL`,
//! default `redis://127.0.0.1:6379`), a Redis Cluster (`NEXUS_TEST_REDIS_CLUSTER_URL`, some of
//! its nodes comma-separated, as `scripts/services.sh` starts it; without it the cluster cases
//! skip, unless `NEXUS_TEST_REQUIRE_TOOLS=1`) and the embedded redb store. `NEXUS_TEST_STORE=<backend>`
//! runs one backend only. Each case works under a fresh random tenant, so cases share a server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ::redis::AsyncCommands;
use nexus::stores::session::embedded::EmbeddedStore;
use nexus::stores::session::redis::RedisStore;
use nexus::stores::session::{
    Conversation, ConversationState, EntryKind, NewEntry, Party, PartyKind, PresenceChange,
    PresenceUpdate, Reserve, Routing, SessionStore, StoreError, Timer,
};

/// A store under test plus what must live as long as it.
struct TestStore {
    store: Arc<dyn SessionStore>,
    /// A random tenant of this case alone.
    tenant: String,
    backend: &'static str,
    dir: Option<tempfile::TempDir>,
}

fn redis_url() -> String {
    std::env::var("NEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The cluster's nodes, `None` (the case skips) when none is given outside CI.
fn cluster_nodes() -> Option<String> {
    match std::env::var("NEXUS_TEST_REDIS_CLUSTER_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("NEXUS_TEST_REQUIRE_TOOLS").as_deref() == Ok("1") => {
            panic!("NEXUS_TEST_REDIS_CLUSTER_URL is required (NEXUS_TEST_REQUIRE_TOOLS=1): scripts/services.sh start")
        }
        _ => {
            eprintln!("NEXUS_TEST_REDIS_CLUSTER_URL unset: the Redis Cluster case is not run");
            None
        }
    }
}

async fn connect_cluster() -> RedisStore {
    let url = cluster_nodes().expect("cluster nodes");
    let nodes: Vec<&str> = url.split(',').collect();
    RedisStore::connect_cluster_in(&nodes, nexus::stores::session::redis::DEFAULT_NAMESPACE)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the Redis Cluster at {url}: {e}"))
}

fn selected(backend: &str) -> bool {
    match std::env::var("NEXUS_TEST_STORE") {
        Ok(only) if !only.is_empty() && only != backend => {
            eprintln!("NEXUS_TEST_STORE={only}: not running the {backend} case");
            false
        }
        _ => true,
    }
}

fn unique(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

async fn test_store(backend: &'static str) -> TestStore {
    let (store, dir): (Arc<dyn SessionStore>, _) = match backend {
        "redis" => {
            let url = redis_url();
            let store = RedisStore::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"));
            (Arc::new(store), None)
        }
        "redis-cluster" => (Arc::new(connect_cluster().await), None),
        "embedded" => {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = EmbeddedStore::open(dir.path())
                .await
                .expect("open embedded");
            (Arc::new(store), Some(dir))
        }
        other => panic!("unknown backend {other}"),
    };
    TestStore {
        store,
        tenant: unique("tenant"),
        backend,
        dir,
    }
}

impl TestStore {
    /// A store of the same backend that keeps entries without a record `ttl` (a fresh
    /// directory for redb, which opens a file once), with what must live as long as it.
    async fn with_orphan_ttl(
        &self,
        ttl: Duration,
    ) -> (Arc<dyn SessionStore>, Option<tempfile::TempDir>) {
        match self.backend {
            "redis" => {
                let store = RedisStore::connect(&redis_url()).await.expect("connect");
                (Arc::new(store.with_orphan_ttl(ttl)), None)
            }
            "redis-cluster" => (Arc::new(connect_cluster().await.with_orphan_ttl(ttl)), None),
            _ => {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = EmbeddedStore::open(dir.path()).await.expect("open");
                (Arc::new(store.with_orphan_ttl(ttl)), Some(dir))
            }
        }
    }

    /// Another instance on the same data, as a second worker would have: a new Redis
    /// connection; for redb (one open per file) the same store.
    async fn another(&self) -> Arc<dyn SessionStore> {
        match self.backend {
            "redis" => Arc::new(RedisStore::connect(&redis_url()).await.expect("connect")),
            "redis-cluster" => Arc::new(connect_cluster().await),
            _ => self.store.clone(),
        }
    }
}

/// Deletes what a Redis case left under its tenant (keys of tenants named after it included),
/// so the shared server does not fill up; a failed case leaves its keys for inspection.
async fn cleanup(tenant: &str) {
    let client = ::redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut keys = Vec::new();
    for pattern in [format!("nx:{{t:{tenant}*"), format!("nx:seen:{tenant}*")] {
        let mut cursor = 0u64;
        loop {
            let (next, found): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("scan");
            keys.extend(found);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    if !keys.is_empty() {
        conn.del::<_, ()>(keys).await.expect("del");
    }
}

macro_rules! per_store {
    ($($case:ident),* $(,)?) => {
        mod redis { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $case() { if super::selected("redis") { let t = super::test_store("redis").await; let tenant = t.tenant.clone(); super::$case(t).await; super::cleanup(&tenant).await } } )* }
        // Cases leave their keys on the cluster (its nodes keep nothing on disk).
        mod redis_cluster { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $case() { if super::selected("redis-cluster") && super::cluster_nodes().is_some() { super::$case(super::test_store("redis-cluster").await).await } } )* }
        mod embedded { $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $case() { if super::selected("embedded") { super::$case(super::test_store("embedded").await).await } } )* }
    };
}

fn party(id: &str, kind: PartyKind) -> Party {
    Party {
        participant_id: id.into(),
        nickname: id.to_uppercase(),
        kind,
    }
}

fn conversation(tenant: &str, id: &str) -> Conversation {
    Conversation {
        tenant_id: tenant.into(),
        conversation_id: id.into(),
        channel: "WEB_CHAT".into(),
        state: ConversationState::Queued,
        customer: party("customer-1", PartyKind::Customer),
        contact: BTreeMap::from([("email".into(), "c@example.com".into())]),
        user_data: BTreeMap::new(),
        subject: Some("help".into()),
        queue_id: Some("q1".into()),
        bot_id: None,
        agent_id: None,
        offered_to: None,
        declined_by: vec![],
        files: 0,
        created_at_ms: 1_700_000_000_000,
        last_activity_ms: 1_700_000_000_000,
        closed_reason: None,
        routing: Routing::default(),
        version: 0,
    }
}

fn message(event_id: &str, message_id: Option<&str>, text: &str) -> NewEntry {
    NewEntry {
        event_id: event_id.into(),
        kind: EntryKind::Message,
        from: party("customer-1", PartyKind::Customer),
        text: Some(text.into()),
        message_id: message_id.map(str::to_string),
        data: BTreeMap::from([("k".into(), "v".into())]),
        at_ms: 1_700_000_000_123,
    }
}

fn chat(n: u32) -> BTreeMap<String, u32> {
    BTreeMap::from([("chat".to_string(), n)])
}

fn skills(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

fn reserve(conversation: &str, skills_: &[&str], exclude: &[&str]) -> Reserve {
    Reserve {
        conversation_id: conversation.into(),
        media: "chat".into(),
        skills: skills(skills_),
        exclude: skills(exclude),
        now_ms: 5_000,
        only: None,
    }
}

fn timer(kind: &str, tenant: &str, id: &str) -> Timer {
    Timer {
        kind: kind.into(),
        tenant_id: tenant.into(),
        id: id.into(),
    }
}

async fn conversation_put_get_replace_absent(t: TestStore) {
    let s = &t.store;
    assert_eq!(s.conversation(&t.tenant, "c1").await.expect("get"), None);
    let mut c = conversation(&t.tenant, "c1");
    assert!(s.put_conversation(&c).await.expect("put"), "first write");
    // Stored with the next version.
    c.version = 1;
    assert_eq!(
        s.conversation(&t.tenant, "c1").await.expect("get"),
        Some(c.clone())
    );
    // A second creation (version 0) loses: the record exists.
    assert!(!s
        .put_conversation(&conversation(&t.tenant, "c1"))
        .await
        .expect("put"));
    c.state = ConversationState::Connected;
    c.agent_id = Some("a1".into());
    c.declined_by = vec!["a0".into()];
    c.user_data.insert("lang".into(), "fr".into());
    c.routing.mark_applied("e1".into());
    assert!(s.put_conversation(&c).await.expect("replace"));
    // A writer holding the old version loses and changes nothing.
    let mut stale = c.clone();
    stale.state = ConversationState::Closed;
    assert!(!s.put_conversation(&stale).await.expect("stale put"));
    c.version = 2;
    assert_eq!(s.conversation(&t.tenant, "c1").await.expect("get"), Some(c));
    assert_eq!(s.conversation(&t.tenant, "c2").await.expect("get"), None);
    s.ping().await.expect("ping");
}

/// Of many writers racing from the same version, exactly one wins.
async fn conversation_compare_and_set_race(t: TestStore) {
    let s = t.store.clone();
    assert!(s
        .put_conversation(&conversation(&t.tenant, "c1"))
        .await
        .expect("put"));
    let base = s
        .conversation(&t.tenant, "c1")
        .await
        .expect("get")
        .expect("some");
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (s, mut c) = (s.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            c.subject = Some(format!("writer {i}"));
            s.put_conversation(&c).await.expect("put")
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.expect("join"));
    }
    assert_eq!(wins, 1);
    let after = s
        .conversation(&t.tenant, "c1")
        .await
        .expect("get")
        .expect("some");
    assert_eq!(after.version, 2);
}

async fn transcript_positions_and_windows(t: TestStore) {
    let s = &t.store;
    for i in 1..=5u64 {
        let a = s
            .append(
                &t.tenant,
                "c1",
                &message(&format!("e{i}"), None, &format!("m{i}")),
            )
            .await
            .expect("append");
        assert_eq!((a.position, a.duplicate), (i, false));
    }
    let all = s.transcript(&t.tenant, "c1", 1, 100).await.expect("all");
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(all[2].entry, message("e3", None, "m3"));
    let window = s.transcript(&t.tenant, "c1", 2, 2).await.expect("window");
    assert_eq!(
        window.iter().map(|e| e.position).collect::<Vec<_>>(),
        [2, 3]
    );
    assert_eq!(window[1].entry.text.as_deref(), Some("m3"));
    let tail = s.transcript(&t.tenant, "c1", 4, 10).await.expect("tail");
    assert_eq!(tail.iter().map(|e| e.position).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(s.transcript_len(&t.tenant, "c1").await.expect("len"), 5);
    assert_eq!(s.transcript_len(&t.tenant, "other").await.expect("len"), 0);
    // No limit: the whole rest.
    let unbounded = s
        .transcript(&t.tenant, "c1", 2, usize::MAX)
        .await
        .expect("unbounded");
    assert_eq!(
        unbounded.iter().map(|e| e.position).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    assert!(s
        .transcript(&t.tenant, "c1", 6, 10)
        .await
        .expect("past")
        .is_empty());
    assert!(s
        .transcript(&t.tenant, "c1", 1, 0)
        .await
        .expect("none")
        .is_empty());
    assert!(s
        .transcript(&t.tenant, "other", 1, 10)
        .await
        .expect("absent")
        .is_empty());
}

async fn append_is_idempotent(t: TestStore) {
    let s = &t.store;
    let first = s
        .append(&t.tenant, "c1", &message("e1", Some("m1"), "hello"))
        .await
        .expect("append");
    assert_eq!((first.position, first.duplicate), (1, false));
    s.append(&t.tenant, "c1", &message("e2", None, "second"))
        .await
        .expect("append");
    // The same event again.
    let again = s
        .append(&t.tenant, "c1", &message("e1", Some("m1"), "hello"))
        .await
        .expect("append");
    assert_eq!(
        (again.position, again.duplicate, again.retried),
        (1, true, false)
    );
    // Another event carrying the same client message id: a retried send.
    let same_message = s
        .append(&t.tenant, "c1", &message("e3", Some("m1"), "hello again"))
        .await
        .expect("append");
    assert_eq!(
        (
            same_message.position,
            same_message.duplicate,
            same_message.retried
        ),
        (1, true, true)
    );
    let e2 = s
        .append(&t.tenant, "c1", &message("e2", None, "second"))
        .await
        .expect("append");
    assert_eq!((e2.position, e2.duplicate, e2.retried), (2, true, false));
    // Another sender's message with the same id is its own message.
    let mut agents = message("e5", Some("m1"), "from the agent");
    agents.from = party("agent-1", PartyKind::Agent);
    let agents = s.append(&t.tenant, "c1", &agents).await.expect("append");
    assert_eq!((agents.position, agents.duplicate), (3, false));
    let next = s
        .append(&t.tenant, "c1", &message("e4", Some("m2"), "third"))
        .await
        .expect("append");
    assert_eq!((next.position, next.duplicate), (4, false));
    // An upload the client gave a send's id is its own message; a retried upload is not.
    let mut upload = message("e6", Some("m1"), "photo.png");
    upload.kind = EntryKind::FileUploaded;
    let file = s.append(&t.tenant, "c1", &upload).await.expect("append");
    assert_eq!((file.position, file.duplicate), (5, false));
    upload.event_id = "e7".into();
    let again = s.append(&t.tenant, "c1", &upload).await.expect("append");
    assert_eq!(
        (again.position, again.duplicate, again.retried),
        (5, true, true)
    );
    // So is a custom notice given a send's id (the client was answered 202 for both); a
    // retried notice is not.
    let mut notice = message("e8", Some("m1"), "page=checkout");
    notice.kind = EntryKind::CustomNotice;
    let first_notice = s.append(&t.tenant, "c1", &notice).await.expect("append");
    assert_eq!((first_notice.position, first_notice.duplicate), (6, false));
    notice.event_id = "e9".into();
    let again = s.append(&t.tenant, "c1", &notice).await.expect("append");
    assert_eq!(
        (again.position, again.duplicate, again.retried),
        (6, true, true)
    );
    let all = s.transcript(&t.tenant, "c1", 1, 100).await.expect("all");
    assert_eq!(
        all.iter()
            .map(|e| e.entry.event_id.as_str())
            .collect::<Vec<_>>(),
        ["e1", "e2", "e5", "e4", "e6", "e8"]
    );
}

async fn concurrent_appends_are_gap_free(t: TestStore) {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = t.another().await;
        let tenant = t.tenant.clone();
        tasks.push(tokio::spawn(async move {
            s.append(&tenant, "c1", &message(&format!("e{i}"), None, "x"))
                .await
                .expect("append")
        }));
    }
    let mut positions = Vec::new();
    for task in tasks {
        let a = task.await.expect("join");
        assert!(!a.duplicate);
        positions.push(a.position);
    }
    positions.sort();
    assert_eq!(positions, (1..=20).collect::<Vec<u64>>());
    let all = t
        .store
        .transcript(&t.tenant, "c1", 1, 100)
        .await
        .expect("all");
    assert_eq!(all.len(), 20);
    let events: HashSet<_> = all.iter().map(|e| e.entry.event_id.clone()).collect();
    assert_eq!(events.len(), 20);
}

async fn presence_and_idle_since(t: TestStore) {
    let s = &t.store;
    assert_eq!(s.presence(&t.tenant, "a1").await.expect("get"), None);
    let p = s
        .set_presence(&t.tenant, "a1", false, &skills(&["en"]), &chat(2), 100)
        .await
        .expect("set");
    assert_eq!(p.idle_since_ms, 100, "first seen sets idle_since");
    assert!(!p.ready);
    assert!(p.active.is_empty());
    // Becoming ready sets it.
    let p = s
        .set_presence(&t.tenant, "a1", true, &skills(&["en", "fr"]), &chat(3), 200)
        .await
        .expect("set");
    assert_eq!((p.ready, p.idle_since_ms), (true, 200));
    // Staying ready keeps it.
    let p = s
        .set_presence(&t.tenant, "a1", true, &skills(&["en"]), &chat(3), 300)
        .await
        .expect("set");
    assert_eq!(p.idle_since_ms, 200);
    let got = s
        .presence(&t.tenant, "a1")
        .await
        .expect("get")
        .expect("some");
    assert_eq!(got, p);
    assert_eq!(got.tenant_id, t.tenant);
    assert_eq!(got.skills, skills(&["en"]));
    assert_eq!(got.capacity, chat(3));
    // A reserve's slot is kept across a presence change.
    assert_eq!(
        s.reserve_agent(&t.tenant, &reserve("c1", &[], &[]))
            .await
            .expect("reserve")
            .as_deref(),
        Some("a1")
    );
    let p = s
        .set_presence(&t.tenant, "a1", false, &skills(&["en"]), &chat(3), 400)
        .await
        .expect("set");
    // Taking the slot restarted the idle time (at the reserve's `now_ms`), so the next offer
    // goes to another idle agent first.
    assert_eq!((p.active.get("chat"), p.idle_since_ms), (Some(&1), 5_000));
}

/// A reserve for one named agent takes only that agent, even when others are idle longer.
async fn reserve_for_a_named_agent(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    for (agent, idle) in [("a-old", 10), ("b-new", 20)] {
        s.set_presence(tn, agent, true, &[], &chat(1), idle)
            .await
            .expect("set");
    }
    let only = |conv: &str, agent: &str| Reserve {
        only: Some(agent.into()),
        ..reserve(conv, &[], &[])
    };
    let got = s.reserve_agent(tn, &only("c1", "b-new")).await.expect("r");
    assert_eq!(got.as_deref(), Some("b-new"));
    // b-new is full now: a reserve for it alone finds nobody, although a-old is free.
    let got = s.reserve_agent(tn, &only("c2", "b-new")).await.expect("r");
    assert_eq!(got, None);
    let p = s.presence(tn, "a-old").await.expect("get").expect("some");
    assert_eq!(p.active.get("chat").copied().unwrap_or(0), 0);
}

/// A retried reserve for a conversation already holding slots of several agents (stale
/// reservations) gives back the same one on both stores: the lowest agent id.
async fn a_retried_reserve_over_several_holders_is_the_same_on_both_stores(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    for agent in ["a2", "a1", "a3"] {
        s.set_presence(tn, agent, true, &[], &chat(2), 10)
            .await
            .expect("set");
    }
    for agent in ["a3", "a2"] {
        let named = Reserve {
            only: Some(agent.into()),
            ..reserve("c1", &[], &[])
        };
        assert_eq!(
            s.reserve_agent(tn, &named).await.expect("r").as_deref(),
            Some(agent)
        );
    }
    let again = s
        .reserve_agent(tn, &reserve("c1", &[], &[]))
        .await
        .expect("r");
    assert_eq!(
        again.as_deref(),
        Some("a2"),
        "the lowest holder, not a new slot"
    );
    let a1 = s.presence(tn, "a1").await.expect("get").expect("some");
    assert_eq!(a1.active.get("chat").copied().unwrap_or(0), 0);
}

/// The caps an agent asked for itself are kept with its presence, apart from the capacity.
async fn presence_keeps_the_agents_own_limits(t: TestStore) {
    let s = &t.store;
    let update = PresenceUpdate {
        ready: true,
        skills: skills(&["en"]),
        capacity: chat(2),
        limits: chat(2),
    };
    let p = s
        .update_presence(&t.tenant, "a1", &update, 10)
        .await
        .expect("set");
    assert_eq!((p.capacity.clone(), p.limits.clone()), (chat(2), chat(2)));
    let got = s.presence(&t.tenant, "a1").await.expect("get");
    assert_eq!(got, Some(p));
    // A state without caps of its own clears them.
    let p = s
        .set_presence(&t.tenant, "a1", true, &skills(&["en"]), &chat(5), 20)
        .await
        .expect("set");
    assert!(p.limits.is_empty(), "{p:?}");
    let got = s.presence(&t.tenant, "a1").await.expect("get");
    assert_eq!(got.map(|p| p.limits), Some(BTreeMap::new()));
}

/// A changed profile sets skills and capacity (under the agent's own limits) and nothing else:
/// readiness, idle time and held slots stay.
async fn a_profile_applies_without_touching_readiness(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    let profile = |skills_: &[&str], n: u32| PresenceChange::Profile {
        skills: skills(skills_),
        provisioned: chat(n),
    };
    let none = s
        .change_presence(tn, "nobody", &profile(&["en"], 3))
        .await
        .expect("apply");
    assert_eq!(none, None, "an agent never seen gets no presence");
    let update = PresenceUpdate {
        ready: true,
        skills: skills(&["en"]),
        capacity: chat(2),
        limits: chat(2),
    };
    s.update_presence(tn, "a1", &update, 10).await.expect("set");
    s.reserve_agent(tn, &reserve("c1", &[], &[]))
        .await
        .expect("reserve");
    let before = s.presence(tn, "a1").await.expect("get").expect("some");
    s.set_presence(tn, "a1", false, &before.skills, &before.capacity, 20)
        .await
        .expect("not ready");
    let p = s
        .change_presence(tn, "a1", &profile(&["en", "fr"], 5))
        .await
        .expect("apply")
        .expect("present");
    assert_eq!(p.skills, skills(&["en", "fr"]));
    assert_eq!(p.capacity, chat(5), "the not-ready state set no limits");
    assert!(!p.ready, "stays not ready");
    assert_eq!(
        (p.active.clone(), p.idle_since_ms),
        (chat(1), before.idle_since_ms)
    );
    s.update_presence(tn, "a1", &update, 30)
        .await
        .expect("ready with a limit");
    let p = s
        .change_presence(tn, "a1", &profile(&["en"], 5))
        .await
        .expect("apply")
        .expect("present");
    assert_eq!((p.capacity, p.ready), (chat(2), true), "under the limit");
    // Not ready changes readiness alone: the profile just applied stays, and so does idle.
    let p = s
        .change_presence(tn, "a1", &PresenceChange::NotReady)
        .await
        .expect("not ready")
        .expect("present");
    assert_eq!(
        (p.ready, p.capacity.clone(), p.idle_since_ms),
        (false, chat(2), 30)
    );
    assert_eq!(
        s.presence(tn, "a1").await.expect("get").map(|p| p.skills),
        Some(skills(&["en"]))
    );
}

async fn reserve_picks_longest_idle_that_fits(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    // Idle order: a-old (10), b-mid (20), c-new (30); d-notready is the oldest but not ready.
    s.set_presence(tn, "d-notready", false, &skills(&["en"]), &chat(5), 1)
        .await
        .expect("set");
    s.set_presence(tn, "c-new", true, &skills(&["en", "fr"]), &chat(1), 30)
        .await
        .expect("set");
    s.set_presence(tn, "a-old", true, &skills(&["en"]), &chat(1), 10)
        .await
        .expect("set");
    s.set_presence(tn, "b-mid", true, &skills(&["en", "fr"]), &chat(1), 20)
        .await
        .expect("set");
    let pick = |r: Reserve| async move { s.reserve_agent(tn, &r).await.expect("reserve") };
    // Skills: only b-mid and c-new speak French; b-mid is idle longer.
    assert_eq!(
        pick(reserve("c1", &["fr"], &[])).await.as_deref(),
        Some("b-mid")
    );
    // Longest idle of the rest.
    assert_eq!(
        pick(reserve("c2", &["en"], &[])).await.as_deref(),
        Some("a-old")
    );
    // a-old and b-mid are full (capacity 1): c-new.
    assert_eq!(
        pick(reserve("c3", &[], &[])).await.as_deref(),
        Some("c-new")
    );
    assert_eq!(
        pick(reserve("c4", &[], &[])).await,
        None,
        "everyone is full"
    );
    // Exclude: free a-old, then exclude it.
    assert!(s
        .release_agent(tn, "a-old", "chat", "c2", 40)
        .await
        .expect("release"));
    assert_eq!(pick(reserve("c5", &[], &["a-old"])).await, None);
    // Missing skill.
    assert_eq!(pick(reserve("c5", &["de"], &[])).await, None);
    // Another media nobody has capacity for.
    let mut email = reserve("c5", &[], &[]);
    email.media = "email".into();
    assert_eq!(pick(email).await, None);
    assert_eq!(
        pick(reserve("c5", &["en"], &[])).await.as_deref(),
        Some("a-old")
    );
    assert_eq!(
        s.presence(tn, "d-notready")
            .await
            .expect("get")
            .expect("some")
            .active,
        BTreeMap::new(),
        "not ready agents are never taken"
    );
}

async fn retried_reserve_takes_no_second_slot(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    s.set_presence(tn, "a1", true, &[], &chat(3), 10)
        .await
        .expect("set");
    s.set_presence(tn, "a2", true, &[], &chat(3), 20)
        .await
        .expect("set");
    let r = reserve("c1", &[], &[]);
    assert_eq!(
        s.reserve_agent(tn, &r).await.expect("r").as_deref(),
        Some("a1")
    );
    assert_eq!(
        s.reserve_agent(tn, &r).await.expect("r").as_deref(),
        Some("a1")
    );
    let p = s.presence(tn, "a1").await.expect("get").expect("some");
    assert_eq!(p.active, chat(1));
    assert_eq!(
        s.agent_conversations(tn, "a1").await.expect("convs"),
        ["c1"]
    );
    // Declined by a1: a retried reserve excluding it takes a2.
    let r = reserve("c1", &[], &["a1"]);
    assert_eq!(
        s.reserve_agent(tn, &r).await.expect("r").as_deref(),
        Some("a2")
    );
    assert_eq!(
        s.reserve_agent(tn, &r).await.expect("r").as_deref(),
        Some("a2")
    );
    let p = s.presence(tn, "a2").await.expect("get").expect("some");
    assert_eq!(p.active, chat(1));
    // Both reservations are the conversation's, whatever its record says: a close frees them.
    assert_eq!(
        s.slot_holders(tn, "c1").await.expect("holders"),
        ["a1", "a2"]
    );
    assert!(s.slot_holders(tn, "c2").await.expect("holders").is_empty());
    for a in ["a1", "a2"] {
        assert!(s
            .release_agent(tn, a, "chat", "c1", 50)
            .await
            .expect("release"));
    }
    assert!(s.slot_holders(tn, "c1").await.expect("holders").is_empty());
}

/// A conversation holding a slot with one agent, reserved again for another named agent (a
/// transfer to that agent), gets that agent, not the one it holds.
async fn a_retried_reserve_for_a_named_agent_takes_only_that_agent(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    for (agent, idle) in [("a1", 10), ("a2", 20)] {
        s.set_presence(tn, agent, true, &[], &chat(3), idle)
            .await
            .expect("set");
    }
    let r = reserve("c1", &[], &[]);
    assert_eq!(
        s.reserve_agent(tn, &r).await.expect("r").as_deref(),
        Some("a1")
    );
    let only = Reserve {
        only: Some("a2".into()),
        ..r
    };
    assert_eq!(
        s.reserve_agent(tn, &only).await.expect("r").as_deref(),
        Some("a2")
    );
    // Retried: the slot a2 took, not another.
    assert_eq!(
        s.reserve_agent(tn, &only).await.expect("r").as_deref(),
        Some("a2")
    );
    let p = s.presence(tn, "a2").await.expect("get").expect("some");
    assert_eq!(p.active, chat(1));
    assert_eq!(
        s.slot_holders(tn, "c1").await.expect("holders"),
        ["a1", "a2"]
    );
}

async fn release_is_idempotent(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    s.set_presence(tn, "a1", true, &[], &chat(1), 10)
        .await
        .expect("set");
    s.set_presence(tn, "a2", true, &[], &chat(1), 20)
        .await
        .expect("set");
    assert_eq!(
        s.reserve_agent(tn, &reserve("c1", &[], &[]))
            .await
            .expect("r")
            .as_deref(),
        Some("a1")
    );
    assert!(!s
        .release_agent(tn, "a1", "chat", "other", 50)
        .await
        .expect("release"));
    assert!(!s
        .release_agent(tn, "a2", "chat", "c1", 50)
        .await
        .expect("release"));
    assert!(s
        .release_agent(tn, "a1", "chat", "c1", 100)
        .await
        .expect("release"));
    assert!(!s
        .release_agent(tn, "a1", "chat", "c1", 200)
        .await
        .expect("again"));
    let p = s.presence(tn, "a1").await.expect("get").expect("some");
    assert_eq!(p.idle_since_ms, 100, "release sets idle_since");
    assert_eq!(p.active.get("chat").copied().unwrap_or(0), 0);
    assert!(s
        .agent_conversations(tn, "a1")
        .await
        .expect("convs")
        .is_empty());
    // a1 now idles since 100, a2 since 20: a2 is offered first.
    assert_eq!(
        s.reserve_agent(tn, &reserve("c2", &[], &[]))
            .await
            .expect("r")
            .as_deref(),
        Some("a2")
    );
    assert_eq!(
        s.reserve_agent(tn, &reserve("c3", &[], &[]))
            .await
            .expect("r")
            .as_deref(),
        Some("a1")
    );
    // The conversation released from a1 may get a1 again.
    assert!(s
        .release_agent(tn, "a1", "chat", "c3", 300)
        .await
        .expect("release"));
    assert_eq!(
        s.reserve_agent(tn, &reserve("c1", &[], &[]))
            .await
            .expect("r")
            .as_deref(),
        Some("a1")
    );
}

async fn racing_reserves_respect_capacity(t: TestStore) {
    let tn = &t.tenant;
    for i in 0..5 {
        t.store
            .set_presence(tn, &format!("a{i}"), true, &skills(&["en"]), &chat(3), i)
            .await
            .expect("set");
    }
    let mut instances = Vec::new();
    for _ in 0..4 {
        instances.push(t.another().await);
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = instances[i % instances.len()].clone();
        let tenant = tn.clone();
        tasks.push(tokio::spawn(async move {
            s.reserve_agent(&tenant, &reserve(&format!("c{i}"), &["en"], &[]))
                .await
                .expect("reserve")
        }));
    }
    let mut per_agent: HashMap<String, u32> = HashMap::new();
    for task in tasks {
        if let Some(a) = task.await.expect("join") {
            *per_agent.entry(a).or_default() += 1;
        }
    }
    assert_eq!(per_agent.values().sum::<u32>(), 15, "{per_agent:?}");
    for i in 0..5 {
        let id = format!("a{i}");
        assert_eq!(per_agent.get(&id), Some(&3), "{per_agent:?}");
        let p = t.store.presence(tn, &id).await.expect("get").expect("some");
        assert_eq!(p.active, chat(3));
        assert_eq!(
            t.store.agent_conversations(tn, &id).await.expect("c").len(),
            3
        );
    }
}

async fn queue_order_and_idempotent_enqueue(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    s.enqueue(tn, "q", "old-low", 0, 100)
        .await
        .expect("enqueue");
    s.enqueue(tn, "q", "new-high", 5, 300)
        .await
        .expect("enqueue");
    s.enqueue(tn, "q", "old-high", 5, 200)
        .await
        .expect("enqueue");
    s.enqueue(tn, "q", "negative", -3, 50)
        .await
        .expect("enqueue");
    s.enqueue(tn, "q", "new-low", 0, 400)
        .await
        .expect("enqueue");
    // Enqueued again later with another priority: keeps its first place.
    s.enqueue(tn, "q", "old-low", 9, 999)
        .await
        .expect("enqueue");
    s.enqueue(tn, "other", "elsewhere", 0, 1)
        .await
        .expect("enqueue");
    assert_eq!(
        s.waiting(tn, "q", 10).await.expect("waiting"),
        ["old-high", "new-high", "old-low", "new-low", "negative"]
    );
    assert_eq!(
        s.waiting(tn, "q", 2).await.expect("waiting"),
        ["old-high", "new-high"]
    );
    assert!(s.waiting(tn, "q", 0).await.expect("waiting").is_empty());
    assert!(s.dequeue(tn, "q", "new-high").await.expect("dequeue"));
    assert!(!s.dequeue(tn, "q", "new-high").await.expect("dequeue"));
    assert!(!s.dequeue(tn, "q", "elsewhere").await.expect("dequeue"));
    assert_eq!(
        s.waiting(tn, "q", 10).await.expect("waiting"),
        ["old-high", "old-low", "new-low", "negative"]
    );
    assert_eq!(
        s.waiting(tn, "other", 10).await.expect("waiting"),
        ["elsewhere"]
    );
}

async fn dequeue_race_has_one_winner(t: TestStore) {
    t.store
        .enqueue(&t.tenant, "q", "c1", 0, 1)
        .await
        .expect("enqueue");
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = t.another().await;
        let tenant = t.tenant.clone();
        tasks.push(tokio::spawn(async move {
            s.dequeue(&tenant, "q", "c1").await.expect("dequeue")
        }));
    }
    let mut wins = 0;
    for task in tasks {
        wins += u32::from(task.await.expect("join"));
    }
    assert_eq!(wins, 1);
    assert!(t
        .store
        .waiting(&t.tenant, "q", 10)
        .await
        .expect("w")
        .is_empty());
}

async fn timers_schedule_move_cancel_claim(t: TestStore) {
    let s = &t.store;
    let kind = unique("offer");
    let tn = &t.tenant;
    s.schedule(&timer(&kind, tn, "c1"), 100)
        .await
        .expect("schedule");
    s.schedule(&timer(&kind, tn, "c2"), 200)
        .await
        .expect("schedule");
    s.schedule(&timer(&kind, tn, "c3"), 300)
        .await
        .expect("schedule");
    s.schedule(&timer(&kind, "other-tenant", "c1"), 150)
        .await
        .expect("schedule");
    // Moved later, and cancelled.
    s.schedule(&timer(&kind, tn, "c1"), 1000)
        .await
        .expect("move");
    s.cancel(&timer(&kind, tn, "c3")).await.expect("cancel");
    s.cancel(&timer(&kind, tn, "never"))
        .await
        .expect("cancel absent");
    assert!(s.claim_due(&kind, 99, 10).await.expect("claim").is_empty());
    assert_eq!(
        s.claim_due(&kind, 250, 10).await.expect("claim"),
        [timer(&kind, "other-tenant", "c1"), timer(&kind, tn, "c2")]
    );
    assert!(
        s.claim_due(&kind, 999, 10).await.expect("claim").is_empty(),
        "claimed once"
    );
    assert_eq!(
        s.claim_due(&kind, 5000, 10).await.expect("claim"),
        [timer(&kind, tn, "c1")]
    );
    // `max` caps a claim.
    for i in 0..5 {
        s.schedule(&timer(&kind, tn, &format!("d{i}")), i)
            .await
            .expect("schedule");
    }
    assert_eq!(s.claim_due(&kind, 10, 2).await.expect("claim").len(), 2);
    assert_eq!(s.claim_due(&kind, 10, 10).await.expect("claim").len(), 3);
    // Another kind is another set.
    s.schedule(&timer(&kind, tn, "x"), 1)
        .await
        .expect("schedule");
    assert!(s
        .claim_due(&unique("idle"), 10, 10)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        s.claim_due(&kind, 10, 10).await.expect("claim"),
        [timer(&kind, tn, "x")]
    );
}

async fn claimed_timers_come_back_unless_completed(t: TestStore) {
    let s = &t.store;
    let kind = unique("offer");
    let tn = &t.tenant;
    let lease = nexus::stores::session::TIMER_LEASE_MS;
    for c in ["lost", "done", "moved", "again"] {
        s.schedule(&timer(&kind, tn, c), 100)
            .await
            .expect("schedule");
    }
    assert_eq!(s.claim_due(&kind, 100, 10).await.expect("claim").len(), 4);
    // "lost": its worker died before acting. "done": acted and completed. "moved": its action
    // rescheduled it, and completing must not undo that.
    s.complete_timer(&timer(&kind, tn, "done"), 100)
        .await
        .expect("complete");
    s.schedule(&timer(&kind, tn, "moved"), 100 + lease + 500)
        .await
        .expect("move");
    s.complete_timer(&timer(&kind, tn, "moved"), 100)
        .await
        .expect("complete moved");
    // Scheduled again for the very millisecond its lease ends (another pod's handler, the
    // default offer timeout being the lease's length): kept all the same.
    s.schedule(&timer(&kind, tn, "again"), 100 + lease)
        .await
        .expect("schedule again");
    s.complete_timer(&timer(&kind, tn, "again"), 100)
        .await
        .expect("complete again");
    assert!(
        s.claim_due(&kind, 100 + lease - 1, 10)
            .await
            .expect("claim")
            .is_empty(),
        "leased timers came back before their lease ended"
    );
    let mut due = s.claim_due(&kind, 100 + lease, 10).await.expect("claim");
    due.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        due,
        [timer(&kind, tn, "again"), timer(&kind, tn, "lost")],
        "a claimed timer that was not completed fires again after the lease, and one scheduled \
         for that millisecond since is not taken for the lease"
    );
    assert_eq!(
        s.claim_due(&kind, 100 + lease + 500, 10)
            .await
            .expect("claim"),
        [timer(&kind, tn, "moved")]
    );
    // Completing a timer that is gone is harmless.
    s.complete_timer(&timer(&kind, tn, "done"), 100)
        .await
        .expect("complete twice");
}

async fn concurrent_claimers_get_each_timer_once(t: TestStore) {
    let kind = unique("close");
    for i in 0..100 {
        t.store
            .schedule(&timer(&kind, &t.tenant, &format!("c{i}")), i)
            .await
            .expect("schedule");
    }
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = t.another().await;
        let kind = kind.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = s.claim_due(&kind, 1000, 7).await.expect("claim");
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|t| t.id));
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("join"));
    }
    assert_eq!(all.len(), 100, "each timer exactly once");
    let distinct: HashSet<_> = all.into_iter().collect();
    assert_eq!(distinct.len(), 100);
}

async fn remember_within_ttl(t: TestStore) {
    let s = &t.store;
    let key = format!("{}:effect:e1", t.tenant);
    let ttl = Duration::from_millis(400);
    assert!(!s.seen(&key).await.expect("seen before"));
    assert!(s.remember(&key, ttl).await.expect("first"));
    assert!(s.seen(&key).await.expect("seen"));
    assert!(!s.remember(&key, ttl).await.expect("second"));
    assert!(!s.seen(&format!("{key}x")).await.expect("another key seen"));
    assert!(s
        .remember(&format!("{key}x"), ttl)
        .await
        .expect("another key"));
    // A forgotten key is gone at once and can be remembered again; forgetting twice is fine.
    let other = format!("{key}y");
    assert!(s.remember(&other, ttl).await.expect("other"));
    s.forget(&other).await.expect("forget");
    assert!(!s.seen(&other).await.expect("seen after forget"));
    s.forget(&other).await.expect("forget again");
    assert!(s.remember(&other, ttl).await.expect("remembered again"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!s.seen(&key).await.expect("seen after ttl"));
    assert!(s.remember(&key, ttl).await.expect("after ttl"));
    assert!(!s.remember(&key, ttl).await.expect("second again"));
}

/// `claim` keeps the first value for its lifetime, tells every later caller what it is, and
/// takes a new value once the lifetime ran out.
async fn claim_keeps_the_first_value(t: TestStore) {
    let s = &t.store;
    let key = format!("{}:start:r1", t.tenant);
    let ttl = Duration::from_millis(500);
    let racers = (0..8).map(|i| {
        let (s, key) = (s.clone(), key.clone());
        tokio::spawn(async move { s.claim(&key, &format!("v{i}"), ttl).await })
    });
    let mut winners = Vec::new();
    let mut told = HashSet::new();
    for (i, r) in racers.enumerate() {
        match r.await.expect("join").expect("claim") {
            None => winners.push(format!("v{i}")),
            Some(held) => {
                told.insert(held);
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one racer stores its value");
    assert_eq!(
        told,
        HashSet::from([winners[0].clone()]),
        "the others learn it"
    );
    // A claim is not a `remember` key, and other keys are free.
    assert!(!s.seen(&key).await.expect("seen"));
    let other = format!("{key}x");
    assert_eq!(s.claim(&other, "w", ttl).await.expect("other"), None);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(s.claim(&key, "late", ttl).await.expect("after ttl"), None);
    assert_eq!(
        s.claim(&key, "later", ttl).await.expect("again").as_deref(),
        Some("late")
    );
}

/// `refresh` extends a key from each call (a sign of life), where `remember` keeps the first.
async fn refresh_extends_a_key(t: TestStore) {
    let s = &t.store;
    let key = format!("{}:customer:c1", t.tenant);
    let ttl = Duration::from_millis(500);
    s.refresh(&key, ttl).await.expect("refresh");
    assert!(s.seen(&key).await.expect("seen"));
    assert!(!s
        .remember(&key, ttl)
        .await
        .expect("remember a refreshed key"));
    // Refreshed every 300 ms, it outlives its first lifetime...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.refresh(&key, ttl).await.expect("refresh again");
    }
    assert!(s.seen(&key).await.expect("seen after 900 ms"));
    // ...and lapses a lifetime after the last refresh.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!s.seen(&key).await.expect("seen after the last lifetime"));
    s.refresh(&key, ttl).await.expect("refresh a lapsed key");
    assert!(s.seen(&key).await.expect("seen once refreshed"));
}

async fn expired_conversation_disappears(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    s.put_conversation(&conversation(tn, "c1"))
        .await
        .expect("put");
    s.append(tn, "c1", &message("e1", Some("m1"), "hi"))
        .await
        .expect("append");
    s.put_conversation(&conversation(tn, "c2"))
        .await
        .expect("put");
    s.expire_conversation(tn, "c1", Duration::from_secs(1))
        .await
        .expect("expire");
    // Still there until the TTL passes; a later write keeps the expiry.
    let a = s
        .append(tn, "c1", &message("e2", None, "bye"))
        .await
        .expect("append");
    assert_eq!(a.position, 2);
    let mut closed = conversation(tn, "c1");
    closed.state = ConversationState::Closed;
    closed.version = 1;
    assert!(s.put_conversation(&closed).await.expect("put"));
    closed.version = 2;
    assert_eq!(s.conversation(tn, "c1").await.expect("get"), Some(closed));
    assert_eq!(s.transcript(tn, "c1", 1, 10).await.expect("t").len(), 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.conversation(tn, "c1").await.expect("get"), None);
    assert!(s.transcript(tn, "c1", 1, 10).await.expect("t").is_empty());
    assert_eq!(s.transcript_len(tn, "c1").await.expect("len"), 0);
    // Gone for reserves too: the expired close refuses nothing (the embedded store read the
    // expired record's state before).
    let reserved = s.reserve_agent(tn, &reserve("c1", &[], &[])).await;
    assert!(
        !matches!(reserved, Err(StoreError::Closed(_))),
        "{reserved:?}"
    );
    // Dedup ids went with it: the same event appends anew at position 1.
    let a = s
        .append(tn, "c1", &message("e1", Some("m1"), "hi"))
        .await
        .expect("append");
    assert_eq!((a.position, a.duplicate), (1, false));
    assert!(
        s.conversation(tn, "c2").await.expect("get").is_some(),
        "others stay"
    );
}

/// Expiring a conversation that has nothing stored leaves no expiry behind for a conversation
/// saved later under that id.
async fn expiring_a_missing_conversation_does_nothing(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    s.expire_conversation(tn, "c1", Duration::from_millis(200))
        .await
        .expect("expire");
    s.put_conversation(&conversation(tn, "c1"))
        .await
        .expect("put");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        s.conversation(tn, "c1").await.expect("get").is_some(),
        "saved after the expire call: no expiry"
    );
}

/// Entries appended for a conversation whose record is never saved (a start dead-lettered
/// between its first appends and its save) expire; once the record is saved they stay.
async fn entries_without_a_record_expire_unless_it_is_saved(t: TestStore) {
    // Long enough that the appends and the save below finish inside it on a loaded machine.
    let (s, _dir) = t.with_orphan_ttl(Duration::from_millis(1500)).await;
    let tn = &t.tenant;
    for id in ["orphan", "saved"] {
        s.append(tn, id, &message("e1", Some("m1"), "hi"))
            .await
            .expect("append");
    }
    s.append(tn, "orphan", &message("e2", None, "again"))
        .await
        .expect("append");
    assert!(s
        .put_conversation(&conversation(tn, "saved"))
        .await
        .expect("put"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(s
        .transcript(tn, "orphan", 1, 10)
        .await
        .expect("t")
        .is_empty());
    assert_eq!(s.transcript_len(tn, "orphan").await.expect("len"), 0);
    // Its dedup ids went with it: the same event appends anew at position 1.
    let a = s
        .append(tn, "orphan", &message("e1", Some("m1"), "hi"))
        .await
        .expect("append");
    assert_eq!((a.position, a.duplicate), (1, false));
    assert_eq!(s.transcript(tn, "saved", 1, 10).await.expect("t").len(), 1);
    let a = s
        .append(tn, "saved", &message("e1", Some("m1"), "hi"))
        .await
        .expect("append");
    assert!(a.duplicate, "the saved conversation's ids stay");
    assert!(s.conversation(tn, "saved").await.expect("get").is_some());
}

async fn a_closed_conversation_takes_no_more_entries(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    let mut c = conversation(tn, "c1");
    assert!(s.put_conversation(&c).await.expect("put"));
    c.version = 1;
    s.append(tn, "c1", &message("e1", Some("m1"), "hi"))
        .await
        .expect("append");
    c.state = ConversationState::Closed;
    assert!(s.put_conversation(&c).await.expect("close"));
    // A new entry is refused; a repeat of one from before the close still answers its place.
    let refused = s.append(tn, "c1", &message("e2", None, "late")).await;
    assert!(
        matches!(refused, Err(StoreError::Closed(ref id)) if id == "c1"),
        "{refused:?}"
    );
    let again = s
        .append(tn, "c1", &message("e1", Some("m1"), "hi"))
        .await
        .expect("repeat");
    assert_eq!((again.position, again.duplicate), (1, true));
    assert_eq!(s.transcript_len(tn, "c1").await.expect("len"), 1);
    // Another conversation of the tenant is not affected.
    s.append(tn, "c2", &message("e3", None, "fine"))
        .await
        .expect("other conversation");
}

async fn a_closed_conversation_reserves_no_agent(t: TestStore) {
    let s = &t.store;
    let tn = &t.tenant;
    s.set_presence(tn, "a1", true, &[], &chat(2), 10)
        .await
        .expect("set");
    // No record yet (a new conversation about to be saved): the reserve goes ahead.
    assert_eq!(
        s.reserve_agent(tn, &reserve("c1", &[], &[]))
            .await
            .expect("reserve")
            .as_deref(),
        Some("a1")
    );
    let mut c = conversation(tn, "c1");
    assert!(s.put_conversation(&c).await.expect("put"));
    c.version = 1;
    c.state = ConversationState::Closed;
    assert!(s.put_conversation(&c).await.expect("close"));
    // Saved closed: refused, even the retried reserve of the slot it still holds, and nothing
    // more is taken (the close frees the holder it reads after its save).
    for r in [reserve("c1", &[], &[]), reserve("c1", &[], &["a1"])] {
        let refused = s.reserve_agent(tn, &r).await;
        assert!(
            matches!(refused, Err(StoreError::Closed(ref id)) if id == "c1"),
            "{refused:?}"
        );
    }
    let p = s.presence(tn, "a1").await.expect("get").expect("some");
    assert_eq!(p.active, chat(1));
    assert_eq!(s.slot_holders(tn, "c1").await.expect("holders"), ["a1"]);
    assert!(s
        .release_agent(tn, "a1", "chat", "c1", 50)
        .await
        .expect("release"));
    // Another conversation of the tenant still gets the agent.
    assert_eq!(
        s.reserve_agent(tn, &reserve("c2", &[], &[]))
            .await
            .expect("reserve")
            .as_deref(),
        Some("a1")
    );
}

async fn tenants_are_isolated(t: TestStore) {
    let s = &t.store;
    let (a, b) = (t.tenant.clone(), format!("{}-b", t.tenant));
    let mut ca = conversation(&a, "c1");
    ca.subject = Some("from a".into());
    assert!(s.put_conversation(&ca).await.expect("put"));
    ca.version = 1;
    assert_eq!(s.conversation(&b, "c1").await.expect("get"), None);
    s.put_conversation(&conversation(&b, "c1"))
        .await
        .expect("put");
    assert_eq!(s.conversation(&a, "c1").await.expect("get"), Some(ca));
    s.append(&a, "c1", &message("e1", None, "a"))
        .await
        .expect("append");
    let in_b = s
        .append(&b, "c1", &message("e1", None, "b"))
        .await
        .expect("append");
    assert_eq!((in_b.position, in_b.duplicate), (1, false));
    assert_eq!(
        s.transcript(&b, "c1", 1, 10).await.expect("t")[0]
            .entry
            .text
            .as_deref(),
        Some("b")
    );
    s.set_presence(&a, "agent", true, &[], &chat(1), 1)
        .await
        .expect("set");
    assert_eq!(s.presence(&b, "agent").await.expect("get"), None);
    assert_eq!(
        s.reserve_agent(&b, &reserve("c1", &[], &[]))
            .await
            .expect("r"),
        None
    );
    s.enqueue(&a, "q", "c1", 0, 1).await.expect("enqueue");
    assert!(s.waiting(&b, "q", 10).await.expect("w").is_empty());
    assert!(!s.dequeue(&b, "q", "c1").await.expect("dequeue"));
}

/// A tenant's purge (a deleted tenant) removes its records, transcripts (one without a record
/// and one closed and expiring too), presence, slots, queues, timers and marks, and nothing of
/// another tenant, even one whose id starts with the purged one's; done twice, the second
/// finds nothing. The purged tenant's id holds glob characters: a key pattern that does not
/// escape them would take the other tenant's keys.
async fn purging_a_tenant_leaves_the_others(t: TestStore) {
    use nexus::stores::session::{customer_mark, start_mark, start_request_key};
    let s = &t.store;
    let (a, b) = (format!("{}*", t.tenant), format!("{}-b", t.tenant));
    let kind = unique("purge");
    let keep = Duration::from_secs(300);
    for tenant in [&a, &b] {
        assert!(s
            .put_conversation(&conversation(tenant, "c1"))
            .await
            .expect("put"));
        s.append(tenant, "c1", &message("e1", Some("m1"), "hi"))
            .await
            .expect("append");
        s.append(tenant, "orphan", &message("e2", None, "no record"))
            .await
            .expect("append");
        let mut closed = conversation(tenant, "c2");
        closed.state = ConversationState::Closed;
        assert!(s.put_conversation(&closed).await.expect("put"));
        s.expire_conversation(tenant, "c2", keep)
            .await
            .expect("expire");
        s.set_presence(tenant, "agent", true, &[], &chat(2), 1)
            .await
            .expect("presence");
        assert_eq!(
            s.reserve_agent(tenant, &reserve("c1", &[], &[]))
                .await
                .expect("reserve")
                .as_deref(),
            Some("agent")
        );
        s.enqueue(tenant, "q", "c3", 0, 1).await.expect("enqueue");
        s.schedule(&timer(&kind, tenant, "c1"), 100)
            .await
            .expect("timer");
        assert!(s
            .remember(&start_mark(tenant, "c1"), keep)
            .await
            .expect("mark"));
        s.refresh(&customer_mark(tenant, "c1"), keep)
            .await
            .expect("mark");
        assert_eq!(
            s.claim(&start_request_key(tenant, "r1"), tenant, keep)
                .await
                .expect("claim"),
            None
        );
    }
    assert!(s.purge_tenant(&a).await.expect("purge") > 0);
    for (tenant, kept) in [(&a, false), (&b, true)] {
        let what = if kept { "kept" } else { "purged" };
        for c in ["c1", "c2"] {
            assert_eq!(
                s.conversation(tenant, c).await.expect("get").is_some(),
                kept,
                "{tenant} {c} {what}"
            );
        }
        for (c, len) in [("c1", 1), ("orphan", 1)] {
            let expected = if kept { len } else { 0 };
            assert_eq!(
                s.transcript_len(tenant, c).await.expect("len"),
                expected,
                "{tenant} {c}"
            );
            assert_eq!(
                s.transcript(tenant, c, 1, 10).await.expect("t").len() as u64,
                expected,
                "{tenant} {c}"
            );
        }
        assert_eq!(
            s.presence(tenant, "agent").await.expect("p").is_some(),
            kept,
            "{tenant}"
        );
        let held = if kept {
            vec!["agent".to_string()]
        } else {
            vec![]
        };
        assert_eq!(s.slot_holders(tenant, "c1").await.expect("h"), held);
        let slots = if kept { vec!["c1".to_string()] } else { vec![] };
        assert_eq!(
            s.agent_conversations(tenant, "agent").await.expect("s"),
            slots
        );
        let waiting = if kept { vec!["c3".to_string()] } else { vec![] };
        assert_eq!(s.waiting(tenant, "q", 10).await.expect("w"), waiting);
        assert_eq!(s.seen(&start_mark(tenant, "c1")).await.expect("seen"), kept);
        assert_eq!(
            s.seen(&customer_mark(tenant, "c1")).await.expect("seen"),
            kept
        );
    }
    assert_eq!(
        s.claim(&start_request_key(&b, "r1"), "again", keep)
            .await
            .expect("claim")
            .as_deref(),
        Some(b.as_str()),
        "the other tenant's start request"
    );
    assert_eq!(
        s.claim_due(&kind, 1_000, 10).await.expect("claim"),
        [timer(&kind, &b, "c1")]
    );
    s.complete_timer(&timer(&kind, &b, "c1"), 1_000)
        .await
        .expect("complete");
    assert_eq!(s.purge_tenant(&a).await.expect("again"), 0);
    // The purged tenant starts afresh: the record is new, the transcript starts at 1.
    assert!(s
        .put_conversation(&conversation(&a, "c1"))
        .await
        .expect("put"));
    let first = s
        .append(&a, "c1", &message("e1", Some("m1"), "again"))
        .await
        .expect("append");
    assert_eq!((first.position, first.duplicate), (1, false));
}

per_store!(
    conversation_put_get_replace_absent,
    conversation_compare_and_set_race,
    transcript_positions_and_windows,
    append_is_idempotent,
    concurrent_appends_are_gap_free,
    presence_and_idle_since,
    reserve_picks_longest_idle_that_fits,
    reserve_for_a_named_agent,
    presence_keeps_the_agents_own_limits,
    a_profile_applies_without_touching_readiness,
    retried_reserve_takes_no_second_slot,
    a_retried_reserve_for_a_named_agent_takes_only_that_agent,
    a_retried_reserve_over_several_holders_is_the_same_on_both_stores,
    release_is_idempotent,
    racing_reserves_respect_capacity,
    queue_order_and_idempotent_enqueue,
    dequeue_race_has_one_winner,
    timers_schedule_move_cancel_claim,
    concurrent_claimers_get_each_timer_once,
    claimed_timers_come_back_unless_completed,
    remember_within_ttl,
    claim_keeps_the_first_value,
    refresh_extends_a_key,
    expired_conversation_disappears,
    expiring_a_missing_conversation_does_nothing,
    entries_without_a_record_expire_unless_it_is_saved,
    a_closed_conversation_takes_no_more_entries,
    a_closed_conversation_reserves_no_agent,
    tenants_are_isolated,
    purging_a_tenant_leaves_the_others,
);

/// The embedded store keeps everything across a restart (drop and reopen of the directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_survives_reopen() {
    if !selected("embedded") {
        return;
    }
    let t = test_store("embedded").await;
    let dir = t.dir.expect("embedded has a dir");
    let tn = t.tenant.clone();
    let kind = unique("offer");
    {
        let s = t.store;
        s.put_conversation(&conversation(&tn, "c1"))
            .await
            .expect("put");
        s.append(&tn, "c1", &message("e1", Some("m1"), "hi"))
            .await
            .expect("append");
        s.set_presence(&tn, "a1", true, &[], &chat(2), 10)
            .await
            .expect("set");
        s.reserve_agent(&tn, &reserve("c1", &[], &[]))
            .await
            .expect("reserve");
        s.enqueue(&tn, "q", "c9", 1, 5).await.expect("enqueue");
        s.schedule(&timer(&kind, &tn, "c1"), 10)
            .await
            .expect("schedule");
        assert!(s
            .remember("k1", Duration::from_secs(60))
            .await
            .expect("remember"));
    }
    let s = EmbeddedStore::open(dir.path()).await.expect("reopen");
    let written = Conversation {
        version: 1,
        ..conversation(&tn, "c1")
    };
    assert_eq!(s.conversation(&tn, "c1").await.expect("get"), Some(written));
    let a = s
        .append(&tn, "c1", &message("e1", Some("m1"), "hi"))
        .await
        .expect("append");
    assert_eq!((a.position, a.duplicate), (1, true));
    let p = s.presence(&tn, "a1").await.expect("get").expect("some");
    assert_eq!((p.active, p.idle_since_ms), (chat(1), 5_000));
    assert_eq!(s.agent_conversations(&tn, "a1").await.expect("c"), ["c1"]);
    assert_eq!(s.waiting(&tn, "q", 10).await.expect("w"), ["c9"]);
    assert_eq!(
        s.claim_due(&kind, 10, 10).await.expect("claim"),
        [timer(&kind, &tn, "c1")]
    );
    assert!(!s
        .remember("k1", Duration::from_secs(60))
        .await
        .expect("remember"));
}

/// Foreign or damaged data in Redis is `Corrupt`, from plain reads and from inside scripts.
#[tokio::test]
async fn redis_corrupt_data_is_reported() {
    if !selected("redis") {
        return;
    }
    let t = test_store("redis").await;
    let client = ::redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let pre = format!("nx:{{t:{}}}:", t.tenant);
    let _: () = conn
        .set(format!("{pre}conv:c1"), "{not json")
        .await
        .expect("set");
    let _: () = conn
        .rpush(format!("{pre}conv:c2"), "a list")
        .await
        .expect("rpush");
    let _: () = conn
        .zadd(format!("{pre}agents"), "a1", 1)
        .await
        .expect("zadd");
    let _: () = conn
        .hset(format!("{pre}agent:a1"), "profile", "{broken")
        .await
        .expect("hset");
    let is_corrupt = |r: Result<_, StoreError>| matches!(r, Err(StoreError::Corrupt(_)));
    assert!(is_corrupt(
        t.store.conversation(&t.tenant, "c1").await.map(|_| ())
    ));
    assert!(is_corrupt(
        t.store.conversation(&t.tenant, "c2").await.map(|_| ())
    ));
    assert!(is_corrupt(
        t.store.presence(&t.tenant, "a1").await.map(|_| ())
    ));
    // A save over an unreadable record (its version read inside the script).
    let mut c1 = conversation(&t.tenant, "c1");
    c1.version = 1;
    assert!(is_corrupt(t.store.put_conversation(&c1).await.map(|_| ())));
    // A reserve passes over the unreadable agent to one that fits (one agent's damaged
    // record must not stop the tenant's routing).
    t.store
        .set_presence(&t.tenant, "a2", true, &[], &chat(1), 5)
        .await
        .expect("presence");
    assert_eq!(
        t.store
            .reserve_agent(&t.tenant, &reserve("c9", &[], &[]))
            .await
            .expect("reserve")
            .as_deref(),
        Some("a2")
    );
    // The agent's next state overwrites the damaged record, which then reads again.
    t.store
        .set_presence(&t.tenant, "a1", false, &[], &chat(1), 6)
        .await
        .expect("a state repairs the record");
    let a1 = t.store.presence(&t.tenant, "a1").await.expect("readable");
    assert_eq!(a1.map(|p| p.ready), Some(false));
    // An unreadable timer among due ones: the others are handed out, the bad one removed
    // (else the whole batch failed, leased, again after every lease).
    let kind = format!("bad-{}", t.tenant);
    let timers = format!("nx:timers:{kind}");
    let _: () = conn.zadd(&timers, "notjson", 1).await.expect("zadd");
    let good = Timer {
        kind: kind.clone(),
        tenant_id: t.tenant.clone(),
        id: "x".into(),
    };
    t.store.schedule(&good, 2).await.expect("schedule");
    let due = t.store.claim_due(&kind, 10, 10).await.expect("claim");
    assert_eq!(due, vec![good]);
    let left: Vec<String> = conn.zrange(&timers, 0, -1).await.expect("zrange");
    assert_eq!(
        left,
        ["[\"{}\",\"x\"]".replace("{}", &t.tenant)],
        "{left:?}"
    );
    let _: () = conn.del(&timers).await.expect("del");
    cleanup(&t.tenant).await;
}

/// `connect` picks the embedded store when no Redis URL is set and Redis otherwise.
#[tokio::test]
async fn connect_follows_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = nexus::config::Config::defaults().stores;
    config.data_dir = dir.path().display().to_string();
    config.redis_url = String::new();
    let store = nexus::stores::session::connect(&config)
        .await
        .expect("embedded");
    store.ping().await.expect("ping");
    assert!(dir.path().join("sessions.redb").is_file());
    if selected("redis") {
        config.redis_url = redis_url();
        let store = nexus::stores::session::connect(&config)
            .await
            .expect("redis");
        store.ping().await.expect("ping");
    }
    if let Some(nodes) = cluster_nodes().filter(|_| selected("redis-cluster")) {
        config.redis_url = nodes;
        config.redis_cluster = true;
        let store = nexus::stores::session::connect(&config)
            .await
            .expect("redis cluster");
        store.ping().await.expect("ping");
        let tenant = unique("tenant");
        assert!(store
            .put_conversation(&conversation(&tenant, "c1"))
            .await
            .expect("put"));
        assert!(store
            .conversation(&tenant, "c1")
            .await
            .expect("get")
            .is_some());
    }
}

/// `stores.redis_min_replicas` on a server with no replica: the write is made but never
/// acknowledged (the caller retries, and the operator sees the setting named); with no wait
/// the same server acknowledges it.
#[tokio::test]
async fn redis_replica_wait_with_no_replica_acknowledges_nothing() {
    if !selected("redis") {
        return;
    }
    let mut config = nexus::config::Config::defaults().stores;
    config.redis_url = redis_url();
    config.redis_min_replicas = 1;
    config.redis_replica_wait_ms = 100;
    let waiting = nexus::stores::session::connect(&config)
        .await
        .expect("redis");
    config.redis_min_replicas = 0;
    let plain = nexus::stores::session::connect(&config)
        .await
        .expect("redis");
    let tenant = unique("tenant");
    match waiting
        .append(&tenant, "c1", &message("e1", None, "hi"))
        .await
    {
        Err(StoreError::Unavailable(detail)) => {
            assert!(detail.contains("stores.redis_min_replicas"), "{detail}")
        }
        other => panic!("acknowledged with no replica: {other:?}"),
    }
    match waiting.put_conversation(&conversation(&tenant, "c1")).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("acknowledged with no replica: {other:?}"),
    }
    let again = plain
        .append(&tenant, "c1", &message("e1", None, "hi"))
        .await
        .expect("no wait");
    assert!(again.duplicate, "the unacknowledged write was made");
    assert_eq!(again.position, 1);
    cleanup(&tenant).await;
}

/// Two deployments on one Redis under different namespaces: neither claims the other's timers
/// (a worker would fire them on its own bus) nor sees its dedup marks.
#[tokio::test]
async fn redis_namespaces_keep_deployments_apart() {
    if !selected("redis") {
        return;
    }
    let (ns_a, ns_b) = (unique("nsa"), unique("nsb"));
    let a = RedisStore::connect_in(&redis_url(), &ns_a)
        .await
        .expect("connect a");
    let b = RedisStore::connect_in(&redis_url(), &ns_b)
        .await
        .expect("connect b");
    // The fixed kind the conversation worker uses, as two deployments would.
    let offer = timer("offer", "tenant-1", "c1");
    a.schedule(&offer, 100).await.expect("schedule");
    assert!(
        b.claim_due("offer", i64::MAX / 2, 100)
            .await
            .expect("claim b")
            .iter()
            .all(|t| t != &offer),
        "another namespace's worker claimed the timer"
    );
    assert_eq!(
        a.claim_due("offer", 1_000, 100).await.expect("claim a"),
        [offer]
    );
    let mark = unique("mark");
    assert!(a.remember(&mark, Duration::from_secs(60)).await.expect("a"));
    assert!(b.remember(&mark, Duration::from_secs(60)).await.expect("b"));
    assert!(!a
        .remember(&mark, Duration::from_secs(60))
        .await
        .expect("a again"));
    let mut raw = ::redis::Client::open(redis_url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection");
    for ns in [&ns_a, &ns_b] {
        let keys: Vec<String> = raw.keys(format!("{ns}:*")).await.expect("keys");
        if !keys.is_empty() {
            raw.del::<_, ()>(keys).await.expect("cleanup");
        }
    }
}
