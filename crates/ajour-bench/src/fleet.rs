//! What every load generator shares: the fleet flags, the benchmark firmware, provisioning the
//! registry, and driving the devices while measuring.

use crate::process::{cpu_seconds, ServerProcess};
use crate::report::{status_writes, Latencies, LoadReport};
use ajour_client::{RegistryClient, RegistryClientConfig};
use ajour_sim::{
    run_device, run_fleet, DeviceOptions, Ended, FleetOptions, Link, Observer, Outcome, SimulatedDevice,
    StatusEncoding, Step,
};
use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde_json::{json, Value};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub const APP: &str = "bench";
pub const PASSWORD: &str = "bench-password";
pub const FROM: &str = "1.0.0";
pub const TO: &str = "2.0.0";
pub const API_TOKEN: &str = "bench-token";

/// What every load generator takes: the fleet, the image, and which servers to measure.
#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// Devices updating at the same time.
    #[arg(long, default_value_t = 1000)]
    pub devices: u32,
    /// Firmware image size in bytes.
    #[arg(long, default_value_t = 65536)]
    pub image_size: usize,
    /// Block size the devices ask for.
    #[arg(long, default_value_t = 512)]
    pub mtu: u32,
    /// The `ajour` binary under test (default: the `ajour` next to this program, where
    /// `cargo build --release` puts both).
    #[arg(long = "ajour", env = "AJOUR_BIN", value_name = "PATH")]
    pub ajour: Option<PathBuf>,
    /// An extra flag for the `ajour serve` under test, e.g. `--serve-arg=--spec-cache-ms=60000`
    /// (repeatable).
    #[arg(long = "serve-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub serve_args: Vec<String>,
    /// Skip the bare baseline.
    #[arg(long)]
    pub no_bare: bool,
    /// Skip `ajour serve` (measure only the bare baseline).
    #[arg(long)]
    pub no_ajour: bool,
    /// Give up after this many seconds (per target).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

/// How many rounds a benchmark measures (`coap`, `mqtt-endpoint`).
#[derive(Debug, Clone, Args)]
pub struct RoundsArgs {
    /// Measure this many rounds, Ajour then the baseline in each, against the same two servers
    /// (the fleet starts again from the old version each round), and report the median ratio:
    /// on a machine shared with the load generator one short run of each is at the mercy of
    /// what else runs at that moment.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
}

/// `rounds` rounds, in each Ajour (`ajour`: its server and the address the fleet is driven at;
/// its status writes per device read from its metrics) and then the baseline (`bare`), each
/// driven by `drive(server, address, target)`; the reports, a list a round.
pub async fn alternate(
    rounds: u32,
    devices: u32,
    ajour: Option<(&ServerProcess, &str)>,
    bare: Option<(&ServerProcess, &str)>,
    drive: impl AsyncFn(&ServerProcess, &str, &'static str) -> anyhow::Result<LoadReport>,
) -> anyhow::Result<Vec<Vec<LoadReport>>> {
    let mut all = Vec::new();
    for _ in 0..rounds {
        let mut reports = Vec::new();
        if let Some((server, address)) = ajour {
            let writes_before = status_writes(&server.url).await?;
            let mut report = drive(server, address, "ajour").await?;
            report.status_writes =
                Some((status_writes(&server.url).await? - writes_before) / f64::from(devices));
            reports.push(report);
        }
        if let Some((server, address)) = bare {
            reports.push(drive(server, address, "bare").await?);
        }
        all.push(reports);
    }
    Ok(all)
}

impl FleetArgs {
    /// `ajour serve` under test with one more device endpoint on (`endpoint_flags`), on its
    /// defaults otherwise (and `--serve-arg`s), serving the benchmark image, its devices
    /// registered as the documented way registers them (plain passwords through the API). The
    /// guard keeps its data directory.
    pub async fn start_ajour_with(
        &self,
        endpoint_flags: &[&str],
    ) -> anyhow::Result<(tempfile::TempDir, ServerProcess)> {
        let ajour = self.ajour_binary()?;
        let (data, data_dir) = data_dir_with_firmware(&ajour, self.image_size)?;
        let mut serve_args = serve_flags(&data_dir);
        serve_args.extend_from_slice(endpoint_flags);
        serve_args.extend(self.serve_args.iter().map(String::as_str));
        let server = ServerProcess::start(&ajour, &serve_args)?;
        provision(&server.url, self.devices, Some(Credentials::Plain), false).await?;
        Ok((data, server))
    }

    /// The bare baseline `subcommand` of this binary, serving the benchmark image.
    pub fn start_bare(&self, subcommand: &str) -> anyhow::Result<ServerProcess> {
        let size = self.image_size.to_string();
        ServerProcess::start(
            &Self::bench_binary()?,
            &[subcommand, "--image-size", &size, "--version", TO],
        )
    }

    /// The `ajour` binary to start, which must exist.
    pub fn ajour_binary(&self) -> anyhow::Result<PathBuf> {
        let path = match &self.ajour {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("finding this program")?
                .with_file_name("ajour"),
        };
        if !path.is_file() {
            bail!(
                "no ajour binary at {}: build it with `cargo build --release -p ajour`, or give its path \
                 with --ajour PATH (or AJOUR_BIN)",
                path.display()
            );
        }
        Ok(path)
    }

    /// This program, which serves the bare baselines.
    pub fn bench_binary() -> anyhow::Result<PathBuf> {
        std::env::current_exe().context("finding this program")
    }
}

/// `ajour serve` on a free port with the benchmark's API token, its data in `data_dir`; the
/// caller adds the flags of its kind of run.
pub fn serve_flags(data_dir: &str) -> Vec<&str> {
    vec![
        "serve",
        "--data-dir",
        data_dir,
        "--listen",
        "127.0.0.1:0",
        "--api-token",
        API_TOKEN,
    ]
}

/// The firmware every benchmark serves: deterministic, so runs are comparable.
pub fn bench_image(size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

pub fn device_name(i: u32) -> String {
    format!("dev-{i}")
}

/// A temp data directory for `ajour serve` holding the benchmark firmware as `bench-fw`, stored
/// by `ajour firmware add`; the directory lives as long as the returned guard.
pub fn data_dir_with_firmware(
    ajour: &std::path::Path,
    image_size: usize,
) -> anyhow::Result<(tempfile::TempDir, String)> {
    let data = tempfile::tempdir()?;
    let image = data.path().join("bench-fw.bin");
    std::fs::write(&image, bench_image(image_size))?;
    let path = data.path().to_str().context("temp dir path")?.to_string();
    let added = std::process::Command::new(ajour)
        .args([
            "firmware",
            "add",
            "bench-fw",
            "--version",
            TO,
            "--data-dir",
            &path,
            "--file",
        ])
        .arg(&image)
        .output()
        .with_context(|| format!("running {} firmware add", ajour.display()))?;
    if !added.status.success() {
        bail!(
            "ajour firmware add failed ({}): {}",
            added.status,
            String::from_utf8_lossy(&added.stderr).trim()
        );
    }
    Ok((data, path))
}

/// How the benchmark registers its devices' password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Credentials {
    /// As the README and docs tell users to: `{"pass": "..."}` in plain text through the REST
    /// API, which the server stores as a keyed verifier. What a user gets.
    Plain,
    /// Imported from elsewhere: one password pre-hashed with bcrypt at cost 4, given as
    /// `{"pass": {"bcrypt": ...}}`, verified slowly once per device, then through the verifier
    /// derived from it.
    Bcrypt4,
}

impl Credentials {
    fn credential(self) -> anyhow::Result<Value> {
        Ok(match self {
            Credentials::Plain => json!({"pass": PASSWORD}),
            Credentials::Bcrypt4 => json!({"pass": {"bcrypt": bcrypt::hash(PASSWORD, 4)?}}),
        })
    }
}

/// One application with the firmware, and N devices, with `credentials`, or none (devices behind
/// Drogue, which authenticated them already).
pub async fn provision(
    url: &str,
    devices: u32,
    credentials: Option<Credentials>,
    rollout: bool,
) -> anyhow::Result<()> {
    let mut config = RegistryClientConfig::new(url);
    config.token = Some(API_TOKEN.into());
    config.timeout = Duration::from_secs(30);
    let client = Arc::new(RegistryClient::new(&config)?);
    let firmware = json!({"file": {"name": "bench-fw"}});
    let spec = match rollout {
        true => json!({}),
        false => json!({"firmware": firmware}),
    };
    create(
        &client,
        &["apps"],
        &json!({"metadata": {"name": APP}, "spec": spec}),
    )
    .await?;
    let device = match credentials {
        Some(credentials) => {
            json!({"spec": {"authentication": {"credentials": [credentials.credential()?]}}})
        }
        None => json!({}),
    };
    let registering = FleetOptions {
        concurrency: 32,
        progress: "registering devices".into(),
    };
    let names = (0..devices).map(device_name).collect();
    let created = run_fleet(names, &registering, |name| {
        let (client, mut body) = (client.clone(), device.clone());
        body["metadata"] = json!({"name": name});
        async move { create(&client, &["apps", APP, "devices"], &body).await }
    })
    .await?;
    for (name, result) in created {
        result.with_context(|| format!("registering {name}"))?;
    }
    if rollout {
        let rollouts = format!(
            "{}/api/dfu/v1alpha1/apps/{APP}/rollouts",
            url.trim_end_matches('/')
        );
        let url = reqwest::Url::parse(&rollouts)?;
        let body = json!({"firmware": firmware, "waves": [{"percent": 100}]});
        let answer = client
            .send(reqwest::Method::POST, url.clone(), Some(&body))
            .await
            .map_err(|e| anyhow!("POST {url}: {e}"))?;
        if !answer.status.is_success() {
            let (_, message) = answer.error();
            bail!("POST {url}: {}: {message}", answer.status);
        }
    }
    Ok(())
}

/// POST `body` to the registry API at `path`; an error unless it was created.
async fn create(client: &RegistryClient, path: &[&str], body: &Value) -> anyhow::Result<()> {
    let url = client.url(path);
    let answer = client
        .send(reqwest::Method::POST, url.clone(), Some(body))
        .await
        .map_err(|e| anyhow!("POST {url}: {e}"))?;
    if !answer.status.is_success() {
        let (_, message) = answer.error();
        bail!("POST {url}: {}: {message}", answer.status);
    }
    Ok(())
}

/// How a run drives the fleet.
pub struct Load {
    pub target: &'static str,
    /// Stop each device after this many blocks (0: the whole update, through Swap and Sync).
    pub blocks: u32,
    /// Statuses in flight at once, over the fleet (none: no limit).
    pub in_flight: Option<usize>,
    /// Measure this process's CPU too (the broker's).
    pub broker_pid: Option<u32>,
}

/// Run every device until it is done (or has sent `load.blocks` blocks) over the link
/// `link(name)` gives it, measuring as it goes. All devices run at once. CPU and peak memory are
/// summed over `servers` (the instances of one server under test).
pub async fn drive<L: Link + 'static>(
    servers: &[ServerProcess],
    fleet: &FleetArgs,
    load: &Load,
    link: impl Fn(&str) -> L,
) -> anyhow::Result<LoadReport> {
    let target = load.target;
    let image = Arc::new(bench_image(fleet.image_size));
    let options = DeviceOptions {
        in_flight: load.in_flight.map(|n| Arc::new(Semaphore::new(n.max(1)))),
        ..DeviceOptions::new(
            StatusEncoding::Packed,
            Duration::from_secs(1),
            Duration::from_secs(fleet.timeout),
        )
    };
    let everyone = FleetOptions {
        concurrency: fleet.devices as usize,
        progress: target.into(),
    };
    let (mtu, blocks) = (fleet.mtu, load.blocks);
    let names = (0..fleet.devices).map(device_name).collect();
    let servers_cpu = || {
        servers
            .iter()
            .map(ServerProcess::cpu_seconds)
            .sum::<anyhow::Result<f64>>()
    };
    let cpu_before = servers_cpu()?;
    let broker_before = load.broker_pid.map(cpu_seconds).transpose()?;
    let started = Instant::now();
    let devices = run_fleet(names, &everyone, |name| {
        let (mut link, image, options) = (link(&name), image.clone(), options.clone());
        async move {
            let mut device = SimulatedDevice::new(FROM, Some(mtu));
            let mut measured = DeviceLatencies::new(blocks);
            match run_device(&mut device, &mut link, &options, &mut measured).await? {
                // Held part-way by --blocks.
                Ended::Stopped => {}
                Ended::Done(Outcome::Updated { to, .. })
                    if to == TO && device.written() == image.as_slice() => {}
                Ended::Done(outcome) => bail!("ended {outcome:?}, not updated to {TO} with the image"),
            }
            Ok(measured)
        }
    });
    let devices = tokio::time::timeout(Duration::from_secs(fleet.timeout), devices)
        .await
        .map_err(|_| anyhow!("{target}: benchmark timed out"))??;
    let elapsed = started.elapsed();
    let cpu_seconds_used = servers_cpu()? - cpu_before;
    let broker_cpu_seconds = match (load.broker_pid, broker_before) {
        (Some(pid), Some(before)) => Some(cpu_seconds(pid)? - before),
        _ => None,
    };
    let mut latencies = Latencies::new()?;
    let (mut round_trips, mut resends, mut reconnects) = (0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    for (name, result) in devices {
        match result {
            Ok(device) => {
                round_trips += device.rest.len() as u64 + u64::from(device.first.is_some());
                resends += device.resends;
                reconnects += device.reconnects;
                for micros in device.rest {
                    latencies.rest.record(micros)?;
                }
                if let Some(first) = device.first {
                    latencies.first.record(first)?;
                }
            }
            Err(error) => failures.push(format!("{name}: {error:#}")),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{target}: {} device(s) failed; first: {}",
            failures.len(),
            failures[0]
        );
    }
    if resends > 0 {
        // Not a failure (devices resend, as real ones do), but the figures include the waits.
        println!("{target}: {resends} status(es) sent again after no command within --command-timeout");
    }
    if reconnects > 0 {
        println!("{target}: {reconnects} status(es) sent again after a connection error");
    }
    let mut report = LoadReport::new(
        target,
        round_trips,
        elapsed,
        &latencies,
        cpu_seconds_used,
        servers
            .iter()
            .map(ServerProcess::peak_rss_mib)
            .sum::<anyhow::Result<f64>>()?,
    );
    report.broker_cpu_seconds = broker_cpu_seconds;
    Ok(report)
}

/// Latencies of one device: its first round trip (which carries the one password verification and
/// the first registry read) apart from the rest, which is the steady cost of delivering blocks.
struct DeviceLatencies {
    first: Option<u64>,
    rest: Vec<u64>,
    resends: u64,
    reconnects: u64,
    /// Stop after this many blocks (0: never).
    blocks: u32,
    writes: u32,
}

impl DeviceLatencies {
    fn new(blocks: u32) -> Self {
        Self {
            first: None,
            rest: Vec::new(),
            resends: 0,
            reconnects: 0,
            blocks,
            writes: 0,
        }
    }
}

impl Observer for DeviceLatencies {
    fn answered(&mut self, latency: Duration, step: &Step) -> anyhow::Result<ControlFlow<()>> {
        let micros = latency.as_micros().max(1) as u64;
        match self.first {
            None => self.first = Some(micros),
            Some(_) => self.rest.push(micros),
        }
        match step {
            Step::Continue => {
                self.writes += 1;
                if self.blocks > 0 && self.writes >= self.blocks {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Step::Wait(poll) => bail!("told to wait {poll} s: the firmware should be there"),
            Step::Done(_) => {}
        }
        Ok(ControlFlow::Continue(()))
    }

    fn unanswered(&mut self) {
        self.resends += 1;
    }

    fn connection_lost(&mut self, _error: &str) {
        self.reconnects += 1;
    }
}
