//! Authentication of edge callers: the admin bearer token (admin and ingest endpoints,
//! constant-time compare), tenant API keys, agent and bot tokens against provisioning, mapped to
//! 401/403 answers with machine-readable codes (503 when the store is down).

use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::config::HttpConfig;
use crate::stores::provisioning::{Agent, ApiKeyGrant, AuthError, BotEndpoint};

/// `Authorization: Bearer <http.admin_token>`: 401 when missing or wrong, 403 `ADMIN_DISABLED`
/// when no token is configured.
pub fn require_admin(config: &HttpConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = config.admin_token.as_bytes();
    if expected.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "ADMIN_DISABLED",
            "no admin token is configured (http.admin_token)",
        ));
    }
    let given = bearer(headers)
        .ok_or_else(|| ApiError::unauthorized("send `Authorization: Bearer <admin token>`"))?;
    // Digests of equal length: the slices' compare would return early on a length mismatch.
    let digest = |v: &[u8]| Sha256::digest(v);
    if bool::from(
        digest(given.as_bytes())
            .as_slice()
            .ct_eq(digest(expected).as_slice()),
    ) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN",
            "the admin token is wrong",
        ))
    }
}

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

/// The grant of a tenant API key, from a lookup at most `max_age` old (`Duration::MAX`: the
/// store's cache TTL decides; a periodic check passes less, see
/// [`Provisioning::authenticate_api_key_within`]).
///
/// [`Provisioning::authenticate_api_key_within`]: crate::stores::provisioning::Provisioning::authenticate_api_key_within
pub async fn api_key(
    state: &AppState,
    raw: &str,
    max_age: std::time::Duration,
) -> Result<ApiKeyGrant, ApiError> {
    state
        .provisioning
        .authenticate_api_key_within(raw, max_age)
        .await
        .map_err(|e| refused(e, "API key"))
}

/// The agent of an agent token.
pub async fn agent(state: &AppState, raw: &str) -> Result<Agent, ApiError> {
    state
        .provisioning
        .authenticate_agent(raw)
        .await
        .map_err(|e| refused(e, "agent token"))
}

/// The bot of a bot API token.
pub async fn bot(state: &AppState, raw: &str) -> Result<BotEndpoint, ApiError> {
    state
        .provisioning
        .authenticate_bot(raw)
        .await
        .map_err(|e| refused(e, "bot token"))
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case, as HTTP
/// has it).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start();
    // An empty token is a token, refused as invalid rather than as missing.
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}
