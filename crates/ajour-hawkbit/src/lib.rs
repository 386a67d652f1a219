//! Firmware from Eclipse Hawkbit (`spec.firmware.hawkbit.controller`): Ajour acts as the DDI
//! controller of a device, so that software managed in Hawkbit reaches devices that speak Ajour's
//! protocol. One [`HawkbitSource`] is the gateway for every controller named in specs.
//!
//! What it does per controller ([docs/hawkbit.md](../../../docs/hawkbit.md) has the whole flow):
//! - polls the controller base at most once per Hawkbit's polling sleep (capped by
//!   [`HawkbitConfig::max_poll`]), however often devices report; a failed poll is retried after
//!   [`HawkbitConfig::error_retry`], and devices wait meanwhile;
//! - uploads the attributes (the version the device reports) when Hawkbit asks for them;
//! - acknowledges a `cancelAction` (the device then waits);
//! - follows `deploymentBase`, chooses the artifact ([`choose_artifact`]), downloads it once per
//!   SHA-256 and version for every controller (single-flight, the shared [`CheckedCache`]), and
//!   serves it only once it matches its declared size and SHA-256;
//! - sends feedback from what the service observes ([`FirmwareSource::observe`]): `proceeding`
//!   with progress at most once per [`HawkbitConfig::feedback_interval`], `closed`/`success` when
//!   the device reports the target version, `closed`/`failure` with details when the artifact is
//!   unusable or the device was given up on.
//!
//! Why not the `hawkbit` crate: it is a device-side client (one client, one HTTP connection pool
//! per controller; downloads go to files), and Ajour is a gateway for thousands of controllers
//! sharing one pool and one in-memory cache. It also brings reqwest 0.13 with aws-lc-rs, where
//! Ajour uses rustls with ring. Its sibling `hawkbit_mock` is what this crate is tested against.
//!
//! This crate knows nothing of devices beyond the name and version the service passes in, and
//! nothing of the registry or transports.

pub mod ddi;

use ajour_store::checked::{CheckedCache, Slot};
use ajour_store::{Asking, FetchError, FirmwareImage, FirmwareSource, FirmwareSpec, Observation, Observed};
use async_trait::async_trait;
use ddi::{Ddi, DdiError, Feedback};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The Hawkbit source's configuration. [`HawkbitConfig::new`] has the defaults.
#[derive(Clone)]
pub struct HawkbitConfig {
    /// Base URL of Hawkbit, e.g. `https://hawkbit.example.com`.
    pub url: String,
    pub tenant: String,
    /// Sent as `GatewayToken ...` for controllers without a token of their own.
    pub gateway_token: Option<String>,
    /// Per controller, sent as `TargetToken ...`.
    pub target_tokens: HashMap<String, String>,
    /// More target tokens, read at start from `controller=token` lines.
    pub target_tokens_file: Option<PathBuf>,
    /// Extra PEM CA certificates to trust, beside the system's.
    pub extra_ca_file: Option<PathBuf>,
    /// Accept any TLS certificate (labs and tests).
    pub accept_invalid_certs: bool,
    /// Timeout to connect and for each read; a whole request gets four times this.
    pub request_timeout: Duration,
    /// How long a failed poll or download is remembered before Hawkbit is asked again.
    pub error_retry: Duration,
    /// `proceeding` feedback is sent at most this often per controller.
    pub feedback_interval: Duration,
    /// Hawkbit's polling sleep is honoured up to this; `None`: as Hawkbit says.
    pub max_poll: Option<Duration>,
    /// Largest artifact accepted; larger ones fail the action before they are downloaded.
    pub max_firmware_size: u64,
}

impl fmt::Debug for HawkbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HawkbitConfig")
            .field("url", &self.url)
            .field("tenant", &self.tenant)
            .field("gateway_token", &self.gateway_token.as_ref().map(|_| "***"))
            .field("target_tokens", &self.target_tokens.len())
            .field("target_tokens_file", &self.target_tokens_file)
            .field("extra_ca_file", &self.extra_ca_file)
            .field("accept_invalid_certs", &self.accept_invalid_certs)
            .field("request_timeout", &self.request_timeout)
            .field("error_retry", &self.error_retry)
            .field("feedback_interval", &self.feedback_interval)
            .field("max_poll", &self.max_poll)
            .field("max_firmware_size", &self.max_firmware_size)
            .finish()
    }
}

impl HawkbitConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tenant: "DEFAULT".into(),
            gateway_token: None,
            target_tokens: HashMap::new(),
            target_tokens_file: None,
            extra_ca_file: None,
            accept_invalid_certs: false,
            request_timeout: Duration::from_secs(30),
            error_retry: Duration::from_secs(10),
            feedback_interval: Duration::from_secs(10),
            max_poll: None,
            max_firmware_size: 64 << 20,
        }
    }

    /// Read `controller=token` lines (blank lines and `#` comments skipped).
    pub fn read_target_tokens(path: &std::path::Path) -> Result<HashMap<String, String>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut tokens = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (controller, token) = line
                .split_once('=')
                .ok_or_else(|| format!("{} line {}: expected CONTROLLER=TOKEN", path.display(), n + 1))?;
            tokens.insert(controller.trim().to_string(), token.trim().to_string());
        }
        Ok(tokens)
    }
}

/// Hawkbit's polling sleep when it gives none.
const DEFAULT_SLEEP: Duration = Duration::from_secs(300);

/// What this source asked of Hawkbit, for tests and benchmarks (`/metrics` has the same as
/// `ajour_hawkbit_requests_total{request, result}`).
#[derive(Debug, Default)]
pub struct HawkbitStats {
    pub polls: AtomicU64,
    pub deployments: AtomicU64,
    pub config_uploads: AtomicU64,
    pub downloads: AtomicU64,
    pub feedbacks: AtomicU64,
    pub cancels: AtomicU64,
    /// Requests that failed, of any kind.
    pub errors: AtomicU64,
}

impl HawkbitStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// The Hawkbit gateway: a [`FirmwareSource`] for `hawkbit` specs. Cheap to share; the state lives
/// behind one `Arc`, which polls and feedback running in tasks of their own hold.
pub struct HawkbitSource {
    inner: Arc<Inner>,
}

struct Inner {
    config: HawkbitConfig,
    ddi: Ddi,
    /// Per controller: the last poll's outcome, fresh for the polling sleep.
    polls: CheckedCache<String, Polled>,
    /// Per (SHA-256, version): the image, held as long as an action holds it.
    artifacts: CheckedCache<(String, String), Result<Weak<FirmwareImage>, FetchError>>,
    stats: Arc<HawkbitStats>,
    /// Feedback requests in flight ([`HawkbitSource::settle`]).
    in_flight: tokio::sync::watch::Sender<usize>,
}

/// The outcome of one poll of a controller, and how long it holds.
#[derive(Clone)]
struct Polled {
    result: Result<Assignment, FetchError>,
    fresh_for: Duration,
    /// The cancel action acknowledged already (not acknowledged again while Hawkbit lists it).
    cancelled: Option<String>,
}

#[derive(Clone)]
enum Assignment {
    Nothing { poll_secs: u32 },
    Action(Arc<Action>),
}

/// One deployment action of a controller, followed from its `deploymentBase`.
struct Action {
    controller: String,
    id: String,
    href: String,
    feedback_url: String,
    /// The image, or why the action cannot be served (closed as failed already).
    image: Result<Arc<FirmwareImage>, FetchError>,
    feedback: Mutex<FeedbackState>,
    /// Serialises this action's feedback requests, so they reach Hawkbit in order.
    sending: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct FeedbackState {
    /// When `proceeding` was last sent, and the progress it said.
    progress: Option<(Instant, u32)>,
    /// A `closed` feedback is being sent, or was.
    closing: bool,
    /// Hawkbit took the `closed` feedback.
    closed: bool,
    /// When sending `closed` last failed (it is tried again after the error retry).
    close_failed: Option<Instant>,
}

impl HawkbitSource {
    pub fn new(mut config: HawkbitConfig) -> Result<Self, String> {
        if let Some(path) = &config.target_tokens_file {
            let tokens = HawkbitConfig::read_target_tokens(path)?;
            config.target_tokens.extend(tokens);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                ddi: Ddi::new(&config)?,
                config,
                polls: CheckedCache::default(),
                artifacts: CheckedCache::default(),
                stats: Arc::default(),
                in_flight: tokio::sync::watch::Sender::new(0),
            }),
        })
    }

    pub fn config(&self) -> &HawkbitConfig {
        &self.inner.config
    }

    pub fn stats(&self) -> Arc<HawkbitStats> {
        self.inner.stats.clone()
    }

    /// Wait until the feedback requests started so far have finished.
    pub async fn settle(&self) {
        let mut in_flight = self.inner.in_flight.subscribe();
        let _ = in_flight.wait_for(|n| *n == 0).await;
    }
}

#[async_trait]
impl FirmwareSource for HawkbitSource {
    async fn fetch(&self, spec: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError> {
        self.fetch_for(
            spec,
            &Asking {
                device: "",
                current: "",
            },
        )
        .await
    }

    async fn fetch_for(
        &self,
        spec: &FirmwareSpec,
        asking: &Asking<'_>,
    ) -> Result<Arc<FirmwareImage>, FetchError> {
        let FirmwareSpec::Hawkbit { controller } = spec else {
            return Err(FetchError::NotConfigured("Hawkbit source asked for another kind"));
        };
        if controller.is_empty() || !controller.chars().all(ddi::safe_in_path) {
            return Err(FetchError::Invalid {
                name: controller.clone(),
                reason: "a Hawkbit controller id here is letters, digits and -_.:~ only".into(),
            });
        }
        match self.inner.polled(controller, asking.current).await? {
            Assignment::Nothing { poll_secs } => Err(FetchError::NothingAssigned { poll_secs }),
            Assignment::Action(action) => action.image.clone(),
        }
    }

    fn observe(&self, spec: &FirmwareSpec, observation: &Observation<'_>) {
        let FirmwareSpec::Hawkbit { controller } = spec else {
            return;
        };
        let Some(last) = self.inner.polls.slot(controller).last() else {
            return;
        };
        let Ok(Assignment::Action(action)) = last.value.result else {
            return;
        };
        let Ok(image) = &action.image else { return };
        if observation.target != image.version() {
            return;
        }
        let device = observation.device;
        let (feedback, details) = {
            let mut state = action.feedback.lock().unwrap();
            if state.closing || state.closed {
                return;
            }
            let close = |state: &mut FeedbackState, feedback: Feedback, details: String| {
                if state
                    .close_failed
                    .is_some_and(|at| at.elapsed() < self.inner.config.error_retry)
                {
                    return None;
                }
                state.closing = true;
                Some((feedback, details))
            };
            let due = match observation.state {
                Observed::InSync if observation.current == observation.target => close(
                    &mut state,
                    Feedback::Success,
                    format!("{device} runs {}", image.version()),
                ),
                Observed::InSync => None,
                Observed::Failed { reason } => {
                    close(&mut state, Feedback::Failure, format!("{device}: {reason}"))
                }
                Observed::Updating { percent } => {
                    let cnt = percent.clamp(0.0, 100.0).floor() as u32;
                    let due = match state.progress {
                        None => true,
                        Some((at, last)) => {
                            cnt != last && at.elapsed() >= self.inner.config.feedback_interval
                        }
                    };
                    if due {
                        state.progress = Some((Instant::now(), cnt));
                        Some((
                            Feedback::Proceeding { cnt, of: 100 },
                            format!("{device}: {cnt}% of {} sent", image.version()),
                        ))
                    } else {
                        None
                    }
                }
            };
            match due {
                Some(due) => due,
                None => return,
            }
        };
        let inner = self.inner.clone();
        self.inner.spawn_feedback(async move {
            let _sending = action.sending.lock().await;
            let closing = !matches!(feedback, Feedback::Proceeding { .. });
            if !closing && action.feedback.lock().unwrap().closed {
                return;
            }
            let sent = inner.feedback(&action, feedback, vec![details]).await;
            if closing {
                let mut state = action.feedback.lock().unwrap();
                state.closing = false;
                match sent {
                    Ok(()) => state.closed = true,
                    Err(()) => state.close_failed = Some(Instant::now()),
                }
            }
        });
    }
}

impl Inner {
    /// The controller's assignment: from the last poll while it holds, else from a new one (one
    /// at a time per controller; devices asking meanwhile wait for it).
    async fn polled(self: &Arc<Self>, controller: &str, current: &str) -> Result<Assignment, FetchError> {
        let slot = self.polls.slot(&controller.to_string());
        if let Some(fresh) = fresh(&slot) {
            return fresh;
        }
        let loading = slot.lock_loading().await;
        if let Some(fresh) = fresh(&slot) {
            return fresh;
        }
        // In a task of its own: a device that gives up (its request is dropped) does not cancel
        // a poll or download the next device would have to start again.
        let (this, slot, controller, current) = (
            self.clone(),
            slot.clone(),
            controller.to_string(),
            current.to_string(),
        );
        let poll = tokio::spawn(async move {
            let _loading = loading;
            let previous = slot.last().map(|checked| checked.value);
            let polled = this.poll(&controller, &current, previous).await;
            slot.store(polled.clone());
            polled.result
        });
        poll.await.unwrap_or_else(|e| {
            Err(FetchError::Unavailable(format!(
                "Hawkbit poll did not finish: {e}"
            )))
        })
    }

    /// Poll `controller` and act on what Hawkbit asks.
    async fn poll(&self, controller: &str, current: &str, previous: Option<Polled>) -> Polled {
        let unavailable = |what: String, error: DdiError| Polled {
            result: Err(FetchError::Unavailable(format!("Hawkbit: {what}: {error}"))),
            fresh_for: self.config.error_retry,
            cancelled: previous.as_ref().and_then(|p| p.cancelled.clone()),
        };
        let url = self.ddi.controller_url(controller);
        let reply: ddi::PollReply = match self.ddi.get(controller, &url).await {
            Ok(reply) => {
                self.count("poll", &self.stats.polls, true);
                reply
            }
            Err(error) => {
                self.count("poll", &self.stats.polls, false);
                tracing::warn!(controller, %error, "Hawkbit poll failed; its devices wait");
                return unavailable(format!("polling controller '{controller}'"), error);
            }
        };
        let sleep = reply.sleep().unwrap_or(DEFAULT_SLEEP);
        let fresh_for = self.config.max_poll.map_or(sleep, |max| sleep.min(max));
        let poll_secs = u32::try_from(fresh_for.as_secs()).unwrap_or(u32::MAX).max(1);
        let mut cancelled = previous.as_ref().and_then(|p| p.cancelled.clone());

        if let Some(link) = &reply.links.config_data {
            // Attributes are Hawkbit's record, not a condition of the update: a failure is
            // counted and logged, and the upload is made again at the next poll that asks.
            let body = ddi::config_data_body(current);
            let result = self
                .ddi
                .send_json(controller, reqwest::Method::PUT, &link.href, &body)
                .await;
            self.count("config", &self.stats.config_uploads, result.is_ok());
            if let Err(error) = result {
                tracing::warn!(controller, %error, "uploading attributes to Hawkbit failed");
            }
        }

        if let Some(link) = &reply.links.cancel_action {
            if cancelled.as_deref() != Some(link.href.as_str()) {
                if let Err(error) = self.acknowledge_cancel(controller, &link.href).await {
                    return unavailable(format!("acknowledging a cancel of '{controller}'"), error);
                }
                cancelled = Some(link.href.clone());
            }
            return Polled {
                result: Ok(Assignment::Nothing { poll_secs }),
                fresh_for,
                cancelled,
            };
        }

        let result = if let Some(link) = &reply.links.deployment_base {
            let known = previous.as_ref().and_then(|p| match &p.result {
                Ok(Assignment::Action(action)) if action.href == link.href => Some(action.clone()),
                _ => None,
            });
            match known {
                Some(action) => Ok(Assignment::Action(action)),
                None => match self.action(controller, &link.href).await {
                    Ok(action) => Ok(Assignment::Action(action)),
                    Err(error) => {
                        return Polled {
                            result: Err(error),
                            fresh_for: self.config.error_retry,
                            cancelled,
                        }
                    }
                },
            }
        } else if reply.links.confirmation_base.is_some() {
            Err(FetchError::Unavailable(format!(
                "Hawkbit waits for controller '{controller}' to confirm an action; Ajour does not \
                 confirm for devices: assign it without confirmation, or confirm it in Hawkbit"
            )))
        } else {
            Ok(Assignment::Nothing { poll_secs })
        };
        Polled {
            result,
            fresh_for,
            cancelled,
        }
    }

    /// Fetch the cancel action at `href` and close it as done: Ajour holds no state a device
    /// must undo, and stops serving the action at once.
    async fn acknowledge_cancel(&self, controller: &str, href: &str) -> Result<(), DdiError> {
        let reply: ddi::CancelReply = self.ddi.get(controller, href).await.inspect_err(|_| {
            self.count("cancel", &self.stats.cancels, false);
        })?;
        self.count("cancel", &self.stats.cancels, true);
        let id = ddi::id_text(&reply.id);
        let body = ddi::feedback_body(
            &id,
            Feedback::Success,
            &["cancelled: Ajour stopped serving the update".to_string()],
        );
        let url = format!("{}/feedback", without_query(href));
        let result = self
            .ddi
            .send_json(controller, reqwest::Method::POST, &url, &body)
            .await;
        self.count("feedback", &self.stats.feedbacks, result.is_ok());
        tracing::info!(
            controller,
            action = id,
            ok = result.is_ok(),
            "Hawkbit cancel acknowledged"
        );
        result
    }

    /// Follow a `deploymentBase` link: the action, its image verified, or why it cannot be
    /// served (then it is closed as failed). `Err` only for what may pass (Hawkbit
    /// unreachable): the action is looked at again after the error retry.
    async fn action(&self, controller: &str, href: &str) -> Result<Arc<Action>, FetchError> {
        let reply: ddi::DeploymentReply = match self.ddi.get(controller, href).await {
            Ok(reply) => {
                self.count("deployment", &self.stats.deployments, true);
                reply
            }
            Err(error) => {
                self.count("deployment", &self.stats.deployments, false);
                return Err(FetchError::Unavailable(format!("Hawkbit: {error}")));
            }
        };
        let id = ddi::id_text(&reply.id);
        let name = format!("Hawkbit action {id} of controller '{controller}'");
        let image = match choose_artifact(&reply.deployment) {
            Ok(chosen) => self.artifact(controller, &chosen).await,
            Err(reason) => Err(FetchError::Invalid {
                name: name.clone(),
                reason,
            }),
        };
        let image = match image {
            Err(FetchError::Invalid { reason, .. }) => Err(FetchError::Invalid { name, reason }),
            Err(FetchError::Unavailable(reason)) => return Err(FetchError::Unavailable(reason)),
            other => other,
        };
        let action = Arc::new(Action {
            controller: controller.to_string(),
            id,
            href: href.to_string(),
            feedback_url: format!("{}/feedback", without_query(href)),
            image,
            feedback: Mutex::default(),
            sending: tokio::sync::Mutex::default(),
        });
        match &action.image {
            Ok(image) => tracing::info!(
                controller,
                action = action.id,
                version = image.version(),
                sha256 = image.checksum_hex(),
                "Hawkbit deployment followed"
            ),
            Err(error) => {
                tracing::warn!(controller, action = action.id, %error, "Hawkbit deployment not served");
                // Hawkbit learns why now; should it not take it, the action is looked at again.
                let details = vec![error.to_string()];
                action.feedback.lock().unwrap().closing = true;
                if self.feedback(&action, Feedback::Failure, details).await.is_err() {
                    return Err(FetchError::Unavailable(format!(
                        "Hawkbit did not take the failure of {}",
                        action.id
                    )));
                }
                action.feedback.lock().unwrap().closed = true;
            }
        }
        Ok(action)
    }

    /// The image of the chosen artifact, downloaded once per SHA-256 and version however many
    /// controllers are assigned it, and verified before it is served.
    async fn artifact(&self, controller: &str, chosen: &Chosen) -> Result<Arc<FirmwareImage>, FetchError> {
        let key = (chosen.sha256.to_ascii_lowercase(), chosen.version.clone());
        let slot = self.artifacts.slot(&key);
        if let Some(image) = self.cached_artifact(&slot) {
            return image;
        }
        let _loading = slot.lock_loading().await;
        if let Some(image) = self.cached_artifact(&slot) {
            return image;
        }
        let result = self.download(controller, chosen).await;
        slot.store(result.as_ref().map(Arc::downgrade).map_err(Clone::clone));
        result
    }

    fn cached_artifact(
        &self,
        slot: &Slot<Result<Weak<FirmwareImage>, FetchError>>,
    ) -> Option<Result<Arc<FirmwareImage>, FetchError>> {
        let checked = slot.last()?;
        match checked.value {
            Ok(weak) => weak.upgrade().map(Ok),
            Err(error) if checked.checked_at.elapsed() < self.config.error_retry => Some(Err(error)),
            Err(_) => None,
        }
    }

    async fn download(&self, controller: &str, chosen: &Chosen) -> Result<Arc<FirmwareImage>, FetchError> {
        let invalid = |reason: String| FetchError::Invalid {
            name: chosen.filename.clone(),
            reason,
        };
        if chosen.size > self.config.max_firmware_size {
            return Err(invalid(format!(
                "the artifact has {} bytes, more than the {} accepted (--hawkbit-max-firmware-bytes)",
                chosen.size, self.config.max_firmware_size
            )));
        }
        let data = match self.ddi.download(controller, &chosen.url, chosen.size).await {
            Ok(data) => {
                self.count("download", &self.stats.downloads, true);
                data
            }
            Err(error) => {
                self.count("download", &self.stats.downloads, false);
                return Err(match error {
                    DdiError::TooLong { .. } => invalid(error.to_string()),
                    other => FetchError::Unavailable(format!("Hawkbit: downloading: {other}")),
                });
            }
        };
        let (version, size, sha256) = (chosen.version.clone(), chosen.size, chosen.sha256.clone());
        // Hashing a large image takes milliseconds: off the async workers.
        let image =
            tokio::task::spawn_blocking(move || FirmwareImage::verified(version, data, size, &sha256))
                .await
                .map_err(|e| FetchError::Unavailable(format!("verifying did not finish: {e}")))?
                .map_err(|e| invalid(e.to_string()))?;
        tracing::info!(
            controller,
            file = chosen.filename,
            version = image.version(),
            size = image.size(),
            "Hawkbit artifact downloaded and verified"
        );
        Ok(Arc::new(image))
    }

    /// Send one feedback to `action`; `Err` when Hawkbit did not take it (logged and counted).
    async fn feedback(&self, action: &Action, feedback: Feedback, details: Vec<String>) -> Result<(), ()> {
        let body = ddi::feedback_body(&action.id, feedback, &details);
        let result = self
            .ddi
            .send_json(
                &action.controller,
                reqwest::Method::POST,
                &action.feedback_url,
                &body,
            )
            .await;
        self.count("feedback", &self.stats.feedbacks, result.is_ok());
        match result {
            Ok(()) => {
                tracing::debug!(
                    controller = action.controller,
                    action = action.id,
                    ?feedback,
                    "Hawkbit feedback sent"
                );
                Ok(())
            }
            Err(error) => {
                tracing::warn!(controller = action.controller, action = action.id, ?feedback, %error, "Hawkbit feedback failed");
                Err(())
            }
        }
    }

    fn spawn_feedback(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.in_flight.send_modify(|n| *n += 1);
        let in_flight = self.in_flight.clone();
        tokio::spawn(async move {
            task.await;
            in_flight.send_modify(|n| *n -= 1);
        });
    }

    /// Count one request to Hawkbit: in `counter` (and `errors` when it failed) and in
    /// `ajour_hawkbit_requests_total{request, result}`.
    fn count(&self, request: &'static str, counter: &AtomicU64, ok: bool) {
        counter.fetch_add(1, Ordering::SeqCst);
        if !ok {
            self.stats.errors.fetch_add(1, Ordering::SeqCst);
        }
        let result = if ok { "ok" } else { "error" };
        metrics::counter!("ajour_hawkbit_requests_total", "request" => request, "result" => result)
            .increment(1);
    }
}

/// The last poll of a controller while it holds.
fn fresh(slot: &Slot<Polled>) -> Option<Result<Assignment, FetchError>> {
    slot.fresh(|checked| checked.checked_at.elapsed() < checked.value.fresh_for)
        .map(|polled| polled.result)
}

fn without_query(href: &str) -> &str {
    href.split(['?', '#']).next().unwrap_or(href)
}

/// The artifact Ajour serves from a deployment, and what it says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub filename: String,
    pub url: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
}

/// Software module metadata naming the artifact to serve when a module has several.
pub const ARTIFACT_METADATA_KEY: &str = "ajour.artifact";

/// Choose the one artifact to serve from a deployment. The rule:
///
/// 1. The software modules considered are those whose `part` is `firmware` if there are any,
///    else all of them.
/// 2. A module with the metadata `ajour.artifact` offers only the artifact of that file name.
/// 3. Of the artifacts offered, the only one; else the only one whose name ends in `.bin`; else
///    the deployment is refused (failed, naming the candidates): Ajour does not guess.
///
/// The version is the chosen module's `version` (DDI's deployment names no distribution set
/// version); the SHA-256 is the artifact's `hashes.sha256` (required), the size its `size`
/// (required); the link `download` (HTTPS) is preferred to `download-http`.
pub fn choose_artifact(deployment: &ddi::Deployment) -> Result<Chosen, String> {
    let firmware: Vec<&ddi::Chunk> = deployment
        .chunks
        .iter()
        .filter(|chunk| chunk.part.eq_ignore_ascii_case("firmware"))
        .collect();
    let modules = if firmware.is_empty() {
        deployment.chunks.iter().collect()
    } else {
        firmware
    };
    let mut offered: Vec<(&ddi::Chunk, &ddi::Artifact)> = Vec::new();
    for chunk in modules {
        let named = chunk
            .metadata
            .iter()
            .find(|m| m.key == ARTIFACT_METADATA_KEY)
            .map(|m| m.value.as_str());
        for artifact in &chunk.artifacts {
            if !matches!(named, Some(name) if name != artifact.filename) {
                offered.push((chunk, artifact));
            }
        }
    }
    let chosen = match offered.as_slice() {
        [] => return Err("the deployment has no artifact to serve".into()),
        [one] => *one,
        several => {
            let bins: Vec<_> = several
                .iter()
                .filter(|(_, artifact)| artifact.filename.ends_with(".bin"))
                .collect();
            match bins.as_slice() {
                [one] => **one,
                _ => {
                    let names: Vec<&str> = several.iter().map(|(_, a)| a.filename.as_str()).collect();
                    return Err(format!(
                        "the deployment offers {} artifacts ({}) and not exactly one ends in .bin: \
                         name the one to serve with the software module metadata '{ARTIFACT_METADATA_KEY}'",
                        names.len(),
                        names.join(", ")
                    ));
                }
            }
        }
    };
    let (chunk, artifact) = chosen;
    let what = || format!("artifact '{}' of module '{}'", artifact.filename, chunk.name);
    if chunk.version.trim().is_empty() {
        return Err(format!("{} has no version", what()));
    }
    let sha256 = artifact
        .hashes
        .sha256
        .clone()
        .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| format!("{} has no SHA-256", what()))?;
    let size = artifact.size.ok_or_else(|| format!("{} has no size", what()))?;
    let url = artifact
        .links
        .download
        .as_ref()
        .or(artifact.links.download_http.as_ref())
        .map(|link| link.href.clone())
        .ok_or_else(|| format!("{} has no download link", what()))?;
    Ok(Chosen {
        filename: artifact.filename.clone(),
        url,
        version: chunk.version.clone(),
        sha256,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(chunks: serde_json::Value) -> ddi::Deployment {
        serde_json::from_value(json!({"chunks": chunks})).unwrap()
    }

    fn artifact(name: &str) -> serde_json::Value {
        json!({"filename": name, "size": 3, "hashes": {"sha256": "a".repeat(64)},
               "_links": {"download-http": {"href": format!("http://h/{name}")}}})
    }

    #[test]
    fn the_artifact_rule() {
        // One artifact: it, with its module's version.
        let one = deployment(
            json!([{"part": "os", "version": "1.2", "name": "m", "artifacts": [artifact("a.img")]}]),
        );
        let chosen = choose_artifact(&one).unwrap();
        assert_eq!(
            (chosen.filename.as_str(), chosen.version.as_str()),
            ("a.img", "1.2")
        );
        assert_eq!(chosen.url, "http://h/a.img");
        // A `firmware` module wins over the others.
        let parts = deployment(json!([
            {"part": "app", "version": "9", "name": "a", "artifacts": [artifact("app.bin")]},
            {"part": "firmware", "version": "2", "name": "f", "artifacts": [artifact("fw.img")]},
        ]));
        assert_eq!(choose_artifact(&parts).unwrap().filename, "fw.img");
        // Several: the one `.bin`.
        let several = deployment(json!([{"part": "firmware", "version": "2", "name": "f",
            "artifacts": [artifact("notes.txt"), artifact("fw.bin"), artifact("fw.sig")]}]));
        assert_eq!(choose_artifact(&several).unwrap().filename, "fw.bin");
        // Several `.bin`: refused, unless the module's metadata names one.
        let ambiguous = deployment(json!([{"part": "firmware", "version": "2", "name": "f",
            "artifacts": [artifact("a.bin"), artifact("b.bin")]}]));
        let error = choose_artifact(&ambiguous).unwrap_err();
        assert!(error.contains("a.bin, b.bin"), "{error}");
        let named = deployment(json!([{"part": "firmware", "version": "2", "name": "f",
            "metadata": [{"key": "ajour.artifact", "value": "b.bin"}],
            "artifacts": [artifact("a.bin"), artifact("b.bin")]}]));
        assert_eq!(choose_artifact(&named).unwrap().filename, "b.bin");
        // No artifact, no SHA-256, no version: refused.
        assert!(choose_artifact(&deployment(json!([]))).is_err());
        let mut no_hash = artifact("x.bin");
        no_hash["hashes"] = json!({"md5": "0"});
        assert!(choose_artifact(&deployment(
            json!([{"part": "firmware", "version": "1", "name": "f", "artifacts": [no_hash]}])
        ))
        .is_err());
        assert!(choose_artifact(&deployment(
            json!([{"part": "firmware", "version": "", "name": "f", "artifacts": [artifact("x.bin")]}])
        ))
        .is_err());
    }
}
