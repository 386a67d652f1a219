//! Firmware from a real OCI registry (Debian's `docker-registry`, on a free port, see
//! `ajour_testkit::oci_registry`), end to end: `ajour firmware push` and `inspect` read back by
//! `skopeo`; devices (the one simulator, which checks every block's offset and the Swap's
//! checksum) updated through the server from images in the registry, while tags move, images are
//! bad, and the registry goes down. `OciStore` itself is tested in `crates/ajour-store/tests/oci.rs`.

use crate::support::*;
use ajour_sim::{Outcome, Transport};
use ajour_store::oci::layout::{LABEL_CHECKSUM, LABEL_SIZE, LABEL_VERSION};
use ajour_store::{OciAuth, OciConfig, OciStore, SameVersion};
use ajour_testkit::oci_registry::{sha256_digest, skopeo_inspect, skopeo_raw_manifest};
use ajour_testkit::OciRegistry;
use ajour_types::{FirmwareState, FirmwareStatus};
use embedded_update::{Command as DeviceCommand, Status as DeviceStatus};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// Push firmware to the registry (setting up, as `ajour firmware push` does).
async fn push(registry: &OciRegistry, auth: OciAuth, image: &str, version: &str, data: &[u8]) {
    OciStore::new(OciConfig {
        auth,
        ..oci_config(registry)
    })
    .unwrap()
    .push(image, version, data, SameVersion::Refuse, Arc::new(|_| {}))
    .await
    .unwrap();
}

async fn serve(backend: Backend, registry: &OciRegistry) -> TestServer {
    let config = oci_config(registry);
    TestServer::start_with(backend, move |c| c.oci = Some(config)).await
}

fn container(image: &str, policy: &str) -> Value {
    json!({"container": {"image": image, "imagePullPolicy": policy}})
}

/// `ajour firmware ARGS` against the registry, over plain HTTP.
fn firmware_command(registry: &OciRegistry, args: &[&str]) -> std::process::Output {
    Command::new(AJOUR)
        .arg("firmware")
        .args(args)
        .args(["--oci-plain-http", "--oci-registry"])
        .arg(format!("{}/fw/", registry.host()))
        .output()
        .unwrap()
}

/// The device updated to `version` and holds exactly `image`.
fn assert_updated(updated: &(Outcome, ajour_sim::SimulatedDevice), from: &str, version: &str, image: &[u8]) {
    let (outcome, device) = updated;
    assert_eq!(
        outcome,
        &Outcome::Updated {
            from: from.into(),
            to: version.into(),
            bytes: image.len()
        }
    );
    assert_eq!(device.written(), image, "the device holds exactly the image");
}

#[tokio::test]
async fn pushed_firmware_is_readable_by_skopeo_by_the_original_layout_and_by_inspect() {
    let registry = OciRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let image = firmware_bytes(300_000, 9);
    let file = dir.path().join("fw.bin");
    std::fs::write(&file, &image).unwrap();
    let push = || {
        let output = firmware_command(
            &registry,
            &[
                "push",
                "demo:1.4.2",
                "--version",
                "1.4.2",
                "--file",
                file.to_str().unwrap(),
            ],
        );
        let stdout = succeeded(output);
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("digest: "))
            .expect("push prints the digest")
            .to_string()
    };
    let digest = push();

    // skopeo reads the manifest (the very bytes the digest names) and the config's labels.
    let reference = format!("{}/fw/demo:1.4.2", registry.host());
    assert_eq!(sha256_digest(&skopeo_raw_manifest(&reference, None)), digest);
    let raw = skopeo_inspect(&reference, true, None);
    assert_eq!(raw["layers"].as_array().unwrap().len(), 1);
    assert_eq!(
        raw["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(raw["annotations"][LABEL_VERSION], "1.4.2");
    let summary = skopeo_inspect(&reference, false, None);
    assert_eq!(summary["Digest"], digest.as_str(), "{summary}");
    assert_eq!(summary["Labels"][LABEL_VERSION], "1.4.2");
    assert_eq!(summary["Labels"][LABEL_SIZE], "300000");
    assert_eq!(
        summary["Labels"][LABEL_CHECKSUM],
        hex::encode(Sha256::digest(&image))
    );

    // What the original Ajour reads: firmware.json and firmware.bin at the root of the layer,
    // copied out by skopeo into a layout of its own.
    let copy = tempfile::tempdir().unwrap();
    let output = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:x", copy.path().display()))
        .output()
        .unwrap();
    succeeded(output);
    let layer_digest = raw["layers"][0]["digest"].as_str().unwrap();
    let layer = std::fs::read(
        copy.path()
            .join("blobs/sha256")
            .join(layer_digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&layer[..]));
    let mut files = std::collections::BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        files.insert(name, data);
    }
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["firmware.bin", "firmware.json"]
    );
    assert_eq!(files["firmware.bin"], image);
    let metadata: Value = serde_json::from_slice(&files["firmware.json"]).unwrap();
    assert_eq!(
        metadata,
        json!({"version": "1.4.2", "size": 300000, "checksum": hex::encode(Sha256::digest(&image))})
    );

    // `ajour firmware inspect` shows what would be served.
    let inspected: Value = serde_json::from_str(&succeeded(firmware_command(
        &registry,
        &["inspect", "demo:1.4.2"],
    )))
    .unwrap();
    assert_eq!(inspected["digest"], digest.as_str());
    assert_eq!(inspected["version"], "1.4.2");
    assert_eq!(inspected["size"], 300000);
    assert_eq!(inspected["checksum"], hex::encode(Sha256::digest(&image)));

    // Pushing the same firmware and version again gives the same image.
    assert_eq!(push(), digest);

    // A missing image is an error, not a crash.
    let missing = failed(firmware_command(&registry, &["inspect", "nope:1"]));
    assert!(missing.contains("not found"), "{missing}");
}

#[tokio::test]
async fn a_device_is_updated_from_the_registry_and_again_when_the_tag_is_re_pushed() {
    let registry = OciRegistry::start().await;
    let first = firmware_bytes(4000, 7);
    let second = firmware_bytes(4500, 8);
    for backend in BACKENDS {
        // Each backend starts from 1.0.0 under the tag.
        push(&registry, OciAuth::Anonymous, "app:latest", "1.0.0", &first).await;
        let server = serve(backend, &registry).await;
        server
            .create_app("app", Some(container("app:latest", "Always")))
            .await;
        server.create_device("app", "d", "pw", None).await;
        let updated = update_over_http(&server, "app", "d", "0.9.0", Some(512)).await;
        assert_updated(&updated, "0.9.0", "1.0.0", &first);
        server.service().settle_status_writes().await;
        let shown = server.firmware("app", "d").await;
        assert!(in_sync(&shown, "1.0.0"), "{backend:?}: {shown:?}");

        // The tag moves to 1.1.0: under Always, the server notices within its recheck interval.
        push(&registry, OciAuth::Anonymous, "app:latest", "1.1.0", &second).await;
        let on_1_0_0 =
            serde_cbor::ser::to_vec_packed(&DeviceStatus::first(b"1.0.0", Some(512), None)).unwrap();
        eventually(
            Duration::from_secs(20),
            "the re-pushed tag offered to the device",
            || async {
                let (code, _, body) = server.post_dfu("d@app", "pw", on_1_0_0.clone()).await;
                assert_eq!(code, 200);
                match serde_cbor::from_slice::<DeviceCommand>(&body).unwrap() {
                    DeviceCommand::Sync { .. } => false,
                    DeviceCommand::Write {
                        version, offset: 0, ..
                    } => {
                        assert_eq!(&version[..], b"1.1.0");
                        true
                    }
                    other => panic!("unexpected {other:?}"),
                }
            },
        )
        .await;
        let updated = update_over_http(&server, "app", "d", "1.0.0", Some(512)).await;
        assert_updated(&updated, "1.0.0", "1.1.0", &second);

        // Under IfNotPresent the tag is resolved once: a device on another spec keeps 1.1.0 after
        // the tag moves again.
        server
            .create_device(
                "app",
                "pinned",
                "pw",
                Some(container("app:latest", "IfNotPresent")),
            )
            .await;
        let (outcome, _) = update_over_http(&server, "app", "pinned", "0", Some(512)).await;
        assert!(matches!(outcome, Outcome::Updated { to, .. } if to == "1.1.0"));
        push(
            &registry,
            OciAuth::Anonymous,
            "app:latest",
            "1.2.0",
            &firmware_bytes(10, 1),
        )
        .await;
        let heads = registry.count_requests("HEAD", "/manifests/latest");
        for _ in 0..20 {
            let (outcome, _) = update_over_http(&server, "app", "pinned", "1.1.0", Some(512)).await;
            assert_eq!(
                outcome,
                Outcome::InSync {
                    version: "1.1.0".into()
                }
            );
        }
        assert_eq!(
            registry.count_requests("HEAD", "/manifests/latest"),
            heads,
            "IfNotPresent never re-resolves"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_device_whose_image_cannot_be_served_waits_and_its_status_says_why() {
    let registry = OciRegistry::start().await;
    let good = firmware_bytes(3000, 6);
    push(&registry, OciAuth::Anonymous, "tampered:2.0.0", "2.0.0", &good).await;
    // The registry serves other bytes than the layer's digest names: same length, one flipped.
    let manifest = skopeo_inspect(&format!("{}/fw/tampered:2.0.0", registry.host()), true, None);
    let layer = registry.blob_path(manifest["layers"][0]["digest"].as_str().unwrap());
    let mut evil = std::fs::read(&layer).unwrap();
    evil[100] ^= 0xff;
    std::fs::write(&layer, &evil).unwrap();
    for backend in BACKENDS {
        let server = serve(backend, &registry).await;
        server.create_app("app", None).await;
        for (name, image, reason) in [
            ("tampered", "tampered:2.0.0", "digest mismatch"),
            ("missing", "nothing-here:1", "not found"),
            ("hostile", "../../etc/passwd", "invalid image reference"),
        ] {
            server
                .create_device("app", name, "pw", Some(container(image, "IfNotPresent")))
                .await;
            let status =
                serde_cbor::ser::to_vec_packed(&DeviceStatus::first(b"0.1", Some(512), None)).unwrap();
            let (code, _, body) = server.post_dfu(&format!("{name}@app"), "pw", status).await;
            assert_eq!(code, 200);
            assert!(
                matches!(
                    serde_cbor::from_slice::<DeviceCommand>(&body).unwrap(),
                    DeviceCommand::Wait { poll: Some(7), .. }
                ),
                "{backend:?} {name}"
            );
            match server.firmware("app", name).await {
                Some(FirmwareStatus {
                    state: FirmwareState::Error { reason: why },
                    ..
                }) => assert!(why.contains(reason), "{backend:?} {name}: {why}"),
                other => panic!("{backend:?} {name}: {other:?}"),
            }
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn with_the_registry_down_mid_fleet_devices_wait_and_all_finish_correctly_once_it_is_back() {
    let mut registry = OciRegistry::start().await;
    let image_a = firmware_bytes(30_000, 10);
    let image_b = firmware_bytes(25_000, 11);
    push(&registry, OciAuth::Anonymous, "a:1", "2.0.0-a", &image_a).await;
    push(&registry, OciAuth::Anonymous, "b:1", "2.0.0-b", &image_b).await;
    for backend in BACKENDS {
        let server = serve(backend, &registry).await;
        server.create_app("fleet", None).await;
        // Two fleets of four: a (under Always) and b (under IfNotPresent).
        let fleet_of = |prefix: &str| {
            let mut simulation = fleet(
                "fleet",
                4,
                Transport::Http {
                    urls: vec![server.url.clone()],
                },
            );
            simulation.devices = (0..4).map(|i| format!("{prefix}{i}")).collect();
            simulation.mtu = Some(300);
            simulation
        };
        let (fleet_a, fleet_b) = (fleet_of("a"), fleet_of("b"));
        for (simulation, image, policy) in [(&fleet_a, "a:1", "Always"), (&fleet_b, "b:1", "IfNotPresent")] {
            for name in &simulation.devices {
                server
                    .create_device("fleet", name, "pw", Some(container(image, policy)))
                    .await;
            }
        }
        let first = |name: &str| {
            let status =
                serde_cbor::ser::to_vec_packed(&DeviceStatus::first(b"1.0.0", Some(300), None)).unwrap();
            let server = &server;
            let user = format!("{name}@fleet");
            async move {
                let (code, _, body) = server.post_dfu(&user, "pw", status).await;
                assert_eq!(code, 200);
                match serde_cbor::from_slice::<DeviceCommand>(&body).unwrap() {
                    DeviceCommand::Write { .. } => "write",
                    DeviceCommand::Swap { .. } => "swap",
                    DeviceCommand::Sync { .. } => "sync",
                    DeviceCommand::Wait { .. } => "wait",
                }
            }
        };
        // Fleet a is mid-update (its image loaded) when the registry goes down.
        for name in &fleet_a.devices {
            assert_eq!(first(name).await, "write", "{backend:?} {name}");
        }
        registry.stop().await;

        // Fleet b cannot get its image: it waits, and its status says why.
        for name in &fleet_b.devices {
            assert_eq!(first(name).await, "wait", "{backend:?} {name}");
        }
        match server.firmware("fleet", "b0").await {
            Some(FirmwareStatus {
                state: FirmwareState::Error { reason },
                ..
            }) => assert!(reason.contains("unavailable"), "{reason}"),
            other => panic!("{other:?}"),
        }

        // Everyone plays on while the registry is down; it comes back once fleet a is done (from
        // the cache: under Always, a failed re-check keeps serving what the tag pointed to).
        let registry = &mut registry;
        let (done_a, done_b) = tokio::join!(
            async move {
                let done = simulate(&fleet_a).await;
                registry.restart().await;
                done
            },
            simulate(&fleet_b)
        );
        assert_all_updated(&done_a, "2.0.0-a", image_a.len());
        assert_all_updated(&done_b, "2.0.0-b", image_b.len());
        server.stop().await;
    }
}

#[tokio::test]
async fn ajour_serve_with_the_oci_flags_updates_a_fleet_downloading_each_blob_once() {
    let registry = OciRegistry::start_with_auth("ci", "pass-word").await;
    let image = firmware_bytes(20_000, 16);
    let auth = OciAuth::Basic {
        username: "ci".into(),
        password: "pass-word".into(),
    };
    push(&registry, auth.clone(), "served:2.0.0", "2.0.0", &image).await;
    // A second tag of the very same image.
    push(&registry, auth, "served:stable", "2.0.0", &image).await;
    let manifest = skopeo_inspect(
        &format!("{}/fw/served:2.0.0", registry.host()),
        true,
        registry.credentials(),
    );
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let prefix = format!("{}/fw/", registry.host());
    for backend in BACKENDS {
        let downloads_before = registry.count_requests("GET", &format!("/blobs/{layer}"));
        let serve = ServeProcess::start(
            backend,
            &["--oci-registry", &prefix, "--oci-plain-http", "--oci-user", "ci"],
            &[("AJOUR_OCI_PASSWORD", "pass-word")],
        )
        .await;
        serve
            .create_app("fleet", Some(container("served:2.0.0", "IfNotPresent")))
            .await;
        // Half the fleet on the other tag, re-checked.
        let mut simulation = fleet(
            "fleet",
            12,
            Transport::Http {
                urls: vec![serve.url.clone()],
            },
        );
        simulation.mtu = Some(256);
        for (i, name) in simulation.devices.iter().enumerate() {
            let spec = (i % 2 == 1).then(|| container("served:stable", "Always"));
            serve.create_device("fleet", name, "pw", spec).await;
        }
        assert_all_updated(&simulate(&simulation).await, "2.0.0", image.len());

        // 12 devices x 79 blocks, two tags: one download of the layer.
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{layer}")) - downloads_before,
            1,
            "{backend:?}"
        );
        // This server's own metrics: each tag loaded once (a miss), every other status served
        // from memory; one blob fetched from the registry.
        let metrics = serve.metrics().await;
        let cache = |result| {
            metrics.value(
                "ajour_firmware_cache_total",
                &[("source", "oci"), ("result", result)],
            )
        };
        assert_eq!(cache("miss"), 2.0, "{backend:?}:\n{metrics}");
        assert_eq!(
            cache("miss") + cache("hit") + cache("stale"),
            metrics.value("ajour_statuses_received_total", &[]),
            "{backend:?}: one fetch per status:\n{metrics}"
        );
        assert_eq!(
            metrics.value(
                "ajour_oci_registry_requests_total",
                &[("kind", "blob"), ("result", "ok")]
            ),
            1.0,
            "{backend:?}:\n{metrics}"
        );
    }
}
