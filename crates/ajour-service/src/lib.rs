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
//! Passwords: a login is one keyed hash against the verifier stored with the device ([`auth`]),
//! failed logins are delayed and counted ([`guard`]).
//!
//! Logs: a transport makes both calls inside [`device_span`], so every line logged while a status
//! is handled (here, in the registry, in a firmware source) names the application and device.
//!
//! This crate does no network I/O of its own; the registry and firmware source are traits.

mod auth;
mod certificates;
mod context;
pub mod guard;
pub mod hot_metrics;
pub mod rollouts;
pub mod throttle;
pub mod tracker;
pub mod traffic;
pub mod x509;

pub use ajour_types::{FirmwareState, FirmwareStatus};
pub use auth::AuthError;
pub use certificates::CertSignIn;

pub use guard::GuardConfig;
pub use rollouts::{Action as RolloutAction, RolloutDetails, RolloutError, RolloutSummary};

use ajour_engine::{decide, wait, EngineConfig, FirmwareImage, Outcome, Target};
use ajour_protocol::{decode_status, encode_command, DecodeError, Status};
use ajour_registry::{AppName, CredentialKeys, Key, Registry, RegistryError, Resource, RolloutStore};
use ajour_store::{Asking, FetchError, FirmwareSource, Observation, Observed};
use ajour_types::rollout::{Rollout, RolloutId, RolloutSpec};
use ajour_types::{DeviceName, FirmwareReport};
use context::{ContextCache, DeviceContext};
use hot_metrics::{HotCounter, HotLabeledCounter};
use rollouts::{Given, Rollouts};
use std::collections::HashMap;
use std::net::IpAddr;
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
    /// The secret device passwords are sealed with; the registry must use the same.
    pub credential_keys: Arc<CredentialKeys>,
    /// A failed login is answered no sooner than this after it began: a wrong password and an
    /// unknown device then take the same time, and guessing is slowed.
    pub login_failure_delay: Duration,
    /// Limits on failed logins per address and per device.
    pub guard: GuardConfig,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            unmanaged_poll: 300,
            spec_cache_ttl: Duration::from_secs(5),
            progress_interval: Duration::from_secs(10),
            progress_step: 20.0,
            credential_keys: CredentialKeys::for_this_process(),
            login_failure_delay: Duration::from_millis(250),
            guard: GuardConfig::default(),
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
    auth: auth::Authenticator,
    tracker: StatusTracker,
    /// Staged rollouts, when the service was given a store for them ([`Self::with_rollouts`]).
    rollouts: Option<Rollouts>,
    /// Who watches which application's traffic live ([`traffic`]).
    traffic: Arc<traffic::Traffic>,
    /// Which applications trust which certificate issuers ([`Self::sign_in_certificate`]).
    issuers: certificates::IssuerIndex,
}

impl UpdateService {
    pub fn new(
        registry: Arc<dyn Registry>,
        firmware: Arc<dyn FirmwareSource>,
        config: ServiceConfig,
    ) -> Self {
        Self {
            contexts: ContextCache::new(config.spec_cache_ttl),
            issuers: certificates::IssuerIndex::new(config.spec_cache_ttl),
            auth: auth::Authenticator::new(
                config.credential_keys.clone(),
                guard::LoginGuard::new(config.guard.clone()),
                config.login_failure_delay,
            ),
            tracker: StatusTracker::new(registry.clone(), config.progress_interval, config.progress_step),
            registry,
            firmware,
            config,
            rollouts: None,
            traffic: Arc::new(traffic::Traffic::new()),
        }
    }

    /// The live traffic of applications: every status handled and its command, for watchers.
    pub fn traffic(&self) -> &Arc<traffic::Traffic> {
        &self.traffic
    }

    /// Give the service staged rollouts, kept in `store` (the registry's own database).
    pub fn with_rollouts(mut self, store: Arc<dyn RolloutStore>) -> Self {
        self.rollouts = Some(Rollouts::new(store));
        self
    }

    fn rollouts(&self) -> Result<&Rollouts, RolloutError> {
        self.rollouts.as_ref().ok_or(RolloutError::Unavailable)
    }

    /// Create a rollout of `app`'s devices to the firmware in `spec`.
    pub async fn create_rollout(&self, app: &AppName, spec: RolloutSpec) -> Result<Rollout, RolloutError> {
        let created = self.rollouts()?.create(self.registry.as_ref(), app, spec).await?;
        self.contexts.invalidate(&Key::App(app.clone()));
        Ok(created)
    }

    /// `app`'s rollouts, newest first, with their counts.
    pub async fn list_rollouts(&self, app: &AppName) -> Result<Vec<RolloutSummary>, RolloutError> {
        self.rollouts()?.list(app).await
    }

    /// Rollout `id` of `app` with its devices, and the application's devices outside it.
    pub async fn rollout(&self, app: &AppName, id: RolloutId) -> Result<RolloutDetails, RolloutError> {
        self.rollouts()?.get(self.registry.as_ref(), app, id).await
    }

    /// Pause, resume, cancel or approve rollout `id` of `app`.
    pub async fn control_rollout(
        &self,
        app: &AppName,
        id: RolloutId,
        action: RolloutAction,
    ) -> Result<RolloutSummary, RolloutError> {
        self.rollouts()?.control(app, id, action).await
    }

    /// Move rollouts on every `tick` until `shutdown` resolves (see [`rollouts`]); at once when
    /// this service keeps no rollouts.
    pub async fn run_rollout_controller(
        self: Arc<Self>,
        tick: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let Some(rollouts) = &self.rollouts else { return };
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = interval.tick() => match rollouts.tick(self.registry.as_ref()).await {
                    // Their firmware is the rollouts' now: read it at once, not after the TTL.
                    Ok(completed) => completed
                        .into_iter()
                        .for_each(|app| self.contexts.invalidate(&Key::App(app))),
                    Err(error) => {
                        error_total("rollouts");
                        warn_throttled!(LOG_INTERVAL, %error, "rollout controller: registry unavailable");
                    }
                },
                _ = &mut shutdown => break,
            }
        }
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// `status`, or `status` as if the device had just started (no update in progress) when it
    /// reports an update of the target's version but may hold bytes of another image under that
    /// version (replaced content, a moved tag): the identity of what a device downloads is the
    /// image's digest, so blocks of two images are never mixed. What this instance sent the
    /// device is known in memory; otherwise the registry says what the device was last sent (by
    /// any instance), and when it cannot say, the device starts again: a wasted download is
    /// safe, a spliced image is not.
    async fn status_resuming_only_the_same_image<'s>(
        &self,
        key: &Key,
        status: &'s Status,
        image: &FirmwareImage,
        sent_here: Option<bool>,
    ) -> std::borrow::Cow<'s, Status> {
        let resuming = status
            .update
            .as_ref()
            .is_some_and(|u| u.offset > 0 && u.version == image.version().as_bytes());
        if !resuming {
            return std::borrow::Cow::Borrowed(status);
        }
        let digest = image.checksum_hex();
        let was = match sent_here {
            Some(true) => return std::borrow::Cow::Borrowed(status),
            Some(false) => "another image, sent by this instance".to_string(),
            None => match self.stored_target_digest(key, image.version()).await {
                Some(stored) if stored == digest => return std::borrow::Cow::Borrowed(status),
                Some(stored) => stored,
                None => "unknown".to_string(),
            },
        };
        metrics::counter!("ajour_update_restarts_total").increment(1);
        tracing::warn!(
            %key,
            version = image.version(),
            was,
            now = digest,
            "the device was downloading other content under this version; starting it again from offset 0"
        );
        let mut from_start = status.clone();
        from_start.update = None;
        std::borrow::Cow::Owned(from_start)
    }

    /// Whether device `key` was sent the whole image `digest` of `target` and has not synced
    /// since: this instance sent it Swap (`swaps`), or the registry says so (another instance
    /// did; in a rollout, "whole" is written at once). Read from the registry only when this
    /// instance sent no Swap: a device reporting nothing of the image does so once per update.
    async fn was_sent_whole(&self, key: &Key, target: &str, digest: &str, swaps: u32) -> bool {
        swaps > 0
            || self.stored_status(key, target).await.is_some_and(|stored| {
                stored.target_digest.as_deref() == Some(digest)
                    && stored.percent().is_some_and(|percent| percent >= 100.0)
            })
    }

    /// The digest of the image the registry says the device was last sent toward `target`.
    async fn stored_target_digest(&self, key: &Key, target: &str) -> Option<String> {
        self.stored_status(key, target).await?.target_digest
    }

    /// The device's `status.firmware` as the registry has it, when it is about `target`.
    async fn stored_status(&self, key: &Key, target: &str) -> Option<FirmwareStatus> {
        let device = self.registry.get(key).await.ok()??;
        let report = FirmwareReport::from_json(device.status.get("firmware")?).ok()?;
        (report.status.target == target).then_some(report.status)
    }

    /// The device `key`, its context read once for the status at hand. With `credentials` (what
    /// the device presented to a transport), they are checked: an unknown device and a wrong
    /// password are both [`AuthError::Denied`], answered after the same delay; too many failures
    /// are [`AuthError::Throttled`]; a registry that cannot be read is [`AuthError::Unavailable`].
    /// A name that is no device may be a `unique` user name, which finds its device. Without
    /// credentials (Drogue mode: Drogue checked them), an unknown device or an unreadable registry
    /// is answered with `Wait` by [`Device::handle_status`].
    pub async fn device(
        &self,
        key: &Key,
        credentials: Option<Credentials<'_>>,
    ) -> Result<Device<'_>, AuthError> {
        let Some(credentials) = credentials else {
            return Ok(self.unchecked(key).await);
        };
        let started = tokio::time::Instant::now();
        if let Err((by, left)) = self.auth.guard.admit(key, credentials.peer) {
            return Err(self.auth.throttled(by, left));
        }
        match self.login(key, &credentials).await {
            Ok((key, context)) => {
                self.auth.guard.succeeded(&key, credentials.peer);
                Ok(Device {
                    service: self,
                    key,
                    context: context.map(Some),
                    gateway: None,
                })
            }
            Err((AuthError::Denied, device)) => {
                metrics::counter!("ajour_auth_failures_total").increment(1);
                self.auth.guard.failed(device.as_ref(), credentials.peer);
                tokio::time::sleep_until(started + self.auth.failure_delay).await;
                Err(AuthError::Denied)
            }
            Err((error, _)) => Err(error),
        }
    }

    /// Device `key`, its context read, its credentials not checked (they were, by Drogue or at
    /// the start of a session).
    async fn unchecked(&self, key: &Key) -> Device<'_> {
        let context = self.contexts.get(self.registry.as_ref(), key).await;
        Device {
            service: self,
            key: key.clone(),
            context,
            gateway: None,
        }
    }

    /// A device signed in once for a session ([`UpdateService::sign_in`] with the key it
    /// returned; an MQTT connection signs in at CONNECT), for one more of its statuses: its
    /// context read again (as cached), its credentials not checked again. With `as_device`, the
    /// device it acts for, checked as on every status.
    pub async fn session_device(
        &self,
        signed_in: &Key,
        as_device: Option<&str>,
    ) -> Result<Device<'_>, Refusal> {
        let device = self.unchecked(signed_in).await;
        match as_device {
            None => Ok(device),
            Some(target) => self.device_via(&device, target).await,
        }
    }

    /// Device `target` of the gateway's application, for `gateway` (a device logged in with its
    /// own credentials) acting for it, as Drogue's `as=`: allowed when the target names the
    /// gateway in `spec.gatewaySelector.matchNames`. An unknown target is refused as one that does
    /// not name the gateway, so device names cannot be found out by trying them. With the
    /// registry down, a target read before is checked as last read, and is told to wait.
    async fn device_via(&self, gateway: &Device<'_>, target: &str) -> Result<Device<'_>, Refusal> {
        let refused = |gateway: &dyn std::fmt::Display| {
            metrics::counter!("ajour_gateway_refusals_total").increment(1);
            Refusal::NotListed(format!(
                "device '{target}' does not name '{gateway}' in spec.gatewaySelector.matchNames"
            ))
        };
        let Key::Device(app, gateway_name) = gateway.key() else {
            return Err(refused(gateway.key()));
        };
        let Ok(target_name) = DeviceName::parse(target) else {
            return Err(refused(gateway_name));
        };
        let key = Key::Device(app.clone(), target_name);
        let names_gateway = |context: &DeviceContext| {
            key == *gateway.key() || context.gateways.iter().any(|g| g == gateway_name.as_str())
        };
        let (allowed, context) = match self.contexts.get(self.registry.as_ref(), &key).await {
            Ok(Some(context)) => (names_gateway(&context), Ok(Some(context))),
            Ok(None) => (false, Ok(None)),
            Err(error) => match self.contexts.last_read(&key) {
                Some(context) => (names_gateway(&context), Err(error)),
                None => {
                    error_total("registry");
                    warn_throttled!(LOG_INTERVAL, %error, "gateway check unavailable");
                    return Err(Refusal::Unavailable);
                }
            },
        };
        if !allowed {
            return Err(refused(gateway_name));
        }
        let gateway = (key != *gateway.key()).then(|| gateway_name.clone());
        Ok(Device {
            service: self,
            key,
            context,
            gateway,
        })
    }

    /// Find the device `credentials` log in to and check them. A denial says which existing
    /// device was tried, if any. With the registry down, a device read before is checked against
    /// its credentials as last read, and its context is the registry's error: it is told to wait
    /// (its spec may have changed meanwhile), not refused, and nothing it reported is lost.
    async fn login(
        &self,
        key: &Key,
        credentials: &Credentials<'_>,
    ) -> Result<(Key, Result<Arc<DeviceContext>, RegistryError>), (AuthError, Option<Key>)> {
        let unavailable = |error: RegistryError| (AuthError::Unavailable(error.to_string()), None);
        let registry = self.registry.as_ref();
        let found = match self.contexts.get(registry, key).await {
            Ok(found) => found,
            Err(error) => {
                let Some(context) = self.contexts.last_read(key) else {
                    return Err(unavailable(error));
                };
                let (username, password) = (credentials.username, credentials.password);
                return match self.auth.check(registry, key, &context, username, password).await {
                    Ok(_) => Ok((key.clone(), Err(error))),
                    Err(denied) => Err((denied, Some(key.clone()))),
                };
            }
        };
        let (key, context) = match found {
            Some(context) => (key.clone(), context),
            None => {
                let Key::Device(app, _) = key else {
                    return Err((AuthError::Denied, None));
                };
                let device = registry
                    .device_by_user(app, credentials.username)
                    .await
                    .map_err(unavailable)?;
                let Some(device) = device else {
                    return Err((AuthError::Denied, None));
                };
                let key = Key::Device(app.clone(), device);
                match self.contexts.get(registry, &key).await.map_err(unavailable)? {
                    Some(context) => (key, context),
                    None => return Err((AuthError::Denied, None)),
                }
            }
        };
        match self
            .auth
            .check(
                registry,
                &key,
                &context,
                credentials.username,
                credentials.password,
            )
            .await
        {
            Ok(stored) => {
                if stored {
                    self.contexts.invalidate(&key);
                }
                Ok((key, Ok(context)))
            }
            Err(error) => Err((error, Some(key))),
        }
    }

    /// Slow (imported hash) password verifications so far: after the first login of each
    /// device with an imported hash, none.
    pub fn slow_password_checks(&self) -> u64 {
        self.auth.slow_checks()
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
                warn_throttled!(LOG_INTERVAL, %key, %error, "registry unavailable; device told to wait");
                return reply(&wait(correlation_id, self.config.engine.wait_poll).command);
            }
        };
        let current = String::from_utf8_lossy(&status.version).into_owned();
        // Who asks and what it runs: a source acting for the device elsewhere (Hawkbit) reports
        // them; the file and OCI sources look at the spec alone.
        let device = context.name.as_str();
        let asking = Asking {
            device,
            current: &current,
        };
        let given = match &self.rollouts {
            Some(rollouts) => match rollouts.given(key, context).await {
                Ok(given) => given,
                Err(error) => {
                    error_total("registry");
                    warn_throttled!(LOG_INTERVAL, %key, %error, "rollout store unavailable; device told to wait");
                    return reply(&wait(correlation_id, self.config.engine.wait_poll).command);
                }
            },
            None => Given::Context,
        };
        let given = self.admit(key, given, &asking).await;
        let spec = match &given {
            Given::Context => context.firmware.as_ref().map(Option::as_ref),
            Given::Rollout { book, .. } => book.firmware.as_ref().map(Some),
            Given::Previous(previous) => previous.as_ref().map(Option::as_ref),
            // Mid-update in a paused rollout: it keeps what it has and asks again.
            Given::Wait => return reply(&wait(correlation_id, self.config.engine.wait_poll).command),
        };
        let spec = match spec {
            Ok(Some(spec)) => spec,
            Ok(None) => return reply(&wait(correlation_id, self.config.unmanaged_poll).command),
            Err(reason) => {
                self.tracker
                    .record(key, FirmwareStatus::error(current, reason.clone()));
                return reply(&wait(correlation_id, self.config.engine.wait_poll).command);
            }
        };
        let image = match self.firmware.fetch_for(spec, &asking).await {
            Ok(image) => image,
            // Nothing to install now (Hawkbit between deployments, or one cancelled): not an
            // error. The device runs what it runs, and comes back when the source asks.
            Err(FetchError::NothingAssigned { poll_secs }) => {
                self.tracker.record(
                    key,
                    FirmwareStatus {
                        target: current.clone(),
                        current,
                        target_digest: None,
                        state: FirmwareState::InSync,
                    },
                );
                return reply(&wait(correlation_id, poll_secs).command);
            }
            Err(error) => {
                self.tracker
                    .record(key, FirmwareStatus::error(current, error.to_string()));
                return reply(&wait(correlation_id, self.config.engine.wait_poll).command);
            }
        };
        let target = image.version().to_string();
        let digest = image.checksum_hex();
        let sent = self.tracker.sent(key, &target, digest);
        // A device that was sent Swap for this very image again and again without coming back on
        // the new version (the swap fails, or its bootloader rolls back) is left alone: its status
        // says why, and a new image (another digest) starts afresh.
        if status.version != target.as_bytes() && sent.swaps >= MAX_SWAPS {
            let reason = format!(
                "sent Swap to {target} {MAX_SWAPS} times, the device still runs {current}: not updated again until its firmware changes"
            );
            self.firmware.observe(
                spec,
                &Observation {
                    device,
                    current: &current,
                    target: &target,
                    state: Observed::Failed { reason: &reason },
                },
            );
            let failed = FirmwareStatus {
                current,
                target,
                target_digest: Some(digest.to_string()),
                state: FirmwareState::Failed { reason },
            };
            self.tracker.record(key, failed);
            return reply(&wait(correlation_id, self.config.engine.wait_poll).command);
        }
        // In a rollout, one rollback fails the device (the rollout counts it, and gives it its
        // previous firmware from then on): it was sent the whole image, and reports the version
        // it ran holding nothing of the new one, which only a device that rebooted does.
        if matches!(given, Given::Rollout { .. })
            && status.version != target.as_bytes()
            && status
                .update
                .as_ref()
                .is_none_or(|u| u.offset == 0 || u.version != target.as_bytes())
            && self.was_sent_whole(key, &target, digest, sent.swaps).await
        {
            let failed = FirmwareStatus {
                state: FirmwareState::Failed {
                    reason: ajour_types::rollout::rolled_back_reason(&target, &current),
                },
                current,
                target,
                target_digest: Some(digest.to_string()),
            };
            self.tracker.record(key, failed);
            return reply(&wait(correlation_id, self.config.engine.wait_poll).command);
        }
        let status = self
            .status_resuming_only_the_same_image(key, status, &image, sent.same_image)
            .await;
        let decision = decide(&status, Target::Ready(&image), &self.config.engine);
        // A rollout's bandwidth budget: a block it cannot afford now is not sent; the device asks
        // again in a second (the shortest wait the protocol has).
        if let (Given::Rollout { book, .. }, Outcome::Writing { len, .. }, Some(rollouts)) =
            (&given, decision.outcome, &self.rollouts)
        {
            if !rollouts.afford(book, len) {
                return reply(&wait(correlation_id, 1).command);
            }
        }
        let state = match decision.outcome {
            Outcome::InSync => FirmwareState::InSync,
            Outcome::Writing { offset, len, size } => {
                FIRMWARE_BYTES_SENT.increment(len.into());
                FirmwareState::Updating {
                    percent: percent(offset as u64 + len as u64, size as u64),
                }
            }
            Outcome::Swapping => {
                self.tracker.count_swap(key, digest);
                FirmwareState::Updating { percent: 100.0 }
            }
            Outcome::Waiting => FirmwareState::Error {
                reason: "firmware image is empty".into(),
            },
        };
        // Tell the source how the device is doing (Hawkbit sends its feedback from this; the
        // other sources ignore it). Not for an empty image, which is the source's own error.
        let observed = match &state {
            FirmwareState::InSync => Some(Observed::InSync),
            FirmwareState::Updating { percent } => Some(Observed::Updating { percent: *percent }),
            _ => None,
        };
        if let Some(state) = observed {
            self.firmware.observe(
                spec,
                &Observation {
                    device,
                    current: &current,
                    target: &target,
                    state,
                },
            );
        }
        let starting = matches!(decision.outcome, Outcome::Writing { offset: 0, .. });
        // In a rollout, that a device has the whole image is written at once (else only as
        // progress is): whichever instance the device comes back to must be able to tell that
        // a device reporting its old version has rolled back.
        let whole_in_rollout = matches!(given, Given::Rollout { .. })
            && matches!(state, FirmwareState::Updating { percent } if percent >= 100.0);
        let status = FirmwareStatus {
            current,
            target,
            target_digest: Some(digest.to_string()),
            state,
        };
        let write = match whole_in_rollout {
            true => self.tracker.record_now(key, status),
            false => self.tracker.record(key, status),
        };
        // With a registry other instances share, the first block of an image waits until the
        // registry names the image (and in a rollout, the block that completes it until the
        // registry says the device has it whole): the device's next status may reach another
        // instance (several behind a load balancer), which can resume it only if the registry
        // says what it was sent (else it starts the device again), and tell a rollback only if
        // the registry says it was sent the whole image. Bounded: past it, or with the registry
        // down, the block goes anyway (a restart there is a wasted block, never a spliced image).
        if let (true, Some(write)) = ((starting || whole_in_rollout) && self.registry.shared(), write) {
            let _ = tokio::time::timeout(FIRST_BLOCK_WRITE_WAIT, write).await;
        }
        reply(&decision.command)
    }

    /// A device a rollout may start now is started if the store admits it (the rollout is still
    /// active and under its concurrency limit); otherwise it keeps its previous firmware. Its
    /// target version is recorded with the start, so the image is fetched first (from the
    /// source's cache, where the status's own fetch finds it again).
    async fn admit(&self, key: &Key, given: Given, asking: &Asking<'_>) -> Given {
        let (Given::Rollout { book, start: true }, Some(rollouts)) = (&given, &self.rollouts) else {
            return given;
        };
        let Ok(spec) = &book.firmware else { return given };
        let admitted = match self.firmware.fetch_for(spec, asking).await {
            Ok(image) => rollouts.start(book, key, image.version()).await,
            // The image cannot be had: the device is not started, and keeps its firmware.
            Err(_) => Ok(false),
        };
        match admitted {
            Ok(true) => Given::Rollout {
                book: book.clone(),
                start: false,
            },
            Ok(false) => rollouts.previous_of(book, key),
            Err(error) => {
                error_total("registry");
                warn_throttled!(LOG_INTERVAL, %key, %error, "rollout store unavailable; device keeps its firmware");
                rollouts.previous_of(book, key)
            }
        }
    }

    /// Forget what is cached about `key` (an application: all its devices), after a write.
    pub fn invalidate(&self, key: &Key) {
        self.contexts.invalidate(key);
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
            overlay_pending(resource, pending);
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

/// The span a device's status is handled in, by a transport, once per status: every line logged
/// beneath it carries the application and the device (`device{app=.. device=..}` in text logs,
/// under `spans` in JSON logs). The names are formatted only when the span is enabled: one whose
/// level is off costs next to nothing. A transport that learns the device only later (a
/// `unique` user name) records `device` again.
pub fn device_span(key: &Key) -> tracing::Span {
    match key {
        Key::Device(app, device) => {
            tracing::info_span!("device", app = %app.as_str(), device = %device.as_str())
        }
        Key::App(app) => {
            tracing::info_span!("device", app = %app.as_str(), device = tracing::field::Empty)
        }
    }
}

/// How often a warning that every request would repeat (the registry is down) is logged.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Show `pending`, an instance's newest `status.firmware` of a device (from
/// [`UpdateService::pending_status`]), in place of the stored one, unless the stored one is newer:
/// another instance sharing the database saw the device in sync since, and the pending write will
/// be dropped for that reason ([`FirmwareReport::is_late_over`]).
pub fn overlay_pending(resource: &mut Resource, pending: serde_json::Value) {
    let late = match (
        resource.status.get("firmware").map(FirmwareReport::from_json),
        FirmwareReport::from_json(&pending),
    ) {
        (Some(Ok(stored)), Ok(pending)) => pending.is_late_over(&stored),
        _ => false,
    };
    if !late {
        resource.status.insert("firmware".into(), pending);
    }
}

/// How long the first block of an image (in a rollout, also the last) waits for the registry to
/// record it.
const FIRST_BLOCK_WRITE_WAIT: Duration = Duration::from_secs(1);

/// Swaps sent for one image before a device that never comes back on its version is given up.
/// More than one: a Swap command can be lost on the way, and the device then asks again.
pub const MAX_SWAPS: u32 = 3;

/// What a device endpoint was given to sign a device in, whatever carried it (HTTP's
/// `Authorization` and query, CoAP's option 4209 and Uri-Query): Basic credentials, where `user`
/// is `device@app`, or `device` with `application`, or a `unique` user name; and `as=`.
pub struct SignIn<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub application: Option<&'a str>,
    /// A gateway acting for this device of its application (Drogue's `as=`).
    pub as_device: Option<&'a str>,
    /// The address the request came from (failed logins are counted per address).
    pub peer: Option<IpAddr>,
}

/// Why a device endpoint refuses a request before its status is handled: the same reasons on
/// every transport, each mapping them to its own codes. Counted here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The user name names no application, and none was given (HTTP 401).
    NoApplication,
    /// Unknown device, impossible name, or wrong password: deliberately alike (HTTP 403).
    Denied,
    /// Too many failed logins from this address or for this device (HTTP 429).
    Throttled { retry_after: Duration },
    /// `as=` a device that does not name the gateway, or does not exist (HTTP 403, saying so).
    /// Counted in `ajour_gateway_refusals_total`.
    NotListed(String),
    /// The registry could not be asked (HTTP 503).
    Unavailable,
}

impl SignIn<'_> {
    /// The device the credentials name (before they are checked).
    pub fn key(&self) -> Result<Key, Refusal> {
        match Key::from_device_user(self.user, self.application) {
            Ok(Some(key)) => Ok(key),
            Ok(None) => Err(Refusal::NoApplication),
            // A name that cannot exist is an unknown device: the same answer as a wrong password.
            Err(_) => {
                error_total("auth_denied");
                Err(Refusal::Denied)
            }
        }
    }
}

impl UpdateService {
    /// Sign in the device `key` (from [`SignIn::key`]) with `given`'s credentials, or, with
    /// `as=`, the gateway they are for and then the device it acts for: the device whose status
    /// this is. The one sign-in of every device endpoint; call it in the device's span
    /// ([`device_span`]), which then names the device found.
    pub async fn sign_in(&self, key: &Key, given: &SignIn<'_>) -> Result<Device<'_>, Refusal> {
        let presented = Credentials {
            username: given.user.split_once('@').map(|(d, _)| d).unwrap_or(given.user),
            password: given.password,
            peer: given.peer,
        };
        let signed_in = match self.device(key, Some(presented)).await {
            Ok(device) => device,
            Err(AuthError::Denied) => {
                error_total("auth_denied");
                return Err(Refusal::Denied);
            }
            Err(AuthError::Throttled { retry_after }) => {
                error_total("auth_throttled");
                return Err(Refusal::Throttled { retry_after });
            }
            Err(AuthError::Unavailable(reason)) => {
                error_total("registry");
                warn_throttled!(LOG_INTERVAL, %reason, "device authentication unavailable");
                return Err(Refusal::Unavailable);
            }
        };
        let device = match given.as_device {
            None => signed_in,
            Some(target) => self.device_via(&signed_in, target).await?,
        };
        // A `unique` user name logged in as the device it belongs to, or a gateway acting for a
        // device: the span names that device.
        if device.key() != key {
            if let Key::Device(_, name) = device.key() {
                tracing::Span::current().record("device", tracing::field::display(name.as_str()));
            }
        }
        Ok(device)
    }
}

/// The credentials a device presented to a transport.
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    /// Its own name, or the user name of a `user` credential.
    pub username: &'a str,
    pub password: &'a str,
    /// The address it connected from, when the transport knows it (failed logins are counted
    /// per address).
    pub peer: Option<IpAddr>,
}

/// A device, for one status: its context as read by [`UpdateService::device`].
pub struct Device<'s> {
    service: &'s UpdateService,
    key: Key,
    context: Result<Option<Arc<DeviceContext>>, RegistryError>,
    /// The gateway sending this device's statuses ([`UpdateService::device_via`]), if any.
    gateway: Option<DeviceName>,
}

impl Device<'_> {
    /// The device's key: the one asked for, or the device a `unique` user name found.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The command for the status `bytes` the device sent, encoded. A status that does not decode
    /// is the device's fault and an error; whatever goes wrong on the server's side (registry
    /// down, firmware missing or corrupt) is answered with `Wait`, and the device's status says
    /// why.
    pub async fn handle_status(&self, bytes: &[u8]) -> Result<Reply, DecodeError> {
        STATUSES_RECEIVED.increment(1);
        let status = match decode_status(bytes) {
            Ok(status) => status,
            Err(error) => {
                error_total("decode");
                return Err(error);
            }
        };
        let reply = self.service.decide_for(&self.key, &self.context, &status).await;
        COMMANDS_SENT.increment(reply.kind, 1);
        // Every transport passes here: watchers of the application see the status and its
        // answer (nothing is built unless someone watches it).
        if let Key::Device(app, device) = &self.key {
            let gateway = self.gateway.as_ref();
            self.service
                .traffic
                .publish(app, device, gateway, &status, &reply.command);
        }
        Ok(reply)
    }
}

/// What every status counts: a lookup of each in the recorder costs more than the count.
static STATUSES_RECEIVED: HotCounter = HotCounter::new("ajour_statuses_received_total");
static COMMANDS_SENT: HotLabeledCounter<4> = HotLabeledCounter::new(
    "ajour_commands_sent_total",
    "kind",
    ["write", "swap", "sync", "wait"],
);
static FIRMWARE_BYTES_SENT: HotCounter = HotCounter::new("ajour_firmware_bytes_sent_total");

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
