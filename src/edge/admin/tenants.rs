//! `/v1/admin/tenants`: create, list, read, rename and delete tenants; deleting a tenant
//! deletes everything it owns.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{Body, Listing};
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::{NewTenant, Page, Tenant, TenantPatch};

pub async fn create(
    State(state): State<AppState>,
    Body(new): Body<NewTenant>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    let created = state.provisioning.create_tenant(new).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list(
    State(state): State<AppState>,
    listing: Listing,
) -> Result<Json<Page<Tenant>>, ApiError> {
    let page = listing.page()?;
    Ok(Json(state.provisioning.list_tenants(&page).await?))
}

pub async fn get(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(state.provisioning.tenant(&tenant).await?))
}

pub async fn update(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Body(patch): Body<TenantPatch>,
) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(
        state.provisioning.update_tenant(&tenant, patch).await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.provisioning.delete_tenant(&tenant).await?;
    Ok(StatusCode::NO_CONTENT)
}
