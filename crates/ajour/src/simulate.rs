//! `ajour simulate`: the command line of `ajour_sim`'s device simulator. Devices update
//! themselves over a device endpoint of `ajour serve` (`--transport http|coap|mqtt`, or the
//! scheme of `--url`), or with `--via-mqtt` behind Drogue's MQTT integration, as
//! `embedded-update` devices do, and check what they were sent: every Write's offset and the
//! Swap's checksum. A failure is reported with the device's name; the command exits non-zero
//! when any device fails.
//!
//! To rehearse a staged rollout, shares of the fleet play faults (`--fail-rollback`,
//! `--fail-silent`, `--fail-stall`), and with `--target` devices wait for their turn and end "not
//! updated" if it does not come by their timeout. Neither a played fault nor "not updated" is a
//! failure: only a device that failed a check is.
//!
//! Over `https://` and `mqtts://` devices may sign in by client certificates instead of a password
//! (`--client-cert`, `--client-key`), each its own when the paths hold `{device}`.

use crate::drogue_cli::MqttVersionArg;
use ajour_client::mqtt::MqttConfig;
use ajour_sim::{assign_faults, ClientCertFiles, DeviceOptions, Fault, Outcome, Simulation, Transport};
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
    /// The devices' password. Not needed, and not sent, with --client-cert: the devices then sign
    /// in by their certificates.
    #[arg(
        long,
        env = "AJOUR_DEVICE_PASSWORD",
        hide_env_values = true,
        required_unless_present = "client_cert"
    )]
    pub password: Option<String>,
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
    /// Give up on a device after this many seconds (with --target, one still waiting its turn
    /// then ends "not updated").
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// The version the devices are to end on, as in a staged rollout: a device told it is in sync
    /// on another version, or told to wait, reports again as told until it runs this version,
    /// or ends "not updated" (not a failure) when --timeout finds it still waiting its turn. A
    /// device mid-download at its timeout fails. Without it, a device in sync on any version is
    /// done.
    #[arg(long, value_name = "VERSION")]
    pub target: Option<String>,
    /// Percent of the devices whose bootloader rolls the update back: at the Swap they reboot into
    /// the version they ran, report it once more, and end "rolled back".
    #[arg(long, value_name = "PCT", default_value_t = 0.0, value_parser = percent)]
    pub fail_rollback: f64,
    /// Percent of the devices that go quiet at the Swap: they send nothing more.
    #[arg(long, value_name = "PCT", default_value_t = 0.0, value_parser = percent)]
    pub fail_silent: f64,
    /// Percent of the devices that stall part-way: once they hold half the image, they send
    /// nothing more. Needs --image-size. The three shares add up to at most 100; which devices
    /// play which fault is fixed by their names, spread over the fleet.
    #[arg(long, value_name = "PCT", default_value_t = 0.0, value_parser = percent)]
    pub fail_stall: f64,
    /// Size in bytes of the image the devices are updated to: stalling devices (--fail-stall) stop
    /// once they hold half of it. A device learns the size only at the Swap, too late to stall.
    #[arg(long, value_name = "BYTES")]
    pub image_size: Option<u32>,
    /// Drive the devices over the CoAP endpoint (`ajour serve --coap-listen`) instead of the HTTP
    /// endpoint: `coap://HOST[:PORT]` (port 5683 if none). Several (`A,B`): instances of one
    /// Ajour, each device's statuses going to each in turn. --url is then not used.
    #[arg(
        long = "coap-url",
        value_name = "URL",
        value_delimiter = ',',
        conflicts_with = "via_mqtt"
    )]
    pub coap_url: Vec<String>,
    /// The device endpoint the devices use: `http` (`--url http[s]://...`), `coap` (`--url
    /// coap://HOST[:PORT]`, as --coap-url) or `mqtt` (`--url mqtt[s]://HOST[:PORT]`, `ajour serve
    /// --mqtt-listen`; each device on a connection of its own, --mqtt-version, --ca-cert).
    /// Default: from --url's scheme.
    #[arg(long, value_enum, conflicts_with = "via_mqtt")]
    pub transport: Option<TransportArg>,
    /// A PEM file of CA certificates the devices trust beside the system's, for `https://` and
    /// `mqtts://` (a server started with --tls-cert and a certificate of a private CA).
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// A PEM file with the client certificate (and any intermediates) each device presents over
    /// `https://` and `mqtts://`, to sign in by it instead of a password (the server's
    /// application trusts its CA; its subject DN is an alias of the device, or its Common Name
    /// the device's name). `{device}` in the path is replaced by each device's name
    /// (`certs/{device}.crt`); without it every device presents the same certificate. Read and
    /// checked for every device before any starts. Needs --client-key.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,
    /// The PEM file with the private key of --client-cert's certificate (`{device}` replaced as
    /// there).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
    /// Drive the devices through Drogue's MQTT integration instead of the HTTP endpoint.
    #[command(flatten)]
    pub mqtt: MqttSimArgs,
}

/// A device endpoint of `ajour serve`, as `ajour simulate --transport` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    Http,
    Coap,
    Mqtt,
}

impl TransportArg {
    /// The transport a URL's scheme names.
    fn of_url(url: &str) -> Self {
        match url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase())
        {
            Some(scheme) if scheme == "coap" => TransportArg::Coap,
            Some(scheme) if scheme == "mqtt" || scheme == "mqtts" => TransportArg::Mqtt,
            _ => TransportArg::Http,
        }
    }
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

/// A percentage of the devices: a number from 0 to 100.
fn percent(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(percent) if (0.0..=100.0).contains(&percent) => Ok(percent),
        _ => Err(format!("{value:?} is not a percentage from 0 to 100")),
    }
}

impl SimulateArgs {
    /// Each fault with the share of the devices that play it, in the order they are handed out.
    fn fault_shares(&self) -> anyhow::Result<Vec<(Fault, f64)>> {
        let mut shares = vec![
            (Fault::RollBack, self.fail_rollback),
            (Fault::Silent, self.fail_silent),
        ];
        match self.image_size {
            Some(size) => shares.push((Fault::Stall { at: size / 2 }, self.fail_stall)),
            None if self.fail_stall > 0.0 => bail!(
                "--fail-stall needs --image-size: a stalling device stops once it holds half the \
                 image, and a device learns the image's size only at the Swap"
            ),
            None => {}
        }
        Ok(shares)
    }

    /// The transport `--transport` names, or the URLs' scheme does.
    fn transport(&self) -> anyhow::Result<TransportArg> {
        if !self.coap_url.is_empty() {
            if self.transport.is_some_and(|t| t != TransportArg::Coap) {
                bail!("--coap-url drives the devices over CoAP; drop --transport or make it coap");
            }
            return Ok(TransportArg::Coap);
        }
        let schemes: Vec<TransportArg> = self.url.iter().map(|url| TransportArg::of_url(url)).collect();
        let named = self.transport.unwrap_or(schemes[0]);
        if let Some((url, _)) = self
            .url
            .iter()
            .zip(&schemes)
            .find(|(_, scheme)| **scheme != named)
        {
            bail!("--url {url} is not a URL of the {named:?} endpoint (http[s]://, coap://, mqtt[s]://)");
        }
        Ok(named)
    }

    /// The client certificate files, refused where no TLS would carry them.
    fn client_cert(&self) -> anyhow::Result<Option<ClientCertFiles>> {
        let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) else {
            return Ok(None);
        };
        if let Some(broker) = &self.mqtt.via_mqtt {
            bail!(
                "--client-cert is for devices on Ajour's device endpoints over TLS; behind Drogue's MQTT \
                 integration (--via-mqtt {broker}) Drogue signed the devices in"
            );
        }
        if self.transport()? == TransportArg::Coap {
            bail!("--client-cert is presented over TLS (https://, mqtts://); the CoAP endpoint has none");
        }
        for url in &self.url {
            let tls = match url.split_once("://") {
                Some((scheme, _)) => {
                    ["https", "mqtts", "ssl", "tls"].contains(&scheme.to_ascii_lowercase().as_str())
                }
                None => false,
            };
            if !tls {
                bail!("--client-cert is presented over TLS only: --url {url} is not https:// or mqtts://");
            }
        }
        Ok(Some(ClientCertFiles {
            cert: cert.clone(),
            key: key.clone(),
        }))
    }

    fn simulation(&self) -> anyhow::Result<Simulation> {
        let client_cert = self.client_cert()?;
        let command_timeout = Duration::from_secs_f64(self.mqtt.command_timeout.max(0.05));
        let transport = match &self.mqtt.via_mqtt {
            None if self.transport()? == TransportArg::Coap => Transport::Coap {
                urls: if self.coap_url.is_empty() {
                    self.url.clone()
                } else {
                    self.coap_url.clone()
                },
            },
            None if self.transport()? == TransportArg::Mqtt => {
                let [url] = &self.url[..] else {
                    bail!("--transport mqtt takes one --url (mqtt://HOST:PORT or mqtts://)");
                };
                let mut endpoint = MqttConfig::new(url, "ajour-simulator");
                endpoint.version = self.mqtt.mqtt_version.into();
                Transport::Mqtt {
                    endpoint,
                    command_timeout,
                }
            }
            Some(url) => {
                let mut broker = MqttConfig::new(url, "ajour-simulator");
                broker.username = self.mqtt.mqtt_user.clone();
                broker.password = self.mqtt.mqtt_password.clone();
                broker.version = self.mqtt.mqtt_version.into();
                Transport::DrogueMqtt {
                    broker,
                    command_timeout,
                }
            }
            None => Transport::Http {
                urls: self.url.clone(),
            },
        };
        let devices: Vec<String> = match self.count {
            Some(n) => (0..n).map(|i| format!("{}-{i}", self.device)).collect(),
            None => vec![self.device.clone()],
        };
        let faults = assign_faults(&devices, &self.fault_shares()?)?;
        Ok(Simulation {
            app: self.app.clone(),
            devices,
            password: self.password.clone().unwrap_or_default(),
            version: self.version.clone(),
            mtu: self.mtu,
            transport,
            concurrency: self.concurrency,
            device: DeviceOptions {
                target: self.target.clone(),
                ..DeviceOptions::new(
                    self.encoding,
                    Duration::from_secs(self.max_wait),
                    Duration::from_secs(self.timeout),
                )
            },
            faults,
            ca_file: self.ca_cert.clone(),
            client_cert,
        })
    }

    /// Whether any share of the devices is to play a fault.
    fn plays_faults(&self) -> bool {
        self.fail_rollback > 0.0 || self.fail_silent > 0.0 || self.fail_stall > 0.0
    }
}

/// How many devices ended each way.
#[derive(Debug, Default)]
struct Tally {
    updated: usize,
    in_sync: usize,
    not_updated: usize,
    rolled_back: usize,
    silent: usize,
    stalled: usize,
    /// Bytes received by the devices that updated.
    bytes: usize,
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let simulation = args.simulation()?;
    if args.plays_faults() {
        let playing = |fault: fn(&Fault) -> bool| simulation.faults.values().filter(|f| fault(f)).count();
        crate::say!(
            "{} devices play rollback, {} silent, {} stall",
            playing(|f| *f == Fault::RollBack),
            playing(|f| *f == Fault::Silent),
            playing(|f| matches!(f, Fault::Stall { .. })),
        );
    }
    let single = simulation.devices.len() == 1;
    let started = Instant::now();
    let results = ajour_sim::simulate(&simulation).await?;
    let (mut tally, mut failed) = (Tally::default(), Vec::new());
    for (name, outcome) in results {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                failed.push((name, error));
                continue;
            }
        };
        let said = match outcome {
            Outcome::Updated { from, to, bytes } => {
                tally.updated += 1;
                tally.bytes += bytes;
                format!("updated {from} -> {to} ({bytes} bytes, checksum verified)")
            }
            Outcome::InSync { version } => {
                tally.in_sync += 1;
                format!("in sync at {version}")
            }
            Outcome::NotUpdated { version } => {
                tally.not_updated += 1;
                let target = args.target.as_deref().unwrap_or_default();
                format!("not updated to {target}: runs {version} at its timeout")
            }
            Outcome::RolledBack { version, to } => {
                tally.rolled_back += 1;
                format!("rolled back to {version} after the swap to {to} (played)")
            }
            Outcome::Silent { to } => {
                tally.silent += 1;
                format!("silent after the swap to {to} (played)")
            }
            Outcome::Stalled { to, offset } => {
                tally.stalled += 1;
                format!("stalled holding {offset} bytes of {to} (played)")
            }
        };
        if single {
            crate::say!("{name}: {said}");
        }
    }
    let Tally {
        updated,
        in_sync,
        not_updated,
        rolled_back,
        silent,
        stalled,
        bytes,
    } = tally;
    crate::say!(
        "{} device(s): {updated} updated, {in_sync} already in sync, {not_updated} not updated, \
         {rolled_back} rolled back, {silent} silent, {stalled} stalled, {} failed; {bytes} bytes in {:.1}s",
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
