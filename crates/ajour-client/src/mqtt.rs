//! One MQTT connection, version 3.1.1 or 5, behind one small interface: the integration and the
//! simulator need the same few operations (subscribe, publish at QoS 1, receive) whichever
//! version the broker is spoken to in, and rumqttc has a separate client for each.
//!
//! [`run_session`] is the one loop that drives a connection: it subscribes again on every
//! (re)connection, hands each message to a [`SessionHandler`], and backs off while the broker is
//! away. [`disconnect`] says goodbye to the broker.

use crate::tls::{client_config, TlsOptions};
use crate::SetupError;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{PublishProperties, SubscribeProperties};
use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

/// The largest packet sent or received: a command carries a block of up to `max_mtu` bytes
/// (64 KiB by default) plus a few bytes of framing.
const MAX_PACKET: usize = 1024 * 1024;

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    V3,
    /// MQTT 5 (Drogue's default).
    #[default]
    V5,
}

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` (plain, default port 1883) or `mqtts://host[:port]` (TLS, default
    /// 8883); `tcp://`, `ssl://` and `tls://` are accepted too.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Must be unique per connection: a broker drops the older of two with the same id.
    pub client_id: String,
    pub version: MqttVersion,
    pub tls: TlsOptions,
    pub keep_alive: Duration,
}

impl MqttConfig {
    /// A configuration for `url` with a fresh client id `{prefix}-{uuid}`.
    pub fn new(url: impl Into<String>, client_id_prefix: &str) -> Self {
        Self {
            url: url.into(),
            username: None,
            password: None,
            client_id: unique_client_id(client_id_prefix),
            version: MqttVersion::V5,
            tls: TlsOptions::default(),
            keep_alive: Duration::from_secs(30),
        }
    }
}

/// `{prefix}-{random}`: each process, and each connection in it, has its own.
pub fn unique_client_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Host, port and whether to use TLS, from a broker URL.
pub fn parse_broker_url(url: &str) -> Result<(String, u16, bool), SetupError> {
    let invalid = |reason: &str| SetupError::InvalidUrl {
        url: url.to_string(),
        reason: reason.into(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    let tls = match parsed.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        _ => return Err(invalid("use mqtt://host:port or mqtts://host:port")),
    };
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| invalid("no host"))?;
    // IPv6 literals come bracketed; the socket address wants them bare.
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = parsed.port().unwrap_or(if tls { 8883 } else { 1883 });
    Ok((host, port, tls))
}

/// A message received.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 only.
    pub content_type: Option<String>,
    /// MQTT 5 only.
    pub user_properties: Vec<(String, String)>,
}

/// What one poll of the connection brought.
#[derive(Debug)]
pub enum Incoming {
    /// (Re)connected: the session is new, subscriptions must be made again.
    Connected,
    Message(Message),
    /// The broker acknowledged a subscription; `granted` is false when it refused it.
    Subscribed {
        granted: bool,
    },
    /// Anything else (acks, pings, outgoing packets).
    Other,
}

/// The sending half: cheap to clone, usable from any task.
#[derive(Clone)]
pub enum MqttClient {
    V3(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The receiving half: must be polled for anything to happen, sent or received.
pub enum MqttConnection {
    V3(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Why a request could not be handed to the connection (it has been dropped).
#[derive(Debug, thiserror::Error)]
#[error("MQTT client: {0}")]
pub struct ClientError(String);

/// A client and its connection for `config`; nothing is connected before the first poll.
/// `capacity` bounds the requests (publishes, subscriptions) queued for the connection.
pub fn connect(config: &MqttConfig, capacity: usize) -> Result<(MqttClient, MqttConnection), SetupError> {
    let (host, port, tls) = parse_broker_url(&config.url)?;
    let tls =
        if tls || config.tls.ca_file.is_some() || config.tls.insecure || config.tls.client_cert.is_some() {
            let tls_config = client_config(&config.tls)?;
            Some(rumqttc::TlsConfiguration::Rustls(tls_config))
        } else {
            None
        };
    // MQTT has no password without a user name: a token alone is not sent.
    let credentials = config
        .username
        .as_ref()
        .map(|user| (user.clone(), config.password.clone().unwrap_or_default()));
    Ok(match config.version {
        MqttVersion::V3 => {
            let mut options = rumqttc::MqttOptions::new(&config.client_id, host, port);
            options
                .set_clean_session(true)
                .set_keep_alive(config.keep_alive)
                .set_max_packet_size(MAX_PACKET, MAX_PACKET);
            if let Some((user, password)) = credentials {
                options.set_credentials(user, password);
            }
            if let Some(tls) = tls {
                options.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, capacity);
            eventloop.set_network_options(network_options(eventloop.network_options()));
            (MqttClient::V3(client), MqttConnection::V3(Box::new(eventloop)))
        }
        MqttVersion::V5 => {
            let mut options = rumqttc::v5::MqttOptions::new(&config.client_id, host, port);
            options
                .set_clean_start(true)
                .set_keep_alive(config.keep_alive)
                .set_max_packet_size(Some(MAX_PACKET as u32))
                // As MQTT 3.1.1's client has by default. Unset, rumqttc sizes its in-flight table
                // for 65,536 publishes: about 14 MB per connection, which a simulator of a
                // thousand devices (a connection each) cannot afford.
                .set_outgoing_inflight_upper_limit(100);
            if let Some((user, password)) = credentials {
                options.set_credentials(user, password);
            }
            if let Some(tls) = tls {
                options.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            options.set_network_options(network_options(options.network_options()));
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, capacity);
            (MqttClient::V5(client), MqttConnection::V5(Box::new(eventloop)))
        }
    })
}

impl MqttClient {
    /// Subscribe at QoS 1. `binary_content_mode` asks Drogue (MQTT 5 only) for events in binary
    /// content mode.
    pub async fn subscribe(&self, filter: &str, binary_content_mode: bool) -> Result<(), ClientError> {
        let qos = rumqttc::QoS::AtLeastOnce;
        match self {
            MqttClient::V3(client) => client.subscribe(filter, qos).await.map_err(error),
            MqttClient::V5(client) if binary_content_mode => {
                let properties = SubscribeProperties {
                    id: None,
                    user_properties: vec![("content-mode".into(), "binary".into())],
                };
                client
                    .subscribe_with_properties(filter, v5_qos(), properties)
                    .await
                    .map_err(error)
            }
            MqttClient::V5(client) => client.subscribe(filter, v5_qos()).await.map_err(error),
        }
    }

    pub async fn unsubscribe(&self, filter: &str) -> Result<(), ClientError> {
        match self {
            MqttClient::V3(client) => client.unsubscribe(filter).await.map_err(error),
            MqttClient::V5(client) => client.unsubscribe(filter).await.map_err(error),
        }
    }

    /// Publish at QoS 1.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), ClientError> {
        match self {
            MqttClient::V3(client) => client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .map_err(error),
            MqttClient::V5(client) => client
                .publish(topic, v5_qos(), false, payload)
                .await
                .map_err(error),
        }
    }

    /// Publish at QoS 1 with MQTT 5 properties (a content type and user properties); on MQTT
    /// 3.1.1, which has no properties, they are dropped.
    pub async fn publish_with_properties(
        &self,
        topic: &str,
        payload: Vec<u8>,
        content_type: Option<String>,
        user_properties: Vec<(String, String)>,
    ) -> Result<(), ClientError> {
        match self {
            MqttClient::V3(_) => self.publish(topic, payload).await,
            MqttClient::V5(client) => {
                let properties = PublishProperties {
                    content_type,
                    user_properties,
                    ..Default::default()
                };
                client
                    .publish_with_properties(topic, v5_qos(), false, payload, properties)
                    .await
                    .map_err(error)
            }
        }
    }

    /// Ask the connection to say goodbye to the broker; never waits.
    pub fn try_disconnect(&self) {
        let _ = match self {
            MqttClient::V3(client) => client.try_disconnect().map_err(error),
            MqttClient::V5(client) => client.try_disconnect().map_err(error),
        };
    }
}

/// No Nagle: a status and its command are small packets each waiting on the other, and
/// Nagle's algorithm with delayed ACKs would add tens of milliseconds to every block.
fn network_options(mut options: rumqttc::NetworkOptions) -> rumqttc::NetworkOptions {
    options.set_tcp_nodelay(true);
    options
}

fn v5_qos() -> rumqttc::v5::mqttbytes::QoS {
    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
}

fn error(error: impl std::fmt::Display) -> ClientError {
    ClientError(error.to_string())
}

impl MqttConnection {
    /// Drive the connection: connect if needed, send what is queued, return what came in. An
    /// error means the connection is down; polling again reconnects.
    pub async fn poll(&mut self) -> Result<Incoming, String> {
        match self {
            MqttConnection::V3(eventloop) => {
                use rumqttc::{Event, Packet};
                match eventloop.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => Ok(Incoming::Connected),
                    Event::Incoming(Packet::Publish(publish)) => Ok(Incoming::Message(Message {
                        topic: publish.topic,
                        payload: publish.payload,
                        content_type: None,
                        user_properties: Vec::new(),
                    })),
                    Event::Incoming(Packet::SubAck(ack)) => Ok(Incoming::Subscribed {
                        granted: ack
                            .return_codes
                            .iter()
                            .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)),
                    }),
                    _ => Ok(Incoming::Other),
                }
            }
            MqttConnection::V5(eventloop) => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::Event;
                match eventloop.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => Ok(Incoming::Connected),
                    Event::Incoming(Packet::Publish(publish)) => {
                        let (content_type, user_properties) = match publish.properties {
                            Some(p) => (p.content_type, p.user_properties),
                            None => (None, Vec::new()),
                        };
                        Ok(Incoming::Message(Message {
                            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                            payload: publish.payload,
                            content_type,
                            user_properties,
                        }))
                    }
                    Event::Incoming(Packet::SubAck(ack)) => Ok(Incoming::Subscribed {
                        granted: ack.return_codes.iter().all(|c| {
                            matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_))
                        }),
                    }),
                    _ => Ok(Incoming::Other),
                }
            }
        }
    }
}

/// What a [`run_session`] does with what its connection brings.
pub trait SessionHandler {
    /// (Re)connected: the broker's session is new. Returns the filters to subscribe to (again).
    fn connected(&mut self) -> Vec<String>;

    /// The broker answered a subscription; `granted` is false when it refused it.
    fn subscribed(&mut self, granted: bool) {
        if !granted {
            tracing::error!("the broker refused a subscription: check the user's access");
        }
    }

    /// A message arrived. `Break` ends the session.
    fn message(&mut self, message: Message) -> ControlFlow<()>;

    /// The connection was lost (or could not be made). `Continue` reconnects after a backoff,
    /// `Break` ends the session.
    fn connection_lost(&mut self, error: &str) -> ControlFlow<()> {
        tracing::warn!(%error, "MQTT connection lost; reconnecting");
        ControlFlow::Continue(())
    }
}

/// How a [`run_session`] subscribes and reconnects.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Ask Drogue for events in binary content mode (MQTT 5 only).
    pub binary_content_mode: bool,
    /// The first wait before reconnecting; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            binary_content_mode: false,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// `stop` resolved.
    Stopped,
    /// The handler ended it.
    Handler,
}

/// Drive `connection` until `stop` resolves or `handler` ends the session: subscribe to the
/// handler's filters on every (re)connection (without waiting here: the subscriptions go out
/// through this very loop), hand it every message, and back off while the broker cannot be
/// reached. The connection stays open; [`disconnect`] closes it.
pub async fn run_session(
    client: &MqttClient,
    connection: &mut MqttConnection,
    options: &SessionOptions,
    handler: &mut impl SessionHandler,
    stop: impl Future<Output = ()>,
) -> SessionEnd {
    tokio::pin!(stop);
    let mut backoff = options.min_backoff;
    loop {
        let polled = tokio::select! {
            _ = &mut stop => return SessionEnd::Stopped,
            polled = connection.poll() => polled,
        };
        let flow = match polled {
            Ok(Incoming::Connected) => {
                backoff = options.min_backoff;
                let filters = handler.connected();
                let (client, binary) = (client.clone(), options.binary_content_mode);
                tokio::spawn(async move {
                    for filter in filters {
                        if let Err(error) = client.subscribe(&filter, binary).await {
                            tracing::warn!(%error, %filter, "subscribing failed");
                        }
                    }
                });
                ControlFlow::Continue(())
            }
            Ok(Incoming::Subscribed { granted }) => {
                handler.subscribed(granted);
                ControlFlow::Continue(())
            }
            Ok(Incoming::Message(message)) => handler.message(message),
            Ok(Incoming::Other) => ControlFlow::Continue(()),
            Err(error) => {
                let flow = handler.connection_lost(&error);
                if flow.is_continue() {
                    tokio::select! {
                        _ = &mut stop => return SessionEnd::Stopped,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(options.max_backoff);
                }
                flow
            }
        };
        if flow.is_break() {
            return SessionEnd::Handler;
        }
    }
}

/// Say goodbye to the broker: send what is queued and a DISCONNECT, for at most a second.
pub async fn disconnect(client: &MqttClient, connection: &mut MqttConnection) {
    client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while connection.poll().await.is_ok() {}
    })
    .await;
}

/// A connection that stays subscribed to some filters and hands every message to a channel: the
/// other side of a broker for tests and tools (the cloud publishing events and reading commands).
/// It reconnects and subscribes again when the broker restarts; it stops when dropped.
pub struct Inbox {
    pub client: MqttClient,
    pub messages: tokio::sync::mpsc::UnboundedReceiver<Message>,
    subscriptions: tokio::sync::watch::Receiver<u64>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Inbox {
    /// Connect to the broker of `config` and subscribe to `filters` (at once, and again on every
    /// reconnection).
    pub fn connect(config: &MqttConfig, filters: Vec<String>) -> Result<Self, SetupError> {
        let (client, mut connection) = connect(config, 1024)?;
        let (messages_tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let (subscriptions_tx, subscriptions) = tokio::sync::watch::channel(0u64);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        struct Deliver {
            filters: Vec<String>,
            messages: tokio::sync::mpsc::UnboundedSender<Message>,
            subscriptions: tokio::sync::watch::Sender<u64>,
        }
        impl SessionHandler for Deliver {
            fn connected(&mut self) -> Vec<String> {
                self.filters.clone()
            }
            fn subscribed(&mut self, granted: bool) {
                if granted {
                    self.subscriptions.send_modify(|n| *n += 1);
                }
            }
            fn message(&mut self, message: Message) -> ControlFlow<()> {
                // Nobody reading any more: the inbox was dropped.
                match self.messages.send(message) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            }
            fn connection_lost(&mut self, _: &str) -> ControlFlow<()> {
                ControlFlow::Continue(())
            }
        }
        let mut deliver = Deliver {
            filters,
            messages: messages_tx,
            subscriptions: subscriptions_tx,
        };
        let task_client = client.clone();
        let options = SessionOptions {
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            ..SessionOptions::default()
        };
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            run_session(&task_client, &mut connection, &options, &mut deliver, stop).await;
            disconnect(&task_client, &mut connection).await;
        });
        Ok(Self {
            client,
            messages,
            subscriptions,
            stop,
        })
    }

    /// Wait until the broker has granted `n` subscriptions in all (one per filter per
    /// connection); false after `timeout`.
    pub async fn subscribed(&mut self, n: u64, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.subscriptions.wait_for(|granted| *granted >= n)).await,
            Ok(Ok(_))
        )
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_broker_url("mqtts://mqtt-integration.example.com").unwrap(),
            ("mqtt-integration.example.com".into(), 8883, true)
        );
        assert_eq!(
            parse_broker_url("tcp://[::1]:18883").unwrap(),
            ("::1".into(), 18883, false)
        );
        for bad in ["http://x:1", "mqtt://", "not a url", ""] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_ids_are_unique() {
        assert_ne!(unique_client_id("ajour"), unique_client_id("ajour"));
        assert!(unique_client_id("ajour").starts_with("ajour-"));
    }
}
