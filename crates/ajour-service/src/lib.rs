//! The update service: one device status in, one command out.
//!
//! Every transport makes the same two calls per status: [`UpdateService::device`] reads the
//! device's context (its firmware spec and credentials, through a short-lived cache rather than
//! from the database on every block) once, and checks the credentials the device presented; then
//! [`Device::handle_status`] takes the status bytes as they arrived and returns the command
//! bytes: it decodes the status, gets the image from the firmware source, asks the engine for the
//! next command, and records the device's progress in `status.firmware` without writing to the
//! database for every block (see [`tracker`]).
//!
//! Passwords: the slow hash is verified once, after which the same credential is recognised by a
//! keyed hash held in memory.
//!
//! This crate does no network I/O of its own; the registry and firmware source are traits.

mod auth;
mod context;
pub mod tracker;

pub use ajour_types::{FirmwareState, FirmwareStatus};
pub use auth::AuthError;

use ajour_engine::{decide, wait, EngineConfig, Outcome, Target};
use ajour_protocol::{decode_status, encode_command, DecodeError, Status};
use ajour_registry::{Key, Registry, RegistryError, Resource};
use ajour_store::FirmwareSource;
use context::{ContextCache, DeviceContext};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracker::StatusTracker;

/// Tunables of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub engine: EngineConfig,
    /// Seconds a device with no firmware set waits before asking again.
    pub unmanaged_poll: u32,
    /// How long a device's and application's spec are reused before being read again. Changes
    /// made through this server's API take effect at once; other writers within this bound.
    pub spec_cache_ttl: Duration,
    /// Progress is written to the registry at most this often per device.
    pub progress_interval: Duration,
    /// ... and only when it advanced by this many percentage points (or the device went quiet).
    pub progress_step: f64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            unmanaged_poll: 300,
            spec_cache_ttl: Duration::from_secs(5),
            progress_interval: Duration::from_secs(10),
            progress_step: 20.0,
        }
    }
}

/// The answer to one status: the encoded command and its kind (`wait`, `sync`, `write`, `swap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub command: Vec<u8>,
    pub kind: &'static str,
}

pub struct UpdateService {
    registry: Arc<dyn Registry>,
    firmware: Arc<dyn FirmwareSource>,
    config: ServiceConfig,
    contexts: ContextCache,
    auth: auth::CredentialCache,
    tracker: StatusTracker,
}

impl UpdateService {
    pub fn new(
        registry: Arc<dyn Registry>,
        firmware: Arc<dyn FirmwareSource>,
        config: ServiceConfig,
    ) -> Self {
        Self {
            contexts: ContextCache::new(config.spec_cache_ttl),
            auth: auth::CredentialCache::new(),
            tracker: StatusTracker::new(registry.clone(), config.progress_interval, config.progress_step),
            registry,
            firmware,
            config,
        }
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// The device `key`, its context read once for the status at hand. With `credentials` (what
    /// the device presented to a transport), they are checked: an unknown device and a wrong
    /// password are both [`AuthError::Denied`], a registry that cannot be read is
    /// [`AuthError::Unavailable`]. Without (Drogue mode: Drogue checked them), an unknown device or
    /// an unreadable registry is answered with `Wait` by [`Device::handle_status`].
    pub async fn device(
        &self,
        key: &Key,
        credentials: Option<Credentials<'_>>,
    ) -> Result<Device<'_>, AuthError> {
        let context = self.contexts.get(self.registry.as_ref(), key).await;
        if let Some(credentials) = credentials {
            match &context {
                Ok(Some(context)) => {
                    self.auth
                        .check(key, context, credentials.username, credentials.password)
                        .await?
                }
                Ok(None) => return Err(AuthError::Denied),
                Err(error) => return Err(AuthError::Unavailable(error.to_string())),
            }
        }
        Ok(Device {
            service: self,
            key: key.clone(),
            context,
        })
    }

    /// Decide what device `key` gets for `status`. Never fails: whatever goes wrong on the
    /// server's side (registry down, firmware missing or corrupt) makes the device wait, and the
    /// device's status says why.
    async fn decide_for(
        &self,
        key: &Key,
        context: &Result<Option<Arc<DeviceContext>>, RegistryError>,
        status: &Status,
    ) -> Reply {
        let correlation_id = status.correlation_id;
        let context = match context {
            Ok(Some(context)) => context,
            Ok(None) => {
                tracing::debug!(%key, "status from a device not in the registry");
                return reply(&wait(correlation_id, self.config.unmanaged_poll).command);
            }
            Err(error) => {
                error_total("registry");
                tracing::warn!(%key, %error, "registry unavailable; device told to wait");
                return reply(&wait(correlation_id, self.config.engine.wait_poll).command);
            }
        };
        let current = String::from_utf8_lossy(&status.version).into_owned();
        let spec = match &context.firmware {
            Ok(Some(spec)) => spec,
            Ok(None) => return reply(&wait(correlation_id, self.config.unmanaged_poll).command),
            Err(reason) => {
                self.tracker
                    .record(key, FirmwareStatus::error(current, reason.clone()));
                return reply(&wait(correlation_id, self.config.engine.wait_poll).command);
            }
        };
        let image = match self.firmware.fetch(spec).await {
            Ok(image) => image,
            Err(error) => {
                self.tracker
                    .record(key, FirmwareStatus::error(current, error.to_string()));
                return reply(&wait(correlation_id, self.config.engine.wait_poll).command);
            }
        };
        let decision = decide(status, Target::Ready(&image), &self.config.engine);
        let target = image.version().to_string();
        let state = match decision.outcome {
            Outcome::InSync => FirmwareState::InSync,
            Outcome::Writing { offset, len, size } => {
                metrics::counter!("ajour_firmware_bytes_sent_total").increment(len.into());
                FirmwareState::Updating {
                    percent: percent(offset as u64 + len as u64, size as u64),
                }
            }
            Outcome::Swapping => FirmwareState::Updating { percent: 100.0 },
            Outcome::Waiting => FirmwareState::Error {
                reason: "firmware image is empty".into(),
            },
        };
        self.tracker.record(
            key,
            FirmwareStatus {
                current,
                target,
                state,
            },
        );
        reply(&decision.command)
    }

    /// Forget what is cached about `key` (an application: all its devices), after a write.
    pub fn invalidate(&self, key: &Key) {
        self.contexts.invalidate(key);
        self.auth.invalidate(key);
    }

    /// The device's latest `status.firmware` when the registry may not have it yet (not written,
    /// or being written). Take it *before* reading the device from the registry: a write that
    /// lands between the two is then covered by one or the other.
    pub fn pending_status(&self, key: &Key) -> Option<serde_json::Value> {
        self.tracker.pending_json(key)
    }

    /// [`Self::pending_status`] of every device of `app` that has one, by device name.
    pub fn pending_statuses(&self, app: &ajour_registry::AppName) -> HashMap<String, serde_json::Value> {
        self.tracker.pending_of_app(app)
    }

    /// Put a status taken with [`Self::pending_status`] into `resource`.
    pub fn overlay_status(&self, key: &Key, resource: &mut Resource) {
        if let Some(pending) = self.pending_status(key) {
            resource.status.insert("firmware".into(), pending);
        }
    }

    /// Write progress that is due. Called periodically by [`Self::run_status_writer`], and on shutdown.
    pub async fn flush_status(&self, force: bool) {
        self.tracker.flush(force).await;
    }

    /// Write pending progress every `progress_interval` until `shutdown` resolves, then write all
    /// that is left.
    pub async fn run_status_writer(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let mut tick =
            tokio::time::interval((self.config.progress_interval / 2).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush_status(false).await,
                _ = &mut shutdown => break,
            }
        }
        self.flush_status(true).await;
    }

    /// Wait until the status writes started so far have finished (they run beside the requests).
    pub async fn settle_status_writes(&self) {
        self.tracker.settle().await;
    }

    /// The number of registry writes of `status.firmware` so far (for benchmarks and tests).
    pub fn status_writes(&self) -> u64 {
        self.tracker.writes()
    }
}

/// The credentials a device presented to a transport.
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    /// Its own name, or the user name of a `user` credential.
    pub username: &'a str,
    pub password: &'a str,
}

/// A device, for one status: its context as read by [`UpdateService::device`].
pub struct Device<'s> {
    service: &'s UpdateService,
    key: Key,
    context: Result<Option<Arc<DeviceContext>>, RegistryError>,
}

impl Device<'_> {
    /// The command for the status `bytes` the device sent, encoded. A status that does not decode
    /// is the device's fault and an error; whatever goes wrong on the server's side (registry
    /// down, firmware missing or corrupt) is answered with `Wait`, and the device's status says
    /// why.
    pub async fn handle_status(&self, bytes: &[u8]) -> Result<Reply, DecodeError> {
        metrics::counter!("ajour_statuses_received_total").increment(1);
        let status = match decode_status(bytes) {
            Ok(status) => status,
            Err(error) => {
                error_total("decode");
                return Err(error);
            }
        };
        let reply = self.service.decide_for(&self.key, &self.context, &status).await;
        metrics::counter!("ajour_commands_sent_total", "kind" => reply.kind).increment(1);
        Ok(reply)
    }
}

/// Count an error by its cause (`ajour_errors_total{cause}`).
pub fn error_total(cause: &'static str) {
    metrics::counter!("ajour_errors_total", "cause" => cause).increment(1);
}

fn reply(command: &ajour_protocol::Command<'_>) -> Reply {
    Reply {
        command: encode_command(command),
        kind: command.kind(),
    }
}

fn percent(done: u64, size: u64) -> f64 {
    if size == 0 {
        100.0
    } else {
        done as f64 * 100.0 / size as f64
    }
}
