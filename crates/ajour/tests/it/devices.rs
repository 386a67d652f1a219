//! Devices updated end to end. The device here is not ours: it encodes statuses and decodes
//! commands with the `embedded-update` 0.12 crate's own types and `serde_cbor` 0.11, exactly what
//! devices in the field run, and follows `FirmwareUpdater`'s rules (trust each Write, append,
//! report the new offset; on Swap reboot into the new version and report again; stop on Sync).

use crate::support::*;
use embedded_update::{Command as DeviceCommand, Status as DeviceStatus};
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug)]
enum Form {
    /// embedded-update / drogue-device: packed CBOR with `application/cbor`.
    Packed,
    /// drgdfu 0.6: named-key CBOR with no content type.
    Named,
}

struct Device {
    user: String,
    password: String,
    version: String,
    mtu: Option<u32>,
    form: Form,
    correlation_id: Option<u32>,
}

#[derive(Debug, PartialEq)]
struct Finished {
    version: String,
    written: Vec<u8>,
    swap_checksum: Option<Vec<u8>>,
    round_trips: usize,
}

impl Device {
    fn new(user: &str, password: &str, version: &str, mtu: Option<u32>, form: Form) -> Self {
        Self {
            user: user.into(),
            password: password.into(),
            version: version.into(),
            mtu,
            form,
            correlation_id: None,
        }
    }

    async fn send(&self, server: &TestServer, status: &DeviceStatus<'_>) -> Vec<u8> {
        let (body, content_type) = match self.form {
            Form::Packed => (
                serde_cbor::ser::to_vec_packed(status).unwrap(),
                Some("application/cbor"),
            ),
            Form::Named => (serde_cbor::to_vec(status).unwrap(), None),
        };
        let mut request = server
            .http
            .post(format!("{}/v1/dfu?ct=30", server.url))
            .basic_auth(&self.user, Some(&self.password))
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "device {}", self.user);
        assert_eq!(response.headers()["command"], "dfu");
        response.bytes().await.unwrap().to_vec()
    }

    /// Run until Sync; at most `limit` round trips.
    async fn run(&mut self, server: &TestServer, limit: usize) -> Finished {
        let mut written: Vec<u8> = Vec::new();
        let mut next_version: Option<Vec<u8>> = None;
        let mut swap_checksum = None;
        for round_trip in 1..=limit {
            let version = self.version.clone().into_bytes();
            let status = match &next_version {
                None => DeviceStatus::first(&version, self.mtu, self.correlation_id),
                Some(next) => DeviceStatus::update(
                    &version,
                    self.mtu,
                    written.len() as u32,
                    next,
                    self.correlation_id,
                ),
            };
            let bytes = self.send(server, &status).await;
            match serde_cbor::from_slice::<DeviceCommand>(&bytes).expect("the device decodes the command") {
                DeviceCommand::Write {
                    version,
                    offset,
                    data,
                    correlation_id,
                } => {
                    assert_eq!(correlation_id, self.correlation_id);
                    if offset == 0 {
                        written.clear();
                        next_version = Some(version.to_vec());
                    }
                    assert_eq!(
                        offset as usize,
                        written.len(),
                        "a Write at exactly the offset reported"
                    );
                    written.extend_from_slice(&data);
                }
                DeviceCommand::Swap {
                    version,
                    checksum,
                    correlation_id,
                } => {
                    assert_eq!(correlation_id, self.correlation_id);
                    swap_checksum = Some(checksum.to_vec());
                    self.version = String::from_utf8(version.to_vec()).unwrap();
                    next_version = None;
                }
                DeviceCommand::Sync { version, .. } => {
                    assert_eq!(&version[..], self.version.as_bytes());
                    return Finished {
                        version: self.version.clone(),
                        written,
                        swap_checksum,
                        round_trips: round_trip,
                    };
                }
                DeviceCommand::Wait { poll, .. } => {
                    panic!("unexpected Wait (poll {poll:?}) for {}", self.user)
                }
            }
        }
        panic!("device {} not in sync after {limit} round trips", self.user);
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
        for (name, form, mtu) in [
            ("packed", Form::Packed, Some(512)),
            ("drgdfu", Form::Named, None),
            ("small", Form::Packed, Some(100)),
        ] {
            server.create_device("my-app", name, "hey-rodney", None).await;
            let mut device = Device::new(&format!("{name}@my-app"), "hey-rodney", "0.1.0", mtu, form);
            device.correlation_id = Some(42);
            let finished = device.run(&server, 500).await;
            assert_eq!(finished.version, "0.2.0", "{backend:?} {name}");
            assert_eq!(
                finished.written, image,
                "{backend:?} {name}: the device holds exactly the image"
            );
            let expected: [u8; 32] = Sha256::digest(&image).into();
            assert_eq!(finished.swap_checksum.as_deref(), Some(&expected[..]));
            let blocks = image.len().div_ceil(mtu.unwrap_or(512) as usize);
            assert_eq!(
                finished.round_trips,
                blocks + 2,
                "{backend:?} {name}: one Write per block, Swap, Sync"
            );

            let status = server.device("my-app", name).await;
            assert_eq!(
                status["status"]["firmware"]["current"], "0.2.0",
                "{backend:?} {name}: {status}"
            );
            assert_eq!(status["status"]["firmware"]["target"], "0.2.0");
            assert_eq!(
                conditions(&status),
                [("InSync".to_string(), "True".to_string())],
                "{backend:?} {name}"
            );
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn a_device_section_overrides_the_application_and_user_at_app_with_query_works() {
    let server = TestServer::start(Backend::Sqlite).await;
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
    let finished = Device::new("special-one@my-app", "pw", "1.0.0", None, Form::Packed)
        .run(&server, 50)
        .await;
    assert_eq!(
        (finished.version.as_str(), finished.written),
        ("9.9.9", firmware_bytes(300, 3))
    );

    // `device:password` with `?application=` reaches the same device.
    let status = DeviceStatus::first(b"9.9.9", None, None);
    let response = server
        .http
        .post(format!("{}/v1/dfu?application=my-app", server.url))
        .basic_auth("special-one", Some("pw"))
        .body(serde_cbor::ser::to_vec_packed(&status).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(matches!(
        serde_cbor::from_slice::<DeviceCommand>(&response.bytes().await.unwrap()).unwrap(),
        DeviceCommand::Sync { .. }
    ));
    server.stop().await;
}

#[tokio::test]
async fn a_replaced_firmware_file_is_noticed_and_an_interrupted_update_restarts_cleanly() {
    let server = TestServer::start(Backend::Sqlite).await;
    let first = firmware_bytes(2000, 4);
    server.add_firmware("fw", "1.0.0", &first);
    server
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    server.create_device("app", "d", "pw", None).await;

    // Half-way through 1.0.0 ...
    let device = Device::new("d@app", "pw", "0.0.1", Some(500), Form::Packed);
    let half = device
        .send(
            &server,
            &DeviceStatus::update(b"0.0.1", Some(500), 1000, b"1.0.0", None),
        )
        .await;
    assert!(matches!(
        serde_cbor::from_slice::<DeviceCommand>(&half).unwrap(),
        DeviceCommand::Write { offset: 1000, .. }
    ));

    // ... the file is replaced by 1.0.1: the device starts over at 0, never mixing the two.
    let second = firmware_bytes(1500, 5);
    server.add_firmware("fw", "1.0.1", &second);
    let after = device
        .send(
            &server,
            &DeviceStatus::update(b"0.0.1", Some(500), 1500, b"1.0.0", None),
        )
        .await;
    match serde_cbor::from_slice::<DeviceCommand>(&after).unwrap() {
        DeviceCommand::Write {
            version,
            offset,
            data,
            ..
        } => {
            assert_eq!((&version[..], offset), (&b"1.0.1"[..], 0));
            assert_eq!(&data[..], &second[..500]);
        }
        other => panic!("expected a fresh Write, got {other:?}"),
    }
    let finished = Device::new("d@app", "pw", "0.0.1", Some(500), Form::Packed)
        .run(&server, 20)
        .await;
    assert_eq!((finished.version.as_str(), finished.written), ("1.0.1", second));
    server.stop().await;
}

#[tokio::test]
async fn a_fleet_updates_through_the_simulator() {
    let server = TestServer::start(Backend::Sqlite).await;
    server.add_firmware("fw", "2.0.0", &firmware_bytes(5000, 6));
    server
        .create_app("fleet", Some(json!({"file": {"name": "fw"}})))
        .await;
    for i in 0..20 {
        server
            .create_device("fleet", &format!("sim-{i}"), "pw", None)
            .await;
    }
    let args = ajour::simulate::SimulateArgs {
        url: server.url.clone(),
        app: "fleet".into(),
        device: "sim".into(),
        password: "pw".into(),
        version: "1.0.0".into(),
        count: Some(20),
        mtu: Some(256),
        encoding: ajour::simulate::StatusEncoding::Named,
        concurrency: 20,
        max_wait: 1,
        timeout: 60,
        mqtt: Default::default(),
    };
    ajour::simulate::run(args.clone()).await.unwrap();
    for i in 0..20 {
        let device = server.device("fleet", &format!("sim-{i}")).await;
        assert_eq!(device["status"]["firmware"]["current"], "2.0.0");
    }
    // Run again: everyone is in sync now. A wrong password fails the run.
    ajour::simulate::run(args.clone()).await.unwrap();
    let wrong = ajour::simulate::SimulateArgs {
        password: "nope".into(),
        count: Some(2),
        ..args
    };
    assert!(ajour::simulate::run(wrong).await.is_err());
    server.stop().await;
}
