//! `ajour simulate`: a fleet of one kind of device, over one transport, each to Sync (or to the
//! fault it plays).

use crate::{
    run_device, run_fleet, CoapLink, DeviceOptions, DrogueMqtt, Ended, Fault, FleetOptions, HttpLink, Link,
    LinkError, MqttLink, Outcome, SimulatedDevice,
};
use ajour_client::mqtt::MqttConfig;
use anyhow::Context;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How the devices reach the server.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The HTTP endpoint under these base URLs (instances of one Ajour): each device's statuses
    /// go to each in turn, as a load balancer would spread them.
    Http { urls: Vec<String> },
    /// The CoAP endpoint at these URLs (`coap://HOST[:PORT]`, instances of one Ajour): each
    /// device sends Confirmable requests from a socket of its own, to each in turn.
    Coap { urls: Vec<String> },
    /// The MQTT endpoint (`ajour serve --mqtt-listen`) at `endpoint`'s URL: each device on a
    /// connection of its own, with its own credentials; a status unanswered within
    /// `command_timeout` is sent again.
    Mqtt {
        endpoint: MqttConfig,
        command_timeout: Duration,
    },
    /// Behind Drogue's MQTT integration, through this broker; a status unanswered within
    /// `command_timeout` is sent again.
    DrogueMqtt {
        broker: MqttConfig,
        command_timeout: Duration,
    },
}

/// A simulated fleet: who the devices are, what they run, and how they behave.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub app: String,
    pub devices: Vec<String>,
    /// Every device's password (unused behind Drogue, which authenticated the devices).
    pub password: String,
    /// The version the devices run at start.
    pub version: String,
    /// The block size the devices ask for (none: the server's default).
    pub mtu: Option<u32>,
    pub transport: Transport,
    /// Devices updating at the same time.
    pub concurrency: usize,
    /// How every device behaves (its target version among it).
    pub device: DeviceOptions,
    /// The fault each device named here plays ([`crate::assign_faults`] spreads shares of them
    /// over a fleet); the others play none.
    pub faults: HashMap<String, Fault>,
    /// A PEM file of CA certificates the devices trust beside the system's, for `https://` and
    /// `mqtts://` (a server with a certificate of a private CA).
    pub ca_file: Option<std::path::PathBuf>,
}

/// How each device of a simulation ended, by name, in the order they finished.
pub type DeviceOutcomes = Vec<(String, anyhow::Result<Outcome>)>;

/// Run every device of `simulation` to Sync (or to its fault); each name with how it ended, in the
/// order they finished. Only a failure to set up (no broker) is an error of the whole run.
pub async fn simulate(simulation: &Simulation) -> anyhow::Result<DeviceOutcomes> {
    match &simulation.transport {
        Transport::Http { urls } => {
            anyhow::ensure!(!urls.is_empty(), "no server URL to simulate devices against");
            let mut http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(simulation.concurrency);
            if let Some(path) = &simulation.ca_file {
                for certificate in ajour_client::tls::read_ca_file(path)? {
                    http = http.add_root_certificate(reqwest::Certificate::from_der(&certificate)?);
                }
            }
            let http = http.build()?;
            let endpoints = HttpLink::endpoints(urls);
            let first = std::sync::atomic::AtomicUsize::new(0);
            simulate_over(simulation, |name| {
                let first = first.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                HttpLink::spread(
                    http.clone(),
                    &endpoints,
                    first,
                    &simulation.app,
                    name,
                    &simulation.password,
                )
            })
            .await
        }
        Transport::Coap { urls } => {
            let servers = CoapLink::resolve(urls).await?;
            let first = std::sync::atomic::AtomicUsize::new(0);
            simulate_over(simulation, |name| {
                let first = first.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                CoapLink::spread(&servers, first, &simulation.app, name, &simulation.password)
            })
            .await
        }
        Transport::Mqtt {
            endpoint,
            command_timeout,
        } => {
            let mut endpoint = endpoint.clone();
            if simulation.ca_file.is_some() {
                endpoint.tls.ca_file.clone_from(&simulation.ca_file);
            }
            simulate_connected(simulation, |name| {
                let (endpoint, app, name) = (endpoint.clone(), simulation.app.clone(), name.to_string());
                let (password, timeout) = (simulation.password.clone(), *command_timeout);
                async move { MqttLink::connect(&endpoint, &app, &name, &password, timeout).await }
            })
            .await
        }
        Transport::DrogueMqtt {
            broker,
            command_timeout,
        } => {
            let mqtt = Arc::new(
                DrogueMqtt::connect(broker, &simulation.app)
                    .await
                    .with_context(|| format!("connecting to {}", broker.url))?,
            );
            simulate_over(simulation, |name| mqtt.link(name, *command_timeout)).await
        }
    }
}

/// [`simulate`] over links of the caller's own: `link(name)` is device `name`'s way to the
/// server, and `simulation.transport` is not used (tests put an in-memory server behind it).
pub async fn simulate_over<L: Link + 'static>(
    simulation: &Simulation,
    link: impl Fn(&str) -> L,
) -> anyhow::Result<DeviceOutcomes> {
    let fleet = FleetOptions {
        concurrency: simulation.concurrency,
        progress: "devices".into(),
    };
    run_fleet(simulation.devices.clone(), &fleet, |name| {
        to_sync(simulation, &name, link(&name))
    })
    .await
}

/// [`simulate_over`], over links that must connect first (one connection per device): a device
/// that cannot connect fails on its own, as one that cannot send its status would.
async fn simulate_connected<L, F>(
    simulation: &Simulation,
    connect: impl Fn(&str) -> F,
) -> anyhow::Result<DeviceOutcomes>
where
    L: Link + 'static,
    F: Future<Output = Result<L, LinkError>> + Send + 'static,
{
    let fleet = FleetOptions {
        concurrency: simulation.concurrency,
        progress: "devices".into(),
    };
    run_fleet(simulation.devices.clone(), &fleet, |name| {
        let connecting = connect(&name);
        let (mut device, options) = device_of(simulation, &name);
        async move {
            let mut link = connecting.await.with_context(|| format!("device {name}"))?;
            run_to_sync(&mut device, &mut link, &options).await
        }
    })
    .await
}

/// Device `name` of the simulation over `link`, from its first status to Sync (or its fault).
fn to_sync(
    simulation: &Simulation,
    name: &str,
    mut link: impl Link + 'static,
) -> impl Future<Output = anyhow::Result<Outcome>> + Send + 'static {
    let (mut device, options) = device_of(simulation, name);
    async move { run_to_sync(&mut device, &mut link, &options).await }
}

/// Device `name` of the simulation as it starts, and how it behaves.
fn device_of(simulation: &Simulation, name: &str) -> (SimulatedDevice, DeviceOptions) {
    let mut device = SimulatedDevice::new(&simulation.version, simulation.mtu);
    if let Some(fault) = simulation.faults.get(name) {
        device = device.with_fault(*fault);
    }
    (device, simulation.device.clone())
}

async fn run_to_sync(
    device: &mut SimulatedDevice,
    link: &mut impl Link,
    options: &DeviceOptions,
) -> anyhow::Result<Outcome> {
    match run_device(device, link, options, &mut ()).await? {
        Ended::Done(outcome) => Ok(outcome),
        Ended::Stopped => unreachable!("no observer stops a simulated device"),
    }
}
