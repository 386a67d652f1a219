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
    /// Drive the devices through Drogue's MQTT integration instead of the HTTP endpoint.
    #[command(flatten)]
    pub mqtt: crate::simulate_mqtt::MqttSimArgs,
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
    let fleet = match &args.mqtt.via_mqtt {
        Some(url) => Some(Arc::new(crate::simulate_mqtt::Fleet::connect(&args, url).await?)),
        None => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for name in names.clone() {
        let (http, args, bar, semaphore) = (http.clone(), args.clone(), bar.clone(), semaphore.clone());
        let fleet = fleet.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let timeout = Duration::from_secs(args.timeout);
            let device = async {
                match &fleet {
                    Some(fleet) => fleet.simulate_device(&args, &name).await,
                    None => simulate_device(&http, &args, &name).await,
                }
            };
            let outcome = tokio::time::timeout(timeout, device)
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

/// A simulated device's state, independent of how statuses and commands travel: the HTTP
/// simulator, the MQTT simulator and the load generator all drive this.
///
/// It behaves as `embedded-update`'s `FirmwareUpdater` does, but checks what it is sent: a Write
/// must be at exactly the offset it holds, and a Swap's checksum must be the SHA-256 of the bytes
/// it received.
#[derive(Debug, Clone)]
pub struct SimulatedDevice {
    start_version: String,
    version: String,
    mtu: Option<u32>,
    correlation_id: Option<u32>,
    written: Vec<u8>,
    writing: Option<String>,
    swapped: bool,
}

/// What a device does after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Report again at once.
    Continue,
    /// Report again after this many seconds (as the server asked).
    Wait(u32),
    /// The device is done.
    Done(Outcome),
}

impl SimulatedDevice {
    pub fn new(version: &str, mtu: Option<u32>, correlation_id: Option<u32>) -> Self {
        Self {
            start_version: version.to_string(),
            version: version.to_string(),
            mtu,
            correlation_id,
            written: Vec::new(),
            writing: None,
            swapped: false,
        }
    }

    /// Use `correlation_id` from now on (a transport that may deliver late answers gives each
    /// status its own, to tell them apart).
    pub fn set_correlation_id(&mut self, correlation_id: Option<u32>) {
        self.correlation_id = correlation_id;
    }

    /// The status the device sends now.
    pub fn status(&self) -> Status {
        Status {
            version: self.version.as_bytes().to_vec(),
            mtu: self.mtu,
            correlation_id: self.correlation_id,
            update: self.writing.as_ref().map(|v| ajour_protocol::UpdateStatus {
                version: v.as_bytes().to_vec(),
                offset: self.written.len() as u32,
            }),
        }
    }

    /// The status, encoded as this kind of device sends it.
    pub fn encoded_status(&self, encoding: StatusEncoding) -> Vec<u8> {
        let encoding = match encoding {
            StatusEncoding::Packed => Encoding::Packed,
            StatusEncoding::Named => Encoding::Named,
        };
        encode_status(&self.status(), encoding)
    }

    /// Follow a command received as bytes.
    pub fn apply_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<Step> {
        let command = decode_command(bytes).context("decoding the server's command")?;
        self.apply(command)
    }

    /// Follow a command.
    pub fn apply(&mut self, command: Command<'_>) -> anyhow::Result<Step> {
        if command.correlation_id() != self.correlation_id {
            bail!(
                "command for correlation id {:?}, expected {:?}",
                command.correlation_id(),
                self.correlation_id
            );
        }
        match command {
            Command::Write {
                version: v,
                offset,
                data,
                ..
            } => {
                let v = String::from_utf8_lossy(v).into_owned();
                if offset == 0 {
                    self.written.clear();
                    self.writing = Some(v.clone());
                }
                if self.writing.as_deref() != Some(v.as_str()) {
                    bail!("Write of version {v} while writing {:?}", self.writing);
                }
                if offset as usize != self.written.len() {
                    bail!(
                        "Write at offset {offset}, but the device holds {} bytes",
                        self.written.len()
                    );
                }
                if data.is_empty() {
                    bail!("empty Write at offset {offset}: the update would never progress");
                }
                self.written.extend_from_slice(data);
                Ok(Step::Continue)
            }
            Command::Swap {
                version: v, checksum, ..
            } => {
                let v = String::from_utf8_lossy(v).into_owned();
                if self.writing.as_deref() != Some(v.as_str()) {
                    bail!("Swap to {v}, but the device wrote {:?}", self.writing);
                }
                let actual = Sha256::digest(&self.written);
                if actual.as_slice() != checksum {
                    bail!(
                        "Swap checksum {} does not match the {} bytes received (sha256 {})",
                        hex::encode(checksum),
                        self.written.len(),
                        hex::encode(actual)
                    );
                }
                // Install and reboot into the new version.
                self.version = v;
                self.writing = None;
                self.swapped = true;
                Ok(Step::Continue)
            }
            Command::Sync { version: v, .. } => {
                let v = String::from_utf8_lossy(v).into_owned();
                if v != self.version {
                    bail!("Sync to {v}, but the device runs {}", self.version);
                }
                Ok(Step::Done(if self.swapped {
                    Outcome::Updated {
                        from: self.start_version.clone(),
                        to: self.version.clone(),
                        bytes: self.written.len(),
                    }
                } else {
                    Outcome::InSync {
                        version: self.version.clone(),
                    }
                }))
            }
            Command::Wait { poll, .. } => Ok(Step::Wait(poll.unwrap_or(1))),
        }
    }

    /// The bytes received of the image being (or last) written.
    pub fn written(&self) -> &[u8] {
        &self.written
    }
}

/// One device over HTTP, from its first status to Sync.
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
    let mut device = SimulatedDevice::new(&args.version, args.mtu, None);
    loop {
        let mut request = http
            .post(&url)
            .header("authorization", &authorization)
            .body(device.encoded_status(args.encoding));
        // drgdfu sends the named form with no content type.
        if args.encoding == StatusEncoding::Packed {
            request = request.header("content-type", "application/cbor");
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
        match device.apply_bytes(&bytes)? {
            Step::Continue => {}
            Step::Wait(poll) => {
                let secs = u64::from(poll).clamp(1, args.max_wait.max(1));
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            Step::Done(outcome) => return Ok(outcome),
        }
    }
}
