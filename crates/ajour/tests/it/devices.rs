//! Devices updated end to end. What crosses the wire is not ours: statuses are encoded and
//! commands decoded with the `embedded-update` 0.12 crate's own types and `serde_cbor` 0.11,
//! exactly what devices in the field run ([`FieldLink`]). What the device does with a command is
//! the one simulator's ([`ajour_sim::SimulatedDevice`]: a Write only at exactly the offset it
//! holds, a Swap only with the checksum of what it received, then Sync on the new version).

use crate::support::*;
use ajour_protocol::{decode_status, encode_command, Command};
use ajour_sim::{
    run_device, DeviceOptions, EncodedStatus, Ended, Link, LinkError, Observer, Outcome, SimulatedDevice,
    StatusEncoding, Step,
};
use axum::body::Bytes;
use embedded_update::{Command as DeviceCommand, Status as DeviceStatus};
use serde_json::json;
use std::ops::ControlFlow;
use std::time::Duration;

/// A device's link as devices in the field have it: the simulated device's status is sent as
/// embedded-update's own `Status`, serialised by `serde_cbor` 0.11 (packed with
/// `application/cbor`, as embedded-update and drogue-device send it, or named with no content
/// type, as drgdfu does), to `POST /v1/dfu`; the answer must be `200`, `command: dfu`, and decode
/// as embedded-update's own `Command`, which is what the device then follows.
struct FieldLink {
    http: reqwest::Client,
    url: String,
    user: String,
    password: String,
}

impl FieldLink {
    /// Device `user` (`device@app`, or `device` with `?application=` in `query`).
    fn new(server: &TestServer, query: &str, user: &str) -> Self {
        Self {
            http: server.http.clone(),
            url: format!("{}/v1/dfu?ct=30{query}", server.url),
            user: user.into(),
            password: "pw".into(),
        }
    }
}

impl Link for FieldLink {
    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        // The status the simulated device means, in embedded-update's own types.
        let status_sent = decode_status(&status.bytes).expect("the simulator's status");
        let device_status = match &status_sent.update {
            None => DeviceStatus::first(&status_sent.version, status_sent.mtu, status_sent.correlation_id),
            Some(update) => DeviceStatus::update(
                &status_sent.version,
                status_sent.mtu,
                update.offset,
                &update.version,
                status_sent.correlation_id,
            ),
        };
        let mut request = self
            .http
            .post(&self.url)
            .basic_auth(&self.user, Some(&self.password));
        request = match status.encoding {
            StatusEncoding::Packed => request
                .header("content-type", "application/cbor")
                .body(serde_cbor::ser::to_vec_packed(&device_status).unwrap()),
            StatusEncoding::Named => request.body(serde_cbor::to_vec(&device_status).unwrap()),
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "device {}", self.user);
        assert_eq!(response.headers()["command"], "dfu");
        let body = response.bytes().await.unwrap();
        // What the device understood, handed to the simulated device to follow.
        let understood =
            serde_cbor::from_slice::<DeviceCommand>(&body).expect("the device decodes the command");
        let command = match &understood {
            DeviceCommand::Wait { correlation_id, poll } => Command::Wait {
                correlation_id: *correlation_id,
                poll: *poll,
            },
            DeviceCommand::Sync {
                version,
                correlation_id,
                poll,
            } => Command::Sync {
                version: &version[..],
                correlation_id: *correlation_id,
                poll: *poll,
            },
            DeviceCommand::Write {
                version,
                correlation_id,
                offset,
                data,
            } => Command::Write {
                version: &version[..],
                correlation_id: *correlation_id,
                offset: *offset,
                data: &data[..],
            },
            DeviceCommand::Swap {
                version,
                correlation_id,
                checksum,
            } => Command::Swap {
                version: &version[..],
                correlation_id: *correlation_id,
                checksum: &checksum[..],
            },
        };
        Ok(encode_command(&command).into())
    }
}

/// Counts round trips, and fails the device on a Wait: these devices always have firmware to get.
#[derive(Default)]
struct RoundTrips(usize);

impl Observer for RoundTrips {
    fn answered(&mut self, _latency: Duration, step: &Step) -> anyhow::Result<ControlFlow<()>> {
        self.0 += 1;
        anyhow::ensure!(!matches!(step, Step::Wait(_)), "unexpected Wait");
        Ok(ControlFlow::Continue(()))
    }
}

/// Run `device` over `link` to Sync: how it ended, and the round trips it took.
async fn run(
    device: &mut SimulatedDevice,
    link: &mut FieldLink,
    encoding: StatusEncoding,
) -> (Outcome, usize) {
    let options = DeviceOptions::new(encoding, Duration::from_secs(1), Duration::from_secs(60));
    let mut round_trips = RoundTrips::default();
    match run_device(device, link, &options, &mut round_trips).await {
        Ok(Ended::Done(outcome)) => (outcome, round_trips.0),
        other => panic!("{}: {other:?}", link.user),
    }
}

#[tokio::test]
async fn devices_in_the_field_are_updated_end_to_end() {
    for backend in BACKENDS {
        let server = TestServer::start(backend).await;
        let image = firmware_bytes(10_000, 1);
        server.add_firmware("app-fw", "0.2.0", &image);
        server
            .create_app("my-app", Some(json!({"file": {"name": "app-fw"}})))
            .await;
        for (name, encoding, mtu) in [
            ("packed", StatusEncoding::Packed, Some(512)),
            ("drgdfu", StatusEncoding::Named, None),
            ("small", StatusEncoding::Packed, Some(100)),
        ] {
            server.create_device("my-app", name, "pw", None).await;
            let mut device = SimulatedDevice::new("0.1.0", mtu);
            // Echoed in every command, or the device refuses it.
            device.set_correlation_id(Some(42));
            let mut link = FieldLink::new(&server, "", &format!("{name}@my-app"));
            let (outcome, round_trips) = run(&mut device, &mut link, encoding).await;
            assert_eq!(
                outcome,
                Outcome::Updated {
                    from: "0.1.0".into(),
                    to: "0.2.0".into(),
                    bytes: image.len()
                },
                "{backend:?} {name}"
            );
            assert_eq!(
                device.written(),
                image,
                "{backend:?} {name}: the device holds exactly the image"
            );
            let blocks = image.len().div_ceil(mtu.unwrap_or(512) as usize);
            assert_eq!(
                round_trips,
                blocks + 2,
                "{backend:?} {name}: one Write per block, Swap, Sync"
            );
            server.service().settle_status_writes().await;
            let shown = server.firmware("my-app", name).await;
            assert!(in_sync(&shown, "0.2.0"), "{backend:?} {name}: {shown:?}");
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn a_device_section_overrides_the_application_and_user_at_app_with_query_works() {
    for backend in BACKENDS {
        let server = TestServer::start(backend).await;
        server.add_firmware("app-fw", "1.0.0", &firmware_bytes(700, 2));
        server.add_firmware("special", "9.9.9", &firmware_bytes(300, 3));
        server
            .create_app("my-app", Some(json!({"file": {"name": "app-fw"}})))
            .await;
        server
            .create_device(
                "my-app",
                "special-one",
                "pw",
                Some(json!({"file": {"name": "special"}})),
            )
            .await;
        let mut device = SimulatedDevice::new("1.0.0", None);
        let mut link = FieldLink::new(&server, "", "special-one@my-app");
        run(&mut device, &mut link, StatusEncoding::Packed).await;
        assert_eq!(
            (device.version(), device.written()),
            ("9.9.9", &firmware_bytes(300, 3)[..]),
            "{backend:?}"
        );

        // `device:password` with `?application=` reaches the same device.
        let mut link = FieldLink::new(&server, "&application=my-app", "special-one");
        let (outcome, _) = run(
            &mut SimulatedDevice::new("9.9.9", None),
            &mut link,
            StatusEncoding::Packed,
        )
        .await;
        assert_eq!(
            outcome,
            Outcome::InSync {
                version: "9.9.9".into()
            },
            "{backend:?}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_replaced_firmware_file_is_noticed_and_an_interrupted_update_restarts_cleanly() {
    for backend in BACKENDS {
        let server = TestServer::start(backend).await;
        let first = firmware_bytes(2000, 4);
        server.add_firmware("fw", "1.0.0", &first);
        server
            .create_app("app", Some(json!({"file": {"name": "fw"}})))
            .await;
        server.create_device("app", "d", "pw", None).await;
        let mut link = FieldLink::new(&server, "", "d@app");
        let status_of = |device: &SimulatedDevice| EncodedStatus {
            bytes: device.encoded_status(StatusEncoding::Packed),
            encoding: StatusEncoding::Packed,
            correlation_id: None,
        };

        // Three blocks into 1.0.0 ...
        let mut device = SimulatedDevice::new("0.0.1", Some(500));
        for _ in 0..3 {
            let command = link.exchange(status_of(&device)).await.unwrap();
            assert_eq!(device.apply_bytes(&command).unwrap(), Step::Continue);
        }
        assert_eq!(device.written(), &first[..1500], "{backend:?}");

        // ... the file is replaced by 1.0.1: the device starts over at 0, never mixing the two.
        let second = firmware_bytes(1500, 5);
        server.add_firmware("fw", "1.0.1", &second);
        let after = link.exchange(status_of(&device)).await.unwrap();
        assert_eq!(device.apply_bytes(&after).unwrap(), Step::Continue);
        assert_eq!(
            device.written(),
            &second[..500],
            "{backend:?}: a fresh Write of 1.0.1 at 0"
        );
        let (outcome, _) = run(&mut device, &mut link, StatusEncoding::Packed).await;
        assert!(
            matches!(&outcome, Outcome::Updated { to, .. } if to == "1.0.1"),
            "{outcome:?}"
        );
        assert_eq!(device.written(), second, "{backend:?}");
        server.stop().await;
    }
}

#[tokio::test]
async fn a_fleet_updates_through_the_simulator() {
    for backend in BACKENDS {
        let server = TestServer::start(backend).await;
        let image = firmware_bytes(5000, 6);
        server.add_firmware("fw", "2.0.0", &image);
        server
            .create_app("fleet", Some(json!({"file": {"name": "fw"}})))
            .await;
        for i in 0..20 {
            server
                .create_device("fleet", &format!("sim-{i}"), "pw", None)
                .await;
        }
        let mut simulation = fleet(
            "fleet",
            20,
            ajour_sim::Transport::Http {
                urls: vec![server.url.clone()],
            },
        );
        simulation.mtu = Some(256);
        simulation.device.encoding = StatusEncoding::Named;
        assert_all_updated(&simulate(&simulation).await, "2.0.0", image.len());
        server.service().settle_status_writes().await;
        for i in 0..20 {
            let shown = server.firmware("fleet", &format!("sim-{i}")).await;
            assert!(in_sync(&shown, "2.0.0"), "{backend:?} sim-{i}: {shown:?}");
        }
        // Run again from 2.0.0: everyone is in sync now.
        simulation.version = "2.0.0".into();
        for (name, outcome) in simulate(&simulation).await {
            assert_eq!(
                outcome,
                Outcome::InSync {
                    version: "2.0.0".into()
                },
                "{backend:?} {name}"
            );
        }
        // A wrong password fails every device, saying so.
        simulation.password = "nope".into();
        simulation.devices.truncate(2);
        for (name, outcome) in ajour_sim::simulate(&simulation).await.unwrap() {
            let error = outcome.expect_err("refused");
            assert!(
                format!("{error:#}").contains("403"),
                "{backend:?} {name}: {error:#}"
            );
        }
        server.stop().await;
    }
}
