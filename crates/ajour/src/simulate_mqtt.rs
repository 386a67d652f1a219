//! `ajour simulate --via-mqtt URL`: the devices play behind Drogue Cloud. Each status is published
//! as the CloudEvent Drogue's integration would deliver for it (structured JSON, on `app/{app}`),
//! and commands are taken from `command/{app}/{device}/dfu`, where Ajour in Drogue mode publishes
//! them. Pointed at a plain broker (Mosquitto), this drives a fleet through Ajour's Drogue path
//! without Drogue itself.
//!
//! The device logic is [`SimulatedDevice`], shared with the HTTP simulator. What differs is the
//! transport: Drogue does not buffer commands, so, as real devices do, a device that gets no
//! answer within `--command-timeout` sends its status again. Every status carries a fresh
//! correlation id, so a late answer to an earlier status is recognised and ignored.

use crate::drogue_cli::MqttVersionArg;
use crate::simulate::{Outcome, SimulateArgs, SimulatedDevice, StatusEncoding, Step};
use ajour_client::mqtt::{connect, Incoming, MqttClient, MqttConfig};
use ajour_drogue::event::structured_event;
use anyhow::{bail, Context};
use clap::Args;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

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

type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Vec<u8>>>>>;

/// One MQTT connection for a whole fleet, routing each command to its device.
pub struct Fleet {
    client: MqttClient,
    routes: Routes,
    app: String,
    stop: watch::Sender<bool>,
}

/// Where a device's commands arrive while it is registered with a [`Fleet`]; unregistered when
/// dropped.
pub struct DeviceCommands {
    name: String,
    routes: Routes,
    commands: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl DeviceCommands {
    /// The next command for the device; `None` when the fleet's connection has stopped.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.commands.recv().await
    }
}

impl Drop for DeviceCommands {
    fn drop(&mut self) {
        self.routes.lock().unwrap().remove(&self.name);
    }
}

impl Fleet {
    /// Connect, subscribe to the application's commands, and wait until the broker confirmed.
    pub async fn connect(args: &SimulateArgs, url: &str) -> anyhow::Result<Self> {
        let mut config = MqttConfig::new(url, "ajour-simulator");
        config.username = args.mqtt.mqtt_user.clone();
        config.password = args.mqtt.mqtt_password.clone();
        config.version = args.mqtt.mqtt_version.into();
        Self::connect_with(&config, &args.app).await
    }

    /// [`Self::connect`] with a connection configured by the caller (the load generator).
    pub async fn connect_with(config: &MqttConfig, app: &str) -> anyhow::Result<Self> {
        let url = &config.url;
        let (client, mut connection) = connect(config, 4096)?;
        let routes: Routes = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        let (subscribed_tx, mut subscribed) = watch::channel(false);
        let filter = format!("command/{app}/+/dfu");
        let prefix = format!("command/{app}/");
        let (task_client, task_routes) = (client.clone(), routes.clone());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let polled = tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    polled = connection.poll() => polled,
                };
                match polled {
                    Ok(Incoming::Connected) => {
                        backoff = Duration::from_millis(100);
                        let (client, filter) = (task_client.clone(), filter.clone());
                        tokio::spawn(async move { client.subscribe(&filter, false).await });
                    }
                    Ok(Incoming::Subscribed { granted }) => {
                        let _ = subscribed_tx.send(granted);
                    }
                    Ok(Incoming::Message(message)) => {
                        let device = message
                            .topic
                            .strip_prefix(&prefix)
                            .and_then(|rest| rest.strip_suffix("/dfu"));
                        let route = device.and_then(|d| task_routes.lock().unwrap().get(d).cloned());
                        if let Some(route) = route {
                            let _ = route.send(message.payload.to_vec());
                        }
                    }
                    Ok(Incoming::Other) => {}
                    Err(error) => {
                        tracing::warn!(%error, "simulator: MQTT connection lost; reconnecting");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            task_client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while connection.poll().await.is_ok() {}
            })
            .await;
        });
        let confirmed = tokio::time::timeout(Duration::from_secs(30), subscribed.wait_for(|s| *s)).await;
        if !matches!(confirmed, Ok(Ok(_))) {
            let _ = stop.send(true);
            bail!("the broker at {url} did not confirm the subscription to command/{app}/+/dfu");
        }
        Ok(Self {
            client,
            routes,
            app: app.to_string(),
            stop,
        })
    }

    /// Take the commands for device `name` from now on.
    pub fn register(&self, name: &str) -> DeviceCommands {
        let (tx, commands) = mpsc::unbounded_channel();
        self.routes.lock().unwrap().insert(name.to_string(), tx);
        DeviceCommands {
            name: name.to_string(),
            routes: self.routes.clone(),
            commands,
        }
    }

    /// Publish a status of device `name` as Drogue's integration would deliver it: a structured
    /// CloudEvent on `app/{app}`, its data `status` (CBOR) with `content_type`.
    pub async fn publish_status(&self, name: &str, content_type: &str, status: &[u8]) -> anyhow::Result<()> {
        let event = structured_event(&self.app, name, "dfu", content_type, status);
        self.client
            .publish_with_properties(
                &format!("app/{}", self.app),
                event.to_string().into_bytes(),
                Some("application/cloudevents+json".into()),
                Vec::new(),
            )
            .await
            .context("publishing a status")
    }

    /// One device, from its first status to Sync.
    pub async fn simulate_device(&self, args: &SimulateArgs, name: &str) -> anyhow::Result<Outcome> {
        let mut commands = self.register(name);
        self.run_device(args, name, &mut commands).await
    }

    async fn run_device(
        &self,
        args: &SimulateArgs,
        name: &str,
        commands: &mut DeviceCommands,
    ) -> anyhow::Result<Outcome> {
        let content_type = match args.encoding {
            StatusEncoding::Packed => "application/cbor",
            // drgdfu sends no content type, which Drogue reports as octet-stream.
            StatusEncoding::Named => "application/octet-stream",
        };
        let command_timeout = Duration::from_secs_f64(args.mqtt.command_timeout.max(0.05));
        let mut device = SimulatedDevice::new(&args.version, args.mtu, None);
        let mut correlation_id: u32 = rand::random::<u32>() >> 1;
        loop {
            correlation_id = correlation_id.wrapping_add(1);
            device.set_correlation_id(Some(correlation_id));
            self.publish_status(name, content_type, &device.encoded_status(args.encoding))
                .await?;
            let deadline = tokio::time::Instant::now() + command_timeout;
            let step = loop {
                match tokio::time::timeout_at(deadline, commands.recv()).await {
                    // No answer: the status or its command was lost; send it again.
                    Err(_) => break None,
                    Ok(None) => bail!("the simulator's MQTT connection has stopped"),
                    Ok(Some(bytes)) => {
                        let command = ajour_protocol::decode_command(&bytes)
                            .context("decoding the server's command")?;
                        if command.correlation_id() != Some(correlation_id) {
                            // The answer to an earlier status, sent again meanwhile.
                            continue;
                        }
                        break Some(device.apply(command)?);
                    }
                }
            };
            match step {
                None => tracing::debug!(device = name, "no command in time; sending the status again"),
                Some(Step::Continue) => {}
                Some(Step::Wait(poll)) => {
                    let secs = u64::from(poll).clamp(1, args.max_wait.max(1));
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
                Some(Step::Done(outcome)) => return Ok(outcome),
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
