//! What in-process chat tests provision and store before they start: tenants, chat API keys,
//! agents with their tokens, v3 sessions, and the conversation record a worker would write.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use nexus::edge::AppState;
use nexus::stores::provisioning::{NewAgent, NewApiKey, NewTenant, Permission, Provisioning};
use nexus::stores::session::{Conversation, ConversationState, Party, PartyKind, Routing};
use serde_json::json;

/// A v3 chat session started through the API: its id, participant id and client key.
#[derive(Clone)]
pub struct Session {
    pub id: String,
    pub pid: String,
    pub ck: String,
}

/// A new tenant named `name`; its id.
pub async fn create_tenant(p: &Provisioning, name: &str) -> String {
    p.create_tenant(NewTenant { name: name.into() })
        .await
        .expect("tenant")
        .id
}

/// A new API key of `tenant` (a name of its own) with `perms`; the key.
pub async fn api_key(
    p: &Provisioning,
    tenant: &str,
    perms: Vec<Permission>,
    enabled: bool,
    expires: Option<i64>,
) -> String {
    p.create_api_key(
        tenant,
        NewApiKey {
            name: format!("k{}", uuid::Uuid::new_v4().simple()),
            permissions: perms,
            enabled,
            expires_at_ms: expires,
        },
    )
    .await
    .expect("api key")
    .key
}

/// A new tenant named `name` with an enabled chat API key; (tenant id, key).
pub async fn tenant_with_key(p: &Provisioning, name: &str) -> (String, String) {
    let id = create_tenant(p, name).await;
    let key = api_key(p, &id, vec![Permission::Chat], true, None).await;
    (id, key)
}

/// A new agent `name` of `tenant` taking two chats; (agent id, token).
pub async fn agent(p: &Provisioning, tenant: &str, name: &str) -> (String, String) {
    let a = p
        .create_agent(
            tenant,
            NewAgent {
                name: name.into(),
                skills: vec![],
                capacity: BTreeMap::from([("chat".into(), 2)]),
            },
        )
        .await
        .expect("agent");
    (a.agent.id, a.token)
}

/// Starts a v3 chat as `nickname` with API key `key` (201 expected).
pub async fn start(state: &AppState, key: &str, nickname: &str) -> Session {
    let req = Request::post("/nexus/v3/chat/sessions")
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Body::from(json!({ "nickname": nickname }).to_string()))
        .expect("request");
    let (status, body) = super::inproc::call(state, req).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    Session {
        id: body["session_id"].as_str().expect("id").into(),
        pid: body["participant_id"].as_str().expect("pid").into(),
        ck: body["client_key"].as_str().expect("ck").into(),
    }
}

/// The record the conversation worker would have saved for web chat `id` of `tenant`, its
/// customer Ann, held by no agent.
pub fn conversation(tenant: &str, id: &str, state: ConversationState) -> Conversation {
    Conversation {
        tenant_id: tenant.into(),
        conversation_id: id.into(),
        channel: "WEB_CHAT".into(),
        state,
        customer: Party {
            participant_id: "customer".into(),
            nickname: "Ann".into(),
            kind: PartyKind::Customer,
        },
        contact: BTreeMap::new(),
        user_data: BTreeMap::new(),
        subject: None,
        queue_id: None,
        bot_id: None,
        agent_id: None,
        offered_to: None,
        declined_by: vec![],
        files: 0,
        created_at_ms: 1_700_000_000_000,
        last_activity_ms: 1_700_000_000_000,
        closed_reason: None,
        routing: Routing::default(),
        version: 0,
    }
}

/// The [`conversation`] record of a chat held by `agent`.
pub fn assigned(tenant: &str, id: &str, state: ConversationState, agent: &str) -> Conversation {
    Conversation {
        agent_id: Some(agent.into()),
        ..conversation(tenant, id, state)
    }
}
