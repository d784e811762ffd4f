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
        // Secrets shown once (a new API key, agent or bot token, webhook secret) and tenant data.
        .layer(middleware::map_response(crate::edge::no_store))
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
/// [`ApiError`]s, their message [`clipped`]: serde quotes the refused field name or value whole.
pub struct Body<T>(pub T);

impl<T, S> FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => {
                let mut e = ApiError::from(rejection);
                e.message = clipped(&e.message);
                Err(e)
            }
        }
    }
}

/// Most characters of a refused value an error message quotes (README, "Errors").
const MAX_QUOTED: usize = 64;
/// Longest error message: a backstop for values spread over many short words.
const MAX_MESSAGE: usize = 1024;

/// `message` with every quoted part (between backticks or double quotes) and every other run
/// of non-blank characters (a JSON path naming a map key) cut after [`MAX_QUOTED`] characters.
pub(crate) fn clipped(message: &str) -> String {
    let mut out = String::new();
    // The quote being read, if any, and how many characters of the current part were seen.
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut part = 0usize;
    let mut written = 0usize;
    for c in message.chars() {
        if written >= MAX_MESSAGE {
            out.push('…');
            return out;
        }
        let ends = match quote {
            Some(q) => c == q && !escaped,
            None => c.is_whitespace() || c == '`' || c == '"',
        };
        escaped = quote == Some('"') && c == '\\' && !escaped;
        if ends {
            if part > MAX_QUOTED {
                out.push('…');
            }
            part = 0;
            quote = match quote {
                Some(_) => None,
                None if c == '`' || c == '"' => Some(c),
                None => None,
            };
            out.push(c);
            written += 1;
            continue;
        }
        part += 1;
        if part <= MAX_QUOTED {
            out.push(c);
            written += 1;
        }
    }
    if part > MAX_QUOTED {
        out.push('…');
    }
    out
}

/// Checks the `url` field as the store will, then its target (resolving its host) unless
/// `allow_private`: a value the store refuses answers the store's `INVALID_FIELD`, whose
/// message quotes at most 64 characters of it, rather than the target check's, which quotes
/// the URL whole. A private target answers `private` (the code), `hint` appended.
async fn check_target(
    url: &str,
    allow_private: bool,
    private: &'static str,
    hint: &str,
) -> Result<(), ApiError> {
    use crate::http_client::target::{self, TargetError};
    crate::stores::provisioning::validate_url(url)?;
    target::check_url(url, allow_private)
        .await
        .map_err(|e| match e {
            TargetError::BadUrl(_) => ApiError::bad_request(
                "INVALID_FIELD",
                "`url` must be an http:// or https:// URL with a host",
            ),
            // The host is at most the field's length: quoted clipped too.
            TargetError::Private(target) => ApiError::bad_request(
                private,
                format!(
                    "`url`: the target {} is in a private, loopback or link-local range{hint}",
                    clipped(&target)
                ),
            ),
        })
}

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
        // The rejection quotes what it refuses (an unknown parameter's name, the query itself),
        // as long as the URL carries it: clipped like a body's.
        let Query(params) = Query::<ListParams>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| {
                let mut e = ApiError::from(rejection);
                e.message = clipped(&e.message);
                e
            })?;
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

#[cfg(test)]
mod tests {
    use super::clipped;

    #[test]
    fn clipped_cuts_every_quoted_part_and_long_word_after_64_characters() {
        let long = "A".repeat(300);
        for message in [
            format!("unknown field `{long}`, expected `name`"),
            format!("invalid type: string \"{long}\", expected a boolean"),
            format!("invalid type: string \"x\\\"{long}\", expected a boolean"),
            format!("capacity.{long}: invalid value: integer `-1`, expected u32"),
            format!("unterminated `{long}"),
        ] {
            let out = clipped(&message);
            assert!(!out.contains(&"A".repeat(65)), "{out}");
            assert!(out.contains(&"A".repeat(50)), "{out}");
            assert!(out.contains('…'), "{out}");
        }
        let short = "unknown field `colour`, expected `name`";
        assert_eq!(clipped(short), short);
        let spread = "A ".repeat(5000);
        assert!(clipped(&spread).chars().count() <= 1025);
    }
}
