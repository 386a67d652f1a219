//! Error policy: the one place that maps failures to HTTP status codes. Bodies are Drogue's
//! `{"error": "...", "message": "..."}`; internal details go to the log, not to the client.

use ajour_registry::RegistryError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug)]
pub enum ApiError {
    Unauthorized(&'static str),
    BadRequest(String),
    Registry(RegistryError),
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error, message) = match self {
            ApiError::Unauthorized(message) => {
                (StatusCode::UNAUTHORIZED, "Unauthorized", message.to_string())
            }
            ApiError::BadRequest(message) => (StatusCode::BAD_REQUEST, "BadRequest", message),
            ApiError::Registry(error) => match error {
                RegistryError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound", error.to_string()),
                RegistryError::AlreadyExists(_) => (StatusCode::CONFLICT, "AlreadyExists", error.to_string()),
                RegistryError::Conflict => (StatusCode::CONFLICT, "Conflict", "Conflict".to_string()),
                RegistryError::Invalid(message) => (StatusCode::BAD_REQUEST, "BadRequest", message),
                other => {
                    tracing::error!(error = %other, "registry failure");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        "registry unavailable".to_string(),
                    )
                }
            },
        };
        (status, Json(json!({"error": error, "message": message}))).into_response()
    }
}
