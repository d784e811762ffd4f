//! `/v1/admin/tenants/{tenant}/bots`: a tenant's bot endpoints (URL and credential).
//! The credential is accepted on POST/PATCH and never answered (`has_credential` instead).
//! POST and `POST .../{id}/token` (rotation) answer the bot's API token once, as `token`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{Body, Listing};
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::{BotEndpoint, BotPatch, BotToken, CreatedBot, NewBot, Page};

/// Refuses a bot URL the store would refuse, or in a private, loopback or link-local range
/// (the conversation worker posts transcripts to it from inside the cluster) unless
/// `workers.conversation.allow_private_bots`.
async fn check_target(state: &AppState, url: &str) -> Result<(), ApiError> {
    let allow = state.config.workers.conversation.allow_private_bots;
    super::check_target(
        url,
        allow,
        "BOT_TARGET_PRIVATE",
        " (workers.conversation.allow_private_bots allows it)",
    )
    .await
}

pub async fn create(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    Body(new): Body<NewBot>,
) -> Result<(StatusCode, Json<CreatedBot>), ApiError> {
    state.provisioning.tenant(&tenant).await?;
    check_target(&state, &new.url).await?;
    let created = state.provisioning.create_bot(&tenant, new).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn list(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    listing: Listing,
) -> Result<Json<Page<BotEndpoint>>, ApiError> {
    let page = listing.page()?;
    Ok(Json(state.provisioning.list_bots(&tenant, &page).await?))
}

pub async fn get(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<BotEndpoint>, ApiError> {
    Ok(Json(state.provisioning.bot(&tenant, &id).await?))
}

pub async fn update(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    Body(patch): Body<BotPatch>,
) -> Result<Json<BotEndpoint>, ApiError> {
    if let Some(url) = &patch.url {
        state.provisioning.bot(&tenant, &id).await?;
        check_target(&state, url).await?;
    }
    Ok(Json(
        state.provisioning.update_bot(&tenant, &id, patch).await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.provisioning.delete_bot(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new bot API token; the old one stops working.
pub async fn rotate_token(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<Json<BotToken>, ApiError> {
    Ok(Json(
        state.provisioning.rotate_bot_token(&tenant, &id).await?,
    ))
}
