//! [`Builds`]: triggering a build (the target's spec read and checked, the build recorded, one
//! open build per target), running it in the background on the configured runner with at most
//! `concurrency` at once, its log written to the store as it comes, and its outcome recorded.
//!
//! A build's record is leased: the instance running it renews the lease, and any instance closes
//! open builds whose lease ran out (their instance crashed or was killed), so no build stays
//! "running" for ever. On an orderly stop ([`Builds::shutdown`]) the builds under way are
//! stopped and recorded as failed at once.

use crate::{BuildEvent, BuildJob, BuildReporter, BuildRunner, Publish};
use ajour_registry::{BuildStore, Key, LabelSelector, NewBuild, Registry, RegistryError};
use ajour_types::build::{
    append_log, Build, BuildLog, BuildOutcome, BuildPlan, BuildSpecError, BuildTarget, LOG_LIMIT,
};
use ajour_types::rollout::RolloutSpec;
use ajour_types::AppName;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How builds run on this instance.
#[derive(Debug, Clone)]
pub struct BuildsConfig {
    /// Builds run at once; more wait, queued.
    pub concurrency: usize,
    /// How long an open build's record lasts without its instance renewing it before any
    /// instance closes it as failed.
    pub lease: Duration,
    /// The applications whose firmware may be built; empty: every application.
    pub allowed_apps: Vec<String>,
}

impl Default for BuildsConfig {
    fn default() -> Self {
        Self {
            concurrency: 2,
            lease: Duration::from_secs(60),
            allowed_apps: Vec::new(),
        }
    }
}

/// Why a build was not triggered.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("{0} not found")]
    NotFound(String),
    /// The application is not on the server's allow-list of buildable applications.
    #[error("builds of application {0} are not allowed on this server (--build-application)")]
    NotAllowed(String),
    /// The firmware is not a container image: nothing to build.
    #[error("{0}")]
    NotBuildable(String),
    /// The spec, or this runner's needs, are not met; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// The target has a build queued or running.
    #[error("{0}")]
    Running(String),
    #[error(transparent)]
    Store(RegistryError),
}

/// Starts a staged rollout of an application to new firmware (the update service's, given by the
/// binary's wiring): the rollout's id, or why it was refused.
pub type RolloutStarter = Arc<
    dyn Fn(AppName, RolloutSpec) -> Pin<Box<dyn Future<Output = Result<i64, String>> + Send>> + Send + Sync,
>;

/// Messages recorded when a build is stopped by its server.
const STOPPED: &str = "the server stopped during the build";
const ABANDONED: &str =
    "abandoned: the instance running this build stopped renewing it (it crashed or was killed)";

pub struct Builds {
    store: Arc<dyn BuildStore>,
    registry: Arc<dyn Registry>,
    runner: Arc<dyn BuildRunner>,
    config: BuildsConfig,
    slots: Arc<Semaphore>,
    /// The builds this instance has open (queued or running): their leases are renewed.
    open: Arc<Mutex<HashSet<i64>>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    rollouts: Option<RolloutStarter>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Builds {
    pub fn new(
        store: Arc<dyn BuildStore>,
        registry: Arc<dyn Registry>,
        runner: Arc<dyn BuildRunner>,
        config: BuildsConfig,
    ) -> Self {
        Self {
            store,
            registry,
            runner,
            slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
            config,
            open: Arc::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            rollouts: None,
        }
    }

    /// Let a trigger ask for a staged rollout of what it builds ([`Builds::trigger`]).
    pub fn with_rollouts(mut self, starter: RolloutStarter) -> Self {
        self.rollouts = Some(starter);
        self
    }

    pub fn store(&self) -> &Arc<dyn BuildStore> {
        &self.store
    }

    /// The runner's name (`local`, `tekton`).
    pub fn runner_name(&self) -> &'static str {
        self.runner.name()
    }

    /// Whether `app`'s firmware may be built here.
    pub fn allows(&self, app: &str) -> bool {
        self.config.allowed_apps.is_empty() || self.config.allowed_apps.iter().any(|a| a == app)
    }

    /// What `target` would build: its firmware spec read from the registry and checked.
    pub async fn plan(&self, target: &BuildTarget) -> Result<BuildPlan, TriggerError> {
        let key = match &target.device {
            None => Key::App(target.app.clone()),
            Some(device) => Key::Device(target.app.clone(), device.clone()),
        };
        let resource = self
            .registry
            .get(&key)
            .await
            .map_err(TriggerError::Store)?
            .ok_or_else(|| TriggerError::NotFound(target.to_string()))?;
        BuildPlan::from_firmware(target, resource.spec.get("firmware")).map_err(|e| match e {
            BuildSpecError::NotContainer(..) | BuildSpecError::NoFirmware(_) | BuildSpecError::NoBuild(_) => {
                TriggerError::NotBuildable(e.to_string())
            }
            BuildSpecError::Invalid(..) => TriggerError::Invalid(e.to_string()),
        })
    }

    /// Record a build of `target` and start it in the background; the build as recorded. With
    /// `rollout` (its `firmware` is filled in), the build is published under its version's tag
    /// instead of the application's, and when it succeeds a rollout of the application to that
    /// image starts (its build section kept, so the next build works the same way).
    pub async fn trigger(
        &self,
        target: BuildTarget,
        rollout: Option<RolloutSpec>,
    ) -> Result<Build, TriggerError> {
        if !self.allows(target.app.as_str()) {
            return Err(TriggerError::NotAllowed(target.app.to_string()));
        }
        if self.stop.is_cancelled() {
            return Err(TriggerError::Invalid("the server is stopping".into()));
        }
        let plan = self.plan(&target).await?;
        let publish = match &rollout {
            None => Publish::SpecImage,
            Some(rollout) => {
                if self.rollouts.is_none() {
                    return Err(TriggerError::Invalid("this server cannot start rollouts".into()));
                }
                if target.device.is_some() {
                    return Err(TriggerError::Invalid(
                        "a rollout is of an application's devices: trigger the application's build for one"
                            .into(),
                    ));
                }
                rollout
                    .validate(|selector| {
                        LabelSelector::parse(selector)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                    .map_err(|e| TriggerError::Invalid(format!("rollout: {e}")))?;
                Publish::VersionTag
            }
        };
        self.runner
            .check(&plan, publish)
            .map_err(|e| TriggerError::Invalid(format!("{target}: {e}")))?;
        let build = self
            .store
            .create_build(NewBuild {
                target: &target,
                runner: self.runner.name(),
                spec: &plan.snapshot,
                now: now_ms(),
            })
            .await
            .map_err(|e| match e {
                RegistryError::AlreadyExists(what) => TriggerError::Running(format!(
                    "{what}: wait for it to end (ajour build logs --follow) before triggering another"
                )),
                other => TriggerError::Store(other),
            })?;
        {
            let mut open = self.open.lock().unwrap();
            open.insert(build.id);
            metrics::gauge!("ajour_builds_open").set(open.len() as f64);
        }
        metrics::counter!("ajour_builds_triggered_total").increment(1);
        let job = BuildJob {
            id: build.id,
            target,
            plan,
            publish,
        };
        let task = BuildTask {
            rollout: rollout.zip(self.rollouts.clone()),
            store: self.store.clone(),
            runner: self.runner.clone(),
            slots: self.slots.clone(),
            open: self.open.clone(),
            stop: self.stop.clone(),
        };
        self.tasks.spawn(task.run(job));
        Ok(build)
    }

    /// Renew the leases of this instance's open builds and close other instances' abandoned
    /// ones, every quarter lease, until `shutdown`; the first round at once (after a crash,
    /// the builds the crashed process left open close as soon as their lease runs out).
    pub async fn run_maintenance(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.config.lease / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            let ids: Vec<i64> = self.open.lock().unwrap().iter().copied().collect();
            let now = now_ms();
            if !ids.is_empty() {
                if let Err(e) = self.store.renew_builds(&ids, now).await {
                    tracing::warn!(error = %e, "renewing the leases of running builds");
                }
            }
            let stale_before = now - i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
            match self.store.close_stale_builds(stale_before, ABANDONED, now).await {
                Ok(closed) if !closed.is_empty() => {
                    tracing::warn!(builds = ?closed, "closed builds abandoned by a stopped instance");
                    metrics::counter!("ajour_builds_finished_total", "outcome" => "abandoned")
                        .increment(closed.len() as u64);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "closing abandoned builds"),
            }
        }
    }

    /// Stop the builds under way, recording them as failed, and wait for their records.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// What one build's background task needs.
struct BuildTask {
    /// The rollout to start when it succeeds, and who starts it.
    rollout: Option<(RolloutSpec, RolloutStarter)>,
    store: Arc<dyn BuildStore>,
    runner: Arc<dyn BuildRunner>,
    slots: Arc<Semaphore>,
    open: Arc<Mutex<HashSet<i64>>>,
    stop: CancellationToken,
}

impl BuildTask {
    async fn run(self, job: BuildJob) {
        let id = job.id;
        let span = tracing::info_span!("build", id, target = %job.target);
        let outcome = tracing::Instrument::instrument(self.run_to_end(&job), span).await;
        let label = match &outcome {
            BuildOutcome::Succeeded { .. } => "succeeded",
            BuildOutcome::Failed { .. } => "failed",
        };
        metrics::counter!("ajour_builds_finished_total", "outcome" => label).increment(1);
        if let Err(e) = self.store.finish_build(id, &outcome, now_ms()).await {
            // The lease runs out and another round of maintenance closes it as abandoned.
            tracing::error!(build = id, error = %e, "recording the build's outcome");
        }
        let mut open = self.open.lock().unwrap();
        open.remove(&id);
        metrics::gauge!("ajour_builds_open").set(open.len() as f64);
    }

    async fn run_to_end(&self, job: &BuildJob) -> BuildOutcome {
        let failed = |message: String| BuildOutcome::Failed { message };
        let _slot = tokio::select! {
            slot = self.slots.acquire() => match slot {
                Ok(slot) => slot,
                Err(_) => return failed(STOPPED.into()),
            },
            _ = self.stop.cancelled() => return failed("the server stopped before the build started".into()),
        };
        let started = now_ms();
        if let Err(e) = self.store.start_build(job.id, None, started).await {
            return failed(format!("recording the build's start: {e}"));
        }
        tracing::info!("build started");
        let (events, received) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_events(self.store.clone(), job.id, started, received));
        let reporter = BuildReporter::new(events);
        let result = tokio::select! {
            result = self.runner.run(job, &reporter) => result,
            _ = self.stop.cancelled() => Err(crate::BuildFailure(STOPPED.into())),
        };
        let outcome = match result {
            Ok(published) => {
                reporter.line(format!(
                    "published version {} as {}",
                    published.version, published.image
                ));
                tracing::info!(version = %published.version, image = %published.image, "build succeeded");
                if let Some((spec, starter)) = &self.rollout {
                    self.start_rollout(job, &published.version, spec.clone(), starter, &reporter)
                        .await;
                }
                BuildOutcome::Succeeded {
                    image: published.image,
                    digest: published.digest,
                    version: published.version,
                }
            }
            Err(failure) => {
                reporter.line(format!("build failed: {failure}"));
                tracing::warn!(reason = %failure, "build failed");
                failed(failure.0)
            }
        };
        // The log is complete before the outcome is: whoever sees a build ended has its log.
        drop(reporter);
        let _ = writer.await;
        outcome
    }
}

impl BuildTask {
    /// Start the rollout asked for of `version`: the application's firmware section with the image
    /// tagged `version` (its build section and pull policy kept). A refusal (the application got an open
    /// rollout meanwhile, say) is logged with the build, which still succeeded.
    async fn start_rollout(
        &self,
        job: &BuildJob,
        version: &str,
        mut spec: RolloutSpec,
        starter: &RolloutStarter,
        reporter: &BuildReporter,
    ) {
        let mut firmware = job.plan.snapshot.clone();
        let Ok(image) = job.image_for(version) else {
            reporter.line(format!(
                "the rollout was not started: version {version} is no image tag"
            ));
            return;
        };
        let key = if firmware.get("container").is_some() {
            "container"
        } else {
            "oci"
        };
        if let Some(container) = firmware.get_mut(key) {
            // As the application's spec names it (relative to the registry prefix), tagged.
            container["image"] = serde_json::Value::String(image);
        }
        spec.firmware = firmware;
        match starter(job.target.app.clone(), spec).await {
            Ok(id) => {
                reporter.line(format!("started rollout {id} of application {}", job.target.app));
                metrics::counter!("ajour_builds_rollouts_started_total").increment(1);
            }
            Err(e) => {
                reporter.line(format!("the rollout was not started: {e}"));
                tracing::warn!(error = %e, "starting the rollout of a build");
            }
        }
    }
}

/// Write what the runner reports to the store, in batches: whatever arrived while the last
/// write went on goes in the next one. A runner printing faster than the store writes keeps only
/// the newest [`LOG_LIMIT`] bytes of each batch, as the store would.
async fn write_events(
    store: Arc<dyn BuildStore>,
    id: i64,
    started: i64,
    mut events: mpsc::UnboundedReceiver<BuildEvent>,
) {
    while let Some(first) = events.recv().await {
        let mut batch = BuildLog {
            start: 0,
            text: String::new(),
        };
        let mut next = Some(first);
        while let Some(event) = next.take().or_else(|| events.try_recv().ok()) {
            match event {
                BuildEvent::Log(text) => batch = append_log(batch, &text),
                BuildEvent::Reference(reference) => {
                    if let Err(e) = store.start_build(id, Some(&reference), started).await {
                        tracing::warn!(build = id, error = %e, "recording the build's reference");
                    }
                }
            }
        }
        if batch.start > 0 {
            let skipped = format!("[… {} bytes of log dropped …]\n", batch.start);
            batch.text.insert_str(0, &skipped);
            debug_assert!(batch.text.len() <= LOG_LIMIT + skipped.len());
        }
        if !batch.text.is_empty() {
            if let Err(e) = store.append_build_log(id, &batch.text).await {
                tracing::warn!(build = id, error = %e, "writing the build's log");
            }
        }
    }
}
