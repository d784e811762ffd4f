//! One error type for every HTTP answer: 4xx carry a machine-readable code and a message,
//! 5xx are logged and answer an opaque body.

use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::bus::BusError;
use crate::events::publish::PublishError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Machine-readable, SCREAMING_SNAKE_CASE (e.g. `UNKNOWN_TOPIC`).
    pub code: &'static str,
    pub message: String,
    /// A publish failed in a way that does not tell whether the broker stored the event (a
    /// timeout, a connection lost while it waited): a retry may make a second one.
    pub may_have_published: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            may_have_published: false,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "AUTHENTICATION_REQUIRED", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
    }
    /// A publish that failed: an event that does not encode is the client's (400 `invalid`),
    /// as is one larger than the bus takes (413); anything else is the bus's (503).
    pub fn publish_failed(e: PublishError, invalid: &'static str) -> Self {
        match e {
            PublishError::Encode(e) => Self::bad_request(invalid, e.to_string()),
            PublishError::Bus {
                source: BusError::TooLarge(detail),
                ..
            } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                format!("the event is larger than the bus takes ({detail})"),
            ),
            e => Self {
                may_have_published: true,
                ..Self::unavailable(e.to_string())
            },
        }
    }
}

/// What a client is told of a server error: a fixed text, the cause logged instead (hosts,
/// user names, broker errors are not for clients).
pub const SERVER_ERROR_TEXT: &str = "the service could not complete the request; retry later";

impl ApiError {
    /// Logs a server error's cause, which its answer does not tell.
    pub fn log_if_server_error(&self) {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, error = %self.message, status = self.status.as_u16(), "request failed");
        }
    }

    /// The message a client may see: its own for a client error; for a server error
    /// [`SERVER_ERROR_TEXT`], the cause logged here.
    pub fn shown_message(&self) -> String {
        self.log_if_server_error();
        if self.status.is_server_error() {
            SERVER_ERROR_TEXT.to_string()
        } else {
            self.message.clone()
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            let body = json!({"error": {"code": self.code, "message": self.shown_message()}});
            return (self.status, Json(body)).into_response();
        }
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

/// JSON bodies that cannot be read answer in the same shape as every other error.
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // A well-formed body of the wrong shape (unknown or missing field, wrong type) is a
        // 400 like any other invalid input, not axum's 422.
        let (status, code) = match &rejection {
            JsonRejection::JsonDataError(_) => (StatusCode::BAD_REQUEST, "INVALID_BODY"),
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "INVALID_JSON"),
            JsonRejection::MissingJsonContentType(_) => {
                (rejection.status(), "UNSUPPORTED_MEDIA_TYPE")
            }
            _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                (rejection.status(), "PAYLOAD_TOO_LARGE")
            }
            _ => (rejection.status(), "INVALID_BODY"),
        };
        Self::new(status, code, rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request("INVALID_QUERY", rejection.body_text())
    }
}

/// A request to a WebSocket route that is not a WebSocket handshake (checked after
/// authentication, so a bad key answers the same on every route).
impl From<WebSocketUpgradeRejection> for ApiError {
    fn from(rejection: WebSocketUpgradeRejection) -> Self {
        Self::new(
            rejection.status(),
            "WEBSOCKET_UPGRADE_REQUIRED",
            rejection.body_text(),
        )
    }
}

/// A body that cannot be read (too large, cut off).
impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let code = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "PAYLOAD_TOO_LARGE"
        } else {
            "INVALID_BODY"
        };
        Self::new(rejection.status(), code, rejection.body_text())
    }
}

/// A method a path does not take answers in the error shape (axum's own 405 has no body).
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "this path does not take that method",
    )
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("NOT_FOUND", "no such route")
}
