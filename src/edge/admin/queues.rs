//! `/v1/admin/tenants/{tenant}/queues`: create, list, read, rename and delete a tenant's
//! queues; a queue still used by a routing rule cannot be deleted (409).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{Body, Listing};
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::{NewQueue, Page, Queue, QueuePatch};

pub async fn create(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Body(new): Body<NewQueue>,
) -> Result<(StatusCode, Json<Queue>), ApiError> {
    let created = state.provisioning.create_queue(&tenant, new).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    listing: Listing,
) -> Result<Json<Page<Queue>>, ApiError> {
    let page = listing.page()?;
    Ok(Json(state.provisioning.list_queues(&tenant, &page).await?))
}

pub async fn get(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<Queue>, ApiError> {
    Ok(Json(state.provisioning.queue(&tenant, &id).await?))
}

pub async fn update(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    Body(patch): Body<QueuePatch>,
) -> Result<Json<Queue>, ApiError> {
    Ok(Json(
        state.provisioning.update_queue(&tenant, &id, patch).await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.provisioning.delete_queue(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
