//! Web chat end to end through real processes: a customer (Chat API v3 + WebSocket) and an
//! agent (agent WebSocket) chat through the bus, the conversation worker and the session
//! store; v2 sees the same conversation; a reconnect from a position misses and repeats
//! nothing. Runs on the embedded bus + SQLite + embedded store (`nexus dev`) and on NATS
//! JetStream + PostgreSQL + Redis.

use crate::common;

use std::time::Duration;

use common::chat::*;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(20);

fn transcript_frame(v: &Value, kind: &str) -> bool {
    v["type"] == "transcript" && v["kind"] == kind
}

/// The scenario, against a running system at `url` (edge) — `agent_url` may be another edge.
async fn scenario(url: &str, agent_url: &str) {
    let http = reqwest::Client::new();
    let admin = Admin::new(url);
    let tenant = provision_tenant(&admin).await;
    let (_agent_id, token) = provision_agent(&admin, &tenant, "alice", 2).await;
    let mut agent = agent_ready(agent_url, &token).await;

    // The customer starts a chat, and its widget retries the start (same request id): one
    // session, the same keys.
    let start = || async {
        let r = http
            .post(format!("{url}/nexus/v3/chat/sessions"))
            .header("x-api-key", &tenant.api_key)
            .json(
                &json!({"nickname": "Ann", "email_address": "ann@example.com",
                "request_id": "0193a4b2-7c1e-7000-8000-00000000a11e"}),
            )
            .send()
            .await
            .expect("start");
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.expect("start json")
    };
    let (started, retried) = tokio::join!(start(), start());
    assert_eq!(started, retried, "a retried start is the same session");
    let sid = started["session_id"]
        .as_str()
        .expect("session id")
        .to_string();
    let ck = started["client_key"]
        .as_str()
        .expect("client key")
        .to_string();
    let stream = format!(
        "{url}/nexus/v3/chat/sessions/{sid}/stream?api_key={}&client_key={ck}",
        tenant.api_key
    );
    let mut customer = ws_connect(&stream).await;
    let joined = ws_until(&mut customer, WAIT, |v| {
        transcript_frame(v, "ParticipantJoined")
    })
    .await;
    assert_eq!(joined["position"], 1);
    assert_eq!(joined["from"]["nickname"], "Ann");

    // The agent is offered the chat and accepts.
    let offer = ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], sid.as_str());
    assert_eq!(offer["nickname"], "Ann");
    assert_eq!(start().await, started, "a retry after the start applied");
    ws_send(
        &mut agent,
        json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    let agent_joined = ws_until(&mut customer, WAIT, |v| {
        transcript_frame(v, "ParticipantJoined")
    })
    .await;
    assert_eq!(agent_joined["position"], 2);
    assert_eq!(agent_joined["from"]["kind"], "agent");

    // The customer sends twice with one message id: one message.
    for _ in 0..2 {
        let r = http
            .post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
            .header("x-api-key", &tenant.api_key)
            .header("x-nexus-client-key", &ck)
            .json(&json!({"text": "hello", "message_id": "m-1"}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 202);
    }
    let hello = ws_until(&mut agent, WAIT, |v| transcript_frame(v, "Message")).await;
    assert_eq!(hello["text"], "hello");
    assert_eq!(hello["position"], 3);

    // The agent replies twice with one client message id (not a UUID): the customer sees one
    // reply (the v2 view below counts them).
    for _ in 0..2 {
        ws_send(
            &mut agent,
            json!({"op": "reply", "conversation_id": sid, "text": "hi Ann, how can I help?",
                "message_id": "reply-1"}),
        )
        .await;
    }
    let reply = ws_until(&mut customer, WAIT, |v| {
        transcript_frame(v, "Message") && v["from"]["kind"] == "agent"
    })
    .await;
    assert_eq!(reply["text"], "hi Ann, how can I help?");
    assert_eq!(reply["position"], 4);

    // A reconnect from position 3 gets 3 and 4, once each.
    drop(customer);
    let mut again = ws_connect(&format!("{stream}&from=3")).await;
    let first = ws_until(&mut again, WAIT, |v| v["type"] == "transcript").await;
    let second = ws_until(&mut again, WAIT, |v| v["type"] == "transcript").await;
    assert_eq!(
        (first["position"].clone(), second["position"].clone()),
        (json!(3), json!(4))
    );

    // The legacy v2 view of the same chat.
    let v2: Value = http
        .post(format!("{url}/genesys/2/chat/default/{sid}/refresh"))
        .header("apikey", &tenant.api_key)
        .form(&[
            ("secureKey", ck.as_str()),
            ("userId", started["participant_id"].as_str().expect("pid")),
            ("alias", "nexus"),
            ("transcriptPosition", "1"),
        ])
        .send()
        .await
        .expect("v2 refresh")
        .json()
        .await
        .expect("v2 json");
    assert_eq!(v2["statusCode"], 0, "{v2}");
    let texts: Vec<&str> = v2["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["type"] == "Message")
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["hello", "hi Ann, how can I help?"]);
    assert_eq!(v2["nextPosition"], 5);

    // The customer uploads a file; the agent sees a FileUploaded entry and downloads the
    // bytes (on the two-edge system, from the other edge).
    let data = png(3000);
    let up: Value = http
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/files"))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .header("content-type", multipart_type())
        .body(file_part("screenshot.png", "image/png", &data))
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("upload json");
    let file_id = up["file_id"].as_str().expect("file_id").to_string();
    let uploaded = ws_until(&mut agent, WAIT, |v| transcript_frame(v, "FileUploaded")).await;
    assert_eq!(uploaded["position"], 5);
    assert_eq!(uploaded["data"]["file_id"], file_id.as_str());
    assert_eq!(uploaded["data"]["name"], "screenshot.png");
    let got = http
        .get(format!(
            "{agent_url}/v1/agent/conversations/{sid}/files/{file_id}"
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("agent download");
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "image/png");
    assert_eq!(got.bytes().await.expect("bytes").as_ref(), data.as_slice());

    // The agent sends a file (through its own edge); the customer sees it from the agent and
    // downloads it.
    let sent = png(2000);
    let up: Value = http
        .post(format!("{agent_url}/v1/agent/conversations/{sid}/files"))
        .bearer_auth(&token)
        .header("content-type", multipart_type())
        .body(file_part("plan.png", "image/png", &sent))
        .send()
        .await
        .expect("agent upload")
        .json()
        .await
        .expect("agent upload json");
    let agent_file = up["file_id"].as_str().expect("file_id").to_string();
    let shown = ws_until(&mut again, WAIT, |v| {
        transcript_frame(v, "FileUploaded") && v["from"]["kind"] == "agent"
    })
    .await;
    assert_eq!(shown["data"]["file_id"], agent_file.as_str());
    assert_eq!(shown["text"], "plan.png");
    let got = http
        .get(format!(
            "{url}/nexus/v3/chat/sessions/{sid}/files/{agent_file}"
        ))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .send()
        .await
        .expect("customer download");
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.expect("bytes").as_ref(), sent.as_slice());

    // User data, a read receipt and a custom notice reach the agent as transcript entries.
    let session_post = |path: &str, body: Value| {
        http.post(format!("{url}/nexus/v3/chat/sessions/{sid}/{path}"))
            .header("x-api-key", &tenant.api_key)
            .header("x-nexus-client-key", &ck)
            .json(&body)
            .send()
    };
    let r = session_post("user-data", json!({"user_data": {"lang": "fr"}}))
        .await
        .expect("user data");
    assert_eq!(r.status(), 202);
    let data = ws_until(&mut agent, WAIT, |v| transcript_frame(v, "UserDataUpdated")).await;
    assert_eq!(data["data"]["lang"], "fr");
    let r = session_post("read-receipt", json!({"position": 4}))
        .await
        .expect("receipt");
    assert_eq!(r.status(), 202);
    let read = ws_until(&mut agent, WAIT, |v| transcript_frame(v, "ReadReceipt")).await;
    assert_eq!(read["data"]["position"], "4");
    // Posted twice with its id (a retry after a lost answer): one notice.
    for _ in 0..2 {
        let r = session_post(
            "notices",
            json!({"text": "page: /pricing", "message_id": "n-1"}),
        )
        .await
        .expect("notice");
        assert_eq!(r.status(), 202);
    }
    let notice = ws_until(&mut agent, WAIT, |v| transcript_frame(v, "CustomNotice")).await;
    assert_eq!(notice["text"], "page: /pricing");
    let r = session_post("notices", json!({"text": "page: /checkout"}))
        .await
        .expect("notice");
    assert_eq!(r.status(), 202);
    let next = ws_until(&mut agent, WAIT, |v| transcript_frame(v, "CustomNotice")).await;
    assert_eq!(
        next["text"], "page: /checkout",
        "the retried notice came twice"
    );

    // The agent completes; the customer sees the end.
    ws_send(
        &mut agent,
        json!({"op": "complete", "conversation_id": sid, "disposition": "resolved"}),
    )
    .await;
    // The wrap-up code is the contact centre's, not the customer's.
    let left = ws_until(&mut again, WAIT, |v| {
        transcript_frame(v, "ParticipantLeft") && v["from"]["kind"] == "agent"
    })
    .await;
    assert!(left["data"].get("disposition").is_none(), "{left}");
    let closed = ws_until(&mut again, WAIT, |v| {
        v["type"] == "state" && v["state"] == "closed"
    })
    .await;
    assert_eq!(closed["reason"], "AGENT_COMPLETED");
    let after: Value = eventually(WAIT, "chat_ended", || {
        let http = http.clone();
        let (url, sid, key, ck) = (
            url.to_string(),
            sid.clone(),
            tenant.api_key.clone(),
            ck.clone(),
        );
        async move {
            let v: Value = http
                .get(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
                .header("x-api-key", key)
                .header("x-nexus-client-key", ck)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["chat_ended"] == true).then_some(v)
        }
    })
    .await;
    let hellos = after["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["text"] == "hello")
        .count();
    assert_eq!(hellos, 1, "a retried send must not be a second message");
    // An ended chat read in pages says so only on the last: a reader stops at `chat_ended`.
    let total = after["messages"].as_array().map_or(0, Vec::len);
    assert!(total > 2, "{after}");
    let mut from = 1;
    let mut paged = 0;
    loop {
        let page: Value = http
            .get(format!(
                "{url}/nexus/v3/chat/sessions/{sid}/messages?from={from}&limit=2"
            ))
            .header("x-api-key", &tenant.api_key)
            .header("x-nexus-client-key", &ck)
            .send()
            .await
            .expect("page")
            .json()
            .await
            .expect("page json");
        paged += page["messages"].as_array().map_or(0, Vec::len);
        if page["chat_ended"] == true {
            break;
        }
        assert!(paged <= total, "paged past the end: {page}");
        from = page["next_position"].as_u64().expect("next_position");
    }
    assert_eq!(
        paged, total,
        "pages up to `chat_ended` hold the whole transcript"
    );
    // Sending to an ended chat is refused.
    let r = http
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .json(&json!({"text": "anyone?"}))
        .send()
        .await
        .expect("send after end");
    assert_eq!(r.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_chat_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = base_env(dir.path());
    env.push((
        "NEXUS_BUS__URL",
        format!("embedded://{}", dir.path().join("bus").display()),
    ));
    let node = start_node(dir.path(), "dev", &["dev"], env).await;
    scenario(&node.url, &node.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_postgres_redis_chat_across_two_edges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = TwoEdges::start(dir.path(), Vec::new()).await;
    // The customer on edge A, the agent on edge B.
    scenario(&system.edge_a.url, &system.edge_b.url).await;
    // The edge marked the start in Redis; the worker dropped the mark once the record existed.
    assert_eq!(system.start_marks_left().await, Vec::<String>::new());
}

/// The same chat with the session store on a Redis Cluster (`NEXUS_TEST_REDIS_CLUSTER_URL`, as
/// `scripts/services.sh` starts it; skipped without it, unless `NEXUS_TEST_REQUIRE_TOOLS=1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_postgres_redis_cluster_chat_across_two_edges() {
    let nodes = match std::env::var("NEXUS_TEST_REDIS_CLUSTER_URL") {
        Ok(nodes) if !nodes.is_empty() => nodes,
        _ => {
            assert_ne!(
                std::env::var("NEXUS_TEST_REQUIRE_TOOLS").as_deref(),
                Ok("1"),
                "NEXUS_TEST_REDIS_CLUSTER_URL is required: scripts/services.sh start"
            );
            eprintln!("NEXUS_TEST_REDIS_CLUSTER_URL unset: not run");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let env = vec![
        ("NEXUS_STORES__REDIS_URL", nodes),
        ("NEXUS_STORES__REDIS_CLUSTER", "true".to_string()),
    ];
    let system = TwoEdges::start(dir.path(), env).await;
    scenario(&system.edge_a.url, &system.edge_b.url).await;
}

/// A reservation the worker took and never turned into an offer (its handler stopped between
/// the two) belongs to the conversation all the same: the customer's leaving frees the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frees_a_reservation_no_offer_was_made_for() {
    use nexus::stores::session::{Reserve, SessionStore};
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().expect("tempdir");
    let (system, _admin, tenant, store) = TwoEdges::with_tenant(dir.path(), Vec::new()).await;
    let url = system.edge_a.url.clone();
    let (sid, ck) = start_session(&url, &tenant.api_key, json!({"nickname": "Flo"})).await;
    // Queued: nobody is ready. The store then has an agent reserved for it, as a worker that
    // stopped right after its reserve leaves it (the record names no agent).
    eventually(WAIT, "the conversation is queued", || {
        let store = &store;
        let (t, sid) = (tenant.id.clone(), sid.clone());
        async move { store.conversation(&t, &sid).await.ok().flatten() }
    })
    .await;
    let capacity = BTreeMap::from([("chat".to_string(), 1)]);
    store
        .set_presence(&tenant.id, "ghost", false, &[], &capacity, 1)
        .await
        .expect("presence");
    store
        .set_presence(&tenant.id, "ghost", true, &[], &capacity, 1)
        .await
        .expect("presence");
    let reserve = Reserve {
        conversation_id: sid.clone(),
        media: "chat".into(),
        skills: Vec::new(),
        exclude: Vec::new(),
        only: Some("ghost".into()),
        now_ms: 2,
    };
    assert_eq!(
        store
            .reserve_agent(&tenant.id, &reserve)
            .await
            .expect("reserve")
            .as_deref(),
        Some("ghost")
    );
    disconnect(&url, &tenant.api_key, &sid, &ck).await;
    eventually(WAIT, "the ghost's slot is free again", || {
        let store = &store;
        let t = tenant.id.clone();
        async move {
            let p = store.presence(&t, "ghost").await.ok().flatten()?;
            (p.active.get("chat").copied().unwrap_or(0) == 0).then_some(())
        }
    })
    .await;
    assert!(store
        .slot_holders(&tenant.id, &sid)
        .await
        .expect("holders")
        .is_empty());
}

/// A queue entry of a closed conversation (a re-queue that lost its save to the close leaves
/// one) is removed by the next dispatch that meets it, instead of heading the queue forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_removes_queue_entries_of_closed_conversations() {
    use nexus::stores::session::{ConversationState, SessionStore};
    let dir = tempfile::tempdir().expect("tempdir");
    let (system, _admin, tenant, store) = TwoEdges::with_tenant(dir.path(), Vec::new()).await;
    let url = system.edge_a.url.clone();
    let (gone, ck) = start_session(&url, &tenant.api_key, json!({"nickname": "Hal"})).await;
    disconnect(&url, &tenant.api_key, &gone, &ck).await;
    eventually(WAIT, "the first chat is closed", || {
        let (store, t, id) = (&store, tenant.id.clone(), gone.clone());
        async move {
            let c = store.conversation(&t, &id).await.ok().flatten()?;
            (c.state == ConversationState::Closed).then_some(())
        }
    })
    .await;
    // Its stale entry, at the head of the queue (the highest priority, the oldest).
    store
        .enqueue(&tenant.id, &tenant.queue_id, &gone, 1_000, 1)
        .await
        .expect("enqueue");
    // A new customer waits (nobody is ready): its dispatch walks the queue from the head.
    let (waiting, _) = start_session(&url, &tenant.api_key, json!({"nickname": "Ida"})).await;
    let queue = eventually(WAIT, "the stale entry is gone", || {
        let (store, t, q) = (&store, tenant.id.clone(), tenant.queue_id.clone());
        let gone = gone.clone();
        async move {
            let ids = store.waiting(&t, &q, 100).await.ok()?;
            (!ids.contains(&gone) && !ids.is_empty()).then_some(ids)
        }
    })
    .await;
    assert_eq!(queue, [waiting]);
}

/// A ready agent deleted through the admin API takes no more offers: the routing state has it
/// not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_agent_is_not_ready_any_more() {
    use nexus::stores::session::SessionStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let (system, admin, tenant, store) = TwoEdges::with_tenant(dir.path(), Vec::new()).await;
    let url = system.edge_a.url.clone();
    let (agent, token) = provision_agent(&admin, &tenant, "Gil", 2).await;
    let mut gil = agent_ready(&url, &token).await;
    let ready = |want: bool| {
        let (store, t, a) = (&store, tenant.id.clone(), agent.clone());
        async move {
            let p = store.presence(&t, &a).await.ok().flatten()?;
            (p.ready == want).then_some(())
        }
    };
    eventually(WAIT, "the agent is ready", || ready(true)).await;
    // Gil holds a chat when he is deleted; Hal, ready since, gets it from the queue.
    let (sid, _) = start_session(&url, &tenant.api_key, json!({"nickname": "Ivy"})).await;
    let offer = ws_until(&mut gil, WAIT, |v| v["type"] == "offer").await;
    accept_offer(&mut gil, &sid, &offer).await;
    let (_, hal_token) = provision_agent(&admin, &tenant, "Hal", 2).await;
    let mut hal = agent_ready(&system.edge_b.url, &hal_token).await;
    let r = admin
        .http
        .delete(format!(
            "{url}/v1/admin/tenants/{}/agents/{agent}",
            tenant.id
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    eventually(WAIT, "the deleted agent is not ready", || ready(false)).await;
    let offer = ws_until(&mut hal, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], sid.as_str(), "{offer}");
    // A repeated DELETE (after a 503 AGENT_HANDBACK_PENDING) publishes the hand-back again:
    // the routing state knows the agent. An id it never knew, or another tenant's path, is
    // still 404.
    let delete = |tenant: String, agent: String| {
        let (http, url) = (admin.http.clone(), url.clone());
        async move {
            http.delete(format!("{url}/v1/admin/tenants/{tenant}/agents/{agent}"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .expect("delete")
                .status()
        }
    };
    assert_eq!(delete(tenant.id.clone(), agent.clone()).await, 204);
    assert_eq!(delete(tenant.id.clone(), "no-such-agent".into()).await, 404);
    let other = provision_tenant(&admin).await;
    assert_eq!(delete(other.id.clone(), agent.clone()).await, 404);
}

/// A live chat whose customer vanished (no request and no open stream for
/// `abandon_timeout_s`: a closed tab) closes as CUSTOMER_LEFT; a customer holding a stream open
/// on one edge, or making requests to both, keeps theirs open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_chat_whose_customer_vanished_closes() {
    use nexus::stores::session::{ConversationState, SessionStore};
    let dir = tempfile::tempdir().expect("tempdir");
    let abandon = (
        "NEXUS_WORKERS__CONVERSATION__ABANDON_TIMEOUT_S",
        "2".to_string(),
    );
    let (system, _admin, tenant, store) = TwoEdges::with_tenant(dir.path(), vec![abandon]).await;
    let (a, b) = (system.edge_a.url.clone(), system.edge_b.url.clone());
    let key = tenant.api_key.clone();
    let (streaming, ck) = start_session(&a, &key, json!({"nickname": "Ann"})).await;
    let mut ws = ws_connect(&format!(
        "{b}/nexus/v3/chat/sessions/{streaming}/stream?api_key={key}&client_key={ck}"
    ))
    .await;
    let (polling, polling_ck) = start_session(&a, &key, json!({"nickname": "Pat"})).await;
    let (gone, _) = start_session(&a, &key, json!({"nickname": "Gus"})).await;
    // The polling customer reads its transcript every 500 ms, from either edge in turn.
    let poller = tokio::spawn({
        let pat = Customer {
            url: a.clone(),
            api_key: key.clone(),
            sid: polling.clone(),
            ck: polling_ck,
        };
        let urls = [a.clone(), b.clone()];
        async move {
            for turn in 0.. {
                pat.transcript_at(&urls[turn % 2], "from=1").await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    // `None` until the worker has applied the start.
    let state = |id: &str| {
        let (store, t, id) = (&store, tenant.id.clone(), id.to_string());
        async move { store.conversation(&t, &id).await.expect("store") }
    };
    let closed = eventually(WAIT, "the vanished customer's chat is closed", || async {
        let c = state(&gone).await?;
        (c.state == ConversationState::Closed).then_some(c)
    })
    .await;
    assert_eq!(closed.closed_reason.as_deref(), Some("CUSTOMER_LEFT"));
    // Twice the timeout later, the two present customers' chats are still open.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for id in [&streaming, &polling] {
        let c = state(id).await.expect("record");
        assert_ne!(c.state, ConversationState::Closed, "{id}: {c:?}");
    }
    assert!(
        !poller.is_finished(),
        "the poller stopped: {:?}",
        poller.await
    );
    poller.abort();
    // The streaming customer saw no close on its socket.
    assert_no_close(&mut ws).await;
}

/// An SSE stream counts as the customer's sign of life only while it is open: a customer whose
/// stream was read for a while and then dropped (the tab closed) has its chat closed as
/// CUSTOMER_LEFT after the abandon timeout (the stream's task, running its key checks, once
/// outlived the connection until its next event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sse_stream_stops_counting_as_the_customer() {
    use nexus::stores::session::{ConversationState, SessionStore};
    let dir = tempfile::tempdir().expect("tempdir");
    let abandon = (
        "NEXUS_WORKERS__CONVERSATION__ABANDON_TIMEOUT_S",
        "2".to_string(),
    );
    let (system, _admin, tenant, store) = TwoEdges::with_tenant(dir.path(), vec![abandon]).await;
    let a = system.edge_a.url.clone();
    let key = tenant.api_key.clone();
    let (sid, ck) = start_session(&a, &key, json!({"nickname": "Sam"})).await;
    let response = reqwest::Client::new()
        .get(format!(
            "{a}/nexus/v3/chat/sessions/{sid}/events?api_key={key}&client_key={ck}"
        ))
        .send()
        .await
        .expect("sse");
    assert_eq!(response.status(), 200);
    let mut body = response;
    // Read for longer than the abandon timeout: the open stream keeps the chat.
    let read = tokio::time::timeout(Duration::from_secs(4), async {
        while body.chunk().await.expect("chunk").is_some() {}
    })
    .await;
    assert!(read.is_err(), "the stream ended early");
    let state = || {
        let (store, t, id) = (&store, tenant.id.clone(), sid.clone());
        async move { store.conversation(&t, &id).await.expect("store") }
    };
    assert_ne!(
        state().await.expect("record").state,
        ConversationState::Closed
    );
    drop(body);
    let closed = eventually(WAIT, "the chat of the dropped stream is closed", || async {
        let c = state().await?;
        (c.state == ConversationState::Closed).then_some(c)
    })
    .await;
    assert_eq!(closed.closed_reason.as_deref(), Some("CUSTOMER_LEFT"));
}

/// The stream shows no `closed` state within a moment.
async fn assert_no_close(ws: &mut Ws) {
    let seen = tokio::time::timeout(Duration::from_millis(300), async {
        ws_until(ws, WAIT, |v| v["type"] == "state" && v["state"] == "closed").await
    })
    .await;
    assert!(seen.is_err(), "the open stream's chat closed: {seen:?}");
}

/// The provisioning database unreachable for longer than `abandon_timeout_s`: the stream's
/// API-key rechecks fail (5xx), the stream stays open (README), and so does its chat: the
/// customer is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_keeps_its_chat_through_a_provisioning_outage() {
    use nexus::stores::session::{ConversationState, SessionStore};
    let dir = tempfile::tempdir().expect("tempdir");
    let env = vec![
        (
            "NEXUS_WORKERS__CONVERSATION__ABANDON_TIMEOUT_S",
            "2".to_string(),
        ),
        ("NEXUS_STORES__AUTH_CACHE_TTL_MS", "1000".to_string()),
    ];
    let (system, _admin, tenant, store) = TwoEdges::with_tenant(dir.path(), env).await;
    let (a, b) = (system.edge_a.url.clone(), system.edge_b.url.clone());
    let key = tenant.api_key.clone();
    let (sid, ck) = start_session(&a, &key, json!({"nickname": "Ann"})).await;
    let mut ws = ws_connect(&format!(
        "{b}/nexus/v3/chat/sessions/{sid}/stream?api_key={key}&client_key={ck}"
    ))
    .await;
    eventually(WAIT, "the worker applied the start", || async {
        store.conversation(&tenant.id, &sid).await.expect("store")
    })
    .await;
    // Key lookups now fail with a database error.
    system
        ._db
        .exec("ALTER TABLE api_keys RENAME TO api_keys_away");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c = store
        .conversation(&tenant.id, &sid)
        .await
        .expect("store")
        .expect("record");
    system
        ._db
        .exec("ALTER TABLE api_keys_away RENAME TO api_keys");
    assert_ne!(c.state, ConversationState::Closed, "{c:?}");
    assert_no_close(&mut ws).await;
}

/// A customer without a stream long-polls the transcript on another edge: the poll waits and
/// answers as soon as an entry past its position is there; with nothing new it answers an empty
/// page once its wait is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_answers_when_an_entry_arrives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (system, _admin, tenant, _store) = TwoEdges::with_tenant(dir.path(), Vec::new()).await;
    let (a, b) = (system.edge_a.url.clone(), system.edge_b.url.clone());
    let key = tenant.api_key.clone();
    let lou = Customer::start(&a, &key, "Lou").await;
    let poll = |url: String, q: String| {
        let lou = lou.clone();
        async move { lou.transcript_at(&url, &q).await }
    };
    // The customer's join is in the transcript once the worker applied the start.
    let next = eventually(WAIT, "the join is in the transcript", || {
        let read = poll(b.clone(), "from=1".into());
        async move {
            let page = read.await;
            let joined = page["messages"].as_array().is_some_and(|m| !m.is_empty());
            joined.then(|| page["next_position"].as_u64().expect("next_position"))
        }
    })
    .await;
    // Nothing new: the poll answers an empty page at the end of its wait.
    let started = std::time::Instant::now();
    let page = poll(b.clone(), format!("from={next}&wait_s=1")).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "did not wait"
    );
    assert_eq!(page["messages"], json!([]));
    assert_eq!(page["next_position"], next);
    // A message sent through the other edge ends a long wait.
    let waiting = tokio::spawn(poll(b.clone(), format!("from={next}&wait_s=30")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "answered with nothing new");
    // (`lou.url` is edge A.)
    lou.send("anyone there?").await;
    let page = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the poll answered in time")
        .expect("poll task");
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["anyone there?"], "{page}");
}

/// A conversation worker and two edges on their own NATS JetStream, a fresh PostgreSQL
/// database and Redis. Fields drop in order: processes first, then the broker and database.
struct TwoEdges {
    _worker: Node,
    edge_a: Node,
    edge_b: Node,
    redis_url: String,
    redis_namespace: String,
    _nats: OwnNats,
    _db: TestDb,
}

/// The customer leaves through the v3 API.
async fn disconnect(url: &str, api_key: &str, sid: &str, client_key: &str) {
    let r = reqwest::Client::new()
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/disconnect"))
        .header("x-api-key", api_key)
        .header("x-nexus-client-key", client_key)
        .send()
        .await
        .expect("disconnect");
    assert_eq!(r.status(), 202);
}

impl TwoEdges {
    /// A system with a provisioned tenant, and the session store it runs on, for tests that
    /// look into the routing state.
    async fn with_tenant(
        dir: &std::path::Path,
        extra_env: Vec<(&'static str, String)>,
    ) -> (
        TwoEdges,
        Admin,
        Tenant,
        nexus::stores::session::redis::RedisStore,
    ) {
        let system = TwoEdges::start(dir, extra_env).await;
        let admin = Admin::new(&system.edge_a.url);
        let tenant = provision_tenant(&admin).await;
        let store = nexus::stores::session::redis::RedisStore::connect_in(
            &system.redis_url,
            &system.redis_namespace,
        )
        .await
        .expect("redis");
        (system, admin, tenant, store)
    }

    async fn start(dir: &std::path::Path, extra_env: Vec<(&'static str, String)>) -> TwoEdges {
        let nats = OwnNats::start(dir).await;
        let db = TestDb::create().await;
        let mut env = base_env(dir);
        env.extend(extra_env);
        env.push(("NEXUS_BUS__URL", nats.url.clone()));
        env.push(("NEXUS_STORES__POSTGRES_URL", db.url.clone()));
        env.push(("NEXUS_STORES__PROVISIONING_KEY", "11".repeat(32)));
        // The test's own (a cluster's nodes), else the test Redis.
        let given = env
            .iter()
            .find(|(k, _)| *k == "NEXUS_STORES__REDIS_URL")
            .map(|(_, v)| v.clone());
        let redis_url = match given {
            Some(url) => url,
            None => {
                let url = std::env::var("NEXUS_TEST_REDIS_URL")
                    .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
                env.push(("NEXUS_STORES__REDIS_URL", url.clone()));
                url
            }
        };
        let redis_namespace = env
            .iter()
            .find(|(k, _)| *k == "NEXUS_STORES__REDIS_NAMESPACE")
            .map(|(_, v)| v.clone())
            .expect("a Redis namespace per test system");
        let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
        assert!(ok, "topology apply: {out} {err}");
        let worker = start_node(dir, "worker", &["worker", "conversation"], env.clone()).await;
        let edge_a = start_node(dir, "edge-a", &["edge"], env.clone()).await;
        let edge_b = start_node(dir, "edge-b", &["edge"], env).await;
        TwoEdges {
            _worker: worker,
            edge_a,
            edge_b,
            redis_url,
            redis_namespace,
            _nats: nats,
            _db: db,
        }
    }

    /// The chat start marks still in this system's Redis namespace.
    async fn start_marks_left(&self) -> Vec<String> {
        let client = redis::Client::open(self.redis_url.as_str()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        redis::cmd("KEYS")
            .arg(format!("{}:seen:chat-started:*", self.redis_namespace))
            .query_async(&mut conn)
            .await
            .expect("KEYS")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_postgres_redis_chat_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kafka = OwnKafka::start().await;
    let db = TestDb::create().await;
    let bus = format!("kafka://{}", kafka.brokers);
    let mut env = base_env(dir.path());
    env.push(("NEXUS_BUS__URL", bus.clone()));
    env.push(("NEXUS_BUS__KAFKA__SESSION_TIMEOUT_MS", "6000".into()));
    env.push(("NEXUS_STORES__POSTGRES_URL", db.url.clone()));
    env.push(("NEXUS_STORES__PROVISIONING_KEY", "33".repeat(32)));
    env.push((
        "NEXUS_STORES__REDIS_URL",
        std::env::var("NEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    ));
    let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &bus], &[]);
    assert!(ok, "topology apply: {out} {err}");
    let worker = start_node(
        dir.path(),
        "worker",
        &["worker", "conversation"],
        env.clone(),
    )
    .await;
    let edge = start_node(dir.path(), "edge", &["edge"], env).await;
    scenario(&edge.url, &edge.url).await;
    drop((worker, edge));
}

/// Retried starts with one request id are one chat: one offer, the same keys, whether the
/// retries race the first or come after it applied; another tenant's request id is its own;
/// a malformed request id is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_start_is_one_chat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(dir.path(), &[]).await;
    let url = node.url.as_str();
    let start = |api_key: String, request_id: &'static str| async move {
        let r = reqwest::Client::new()
            .post(format!("{url}/nexus/v3/chat/sessions"))
            .header("x-api-key", api_key)
            .json(&json!({"nickname": "Ann", "request_id": request_id}))
            .send()
            .await
            .expect("start");
        (r.status().as_u16(), r.json::<Value>().await.expect("json"))
    };
    let racing = futures::future::join_all(
        (0..4).map(|_| start(tenant.api_key.clone(), "retry-0123456789abcdef")),
    )
    .await;
    let (status, first) = racing[0].clone();
    assert_eq!(status, 201, "{first}");
    assert!(
        racing.iter().all(|r| r == &(201, first.clone())),
        "{racing:?}"
    );
    let sid = first["session_id"].as_str().expect("sid").to_string();

    // Queued with no agent; a ready agent with room for two gets one offer, not two.
    let (_, token) = provision_agent(&admin, &tenant, "alice", 2).await;
    let mut agent = agent_ready(url, &token).await;
    let offer = ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], sid.as_str());
    let second = tokio::time::timeout(
        Duration::from_secs(1),
        ws_until(&mut agent, WAIT, |v| v["type"] == "offer"),
    )
    .await;
    assert!(second.is_err(), "a second offer: {second:?}");
    assert_eq!(
        start(tenant.api_key.clone(), "retry-0123456789abcdef").await,
        (201, first.clone())
    );

    // Another tenant's start with the same request id is another chat.
    let other = provision_tenant(&admin).await;
    let (status, theirs) = start(other.api_key.clone(), "retry-0123456789abcdef").await;
    assert_eq!(status, 201, "{theirs}");
    assert_ne!(theirs["session_id"], first["session_id"]);

    let long: &'static str = "x".repeat(129).leak();
    for bad in [
        "",
        "short-guessable",
        "has space 0123456789",
        "é0123456789abcdef",
        long,
    ] {
        let (status, body) = start(tenant.api_key.clone(), bad).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("INVALID_FIELD")),
            "{bad:?}: {body}"
        );
    }
}

/// A `nexus dev` node in `dir` (the base env plus `extra`) and one provisioned tenant.
async fn dev(dir: &std::path::Path, extra: &[(&'static str, &str)]) -> (Node, Admin, Tenant) {
    let mut env = base_env(dir);
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let node = start_node(dir, "dev", &["dev"], env).await;
    let admin = Admin::new(&node.url);
    let tenant = provision_tenant(&admin).await;
    (node, admin, tenant)
}

/// WebSocket clients are pinged (`http.ws_ping_interval_ms`): one that answers nothing for three
/// intervals (a connection lost without a close) is dropped with 1001, customer stream and
/// agent desk alike, while one that reads (and so answers the pings) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_answers_no_ping_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) =
        dev(dir.path(), &[("NEXUS_HTTP__WS_PING_INTERVAL_MS", "200")]).await;
    let url = node.url.as_str();
    let customer = Customer::start(url, &tenant.api_key, "Kim").await;
    let stream = format!(
        "/nexus/v3/chat/sessions/{}/stream?api_key={}&client_key={}",
        customer.sid, tenant.api_key, customer.ck
    );
    let (_, token) = provision_agent(&admin, &tenant, "alice", 2).await;
    let desk = format!("/v1/agent/ws?token={token}");
    let host = url.trim_start_matches("http://");
    for path in [stream, desk] {
        let mut reading = ws_connect(&format!("{url}{path}")).await;
        // A client that never reads, on a raw connection: it answers no ping.
        let mut quiet = tokio::net::TcpStream::connect(host).await.expect("connect");
        let handshake = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        quiet
            .write_all(handshake.as_bytes())
            .await
            .expect("handshake");
        // Reading answers the pings (tungstenite sends the pong of each ping it reads).
        let closed = common::ws::close_within(&mut reading, Duration::from_millis(1_500)).await;
        assert!(
            closed.is_err(),
            "{path}: a client that answers was dropped: {closed:?}"
        );
        let mut bytes = Vec::new();
        tokio::time::timeout(WAIT, quiet.read_to_end(&mut bytes))
            .await
            .expect("the silent client is dropped")
            .expect("read");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("HTTP/1.1 101"), "{path}: {text}");
        // Server frames are unmasked: a ping is 0x89, the close 0x88 with code 1001 (0x03e9).
        let reason = b"no answer to pings";
        let mut close = vec![0x88, 2 + reason.len() as u8, 0x03, 0xe9];
        close.extend_from_slice(reason);
        assert!(
            bytes.windows(close.len()).any(|w| w == close.as_slice()),
            "{path}: no 1001 close in {text:?}"
        );
        assert!(
            bytes.windows(2).filter(|w| *w == [0x89, 0x00]).count() >= 2,
            "{path}: pinged before the close: {text:?}"
        );
    }
}

/// A customer stream opened after the chat closed (a reconnect that missed the live `closed`
/// push) gets the transcript and then the `closed` state, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_after_the_close_gets_the_closed_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, _admin, tenant) = dev(dir.path(), &[]).await;
    let url = node.url.as_str();
    let customer = Customer::start(url, &tenant.api_key, "Kim").await;
    let (sid, ck) = (customer.sid.clone(), customer.ck.clone());
    customer.send("anyone there?").await;
    disconnect(url, &tenant.api_key, &sid, &ck).await;
    let stream = |from: u64| {
        format!(
            "{url}/nexus/v3/chat/sessions/{sid}/stream?api_key={}&client_key={ck}&from={from}",
            tenant.api_key
        )
    };
    // The close is applied once the transcript ends with the customer's ParticipantLeft.
    let end = eventually(WAIT, "the close applied", || async {
        let t = customer.transcript_at(url, "from=1").await;
        let entries = t["messages"].as_array().cloned().unwrap_or_default();
        let last = entries.last()?;
        (last["kind"] == "ParticipantLeft").then(|| last["position"].as_u64())?
    })
    .await;
    let mut ws = ws_connect(&stream(1)).await;
    let mut positions = Vec::new();
    let closed = loop {
        let v = ws_until(&mut ws, WAIT, |_| true).await;
        if v["type"] == "state" {
            break v;
        }
        positions.push(v["position"].as_u64().expect("a transcript position"));
    };
    assert_eq!(
        positions,
        (1..=end).collect::<Vec<_>>(),
        "entries before the state"
    );
    assert_eq!(closed["state"], "closed", "{closed}");
    assert_eq!(closed["reason"], "CUSTOMER_LEFT", "{closed}");
    let again = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
    assert!(again.is_err(), "more after the close: {again:?}");
    // Resumed past the last entry: only the state.
    let mut ws = ws_connect(&stream(end + 1)).await;
    let first = ws_until(&mut ws, WAIT, |_| true).await;
    assert_eq!(first["state"], "closed", "{first}");
}

/// A stream on a chat the store no longer keeps (expired after its close) is told it closed
/// rather than left open on nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_an_expired_chat_gets_the_closed_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, _admin, tenant) = dev(
        dir.path(),
        &[("NEXUS_WORKERS__CONVERSATION__CLOSED_RETENTION_S", "1")],
    )
    .await;
    let url = node.url.as_str();
    let customer = Customer::start(url, &tenant.api_key, "Lee").await;
    let (sid, ck) = (customer.sid.clone(), customer.ck.clone());
    disconnect(url, &tenant.api_key, &sid, &ck).await;
    // Gone once the transcript reads empty (ended).
    eventually(WAIT, "the chat expired", || async {
        let t = customer.transcript_at(url, "from=1").await;
        let gone = t["chat_ended"] == true && t["messages"].as_array().is_some_and(Vec::is_empty);
        gone.then_some(())
    })
    .await;
    // From the start, and resumed past what it once had: told it closed either way.
    for from in [1, 3] {
        let mut ws = ws_connect(&format!(
            "{url}/nexus/v3/chat/sessions/{sid}/stream?api_key={}&client_key={ck}&from={from}",
            tenant.api_key
        ))
        .await;
        let first = ws_until(&mut ws, WAIT, |_| true).await;
        assert_eq!(first["state"], "closed", "from {from}: {first}");
        assert_eq!(first["reason"], Value::Null, "from {from}: {first}");
    }
}

/// A stream opened on a transcript longer than a store page sends all of it in order (the edge
/// reads it a page at a time), then the live entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sends_a_long_transcript_page_by_page_then_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, _admin, tenant) = dev(dir.path(), &[]).await;
    let url = node.url.as_str();
    let pam = Customer::start(url, &tenant.api_key, "Pam").await;
    let (sid, ck) = (pam.sid.clone(), pam.ck.clone());
    const SENT: u64 = 450;
    for i in 0..SENT {
        pam.send(&format!("m{i}")).await;
    }
    // The join and every message are in the transcript.
    let last = SENT + 1;
    eventually(WAIT, "the transcript holds every message", || async {
        let page = pam.transcript_at(url, &format!("from={last}")).await;
        (!page["messages"].as_array()?.is_empty()).then_some(())
    })
    .await;
    let mut ws = ws_connect(&format!(
        "{url}/nexus/v3/chat/sessions/{sid}/stream?api_key={}&client_key={ck}&from=1",
        tenant.api_key
    ))
    .await;
    let mut positions = Vec::new();
    while positions.last() != Some(&last) {
        let v = ws_until(&mut ws, WAIT, |v| v["type"] == "transcript").await;
        positions.push(v["position"].as_u64().expect("position"));
    }
    assert_eq!(positions, (1..=last).collect::<Vec<_>>());
    pam.send("live").await;
    let live = ws_until(&mut ws, WAIT, |v| v["type"] == "transcript").await;
    assert_eq!(live["position"], last + 1);
    assert_eq!(live["text"], "live");
}

/// Async chat: an idle customer gets a notice after `idle_timeout`, and the chat closes with
/// IDLE_TIMEOUT after `close_grace` unless the customer returns (which restarts the clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_chat_closes_when_idle_unless_the_customer_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, _admin, tenant) = dev(
        dir.path(),
        &[
            ("NEXUS_WORKERS__CONVERSATION__IDLE_TIMEOUT_S", "2"),
            ("NEXUS_WORKERS__CONVERSATION__CLOSE_GRACE_S", "2"),
        ],
    )
    .await;
    let url = node.url.as_str();
    let http = reqwest::Client::new();
    let (sid, ck) = start_session(
        url,
        &tenant.api_key,
        json!({"nickname": "Bea", "async": true}),
    )
    .await;
    let mut customer = ws_connect(&format!(
        "{url}/nexus/v3/chat/sessions/{sid}/stream?api_key={}&client_key={ck}",
        tenant.api_key
    ))
    .await;
    let notice = |v: &Value| v["type"] == "transcript" && v["kind"] == "Notice";
    let closed = |v: &Value| v["type"] == "state" && v["state"] == "closed";

    // Idle: the notice comes, then the customer returns within the grace.
    let first = ws_until(&mut customer, WAIT, notice).await;
    assert_eq!(first["from"]["kind"], "system");
    let r = http
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .json(&json!({"text": "still here"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    // An idle close the timer decided before the message (published behind it) is not applied.
    let stale_close = json!({
        "event_type": "ParticipantLeft",
        "tenant_id": tenant.id,
        "conversation_id": sid,
        "body": {"participant_id": "customer", "participant_kind": "CUSTOMER", "reason": "TIMEOUT"}
    });
    let r = http
        .post(format!("{url}/v1/events/nexus.inbound.v1"))
        .bearer_auth(ADMIN)
        .json(&stale_close)
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    // The first grace passes without a close (the message restarted the clock).
    let early = tokio::time::timeout(Duration::from_millis(2500), async {
        ws_until(&mut customer, WAIT, closed).await
    })
    .await;
    assert!(
        early.is_err(),
        "closed although the customer returned: {early:?}"
    );
    // Idle again: a second notice, then the close.
    let end = ws_until(&mut customer, WAIT, closed).await;
    assert_eq!(end["reason"], "IDLE_TIMEOUT");
}

/// An offer that lapses or is rejected goes to the next agent; the first is told it closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_and_rejected_offers_go_to_the_next_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(
        dir.path(),
        &[
            ("NEXUS_WORKERS__CONVERSATION__OFFER_TIMEOUT_MS", "1500"),
            // The first agent is asked again after its lapse (see the RONA test for the default).
            ("NEXUS_WORKERS__CONVERSATION__NOT_READY_ON_LAPSE", "false"),
        ],
    )
    .await;
    let url = node.url.as_str();
    let (_, t1) = provision_agent(&admin, &tenant, "first", 1).await;
    let mut first = agent_ready(url, &t1).await;
    // The second agent becomes ready later, so the first is the longest idle.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, t2) = provision_agent(&admin, &tenant, "second", 1).await;
    let mut second = agent_ready(url, &t2).await;
    let (_, t3) = provision_agent(&admin, &tenant, "third", 1).await;
    let mut third = agent_ready(url, &t3).await;

    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/nexus/v3/chat/sessions"))
        .header("x-api-key", &tenant.api_key)
        .json(&json!({"nickname": "Cy"}))
        .send()
        .await
        .expect("start");
    assert_eq!(r.status(), 201);
    // First: offered, ignored until it lapses.
    let offer = ws_until(&mut first, WAIT, |v| v["type"] == "offer").await;
    let lapsed = ws_until(&mut first, WAIT, |v| v["type"] == "offer_closed").await;
    assert_eq!(lapsed["offer_id"], offer["offer_id"]);
    assert_eq!(lapsed["reason"], "TIMEOUT");
    // Second: offered, rejects.
    let offer2 = ws_until(&mut second, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer2["conversation_id"], offer["conversation_id"]);
    assert_ne!(offer2["offer_id"], offer["offer_id"]);
    ws_send(
        &mut second,
        json!({"op": "reject", "conversation_id": offer2["conversation_id"], "offer_id": offer2["offer_id"]}),
    )
    .await;
    // Third: offered, accepts; a late accept by the first is refused.
    let offer3 = ws_until(&mut third, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer3["conversation_id"], offer["conversation_id"]);
    ws_send(
        &mut third,
        json!({"op": "accept", "conversation_id": offer3["conversation_id"], "offer_id": offer3["offer_id"]}),
    )
    .await;
    ws_until(&mut third, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
    ws_send(
        &mut first,
        json!({"op": "accept", "conversation_id": offer["conversation_id"], "offer_id": offer["offer_id"]}),
    )
    .await;
    let refused = ws_until(&mut first, WAIT, |v| v["type"] == "offer_closed").await;
    assert_eq!(refused["reason"], "not_current");
    // The first and second agents hold nothing; the third holds the chat.
    for (token, held) in [(&t1, 0), (&t2, 0), (&t3, 1)] {
        let me: Value = http
            .get(format!("{url}/v1/agent/me"))
            .bearer_auth(token)
            .send()
            .await
            .expect("me")
            .json()
            .await
            .expect("json");
        assert_eq!(me["active"]["chat"].as_u64().unwrap_or(0), held, "{me}");
    }
}

/// An agent who lets an offer lapse is set not ready (`NOT_RESPONDING`) before its slot frees,
/// told so on its socket, and offered nothing more (not even the chat waiting behind the lapsed
/// one) until it says ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_who_lets_an_offer_lapse_is_set_not_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(
        dir.path(),
        &[("NEXUS_WORKERS__CONVERSATION__OFFER_TIMEOUT_MS", "2000")],
    )
    .await;
    let url = node.url.as_str();
    let (away_id, away_token) = provision_agent(&admin, &tenant, "away", 1).await;
    let mut away = agent_ready(url, &away_token).await;
    let start = |nickname: &'static str| {
        let key = tenant.api_key.clone();
        async move {
            start_session(url, &key, json!({"nickname": nickname}))
                .await
                .0
        }
    };
    let first = start("Di").await;
    let offer = ws_until(&mut away, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], first.as_str());
    // A second chat waits behind the offer (the agent's one slot is taken by it).
    let second = start("Ed").await;
    let lapsed = ws_until(&mut away, WAIT, |v| v["type"] == "offer_closed").await;
    assert_eq!(lapsed["reason"], "TIMEOUT");
    let state = ws_until(&mut away, WAIT, |v| {
        v["type"] == "agent_state" && v["state"] == "not_ready"
    })
    .await;
    assert_eq!(state["reason_code"], "NOT_RESPONDING");
    let me = agent_me(url, &away_token).await.expect("me");
    assert_eq!(me["id"], away_id.as_str(), "{me}");
    assert_eq!(me["ready"], false, "{me}");
    // The freed slot does not take the waiting chat while the agent is away.
    let quiet = tokio::time::timeout(Duration::from_millis(2500), async {
        ws_until(&mut away, WAIT, |v| v["type"] == "offer").await
    })
    .await;
    assert!(quiet.is_err(), "offered while not ready: {quiet:?}");
    // Back at the desk: ready again, and the waiting chat is offered (the first not again:
    // this agent declined it by letting it lapse).
    ws_send(&mut away, json!({"op": "ready"})).await;
    let back = ws_until(&mut away, WAIT, |v| v["type"] == "agent_state").await;
    assert_eq!(back["state"], "ready");
    let offer = ws_until(&mut away, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], second.as_str());
}

/// A desk that reconnects misses nothing pushed while it had no socket: its `hello` lists the
/// offer made meanwhile (which would otherwise lapse), and the offer can be accepted from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_agent_socket_is_told_its_pending_offer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(dir.path(), &[]).await;
    let url = node.url.as_str();
    let (_, token) = provision_agent(&admin, &tenant, "desk", 2).await;
    let mut first = agent_ready(url, &token).await;
    first.close(None).await.expect("close");
    drop(first);
    let (sid, _) = start_session(url, &tenant.api_key, json!({"nickname": "Flo"})).await;
    let listed = eventually(WAIT, "the offer applied", || async {
        let list: Value = reqwest::Client::new()
            .get(format!("{url}/v1/agent/conversations"))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        list["items"]
            .as_array()?
            .iter()
            .find(|i| i["conversation_id"] == sid.as_str() && i["offer_id"].is_string())
            .cloned()
    })
    .await;
    let mut desk = ws_connect(&format!("{url}/v1/agent/ws?token={token}")).await;
    let hello = ws_until(&mut desk, WAIT, |v| v["type"] == "hello").await;
    let item = hello["conversations"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["conversation_id"] == sid.as_str()))
        .unwrap_or_else(|| panic!("the pending offer is not in {hello}"));
    assert_eq!(item["offer_id"], listed["offer_id"], "{hello}");
    assert!(item["expires_at"].as_i64().is_some(), "{hello}");
    ws_send(
        &mut desk,
        json!({"op": "accept", "conversation_id": sid, "offer_id": item["offer_id"]}),
    )
    .await;
    ws_until(&mut desk, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected" && v["conversation_id"] == sid.as_str()
    })
    .await;
    // A retried accept of the held chat changes nothing: no `offer_closed` before the reply
    // sent after it (the worker judges both in the conversation's order).
    ws_send(
        &mut desk,
        json!({"op": "accept", "conversation_id": sid, "offer_id": item["offer_id"]}),
    )
    .await;
    ws_send(
        &mut desk,
        json!({"op": "reply", "conversation_id": sid, "text": "after the retry"}),
    )
    .await;
    let seen = ws_until(&mut desk, WAIT, |v| {
        v["type"] == "offer_closed"
            || (transcript_frame(v, "Message") && v["text"] == "after the retry")
    })
    .await;
    assert_eq!(seen["type"], "transcript", "{seen}");
}

/// An agent's state may say why it is not ready and lower its capacity: its desk is told what
/// was applied, and routing keeps to the lower capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_state_carries_a_reason_and_a_lower_capacity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(dir.path(), &[]).await;
    let url = node.url.as_str();
    let (_, token) = provision_agent(&admin, &tenant, "Flo", 2).await;
    let mut desk = agent_ready(url, &token).await;
    let applied =
        |want: &'static str| move |v: &Value| v["type"] == "agent_state" && v["state"] == want;
    ws_send(
        &mut desk,
        json!({"op": "not_ready", "reason_code": "BREAK"}),
    )
    .await;
    let away = ws_until(&mut desk, WAIT, applied("not_ready")).await;
    assert_eq!(away["reason_code"], "BREAK");
    assert_eq!(away["capacity"], json!({"chat": 2}));
    ws_send(&mut desk, json!({"op": "ready", "capacity": {"chat": 1}})).await;
    let back = ws_until(&mut desk, WAIT, applied("ready")).await;
    assert_eq!(back["capacity"], json!({"chat": 1}));
    assert_eq!(back["reason_code"], Value::Null);
    // Two chats: one offered and accepted, the other waits for the one slot.
    for nickname in ["Gia", "Hal"] {
        start_session(url, &tenant.api_key, json!({"nickname": nickname})).await;
    }
    let offer = ws_until(&mut desk, WAIT, |v| v["type"] == "offer").await;
    ws_send(
        &mut desk,
        json!({"op": "accept", "conversation_id": offer["conversation_id"], "offer_id": offer["offer_id"]}),
    )
    .await;
    let more = tokio::time::timeout(Duration::from_millis(2500), async {
        ws_until(&mut desk, WAIT, |v| v["type"] == "offer").await
    })
    .await;
    assert!(
        more.is_err(),
        "offered above the lowered capacity: {more:?}"
    );
}

/// An admin's change of an agent's capacity applies at once: the desk is told, and a chat
/// waiting for a slot is offered, without the agent changing its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_agent_capacity_applies_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(dir.path(), &[]).await;
    let url = node.url.as_str();
    let (agent_id, token) = provision_agent(&admin, &tenant, "Ivo", 1).await;
    let mut desk = agent_ready(url, &token).await;
    let (first, _) = start_session(url, &tenant.api_key, json!({"nickname": "Jo"})).await;
    let offer = ws_until(&mut desk, WAIT, |v| v["type"] == "offer").await;
    ws_send(
        &mut desk,
        json!({"op": "accept", "conversation_id": first, "offer_id": offer["offer_id"]}),
    )
    .await;
    ws_until(&mut desk, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
    let (waiting, _) = start_session(url, &tenant.api_key, json!({"nickname": "Kim"})).await;
    let early = tokio::time::timeout(Duration::from_millis(1500), async {
        ws_until(&mut desk, WAIT, |v| v["type"] == "offer").await
    })
    .await;
    assert!(early.is_err(), "offered above capacity 1: {early:?}");
    admin
        .patch(
            &format!("/tenants/{}/agents/{agent_id}", tenant.id),
            json!({"capacity": {"chat": 2}}),
        )
        .await;
    let told = ws_until(&mut desk, WAIT, |v| v["type"] == "agent_state").await;
    assert_eq!(told["capacity"], json!({"chat": 2}));
    assert_eq!(told["state"], "ready", "readiness unchanged");
    let offer = ws_until(&mut desk, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], waiting.as_str());
    // The open socket takes the new profile at its next token check (a second at least): a
    // ready asking for the new capacity is acked there as over HTTP, not refused as over the
    // capacity the agent had when it connected; a request in a binary frame is answered too.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let request = json!({"op": "ready", "capacity": {"chat": 2}, "request_id": "cap-2"});
        let frame = WsMessage::Binary(request.to_string().into_bytes().into());
        futures::SinkExt::send(&mut desk, frame)
            .await
            .expect("send");
        let answer = ws_until(&mut desk, WAIT, |v| v["request_id"] == "cap-2").await;
        if answer["type"] == "ack" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// An agent offered the same conversation a second time (here by a transfer by name, after
/// letting the first offer lapse) can let that offer lapse too: it goes on to the next agent
/// instead of staying offered to the one who never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_offer_to_one_agent_lapses_like_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(
        dir.path(),
        &[
            ("NEXUS_WORKERS__CONVERSATION__OFFER_TIMEOUT_MS", "1000"),
            // Agents that let an offer lapse stay ready here, to be offered again.
            ("NEXUS_WORKERS__CONVERSATION__NOT_READY_ON_LAPSE", "false"),
        ],
    )
    .await;
    let url = node.url.as_str();
    let mut agents = Vec::new();
    for name in ["first", "second", "third"] {
        let (id, token) = provision_agent(&admin, &tenant, name, 1).await;
        agents.push((id, agent_ready(url, &token).await));
        // Each later one is less idle: offers go first, second, third.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::Client::new()
        .post(format!("{url}/nexus/v3/chat/sessions"))
        .header("x-api-key", &tenant.api_key)
        .json(&json!({"nickname": "Cy"}))
        .send()
        .await
        .expect("start");
    assert_eq!(r.status(), 201);
    // First and second let their offers lapse; third accepts.
    for (_, ws) in agents.iter_mut().take(2) {
        ws_until(ws, WAIT, |v| v["type"] == "offer").await;
        let lapsed = ws_until(ws, WAIT, |v| v["type"] == "offer_closed").await;
        assert_eq!(lapsed["reason"], "TIMEOUT");
    }
    let third = &mut agents[2].1;
    let offer = ws_until(third, WAIT, |v| v["type"] == "offer").await;
    let sid = offer["conversation_id"].clone();
    ws_send(
        third,
        json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    ws_until(third, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
    // Third hands the chat to second by name; second lets it lapse again.
    let second_id = agents[1].0.clone();
    let third = &mut agents[2].1;
    ws_send(
        third,
        json!({"op": "transfer", "conversation_id": sid, "agent_id": second_id}),
    )
    .await;
    let second = &mut agents[1].1;
    let again = ws_until(second, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(again["conversation_id"], sid);
    let lapsed = ws_until(second, WAIT, |v| v["type"] == "offer_closed").await;
    assert_eq!(lapsed["offer_id"], again["offer_id"]);
    assert_eq!(lapsed["reason"], "TIMEOUT");
    // The named target did not answer: the conversation's queue takes over, and first (the
    // only one who has not declined it since the transfer) is offered it.
    let next = ws_until(&mut agents[0].1, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(next["conversation_id"], sid);
}

/// The agent socket sends each transcript position of a conversation once: a push repeated on
/// the delivery topic (a redelivery, or the real push of an entry a gap fill already sent) is
/// dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_socket_sends_a_transcript_position_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(dir.path(), &[]).await;
    let url = node.url.as_str();
    let (agent_id, token) = provision_agent(&admin, &tenant, "ann", 1).await;
    let mut agent = agent_ready(url, &token).await;
    let (sid, ck) = start_session(url, &tenant.api_key, json!({"nickname": "Cy"})).await;
    let offer = ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await;
    ws_send(
        &mut agent,
        json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    // Connected before the customer writes: the inbound and agent topics are not ordered with
    // each other, and a message handled before the accept is not pushed to the agent (the
    // console reads the transcript when it accepts).
    ws_until(&mut agent, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
    let http = reqwest::Client::new();
    let send = |text: &'static str| {
        http.post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
            .header("x-api-key", &tenant.api_key)
            .header("x-nexus-client-key", &ck)
            .json(&json!({"text": text}))
            .send()
    };
    assert_eq!(send("one").await.expect("send").status(), 202);
    let one = ws_until(&mut agent, WAIT, |v| v["text"] == "one").await;
    // The same position again, as the delivery topic would carry a repeat.
    let repeat = json!({
        "event_type": "ClientEvent",
        "tenant_id": tenant.id,
        "conversation_id": sid,
        "body": {"to_customer": false, "to_agents": [agent_id], "kind": "TRANSCRIPT",
            "position": one["position"],
            "data": json!({"type": "transcript", "conversation_id": sid,
                "position": one["position"], "kind": "Message", "text": "repeat"}).to_string()}
    });
    // Then a marker the socket forwards as it is: seeing it proves ingested pushes reach it.
    let marker = json!({
        "event_type": "ClientEvent",
        "tenant_id": tenant.id,
        "conversation_id": sid,
        "body": {"to_customer": false, "to_agents": [agent_id], "kind": "STATE",
            "data": json!({"type": "state", "conversation_id": sid, "state": "marker"}).to_string()}
    });
    for body in [&repeat, &marker] {
        let r = http
            .post(format!("{url}/v1/events/nexus.delivery.v1"))
            .bearer_auth(ADMIN)
            .json(body)
            .send()
            .await
            .expect("ingest");
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    }
    let seen = ws_until(&mut agent, WAIT, |v| {
        v["state"] == "marker" || v["text"] == "repeat"
    })
    .await;
    assert_eq!(
        seen["state"], "marker",
        "the repeat reached the agent: {seen}"
    );
    assert_eq!(send("two").await.expect("send").status(), 202);
    let next = ws_until(&mut agent, WAIT, |v| v["type"] == "transcript").await;
    assert_eq!(next["text"], "two", "the repeat reached the agent: {next}");
}

/// A freed slot goes to the customer who has waited longest, not to one who arrives just
/// after it frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_slot_goes_to_the_longest_waiting_customer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(dir.path(), &[]).await;
    let url = node.url.as_str();
    let (_, token) = provision_agent(&admin, &tenant, "solo", 1).await;
    let mut agent = agent_ready(url, &token).await;
    let start = |name: &'static str| {
        let key = tenant.api_key.clone();
        async move { start_session(url, &key, json!({"nickname": name})).await.0 }
    };
    let first = start("first").await;
    let offer = ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], first.as_str());
    ws_send(
        &mut agent,
        json!({"op": "accept", "conversation_id": first, "offer_id": offer["offer_id"]}),
    )
    .await;
    ws_until(&mut agent, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
    // The second waits: the only agent is busy.
    let waiting = start("waiting").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws_send(
        &mut agent,
        json!({"op": "complete", "conversation_id": first}),
    )
    .await;
    ws_until(&mut agent, WAIT, |v| {
        v["type"] == "state" && v["state"] == "closed"
    })
    .await;
    // A third arrives as the slot frees: the waiting one is offered it.
    let late = start("late").await;
    let offer = ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(
        offer["conversation_id"],
        waiting.as_str(),
        "the slot went to the later arrival {late}"
    );
}

/// A rotated agent token ends the sockets opened with it, not only its next HTTP call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_agent_token_closes_its_open_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) =
        dev(dir.path(), &[("NEXUS_STORES__AUTH_CACHE_TTL_MS", "1000")]).await;
    let url = node.url.as_str();
    let (id, token) = provision_agent(&admin, &tenant, "leaky", 1).await;
    let mut ws = agent_ready(url, &token).await;
    admin
        .post(
            &format!("/tenants/{}/agents/{id}/token", tenant.id),
            json!({}),
        )
        .await;
    let closed = common::ws::close_within(&mut ws, Duration::from_secs(10))
        .await
        .expect("the socket stays open with a revoked token");
    assert_eq!(closed.map(|f| u16::from(f.code)), Some(4001));
}

/// Transfers: to a named agent (only that agent is offered), to another queue, and a refused
/// transfer to a queue that does not exist; the customer sees who left and joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_an_agent_and_to_a_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(dir.path(), &[]).await;
    let url = node.url.as_str();
    let billing = admin
        .post(
            &format!("/tenants/{}/queues", tenant.id),
            json!({"name": "billing"}),
        )
        .await;
    let (_, a_token) = provision_agent(&admin, &tenant, "alice", 1).await;
    let mut alice = agent_ready(url, &a_token).await;
    let (b_id, b_token) = provision_agent(&admin, &tenant, "bob", 1).await;
    let mut bob = agent_ready(url, &b_token).await;
    let (c_id, c_token) = provision_agent(&admin, &tenant, "carol", 1).await;
    let mut carol = agent_ready(url, &c_token).await;

    let http = reqwest::Client::new();
    let (sid, ck) = start_session(url, &tenant.api_key, json!({"nickname": "Dee"})).await;
    let mut customer = ws_connect(&format!(
        "{url}/nexus/v3/chat/sessions/{sid}/stream?api_key={}&client_key={ck}",
        tenant.api_key
    ))
    .await;
    // Alice is the longest idle: she gets it and accepts.
    let offer = ws_until(&mut alice, WAIT, |v| v["type"] == "offer").await;
    accept_offer(&mut alice, &sid, &offer).await;

    // A queue that does not exist: refused, Alice keeps the chat.
    ws_send(&mut alice, json!({"op": "transfer", "conversation_id": sid, "queue_id": "01a21399-0000-7000-8000-000000000000"})).await;
    let failed = ws_until(&mut alice, WAIT, |v| v["type"] == "transfer_failed").await;
    assert_eq!(failed["reason"], "QUEUE_NOT_FOUND");
    // An agent who is not ready (never signed in): refused, Alice keeps the chat.
    let (d_id, _) = provision_agent(&admin, &tenant, "dan", 1).await;
    ws_send(
        &mut alice,
        json!({"op": "transfer", "conversation_id": sid, "agent_id": d_id}),
    )
    .await;
    let failed = ws_until(&mut alice, WAIT, |v| v["type"] == "transfer_failed").await;
    assert_eq!(failed["reason"], "AGENT_NOT_AVAILABLE");
    assert_eq!(failed["target_id"], d_id.as_str());
    // Ready but taking no chats (capacity 0): refused too; then Bob takes chats again.
    let capacity = |n: u32| {
        move |v: &Value| v["type"] == "agent_state" && v["capacity"] == json!({ "chat": n })
    };
    ws_send(&mut bob, json!({"op": "ready", "capacity": {"chat": 0}})).await;
    ws_until(&mut bob, WAIT, capacity(0)).await;
    ws_send(
        &mut alice,
        json!({"op": "transfer", "conversation_id": sid, "agent_id": b_id}),
    )
    .await;
    let failed = ws_until(&mut alice, WAIT, |v| v["type"] == "transfer_failed").await;
    assert_eq!(failed["reason"], "AGENT_NOT_AVAILABLE");
    ws_send(&mut bob, json!({"op": "ready", "capacity": {"chat": 1}})).await;
    ws_until(&mut bob, WAIT, capacity(1)).await;

    // To Carol by name (Bob is idle longer, but only Carol may be offered).
    ws_send(
        &mut alice,
        json!({"op": "transfer", "conversation_id": sid, "agent_id": c_id}),
    )
    .await;
    ws_until(&mut alice, WAIT, |v| {
        v["type"] == "state" && v["state"] == "transferred"
    })
    .await;
    let left = ws_until(&mut customer, WAIT, |v| {
        v["type"] == "transcript" && v["kind"] == "ParticipantLeft"
    })
    .await;
    assert_eq!(left["from"]["nickname"], "alice");
    let offer = ws_until(&mut carol, WAIT, |v| v["type"] == "offer").await;
    ws_send(
        &mut carol,
        json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    let joined = ws_until(&mut customer, WAIT, |v| {
        v["type"] == "transcript"
            && v["kind"] == "ParticipantJoined"
            && v["from"]["kind"] == "agent"
    })
    .await;
    assert_eq!(joined["from"]["nickname"], "carol");
    // Alice, gone, can no longer type into it; Carol can (shown by her name).
    for ws in [&mut alice, &mut carol] {
        ws_send(
            ws,
            json!({"op": "typing", "conversation_id": sid, "state": "started"}),
        )
        .await;
    }
    let typing = ws_until(&mut customer, WAIT, |v| {
        transcript_frame(v, "TypingStarted")
    })
    .await;
    assert_eq!(typing["from"]["nickname"], "carol", "{typing}");

    // To the billing queue: Bob (idle, never declined) is offered; Carol is not offered it back.
    ws_send(
        &mut carol,
        json!({"op": "transfer", "conversation_id": sid, "queue_id": billing["id"]}),
    )
    .await;
    ws_until(&mut carol, WAIT, |v| {
        v["type"] == "state" && v["state"] == "transferred"
    })
    .await;
    let offer = ws_until(&mut bob, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["queue_id"], billing["id"]);
    ws_send(
        &mut bob,
        json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    let joined = ws_until(&mut customer, WAIT, |v| {
        v["type"] == "transcript"
            && v["kind"] == "ParticipantJoined"
            && v["from"]["kind"] == "agent"
    })
    .await;
    assert_eq!(joined["from"]["nickname"], "bob");
    // Alice and Carol hold nothing; Bob holds the chat.
    for (token, held) in [(&a_token, 0), (&c_token, 0), (&b_token, 1)] {
        let me: Value = http
            .get(format!("{url}/v1/agent/me"))
            .bearer_auth(token)
            .send()
            .await
            .expect("me")
            .json()
            .await
            .expect("json");
        assert_eq!(me["active"]["chat"].as_u64().unwrap_or(0), held, "{me}");
    }
}

/// A transfer accepted for a named agent who is busy waits for that agent only; once the agent
/// goes not ready, the chat falls back to its queue (not to the agent who handed it over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_to_an_agent_who_goes_not_ready_falls_back_to_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(
        dir.path(),
        &[("NEXUS_WORKERS__CONVERSATION__REQUEUE_INTERVAL_MS", "200")],
    )
    .await;
    let url = node.url.as_str();
    let (_, a_token) = provision_agent(&admin, &tenant, "alice", 1).await;
    let mut alice = agent_ready(url, &a_token).await;
    let (b_id, b_token) = provision_agent(&admin, &tenant, "bob", 1).await;
    let mut bob = agent_ready(url, &b_token).await;
    let accept = |offer: &Value| json!({"op": "accept", "conversation_id": offer["conversation_id"], "offer_id": offer["offer_id"]});
    // Alice (idle longest) takes the first chat, Bob the second: both are full.
    let (first, _) = start_session(url, &tenant.api_key, json!({"nickname": "Ida"})).await;
    let offer = ws_until(&mut alice, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], first.as_str());
    ws_send(&mut alice, accept(&offer)).await;
    ws_until(&mut alice, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
    start_session(url, &tenant.api_key, json!({"nickname": "Jo"})).await;
    let offer = ws_until(&mut bob, WAIT, |v| v["type"] == "offer").await;
    ws_send(&mut bob, accept(&offer)).await;
    ws_until(&mut bob, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
    // Carol signs in free; Alice hands the first chat to Bob by name, who is ready but full.
    let (_, c_token) = provision_agent(&admin, &tenant, "carol", 1).await;
    let mut carol = agent_ready(url, &c_token).await;
    ws_send(
        &mut alice,
        json!({"op": "transfer", "conversation_id": first, "agent_id": b_id}),
    )
    .await;
    ws_until(&mut alice, WAIT, |v| {
        v["type"] == "state" && v["state"] == "transferred"
    })
    .await;
    // Only Bob may be offered it while he is ready: Carol, free, is not (several queued timers).
    let early = tokio::time::timeout(Duration::from_millis(1500), async {
        ws_until(&mut carol, WAIT, |v| v["type"] == "offer").await
    })
    .await;
    assert!(early.is_err(), "offered past the named agent: {early:?}");
    // Bob goes not ready: the chat goes to the queue's free agent, Carol.
    ws_send(&mut bob, json!({"op": "not_ready", "reason_code": "BREAK"})).await;
    let offer = ws_until(&mut carol, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], first.as_str());
    ws_send(&mut carol, accept(&offer)).await;
    ws_until(&mut carol, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
    let me = agent_me(url, &c_token).await.expect("me");
    assert_eq!(me["active"]["chat"].as_u64(), Some(1), "{me}");
}

/// Provisions a bot "Botty" at `bot_url` (credential `bot-secret`) and a routing rule giving
/// web chats to it first; the bot as created (with its API token).
async fn bot_first_rule(admin: &Admin, tenant: &Tenant, bot_url: &str) -> Value {
    let bot = admin
        .post(
            &format!("/tenants/{}/bots", tenant.id),
            json!({"name": "Botty", "url": bot_url, "credential": "bot-secret"}),
        )
        .await;
    admin
        .post(
            &format!("/tenants/{}/routing-rules", tenant.id),
            json!({"channel": "WEB_CHAT", "queue_id": tenant.queue_id, "priority": 10, "bot_id": bot["id"]}),
        )
        .await;
    bot
}

/// Bots on loopback, as these tests run them (refused otherwise: an internal address).
const PRIVATE_BOTS: (&str, &str) = ("NEXUS_WORKERS__CONVERSATION__ALLOW_PRIVATE_BOTS", "true");

/// A bot endpoint on loopback: checks the signature, echoes, hands off on "agent please".
async fn start_bot(credential: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    use axum::http::{HeaderMap, StatusCode};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    async fn turn(
        axum::extract::State(credential): axum::extract::State<&'static str>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> (StatusCode, axum::Json<Value>) {
        // Standard Webhooks: HMAC-SHA256 of "{id}.{timestamp}.{body}" under the credential,
        // the timestamp within five minutes of now (a replayed call is refused).
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
        let fresh = timestamp
            .parse::<i64>()
            .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(credential.as_bytes()).expect("key");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(&body);
        let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        if !fresh || id != header("idempotency-key") || header("webhook-signature") != expected {
            return (StatusCode::UNAUTHORIZED, axum::Json(json!({})));
        }
        let request: Value = serde_json::from_slice(&body).expect("json");
        let text = request["message"]["text"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let answer = if text == "agent please" {
            json!({"replies": [{"text": "Passing you to a human."}],
                   "handoff": {"user_data": {"intent": "billing"}}})
        } else {
            json!({"replies": [{"text": format!("Bot: {text}")}]})
        };
        (StatusCode::OK, axum::Json(answer))
    }
    let app = axum::Router::new()
        .route("/bot", axum::routing::post(turn))
        .with_state(credential);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/bot", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, server)
}

/// Bot first: the bot answers the customer (signed calls), hands off to the queue with context,
/// and a bot that is down hands the next chat to the queue at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_first_then_handoff_and_fallback_when_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(dir.path(), &[PRIVATE_BOTS]).await;
    let url = node.url.as_str();
    let (bot_url, bot_server) = start_bot("bot-secret").await;
    bot_first_rule(&admin, &tenant, &bot_url).await;
    let (_, token) = provision_agent(&admin, &tenant, "alice", 2).await;
    let mut agent = agent_ready(url, &token).await;
    let http = reqwest::Client::new();
    let start = |text: &'static str| {
        let http = http.clone();
        let (url, key) = (url.to_string(), tenant.api_key.clone());
        async move {
            let v: Value = http
                .post(format!("{url}/nexus/v3/chat/sessions"))
                .header("x-api-key", &key)
                .json(&json!({"nickname": "Eve", "text": text}))
                .send()
                .await
                .expect("start")
                .json()
                .await
                .expect("json");
            let sid = v["session_id"].as_str().expect("sid").to_string();
            let ck = v["client_key"].as_str().expect("key").to_string();
            let ws = ws_connect(&format!(
                "{url}/nexus/v3/chat/sessions/{sid}/stream?api_key={key}&client_key={ck}"
            ))
            .await;
            (sid, ck, ws)
        }
    };
    let from_bot = |v: &Value| v["type"] == "transcript" && v["from"]["kind"] == "bot";

    let (sid, ck, mut customer) = start("hello").await;
    let reply = ws_until(&mut customer, WAIT, from_bot).await;
    assert_eq!(reply["text"], "Bot: hello");
    assert_eq!(reply["from"]["nickname"], "Botty");
    // With the bot, nobody is offered the chat.
    let early = tokio::time::timeout(Duration::from_millis(500), async {
        ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await
    })
    .await;
    assert!(early.is_err(), "offered while with the bot: {early:?}");

    // A send retried with its message id goes to the bot once: the bot answers once, and its
    // next reply is to the next message.
    for _ in 0..2 {
        let r = http
            .post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
            .header("x-api-key", &tenant.api_key)
            .header("x-nexus-client-key", &ck)
            .json(&json!({"text": "again?", "message_id": "m-again"}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 202);
    }
    let reply = ws_until(&mut customer, WAIT, from_bot).await;
    assert_eq!(reply["text"], "Bot: again?");

    let r = http
        .post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
        .header("x-api-key", &tenant.api_key)
        .header("x-nexus-client-key", &ck)
        .json(&json!({"text": "agent please"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    let reply = ws_until(&mut customer, WAIT, from_bot).await;
    assert_eq!(
        reply["text"], "Passing you to a human.",
        "the retried send reached the bot twice"
    );
    let offer = ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], sid.as_str());
    assert_eq!(offer["user_data"]["intent"], "billing", "{offer}");
    assert_eq!(offer["queue_id"], tenant.queue_id.as_str());

    // The bot goes down: the next chat goes to the queue with a notice.
    bot_server.abort();
    let _ = bot_server.await;
    let (sid2, _, mut customer2) = start("anyone?").await;
    let notice = ws_until(&mut customer2, WAIT, |v| {
        v["type"] == "transcript" && v["kind"] == "Notice"
    })
    .await;
    assert_eq!(notice["text"], "Connecting you to an agent.");
    let offer = ws_until(&mut agent, WAIT, |v| {
        v["type"] == "offer" && v["conversation_id"] == sid2.as_str()
    })
    .await;
    assert_eq!(offer["queue_id"], tenant.queue_id.as_str());
}

/// `bot_fallback = "retry"` on `nexus dev`: with the bot down the chat stays with it (no
/// notice, no offer); the worker's timer tries the turn again, and once the bot is up the
/// customer gets its answers to the first message and to the one sent meanwhile, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_bot_is_retried_and_answers_in_order() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(
        dir.path(),
        &[
            ("NEXUS_WORKERS__CONVERSATION__BOT_FALLBACK", "retry"),
            PRIVATE_BOTS,
        ],
    )
    .await;
    let url = node.url.as_str();
    let up = Arc::new(AtomicBool::new(false));
    let flag = up.clone();
    let app = axum::Router::new().route(
        "/bot",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let up = flag.load(Ordering::SeqCst);
            async move {
                if !up {
                    return (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(json!({})),
                    );
                }
                let text = body["message"]["text"].as_str().unwrap_or("").to_string();
                let answer = json!({"replies": [{"text": format!("Bot: {text}")}]});
                (axum::http::StatusCode::OK, axum::Json(answer))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let bot_url = format!("http://{}/bot", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    bot_first_rule(&admin, &tenant, &bot_url).await;
    let (_, token) = provision_agent(&admin, &tenant, "alice", 2).await;
    let mut agent = agent_ready(url, &token).await;
    let customer = Customer::start(url, &tenant.api_key, "Eve").await;
    let mut stream = ws_connect(&format!(
        "{url}/nexus/v3/chat/sessions/{}/stream?api_key={}&client_key={}",
        customer.sid, tenant.api_key, customer.ck
    ))
    .await;
    customer.send("first").await;
    customer.send("second").await;
    ws_until(&mut stream, WAIT, |v| v["text"] == "second").await;
    // Down: no answer, no fallback notice, nobody offered the chat.
    let early = tokio::time::timeout(Duration::from_secs(3), async {
        ws_until(&mut stream, WAIT, |v| {
            v["from"]["kind"] == "bot" || v["kind"] == "Notice"
        })
        .await
    })
    .await;
    assert!(
        early.is_err(),
        "answered or fell back while down: {early:?}"
    );
    let offered = tokio::time::timeout(Duration::from_millis(200), async {
        ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await
    })
    .await;
    assert!(offered.is_err(), "offered while with the bot: {offered:?}");

    up.store(true, Ordering::SeqCst);
    let from_bot = |v: &Value| v["type"] == "transcript" && v["from"]["kind"] == "bot";
    let one = ws_until(&mut stream, Duration::from_secs(60), from_bot).await;
    let two = ws_until(&mut stream, WAIT, from_bot).await;
    assert_eq!(
        (one["text"].as_str(), two["text"].as_str()),
        (Some("Bot: first"), Some("Bot: second"))
    );
    assert!(one["position"].as_u64() < two["position"].as_u64());
}

/// The bot API: a bot-first conversation's bot posts later (not in a turn's answer), a retried
/// post with the same `message_id` is one message, the bot hands off with context, and after
/// the handoff the bot can no longer post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_posts_and_hands_off_through_the_bot_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, admin, tenant) = dev(dir.path(), &[PRIVATE_BOTS]).await;
    let url = node.url.as_str();
    let (bot_url, _bot_server) = start_bot("bot-secret").await;
    let bot = bot_first_rule(&admin, &tenant, &bot_url).await;
    let bot_token = bot["token"].as_str().expect("bot token").to_string();
    assert!(bot_token.starts_with("nxb_"), "{bot}");
    let (_, token) = provision_agent(&admin, &tenant, "alice", 2).await;
    let mut agent = agent_ready(url, &token).await;
    let http = reqwest::Client::new();
    let (sid, ck) = start_session(
        url,
        &tenant.api_key,
        json!({"nickname": "Eve", "text": "hello"}),
    )
    .await;
    let mut customer = ws_connect(&format!(
        "{url}/nexus/v3/chat/sessions/{sid}/stream?api_key={}&client_key={ck}",
        tenant.api_key
    ))
    .await;
    let from_bot = |v: &Value| v["type"] == "transcript" && v["from"]["kind"] == "bot";
    // The synchronous answer still works.
    let reply = ws_until(&mut customer, WAIT, from_bot).await;
    assert_eq!(reply["text"], "Bot: hello");

    let bot_post = |path: &'static str, body: Value| {
        let (http, url, sid, bot_token) = (
            http.clone(),
            url.to_string(),
            sid.clone(),
            bot_token.clone(),
        );
        async move {
            let r = http
                .post(format!("{url}/v1/bot/conversations/{sid}/{path}"))
                .bearer_auth(&bot_token)
                .json(&body)
                .send()
                .await
                .expect("bot api");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // The conversation is known to the bot API once the turn that introduced it is applied.
    eventually(WAIT, "conversation known to the bot API", || {
        let (http, url, sid, bot_token) = (
            http.clone(),
            url.to_string(),
            sid.clone(),
            bot_token.clone(),
        );
        async move {
            let r = http
                .get(format!("{url}/v1/bot/conversations/{sid}/messages"))
                .bearer_auth(&bot_token)
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;
    // Later, on its own: the customer sees it as the bot's.
    let (status, body) = bot_post(
        "messages",
        json!({"text": "Still there?", "message_id": "b-1"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let b1 = body["message_id"].as_str().expect("message id").to_string();
    let later = ws_until(&mut customer, WAIT, from_bot).await;
    assert_eq!(later["text"], "Still there?");
    assert_eq!(later["message_id"], b1.as_str());
    assert_eq!(later["from"]["nickname"], "Botty");
    // A retry is not a second message (the next post is applied after it, in order).
    let (status, body) = bot_post(
        "messages",
        json!({"text": "Still there?", "message_id": "b-1"}),
    )
    .await;
    assert_eq!(
        (status, body["message_id"].as_str()),
        (202, Some(b1.as_str()))
    );
    let (status, _) = bot_post("messages", json!({"text": "Take your time."})).await;
    assert_eq!(status, 202);
    let next = ws_until(&mut customer, WAIT, from_bot).await;
    assert_eq!(
        next["text"], "Take your time.",
        "the retry showed again: {next}"
    );
    let transcript: Value = http
        .get(format!("{url}/v1/bot/conversations/{sid}/messages"))
        .bearer_auth(&bot_token)
        .send()
        .await
        .expect("transcript")
        .json()
        .await
        .expect("json");
    let messages = transcript["messages"].as_array().expect("messages");
    let copies = messages
        .iter()
        .filter(|m| m["message_id"] == b1.as_str())
        .count();
    assert_eq!(copies, 1, "{transcript}");
    assert!(
        messages.iter().any(|m| m["text"] == "hello"),
        "{transcript}"
    );

    // Nobody was offered the chat while with the bot; the handoff offers it with the context.
    let early = tokio::time::timeout(Duration::from_millis(300), async {
        ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await
    })
    .await;
    assert!(early.is_err(), "offered while with the bot: {early:?}");
    let (status, body) = bot_post("handoff", json!({"user_data": {"intent": "sales"}})).await;
    assert_eq!(status, 202, "{body}");
    let offer = ws_until(&mut agent, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["conversation_id"], sid.as_str());
    assert_eq!(offer["user_data"]["intent"], "sales", "{offer}");
    assert_eq!(offer["queue_id"], tenant.queue_id.as_str());

    // Handed off: the bot cannot post or hand off again.
    let (status, body) = bot_post("messages", json!({"text": "me again"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("HANDED_OFF")),
        "{body}"
    );
    let (status, body) = bot_post("handoff", json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("HANDED_OFF")),
        "{body}"
    );
    // A bot post that passed the edge before the handoff but reaches the worker after it is
    // dropped there: publish one straight onto the agent topic, then the agent takes over.
    let late = json!({
        "event_type": "MessageSent",
        "tenant_id": tenant.id,
        "conversation_id": sid,
        "body": {
            "message_id": uuid::Uuid::now_v7().to_string(),
            "participant_id": bot["id"],
            "participant_kind": "BOT",
            "nickname": "Botty",
            "kind": "TEXT",
            "text": "too late"
        }
    });
    let r = http
        .post(format!("{url}/v1/events/nexus.agent.v1"))
        .bearer_auth(ADMIN)
        .json(&late)
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    ws_send(
        &mut agent,
        json!({"op": "accept", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    ws_send(
        &mut agent,
        json!({"op": "reply", "conversation_id": sid, "text": "agent here"}),
    )
    .await;
    let next = ws_until(&mut customer, WAIT, |v| {
        transcript_frame(v, "Message") && v["from"]["kind"] != "customer"
    })
    .await;
    assert_eq!(
        next["text"], "agent here",
        "the late bot post was applied: {next}"
    );
}

/// The owner invites `agent_id` as consultant over the agent WebSocket.
async fn invite(owner: &mut Ws, sid: &str, agent_id: &str) {
    ws_send(
        owner,
        json!({"op": "consult", "conversation_id": sid, "agent_id": agent_id, "request_id": "c"}),
    )
    .await;
    let ack = ws_until(owner, WAIT, |v| v["request_id"] == "c").await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

/// Short enough that the consult test sees an invitation lapse, long enough for a loaded machine.
fn consult_timeout_env() -> (&'static str, String) {
    (
        "NEXUS_WORKERS__CONVERSATION__OFFER_TIMEOUT_MS",
        "4000".into(),
    )
}

/// A chat that Alice (ready on `url`) accepted, with Bob ready on `other` and the customer's
/// socket open: where both consult scenarios start.
struct Consulting {
    tenant: Tenant,
    a_token: String,
    alice: Ws,
    b_id: String,
    b_token: String,
    bob: Ws,
    sid: String,
    ck: String,
    customer: Ws,
    /// The customer's stream URL.
    stream: String,
    http: reqwest::Client,
}

impl Consulting {
    async fn start(url: &str, other: &str, session: Value) -> Consulting {
        let admin = Admin::new(url);
        let tenant = provision_tenant(&admin).await;
        let (_, a_token) = provision_agent(&admin, &tenant, "alice", 1).await;
        let mut alice = agent_ready(url, &a_token).await;
        let (b_id, b_token) = provision_agent(&admin, &tenant, "bob", 1).await;
        let bob = agent_ready(other, &b_token).await;
        let (sid, ck) = start_session(url, &tenant.api_key, session).await;
        let stream = format!(
            "{url}/nexus/v3/chat/sessions/{sid}/stream?api_key={}&client_key={ck}",
            tenant.api_key
        );
        let customer = ws_connect(&stream).await;
        // Alice (ready first, longest idle) takes it.
        let offer = ws_until(&mut alice, WAIT, |v| v["type"] == "offer").await;
        accept_offer(&mut alice, &sid, &offer).await;
        Consulting {
            tenant,
            a_token,
            alice,
            b_id,
            b_token,
            bob,
            sid,
            ck,
            customer,
            stream,
            http: reqwest::Client::new(),
        }
    }
}

/// Consult / conference: the owner invites a second agent, who joins (capacity counted), reads
/// the transcript, sees the customer's messages, replies to the customer and leaves without
/// ending the chat; invited again, the owner's completion ends it for both and frees both.
/// The consultant (Bob) works through `other`, which may be another edge than `url`.
async fn consult_scenario(url: &str, other: &str) {
    let Consulting {
        tenant,
        a_token,
        mut alice,
        b_id,
        b_token,
        mut bob,
        sid,
        ck,
        mut customer,
        http,
        ..
    } = Consulting::start(
        url,
        other,
        json!({"nickname": "Fay", "text": "my order is late"}),
    )
    .await;
    let active = |token: &str| {
        let (http, url, token) = (http.clone(), url.to_string(), token.to_string());
        async move {
            let me = get_as(&http, format!("{url}/v1/agent/me"), &token).await;
            me["active"]["chat"].as_u64().unwrap_or(0)
        }
    };
    let send = |text: &'static str| {
        let (http, url, sid, ck, key) = (
            http.clone(),
            url.to_string(),
            sid.clone(),
            ck.clone(),
            tenant.api_key.clone(),
        );
        async move {
            let r = http
                .post(format!("{url}/nexus/v3/chat/sessions/{sid}/messages"))
                .header("x-api-key", &key)
                .header("x-nexus-client-key", &ck)
                .json(&json!({"text": text}))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 202);
        }
    };

    // Declined, then left to lapse: Alice is told, Bob's slot is back each time.
    let failed = |v: &Value| v["type"] == "transfer_failed";
    invite(&mut alice, &sid, &b_id).await;
    let offer = ws_until(&mut bob, WAIT, |v| v["type"] == "offer").await;
    ws_send(
        &mut bob,
        json!({"op": "reject", "conversation_id": sid, "offer_id": offer["offer_id"]}),
    )
    .await;
    let refused = ws_until(&mut alice, WAIT, failed).await;
    assert_eq!(
        (refused["reason"].as_str(), refused["target_id"].as_str()),
        (Some("DECLINED"), Some(b_id.as_str()))
    );
    assert_eq!(active(&b_token).await, 0);
    invite(&mut alice, &sid, &b_id).await;
    let offer = ws_until(&mut bob, WAIT, |v| v["type"] == "offer").await;
    let closed = ws_until(&mut bob, WAIT, |v| v["type"] == "offer_closed").await;
    assert_eq!(
        (closed["offer_id"].clone(), closed["reason"].as_str()),
        (offer["offer_id"].clone(), Some("TIMEOUT"))
    );
    assert_eq!(
        ws_until(&mut alice, WAIT, failed).await["reason"],
        "TIMEOUT"
    );
    assert_eq!(active(&b_token).await, 0);
    // Withdrawn (Bob leaves before he answers): Alice is told, as of a decline.
    invite(&mut alice, &sid, &b_id).await;
    ws_until(&mut bob, WAIT, |v| v["type"] == "offer").await;
    ws_send(&mut bob, json!({"op": "leave", "conversation_id": sid})).await;
    let withdrawn = ws_until(&mut alice, WAIT, failed).await;
    assert_eq!(
        (
            withdrawn["reason"].as_str(),
            withdrawn["target_id"].as_str()
        ),
        (Some("DECLINED"), Some(b_id.as_str()))
    );
    assert_eq!(active(&b_token).await, 0);

    // Asked twice (a retried request): one invitation, and the owner is told of no refusal.
    invite(&mut alice, &sid, &b_id).await;
    invite(&mut alice, &sid, &b_id).await;
    let offer = ws_until(&mut bob, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(offer["consult"], true, "{offer}");
    assert_eq!(offer["conversation_id"], sid.as_str());
    // Consulting takes one of Bob's slots.
    assert_eq!(active(&b_token).await, 1);
    let r = http
        .post(format!("{other}/v1/agent/conversations/{sid}/accept"))
        .bearer_auth(&b_token)
        .json(&json!({"offer_id": offer["offer_id"]}))
        .send()
        .await
        .expect("accept");
    assert_eq!(r.status(), 202);
    let joined =
        |v: &Value| transcript_frame(v, "ParticipantJoined") && v["from"]["nickname"] == "bob";
    ws_until(&mut customer, WAIT, joined).await;
    let seen = ws_until(&mut alice, WAIT, |v| failed(v) || joined(v)).await;
    assert!(joined(&seen), "the owner was told of a refusal: {seen}");
    ws_until(&mut bob, WAIT, |v| {
        v["type"] == "state" && v["state"] == "connected"
    })
    .await;
    // Bob reads what was said before he joined.
    let transcript = get_as(
        &http,
        format!("{other}/v1/agent/conversations/{sid}/messages"),
        &b_token,
    )
    .await;
    let said = texts(transcript["messages"].as_array().expect("messages"));
    assert!(said.contains(&"my order is late"), "{transcript}");

    // Both agents see the customer; the customer sees Bob's reply.
    send("it was due monday").await;
    let said = |v: &Value| transcript_frame(v, "Message") && v["text"] == "it was due monday";
    ws_until(&mut alice, WAIT, said).await;
    ws_until(&mut bob, WAIT, said).await;
    ws_send(
        &mut bob,
        json!({"op": "reply", "conversation_id": sid, "text": "I can reship it"}),
    )
    .await;
    let reply = ws_until(&mut customer, WAIT, |v| {
        transcript_frame(v, "Message") && v["from"]["kind"] == "agent"
    })
    .await;
    assert_eq!(
        (reply["text"].as_str(), reply["from"]["nickname"].as_str()),
        (Some("I can reship it"), Some("bob"))
    );
    ws_until(&mut alice, WAIT, |v| {
        transcript_frame(v, "Message") && v["text"] == "I can reship it"
    })
    .await;

    // While Bob is in, Alice can neither transfer nor invite a second consultant.
    ws_send(
        &mut alice,
        json!({"op": "transfer", "conversation_id": sid, "queue_id": tenant.queue_id}),
    )
    .await;
    assert_eq!(
        ws_until(&mut alice, WAIT, failed).await["reason"],
        "CONSULT_IN_PROGRESS"
    );
    let (c_id, _) = provision_agent(&Admin::new(url), &tenant, "cat", 1).await;
    invite(&mut alice, &sid, &c_id).await;
    assert_eq!(
        ws_until(&mut alice, WAIT, failed).await["reason"],
        "CONSULT_IN_PROGRESS"
    );

    // Bob leaves: his slot is free, the chat goes on with Alice.
    let r = http
        .post(format!("{other}/v1/agent/conversations/{sid}/leave"))
        .bearer_auth(&b_token)
        .send()
        .await
        .expect("leave");
    assert_eq!(r.status(), 202);
    let left = ws_until(&mut customer, WAIT, |v| {
        transcript_frame(v, "ParticipantLeft")
    })
    .await;
    assert_eq!(left["from"]["nickname"], "bob");
    ws_until(&mut bob, WAIT, |v| {
        v["type"] == "state" && v["state"] == "left"
    })
    .await;
    assert_eq!(active(&b_token).await, 0);
    assert_eq!(active(&a_token).await, 1);
    send("thanks").await;
    ws_until(&mut alice, WAIT, |v| {
        transcript_frame(v, "Message") && v["text"] == "thanks"
    })
    .await;
    // Bob no longer sees the conversation.
    let r = http
        .get(format!("{other}/v1/agent/conversations/{sid}/messages"))
        .bearer_auth(&b_token)
        .send()
        .await
        .expect("transcript");
    assert_eq!(r.status(), 404);

    // Invited again: a consultant's `complete` ends its part only.
    invite(&mut alice, &sid, &b_id).await;
    let offer = ws_until(&mut bob, WAIT, |v| v["type"] == "offer").await;
    accept_offer(&mut bob, &sid, &offer).await;
    ws_send(&mut bob, json!({"op": "complete", "conversation_id": sid})).await;
    ws_until(&mut bob, WAIT, |v| {
        v["type"] == "state" && v["state"] == "left"
    })
    .await;
    let left = ws_until(&mut customer, WAIT, |v| {
        transcript_frame(v, "ParticipantLeft")
    })
    .await;
    assert_eq!(left["from"]["nickname"], "bob");
    assert_eq!(active(&b_token).await, 0);
    assert_eq!(active(&a_token).await, 1);

    // Invited again and joined, then Alice completes: closed for both, both slots free.
    invite(&mut alice, &sid, &b_id).await;
    let offer = ws_until(&mut bob, WAIT, |v| v["type"] == "offer").await;
    accept_offer(&mut bob, &sid, &offer).await;
    assert_eq!(active(&b_token).await, 1);
    ws_send(
        &mut alice,
        json!({"op": "complete", "conversation_id": sid, "disposition": "resolved"}),
    )
    .await;
    let closed = |v: &Value| v["type"] == "state" && v["state"] == "closed";
    ws_until(&mut alice, WAIT, closed).await;
    ws_until(&mut bob, WAIT, closed).await;
    ws_until(&mut customer, WAIT, closed).await;
    assert_eq!(active(&a_token).await, 0);
    assert_eq!(active(&b_token).await, 0);
}

/// Consult in conference, then in private, on `nexus dev`: embedded bus, SQLite, embedded
/// session store (each scenario its own tenant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consults_in_conference_and_in_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = base_env(dir.path());
    env.push(consult_timeout_env());
    let node = start_node(dir.path(), "dev", &["dev"], env).await;
    consult_scenario(&node.url, &node.url).await;
    private_consult_scenario(&node.url, &node.url).await;
}

/// The same on NATS JetStream + PostgreSQL + Redis, the consultant on a second edge. Also what
/// the GWS worker reads: the private consultant's reply, sent without a visibility, is on
/// `nexus.agent.v1` as the edge published it, marked for agents only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_postgres_redis_consults_across_two_edges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = TwoEdges::start(dir.path(), vec![consult_timeout_env()]).await;
    consult_scenario(&system.edge_a.url, &system.edge_b.url).await;
    private_consult_scenario(&system.edge_a.url, &system.edge_b.url).await;
    let mut config = nexus::config::Config::defaults().bus;
    config.url = system._nats.url.clone();
    let bus = nexus::bus::connect(&config).await.expect("bus");
    let mut seen = Vec::new();
    for partition in 0..16 {
        for m in bus
            .read("nexus.agent.v1", partition, 0, 10_000)
            .await
            .expect("read nexus.agent.v1")
        {
            let e = nexus::events::decode(&m.payload).expect("decode");
            if e.envelope.event_type == "MessageSent" {
                seen.push((e.body["text"].clone(), e.body["visibility"].clone()));
            }
        }
    }
    for (text, visibility) in [
        ("refund went out friday", "AGENTS"),
        ("note: VIP customer", "AGENTS"),
        ("your refund is on its way", "ALL"),
        ("I can reship it", "ALL"),
    ] {
        assert!(
            seen.contains(&(json!(text), json!(visibility))),
            "{text} published as {visibility}: {seen:?}"
        );
    }
}

/// The texts of transcript entries (frames, or a page's `messages`), in order.
fn texts(entries: &[Value]) -> Vec<&str> {
    entries.iter().filter_map(|v| v["text"].as_str()).collect()
}

/// `GET` with an agent's token, as JSON.
async fn get_as(http: &reqwest::Client, url: String, token: &str) -> Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// Whether a socket frame is marked for agents only.
fn agents_only(v: &Value) -> bool {
    v["data"]["visibility"] == "agents"
}

/// A private consult and internal notes: the owner's note and everything the private
/// consultant does (joining, typing, writing, leaving) reach the agents, marked, and never the
/// customer: not live, not on a reconnect, not in a v3 or v2 transcript read, whose positions
/// go past them. The consultant sends no files; the owner's public replies reach the customer
/// as usual. `other` is the consultant's edge.
async fn private_consult_scenario(url: &str, other: &str) {
    let Consulting {
        tenant,
        a_token,
        mut alice,
        b_id,
        b_token,
        mut bob,
        sid,
        ck,
        mut customer,
        stream,
        http,
    } = Consulting::start(
        url,
        other,
        json!({"nickname": "Gus", "text": "where is my refund"}),
    )
    .await;

    // An internal note over HTTP; a bad visibility is refused.
    let reply = |token: &str, base: &str, body: Value| {
        let (http, url, token) = (
            http.clone(),
            format!("{base}/v1/agent/conversations/{sid}/messages"),
            token.to_string(),
        );
        async move {
            http.post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("reply")
        }
    };
    let r = reply(&a_token, url, json!({"text": "x", "visibility": "secret"})).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "INVALID_FIELD", "{body}");
    let r = reply(
        &a_token,
        url,
        json!({"text": "note: VIP customer", "visibility": "agents"}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let note = ws_until(&mut alice, WAIT, |v| {
        transcript_frame(v, "Message") && v["text"] == "note: VIP customer"
    })
    .await;
    assert!(agents_only(&note), "{note}");

    // Bob is invited privately and joins.
    ws_send(
        &mut alice,
        json!({"op": "consult", "conversation_id": sid, "agent_id": b_id,
            "visibility": "agents", "request_id": "p"}),
    )
    .await;
    let ack = ws_until(&mut alice, WAIT, |v| v["request_id"] == "p").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let offer = ws_until(&mut bob, WAIT, |v| v["type"] == "offer").await;
    assert_eq!(
        (offer["consult"].clone(), offer["visibility"].clone()),
        (json!(true), json!("agents")),
        "{offer}"
    );
    accept_offer(&mut bob, &sid, &offer).await;
    let joined = ws_until(&mut alice, WAIT, |v| {
        transcript_frame(v, "ParticipantJoined") && v["from"]["nickname"] == "bob"
    })
    .await;
    assert!(agents_only(&joined), "{joined}");
    let listed = get_as(&http, format!("{other}/v1/agent/conversations"), &b_token).await;
    assert_eq!(
        listed["items"][0]["consult_visibility"], "agents",
        "{listed}"
    );

    // Bob types and writes without saying `agents`: agents only all the same. He reads the
    // whole transcript, the note included.
    ws_send(
        &mut bob,
        json!({"op": "typing", "conversation_id": sid, "state": "started"}),
    )
    .await;
    ws_send(
        &mut bob,
        json!({"op": "reply", "conversation_id": sid, "text": "refund went out friday"}),
    )
    .await;
    let hint = ws_until(&mut alice, WAIT, |v| {
        transcript_frame(v, "Message") && v["text"] == "refund went out friday"
    })
    .await;
    assert!(agents_only(&hint), "{hint}");
    let typing = ws_until(&mut bob, WAIT, |v| transcript_frame(v, "TypingStarted")).await;
    assert!(agents_only(&typing), "{typing}");
    let read = get_as(
        &http,
        format!("{other}/v1/agent/conversations/{sid}/messages"),
        &b_token,
    )
    .await;
    let said = texts(read["messages"].as_array().expect("messages"));
    assert!(said.contains(&"note: VIP customer"), "{read}");
    // No files from a private consultant: they would reach the customer.
    let data = png(500);
    let r = http
        .post(format!("{other}/v1/agent/conversations/{sid}/files"))
        .bearer_auth(&b_token)
        .header("content-type", multipart_type())
        .body(file_part("x.png", "image/png", &data))
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "PRIVATE_CONSULT", "{body}");

    // Alice answers the customer, Bob leaves, Alice answers again.
    let r = reply(&a_token, url, json!({"text": "your refund is on its way"})).await;
    assert_eq!(r.status(), 202);
    let r = http
        .post(format!("{other}/v1/agent/conversations/{sid}/leave"))
        .bearer_auth(&b_token)
        .send()
        .await
        .expect("leave");
    assert_eq!(r.status(), 202);
    let left = ws_until(&mut alice, WAIT, |v| transcript_frame(v, "ParticipantLeft")).await;
    assert!(agents_only(&left), "{left}");
    let r = reply(&a_token, url, json!({"text": "anything else?"})).await;
    assert_eq!(r.status(), 202);
    let last = ws_until(&mut alice, WAIT, |v| {
        transcript_frame(v, "Message") && v["text"] == "anything else?"
    })
    .await;
    let end = last["position"].as_u64().expect("position");

    // What the customer got live: the public entries only, in order.
    let frames = ws_frames_until(&mut customer, WAIT, |v| v["text"] == "anything else?").await;
    let shown: Vec<(u64, String, String)> = frames
        .iter()
        .filter(|v| v["type"] == "transcript")
        .map(|v| {
            (
                v["position"].as_u64().unwrap_or(0),
                v["kind"].as_str().unwrap_or("").to_string(),
                v["from"]["nickname"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        frames
            .iter()
            .all(|v| !agents_only(v) && v["from"]["nickname"] != "bob"),
        "{frames:?}"
    );
    assert_eq!(
        texts(&frames),
        [
            "where is my refund",
            "your refund is on its way",
            "anything else?"
        ],
        "{shown:?}"
    );

    // A reconnect from the start, and one from a position inside the private part.
    drop(customer);
    let mut again = ws_connect(&stream).await;
    let replayed = ws_frames_until(&mut again, WAIT, |v| v["text"] == "anything else?").await;
    assert!(
        replayed
            .iter()
            .all(|v| !agents_only(v) && v["from"]["nickname"] != "bob"),
        "{replayed:?}"
    );
    assert_eq!(
        texts(&replayed),
        [
            "where is my refund",
            "your refund is on its way",
            "anything else?"
        ]
    );
    let note_at = note["position"].as_u64().expect("position");
    let mut resumed = ws_connect(&format!("{stream}&from={note_at}")).await;
    let first = ws_until(&mut resumed, WAIT, |v| v["type"] == "transcript").await;
    assert_eq!(first["text"], "your refund is on its way", "{first}");

    // A long poll from the note, one entry a page: the page goes past the note, so it answers
    // at once (no push will come for what is stored already) instead of waiting 30 s.
    let read = |query: String| {
        let url = format!("{url}/nexus/v3/chat/sessions/{sid}/messages?{query}");
        let request = http
            .get(url)
            .header("x-api-key", &tenant.api_key)
            .header("x-nexus-client-key", &ck);
        async move {
            let page: Value = request
                .send()
                .await
                .expect("v3 read")
                .json()
                .await
                .expect("json");
            page
        }
    };
    let page = tokio::time::timeout(
        Duration::from_secs(10),
        read(format!("from={note_at}&limit=1&wait_s=30")),
    )
    .await
    .expect("the long poll answered without waiting out wait_s");
    assert_eq!(page["messages"], json!([]), "{page}");
    assert_eq!(page["next_position"], note_at + 1, "{page}");

    // Transcript reads: v3 and v2 leave the private entries out and go past them.
    let v3 = read(format!("from={note_at}")).await;
    assert!(
        v3["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .all(|v| !agents_only(v) && v["from"]["nickname"] != "bob"),
        "{v3}"
    );
    assert_eq!(
        texts(v3["messages"].as_array().expect("messages")),
        ["your refund is on its way", "anything else?"]
    );
    assert_eq!(v3["next_position"], end + 1, "{v3}");
    // Bob's slot went back with his leave; Alice keeps hers.
    let me = get_as(&http, format!("{url}/v1/agent/me"), &a_token).await;
    assert_eq!(me["active"]["chat"], 1, "{me}");
    let pid = frames
        .iter()
        .find(|v| v["from"]["kind"] == "customer")
        .and_then(|v| v["from"]["participant_id"].as_str())
        .expect("customer participant id")
        .to_string();
    let v2: Value = http
        .post(format!("{url}/genesys/2/chat/default/{sid}/refresh"))
        .header("apikey", &tenant.api_key)
        .form(&[
            ("secureKey", ck.as_str()),
            ("userId", pid.as_str()),
            ("alias", "nexus"),
            ("transcriptPosition", "1"),
        ])
        .send()
        .await
        .expect("v2 refresh")
        .json()
        .await
        .expect("v2 json");
    assert_eq!(v2["statusCode"], 0, "{v2}");
    assert_eq!(
        texts(v2["messages"].as_array().expect("messages")),
        [
            "where is my refund",
            "your refund is on its way",
            "anything else?"
        ],
        "{v2}"
    );
    assert!(
        v2["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .all(|m| m["from"]["nickname"] != "bob"),
        "{v2}"
    );
    assert_eq!(v2["nextPosition"], end + 1, "{v2}");
}
