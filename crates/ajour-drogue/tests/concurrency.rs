//! The integration against a real broker (Mosquitto, started by the test) with an update service
//! whose registry is in memory and whose firmware source can be held up: a device that is slow to
//! serve holds up only the devices that share its worker, and one device's statuses are answered
//! in order.

use ajour_client::mqtt::{Inbox, MqttConfig, MqttVersion};
use ajour_drogue::event::structured_event;
use ajour_drogue::{worker_of, Applications, Integration, IntegrationConfig};
use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
use ajour_registry::{AppName, Key};
use ajour_service::{ServiceConfig, UpdateService};
use ajour_store::{FetchError, FirmwareImage, FirmwareSource, FirmwareSpec};
use ajour_testkit::{MemoryRegistry, Mosquitto};
use async_trait::async_trait;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Serves one image; fetches of firmware `slow` wait for a permit.
struct GatedFirmware {
    image: Arc<FirmwareImage>,
    gate: Arc<Semaphore>,
}

#[async_trait]
impl FirmwareSource for GatedFirmware {
    async fn fetch(&self, spec: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError> {
        if matches!(spec, FirmwareSpec::File { name } if name == "slow") {
            self.gate.acquire().await.unwrap().forget();
        }
        Ok(self.image.clone())
    }
}

#[tokio::test]
async fn a_slow_device_holds_up_only_the_devices_on_its_worker_and_each_is_answered_in_order() {
    let broker = Mosquitto::start().expect("starting Mosquitto");
    let app = AppName::parse("app").unwrap();
    let device = |name: &str| Key::Device(app.clone(), ajour_registry::DeviceName::parse(name).unwrap());
    let registry = Arc::new(MemoryRegistry::default());
    registry.put(&Key::App(app.clone()), json!({}));
    registry.put(&device("slow"), json!({"firmware": {"file": {"name": "slow"}}}));
    let fast: Vec<String> = (0..8).map(|i| format!("fast-{i}")).collect();
    for name in &fast {
        registry.put(&device(name), json!({"firmware": {"file": {"name": "fast"}}}));
    }
    let gate = Arc::new(Semaphore::new(0));
    let image: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let firmware = Arc::new(GatedFirmware {
        image: Arc::new(FirmwareImage::new("2.0.0", image.clone()).unwrap()),
        gate: gate.clone(),
    });
    let service = Arc::new(UpdateService::new(
        registry.clone(),
        firmware,
        ServiceConfig::default(),
    ));
    let mut config = IntegrationConfig::new(
        MqttConfig::new(broker.url(), "ajour-test"),
        Applications::Listed(vec![app.clone()]),
    );
    config.workers = WORKERS;
    let integration = Integration::start(config, service, registry).unwrap();
    let stats = integration.stats();

    // The cloud side.
    let mut peer_config = MqttConfig::new(broker.url(), "peer");
    peer_config.version = MqttVersion::V3;
    let mut inbox = Inbox::connect(&peer_config, vec!["command/#".into()]).unwrap();
    assert!(
        inbox.subscribed(1, Duration::from_secs(20)).await,
        "the peer's subscription"
    );
    let peer = inbox.client.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stats.subscriptions() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "integration never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let publish = |name: &str, offset: u32| {
        let status = if offset == 0 {
            Status::first("1.0.0", Some(100), None)
        } else {
            Status::updating("1.0.0", Some(100), None, "2.0.0", offset)
        };
        let event = structured_event(
            "app",
            name,
            "dfu",
            "application/cbor",
            &encode_status(&status, Encoding::Packed),
        );
        let peer = peer.clone();
        async move {
            peer.publish("app/app", event.to_string().into_bytes())
                .await
                .unwrap()
        }
    };
    // The slow device first, three statuses; then the others.
    for offset in [0, 100, 200] {
        publish("slow", offset).await;
    }
    for name in &fast {
        publish(name, 0).await;
    }
    // While the slow device's firmware is held up, every device on another worker is served; only
    // those that share the slow device's worker wait with it (its statuses must stay in order).
    let slow_worker = worker_of(&device("slow"), WORKERS);
    let (held_up, free): (Vec<&String>, Vec<&String>) = fast
        .iter()
        .partition(|name| worker_of(&device(name), WORKERS) == slow_worker);
    assert!(!free.is_empty(), "the test needs devices on other workers");
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < free.len() {
        let (topic, _) = next(&mut inbox).await;
        let name = topic
            .strip_prefix("command/app/")
            .and_then(|t| t.strip_suffix("/dfu"))
            .unwrap()
            .to_string();
        assert!(
            free.contains(&&name),
            "{name} answered while the slow device was held up"
        );
        answered.insert(name);
    }
    assert_eq!(stats.statuses(), 3 + fast.len() as u64, "every status decoded");

    // Released: the slow device's answers come, in the order its statuses came, and those of the
    // devices that waited behind it.
    gate.add_permits(3);
    let mut slow_offsets = Vec::new();
    let mut fast_seen = free.len();
    while slow_offsets.len() < 3 || fast_seen < free.len() + held_up.len() {
        let (topic, bytes) = next(&mut inbox).await;
        match decode_command(&bytes).unwrap() {
            Command::Write { offset, data, .. } => {
                assert_eq!(data, &image[offset as usize..offset as usize + 100]);
                if topic == "command/app/slow/dfu" {
                    slow_offsets.push(offset);
                } else {
                    fast_seen += 1;
                }
            }
            other => panic!("{topic}: {other:?}"),
        }
    }
    assert_eq!(slow_offsets, [0, 100, 200]);
    integration.stop().await;
}

/// Workers of the integration under test.
const WORKERS: usize = 16;

async fn next(inbox: &mut Inbox) -> (String, Vec<u8>) {
    let message = tokio::time::timeout(Duration::from_secs(20), inbox.messages.recv())
        .await
        .expect("a command in time")
        .unwrap();
    (message.topic, message.payload.to_vec())
}
