//! The device registry: applications and devices, shaped as Drogue Cloud shapes them
//! (`metadata`/`spec`/`status`), so Drogue's tooling and Ajour's own API share one model.
//!
//! [`Registry`] is the trait every backend implements; [`SqlRegistry`] is the one here, on SQLite
//! (the default, a file in the data directory) or PostgreSQL, through the same queries and
//! migrations. The registry keeps Drogue's rules: optimistic locking on `resourceVersion`,
//! `generation` bumped only when the spec changes, and passwords given in plain text stored hashed.
//!
//! It knows nothing of firmware or devices' update state beyond the JSON sections it stores.

mod credentials;
mod error;
mod metered;
mod model;
mod selector;
mod sql;

pub use credentials::{verify_password, PasswordCheck};
pub use error::RegistryError;
pub use metered::MeteredRegistry;
pub use model::{AppName, DeviceName, Key, ListParams, Metadata, Resource, Scope};
pub use selector::LabelSelector;
pub use sql::{SqlRegistry, SqlRegistryOptions};

use async_trait::async_trait;
use serde_json::Value;

/// Applications and devices, stored somewhere.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Store a new object. Sets `uid`, `creationTimestamp`, `generation` and `resourceVersion`.
    async fn create(&self, key: &Key, resource: Resource) -> Result<Resource, RegistryError>;
    async fn get(&self, key: &Key) -> Result<Option<Resource>, RegistryError>;
    async fn list(&self, scope: &Scope, params: &ListParams) -> Result<Vec<Resource>, RegistryError>;
    /// Replace an object (spec and status). A non-empty `resourceVersion` or `uid` in `resource`
    /// that differs from the stored one is a [`RegistryError::Conflict`].
    async fn update(&self, key: &Key, resource: Resource) -> Result<Resource, RegistryError>;
    /// Delete an object (an application with its devices).
    async fn delete(&self, key: &Key) -> Result<(), RegistryError>;
    /// Set one section of `status` (e.g. `firmware`), leaving everything else as it is. Retries
    /// on concurrent writes; returns `NotFound` when the object is gone.
    async fn set_status_section(&self, key: &Key, section: &str, value: Value) -> Result<(), RegistryError>;
    /// Whether the registry answers, for readiness checks.
    async fn ping(&self) -> Result<(), RegistryError> {
        let one = ListParams {
            limit: Some(1),
            ..Default::default()
        };
        self.list(&Scope::Apps, &one).await.map(|_| ())
    }
}
