//! The conversation role's handlers on the embedded bus and session store: cases that need a
//! publish to fail at a chosen moment, which end-to-end tests cannot arrange.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::events::chat::{Channel, MessageKind, ParticipantKind};
use crate::stores::provisioning::{NewAgent, NewTenant, Provisioning};
use crate::stores::session::embedded::EmbeddedStore;
use crate::stores::session::{
    BotPending, Conversation, ConversationState, EntryKind, Party, PartyKind, Reserve, Routing,
};
use crate::topology::Topology;

const CONVERSATION: &str = "0193a4b2-0000-7000-8000-00000000c0de";

struct Rig {
    worker: ConversationWorker,
    bus: Arc<dyn Bus>,
    store: Arc<dyn SessionStore>,
    provisioning: Arc<Provisioning>,
    tenant: String,
    _dir: tempfile::TempDir,
}

/// Every topic but the interaction stream exists, so publishing there fails until
/// [`Rig::create_interaction_topic`]: a broker refusing that publish.
async fn rig() -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = crate::config::Config::defaults().bus;
    config.url = format!("embedded://{}", dir.path().join("bus").display());
    let bus = crate::bus::connect(&config).await.expect("bus");
    for spec in Topology::builtin().topic_specs() {
        if spec.name != INTERACTION_TOPIC {
            bus.apply_topic(&spec).await.expect("topic");
        }
    }
    let store: Arc<dyn SessionStore> = Arc::new(
        EmbeddedStore::open(&dir.path().join("sessions"))
            .await
            .expect("session store"),
    );
    let provisioning = Arc::new(Provisioning::temporary(dir.path()).await);
    let tenant = provisioning
        .create_tenant(NewTenant { name: "t".into() })
        .await
        .expect("tenant")
        .id;
    let worker = ConversationWorker::new(
        bus.clone(),
        store.clone(),
        provisioning.clone(),
        ConversationConfig {
            // Bots on loopback.
            allow_private_bots: true,
            ..ConversationConfig::default()
        },
        reqwest::Client::new(),
    );
    Rig {
        worker,
        bus,
        store,
        provisioning,
        tenant,
        _dir: dir,
    }
}

impl Rig {
    async fn create_interaction_topic(&self) {
        let spec = Topology::builtin()
            .topic_specs()
            .into_iter()
            .find(|s| s.name == INTERACTION_TOPIC)
            .expect("the interaction topic is in the topology");
        self.bus.apply_topic(&spec).await.expect("topic");
    }

    /// A topic's events, in order per partition (one conversation: one partition).
    async fn events(&self, topic: &str) -> Vec<Event> {
        let mut events = Vec::new();
        let offsets = self.bus.partition_offsets(topic).await.expect("offsets");
        for p in offsets {
            for m in self
                .bus
                .read(topic, p.partition, 0, 1_000)
                .await
                .expect("read")
            {
                events.push(crate::events::decode(&m.payload).expect("decode"));
            }
        }
        events
    }

    async fn transcript_len(&self) -> u64 {
        self.store
            .transcript_len(&self.tenant, CONVERSATION)
            .await
            .expect("transcript length")
    }

    fn event<B: crate::events::chat::Body>(&self, body: &B) -> Event {
        Event::typed(body, &self.tenant, CONVERSATION, "test").expect("event")
    }

    /// The saved record, or `fresh` if there is none yet.
    async fn record_or(&self, fresh: Conversation) -> Conversation {
        let saved = self
            .store
            .conversation(&self.tenant, CONVERSATION)
            .await
            .expect("load");
        saved.unwrap_or(fresh)
    }

    async fn record(&self) -> Conversation {
        self.store
            .conversation(&self.tenant, CONVERSATION)
            .await
            .expect("load")
            .expect("record")
    }

    /// Makes `agent` ready with one chat slot.
    async fn ready(&self, agent: &str, ready: bool) {
        let capacity = BTreeMap::from([(CHAT_MEDIA.to_string(), 1)]);
        self.store
            .set_presence(&self.tenant, agent, ready, &[], &capacity, 1)
            .await
            .expect("presence");
    }

    /// Applies a not-ready state of `agent` (for an agent not provisioned: deleted).
    async fn not_ready(&self, agent: &str) {
        let state = chat::AgentStateChanged {
            agent_id: agent.into(),
            state: chat::AgentState::NotReady,
            reason_code: None,
            capacity: BTreeMap::new(),
        };
        let event = Event::typed(&state, &self.tenant, agent, "test").expect("event");
        self.worker
            .on_agent_state(&event, state)
            .await
            .expect("applied");
    }

    /// Takes `agent`'s slot for the conversation, as a dispatch does.
    async fn reserve(&self, agent: &str) {
        let reserve = Reserve {
            conversation_id: CONVERSATION.into(),
            media: CHAT_MEDIA.into(),
            skills: Vec::new(),
            exclude: Vec::new(),
            only: Some(agent.into()),
            now_ms: 2,
        };
        let got = self
            .store
            .reserve_agent(&self.tenant, &reserve)
            .await
            .expect("reserve");
        assert_eq!(got.as_deref(), Some(agent), "reserved");
    }

    /// The conversation connected to alice, who holds its slot.
    async fn connect_alice(&self) {
        assert!(self
            .store
            .put_conversation(&connected(&self.tenant))
            .await
            .expect("put"));
        self.ready("alice", true).await;
        self.reserve("alice").await;
    }

    /// Provisions an agent; its id.
    async fn agent(&self, name: &str) -> String {
        self.provisioning
            .create_agent(
                &self.tenant,
                NewAgent {
                    name: name.into(),
                    skills: Vec::new(),
                    capacity: BTreeMap::new(),
                },
            )
            .await
            .expect("agent")
            .agent
            .id
    }

    async fn holders(&self) -> Vec<String> {
        self.store
            .slot_holders(&self.tenant, CONVERSATION)
            .await
            .expect("slot holders")
    }
}

/// A web chat of queue `q1` connected to agent `alice`.
fn connected(tenant: &str) -> Conversation {
    Conversation {
        tenant_id: tenant.into(),
        conversation_id: CONVERSATION.into(),
        channel: "WEB_CHAT".into(),
        state: ConversationState::Connected,
        customer: Party {
            participant_id: "customer-1".into(),
            nickname: "Lou".into(),
            kind: PartyKind::Customer,
        },
        contact: BTreeMap::new(),
        user_data: BTreeMap::new(),
        subject: None,
        queue_id: Some("q1".into()),
        bot_id: None,
        agent_id: Some("alice".into()),
        offered_to: None,
        declined_by: Vec::new(),
        files: 0,
        created_at_ms: 1,
        last_activity_ms: 1,
        closed_reason: None,
        routing: Routing::default(),
        version: 0,
    }
}

fn reply(text: &str) -> chat::MessageSent {
    chat::MessageSent {
        message_id: uuid::Uuid::new_v4().to_string(),
        participant_id: "agent-alice".into(),
        participant_kind: ParticipantKind::Agent,
        nickname: "Alice".into(),
        agent_id: Some("alice".into()),
        kind: MessageKind::Text,
        text: Some(text.into()),
        media_ids: Vec::new(),
        in_reply_to: None,
        transcript_position: None,
        visibility: chat::Visibility::All,
    }
}

fn customer_says(text: &str) -> chat::MessageReceived {
    chat::MessageReceived {
        message_id: uuid::Uuid::new_v4().to_string(),
        client_message_id: None,
        channel: Channel::WebChat,
        channel_id: None,
        participant_id: "customer-1".into(),
        participant_kind: ParticipantKind::Customer,
        nickname: None,
        contact: Default::default(),
        kind: MessageKind::Text,
        text: Some(text.into()),
        media_ids: Vec::new(),
        sent_at: None,
        transcript_position: None,
    }
}

fn texts_after_close(events: &[Event]) -> Vec<(String, Option<String>, Option<i64>)> {
    let closed = events
        .iter()
        .position(|e| e.envelope.event_type == chat::ConversationClosed::TYPE)
        .expect("ConversationClosed on the interaction stream");
    events[closed + 1..]
        .iter()
        .map(|e| {
            let (text, position) = match e.envelope.event_type.as_str() {
                chat::MessageSent::TYPE => {
                    let b: chat::MessageSent = e.body_as().expect("body");
                    (b.text, b.transcript_position)
                }
                chat::MessageReceived::TYPE => {
                    let b: chat::MessageReceived = e.body_as().expect("body");
                    (b.text, b.transcript_position)
                }
                _ => (None, None),
            };
            (e.envelope.event_type.clone(), text, position)
        })
        .collect()
}

/// A reply and a customer message stored just before the agent completed, whose interaction
/// events then failed to publish, are published on their redelivery after the close (history
/// and webhooks learn of what the transcript holds); a send that stored nothing before the
/// close is dropped and adds nothing.
#[tokio::test]
async fn a_send_stored_before_the_close_is_published_on_its_redelivery() {
    let rig = rig().await;
    assert!(rig
        .store
        .put_conversation(&connected(&rig.tenant))
        .await
        .expect("put"));

    let agent_reply = reply("one moment");
    let agent_event = rig.event(&agent_reply);
    let customer = customer_says("thanks, bye");
    let customer_event = rig.event(&customer);
    let failed = rig
        .worker
        .on_agent_message(&agent_event, agent_reply.clone())
        .await;
    assert!(
        matches!(failed, Err(HandleError::Retry(_))),
        "the interaction publish failed: {failed:?}"
    );
    let failed = rig
        .worker
        .on_customer_message(&customer_event, customer.clone())
        .await;
    assert!(
        matches!(failed, Err(HandleError::Retry(_))),
        "the interaction publish failed: {failed:?}"
    );
    assert_eq!(
        rig.transcript_len().await,
        2,
        "both stored before the close"
    );

    // The broker is back; the agent completes before either send is redelivered.
    rig.create_interaction_topic().await;
    let complete = alice_completes();
    rig.worker
        .on_completed(&rig.event(&complete), complete.clone())
        .await
        .expect("complete");
    assert_eq!(rig.record().await.state, ConversationState::Closed);
    let length = rig.transcript_len().await;
    assert_eq!(length, 3, "the agent's leaving is the last entry");

    // Redelivered after the close: their events go out.
    rig.worker
        .on_agent_message(&agent_event, agent_reply)
        .await
        .expect("redelivered reply");
    rig.worker
        .on_customer_message(&customer_event, customer)
        .await
        .expect("redelivered customer message");
    // A send that arrives after the close stored nothing: dropped, not retried.
    let late = reply("are you still there?");
    rig.worker
        .on_agent_message(&rig.event(&late), late.clone())
        .await
        .expect("a send after the close is dropped");
    assert_eq!(
        rig.transcript_len().await,
        length,
        "nothing appended after the close"
    );

    let after = texts_after_close(&rig.events(INTERACTION_TOPIC).await);
    assert_eq!(
        after,
        vec![
            (
                chat::MessageSent::TYPE.to_string(),
                Some("one moment".to_string()),
                Some(1)
            ),
            (
                chat::MessageReceived::TYPE.to_string(),
                Some("thanks, bye".to_string()),
                Some(2)
            ),
        ]
    );
}

fn offer(agent: &str, attempt: i32) -> chat::AgentOffered {
    chat::AgentOffered {
        offer_id: super::flow::offer_id(CONVERSATION, agent, attempt as usize),
        agent_id: agent.into(),
        queue_id: Some("q1".into()),
        channel: Channel::WebChat,
        channel_id: None,
        customer_nickname: "Lou".into(),
        expires_at: 0,
        attempt,
    }
}

/// An offer made from an older copy of the record is stale. It frees the slot it reserved when
/// its agent had declined (nothing else would, until the close), and keeps the slot when its
/// agent holds the conversation another way (here as consultant).
#[tokio::test]
async fn a_stale_offer_frees_a_declined_agent_and_keeps_a_consultant() {
    let rig = rig().await;
    let mut queued = connected(&rig.tenant);
    queued.state = ConversationState::Queued;
    queued.agent_id = None;
    queued.declined_by = vec!["bob".into()];
    queued.routing.offers = 1;
    assert!(rig.store.put_conversation(&queued).await.expect("put"));
    rig.ready("bob", true).await;
    rig.reserve("bob").await;
    let stale = offer("bob", 2);
    rig.worker
        .on_offered(&rig.event(&stale), stale.clone())
        .await
        .expect("stale offer");
    assert_eq!(
        rig.holders().await,
        Vec::<String>::new(),
        "the declined agent's slot"
    );

    let mut with_consultant = connected(&rig.tenant);
    with_consultant.routing.consultant = Some("carol".into());
    with_consultant.version = rig.record().await.version;
    assert!(rig
        .store
        .put_conversation(&with_consultant)
        .await
        .expect("put"));
    rig.ready("carol", true).await;
    rig.reserve("carol").await;
    let stale = offer("carol", 1);
    rig.worker
        .on_offered(&rig.event(&stale), stale.clone())
        .await
        .expect("stale offer");
    assert_eq!(
        rig.holders().await,
        ["carol"],
        "the consultant keeps its slot"
    );
}

/// A dispatch working from a copy of the record taken before the conversation closed reserves
/// nobody (the store refuses a closed conversation): no offer, no slot held for good.
#[tokio::test]
async fn an_offer_for_a_conversation_closed_meanwhile_takes_no_slot() {
    let rig = rig().await;
    let mut queued = connected(&rig.tenant);
    queued.state = ConversationState::Queued;
    queued.agent_id = None;
    let mut closed = queued.clone();
    closed.state = ConversationState::Closed;
    assert!(rig.store.put_conversation(&closed).await.expect("put"));
    rig.ready("bob", true).await;
    let source = rig.event(&customer_says("hello"));
    let went_on = rig
        .worker
        .try_offer(&queued, &source, 3)
        .await
        .expect("try offer");
    assert!(went_on, "the dispatch goes on to the next waiter");
    assert_eq!(rig.holders().await, Vec::<String>::new(), "no slot held");
}

/// The offer a queued chat was waiting for loses its save to the customer's leaving (the
/// close saved a record naming no offered agent), though its push may have reached the desk:
/// applied again on the closed record, it withdraws itself from that agent's desk by its id.
/// An older attempt's offer, never the one waited for, tells nobody.
#[tokio::test]
async fn an_offer_that_lost_its_save_to_a_close_tells_its_agent() {
    let rig = rig().await;
    let mut closed = connected(&rig.tenant);
    closed.state = ConversationState::Closed;
    closed.agent_id = None;
    closed.routing.offers = 1;
    closed.closed_reason = Some("CUSTOMER_LEFT".into());
    assert!(rig.store.put_conversation(&closed).await.expect("put"));
    let older = offer("bob", 1);
    rig.worker
        .on_offered(&rig.event(&older), older)
        .await
        .expect("older offer");
    let waited_for = offer("erin", 2);
    rig.worker
        .on_offered(&rig.event(&waited_for), waited_for.clone())
        .await
        .expect("offer after the close");
    let told: Vec<chat::ClientEvent> = rig
        .events(DELIVERY_TOPIC)
        .await
        .iter()
        .filter_map(|e| e.body_as::<chat::ClientEvent>().ok())
        .collect();
    assert_eq!(told.len(), 1, "only the offer waited for: {told:?}");
    assert_eq!(told[0].to_agents, ["erin"]);
    assert!(!told[0].to_customer);
    assert_eq!(told[0].kind, chat::ClientEventKind::OfferClosed);
    let data: serde_json::Value = serde_json::from_str(&told[0].data).expect("json");
    assert_eq!(data["offer_id"], waited_for.offer_id.as_str());
    assert_eq!(rig.holders().await, Vec::<String>::new(), "no slot held");
}

/// A transfer that already freed the agent and told everyone stands when it is applied again
/// (its save was lost to a concurrent write, or the worker died before it), even though its
/// named target stopped taking chats in between: the agent must not keep a chat whose slot
/// was given back.
#[tokio::test]
async fn a_transfer_applied_again_is_not_refused_after_the_fact() {
    let rig = rig().await;
    let bob = rig.agent("Bob").await;
    rig.connect_alice().await;
    rig.ready(&bob, true).await;
    rig.create_interaction_topic().await;
    let before = rig.record().await;
    let transfer = alice_transfers(&bob, chat::TransferMode::Transfer);
    let event = rig.event(&transfer);
    rig.worker
        .on_transfer(&event, transfer.clone())
        .await
        .expect("transfer");
    assert_eq!(rig.record().await.state, ConversationState::Queued);

    // The save is lost (the record as it was), and Bob stops taking chats.
    let mut lost = before.clone();
    lost.version = rig.record().await.version;
    assert!(rig.store.put_conversation(&lost).await.expect("put"));
    rig.ready(&bob, false).await;
    rig.worker
        .on_transfer(&event, transfer)
        .await
        .expect("transfer again");
    let after = rig.record().await;
    assert_eq!(after.state, ConversationState::Queued, "{after:?}");
    assert_eq!(after.agent_id, None);
    assert_eq!(after.declined_by, ["alice"]);
    assert!(
        !rig.holders().await.contains(&"alice".to_string()),
        "alice's slot was given back"
    );
}

/// Alice asks to hand the conversation to agent `target` (or to invite it, by `mode`).
fn alice_transfers(target: &str, mode: chat::TransferMode) -> chat::TransferRequested {
    chat::TransferRequested {
        agent_id: "alice".into(),
        participant_id: "agent-alice".into(),
        target_kind: chat::TargetKind::Agent,
        target_id: target.into(),
        mode,
        note: None,
        user_data: BTreeMap::new(),
    }
}

/// Alice completes the conversation and closes it.
fn alice_completes() -> chat::ConversationCompleted {
    chat::ConversationCompleted {
        agent_id: "alice".into(),
        participant_id: "agent-alice".into(),
        disposition: None,
        note: None,
        user_data: BTreeMap::new(),
        close_conversation: true,
    }
}

/// A close applied again (its first delivery died after the save, before its release) releases
/// a slot reserved for the conversation after the first delivery read the holders.
#[tokio::test]
async fn a_redelivered_close_releases_a_slot_taken_meanwhile() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let complete = alice_completes();
    let event = rig.event(&complete);
    // The first delivery: the agent's leaving stored, the record saved closed.
    let mut record = connected(&rig.tenant);
    assert!(rig.store.put_conversation(&record).await.expect("put"));
    let left = crate::stores::session::NewEntry {
        event_id: chat::derived_id(&event.envelope.event_id, "left").to_string(),
        kind: crate::stores::session::EntryKind::ParticipantLeft,
        from: Party {
            participant_id: "agent-alice".into(),
            nickname: "alice".into(),
            kind: PartyKind::Agent,
        },
        text: None,
        message_id: None,
        data: BTreeMap::new(),
        at_ms: 1,
    };
    rig.store
        .append(&rig.tenant, CONVERSATION, &left)
        .await
        .expect("append");
    // A dispatch from an older copy reserves between the close's read of the holders and its
    // save (after the save, the store refuses).
    rig.ready("bob", true).await;
    rig.reserve("bob").await;
    record.state = ConversationState::Closed;
    record.version = 1;
    record
        .routing
        .mark_applied(event.envelope.event_id.to_string());
    assert!(rig.store.put_conversation(&record).await.expect("put"));
    rig.worker
        .on_completed(&event, complete)
        .await
        .expect("redelivered close");
    assert_eq!(rig.holders().await, Vec::<String>::new());
}

/// A bot endpoint on loopback: answers one reply while `up`, 503 otherwise.
async fn bot_server(up: Arc<std::sync::atomic::AtomicBool>) -> String {
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move || {
            let up = up.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if up {
                    (
                        axum::http::StatusCode::OK,
                        r#"{"replies":[{"text":"hello from the bot"}]}"#,
                    )
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "")
                }
            }
        }),
    );
    serve(app).await
}

/// A customer message whose bot was down fell back to the queue and told the customer so; its
/// save was lost and it is applied again with the bot back: it falls back again rather than
/// leaving the conversation with the bot after "Connecting you to an agent.".
#[tokio::test]
async fn a_bot_fallback_is_decided_once() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = bot_server(up.clone()).await;
    with_bot_at(&rig, url, BTreeMap::new()).await;
    let before = rig.record().await;
    let said = customer_says("I need help");
    let event = rig.event(&said);
    rig.worker
        .on_customer_message(&event, said.clone())
        .await
        .expect("message");
    assert_eq!(rig.record().await.state, ConversationState::Queued);
    let length = rig.transcript_len().await;

    // The save is lost (the record as it was); the bot is back.
    let mut lost = before.clone();
    lost.version = rig.record().await.version;
    assert!(rig.store.put_conversation(&lost).await.expect("put"));
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    rig.worker
        .on_customer_message(&event, said)
        .await
        .expect("message again");
    assert_eq!(rig.record().await.state, ConversationState::Queued);
    assert_eq!(rig.transcript_len().await, length, "no bot reply added");
}

/// A bot answer past the chat limits (a reply longer than `chat.max_message_chars`, with a
/// handoff) is refused whole: the conversation falls back to its queue, and no part of the
/// answer is written (before, the reply was appended, its event refused as too large, and the
/// handoff in the same answer lost with it).
#[tokio::test]
async fn a_bot_answer_past_the_limits_falls_back_to_the_queue() {
    let mut rig = rig().await;
    rig.worker.max_message_chars = 20;
    rig.create_interaction_topic().await;
    let answer = serde_json::json!({"replies": [{"text": "x".repeat(21)}],
        "handoff": {"user_data": {"topic": "billing"}}});
    with_a_bot_answering(&rig, answer, BTreeMap::new()).await;
    let length = rig.transcript_len().await;
    let said = customer_says("I need help");
    rig.worker
        .on_customer_message(&rig.event(&said), said)
        .await
        .expect("message");
    let record = rig.record().await;
    assert_eq!(record.state, ConversationState::Queued);
    assert!(
        !record.user_data.contains_key("topic"),
        "no part of the answer applied"
    );
    let texts = texts_from(&rig, length + 1).await;
    assert_eq!(texts, ["I need help", "Connecting you to an agent."]);
}

/// A bot endpoint on loopback that notes the text of every message it is sent and answers
/// `reply to <text>` while `up`, 503 otherwise.
async fn noting_bot(
    up: Arc<std::sync::atomic::AtomicBool>,
) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let noted = seen.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| {
            let text = body["message"]["text"].as_str().unwrap_or("").to_string();
            noted.lock().expect("lock").push(text.clone());
            let up = up.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if up {
                    let answer =
                        serde_json::json!({"replies": [{"text": format!("reply to {text}")}]});
                    (axum::http::StatusCode::OK, answer.to_string())
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, String::new())
                }
            }
        }),
    );
    (serve(app).await, seen)
}

/// Fires the due bot timers as at `now` and applies the turns they published; how many.
async fn bot_turns_due(
    rig: &Rig,
    now: i64,
    applied: &mut std::collections::HashSet<String>,
) -> usize {
    timers::run_once(&rig.worker, now).await;
    let mut n = 0;
    for event in rig.events(AGENT_TOPIC).await {
        if event.envelope.event_type != chat::BotTurnDue::TYPE
            || !applied.insert(event.envelope.event_id.to_string())
        {
            continue;
        }
        let due: chat::BotTurnDue = event.body_as().expect("body");
        // Twice, as a redelivery would: the second changes nothing.
        for _ in 0..2 {
            rig.worker
                .on_bot_turn_due(&event, due.clone())
                .await
                .expect("bot turn");
        }
        n += 1;
    }
    n
}

/// The texts of the transcript from `from` on.
async fn texts_from(rig: &Rig, from: u64) -> Vec<String> {
    rig.store
        .transcript(&rig.tenant, CONVERSATION, from, 100)
        .await
        .expect("transcript")
        .into_iter()
        .filter_map(|e| e.entry.text)
        .collect()
}

/// `bot_fallback = "retry"` with the bot down: the customer's message is handled (not retried
/// on the consumer's lane, which would hold every conversation sharing it) and stays pending
/// in the record; a later message waits behind it without a call. When the bot is back, the
/// timer's turns send both, one at a time in order, each once.
#[tokio::test]
async fn a_down_bots_turns_wait_in_the_record_and_follow_in_order() {
    let mut rig = rig().await;
    rig.worker.config.bot_fallback = super::config::BotFallback::Retry;
    // Every try calls the bot (the window after a failure is tested on its own).
    rig.worker.bots_down = bot::DownBots::new(std::time::Duration::ZERO);
    rig.create_interaction_topic().await;
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, seen) = noting_bot(up.clone()).await;
    with_bot_at(&rig, url, BTreeMap::new()).await;
    let start = rig.transcript_len().await + 1;
    for text in ["one", "two"] {
        let said = customer_says(text);
        rig.worker
            .on_customer_message(&rig.event(&said), said)
            .await
            .expect("handled, not retried in place");
    }
    let record = rig.record().await;
    assert_eq!(record.state, ConversationState::Bot);
    let pending = record.routing.bot_pending.expect("a turn pending");
    assert_eq!((pending.position, pending.attempt), (start, 1));
    assert_eq!(*seen.lock().expect("lock"), ["one"], "two waits behind one");

    // Still down: tried again, pending on, no reply.
    let mut applied = std::collections::HashSet::new();
    let later = chrono::Utc::now().timestamp_millis() + 60_000;
    assert_eq!(bot_turns_due(&rig, later, &mut applied).await, 1);
    let pending = rig.record().await.routing.bot_pending.expect("pending");
    assert_eq!((pending.position, pending.attempt), (start, 2));

    up.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(bot_turns_due(&rig, later + 60_000, &mut applied).await, 1);
    let pending = rig.record().await.routing.bot_pending.expect("two pending");
    assert_eq!((pending.position, pending.attempt), (start + 1, 0));
    assert_eq!(bot_turns_due(&rig, later + 120_000, &mut applied).await, 1);
    let record = rig.record().await;
    assert_eq!(record.routing.bot_pending, None);
    assert_eq!(record.state, ConversationState::Bot);
    assert_eq!(
        *seen.lock().expect("lock"),
        ["one", "one", "one", "two"],
        "each answered once, in order"
    );
    assert_eq!(
        texts_from(&rig, start).await,
        ["one", "two", "reply to one", "reply to two"]
    );
    assert_eq!(bot_turns_due(&rig, later + 180_000, &mut applied).await, 0);

    // Answered: the next message goes to the bot at once.
    let said = customer_says("three");
    rig.worker
        .on_customer_message(&rig.event(&said), said)
        .await
        .expect("message");
    assert_eq!(
        seen.lock().expect("lock").last().map(String::as_str),
        Some("three")
    );
}

/// A bot seen down is not called again until its window ends: a retry within it fails as the
/// last call did (one handler per pod waits on a bot that times out, not one per chat), and a
/// redelivered message whose turn already ran calls the bot with the same idempotency key.
#[tokio::test]
async fn a_bot_seen_down_is_not_called_again_within_its_window() {
    let mut rig = rig().await;
    rig.worker.config.bot_fallback = super::config::BotFallback::Retry;
    rig.create_interaction_topic().await;
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, seen) = noting_bot(up.clone()).await;
    with_bot_at(&rig, url, BTreeMap::new()).await;
    let said = customer_says("one");
    let first = rig.event(&said);
    rig.worker
        .on_customer_message(&first, said.clone())
        .await
        .expect("message");
    let mut applied = std::collections::HashSet::new();
    let later = chrono::Utc::now().timestamp_millis() + 60_000;
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(bot_turns_due(&rig, later, &mut applied).await, 1);
    assert_eq!(
        seen.lock().expect("lock").len(),
        1,
        "not called within the window"
    );
    let pending = rig.record().await.routing.bot_pending.expect("pending");
    assert_eq!(pending.attempt, 2);

    // The window ends: the next turn calls and is answered.
    rig.worker.bots_down = bot::DownBots::new(std::time::Duration::ZERO);
    assert_eq!(bot_turns_due(&rig, later + 60_000, &mut applied).await, 1);
    assert_eq!(rig.record().await.routing.bot_pending, None);
    let start = rig.transcript_len().await;
    // The customer's message redelivered (its first handling's save lost): its turn is the
    // one already answered, under the same ids, so nothing is added.
    let mut lost = rig.record().await;
    lost.routing
        .applied
        .retain(|id| *id != first.envelope.event_id.to_string());
    assert!(rig.store.put_conversation(&lost).await.expect("put"));
    rig.worker
        .on_customer_message(&first, said)
        .await
        .expect("redelivered");
    assert_eq!(rig.transcript_len().await, start, "no second answer");
}

/// A down bot's message retried for `bot_retry_max_s` goes to the conversation's queue after
/// all, with the notice a `queue` fallback gives.
#[tokio::test]
async fn a_bot_down_past_its_retry_time_hands_off_to_the_queue() {
    let mut rig = rig().await;
    rig.worker.bots_down = bot::DownBots::new(std::time::Duration::ZERO);
    rig.worker.config.bot_fallback = super::config::BotFallback::Retry;
    rig.worker.config.bot_retry_max_s = 1;
    rig.create_interaction_topic().await;
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, seen) = noting_bot(up).await;
    with_bot_at(&rig, url, BTreeMap::new()).await;
    let start = rig.transcript_len().await + 1;
    let said = customer_says("help");
    rig.worker
        .on_customer_message(&rig.event(&said), said)
        .await
        .expect("message");
    assert_eq!(rig.record().await.state, ConversationState::Bot);
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let mut applied = std::collections::HashSet::new();
    let later = chrono::Utc::now().timestamp_millis() + 60_000;
    assert_eq!(bot_turns_due(&rig, later, &mut applied).await, 1);
    let record = rig.record().await;
    assert_eq!(record.state, ConversationState::Queued);
    assert_eq!(record.routing.bot_pending, None);
    assert_eq!(seen.lock().expect("lock").len(), 2);
    assert_eq!(
        texts_from(&rig, start).await,
        ["help", "Connecting you to an agent."]
    );
}

/// A bot endpoint on loopback answering its calls with `answers` in turn, the last one from
/// then on: a status with its `Retry-After`, and for a 200 `reply to <text>`. How many calls
/// it had.
async fn scripted_bot(
    answers: Vec<(u16, Option<String>)>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let answers = Arc::new(answers);
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (status, retry_after) = answers
                .get(n)
                .or(answers.last())
                .cloned()
                .unwrap_or((200, None));
            let text = body["message"]["text"].as_str().unwrap_or("").to_string();
            async move {
                let mut response = axum::http::Response::builder().status(status);
                if let Some(wait) = retry_after {
                    response = response.header("retry-after", wait);
                }
                let body = if status == 200 {
                    serde_json::json!({"replies": [{"text": format!("reply to {text}")}]})
                        .to_string()
                } else {
                    String::new()
                };
                response
                    .body(axum::body::Body::from(body))
                    .expect("response")
            }
        }),
    );
    (serve(app).await, calls)
}

/// `nexus_bot_calls_total{outcome}` as /metrics renders it.
fn bot_calls(outcome: &str) -> f64 {
    crate::telemetry::init_metrics()
        .render()
        .lines()
        .find(|l| {
            l.starts_with(crate::telemetry::metrics::BOT_CALLS_TOTAL)
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Moves the pending turn's first try `by_ms` earlier (and sets its try count), as if it had
/// been tried that long already; the turn as saved.
async fn pending_since(rig: &Rig, by_ms: i64, attempt: Option<u32>) -> BotPending {
    let mut record = rig.record().await;
    let pending = record.routing.bot_pending.as_mut().expect("a turn pending");
    pending.since_ms -= by_ms;
    if let Some(attempt) = attempt {
        pending.attempt = attempt;
    }
    let pending = pending.clone();
    assert!(rig.store.put_conversation(&record).await.expect("put"));
    pending
}

/// The try due next after a down bot's backoff is at its deadline at the latest: the last try
/// is at `bot_retry_max_s`, and it hands the conversation to its queue then (before, the next
/// try came a whole backoff later, up to 30 s past the deadline).
#[tokio::test]
async fn a_down_bots_last_try_is_at_its_deadline() {
    let mut rig = rig().await;
    rig.worker.bots_down = bot::DownBots::new(std::time::Duration::ZERO);
    rig.worker.config.bot_fallback = super::config::BotFallback::Retry;
    rig.create_interaction_topic().await;
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, seen) = noting_bot(up).await;
    with_bot_at(&rig, url, BTreeMap::new()).await;
    let start = rig.transcript_len().await + 1;
    let said = customer_says("help");
    rig.worker
        .on_customer_message(&rig.event(&said), said)
        .await
        .expect("message");
    // Tried for 288 s, 5 tries: the next backoff (15 to 30 s) ends past the deadline, 12 s away.
    let pending = pending_since(&rig, 288_000, Some(5)).await;
    let deadline = pending.since_ms + 300_000;
    let mut applied = std::collections::HashSet::new();
    assert_eq!(bot_turns_due(&rig, now_ms() + 2_000, &mut applied).await, 1);
    assert_eq!(rig.record().await.state, ConversationState::Bot);
    assert_eq!(bot_turns_due(&rig, deadline - 1, &mut applied).await, 0);

    // At the deadline (the record's clock moved past it, as the timer's is then): tried a last
    // time, and handed to the queue.
    pending_since(&rig, 20_000, None).await;
    assert_eq!(bot_turns_due(&rig, deadline, &mut applied).await, 1);
    let record = rig.record().await;
    assert_eq!(record.state, ConversationState::Queued);
    assert_eq!(record.routing.bot_pending, None);
    assert_eq!(seen.lock().expect("lock").len(), 3);
    assert_eq!(
        texts_from(&rig, start).await,
        ["help", "Connecting you to an agent."]
    );
}

/// With `retry`, a bot answering 429 is up, asking for fewer calls: its turn waits what
/// `Retry-After` asks (seconds or an HTTP date), at most until the turn's deadline, and the
/// bot is not taken for down (this pod calls it again at once for other turns). Counted as
/// `outcome="throttled"`, not as failed.
#[tokio::test]
async fn a_throttled_bot_is_waited_for_as_it_asks() {
    let mut rig = rig().await;
    rig.worker.config.bot_fallback = super::config::BotFallback::Retry;
    rig.create_interaction_topic().await;
    let far = httpdate::fmt_http_date(
        std::time::SystemTime::now() + std::time::Duration::from_secs(3_600),
    );
    let (url, calls) =
        scripted_bot(vec![(429, Some("7".into())), (429, Some(far)), (200, None)]).await;
    with_bot_at(&rig, url, BTreeMap::new()).await;
    let start = rig.transcript_len().await + 1;
    let throttled = bot_calls("throttled");
    let said = customer_says("help");
    let before = now_ms();
    rig.worker
        .on_customer_message(&rig.event(&said), said)
        .await
        .expect("message");
    let after = now_ms();
    let record = rig.record().await;
    assert_eq!(record.state, ConversationState::Bot);
    let pending = record.routing.bot_pending.expect("a turn pending");
    assert_eq!(pending.attempt, 1);
    assert_eq!(
        texts_from(&rig, start).await,
        ["help"],
        "no fallback notice"
    );
    let bot = (rig.tenant.clone(), record.bot_id.clone().expect("bot"));
    assert!(
        rig.worker.bots_down.recently(&bot).is_none(),
        "not seen down"
    );

    // Retry-After: 7 (seconds).
    let mut applied = std::collections::HashSet::new();
    assert_eq!(bot_turns_due(&rig, before + 6_000, &mut applied).await, 0);
    assert_eq!(bot_turns_due(&rig, after + 7_000, &mut applied).await, 1);
    // An HTTP date an hour ahead: capped at the turn's deadline.
    let deadline = pending.since_ms + 300_000;
    assert_eq!(
        rig.record().await.routing.bot_pending.map(|p| p.attempt),
        Some(2)
    );
    assert_eq!(bot_turns_due(&rig, deadline - 1, &mut applied).await, 0);
    assert_eq!(bot_turns_due(&rig, deadline, &mut applied).await, 1);
    let record = rig.record().await;
    assert_eq!(record.state, ConversationState::Bot);
    assert_eq!(record.routing.bot_pending, None);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(texts_from(&rig, start).await, ["help", "reply to help"]);
    // Other tests may count too, never less.
    assert!(bot_calls("throttled") >= throttled + 2.0);
}

/// With `queue`, a 429 does not send the conversation to its queue at once (a bot shedding
/// load would flood the agents): the turn waits what the bot asks, for up to 30 s from its
/// first try, then goes to the queue as from a bot down.
#[tokio::test]
async fn a_throttled_bot_keeps_its_conversation_for_a_while_with_queue_fallback() {
    let rig = rig().await;
    assert_eq!(
        rig.worker.config.bot_fallback,
        super::config::BotFallback::Queue
    );
    rig.create_interaction_topic().await;
    let (url, calls) = scripted_bot(vec![
        (429, Some("2".into())),
        (200, None),
        (429, Some("3600".into())),
    ])
    .await;
    with_bot_at(&rig, url, BTreeMap::new()).await;
    let start = rig.transcript_len().await + 1;
    let said = customer_says("help");
    rig.worker
        .on_customer_message(&rig.event(&said), said)
        .await
        .expect("message");
    let after = now_ms();
    assert_eq!(rig.record().await.state, ConversationState::Bot);
    assert_eq!(
        texts_from(&rig, start).await,
        ["help"],
        "no fallback notice"
    );
    let mut applied = std::collections::HashSet::new();
    assert_eq!(bot_turns_due(&rig, after + 2_000, &mut applied).await, 1);
    assert_eq!(rig.record().await.routing.bot_pending, None);
    assert_eq!(texts_from(&rig, start).await, ["help", "reply to help"]);

    // Still throttled 30 s on: the last try is then, and the conversation goes to the queue.
    let said = customer_says("more");
    rig.worker
        .on_customer_message(&rig.event(&said), said)
        .await
        .expect("message");
    let pending = rig.record().await.routing.bot_pending.expect("pending");
    let deadline = pending.since_ms + 30_000;
    assert_eq!(bot_turns_due(&rig, deadline - 1, &mut applied).await, 0);
    pending_since(&rig, 31_000, None).await;
    assert_eq!(bot_turns_due(&rig, deadline, &mut applied).await, 1);
    let record = rig.record().await;
    assert_eq!(record.state, ConversationState::Queued);
    assert_eq!(record.routing.bot_pending, None);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4);
    assert_eq!(
        texts_from(&rig, start).await,
        [
            "help",
            "reply to help",
            "more",
            "Connecting you to an agent."
        ]
    );
}

/// Puts the rig's conversation with a bot that answers every turn with `answer`.
async fn with_a_bot_answering(
    rig: &Rig,
    answer: serde_json::Value,
    user_data: BTreeMap<String, String>,
) {
    let answer = answer.to_string();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move || {
            let answer = answer.clone();
            async move { answer }
        }),
    );
    with_bot_at(rig, serve(app).await, user_data).await;
}

/// Serves `app` on loopback; its URL.
async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Puts the rig's conversation with a bot endpoint at `url`, holding `user_data`.
async fn with_bot_at(rig: &Rig, url: String, user_data: BTreeMap<String, String>) {
    let bot = rig
        .provisioning
        .create_bot(
            &rig.tenant,
            crate::stores::provisioning::NewBot {
                name: "Bot".into(),
                url,
                credential: "secret".into(),
            },
        )
        .await
        .expect("bot")
        .bot
        .id;
    let mut with_bot = connected(&rig.tenant);
    with_bot.state = ConversationState::Bot;
    with_bot.agent_id = None;
    with_bot.bot_id = Some(bot);
    with_bot.user_data = user_data;
    assert!(rig.store.put_conversation(&with_bot).await.expect("put"));
}

/// A handoff whose context would take the conversation's user data past its limit hands off
/// without it: the record stays bounded, as for a customer's updates (before, the context was
/// added whatever the total).
#[tokio::test]
async fn a_handoff_context_past_the_user_data_limit_is_not_added() {
    let mut rig = rig().await;
    rig.worker.max_user_data_entries = 2;
    rig.create_interaction_topic().await;
    let answer = serde_json::json!({"handoff": {"user_data": {"b": "2", "c": "3"}}});
    let before = BTreeMap::from([("a".to_string(), "1".to_string())]);
    with_a_bot_answering(&rig, answer, before.clone()).await;
    let said = customer_says("help");
    rig.worker
        .on_customer_message(&rig.event(&said), said)
        .await
        .expect("message");
    let record = rig.record().await;
    assert_eq!(record.state, ConversationState::Queued);
    assert_eq!(record.user_data, before);
}

/// A start replayed after its conversation's record expired (a replay reaching back past
/// `closed_retention_s`) starts nothing: no record, no transcript, no offer.
#[tokio::test]
async fn a_start_older_than_the_retention_is_not_started_again() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let start = chat::ConversationRequested {
        channel: Channel::WebChat,
        channel_id: None,
        service: None,
        participant_id: "customer-1".into(),
        nickname: "Ann".into(),
        contact: Default::default(),
        subject: None,
        first_message: Some("hello".into()),
        user_data: Default::default(),
        is_async: false,
    };
    let mut old = rig.event(&start);
    let retention_ms = i64::try_from(rig.worker.config.closed_retention_s * 1000).expect("ms");
    old.envelope.occurred_at_ms = chrono::Utc::now().timestamp_millis() - retention_ms - 60_000;
    rig.worker
        .on_requested(&old, start.clone())
        .await
        .expect("old start");
    assert!(rig
        .store
        .conversation(&rig.tenant, CONVERSATION)
        .await
        .expect("read")
        .is_none());
    assert_eq!(rig.transcript_len().await, 0);
    assert!(rig.events(INTERACTION_TOPIC).await.is_empty());
    assert!(rig.events(DELIVERY_TOPIC).await.is_empty());

    // A recent one starts.
    rig.worker
        .on_requested(&rig.event(&start), start)
        .await
        .expect("start");
    assert!(rig
        .store
        .conversation(&rig.tenant, CONVERSATION)
        .await
        .expect("read")
        .is_some());
}

/// How many `closed` states the delivery topic holds for `agent`.
async fn closed_told(rig: &Rig, agent: &str) -> usize {
    rig.events(DELIVERY_TOPIC)
        .await
        .iter()
        .filter_map(|e| e.body_as::<chat::ClientEvent>().ok())
        .filter(|c| c.data.contains(r#""closed""#) && c.to_agents.iter().any(|a| a == agent))
        .count()
}

/// The customer leaves while the chat is offered to an agent: the close tells that agent, and
/// so does its redelivery (the first may have died after its save, before telling anyone),
/// though the close cleared the offer from the record.
#[tokio::test]
async fn a_redelivered_close_tells_the_agent_it_was_offered_to() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let mut offered = connected(&rig.tenant);
    offered.state = ConversationState::Offered;
    offered.agent_id = None;
    offered.offered_to = Some("dave".into());
    assert!(rig.store.put_conversation(&offered).await.expect("put"));
    let left = chat::ParticipantLeft {
        participant_id: "customer-1".into(),
        participant_kind: ParticipantKind::Customer,
        nickname: None,
        reason: chat::LeftReason::Left,
        transcript_position: None,
        visibility: chat::Visibility::All,
    };
    let event = rig.event(&left);
    rig.worker
        .on_customer_left(&event, left.clone())
        .await
        .expect("close");
    let closed = rig.record().await;
    assert_eq!(closed.state, ConversationState::Closed);
    assert_eq!(closed.offered_to, None);
    assert_eq!(closed_told(&rig, "dave").await, 1);
    rig.worker
        .on_customer_left(&event, left)
        .await
        .expect("redelivered close");
    assert_eq!(closed_told(&rig, "dave").await, 2, "told again");
}

/// Updates that each passed the edge's check can race past the limit together: the worker
/// applies none that would make the chat carry more entries than the limit.
#[tokio::test]
async fn user_data_stays_within_the_limit_when_updates_race() {
    let mut rig = rig().await;
    rig.worker.max_user_data_entries = 2;
    let mut c = connected(&rig.tenant);
    c.user_data = BTreeMap::from([("k0".into(), "v".into()), ("k1".into(), "v".into())]);
    assert!(rig.store.put_conversation(&c).await.expect("put"));
    let update = |set: &[(&str, &str)], remove: &[&str]| chat::UserDataUpdated {
        participant_id: "customer-1".into(),
        participant_kind: ParticipantKind::Customer,
        user_data: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        removed_keys: remove.iter().map(|k| k.to_string()).collect(),
    };
    let more = update(&[("new", "v")], &[]);
    rig.worker
        .on_user_data(&rig.event(&more), more.clone())
        .await
        .expect("dropped, not retried");
    assert_eq!(rig.record().await.user_data, c.user_data, "nothing merged");
    assert_eq!(rig.transcript_len().await, 0, "nothing recorded");
    let swap = update(&[("k0", "w"), ("new", "v")], &["k1"]);
    rig.worker
        .on_user_data(&rig.event(&swap), swap.clone())
        .await
        .expect("applied");
    assert_eq!(
        rig.record().await.user_data,
        BTreeMap::from([("k0".into(), "w".into()), ("new".into(), "v".into())])
    );
}

/// A stopping process fires no more timers: a pass begun is left between two timers, and the
/// timers it claimed go back due at once (for another pod, not after their lease).
#[tokio::test]
async fn a_stopping_timer_pass_gives_back_what_it_claimed() {
    use crate::stores::session::Timer;
    let rig = rig().await;
    let timer = Timer {
        kind: flow::QUEUED_TIMER.into(),
        tenant_id: rig.tenant.clone(),
        id: CONVERSATION.into(),
    };
    rig.store.schedule(&timer, 1_000).await.expect("schedule");
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    timers::fire_due(&rig.worker, 1_000, &stop).await;
    assert_eq!(
        rig.store
            .claim_due(flow::QUEUED_TIMER, 1_000, 10)
            .await
            .expect("claim"),
        vec![timer],
        "the timer is still due, not fired nor leased"
    );
}

/// A firing timer that moves itself by exactly the claim's lease (`requeue_interval_ms` of
/// 30 s here) keeps the move: completing the firing must not take it for a timer left on its
/// lease and remove it.
#[tokio::test]
async fn a_timer_moved_by_the_lease_length_keeps_firing() {
    use crate::stores::session::{Timer, TIMER_LEASE_MS};
    let mut rig = rig().await;
    rig.worker.config.requeue_interval_ms = u64::try_from(TIMER_LEASE_MS).expect("lease");
    let mut c = connected(&rig.tenant);
    c.state = ConversationState::Queued;
    c.agent_id = None;
    assert!(rig.store.put_conversation(&c).await.expect("put"));
    let timer = Timer {
        kind: flow::QUEUED_TIMER.into(),
        tenant_id: rig.tenant.clone(),
        id: CONVERSATION.into(),
    };
    rig.store.schedule(&timer, 1_000).await.expect("schedule");
    timers::run_once(&rig.worker, 1_000).await;
    let due = 1_000 + TIMER_LEASE_MS;
    assert!(
        rig.store
            .claim_due(flow::QUEUED_TIMER, due, 10)
            .await
            .expect("claim")
            .is_empty(),
        "not due before its move"
    );
    let again = rig
        .store
        .claim_due(flow::QUEUED_TIMER, due + 1, 10)
        .await
        .expect("claim");
    assert_eq!(again, vec![timer], "the queued timer still comes back");
}

/// A bot handoff publishes its offer before it saves the record Queued: an offer that finds
/// the record still with the bot waits for that save instead of freeing the agent's slot as
/// stale, and then applies with the slot held.
#[tokio::test]
async fn a_bot_handoffs_offer_waits_for_the_queued_record() {
    let rig = rig().await;
    let mut bot = connected(&rig.tenant);
    bot.state = ConversationState::Bot;
    bot.agent_id = None;
    bot.bot_id = Some("bot-1".into());
    assert!(rig.store.put_conversation(&bot).await.expect("put"));
    rig.ready("bob", true).await;
    rig.reserve("bob").await;
    let first = offer("bob", 1);
    let event = rig.event(&first);
    let early = rig.worker.on_offered(&event, first.clone()).await;
    // Soon, and not counted as a failure: the save usually lands within milliseconds.
    let soon = chrono::Utc::now().timestamp_millis() + 1_000;
    assert!(
        matches!(early, Err(HandleError::RetryLater { not_before_ms, counts: false, .. }) if not_before_ms < soon),
        "waits for the handoff's save: {early:?}"
    );
    assert_eq!(rig.holders().await, ["bob"], "the slot is kept");

    let mut queued = rig.record().await;
    queued.state = ConversationState::Queued;
    assert!(rig.store.put_conversation(&queued).await.expect("put"));
    rig.worker
        .on_offered(&event, first)
        .await
        .expect("the offer applies");
    let c = rig.record().await;
    assert_eq!(
        (c.state, c.offered_to.as_deref()),
        (ConversationState::Offered, Some("bob"))
    );
    assert_eq!(rig.holders().await, ["bob"], "offered with its slot held");
}

/// A transfer (or consult) refused and told so stays refused when its event comes again,
/// though its target is available by then: the agent's desk was told it failed.
#[tokio::test]
async fn a_refused_transfer_stays_refused_when_redelivered() {
    let rig = rig().await;
    let bob = rig.agent("Bob").await;
    rig.connect_alice().await;
    rig.create_interaction_topic().await;
    for mode in [chat::TransferMode::Transfer, chat::TransferMode::Consult] {
        rig.ready(&bob, false).await;
        let transfer = alice_transfers(&bob, mode);
        let event = rig.event(&transfer);
        rig.worker
            .on_transfer(&event, transfer.clone())
            .await
            .expect("refused");
        rig.ready(&bob, true).await;
        rig.worker
            .on_transfer(&event, transfer)
            .await
            .expect("redelivered");
        let c = rig.record().await;
        assert_eq!(
            (
                c.state,
                c.agent_id.as_deref(),
                c.routing.consult_invited.as_deref()
            ),
            (ConversationState::Connected, Some("alice"), None),
            "{mode:?}"
        );
        assert_eq!(rig.holders().await, ["alice"], "{mode:?}: bob took no slot");
    }
}

/// A consult request handled late (it waited in a backlog) still gives the consultant the
/// whole offer timeout from now; a consult timer armed for an earlier invitation does not
/// time out the current one before its own time.
#[tokio::test]
async fn a_late_consult_invitation_gets_its_whole_timeout() {
    let rig = rig().await;
    let bob = rig.agent("Bob").await;
    rig.connect_alice().await;
    rig.ready(&bob, true).await;
    let consult = alice_transfers(&bob, chat::TransferMode::Consult);
    let mut event = rig.event(&consult);
    event.envelope.occurred_at_ms -= 60_000;
    let now = chrono::Utc::now().timestamp_millis();
    rig.worker
        .on_transfer(&event, consult)
        .await
        .expect("invited");
    let c = rig.record().await;
    assert_eq!(c.routing.consult_invited.as_deref(), Some(bob.as_str()));
    let timeout = i64::try_from(rig.worker.config.offer_timeout_ms).expect("timeout");
    let at = c.routing.consult_expires_at_ms.expect("expiry");
    assert!(at >= now + timeout, "expires {} ms from now", at - now);
    assert!(
        rig.store
            .claim_due(flow::CONSULT_TIMER, now + timeout - 1_000, 10)
            .await
            .expect("claim")
            .is_empty(),
        "the consult timer is not due before the whole timeout"
    );

    // A timer armed for an earlier invitation fires now: it waits for this one's time.
    let timer = rig.worker.timer(flow::CONSULT_TIMER, &c);
    rig.store.schedule(&timer, now).await.expect("schedule");
    timers::run_once(&rig.worker, now).await;
    let timed_out = rig
        .events(AGENT_TOPIC)
        .await
        .iter()
        .filter(|e| e.envelope.event_type == chat::AgentRejected::TYPE)
        .count();
    assert_eq!(timed_out, 0, "the current invitation was timed out");
    // At its time, or 1 ms after when that time is the lease the claim set (`timers::moved`).
    assert_eq!(
        rig.store
            .claim_due(flow::CONSULT_TIMER, timers::moved(now, at), 10)
            .await
            .expect("claim"),
        vec![timer],
        "due again at the invitation's own time"
    );
}

/// A deleted agent's conversations go back to their queues, each under ids of its own, and a
/// consultant it had invited leaves first (else the transfer would be refused).
#[tokio::test]
async fn a_deleted_agents_conversations_are_handed_back() {
    let rig = rig().await;
    let queue = rig
        .provisioning
        .create_queue(
            &rig.tenant,
            crate::stores::provisioning::NewQueue {
                name: "Support".into(),
            },
        )
        .await
        .expect("queue")
        .id;
    let other = "0193a4b2-0000-7000-8000-00000000beef";
    let mut consulted = connected(&rig.tenant);
    consulted.queue_id = Some(queue.clone());
    consulted.routing.consult_invited = Some("bob".into());
    assert!(rig.store.put_conversation(&consulted).await.expect("put"));
    let mut second = connected(&rig.tenant);
    second.queue_id = Some(queue.clone());
    second.conversation_id = other.into();
    assert!(rig.store.put_conversation(&second).await.expect("put"));
    let capacity = BTreeMap::from([(CHAT_MEDIA.to_string(), 2)]);
    rig.store
        .set_presence(&rig.tenant, "alice", true, &[], &capacity, 1)
        .await
        .expect("presence");
    for id in [CONVERSATION, other] {
        let reserve = Reserve {
            conversation_id: id.into(),
            media: CHAT_MEDIA.into(),
            skills: Vec::new(),
            exclude: Vec::new(),
            only: Some("alice".into()),
            now_ms: 2,
        };
        let got = rig.store.reserve_agent(&rig.tenant, &reserve).await;
        assert_eq!(got.expect("reserve").as_deref(), Some("alice"));
    }
    // Alice is not in provisioning: deleted.
    rig.not_ready("alice").await;
    let published: Vec<Event> = rig
        .events(AGENT_TOPIC)
        .await
        .into_iter()
        .filter(|e| e.envelope.producer == PRODUCER)
        .collect();
    let of = |id: &str| -> Vec<&str> {
        published
            .iter()
            .filter(|e| e.envelope.conversation_id == id)
            .map(|e| e.envelope.event_type.as_str())
            .collect()
    };
    assert_eq!(
        of(CONVERSATION),
        [chat::ParticipantLeft::TYPE, chat::TransferRequested::TYPE]
    );
    assert_eq!(of(other), [chat::TransferRequested::TYPE]);
    let ids: std::collections::HashSet<_> = published.iter().map(|e| e.envelope.event_id).collect();
    assert_eq!(ids.len(), published.len(), "one id per event");
    for e in published
        .iter()
        .filter(|e| e.envelope.event_type == chat::TransferRequested::TYPE)
    {
        let b: chat::TransferRequested = e.body_as().expect("body");
        assert_eq!(
            (b.agent_id.as_str(), b.target_kind, b.target_id.as_str()),
            ("alice", chat::TargetKind::Queue, queue.as_str())
        );
    }
}

/// A queue entry left behind by a re-queue that lost its save to a close stays at the head of
/// its queue; once its closed record has expired, a dispatch walk removes it. An entry without
/// a record that may be a new arrival (created recently) is left alone.
#[tokio::test]
async fn a_queue_entry_of_an_expired_conversation_is_removed() {
    let rig = rig().await;
    let now = chrono::Utc::now().timestamp_millis();
    let days_ago = |days: u64| {
        let secs = u64::try_from(now / 1_000).expect("now") - days * 86_400;
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, secs, 0);
        uuid::Uuid::new_v7(ts).to_string()
    };
    let (leftover, arriving) = (days_ago(8), days_ago(0));
    for (i, id) in [&leftover, &arriving].into_iter().enumerate() {
        rig.store
            .enqueue(&rig.tenant, "q1", id, 0, i64::try_from(i).expect("i"))
            .await
            .expect("enqueue");
    }
    let mut me = connected(&rig.tenant);
    me.state = ConversationState::Queued;
    me.agent_id = None;
    assert!(rig.store.put_conversation(&me).await.expect("put"));
    rig.store
        .enqueue(&rig.tenant, "q1", CONVERSATION, 0, 10)
        .await
        .expect("enqueue");
    let event = rig.event(&customer_says("anyone?"));
    rig.worker
        .dispatch(&me, &event, now)
        .await
        .expect("dispatch");
    let waiting = rig
        .store
        .waiting(&rig.tenant, "q1", 10)
        .await
        .expect("waiting");
    assert_eq!(waiting, [arriving.clone(), CONVERSATION.to_string()]);
}

/// A changed profile is applied to a signed-in agent at once, under the cap the agent set
/// itself, keeping its readiness and idle time; a state without a cap then gives the full
/// capacity.
#[tokio::test]
async fn a_changed_profile_applies_under_the_agents_own_cap() {
    let rig = rig().await;
    let chats = |n: u32| BTreeMap::from([(CHAT_MEDIA.to_string(), n)]);
    let id = rig
        .provisioning
        .create_agent(
            &rig.tenant,
            NewAgent {
                name: "Lea".into(),
                skills: vec!["en".into()],
                capacity: chats(2),
            },
        )
        .await
        .expect("agent")
        .agent
        .id;
    let state = |capacity: BTreeMap<String, i32>| chat::AgentStateChanged {
        agent_id: id.clone(),
        state: chat::AgentState::Ready,
        reason_code: None,
        capacity,
    };
    let apply_state = |b: chat::AgentStateChanged| async {
        let event = Event::typed(&b, &rig.tenant, &id, "test").expect("event");
        rig.worker.on_agent_state(&event, b).await.expect("state");
    };
    let apply_profile = || async {
        let b = chat::AgentProfileChanged {
            agent_id: id.clone(),
            skills: Vec::new(),
            capacity: BTreeMap::new(),
        };
        let event = Event::typed(&b, &rig.tenant, &id, "test").expect("event");
        rig.worker
            .on_agent_profile(&event, b)
            .await
            .expect("profile");
    };
    let presence = || async {
        rig.store
            .presence(&rig.tenant, &id)
            .await
            .expect("presence")
            .expect("signed in")
    };
    apply_state(state(BTreeMap::from([(CHAT_MEDIA.to_string(), 1)]))).await;
    let before = presence().await;
    assert_eq!((before.ready, before.capacity.clone()), (true, chats(1)));
    let patch = crate::stores::provisioning::AgentPatch {
        skills: Some(vec!["en".into(), "fr".into()]),
        capacity: Some(chats(5)),
        ..Default::default()
    };
    rig.provisioning
        .update_agent(&rig.tenant, &id, patch)
        .await
        .expect("patch");
    apply_profile().await;
    let p = presence().await;
    assert_eq!(p.skills, ["en", "fr"]);
    assert_eq!(p.capacity, chats(1), "the agent's own cap holds");
    assert_eq!((p.ready, p.idle_since_ms), (true, before.idle_since_ms));
    apply_state(state(BTreeMap::new())).await;
    assert_eq!(presence().await.capacity, chats(5));
    let patch = crate::stores::provisioning::AgentPatch {
        capacity: Some(chats(3)),
        ..Default::default()
    };
    rig.provisioning
        .update_agent(&rig.tenant, &id, patch)
        .await
        .expect("patch");
    apply_profile().await;
    assert_eq!(presence().await.capacity, chats(3));
}

/// A deleted agent's conversation whose queue was deleted since goes to the queue its routing
/// rule gives it now.
#[tokio::test]
async fn a_deleted_agents_conversation_of_a_deleted_queue_goes_where_its_rule_says() {
    use crate::stores::provisioning::{NewQueue, NewRoutingRule};
    let rig = rig().await;
    let queue = rig
        .provisioning
        .create_queue(
            &rig.tenant,
            NewQueue {
                name: "Sales".into(),
            },
        )
        .await
        .expect("queue")
        .id;
    let rule = NewRoutingRule {
        channel: "WEB_CHAT".into(),
        attributes: BTreeMap::new(),
        queue_id: queue.clone(),
        required_skills: Vec::new(),
        priority: 0,
        bot_id: None,
    };
    rig.provisioning
        .create_routing_rule(&rig.tenant, rule)
        .await
        .expect("rule");
    // Its queue `q1` is not provisioned: deleted since.
    rig.connect_alice().await;
    rig.not_ready("alice").await;
    let targets: Vec<String> = rig
        .events(AGENT_TOPIC)
        .await
        .iter()
        .filter(|e| e.envelope.event_type == chat::TransferRequested::TYPE)
        .map(|e| {
            let b: chat::TransferRequested = e.body_as().expect("body");
            b.target_id
        })
        .collect();
    assert_eq!(targets, [queue]);
}

/// A deleted agent's chat that no queue takes back (its queue deleted, no rule matching) ends
/// rather than wait for the agent who is gone: a completion on the agent's behalf, applied in
/// the conversation's order, closes it as a system close.
#[tokio::test]
async fn a_deleted_agents_chat_with_no_queue_left_closes() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    // Neither `q1` nor any routing rule is provisioned.
    rig.connect_alice().await;
    rig.not_ready("alice").await;
    let handed: Vec<Event> = rig
        .events(AGENT_TOPIC)
        .await
        .into_iter()
        .filter(|e| e.envelope.conversation_id == CONVERSATION)
        .collect();
    assert_eq!(handed.len(), 1, "{handed:?}");
    assert_eq!(
        handed[0].envelope.event_type,
        chat::ConversationCompleted::TYPE
    );
    let done: chat::ConversationCompleted = handed[0].body_as().expect("body");
    assert_eq!(done.agent_id, "alice");
    rig.worker
        .on_completed(&handed[0], done)
        .await
        .expect("completed");
    let closed = rig.record().await;
    assert_eq!(closed.state, ConversationState::Closed);
    assert_eq!(closed.closed_reason.as_deref(), Some("SYSTEM"));
    assert_eq!(
        rig.holders().await,
        Vec::<String>::new(),
        "alice's slot freed"
    );
    let closes: Vec<chat::ConversationClosed> = rig
        .events(INTERACTION_TOPIC)
        .await
        .iter()
        .filter(|e| e.envelope.event_type == chat::ConversationClosed::TYPE)
        .map(|e| e.body_as().expect("body"))
        .collect();
    assert_eq!(closes.len(), 1);
    assert_eq!(closes[0].closed_by_participant_id, None, "closed by no one");
}

/// An accept by an agent deleted meanwhile (its token still cached by an edge) does not
/// connect the chat: the agent is told the offer closed, the offer lapses as any unanswered
/// one. A provisioned agent's accept of the same offer connects.
#[tokio::test]
async fn an_accept_by_a_deleted_agent_does_not_connect() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let bob = rig.agent("Bob").await;
    for (agent, connects) in [("ghost", false), (bob.as_str(), true)] {
        let mut offered = rig.record_or(connected(&rig.tenant)).await;
        offered.state = ConversationState::Offered;
        offered.agent_id = None;
        offered.offered_to = Some(agent.into());
        offered.routing.offer_id = Some(format!("offer-{agent}"));
        assert!(rig.store.put_conversation(&offered).await.expect("put"));
        let accepted = chat::AgentAccepted {
            offer_id: format!("offer-{agent}"),
            agent_id: agent.into(),
            participant_id: agent.into(),
            nickname: agent.into(),
        };
        let event = rig.event(&accepted);
        rig.worker
            .on_accepted(&event, accepted)
            .await
            .expect("applied");
        let c = rig.record().await;
        let told = rig
            .events(DELIVERY_TOPIC)
            .await
            .iter()
            .filter_map(|e| e.body_as::<chat::ClientEvent>().ok())
            .any(|c| c.data.contains("agent_deleted") && c.to_agents.iter().any(|a| a == agent));
        if connects {
            assert_eq!(
                (c.state, c.agent_id.as_deref()),
                (ConversationState::Connected, Some(agent))
            );
            assert!(!told);
        } else {
            assert_eq!((c.state, c.agent_id), (ConversationState::Offered, None));
            assert!(told, "the deleted agent's desk is told the offer closed");
        }
    }
}

/// Applying an offer frees any other agent's slot the queued conversation holds: one reserved
/// for an offer never made (here: its publish failed, then a transfer named someone else)
/// would otherwise stay taken until the conversation closes.
#[tokio::test]
async fn an_applied_offer_frees_other_reservations() {
    let rig = rig().await;
    let mut queued = connected(&rig.tenant);
    queued.state = ConversationState::Queued;
    queued.agent_id = None;
    assert!(rig.store.put_conversation(&queued).await.expect("put"));
    rig.ready("xavi", true).await;
    rig.ready("tara", true).await;
    rig.reserve("xavi").await;
    rig.reserve("tara").await;
    assert_eq!(rig.holders().await, ["tara", "xavi"]);
    let offer = chat::AgentOffered {
        offer_id: "offer-tara".into(),
        agent_id: "tara".into(),
        queue_id: Some("q1".into()),
        channel: Channel::WebChat,
        channel_id: None,
        customer_nickname: "Lou".into(),
        expires_at: 0,
        attempt: 1,
    };
    let event = rig.event(&offer);
    rig.worker.on_offered(&event, offer).await.expect("applied");
    let c = rig.record().await;
    assert_eq!(
        (c.state, c.offered_to.as_deref()),
        (ConversationState::Offered, Some("tara"))
    );
    assert_eq!(rig.holders().await, ["tara"]);
    let xavi = rig.store.presence(&rig.tenant, "xavi").await.expect("get");
    assert_eq!(
        xavi.map(|p| p.active),
        Some(BTreeMap::new()),
        "xavi's slot is free"
    );
}

/// A deleted agent's chat that is only offered to it is handed back too: an accept it sent
/// before the delete committed may be applied after the hand-back read the chat, and the
/// transfer, ordered after that accept, takes the chat back to its queue.
#[tokio::test]
async fn a_deleted_agents_offered_chat_is_handed_back() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let alice = rig.agent("Alice").await;
    let queue = rig
        .provisioning
        .create_queue(
            &rig.tenant,
            crate::stores::provisioning::NewQueue {
                name: "Sales".into(),
            },
        )
        .await
        .expect("queue")
        .id;
    let mut offered = connected(&rig.tenant);
    offered.queue_id = Some(queue.clone());
    offered.state = ConversationState::Offered;
    offered.agent_id = None;
    offered.offered_to = Some(alice.clone());
    offered.routing.offer_id = Some("offer-alice".into());
    assert!(rig.store.put_conversation(&offered).await.expect("put"));
    rig.ready(&alice, true).await;
    rig.reserve(&alice).await;
    // The hand-back reads the chat offered; the accept, checked while Alice still existed,
    // is applied after it.
    let source = rig.event(&chat::AgentStateChanged {
        agent_id: alice.clone(),
        state: chat::AgentState::NotReady,
        reason_code: None,
        capacity: BTreeMap::new(),
    });
    rig.worker
        .hand_back(&source, &alice)
        .await
        .expect("handed back");
    let accepted = chat::AgentAccepted {
        offer_id: "offer-alice".into(),
        agent_id: alice.clone(),
        participant_id: alice.clone(),
        nickname: "Alice".into(),
    };
    let event = rig.event(&accepted);
    rig.worker
        .on_accepted(&event, accepted)
        .await
        .expect("accepted");
    assert_eq!(rig.record().await.state, ConversationState::Connected);
    let back: Vec<Event> = rig
        .events(AGENT_TOPIC)
        .await
        .into_iter()
        .filter(|e| e.envelope.event_type == chat::TransferRequested::TYPE)
        .collect();
    assert_eq!(back.len(), 1, "one hand-back");
    let transfer: chat::TransferRequested = back[0].body_as().expect("body");
    assert_eq!(
        (transfer.agent_id.as_str(), transfer.target_id.as_str()),
        (alice.as_str(), queue.as_str())
    );
    rig.worker
        .on_transfer(&back[0], transfer)
        .await
        .expect("transfer applied");
    let c = rig.record().await;
    assert_eq!((c.state, c.agent_id), (ConversationState::Queued, None));
    assert!(
        !rig.holders().await.contains(&alice),
        "Alice's slot is free"
    );
}

/// An offer whose slot was freed (given up as stale while its maker's retry still published
/// it) takes the slot again when it applies, or is not applied when the agent is full: the
/// agent is never offered more than its capacity.
#[tokio::test]
async fn an_offer_without_its_slot_takes_one_or_is_not_applied() {
    let rig = rig().await;
    let mut queued = connected(&rig.tenant);
    queued.state = ConversationState::Queued;
    queued.agent_id = None;
    assert!(rig.store.put_conversation(&queued).await.expect("put"));
    rig.ready("tara", true).await;
    // Tara's one slot is another conversation's.
    let other = Reserve {
        conversation_id: "0193a4b2-0000-7000-8000-0000000000aa".into(),
        media: CHAT_MEDIA.into(),
        skills: Vec::new(),
        exclude: Vec::new(),
        only: Some("tara".into()),
        now_ms: 2,
    };
    let got = rig.store.reserve_agent(&rig.tenant, &other).await;
    assert_eq!(got.expect("reserve").as_deref(), Some("tara"));
    let offer = |attempt: i32| chat::AgentOffered {
        offer_id: format!("offer-tara-{attempt}"),
        agent_id: "tara".into(),
        queue_id: Some("q1".into()),
        channel: Channel::WebChat,
        channel_id: None,
        customer_nickname: "Lou".into(),
        expires_at: 0,
        attempt,
    };
    let event = rig.event(&offer(1));
    rig.worker
        .on_offered(&event, offer(1))
        .await
        .expect("handled");
    assert_eq!(rig.record().await.state, ConversationState::Queued, "full");
    assert!(rig.holders().await.is_empty());
    // Once the other conversation frees it, the same offer takes the slot and applies.
    rig.store
        .release_agent(&rig.tenant, "tara", CHAT_MEDIA, &other.conversation_id, 3)
        .await
        .expect("release");
    let event = rig.event(&offer(1));
    rig.worker
        .on_offered(&event, offer(1))
        .await
        .expect("applied");
    let c = rig.record().await;
    assert_eq!(
        (c.state, c.offered_to.as_deref()),
        (ConversationState::Offered, Some("tara"))
    );
    assert_eq!(rig.holders().await, ["tara"]);
    let tara = rig.store.presence(&rig.tenant, "tara").await.expect("get");
    assert_eq!(
        tara.map(|p| p.active),
        Some(BTreeMap::from([(CHAT_MEDIA.to_string(), 1)]))
    );
}

/// A message of several files whose derived id for one file (`x/1`) a client took for a message
/// of its own: that file's entry is the only one refused; the other files still go in.
#[tokio::test]
async fn a_derived_file_id_taken_by_a_client_drops_no_other_file() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    assert!(rig
        .store
        .put_conversation(&connected(&rig.tenant))
        .await
        .expect("put"));
    let files = |client_id: &str, ids: &[&str]| chat::MessageReceived {
        client_message_id: Some(client_id.into()),
        kind: MessageKind::Text,
        text: Some("scan.png".into()),
        media_ids: ids.iter().map(|s| s.to_string()).collect(),
        ..customer_says("")
    };
    let taken = files("x/1", &["f-early"]);
    rig.worker
        .on_customer_message(&rig.event(&taken), taken.clone())
        .await
        .expect("first upload");
    let three = files("x", &["f0", "f1", "f2"]);
    rig.worker
        .on_customer_message(&rig.event(&three), three.clone())
        .await
        .expect("three files");
    let entries = rig
        .store
        .transcript(&rig.tenant, CONVERSATION, 1, 100)
        .await
        .expect("transcript");
    let file_ids: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.entry.data.get("file_id").map(String::as_str))
        .collect();
    assert_eq!(
        file_ids,
        ["f-early", "f0", "f2"],
        "f1's id was the client's"
    );
}

/// An agent's file message is one `FileUploaded` entry per file, from the agent, its text and
/// `name` the file name; applied again (a redelivery), it adds nothing; the interaction stream
/// gets the message once, with its files and its place.
#[tokio::test]
async fn an_agent_file_message_is_a_file_entry_from_the_agent() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    assert!(rig
        .store
        .put_conversation(&connected(&rig.tenant))
        .await
        .expect("put"));
    let sent = chat::MessageSent {
        text: Some("invoice.pdf".into()),
        media_ids: vec!["f-invoice".into(), "f-terms".into()],
        ..reply("")
    };
    let e = rig.event(&sent);
    for _ in 0..2 {
        rig.worker
            .on_agent_message(&e, sent.clone())
            .await
            .expect("applied");
    }
    let entries = rig
        .store
        .transcript(&rig.tenant, CONVERSATION, 1, 100)
        .await
        .expect("transcript");
    let files: Vec<_> = entries
        .iter()
        .filter(|e| e.entry.kind == EntryKind::FileUploaded)
        .map(|e| {
            (
                e.entry.from.participant_id.as_str(),
                e.entry.from.kind.clone(),
                e.entry.text.as_deref(),
                e.entry.data.get("file_id").map(String::as_str),
                e.entry.data.get("name").map(String::as_str),
            )
        })
        .collect();
    assert_eq!(
        files,
        [
            (
                "agent-alice",
                PartyKind::Agent,
                Some("invoice.pdf"),
                Some("f-invoice"),
                Some("invoice.pdf")
            ),
            (
                "agent-alice",
                PartyKind::Agent,
                Some("invoice.pdf"),
                Some("f-terms"),
                Some("invoice.pdf")
            ),
        ]
    );
    assert_eq!(entries.len(), 2, "nothing else: {entries:?}");
    // A client's retry (a new event, the same message id) adds nothing either.
    rig.worker
        .on_agent_message(&rig.event(&sent), sent.clone())
        .await
        .expect("retry");
    let len = rig.store.transcript_len(&rig.tenant, CONVERSATION).await;
    assert_eq!(len.expect("len"), 2);
    // The sockets are told of each file once (a redelivery publishes again under the same
    // event id, which consumers dedup on).
    let mut pushes = std::collections::BTreeSet::new();
    let pushed = rig
        .events(DELIVERY_TOPIC)
        .await
        .iter()
        .filter(|e| pushes.insert(e.envelope.event_id))
        .filter_map(|e| e.body_as::<chat::ClientEvent>().ok())
        .filter(|c| c.data.contains("FileUploaded"))
        .count();
    assert_eq!(pushed, 2);
    let mut ids = std::collections::BTreeSet::new();
    let emitted: Vec<chat::MessageSent> = rig
        .events(INTERACTION_TOPIC)
        .await
        .iter()
        .filter(|e| ids.insert(e.envelope.event_id))
        .filter_map(|e| e.body_as::<chat::MessageSent>().ok())
        .collect();
    assert_eq!(emitted.len(), 1, "{emitted:?}");
    assert_eq!(emitted[0].media_ids, ["f-invoice", "f-terms"]);
    assert_eq!(
        emitted[0].transcript_position,
        i64::try_from(entries[0].position).ok()
    );
}

/// A consult request that meets a closed conversation withdraws its invitation by id: its
/// first try may have pushed it and lost its save to the close, which did not name the invitee.
#[tokio::test]
async fn a_consult_request_on_a_closed_chat_withdraws_its_invitation() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let mut closed = connected(&rig.tenant);
    closed.state = ConversationState::Closed;
    assert!(rig.store.put_conversation(&closed).await.expect("put"));
    let consult = alice_transfers("bob", chat::TransferMode::Consult);
    let e = rig.event(&consult);
    rig.worker
        .on_transfer(&e, consult.clone())
        .await
        .expect("applied");
    let offer_id = crate::events::chat::derived_id(&e.envelope.event_id, "consult").to_string();
    let withdrawn: Vec<chat::ClientEvent> = rig
        .events(DELIVERY_TOPIC)
        .await
        .iter()
        .filter_map(|e| e.body_as::<chat::ClientEvent>().ok())
        .filter(|c| c.data.contains("offer_closed") && c.data.contains(&offer_id))
        .collect();
    assert_eq!(withdrawn.len(), 1, "{withdrawn:?}");
    assert_eq!(withdrawn[0].to_agents, ["bob"]);
}

/// An offer let lapse sets its agent not ready once: applied again (its save lost to another
/// write), it must not set not ready an agent who, told of the lapse, said ready meanwhile.
#[tokio::test]
async fn a_lapse_applied_again_keeps_the_agents_ready() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let offered_alice = offer("alice", 1);
    let mut offered = connected(&rig.tenant);
    offered.state = ConversationState::Offered;
    offered.agent_id = None;
    offered.offered_to = Some("alice".into());
    offered.routing.offer_id = Some(offered_alice.offer_id.clone());
    offered.routing.offers = 1;
    assert!(rig.store.put_conversation(&offered).await.expect("put"));
    rig.ready("alice", true).await;
    rig.reserve("alice").await;
    let lapse = chat::AgentRejected {
        offer_id: offered_alice.offer_id.clone(),
        agent_id: "alice".into(),
        reason: chat::RejectReason::Timeout,
    };
    let e = rig.event(&lapse);
    rig.worker
        .on_rejected(&e, lapse.clone())
        .await
        .expect("lapse");
    let ready = |rig: &Rig| {
        let store = rig.store.clone();
        let tenant = rig.tenant.clone();
        async move {
            store
                .presence(&tenant, "alice")
                .await
                .expect("presence")
                .expect("alice")
                .ready
        }
    };
    assert!(!ready(&rig).await, "not ready after the lapse");
    // Its save lost (the record as it was before), and alice, told, says ready again.
    let now = rig.record_or(offered.clone()).await;
    let lost = Conversation {
        version: now.version,
        ..offered
    };
    assert!(rig.store.put_conversation(&lost).await.expect("put back"));
    rig.ready("alice", true).await;
    rig.worker
        .on_rejected(&e, lapse)
        .await
        .expect("lapse applied again");
    assert!(ready(&rig).await, "the agent's ready stands");
}

/// The `offer_closed` pushes to `agent` on the delivery topic.
async fn offers_closed_to(rig: &Rig, agent: &str) -> Vec<serde_json::Value> {
    rig.events(DELIVERY_TOPIC)
        .await
        .iter()
        .filter_map(|e| e.body_as::<chat::ClientEvent>().ok())
        .filter(|c| c.kind == chat::ClientEventKind::OfferClosed && c.to_agents == [agent])
        .filter_map(|c| serde_json::from_str(&c.data).ok())
        .collect()
}

/// A consult request redelivered after it was applied (at-least-once: the ack was lost) is
/// skipped: it must not withdraw from the consultant's desk the invitation it made, which the
/// record still holds open (the consultant could no longer accept it).
#[tokio::test]
async fn a_redelivered_consult_request_keeps_its_invitation() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let bob = rig.agent("Bob").await;
    rig.connect_alice().await;
    rig.ready(&bob, true).await;
    let consult = alice_transfers(&bob, chat::TransferMode::Conference);
    let e = rig.event(&consult);
    rig.worker
        .on_transfer(&e, consult.clone())
        .await
        .expect("invited");
    let invited = rig.record().await;
    assert_eq!(
        invited.routing.consult_invited.as_deref(),
        Some(bob.as_str())
    );
    rig.worker
        .on_transfer(&e, consult)
        .await
        .expect("redelivered");
    assert_eq!(
        offers_closed_to(&rig, &bob).await,
        Vec::<serde_json::Value>::new(),
        "the live invitation was withdrawn from the consultant's desk"
    );
    let c = rig.record().await;
    assert_eq!(c.routing.consult_invited.as_deref(), Some(bob.as_str()));
    assert_eq!(c.version, invited.version, "nothing applied twice");
    assert_eq!(
        rig.holders().await.len(),
        2,
        "alice and bob hold their slots"
    );
}

// Event times no clock gives. Each case is asserted by its outcome, as a release build (which
// wraps on overflow instead of panicking) would meet it: run as the consumer runs a handler
// (`panic_rejected`), a debug build's overflow panic shows up as `handler_panicked`.

/// `e` as the consumer hands it to the handler.
fn delivered(e: &Event) -> Message {
    Message {
        topic: AGENT_TOPIC.into(),
        partition: 0,
        offset: 0,
        timestamp_ms: e.envelope.occurred_at_ms,
        key: e.envelope.conversation_id.clone(),
        payload: Default::default(),
        headers: Vec::new(),
    }
}

/// Handles `e` as the consumer does: a panic becomes a `handler_panicked` rejection.
async fn consumed(rig: &Rig, e: &Event) -> Result<(), HandleError> {
    crate::bus::consumer::panic_rejected(rig.worker.handle(e, &delivered(e))).await
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn rejected_as(result: &Result<(), HandleError>) -> Option<&'static str> {
    match result {
        Err(HandleError::Reject { reason, .. }) => Some(reason),
        _ => None,
    }
}

/// An async chat connected to alice.
fn async_chat(tenant: &str) -> Conversation {
    let mut c = connected(tenant);
    c.routing.is_async = true;
    c
}

/// Times before 2000 or more than a day ahead are dead-lettered as `bad_time` by every handler
/// they reach, before anything is derived from them: not waited on (an offer with no record
/// would retry, uncounted, until its date), not ignored as old, not turned into an overflow.
#[tokio::test]
async fn events_dated_where_no_clock_is_are_dead_lettered_as_bad_time() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let absurd = [
        i64::MIN,
        -1,
        0,
        event_time::EARLIEST_MS - 1,
        now_ms() + 2 * event_time::MAX_AHEAD_MS,
        i64::MAX,
    ];
    // An offer whose conversation has no record yet; its agent's slot is held.
    rig.ready("bob", true).await;
    rig.reserve("bob").await;
    for at in absurd {
        let mut e = rig.event(&offer("bob", 1));
        e.envelope.occurred_at_ms = at;
        let result = consumed(&rig, &e).await;
        assert_eq!(
            rejected_as(&result),
            Some("bad_time"),
            "offer at {at}: {result:?}"
        );
    }
    assert_eq!(
        rig.holders().await,
        ["bob"],
        "nothing was decided on the slot"
    );

    // A customer's message to an async chat: its time would become the idle timer's base.
    assert!(rig
        .store
        .put_conversation(&async_chat(&rig.tenant))
        .await
        .expect("put"));
    let stored = rig.record().await;
    for at in absurd {
        let mut e = rig.event(&customer_says("hi"));
        e.envelope.occurred_at_ms = at;
        let result = consumed(&rig, &e).await;
        assert_eq!(
            rejected_as(&result),
            Some("bad_time"),
            "message at {at}: {result:?}"
        );
    }
    let c = rig.record().await;
    assert_eq!(
        (c.last_activity_ms, c.version),
        (stored.last_activity_ms, stored.version),
        "the record is untouched"
    );
    assert_eq!(rig.transcript_len().await, 0, "nothing appended");
}

/// An offer dated an hour ahead (a clock set wrong, within the day the range allows) has no
/// age to wait on: with no record it is given up at once (its slot freed, as for an offer
/// that waited its time), not retried uncounted until its date while it holds the lane.
#[tokio::test]
async fn an_offer_dated_ahead_is_given_up_not_waited_for() {
    let rig = rig().await;
    rig.ready("bob", true).await;
    rig.reserve("bob").await;
    let mut e = rig.event(&offer("bob", 1));
    e.envelope.occurred_at_ms = now_ms() + 3_600_000;
    let result = consumed(&rig, &e).await;
    assert!(result.is_ok(), "given up: {result:?}");
    assert!(rig.holders().await.is_empty(), "its slot is freed");

    // Within the skew clocks may have it is still waited for, as any young offer.
    rig.reserve("bob").await;
    let mut e = rig.event(&offer("bob", 1));
    e.envelope.occurred_at_ms = now_ms() + 5_000;
    let result = consumed(&rig, &e).await;
    assert!(
        matches!(result, Err(HandleError::RetryLater { counts: false, .. })),
        "waits for the record: {result:?}"
    );
    assert_eq!(rig.holders().await, ["bob"]);
}

/// An offer whose body names an expiry at the end of time lapses after the offer timeout (and
/// the skew allowance at most), not never: the chat is not held offered to an agent who does
/// not answer.
#[tokio::test]
async fn an_offers_forged_expiry_does_not_hold_the_chat() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let mut queued = connected(&rig.tenant);
    queued.state = ConversationState::Queued;
    queued.agent_id = None;
    assert!(rig.store.put_conversation(&queued).await.expect("put"));
    rig.ready("bob", true).await;
    rig.reserve("bob").await;
    let mut forged = offer("bob", 1);
    forged.expires_at = i64::MAX;
    let before = now_ms();
    let result = consumed(&rig, &rig.event(&forged)).await;
    assert!(result.is_ok(), "applied: {result:?}");
    let after = now_ms();
    let c = rig.record().await;
    assert_eq!(c.state, ConversationState::Offered);
    let timeout = i64::try_from(rig.worker.config.offer_timeout_ms).expect("timeout");
    let at = c.routing.offer_expires_at_ms.expect("expiry");
    assert!(
        (before + timeout..=after + timeout + event_time::CLOCK_SKEW_MS).contains(&at),
        "expires {} ms from now",
        at.saturating_sub(after)
    );
    let due = rig
        .store
        .claim_due(
            flow::OFFER_TIMER,
            after + timeout + event_time::CLOCK_SKEW_MS,
            10,
        )
        .await
        .expect("claim");
    assert_eq!(due.len(), 1, "the offer timer comes at that time");
}

/// A consult request dated an hour ahead invites for the offer timeout from now (and the skew
/// allowance at most), not until an hour after its date.
#[tokio::test]
async fn a_consult_request_dated_ahead_invites_for_the_timeout_from_now() {
    let rig = rig().await;
    let bob = rig.agent("Bob").await;
    rig.connect_alice().await;
    rig.ready(&bob, true).await;
    rig.create_interaction_topic().await;
    let mut e = rig.event(&alice_transfers(&bob, chat::TransferMode::Consult));
    e.envelope.occurred_at_ms = now_ms() + 3_600_000;
    let result = consumed(&rig, &e).await;
    assert!(result.is_ok(), "invited: {result:?}");
    let after = now_ms();
    let c = rig.record().await;
    assert_eq!(c.routing.consult_invited.as_deref(), Some(bob.as_str()));
    let timeout = i64::try_from(rig.worker.config.offer_timeout_ms).expect("timeout");
    let at = c.routing.consult_expires_at_ms.expect("expiry");
    assert!(
        at <= after + timeout + event_time::CLOCK_SKEW_MS,
        "expires {} ms from now",
        at.saturating_sub(after)
    );
}

/// A record holding a last activity at the end of time (saved before event times were
/// checked): its idle timer neither wraps into "idle long ago" (a notice, then the chat closed
/// while its customer is there) nor panics; the customer's next message mends the time, and
/// the idle timer counts from it.
#[tokio::test]
async fn a_stored_time_at_the_end_of_time_neither_wraps_nor_sticks() {
    let rig = rig().await;
    rig.create_interaction_topic().await;
    let mut c = async_chat(&rig.tenant);
    c.last_activity_ms = i64::MAX - 1_000;
    assert!(rig.store.put_conversation(&c).await.expect("put"));
    let c = rig.record().await;

    let now = now_ms();
    let idle = rig.worker.timer(flow::IDLE_TIMER, &c);
    rig.store.schedule(&idle, now).await.expect("schedule");
    timers::run_once(&rig.worker, now).await;
    let notices = rig
        .events(AGENT_TOPIC)
        .await
        .iter()
        .filter(|e| e.envelope.event_type == chat::MessageSent::TYPE)
        .count();
    assert_eq!(notices, 0, "no idle notice for a chat not idle");
    let year = 365 * 86_400_000;
    assert!(
        rig.store
            .claim_due(flow::IDLE_CLOSE_TIMER, now + year, 10)
            .await
            .expect("claim")
            .is_empty(),
        "no idle close armed"
    );
    assert_eq!(rig.record().await.state, ConversationState::Connected);

    // The customer writes: the activity is theirs now (the stored time kept no further ahead
    // than clocks disagree), the idle timer a timeout from it.
    let before = now_ms();
    let result = consumed(&rig, &rig.event(&customer_says("still here"))).await;
    assert!(result.is_ok(), "applied: {result:?}");
    let after = now_ms();
    let c = rig.record().await;
    let skew = event_time::CLOCK_SKEW_MS;
    assert!(
        (before..=after + skew).contains(&c.last_activity_ms),
        "last activity {} ms from now",
        c.last_activity_ms.saturating_sub(after)
    );
    let timeout = flow::secs_ms(rig.worker.config.idle_timeout_s);
    assert!(
        rig.store
            .claim_due(flow::IDLE_TIMER, before + timeout - 1_000, 10)
            .await
            .expect("claim")
            .is_empty(),
        "the idle timer is not due before the idle timeout"
    );
    assert_eq!(
        rig.store
            .claim_due(flow::IDLE_TIMER, after + skew + timeout, 10)
            .await
            .expect("claim"),
        vec![idle],
        "due an idle timeout after the message (and the skew at most)"
    );
}

/// A timer moved onto its lease at the end of time goes to the other side of it, without an
/// overflow (which would wrap it into a time long past).
#[test]
fn a_move_onto_a_saturated_lease_does_not_wrap() {
    use crate::stores::session::timer_lease_until;
    let lease = timer_lease_until(i64::MAX);
    let moved = timers::moved(i64::MAX, lease);
    assert_ne!(moved, lease);
    assert!(moved > 0, "not wrapped: {moved}");
}
