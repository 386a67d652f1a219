//! Where rollouts are kept: [`RolloutStore`], beside the registry in the same database (the SQL
//! registry implements both), so that a device's status write and its place in a rollout change
//! in one transaction. The rules are `ajour_types::rollout`'s; a store only keeps what they
//! decided, and makes each decision once however many instances take it.

use crate::{AppName, RegistryError};
use ajour_types::rollout::{Member, Progress, Rollout, RolloutId, RolloutSpec};
use async_trait::async_trait;
use serde_json::Value;
use std::time::Duration;

/// A rollout to create: its spec, the application's firmware it replaces, and its devices by wave.
pub struct NewRollout<'a> {
    pub app: &'a AppName,
    pub spec: &'a RolloutSpec,
    pub previous: Option<&'a Value>,
    /// Each device pending in its wave (with its own `previous` where it differs).
    pub members: Vec<Member>,
    /// Milliseconds since the epoch.
    pub now: i64,
}

/// Whether a device was admitted by [`RolloutStore::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It is updating now (or was started before: then it goes on).
    Started,
    /// The concurrency limit is reached.
    Full,
    /// The rollout is not active any more, the device not pending in it, or its wave not open.
    Refused,
}

#[async_trait]
pub trait RolloutStore: Send + Sync + 'static {
    /// Create a rollout with its devices; [`RegistryError::AlreadyExists`] when the application
    /// has an open one.
    async fn create_rollout(&self, new: NewRollout<'_>) -> Result<Rollout, RegistryError>;
    /// The application's rollouts, newest first.
    async fn rollouts(&self, app: &AppName) -> Result<Vec<Rollout>, RegistryError>;
    async fn rollout(&self, app: &AppName, id: RolloutId) -> Result<Option<Rollout>, RegistryError>;
    /// The newest rollout of every application that has one: the one that applies to its devices.
    async fn latest_rollouts(&self) -> Result<Vec<Rollout>, RegistryError>;
    async fn members(&self, id: RolloutId) -> Result<Vec<Member>, RegistryError>;
    /// Add a device that appeared after the rollout was created, pending in `wave`; nothing when
    /// it is in already.
    async fn join(&self, id: RolloutId, app: &AppName, device: &str, wave: u32) -> Result<(), RegistryError>;
    /// Start a pending device toward `target` if the rollout is active, its wave is open, and fewer
    /// than `limit` devices are updating: decided under the rollout's lock, so that instances
    /// starting devices at once never pass the limit together.
    async fn start(
        &self,
        id: RolloutId,
        device: &str,
        target: &str,
        limit: Option<u32>,
        now: i64,
    ) -> Result<Admission, RegistryError>;
    /// Replace the rollout's progress by `next` if it is still `expected`; whether it was. Going
    /// to cancelled tells the history of each device updating that its update was cancelled.
    async fn advance(
        &self,
        id: RolloutId,
        expected: &Progress,
        next: &Progress,
        now: i64,
    ) -> Result<bool, RegistryError>;
    /// Mark failed the devices silent for `swap_timeout` after they were sent the whole image, or
    /// whose progress was not recorded for `stall_timeout`; their number.
    async fn expire(
        &self,
        id: RolloutId,
        swap_timeout: Duration,
        stall_timeout: Duration,
        now: i64,
    ) -> Result<u64, RegistryError>;
}
