//! Authentication of edge callers against provisioning: tenant API keys and agent tokens,
//! mapped to 401/403 answers with machine-readable codes (and 503 when the store is down).

use axum::http::StatusCode;

use super::{ApiError, AppState};
use crate::stores::provisioning::{Agent, ApiKeyGrant, AuthError};

fn refused(e: AuthError, what: &str) -> ApiError {
    match e {
        AuthError::Unknown => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_CREDENTIALS",
            format!("the {what} is not valid"),
        ),
        AuthError::Disabled => ApiError::new(
            StatusCode::FORBIDDEN,
            "API_KEY_DISABLED",
            format!("the {what} is disabled"),
        ),
        AuthError::Expired => ApiError::new(
            StatusCode::FORBIDDEN,
            "API_KEY_EXPIRED",
            format!("the {what} has expired"),
        ),
        AuthError::Unavailable(m) => ApiError::unavailable(m),
    }
}

pub async fn api_key(state: &AppState, raw: &str) -> Result<ApiKeyGrant, ApiError> {
    state
        .provisioning
        .authenticate_api_key(raw)
        .await
        .map_err(|e| refused(e, "API key"))
}

pub async fn agent(state: &AppState, raw: &str) -> Result<Agent, ApiError> {
    state
        .provisioning
        .authenticate_agent(raw)
        .await
        .map_err(|e| refused(e, "agent token"))
}
