//! `ajour simulate`: devices that update themselves over the HTTP endpoint, as `embedded-update`
//! devices do, and check what they were sent.
//!
//! A simulated device starts at `--version`, sends its status, and follows each command: a Write
//! must be at exactly the offset it holds (as drogue-device insists), a Swap's checksum must be the
//! SHA-256 of the bytes it received, and after the swap it "reboots" into the new version and
//! expects Sync. Anything else is a failure, reported with the device's name; the command exits
//! non-zero when any device fails.

use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
use anyhow::{anyhow, bail, Context};
use base64::Engine;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Base URL of the device endpoint.
    #[arg(long, env = "AJOUR_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    #[arg(long)]
    pub app: String,
    /// Device name; with --count N the devices are DEVICE-0 .. DEVICE-(N-1).
    #[arg(long)]
    pub device: String,
    #[arg(long, env = "AJOUR_DEVICE_PASSWORD", hide_env_values = true)]
    pub password: String,
    /// The firmware version the device runs at start.
    #[arg(long)]
    pub version: String,
    #[arg(long)]
    pub count: Option<u32>,
    /// Block size the devices ask for (none: the server's default).
    #[arg(long)]
    pub mtu: Option<u32>,
    /// Status encoding: `packed` as embedded-update devices send, `named` as drgdfu sends.
    #[arg(long, value_enum, default_value_t = StatusEncoding::Packed)]
    pub encoding: StatusEncoding,
    /// Devices updating at the same time.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Longest wait honoured when told to Wait, in seconds (the server's poll may be longer).
    #[arg(long, default_value_t = 5)]
    pub max_wait: u64,
    /// Give up on a device after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusEncoding {
    Packed,
    Named,
}

/// How a simulated device ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Updated from one version to another, checksum verified.
    Updated { from: String, to: String, bytes: usize },
    /// Already ran the version it should.
    InSync { version: String },
}

pub fn progress_bar(total: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let names: Vec<String> = match args.count {
        Some(n) => (0..n).map(|i| format!("{}-{i}", args.device)).collect(),
        None => vec![args.device.clone()],
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let started = Instant::now();
    let bar = progress_bar(names.len() as u64, "devices");
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for name in names.clone() {
        let (http, args, bar, semaphore) = (http.clone(), args.clone(), bar.clone(), semaphore.clone());
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let timeout = Duration::from_secs(args.timeout);
            let outcome = tokio::time::timeout(timeout, simulate_device(&http, &args, &name))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no Sync within {}s", args.timeout)));
            bar.inc(1);
            (name, outcome)
        });
    }
    let (mut updated, mut in_sync, mut failed, mut bytes) = (0, 0, Vec::new(), 0usize);
    while let Some(joined) = tasks.join_next().await {
        let (name, outcome) = joined.context("simulated device task")?;
        match outcome {
            Ok(Outcome::Updated { from, to, bytes: n }) => {
                updated += 1;
                bytes += n;
                if names.len() == 1 {
                    crate::say!("{name}: updated {from} -> {to} ({n} bytes, checksum verified)");
                }
            }
            Ok(Outcome::InSync { version }) => {
                in_sync += 1;
                if names.len() == 1 {
                    crate::say!("{name}: in sync at {version}");
                }
            }
            Err(error) => failed.push((name, error)),
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    crate::say!(
        "{} device(s): {updated} updated, {in_sync} already in sync, {} failed; {bytes} bytes in {:.1}s",
        names.len(),
        failed.len(),
        elapsed.as_secs_f64()
    );
    failed.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, error) in failed.iter().take(20) {
        eprintln!("{name}: FAILED: {error:#}");
    }
    if !failed.is_empty() {
        bail!("{} device(s) failed", failed.len());
    }
    Ok(())
}

/// One device, from its first status to Sync.
pub async fn simulate_device(
    http: &reqwest::Client,
    args: &SimulateArgs,
    name: &str,
) -> anyhow::Result<Outcome> {
    let url = format!("{}/v1/dfu?ct=30", args.url.trim_end_matches('/'));
    let authorization = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{name}@{}:{}", args.app, args.password))
    );
    let start_version = args.version.clone();
    let mut version = args.version.clone();
    let mut written: Vec<u8> = Vec::new();
    let mut writing: Option<String> = None;
    let mut swapped = false;
    loop {
        let status = Status {
            version: version.as_bytes().to_vec(),
            mtu: args.mtu,
            correlation_id: None,
            update: writing.as_ref().map(|v| ajour_protocol::UpdateStatus {
                version: v.as_bytes().to_vec(),
                offset: written.len() as u32,
            }),
        };
        let (body, content_type) = match args.encoding {
            StatusEncoding::Packed => (encode_status(&status, Encoding::Packed), Some("application/cbor")),
            // drgdfu sends the named form with no content type.
            StatusEncoding::Named => (encode_status(&status, Encoding::Named), None),
        };
        let mut request = http.post(&url).header("authorization", &authorization).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.with_context(|| format!("POST {url}"))?;
        let code = response.status();
        let bytes = response.bytes().await?;
        if code == reqwest::StatusCode::FORBIDDEN {
            bail!("authentication refused (403): check application, device and password");
        }
        if code != reqwest::StatusCode::OK {
            bail!(
                "unexpected answer {code}: {}",
                String::from_utf8_lossy(&bytes).trim()
            );
        }
        match decode_command(&bytes).context("decoding the server's command")? {
            Command::Write {
                version: v,
                offset,
                data,
                ..
            } => {
                let v = String::from_utf8_lossy(v).into_owned();
                if offset == 0 {
                    written.clear();
                    writing = Some(v.clone());
                }
                if writing.as_deref() != Some(v.as_str()) {
                    bail!("Write of version {v} while writing {writing:?}");
                }
                if offset as usize != written.len() {
                    bail!(
                        "Write at offset {offset}, but the device holds {} bytes",
                        written.len()
                    );
                }
                if data.is_empty() {
                    bail!("empty Write at offset {offset}: the update would never progress");
                }
                written.extend_from_slice(data);
            }
            Command::Swap {
                version: v, checksum, ..
            } => {
                let v = String::from_utf8_lossy(v).into_owned();
                if writing.as_deref() != Some(v.as_str()) {
                    bail!("Swap to {v}, but the device wrote {writing:?}");
                }
                let actual = Sha256::digest(&written);
                if actual.as_slice() != checksum {
                    bail!(
                        "Swap checksum {} does not match the {} bytes received (sha256 {})",
                        hex::encode(checksum),
                        written.len(),
                        hex::encode(actual)
                    );
                }
                // Install and reboot into the new version.
                version = v;
                writing = None;
                swapped = true;
            }
            Command::Sync { version: v, .. } => {
                let v = String::from_utf8_lossy(v).into_owned();
                if v != version {
                    bail!("Sync to {v}, but the device runs {version}");
                }
                return Ok(if swapped {
                    Outcome::Updated {
                        from: start_version,
                        to: version,
                        bytes: written.len(),
                    }
                } else {
                    Outcome::InSync { version }
                });
            }
            Command::Wait { poll, .. } => {
                let secs = u64::from(poll.unwrap_or(1)).clamp(1, args.max_wait.max(1));
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
        }
    }
}
