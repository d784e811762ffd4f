//! `/v1/admin/tenants/{tenant}/agents`: a tenant's agents (skills, capacity per media).
//! POST and `POST .../{id}/token` (rotation) answer the agent token once, as `token`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{Body, Listing};
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::{Agent, AgentPatch, AgentToken, CreatedAgent, NewAgent, Page};

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

pub async fn delete(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    // Not ready first, so the routing state stops offering chats to the agent (published
    // before the delete: if the delete then fails, the agent is merely not ready).
    let agent = state.provisioning.agent(&tenant, &id).await?;
    crate::edge::agent::do_set_state(&state, &agent, false, None, Default::default()).await?;
    state.provisioning.delete_agent(&tenant, &id).await?;
    // Once more after the delete: the worker, finding no agent, hands its conversations back
    // to their queues (the first may be applied before the delete commits).
    if let Err(e) =
        crate::edge::agent::do_set_state(&state, &agent, false, None, Default::default()).await
    {
        tracing::warn!(agent = %id, error = %e.message, "the deleted agent's conversations could not be handed back; they stay with it until they close");
    }
    Ok(StatusCode::NO_CONTENT)
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
