//! Review of the bot path on real services: PostgreSQL provisioning, the Redis session store, a
//! bot endpoint on loopback, the edge's bot API in process and the conversation worker applying
//! what the edge published (the embedded bus carries the events between them).

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use nexus::bus::consumer::{HandleError, Handler};
use nexus::bus::{Bus, Message};
use nexus::config::Config;
use nexus::edge::{self, AppState};
use nexus::events::chat as ev;
use nexus::events::Event;
use nexus::stores::provisioning::secrets::EncryptionKey;
use nexus::stores::provisioning::{NewBot, NewQueue, NewTenant, Provisioning};
use nexus::stores::session::redis::RedisStore;
use nexus::stores::session::{
    Conversation, ConversationState, Party, PartyKind, Routing, SessionStore,
};
use nexus::topology::{self, Topology};
use nexus::workers::conversation::{ConversationConfig, ConversationWorker, AGENT_TOPIC};
use serde_json::{json, Value};
use tower::ServiceExt;

const MAX_USER_DATA: usize = 3;

/// One tenant with a queue, its edge state and a conversation worker, on PostgreSQL, Redis and
/// an embedded bus.
struct Sys {
    state: AppState,
    worker: ConversationWorker,
    bus: Arc<dyn Bus>,
    store: Arc<dyn SessionStore>,
    provisioning: Arc<Provisioning>,
    tenant: String,
    queue: String,
    _db: common::chat::TestDb,
    _dir: tempfile::TempDir,
}

async fn sys() -> Sys {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::defaults();
    config.bus = common::bus_config("embedded", Some(dir.path()));
    config.chat.max_user_data_entries = MAX_USER_DATA;
    let bus = nexus::bus::connect(&config.bus).await.expect("bus");
    topology::apply(bus.as_ref(), &Topology::builtin())
        .await
        .expect("topology");
    let db = common::chat::TestDb::create().await;
    let provisioning = Arc::new(
        Provisioning::connect(&db.url, &EncryptionKey::generate())
            .await
            .expect("provisioning"),
    );
    let redis =
        std::env::var("NEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let namespace = format!("bot-review-{}", uuid::Uuid::new_v4().simple());
    let store: Arc<dyn SessionStore> = Arc::new(
        RedisStore::connect_in(&redis, &namespace)
            .await
            .expect("redis session store"),
    );
    let tenant = provisioning
        .create_tenant(NewTenant { name: "t".into() })
        .await
        .expect("tenant")
        .id;
    let queue = provisioning
        .create_queue(&tenant, NewQueue { name: "q".into() })
        .await
        .expect("queue")
        .id;
    let worker = ConversationWorker::new(
        bus.clone(),
        store.clone(),
        provisioning.clone(),
        ConversationConfig {
            // The bots are on loopback.
            allow_private_bots: true,
            ..ConversationConfig::default()
        },
        reqwest::Client::new(),
    )
    .with_chat_limits(&config.chat);
    let state = AppState::new(
        Arc::new(config),
        bus.clone(),
        Arc::new(Topology::builtin()),
        nexus::telemetry::init_metrics(),
        provisioning.clone(),
        store.clone(),
    );
    Sys {
        state,
        worker,
        bus,
        store,
        provisioning,
        tenant,
        queue,
        _db: db,
        _dir: dir,
    }
}

impl Sys {
    /// A bot at `url`: (id, bot API token).
    async fn bot(&self, url: &str) -> (String, String) {
        let created = self
            .provisioning
            .create_bot(
                &self.tenant,
                NewBot {
                    name: "Botty".into(),
                    url: url.into(),
                    credential: "bot-secret".into(),
                },
            )
            .await
            .expect("bot");
        (created.bot.id, created.token)
    }

    /// A conversation with `bot` (as the worker saves one a bot-first rule routed), holding
    /// `user_data`; its id.
    async fn with_bot(&self, bot: &str, user_data: BTreeMap<String, String>) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        let c = Conversation {
            tenant_id: self.tenant.clone(),
            conversation_id: id.clone(),
            channel: "WEB_CHAT".into(),
            state: ConversationState::Bot,
            customer: Party {
                participant_id: "customer-1".into(),
                nickname: "Lou".into(),
                kind: PartyKind::Customer,
            },
            contact: BTreeMap::new(),
            user_data,
            subject: None,
            queue_id: Some(self.queue.clone()),
            bot_id: Some(bot.into()),
            agent_id: None,
            offered_to: None,
            declined_by: Vec::new(),
            files: 0,
            created_at_ms: chrono::Utc::now().timestamp_millis(),
            last_activity_ms: chrono::Utc::now().timestamp_millis(),
            closed_reason: None,
            routing: Routing::default(),
            version: 0,
        };
        assert!(self.store.put_conversation(&c).await.expect("put"));
        id
    }

    async fn record(&self, id: &str) -> Conversation {
        self.store
            .conversation(&self.tenant, id)
            .await
            .expect("load")
            .expect("record")
    }

    async fn texts(&self, id: &str) -> Vec<String> {
        self.store
            .transcript(&self.tenant, id, 1, 100)
            .await
            .expect("transcript")
            .into_iter()
            .filter_map(|e| e.entry.text)
            .collect()
    }

    /// The messages of `topic`, in order per partition.
    async fn messages(&self, topic: &str) -> Vec<Message> {
        let mut all = Vec::new();
        for p in self.bus.partition_offsets(topic).await.expect("offsets") {
            all.extend(
                self.bus
                    .read(topic, p.partition, 0, 10_000)
                    .await
                    .expect("read"),
            );
        }
        all
    }

    /// Applies every event of `topic` past the first `from` through the worker, as its
    /// consumer would; how many there were.
    async fn apply_from(&self, topic: &str, from: usize) -> usize {
        let messages = self.messages(topic).await;
        for m in &messages[from..] {
            let event = nexus::events::decode(&m.payload).expect("decode");
            self.worker.handle(&event, m).await.expect("applied");
        }
        messages.len() - from
    }

    /// Sends a bot API request with `token`: status and JSON answer.
    async fn bot_api(&self, token: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        let response = edge::app(self.state.clone())
            .oneshot(request)
            .await
            .expect("answer");
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The customer's message `text` as the edge publishes it.
    fn customer_says(&self, id: &str, text: &str) -> (Event, Message) {
        let body = ev::MessageReceived {
            message_id: uuid::Uuid::new_v4().to_string(),
            client_message_id: None,
            channel: ev::Channel::WebChat,
            channel_id: None,
            participant_id: "customer-1".into(),
            participant_kind: ev::ParticipantKind::Customer,
            nickname: None,
            contact: Default::default(),
            kind: ev::MessageKind::Text,
            text: Some(text.into()),
            media_ids: Vec::new(),
            sent_at: None,
            transcript_position: None,
        };
        let event = Event::typed(&body, &self.tenant, id, "test").expect("event");
        let message = Message {
            topic: "nexus.inbound.v1".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: event.envelope.occurred_at_ms,
            key: id.into(),
            payload: nexus::events::encode(&event).expect("encode").into(),
            headers: Default::default(),
        };
        (event, message)
    }
}

/// A bot on loopback answering every turn with `answer`; its URL.
async fn bot_answering(answer: Value) -> String {
    let answer = answer.to_string();
    let app = axum::Router::new().route(
        "/bot",
        axum::routing::post(move || {
            let answer = answer.clone();
            async move { answer }
        }),
    );
    serve(app).await
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/bot", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A bot API handoff whose context would take the chat past `chat.max_user_data_entries` is
/// refused (400 `INVALID_USER_DATA`, nothing published), as the customer's own update is:
/// before, it was answered 202 and the worker then handed off without the context, which the
/// agent never got. A context that fits reaches the queued conversation whole.
#[tokio::test]
async fn a_bot_api_handoff_whose_context_cannot_be_kept_is_refused() {
    let sys = sys().await;
    let (bot, token) = sys.bot("http://127.0.0.1:9/bot").await;
    let id = sys.with_bot(&bot, data(&[("a", "1"), ("b", "2")])).await;
    let path = format!("/v1/bot/conversations/{id}/handoff");
    let before = sys.messages(AGENT_TOPIC).await.len();

    let too_much = json!({"user_data": {"c": "3", "d": "4"}});
    let (status, body) = sys.bot_api(&token, "POST", &path, too_much).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "INVALID_USER_DATA", "{body}");
    assert_eq!(
        sys.messages(AGENT_TOPIC).await.len(),
        before,
        "nothing published"
    );

    let fits = json!({"user_data": {"a": "one", "c": "3"}});
    let (status, body) = sys.bot_api(&token, "POST", &path, fits).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(sys.apply_from(AGENT_TOPIC, before).await, 1);
    let record = sys.record(&id).await;
    assert_eq!(record.state, ConversationState::Queued);
    assert_eq!(
        record.user_data,
        data(&[("a", "one"), ("b", "2"), ("c", "3")]),
        "the handoff's context kept"
    );
}

/// A bot's answer handing off to a `queue_id` no queue can have (here with a NUL, which
/// PostgreSQL refuses in a query) goes to the rule's queue with its context, as an unknown
/// queue does: before, the directory lookup failed, and the customer's message was retried
/// (the bot called again) until dead-lettered, the chat left with the bot.
#[tokio::test]
async fn a_bot_handoff_to_a_queue_id_no_queue_can_have_goes_to_the_rules_queue() {
    let sys = sys().await;
    let url = bot_answering(json!({"replies": [{"text": "passing you on"}],
        "handoff": {"queue_id": "q\u{0}1", "user_data": {"topic": "billing"}}}))
    .await;
    let (bot, _) = sys.bot(&url).await;
    let id = sys.with_bot(&bot, BTreeMap::new()).await;
    let (event, message) = sys.customer_says(&id, "I need a person");
    sys.worker
        .handle(&event, &message)
        .await
        .expect("applied, not retried");
    let record = sys.record(&id).await;
    assert_eq!(record.state, ConversationState::Queued);
    assert_eq!(record.queue_id.as_deref(), Some(sys.queue.as_str()));
    assert_eq!(record.user_data, data(&[("topic", "billing")]));
    assert_eq!(sys.texts(&id).await, ["I need a person", "passing you on"]);
}

/// A bot that hands off through the bot API while its turn's call is still out, then fails
/// that call (a 500): the worker does not fall back on the record it read before (no "Connecting
/// you to an agent." notice pushed into a chat that is the queue's, no entry in the rule's
/// queue besides the one the bot chose). Before, the failure path acted on that stale record.
#[tokio::test]
async fn a_turn_failed_after_the_bot_handed_off_falls_back_to_nothing() {
    let sys = Arc::new(sys().await);
    let (id, handed) = handed_off_during_its_call(&sys, || {
        axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
    })
    .await;
    assert_eq!(
        sys.texts(&id).await,
        ["hello"],
        "a fallback notice after the handoff"
    );
    let record = sys.record(&id).await;
    assert_eq!(record.state, ConversationState::Queued);
    assert_eq!(record.queue_id, handed.queue_id);
    let pushed = sys
        .messages("nexus.delivery.v1")
        .await
        .iter()
        .any(|m| String::from_utf8_lossy(&m.payload).contains("Connecting you"));
    assert!(!pushed, "a push of the fallback notice");
}

/// A chat with a bot whose customer says "hello"; the bot's first call for it waits while the
/// bot hands off through the bot API, then answers `answer`. The turn is applied (again until
/// it goes through, as the consumer redelivers it); answers the chat's id and its record right
/// after the handoff.
async fn handed_off_during_its_call(
    sys: &Arc<Sys>,
    answer: fn() -> axum::response::Response,
) -> (String, Conversation) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (called_tx, mut called) = tokio::sync::mpsc::unbounded_channel::<()>();
    let release = Arc::new(tokio::sync::Notify::new());
    let app = {
        let (calls, release) = (calls.clone(), release.clone());
        axum::Router::new().route(
            "/bot",
            axum::routing::post(move || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let (called_tx, release) = (called_tx.clone(), release.clone());
                async move {
                    if n == 0 {
                        let _ = called_tx.send(());
                        release.notified().await;
                    }
                    answer()
                }
            }),
        )
    };
    let url = serve(app).await;
    let (bot, token) = sys.bot(&url).await;
    let id = sys.with_bot(&bot, BTreeMap::new()).await;
    let (event, message) = sys.customer_says(&id, "hello");
    let turn = {
        let sys = sys.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                match sys.worker.handle(&event, &message).await {
                    Ok(()) => return,
                    Err(HandleError::Retry(_)) => continue,
                    Err(e) => panic!("customer message: {e}"),
                }
            }
            panic!("the customer message never applied");
        })
    };
    tokio::time::timeout(Duration::from_secs(10), called.recv())
        .await
        .expect("the bot is called")
        .expect("called");

    let before = sys.messages(AGENT_TOPIC).await.len();
    let (status, body) = sys
        .bot_api(
            &token,
            "POST",
            &format!("/v1/bot/conversations/{id}/handoff"),
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(sys.apply_from(AGENT_TOPIC, before).await, 1);
    let handed = sys.record(&id).await;
    assert_eq!(handed.state, ConversationState::Queued);

    release.notify_one();
    turn.await.expect("turn task");
    (id, handed)
}

/// A bot that hands off through the bot API while its turn's call is still out, then answers
/// that call: the answer is not written after the handoff (the customer and the agent the
/// chat goes to never see it), as a bot API post racing a handoff is dropped. Before, the
/// replies went into the transcript and out to the customer after the handoff.
#[tokio::test]
async fn a_turn_answered_after_the_bot_handed_off_is_not_written() {
    let sys = Arc::new(sys().await);
    let (id, _) = handed_off_during_its_call(&sys, || {
        json!({"replies": [{"text": "late reply"}]})
            .to_string()
            .into_response()
    })
    .await;
    let texts = sys.texts(&id).await;
    assert!(
        !texts.iter().any(|t| t == "late reply"),
        "the answer was written after the handoff: {texts:?}"
    );
    assert_eq!(texts, ["hello"]);
    assert_eq!(sys.record(&id).await.state, ConversationState::Queued);
    // The customer's pushes hold no bot reply either.
    let pushed = sys
        .messages("nexus.delivery.v1")
        .await
        .iter()
        .any(|m| String::from_utf8_lossy(&m.payload).contains("late reply"));
    assert!(!pushed, "a push of the late reply");
}
