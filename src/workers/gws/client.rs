//! GWS calls on behalf of an agent, through the role's [`Peer`] (circuit, metrics, outcome
//! classification): `POST /api/v2/me/chats/{id}` with an operation and `GET` of the same path
//! to reconcile. After a 403 (or a POST's 404) the peer asks `GET /api/v2/me` (the agent's own
//! user, [`IDENTITY`]) whether GWS refuses the request (the agent out of the chat, a chat it
//! does not know) or nexus itself (a rotated credential, a wrong base URL): the first is the
//! event's refusal, the second a target that is down until it is fixed.
//!
//! The agent is named by the `X-Agent-Id` header (the nexus agent id); the tenant's GWS
//! credential goes as `Authorization: Bearer`. `X-Nexus-Event-Id` carries the event that asked
//! for the call, and `traceparent` its trace, for GWS-side logs.

use super::config::GwsConfig;
use super::ops::{ChatView, Operation};
use crate::events::Envelope;
use crate::workers::peer::{Peer, PeerFailure, PeerTarget};

/// Names the agent a call acts for.
pub const AGENT_HEADER: &str = "x-agent-id";
/// The nexus event id of the call.
pub const EVENT_HEADER: &str = "x-nexus-event-id";
/// The agent's own user: what GWS answers any caller whose credential and base URL it takes.
pub const IDENTITY: &str = "/api/v2/me";

pub struct GwsClient {
    peer: Peer,
}

/// The chat's path; `None` for an id that cannot be a path segment as is (nexus conversation
/// ids are UUIDs): `.` and `..` are refused too, which URL parsing would turn into another
/// GWS resource (`/api/v2/me/chats/..` is the agent's own user).
pub fn chat_path(conversation_id: &str) -> Option<String> {
    let ok = !conversation_id.is_empty()
        && conversation_id.len() <= 128
        && conversation_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !conversation_id.bytes().all(|b| b == b'.');
    ok.then(|| format!("/api/v2/me/chats/{conversation_id}"))
}

impl GwsClient {
    pub fn new(http: reqwest::Client, config: &GwsConfig) -> Self {
        Self {
            peer: Peer::new("gws", "gws", http, config).with_identity_check(IDENTITY),
        }
    }

    /// How long a call to `target` would be refused unsent (its circuit is open).
    pub fn refuses(&self, target: &PeerTarget) -> Option<std::time::Duration> {
        self.peer.refuses(target)
    }

    /// Makes `op` on the chat `path`.
    pub async fn operate(
        &self,
        target: &PeerTarget,
        path: &str,
        op: &Operation,
        envelope: &Envelope,
    ) -> Result<(), PeerFailure> {
        let event_id = envelope.event_id.to_string();
        let mut headers = vec![
            (AGENT_HEADER, op.agent_id.as_str()),
            (EVENT_HEADER, event_id.as_str()),
        ];
        if let Some(tp) = &envelope.traceparent {
            headers.push(("traceparent", tp.as_str()));
        }
        self.peer
            // The chat path names the conversation: the circuit's subject.
            .post_json(target, path, path, &headers, &op.body)
            .await
            .map(|_| ())
    }

    /// The chat as GWS has it, seen by `agent_id`; `None` if GWS does not know it.
    pub async fn chat(
        &self,
        target: &PeerTarget,
        path: &str,
        agent_id: &str,
    ) -> Result<Option<ChatView>, PeerFailure> {
        let Some(v) = self
            .peer
            .get_json(target, path, path, &[(AGENT_HEADER, agent_id)])
            .await?
        else {
            return Ok(None);
        };
        ChatView::from_json(v)
            .map(Some)
            .map_err(|e| PeerFailure::retry(format!("GET {path}: unexpected chat body: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_become_paths() {
        assert_eq!(
            chat_path("0190a1b2-c3d4").as_deref(),
            Some("/api/v2/me/chats/0190a1b2-c3d4")
        );
        assert_eq!(chat_path("v1.2").as_deref(), Some("/api/v2/me/chats/v1.2"));
        // `.` and `..` would be resolved away: `/api/v2/me/chats/..` is the agent's user.
        for bad in ["", "a/b", "../x", "a b", "a?b", ".", "..", "..."] {
            assert_eq!(chat_path(bad), None, "{bad:?}");
        }
    }
}
