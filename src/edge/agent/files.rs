//! Agent file messages: the agent holding a conversation (or its joined consultant) uploads a
//! file into it, checked and stored as a customer's upload is; the customer gets it as a
//! `FileUploaded` entry from the agent and downloads it through the chat API.

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::Value;

use super::{agent_of, conversation_of, send_message};
use crate::edge::chat;
use crate::edge::{ApiError, AppState};
use crate::stores::provisioning::Agent;
use crate::stores::session::ConversationState;

/// `POST /v1/agent/conversations/{id}/files`: multipart part `file`, optional `message_id`
/// (a retry with it is the same file and one message). 201 as the customer's upload, its `url`
/// the agent's download.
pub(super) async fn upload(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let agent = agent_of(&state, &headers).await?;
    let multipart = multipart.map_err(chat::upload_rejection)?;
    ensure_holding(&state, &agent, &id).await?;
    let (_permit, upload) = chat::receive_upload(&state, multipart).await?;
    // Again once the body is in: the chat may have closed, or moved on, meanwhile.
    ensure_holding(&state, &agent, &id).await?;
    let tenant = &agent.tenant_id;
    let client_id = upload.message_id.clone();
    let sender = format!("agent/{}/", agent.id);
    let stable = client_id
        .as_deref()
        .map(|m| chat::stable_file_id(tenant, &id, &sender, m));
    let file = chat::store_upload(&state, tenant, &id, stable, upload).await?;
    let published = send_message(
        &state,
        &agent,
        &id,
        file.name.clone(),
        client_id.clone(),
        vec![file.id.clone()],
        crate::events::chat::Visibility::All,
    );
    let retriable = client_id.is_some();
    let message_id =
        chat::published_or_released(&state, tenant, &id, &file, retriable, published).await?;
    let url = format!("/v1/agent/conversations/{id}/files/{}", file.id);
    Ok(chat::uploaded(&file, url, message_id))
}

/// Only into a conversation the agent is in now, as its owner or joined consultant: 404
/// `CONVERSATION_NOT_FOUND` otherwise (as for one that does not exist), 409
/// `CONVERSATION_CLOSED` once it closed. Checked before the file is stored: the worker would
/// drop the message of anyone else, and the file would take one of the chat's places.
async fn ensure_holding(state: &AppState, agent: &Agent, id: &str) -> Result<(), ApiError> {
    let c = conversation_of(state, agent, id).await?;
    let me = Some(agent.id.as_str());
    let Some(c) =
        c.filter(|c| c.agent_id.as_deref() == me || c.routing.consultant.as_deref() == me)
    else {
        return Err(ApiError::not_found(
            "CONVERSATION_NOT_FOUND",
            "no such conversation of yours",
        ));
    };
    if c.state == ConversationState::Closed {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "CONVERSATION_CLOSED",
            "the conversation is closed",
        ));
    }
    // A file reaches the customer (its download is theirs too): not from a private consult.
    if c.routing.consult_private && c.routing.consultant.as_deref() == me {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "PRIVATE_CONSULT",
            "a consultant in a private consult sends no files: they would reach the customer",
        ));
    }
    Ok(())
}
