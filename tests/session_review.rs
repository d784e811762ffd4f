//! Review cases of the session store: behaviours the trait documents where a store was wrong.
//! Redis (`NEXUS_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), the Redis Cluster
//! (`NEXUS_TEST_REDIS_CLUSTER_URL`, skipped without it) and the embedded store; each case under
//! a random tenant of its own.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ::redis::AsyncCommands;
use nexus::stores::session::embedded::EmbeddedStore;
use nexus::stores::session::redis::RedisStore;
use nexus::stores::session::{
    Conversation, ConversationState, EntryKind, NewEntry, Party, PartyKind, Reserve, SessionStore,
    StoreError,
};

fn redis_url() -> String {
    std::env::var("NEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

/// A store of `backend` keeping entries without a record `orphan_ttl`, with what must live as
/// long as it; `None` for the cluster when no cluster is given.
async fn store(
    backend: &str,
    orphan_ttl: Duration,
) -> Option<(Arc<dyn SessionStore>, Option<tempfile::TempDir>)> {
    match backend {
        "redis" => {
            let s = RedisStore::connect(&redis_url()).await.expect("connect");
            Some((Arc::new(s.with_orphan_ttl(orphan_ttl)), None))
        }
        "redis-cluster" => {
            let url = std::env::var("NEXUS_TEST_REDIS_CLUSTER_URL").ok()?;
            let nodes: Vec<&str> = url.split(',').collect();
            let s = RedisStore::connect_cluster_in(&nodes, "nx")
                .await
                .expect("connect cluster");
            Some((Arc::new(s.with_orphan_ttl(orphan_ttl)), None))
        }
        _ => {
            let dir = tempfile::tempdir().expect("tempdir");
            let s = EmbeddedStore::open(dir.path()).await.expect("open");
            Some((Arc::new(s.with_orphan_ttl(orphan_ttl)), Some(dir)))
        }
    }
}

async fn raw_redis() -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

fn party(id: &str) -> Party {
    Party {
        participant_id: id.into(),
        nickname: id.into(),
        kind: PartyKind::Customer,
    }
}

/// A queued web chat of `tenant` whose customer is `customer-1`.
fn conversation(tenant: &str, id: &str) -> Conversation {
    let mut c = common::fixtures::conversation(tenant, id, ConversationState::Queued);
    c.customer = party("customer-1");
    c
}

fn message(event_id: &str) -> NewEntry {
    NewEntry {
        event_id: event_id.into(),
        kind: EntryKind::Message,
        from: party("customer-1"),
        text: Some("hi".into()),
        message_id: None,
        data: BTreeMap::new(),
        at_ms: 1_700_000_000_123,
    }
}

/// A conversation whose first save is a closed record, after entries appended while it had
/// none: the save ends their orphan expiry (README: only closed records expire, by the close's
/// `expire_conversation`). Redis kept it on the transcript and its closed mark, so once it ran
/// out the record stayed closed but took new entries; the embedded store let the saved record
/// itself vanish with it.
async fn a_record_saved_closed_first_keeps_its_entries_and_refuses_more(backend: &str) {
    let Some((s, _dir)) = store(backend, Duration::from_millis(1500)).await else {
        eprintln!("{backend}: no cluster given, not run");
        return;
    };
    let tn = &unique("review");
    s.append(tn, "c1", &message("e1")).await.expect("append");
    let mut closed = conversation(tn, "c1");
    closed.state = ConversationState::Closed;
    assert!(s.put_conversation(&closed).await.expect("save closed"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let record = s.conversation(tn, "c1").await.expect("get");
    assert_eq!(
        record.map(|c| c.state),
        Some(ConversationState::Closed),
        "{backend}: the saved record stays"
    );
    assert_eq!(
        s.transcript_len(tn, "c1").await.expect("len"),
        1,
        "{backend}"
    );
    let late = s.append(tn, "c1", &message("e2")).await;
    assert!(
        matches!(late, Err(StoreError::Closed(ref id)) if id == "c1"),
        "{backend}: {late:?}"
    );
    // The close's own expiry still ends it all.
    s.expire_conversation(tn, "c1", Duration::from_millis(200))
        .await
        .expect("expire");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        s.conversation(tn, "c1").await.expect("get"),
        None,
        "{backend}"
    );
    assert_eq!(
        s.transcript_len(tn, "c1").await.expect("len"),
        0,
        "{backend}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_record_saved_closed_first_keeps_its_entries_and_refuses_more() {
    a_record_saved_closed_first_keeps_its_entries_and_refuses_more("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_record_saved_closed_first_keeps_its_entries_and_refuses_more() {
    a_record_saved_closed_first_keeps_its_entries_and_refuses_more("redis-cluster").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_record_saved_closed_first_keeps_its_entries_and_refuses_more() {
    a_record_saved_closed_first_keeps_its_entries_and_refuses_more("embedded").await;
}

/// An agent profile that parses as JSON but whose skills or capacity are not a list and a map
/// (a foreign or damaged writer) takes no offers and does not stop the tenant's routing, as an
/// unreadable one (and as on the embedded store, which cannot read it). The Redis reserve
/// script raised on it, failing every reserve of the tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reserve_passes_over_a_profile_of_the_wrong_shape() {
    let (s, _) = store("redis", Duration::from_secs(60))
        .await
        .expect("redis");
    let tn = &unique("review");
    let chat = BTreeMap::from([("chat".to_string(), 2)]);
    for (agent, at) in [("a0", 1), ("a1", 2), ("a2", 3)] {
        s.set_presence(tn, agent, true, &[], &chat, at)
            .await
            .expect("presence");
    }
    // a0 and a1 are longer idle than a2 and broken each its own way.
    let mut raw = raw_redis().await;
    let key = |agent: &str| format!("nx:{{t:{tn}}}:agent:{agent}");
    for (agent, profile) in [
        (
            "a0",
            r#"{"ready":true,"skills":null,"capacity":{"chat":2}}"#,
        ),
        ("a1", r#"{"ready":true,"skills":[],"capacity":7}"#),
    ] {
        raw.hset::<_, _, _, ()>(key(agent), "profile", profile)
            .await
            .expect("damage");
    }
    let r = Reserve {
        conversation_id: "c1".into(),
        media: "chat".into(),
        skills: vec![],
        exclude: vec![],
        only: None,
        now_ms: 10,
    };
    let got = s.reserve_agent(tn, &r).await.expect("reserve");
    assert_eq!(got.as_deref(), Some("a2"));
    let mut keys: Vec<String> = raw.keys(format!("nx:{{t:{tn}}}:*")).await.expect("keys");
    keys.sort();
    raw.del::<_, ()>(keys).await.expect("cleanup");
}

/// An agent whose held count is no integer (damaged) takes no offers and does not stop the
/// tenant's routing: the reserve script chose it and raised adding to it. Its release frees the
/// slot and counts it again from the slots it holds (HINCRBY raised after the slot was freed,
/// leaving the count unreadable for good, and the presence with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_damaged_count_neither_stops_reserves_nor_outlives_a_release() {
    let (s, _) = store("redis", Duration::from_secs(60))
        .await
        .expect("redis");
    let tn = &unique("review");
    let chat = BTreeMap::from([("chat".to_string(), 3)]);
    for (agent, at) in [("a0", 1), ("a1", 2)] {
        s.set_presence(tn, agent, true, &[], &chat, at)
            .await
            .expect("presence");
    }
    let reserve = |conversation: &str, only: Option<&str>| Reserve {
        conversation_id: conversation.into(),
        media: "chat".into(),
        skills: vec![],
        exclude: vec![],
        only: only.map(str::to_string),
        now_ms: 10,
    };
    for c in ["c1", "c2"] {
        let got = s.reserve_agent(tn, &reserve(c, Some("a0"))).await;
        assert_eq!(got.expect("reserve").as_deref(), Some("a0"));
    }
    s.set_presence(tn, "a0", false, &[], &chat, 3)
        .await
        .expect("not ready");
    s.set_presence(tn, "a0", true, &[], &chat, 4)
        .await
        .expect("ready, longest idle again");
    let mut raw = raw_redis().await;
    raw.hset::<_, _, _, ()>(format!("nx:{{t:{tn}}}:agent:a0"), "a:chat", "two")
        .await
        .expect("damage");
    let got = s.reserve_agent(tn, &reserve("c3", None)).await;
    assert_eq!(got.expect("reserve").as_deref(), Some("a1"));
    assert!(s
        .release_agent(tn, "a0", "chat", "c1", 20)
        .await
        .expect("release"));
    let p = s.presence(tn, "a0").await.expect("readable").expect("a0");
    assert_eq!(p.active.get("chat"), Some(&1), "c2 still held");
    assert_eq!(
        s.agent_conversations(tn, "a0").await.expect("slots"),
        ["c2"]
    );
    let mut keys: Vec<String> = raw.keys(format!("nx:{{t:{tn}}}:*")).await.expect("keys");
    keys.sort();
    raw.del::<_, ()>(keys).await.expect("cleanup");
}

/// A stored record whose version is at the limit is reported as damaged by the save that
/// would go past it, not a panic (debug) or a wrap to version 0 (release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_version_at_its_limit_is_corrupt_not_a_panic() {
    let (s, _) = store("redis", Duration::from_secs(60))
        .await
        .expect("redis");
    let tn = &unique("review");
    let mut c = conversation(tn, "c1");
    c.version = u64::MAX;
    let json = serde_json::to_string(&c).expect("json");
    let mut raw = raw_redis().await;
    let key = format!("nx:{{t:{tn}}}:conv:c1");
    raw.set::<_, _, ()>(&key, json).await.expect("write");
    let read = s.conversation(tn, "c1").await.expect("get").expect("some");
    let saved = tokio::spawn(async move { s.put_conversation(&read).await })
        .await
        .expect("put_conversation panicked");
    assert!(matches!(saved, Err(StoreError::Corrupt(_))), "{saved:?}");
    raw.del::<_, ()>(&key).await.expect("cleanup");
}

/// With a replica wait, a `WAIT` the server refuses (here a user without the right to it; a
/// master demoted while it waits answers `-UNBLOCKED` the same way) fails the write for its
/// event to be retried, naming the setting. Before, the error answer was read as a number that
/// did not parse: `Corrupt`, which dead-letters the event whose write had been made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_refused_wait_is_a_retryable_failure_not_corrupt_data() {
    let user = unique("nowait");
    let mut raw = raw_redis().await;
    ::redis::cmd("ACL")
        .arg(&["SETUSER", &user, "on", ">pw", "~*", "&*", "+@all", "-wait"])
        .query_async::<()>(&mut raw)
        .await
        .expect("ACL SETUSER");
    let url = redis_url().replacen("redis://", &format!("redis://{user}:pw@"), 1);
    let s = RedisStore::connect(&url)
        .await
        .expect("connect as the user")
        .with_replica_wait(Some(nexus::stores::session::redis::ReplicaWait {
            replicas: 1,
            timeout: Duration::from_millis(100),
        }))
        .await
        .expect("the writers' connection");
    let tn = unique("review");
    let entry = NewEntry {
        event_id: "e1".into(),
        kind: EntryKind::Message,
        from: party("customer"),
        text: Some("hello".into()),
        message_id: None,
        data: BTreeMap::new(),
        at_ms: 1,
    };
    let got = s.append(&tn, "c1", &entry).await;
    ::redis::cmd("ACL")
        .arg(&["DELUSER", &user])
        .query_async::<()>(&mut raw)
        .await
        .expect("ACL DELUSER");
    match got {
        Err(StoreError::Unavailable(detail)) => assert!(
            detail.contains("stores.redis_min_replicas"),
            "the failure names the setting: {detail}"
        ),
        other => panic!("a refused WAIT: {other:?}"),
    }
}
