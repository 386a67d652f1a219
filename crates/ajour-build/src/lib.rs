//! Firmware builds: a build runner turns a build spec (`spec.firmware.container.build`) into a
//! firmware image published to the registry devices are served from. Each runner sits behind
//! [`BuildRunner`]: [`local`] clones the source and runs the spec's command on this machine,
//! [`tekton`] creates a Tekton `PipelineRun` of the shipped pipeline and follows it. The
//! coordinator ([`Builds`]) records each build in the database (`ajour_registry::BuildStore`),
//! runs it in the background with bounded concurrency, one at a time per target, streams its log
//! into the store and closes builds an instance left behind.

use ajour_types::build::{BuildId, BuildPlan, BuildTarget};
use async_trait::async_trait;
use tokio::sync::mpsc;

mod coordinator;
pub mod local;
pub mod tekton;

pub use coordinator::{Builds, BuildsConfig, RolloutStarter, TriggerError};

/// Where a build's firmware is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Publish {
    /// To the container spec's image, the tag the devices are served from: they get the build at
    /// once (within `--oci-recheck-ms` under `imagePullPolicy: Always`).
    #[default]
    SpecImage,
    /// To the spec image's repository, tagged with the version, leaving the served tag alone: a
    /// staged rollout then takes it to the devices.
    VersionTag,
}

/// One build for a runner to run.
#[derive(Debug, Clone)]
pub struct BuildJob {
    pub id: BuildId,
    pub target: BuildTarget,
    pub plan: BuildPlan,
    pub publish: Publish,
}

impl BuildJob {
    /// The image reference firmware versioned `version` is pushed to.
    pub fn image_for(&self, version: &str) -> Result<String, String> {
        match self.publish {
            Publish::SpecImage => Ok(self.plan.image.clone()),
            Publish::VersionTag => ajour_types::build::image_with_tag(&self.plan.image, version),
        }
    }
}

/// What a successful build published.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// The image reference the firmware was pushed to.
    pub image: String,
    /// The pushed manifest's digest (`sha256:…`), when the runner knows it.
    pub digest: Option<String>,
    pub version: String,
}

/// Why a build failed, in one line (the log has the details).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BuildFailure(pub String);

impl BuildFailure {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// What a runner reports while a build runs; the coordinator writes it to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// Text for the build's log (whole lines, each ending in `\n`).
    Log(String),
    /// The runner's name for the build (a PipelineRun's name), once known.
    Reference(String),
}

/// Where a runner reports a build's log and reference. Sending never blocks the build: the
/// channel is unbounded, and the coordinator drains it into the store in batches.
#[derive(Debug, Clone)]
pub struct BuildReporter {
    events: mpsc::UnboundedSender<BuildEvent>,
}

impl BuildReporter {
    pub fn new(events: mpsc::UnboundedSender<BuildEvent>) -> Self {
        Self { events }
    }

    /// One line of log (a newline is added).
    pub fn line(&self, text: impl AsRef<str>) {
        let mut text = text.as_ref().to_string();
        text.push('\n');
        let _ = self.events.send(BuildEvent::Log(text));
    }

    pub fn reference(&self, reference: impl Into<String>) {
        let _ = self.events.send(BuildEvent::Reference(reference.into()));
    }
}

/// A way of running builds. The backend is chosen in one place (`ajour serve`'s wiring).
#[async_trait]
pub trait BuildRunner: Send + Sync + 'static {
    /// The runner's name, recorded with each build: `local` or `tekton`.
    fn name(&self) -> &'static str;

    /// Whether this runner can build `plan` and publish it as `publish` says, checked when a
    /// build is triggered so the caller hears at once (the local runner needs a `command`).
    fn check(&self, _plan: &BuildPlan, _publish: Publish) -> Result<(), String> {
        Ok(())
    }

    /// Run the build to its end, within the spec's timeout (the runner enforces it and cleans up
    /// after it), reporting its log through `reporter`.
    async fn run(&self, job: &BuildJob, reporter: &BuildReporter) -> Result<Published, BuildFailure>;
}
