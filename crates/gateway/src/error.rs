//! API errors in OpenAI's shape, mapped to HTTP in exactly one place.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Everything a request can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { message: String, param: Option<String>, code: Option<&'static str> },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{message}")]
    NotFound { message: String, code: &'static str },
    #[error("{message}")]
    RateLimited { message: String, code: &'static str },
    /// The swarm cannot serve the model right now (blocks missing).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), param: None, code: None }
    }

    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), param: Some(param.to_string()), code: None }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `{"error": {...}}` body.
    pub fn body(&self) -> serde_json::Value {
        let (kind, param, code) = match self {
            Self::BadRequest { param, code, .. } => ("invalid_request_error", param.clone(), code.map(str::to_string)),
            Self::PayloadTooLarge(_) => ("invalid_request_error", None, Some("request_too_large".to_string())),
            Self::Unauthorized(_) => ("authentication_error", None, Some("invalid_api_key".to_string())),
            Self::NotFound { code, .. } => ("invalid_request_error", Some("model".to_string()), Some(code.to_string())),
            Self::RateLimited { code, .. } => (if *code == "insufficient_quota" { "insufficient_quota" } else { "requests" }, None, Some(code.to_string())),
            Self::Unavailable(_) => ("server_error", None, Some("model_not_covered".to_string())),
            Self::Internal(_) => ("server_error", None, None),
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

impl From<hotpot_engine::ForwardError> for ApiError {
    fn from(e: hotpot_engine::ForwardError) -> Self {
        use hotpot_engine::ForwardError;
        match e {
            ForwardError::ContextFull { needed, max } => Self::BadRequest {
                message: format!("this model's context is {max} tokens, and the request needs {needed}"),
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
            },
            ForwardError::Empty => Self::bad_param("prompt", "the prompt is empty"),
            ForwardError::Token { token, vocab } => Self::bad_param("prompt", format!("token id {token} is outside the vocabulary of {vocab}")),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::chain::ChainError> for ApiError {
    fn from(e: crate::chain::ChainError) -> Self {
        use crate::chain::ChainError;
        match e {
            ChainError::Missing(missing) => Self::Unavailable(format!("the swarm cannot serve this model right now: {missing}")),
            ChainError::GaveUp { failures, last } => Self::Unavailable(format!("the swarm failed {failures} times on this request; the last failure: {last}")),
            ChainError::Forward(e) => e.into(),
            ChainError::Internal(e) => Self::Internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_openai_shape_and_status() {
        let e = ApiError::BadRequest { message: "too long".into(), param: Some("messages".into()), code: Some("context_length_exceeded") };
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "context_length_exceeded");
        assert_eq!(body["error"]["param"], "messages");
        assert_eq!(body["error"]["message"], "too long");
        let nf = ApiError::NotFound { message: "no such model".into(), code: "model_not_found" };
        assert_eq!((nf.status(), nf.body()["error"]["code"].clone()), (StatusCode::NOT_FOUND, json!("model_not_found")));
        assert_eq!(ApiError::Unauthorized("x".into()).status(), StatusCode::UNAUTHORIZED);
        assert_eq!(ApiError::RateLimited { message: "x".into(), code: "rate_limit_exceeded" }.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(ApiError::Unavailable("blocks 10..20".into()).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ApiError::PayloadTooLarge("big".into()).status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
