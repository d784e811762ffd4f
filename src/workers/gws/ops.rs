//! Which agent events become which GWS operations (and their request bodies), and the
//! reconciliation rule: whether a chat, as GWS reports it, already shows an operation's effect.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::events::chat::{
    AgentAccepted, Body, BodyError, ConversationCompleted, MessageSent, ParticipantKind,
    TargetKind, TransferMode, TransferRequested,
};
use crate::events::Event;
use crate::workers::backlog::MAX_ID_BYTES;

/// Producer of the bot API's events: a bot's handoff is not an agent action.
const BOT_PRODUCER: &str = "edge/bot";

/// The GWS chat operations the worker makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Accept,
    SendMessage,
    Transfer,
    Complete,
}

impl OpKind {
    /// The `operationName` (and the metric label).
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Accept => "Accept",
            OpKind::SendMessage => "SendMessage",
            OpKind::Transfer => "Transfer",
            OpKind::Complete => "Complete",
        }
    }
}

/// One GWS call an event asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    pub kind: OpKind,
    /// The agent on whose behalf the call is made.
    pub agent_id: String,
    /// The effect's key within its conversation: the same effect asked twice (a redelivery, or
    /// the desktop retrying a reply with its message id) has the same key.
    pub effect_key: String,
    /// The request body, `operationName` included.
    pub body: Value,
    /// SendMessage: nexus's message id, which GWS keeps with the message.
    pub message_id: Option<String>,
}

/// Why an event cannot make its GWS call, whatever GWS would say: dead-lettered at once.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The agent id travels as the `X-Agent-Id` header: one with a control character (which
    /// a foreign producer may publish) cannot be sent, on any try.
    #[error("the agent id cannot be sent as the {header} header (it holds a control character)", header = super::client::AGENT_HEADER)]
    AgentId,
    /// The effect log keys the effect by ids from the body (message, offer, agent): one over
    /// [`MAX_ID_BYTES`] or with a control character (a NUL PostgreSQL refuses) cannot be
    /// logged, on any try.
    #[error("the {kind} effect's key ({len} bytes, from ids in the body) cannot key the effect log: a control character or over {MAX_ID_BYTES} bytes")]
    EffectKey { kind: &'static str, len: usize },
}

/// Whether events of this type can make a GWS call (before reading the body).
pub fn may_operate(event_type: &str) -> bool {
    matches!(
        event_type,
        AgentAccepted::TYPE
            | MessageSent::TYPE
            | TransferRequested::TYPE
            | ConversationCompleted::TYPE
    )
}

/// The operation `event` asks for; `None` for events GWS is not told about (readiness, offers,
/// rejections, customer and bot messages, an agent's file message, consultations, a bot's
/// handoff).
pub fn operation_of(event: &Event) -> Result<Option<Operation>, OpError> {
    let e = &event.envelope;
    let op = match e.event_type.as_str() {
        AgentAccepted::TYPE => {
            let b: AgentAccepted = event.body_as()?;
            Operation {
                kind: OpKind::Accept,
                effect_key: format!("accept:{}:{}", b.agent_id, b.offer_id),
                body: json!({"operationName": "Accept"}),
                agent_id: b.agent_id,
                message_id: None,
            }
        }
        MessageSent::TYPE => {
            let b: MessageSent = event.body_as()?;
            // A file message is not text the agent typed: `SendMessage` would show its file
            // name as one, and the interface has no file operation. A message for agents only
            // has no place there either: GWS's chat would show it to the customer.
            if b.participant_kind != ParticipantKind::Agent
                || !b.media_ids.is_empty()
                || b.visibility.agents_only()
            {
                return Ok(None);
            }
            let agent_id = b.agent_id.unwrap_or(b.participant_id);
            Operation {
                kind: OpKind::SendMessage,
                effect_key: format!("send:{}", b.message_id),
                body: json!({
                    "operationName": "SendMessage",
                    "text": b.text.unwrap_or_default(),
                    "messageId": b.message_id,
                }),
                agent_id,
                message_id: Some(b.message_id),
            }
        }
        TransferRequested::TYPE => {
            let b: TransferRequested = event.body_as()?;
            // Consultations and conferences are not GWS transfers (not built); a bot's handoff
            // is not on behalf of an agent, nor is the conversation worker's hand-back of a
            // deleted agent's conversations (no desk of that agent acts in GWS any more).
            if b.mode != TransferMode::Transfer
                || e.producer == BOT_PRODUCER
                || e.producer == crate::workers::conversation::PRODUCER
            {
                return Ok(None);
            }
            let kind = match b.target_kind {
                TargetKind::Agent => "Agent",
                TargetKind::Queue => "Queue",
                _ => return Ok(None),
            };
            Operation {
                kind: OpKind::Transfer,
                // An agent may transfer, get the chat back and transfer again: per event.
                effect_key: format!("transfer:{}", e.event_id),
                body: json!({
                    "operationName": "Transfer",
                    "targetKind": kind,
                    "targetId": b.target_id,
                }),
                agent_id: b.agent_id,
                message_id: None,
            }
        }
        // The conversation worker's close of a deleted agent's chat that no queue takes back:
        // not the agent's act either.
        ConversationCompleted::TYPE if e.producer == crate::workers::conversation::PRODUCER => {
            return Ok(None)
        }
        ConversationCompleted::TYPE => {
            let b: ConversationCompleted = event.body_as()?;
            let mut body = Map::new();
            body.insert("operationName".into(), json!("Complete"));
            if let Some(d) = b.disposition {
                body.insert("disposition".into(), json!(d));
            }
            Operation {
                kind: OpKind::Complete,
                // Per event: an agent may complete more than once (a consultant leaves the
                // consultation, is later given the chat and completes it).
                effect_key: format!("complete:{}", e.event_id),
                body: Value::Object(body),
                agent_id: b.agent_id,
                message_id: None,
            }
        }
        _ => return Ok(None),
    };
    // Checked before the effect is logged: a request that cannot be built is no failure of
    // GWS, so it must neither be retried nor count against the target's circuit.
    if reqwest::header::HeaderValue::from_str(&op.agent_id).is_err() {
        return Err(OpError::AgentId);
    }
    if op.effect_key.len() > MAX_ID_BYTES || op.effect_key.chars().any(char::is_control) {
        return Err(OpError::EffectKey {
            kind: op.kind.name(),
            len: op.effect_key.len(),
        });
    }
    Ok(Some(op))
}

/// A chat as `GET /api/v2/me/chats/{id}` reports it (the body, or its `data` member).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ChatView {
    /// `Active` or `Completed`.
    pub state: String,
    pub participants: Vec<ChatParticipant>,
    pub messages: Vec<ChatMessage>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ChatParticipant {
    pub agent_id: String,
    /// `Invited`, `Connected` or `Left`.
    pub state: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ChatMessage {
    /// The id nexus gave the message (absent for messages GWS got elsewhere).
    pub message_id: Option<String>,
}

impl ChatView {
    pub fn from_json(v: Value) -> Result<ChatView, serde_json::Error> {
        match v {
            Value::Object(mut m) if m.get("data").is_some_and(Value::is_object) => {
                serde_json::from_value(m.remove("data").unwrap_or_default())
            }
            other => serde_json::from_value(other),
        }
    }

    fn agent_state(&self, agent: &str) -> Option<&str> {
        // The latest entry wins: an agent who left and was invited again appears twice.
        self.participants
            .iter()
            .rev()
            .find(|p| p.agent_id == agent)
            .map(|p| p.state.as_str())
    }
}

/// Whether `op` already took effect in `chat` (`None`: GWS knows no such chat).
///
/// Accept: the agent is a connected participant. SendMessage: the message id is in the
/// transcript. Transfer: the agent has left the chat (only a transfer or a completion make an
/// agent leave, and Complete comes later in the conversation's order). Complete: the chat is
/// completed, or the agent has left it (a consultant's Complete ends only its own part).
pub fn applied(op: &Operation, chat: Option<&ChatView>) -> bool {
    let Some(chat) = chat else {
        return false;
    };
    let state_is = |s: Option<&str>, want: &str| s.is_some_and(|s| s.eq_ignore_ascii_case(want));
    match op.kind {
        OpKind::Accept => state_is(chat.agent_state(&op.agent_id), "Connected"),
        OpKind::SendMessage => chat
            .messages
            .iter()
            .any(|m| m.message_id.is_some() && m.message_id == op.message_id),
        OpKind::Transfer => state_is(chat.agent_state(&op.agent_id), "Left"),
        OpKind::Complete => {
            chat.state.eq_ignore_ascii_case("Completed")
                || state_is(chat.agent_state(&op.agent_id), "Left")
        }
    }
}

/// Whether the call takes its agent out of the chat (a transfer away, a completion): once the
/// agent can no longer read the chat, such a call has nothing left to do.
pub fn leaves(op: &Operation) -> bool {
    matches!(op.kind, OpKind::Transfer | OpKind::Complete)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::chat as ev;
    use std::collections::BTreeMap;

    fn event<B: Body>(body: &B, producer: &str) -> Event {
        Event::typed(body, "t1", "c1", producer).expect("typed")
    }

    fn sent(kind: ParticipantKind) -> MessageSent {
        MessageSent {
            message_id: "m-1".into(),
            participant_id: "a1".into(),
            participant_kind: kind,
            nickname: "Alice".into(),
            agent_id: Some("a1".into()),
            kind: ev::MessageKind::Text,
            text: Some("hello".into()),
            media_ids: Vec::new(),
            in_reply_to: None,
            transcript_position: None,
            visibility: crate::events::chat::Visibility::All,
        }
    }

    fn transfer(mode: TransferMode, target_kind: TargetKind) -> TransferRequested {
        TransferRequested {
            agent_id: "a1".into(),
            participant_id: "a1".into(),
            target_kind,
            target_id: "a2".into(),
            mode,
            note: None,
            user_data: BTreeMap::new(),
        }
    }

    /// Ids from the body that the effect log's key holds (a message id, an offer id) with a
    /// NUL or too long for an index make no operation: PostgreSQL would refuse the row on every
    /// try. The longest that fits still goes.
    #[test]
    fn an_effect_key_the_log_cannot_hold_is_refused() {
        let longest = "m".repeat(MAX_ID_BYTES - "send:".len());
        for (id, ok) in [
            ("m\u{0}1".to_string(), false),
            ("m\t1".to_string(), false),
            (format!("{longest}m"), false),
            (longest, true),
        ] {
            let mut b = sent(ParticipantKind::Agent);
            b.message_id = id.clone();
            let got = operation_of(&event(&b, "edge/agent"));
            match (ok, got) {
                (true, Ok(Some(op))) => assert_eq!(op.effect_key, format!("send:{id}")),
                (false, Err(OpError::EffectKey { kind, .. })) => assert_eq!(kind, "SendMessage"),
                (_, other) => panic!("{} bytes: {other:?}", id.len()),
            }
        }
        let accept = AgentAccepted {
            offer_id: "o\u{0}".into(),
            agent_id: "a1".into(),
            participant_id: "a1".into(),
            nickname: "Alice".into(),
        };
        assert!(matches!(
            operation_of(&event(&accept, "edge/agent")),
            Err(OpError::EffectKey { .. })
        ));
    }

    #[test]
    fn agent_actions_map_to_operations() {
        let accept = AgentAccepted {
            offer_id: "o1".into(),
            agent_id: "a1".into(),
            participant_id: "a1".into(),
            nickname: "Alice".into(),
        };
        let op = operation_of(&event(&accept, "edge/agent"))
            .expect("ok")
            .expect("op");
        assert_eq!((op.kind, op.agent_id.as_str()), (OpKind::Accept, "a1"));
        assert_eq!(op.body, json!({"operationName": "Accept"}));
        assert_eq!(op.effect_key, "accept:a1:o1");

        let op = operation_of(&event(&sent(ParticipantKind::Agent), "edge/agent"))
            .expect("ok")
            .expect("op");
        assert_eq!(
            op.body,
            json!({"operationName": "SendMessage", "text": "hello", "messageId": "m-1"})
        );
        assert_eq!(op.effect_key, "send:m-1");
        // An internal note is not sent to GWS, whose chat would show it to the customer.
        let note = MessageSent {
            visibility: ev::Visibility::Agents,
            ..sent(ParticipantKind::Agent)
        };
        assert!(operation_of(&event(&note, "edge/agent"))
            .expect("ok")
            .is_none());

        let e = event(
            &transfer(TransferMode::Transfer, TargetKind::Agent),
            "edge/agent",
        );
        let op = operation_of(&e).expect("ok").expect("op");
        assert_eq!(
            op.body,
            json!({"operationName": "Transfer", "targetKind": "Agent", "targetId": "a2"})
        );
        assert_eq!(op.effect_key, format!("transfer:{}", e.envelope.event_id));

        let done = ConversationCompleted {
            agent_id: "a2".into(),
            participant_id: "a2".into(),
            disposition: Some("resolved".into()),
            note: None,
            user_data: BTreeMap::new(),
            close_conversation: true,
        };
        let op = operation_of(&event(&done, "edge/agent"))
            .expect("ok")
            .expect("op");
        assert_eq!(
            op.body,
            json!({"operationName": "Complete", "disposition": "resolved"})
        );
        assert_eq!(op.agent_id, "a2");
        // The worker's completion of a deleted agent's chat: no call as that agent.
        assert_eq!(
            operation_of(&event(&done, crate::workers::conversation::PRODUCER)).expect("ok"),
            None
        );
    }

    #[test]
    fn other_events_are_not_gws_calls() {
        for kind in [ParticipantKind::Bot, ParticipantKind::System] {
            let e = event(&sent(kind), "edge/bot");
            assert_eq!(operation_of(&e).expect("ok"), None, "{kind:?}");
        }
        let file = MessageSent {
            text: Some("plan.png".into()),
            media_ids: vec!["f1".into()],
            ..sent(ParticipantKind::Agent)
        };
        assert_eq!(
            operation_of(&event(&file, "edge/agent")).expect("ok"),
            None,
            "an agent's file message"
        );
        let consult = transfer(TransferMode::Conference, TargetKind::Agent);
        assert_eq!(
            operation_of(&event(&consult, "edge/agent")).expect("ok"),
            None
        );
        let handoff = transfer(TransferMode::Transfer, TargetKind::Queue);
        assert_eq!(
            operation_of(&event(&handoff, "edge/bot")).expect("ok"),
            None
        );
        // A deleted agent's conversation handed back to its queue by the conversation worker.
        assert_eq!(
            operation_of(&event(&handoff, crate::workers::conversation::PRODUCER)).expect("ok"),
            None
        );
        let ready = ev::AgentStateChanged {
            agent_id: "a1".into(),
            state: ev::AgentState::Ready,
            reason_code: None,
            capacity: BTreeMap::new(),
        };
        assert_eq!(
            operation_of(&event(&ready, "edge/agent")).expect("ok"),
            None
        );
    }

    fn chat(state: &str, participants: &[(&str, &str)], messages: &[&str]) -> ChatView {
        ChatView::from_json(json!({"data": {
            "state": state,
            "participants": participants.iter().map(|(a, s)| json!({"agentId": a, "state": s})).collect::<Vec<_>>(),
            "messages": messages.iter().map(|m| json!({"messageId": m, "text": "x"})).collect::<Vec<_>>(),
        }}))
        .expect("chat view")
    }

    fn op(kind: OpKind, agent: &str, message_id: Option<&str>) -> Operation {
        Operation {
            kind,
            agent_id: agent.into(),
            effect_key: String::new(),
            body: Value::Null,
            message_id: message_id.map(str::to_string),
        }
    }

    #[test]
    fn reconciliation_sees_what_took_effect() {
        let accept = op(OpKind::Accept, "a1", None);
        assert!(!applied(&accept, None), "no chat: nothing took effect");
        assert!(!applied(&accept, Some(&chat("Active", &[], &[]))));
        assert!(applied(
            &accept,
            Some(&chat("Active", &[("a1", "Connected")], &[]))
        ));
        assert!(
            !applied(
                &accept,
                Some(&chat("Active", &[("a1", "Connected"), ("a1", "Left")], &[]))
            ),
            "the latest entry of the agent counts"
        );
        assert!(!applied(
            &accept,
            Some(&chat("Active", &[("a1", "Invited")], &[]))
        ));

        let send = op(OpKind::SendMessage, "a1", Some("m-2"));
        let c = chat("Active", &[("a1", "Connected")], &["m-1"]);
        assert!(!applied(&send, Some(&c)));
        let c = chat("Active", &[("a1", "Connected")], &["m-1", "m-2"]);
        assert!(applied(&send, Some(&c)));

        let transfer = op(OpKind::Transfer, "a1", None);
        assert!(!applied(
            &transfer,
            Some(&chat("Active", &[("a1", "Connected")], &[]))
        ));
        assert!(applied(
            &transfer,
            Some(&chat("Active", &[("a1", "Left"), ("a2", "Invited")], &[]))
        ));
        assert!(
            !applied(
                &transfer,
                Some(&chat("Active", &[("a2", "Connected")], &[]))
            ),
            "an agent who never joined did not transfer"
        );

        let complete = op(OpKind::Complete, "a2", None);
        assert!(!applied(
            &complete,
            Some(&chat("Active", &[("a2", "Connected")], &[]))
        ));
        assert!(applied(
            &complete,
            Some(&chat("completed", &[("a2", "Left")], &[]))
        ));
        // A consultant's Complete: the chat goes on with its owner.
        let consultant = op(OpKind::Complete, "a1", None);
        assert!(applied(
            &consultant,
            Some(&chat("Active", &[("a2", "Connected"), ("a1", "Left")], &[]))
        ));
        assert!(!applied(
            &consultant,
            Some(&chat(
                "Active",
                &[("a2", "Connected"), ("a1", "Connected")],
                &[]
            ))
        ));
    }

    #[test]
    fn chat_views_parse_with_or_without_data() {
        let bare = ChatView::from_json(json!({"state": "Active", "extra": 1})).expect("bare");
        assert_eq!(bare.state, "Active");
        assert!(ChatView::from_json(json!({"state": 5})).is_err());
    }
}
