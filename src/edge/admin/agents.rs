//! `/v1/admin/tenants/{tenant}/agents`: a tenant's agents (skills, capacity per media).
//! POST and `POST .../{id}/token` (rotation) answer the agent token once, as `token`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{Body, Listing};
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::{
    Agent, AgentPatch, AgentToken, CreatedAgent, NewAgent, Object, Page, ProvisioningError,
};

pub async fn create(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Body(new): Body<NewAgent>,
) -> Result<(StatusCode, Json<CreatedAgent>), ApiError> {
    let created = state.provisioning.create_agent(&tenant, new).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    listing: Listing,
) -> Result<Json<Page<Agent>>, ApiError> {
    let page = listing.page()?;
    Ok(Json(state.provisioning.list_agents(&tenant, &page).await?))
}

pub async fn get(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<Agent>, ApiError> {
    Ok(Json(state.provisioning.agent(&tenant, &id).await?))
}

/// A change of skills or capacity is published for the routing state after it is saved; if
/// that publish fails the answer is the error, and the same PATCH again publishes it.
pub async fn update(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    Body(patch): Body<AgentPatch>,
) -> Result<Json<Agent>, ApiError> {
    let profile = patch.skills.is_some() || patch.capacity.is_some();
    let agent = state.provisioning.update_agent(&tenant, &id, patch).await?;
    if profile {
        crate::edge::agent::publish_profile(&state, &agent).await?;
    }
    Ok(Json(agent))
}

/// Deletes the agent and has its conversations handed back. A DELETE of an agent that is gone
/// but known to the routing state (a presence) publishes the hand-back again: the answer of one
/// whose hand-back could not be published (503 `AGENT_HANDBACK_PENDING`) says to repeat it.
pub async fn delete(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    match state.provisioning.agent(&tenant, &id).await {
        Ok(agent) => {
            // Not ready first, so the routing state stops offering chats to the agent
            // (published before the delete: if the delete then fails, the agent is merely
            // not ready).
            crate::edge::agent::do_set_state(&state, &agent, false, None, Default::default())
                .await?;
            state.provisioning.delete_agent(&tenant, &id).await?;
        }
        Err(ProvisioningError::NotFound(Object::Agent))
            if had_presence(&state, &tenant, &id).await? => {}
        Err(e) => return Err(e.into()),
    }
    // Once more after the delete: the worker, finding no agent, hands its conversations back
    // to their queues (the first may be applied before the delete commits). Tried a few times:
    // after this, only a repeated DELETE can publish it.
    let mut last = None;
    for wait_ms in [0, 200, 1_000] {
        tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
        match crate::edge::agent::publish_deleted(&state, &tenant, &id).await {
            Ok(()) => return Ok(StatusCode::NO_CONTENT),
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        tracing::warn!(agent = %id, error = %e.message, "the deleted agent's conversations could not be handed back yet");
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "AGENT_HANDBACK_PENDING",
        "the agent is deleted, but its conversations are not handed back yet: send the DELETE again",
    ))
}

/// Whether the routing state knows the agent (it was provisioned once in this tenant).
async fn had_presence(state: &AppState, tenant: &str, id: &str) -> Result<bool, ApiError> {
    let Ok(store) = state.sessions() else {
        return Ok(false);
    };
    store
        .presence(tenant, id)
        .await
        .map(|p| p.is_some())
        .map_err(|e| ApiError::unavailable(e.to_string()))
}

/// A new token for the agent; the old one stops working.
pub async fn rotate_token(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<AgentToken>, ApiError> {
    Ok(Json(
        state.provisioning.rotate_agent_token(&tenant, &id).await?,
    ))
}
