//! The `ajour` binary as a user runs it: `serve` on port 0, then the CLI and the simulator.

use crate::support::*;
use ajour_protocol::{encode_status, Encoding, Status};
use reqwest::{Method, StatusCode};

#[tokio::test]
async fn quick_start_from_the_readme() {
    for backend in BACKENDS {
        let serve = ServeProcess::start(backend, &[], &[]).await;
        let data = serve.data_dir();
        // The server prints the token it generated (once), then the address it bound.
        assert!(
            serve.printed.iter().any(|l| l.contains(&serve.token)),
            "the generated token is printed once: {:?}",
            serve.printed
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(ajour::server::token_path(&data))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o777,
                0o600,
                "the token file is readable only by its owner"
            );
        }

        let dir = tempfile::tempdir().unwrap();
        let firmware = dir.path().join("fw.bin");
        std::fs::write(&firmware, firmware_bytes(20_000, 8)).unwrap();
        let firmware = firmware.to_str().unwrap();
        succeeded(serve.cli(&[
            "firmware",
            "add",
            "my-fw",
            "--version",
            "0.2.0",
            "--file",
            firmware,
        ]));
        succeeded(serve.cli(&["app", "create", "my-app", "--firmware-file", "my-fw"]));
        succeeded(serve.cli(&["device", "create", "my-app", "dev", "--password", "hey-rodney"]));
        let simulate = |password: &str| {
            serve.cli(&[
                "simulate",
                "--app",
                "my-app",
                "--device",
                "dev",
                "--password",
                password,
                "--version",
                "0.1.0",
            ])
        };
        let simulated = succeeded(simulate("hey-rodney"));
        assert!(simulated.contains("updated 0.1.0 -> 0.2.0"), "{simulated}");
        let status = succeeded(serve.cli(&["device", "status", "my-app", "dev"]));
        assert!(
            status.contains("current: 0.2.0") && status.contains("in sync"),
            "{status}"
        );
        let listed = succeeded(serve.cli(&["app", "list"]));
        assert!(listed.contains("my-app\tfile my-fw"), "{listed}");

        // A device's own firmware overrides its application's, and can be cleared again.
        succeeded(serve.cli(&[
            "device",
            "set-firmware",
            "my-app",
            "dev",
            "--firmware-image",
            "fw/special:1",
        ]));
        let get_device = || -> serde_json::Value {
            serde_json::from_str(&succeeded(serve.cli(&["device", "get", "my-app", "dev"]))).unwrap()
        };
        let device = get_device();
        assert_eq!(device["spec"]["firmware"]["container"]["image"], "fw/special:1");
        assert!(
            device["spec"]["authentication"].is_object(),
            "the rest of the spec is kept: {device}"
        );
        succeeded(serve.cli(&["device", "set-firmware", "my-app", "dev"]));
        let device = get_device();
        assert!(device["spec"].get("firmware").is_none(), "{device}");
        succeeded(serve.cli(&["app", "set-firmware", "my-app", "--firmware-file", "other-fw"]));
        let app: serde_json::Value =
            serde_json::from_str(&succeeded(serve.cli(&["app", "get", "my-app"]))).unwrap();
        assert_eq!(app["spec"]["firmware"]["file"]["name"], "other-fw");

        // Failures exit non-zero, saying why.
        let wrong = failed(simulate("nope"));
        assert!(wrong.contains("403"), "{wrong}");
        let hostile = failed(serve.cli(&[
            "firmware",
            "add",
            "../../etc/passwd",
            "--version",
            "1",
            "--file",
            firmware,
        ]));
        assert!(hostile.contains("invalid firmware name"), "{hostile}");
        // The server is up: it is the missing token that fails this one.
        let elsewhere = dir.path().join("elsewhere");
        let no_token = failed(cli_with(&elsewhere, &serve.url, &["app", "list"]));
        assert!(
            no_token.contains("no --token given and none readable at"),
            "{no_token}"
        );
    }
}

#[tokio::test]
async fn devices_created_by_count_and_deleted_through_the_cli() {
    for backend in BACKENDS {
        let serve = ServeProcess::start(backend, &[], &[]).await;
        succeeded(serve.cli(&["app", "create", "fleet"]));
        let created = succeeded(serve.cli(&[
            "device",
            "create",
            "fleet",
            "sim",
            "--password",
            "pw",
            "--count",
            "3",
        ]));
        assert!(
            created.contains("3 device(s) created in application 'fleet'"),
            "{created}"
        );
        let names = || async {
            let (status, devices) = serve.api_send(Method::GET, "apps/fleet/devices", None).await;
            assert_eq!(status, StatusCode::OK);
            let mut names: Vec<String> = devices
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names().await, ["sim-0", "sim-1", "sim-2"], "{backend:?}");
        // Each with the password given.
        let status = encode_status(&Status::first(b"1.0.0".to_vec(), None, None), Encoding::Packed);
        let answer = |user: String, password: &'static str| {
            let status = status.clone();
            let serve = &serve;
            async move { serve.post_dfu(&user, password, status).await.0 }
        };
        for i in 0..3 {
            assert_eq!(answer(format!("sim-{i}@fleet"), "pw").await, StatusCode::OK);
            assert_eq!(
                answer(format!("sim-{i}@fleet"), "nope").await,
                StatusCode::FORBIDDEN
            );
        }

        let deleted = succeeded(serve.cli(&["device", "delete", "fleet", "sim-1"]));
        assert!(deleted.contains("device 'sim-1' deleted"), "{deleted}");
        assert_eq!(names().await, ["sim-0", "sim-2"], "{backend:?}");
        assert_eq!(answer("sim-1@fleet".into(), "pw").await, StatusCode::FORBIDDEN);
        let again = failed(serve.cli(&["device", "delete", "fleet", "sim-1"]));
        assert!(again.contains("404"), "{again}");

        let deleted = succeeded(serve.cli(&["app", "delete", "fleet"]));
        assert!(deleted.contains("application 'fleet' deleted"), "{deleted}");
        for path in ["apps/fleet", "apps/fleet/devices/sim-0"] {
            let (status, _) = serve.api_send(Method::GET, path, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{backend:?} {path}");
        }
        assert_eq!(answer("sim-0@fleet".into(), "pw").await, StatusCode::FORBIDDEN);
        let again = failed(serve.cli(&["app", "delete", "fleet"]));
        assert!(again.contains("404"), "{again}");
    }
}
