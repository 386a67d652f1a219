//! Ajour's REST API: the device registry at `/api/registry/v1alpha1`, compatible with Drogue
//! Cloud's (same paths, object shape, optimistic locking and status codes), so Drogue's tooling
//! works against it. Every request needs `Authorization: Bearer <token>` (Basic with the token as
//! password is accepted too, as Drogue's clients send it).
//!
//! Ajour's own resources are under `/api/dfu/v1alpha1`: a device's update history
//! (`/apps/{app}/devices/{device}/history`) and an application's staged rollouts
//! (`/apps/{app}/rollouts`).
//!
//! Writes go to the registry and then tell the update service to forget what it cached about the
//! object, so a changed firmware spec reaches devices on their next status. Reads of a device show
//! its latest progress, including progress not yet written to the database.

mod auth;
mod error;
mod history;
mod registry;
mod rollouts;

pub use auth::ApiToken;
pub use error::ApiError;

use ajour_registry::Registry;
use ajour_service::UpdateService;
use axum::Router;
use std::sync::Arc;

/// Largest request body the API takes: objects are small, a megabyte is plenty.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<dyn Registry>,
    pub service: Arc<UpdateService>,
}

/// The API's routes, behind the token check.
pub fn router(state: ApiState, token: ApiToken) -> Router {
    registry::routes()
        .merge(history::routes())
        .merge(rollouts::routes())
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(token),
            auth::require_token,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(error::as_json))
}
