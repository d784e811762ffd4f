//! Demo pages of `nexus dev`: a chat widget (`/demo/widget`) and an agent console
//! (`/demo/agent`), plain HTML/JS on the public APIs, with a demo tenant provisioned at start.

use std::path::Path;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{ApiError, AppState};
use crate::stores::provisioning::{
    NewAgent, NewApiKey, NewQueue, NewRoutingRule, NewTenant, Permission, Provisioning,
    ProvisioningError,
};

const WIDGET: &str = include_str!("widget.html");
const AGENT: &str = include_str!("agent.html");

/// The demo tenant's credentials, kept in the data dir (they are shown only once by the API).
#[derive(Clone, Serialize, Deserialize)]
pub struct DemoTenant {
    pub tenant_id: String,
    pub api_key: String,
    /// Two agents, so the console can transfer and consult; the first is signed in by default.
    #[serde(default)]
    pub agents: Vec<DemoAgent>,
    /// The queue web chats are routed to (a transfer target).
    #[serde(default)]
    pub queue_id: String,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct DemoAgent {
    pub id: String,
    pub name: String,
    pub token: String,
}

impl std::fmt::Debug for DemoTenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoTenant")
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/demo/widget", get(|| async { Html(WIDGET) }))
        .route("/demo/agent", get(|| async { Html(AGENT) }))
        .route("/demo/config.json", get(config))
}

async fn config(State(state): State<AppState>) -> Result<Response, ApiError> {
    let demo = state
        .demo
        .as_ref()
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", "the demo runs only in `nexus dev`"))?;
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(serde_json::json!({
            "tenant_id": demo.tenant_id,
            "api_key": demo.api_key,
            "agents": demo.agents.iter().map(|a| serde_json::json!({
                "id": a.id, "name": a.name, "token": a.token,
            })).collect::<Vec<_>>(),
            "queue": {"id": demo.queue_id, "name": DEMO_QUEUE},
        })),
    )
        .into_response())
}

/// The demo queue's name.
const DEMO_QUEUE: &str = "support";

/// The demo's agents, three chats each.
const DEMO_AGENTS: [&str; 2] = ["Demo Agent", "Second Agent"];

/// The demo tenant of `nexus dev`: read from `<data_dir>/demo.json`, or provisioned (tenant,
/// chat API key, queue, a web-chat rule to it, two agents of three chats) and written there.
/// A file of an older version (one agent) is replaced by a new tenant.
pub async fn ensure(
    provisioning: &Provisioning,
    data_dir: &Path,
) -> Result<DemoTenant, ProvisioningError> {
    let file = data_dir.join("demo.json");
    if let Some(demo) = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice::<DemoTenant>(&b).ok())
        .filter(|d| d.agents.len() == DEMO_AGENTS.len() && !d.queue_id.is_empty())
    {
        if provisioning
            .authenticate_api_key(&demo.api_key)
            .await
            .is_ok()
        {
            return Ok(demo);
        }
    }
    let suffix = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let tenant = provisioning
        .create_tenant(NewTenant {
            name: format!("demo-{suffix}"),
        })
        .await?;
    let key = provisioning
        .create_api_key(
            &tenant.id,
            NewApiKey {
                name: "demo widget".into(),
                permissions: vec![Permission::Chat],
                enabled: true,
                expires_at_ms: None,
            },
        )
        .await?;
    let queue = provisioning
        .create_queue(
            &tenant.id,
            NewQueue {
                name: DEMO_QUEUE.into(),
            },
        )
        .await?;
    provisioning
        .create_routing_rule(
            &tenant.id,
            NewRoutingRule {
                channel: "WEB_CHAT".into(),
                attributes: Default::default(),
                queue_id: queue.id.clone(),
                required_skills: Vec::new(),
                priority: 0,
                bot_id: None,
            },
        )
        .await?;
    let mut agents = Vec::new();
    for name in DEMO_AGENTS {
        let agent = provisioning
            .create_agent(
                &tenant.id,
                NewAgent {
                    name: name.into(),
                    skills: Vec::new(),
                    capacity: [("chat".to_string(), 3)].into(),
                },
            )
            .await?;
        agents.push(DemoAgent {
            id: agent.agent.id,
            name: name.into(),
            token: agent.token,
        });
    }
    let demo = DemoTenant {
        tenant_id: tenant.id,
        api_key: key.key,
        agents,
        queue_id: queue.id,
    };
    write_private(&file, &serde_json::to_vec_pretty(&demo).unwrap_or_default());
    info!(tenant = %demo.tenant_id, "demo tenant provisioned: open /demo/widget and /demo/agent");
    Ok(demo)
}

/// Writes a file only the owner can read (it holds the demo's credentials).
fn write_private(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    if let Err(e) = options.open(path).and_then(|mut f| f.write_all(bytes)) {
        tracing::warn!(error = %e, path = %path.display(), "cannot keep the demo credentials; a new demo tenant is made next start");
    }
}
