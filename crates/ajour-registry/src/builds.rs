//! Where builds are kept: [`BuildStore`], beside the registry in the same database (the SQL
//! registry implements it, on SQLite and PostgreSQL). A build is written by the one instance that
//! runs it; any instance reads it, and any instance may close builds whose runner stopped
//! renewing them (a restart, a crash), so none stays running for ever.

use crate::RegistryError;
use ajour_types::build::{Build, BuildId, BuildLog, BuildOutcome, BuildTarget};
use async_trait::async_trait;
use serde_json::Value;

/// A build to record, queued.
pub struct NewBuild<'a> {
    pub target: &'a BuildTarget,
    /// `local` or `tekton`.
    pub runner: &'a str,
    /// The firmware section it is built from (`spec.firmware`).
    pub spec: &'a Value,
    /// Milliseconds since the epoch.
    pub now: i64,
}

/// Which builds to list.
#[derive(Debug, Clone, Default)]
pub struct BuildFilter<'a> {
    /// Only this application's (its own and its devices').
    pub app: Option<&'a str>,
    /// With `app`: only this device's; `Some(None)`: only the application's own.
    pub device: Option<Option<&'a str>>,
    /// At most this many, newest first.
    pub limit: u32,
}

#[async_trait]
pub trait BuildStore: Send + Sync + 'static {
    /// Record a queued build; [`RegistryError::AlreadyExists`] naming the open build when the
    /// target has one queued or running (decided by the database, so two instances triggering
    /// at once record one).
    async fn create_build(&self, new: NewBuild<'_>) -> Result<Build, RegistryError>;
    async fn build(&self, id: BuildId) -> Result<Option<Build>, RegistryError>;
    /// Builds matching `filter`, newest first.
    async fn builds(&self, filter: BuildFilter<'_>) -> Result<Vec<Build>, RegistryError>;
    /// The build is running from `now` (its runner's name for it, when it has one).
    async fn start_build(&self, id: BuildId, reference: Option<&str>, now: i64) -> Result<(), RegistryError>;
    /// The runner still runs these builds: renew their lease.
    async fn renew_builds(&self, ids: &[BuildId], now: i64) -> Result<(), RegistryError>;
    /// Append to the build's log, keeping its tail (`ajour_types::build::append_log`).
    async fn append_build_log(&self, id: BuildId, chunk: &str) -> Result<(), RegistryError>;
    async fn build_log(&self, id: BuildId) -> Result<Option<BuildLog>, RegistryError>;
    /// Record how the build ended; nothing when it was closed already.
    async fn finish_build(&self, id: BuildId, outcome: &BuildOutcome, now: i64) -> Result<(), RegistryError>;
    /// Fail every open build whose lease was last renewed before `stale_before`, with `message`
    /// appended to its log; the builds closed.
    async fn close_stale_builds(
        &self,
        stale_before: i64,
        message: &str,
        now: i64,
    ) -> Result<Vec<BuildId>, RegistryError>;
}
