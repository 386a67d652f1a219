//! `ajour simulate`: a fleet of one kind of device, over one transport, each to Sync.

use crate::{
    run_device, run_fleet, DeviceOptions, DrogueMqtt, Ended, FleetOptions, HttpLink, Link, Outcome,
    SimulatedDevice,
};
use ajour_client::mqtt::MqttConfig;
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;

/// How the devices reach the server.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The HTTP endpoint under these base URLs (instances of one Ajour): each device's statuses
    /// go to each in turn, as a load balancer would spread them.
    Http { urls: Vec<String> },
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
    pub device: DeviceOptions,
}

/// Run every device of `simulation` to Sync; each name with how it ended, in the order they
/// finished. Only a failure to set up (no broker) is an error of the whole run.
pub async fn simulate(simulation: &Simulation) -> anyhow::Result<Vec<(String, anyhow::Result<Outcome>)>> {
    let fleet = FleetOptions {
        concurrency: simulation.concurrency,
        progress: "devices".into(),
    };
    let names = simulation.devices.clone();
    match &simulation.transport {
        Transport::Http { urls } => {
            anyhow::ensure!(!urls.is_empty(), "no server URL to simulate devices against");
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(simulation.concurrency)
                .build()?;
            let endpoints = HttpLink::endpoints(urls);
            let first = std::sync::atomic::AtomicUsize::new(0);
            run_fleet(names, &fleet, |name| {
                let first = first.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let link = HttpLink::spread(
                    http.clone(),
                    &endpoints,
                    first,
                    &simulation.app,
                    &name,
                    &simulation.password,
                );
                to_sync(simulation, link)
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
            run_fleet(names, &fleet, |name| {
                to_sync(simulation, mqtt.link(&name, *command_timeout))
            })
            .await
        }
    }
}

/// One device of the simulation over `link`, from its first status to Sync.
fn to_sync(
    simulation: &Simulation,
    mut link: impl Link + 'static,
) -> impl std::future::Future<Output = anyhow::Result<Outcome>> + Send + 'static {
    let mut device = SimulatedDevice::new(&simulation.version, simulation.mtu);
    let options = simulation.device.clone();
    async move {
        match run_device(&mut device, &mut link, &options, &mut ()).await? {
            Ended::Done(outcome) => Ok(outcome),
            Ended::Stopped => unreachable!("no observer stops a simulated device"),
        }
    }
}
