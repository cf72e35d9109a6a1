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
    /// The client did not send its request in time.
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Unauthorized(String),
    /// The key may not do this (a model outside its list, a child key
    /// beyond its parent's limits).
    #[error("{message}")]
    Forbidden { message: String, code: &'static str },
    #[error("{message}")]
    NotFound { message: String, code: &'static str },
    #[error("{message}")]
    RateLimited { message: String, code: &'static str },
    /// The swarm cannot serve the model right now (blocks missing).
    #[error("{0}")]
    Unavailable(String),
    /// The swarm has the blocks but no capacity left for this request.
    #[error("{message}")]
    Overloaded { message: String, retry_after_s: u64 },
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
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::RateLimited { .. } | Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `{"error": {...}}` body.
    pub fn body(&self) -> serde_json::Value {
        let (kind, param, code) = match self {
            Self::BadRequest { param, code, .. } => ("invalid_request_error", param.clone(), code.map(str::to_string)),
            Self::PayloadTooLarge(_) => ("invalid_request_error", None, Some("request_too_large".to_string())),
            Self::Timeout(_) => ("invalid_request_error", None, Some("request_timeout".to_string())),
            Self::MethodNotAllowed(_) => ("invalid_request_error", None, Some("method_not_allowed".to_string())),
            Self::Unauthorized(_) => ("authentication_error", None, Some("invalid_api_key".to_string())),
            Self::Forbidden { code, .. } => ("permission_error", None, Some(code.to_string())),
            Self::NotFound { code, .. } => ("invalid_request_error", Some("model".to_string()), Some(code.to_string())),
            Self::RateLimited { code, .. } => (if *code == "insufficient_quota" { "insufficient_quota" } else { "requests" }, None, Some(code.to_string())),
            Self::Unavailable(_) => ("server_error", None, Some("model_not_covered".to_string())),
            Self::Overloaded { .. } => ("requests", None, Some("swarm_busy".to_string())),
            Self::Internal(_) => ("server_error", None, None),
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }

    /// Seconds a client should wait before trying again (`Retry-After`).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Overloaded { retry_after_s, .. } => Some(*retry_after_s),
            Self::Unavailable(_) => Some(UNAVAILABLE_RETRY_S),
            _ => None,
        }
    }
}

/// `Retry-After` of a 503: nodes announce themselves every 10 s.
const UNAVAILABLE_RETRY_S: u64 = 10;

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
            ChainError::OverPrice(over) => Self::BadRequest {
                message: format!("no route fits this request's price cap: {over}"),
                param: Some("hotpot.max_price".into()),
                code: Some("max_price_too_low"),
            },
            ChainError::Busy { retry_after, reason } => Self::Overloaded { message: reason, retry_after_s: retry_after.as_secs_f64().ceil().max(1.0) as u64 },
            ChainError::GaveUp { failures, last } => Self::Unavailable(format!("the swarm failed {failures} times on this request; the last failure: {last}")),
            ChainError::Forward(e) => e.into(),
            ChainError::Internal(e) => Self::Internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after() {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        }
        response
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

    #[test]
    fn load_and_missing_blocks_say_when_to_retry() {
        let busy: ApiError = crate::chain::ChainError::Busy { retry_after: std::time::Duration::from_millis(1200), reason: "all busy".into() }.into();
        let response = busy.clone().into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[axum::http::header::RETRY_AFTER], "2");
        assert_eq!(busy.body()["error"]["code"], "swarm_busy");
        let missing = ApiError::Unavailable("no node serves blocks 10..20".into()).into_response();
        assert_eq!(missing.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(missing.headers().contains_key(axum::http::header::RETRY_AFTER));
        assert_eq!(ApiError::bad("x").into_response().headers().get(axum::http::header::RETRY_AFTER), None);
    }
}
