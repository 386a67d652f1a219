//! Firmware from Hawkbit through `ajour serve` (the binary: its flags, environment and
//! `/metrics`), with Hawkbit played by `hawkbit_mock` (the DDI double of the `hawkbit` crate,
//! which answers 404 to any request that is not exactly what it expects). Devices are the one
//! simulator, their specs set with `ajour device set-firmware --firmware-hawkbit`. The source
//! itself (cancel, failure, a second deployment, 1,000 controllers, recovery) is tested in
//! `crates/ajour-hawkbit/tests/`.

use crate::support::*;
use embedded_update::{Command as DeviceCommand, Status as DeviceStatus};
use hawkbit::ddi::{Execution, Finished, Type};
use hawkbit_mock::ddi::{ChunkProtocol, DeploymentBuilder, ServerBuilder, TargetAuthorization};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::time::Duration;

const DEVICES: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_update_from_a_hawkbit_deployment_and_hawkbit_hears_of_it() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let data = firmware_bytes(10_000, 21);
        let file = dir.path().join("fw.bin");
        std::fs::write(&file, &data).unwrap();
        let sha256 = hex::encode(Sha256::digest(&data));
        let hawkbit = ServerBuilder::default()
            .target_authorization(TargetAuthorization::GatewayToken)
            .build();
        // One controller per device, each assigned the same distribution set.
        let mut targets = Vec::new();
        for i in 0..DEVICES {
            let target = hawkbit.add_target(&format!("sim-{i}"));
            target.request_config(json!({"mode": "merge", "data": {"version": "1.0.0"}}));
            target.push_deployment(
                DeploymentBuilder::new("1", Type::Forced, Type::Forced)
                    .chunk(
                        ChunkProtocol::BOTH,
                        "firmware",
                        "2.0.0",
                        "fw",
                        vec![(file.clone(), "-", "-", sha256.as_str())],
                    )
                    .build(),
            );
            targets.push(target);
        }

        let mut expected = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            // The first block is 512 of 10,000 bytes: 5 %; later progress waits for the
            // interval (an hour here).
            let proceeding = target.expect_deployment_feedback(
                "1",
                Execution::Proceeding,
                Finished::None,
                Some(json!({"cnt": 5, "of": 100})),
                vec![format!("sim-{i}@app: 5% of 2.0.0 sent").as_str()],
            );
            let success = target.expect_deployment_feedback(
                "1",
                Execution::Closed,
                Finished::Success,
                None,
                vec![format!("sim-{i}@app runs 2.0.0").as_str()],
            );
            expected.push((target, proceeding, success));
        }

        let url = hawkbit.base_url();
        let server = ServeProcess::start(
            backend,
            &["--hawkbit-url", &url, "--hawkbit-feedback-interval-ms", "3600000"],
            &[("AJOUR_HAWKBIT_GATEWAY_TOKEN", "KeyDEFAULT")],
        )
        .await;
        server.create_app("app", None).await;
        for i in 0..DEVICES {
            let name = format!("sim-{i}");
            server.create_device("app", &name, "pw", None).await;
            let said = succeeded(server.cli(&[
                "device",
                "set-firmware",
                "app",
                &name,
                "--firmware-hawkbit",
                &name,
            ]));
            assert_eq!(said.trim(), format!("device '{name}': firmware hawkbit {name}"));
        }

        let simulation = fleet(
            "app",
            DEVICES,
            ajour_sim::Transport::Http {
                urls: vec![server.url.clone()],
            },
        );
        assert_all_updated(&simulate(&simulation).await, "2.0.0", data.len());

        for (i, (target, proceeding, success)) in expected.iter().enumerate() {
            eventually(Duration::from_secs(10), "closed/success feedback", || async {
                success.calls() == 1
            })
            .await;
            assert_eq!(proceeding.calls(), 1, "{backend:?} sim-{i}");
            // ~20 statuses each, one poll (Hawkbit's sleep is a minute).
            assert_eq!(target.poll_hits(), 1, "{backend:?} sim-{i}");
            assert_eq!(target.config_data_hits(), 1, "{backend:?} sim-{i}");
            assert_eq!(target.deployment_hits(), 1, "{backend:?} sim-{i}");
            let shown = server.firmware("app", &format!("sim-{i}")).await;
            assert!(in_sync(&shown, "2.0.0"), "{backend:?} sim-{i}: {shown:?}");
        }
        let metrics = server.metrics().await;
        let requests = |request: &str, result: &str| {
            metrics.value(
                "ajour_hawkbit_requests_total",
                &[("request", request), ("result", result)],
            )
        };
        assert_eq!(
            requests("download", "ok"),
            1.0,
            "{backend:?}: one download for all"
        );
        assert_eq!(requests("poll", "ok"), f64::from(DEVICES), "{backend:?}");
        assert_eq!(requests("feedback", "ok"), f64::from(2 * DEVICES), "{backend:?}");
        for request in ["poll", "deployment", "download", "feedback", "config"] {
            assert_eq!(requests(request, "error"), 0.0, "{backend:?} {request}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_wait_while_hawkbit_has_nothing_or_is_down_and_failures_are_counted() {
    let hawkbit = ServerBuilder::default()
        .target_authorization(TargetAuthorization::GatewayToken)
        .build();
    hawkbit.add_target("idle");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);

    let status = || serde_cbor::ser::to_vec_packed(&DeviceStatus::first(b"1.0.0", Some(512), None)).unwrap();
    let wait_poll = |body: &[u8]| match serde_cbor::from_slice::<DeviceCommand>(body).unwrap() {
        DeviceCommand::Wait { poll, .. } => poll,
        other => panic!("{other:?}"),
    };

    // Nothing assigned: Hawkbit's polling sleep (00:01:00) is the device's poll, and it is shown
    // in sync on what it runs.
    let url = hawkbit.base_url();
    let server = ServeProcess::start(
        Backend::Sqlite,
        &["--hawkbit-url", &url, "--hawkbit-gateway-token", "KeyDEFAULT"],
        &[],
    )
    .await;
    create_device_in_new_app(&server, "app", "idle", json!({"hawkbit": {"controller": "idle"}})).await;
    let (code, _, body) = server.post_dfu("idle@app", "pw", status()).await;
    assert_eq!(code, 200);
    assert_eq!(wait_poll(&body), Some(60));
    eventually(Duration::from_secs(10), "the status written", || async {
        in_sync(&server.firmware("app", "idle").await, "1.0.0")
    })
    .await;

    // Hawkbit down: the device waits the usual --wait-poll, its status says why, and /metrics
    // counts the failed poll.
    let server = ServeProcess::start(
        Backend::Sqlite,
        &["--hawkbit-url", &down_url, "--wait-poll", "9"],
        &[],
    )
    .await;
    create_device_in_new_app(&server, "app", "dev", json!({"hawkbit": {"controller": "dev"}})).await;
    let (code, _, body) = server.post_dfu("dev@app", "pw", status()).await;
    assert_eq!(code, 200);
    assert_eq!(wait_poll(&body), Some(9));
    let metrics = server.metrics().await;
    let polls = |result: &str| {
        metrics.value(
            "ajour_hawkbit_requests_total",
            &[("request", "poll"), ("result", result)],
        )
    };
    assert_eq!((polls("error"), polls("ok")), (1.0, 0.0));
    eventually(Duration::from_secs(10), "the error in the status", || async {
        match server.firmware("app", "dev").await {
            Some(shown) => shown
                .state
                .to_string()
                .contains("Hawkbit: polling controller 'dev'"),
            None => false,
        }
    })
    .await;
}

/// Create `app` and its device `name` (password `pw`) with the firmware section `firmware`.
async fn create_device_in_new_app(server: &Connection, app: &str, name: &str, firmware: serde_json::Value) {
    server.create_app(app, None).await;
    server.create_device(app, name, "pw", Some(firmware)).await;
}
