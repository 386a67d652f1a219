//! The device registry: applications and devices, shaped as Drogue Cloud shapes them
//! (`metadata`/`spec`/`status`), so Drogue's tooling and Ajour's own API share one model.
//!
//! [`Registry`] is the trait every backend implements; `SqlRegistry` (feature `sql`, so crates
//! that only use the trait do not build a database driver) is the one here, on SQLite (the
//! default, a file in the data directory) or PostgreSQL, through the same queries and migrations. The registry keeps Drogue's rules: optimistic locking on `resourceVersion`,
//! `generation` bumped only when the spec changes, and passwords given in plain text
//! never stored (a keyed verifier is: see [`credentials`]).
//!
//! It knows nothing of firmware or devices' update state beyond the JSON sections it stores.

pub mod access;
pub mod aliases;
#[cfg(feature = "sql")]
mod backfill;
pub mod builds;
pub mod credentials;
mod error;
mod metered;
mod model;
pub mod rollouts;
#[cfg(feature = "sql")]
mod schema;
mod selector;
#[cfg(feature = "sql")]
mod sql;

pub use access::{AccessStore, StoredToken};
pub use aliases::device_aliases;
pub use builds::{BuildFilter, BuildStore, NewBuild};
pub use credentials::{
    seal_plain_passwords, unique_user_names, CredentialKey, CredentialKeys, DerivedVerifier,
    DeviceCredentials, FastCheck, KeyError, SlowCheck, VERIFIERS_SECTION,
};
pub use error::RegistryError;
pub use metered::MeteredRegistry;
pub use model::{AppName, DeviceName, Key, ListParams, Metadata, Resource, Scope};
pub use rollouts::{Admission, NewRollout, RolloutStore};
#[cfg(feature = "sql")]
pub use schema::{known_migrations, SchemaReport, SchemaVersion};
pub use selector::LabelSelector;
#[cfg(feature = "sql")]
pub use sql::{BesideRegistry, SqlRegistry, SqlRegistryOptions};

use ajour_types::{HistoryEvent, RecordedEvent};
use async_trait::async_trait;
use serde_json::Value;

/// A write to the registry that cached copies must forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This object was created, replaced or deleted (an application: with its devices).
    Object(Key),
    /// Changes may have been missed (the listening connection was lost): forget everything.
    Everything,
}

/// What a status section should become, given the stored one (`None`: there is none).
pub type StatusMerge<'a> = &'a (dyn Fn(Option<&Value>) -> Option<Value> + Send + Sync);

/// What a device's status section should become, given the stored one, and what its history
/// should tell of the change ([`ajour_types::events_between`]); `None`: write nothing.
pub type RecordingMerge<'a> =
    &'a (dyn Fn(Option<&Value>) -> Option<(Value, Vec<HistoryEvent>)> + Send + Sync);

/// How much of each device's history a registry keeps: the newest `max_events` entries, none
/// older than `max_age`. Applied when a device's history grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRetention {
    pub max_events: u32,
    pub max_age: std::time::Duration,
}

impl Default for HistoryRetention {
    /// 200 entries (a few dozen updates) and 90 days.
    fn default() -> Self {
        Self {
            max_events: 200,
            max_age: std::time::Duration::from_secs(90 * 24 * 3600),
        }
    }
}

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
    /// Replace one section of `status` (e.g. `firmware`) by what `merge` makes of the stored one,
    /// leaving everything else as it is; `merge` returning `None` keeps what is stored. The read
    /// and the write are one step: a concurrent write makes the backend read again and call
    /// `merge` again, so a rule in `merge` holds whatever other writers do. Returns whether it
    /// wrote; `NotFound` when the object is gone.
    async fn merge_status_section(
        &self,
        key: &Key,
        section: &str,
        merge: StatusMerge<'_>,
    ) -> Result<bool, RegistryError>;

    /// [`Self::merge_status_section`] of a device, appending the events `merge` returns to the
    /// device's history in the same step, so that each change is told once however many
    /// instances write. A registry that keeps no history ([`Self::history`] is `None`) writes
    /// the status alone.
    async fn merge_status_recording(
        &self,
        key: &Key,
        section: &str,
        merge: RecordingMerge<'_>,
    ) -> Result<bool, RegistryError> {
        self.merge_status_section(key, section, &|stored| merge(stored).map(|(value, _)| value))
            .await
    }

    /// The newest `limit` entries of device `key`'s history, newest first; `None`: this registry
    /// keeps no history (Drogue's); `NotFound` when the device does not exist.
    async fn history(&self, key: &Key, limit: u32) -> Result<Option<Vec<RecordedEvent>>, RegistryError> {
        let _ = (key, limit);
        Ok(None)
    }

    /// Set one section of `status`, whatever is stored.
    async fn set_status_section(&self, key: &Key, section: &str, value: Value) -> Result<(), RegistryError> {
        self.merge_status_section(key, section, &|_| Some(value.clone()))
            .await
            .map(|_| ())
    }
    /// The device of `app` whose `unique` user credential has the user name `username` (Drogue's
    /// alias: such a device logs in as `username@app`). Backends without aliases find none.
    async fn device_by_user(
        &self,
        app: &AppName,
        username: &str,
    ) -> Result<Option<DeviceName>, RegistryError> {
        let _ = (app, username);
        Ok(None)
    }
    /// The device of `app` that lists `alias` in its `spec.alias` (Drogue's aliases; a device
    /// signing in with a client certificate is looked up by its certificate's subject DN here).
    /// An alias names one device of an application at most. Backends without aliases find none.
    async fn device_by_alias(&self, app: &AppName, alias: &str) -> Result<Option<DeviceName>, RegistryError> {
        let _ = (app, alias);
        Ok(None)
    }
    /// Writes by any instance to objects' specs and credentials, as they happen, for backends that
    /// can tell (PostgreSQL's `LISTEN/NOTIFY`); `None`: they cannot, and only a cache's TTL bounds
    /// how stale a copy gets.
    async fn changes(&self) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<Change>>, RegistryError> {
        Ok(None)
    }
    /// Whether other instances may serve the same devices from this registry (a database server,
    /// Drogue's registry), so that a device's next status may reach one of them: then what an
    /// instance writes is what the others go by. `false` for one only this process uses.
    fn shared(&self) -> bool {
        true
    }
    /// Whether the registry answers, for readiness checks.
    async fn ping(&self) -> Result<(), RegistryError> {
        let one = ListParams {
            limit: Some(1),
            ..Default::default()
        };
        self.list(&Scope::Apps, &one).await.map(|_| ())
    }
}
