//! The conversation role's handlers on the embedded bus and session store: cases that need a
//! publish to fail at a chosen moment, which end-to-end tests cannot arrange.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::events::chat::{Channel, MessageKind, ParticipantKind};
use crate::stores::provisioning::Provisioning;
use crate::stores::session::embedded::EmbeddedStore;
use crate::stores::session::{Conversation, ConversationState, Party, PartyKind, Routing};
use crate::topology::Topology;

const TENANT: &str = "tenant-a";
const CONVERSATION: &str = "0193a4b2-0000-7000-8000-00000000c0de";

struct Rig {
    worker: ConversationWorker,
    bus: Arc<dyn Bus>,
    store: Arc<dyn SessionStore>,
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
    let directory = Arc::new(Provisioning::temporary(dir.path()).await);
    let worker = ConversationWorker::new(
        bus.clone(),
        store.clone(),
        directory,
        ConversationConfig::default(),
        reqwest::Client::new(),
    );
    Rig {
        worker,
        bus,
        store,
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

    /// The interaction stream's events, in order (one conversation: one partition).
    async fn interaction(&self) -> Vec<Event> {
        let mut events = Vec::new();
        let offsets = self
            .bus
            .partition_offsets(INTERACTION_TOPIC)
            .await
            .expect("offsets");
        for p in offsets {
            for m in self
                .bus
                .read(INTERACTION_TOPIC, p.partition, 0, 1_000)
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
            .transcript_len(TENANT, CONVERSATION)
            .await
            .expect("transcript length")
    }
}

/// A web chat connected to agent `alice`.
fn connected() -> Conversation {
    Conversation {
        tenant_id: TENANT.into(),
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
        queue_id: None,
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

fn event<B: crate::events::chat::Body>(body: &B) -> Event {
    Event::typed(body, TENANT, CONVERSATION, "test").expect("event")
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
    assert!(rig.store.put_conversation(&connected()).await.expect("put"));

    let agent_reply = reply("one moment");
    let agent_event = event(&agent_reply);
    let customer = customer_says("thanks, bye");
    let customer_event = event(&customer);
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
    let complete = chat::ConversationCompleted {
        agent_id: "alice".into(),
        participant_id: "agent-alice".into(),
        disposition: None,
        note: None,
        user_data: BTreeMap::new(),
        close_conversation: true,
    };
    rig.worker
        .on_completed(&event(&complete), complete.clone())
        .await
        .expect("complete");
    let closed = rig
        .store
        .conversation(TENANT, CONVERSATION)
        .await
        .expect("load")
        .expect("record");
    assert_eq!(closed.state, ConversationState::Closed);
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
        .on_agent_message(&event(&late), late.clone())
        .await
        .expect("a send after the close is dropped");
    assert_eq!(
        rig.transcript_len().await,
        length,
        "nothing appended after the close"
    );

    let after = texts_after_close(&rig.interaction().await);
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
