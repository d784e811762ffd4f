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
