//! Who the device endpoint serves: no device on another's behalf, no device once deleted (however
//! recently it was recognised), and no guess when the registry cannot say.

use crate::support::*;
use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

fn first_status() -> Vec<u8> {
    encode_status(&Status::first(b"1.0.0".to_vec(), None, None), Encoding::Packed)
}

/// A server whose cached specs and credentials would be reused for an hour, with application
/// `app` (firmware `fw` 2.0.0) and devices `names`, password `pw`.
async fn server_with_devices(backend: Backend, names: &[&str]) -> TestServer {
    let server =
        TestServer::start_with(backend, |c| c.service.spec_cache_ttl = Duration::from_secs(3600)).await;
    server.add_firmware("fw", "2.0.0", &firmware_bytes(1000, 1));
    server
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    for name in names {
        server.create_device("app", name, "pw", None).await;
    }
    server
}

#[tokio::test]
async fn publishing_as_another_device_is_refused() {
    for backend in BACKENDS {
        let server = server_with_devices(backend, &["d", "other"]).await;
        let response = server
            .http
            .post(format!("{}/v1/dfu?as=other", server.url))
            .basic_auth("d@app", Some("pw"))
            .body(first_status())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{backend:?}");
        let text = response.text().await.unwrap();
        assert!(text.contains("(as=) is not supported"), "{text}");
        // Refused before anything was done for either device.
        server.service().settle_status_writes().await;
        assert_eq!(server.firmware("app", "other").await, None, "{backend:?}");
        assert_eq!(server.firmware("app", "d").await, None, "{backend:?}");
        // The same request as itself is served.
        let (status, _, _) = server.post_dfu("d@app", "pw", first_status()).await;
        assert_eq!(status, StatusCode::OK);
        server.stop().await;
    }
}

#[tokio::test]
async fn a_deleted_device_is_refused_on_its_very_next_status() {
    for backend in BACKENDS {
        let server = server_with_devices(backend, &["d", "e"]).await;
        for device in ["d@app", "e@app"] {
            let (status, _, body) = server.post_dfu(device, "pw", first_status()).await;
            assert_eq!(status, StatusCode::OK, "{backend:?} {device}");
            assert!(matches!(
                decode_command(&body).unwrap(),
                Command::Write { offset: 0, .. }
            ));
        }
        // Its spec and credentials are cached for an hour; deleting it through the API forgets them.
        let (status, _) = server.api_send(Method::DELETE, "apps/app/devices/d", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _, _) = server.post_dfu("d@app", "pw", first_status()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{backend:?}: deleted device");
        // Its neighbour is untouched, until their application is deleted.
        let (status, _, _) = server.post_dfu("e@app", "pw", first_status()).await;
        assert_eq!(status, StatusCode::OK, "{backend:?}");
        let (status, _) = server.api_send(Method::DELETE, "apps/app", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _, _) = server.post_dfu("e@app", "pw", first_status()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{backend:?}: deleted application");
        server.stop().await;
    }
}

/// PostgreSQL only: a database can be made unreachable under a running server (a SQLite file
/// cannot be taken away from a process that has it open).
#[tokio::test]
async fn a_device_not_yet_authenticated_gets_503_while_the_database_is_unreachable() {
    let server = server_with_devices(Backend::Postgres, &["known", "new"]).await;
    let (status, _, _) = server.post_dfu("known@app", "pw", first_status()).await;
    assert_eq!(status, StatusCode::OK);
    server.service().settle_status_writes().await;

    server.database().unwrap().refuse_connections().await;
    // Not recognised yet: the registry cannot say whether its password is right.
    let (status, _, _) = server.post_dfu("new@app", "pw", first_status()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Nor whether it is wrong: unavailable, not "denied".
    let (status, _, _) = server.post_dfu("new@app", "wrong", first_status()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Recognised a moment ago, its spec cached: served from memory meanwhile.
    let (status, _, body) = server.post_dfu("known@app", "pw", first_status()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(matches!(
        decode_command(&body).unwrap(),
        Command::Write { offset: 0, .. }
    ));
    assert_eq!(
        server.get("readyz").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    server.stop().await;
}
