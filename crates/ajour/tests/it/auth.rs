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
        assert!(text.contains("does not name 'd'"), "{text}");
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
    // The three writes (application, two devices) are announced to this instance a moment
    // later, each dropping what is cached: wait for them, so that what is cached next stays.
    eventually(
        Duration::from_secs(10),
        "the registry's announcements",
        || async { server.service().registry_changes_followed() >= 3 },
    )
    .await;
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
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
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

#[tokio::test]
async fn a_changed_or_removed_password_is_refused_at_once() {
    for backend in BACKENDS {
        // Specs are cached for an hour: only the API's invalidation lets the change through.
        let server = server_with_devices(backend, &["d"]).await;
        assert_eq!(
            server.post_dfu("d@app", "pw", first_status()).await.0,
            StatusCode::OK
        );
        let put = |credentials: serde_json::Value| {
            let body =
                json!({"metadata": {"name": "d"}, "spec": {"authentication": {"credentials": credentials}}});
            server.api_send(Method::PUT, "apps/app/devices/d", Some(body))
        };
        assert_eq!(put(json!([{"pass": "new-pw"}])).await.0, StatusCode::NO_CONTENT);
        assert_eq!(
            server.post_dfu("d@app", "pw", first_status()).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            server.post_dfu("d@app", "new-pw", first_status()).await.0,
            StatusCode::OK
        );
        assert_eq!(put(json!([])).await.0, StatusCode::NO_CONTENT);
        assert_eq!(
            server.post_dfu("d@app", "new-pw", first_status()).await.0,
            StatusCode::FORBIDDEN,
            "{backend:?}"
        );
        // An empty password is no credential: refused, and the stored ones stay.
        let (status, body) = put(json!([{"pass": ""}])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("empty password"),
            "{body}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_device_logs_in_with_its_unique_user_name() {
    for backend in BACKENDS {
        let server = server_with_devices(backend, &[]).await;
        let body = json!({"metadata": {"name": "sensor-17"}, "spec": {"authentication": {"credentials": [
            {"user": {"username": "alice", "password": "wonderland", "unique": true}}]}}});
        let (status, body) = server
            .api_send(Method::POST, "apps/app/devices", Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, _, command) = server.post_dfu("alice@app", "wonderland", first_status()).await;
        assert_eq!(status, StatusCode::OK, "{backend:?}");
        assert!(matches!(decode_command(&command).unwrap(), Command::Write { .. }));
        // What it reported is the device's status.
        server.service().settle_status_writes().await;
        let firmware = server
            .firmware("app", "sensor-17")
            .await
            .expect("a status for sensor-17");
        assert_eq!(firmware.current, "1.0.0");
        assert_eq!(
            server.post_dfu("alice@app", "nope", first_status()).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            server
                .post_dfu("sensor-17@app", "wonderland", first_status())
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        server.stop().await;
    }
}

/// Device passwords through the binary as a user registers them: generated by `device create`
/// (printed once) or given to the API in plain text. The device updates with its password, and the
/// SQLite files hold neither the passwords nor an unkeyed hash of them.
#[tokio::test]
async fn passwords_leave_no_trace_a_database_copy_could_be_guessed_against() {
    use base64::Engine;
    use sha2::{Digest, Sha256, Sha512};
    let serve = ServeProcess::start(Backend::Sqlite, &[], &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let firmware = dir.path().join("fw.bin");
    std::fs::write(&firmware, firmware_bytes(5_000, 3)).unwrap();
    succeeded(serve.cli(&[
        "firmware",
        "add",
        "fw",
        "--version",
        "0.2.0",
        "--file",
        firmware.to_str().unwrap(),
    ]));
    succeeded(serve.cli(&["app", "create", "my-app", "--firmware-file", "fw"]));
    let created = succeeded(serve.cli(&["device", "create", "my-app", "gen", "--count", "2"]));
    let generated: Vec<(String, String)> = created
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(login, _)| login.ends_with("@my-app"))
        .map(|(login, secret)| (login.to_string(), secret.to_string()))
        .collect();
    assert_eq!(generated.len(), 2, "{created}");
    assert!(
        generated.iter().all(|(_, secret)| secret.len() >= 32),
        "{generated:?}"
    );
    assert_ne!(generated[0].1, generated[1].1);
    let body = json!({"metadata": {"name": "given"}, "spec": {"authentication": {"credentials": [{"pass": "hey-rodney"}]}}});
    assert_eq!(
        serve
            .api_send(Method::POST, "apps/my-app/devices", Some(body))
            .await
            .0,
        StatusCode::CREATED
    );

    let simulated = succeeded(serve.cli(&[
        "simulate",
        "--app",
        "my-app",
        "--device",
        "gen-1",
        "--password",
        &generated[1].1,
        "--version",
        "0.1.0",
    ]));
    assert!(simulated.contains("updated 0.1.0 -> 0.2.0"), "{simulated}");

    let mut stored = Vec::new();
    for entry in std::fs::read_dir(serve.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("ajour.db")
        {
            stored.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(stored.len() > 4096, "the database files were found");
    let b64 = base64::engine::general_purpose::STANDARD;
    let contains = |needle: &[u8]| stored.windows(needle.len()).any(|w| w == needle);
    let mut secrets: Vec<String> = generated.into_iter().map(|(_, s)| s).collect();
    secrets.push("hey-rodney".into());
    for secret in &secrets {
        let sha256 = Sha256::digest(secret.as_bytes());
        let sha512 = Sha512::digest(secret.as_bytes());
        for trace in [
            secret.as_bytes().to_vec(),
            hex::encode(sha256).into_bytes(),
            b64.encode(sha256).into_bytes(),
            hex::encode(sha512).into_bytes(),
            b64.encode(sha512).into_bytes(),
        ] {
            assert!(
                !contains(&trace),
                "{secret}: {} is in the database",
                String::from_utf8_lossy(&trace)
            );
        }
    }
    assert!(
        !contains(b"$2b$") && !contains(b"$2y$") && !contains(b"$6$"),
        "no slow hash stored either"
    );
    assert!(contains(b"\"keyed\""), "the verifiers are there");
}

#[tokio::test]
async fn a_server_on_postgresql_without_a_credential_secret_refuses_to_start() {
    let database = ajour_testkit::TestDatabase::create().await;
    let data = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(AJOUR)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database.url(),
            "--data-dir",
        ])
        .arg(data.path())
        .output()
        .unwrap();
    let message = failed(output);
    assert!(message.contains("no credential secret"), "{message}");
    assert!(message.contains("--credential-secret-file"), "{message}");
}
