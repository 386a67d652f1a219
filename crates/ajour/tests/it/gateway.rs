//! Gateways on the HTTP endpoint (Drogue's `as=`): a device that logs in as itself and sends the
//! statuses of devices that name it in `spec.gatewaySelector.matchNames`, as a BLE bridge does
//! for the sensors behind it; anything else is refused and counted.

use crate::support::*;
use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
use ajour_sim::{HttpLink, SimulatedDevice};
use reqwest::Method;
use serde_json::json;

const APP: &str = "bridged";

async fn create(server: &TestServer, name: &str, spec: serde_json::Value) {
    let body = json!({"metadata": {"name": name}, "spec": spec});
    let (status, answer) = server
        .api_send(Method::POST, &format!("apps/{APP}/devices"), Some(body))
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{answer}");
}

/// The gateway's link for `device`.
fn via_gateway(server: &TestServer, password: &str, device: &str) -> HttpLink {
    HttpLink::new(server.http.clone(), &server.url, APP, "ble-bridge", password).acting_for(device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_updates_the_devices_that_name_it_and_no_other() {
    let server = TestServer::start(Backend::Sqlite).await;
    let image = firmware_bytes(16 * 1024, 3);
    server.add_firmware("fw-2", "2.0.0", &image);
    server
        .create_app(APP, Some(json!({"file": {"name": "fw-2"}})))
        .await;
    create(
        &server,
        "ble-bridge",
        json!({"authentication": {"credentials": [{"pass": "gw-pass"}]}}),
    )
    .await;
    // The sensors have no credentials of their own: only the bridge speaks for them.
    for sensor in ["sensor-a", "sensor-b"] {
        create(
            &server,
            sensor,
            json!({"gatewaySelector": {"matchNames": ["ble-bridge"]}}),
        )
        .await;
    }
    create(
        &server,
        "sensor-c",
        json!({"gatewaySelector": {"matchNames": ["other-bridge"]}}),
    )
    .await;
    let refusals = || async {
        Metrics::of(&server.url)
            .await
            .value("ajour_gateway_refusals_total", &[])
    };
    let refused_before = refusals().await;

    // Both sensors updated through the one gateway at once.
    let update = |device: &'static str| {
        let mut link = via_gateway(&server, "gw-pass", device);
        async move {
            let mut sensor = SimulatedDevice::new("1.0.0", Some(512));
            run_to_end(&mut sensor, &mut link, device).await
        }
    };
    let (a, b) = tokio::join!(update("sensor-a"), update("sensor-b"));
    for outcome in [a, b] {
        assert_eq!(outcome, updated_to("2.0.0", image.len()));
    }
    for sensor in ["sensor-a", "sensor-b"] {
        assert!(in_sync(&server.firmware(APP, sensor).await, "2.0.0"), "{sensor}");
    }
    // The statuses were the sensors', not the gateway's.
    assert_eq!(server.firmware(APP, "ble-bridge").await, None);

    // curl, a peer no one here wrote, as the gateway for sensor-b: a real CBOR status, a command
    // that decodes.
    let status = Status {
        version: b"2.0.0".to_vec(),
        mtu: Some(256),
        correlation_id: Some(7),
        update: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let status_file = dir.path().join("status.cbor");
    std::fs::write(&status_file, encode_status(&status, Encoding::Packed)).unwrap();
    let curl = |device: &str, password: &str| {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "-w",
                "\n%{http_code}",
                "-u",
                &format!("ble-bridge@{APP}:{password}"),
            ])
            .args(["-H", "content-type: application/cbor", "--data-binary"])
            .arg(format!("@{}", status_file.display()))
            .arg(format!("{}/v1/dfu?ct=30&as={device}", server.url))
            .output()
            .expect("curl runs")
    };
    let output = curl("sensor-b", "gw-pass");
    let (body, code) = output.stdout.split_at(output.stdout.len() - 4);
    assert_eq!(code, b"\n200", "{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        matches!(
            decode_command(body),
            Ok(Command::Sync {
                version: b"2.0.0",
                correlation_id: Some(7),
                ..
            })
        ),
        "{:?}",
        decode_command(body)
    );

    // Refused: a device that names another gateway, one that does not exist, a hostile name —
    // the same answer for all three, so names cannot be probed — and a wrong gateway password.
    for device in ["sensor-c", "ghost", "..%2F..%2Fetc%2Fpasswd"] {
        let output = curl(device, "gw-pass");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.ends_with("\n403"), "{device}: {text}");
        assert!(text.contains("does not name 'ble-bridge'"), "{device}: {text}");
    }
    let output = curl("sensor-a", "wrong");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.ends_with("\n403") && !text.contains("does not name"),
        "{text}"
    );
    assert!(refusals().await >= refused_before + 3.0);
    // Nothing of sensor-c changed.
    assert_eq!(server.firmware(APP, "sensor-c").await, None);
}
