//! Routing under load with two conversation-worker processes on one NATS JetStream (the
//! test's own), PostgreSQL and Redis: per-conversation order end to end, and agent capacity
//! never exceeded while offers race across worker instances.

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::chat::*;
use futures::future::join_all;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(60);

/// The two tests start three nexus processes and a NATS server each: one at a time, so a
/// loaded two-core CI machine does not starve them.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One edge and two conversation workers sharing the group.
/// Fields drop in order: the processes (printing their logs if the test failed) before the
/// directory holding the logs.
struct System {
    _nodes: Vec<Node>,
    nats: OwnNats,
    _db: TestDb,
    _dir: tempfile::TempDir,
    url: String,
}

async fn system() -> System {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = OwnNats::start(dir.path()).await;
    let db = TestDb::create().await;
    let mut env = base_env(dir.path());
    env.push(("NEXUS_BUS__URL", nats.url.clone()));
    env.push(("NEXUS_STORES__POSTGRES_URL", db.url.clone()));
    env.push(("NEXUS_STORES__PROVISIONING_KEY", "22".repeat(32)));
    env.push((
        "NEXUS_STORES__REDIS_URL",
        std::env::var("NEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    ));
    let (ok, out, err) = common::process::run(&["topology", "apply", "--bus", &nats.url], &[]);
    assert!(ok, "topology apply: {out} {err}");
    let mut nodes = Vec::new();
    for name in ["worker-1", "worker-2"] {
        nodes.push(start_node(dir.path(), name, &["worker", "conversation"], env.clone()).await);
    }
    let edge = start_node(dir.path(), "edge", &["edge"], env).await;
    let url = edge.url.clone();
    nodes.push(edge);
    System {
        _dir: dir,
        nats,
        _db: db,
        _nodes: nodes,
        url,
    }
}

struct Customer {
    sid: String,
    key: String,
}

async fn start_chat(url: &str, api_key: &str, n: usize) -> Customer {
    let (sid, key) =
        start_session(url, api_key, json!({"nickname": format!("customer {n}")})).await;
    Customer { sid, key }
}

/// `n` agents of `capacity` chats each, ready on their sockets; (sockets, tokens).
async fn ready_agents(
    url: &str,
    admin: &Admin,
    tenant: &Tenant,
    n: usize,
    capacity: u32,
) -> (Vec<Ws>, Vec<String>) {
    let mut agents = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..n {
        let (_, token) = provision_agent(admin, tenant, &format!("agent {i}"), capacity).await;
        agents.push(agent_ready(url, &token).await);
        tokens.push(token);
    }
    (agents, tokens)
}

/// Accepts every offer until `connected` conversations are connected; returns them.
async fn accept_until(ws: &mut Ws, connected: usize) -> HashSet<String> {
    let mut mine = HashSet::new();
    while mine.len() < connected {
        let v = ws_until(ws, WAIT, |v| {
            v["type"] == "offer" || (v["type"] == "state" && v["state"] == "connected")
        })
        .await;
        if v["type"] == "offer" {
            ws_send(
                ws,
                json!({"op": "accept", "conversation_id": v["conversation_id"], "offer_id": v["offer_id"]}),
            )
            .await;
        } else {
            mine.insert(v["conversation_id"].as_str().expect("id").to_string());
        }
    }
    mine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_arrive_in_send_order_per_conversation() {
    const CHATS: usize = 50;
    const PER_CHAT: usize = 20;
    let _serial = SERIAL.lock().await;
    let sys = system().await;
    let admin = Admin::new(&sys.url);
    let tenant = provision_tenant(&admin).await;
    let http = reqwest::Client::new();
    let mut agents = Vec::new();
    for i in 0..5 {
        let (_, token) = provision_agent(&admin, &tenant, &format!("agent {i}"), 10).await;
        agents.push(agent_ready(&sys.url, &token).await);
    }
    let customers: Vec<Customer> =
        join_all((0..CHATS).map(|n| start_chat(&sys.url, &tenant.api_key, n))).await;
    // Every agent takes its share: 50 chats over 5 agents of 10.
    let mut held: Vec<HashSet<String>> = Vec::new();
    let results = join_all(agents.iter_mut().map(|ws| accept_until(ws, CHATS / 5))).await;
    held.extend(results);
    let all: HashSet<&String> = held.iter().flatten().collect();
    assert_eq!(all.len(), CHATS, "every chat is connected to one agent");

    // Each customer sends its messages one after the other; the chats run concurrently.
    join_all(customers.iter().map(|c| {
        let http = http.clone();
        let (url, api_key) = (sys.url.clone(), tenant.api_key.clone());
        async move {
            for i in 0..PER_CHAT {
                let r = http
                    .post(format!("{url}/nexus/v3/chat/sessions/{}/messages", c.sid))
                    .header("x-api-key", &api_key)
                    .header("x-nexus-client-key", &c.key)
                    .json(&json!({"text": format!("m{i:02}")}))
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 202);
            }
        }
    }))
    .await;

    // Each agent's socket sees its chats' messages in send order, each once.
    let seen = join_all(agents.iter_mut().zip(&held).map(|(ws, mine)| async move {
        let mut got: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        while got.values().map(Vec::len).sum::<usize>() < mine.len() * PER_CHAT {
            let v = ws_until(ws, WAIT, |v| {
                v["type"] == "transcript"
                    && v["kind"] == "Message"
                    && v["from"]["kind"] == "customer"
            })
            .await;
            let id = v["conversation_id"].as_str().expect("id").to_string();
            assert!(
                mine.contains(&id),
                "a message of a chat this agent does not hold"
            );
            let position = v["position"].as_u64().expect("position");
            got.entry(id)
                .or_default()
                .push((position, v["text"].as_str().expect("text").to_string()));
        }
        got
    }))
    .await;
    let expected: Vec<String> = (0..PER_CHAT).map(|i| format!("m{i:02}")).collect();
    let mut chats = 0;
    for got in seen {
        for (id, messages) in got {
            let texts: Vec<String> = messages.iter().map(|(_, t)| t.clone()).collect();
            assert_eq!(texts, expected, "order of chat {id}");
            assert!(
                messages.windows(2).all(|w| w[0].0 < w[1].0),
                "positions grow in chat {id}"
            );
            chats += 1;
        }
    }
    assert_eq!(chats, CHATS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_holds_while_offers_race_across_workers() {
    const AGENTS: usize = 3;
    const CAPACITY: u32 = 2;
    const CHATS: usize = 20;
    let _serial = SERIAL.lock().await;
    let sys = system().await;
    let admin = Admin::new(&sys.url);
    let tenant = provision_tenant(&admin).await;
    let http = reqwest::Client::new();
    let (mut agents, tokens) = ready_agents(&sys.url, &admin, &tenant, AGENTS, CAPACITY).await;
    // Twenty chats at once: two workers race to offer them.
    let customers: Vec<Customer> =
        join_all((0..CHATS).map(|n| start_chat(&sys.url, &tenant.api_key, n))).await;
    let held = join_all(
        agents
            .iter_mut()
            .map(|ws| accept_until(ws, CAPACITY as usize)),
    )
    .await;
    let mut connected: HashMap<String, usize> = HashMap::new();
    for mine in &held {
        for id in mine {
            *connected.entry(id.clone()).or_default() += 1;
        }
    }
    assert_eq!(connected.len(), AGENTS * CAPACITY as usize);
    assert!(
        connected.values().all(|n| *n == 1),
        "a chat connected to two agents"
    );
    // Give the timers several requeue rounds: nobody may be offered more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (ws, token) in agents.iter_mut().zip(&tokens) {
        let extra = tokio::time::timeout(Duration::from_millis(300), async {
            ws_until(ws, WAIT, |v| v["type"] == "offer").await
        })
        .await;
        assert!(
            extra.is_err(),
            "an agent at capacity got another offer: {extra:?}"
        );
        let me: Value = http
            .get(format!("{}/v1/agent/me", sys.url))
            .bearer_auth(token)
            .send()
            .await
            .expect("me")
            .json()
            .await
            .expect("me json");
        assert_eq!(me["active"]["chat"], CAPACITY, "{me}");
    }
    // One agent completes a chat: its freed slot takes exactly one waiting chat.
    let done = held[0].iter().next().expect("a chat").clone();
    ws_send(
        &mut agents[0],
        json!({"op": "complete", "conversation_id": done, "request_id": "c"}),
    )
    .await;
    let offer = ws_until(&mut agents[0], WAIT, |v| v["type"] == "offer").await;
    let next = offer["conversation_id"].as_str().expect("id").to_string();
    assert!(
        !connected.contains_key(&next),
        "the new offer is a waiting chat"
    );
    assert!(customers.iter().any(|c| c.sid == next));
}

/// A customer leaving while the agent completes (the inbound and the agent topic, handled at
/// once by two workers): each conversation closes once, with one ConversationClosed, and
/// nothing of it follows that close, on the interaction stream or on the agent's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_closes_close_a_conversation_once() {
    const AGENTS: usize = 3;
    const CAPACITY: u32 = 4;
    let _serial = SERIAL.lock().await;
    let sys = system().await;
    let admin = Admin::new(&sys.url);
    let tenant = provision_tenant(&admin).await;
    let http = reqwest::Client::new();
    let (mut agents, tokens) = ready_agents(&sys.url, &admin, &tenant, AGENTS, CAPACITY).await;
    let chats = AGENTS * CAPACITY as usize;
    let customers: Vec<Customer> =
        join_all((0..chats).map(|n| start_chat(&sys.url, &tenant.api_key, n))).await;
    let held = join_all(
        agents
            .iter_mut()
            .map(|ws| accept_until(ws, CAPACITY as usize)),
    )
    .await;
    let owner: HashMap<&str, &str> = held
        .iter()
        .zip(&tokens)
        .flat_map(|(mine, token)| mine.iter().map(move |c| (c.as_str(), token.as_str())))
        .collect();
    assert_eq!(owner.len(), chats);
    // Both closes of every chat at once.
    let closes = customers.iter().map(|c| {
        let (http, url, key) = (http.clone(), sys.url.clone(), tenant.api_key.clone());
        let token = owner[c.sid.as_str()].to_string();
        async move {
            let leave = http
                .post(format!("{url}/nexus/v3/chat/sessions/{}/disconnect", c.sid))
                .header("x-api-key", &key)
                .header("x-nexus-client-key", &c.key)
                .send();
            let complete = http
                .post(format!("{url}/v1/agent/conversations/{}/complete", c.sid))
                .bearer_auth(&token)
                .json(&json!({"disposition": "done"}))
                .send();
            let (leave, complete) = futures::join!(leave, complete);
            (
                leave.expect("disconnect").status().as_u16(),
                complete.expect("complete").status().as_u16(),
            )
        }
    });
    for (leave, complete) in join_all(closes).await {
        // The later of the two may find the chat closed already (409).
        assert!(matches!(leave, 202 | 409), "disconnect answered {leave}");
        assert!(
            matches!(complete, 202 | 409),
            "complete answered {complete}"
        );
    }
    let mut config = common::bus_config("jetstream", None);
    config.url = sys.nats.url.clone();
    let bus = nexus::bus::connect(&config).await.expect("bus");
    // Per conversation: how many closes, and the transcript length the last one reports; and
    // the events that came after a close (one partition holds a conversation, in order).
    let count = || async {
        let mut closed: HashMap<String, (usize, i64)> = HashMap::new();
        let mut after_close: Vec<(String, String)> = Vec::new();
        for p in bus
            .partition_offsets("nexus.interaction.v1")
            .await
            .expect("offsets")
        {
            for m in bus
                .read("nexus.interaction.v1", p.partition, p.low, 100_000)
                .await
                .expect("read")
            {
                let e = nexus::events::decode(&m.payload).expect("decode");
                if closed.contains_key(&e.envelope.conversation_id) {
                    after_close.push((
                        e.envelope.conversation_id.clone(),
                        e.envelope.event_type.clone(),
                    ));
                }
                if e.envelope.event_type == "ConversationClosed" {
                    let b: nexus::events::chat::ConversationClosed =
                        e.body_as().expect("closed body");
                    assert_eq!(b.channel, Some(nexus::events::chat::Channel::WebChat));
                    let seen = closed.entry(e.envelope.conversation_id).or_default();
                    *seen = (seen.0 + 1, b.transcript_length);
                }
            }
        }
        (closed, after_close)
    };
    eventually(WAIT, "every chat closed", || async {
        (count().await.0.len() == chats).then_some(())
    })
    .await;
    // Time for a second close or a late event, had one been on its way; meanwhile, what each
    // agent's socket got after a conversation's `closed` state.
    let late_pushes: Vec<Value> = join_all(agents.iter_mut().map(|ws| async move {
        let mut shut: HashSet<String> = HashSet::new();
        let mut late = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until, ws.next()).await {
            let WsMessage::Text(t) = frame else { continue };
            let v: Value = serde_json::from_str(t.as_str()).expect("json frame");
            let conv = v["conversation_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if v["type"] == "state" && v["state"] == "closed" {
                shut.insert(conv);
            } else if v["type"] == "transcript" && shut.contains(&conv) {
                late.push(v);
            }
        }
        late
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    assert!(
        late_pushes.is_empty(),
        "transcript pushes after the closed state: {late_pushes:?}"
    );
    let (closed, after_close) = count().await;
    assert!(
        after_close.is_empty(),
        "events after ConversationClosed: {after_close:?}"
    );
    let twice: Vec<_> = closed.iter().filter(|(_, (n, _))| *n > 1).collect();
    assert!(twice.is_empty(), "closed more than once: {twice:?}");
    // The closed event counts the whole transcript, the close's own entries included.
    for c in &customers {
        let t: Value = http
            .get(format!(
                "{}/nexus/v3/chat/sessions/{}/messages",
                sys.url, c.sid
            ))
            .header("x-api-key", &tenant.api_key)
            .header("x-nexus-client-key", &c.key)
            .send()
            .await
            .expect("transcript")
            .json()
            .await
            .expect("transcript json");
        let entries = t["messages"].as_array().map_or(0, Vec::len);
        assert!(entries >= 2, "{t}");
        assert_eq!(closed[&c.sid].1, entries as i64, "{t}");
    }
}
