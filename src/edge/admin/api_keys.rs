//! `/v1/admin/tenants/{tenant}/api-keys`: a tenant's API keys (permissions, enabled, expiry).
//! The raw key is answered once, by POST, as `key`; reads never show it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{Body, Listing};
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::{ApiKey, ApiKeyPatch, CreatedApiKey, NewApiKey, Page};

pub async fn create(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Body(new): Body<NewApiKey>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let created = state.provisioning.create_api_key(&tenant, new).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    listing: Listing,
) -> Result<Json<Page<ApiKey>>, ApiError> {
    let page = listing.page()?;
    Ok(Json(
        state.provisioning.list_api_keys(&tenant, &page).await?,
    ))
}

pub async fn get(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<ApiKey>, ApiError> {
    Ok(Json(state.provisioning.api_key(&tenant, &id).await?))
}

pub async fn update(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    Body(patch): Body<ApiKeyPatch>,
) -> Result<Json<ApiKey>, ApiError> {
    Ok(Json(
        state
            .provisioning
            .update_api_key(&tenant, &id, patch)
            .await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.provisioning.delete_api_key(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
