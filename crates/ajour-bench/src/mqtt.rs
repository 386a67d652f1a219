//! `ajour-bench mqtt`: N devices updating concurrently through the Drogue MQTT integration path,
//! via a real Mosquitto broker.
//!
//! The devices play behind Drogue as `ajour simulate --via-mqtt` does ([`DrogueMqtt`]: one
//! connection for the fleet, each status a structured CloudEvent on `app/{app}`, commands taken
//! from `command/{app}/{device}/dfu`). Two targets answer them, one after the other, behind the
//! same broker and with the same messages:
//!
//! - `ajour`: `ajour serve` in Drogue mode, its registry a second `ajour serve` (SQLite) speaking
//!   Drogue's registry API, as in the Drogue tests;
//! - `bare`: `ajour-bench bare-mqtt-server` ([`crate::bare_mqtt`]), a minimal server sharing no
//!   code with Ajour: decode the event and the status, slice the image, publish; no registry.
//!
//! On two shared cores one run says little: `--runs N` runs both targets N times, alternating, and
//! reports the median ratio.
//!
//! The broker is measured too (its CPU seconds per run), since on one machine it competes with
//! the server for the same cores.

use crate::fleet::{
    data_dir_with_firmware, drive, provision, serve_flags, FleetArgs, Load, API_TOKEN, APP, FROM, TO,
};
use crate::process::ServerProcess;
use crate::report::{print_table, status_writes, LoadReport};
use ajour_client::mqtt::MqttConfig;
use ajour_sim::DrogueMqtt;
use ajour_sim::{EncodedStatus, Link, LinkError, SimulatedDevice, StatusEncoding};
use ajour_testkit::mosquitto::{Mosquitto, MosquittoOptions};
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct MqttBenchArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Use this broker (`mqtt://127.0.0.1:PORT`) instead of starting a Mosquitto of our own.
    #[arg(long)]
    pub broker: Option<String>,
    /// The Mosquitto binary (default: $AJOUR_TEST_MOSQUITTO, else /usr/sbin/mosquitto, else
    /// `mosquitto` on the PATH).
    #[arg(long)]
    pub mosquitto: Option<PathBuf>,
    /// `--drogue-workers` of the server under test (default: serve's own).
    #[arg(long)]
    pub workers: Option<u16>,
    /// Seconds a device waits for its command before sending its status again.
    #[arg(long, default_value_t = 30.0)]
    pub command_timeout: f64,
    /// Measure both targets this many times, alternating (ajour, bare, ajour, bare, ...), and
    /// report each run and the median ratio.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
}

pub async fn run(args: MqttBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.fleet.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(args.command_timeout > 0.0, "--command-timeout must be positive");
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let own_broker = match &args.broker {
        Some(_) => None,
        None => Some(
            Mosquitto::start_with(&MosquittoOptions {
                binary: args.mosquitto.clone(),
                // Room for a status from every device queued for the server at once (beyond that
                // Mosquitto drops QoS 1 messages).
                max_queued_messages: 1_000_000,
                ..MosquittoOptions::default()
            })
            .context("install Mosquitto, or give --broker")?,
        ),
    };
    let url = match (&own_broker, &args.broker) {
        (Some(broker), _) => broker.url(),
        (None, Some(url)) => url.clone(),
        (None, None) => unreachable!("a broker is given or started"),
    };
    let broker_pid = own_broker.as_ref().and_then(Mosquitto::pid);
    let runs = args.runs.max(1);
    let mut ratios = Vec::new();
    for run in 1..=runs {
        let mut reports = Vec::new();
        if !args.fleet.no_ajour {
            reports.push(run_ajour(&args, &url, broker_pid).await?);
        }
        if !args.fleet.no_bare {
            reports.push(run_bare(&args, &url, broker_pid).await?);
        }
        if let [ajour, bare] = reports.as_slice() {
            ratios.push(ajour.round_trips_per_second() / bare.round_trips_per_second());
        }
        print_table(
            &format!(
                "MQTT integration path through {}: {} devices, image {} bytes, mtu {}, whole update{}",
                if own_broker.is_some() {
                    "Mosquitto"
                } else {
                    url.as_str()
                },
                args.fleet.devices,
                args.fleet.image_size,
                args.fleet.mtu,
                if runs > 1 {
                    format!(" (run {run} of {runs})")
                } else {
                    String::new()
                }
            ),
            &reports,
        );
    }
    if ratios.len() > 1 {
        let each: Vec<String> = ratios.iter().map(|r| format!("{:.0}%", r * 100.0)).collect();
        println!(
            "ajour/bare over {} alternating runs: {} (median {:.0}%)",
            ratios.len(),
            each.join(", "),
            median(&mut ratios) * 100.0
        );
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

async fn run_ajour(
    args: &MqttBenchArgs,
    broker: &str,
    broker_pid: Option<u32>,
) -> anyhow::Result<LoadReport> {
    let ajour = args.fleet.ajour_binary()?;
    // Drogue's registry, played by Ajour's own REST API (as in the Drogue tests).
    let registry_data = tempfile::tempdir()?;
    let registry_dir = registry_data
        .path()
        .to_str()
        .context("temp dir path")?
        .to_string();
    let registry = ServerProcess::start(&ajour, &serve_flags(&registry_dir))?;
    provision(&registry.url, args.fleet.devices, None, false).await?;

    // The server under test reads firmware from its own sources, named by the registry's spec.
    let (_data, data_dir) = data_dir_with_firmware(&ajour, args.fleet.image_size)?;
    let workers = args.workers.map(|w| w.to_string());
    let mut serve_args = serve_flags(&data_dir);
    serve_args.extend([
        "--drogue-mqtt-url",
        broker,
        "--drogue-registry-url",
        &registry.url,
        "--drogue-token",
        API_TOKEN,
        "--application",
        APP,
    ]);
    if let Some(workers) = &workers {
        serve_args.extend(["--drogue-workers", workers]);
    }
    serve_args.extend(args.fleet.serve_args.iter().map(String::as_str));
    let server = ServerProcess::start(&ajour, &serve_args)?;
    // The registry runs on the same cores; what it costs is shown apart from the server's.
    let registry_before = registry.cpu_seconds()?;
    let mut report = drive_mqtt(&server, broker, broker_pid, args, "ajour").await?;
    println!(
        "registry (Drogue's, played by a second ajour serve) cpu during ajour: {:.2} s",
        registry.cpu_seconds()? - registry_before
    );
    report.status_writes = Some(settled_status_writes(&server.url).await? / f64::from(args.fleet.devices));
    println!(
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
    let server = ServerProcess::start(
        &FleetArgs::bench_binary()?,
        &[
            "bare-mqtt-server",
            "--broker",
            broker,
            "--app",
            APP,
            "--image-size",
            &size,
            "--version",
            TO,
        ],
    )?;
    drive_mqtt(&server, broker, broker_pid, args, "bare").await
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

/// Every device on the fleet's one connection, once the target answers.
async fn drive_mqtt(
    server: &ServerProcess,
    broker: &str,
    broker_pid: Option<u32>,
    args: &MqttBenchArgs,
    target: &'static str,
) -> anyhow::Result<LoadReport> {
    let mqtt = DrogueMqtt::connect(&MqttConfig::new(broker, "ajour-bench"), APP).await?;
    answering(&mqtt, target).await?;
    let command_timeout = Duration::from_secs_f64(args.command_timeout);
    let load = Load {
        target,
        blocks: 0,
        in_flight: None,
        broker_pid,
    };
    drive(std::slice::from_ref(server), &args.fleet, &load, |name| {
        mqtt.link(name, command_timeout)
    })
    .await
}

/// Wait until the target answers: it subscribes after it starts, and a status published before
/// is lost. A device the registry does not know is answered too (told to wait), so a probe of
/// that name starts no update and writes no status.
async fn answering(mqtt: &DrogueMqtt, target: &str) -> anyhow::Result<()> {
    let mut probe = mqtt.link("bench-probe", Duration::from_millis(250));
    let status = EncodedStatus {
        bytes: SimulatedDevice::new(FROM, None).encoded_status(StatusEncoding::Packed),
        encoding: StatusEncoding::Packed,
        correlation_id: None,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match probe.exchange(status.clone()).await {
            Ok(_) => return Ok(()),
            Err(LinkError::NoAnswer) => {}
            Err(error) => return Err(error).context("probing the target"),
        }
    }
    bail!("{target} did not answer a status on the broker within 30 s")
}
