//! `/v1/admin/tenants/{tenant}/routing-rules`: channel and attributes → queue, skills,
//! priority, optional bot; a rule links only to its own tenant's queues and bots.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{Body, Listing};
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::{NewRoutingRule, Page, RoutingRule, RoutingRulePatch};

pub async fn create(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Body(new): Body<NewRoutingRule>,
) -> Result<(StatusCode, Json<RoutingRule>), ApiError> {
    let created = state.provisioning.create_routing_rule(&tenant, new).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    listing: Listing,
) -> Result<Json<Page<RoutingRule>>, ApiError> {
    let page = listing.page()?;
    Ok(Json(
        state
            .provisioning
            .list_routing_rules(&tenant, &page)
            .await?,
    ))
}

pub async fn get(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<RoutingRule>, ApiError> {
    Ok(Json(state.provisioning.routing_rule(&tenant, &id).await?))
}

pub async fn update(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    Body(patch): Body<RoutingRulePatch>,
) -> Result<Json<RoutingRule>, ApiError> {
    Ok(Json(
        state
            .provisioning
            .update_routing_rule(&tenant, &id, patch)
            .await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.provisioning.delete_routing_rule(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
