//! Bad input gets a clear, documented answer, and the server keeps serving.

use crate::support::*;
use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
use ajour_store::{FileStore, FirmwareName};
use ajour_types::FirmwareState;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

fn first(version: &str, mtu: Option<u32>) -> Vec<u8> {
    encode_status(
        &Status::first(version.as_bytes().to_vec(), mtu, Some(5)),
        Encoding::Packed,
    )
}

async fn setup(backend: Backend) -> TestServer {
    let server = TestServer::start(backend).await;
    server.add_firmware("fw", "1.0.0", &firmware_bytes(2000, 9));
    server
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    server.create_device("app", "d", "pw", None).await;
    server
}

#[tokio::test]
async fn endpoint_answers_bad_requests_and_keeps_serving() {
    for backend in BACKENDS {
        let server = setup(backend).await;
        let url = format!("{}/v1/dfu", server.url);

        // No credentials: 401 with a Basic challenge.
        let response = server
            .http
            .post(&url)
            .body(first("0.1.0", None))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key("www-authenticate"));

        // Wrong password, unknown device, unknown application, hostile names: 403, all alike.
        for (user, password) in [
            ("d@app", "wrong"),
            ("ghost@app", "pw"),
            ("d@nowhere", "pw"),
            ("../../etc/passwd@app", "pw"),
            ("d@../app", "pw"),
        ] {
            let (status, _, _) = server.post_dfu(user, password, first("0.1.0", None)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{user}:{password}");
        }

        // Undecodable bodies: 400 naming the problem.
        for body in [vec![], b"garbage".to_vec(), vec![0xa4, 0x00], vec![0xff; 10]] {
            let (status, _, text) = server.post_dfu("d@app", "pw", body.clone()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
            let text = String::from_utf8(text).unwrap();
            assert!(text.contains("CBOR") || text.contains("empty"), "{text}");
        }

        // Oversize: 413.
        let (status, _, _) = server.post_dfu("d@app", "pw", vec![0u8; 100_000]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

        // An mtu of 0 gets the default block size, not an empty block.
        let (status, _, body) = server.post_dfu("d@app", "pw", first("0.1.0", Some(0))).await;
        assert_eq!(status, StatusCode::OK);
        match decode_command(&body).unwrap() {
            Command::Write {
                data, correlation_id, ..
            } => assert_eq!((data.len(), correlation_id), (512, Some(5))),
            other => panic!("expected Write, got {other:?}"),
        }

        // Other channels are accepted and need no answer.
        let response = server
            .http
            .post(format!("{}/v1/telemetry", server.url))
            .basic_auth("d@app", Some("pw"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);

        // Still serving.
        let (status, headers, _) = server.post_dfu("d@app", "pw", first("0.1.0", None)).await;
        assert_eq!(
            (status, headers["command"].to_str().unwrap()),
            (StatusCode::OK, "dfu")
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn devices_wait_when_firmware_is_missing_unusable_or_not_set() {
    for backend in BACKENDS {
        let server = setup(backend).await;
        // No firmware at all: wait for the unmanaged poll, and no status is invented.
        server.create_app("bare", None).await;
        server.create_device("bare", "d", "pw", None).await;
        let (_, _, body) = server.post_dfu("d@bare", "pw", first("0.1.0", None)).await;
        assert_eq!(
            decode_command(&body).unwrap(),
            Command::Wait {
                correlation_id: Some(5),
                poll: Some(600)
            }
        );
        assert_eq!(server.firmware("bare", "d").await, None, "{backend:?}");

        // Firmware that exists, but outside the firmware directory: a name reaching it is refused
        // however real the files are.
        FileStore::new(server.data_dir.path(), Duration::ZERO)
            .add(
                &FirmwareName::parse("outside").unwrap(),
                "6.6.6",
                b"not for devices",
            )
            .unwrap();
        // Firmware named with a path, missing, corrupt, or an unparsable section: Wait with the
        // configured poll, and the device's status says why.
        std::fs::write(server.data_dir.path().join("firmware/fw.bin"), b"tampered").unwrap();
        for (name, firmware, reason) in [
            (
                "hostile",
                json!({"file": {"name": "../outside"}}),
                "invalid firmware name",
            ),
            ("missing", json!({"file": {"name": "nope"}}), "not found"),
            ("corrupt", json!({"file": {"name": "fw"}}), "mismatch"),
            (
                "unparsable",
                json!({"file": {"nom": "fw"}}),
                "invalid spec.firmware",
            ),
            (
                "unconfigured",
                json!({"hawkbit": {"controller": "c"}}),
                "not configured",
            ),
        ] {
            server.create_device("app", name, "pw", Some(firmware)).await;
            let (status, _, body) = server
                .post_dfu(&format!("{name}@app"), "pw", first("0.1.0", None))
                .await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                decode_command(&body).unwrap(),
                Command::Wait {
                    correlation_id: Some(5),
                    poll: Some(7)
                },
                "{backend:?} {name}"
            );
            let firmware = server.firmware("app", name).await.expect("a status");
            assert_eq!(
                (firmware.current.as_str(), firmware.target.as_str()),
                ("0.1.0", "Unknown"),
                "{backend:?} {name}"
            );
            match &firmware.state {
                FirmwareState::Error { reason: why } => assert!(
                    why.contains(reason),
                    "{name}: reason '{why}' should contain '{reason}'"
                ),
                other => panic!("{name}: {other:?}"),
            }
        }
        server.stop().await;
    }
}
