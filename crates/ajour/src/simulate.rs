//! `ajour simulate`: the command line of `ajour_sim`'s device simulator. Devices update
//! themselves over the HTTP endpoint (or, with `--via-mqtt`, behind Drogue's MQTT integration)
//! as `embedded-update` devices do, and check what they were sent: every Write's offset and the
//! Swap's checksum. A failure is reported with the device's name; the command exits non-zero
//! when any device fails.

use crate::drogue_cli::MqttVersionArg;
use ajour_client::mqtt::MqttConfig;
use ajour_sim::{DeviceOptions, Outcome, Simulation, Transport};
use anyhow::bail;
use clap::Args;
use std::time::{Duration, Instant};

pub use ajour_sim::StatusEncoding;

#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Base URL of the device endpoint. Several (`--url A --url B`, or `A,B`): instances of one
    /// Ajour on one database; each device's statuses go to each in turn, as a load balancer
    /// would spread them, and a status one cannot take goes to the next.
    #[arg(
        long,
        env = "AJOUR_URL",
        default_value = "http://127.0.0.1:8080",
        value_delimiter = ','
    )]
    pub url: Vec<String>,
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
    pub mqtt: MqttSimArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MqttSimArgs {
    /// Play the devices behind Drogue: publish statuses as Drogue events on `app/{app}` at this
    /// broker (`mqtt://HOST:PORT`) and take commands from `command/{app}/{device}/dfu`.
    #[arg(long = "via-mqtt", value_name = "URL")]
    pub via_mqtt: Option<String>,
    /// User name for the broker (none: connect without credentials).
    #[arg(long = "mqtt-user")]
    pub mqtt_user: Option<String>,
    /// Password for the broker (sent only with --mqtt-user).
    #[arg(
        long = "mqtt-password",
        env = "AJOUR_SIMULATE_MQTT_PASSWORD",
        hide_env_values = true
    )]
    pub mqtt_password: Option<String>,
    /// MQTT protocol version: 5 or 3.1.1.
    #[arg(long = "mqtt-version", value_enum, default_value_t)]
    pub mqtt_version: MqttVersionArg,
    /// Seconds a device waits for a command before sending its status again.
    #[arg(long = "command-timeout", default_value_t = 10.0)]
    pub command_timeout: f64,
}

impl Default for MqttSimArgs {
    fn default() -> Self {
        Self {
            via_mqtt: None,
            mqtt_user: None,
            mqtt_password: None,
            mqtt_version: MqttVersionArg::V5,
            command_timeout: 10.0,
        }
    }
}

impl SimulateArgs {
    fn simulation(&self) -> Simulation {
        let transport = match &self.mqtt.via_mqtt {
            Some(url) => {
                let mut broker = MqttConfig::new(url, "ajour-simulator");
                broker.username = self.mqtt.mqtt_user.clone();
                broker.password = self.mqtt.mqtt_password.clone();
                broker.version = self.mqtt.mqtt_version.into();
                Transport::DrogueMqtt {
                    broker,
                    command_timeout: Duration::from_secs_f64(self.mqtt.command_timeout.max(0.05)),
                }
            }
            None => Transport::Http {
                urls: self.url.clone(),
            },
        };
        Simulation {
            app: self.app.clone(),
            devices: match self.count {
                Some(n) => (0..n).map(|i| format!("{}-{i}", self.device)).collect(),
                None => vec![self.device.clone()],
            },
            password: self.password.clone(),
            version: self.version.clone(),
            mtu: self.mtu,
            transport,
            concurrency: self.concurrency,
            device: DeviceOptions::new(
                self.encoding,
                Duration::from_secs(self.max_wait),
                Duration::from_secs(self.timeout),
            ),
        }
    }
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let simulation = args.simulation();
    let single = simulation.devices.len() == 1;
    let started = Instant::now();
    let results = ajour_sim::simulate(&simulation).await?;
    let (mut updated, mut in_sync, mut failed, mut bytes) = (0, 0, Vec::new(), 0usize);
    for (name, outcome) in results {
        match outcome {
            Ok(Outcome::Updated { from, to, bytes: n }) => {
                updated += 1;
                bytes += n;
                if single {
                    crate::say!("{name}: updated {from} -> {to} ({n} bytes, checksum verified)");
                }
            }
            Ok(Outcome::InSync { version }) => {
                in_sync += 1;
                if single {
                    crate::say!("{name}: in sync at {version}");
                }
            }
            Err(error) => failed.push((name, error)),
        }
    }
    crate::say!(
        "{} device(s): {updated} updated, {in_sync} already in sync, {} failed; {bytes} bytes in {:.1}s",
        simulation.devices.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
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
