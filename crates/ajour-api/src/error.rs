//! Error policy: the one place that maps failures to HTTP status codes. Bodies are Drogue's
//! `{"error": "...", "message": "..."}`; internal details go to the log, not to the client.

use ajour_registry::RegistryError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug)]
pub enum ApiError {
    Unauthorized(&'static str),
    /// The caller is known but their role does not allow this; the message says what it needs.
    Forbidden(String),
    BadRequest(String),
    /// What this server cannot do in its configuration; the message says why.
    NotImplemented(String),
    /// Not now: the state of what the request is about does not allow it; the message says why.
    Conflict(String),
    Registry(RegistryError),
}

impl From<ajour_service::RolloutError> for ApiError {
    fn from(error: ajour_service::RolloutError) -> Self {
        use ajour_service::RolloutError;
        match error {
            RolloutError::Invalid(message) => ApiError::BadRequest(message),
            RolloutError::NotFound(what) => ApiError::Registry(RegistryError::NotFound(what)),
            RolloutError::Conflict(message) => ApiError::Conflict(message),
            RolloutError::Unavailable => ApiError::NotImplemented(RolloutError::Unavailable.to_string()),
            RolloutError::Registry(error) => ApiError::Registry(error),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        ApiError::Registry(error)
    }
}

impl From<ajour_types::NameError> for ApiError {
    fn from(error: ajour_types::NameError) -> Self {
        ApiError::BadRequest(error.to_string())
    }
}

impl ApiError {
    /// Its status code, Drogue's error name, and the message a client is shown: the one mapping,
    /// answered as JSON by the API and as a page by the console. A database failure is logged
    /// here and shown only as "registry unavailable".
    pub fn parts(self) -> (StatusCode, &'static str, String) {
        match self {
            ApiError::Unauthorized(message) => {
                (StatusCode::UNAUTHORIZED, "Unauthorized", message.to_string())
            }
            ApiError::Forbidden(message) => (StatusCode::FORBIDDEN, "Forbidden", message),
            ApiError::BadRequest(message) => (StatusCode::BAD_REQUEST, "BadRequest", message),
            ApiError::NotImplemented(message) => (StatusCode::NOT_IMPLEMENTED, "NotImplemented", message),
            ApiError::Conflict(message) => (StatusCode::CONFLICT, "Conflict", message),
            ApiError::Registry(error) => match error {
                RegistryError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound", error.to_string()),
                RegistryError::AlreadyExists(_) => (StatusCode::CONFLICT, "AlreadyExists", error.to_string()),
                RegistryError::Conflict => (StatusCode::CONFLICT, "Conflict", "Conflict".to_string()),
                RegistryError::Invalid(message) => (StatusCode::BAD_REQUEST, "BadRequest", message),
                other => {
                    ajour_service::warn_throttled!(ajour_service::LOG_INTERVAL, error = %other, "registry failure");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        "registry unavailable".to_string(),
                    )
                }
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error, message) = self.parts();
        (status, Json(json!({"error": error, "message": message}))).into_response()
    }
}

/// Every error the API answers is JSON in Drogue's shape, also those axum makes itself before a
/// handler runs (a body over the size limit, a malformed path or query, a wrong method): their
/// plain-text reason becomes the message.
pub(crate) async fn as_json(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // Axum's own rejections are short; anything longer is cut, not buffered whole.
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLarge",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
        status if status.is_server_error() => "ServiceUnavailable",
        _ => "BadRequest",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    (status, Json(json!({"error": error, "message": message}))).into_response()
}
