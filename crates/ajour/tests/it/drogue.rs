//! Drogue mode end to end, against real servers: a Mosquitto broker of the test's own (carrying
//! Drogue-shaped events, as Drogue's MQTT integration does) and Ajour's own REST API as the Drogue
//! registry, over real HTTP. A test peer plays the cloud: it publishes events on `app/{app}` in
//! every form Drogue sends, and reads the commands on `command/#`.

use crate::support::*;
use ajour::server::{self, RunningServer};
use ajour_client::mqtt::{Inbox, MqttClient, MqttConfig, MqttVersion};
use ajour_drogue::event::structured_event;
use ajour_drogue::IntegrationStats;
use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
use ajour_registry::{AppName, DeviceName, Key, Resource};
use ajour_sim::StatusEncoding;
use ajour_testkit::Mosquitto;
use ajour_types::{FirmwareState, FirmwareStatus};
use clap::Parser;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const VECTORS: &str = include_str!("../../../ajour-drogue/tests/data/drogue-events.json");

fn vectors() -> Vec<Value> {
    let parsed: Value = serde_json::from_str(VECTORS).unwrap();
    parsed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].clone())
        .collect()
}

/// An Ajour instance in Drogue mode, configured through the command line as an operator would.
struct Instance {
    running: Option<RunningServer>,
    stats: Arc<IntegrationStats>,
    _data_dir: tempfile::TempDir,
}

impl Instance {
    async fn start(registry: &TestServer, extra: &[&str]) -> Self {
        Self::start_with_firmware(registry, extra, &[("fw", "0.2.0", firmware_bytes(3000, 9))]).await
    }

    async fn start_with_firmware(
        registry: &TestServer,
        extra: &[&str],
        firmware: &[(&str, &str, Vec<u8>)],
    ) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        for (name, version, bytes) in firmware {
            ajour_store::FileStore::new(server::firmware_dir(data_dir.path()), Duration::ZERO)
                .add(&ajour_store::FirmwareName::parse(name).unwrap(), version, bytes)
                .unwrap();
        }
        let data = data_dir.path().to_str().unwrap().to_string();
        let mut argv = vec![
            "ajour",
            "serve",
            "--data-dir",
            &data,
            "--listen",
            "127.0.0.1:0",
            "--drogue-registry-url",
            &registry.url,
            "--drogue-token",
            &registry.token,
            "--progress-interval-ms",
            "500",
            "--spec-cache-ms",
            "200",
            "--wait-poll",
            "1",
        ];
        argv.extend_from_slice(extra);
        let cli = ajour::cli::Cli::try_parse_from(&argv).unwrap();
        let ajour::cli::Command::Serve(args) = cli.command else {
            unreachable!()
        };
        let config = args.server_config().unwrap();
        assert!(config.drogue.is_some(), "Drogue mode");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = server::start(listener, config).await.unwrap();
        let stats = running.drogue.clone().expect("integration stats in Drogue mode");
        Self {
            running: Some(running),
            stats,
            _data_dir: data_dir,
        }
    }

    async fn subscribed(&self, subscriptions: u64) {
        let stats = self.stats.clone();
        eventually(Duration::from_secs(20), "the instance's subscriptions", || {
            let stats = stats.clone();
            async move { stats.subscriptions() >= subscriptions }
        })
        .await;
    }

    async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
    }
}

/// The cloud side: publishes events, receives commands on `command/#`.
struct Peer {
    inbox: Inbox,
    client: MqttClient,
}

impl Peer {
    async fn connect(broker: &Mosquitto, version: MqttVersion) -> Self {
        Self::connect_with(broker, version, ajour_drogue::TlsOptions::default()).await
    }

    async fn connect_with(broker: &Mosquitto, version: MqttVersion, tls: ajour_drogue::TlsOptions) -> Self {
        let mut config = MqttConfig::new(broker.url(), "test-peer");
        config.version = version;
        config.tls = tls;
        let inbox = Inbox::connect(&config, vec!["command/#".into()]).unwrap();
        let mut peer = Self {
            client: inbox.client.clone(),
            inbox,
        };
        peer.wait_subscribed(1).await;
        peer
    }

    /// Until the broker granted `n` subscriptions to `command/#` in all (one per connection).
    async fn wait_subscribed(&mut self, n: u64) {
        assert!(
            self.inbox.subscribed(n, Duration::from_secs(20)).await,
            "the peer's subscription to command/#"
        );
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, payload).await.unwrap();
    }

    async fn publish_json(&self, topic: &str, event: &Value) {
        self.publish(topic, event.to_string().into_bytes()).await;
    }

    /// An event in binary content mode (MQTT 5): data as payload, attributes as user properties.
    async fn publish_binary(&self, topic: &str, event: &Value) {
        let object = event.as_object().unwrap();
        let properties: Vec<(String, String)> = object
            .iter()
            .filter(|(k, _)| !k.starts_with("data"))
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let payload = match (&event["data_base64"], &event["data"]) {
            (Value::String(b64), _) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
            }
            (_, Value::String(text)) => text.clone().into_bytes(),
            (_, json) => json.to_string().into_bytes(),
        };
        self.client
            .publish_with_properties(
                topic,
                payload,
                event["datacontenttype"].as_str().map(str::to_string),
                properties,
            )
            .await
            .unwrap();
    }

    /// The next command, or `None` after `timeout`.
    async fn next_command(&mut self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        let message = tokio::time::timeout(timeout, self.inbox.messages.recv())
            .await
            .ok()??;
        Some((message.topic, message.payload.to_vec()))
    }

    /// The next command on `topic`, skipping others (which are returned too, for checks).
    async fn command_on(&mut self, topic: &str) -> (Vec<u8>, Vec<String>) {
        let mut others = Vec::new();
        loop {
            let (t, bytes) = self
                .next_command(Duration::from_secs(20))
                .await
                .unwrap_or_else(|| panic!("no command on {topic}; others: {others:?}"));
            if t == topic {
                return (bytes, others);
            }
            others.push(t);
        }
    }
}

fn status_event(app: &str, device: &str, status: &Status) -> Value {
    structured_event(
        app,
        device,
        "dfu",
        "application/cbor",
        &encode_status(status, Encoding::Packed),
    )
}

fn assert_write(bytes: &[u8], offset: u32, image: &[u8], block: usize) {
    match decode_command(bytes).unwrap() {
        Command::Write {
            version,
            offset: o,
            data,
            ..
        } => {
            assert_eq!(version, b"0.2.0");
            assert_eq!(o, offset);
            assert_eq!(data, &image[offset as usize..offset as usize + block]);
        }
        other => panic!("expected a Write at {offset}, got {other:?}"),
    }
}

/// Ajour's own server as Drogue's registry, on `backend`, with application `app` (firmware file
/// `fw`) and `devices` (password `pw`).
async fn registry_with_app(backend: Backend, app: &str, devices: &[&str]) -> TestServer {
    let registry = TestServer::start(backend).await;
    registry
        .create_app(app, Some(json!({"file": {"name": "fw"}})))
        .await;
    for device in devices {
        registry.create_device(app, device, "pw", None).await;
    }
    registry
}

/// [`registry_with_app`] with devices `sim-0 .. sim-(devices-1)`.
async fn registry_with_fleet(backend: Backend, app: &str, devices: u32) -> TestServer {
    let names: Vec<String> = (0..devices).map(|i| format!("sim-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    registry_with_app(backend, app, &names).await
}

#[tokio::test]
async fn events_in_every_form_are_answered_and_bad_ones_skipped() {
    let image = firmware_bytes(3000, 9);
    // Both MQTT versions, and both backends behind the registry: one run each.
    for (version, backend) in [
        (MqttVersion::V3, Backend::Sqlite),
        (MqttVersion::V5, Backend::Postgres),
    ] {
        let broker = Mosquitto::start().expect("starting Mosquitto");
        let registry = registry_with_app(backend, "my-app", &["dev-1", "dev-2", "lora-1"]).await;
        let (version_flag, mode) = match version {
            MqttVersion::V3 => ("3.1.1", "structured"),
            MqttVersion::V5 => ("5", "binary"),
        };
        let mut instance = Instance::start(
            &registry,
            &[
                "--drogue-mqtt-url",
                &broker.url(),
                "--application",
                "my-app",
                "--drogue-mqtt-version",
                version_flag,
                "--drogue-content-mode",
                mode,
            ],
        )
        .await;
        instance.subscribed(1).await;
        let mut peer = Peer::connect(&broker, version).await;

        // Every vector: drgdfu's named CBOR as octet-stream, drogue-device's packed CBOR,
        // telemetry that is not Ajour's, and a LoRaWAN uplink through TTN.
        for event in vectors() {
            peer.publish_json("app/my-app", &event).await;
        }
        let mut expected = vec![
            "command/my-app/dev-1/dfu".to_string(),
            "command/my-app/dev-2/dfu".to_string(),
            "command/my-app/lora-1/port:223".to_string(),
        ];
        let mut seen = Vec::new();
        while seen.len() < expected.len() {
            let (topic, bytes) = peer
                .next_command(Duration::from_secs(20))
                .await
                .unwrap_or_else(|| panic!("{version:?}: commands so far {seen:?}"));
            assert_write(&bytes, 0, &image, 512);
            seen.push(topic);
        }
        seen.sort();
        expected.sort();
        assert_eq!(seen, expected, "{version:?}");

        // Binary content mode (MQTT 5 only: attributes as user properties).
        if version == MqttVersion::V5 {
            for event in vectors() {
                peer.publish_binary("app/my-app", &event).await;
            }
            let mut seen = Vec::new();
            while seen.len() < 3 {
                let (topic, bytes) = peer.next_command(Duration::from_secs(20)).await.unwrap();
                assert_write(&bytes, 0, &image, 512);
                seen.push(topic);
            }
            seen.sort();
            assert_eq!(seen, expected, "binary content mode");
        }

        // Text data (a base64 status as text/plain).
        let mut text = status_event("my-app", "dev-2", &Status::first("0.1.0", Some(100), None));
        let encoded = text.as_object_mut().unwrap().remove("data_base64").unwrap();
        text["data"] = encoded;
        text["datacontenttype"] = json!("text/plain");
        peer.publish_json("app/my-app", &text).await;
        let (bytes, others) = peer.command_on("command/my-app/dev-2/dfu").await;
        assert!(others.is_empty(), "{others:?}");
        assert_write(&bytes, 0, &image, 100);

        // The statuses of one device are answered in the order they came.
        for block in 0..20u32 {
            let status = Status::updating("0.1.0", Some(100), None, "0.2.0", block * 100);
            peer.publish_json("app/my-app", &status_event("my-app", "dev-2", &status))
                .await;
        }
        for block in 0..20u32 {
            let (bytes, others) = peer.command_on("command/my-app/dev-2/dfu").await;
            assert!(others.is_empty(), "{others:?}");
            assert_write(&bytes, block * 100, &image, 100);
        }

        // Bad input, each logged and skipped: never an answer, never the end of the loop.
        let malformed_before = instance.stats.malformed();
        let good = status_event("my-app", "dev-1", &Status::first("0.1.0", None, None));
        let mut bad: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            b"[1, 2, 3]".to_vec(),
            b"\xff\xfe\x00garbage".to_vec(),
            Vec::new(),
        ];
        for (field, value) in [
            ("data_base64", json!("!!! not base64")),
            ("data_base64", json!("oWFhYWI=")),
            ("device", json!("../../etc/passwd")),
            ("device", json!("a/b")),
            ("device", json!("x".repeat(300))),
            ("device", json!(42)),
            ("application", json!("other-app")),
        ] {
            let mut event = good.clone();
            event[field] = value;
            bad.push(event.to_string().into_bytes());
        }
        let bad_count = bad.len() as u64;
        for payload in bad {
            peer.publish("app/my-app", payload).await;
        }
        // A device the registry does not know is told to wait (a long time), not updated.
        peer.publish_json(
            "app/my-app",
            &status_event("my-app", "ghost", &Status::first("0.1.0", None, None)),
        )
        .await;
        let (bytes, _) = peer.command_on("command/my-app/ghost/dfu").await;
        assert!(matches!(decode_command(&bytes).unwrap(), Command::Wait { .. }));
        // Still serving: the next block for dev-1.
        peer.publish_json(
            "app/my-app",
            &status_event(
                "my-app",
                "dev-1",
                &Status::updating("0.1.0", None, None, "0.2.0", 512),
            ),
        )
        .await;
        let (bytes, others) = peer.command_on("command/my-app/dev-1/dfu").await;
        assert_write(&bytes, 512, &image, 512);
        assert!(others.is_empty(), "no answer to bad events: {others:?}");
        // Each event is classified as it arrives, in order: the bad ones before the good one
        // just answered, and none of them made a job.
        assert_eq!(
            instance.stats.malformed() - malformed_before,
            bad_count,
            "every bad event counted"
        );

        // The progress reached Drogue's registry (status.firmware written back).
        eventually(
            Duration::from_secs(20),
            "status.firmware of lora-1 in the registry",
            || async {
                matches!(
                    registry.firmware("my-app", "lora-1").await,
                    Some(FirmwareStatus { current, target, state: FirmwareState::Updating { .. }, .. })
                        if current == "0.1.0" && target == "0.2.0"
                )
            },
        )
        .await;
        instance.stop().await;
        registry.stop().await;
    }
}

#[tokio::test]
async fn applications_are_found_refreshed_and_excluded() {
    for backend in BACKENDS {
        let broker = Mosquitto::start().expect("starting Mosquitto");
        let registry = registry_with_app(backend, "one", &["d"]).await;
        let instance = Instance::start(
            &registry,
            &[
                "--drogue-mqtt-url",
                &broker.url(),
                "--exclude-application",
                "hidden",
                "--drogue-refresh-secs",
                "1",
            ],
        )
        .await;
        instance.subscribed(1).await;
        let mut peer = Peer::connect(&broker, MqttVersion::V5).await;
        let first = Status::first("0.1.0", None, None);
        peer.publish_json("app/one", &status_event("one", "d", &first))
            .await;
        peer.command_on("command/one/d/dfu").await;

        // Created while running: served after the next listing, without a restart. Until then
        // events for it go unanswered, so the status is sent again until it is answered, as a
        // device would.
        for app in ["two", "hidden"] {
            registry
                .create_app(app, Some(json!({"file": {"name": "fw"}})))
                .await;
            registry.create_device(app, "d", "pw", None).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            peer.publish_json("app/hidden", &status_event("hidden", "d", &first))
                .await;
            peer.publish_json("app/two", &status_event("two", "d", &first))
                .await;
            if let Some((topic, _)) = peer.next_command(Duration::from_millis(300)).await {
                assert_eq!(
                    topic, "command/two/d/dfu",
                    "the excluded application is never served"
                );
                break;
            }
            assert!(Instant::now() < deadline, "application 'two' never served");
        }
        // Once more, so anything for the excluded application would have come by now.
        peer.publish_json("app/hidden", &status_event("hidden", "d", &first))
            .await;
        peer.publish_json("app/two", &status_event("two", "d", &first))
            .await;
        let (_, others) = peer.command_on("command/two/d/dfu").await;
        assert!(
            others.iter().all(|t| t == "command/two/d/dfu"),
            "the excluded application is never served: {others:?}"
        );
        while let Some((topic, _)) = peer.next_command(Duration::from_millis(300)).await {
            assert_eq!(
                topic, "command/two/d/dfu",
                "the excluded application is never served"
            );
        }
        let mut instance = instance;
        instance.stop().await;
        registry.stop().await;
    }
}

#[tokio::test]
async fn a_broker_restart_is_survived_by_reconnecting_and_subscribing_again() {
    for backend in BACKENDS {
        let mut broker = Mosquitto::start().expect("starting Mosquitto");
        let port = broker.port();
        let registry = registry_with_app(backend, "my-app", &["dev-1"]).await;
        let mut instance = Instance::start(
            &registry,
            &["--drogue-mqtt-url", &broker.url(), "--application", "my-app"],
        )
        .await;
        instance.subscribed(1).await;
        let mut peer = Peer::connect(&broker, MqttVersion::V3).await;
        let event = status_event("my-app", "dev-1", &Status::first("0.1.0", None, None));
        peer.publish_json("app/my-app", &event).await;
        peer.command_on("command/my-app/dev-1/dfu").await;

        broker.stop();
        let broker = Mosquitto::start_on(port).expect("restarting Mosquitto on its port");
        let stats = instance.stats.clone();
        eventually(
            Duration::from_secs(30),
            "reconnection and a new subscription",
            || {
                let stats = stats.clone();
                async move { stats.connections() >= 2 && stats.subscriptions() >= 2 }
            },
        )
        .await;
        peer.wait_subscribed(2).await;
        peer.publish_json("app/my-app", &event).await;
        peer.command_on("command/my-app/dev-1/dfu").await;
        instance.stop().await;
        drop(broker);
        registry.stop().await;
    }
}

#[tokio::test]
async fn a_fleet_updates_through_two_instances_in_a_group_when_one_stops_halfway() {
    const DEVICES: u32 = 16;
    let image = firmware_bytes(12_000, 11);
    for backend in BACKENDS {
        let broker = Mosquitto::start().expect("starting Mosquitto");
        let registry = registry_with_fleet(backend, "fleet", DEVICES).await;
        let firmware = [("fw", "2.0.0", image.clone())];
        let common = [
            "--drogue-mqtt-url",
            &broker.url(),
            "--application",
            "fleet",
            "--drogue-group",
            "ajour",
        ];
        let mut first = Instance::start_with_firmware(
            &registry,
            &[&common[..], &["--drogue-mqtt-version", "5"]].concat(),
            &firmware,
        )
        .await;
        let mut second = Instance::start_with_firmware(
            &registry,
            // This one authenticates as a user: Basic user:token to the registry, and the user
            // name and token on MQTT.
            &[
                &common[..],
                &[
                    "--drogue-mqtt-version",
                    "3.1.1",
                    "--drogue-user",
                    "ajour-operator",
                ],
            ]
            .concat(),
            &firmware,
        )
        .await;
        first.subscribed(1).await;
        second.subscribed(1).await;

        let mut simulation = fleet(
            "fleet",
            DEVICES,
            via_drogue(&broker.url(), Duration::from_secs(1)),
        );
        simulation.mtu = Some(128);
        simulation.device.encoding = StatusEncoding::Named;
        let fleet = tokio::spawn(async move { simulate(&simulation).await });

        // Halfway (by commands sent), one instance stops: what it held is lost, and the devices
        // whose statuses it took send them again after the timeout, to the other.
        let blocks = image.len().div_ceil(128) as u64;
        let total = u64::from(DEVICES) * (blocks + 2);
        let (a, b) = (first.stats.clone(), second.stats.clone());
        eventually(Duration::from_secs(60), "half of the commands", || {
            let (a, b) = (a.clone(), b.clone());
            async move { a.commands() + b.commands() >= total / 2 }
        })
        .await;
        first.stop().await;
        // Not whether the fleet was done when the stop returned: the stop drains (writes what
        // is pending) while the other instance goes on, and a busy machine may finish the fleet
        // meanwhile. That the other served the rest is checked below.
        let first_commands = first.stats.commands();
        assert!(
            first_commands < total,
            "the stopped instance served the whole fleet"
        );

        assert_all_updated(&fleet.await.unwrap(), "2.0.0", image.len());
        assert!(first_commands > 0, "the first instance served its share");
        assert!(
            second.stats.commands() > total / 4,
            "the second instance served the rest"
        );
        for i in 0..DEVICES {
            let name = format!("sim-{i}");
            eventually(
                Duration::from_secs(20),
                &format!("{name} in sync in the registry"),
                || {
                    let (registry, name) = (&registry, name.clone());
                    async move { in_sync(&registry.firmware("fleet", &name).await, "2.0.0") }
                },
            )
            .await;
        }
        second.stop().await;
        registry.stop().await;
    }
}

impl Instance {
    /// Whether this instance holds a status of `device` not yet written to the registry.
    fn has_pending(&self, app: &str, device: &str) -> bool {
        let key = Key::Device(AppName::parse(app).unwrap(), DeviceName::parse(device).unwrap());
        let mut resource = Resource::default();
        if let Some(running) = &self.running {
            running.service.overlay_status(&key, &mut resource);
        }
        resource.status.contains_key("firmware")
    }
}

#[tokio::test]
async fn with_two_live_instances_every_device_is_left_shown_in_sync() {
    // Both instances see statuses of every device (the broker hands them out in turn) and write
    // their latest, coalesced; a late write of one must not undo the other's "in sync".
    const DEVICES: u32 = 12;
    let image = firmware_bytes(4000, 12);
    for backend in BACKENDS {
        let broker = Mosquitto::start().expect("starting Mosquitto");
        let registry = registry_with_fleet(backend, "pair", DEVICES).await;
        let firmware = [("fw", "3.0.0", image.clone())];
        let flags = [
            "--drogue-mqtt-url",
            &broker.url(),
            "--application",
            "pair",
            "--drogue-group",
            "pair-group",
        ];
        let mut first = Instance::start_with_firmware(&registry, &flags, &firmware).await;
        let mut second = Instance::start_with_firmware(&registry, &flags, &firmware).await;
        first.subscribed(1).await;
        second.subscribed(1).await;
        let mut simulation = fleet("pair", DEVICES, via_drogue(&broker.url(), Duration::from_secs(2)));
        simulation.mtu = Some(200);
        assert_all_updated(&simulate(&simulation).await, "3.0.0", image.len());
        assert!(first.stats.commands() > 0 && second.stats.commands() > 0);
        // Until neither instance has anything left to write, and then: in sync, every one.
        eventually(Duration::from_secs(30), "all status writes done", || {
            let (first, second) = (&first, &second);
            async move {
                (0..DEVICES).all(|i| {
                    let name = format!("sim-{i}");
                    !first.has_pending("pair", &name) && !second.has_pending("pair", &name)
                })
            }
        })
        .await;
        // Nothing is pending, so no write starts from now on; those already running are waited for.
        for instance in [&first, &second] {
            instance
                .running
                .as_ref()
                .unwrap()
                .service
                .settle_status_writes()
                .await;
        }
        // Coalesced: nowhere near one registry write per block, even with two writers per device.
        let writes = first.running.as_ref().unwrap().service.status_writes()
            + second.running.as_ref().unwrap().service.status_writes();
        let blocks = u64::from(DEVICES) * 4000u64.div_ceil(200);
        assert!(writes * 2 < blocks, "{writes} status writes for {blocks} blocks");
        for i in 0..DEVICES {
            let shown = registry.firmware("pair", &format!("sim-{i}")).await;
            assert!(in_sync(&shown, "3.0.0"), "{backend:?} sim-{i}: {shown:?}");
        }
        first.stop().await;
        second.stop().await;
        registry.stop().await;
    }
}

#[tokio::test]
async fn tls_to_the_integration_takes_a_ca_file_or_the_insecure_switch_and_nothing_less() {
    for backend in BACKENDS {
        let broker = Mosquitto::start_tls().expect("starting Mosquitto with TLS");
        let ca_file = broker.ca_file().to_str().unwrap().to_string();
        let registry = registry_with_app(backend, "my-app", &["dev-1"]).await;
        let base = ["--drogue-mqtt-url", &broker.url(), "--application", "my-app"];
        // Not trusting the broker's CA: never connects.
        let mut untrusting = Instance::start(&registry, &base).await;
        let mut with_ca =
            Instance::start(&registry, &[&base[..], &["--drogue-ca-file", &ca_file]].concat()).await;
        let mut insecure =
            Instance::start(&registry, &[&base[..], &["--drogue-insecure-tls"]].concat()).await;
        with_ca.subscribed(1).await;
        insecure.subscribed(1).await;

        let tls = ajour_drogue::TlsOptions {
            ca_file: Some(broker.ca_file()),
            insecure: false,
            client_cert: None,
        };
        let mut peer = Peer::connect_with(&broker, MqttVersion::V5, tls).await;
        // Both connected instances answer (each has its own subscription, no group).
        peer.publish_json(
            "app/my-app",
            &status_event("my-app", "dev-1", &Status::first("0.1.0", None, None)),
        )
        .await;
        peer.command_on("command/my-app/dev-1/dfu").await;
        peer.command_on("command/my-app/dev-1/dfu").await;
        assert_eq!(
            untrusting.stats.connections(),
            0,
            "a broker whose certificate is not trusted is never talked to"
        );
        // A CA file that holds no certificate is a configuration error, reported at start.
        let empty = tempfile::NamedTempFile::new().unwrap();
        let cli = ajour::cli::Cli::try_parse_from([
            "ajour",
            "serve",
            "--drogue-mqtt-url",
            &broker.url(),
            "--drogue-registry-url",
            &registry.url,
            "--drogue-ca-file",
            empty.path().to_str().unwrap(),
        ])
        .unwrap();
        let ajour::cli::Command::Serve(args) = cli.command else {
            unreachable!()
        };
        let mut config = args.server_config().unwrap();
        config.data_dir = tempfile::tempdir().unwrap().keep();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = server::start(listener, config).await.err().expect("refused");
        assert!(format!("{error:#}").contains("no PEM certificate"), "{error:#}");

        untrusting.stop().await;
        with_ca.stop().await;
        insecure.stop().await;
        registry.stop().await;
    }
}

#[tokio::test]
async fn a_registry_outage_makes_devices_wait_is_logged_and_counted_and_they_finish_once_it_is_back() {
    const DEVICES: u32 = 4;
    // 128 blocks a device: none is near done when the registry goes away.
    let image = firmware_bytes(16 * 1024, 13);
    for backend in BACKENDS {
        let broker = Mosquitto::start().expect("starting Mosquitto");
        let mut registry = registry_with_fleet(backend, "fleet", DEVICES).await;
        // Ajour in Drogue mode as the binary: its log and its metrics are its own. (Its own
        // database is not used: the registry is Drogue's.)
        let instance = ServeProcess::start(
            Backend::Sqlite,
            &[
                "--drogue-registry-url",
                &registry.url,
                "--drogue-token",
                &registry.token,
                "--drogue-mqtt-url",
                &broker.url(),
                "--application",
                "fleet",
                "--spec-cache-ms",
                "50",
                "--wait-poll",
                "1",
                "--progress-interval-ms",
                "500",
            ],
            &[],
        )
        .await;
        instance.add_firmware("fw", "2.0.0", &image);
        let mut simulation = fleet(
            "fleet",
            DEVICES,
            via_drogue(&broker.url(), Duration::from_secs(1)),
        );
        simulation.mtu = Some(128);
        let fleet = tokio::spawn(async move { simulate(&simulation).await });
        // Commands of `kind` this instance sent so far.
        let sent = |kind: &'static str| {
            let instance = &instance;
            async move {
                let metrics = instance.metrics().await;
                metrics.value("ajour_commands_sent_total", &[("kind", kind)])
            }
        };
        eventually(Duration::from_secs(30), "the fleet under way", || async {
            sent("write").await >= f64::from(DEVICES * 3)
        })
        .await;

        registry.shut_down().await;
        // Once their specs are stale, the devices are told to wait, and the log says why (once in
        // a while: the warning is rate-limited).
        eventually(Duration::from_secs(30), "the devices told to wait", || async {
            sent("wait").await >= f64::from(DEVICES)
        })
        .await;
        assert!(
            instance
                .log()
                .lines()
                .any(|l| l.contains("registry unavailable; device told to wait")),
            "{backend:?}:\n{}",
            instance.log()
        );
        assert!(
            !fleet.is_finished(),
            "{backend:?}: a device finished without the registry"
        );
        let stalled = sent("write").await;

        registry.start_again().await;
        assert_all_updated(&fleet.await.unwrap(), "2.0.0", image.len());
        assert!(
            sent("write").await > stalled,
            "{backend:?}: the fleet went on once the registry was back"
        );
        for i in 0..DEVICES {
            let name = format!("sim-{i}");
            eventually(
                Duration::from_secs(20),
                &format!("{name} in sync in the registry"),
                || async { in_sync(&registry.firmware("fleet", &name).await, "2.0.0") },
            )
            .await;
        }
        // This instance's counts: registry reads failed (one request at a time tries a registry
        // that is down, the others are told to wait at once); every status that came in as a
        // Drogue event was answered with a command published.
        let metrics = instance.metrics().await;
        let count = |name, labels: &[(&str, &str)]| metrics.value(name, labels);
        assert!(
            count(
                "ajour_registry_calls_total",
                &[("op", "get"), ("outcome", "error")]
            ) >= 1.0,
            "{backend:?}:\n{metrics}"
        );
        let statuses = count("ajour_statuses_received_total", &[]);
        assert_eq!(
            (
                count("ajour_drogue_events_total", &[("result", "dfu")]),
                count("ajour_drogue_commands_total", &[("result", "published")]),
            ),
            (statuses, statuses),
            "{backend:?}:\n{metrics}"
        );
        // The device's history, kept in Ajour's own database beside Drogue's registry, tells
        // its update through the outage once: started, then in sync.
        let history: Value = get_json(
            &instance.http,
            &format!(
                "{}/api/dfu/v1alpha1/apps/fleet/devices/sim-0/history",
                instance.url
            ),
            &instance.token,
        )
        .await;
        let kinds: Vec<&str> = history
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .filter_map(|e| e["kind"].as_str())
            .filter(|kind| matches!(*kind, "started" | "inSync"))
            .collect();
        assert_eq!(kinds.last(), Some(&"inSync"), "{backend:?}: {history:#}");
        assert_eq!(
            kinds.iter().filter(|k| **k == "started").count(),
            1,
            "{backend:?}: {history:#}"
        );
        drop(instance);
        registry.stop().await;
    }
}

/// Drogue mode keeps the devices' histories and the rollouts in Ajour's own database beside
/// Drogue's registry: a two-wave rollout created through the instance's API completes over the
/// MQTT integration, the application's firmware in Drogue's registry becomes the rollout's, and
/// each device's history tells its update with the rollout's id.
#[tokio::test]
async fn in_drogue_mode_rollouts_and_histories_live_in_ajours_own_database() {
    const DEVICES: u32 = 6;
    let new = firmware_bytes(4_000, 5);
    let broker = Mosquitto::start().expect("starting Mosquitto");
    let registry = registry_with_fleet(Backend::Sqlite, "fleet", DEVICES).await;
    let mut instance = Instance::start_with_firmware(
        &registry,
        &[
            "--drogue-mqtt-url",
            &broker.url(),
            "--application",
            "fleet",
            "--rollout-tick-ms",
            "100",
        ],
        &[
            ("fw", "1.0.0", firmware_bytes(4_000, 4)),
            ("fw-2", "2.0.0", new.clone()),
        ],
    )
    .await;
    instance.subscribed(1).await;
    let (url, token) = {
        let running = instance.running.as_ref().unwrap();
        (format!("http://{}", running.addr), running.token.clone())
    };
    let api = reqwest::Client::new();
    let created: Value = api
        .post(format!("{url}/api/dfu/v1alpha1/apps/fleet/rollouts"))
        .bearer_auth(&token)
        .json(&json!({"firmware": {"file": {"name": "fw-2"}}, "waves": [{"percent": 50}, {"percent": 100}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_i64().unwrap_or_else(|| panic!("{created}"));
    assert_eq!(created["waves"][0]["total"], 3, "{created}");

    let mut simulation = fleet(
        "fleet",
        DEVICES,
        via_drogue(&broker.url(), Duration::from_secs(2)),
    );
    simulation.device.target = Some("2.0.0".into());
    assert_all_updated(&simulate(&simulation).await, "2.0.0", new.len());
    let rollout_url = format!("{url}/api/dfu/v1alpha1/apps/fleet/rollouts/{id}");
    eventually(Duration::from_secs(10), "the rollout completed", || async {
        let rollout: Value = get_json(&api, &rollout_url, &token).await;
        rollout["state"] == "completed"
    })
    .await;
    let (_, app) = registry.api_send(reqwest::Method::GET, "apps/fleet", None).await;
    assert_eq!(app["spec"]["firmware"], json!({"file": {"name": "fw-2"}}));
    for i in 0..DEVICES {
        let history: Value = get_json(
            &api,
            &format!("{url}/api/dfu/v1alpha1/apps/fleet/devices/sim-{i}/history"),
            &token,
        )
        .await;
        let started: Vec<&Value> = history
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "started" && e["target"] == "2.0.0")
            .collect();
        assert_eq!(started.len(), 1, "sim-{i}: {history:#}");
        assert_eq!(started[0]["rollout"], id, "sim-{i}: {history:#}");
    }
    instance.stop().await;
}

/// GET `url` with the API token `token`: the answer's JSON.
async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
