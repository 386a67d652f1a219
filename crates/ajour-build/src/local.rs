//! The local runner: builds on the machine `ajour serve` runs on, with no container engine.
//!
//! For one build it clones `source.git.uri` into a directory of its own (`git`, the one on
//! `PATH`), checks out `rev`, runs the spec's `command` with `args` appended in `project`, takes
//! the file at `artifact.path` and pushes it as Ajour's firmware image to the container spec's
//! `image` (the OCI push `ajour firmware push` does), versioned `version` or the short commit
//! hash. The builder `image` is not used: the command runs as the server's user, so enable this
//! runner only where whoever may trigger builds may run commands (see docs/builds.md).
//!
//! The command sees only the spec's `env`, `PATH`, `HOME` (the build's directory) and
//! `AJOUR_BUILD_*`: never the server's own environment, which holds its secrets. The spec's
//! `timeout` bounds the whole build; when it passes, the command's whole process group is killed.

use crate::{BuildFailure, BuildJob, BuildReporter, BuildRunner, Publish, Published};
use ajour_store::{OciStore, SameVersion};
use ajour_types::build::BuildPlan;
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Command;

/// How long a log line may be; longer ones are cut (a build printing megabytes without a newline
/// must not hold them all in memory).
const MAX_LINE: usize = 4096;

/// Where and how the local runner builds.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Each build gets a directory under this one, removed when it ends.
    pub work_dir: PathBuf,
    /// The git program.
    pub git: PathBuf,
    /// `PATH` for the build command.
    pub path: String,
}

impl LocalConfig {
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            work_dir: work_dir.into(),
            git: PathBuf::from("git"),
            path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        }
    }
}

pub struct LocalRunner {
    config: LocalConfig,
    /// Where builds are published; `None`: the server has no OCI registry configured, and
    /// triggering a build says so.
    oci: Option<Arc<OciStore>>,
}

impl LocalRunner {
    pub fn new(config: LocalConfig, oci: Option<Arc<OciStore>>) -> Self {
        Self { config, oci }
    }

    async fn build(
        &self,
        job: &BuildJob,
        checkout: &Path,
        reporter: &BuildReporter,
    ) -> Result<Published, BuildFailure> {
        let spec = &job.plan.build;
        let git = spec.git();
        let invalid = |e: String| BuildFailure(e);

        reporter.line(format!("$ git clone {} (build {})", git.uri, job.id));
        self.git(
            checkout.parent().unwrap_or(checkout),
            reporter,
            &["clone", "--quiet", "--", &git.uri, &path_text(checkout)?],
        )
        .await
        .map_err(|e| BuildFailure(format!("cloning {}: {e}", git.uri)))?;
        if let Some(rev) = git.rev.as_deref().filter(|rev| !rev.is_empty()) {
            let commit = self.resolve(checkout, rev).await?;
            self.git(checkout, reporter, &["checkout", "--quiet", "--detach", &commit])
                .await
                .map_err(|e| BuildFailure(format!("checking out {rev}: {e}")))?;
        }
        let commit = self
            .output(checkout, &["rev-parse", "--short=12", "HEAD"])
            .await?;
        reporter.line(format!("at commit {commit}"));
        let version = spec
            .version
            .clone()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| commit.clone());

        let project = checkout.join(spec.project_path().map_err(invalid)?);
        if !project.is_dir() {
            return Err(BuildFailure(format!(
                "source.git.project '{}' is not a directory of the repository",
                git.project.as_deref().unwrap_or(".")
            )));
        }
        let Some((program, command_args)) = spec.command.as_deref().and_then(<[String]>::split_first) else {
            return Err(BuildFailure("the local runner needs build.command".into()));
        };
        let mut command = Command::new(program);
        command
            .args(command_args)
            .args(&spec.args)
            .current_dir(&project)
            .env_clear()
            .env("PATH", &self.config.path)
            .env("HOME", checkout)
            .env("AJOUR_BUILD_ID", job.id.to_string())
            .env("AJOUR_BUILD_COMMIT", &commit)
            .env("AJOUR_BUILD_VERSION", &version);
        for env in &spec.env {
            command.env(&env.name, env.value.joined());
        }
        let shown: Vec<&str> = spec
            .command
            .iter()
            .flatten()
            .chain(&spec.args)
            .map(String::as_str)
            .collect();
        let project_name = spec.project_path().map_err(invalid)?;
        let project_name = if project_name.is_empty() {
            "."
        } else {
            &project_name
        };
        reporter.line(format!("$ {} (in {project_name})", shown.join(" ")));
        let status = run_logged(command, reporter)
            .await
            .map_err(|e| BuildFailure(format!("running {program}: {e}")))?;
        if !status.success() {
            return Err(BuildFailure(format!("the build command failed ({status})")));
        }

        let artifact_path = spec.artifact_path().map_err(invalid)?;
        let data = read_artifact(checkout, &project, &artifact_path).await?;
        reporter.line(format!("artifact {artifact_path}: {} bytes", data.len()));

        let oci = self
            .oci
            .as_ref()
            .ok_or_else(|| BuildFailure(NO_REGISTRY.into()))?;
        let image = job.image_for(&version).map_err(BuildFailure)?;
        reporter.line(format!("pushing version {version} to {image}"));
        let pushed = oci
            .push(&image, &version, &data, SameVersion::Refuse, Arc::new(|_| {}))
            .await
            .map_err(|e| BuildFailure(format!("pushing {image}: {e}")))?;
        reporter.line(format!(
            "pushed {} ({})",
            pushed.reference, pushed.manifest_digest
        ));
        Ok(Published {
            image: pushed.reference,
            digest: Some(pushed.manifest_digest),
            version,
        })
    }

    /// The commit `rev` names: a commit, a tag, a local branch or one of the remote's.
    async fn resolve(&self, checkout: &Path, rev: &str) -> Result<String, BuildFailure> {
        if rev.starts_with('-') {
            return Err(BuildFailure(format!("'{rev}' is not a revision")));
        }
        for candidate in [rev.to_string(), format!("origin/{rev}")] {
            let spec = format!("{candidate}^{{commit}}");
            if let Ok(commit) = self
                .output(checkout, &["rev-parse", "--verify", "--quiet", &spec])
                .await
            {
                return Ok(commit);
            }
        }
        Err(BuildFailure(format!("revision '{rev}' is not in the repository")))
    }

    fn git_command(&self, dir: &Path) -> Command {
        let mut command = Command::new(&self.config.git);
        command
            .current_dir(dir)
            .env_clear()
            .env("PATH", &self.config.path)
            .env("HOME", dir)
            // Never wait on a password prompt; never run a transport that executes commands.
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .args([
                "-c",
                "protocol.ext.allow=never",
                "-c",
                "advice.detachedHead=false",
            ]);
        command
    }

    async fn git(&self, dir: &Path, reporter: &BuildReporter, args: &[&str]) -> Result<(), String> {
        let mut command = self.git_command(dir);
        command.args(args);
        let status = run_logged(command, reporter)
            .await
            .map_err(|e| format!("running git: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("git {} failed ({status})", args[0]))
        }
    }

    async fn output(&self, dir: &Path, args: &[&str]) -> Result<String, BuildFailure> {
        let output = self
            .git_command(dir)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| BuildFailure(format!("running git: {e}")))?;
        if !output.status.success() {
            return Err(BuildFailure(format!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }
}

const NO_REGISTRY: &str =
    "builds are published to an OCI registry, and this server has none: set --oci-registry";

fn path_text(path: &Path) -> Result<String, BuildFailure> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| BuildFailure(format!("the build directory {} is not UTF-8", path.display())))
}

/// The artifact's bytes, if it is a regular file inside the checkout (a symbolic link pointing
/// out of it, to the server's files, is refused).
async fn read_artifact(checkout: &Path, project: &Path, artifact: &str) -> Result<Vec<u8>, BuildFailure> {
    let path = project.join(artifact);
    let missing = || BuildFailure(format!("the build wrote no artifact at {artifact}"));
    let real = tokio::fs::canonicalize(&path).await.map_err(|_| missing())?;
    let root = tokio::fs::canonicalize(checkout).await.map_err(|_| missing())?;
    if !real.starts_with(&root) {
        return Err(BuildFailure(format!(
            "the artifact {artifact} points outside the build's directory"
        )));
    }
    let metadata = tokio::fs::metadata(&real).await.map_err(|_| missing())?;
    if !metadata.is_file() {
        return Err(BuildFailure(format!("the artifact {artifact} is not a file")));
    }
    if metadata.len() == 0 {
        return Err(BuildFailure(format!("the artifact {artifact} is empty")));
    }
    tokio::fs::read(&real)
        .await
        .map_err(|e| BuildFailure(format!("reading the artifact {artifact}: {e}")))
}

/// Run `command` in a process group of its own, its output to the log line by line; the group is
/// killed if this future is dropped (a timeout), so no grandchild outlives the build.
async fn run_logged(
    mut command: Command,
    reporter: &BuildReporter,
) -> std::io::Result<std::process::ExitStatus> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let _group = child.id().map(ProcessGroup);
    let stdout = child.stdout.take().map(|out| forward(out, reporter.clone()));
    let stderr = child.stderr.take().map(|err| forward(err, reporter.clone()));
    let status = child.wait().await?;
    // The pipes close when the last process holding them exits; a daemon the build left
    // behind would hold them for ever, so wait a little and then kill the group.
    let drain = async {
        if let Some(out) = stdout {
            let _ = out.await;
        }
        if let Some(err) = stderr {
            let _ = err.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
        reporter.line("(processes the build left running were killed)");
    }
    Ok(status)
}

fn forward(
    pipe: impl AsyncRead + Unpin + Send + 'static,
    reporter: BuildReporter,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    reporter.line(text.trim_end_matches(['\n', '\r']));
                }
            }
        }
    })
}

/// A process group, killed when dropped.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[async_trait]
impl BuildRunner for LocalRunner {
    fn name(&self) -> &'static str {
        "local"
    }

    fn check(&self, plan: &BuildPlan, _publish: Publish) -> Result<(), String> {
        if plan.build.command.as_ref().is_none_or(Vec::is_empty) {
            return Err(
                "the local runner needs build.command, the program and arguments to build with".into(),
            );
        }
        if self.oci.is_none() {
            return Err(NO_REGISTRY.into());
        }
        Ok(())
    }

    async fn run(&self, job: &BuildJob, reporter: &BuildReporter) -> Result<Published, BuildFailure> {
        let timeout = job.plan.build.timeout().map_err(BuildFailure)?;
        tokio::fs::create_dir_all(&self.config.work_dir)
            .await
            .map_err(|e| BuildFailure(format!("creating {}: {e}", self.config.work_dir.display())))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("build-{}-", job.id))
            .tempdir_in(&self.config.work_dir)
            .map_err(|e| {
                BuildFailure(format!(
                    "creating a build directory in {}: {e}",
                    self.config.work_dir.display()
                ))
            })?;
        let checkout = dir.path().join("source");
        let outcome = tokio::time::timeout(timeout, self.build(job, &checkout, reporter)).await;
        // Removing a large checkout takes a while: not on the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
        match outcome {
            Ok(outcome) => outcome,
            Err(_) => Err(BuildFailure(format!(
                "timed out after {} (the spec's timeout); the build's processes were killed",
                job.plan.build.timeout.as_deref().unwrap_or("30m")
            ))),
        }
    }
}
