//! The MQTT device endpoint end to end (`ajour serve --mqtt-listen`): fleets over MQTT 3.1.1 and
//! 5 on both registries, Mosquitto's own clients as a device and as a gateway, a gateway acting
//! for two devices with MQTT 5 correlation data, devices kept out of each other's topics, hostile
//! clients while a device updates, and the same command bytes as over HTTP.

use crate::support::*;
use ajour_client::mqtt::{MqttConfig, MqttVersion};
use ajour_protocol::{decode_command, encode_status, Encoding, Status};
use ajour_sim::Transport;
use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, DisconnectReasonCode, Filter, Login, Packet, PubAckReason, Publish,
    PublishProperties, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a test waits for one packet before failing (it bounds a hang; it does not
/// synchronise anything).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// A server started in this process with `--mqtt-listen 127.0.0.1:0` and `extra` flags.
async fn mqtt_server(backend: Backend, extra: &[&str]) -> FlagServer {
    let server = FlagServer::start(backend, &[&["--mqtt-listen", "127.0.0.1:0"][..], extra].concat()).await;
    assert_ne!(server.mqtt().port(), 0);
    server
}

/// Device `name` of `app` (password `pw`) that devices `gateways` may act for.
async fn create_gatewayed(server: &FlagServer, app: &str, name: &str, gateways: &[&str]) {
    let body = json!({
        "metadata": {"application": app, "name": name},
        "spec": {
            "authentication": {"credentials": [{"pass": "pw"}]},
            "gatewaySelector": {"matchNames": gateways},
        },
    });
    let (status, body) = server
        .api_send(reqwest::Method::POST, &format!("apps/{app}/devices"), Some(body))
        .await;
    assert!(status.is_success(), "{status}: {body}");
}

/// A device's first status: running 1.0.0, 256-byte blocks, correlation id `id`.
fn first_status(id: u32) -> Vec<u8> {
    encode_status(
        &Status::first(b"1.0.0".to_vec(), Some(256), Some(id)),
        Encoding::Packed,
    )
}

/// A raw MQTT 5 client: every packet and reason code the endpoint sends, as sent.
struct Raw5 {
    stream: TcpStream,
    buffer: BytesMut,
}

impl Raw5 {
    /// Connect and return the CONNACK.
    async fn connect(server: SocketAddr, user: &str, password: &str) -> (Self, ConnAck) {
        let mut raw = Self {
            stream: TcpStream::connect(server).await.unwrap(),
            buffer: BytesMut::new(),
        };
        let connect = rumqttc::v5::mqttbytes::v5::Connect {
            keep_alive: 30,
            client_id: format!("raw-{user}"),
            clean_start: true,
            properties: None,
        };
        raw.send(Packet::Connect(connect, None, Some(Login::new(user, password))))
            .await;
        match raw.next().await {
            Some(Packet::ConnAck(ack)) => (raw, ack),
            other => panic!("no CONNACK: {other:?}"),
        }
    }

    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next packet, or `None` when the server closed the connection.
    async fn next(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buffer, None) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(error) => panic!("the server sent a malformed packet: {error:?}"),
            }
            let read = tokio::time::timeout(ANSWER_TIMEOUT, self.stream.read_buf(&mut self.buffer))
                .await
                .expect("a packet in time");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn subscribe(&mut self, filters: &[&str]) -> Vec<SubscribeReasonCode> {
        let filters = filters.iter().map(|f| Filter::new(*f, QoS::AtLeastOnce));
        let mut subscribe = Subscribe::new_many(filters, None);
        subscribe.pkid = 7;
        self.send(Packet::Subscribe(subscribe)).await;
        match self.next().await {
            Some(Packet::SubAck(ack)) => {
                assert_eq!(ack.pkid, 7);
                ack.return_codes
            }
            other => panic!("no SUBACK: {other:?}"),
        }
    }

    /// Publish at QoS 1 with `correlation`, and return the PUBACK's reason and reason string.
    async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        correlation: &[u8],
    ) -> (PubAckReason, Option<String>) {
        let properties = PublishProperties {
            correlation_data: Some(Bytes::copy_from_slice(correlation)),
            ..Default::default()
        };
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload, Some(properties));
        publish.pkid = 3;
        self.send(Packet::Publish(publish)).await;
        match self.next().await {
            Some(Packet::PubAck(ack)) => {
                assert_eq!(ack.pkid, 3);
                (ack.reason, ack.properties.and_then(|p| p.reason_string))
            }
            other => panic!("no PUBACK: {other:?}"),
        }
    }

    /// The next command: its topic, payload and correlation data.
    async fn command(&mut self) -> (String, Bytes, Option<Bytes>) {
        match self.next().await {
            Some(Packet::Publish(publish)) => (
                String::from_utf8(publish.topic.to_vec()).unwrap(),
                publish.payload,
                publish.properties.and_then(|p| p.correlation_data),
            ),
            other => panic!("no command: {other:?}"),
        }
    }

    /// PINGREQ, and the next packet must be its PINGRESP: nothing was queued for this client
    /// before it (what is queued for a connection is written before what it asks for next).
    async fn nothing_queued(&mut self) {
        self.send(Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq))
            .await;
        match self.next().await {
            Some(Packet::PingResp(_)) => {}
            other => panic!("something else before PINGRESP: {other:?}"),
        }
    }
}

fn endpoint(server: &FlagServer, version: MqttVersion) -> MqttConfig {
    let mut config = MqttConfig::new(format!("mqtt://{}", server.mqtt()), "unused");
    config.version = version;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_update_over_mqtt_3_1_1_and_5_on_both_registries() {
    for backend in BACKENDS {
        let server = mqtt_server(backend, &[]).await;
        let image = firmware_bytes(8 * 1024, 4);
        let names: Vec<String> = (0..10).map(|i| format!("sim-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        server.with_devices("fleet", &image, &names).await;
        for (version, count) in [(MqttVersion::V5, 6), (MqttVersion::V3, 4)] {
            let mut simulation = fleet(
                "fleet",
                count,
                Transport::Mqtt {
                    endpoint: endpoint(&server, version),
                    command_timeout: Duration::from_secs(5),
                },
            );
            if version == MqttVersion::V3 {
                simulation.devices = (6..10).map(|i| format!("sim-{i}")).collect();
            }
            let outcomes = simulate(&simulation).await;
            assert_eq!(outcomes.len(), count as usize, "{backend:?} {version:?}");
            assert_all_updated(&outcomes, "2.0.0", image.len());
        }
        server.service().settle_status_writes().await;
        for name in &names {
            assert!(
                in_sync(&server.firmware("fleet", name).await, "2.0.0"),
                "{backend:?} {name}"
            );
        }
        // Both versions were spoken (the metrics are the test process's: at least these).
        let metrics = Metrics::of(&server.url).await;
        assert!(metrics.value("ajour_mqtt_sessions_total", &[("version", "5")]) >= 6.0);
        assert!(metrics.value("ajour_mqtt_sessions_total", &[("version", "3.1.1")]) >= 4.0);
        server.stop().await;
    }
}

/// `mosquitto_sub` subscribed as `user` to `filter`, printing each payload in hex (`-F %x`),
/// once its SUBACK arrived (read from its `-d` output, through `stdbuf -oL`: no sleep).
async fn mosquitto_sub(server: SocketAddr, user: &str, filter: &str, count: u32) -> tokio::process::Child {
    // Line-buffered: mosquitto_sub's debug lines must arrive as they are printed.
    let mut sub = tokio::process::Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &server.port().to_string(),
            "-V",
            "mqttv5",
        ])
        .args(["-u", user, "-P", "pw", "-t", filter, "-d", "-F", "PAYLOAD %t %x"])
        .args(["-C", &count.to_string(), "-W", "20"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (Debian's mosquitto-clients: run scripts/setup-test-env.sh)");
    let mut lines = BufReader::new(sub.stdout.as_mut().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(ANSWER_TIMEOUT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("mosquitto_sub ended before its SUBACK");
        if line.contains("received SUBACK") {
            break;
        }
    }
    sub
}

/// The `PAYLOAD topic hex` lines a `mosquitto_sub` started by [`mosquitto_sub`] printed, as
/// (topic, bytes).
async fn payloads(sub: tokio::process::Child) -> Vec<(String, Vec<u8>)> {
    let output = tokio::time::timeout(ANSWER_TIMEOUT, sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "mosquitto_sub: {output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("PAYLOAD "))
        .map(|rest| {
            let (topic, hex_payload) = rest.split_once(' ').unwrap();
            (topic.to_string(), hex::decode(hex_payload.trim()).unwrap())
        })
        .collect()
}

fn mosquitto_pub(
    server: SocketAddr,
    user: &str,
    password: &str,
    topic: &str,
    file: &std::path::Path,
) -> std::process::Output {
    std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &server.port().to_string()])
        .args(["-u", user, "-P", password, "-t", topic, "-q", "1", "-f"])
        .arg(file)
        .output()
        .expect("mosquitto_pub (Debian's mosquitto-clients)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_play_a_device_and_a_gateway() {
    let server = mqtt_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(4096, 6);
    server.with_devices("mosq", &image, &["dev", "gw"]).await;
    create_gatewayed(&server, "mosq", "sensor", &["gw"]).await;
    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("status.cbor");
    std::fs::write(&status, first_status(41)).unwrap();

    // A device: mosquitto_sub (MQTT 5) takes the command the status mosquitto_pub (MQTT 3.1.1)
    // published gets, as two connections of the same device.
    let sub = mosquitto_sub(server.mqtt(), "dev@mosq", "command/inbox/#", 1).await;
    let published = mosquitto_pub(server.mqtt(), "dev@mosq", "pw", "dfu", &status);
    assert!(published.status.success(), "{published:?}");
    let received = payloads(sub).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].0, "command/inbox//dfu");
    let command = decode_command(&received[0].1).unwrap();
    assert_eq!(command.kind(), "write");
    assert_eq!(command.correlation_id(), Some(41));

    // A gateway publishing for a device that names it: the command arrives under that device.
    let sub = mosquitto_sub(server.mqtt(), "gw@mosq", "command/inbox/+/dfu", 1).await;
    let published = mosquitto_pub(server.mqtt(), "gw@mosq", "pw", "dfu/sensor", &status);
    assert!(published.status.success(), "{published:?}");
    let received = payloads(sub).await;
    assert_eq!(received[0].0, "command/inbox/sensor/dfu");
    assert_eq!(decode_command(&received[0].1).unwrap().kind(), "write");

    // A wrong password is refused at CONNECT.
    let refused = mosquitto_pub(server.mqtt(), "dev@mosq", "wrong", "dfu", &status);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("not authori"), "{said}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_acts_for_two_devices_on_one_connection_and_for_no_other() {
    let server = mqtt_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(4096, 7);
    server.with_devices("gws", &image, &["gw", "stranger"]).await;
    create_gatewayed(&server, "gws", "s1", &["gw"]).await;
    create_gatewayed(&server, "gws", "s2", &["other-gw", "gw"]).await;
    create_gatewayed(&server, "gws", "s3", &["other-gw"]).await;

    let (mut gw, ack) = Raw5::connect(server.mqtt(), "gw@gws", "pw").await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let granted = gw
        .subscribe(&["command/inbox/#", "command/inbox/s1/dfu", "command/inbox/s3/dfu"])
        .await;
    assert_eq!(
        granted,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::NotAuthorized
        ]
    );
    // Two devices' statuses on one connection, told apart by topic and correlation data.
    for (device, correlation, id) in [("s1", &b"one"[..], 1), ("s2", &b"two"[..], 2)] {
        let (reason, _) = gw
            .publish(&format!("dfu/{device}"), first_status(id), correlation)
            .await;
        assert_eq!(reason, PubAckReason::Success);
        let (topic, payload, echoed) = gw.command().await;
        assert_eq!(topic, format!("command/inbox/{device}/dfu"));
        assert_eq!(echoed.as_deref(), Some(correlation));
        assert_eq!(decode_command(&payload).unwrap().correlation_id(), Some(id));
    }
    // A device that does not name the gateway, one that does not exist, a hostile name.
    for device in ["s3", "ghost", ".."] {
        let (reason, why) = gw.publish(&format!("dfu/{device}"), first_status(9), b"x").await;
        assert_eq!(reason, PubAckReason::NotAuthorized, "{device}");
        assert!(
            why.unwrap().contains("spec.gatewaySelector.matchNames"),
            "{device}"
        );
    }
    gw.nothing_queued().await;
    // The devices it acts for were updated through it; the others were not touched.
    server.service().settle_status_writes().await;
    assert!(server.firmware("gws", "s1").await.is_some());
    assert!(server.firmware("gws", "s3").await.is_none());
    let metrics = Metrics::of(&server.url).await;
    assert!(metrics.value("ajour_gateway_refusals_total", &[]) >= 3.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_cannot_reach_each_others_topics() {
    let server = mqtt_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(4096, 8);
    server.with_devices("iso", &image, &["a", "b"]).await;
    let (mut a, _) = Raw5::connect(server.mqtt(), "a@iso", "pw").await;
    let (mut b, _) = Raw5::connect(server.mqtt(), "b@iso", "pw").await;
    assert_eq!(
        a.subscribe(&[
            "#",
            "command/inbox/b/dfu",
            "app/iso",
            "$share/g/command/inbox/#",
            "command/inbox/#"
        ])
        .await,
        [
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
        ]
    );
    assert_eq!(
        b.subscribe(&["command/inbox/#"]).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // b's command reaches b, and nothing reaches a.
    assert_eq!(
        b.publish("dfu", first_status(5), b"b").await.0,
        PubAckReason::Success
    );
    let (topic, _, _) = b.command().await;
    assert_eq!(topic, "command/inbox//dfu");
    a.nothing_queued().await;
    // a cannot publish as b.
    let (reason, _) = a.publish("dfu/b", first_status(6), b"a").await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    a.nothing_queued().await;
    b.nothing_queued().await;

    // MQTT 3.1.1 has no negative PUBACK: publishing as another device closes the connection.
    let mut raw = TcpStream::connect(server.mqtt()).await.unwrap();
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("raw-v3");
    connect.set_login("a@iso", "pw");
    let mut out = BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Connect(connect)
        .write(&mut out, 4096)
        .unwrap();
    let mut publish =
        rumqttc::mqttbytes::v4::Publish::new("dfu/b", rumqttc::QoS::AtLeastOnce, first_status(7));
    publish.pkid = 1;
    rumqttc::mqttbytes::v4::Packet::Publish(publish)
        .write(&mut out, 4096)
        .unwrap();
    raw.write_all(&out).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(ANSWER_TIMEOUT, raw.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        answer,
        [0x20, 2, 0, 0],
        "a CONNACK, then the connection closed without a PUBACK"
    );
    // On shutdown, MQTT 5 clients are told why they are disconnected.
    let stopping = tokio::spawn(server.stop());
    for client in [&mut a, &mut b] {
        match client.next().await {
            Some(Packet::Disconnect(disconnect)) => {
                assert_eq!(disconnect.reason_code, DisconnectReasonCode::ServerShuttingDown)
            }
            other => panic!("{other:?}"),
        }
        assert!(client.next().await.is_none());
    }
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_refused_while_a_device_updates() {
    let server = mqtt_server(Backend::Sqlite, &["--header-timeout-ms", "300"]).await;
    let image = firmware_bytes(6000, 9);
    server.with_devices("hostile", &image, &["sim-0", "victim"]).await;

    // Refused at CONNECT: wrong password, unknown device, hostile names, no application, no
    // credentials, MQTT 3.1.
    for (user, password, code) in [
        ("victim@hostile", "wrong", ConnectReturnCode::NotAuthorized),
        ("ghost@hostile", "pw", ConnectReturnCode::NotAuthorized),
        ("../../etc/passwd@hostile", "pw", ConnectReturnCode::NotAuthorized),
        ("victim@../../etc/passwd", "pw", ConnectReturnCode::NotAuthorized),
        ("victim", "pw", ConnectReturnCode::BadUserNamePassword),
    ] {
        let (mut client, ack) = Raw5::connect(server.mqtt(), user, password).await;
        assert_eq!(ack.code, code, "{user}");
        assert!(client.next().await.is_none(), "closed after the refusal: {user}");
    }
    let mut old = TcpStream::connect(server.mqtt()).await.unwrap();
    old.write_all(&[0x10, 12, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 30])
        .await
        .unwrap();
    let mut answer = Vec::new();
    old.read_to_end(&mut answer).await.unwrap();
    assert_eq!(
        answer,
        [0x20, 2, 0, 1],
        "CONNACK 0x01: unacceptable protocol version"
    );

    // Silent, slow and garbage connections, opened while a device updates over MQTT.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(server.mqtt()).await.unwrap());
    }
    let mut slow = TcpStream::connect(server.mqtt()).await.unwrap();
    slow.write_all(&[0x10, 100]).await.unwrap();
    let mut garbage = TcpStream::connect(server.mqtt()).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let updating = tokio::spawn(simulate_owned(fleet(
        "hostile",
        1,
        Transport::Mqtt {
            endpoint: endpoint(&server, MqttVersion::V5),
            command_timeout: Duration::from_secs(5),
        },
    )));
    // A signed-in client sending what no client sends, too large a packet, a status that is no
    // status, flooding statuses without reading.
    let (mut rude, _) = Raw5::connect(server.mqtt(), "victim@hostile", "pw").await;
    let (reason, why) = rude.publish("dfu", b"not cbor".to_vec(), b"x").await;
    assert_eq!(reason, PubAckReason::PayloadFormatInvalid);
    assert!(why.is_some());
    rude.send(Packet::Publish(Publish::new(
        "dfu",
        QoS::AtMostOnce,
        vec![0u8; 20_000],
        None,
    )))
    .await;
    match rude.next().await {
        Some(Packet::Disconnect(disconnect)) => {
            assert_eq!(disconnect.reason_code, DisconnectReasonCode::PacketTooLarge)
        }
        other => panic!("{other:?}"),
    }
    let (mut flood, _) = Raw5::connect(server.mqtt(), "victim@hostile", "pw").await;
    let (mut connack, _) = Raw5::connect(server.mqtt(), "victim@hostile", "pw").await;
    connack
        .send(Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
            properties: None,
        }))
        .await;
    match connack.next().await {
        Some(Packet::Disconnect(disconnect)) => {
            assert_eq!(disconnect.reason_code, DisconnectReasonCode::ProtocolError)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(flood.subscribe(&["command/inbox/#"]).await.len(), 1);
    for _ in 0..300 {
        flood
            .send(Packet::Publish(Publish::new(
                "dfu",
                QoS::AtMostOnce,
                first_status(1),
                None,
            )))
            .await;
    }

    let outcomes = updating.await.unwrap();
    assert_all_updated(&outcomes, "2.0.0", image.len());
    // The silent and slow connections were closed by the CONNECT timeout, the garbage at once.
    for mut stream in silent.into_iter().chain([slow, garbage]) {
        let mut rest = Vec::new();
        tokio::time::timeout(ANSWER_TIMEOUT, stream.read_to_end(&mut rest))
            .await
            .expect("closed by the server")
            .unwrap();
        assert!(rest.is_empty());
    }
    let metrics = Metrics::of(&server.url).await;
    assert!(metrics.value("ajour_mqtt_connections_timed_out_total", &[]) >= 51.0);
    drop(flood);
    server.stop().await;
}

async fn simulate_owned(
    simulation: ajour_sim::Simulation,
) -> std::collections::BTreeMap<String, ajour_sim::Outcome> {
    simulate(&simulation).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_status_gets_the_same_command_over_http_and_mqtt() {
    let server = mqtt_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(5000, 3);
    server
        .with_devices("both", &image, &["over-http", "over-mqtt"])
        .await;
    let (mut device, _) = Raw5::connect(server.mqtt(), "over-mqtt@both", "pw").await;
    device.subscribe(&["command/inbox/#"]).await;
    let statuses = [
        first_status(9),
        encode_status(
            &Status::updating(b"1.0.0".to_vec(), Some(300), Some(1), b"2.0.0".to_vec(), 4800),
            Encoding::Packed,
        ),
        encode_status(
            &Status::updating(b"1.0.0".to_vec(), None, None, b"2.0.0".to_vec(), 5000),
            Encoding::Packed,
        ),
    ];
    let mut kinds = Vec::new();
    for (n, status) in statuses.iter().enumerate() {
        let (code, _, over_http) = server.post_dfu("over-http@both", "pw", status.clone()).await;
        assert_eq!(code, reqwest::StatusCode::OK);
        assert_eq!(
            device.publish("dfu", status.clone(), b"c").await.0,
            PubAckReason::Success
        );
        let (_, over_mqtt, _) = device.command().await;
        assert_eq!(&over_mqtt[..], &over_http[..], "status {n}");
        kinds.push(decode_command(&over_mqtt).unwrap().kind());
    }
    assert_eq!(kinds, ["write", "write", "swap"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ajour_simulate_drives_devices_over_mqtt() {
    let server = mqtt_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(6000, 5);
    server.with_devices("cli", &image, &["d-0", "d-1", "d-2"]).await;
    let output = tokio::process::Command::new(AJOUR)
        .args([
            "simulate",
            "--transport",
            "mqtt",
            "--url",
            &format!("mqtt://{}", server.mqtt()),
        ])
        .args([
            "--app",
            "cli",
            "--device",
            "d",
            "--count",
            "3",
            "--password",
            "pw",
        ])
        .args(["--version", "1.0.0", "--mqtt-version", "3.1.1"])
        .output()
        .await
        .unwrap();
    let said = succeeded(output);
    assert!(said.contains("3 device(s): 3 updated"), "{said}");
    // A URL of another endpoint with --transport mqtt is refused before anything is sent.
    let output = tokio::process::Command::new(AJOUR)
        .args(["simulate", "--transport", "mqtt", "--url", &server.url])
        .args([
            "--app",
            "cli",
            "--device",
            "d",
            "--password",
            "pw",
            "--version",
            "1.0.0",
        ])
        .output()
        .await
        .unwrap();
    assert!(failed(output).contains("is not a URL of the Mqtt endpoint"));
    server.stop().await;
}
