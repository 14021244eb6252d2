//! The one error type of the HTTP side, and its JSON body in OpenAI's shape.
//!
//! A message may carry text from a model file or a request (an architecture name, a path);
//! it is shown, logged and sent clipped to [`MAX_MESSAGE`] characters with control
//! characters escaped, so a 10 MB string in a file never becomes a 10 MB answer or log line.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The longest message an error carries, in characters.
pub const MAX_MESSAGE: usize = 1000;

fn clip(s: &str) -> Cow<'_, str> {
    strata_storage::text::clip(s, MAX_MESSAGE)
}

/// Why a request failed; each variant is one HTTP status and one OpenAI error `type`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{}", clip(.0))]
    BadRequest(String),
    #[error("{}", clip(.0))]
    Unauthorized(String),
    #[error("{}", clip(.0))]
    Forbidden(String),
    #[error("{}", clip(.0))]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{}", clip(.0))]
    RequestTimeout(String),
    #[error("request body is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("{}", clip(.0))]
    Conflict(String),
    #[error("{}", clip(.0))]
    Unprocessable(String),
    #[error("{}", clip(.0))]
    Overloaded(String),
    #[error("{}", clip(.0))]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_)
            | ApiError::MethodNotAllowed
            | ApiError::RequestTimeout(_)
            | ApiError::TooLarge { .. }
            | ApiError::Unprocessable(_) => "invalid_request_error",
            ApiError::Conflict(_) => "conflict_error",
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::Overloaded(_) => "overloaded_error",
            ApiError::Internal(_) => "server_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {"message": self.to_string(), "type": self.kind(), "code": null}
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, ApiError::Overloaded(_)) {
            // Clients and proxies back off by this instead of hammering a full queue.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
