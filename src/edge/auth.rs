//! The admin bearer token check shared by the admin and ingest endpoints: compared in constant
//! time; no token configured turns those endpoints off.

use axum::http::{header, HeaderMap, StatusCode};
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::config::HttpConfig;

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
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::unauthorized("send `Authorization: Bearer <admin token>`"))?;
    if bool::from(given.as_bytes().ct_eq(expected)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN",
            "the admin token is wrong",
        ))
    }
}
