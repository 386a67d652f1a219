//! `ajour simulate`: a fleet of one kind of device, over one transport, each to Sync (or to the
//! fault it plays).

use crate::{
    run_device, run_fleet, CoapLink, DeviceOptions, DrogueMqtt, Ended, Fault, FleetOptions, HttpLink, Link,
    LinkError, MqttLink, Outcome, SimulatedDevice,
};
use ajour_client::mqtt::MqttConfig;
use ajour_client::tls::{client_config, presenting, ClientCert, TlsOptions};
use anyhow::Context;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
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
    /// The client certificate each device presents, over `https://` and `mqtts://` only; with
    /// one, a device signs in by it and sends no password.
    pub client_cert: Option<ClientCertFiles>,
}

/// The client certificate and key files (PEM) the devices present. `{device}` in a path is
/// replaced by each device's name, so that each presents its own (`certs/{device}.crt`); without
/// it every device presents the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClientCertFiles {
    /// What a path has in place of the device's name.
    pub const DEVICE: &'static str = "{device}";

    /// The certificate and key files of device `name`.
    pub fn of_device(&self, name: &str) -> (PathBuf, PathBuf) {
        (for_device(&self.cert, name), for_device(&self.key, name))
    }

    /// Whether the devices have files of their own.
    pub fn per_device(&self) -> bool {
        [&self.cert, &self.key]
            .iter()
            .any(|path| path.to_str().is_some_and(|path| path.contains(Self::DEVICE)))
    }

    /// The certificate of each of `devices`, each pair of files read and checked once, before
    /// any device starts: a file missing or unusable is an error naming it (and the device).
    pub fn read_for(&self, devices: &[String]) -> anyhow::Result<HashMap<String, ClientCert>> {
        let mut read: HashMap<(PathBuf, PathBuf), ClientCert> = HashMap::new();
        let mut certs = HashMap::with_capacity(devices.len());
        for name in devices {
            let files = self.of_device(name);
            let cert = match read.get(&files) {
                Some(cert) => cert.clone(),
                None => {
                    let cert = ClientCert::read(&files.0, &files.1)
                        .with_context(|| format!("the client certificate of device {name}"))?;
                    read.insert(files, cert.clone());
                    cert
                }
            };
            certs.insert(name.clone(), cert);
        }
        Ok(certs)
    }
}

/// `path` with `{device}` replaced by `name`; a path that is not UTF-8 is taken as it is.
fn for_device(path: &Path, name: &str) -> PathBuf {
    match path.to_str() {
        Some(text) => PathBuf::from(text.replace(ClientCertFiles::DEVICE, name)),
        None => path.to_path_buf(),
    }
}

/// Refuse a client certificate where no TLS carries it: `url` must be one with TLS.
fn presentable_over(url: &str, tls: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        tls,
        "a client certificate is presented over TLS only, and {url} is not a TLS URL (https:// or mqtts://)"
    );
    Ok(())
}

/// How each device of a simulation ended, by name, in the order they finished.
pub type DeviceOutcomes = Vec<(String, anyhow::Result<Outcome>)>;

/// Run every device of `simulation` to Sync (or to its fault); each name with how it ended, in the
/// order they finished. Only a failure to set up (no broker) is an error of the whole run.
pub async fn simulate(simulation: &Simulation) -> anyhow::Result<DeviceOutcomes> {
    match &simulation.transport {
        Transport::Http { urls } => {
            anyhow::ensure!(!urls.is_empty(), "no server URL to simulate devices against");
            let endpoints = HttpLink::endpoints(urls);
            let first = std::sync::atomic::AtomicUsize::new(0);
            if let Some(files) = &simulation.client_cert {
                for url in urls {
                    presentable_over(
                        url,
                        url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://")),
                    )?;
                }
                let clients = certified_clients(simulation, files)?;
                return simulate_over(simulation, |name| {
                    let first = first.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    HttpLink::spread_by_certificate(clients[name].clone(), &endpoints, first, &simulation.app)
                })
                .await;
            }
            let mut http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(simulation.concurrency);
            if let Some(path) = &simulation.ca_file {
                for certificate in ajour_client::tls::read_ca_file(path)? {
                    http = http.add_root_certificate(reqwest::Certificate::from_der(&certificate)?);
                }
            }
            let http = http.build()?;
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
            if simulation.client_cert.is_some() {
                presentable_over(urls.first().map_or("coap://", String::as_str), false)?;
            }
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
            if let Some(files) = &simulation.client_cert {
                presentable_over(
                    &endpoint.url,
                    ajour_client::mqtt::parse_broker_url(&endpoint.url)?.2,
                )?;
                let certs = files.read_for(&simulation.devices)?;
                return simulate_connected(simulation, |name| {
                    let mut endpoint = endpoint.clone();
                    endpoint.tls.client_cert = Some(certs[name].clone());
                    let (app, name, timeout) = (simulation.app.clone(), name.to_string(), *command_timeout);
                    async move { MqttLink::connect_by_certificate(&endpoint, &app, &name, timeout).await }
                })
                .await;
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
            anyhow::ensure!(
                simulation.client_cert.is_none(),
                "devices behind Drogue's MQTT integration present no client certificate: Drogue signed them in"
            );
            let mqtt = Arc::new(
                DrogueMqtt::connect(broker, &simulation.app)
                    .await
                    .with_context(|| format!("connecting to {}", broker.url))?,
            );
            simulate_over(simulation, |name| mqtt.link(name, *command_timeout)).await
        }
    }
}

/// The HTTP client of each device of `simulation`, presenting its client certificate (one
/// client for the fleet when the devices share one), made before any device starts. TLS is
/// [`client_config`]'s, as the MQTT devices': the system's roots and `simulation.ca_file`, read
/// once for the fleet.
fn certified_clients(
    simulation: &Simulation,
    files: &ClientCertFiles,
) -> anyhow::Result<HashMap<String, reqwest::Client>> {
    let roots = client_config(&TlsOptions {
        ca_file: simulation.ca_file.clone(),
        ..TlsOptions::default()
    })?;
    let client = |cert: &ClientCert, idle: usize| -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(idle)
            .use_preconfigured_tls(presenting(&roots, cert))
            .build()?)
    };
    let certs = files.read_for(&simulation.devices)?;
    if !files.per_device() {
        let Some(cert) = certs.values().next() else {
            return Ok(HashMap::new());
        };
        let shared = client(cert, simulation.concurrency)?;
        return Ok(certs.into_keys().map(|name| (name, shared.clone())).collect());
    }
    certs
        .into_iter()
        .map(|(name, cert)| Ok((name, client(&cert, 1)?)))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_in_a_path_is_each_devices_name() {
        let own = ClientCertFiles {
            cert: "certs/{device}.crt".into(),
            key: "keys/{device}/{device}.key".into(),
        };
        assert!(own.per_device());
        assert_eq!(
            own.of_device("m-0"),
            (PathBuf::from("certs/m-0.crt"), PathBuf::from("keys/m-0/m-0.key"))
        );
        let shared = ClientCertFiles {
            cert: "certs/fleet.crt".into(),
            key: "certs/fleet.key".into(),
        };
        assert!(!shared.per_device());
        assert_eq!(shared.of_device("m-0"), shared.of_device("m-1"));
        assert_eq!(shared.of_device("m-0").0, PathBuf::from("certs/fleet.crt"));
        // Only the key's path names the device: still a pair per device.
        let half = ClientCertFiles {
            cert: "fleet.crt".into(),
            key: "{device}.key".into(),
        };
        assert!(half.per_device());
    }

    #[test]
    fn a_missing_file_is_named_with_its_device() {
        let dir = std::env::temp_dir().join(format!("ajour-sim-missing-{}", std::process::id()));
        let files = ClientCertFiles {
            cert: dir.join("{device}.crt"),
            key: dir.join("{device}.key"),
        };
        let error = files.read_for(&["d-1".to_string()]).unwrap_err();
        let said = format!("{error:#}");
        assert!(
            said.starts_with(&format!(
                "the client certificate of device d-1: the client certificate file {} cannot be read",
                dir.join("d-1.crt").display()
            )),
            "{said}"
        );
    }
}
