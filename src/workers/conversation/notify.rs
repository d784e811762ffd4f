//! What the conversation worker tells the sockets: transcript entries, offers and state
//! changes as `ClientEvent`s on the delivery topic, in the JSON the socket protocol documents.

use serde_json::{json, Value};

use crate::events::chat::{ClientEvent, ClientEventKind};
use crate::stores::session::{Entry, PartyKind};

/// The socket JSON of a transcript entry.
pub fn entry_json(conversation_id: &str, e: &Entry) -> Value {
    json!({
        "type": "transcript",
        "conversation_id": conversation_id,
        "position": e.position,
        "kind": e.entry.kind,
        "from": {
            "participant_id": e.entry.from.participant_id,
            "nickname": e.entry.from.nickname,
            "kind": party_kind(&e.entry.from.kind),
        },
        "text": e.entry.text,
        "message_id": e.entry.message_id,
        "data": e.entry.data,
        "at": e.entry.at_ms,
    })
}

pub fn party_kind(k: &PartyKind) -> &'static str {
    match k {
        PartyKind::Customer => "customer",
        PartyKind::Agent => "agent",
        PartyKind::Bot => "bot",
        PartyKind::System => "system",
    }
}

/// The socket JSON of a conversation's close (`reason` as the closed event names it).
pub fn closed_json(conversation_id: &str, reason: Option<&str>) -> Value {
    json!({"type": "state", "conversation_id": conversation_id, "state": "closed", "reason": reason})
}

/// A transcript entry for the customer (unless it is for agents only) and the given agents.
pub fn transcript(conversation_id: &str, e: &Entry, agents: Vec<String>) -> ClientEvent {
    ClientEvent {
        to_customer: !e.entry.agents_only(),
        to_agents: agents,
        kind: ClientEventKind::Transcript,
        position: i64::try_from(e.position).ok(),
        data: entry_json(conversation_id, e).to_string(),
    }
}

/// Something for agents only (offers, offer withdrawn).
pub fn to_agent(agent_id: &str, kind: ClientEventKind, data: Value) -> ClientEvent {
    ClientEvent {
        to_customer: false,
        to_agents: vec![agent_id.to_string()],
        kind,
        position: None,
        data: data.to_string(),
    }
}

/// An offer (or consult invitation) withdrawn from one agent's desk, by its id.
pub fn offer_closed(
    agent_id: &str,
    conversation_id: &str,
    offer_id: Option<&str>,
    reason: impl serde::Serialize,
) -> ClientEvent {
    let data = json!({"type": "offer_closed", "conversation_id": conversation_id,
        "offer_id": offer_id, "reason": reason});
    to_agent(agent_id, ClientEventKind::OfferClosed, data)
}

/// A conversation state change (connected, closed) for the customer and agents.
pub fn state(to_customer: bool, agents: Vec<String>, data: Value) -> ClientEvent {
    ClientEvent {
        to_customer,
        to_agents: agents,
        kind: ClientEventKind::State,
        position: None,
        data: data.to_string(),
    }
}
