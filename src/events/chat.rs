//! Typed bodies of the conversation events, so edges and workers never poke at JSON maps.
//! Each mirrors its schema in `schemas/events/` field for field (the codec checks it on encode).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::codec::Event;

/// A typed event body: its event type and (de)serialisation to the codec's JSON map.
pub trait Body: Serialize + DeserializeOwned {
    const TYPE: &'static str;
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("expected a {expected} event, got {got}")]
    WrongType { expected: &'static str, got: String },
    #[error("{event_type} body: {source}")]
    Invalid {
        event_type: &'static str,
        source: serde_json::Error,
    },
}

impl Event {
    /// A new event of a typed body (fresh id, now).
    pub fn typed<B: Body>(
        body: &B,
        tenant_id: &str,
        conversation_id: &str,
        producer: &str,
    ) -> Result<Event, BodyError> {
        let map = match serde_json::to_value(body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => unreachable_body::<B>()?,
            Err(source) => {
                return Err(BodyError::Invalid {
                    event_type: B::TYPE,
                    source,
                })
            }
        };
        Ok(Event::new(
            B::TYPE,
            tenant_id,
            conversation_id,
            producer,
            map,
        ))
    }

    /// The body as `B`, if the event is of its type.
    pub fn body_as<B: Body>(&self) -> Result<B, BodyError> {
        if self.envelope.event_type != B::TYPE {
            return Err(BodyError::WrongType {
                expected: B::TYPE,
                got: self.envelope.event_type.clone(),
            });
        }
        // Straight from the map: no copy of it first.
        B::deserialize(&*self.body).map_err(|source| BodyError::Invalid {
            event_type: B::TYPE,
            source,
        })
    }

    /// Sets a deterministic id: derived from a source event id and what was derived, so a
    /// redelivered source produces the same derived events (consumers dedup on the id).
    pub fn with_derived_id(mut self, source: &Uuid, what: &str) -> Event {
        self.envelope.event_id = derived_id(source, what);
        self
    }
}

/// UUID v5 of `source` + `what`: stable across redeliveries and replays.
pub fn derived_id(source: &Uuid, what: &str) -> Uuid {
    let mut name = Vec::with_capacity(16 + what.len());
    name.extend_from_slice(source.as_bytes());
    name.extend_from_slice(what.as_bytes());
    Uuid::new_v5(&Uuid::NAMESPACE_OID, &name)
}

fn unreachable_body<B: Body>() -> Result<serde_json::Map<String, Value>, BodyError> {
    Err(BodyError::Invalid {
        event_type: B::TYPE,
        source: serde::de::Error::custom("a body must serialise to a JSON object"),
    })
}

macro_rules! symbols {
    ($(#[$m:meta])* $name:ident { $($variant:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum $name {
            $($variant,)*
            /// The reader default for symbols this version does not know.
            #[default]
            #[serde(other)]
            Unknown,
        }
    };
}

symbols!(Channel {
    WebChat,
    Messaging,
    Sms,
    Email
});
symbols!(ParticipantKind {
    Customer,
    Agent,
    Bot,
    System
});
symbols!(MessageKind {
    Text,
    Notice,
    CustomNotice
});
symbols!(TypingState { Started, Stopped });
symbols!(AgentState {
    Ready,
    NotReady,
    LoggedOut
});
symbols!(RejectReason {
    Declined,
    Timeout,
    NotReady,
    Capacity
});
symbols!(LeftReason {
    Left,
    Disconnected,
    Transferred,
    Timeout,
    Removed
});
symbols!(CloseReason {
    CustomerLeft,
    AgentCompleted,
    IdleTimeout,
    AsyncExpired,
    System,
    Error
});
symbols!(TargetKind { Queue, Agent, Bot });
symbols!(ReceiptKind { Delivered, Read });
symbols!(TransferMode {
    Transfer,
    Consult,
    Conference
});
symbols!(
    /// Who sees a message: `Unknown` (a symbol added later) counts as `Agents`.
    Visibility { All, Agents }
);
symbols!(ClientEventKind {
    Transcript,
    Offer,
    OfferClosed,
    State
});

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email_address: Option<String>,
    pub phone_number: Option<String>,
}

impl Contact {
    /// The set fields, by their wire names (for the session record).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        [
            ("first_name", &self.first_name),
            ("last_name", &self.last_name),
            ("email_address", &self.email_address),
            ("phone_number", &self.phone_number),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
        .collect()
    }
}

macro_rules! body {
    ($name:ident) => {
        impl Body for $name {
            const TYPE: &'static str = stringify!($name);
        }
    };
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationRequested {
    pub channel: Channel,
    pub channel_id: Option<String>,
    pub service: Option<String>,
    pub participant_id: String,
    pub nickname: String,
    pub contact: Contact,
    pub subject: Option<String>,
    pub first_message: Option<String>,
    pub user_data: BTreeMap<String, String>,
    #[serde(rename = "async")]
    pub is_async: bool,
}
body!(ConversationRequested);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageReceived {
    pub message_id: String,
    pub client_message_id: Option<String>,
    pub channel: Channel,
    pub channel_id: Option<String>,
    pub participant_id: String,
    pub participant_kind: ParticipantKind,
    pub nickname: Option<String>,
    pub contact: Contact,
    pub kind: MessageKind,
    pub text: Option<String>,
    pub media_ids: Vec<String>,
    pub sent_at: Option<i64>,
    pub transcript_position: Option<i64>,
}
body!(MessageReceived);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageSent {
    pub message_id: String,
    pub participant_id: String,
    pub participant_kind: ParticipantKind,
    pub nickname: String,
    pub agent_id: Option<String>,
    pub kind: MessageKind,
    pub text: Option<String>,
    pub media_ids: Vec<String>,
    pub in_reply_to: Option<String>,
    pub transcript_position: Option<i64>,
    /// Schema v2; `All` when read from v1 (or absent from a JSON body).
    #[serde(default = "visible_to_all")]
    pub visibility: Visibility,
}
body!(MessageSent);

fn visible_to_all() -> Visibility {
    Visibility::All
}

impl Visibility {
    /// Whether only agents may see it (a symbol this version does not know included).
    pub fn agents_only(self) -> bool {
        self != Visibility::All
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypingIndicated {
    pub participant_id: String,
    pub participant_kind: ParticipantKind,
    pub state: TypingState,
    pub preview: Option<String>,
    pub transcript_position: Option<i64>,
}
body!(TypingIndicated);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStateChanged {
    pub agent_id: String,
    pub state: AgentState,
    pub reason_code: Option<String>,
    pub capacity: BTreeMap<String, i32>,
}
body!(AgentStateChanged);

/// An admin changed the agent's skills or capacity; keyed like its states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentProfileChanged {
    pub agent_id: String,
    pub skills: Vec<String>,
    pub capacity: BTreeMap<String, i32>,
}
body!(AgentProfileChanged);

/// A bot turn that failed with the bot down (`bot_fallback = "retry"`) or throttled (a 429,
/// either mode) is due again; the conversation worker's timer publishes it, keyed by the
/// conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotTurnDue {
    pub bot_id: String,
    pub position: i64,
    pub attempt: i32,
}
body!(BotTurnDue);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentOffered {
    pub offer_id: String,
    pub agent_id: String,
    pub queue_id: Option<String>,
    pub channel: Channel,
    pub channel_id: Option<String>,
    pub customer_nickname: String,
    pub expires_at: i64,
    pub attempt: i32,
}
body!(AgentOffered);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentAccepted {
    pub offer_id: String,
    pub agent_id: String,
    pub participant_id: String,
    pub nickname: String,
}
body!(AgentAccepted);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRejected {
    pub offer_id: String,
    pub agent_id: String,
    pub reason: RejectReason,
}
body!(AgentRejected);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationCompleted {
    pub agent_id: String,
    pub participant_id: String,
    pub disposition: Option<String>,
    pub note: Option<String>,
    pub user_data: BTreeMap<String, String>,
    pub close_conversation: bool,
}
body!(ConversationCompleted);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiptReceived {
    pub participant_id: String,
    pub participant_kind: ParticipantKind,
    pub kind: ReceiptKind,
    pub message_id: Option<String>,
    pub client_message_id: Option<String>,
    pub transcript_position: Option<i64>,
    pub read_at: Option<i64>,
}
body!(ReceiptReceived);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserDataUpdated {
    pub participant_id: String,
    pub participant_kind: ParticipantKind,
    pub user_data: BTreeMap<String, String>,
    pub removed_keys: Vec<String>,
}
body!(UserDataUpdated);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferRequested {
    pub agent_id: String,
    pub participant_id: String,
    pub target_kind: TargetKind,
    pub target_id: String,
    pub mode: TransferMode,
    pub note: Option<String>,
    pub user_data: BTreeMap<String, String>,
}
body!(TransferRequested);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationStarted {
    pub channel: Channel,
    pub channel_id: Option<String>,
    pub customer_participant_id: String,
    pub customer_nickname: String,
    /// The contact fields of the request (schema v2; `Default` when read from v1).
    #[serde(default)]
    pub contact: Contact,
    pub contact_id: Option<String>,
    pub subject: Option<String>,
    pub user_data: BTreeMap<String, String>,
    #[serde(rename = "async")]
    pub is_async: bool,
}
body!(ConversationStarted);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationRouted {
    pub target_kind: TargetKind,
    pub target_id: String,
    pub queue_id: Option<String>,
    pub skills: Vec<String>,
    pub priority: i32,
    pub rule_id: Option<String>,
}
body!(ConversationRouted);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantJoined {
    pub participant_id: String,
    pub participant_kind: ParticipantKind,
    pub nickname: String,
    pub agent_id: Option<String>,
    pub transcript_position: Option<i64>,
    /// Schema v2; `All` when read from v1 (or absent from a JSON body).
    #[serde(default = "visible_to_all")]
    pub visibility: Visibility,
}
body!(ParticipantJoined);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantLeft {
    pub participant_id: String,
    pub participant_kind: ParticipantKind,
    pub nickname: Option<String>,
    pub reason: LeftReason,
    pub transcript_position: Option<i64>,
    /// Schema v2; `All` when read from v1 (or absent from a JSON body).
    #[serde(default = "visible_to_all")]
    pub visibility: Visibility,
}
body!(ParticipantLeft);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationClosed {
    pub reason: CloseReason,
    pub closed_by_participant_id: Option<String>,
    pub transcript_length: i64,
    /// The conversation's channel (schema v2; `None` when read from v1).
    #[serde(default)]
    pub channel: Option<Channel>,
}
body!(ConversationClosed);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientEvent {
    pub to_customer: bool,
    pub to_agents: Vec<String>,
    pub kind: ClientEventKind,
    pub position: Option<i64>,
    /// The JSON object the sockets receive, as text.
    pub data: String,
}
body!(ClientEvent);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{decode, encode};

    #[test]
    fn typed_bodies_round_trip_through_avro() {
        let body = ConversationRequested {
            channel: Channel::WebChat,
            channel_id: None,
            service: Some("default".into()),
            participant_id: "p1".into(),
            nickname: "Ann".into(),
            contact: Contact {
                email_address: Some("ann@example.com".into()),
                ..Contact::default()
            },
            subject: None,
            first_message: Some("hi".into()),
            user_data: BTreeMap::from([("k".into(), "v".into())]),
            is_async: false,
        };
        let event = Event::typed(&body, "t1", "c1", "test").expect("typed");
        let back = decode(&encode(&event).expect("encode")).expect("decode");
        assert_eq!(back.body_as::<ConversationRequested>().expect("body"), body);
        assert!(matches!(
            back.body_as::<MessageSent>(),
            Err(BodyError::WrongType { .. })
        ));
    }

    #[test]
    fn client_event_and_enums_encode() {
        let body = ClientEvent {
            to_customer: true,
            to_agents: vec!["a1".into()],
            kind: ClientEventKind::OfferClosed,
            position: Some(3),
            data: "{}".into(),
        };
        let event = Event::typed(&body, "t1", "c1", "test").expect("typed");
        assert_eq!(event.body["kind"], "OFFER_CLOSED");
        let back = decode(&encode(&event).expect("encode")).expect("decode");
        assert_eq!(back.body_as::<ClientEvent>().expect("body"), body);
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let source = Uuid::now_v7();
        assert_eq!(derived_id(&source, "a"), derived_id(&source, "a"));
        assert_ne!(derived_id(&source, "a"), derived_id(&source, "b"));
    }
}
