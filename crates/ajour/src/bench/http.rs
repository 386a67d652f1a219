//! `ajour bench http`: N devices updating concurrently over the HTTP endpoint.

use super::process::ServerProcess;
use crate::simulate::{progress_bar, SimulatedDevice, StatusEncoding, Step};
use ajour_store::{FileStore, FirmwareName};
use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct HttpBenchArgs {
    #[command(flatten)]
    pub fleet: super::FleetArgs,
    /// Stop each device after this many blocks (0: the whole update, through Swap and Sync).
    /// With a large image this holds the fleet in the middle of its update, to measure memory.
    #[arg(long, default_value_t = 0)]
    pub blocks: u32,
    /// Most requests in flight at once (one connection each).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Registry database for `ajour serve` (default: SQLite in a temp dir).
    #[arg(long)]
    pub database_url: Option<String>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub target: &'static str,
    pub round_trips: u64,
    pub elapsed: Duration,
    /// Each device's first round trip: password verification and first registry read.
    pub first_p50_us: u64,
    pub first_p99_us: u64,
    /// All later round trips: the steady cost per block.
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
    pub status_writes: Option<f64>,
    /// CPU seconds the MQTT broker spent carrying this run's messages (MQTT benchmarks only).
    pub broker_cpu_seconds: Option<f64>,
}

/// The longest latency recorded: ten minutes, in microseconds.
pub const MAX_LATENCY_US: u64 = 600_000_000;

/// The latencies of one run: each device's first round trip, and all the others.
pub struct Latencies {
    pub first: Histogram<u64>,
    pub rest: Histogram<u64>,
}

impl Latencies {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            first: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
            rest: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
        })
    }
}

impl LoadReport {
    /// A report of a run of `target`, before the figures only some targets have.
    pub fn new(
        target: &'static str,
        round_trips: u64,
        elapsed: Duration,
        latencies: &Latencies,
        cpu_seconds: f64,
        peak_rss_mib: f64,
    ) -> Self {
        Self {
            target,
            round_trips,
            elapsed,
            first_p50_us: latencies.first.value_at_quantile(0.50),
            first_p99_us: latencies.first.value_at_quantile(0.99),
            p50_us: latencies.rest.value_at_quantile(0.50),
            p99_us: latencies.rest.value_at_quantile(0.99),
            max_us: latencies.rest.max(),
            cpu_seconds,
            peak_rss_mib,
            status_writes: None,
            broker_cpu_seconds: None,
        }
    }

    pub fn round_trips_per_second(&self) -> f64 {
        self.round_trips as f64 / self.elapsed.as_secs_f64()
    }
}

pub(super) const APP: &str = "bench";
const PASSWORD: &str = "bench-password";
pub(super) const FROM: &str = "1.0.0";
pub(super) const TO: &str = "2.0.0";
pub(super) const API_TOKEN: &str = "bench-token";

pub async fn run(args: HttpBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.fleet.devices > 0, "--devices must be at least 1");
    // Each in-flight request holds a socket in both processes.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut reports = Vec::new();
    if !args.fleet.no_ajour {
        reports.push(run_ajour(&args).await?);
    }
    if !args.fleet.no_bare {
        reports.push(run_bare(&args).await?);
    }
    print_reports(&args, &reports);
    Ok(())
}

/// A temp data directory for `ajour serve` holding the benchmark firmware as `bench-fw`; the
/// directory lives as long as the returned guard.
pub(super) fn data_dir_with_firmware(image_size: usize) -> anyhow::Result<(tempfile::TempDir, String)> {
    let data = tempfile::tempdir()?;
    FileStore::new(crate::server::firmware_dir(data.path()), Duration::ZERO).add(
        &FirmwareName::parse("bench-fw")?,
        TO,
        &super::bench_image(image_size),
    )?;
    let path = data.path().to_str().context("temp dir path")?.to_string();
    Ok((data, path))
}

async fn run_ajour(args: &HttpBenchArgs) -> anyhow::Result<LoadReport> {
    let (_data, data_dir) = data_dir_with_firmware(args.fleet.image_size)?;
    let mut serve_args = vec![
        "serve",
        "--data-dir",
        &data_dir,
        "--listen",
        "127.0.0.1:0",
        "--api-token",
        API_TOKEN,
        "--max-mtu",
        "65536",
    ];
    if let Some(url) = &args.database_url {
        serve_args.extend(["--database-url", url]);
    }
    serve_args.extend(args.fleet.serve_args.iter().map(String::as_str));
    let server = ServerProcess::start(&serve_args)?;
    provision(&server.url, args.fleet.devices, true).await?;
    let mut report = drive(&server, args, "ajour").await?;
    report.status_writes = Some(status_writes(&server.url).await? / f64::from(args.fleet.devices));
    Ok(report)
}

async fn run_bare(args: &HttpBenchArgs) -> anyhow::Result<LoadReport> {
    let size = args.fleet.image_size.to_string();
    let server = ServerProcess::start(&["bench", "bare-server", "--image-size", &size, "--version", TO])?;
    drive(&server, args, "bare").await
}

/// One application with the firmware, and N devices. With `credentials`, the devices share one
/// pre-hashed password (bcrypt cost 4): the server verifies each device's password once, as in
/// production, without the benchmark spending minutes hashing at registration. Without (devices
/// behind Drogue, which authenticated them already), they have none.
pub(super) async fn provision(url: &str, devices: u32, credentials: bool) -> anyhow::Result<()> {
    let client = crate::client::ApiClient::new(url, API_TOKEN)?;
    client
        .create(
            "apps",
            &json!({"metadata": {"name": APP}, "spec": {"firmware": {"file": {"name": "bench-fw"}}}}),
        )
        .await?;
    let hash = if credentials {
        bcrypt::hash(PASSWORD, 4)?
    } else {
        String::new()
    };
    let bar = progress_bar(u64::from(devices), "registering devices");
    let client = Arc::new(client);
    let mut names = (0..devices).map(device_name);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.len() < 32 {
            let Some(name) = names.next() else { break };
            let (client, hash) = (client.clone(), hash.clone());
            tasks.spawn(async move {
                let body = if credentials {
                    json!({"metadata": {"name": name},
                        "spec": {"authentication": {"credentials": [{"pass": {"bcrypt": hash}}]}}})
                } else {
                    json!({"metadata": {"name": name}})
                };
                client.create(&format!("apps/{APP}/devices"), &body).await
            });
        }
        match tasks.join_next().await {
            Some(done) => {
                done??;
                bar.inc(1);
            }
            None => break,
        }
    }
    bar.finish_and_clear();
    Ok(())
}

pub(super) fn device_name(i: u32) -> String {
    format!("dev-{i}")
}

/// Run every device until it is done (or has sent `--blocks` blocks), measuring as it goes.
async fn drive(
    server: &ServerProcess,
    args: &HttpBenchArgs,
    target: &'static str,
) -> anyhow::Result<LoadReport> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = format!("{}/v1/dfu", server.url);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(args.connections.max(1)));
    let bar = progress_bar(u64::from(args.fleet.devices), target);
    let cpu_before = server.cpu_seconds()?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.fleet.devices {
        let (http, url, in_flight, bar) = (http.clone(), url.clone(), in_flight.clone(), bar.clone());
        let (mtu, blocks) = (args.fleet.mtu, args.blocks);
        tasks.spawn(async move {
            let result = device(&http, &url, i, mtu, blocks, &in_flight).await;
            bar.inc(1);
            result
        });
    }
    let mut latencies = Latencies::new()?;
    let mut round_trips = 0u64;
    let mut failures = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.fleet.timeout);
    while let Some(joined) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .context("benchmark timed out")?
    {
        match joined? {
            Ok(device) => {
                round_trips += device.rest.len() + 1;
                latencies.rest.add(&device.rest)?;
                latencies.first.record(device.first)?;
            }
            Err(error) => failures.push(error),
        }
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    if !failures.is_empty() {
        bail!(
            "{target}: {} device(s) failed; first: {:#}",
            failures.len(),
            failures[0]
        );
    }
    Ok(LoadReport::new(
        target,
        round_trips,
        elapsed,
        &latencies,
        server.cpu_seconds()? - cpu_before,
        server.peak_rss_mib()?,
    ))
}

/// Latencies of one device: its first round trip (which carries the one password verification and
/// the first registry read) apart from the rest, which is the steady cost of delivering blocks.
struct DeviceLatencies {
    first: u64,
    rest: Histogram<u64>,
}

/// One device's update, with the latency of each round trip.
async fn device(
    http: &reqwest::Client,
    url: &str,
    index: u32,
    mtu: u32,
    blocks: u32,
    in_flight: &tokio::sync::Semaphore,
) -> anyhow::Result<DeviceLatencies> {
    let name = device_name(index);
    let authorization = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{name}@{APP}:{PASSWORD}"))
    );
    let mut device = SimulatedDevice::new(FROM, Some(mtu), None);
    let mut latencies = DeviceLatencies {
        first: 0,
        rest: Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?,
    };
    let mut writes = 0u32;
    let mut round_trip = 0u64;
    loop {
        let body = device.encoded_status(StatusEncoding::Packed);
        let permit = in_flight.acquire().await?;
        let sent = Instant::now();
        let response = http
            .post(url)
            .header("authorization", &authorization)
            .header("content-type", "application/cbor")
            .body(body)
            .send()
            .await
            .with_context(|| format!("{name}: POST {url}"))?;
        let code = response.status();
        let bytes = response.bytes().await?;
        let micros = sent.elapsed().as_micros().max(1) as u64;
        drop(permit);
        round_trip += 1;
        if round_trip == 1 {
            latencies.first = micros;
        } else {
            latencies.rest.record(micros)?;
        }
        if code != reqwest::StatusCode::OK {
            bail!("{name}: answer {code}: {}", String::from_utf8_lossy(&bytes));
        }
        match device.apply_bytes(&bytes).with_context(|| name.clone())? {
            Step::Continue => {
                writes += 1;
                if blocks > 0 && writes >= blocks {
                    return Ok(latencies);
                }
            }
            Step::Wait(poll) => bail!("{name}: told to wait {poll} s: the firmware should be there"),
            Step::Done(_) => return Ok(latencies),
        }
    }
}

/// `status.firmware` writes the server made, from its `/metrics`.
pub(super) async fn status_writes(url: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("ajour_registry_calls_total") && l.contains("op=\"set_status\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn print_reports(args: &HttpBenchArgs, reports: &[LoadReport]) {
    let title = format!(
        "HTTP endpoint: {} devices, image {} bytes, mtu {}, {}, {} connections",
        args.fleet.devices,
        args.fleet.image_size,
        args.fleet.mtu,
        if args.blocks == 0 {
            "whole update".to_string()
        } else {
            format!("{} blocks each", args.blocks)
        },
        args.connections
    );
    print_table(&title, reports);
}

/// The table every benchmark prints: one row per target, then how Ajour compares to the bare
/// baseline when both ran.
pub(super) fn print_table(title: &str, reports: &[LoadReport]) {
    crate::say!("{title}");
    crate::say!(
        "{:<6} {:>11} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>9} {:>8}",
        "target",
        "round trips",
        "seconds",
        "rt/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "1st p50",
        "1st p99",
        "server cpu",
        "peak MiB",
        "writes/d"
    );
    let ms = |us: u64| us as f64 / 1000.0;
    for r in reports {
        crate::say!(
            "{:<6} {:>11} {:>8.2} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>10.2} {:>9.1} {:>8}",
            r.target,
            r.round_trips,
            r.elapsed.as_secs_f64(),
            r.round_trips_per_second(),
            ms(r.p50_us),
            ms(r.p99_us),
            ms(r.max_us),
            ms(r.first_p50_us),
            ms(r.first_p99_us),
            r.cpu_seconds,
            r.peak_rss_mib,
            r.status_writes
                .map(|w| format!("{w:.2}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    if let [ajour, bare] = reports {
        crate::say!(
            "ajour/bare: {:.0}% of the round trips per second, p99 {:.2}x (after each device's first round trip)",
            100.0 * ajour.round_trips_per_second() / bare.round_trips_per_second(),
            ajour.p99_us as f64 / bare.p99_us.max(1) as f64
        );
    }
    for r in reports {
        if let Some(cpu) = r.broker_cpu_seconds {
            crate::say!("broker cpu during {}: {cpu:.2} s", r.target);
        }
    }
}
