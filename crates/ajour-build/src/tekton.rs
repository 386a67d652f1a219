//! The Tekton runner: each build is a `tekton.dev/v1` `PipelineRun` of the shipped pipeline
//! (`deploy/tekton`, `oci-firmware` by default), created in one namespace and followed until its
//! `Succeeded` condition is `True` or `False`.
//!
//! The PipelineRun is the contract with the pipeline: its params (`GIT_REPO`, `GIT_REVISION`,
//! `PROJECT_PATH`, `BUILDER_IMAGE`, `BUILD_ARGS`, `BUILD_ENV`, `ARTIFACT_PATH`, `IMAGE`,
//! `VERSION`), one `source` workspace from a volume claim template, and the pipeline's results
//! (`IMAGE_URL`, `IMAGE_DIGEST`, `VERSION`) that say what was published. [`pipeline_run`] builds
//! it; nothing else here knows its shape.
//!
//! The runner polls the PipelineRun (a GET every [`TektonConfig::poll`]), logs each change of its
//! `Succeeded` condition, and enforces the spec's timeout itself too: Tekton times the pipeline
//! out at `timeouts.pipeline`, and should it not have ended the run a grace later, the runner
//! cancels it (`spec.status: Cancelled`) and fails the build.

use crate::{BuildFailure, BuildJob, BuildReporter, BuildRunner, Publish, Published};
use ajour_types::build::{BuildId, BuildPlan, BuildTarget};
use async_trait::async_trait;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{json, Map, Value};
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// The API group, version, kind and plural of a PipelineRun.
pub const API_GROUP: &str = "tekton.dev";
pub const API_VERSION: &str = "v1";
pub const KIND: &str = "PipelineRun";
pub const PLURAL: &str = "pipelineruns";

/// Consecutive failed reads of a PipelineRun (other than 404) before its build fails.
const MAX_READ_ERRORS: u32 = 5;

/// The longest a Kubernetes object name that Tekton also uses as a label value may be.
const MAX_NAME: usize = 63;

/// Where and how the Tekton runner runs builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TektonConfig {
    /// The namespace PipelineRuns are created in; empty: the client's default namespace (the
    /// server's own namespace in a cluster, the kubeconfig context's outside one).
    pub namespace: String,
    /// The Pipeline each build runs.
    pub pipeline: String,
    /// The service account the PipelineRun's tasks run as.
    pub service_account: String,
    /// How often a running PipelineRun is read.
    pub poll: Duration,
    /// The size of the volume each build's `source` workspace gets.
    pub workspace_size: String,
    /// How long past the spec's timeout a PipelineRun may still run before the runner cancels
    /// it (Tekton itself times it out at the spec's timeout).
    pub grace: Duration,
    /// The prefix specs' image names are relative to (the server's `--oci-registry`): the
    /// pipeline is given full references.
    pub registry_prefix: String,
    /// A Secret holding a docker `config.json` (type `kubernetes.io/dockerconfigjson`), bound
    /// as the pipeline's `registry-credentials` workspace for the push; `None`: none bound.
    pub registry_secret: Option<String>,
}

impl Default for TektonConfig {
    fn default() -> Self {
        Self {
            namespace: String::new(),
            pipeline: "oci-firmware".into(),
            service_account: "pipeline".into(),
            poll: Duration::from_secs(5),
            workspace_size: "1Gi".into(),
            grace: Duration::from_secs(120),
            registry_prefix: String::new(),
            registry_secret: None,
        }
    }
}

/// kube's client speaks TLS through rustls with the process's default provider: ring, as the
/// rest of Ajour (where a build links aws-lc-rs too, as the workspace's tests do, none would be
/// the default and the client would panic). A process that installed one already keeps its own.
fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs builds as Tekton PipelineRuns.
pub struct TektonRunner {
    client: kube::Client,
    config: TektonConfig,
    resource: ApiResource,
}

impl fmt::Debug for TektonRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TektonRunner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TektonRunner {
    /// A runner speaking to the API server `client` talks to. An empty `config.namespace`
    /// becomes the client's default namespace.
    pub fn new(client: kube::Client, mut config: TektonConfig) -> Self {
        install_ring();
        if config.namespace.is_empty() {
            config.namespace = client.default_namespace().to_string();
        }
        let gvk = GroupVersionKind::gvk(API_GROUP, API_VERSION, KIND);
        Self {
            client,
            config,
            resource: ApiResource::from_gvk_with_plural(&gvk, PLURAL),
        }
    }

    /// A runner for the cluster this process runs in, or the current kubeconfig context's.
    pub async fn connect(config: TektonConfig) -> Result<Self, String> {
        install_ring();
        let client = kube::Client::try_default().await.map_err(|e| {
            format!("no Kubernetes API to run Tekton builds in (neither in a cluster nor a kubeconfig): {e}")
        })?;
        Ok(Self::new(client, config))
    }

    pub fn config(&self) -> &TektonConfig {
        &self.config
    }

    fn api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.config.namespace, &self.resource)
    }

    /// Follow PipelineRun `name` until it ends or `deadline` passes.
    async fn follow(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        deadline: Instant,
        timeout: Duration,
        reporter: &BuildReporter,
    ) -> Result<Published, BuildFailure> {
        let mut last: Option<Succeeded> = None;
        let mut errors = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.cancel(api, name, timeout, reporter).await);
            }
            let read = match tokio::time::timeout(remaining, api.get(name)).await {
                Ok(read) => read,
                Err(_) => return Err(self.cancel(api, name, timeout, reporter).await),
            };
            match read {
                Ok(run) => {
                    errors = 0;
                    if let Some(condition) = Succeeded::of(&run.data) {
                        if last.as_ref() != Some(&condition) {
                            reporter.line(format!("PipelineRun {name} {condition}"));
                        }
                        match condition.status.as_str() {
                            "True" => {
                                let published = published(name, &run.data)?;
                                reporter.line(format!(
                                    "published {}{}, version {}",
                                    published.image,
                                    published
                                        .digest
                                        .as_deref()
                                        .map(|d| format!(" ({d})"))
                                        .unwrap_or_default(),
                                    published.version
                                ));
                                return Ok(published);
                            }
                            "False" => return Err(condition.failure(name)),
                            _ => {}
                        }
                        last = Some(condition);
                    }
                }
                Err(kube::Error::Api(status)) if is_not_found(&status) => {
                    return Err(BuildFailure::new(format!(
                        "PipelineRun {name} was deleted while the build ran (404 Not Found in namespace {})",
                        self.config.namespace
                    )));
                }
                Err(e) => {
                    errors += 1;
                    let error = describe(&e);
                    if errors >= MAX_READ_ERRORS {
                        return Err(BuildFailure::new(format!(
                            "could not read PipelineRun {name} ({errors} attempts): {error}"
                        )));
                    }
                    reporter.line(format!(
                        "reading PipelineRun {name} failed ({errors} of {MAX_READ_ERRORS} attempts): {error}"
                    ));
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(self.config.poll.min(remaining)).await;
        }
    }

    /// Cancel PipelineRun `name`, which outran its timeout: the failure to report.
    async fn cancel(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        timeout: Duration,
        reporter: &BuildReporter,
    ) -> BuildFailure {
        let after = format!(
            "timed out after {} (plus {} grace)",
            go_duration(timeout),
            go_duration(self.config.grace)
        );
        let patch = json!({"spec": {"status": "Cancelled"}});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                reporter.line(format!("{after}: cancelled PipelineRun {name}"));
                BuildFailure::new(format!("{after}: PipelineRun {name} cancelled"))
            }
            Err(e) => {
                let error = describe(&e);
                reporter.line(format!("{after}: cancelling PipelineRun {name} failed: {error}"));
                BuildFailure::new(format!("{after}: cancelling PipelineRun {name} failed: {error}"))
            }
        }
    }
}

#[async_trait]
impl BuildRunner for TektonRunner {
    fn name(&self) -> &'static str {
        "tekton"
    }

    fn check(&self, plan: &BuildPlan, publish: Publish) -> Result<(), String> {
        builder_image(plan)?;
        if publish == Publish::VersionTag && plan.build.version.as_deref().unwrap_or("").is_empty() {
            // The pipeline is given the image to push to when it is created, before the commit
            // it will build is known.
            return Err("publishing under the version's tag (for a rollout) with the Tekton runner needs build.version".into());
        }
        Ok(())
    }

    async fn run(&self, job: &BuildJob, reporter: &BuildReporter) -> Result<Published, BuildFailure> {
        let started = Instant::now();
        let timeout = job.plan.build.timeout().map_err(BuildFailure::new)?;
        let body = pipeline_run(job, &self.config).map_err(BuildFailure::new)?;
        let name = pipeline_run_name(&job.target, job.id);
        let namespace = &self.config.namespace;
        let run: DynamicObject = serde_json::from_value(body)
            .map_err(|e| BuildFailure::new(format!("PipelineRun {name}: {e}")))?;
        let api = self.api();
        match api.create(&PostParams::default(), &run).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 || status.reason == "AlreadyExists" => {
                return Err(BuildFailure::new(format!(
                    "a PipelineRun named {name} already exists in namespace {namespace}: build {} was not started over it (another Ajour instance, or a database that was reset?)",
                    job.id
                )));
            }
            Err(kube::Error::Api(status)) if is_not_found(&status) => {
                return Err(BuildFailure::new(format!(
                    "could not create PipelineRun {name} in namespace {namespace}: {} (is Tekton installed, with the tekton.dev/v1 API, and does the namespace exist?)",
                    describe_status(&status)
                )));
            }
            Err(e) => {
                return Err(BuildFailure::new(format!(
                    "could not create PipelineRun {name} in namespace {namespace}: {}",
                    describe(&e)
                )));
            }
        }
        reporter.reference(name.clone());
        reporter.line(format!("created PipelineRun {name} in namespace {namespace}"));
        self.follow(
            &api,
            &name,
            started + timeout + self.config.grace,
            timeout,
            reporter,
        )
        .await
    }
}

/// The builder image the Tekton runner needs (`build.image`).
fn builder_image(plan: &BuildPlan) -> Result<&str, String> {
    plan.build
        .image
        .as_deref()
        .filter(|image| !image.trim().is_empty())
        .ok_or_else(|| "the Tekton runner needs build.image, the builder image".to_string())
}

/// The name of build `id`'s PipelineRun: `{target.pipeline_name()}-{id}`, made a valid
/// Kubernetes name that Tekton can also use as a label value (at most 63 of `a-z 0-9 -`, starting
/// and ending alphanumeric): other characters of a device name become `-`, upper case becomes
/// lower case, and the target part is cut short to fit.
pub fn pipeline_run_name(target: &BuildTarget, id: BuildId) -> String {
    let suffix = format!("-{id}");
    let mut prefix: String = target
        .pipeline_name()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    prefix.truncate(MAX_NAME.saturating_sub(suffix.len()));
    let prefix = prefix.trim_end_matches('-');
    let suffix = if prefix.is_empty() { &suffix[1..] } else { &suffix };
    format!("{prefix}{suffix}")
}

/// Whether `value` may be a Kubernetes label value (empty values, allowed there, are not used).
fn label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=MAX_NAME).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// The PipelineRun that runs `job` (the whole object, as created).
pub fn pipeline_run(job: &BuildJob, config: &TektonConfig) -> Result<Value, String> {
    let spec = &job.plan.build;
    let builder = builder_image(&job.plan)?;
    let timeout = spec.timeout()?;
    let project = spec.project_path()?;
    let artifact = spec.artifact_path()?;
    let git = spec.git();
    let name = pipeline_run_name(&job.target, job.id);
    // The pipeline pushes to a full reference; specs name images under the registry prefix.
    let image = job.image_for(spec.version.as_deref().unwrap_or(""))?;
    let image = ajour_store::oci::ImageRef::parse(&config.registry_prefix, &image)
        .map_err(|e| e.to_string())?
        .to_string();

    let mut labels = Map::new();
    labels.insert("app.kubernetes.io/managed-by".into(), "ajour".into());
    labels.insert("ajour.drogue.io/build".into(), job.id.to_string().into());
    let app = job.target.app.as_str();
    if label_value(app) {
        labels.insert("ajour.drogue.io/application".into(), app.into());
    }
    if let Some(device) = &job.target.device {
        if label_value(device.as_str()) {
            labels.insert("ajour.drogue.io/device".into(), device.as_str().into());
        }
    }

    let env: Vec<String> = spec
        .env
        .iter()
        .map(|env| format!("{}={}", env.name, env.value.joined()))
        .collect();
    let mut workspaces = vec![json!({
        "name": "source",
        "volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": config.workspace_size}},
        }},
    })];
    if let Some(secret) = &config.registry_secret {
        // The publish task logs in to the registry with this docker config.json Secret.
        workspaces.push(json!({"name": "registry-credentials", "secret": {"secretName": secret}}));
    }
    Ok(json!({
        "apiVersion": format!("{API_GROUP}/{API_VERSION}"),
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": config.namespace,
            "labels": labels,
        },
        "spec": {
            "pipelineRef": {"name": config.pipeline},
            "taskRunTemplate": {"serviceAccountName": config.service_account},
            "timeouts": {"pipeline": go_duration(timeout)},
            "params": [
                {"name": "GIT_REPO", "value": git.uri},
                {"name": "GIT_REVISION", "value": git.rev.as_deref().unwrap_or("")},
                {"name": "PROJECT_PATH", "value": if project.is_empty() { "." } else { project.as_str() }},
                {"name": "BUILDER_IMAGE", "value": builder},
                {"name": "BUILD_ARGS", "value": spec.args},
                {"name": "BUILD_ENV", "value": env},
                {"name": "ARTIFACT_PATH", "value": artifact},
                {"name": "IMAGE", "value": image},
                {"name": "VERSION", "value": spec.version.as_deref().unwrap_or("")},
            ],
            "workspaces": workspaces,
        },
    }))
}

/// A duration as Go writes it (`time.Duration.String`): `30m0s`, `1h0m0s`, `1.5s`, `500ms`.
pub fn go_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".into();
    }
    if duration < Duration::from_secs(1) {
        let micros = duration.as_micros();
        let (millis, rest) = (micros / 1000, micros % 1000);
        return if rest == 0 {
            format!("{millis}ms")
        } else {
            format!("{micros}µs")
        };
    }
    let secs = duration.as_secs();
    let nanos = duration.subsec_nanos();
    let (hours, minutes, seconds) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut seconds = seconds.to_string();
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        seconds.push('.');
        seconds.push_str(fraction.trim_end_matches('0'));
    }
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

/// A PipelineRun's `Succeeded` condition, read from any shape of status.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Succeeded {
    status: String,
    reason: String,
    message: String,
}

impl Succeeded {
    fn of(run: &Value) -> Option<Self> {
        let condition = run
            .pointer("/status/conditions")?
            .as_array()?
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some("Succeeded"))?;
        let text = |key: &str| {
            condition
                .get(key)
                .and_then(Value::as_str)
                .map(one_line)
                .unwrap_or_default()
        };
        Some(Self {
            status: text("status"),
            reason: text("reason"),
            message: text("message"),
        })
    }

    fn failure(&self, name: &str) -> BuildFailure {
        let mut text = format!("PipelineRun {name} failed");
        for part in [&self.reason, &self.message] {
            if !part.is_empty() {
                text.push_str(": ");
                text.push_str(part);
            }
        }
        BuildFailure::new(text)
    }
}

impl fmt::Display for Succeeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.status.is_empty() {
            "Unknown"
        } else {
            &self.status
        };
        write!(f, "Succeeded={status}")?;
        if !self.reason.is_empty() {
            write!(f, " ({})", self.reason)?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What a succeeded PipelineRun published, from its results (`status.results`, or v1beta1's
/// `status.pipelineResults`).
fn published(name: &str, run: &Value) -> Result<Published, BuildFailure> {
    let results: Vec<&Value> = ["/status/results", "/status/pipelineResults"]
        .iter()
        .filter_map(|pointer| run.pointer(pointer).and_then(Value::as_array))
        .flatten()
        .collect();
    let result = |key: &str| {
        results
            .iter()
            .find(|r| r.get("name").and_then(Value::as_str) == Some(key))
            .and_then(|r| r.get("value"))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let missing = |key: &str| {
        BuildFailure::new(format!(
            "PipelineRun {name} succeeded but has no {key} result: is its pipeline Ajour's oci-firmware?"
        ))
    };
    Ok(Published {
        image: result("IMAGE_URL").ok_or_else(|| missing("IMAGE_URL"))?,
        digest: result("IMAGE_DIGEST"),
        version: result("VERSION").ok_or_else(|| missing("VERSION"))?,
    })
}

fn is_not_found(status: &kube::core::Status) -> bool {
    status.code == 404 || status.reason == "NotFound"
}

fn describe_status(status: &kube::core::Status) -> String {
    let mut text = match (status.code, status.reason.as_str()) {
        (0, "") => "error".to_string(),
        (0, reason) => reason.to_string(),
        (code, "") => code.to_string(),
        (code, reason) => format!("{code} {reason}"),
    };
    if !status.message.is_empty() {
        text.push_str(": ");
        text.push_str(&one_line(&status.message));
    }
    text
}

/// An API error in one line.
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => describe_status(status),
        other => one_line(&other.to_string()),
    }
}
