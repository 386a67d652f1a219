//! `ajour-bench mqtt-endpoint`: N devices updating concurrently over the MQTT device endpoint
//! (`ajour serve --mqtt-listen`), each on its own connection with the simulator's `MqttLink`
//! (user name `device@app` and password; subscribed to `command/inbox//dfu`; statuses published
//! to `dfu` at QoS 1, commands back at QoS 0), against the bare MQTT endpoint in the same run.
//!
//! A device connects on its first status, so each device's first round trip carries its TCP
//! connection, CONNECT (the one password verification), SUBSCRIBE and the first status, as over
//! HTTP and CoAP it carries the password verification.

use crate::fleet::{alternate, drive, FleetArgs, Load, RoundsArgs, APP, PASSWORD};
use crate::process::ServerProcess;
use crate::report::{print_rounds, LoadReport};
use ajour_client::mqtt::{MqttConfig, MqttVersion};
use ajour_sim::{EncodedStatus, Link, LinkError, MqttLink};
use bytes::Bytes;
use clap::Args;
use std::sync::Arc;
use std::time::Duration;

/// The MQTT protocol version the devices speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MqttVersionArg {
    /// MQTT 3.1.1.
    #[value(name = "3.1.1", alias = "3")]
    V3,
    /// MQTT 5.
    #[value(name = "5")]
    V5,
}

#[derive(Debug, Clone, Args)]
pub struct MqttEndpointBenchArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub rounds: RoundsArgs,
    /// The MQTT version the devices speak: 5 or 3.1.1.
    #[arg(long, value_enum, default_value = "5")]
    pub mqtt_version: MqttVersionArg,
    /// Seconds a device waits for its command before sending its status again.
    #[arg(long, default_value_t = 30.0)]
    pub command_timeout: f64,
}

pub async fn run(args: MqttEndpointBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.fleet.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(args.command_timeout > 0.0, "--command-timeout must be positive");
    // A connection per device, in this process and in the server.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // The server and the address it printed (once).
    let ajour = match args.fleet.no_ajour {
        false => {
            let (data, server) = args
                .fleet
                .start_ajour_with(&["--mqtt-listen", "127.0.0.1:0"])
                .await?;
            let mqtt = format!("mqtt://{}", server.mqtt_address()?);
            Some((data, server, mqtt))
        }
        true => None,
    };
    let bare = match args.fleet.no_bare {
        false => Some(args.fleet.start_bare("bare-mqtt-endpoint-server")?),
        true => None,
    };

    let rounds = alternate(
        args.rounds.rounds,
        args.fleet.devices,
        ajour
            .as_ref()
            .map(|(_data, server, address)| (server, address.as_str())),
        bare.as_ref().map(|server| (server, server.url.as_str())),
        async |server, address, target| drive_mqtt(server, address, &args, target).await,
    )
    .await?;
    let title = format!(
        "MQTT endpoint: {} devices, image {} bytes, mtu {}, whole update, MQTT {}, one connection per device \
         (statuses at QoS 1, commands at QoS 0)",
        args.fleet.devices,
        args.fleet.image_size,
        args.fleet.mtu,
        match args.mqtt_version {
            MqttVersionArg::V3 => "3.1.1",
            MqttVersionArg::V5 => "5",
        }
    );
    print_rounds(&title, &rounds);
    Ok(())
}

/// Every device on its own [`MqttLink`] to `url` (`mqtt://HOST:PORT`).
async fn drive_mqtt(
    server: &ServerProcess,
    url: &str,
    args: &MqttEndpointBenchArgs,
    target: &'static str,
) -> anyhow::Result<LoadReport> {
    let mut endpoint = MqttConfig::new(url, "ajour-bench");
    endpoint.version = match args.mqtt_version {
        MqttVersionArg::V3 => MqttVersion::V3,
        MqttVersionArg::V5 => MqttVersion::V5,
    };
    let endpoint = Arc::new(endpoint);
    let command_timeout = Duration::from_secs_f64(args.command_timeout);
    let load = Load {
        target,
        blocks: 0,
        in_flight: None,
        broker_pid: None,
    };
    drive(std::slice::from_ref(server), &args.fleet, &load, |name| Device {
        endpoint: endpoint.clone(),
        name: name.to_string(),
        command_timeout,
        link: None,
    })
    .await
}

/// A device's [`MqttLink`], connected on its first status (the fleet's links are made before any
/// of them runs, and an MQTT link must connect first).
struct Device {
    endpoint: Arc<MqttConfig>,
    name: String,
    command_timeout: Duration,
    link: Option<MqttLink>,
}

impl Link for Device {
    fn answers_can_be_lost(&self) -> bool {
        // As MqttLink: commands go out at QoS 0.
        true
    }

    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        let link = match &mut self.link {
            Some(link) => link,
            None => self.link.insert(
                MqttLink::connect(&self.endpoint, APP, &self.name, PASSWORD, self.command_timeout).await?,
            ),
        };
        link.exchange(status).await
    }
}
