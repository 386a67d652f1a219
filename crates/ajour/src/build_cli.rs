//! Firmware builds from the command line: `ajour build trigger|list|get|logs` through the REST
//! API (`/api/build/v1alpha1`), and the `ajour serve` settings that choose the build runner
//! ([`BuildServeArgs`]; see docs/builds.md).

use crate::cli::Connection;
use crate::server::{BuildRunnerKind, BuildServerConfig};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

const API: &str = "api/build/v1alpha1";
/// How often `logs --follow` asks for more.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// The build settings of `ajour serve`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Builds")]
pub struct BuildServeArgs {
    /// Where builds run: `off` (the build API answers 501), `local` (on this machine: git, the
    /// spec's command, pushed to --oci-registry; whoever may write an application's spec can run
    /// commands as the server's user), or `tekton` (a PipelineRun of the shipped pipeline in the
    /// cluster the server runs in; see docs/tekton.md).
    #[arg(long, value_name = "RUNNER", value_enum, default_value_t = BuildServerConfig::default().runner)]
    pub build_runner: BuildRunnerKind,
    /// Builds run at once on this instance; more wait, queued.
    #[arg(long, value_name = "N", default_value_t = BuildServerConfig::default().concurrency as u64,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub build_concurrency: u64,
    /// Milliseconds a build's record lasts without its instance renewing it (every quarter of
    /// this) before any instance records it failed: how long a build an instance left behind
    /// when it crashed shows as running.
    #[arg(long, value_name = "MS", default_value_t = crate::config::millis(BuildServerConfig::default().lease),
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub build_lease_ms: u64,
    /// Only this application's firmware may be built (repeat, or comma-separate); triggering any
    /// other's answers 403. Without any: every application's.
    #[arg(long = "build-application", value_delimiter = ',', value_name = "APP")]
    pub build_applications: Vec<String>,
    /// Where the local runner checks out and builds (default: `builds` in the data directory).
    #[arg(long, value_name = "DIR")]
    pub build_dir: Option<PathBuf>,
    /// The namespace PipelineRuns are created in (default: the server's own, in a cluster).
    #[arg(long, value_name = "NS")]
    pub tekton_namespace: Option<String>,
    /// The Pipeline each build runs (deploy/tekton ships it).
    #[arg(long, value_name = "NAME", default_value_t = ajour_build::tekton::TektonConfig::default().pipeline)]
    pub tekton_pipeline: String,
    /// A Secret (type kubernetes.io/dockerconfigjson) the pipeline pushes to the registry with,
    /// bound as its `registry-credentials` workspace (default: none; see docs/tekton.md).
    #[arg(long, value_name = "SECRET")]
    pub tekton_registry_secret: Option<String>,
    /// The service account the PipelineRun's tasks run as.
    #[arg(long, value_name = "NAME", default_value_t = ajour_build::tekton::TektonConfig::default().service_account)]
    pub tekton_service_account: String,
}

impl BuildServeArgs {
    pub fn config(&self) -> BuildServerConfig {
        let defaults = ajour_build::tekton::TektonConfig::default();
        BuildServerConfig {
            runner: self.build_runner,
            concurrency: self.build_concurrency as usize,
            lease: Duration::from_millis(self.build_lease_ms),
            allowed_apps: self.build_applications.clone(),
            work_dir: self.build_dir.clone(),
            tekton: ajour_build::tekton::TektonConfig {
                namespace: self.tekton_namespace.clone().unwrap_or_default(),
                pipeline: self.tekton_pipeline.clone(),
                service_account: self.tekton_service_account.clone(),
                registry_secret: self.tekton_registry_secret.clone(),
                ..defaults
            },
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BuildCommand {
    /// Build an application's firmware (or one device's own) from its build spec, and publish it.
    Trigger {
        /// The application whose firmware (or whose device's) is built.
        app: String,
        /// Build this device's own firmware instead of the application's.
        device: Option<String>,
        /// Print the build's log as it runs, and exit with its outcome.
        #[arg(long)]
        follow: bool,
        /// When it succeeds, roll it out to the application's devices in waves (as `ajour rollout
        /// create --wave`: `10%`, `25`, `ring=canary`; repeat for more), publishing it under its
        /// version's tag instead of the one the application serves.
        #[arg(
            long = "rollout-wave",
            value_name = "SHARE|COUNT|SELECTOR",
            conflicts_with = "rollout_spec"
        )]
        rollout_waves: Vec<String>,
        /// The same with a whole rollout spec (JSON, as `ajour rollout create --spec`, without
        /// `firmware`: the build is the firmware).
        #[arg(long, value_name = "FILE")]
        rollout_spec: Option<PathBuf>,
        #[command(flatten)]
        connection: Connection,
    },
    /// List builds: every application and device with a build spec and its latest build, or with
    /// APP (and DEVICE) that target's builds, newest first.
    List {
        /// Only this application's builds (its own).
        app: Option<String>,
        /// With APP: only this device's builds.
        device: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one build.
    Get {
        /// The build's number.
        id: i64,
        /// Print it as the API gives it (JSON).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print a build's log; with --follow, as it is written, until the build ends.
    Logs {
        /// The build's number.
        id: i64,
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

fn target_path(app: &str, device: Option<&str>) -> String {
    match device {
        None => format!("apps/{app}"),
        Some(device) => format!("apps/{app}/devices/{device}"),
    }
}

fn time(build: &Value, key: &str) -> String {
    build[key]
        .as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn target_of(build: &Value) -> String {
    match build["device"].as_str() {
        Some(device) => format!("{device}@{}", build["app"].as_str().unwrap_or_default()),
        None => build["app"].as_str().unwrap_or_default().to_string(),
    }
}

fn summary(build: &Value) -> String {
    let mut line = format!(
        "build {} of {}: {}",
        build["id"],
        target_of(build),
        build["state"].as_str().unwrap_or("?")
    );
    if let Some(version) = build["version"].as_str() {
        line += &format!(", version {version}");
    }
    if let Some(image) = build["image"].as_str() {
        line += &format!(" at {image}");
    }
    if let Some(message) = build["message"].as_str() {
        line += &format!(": {message}");
    }
    line
}

pub async fn run(command: BuildCommand) -> anyhow::Result<()> {
    match command {
        BuildCommand::Trigger {
            app,
            device,
            follow,
            rollout_waves,
            rollout_spec,
            connection,
        } => {
            let client = connection.client()?;
            let path = format!("{}/trigger", target_path(&app, device.as_deref()));
            let rollout = match (rollout_spec, rollout_waves.is_empty()) {
                (Some(file), _) => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    Some(
                        serde_json::from_str::<Value>(&text)
                            .with_context(|| format!("{} is not JSON", file.display()))?,
                    )
                }
                (None, false) => {
                    let waves = rollout_waves
                        .iter()
                        .map(|wave| crate::rollout_cli::wave_spec(wave))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    Some(serde_json::json!({"waves": waves}))
                }
                (None, true) => None,
            };
            let body = rollout.map(|rollout| serde_json::json!({"rollout": rollout}));
            let build = client.call(API, Method::POST, &path, &[], body.as_ref()).await?;
            crate::say!("{}", summary(&build));
            let id = build["id"].as_i64().unwrap_or_default();
            if follow {
                follow_log(&client, id).await?;
            } else {
                crate::say!("follow it with: ajour build logs --follow {id}");
            }
        }
        BuildCommand::List {
            app,
            device,
            connection,
        } => {
            let client = connection.client()?;
            match app {
                None => {
                    let entries = client.call(API, Method::GET, "", &[], None).await?;
                    crate::say!("TARGET\tBUILD\tSTATUS\tSTARTED\tCOMPLETED\tVERSION");
                    for entry in entries.as_array().into_iter().flatten() {
                        let text = |k: &str| entry[k].as_str().unwrap_or("-").to_string();
                        crate::say!(
                            "{}\t{}\t{}\t{}\t{}\t{}",
                            target_of(entry),
                            entry["id"].as_i64().map_or("-".into(), |id| id.to_string()),
                            text("status"),
                            text("started"),
                            text("completed"),
                            text("version")
                        );
                    }
                }
                Some(app) => {
                    let answer = client
                        .call(API, Method::GET, &target_path(&app, device.as_deref()), &[], None)
                        .await?;
                    crate::say!("ID\tSTATE\tCREATED\tCOMPLETED\tVERSION\tMESSAGE");
                    for build in answer["builds"].as_array().into_iter().flatten() {
                        crate::say!(
                            "{}\t{}\t{}\t{}\t{}\t{}",
                            build["id"],
                            build["state"].as_str().unwrap_or("?"),
                            time(build, "createdAt"),
                            time(build, "completedAt"),
                            build["version"].as_str().unwrap_or("-"),
                            build["message"].as_str().unwrap_or("-")
                        );
                    }
                }
            }
        }
        BuildCommand::Get { id, json, connection } => {
            let build = connection
                .client()?
                .call(API, Method::GET, &format!("builds/{id}"), &[], None)
                .await?;
            if json {
                crate::say!("{}", serde_json::to_string_pretty(&build)?);
            } else {
                crate::say!("{}", summary(&build));
                crate::say!("  runner:    {}", build["runner"].as_str().unwrap_or("?"));
                crate::say!("  created:   {}", time(&build, "createdAt"));
                crate::say!("  started:   {}", time(&build, "startedAt"));
                crate::say!("  completed: {}", time(&build, "completedAt"));
                if let Some(digest) = build["digest"].as_str() {
                    crate::say!("  digest:    {digest}");
                }
                if let Some(reference) = build["reference"].as_str() {
                    crate::say!("  reference: {reference}");
                }
            }
        }
        BuildCommand::Logs {
            id,
            follow,
            connection,
        } => {
            let client = connection.client()?;
            if follow {
                follow_log(&client, id).await?;
            } else {
                let log = client
                    .call(API, Method::GET, &format!("builds/{id}/log"), &[], None)
                    .await?;
                print_log(&log, 0);
            }
        }
    }
    Ok(())
}

/// Print `log` (an answer of `builds/{id}/log?from=from`), saying so when bytes before it were
/// dropped (the log keeps its newest 64 KiB).
fn print_log(log: &Value, from: u64) {
    let start = log["start"].as_u64().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    if start > from {
        let _ = writeln!(out, "[… {} bytes of log no longer kept …]", start - from);
    }
    let _ = write!(out, "{}", log["text"].as_str().unwrap_or_default());
    let _ = out.flush();
}

/// Print the build's log as it grows until the build ends; an error when it failed.
async fn follow_log(client: &crate::client::ApiClient, id: i64) -> anyhow::Result<()> {
    let mut from = 0;
    loop {
        let log = client
            .call(
                API,
                Method::GET,
                &format!("builds/{id}/log"),
                &[("from", from.to_string())],
                None,
            )
            .await?;
        print_log(&log, from);
        from = log["next"].as_u64().unwrap_or(from);
        match log["state"].as_str() {
            Some("queued" | "running") => tokio::time::sleep(FOLLOW_INTERVAL).await,
            Some("succeeded") => {
                let build = client
                    .call(API, Method::GET, &format!("builds/{id}"), &[], None)
                    .await?;
                crate::say!("{}", summary(&build));
                return Ok(());
            }
            _ => {
                let build = client
                    .call(API, Method::GET, &format!("builds/{id}"), &[], None)
                    .await?;
                bail!("{}", summary(&build));
            }
        }
    }
}
