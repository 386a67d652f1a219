//! Drogue's MQTT endpoint (`--mqtt-listen`), MQTT 3.1.1 and 5: a device connects with user
//! name `device@app` (or a `user` credential's name) and its password, publishes its status to
//! `dfu`, and receives the command on `command/inbox//dfu` once subscribed to `command/inbox/#`.
//! A gateway publishes to `dfu/{device}` for a device that names it in
//! `spec.gatewaySelector.matchNames`, and the command arrives on `command/inbox/{device}/dfu`.
//!
//! This is an endpoint, not a broker (docs/mqtt.md says why): nothing a client publishes reaches
//! another client. Every command is the answer to a status, delivered to the connections of the
//! client that sent the status, so a device cannot read another device's commands, whatever it
//! subscribes to; filters outside its own inbox are refused all the same, to say so.

mod packets;
mod topics;

use crate::http::DFU_CHANNEL;
use ajour_protocol::MAX_STATUS_SIZE;
use ajour_service::hot_metrics::HotCounter;
use ajour_service::{error_total, CertSignIn, Refusal, SignIn, UpdateService};
use ajour_types::Key;
use bytes::{Bytes, BytesMut};
use packets::{
    ConnectRefusal, DisconnectReason, Inbound, Outbound, PubAckCode, Publish, ReadError, SubscribeCode,
    Version,
};
use rumqttc::mqttbytes::QoS;
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

pub use topics::{command_topic, matches};

/// MQTT's port, and MQTT over TLS's.
pub const DEFAULT_PORT: u16 = 1883;
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// The largest packet read: a status of [`MAX_STATUS_SIZE`] with room for its topic and MQTT 5
/// properties. Said in MQTT 5's CONNACK; larger packets close the connection.
pub const MAX_PACKET_SIZE: usize = MAX_STATUS_SIZE + 1024;

/// Commands waiting to be written to one connection. A connection that lets more pile up (it
/// does not read) loses the newest: its device sends its status again.
const OUTBOX: usize = 16;

/// Counted on every status published (the handle looked up once).
static PUBLISHES: HotCounter = HotCounter::new("ajour_mqtt_publishes_total");

/// How MQTT connections are timed and capped (docs/mqtt.md, "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MqttConfig {
    /// Connections open at once; past it a new connection is closed at once.
    pub max_connections: usize,
    /// The TLS handshake and CONNECT must have arrived this long after the connection was
    /// accepted.
    pub connect_timeout: Duration,
    /// How long a connection whose client asked for no keep-alive (0) may stay silent.
    pub idle_timeout: Duration,
    /// A write to a client that does not read is given up after this long, and the connection
    /// closed.
    pub write_timeout: Duration,
    /// Topic filters one connection may hold.
    pub max_subscriptions: usize,
    /// On shutdown, how long connections get to finish the status in hand.
    pub shutdown_timeout: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(10),
            max_subscriptions: 16,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// A command on its way to a connection.
#[derive(Debug, Clone)]
struct Command {
    topic: Arc<str>,
    payload: Bytes,
    correlation: Option<Bytes>,
}

/// The connections of each signed-in client that subscribed to something: where the answers
/// to its statuses go. A client reached over two connections (`mosquitto_pub` beside
/// `mosquitto_sub`) gets its commands on each that subscribed.
#[derive(Default)]
struct Inboxes {
    next_id: AtomicU64,
    by_client: Mutex<HashMap<Key, Vec<Outbox>>>,
}

/// A connection's id and where its commands go.
type Outbox = (u64, mpsc::Sender<Command>);

impl Inboxes {
    fn register(&self, client: &Key, outbox: mpsc::Sender<Command>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut by_client = self.by_client.lock().unwrap_or_else(PoisonError::into_inner);
        by_client.entry(client.clone()).or_default().push((id, outbox));
        id
    }

    fn unregister(&self, client: &Key, id: u64) {
        let mut by_client = self.by_client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(connections) = by_client.get_mut(client) {
            connections.retain(|(other, _)| *other != id);
            if connections.is_empty() {
                by_client.remove(client);
            }
        }
    }

    /// Hand `command` to every connection of `client` but `except` (the one that sent the
    /// status, which writes it itself); each writes it if one of its filters matches. Returns
    /// how many took it.
    fn deliver(&self, client: &Key, command: &Command, except: Option<u64>) -> usize {
        let by_client = self.by_client.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(connections) = by_client.get(client) else {
            return 0;
        };
        let mut delivered = 0;
        for (_, outbox) in connections.iter().filter(|(id, _)| Some(*id) != except) {
            match outbox.try_send(command.clone()) {
                Ok(()) => delivered += 1,
                Err(_) => metrics::counter!("ajour_mqtt_commands_dropped_total").increment(1),
            }
        }
        delivered
    }
}

struct Endpoint {
    service: Arc<UpdateService>,
    config: MqttConfig,
    inboxes: Inboxes,
}

/// Serve devices on `listener` (over TLS when `tls` is given) until `stop` resolves; then tell
/// every connection the server is going (MQTT 5), give them up to
/// [`MqttConfig::shutdown_timeout`] to finish the status in hand, and return.
pub async fn serve(
    listener: TcpListener,
    service: Arc<UpdateService>,
    config: MqttConfig,
    tls: Option<TlsAcceptor>,
    stop: impl Future<Output = ()>,
) {
    let endpoint = Arc::new(Endpoint {
        service,
        config,
        inboxes: Inboxes::default(),
    });
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let (drain, draining) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                metrics::counter!("ajour_mqtt_accept_failures_total").increment(1);
                ajour_service::warn_throttled!(ajour_service::LOG_INTERVAL, %error, "cannot accept MQTT connections");
                // Out of files: let open connections finish and free theirs.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("ajour_mqtt_connections_refused_total").increment(1);
            tracing::debug!(%peer, "MQTT connection refused: too many connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let endpoint = endpoint.clone();
        let tls = tls.clone();
        let draining = draining.clone();
        connections.spawn(async move {
            metrics::gauge!("ajour_mqtt_connections").increment(1.0);
            let deadline = Instant::now() + endpoint.config.connect_timeout;
            match tls {
                None => endpoint.connection(stream, peer, None, deadline, draining).await,
                Some(tls) => match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let chain = crate::client_cert::peer_chain(stream.get_ref().1);
                        endpoint.connection(stream, peer, chain, deadline, draining).await
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, "MQTT TLS handshake failed: {error}"),
                    Err(_) => tracing::debug!(%peer, "MQTT connection closed: no TLS handshake in time"),
                },
            }
            metrics::gauge!("ajour_mqtt_connections").decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    let _ = drain.send(true);
    let drained = tokio::time::timeout(config.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("closing {} MQTT connections still open", connections.len());
        connections.shutdown().await;
    }
}

/// Why a session ends early: said to an MQTT 5 client in DISCONNECT, then the connection closes.
struct Close {
    reason: DisconnectReason,
    text: String,
}

impl Close {
    fn new(reason: DisconnectReason, text: impl Into<String>) -> Self {
        metrics::counter!("ajour_mqtt_disconnects_total", "reason" => reason_name(reason)).increment(1);
        Self {
            reason,
            text: text.into(),
        }
    }
}

fn reason_name(reason: DisconnectReason) -> &'static str {
    match reason {
        DisconnectReason::ProtocolError => "protocol_error",
        DisconnectReason::NotAuthorized => "not_authorized",
        DisconnectReason::TopicNameInvalid => "topic_invalid",
        DisconnectReason::PacketTooLarge => "too_large",
        DisconnectReason::KeepAliveTimeout => "keep_alive",
        DisconnectReason::ServerShuttingDown => "shutdown",
    }
}

/// One connection's reading and writing halves, with its buffers.
struct Wire<S> {
    stream: S,
    input: BytesMut,
    output: BytesMut,
    version: Version,
    /// The largest packet the client accepts (MQTT 5's CONNECT may say).
    client_max: usize,
    write_timeout: Duration,
}

impl<S> Wire<S> {
    fn queue(&mut self, packet: Outbound) {
        if !packets::write(self.version, packet, &mut self.output, self.client_max) {
            metrics::counter!("ajour_mqtt_commands_dropped_total").increment(1);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// Read more bytes before `deadline`; `Ok(false)` when the client closed.
    async fn fill(&mut self, deadline: Instant) -> Result<bool, &'static str> {
        match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.input)).await {
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(_)) => Ok(false),
            Err(_) => Err("timed out"),
        }
    }

    async fn flush(&mut self) -> Result<(), ()> {
        if self.output.is_empty() {
            return Ok(());
        }
        let written = tokio::time::timeout(self.write_timeout, self.stream.write_all(&self.output)).await;
        self.output.clear();
        match written {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Tell an MQTT 5 client why it is being disconnected (MQTT 3.1.1 has no word for it).
    async fn close(&mut self, close: Close) {
        tracing::debug!(
            reason = reason_name(close.reason),
            "MQTT connection closed: {}",
            close.text
        );
        self.queue(Outbound::Disconnect {
            reason: close.reason,
            text: close.text,
        });
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

/// What a signed-in connection holds.
struct Session {
    /// The client that signed in (a device, or a gateway).
    client: Key,
    filters: Vec<String>,
    /// Its place in [`Inboxes`], once it subscribed.
    inbox: Option<u64>,
    outbox: mpsc::Sender<Command>,
}

impl Session {
    /// Queue `command` for writing if one of the connection's filters matches its topic;
    /// whether it did.
    fn queue_command<S>(&self, wire: &mut Wire<S>, command: &Command) -> bool {
        let matched = self
            .filters
            .iter()
            .any(|filter| topics::matches(filter, &command.topic));
        if matched {
            wire.queue(Outbound::Publish {
                topic: command.topic.to_string(),
                payload: command.payload.clone(),
                correlation: command.correlation.clone(),
            });
        }
        matched
    }
}

impl Endpoint {
    /// Serve one connection; `chain` is the client certificate it presented over TLS.
    async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        peer: SocketAddr,
        chain: Option<Vec<CertificateDer<'static>>>,
        deadline: Instant,
        draining: watch::Receiver<bool>,
    ) {
        let mut wire = Wire {
            stream,
            input: BytesMut::with_capacity(512),
            output: BytesMut::with_capacity(512),
            version: Version::V311,
            client_max: MAX_PACKET_SIZE,
            write_timeout: self.config.write_timeout,
        };
        let connect = loop {
            match packets::read_connect(&mut wire.input, MAX_PACKET_SIZE) {
                Ok(Some(connect)) => break connect,
                Ok(None) => match wire.fill(deadline).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(_) => {
                        metrics::counter!("ajour_mqtt_connections_timed_out_total").increment(1);
                        tracing::debug!(%peer, "MQTT connection closed: no CONNECT in time");
                        return;
                    }
                },
                Err(ReadError::UnsupportedVersion) => {
                    // CONNACK 0x01 in MQTT 3.1.1's form, which older clients read too.
                    let _ = wire.stream.write_all(&[0x20, 2, 0, 1]).await;
                    error_total("mqtt_protocol");
                    return;
                }
                Err(error) => {
                    error_total("mqtt_protocol");
                    tracing::debug!(%peer, "MQTT connection closed: {error}");
                    return;
                }
            }
        };
        wire.version = connect.version;
        if let Some(max) = connect.max_packet_size {
            wire.client_max = usize::try_from(max).unwrap_or(usize::MAX);
        }
        let signed_in = match (connect.username.as_deref(), connect.password.as_deref(), &chain) {
            (Some(user), Some(password), _) => {
                let given = SignIn {
                    user,
                    password,
                    application: None,
                    as_device: None,
                    peer: Some(peer.ip()),
                };
                match given.key() {
                    Ok(key) => {
                        let span = ajour_service::device_span(&key);
                        self.service
                            .sign_in(&key, &given)
                            .instrument(span)
                            .await
                            .map(|device| device.key().clone())
                    }
                    Err(refusal) => Err(refusal),
                }
            }
            // No password: the client certificate, when one was presented over TLS. A user name
            // `device@app` (or `@app`) names the application; the certificate names the device.
            (user, None, Some(chain)) => {
                let given = CertSignIn {
                    chain,
                    application: user.and_then(|user| user.split_once('@')).map(|(_, app)| app),
                    as_device: None,
                    peer: Some(peer.ip()),
                };
                self.service
                    .sign_in_certificate(&given)
                    .await
                    .map(|device| device.key().clone())
            }
            _ => {
                error_total("auth_missing");
                wire.queue(connack_refused(
                    ConnectRefusal::BadUserNameOrPassword,
                    "user name device@application and password, or a client certificate over TLS, required",
                ));
                let _ = wire.flush().await;
                return;
            }
        };
        let client = match signed_in {
            Ok(client) => client,
            Err(refusal) => {
                wire.queue(refused(refusal));
                let _ = wire.flush().await;
                return;
            }
        };
        metrics::counter!("ajour_mqtt_sessions_total", "version" => connect.version.name()).increment(1);
        wire.queue(Outbound::ConnAck {
            refused: None,
            max_packet_size: u32::try_from(MAX_PACKET_SIZE).unwrap_or(u32::MAX),
            reason: None,
        });
        if wire.flush().await.is_err() {
            return;
        }
        let keep_alive = match connect.keep_alive {
            0 => self.config.idle_timeout,
            // MQTT: a client silent for one and a half keep-alive periods is gone.
            seconds => Duration::from_millis(u64::from(seconds) * 1500),
        };
        let (outbox, commands) = mpsc::channel(OUTBOX);
        let mut session = Session {
            client,
            filters: Vec::new(),
            inbox: None,
            outbox,
        };
        let span = ajour_service::device_span(&session.client);
        let ended = self
            .session(&mut wire, &mut session, commands, keep_alive, draining)
            .instrument(span)
            .await;
        if let Some(id) = session.inbox {
            self.inboxes.unregister(&session.client, id);
        }
        match ended {
            Some(close) => wire.close(close).await,
            None => {
                let _ = wire.stream.shutdown().await;
            }
        }
    }

    /// Serve a signed-in connection until the client leaves (`None`) or is told to (`Some`).
    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        wire: &mut Wire<S>,
        session: &mut Session,
        mut commands: mpsc::Receiver<Command>,
        keep_alive: Duration,
        mut draining: watch::Receiver<bool>,
    ) -> Option<Close> {
        let mut deadline = Instant::now() + keep_alive;
        loop {
            // Every packet already read is handled before reading more.
            loop {
                match packets::read(wire.version, &mut wire.input, MAX_PACKET_SIZE) {
                    Ok(Some(packet)) => {
                        deadline = Instant::now() + keep_alive;
                        if let Err(end) = self.handle(wire, session, packet).await {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(ReadError::TooLarge(size)) => {
                        error_total("payload_too_large");
                        return Some(Close::new(
                            DisconnectReason::PacketTooLarge,
                            format!("a packet of {size} bytes; at most {MAX_PACKET_SIZE}"),
                        ));
                    }
                    Err(error) => {
                        error_total("mqtt_protocol");
                        return Some(Close::new(DisconnectReason::ProtocolError, error.to_string()));
                    }
                }
            }
            // Commands other connections handed this one go out in the same write.
            while let Ok(command) = commands.try_recv() {
                session.queue_command(wire, &command);
            }
            if wire.flush().await.is_err() {
                return None;
            }
            tokio::select! {
                biased;
                _ = draining.changed() => {
                    return Some(Close::new(DisconnectReason::ServerShuttingDown, "the server is shutting down"));
                }
                Some(command) = commands.recv() => {
                    session.queue_command(wire, &command);
                }
                read = wire.fill(deadline) => match read {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(_) => {
                        metrics::counter!("ajour_mqtt_connections_timed_out_total").increment(1);
                        return Some(Close::new(DisconnectReason::KeepAliveTimeout, "keep-alive timed out"));
                    }
                },
            }
        }
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        wire: &mut Wire<S>,
        session: &mut Session,
        packet: Inbound,
    ) -> Result<(), Option<Close>> {
        match packet {
            Inbound::Publish(publish) => {
                if let Some(close) = self.publish(wire, session, publish).await {
                    return Err(Some(close));
                }
            }
            Inbound::PubRel { pkid } => wire.queue(Outbound::PubComp { pkid }),
            Inbound::Subscribe { pkid, filters } => {
                let mut codes = Vec::with_capacity(filters.len());
                for (filter, qos) in filters {
                    codes.push(self.subscribe(session, filter, qos).await);
                }
                wire.queue(Outbound::SubAck { pkid, codes });
            }
            Inbound::Unsubscribe { pkid, filters } => {
                session.filters.retain(|held| !filters.contains(held));
                wire.queue(Outbound::UnsubAck {
                    pkid,
                    count: filters.len(),
                });
            }
            Inbound::PingReq => wire.queue(Outbound::PingResp),
            Inbound::Ack => {}
            // What is queued is still written; then the connection closes.
            Inbound::Disconnect => {
                let _ = wire.flush().await;
                return Err(None);
            }
            Inbound::Unexpected(what) => {
                error_total("mqtt_protocol");
                return Err(Some(Close::new(
                    DisconnectReason::ProtocolError,
                    format!("{what} is not sent to a server"),
                )));
            }
        }
        Ok(())
    }

    /// The outcome of one SUBSCRIBE filter.
    async fn subscribe(&self, session: &mut Session, filter: String, qos: QoS) -> SubscribeCode {
        let code = match topics::filter_scope(&filter) {
            Err(topics::FilterRefusal::Invalid(why)) => {
                tracing::debug!("subscription refused: {why}");
                SubscribeCode::TopicFilterInvalid
            }
            Err(topics::FilterRefusal::Outside(why)) => {
                tracing::info!("subscription refused: {why}");
                SubscribeCode::NotAuthorized
            }
            Ok(topics::FilterScope::Device(device)) if !self.acts_for(&session.client, device).await => {
                tracing::info!("subscription to '{filter}' refused: the client does not act for '{device}'");
                SubscribeCode::NotAuthorized
            }
            Ok(_)
                if session.filters.len() >= self.config.max_subscriptions
                    && !session.filters.contains(&filter) =>
            {
                tracing::info!(
                    "subscription refused: at most {} filters per connection",
                    self.config.max_subscriptions
                );
                SubscribeCode::NotAuthorized
            }
            // Commands go out at QoS 0; a higher QoS is granted as 1 (MQTT 5 CONNACK says
            // no more is needed), which delivers them just the same.
            Ok(_) => SubscribeCode::Granted(if qos == QoS::AtMostOnce {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            }),
        };
        match code {
            SubscribeCode::Granted(_) => {
                if !session.filters.contains(&filter) {
                    session.filters.push(filter);
                }
                if session.inbox.is_none() {
                    session.inbox = Some(self.inboxes.register(&session.client, session.outbox.clone()));
                }
            }
            _ => metrics::counter!("ajour_mqtt_subscriptions_refused_total").increment(1),
        }
        code
    }

    /// Whether `client` is `device` or acts for it (the device names it as a gateway).
    async fn acts_for(&self, client: &Key, device: &str) -> bool {
        matches!(client, Key::Device(_, name) if name.as_str() == device)
            || self.service.session_device(client, Some(device)).await.is_ok()
    }

    /// Answer a status: acknowledge it, then hand its command to the client's connections.
    async fn publish<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        wire: &mut Wire<S>,
        session: &Session,
        publish: Publish,
    ) -> Option<Close> {
        PUBLISHES.increment(1);
        let topic = match topics::publish_topic(&publish.topic) {
            Ok(topic) => topic,
            Err(topics::InvalidTopic(why)) => {
                return refuse_publish(wire, &publish, PubAckCode::TopicNameInvalid, why);
            }
        };
        if topic.channel != DFU_CHANNEL {
            // Another channel's telemetry: Drogue would pass it on; Ajour has nothing to do.
            acknowledge(wire, &publish);
            return None;
        }
        if publish.payload.len() > MAX_STATUS_SIZE {
            error_total("payload_too_large");
            return refuse_publish(
                wire,
                &publish,
                PubAckCode::PayloadFormatInvalid,
                format!("a status is at most {MAX_STATUS_SIZE} bytes"),
            );
        }
        let device = match self
            .service
            .session_device(&session.client, topic.as_device)
            .await
        {
            Ok(device) => device,
            Err(Refusal::NotListed(why)) => {
                return refuse_publish(wire, &publish, PubAckCode::NotAuthorized, why);
            }
            Err(_) => {
                return refuse_publish(
                    wire,
                    &publish,
                    PubAckCode::Unavailable,
                    "the registry cannot be read; try again".to_string(),
                );
            }
        };
        let reply = match device.handle_status(&publish.payload).await {
            Ok(reply) => reply,
            Err(error) => {
                return refuse_publish(
                    wire,
                    &publish,
                    PubAckCode::PayloadFormatInvalid,
                    error.to_string(),
                );
            }
        };
        acknowledge(wire, &publish);
        let command = Command {
            topic: topics::command_topic(topic.as_device, DFU_CHANNEL).into(),
            payload: Bytes::from(reply.command),
            correlation: publish.correlation,
        };
        // This connection writes its own answer with the acknowledgement, in one write; the
        // client's other connections (mosquitto_sub beside mosquitto_pub) get it through theirs.
        let here = session.queue_command(wire, &command);
        let elsewhere = self.inboxes.deliver(&session.client, &command, session.inbox);
        if !here && elsewhere == 0 {
            metrics::counter!("ajour_mqtt_commands_undelivered_total").increment(1);
            tracing::debug!("no connection of the client subscribed to its commands");
        }
        None
    }
}

fn acknowledge<S>(wire: &mut Wire<S>, publish: &Publish) {
    match publish.qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => wire.queue(Outbound::PubAck {
            pkid: publish.pkid,
            code: PubAckCode::Success,
            reason: None,
        }),
        QoS::ExactlyOnce => wire.queue(Outbound::PubRec { pkid: publish.pkid }),
    }
}

/// Refuse a PUBLISH: an MQTT 5 PUBACK that says why at QoS 1; otherwise (QoS 0 has no
/// acknowledgement, MQTT 3.1.1 no negative one) the connection is closed, saying why in MQTT 5.
fn refuse_publish<S>(wire: &mut Wire<S>, publish: &Publish, code: PubAckCode, why: String) -> Option<Close> {
    metrics::counter!("ajour_mqtt_publishes_refused_total").increment(1);
    tracing::info!(topic = publish.topic, "status refused: {why}");
    if wire.version == Version::V5 && publish.qos == QoS::AtLeastOnce {
        wire.queue(Outbound::PubAck {
            pkid: publish.pkid,
            code,
            reason: Some(why),
        });
        return None;
    }
    let reason = match code {
        PubAckCode::NotAuthorized => DisconnectReason::NotAuthorized,
        PubAckCode::TopicNameInvalid => DisconnectReason::TopicNameInvalid,
        PubAckCode::PayloadFormatInvalid | PubAckCode::Unavailable | PubAckCode::Success => {
            DisconnectReason::ProtocolError
        }
    };
    Some(Close::new(reason, why))
}

fn connack_refused(refusal: ConnectRefusal, reason: &str) -> Outbound {
    metrics::counter!("ajour_mqtt_connects_refused_total").increment(1);
    Outbound::ConnAck {
        refused: Some(refusal),
        max_packet_size: u32::try_from(MAX_PACKET_SIZE).unwrap_or(u32::MAX),
        reason: Some(reason.to_string()),
    }
}

/// A sign-in refused, in CONNACK's codes.
fn refused(refusal: Refusal) -> Outbound {
    match refusal {
        Refusal::NoApplication => connack_refused(
            ConnectRefusal::BadUserNameOrPassword,
            "no application: the user name is device@application",
        ),
        Refusal::Denied | Refusal::NotListed(_) => {
            connack_refused(ConnectRefusal::NotAuthorized, "not authorized")
        }
        Refusal::Throttled { .. } => connack_refused(
            ConnectRefusal::TooManyAttempts,
            "too many failed logins; try again later",
        ),
        Refusal::Unavailable => connack_refused(
            ConnectRefusal::ServerUnavailable,
            "the registry cannot be read; try again",
        ),
    }
}
