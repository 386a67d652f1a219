//! `status.firmware` is kept current without a database write per block.

use crate::support::*;
use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
use ajour_types::FirmwareState;
use serde_json::json;
use std::time::Duration;

async fn step(server: &TestServer, status: &Status) -> Vec<u8> {
    let (code, _, body) = server
        .post_dfu("d@app", "pw", encode_status(status, Encoding::Packed))
        .await;
    assert_eq!(code, 200);
    body
}

/// A server with a device `d@app` to be updated to `fw` 2.0.0 (`size` bytes), progress written
/// at most once per `progress_interval`.
async fn server_updating(backend: Backend, size: usize, progress_interval: Duration) -> TestServer {
    let config = |c: &mut ajour::server::ServerConfig| c.service.progress_interval = progress_interval;
    let server = TestServer::start_with(backend, config).await;
    server.add_firmware("fw", "2.0.0", &firmware_bytes(size, 3));
    server
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    server.create_device("app", "d", "pw", None).await;
    server
}

/// The API shows device `d` half-way from 1.0.0 to 2.0.0.
async fn assert_half_way(server: &TestServer) {
    let shown = server.firmware("app", "d").await.expect("a status");
    assert_eq!(
        (shown.current.as_str(), shown.target.as_str(), shown.state),
        ("1.0.0", "2.0.0", FirmwareState::Updating { percent: 50.0 })
    );
}

#[tokio::test]
async fn progress_is_coalesced_visible_and_flushed() {
    for backend in BACKENDS {
        let mut server = server_updating(backend, 64 * 1024, Duration::from_secs(3600)).await;
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
        assert_eq!(server.service().status_writes(), 1, "{backend:?}");
        // ... yet the API shows the latest progress.
        assert_half_way(&server).await;

        // Shutting down writes what is pending; the server started again on the same data sees it.
        server.shut_down().await;
        server.start_again().await;
        assert_eq!(server.service().status_writes(), 0, "a server of its own");
        assert_half_way(&server).await;
        server.stop().await;
    }
}

#[tokio::test]
async fn a_whole_update_costs_a_handful_of_writes_whatever_the_image_size() {
    // A write starts an update and one ends it. Progress is written when the interval has passed
    // and it moved 20 points since the last write; each status is let to finish its write before
    // the next is sent, so the count is exact.
    for (size, interval, expected) in [
        // Within an hour: the two phase changes, no progress at all.
        (4 * 1024, 3600, 2),
        (64 * 1024, 3600, 2),
        // No interval: 8 blocks of 12.5%: started at 12.5, progress at 37.5, 62.5 and 87.5.
        (4 * 1024, 0, 5),
        // 128 blocks: started at 0.8, progress at 21.1, 41.4, 61.7 and 82.0; 100 is not 20 more.
        (64 * 1024, 0, 6),
    ] {
        for backend in BACKENDS {
            let server = server_updating(backend, size, Duration::from_secs(interval)).await;
            let mut status = Status::first(b"1.0.0".to_vec(), Some(512), None);
            loop {
                let command = step(&server, &status).await;
                server.service().settle_status_writes().await;
                match decode_command(&command).unwrap() {
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
            assert_eq!(
                server.service().status_writes(),
                expected,
                "{backend:?}: {size} bytes, interval {interval} s"
            );
            let firmware = server.firmware("app", "d").await.unwrap();
            assert_eq!(firmware.state, FirmwareState::InSync, "{backend:?}");
            server.stop().await;
        }
    }
}
