//! `/v1/admin/tenants`: create, list, read, rename and delete tenants; deleting a tenant
//! deletes everything it owns, its live session data included.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{Body, Listing};
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::{
    NewTenant, Object, Page, ProvisioningError, Tenant, TenantPatch,
};

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

/// Deletes the tenant, then purges its live session data (conversations, transcripts, agent
/// presence and slots, queues, timers) from the session store. The delete records the purge as
/// owed in its own transaction, so a purge that fails (503 `TENANT_PURGE_PENDING`) is done by
/// the same DELETE sent again: the tenant is gone, but the owed purge answers it rather than a
/// 404. Purged after the delete, not before: from the delete on, the tenant's keys and tokens
/// stop authenticating, so its customers and agents stop adding to what is purged (its open
/// streams and sockets end at their next credential check).
pub async fn delete(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
) -> Result<StatusCode, ApiError> {
    match state.provisioning.delete_tenant(&tenant).await {
        Ok(()) => {}
        Err(ProvisioningError::NotFound(Object::Tenant))
            if state.provisioning.tenant_purge_pending(&tenant).await? => {}
        Err(e) => return Err(e.into()),
    }
    let purged = match state.sessions() {
        Ok(sessions) => sessions
            .purge_tenant(&tenant)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.message),
    };
    match purged {
        Ok(removed) => {
            tracing::info!(tenant = %tenant, removed, "the deleted tenant's live session data purged");
        }
        Err(error) => {
            tracing::warn!(tenant = %tenant, error = %error, "the deleted tenant's live session data is not purged yet");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "TENANT_PURGE_PENDING",
                "the tenant is deleted, but its live session data is not purged yet: send the DELETE again",
            ));
        }
    }
    state.provisioning.tenant_purged(&tenant).await?;
    Ok(StatusCode::NO_CONTENT)
}
