//! Devices behind Drogue's MQTT integration: each status is published as the CloudEvent Drogue
//! would deliver for it (structured JSON on `app/{app}`), and commands are taken from
//! `command/{app}/{device}/dfu`, where Ajour in Drogue mode publishes them. Pointed at a plain
//! broker (Mosquitto), this drives a fleet through Ajour's Drogue path without Drogue itself.
//!
//! Drogue does not buffer commands, so, as real devices do, a device that gets no answer within
//! its command timeout sends its status again, with a fresh correlation id, so that a late answer
//! to an earlier status is recognised and passed over.

use crate::{EncodedStatus, Link, LinkError, StatusEncoding};
use ajour_client::mqtt::{
    self, run_session, Message, MqttClient, MqttConfig, SessionHandler, SessionOptions,
};
use ajour_drogue::event::structured_event;
use anyhow::bail;
use bytes::Bytes;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Requests (publishes) the connection may queue: a status from each device of a large fleet.
const QUEUE: usize = 4096;

/// How long the broker has to confirm the subscription to the commands.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// One MQTT connection for a whole fleet, routing each command to its device's [`DrogueMqttLink`].
/// Dropping it closes the connection.
pub struct DrogueMqtt {
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

/// What the connection and the links share.
struct Shared {
    client: MqttClient,
    url: String,
    app: String,
    events_topic: String,
    /// Each device's command channel, with the id of the link that registered it.
    routes: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<Bytes>)>>,
    next_link: AtomicU64,
    /// Connected and subscribed: commands can arrive.
    subscribed: AtomicBool,
    /// The session has ended for good.
    stopped: AtomicBool,
}

impl DrogueMqtt {
    /// Connect, subscribe to the commands of application `app`, and wait until the broker
    /// confirmed. The connection is kept up (reconnecting with backoff) until dropped.
    pub async fn connect(config: &MqttConfig, app: &str) -> anyhow::Result<Self> {
        let (client, mut connection) = mqtt::connect(config, QUEUE)?;
        let shared = Arc::new(Shared {
            client: client.clone(),
            url: config.url.clone(),
            app: app.to_string(),
            events_topic: format!("app/{app}"),
            routes: Mutex::default(),
            next_link: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        });
        let (subscribed, mut confirmed) = watch::channel(None);
        let mut router = CommandRouter {
            shared: shared.clone(),
            filter: format!("command/{app}/+/dfu"),
            prefix: format!("command/{app}/"),
            subscribed,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            run_session(
                &client,
                &mut connection,
                &SessionOptions::default(),
                &mut router,
                stopped,
            )
            .await;
            router.shared.stopped.store(true, Ordering::SeqCst);
            router.shared.subscribed.store(false, Ordering::SeqCst);
            // Dropping the senders ends every link's wait for a command.
            router.shared.routes.lock().unwrap().clear();
            mqtt::disconnect(&client, &mut connection).await;
        });
        let filter = format!("command/{app}/+/dfu");
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, confirmed.wait_for(Option::is_some)).await {
            Ok(Ok(granted)) if *granted == Some(true) => {}
            Ok(Ok(_)) => bail!(
                "the broker at {} refused the subscription to {filter}",
                config.url
            ),
            _ => bail!(
                "the broker at {} did not confirm the subscription to {filter} within {:?}",
                config.url,
                SUBSCRIBE_TIMEOUT
            ),
        }
        Ok(Self { shared, _stop: stop })
    }

    /// The link of device `name`: its statuses published as Drogue events, the commands for it
    /// taken from now on (replacing an earlier link of the same name). A status unanswered
    /// within `command_timeout` is [`LinkError::NoAnswer`].
    pub fn link(&self, name: &str, command_timeout: Duration) -> DrogueMqttLink {
        let (sender, commands) = mpsc::unbounded_channel();
        let id = self.shared.next_link.fetch_add(1, Ordering::Relaxed);
        self.shared
            .routes
            .lock()
            .unwrap()
            .insert(name.to_string(), (id, sender));
        DrogueMqttLink {
            shared: self.shared.clone(),
            id,
            device: name.to_string(),
            commands,
            command_timeout,
        }
    }
}

/// Hands each command to the link of the device it is addressed to.
struct CommandRouter {
    shared: Arc<Shared>,
    filter: String,
    prefix: String,
    subscribed: watch::Sender<Option<bool>>,
}

impl SessionHandler for CommandRouter {
    fn connected(&mut self) -> Vec<String> {
        vec![self.filter.clone()]
    }

    fn subscribed(&mut self, granted: bool) {
        if !granted {
            tracing::error!(filter = %self.filter, "simulator: the broker refused the subscription");
        }
        self.shared.subscribed.store(granted, Ordering::SeqCst);
        self.subscribed.send_replace(Some(granted));
    }

    fn message(&mut self, message: Message) -> ControlFlow<()> {
        let device = message
            .topic
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_suffix("/dfu"));
        if let Some(device) = device {
            if let Some((_, route)) = self.shared.routes.lock().unwrap().get(device) {
                let _ = route.send(message.payload);
            }
        }
        ControlFlow::Continue(())
    }

    fn connection_lost(&mut self, error: &str) -> ControlFlow<()> {
        self.shared.subscribed.store(false, Ordering::SeqCst);
        tracing::warn!(%error, "simulator: MQTT connection lost; reconnecting");
        ControlFlow::Continue(())
    }
}

/// One device behind Drogue, on its fleet's [`DrogueMqtt`] connection.
pub struct DrogueMqttLink {
    shared: Arc<Shared>,
    id: u64,
    device: String,
    commands: mpsc::UnboundedReceiver<Bytes>,
    command_timeout: Duration,
}

impl Link for DrogueMqttLink {
    fn answers_can_be_lost(&self) -> bool {
        true
    }

    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(LinkError::Stopped(
                "the simulator's MQTT connection has stopped".into(),
            ));
        }
        if !self.shared.subscribed.load(Ordering::SeqCst) {
            return Err(LinkError::Connection(format!(
                "no connection to the broker at {}",
                self.shared.url
            )));
        }
        let content_type = match status.encoding {
            StatusEncoding::Packed => "application/cbor",
            // drgdfu sends no content type, which Drogue reports as octet-stream.
            StatusEncoding::Named => "application/octet-stream",
        };
        let deadline = tokio::time::Instant::now() + self.command_timeout;
        let event = structured_event(&self.shared.app, &self.device, "dfu", content_type, &status.bytes);
        self.shared
            .client
            .publish_with_properties(
                &self.shared.events_topic,
                event.to_string().into_bytes(),
                Some("application/cloudevents+json".into()),
                Vec::new(),
            )
            .await
            .map_err(|e| LinkError::Stopped(format!("publishing a status: {e}")))?;
        loop {
            match tokio::time::timeout_at(deadline, self.commands.recv()).await {
                Err(_) => return Err(LinkError::NoAnswer),
                Ok(None) => {
                    return Err(LinkError::Stopped(
                        "the simulator's MQTT connection has stopped".into(),
                    ))
                }
                Ok(Some(command)) => {
                    // The answer to an earlier status, sent again since: pass over it. What
                    // cannot be read at all goes to the device, which says so.
                    let echoed = ajour_protocol::decode_command(&command).map(|c| c.correlation_id());
                    if matches!(echoed, Ok(id) if id != status.correlation_id) {
                        continue;
                    }
                    return Ok(command);
                }
            }
        }
    }
}

impl Drop for DrogueMqttLink {
    fn drop(&mut self) {
        let mut routes = self.shared.routes.lock().unwrap();
        // Only this link's route: a newer link of the same name keeps its own.
        if routes.get(&self.device).is_some_and(|(id, _)| *id == self.id) {
            routes.remove(&self.device);
        }
    }
}
