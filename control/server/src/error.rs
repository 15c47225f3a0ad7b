//! Errors as the API answers them, in the bodies the SDK maps to its exceptions
//! (`langsmith/sandbox/_helpers.py`): `{"detail": {"error": TYPE, "message": TEXT}}`, and for
//! a request that fails validation FastAPI's `{"detail": [{"loc", "msg", "type"}]}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::backend::BackendError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 401: no key, or not one of the server's.
    #[error("a valid X-Api-Key header is required")]
    Unauthorized,
    /// 403: a request only the server's own user may make, without that user's key.
    #[error("{0}")]
    Forbidden(String),
    /// 404, also what another tenant's sandbox, snapshot or command is.
    #[error("{0}")]
    NotFound(String),
    /// 409: a name that is taken, a resource in use.
    #[error("{0}")]
    Conflict(String),
    /// 422 with a field: the SDK's `ValidationError`.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// 400 with an error type the SDK tells apart (`NotReady`, `InvalidRequest`).
    #[error("{message}")]
    BadRequest { kind: &'static str, message: String },
    /// 422 with an error type: a sandbox that could not be made (`ResourceCreationError`).
    #[error("{message}")]
    CreationFailed { kind: &'static str, message: String },
    /// 408: not ready in the time the caller gave.
    #[error("{0}")]
    Timeout(String),
    /// 429: the tenant's quota (`QuotaExceededError`).
    #[error("{0}")]
    Quota(String),
    /// 501: a part of the API ember does not have yet, saying which.
    #[error("{0}")]
    NotImplemented(String),
    /// 502: nothing accepts connections on the sandbox's port that was asked for.
    #[error("{0}")]
    BadGateway(String),
    /// 500: ember failed; the message says how.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Invalid { .. } | ApiError::CreationFailed { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Quota(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `detail` of the error body.
    pub fn detail(&self) -> serde_json::Value {
        let kind = match self {
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::NotFound(_) => "NotFound",
            ApiError::Conflict(_) => "Conflict",
            ApiError::Invalid { field, message } => {
                return json!([{"loc": ["body", field], "msg": message, "type": "value_error"}]);
            }
            ApiError::BadRequest { kind, .. } | ApiError::CreationFailed { kind, .. } => kind,
            ApiError::Timeout(_) => "Timeout",
            ApiError::Quota(_) => "QuotaExceeded",
            ApiError::NotImplemented(_) => "NotImplemented",
            ApiError::BadGateway(_) => "DialFailed",
            ApiError::Internal(_) => "InternalError",
        };
        json!({"error": kind, "message": self.to_string()})
    }

    /// A backend's failure at `what` (a sentence's start: "cannot start sandbox x").
    pub fn from_backend(what: &str, e: BackendError) -> ApiError {
        match e {
            BackendError::NotFound(m) => ApiError::NotFound(format!("{what}: {m}")),
            BackendError::Invalid(m) => ApiError::BadRequest {
                kind: "InvalidRequest",
                message: format!("{what}: {m}"),
            },
            BackendError::NotReady(m) => ApiError::BadRequest {
                kind: "NotReady",
                message: format!("{what}: {m}"),
            },
            BackendError::Failed(m) => ApiError::Internal(format!("{what}: {m}")),
            BackendError::DialFailed(m) => ApiError::BadGateway(format!("{what}: {m}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status(), axum::Json(json!({"detail": self.detail()}))).into_response();
        if matches!(self, ApiError::Quota(_)) {
            // The SDK retries a 429 after Retry-After: a quota does not lift in a second.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("0"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_shapes_the_sdk_parses() {
        let e = ApiError::NotFound("Sandbox 'x' not found".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.detail(),
            json!({"error": "NotFound", "message": "Sandbox 'x' not found"})
        );
        let e = ApiError::invalid("vcpus", "too many");
        assert_eq!(
            e.detail(),
            json!([{"loc": ["body", "vcpus"], "msg": "too many", "type": "value_error"}])
        );
        let e = ApiError::BadRequest {
            kind: "NotReady",
            message: "stopped".into(),
        };
        assert_eq!(
            (e.status(), e.detail()["error"].clone()),
            (StatusCode::BAD_REQUEST, json!("NotReady"))
        );
        let r = ApiError::Quota("sandbox count limit of 2 reached".into()).into_response();
        assert_eq!(
            (r.status(), r.headers()["retry-after"].to_str().unwrap()),
            (StatusCode::TOO_MANY_REQUESTS, "0")
        );
    }
}
