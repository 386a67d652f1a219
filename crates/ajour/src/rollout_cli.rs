//! `ajour rollout create|list|get|pause|resume|cancel|approve`: staged rollouts through the REST
//! API (`/api/dfu/v1alpha1/apps/{app}/rollouts`; see docs/rollouts.md).

use crate::cli::{Connection, FirmwareChoice};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout of an application's devices to new firmware, wave by wave.
    Create(Box<CreateArgs>),
    /// List an application's rollouts, newest first, with their devices per state.
    List {
        app: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a rollout: its state and each wave's devices per state.
    Get {
        app: String,
        id: i64,
        /// Also list every device with its wave and state (and the application's devices outside
        /// the rollout, with why).
        #[arg(long)]
        devices: bool,
        /// Print it as the API gives it (JSON, with its devices).
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Print a line whenever it changes, until it is completed or cancelled (or Ctrl-C).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Stop starting devices; devices mid-update are told to wait.
    Pause(Target),
    /// Go on after a pause or a halt (the failures that halted it are accepted).
    Resume(Target),
    /// Stop for good: devices not yet sent the whole image go back to their previous firmware;
    /// devices updated stay (taking the firmware back is a new rollout of the old one).
    Cancel(Target),
    /// Start the next wave of a rollout that waits for an approval.
    Approve(Target),
}

#[derive(Debug, Args)]
pub struct Target {
    app: String,
    id: i64,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    app: String,
    #[command(flatten)]
    firmware: FirmwareChoice,
    /// A wave, in order: `10%` (a share of the devices), `25` (a count) or `ring=canary` (a label
    /// selector). The last wave takes every device left. Default: one wave of every device.
    #[arg(long = "wave", value_name = "SHARE|COUNT|SELECTOR")]
    waves: Vec<String>,
    /// Seconds each wave must stay successful before the next one starts.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    soak: u64,
    /// Percent of a wave's devices that must be updated for the wave to be successful.
    #[arg(long, value_name = "PCT", default_value_t = 90.0)]
    success_threshold: f64,
    /// Every wave after the first starts only when approved (`ajour rollout approve`).
    #[arg(long)]
    approve_each: bool,
    /// Only devices whose labels match this selector (`channel=beta`) are in the rollout.
    #[arg(long, value_name = "SELECTOR")]
    selector: Option<String>,
    /// Halt when this percent of the active wave failed.
    #[arg(long, value_name = "PCT", default_value_t = 10.0)]
    max_failure_rate: f64,
    /// Halt when this many of the active wave failed.
    #[arg(long, value_name = "N")]
    max_failures: Option<u32>,
    /// A device sent the whole image and silent this long has failed.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    swap_timeout: u64,
    /// A device whose progress was not recorded this long has failed.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    stall_timeout: u64,
    /// Devices updating at once.
    #[arg(long, value_name = "N")]
    concurrency: Option<u32>,
    /// Firmware bytes per second the rollout may send, from each instance.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    bandwidth: Option<u64>,
    /// UTC hours in which devices may start, `22-4`.
    #[arg(long, value_name = "START-END")]
    window: Option<String>,
    /// The whole rollout spec as JSON (see docs/rollouts.md) instead of the flags above.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["waves", "file", "image", "hawkbit"])]
    spec: Option<PathBuf>,
    #[command(flatten)]
    connection: Connection,
}

impl CreateArgs {
    fn spec(&self) -> anyhow::Result<Value> {
        if let Some(path) = &self.spec {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            return serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()));
        }
        let Some(firmware) = self.firmware.to_spec() else {
            bail!(
                "name the firmware: --firmware-file, --firmware-image or --firmware-hawkbit (or --spec FILE)"
            );
        };
        let given = if self.waves.is_empty() {
            vec!["100%".to_string()]
        } else {
            self.waves.clone()
        };
        let mut waves = Vec::new();
        for (n, wave) in given.iter().enumerate() {
            let mut spec = wave_spec(wave)?;
            spec["soakSeconds"] = json!(self.soak);
            spec["successThreshold"] = json!(self.success_threshold);
            if self.approve_each && n > 0 {
                spec["approval"] = json!("manual");
            }
            waves.push(spec);
        }
        let mut spec = json!({
            "firmware": firmware,
            "waves": waves,
            "failure": {
                "maxFailureRate": self.max_failure_rate,
                "swapTimeoutSeconds": self.swap_timeout,
                "stallTimeoutSeconds": self.stall_timeout,
            },
        });
        if let Some(max) = self.max_failures {
            spec["failure"]["maxFailures"] = json!(max);
        }
        if let Some(selector) = &self.selector {
            spec["selector"] = json!(selector);
        }
        if let Some(limit) = self.concurrency {
            spec["concurrency"] = json!(limit);
        }
        if let Some(rate) = self.bandwidth {
            spec["bandwidthBytesPerSecond"] = json!(rate);
        }
        if let Some(window) = &self.window {
            let parse = |h: &str| h.trim().parse::<u8>().ok().filter(|h| *h < 24);
            let hours = window
                .split_once('-')
                .and_then(|(a, b)| Some((parse(a)?, parse(b)?)));
            let Some((start, end)) = hours else {
                bail!("--window takes UTC hours as START-END (0 to 23), such as 22-4, not '{window}'");
            };
            spec["maintenanceWindow"] = json!({"startHour": start, "endHour": end});
        }
        Ok(spec)
    }
}

/// `10%`, `25` or `ring=canary` as a wave.
pub(crate) fn wave_spec(text: &str) -> anyhow::Result<Value> {
    if let Some(percent) = text.strip_suffix('%') {
        let percent: f64 = percent
            .trim()
            .parse()
            .with_context(|| format!("wave '{text}': not a percentage"))?;
        return Ok(json!({"percent": percent}));
    }
    if let Ok(count) = text.trim().parse::<u32>() {
        return Ok(json!({"count": count}));
    }
    if text.contains('=') || text.starts_with('!') {
        return Ok(json!({"selector": text}));
    }
    bail!("wave '{text}': give a share (10%), a count (25) or a label selector (ring=canary)")
}

fn path(app: &str) -> String {
    format!("apps/{app}/rollouts")
}

/// One line per wave: `wave 0 (active): 10 devices: 2 pending, 3 updating, 5 succeeded, 0 failed`.
fn wave_lines(rollout: &Value) -> Vec<String> {
    let active = rollout["wave"].as_u64();
    let open = matches!(rollout["state"].as_str(), Some("active" | "paused"));
    rollout["waves"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(n, wave)| {
            let count = |k: &str| wave[k].as_u64().unwrap_or(0);
            let mark = if open && active == Some(n as u64) {
                " (active)"
            } else {
                ""
            };
            format!(
                "wave {n}{mark}: {} devices: {} pending, {} updating, {} succeeded, {} failed",
                count("total"),
                count("pending"),
                count("updating"),
                count("succeeded"),
                count("failed")
            )
        })
        .collect()
}

fn headline(rollout: &Value) -> String {
    let mut line = format!(
        "rollout {} of {}: {}, wave {}",
        rollout["id"],
        rollout["application"].as_str().unwrap_or_default(),
        rollout["state"].as_str().unwrap_or_default(),
        rollout["wave"]
    );
    if rollout["awaitingApproval"].as_bool() == Some(true) {
        line.push_str(" (waiting for approval: ajour rollout approve)");
    }
    if let Some(reason) = rollout["reason"].as_str() {
        line.push_str(&format!(": {reason}"));
    }
    line
}

pub async fn run(command: RolloutCommand) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Create(args) => {
            let spec = args.spec()?;
            let created = args
                .connection
                .client()?
                .dfu(reqwest::Method::POST, &path(&args.app), &[], Some(&spec))
                .await?;
            crate::say!("{}", headline(&created));
            for line in wave_lines(&created) {
                crate::say!("  {line}");
            }
        }
        RolloutCommand::List { app, connection } => {
            let rollouts = connection.client()?.get_dfu(&path(&app), &[]).await?;
            crate::say!("ID\tSTATE\tWAVE\tPENDING\tUPDATING\tSUCCEEDED\tFAILED\tREASON");
            for rollout in rollouts.as_array().into_iter().flatten() {
                let sum = |k: &str| -> u64 {
                    rollout["waves"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|w| w[k].as_u64().unwrap_or(0))
                        .sum()
                };
                crate::say!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    rollout["id"],
                    rollout["state"].as_str().unwrap_or_default(),
                    rollout["wave"],
                    sum("pending"),
                    sum("updating"),
                    sum("succeeded"),
                    sum("failed"),
                    rollout["reason"].as_str().unwrap_or("-")
                );
            }
        }
        RolloutCommand::Get {
            app,
            id,
            devices,
            json,
            watch,
            connection,
        } => {
            let client = connection.client()?;
            let at = format!("{}/{id}", path(&app));
            if watch {
                let mut last = String::new();
                let started = std::time::Instant::now();
                loop {
                    let rollout = client.get_dfu(&at, &[]).await?;
                    let now = format!("{}; {}", headline(&rollout), wave_lines(&rollout).join("; "));
                    if now != last {
                        crate::say!("{:>6.1}s  {now}", started.elapsed().as_secs_f64());
                        last = now;
                    }
                    if matches!(rollout["state"].as_str(), Some("completed" | "cancelled")) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            let rollout = client.get_dfu(&at, &[]).await?;
            if json {
                crate::say!("{}", serde_json::to_string_pretty(&rollout)?);
                return Ok(());
            }
            crate::say!("{}", headline(&rollout));
            for line in wave_lines(&rollout) {
                crate::say!("  {line}");
            }
            if devices {
                crate::say!("DEVICE\tWAVE\tSTATE\tTARGET\tREASON");
                for device in rollout["devices"].as_array().into_iter().flatten() {
                    crate::say!(
                        "{}\t{}\t{}\t{}\t{}",
                        device["device"].as_str().unwrap_or_default(),
                        device["wave"],
                        device["phase"].as_str().unwrap_or_default(),
                        device["target"].as_str().unwrap_or("-"),
                        device["reason"].as_str().unwrap_or("-")
                    );
                }
                for device in rollout["outside"].as_array().into_iter().flatten() {
                    crate::say!(
                        "{}\t-\toutside\t-\t{}",
                        device["device"].as_str().unwrap_or_default(),
                        device["reason"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        RolloutCommand::Pause(target) => control(target, "pause").await?,
        RolloutCommand::Resume(target) => control(target, "resume").await?,
        RolloutCommand::Cancel(target) => control(target, "cancel").await?,
        RolloutCommand::Approve(target) => control(target, "approve").await?,
    }
    Ok(())
}

async fn control(target: Target, action: &str) -> anyhow::Result<()> {
    let at = format!("{}/{}/{action}", path(&target.app), target.id);
    let rollout = target
        .connection
        .client()?
        .dfu(reqwest::Method::POST, &at, &[], None)
        .await?;
    crate::say!("{}", headline(&rollout));
    for line in wave_lines(&rollout) {
        crate::say!("  {line}");
    }
    Ok(())
}
