//! Web chat end to end through real processes: a customer (Chat API v3 + WebSocket) and an
//! agent (agent WebSocket) chat through the bus, the conversation worker and the session
//! store; v2 sees the same conversation; a reconnect from a position misses and repeats
//! nothing. Runs on the embedded bus + SQLite + embedded store (`nexus dev`) and on NATS
//! JetStream + PostgreSQL + Redis.

mod common;

use std::time::Duration;

use common::chat::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

async fn agent_ready(url: &str, token: &str) -> Ws {
    let mut agent = ws_connect(&format!("{url}/v1/agent/ws?token={token}")).await;
    ws_until(&mut agent, WAIT, |v| v["type"] == "hello").await;
    ws_send(&mut agent, json!({"op": "ready", "request_id": "r1"})).await;
    let ack = ws_until(&mut agent, WAIT, |v| v["request_id"] == "r1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let http = reqwest::Client::new();
    eventually(WAIT, "agent ready", || {
        let http = http.clone();
        async move {
            let me: Value = http
                .get(format!("{url}/v1/agent/me"))
                .bearer_auth(token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (me["ready"] == true).then_some(())
        }
    })
    .await;
    agent
}

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

    // The customer starts a chat.
    let started: Value = http
        .post(format!("{url}/nexus/v3/chat/sessions"))
        .header("x-api-key", &tenant.api_key)
        .json(&json!({"nickname": "Ann", "email_address": "ann@example.com"}))
        .send()
        .await
        .expect("start")
        .json()
        .await
        .expect("start json");
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

    // The agent replies; the customer sees it.
    ws_send(
        &mut agent,
        json!({"op": "reply", "conversation_id": sid, "text": "hi Ann, how can I help?"}),
    )
    .await;
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
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(multipart(&[(
            "file",
            Some("screenshot.png"),
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

    // The agent completes; the customer sees the end.
    ws_send(
        &mut agent,
        json!({"op": "complete", "conversation_id": sid, "disposition": "resolved"}),
    )
    .await;
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
    let nats = OwnNats::start(dir.path()).await;
    let db = TestDb::create().await;
    let mut env = base_env(dir.path());
    env.push(("NEXUS_BUS__URL", nats.url.clone()));
    env.push(("NEXUS_STORES__POSTGRES_URL", db.url.clone()));
    env.push(("NEXUS_STORES__PROVISIONING_KEY", "11".repeat(32)));
    env.push((
        "NEXUS_STORES__REDIS_URL",
        std::env::var("NEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    ));
    let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
    assert!(ok, "topology apply: {out} {err}");
    let worker = start_node(
        dir.path(),
        "worker",
        &["worker", "conversation"],
        env.clone(),
    )
    .await;
    let edge_a = start_node(dir.path(), "edge-a", &["edge"], env.clone()).await;
    let edge_b = start_node(dir.path(), "edge-b", &["edge"], env).await;
    // The customer on edge A, the agent on edge B.
    scenario(&edge_a.url, &edge_b.url).await;
    drop((worker, edge_a, edge_b));
}

/// Async chat: an idle customer gets a notice after `idle_timeout`, and the chat closes with
/// IDLE_TIMEOUT after `close_grace` unless the customer returns (which restarts the clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_chat_closes_when_idle_unless_the_customer_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = base_env(dir.path());
    env.push(("NEXUS_WORKERS__CONVERSATION__IDLE_TIMEOUT_S", "2".into()));
    env.push(("NEXUS_WORKERS__CONVERSATION__CLOSE_GRACE_S", "2".into()));
    let node = start_node(dir.path(), "dev", &["dev"], env).await;
    let url = node.url.as_str();
    let admin = Admin::new(url);
    let tenant = provision_tenant(&admin).await;
    let http = reqwest::Client::new();
    let started: Value = http
        .post(format!("{url}/nexus/v3/chat/sessions"))
        .header("x-api-key", &tenant.api_key)
        .json(&json!({"nickname": "Bea", "async": true}))
        .send()
        .await
        .expect("start")
        .json()
        .await
        .expect("json");
    let sid = started["session_id"].as_str().expect("sid").to_string();
    let ck = started["client_key"].as_str().expect("key").to_string();
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
    let mut env = base_env(dir.path());
    env.push((
        "NEXUS_WORKERS__CONVERSATION__OFFER_TIMEOUT_MS",
        "1500".into(),
    ));
    let node = start_node(dir.path(), "dev", &["dev"], env).await;
    let url = node.url.as_str();
    let admin = Admin::new(url);
    let tenant = provision_tenant(&admin).await;
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
