//! Ajour's REST API: the device registry at `/api/registry/v1alpha1`, compatible with Drogue
//! Cloud's (same paths, object shape, optimistic locking and status codes), so Drogue's tooling
//! works against it. Every request needs a token: the server's bootstrap token, or a user's
//! access token (`/api/tokens/v1alpha1`), as `Authorization: Bearer <token>` or Basic
//! `user:token` as Drogue's clients send it. A user reaches the applications they own or are a
//! member of (`/api/admin/v1alpha1/apps/{app}/members`), as their role allows (see [`auth`]).
//!
//! Ajour's own resources are under `/api/dfu/v1alpha1`: a device's update history
//! (`/apps/{app}/devices/{device}/history`) and an application's staged rollouts
//! (`/apps/{app}/rollouts`). Firmware builds are under `/api/build/v1alpha1`, on the original's
//! paths.
//!
//! Writes go to the registry and then tell the update service to forget what it cached about the
//! object, so a changed firmware spec reaches devices on their next status. Reads of a device show
//! its latest progress, including progress not yet written to the database.

mod auth;
// Firmware builds (`/api/build/v1alpha1`).
mod builds;
// Drogue's discovery documents, for `drg` (docs/drogue-tools.md).
mod discovery;
mod error;
mod history;
mod members;
mod registry;
mod rollouts;
// Drogue's integration APIs: the live stream (`drg stream`), the command endpoint (501).
mod stream;
mod tokens;

pub use auth::{caller_of_token, require, ApiToken, Caller};
pub use error::ApiError;
// For `drg`: where the server is, as its discovery documents name it.
pub use discovery::{parse_public_url, PublicUrl};

use ajour_registry::{AccessStore, Registry};
use ajour_service::UpdateService;
use axum::Router;
use std::sync::Arc;

/// Largest request body the API takes: objects are small, a megabyte is plenty.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<dyn Registry>,
    pub service: Arc<UpdateService>,
    /// Users' access tokens and applications' owners and members.
    pub access: Arc<dyn AccessStore>,
    /// Firmware builds; `None`: builds are off (the build API answers 501).
    pub builds: Option<Arc<ajour_build::Builds>>,
    /// The base URL the discovery documents name (`--public-url`, else each request's `Host`).
    pub public_url: PublicUrl,
}

/// The API's routes, behind the credentials check.
pub fn router(state: ApiState, token: ApiToken) -> Router {
    let gate = Arc::new(auth::Gate {
        bootstrap: token,
        access: state.access.clone(),
    });
    registry::routes()
        .merge(history::routes())
        .merge(rollouts::routes())
        .merge(builds::routes())
        .merge(tokens::routes())
        .merge(members::routes())
        .merge(discovery::routes())
        .merge(stream::routes())
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(gate, auth::authenticate))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(error::as_json))
}

/// The routes anyone may call, outside the credentials check: Drogue's discovery documents
/// (`/.well-known/drogue-endpoints`, `/.well-known/drogue-version`, the OpenID Connect document
/// `drg login` reads), served beside [`router`].
pub fn public_router(state: ApiState) -> Router {
    discovery::public_routes()
        .with_state(state)
        .layer(axum::middleware::map_response(error::as_json))
}
