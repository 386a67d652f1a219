//! `ajour bench mqtt`: N devices updating concurrently through the Drogue MQTT integration path,
//! via a real Mosquitto broker.
//!
//! The devices play behind Drogue as `ajour simulate --via-mqtt` does ([`Fleet`]: one connection
//! for the fleet, each status a structured CloudEvent on `app/{app}`, commands taken from
//! `command/{app}/{device}/dfu`). Two targets answer them, one after the other, behind the same
//! broker and with the same messages:
//!
//! - `ajour`: `ajour serve` in Drogue mode, its registry a second `ajour serve` (SQLite) speaking
//!   Drogue's registry API, as in the Drogue tests;
//! - `bare`: `ajour bench bare-mqtt-server` ([`super::bare_mqtt`]): parse, decide, encode,
//!   publish; no registry.
//!
//! The broker is measured too (its CPU seconds per run), since on one machine it competes with
//! the server for the same cores.

use super::http::{
    data_dir_with_firmware, device_name, print_table, provision, status_writes, Latencies, LoadReport,
    API_TOKEN, APP, FROM, MAX_LATENCY_US, TO,
};
use super::process::{self, ServerProcess};
use crate::simulate::{progress_bar, Outcome, SimulatedDevice, StatusEncoding, Step};
use crate::simulate_mqtt::Fleet;
use ajour_client::mqtt::MqttConfig;
use anyhow::{bail, Context};
use clap::Args;
use hdrhistogram::Histogram;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct MqttBenchArgs {
    #[command(flatten)]
    pub fleet: super::FleetArgs,
    /// Use this broker (`mqtt://127.0.0.1:PORT`) instead of starting a Mosquitto of our own.
    #[arg(long)]
    pub broker: Option<String>,
    /// The Mosquitto binary (default: /usr/sbin/mosquitto, else `mosquitto` on the PATH).
    #[arg(long)]
    pub mosquitto: Option<PathBuf>,
    /// `--drogue-workers` of the server under test (default: serve's own).
    #[arg(long)]
    pub workers: Option<u16>,
    /// Seconds a device waits for its command before sending its status again.
    #[arg(long, default_value_t = 30.0)]
    pub command_timeout: f64,
}

pub async fn run(args: MqttBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.fleet.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(args.command_timeout > 0.0, "--command-timeout must be positive");
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let own_broker = match &args.broker {
        Some(_) => None,
        None => Some(Broker::start(args.mosquitto.as_deref())?),
    };
    let url = match (&own_broker, &args.broker) {
        (Some(broker), _) => broker.url.clone(),
        (None, Some(url)) => url.clone(),
        (None, None) => unreachable!("a broker is given or started"),
    };
    let broker_pid = own_broker.as_ref().map(Broker::pid);
    let mut reports = Vec::new();
    if !args.fleet.no_ajour {
        reports.push(run_ajour(&args, &url, broker_pid).await?);
    }
    if !args.fleet.no_bare {
        reports.push(run_bare(&args, &url, broker_pid).await?);
    }
    print_table(
        &format!(
            "MQTT integration path through {}: {} devices, image {} bytes, mtu {}, whole update",
            if own_broker.is_some() {
                "Mosquitto"
            } else {
                url.as_str()
            },
            args.fleet.devices,
            args.fleet.image_size,
            args.fleet.mtu
        ),
        &reports,
    );
    Ok(())
}

async fn run_ajour(
    args: &MqttBenchArgs,
    broker: &str,
    broker_pid: Option<u32>,
) -> anyhow::Result<LoadReport> {
    // Drogue's registry, played by Ajour's own REST API (as in the Drogue tests).
    let registry_data = tempfile::tempdir()?;
    let registry_dir = registry_data
        .path()
        .to_str()
        .context("temp dir path")?
        .to_string();
    let registry = ServerProcess::start(&[
        "serve",
        "--data-dir",
        &registry_dir,
        "--listen",
        "127.0.0.1:0",
        "--api-token",
        API_TOKEN,
    ])?;
    provision(&registry.url, args.fleet.devices, false).await?;

    // The server under test reads firmware from its own sources, named by the registry's spec.
    let (_data, data_dir) = data_dir_with_firmware(args.fleet.image_size)?;
    let workers = args.workers.map(|w| w.to_string());
    let mut serve_args = vec![
        "serve",
        "--data-dir",
        &data_dir,
        "--listen",
        "127.0.0.1:0",
        "--api-token",
        API_TOKEN,
        "--drogue-mqtt-url",
        broker,
        "--drogue-registry-url",
        &registry.url,
        "--drogue-token",
        API_TOKEN,
        "--application",
        APP,
    ];
    if let Some(workers) = &workers {
        serve_args.extend(["--drogue-workers", workers]);
    }
    serve_args.extend(args.fleet.serve_args.iter().map(String::as_str));
    let server = ServerProcess::start(&serve_args)?;
    // The registry runs on the same cores; what it costs is shown apart from the server's.
    let registry_before = registry.cpu_seconds()?;
    let mut report = drive(&server, broker, broker_pid, args, "ajour").await?;
    crate::say!(
        "registry (Drogue's, played by a second ajour serve) cpu during ajour: {:.2} s",
        registry.cpu_seconds()? - registry_before
    );
    report.status_writes = Some(settled_status_writes(&server.url).await? / f64::from(args.fleet.devices));
    crate::say!(
        "registry calls per device during ajour: {}",
        registry_calls(&server.url, args.fleet.devices).await?
    );
    Ok(report)
}

/// `ajour_registry_calls_total` per device, by operation: in Drogue mode each is an HTTP request
/// to Drogue's registry, so this is where the registry's cost comes from.
async fn registry_calls(url: &str, devices: u32) -> anyhow::Result<String> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    let mut calls = std::collections::BTreeMap::<String, f64>::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("ajour_registry_calls_total{"))
    {
        let op = line
            .split_once("op=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(op, _)| op.to_string());
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(op), Some(value)) = (op, value) {
            *calls.entry(op).or_default() += value;
        }
    }
    Ok(calls
        .iter()
        .map(|(op, n)| format!("{op} {:.2}", n / f64::from(devices)))
        .collect::<Vec<_>>()
        .join(", "))
}

async fn run_bare(args: &MqttBenchArgs, broker: &str, broker_pid: Option<u32>) -> anyhow::Result<LoadReport> {
    let size = args.fleet.image_size.to_string();
    let server = ServerProcess::start(&[
        "bench",
        "bare-mqtt-server",
        "--broker",
        broker,
        "--app",
        APP,
        "--image-size",
        &size,
        "--version",
        TO,
    ])?;
    drive(&server, broker, broker_pid, args, "bare").await
}

/// Status writes are made in the background after the statuses they record: wait until the
/// count stops moving (briefly) before reading it.
async fn settled_status_writes(url: &str) -> anyhow::Result<f64> {
    let mut last = status_writes(url).await?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = status_writes(url).await?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// Run every device through its whole update, measuring as it goes.
async fn drive(
    server: &ServerProcess,
    broker: &str,
    broker_pid: Option<u32>,
    args: &MqttBenchArgs,
    target: &'static str,
) -> anyhow::Result<LoadReport> {
    let fleet = Arc::new(Fleet::connect_with(&MqttConfig::new(broker, "ajour-bench"), APP).await?);
    answering(&fleet, target).await?;
    let image = Arc::new(super::bench_image(args.fleet.image_size));
    let command_timeout = Duration::from_secs_f64(args.command_timeout);
    let bar = progress_bar(u64::from(args.fleet.devices), target);
    let cpu_before = server.cpu_seconds()?;
    let broker_before = broker_pid.map(process::cpu_seconds).transpose()?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.fleet.devices {
        let (fleet, image, bar) = (fleet.clone(), image.clone(), bar.clone());
        let mtu = args.fleet.mtu;
        tasks.spawn(async move {
            let result = device(&fleet, i, mtu, command_timeout, &image).await;
            bar.inc(1);
            result
        });
    }
    let mut latencies = Latencies::new()?;
    let (mut round_trips, mut resends) = (0u64, 0u64);
    let mut failures = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.fleet.timeout);
    while let Some(joined) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .with_context(|| format!("{target}: benchmark timed out"))?
    {
        match joined? {
            Ok(device) => {
                round_trips += device.rest.len() + 1;
                resends += device.resends;
                latencies.rest.add(&device.rest)?;
                latencies.first.record(device.first)?;
            }
            Err(error) => failures.push(error),
        }
    }
    let elapsed = started.elapsed();
    let cpu_seconds = server.cpu_seconds()? - cpu_before;
    let broker_cpu_seconds = match (broker_pid, broker_before) {
        (Some(pid), Some(before)) => Some(process::cpu_seconds(pid)? - before),
        _ => None,
    };
    bar.finish_and_clear();
    if !failures.is_empty() {
        bail!(
            "{target}: {} device(s) failed; first: {:#}",
            failures.len(),
            failures[0]
        );
    }
    if resends > 0 {
        // Not a failure (devices resend, as real ones do), but the figures include the waits.
        crate::say!("{target}: {resends} status(es) sent again after no command within --command-timeout");
    }
    let mut report = LoadReport::new(
        target,
        round_trips,
        elapsed,
        &latencies,
        cpu_seconds,
        server.peak_rss_mib()?,
    );
    report.broker_cpu_seconds = broker_cpu_seconds;
    Ok(report)
}

/// Wait until the target answers: it subscribes after it starts, and a status published before
/// is lost. A device the registry does not know is answered too (told to wait), so a probe of
/// that name starts no update and writes no status.
async fn answering(fleet: &Fleet, target: &str) -> anyhow::Result<()> {
    let mut commands = fleet.register("bench-probe");
    let status = SimulatedDevice::new(FROM, None, None).encoded_status(StatusEncoding::Packed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        fleet
            .publish_status("bench-probe", "application/cbor", &status)
            .await?;
        if let Ok(answer) = tokio::time::timeout(Duration::from_millis(250), commands.recv()).await {
            answer.context("the benchmark's MQTT connection has stopped")?;
            return Ok(());
        }
    }
    bail!("{target} did not answer a status on the broker within 30 s")
}

/// Latencies of one device: its first round trip (the first registry read) apart from the rest.
struct DeviceLatencies {
    first: u64,
    rest: Histogram<u64>,
    resends: u64,
}

/// One device's whole update, with the latency of each round trip: from publishing the status to
/// receiving the command that answers it.
async fn device(
    fleet: &Fleet,
    index: u32,
    mtu: u32,
    command_timeout: Duration,
    image: &[u8],
) -> anyhow::Result<DeviceLatencies> {
    let name = device_name(index);
    let mut commands = fleet.register(&name);
    let mut device = SimulatedDevice::new(FROM, Some(mtu), None);
    let mut latencies = DeviceLatencies {
        first: 0,
        rest: Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?,
        resends: 0,
    };
    let mut correlation_id: u32 = rand::random::<u32>() >> 1;
    let mut round_trip = 0u64;
    loop {
        correlation_id = correlation_id.wrapping_add(1);
        device.set_correlation_id(Some(correlation_id));
        let status = device.encoded_status(StatusEncoding::Packed);
        let sent = Instant::now();
        fleet
            .publish_status(&name, "application/cbor", &status)
            .await
            .with_context(|| name.clone())?;
        let deadline = tokio::time::Instant::from_std(sent + command_timeout);
        let step = loop {
            match tokio::time::timeout_at(deadline, commands.recv()).await {
                Err(_) => break None,
                Ok(None) => bail!("{name}: the benchmark's MQTT connection has stopped"),
                Ok(Some(bytes)) => {
                    let command = ajour_protocol::decode_command(&bytes)
                        .with_context(|| format!("{name}: decoding the server's command"))?;
                    if command.correlation_id() != Some(correlation_id) {
                        // The answer to a status sent before and sent again since.
                        continue;
                    }
                    break Some(device.apply(command).with_context(|| name.clone())?);
                }
            }
        };
        let Some(step) = step else {
            latencies.resends += 1;
            continue;
        };
        let micros = sent.elapsed().as_micros().max(1) as u64;
        round_trip += 1;
        if round_trip == 1 {
            latencies.first = micros;
        } else {
            latencies.rest.record(micros)?;
        }
        match step {
            Step::Continue => {}
            Step::Wait(poll) => bail!("{name}: told to wait {poll} s: the firmware should be there"),
            Step::Done(Outcome::Updated { to, .. }) if to == TO && device.written() == image => {
                return Ok(latencies)
            }
            Step::Done(outcome) => bail!("{name}: ended {outcome:?}, not updated to {TO} with the image"),
        }
    }
}

/// A Mosquitto of the benchmark's own on a free loopback port, killed on drop.
struct Broker {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start(binary: Option<&Path>) -> anyhow::Result<Self> {
        let binary = match binary {
            Some(path) => path.to_path_buf(),
            None if Path::new("/usr/sbin/mosquitto").exists() => PathBuf::from("/usr/sbin/mosquitto"),
            None => PathBuf::from("mosquitto"),
        };
        // A port free when asked for may be taken before the broker binds it: then it exits at
        // once, and another port is tried.
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(&binary) {
                Ok(broker) => return Ok(broker),
                Err(error) => last = format!("{error:#}"),
            }
        }
        bail!("Mosquitto did not start: {last}")
    }

    fn try_start(binary: &Path) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("mosquitto.conf");
        // No persistence (nothing to write per message); room for a status from every device
        // queued for the server at once (beyond that Mosquitto drops QoS 1 messages); no Nagle,
        // or every block waits for a delayed ACK.
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n\
                 max_queued_messages 1000000\nset_tcp_nodelay true\n"
            ),
        )?;
        let log_path = dir.path().join("mosquitto.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "running {} (install Mosquitto, or give --broker)",
                    binary.display()
                )
            })?;
        let mut broker = Self {
            child,
            url: format!("mqtt://127.0.0.1:{port}"),
            _dir: dir,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = broker.child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("mosquitto exited with {status}: {log}");
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(broker);
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not accept connections on {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
