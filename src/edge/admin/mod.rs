//! `/v1/admin`: the provisioning API. Tenants, and under each tenant its API keys, queues,
//! agents, routing rules, bot endpoints and webhook subscriptions, behind the admin bearer token.
//!
//! Every object is addressed under its tenant's path, so another tenant's object is simply not
//! found (404). Lists are pages keyed by id; writes validate and answer 400/404/409 with a code.

mod agents;
mod api_keys;
mod bots;
mod queues;
mod routing_rules;
mod tenants;
mod webhooks;

use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::stores::provisioning::{PageRequest, ProvisioningError};

/// The admin routes; `state` is needed by the token check.
pub fn router(state: AppState) -> Router<AppState> {
    let t = "/v1/admin/tenants";
    Router::new()
        .route(t, post(tenants::create).get(tenants::list))
        .route(
            &format!("{t}/{{tenant}}"),
            get(tenants::get)
                .patch(tenants::update)
                .delete(tenants::delete),
        )
        .route(
            &format!("{t}/{{tenant}}/api-keys"),
            post(api_keys::create).get(api_keys::list),
        )
        .route(
            &format!("{t}/{{tenant}}/api-keys/{{id}}"),
            get(api_keys::get)
                .patch(api_keys::update)
                .delete(api_keys::delete),
        )
        .route(
            &format!("{t}/{{tenant}}/queues"),
            post(queues::create).get(queues::list),
        )
        .route(
            &format!("{t}/{{tenant}}/queues/{{id}}"),
            get(queues::get)
                .patch(queues::update)
                .delete(queues::delete),
        )
        .route(
            &format!("{t}/{{tenant}}/agents"),
            post(agents::create).get(agents::list),
        )
        .route(
            &format!("{t}/{{tenant}}/agents/{{id}}"),
            get(agents::get)
                .patch(agents::update)
                .delete(agents::delete),
        )
        .route(
            &format!("{t}/{{tenant}}/agents/{{id}}/token"),
            post(agents::rotate_token),
        )
        .route(
            &format!("{t}/{{tenant}}/routing-rules"),
            post(routing_rules::create).get(routing_rules::list),
        )
        .route(
            &format!("{t}/{{tenant}}/routing-rules/{{id}}"),
            get(routing_rules::get)
                .patch(routing_rules::update)
                .delete(routing_rules::delete),
        )
        .route(
            &format!("{t}/{{tenant}}/bots"),
            post(bots::create).get(bots::list),
        )
        .route(
            &format!("{t}/{{tenant}}/bots/{{id}}"),
            get(bots::get).patch(bots::update).delete(bots::delete),
        )
        .route(
            &format!("{t}/{{tenant}}/bots/{{id}}/token"),
            post(bots::rotate_token),
        )
        .route(
            &format!("{t}/{{tenant}}/webhooks"),
            post(webhooks::create).get(webhooks::list),
        )
        .route(
            &format!("{t}/{{tenant}}/webhooks/{{id}}"),
            get(webhooks::get)
                .patch(webhooks::update)
                .delete(webhooks::delete),
        )
        .route(
            &format!("{t}/{{tenant}}/webhooks/{{id}}/secret"),
            post(webhooks::rotate_secret),
        )
        .route(
            &format!("{t}/{{tenant}}/webhooks/{{id}}/messages"),
            get(webhooks::list_messages),
        )
        .route(
            &format!("{t}/{{tenant}}/webhooks/{{id}}/messages/{{message}}"),
            get(webhooks::get_message),
        )
        .route(
            &format!("{t}/{{tenant}}/webhooks/{{id}}/messages/{{message}}/resend"),
            post(webhooks::resend),
        )
        .route(
            &format!("{t}/{{tenant}}/webhooks/{{id}}/replay"),
            post(webhooks::replay),
        )
        .route(
            &format!("{t}/{{tenant}}/webhook-dead-letters/recover"),
            post(webhooks::recover_dead_letters),
        )
        // A method a path does not take answers in the error shape too; set before the layers,
        // so the token check still comes first (no path is confirmed to a caller without it).
        .method_not_allowed_fallback(crate::edge::error::method_not_allowed)
        .route_layer(middleware::from_fn(crate::edge::path::require_plain))
        .route_layer(middleware::from_fn_with_state(state, require_admin))
}

/// Middleware: the admin token first, before any extractor reads the request (the ingest
/// route uses it too).
pub(crate) async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    super::auth::require_admin(&state.config.http, request.headers())?;
    Ok(next.run(request).await)
}

/// A JSON body whose rejections (malformed JSON, unknown or missing fields) answer as
/// [`ApiError`]s.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Body<T>(pub T);

/// `?limit=&after=` of a list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    limit: Option<u32>,
    after: Option<String>,
}

pub struct Listing(pub ListParams);

impl<S: Send + Sync> FromRequestParts<S> for Listing {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(params) = Query::<ListParams>::from_request_parts(parts, state).await?;
        Ok(Self(params))
    }
}

impl Listing {
    fn page(&self) -> Result<PageRequest, ApiError> {
        Ok(PageRequest::new(self.0.limit, self.0.after.as_deref())?)
    }
}

impl From<ProvisioningError> for ApiError {
    fn from(e: ProvisioningError) -> Self {
        match &e {
            ProvisioningError::NotFound(object) => {
                ApiError::not_found(object.not_found_code(), e.to_string())
            }
            ProvisioningError::Expired(object) => {
                ApiError::new(StatusCode::GONE, object.expired_code(), e.to_string())
            }
            ProvisioningError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "CONFLICT", e.to_string())
            }
            ProvisioningError::Invalid { .. } => {
                ApiError::bad_request("INVALID_FIELD", e.to_string())
            }
            ProvisioningError::Unavailable(_) => ApiError::unavailable(e.to_string()),
        }
    }
}
