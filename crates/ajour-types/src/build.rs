//! Firmware builds: the build section of a container firmware spec
//! (`spec.firmware.container.build`, Drogue's shape) and the record of one build.
//!
//! ```json
//! {"container": {"image": "registry:5000/my-fw:latest", "build": {
//!   "image": "ghcr.io/drogue-iot/firmware-builder:latest",
//!   "source": {"git": {"uri": "https://github.com/me/fw", "project": "app", "rev": "main"}},
//!   "args": ["--release"], "env": [{"name": "FEATURES", "value": ["a", "b"]}],
//!   "artifact": {"path": "target/firmware.bin"}, "timeout": "30m",
//!   "command": ["make", "firmware"]}}}
//! ```
//!
//! `image`, `args` and `env` are what the Tekton pipeline gives the builder image; `command` (an
//! Ajour addition) is what the local runner runs, `args` appended; `version` (also Ajour's) names
//! the firmware version instead of the git revision. Pure: parsing and naming, no I/O.

use crate::{AppName, DeviceName};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// A build's number, unique in one database.
pub type BuildId = i64;

/// The longest a build may run when its spec gives no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The longest `timeout` a spec may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `spec.firmware.container.build`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BuildSpec {
    /// The builder image (Tekton runner); the local runner does not use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub source: BuildSource,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<BuildEnv>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<BuildArtifact>,
    /// How long the build may take: a Go/Kubernetes duration such as `30m`, `1h30m`, `90s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// The local runner's build command (program and arguments), run in `source.git.project`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// The firmware version to publish; without it, the revision built (short commit hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum BuildSource {
    Git(GitSource),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitSource {
    pub uri: String,
    /// The directory in the repository to build in; the repository's root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// A branch, tag or commit; the remote's default branch when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildEnv {
    pub name: String,
    pub value: EnvValue,
}

/// An environment value: a string, or a list (given to a process as its items joined by spaces).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvValue {
    One(String),
    Many(Vec<String>),
}

impl EnvValue {
    pub fn joined(&self) -> String {
        match self {
            EnvValue::One(value) => value.clone(),
            EnvValue::Many(values) => values.join(" "),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildArtifact {
    /// The firmware file the build writes, relative to `project`.
    pub path: String,
}

/// Where the firmware to build and publish is configured: an application, or one device's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BuildTarget {
    pub app: AppName,
    pub device: Option<DeviceName>,
}

impl BuildTarget {
    /// The name the original gave a target's PipelineRun: `app-{app}` or `dev-{app}-{device}`.
    pub fn pipeline_name(&self) -> String {
        match &self.device {
            None => format!("app-{}", self.app),
            Some(device) => format!("dev-{}-{device}", self.app),
        }
    }
}

impl fmt::Display for BuildTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.device {
            None => write!(f, "application {}", self.app),
            Some(device) => write!(f, "device {device}@{}", self.app),
        }
    }
}

/// What is wrong with a firmware spec asked to build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildSpecError {
    /// No `spec.firmware` at all.
    #[error("{0} has no firmware spec")]
    NoFirmware(String),
    /// Firmware that is not a container image (file, Hawkbit) cannot be built.
    #[error("{0}'s firmware is {1}, not a container image: only container firmware can be built")]
    NotContainer(String, String),
    #[error("{0}'s container firmware has no build section")]
    NoBuild(String),
    #[error("{0}: invalid build section: {1}")]
    Invalid(String, String),
}

/// Whether a firmware section (`spec.firmware`) has a build section, buildable or not: what the
/// build lists show. [`BuildPlan::from_firmware`] says whether it can be built.
pub fn has_build_section(firmware: Option<&Value>) -> bool {
    firmware
        .and_then(|f| f.get("container").or_else(|| f.get("oci")))
        .and_then(|container| container.get("build"))
        .is_some_and(|build| !build.is_null())
}

/// A buildable firmware: the image to publish to and how to build it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildPlan {
    /// The image reference the firmware is published to (`spec.firmware.container.image`).
    pub image: String,
    pub build: BuildSpec,
    /// The firmware section the plan came from, kept with the build.
    pub snapshot: Value,
}

impl BuildPlan {
    /// Read `spec.firmware` (`firmware`, the section itself) of `target`.
    pub fn from_firmware(target: &BuildTarget, firmware: Option<&Value>) -> Result<Self, BuildSpecError> {
        let who = target.to_string();
        let firmware = firmware.ok_or_else(|| BuildSpecError::NoFirmware(who.clone()))?;
        let container = firmware
            .get("container")
            .or_else(|| firmware.get("oci"))
            .ok_or_else(|| {
                let kind = ["hawkbit", "file"]
                    .into_iter()
                    .find(|k| firmware.get(k).is_some())
                    .unwrap_or("unknown");
                BuildSpecError::NotContainer(who.clone(), kind.into())
            })?;
        let image = container
            .get("image")
            .and_then(Value::as_str)
            .filter(|image| !image.is_empty())
            .ok_or_else(|| BuildSpecError::Invalid(who.clone(), "the container has no image".into()))?;
        let build = container
            .get("build")
            .filter(|b| !b.is_null())
            .ok_or_else(|| BuildSpecError::NoBuild(who.clone()))?;
        let build: BuildSpec = serde_json::from_value(build.clone())
            .map_err(|e| BuildSpecError::Invalid(who.clone(), e.to_string()))?;
        build
            .timeout()
            .map_err(|e| BuildSpecError::Invalid(who.clone(), e))?;
        build
            .project_path()
            .map_err(|e| BuildSpecError::Invalid(who.clone(), e))?;
        if let Some(artifact) = &build.artifact {
            relative_path(&artifact.path)
                .map_err(|e| BuildSpecError::Invalid(who.clone(), format!("artifact.path: {e}")))?;
        }
        Ok(BuildPlan {
            image: image.to_string(),
            build,
            snapshot: firmware.clone(),
        })
    }
}

impl BuildSpec {
    pub fn git(&self) -> &GitSource {
        match &self.source {
            BuildSource::Git(git) => git,
        }
    }

    /// The spec's `timeout`, or [`DEFAULT_TIMEOUT`]; at most [`MAX_TIMEOUT`].
    pub fn timeout(&self) -> Result<Duration, String> {
        let Some(text) = &self.timeout else {
            return Ok(DEFAULT_TIMEOUT);
        };
        let timeout = parse_duration(text)?;
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(format!("timeout '{text}' must be more than 0 and at most 24h"));
        }
        Ok(timeout)
    }

    /// `source.git.project`, checked to stay inside the repository; empty for its root.
    pub fn project_path(&self) -> Result<String, String> {
        match self.git().project.as_deref() {
            None | Some("") | Some(".") => Ok(String::new()),
            Some(project) => relative_path(project).map_err(|e| format!("source.git.project: {e}")),
        }
    }

    /// `artifact.path`, checked to stay inside the project: the original's `firmware.bin` when absent.
    pub fn artifact_path(&self) -> Result<String, String> {
        let path = self
            .artifact
            .as_ref()
            .map(|a| a.path.as_str())
            .unwrap_or("firmware.bin");
        relative_path(path).map_err(|e| format!("artifact.path: {e}"))
    }
}

/// `image` with its tag (or digest) replaced by `tag`: where a build versioned `tag` is
/// published when a staged rollout, not the application's own tag, is to take it to devices.
pub fn image_with_tag(image: &str, tag: &str) -> Result<String, String> {
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err(format!(
            "version '{tag}' cannot be an image tag (letters, digits, '_', '.', '-'; at most 128)"
        ));
    }
    let repository = image.split_once('@').map_or(image, |(repository, _)| repository);
    let name_start = repository.rfind('/').map_or(0, |slash| slash + 1);
    let repository = match repository[name_start..].rfind(':') {
        Some(colon) => &repository[..name_start + colon],
        None => repository,
    };
    Ok(format!("{repository}:{tag}"))
}

/// A path relative to a checkout that cannot leave it: no root, no `..`, no empty name.
fn relative_path(path: &str) -> Result<String, String> {
    let trimmed = path.trim_start_matches("./");
    if trimmed.is_empty() || path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return Err(format!("'{path}' must be a relative path inside the repository"));
    }
    let parts: Vec<&str> = trimmed
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return Err(format!("'{path}' must be a relative path inside the repository"));
    }
    Ok(parts.join("/"))
}

/// A Go duration as Kubernetes and Tekton write them: `1h30m`, `45s`, `500ms`, `1h0m0s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("'{text}' is not a duration such as 30m, 1h30m or 90s");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
        if digits == 0 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        let part = unit
            .checked_mul(u32::try_from(number).map_err(|_| invalid())?)
            .ok_or_else(invalid)?;
        total = total.checked_add(part).ok_or_else(invalid)?;
    }
    Ok(total)
}

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BuildState {
    /// Recorded, waiting for a free runner slot.
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl BuildState {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "queued" => BuildState::Queued,
            "running" => BuildState::Running,
            "succeeded" => BuildState::Succeeded,
            "failed" => BuildState::Failed,
            _ => return None,
        })
    }

    /// Queued or running: the target has a build under way.
    pub fn is_open(self) -> bool {
        matches!(self, BuildState::Queued | BuildState::Running)
    }
}

impl fmt::Display for BuildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One build, as kept in the database. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    pub id: BuildId,
    pub app: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The runner that runs it: `local` or `tekton`.
    pub runner: String,
    /// The firmware section it was triggered from (`spec.firmware`).
    pub spec: Value,
    pub state: BuildState,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<i64>,
    /// The image reference published (success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The published manifest's digest (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The firmware version published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why it failed, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the runner knows it by (the PipelineRun's name for Tekton).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildOutcome {
    Succeeded {
        image: String,
        digest: Option<String>,
        version: String,
    },
    Failed {
        message: String,
    },
}

/// The tail of a build's log: the log is bounded, so its first bytes may have been dropped;
/// `start` is the offset of `text` in everything ever written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLog {
    pub start: u64,
    pub text: String,
}

/// The most of a build's log kept (its tail).
pub const LOG_LIMIT: usize = 64 * 1024;

/// `log` with `chunk` appended, keeping at most [`LOG_LIMIT`] bytes (the newest, from a
/// character boundary): the one rule every store applies.
pub fn append_log(log: BuildLog, chunk: &str) -> BuildLog {
    let mut text = log.text;
    text.push_str(chunk);
    let mut start = log.start;
    if text.len() > LOG_LIMIT {
        let mut cut = text.len() - LOG_LIMIT;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text.drain(..cut);
        start += cut as u64;
    }
    BuildLog { start, text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn app_target() -> BuildTarget {
        BuildTarget {
            app: AppName::parse("my-app").unwrap(),
            device: None,
        }
    }

    #[test]
    fn durations_read_as_go_writes_them() {
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h0m0s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        for bad in ["", "m", "10", "10x", "-1m", "1.5h", "99999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_drogue_build_section_parses_with_list_env_values() {
        let firmware = json!({"container": {"image": "reg/fw:latest", "build": {
            "image": "builder:1",
            "source": {"git": {"uri": "https://example.com/fw.git", "project": "app", "rev": "v1"}},
            "args": ["--release"],
            "env": [{"name": "A", "value": "x"}, {"name": "B", "value": ["y", "z"]}],
            "artifact": {"path": "out/firmware.bin"}, "timeout": "10m"}}});
        let plan = BuildPlan::from_firmware(&app_target(), Some(&firmware)).unwrap();
        assert_eq!(plan.image, "reg/fw:latest");
        assert_eq!(plan.build.git().rev.as_deref(), Some("v1"));
        assert_eq!(plan.build.env[1].value.joined(), "y z");
        assert_eq!(plan.build.timeout(), Ok(Duration::from_secs(600)));
        assert_eq!(plan.build.project_path(), Ok("app".into()));
        assert_eq!(plan.build.artifact_path(), Ok("out/firmware.bin".into()));
        assert_eq!(plan.snapshot, firmware);
    }

    #[test]
    fn specs_that_cannot_be_built_say_why() {
        let target = app_target();
        let plan = |v: Value| BuildPlan::from_firmware(&target, Some(&v));
        assert_eq!(
            BuildPlan::from_firmware(&target, None),
            Err(BuildSpecError::NoFirmware("application my-app".into()))
        );
        assert!(
            matches!(plan(json!({"file": {"name": "x"}})), Err(BuildSpecError::NotContainer(_, k)) if k == "file")
        );
        assert!(matches!(
            plan(json!({"container": {"image": "x"}})),
            Err(BuildSpecError::NoBuild(_))
        ));
        let with_build = |build: Value| plan(json!({"container": {"image": "x", "build": build}}));
        for hostile in [
            json!({"source": {"git": {"uri": "u", "project": "../../etc"}}}),
            json!({"source": {"git": {"uri": "u"}}, "artifact": {"path": "/etc/passwd"}}),
            json!({"source": {"git": {"uri": "u"}}, "artifact": {"path": "a/../../b"}}),
            json!({"source": {"git": {"uri": "u"}}, "timeout": "forever"}),
            json!({"source": {"git": {"uri": "u"}}, "timeout": "48h"}),
            json!({"source": {"svn": {"uri": "u"}}}),
            json!({"source": {"git": {"uri": "u"}}, "unknown": 1}),
        ] {
            assert!(
                matches!(with_build(hostile.clone()), Err(BuildSpecError::Invalid(..))),
                "{hostile}"
            );
        }
    }

    #[test]
    fn a_version_tag_replaces_the_images_tag_or_digest() {
        assert_eq!(image_with_tag("fw:latest", "1.2.0"), Ok("fw:1.2.0".into()));
        assert_eq!(image_with_tag("fw", "abc"), Ok("fw:abc".into()));
        assert_eq!(
            image_with_tag("host:5000/team/fw:latest", "abc"),
            Ok("host:5000/team/fw:abc".into())
        );
        assert_eq!(
            image_with_tag("host:5000/fw@sha256:00", "v1"),
            Ok("host:5000/fw:v1".into())
        );
        assert_eq!(image_with_tag("host:5000/fw", "v1"), Ok("host:5000/fw:v1".into()));
        for bad in ["", "1.0.0+build", "-x", "a/b", &"x".repeat(129)] {
            assert!(image_with_tag("fw:1", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pipeline_names_are_the_originals() {
        let mut target = app_target();
        assert_eq!(target.pipeline_name(), "app-my-app");
        target.device = Some(DeviceName::parse("dev1").unwrap());
        assert_eq!(target.pipeline_name(), "dev-my-app-dev1");
    }

    #[test]
    fn the_log_keeps_its_newest_bytes_on_a_character_boundary() {
        let log = append_log(
            BuildLog {
                start: 0,
                text: String::new(),
            },
            "hello\n",
        );
        assert_eq!(
            log,
            BuildLog {
                start: 0,
                text: "hello\n".into()
            }
        );
        let big = "é".repeat(LOG_LIMIT); // 2 bytes each
        let log = append_log(log, &big);
        assert!(log.text.len() <= LOG_LIMIT && log.text.len() >= LOG_LIMIT - 1);
        assert_eq!(log.start as usize + log.text.len(), 6 + big.len());
        assert!(log.text.ends_with('é'));
    }
}
