//! `status.firmware` is kept current without a database write per block.

use crate::support::*;
use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
use serde_json::json;
use std::time::Duration;

async fn step(server: &TestServer, status: &Status) -> Vec<u8> {
    let (code, _, body) = server
        .post_dfu("d@app", "pw", encode_status(status, Encoding::Packed))
        .await;
    assert_eq!(code, 200);
    body
}

#[tokio::test]
async fn progress_is_coalesced_visible_and_flushed() {
    let image = firmware_bytes(64 * 1024, 3);
    let config =
        |c: &mut ajour::server::ServerConfig| c.service.progress_interval = Duration::from_secs(3600);
    let server = TestServer::start_with(Backend::Sqlite, config).await;
    server.add_firmware("fw", "2.0.0", &image);
    server
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    server.create_device("app", "d", "pw", None).await;

    // Half of a 128-block update.
    let mut offset = 0u32;
    for _ in 0..64 {
        let status = Status::updating(b"1.0.0".to_vec(), Some(512), None, b"2.0.0".to_vec(), offset);
        match decode_command(&step(&server, &status).await).unwrap() {
            Command::Write { data, .. } => offset += data.len() as u32,
            other => panic!("{other:?}"),
        }
    }
    // One write (the update started), not one per block ...
    server.service().settle_status_writes().await;
    assert_eq!(server.service().status_writes(), 1);
    // ... yet the API shows the latest progress.
    let device = server.device("app", "d").await;
    assert_eq!(
        conditions(&device),
        [
            ("InSync".into(), "False".into()),
            ("UpdateProgress".into(), "Unknown".into())
        ]
    );
    assert_eq!(device["status"]["firmware"]["conditions"][1]["message"], "50.00");
    assert_eq!(device["status"]["firmware"]["target"], "2.0.0");

    // Shutting down writes what is pending; a new server on the same data sees it.
    let data_dir = server.data_dir.path().to_path_buf();
    let TestServer {
        running,
        data_dir: keep_dir,
        ..
    } = server;
    running.unwrap().shutdown().await.unwrap();
    let restarted = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config = ajour::server::ServerConfig::new(&data_dir);
        config.password_cost = 4;
        ajour::server::start(listener, config).await.unwrap()
    };
    let response = reqwest::Client::new()
        .get(format!(
            "http://{}/api/registry/v1alpha1/apps/app/devices/d",
            restarted.addr
        ))
        .bearer_auth(&restarted.token)
        .send()
        .await
        .unwrap();
    let device: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        device["status"]["firmware"]["conditions"][1]["message"], "50.00",
        "{device}"
    );
    restarted.shutdown().await.unwrap();
    drop(keep_dir);
}

#[tokio::test]
async fn a_whole_update_costs_a_handful_of_writes_whatever_the_image_size() {
    // With no interval at all, only the progress step bounds the writes.
    for (size, interval) in [(4 * 1024, 10_000), (256 * 1024, 10_000), (256 * 1024, 0)] {
        let config = |c: &mut ajour::server::ServerConfig| {
            c.service.progress_interval = Duration::from_millis(interval)
        };
        let server = TestServer::start_with(Backend::Sqlite, config).await;
        server.add_firmware("fw", "2.0.0", &firmware_bytes(size, 1));
        server
            .create_app("app", Some(json!({"file": {"name": "fw"}})))
            .await;
        server.create_device("app", "d", "pw", None).await;
        let mut status = Status::first(b"1.0.0".to_vec(), Some(512), None);
        loop {
            match decode_command(&step(&server, &status).await).unwrap() {
                Command::Write { offset, data, .. } => {
                    status = Status::updating(
                        b"1.0.0".to_vec(),
                        Some(512),
                        None,
                        b"2.0.0".to_vec(),
                        offset + data.len() as u32,
                    )
                }
                Command::Swap { .. } => status = Status::first(b"2.0.0".to_vec(), Some(512), None),
                Command::Sync { .. } => break,
                Command::Wait { .. } => panic!("unexpected Wait"),
            }
        }
        // Started updating, then in sync; progress only every 20 points, and only once the interval
        // has passed: at most 2 + 100/20 writes.
        server.service().settle_status_writes().await;
        let writes = server.service().status_writes();
        let most = if interval == 0 { 7 } else { 4 };
        assert!(
            (2..=most).contains(&writes),
            "{size} bytes, interval {interval} ms: {writes} writes"
        );
        let device = server.device("app", "d").await;
        assert_eq!(conditions(&device), [("InSync".to_string(), "True".to_string())]);
        server.stop().await;
    }
}
