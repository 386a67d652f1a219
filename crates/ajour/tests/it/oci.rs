//! Firmware from a real OCI registry (Debian's `docker-registry`, on a free port, see
//! `ajour_testkit::oci_registry`). Images are pushed by `ajour firmware push` and read back by
//! `skopeo`, and made by `skopeo copy` from OCI layouts built here byte by byte, in each of the
//! three layouts. Devices follow embedded-update's rules and check what they were sent: blocks at
//! exactly the offset they reported, and a Swap checksum that matches the bytes they hold.

use crate::support::*;
use ajour_store::oci::layout::{LABEL_CHECKSUM, LABEL_SIZE, LABEL_VERSION};
use ajour_store::{FetchError, FirmwareSource, FirmwareSpec, ImagePullPolicy, OciAuth, OciConfig, OciStore};
use ajour_testkit::oci_registry::{sha256_digest, skopeo_inspect, LayoutBlob, RegistryOptions};
use ajour_testkit::{OciLayout, OciRegistry};
use embedded_update::{Command as DeviceCommand, Status as DeviceStatus};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");
const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
const IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

fn oci_config(registry: &OciRegistry) -> OciConfig {
    OciConfig {
        registry_prefix: format!("{}/fw/", registry.host()),
        plain_http: true,
        always_recheck: Duration::from_millis(200),
        error_retry: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        ..OciConfig::default()
    }
}

fn store_with_auth(registry: &OciRegistry, auth: OciAuth) -> OciStore {
    OciStore::new(OciConfig {
        auth,
        ..oci_config(registry)
    })
    .unwrap()
}

fn store(registry: &OciRegistry) -> OciStore {
    OciStore::new(oci_config(registry)).unwrap()
}

async fn push(store: &OciStore, image: &str, version: &str, data: &[u8]) -> String {
    store
        .push(image, version, data, Arc::new(|_| {}))
        .await
        .unwrap()
        .manifest_digest
}

async fn serve(registry: &OciRegistry) -> TestServer {
    let config = oci_config(registry);
    TestServer::start_with(Backend::Sqlite, move |c| c.oci = Some(config)).await
}

fn container(image: &str, policy: &str) -> Value {
    json!({"container": {"image": image, "imagePullPolicy": policy}})
}

fn spec(image: &str) -> FirmwareSpec {
    FirmwareSpec::Container {
        image: image.into(),
        pull_policy: ImagePullPolicy::IfNotPresent,
    }
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn metadata_json(version: &str, data: &[u8]) -> Vec<u8> {
    json!({"version": version, "size": data.len(), "checksum": hex::encode(Sha256::digest(data))})
        .to_string()
        .into_bytes()
}

/// A command as the device understood it.
#[derive(Debug)]
enum Received {
    Write {
        version: String,
        offset: u32,
        data: Vec<u8>,
    },
    Swap {
        version: String,
        checksum: Vec<u8>,
    },
    Sync {
        version: String,
    },
    Wait,
}

/// Where a device sends its statuses: a server of this process, or an `ajour serve` child.
trait DfuEndpoint {
    fn http(&self) -> &reqwest::Client;
    fn url(&self) -> &str;
}

impl DfuEndpoint for TestServer {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
    fn url(&self) -> &str {
        &self.url
    }
}

async fn send(server: &impl DfuEndpoint, user: &str, status: &DeviceStatus<'_>) -> Received {
    let response = server
        .http()
        .post(format!("{}/v1/dfu?ct=30", server.url()))
        .basic_auth(user, Some("pw"))
        .header("content-type", "application/cbor")
        .body(serde_cbor::ser::to_vec_packed(status).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "device {user}");
    let bytes = response.bytes().await.unwrap();
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    match serde_cbor::from_slice::<DeviceCommand>(&bytes).expect("the device decodes the command") {
        DeviceCommand::Write {
            version,
            offset,
            data,
            ..
        } => Received::Write {
            version: text(&version),
            offset,
            data: data.to_vec(),
        },
        DeviceCommand::Swap {
            version, checksum, ..
        } => Received::Swap {
            version: text(&version),
            checksum: checksum.to_vec(),
        },
        DeviceCommand::Sync { version, .. } => Received::Sync {
            version: text(&version),
        },
        DeviceCommand::Wait { .. } => Received::Wait,
    }
}

#[derive(Debug)]
struct Finished {
    version: String,
    /// The image the device swapped to last, as it wrote it.
    installed: Vec<u8>,
    waits: usize,
}

/// Play a device from `version` until the server says Sync, waiting (briefly: the test's device
/// polls fast) when told to. Fails on anything a real device would choke on.
async fn play(
    server: &impl DfuEndpoint,
    user: &str,
    version: &str,
    mtu: u32,
    deadline: Duration,
) -> Result<Finished, String> {
    let give_up = Instant::now() + deadline;
    let mut version = version.to_string();
    let mut written: Vec<u8> = Vec::new();
    let mut next: Option<String> = None;
    let mut installed = Vec::new();
    let mut waits = 0;
    loop {
        if Instant::now() > give_up {
            return Err(format!("{user}: not in sync after {deadline:?} ({waits} waits)"));
        }
        let status = match &next {
            None => DeviceStatus::first(version.as_bytes(), Some(mtu), None),
            Some(next) => DeviceStatus::update(
                version.as_bytes(),
                Some(mtu),
                written.len() as u32,
                next.as_bytes(),
                None,
            ),
        };
        match send(server, user, &status).await {
            Received::Write {
                version: target,
                offset,
                data,
            } => {
                if offset == 0 {
                    written.clear();
                    next = Some(target.clone());
                }
                if Some(&target) != next.as_ref() || offset as usize != written.len() {
                    return Err(format!(
                        "{user}: Write of {target} at {offset}, device holds {} bytes of {next:?}",
                        written.len()
                    ));
                }
                written.extend_from_slice(&data);
            }
            Received::Swap {
                version: target,
                checksum,
            } => {
                if checksum != Sha256::digest(&written).to_vec() || Some(&target) != next.as_ref() {
                    return Err(format!(
                        "{user}: Swap to {target} does not match the {} bytes written",
                        written.len()
                    ));
                }
                version = target;
                installed = std::mem::take(&mut written);
                next = None;
            }
            Received::Sync { version: synced } => {
                assert_eq!(synced, version);
                return Ok(Finished {
                    version,
                    installed,
                    waits,
                });
            }
            Received::Wait => {
                waits += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}

/// Poll the device's status until `condition` holds.
async fn wait_for_status(
    server: &TestServer,
    app: &str,
    device: &str,
    condition: impl Fn(&Value) -> bool,
) -> Value {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let status = server.device(app, device).await;
        if condition(&status) {
            return status;
        }
        assert!(Instant::now() < give_up, "status never matched: {status}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn reason(status: &Value) -> String {
    status["status"]["firmware"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["reason"].as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test]
async fn pushed_firmware_is_readable_by_skopeo_by_the_original_layout_and_by_inspect() {
    let registry = OciRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let image = firmware_bytes(300_000, 9);
    std::fs::write(dir.path().join("fw.bin"), &image).unwrap();
    let prefix = format!("{}/fw/", registry.host());
    let output = Command::new(AJOUR)
        .args([
            "firmware",
            "push",
            "demo:1.4.2",
            "--version",
            "1.4.2",
            "--oci-plain-http",
            "--oci-registry",
            &prefix,
        ])
        .arg("--file")
        .arg(dir.path().join("fw.bin"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let digest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("digest: "))
        .expect("push prints the digest")
        .to_string();

    // skopeo reads the manifest and the config's labels.
    let reference = format!("{}/fw/demo:1.4.2", registry.host());
    let raw = skopeo_inspect(&reference, true, None);
    let manifest_bytes = serde_json::to_vec(&raw).unwrap();
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
    assert!(!manifest_bytes.is_empty());

    // What the original Ajour reads: firmware.json and firmware.bin at the root of the layer,
    // copied out by skopeo into a layout of its own.
    let copy = tempfile::tempdir().unwrap();
    let output = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:x", copy.path().display()))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
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
    let output = Command::new(AJOUR)
        .args([
            "firmware",
            "inspect",
            "demo:1.4.2",
            "--oci-plain-http",
            "--oci-registry",
            &prefix,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let inspected: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(inspected["digest"], digest.as_str());
    assert_eq!(inspected["version"], "1.4.2");
    assert_eq!(inspected["size"], 300000);
    assert_eq!(inspected["checksum"], hex::encode(Sha256::digest(&image)));

    // Pushing the same firmware and version again gives the same image.
    let again = push(&store(&registry), "demo:1.4.2", "1.4.2", &image).await;
    assert_eq!(again, digest);

    // A missing image is an error, not a crash.
    let output = Command::new(AJOUR)
        .args([
            "firmware",
            "inspect",
            "nope:1",
            "--oci-plain-http",
            "--oci-registry",
            &prefix,
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not found"));
}

#[tokio::test]
async fn images_made_by_skopeo_are_read_in_every_layout() {
    let registry = OciRegistry::start().await;
    let mut layout = OciLayout::new();
    let no_annotations = Value::Null;
    let empty_config = LayoutBlob {
        media_type: EMPTY_CONFIG,
        data: b"{}",
        annotations: Value::Null,
    };

    // (a) firmware.json + firmware.bin in an uncompressed tar layer.
    let tar_image = firmware_bytes(5000, 1);
    let tar = tar_of(&[
        ("firmware.bin", &tar_image),
        ("firmware.json", &metadata_json("1.0.0", &tar_image)),
    ]);
    layout.image(
        "tar",
        &empty_config,
        &[LayoutBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar",
            data: &tar,
            annotations: Value::Null,
        }],
        no_annotations.clone(),
    );
    // (b) one raw octet-stream layer, as `oras push` writes: the version is the tag.
    let raw_image = firmware_bytes(7000, 2);
    layout.image(
        "3.1.4",
        &empty_config,
        &[LayoutBlob {
            media_type: "application/octet-stream",
            data: &raw_image,
            annotations: json!({"org.opencontainers.image.title": "firmware.bin"}),
        }],
        no_annotations.clone(),
    );
    // (c) labels on the image config, firmware.bin alone in a gzipped layer.
    let labelled_image = firmware_bytes(6000, 3);
    let config = json!({"architecture": "arm", "os": "none", "config": {"Labels": {
        LABEL_VERSION: "2.0.0", LABEL_CHECKSUM: hex::encode(Sha256::digest(&labelled_image))}}})
    .to_string();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gzip, &tar_of(&[("./firmware.bin", &labelled_image)])).unwrap();
    let gzipped = gzip.finish().unwrap();
    layout.image(
        "labels",
        &LayoutBlob {
            media_type: IMAGE_CONFIG,
            data: config.as_bytes(),
            annotations: Value::Null,
        },
        &[LayoutBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            data: &gzipped,
            annotations: Value::Null,
        }],
        no_annotations.clone(),
    );
    // (c') annotations on the manifest over a raw layer: the annotation, not the tag, is the version.
    let annotated_image = firmware_bytes(100, 4);
    layout.image(
        "annotated",
        &empty_config,
        &[LayoutBlob {
            media_type: "application/vnd.acme.firmware",
            data: &annotated_image,
            annotations: Value::Null,
        }],
        json!({LABEL_VERSION: "4.0.0", LABEL_SIZE: "100"}),
    );
    for tag in ["tar", "3.1.4", "labels", "annotated"] {
        layout.copy_to(tag, &format!("{}/fw/made:{tag}", registry.host()), None);
    }

    let store = store(&registry);
    for (tag, version, bytes) in [
        ("tar", "1.0.0", &tar_image),
        ("3.1.4", "3.1.4", &raw_image),
        ("labels", "2.0.0", &labelled_image),
        ("annotated", "4.0.0", &annotated_image),
    ] {
        let image = store.fetch(&spec(&format!("made:{tag}"))).await.unwrap();
        assert_eq!(
            (image.version(), &image.data()[..]),
            (version, &bytes[..]),
            "{tag}"
        );
    }

    // And a device updates from one of them through the server.
    let server = serve(&registry).await;
    server
        .create_app("app", Some(container("made:3.1.4", "IfNotPresent")))
        .await;
    server.create_device("app", "d", "pw", None).await;
    let finished = play(&server, "d@app", "0.1", 1000, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        (finished.version.as_str(), finished.installed),
        ("3.1.4", raw_image)
    );
    server.stop().await;
}

#[tokio::test]
async fn lying_metadata_corrupt_blobs_oversized_and_hostile_images_are_never_served() {
    let registry = OciRegistry::start().await;
    let mut layout = OciLayout::new();
    let empty_config = LayoutBlob {
        media_type: EMPTY_CONFIG,
        data: b"{}",
        annotations: Value::Null,
    };
    // firmware.json declares a checksum the bytes do not have.
    let image = firmware_bytes(2000, 5);
    let lie = tar_of(&[
        ("firmware.bin", &image),
        (
            "firmware.json",
            &metadata_json("1.0.0", &firmware_bytes(2000, 99)),
        ),
    ]);
    layout.image(
        "lie",
        &empty_config,
        &[LayoutBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar",
            data: &lie,
            annotations: Value::Null,
        }],
        Value::Null,
    );
    // A raw layer whose bytes the registry will serve wrong (its storage is tampered with below).
    let good = firmware_bytes(3000, 6);
    layout.image(
        "2.0.0",
        &empty_config,
        &[LayoutBlob {
            media_type: "application/octet-stream",
            data: &good,
            annotations: Value::Null,
        }],
        Value::Null,
    );
    layout.copy_to("lie", &format!("{}/fw/lie:1", registry.host()), None);
    layout.copy_to("2.0.0", &format!("{}/fw/tampered:2.0.0", registry.host()), None);

    let server = serve(&registry).await;
    for (name, image) in [
        ("lie", "lie:1"),
        ("tampered", "tampered:2.0.0"),
        ("missing", "nothing-here:1"),
        ("hostile", "../../etc/passwd"),
    ] {
        create_device_with_firmware(&server, name, image).await;
    }
    // Tamper after the push: same length, other bytes.
    let mut evil = good.clone();
    evil[1234] ^= 0xff;
    std::fs::write(registry.blob_path(&sha256_digest(&good)), &evil).unwrap();

    for (name, expected) in [
        ("lie", "checksum mismatch"),
        ("tampered", "digest mismatch"),
        ("missing", "not found"),
        ("hostile", "invalid image reference"),
    ] {
        let user = format!("{name}@app");
        assert!(matches!(
            send(&server, &user, &DeviceStatus::first(b"0.1", Some(512), None)).await,
            Received::Wait
        ));
        let status = wait_for_status(&server, "app", name, |s| !reason(s).is_empty()).await;
        assert!(reason(&status).contains(expected), "{name}: {status}");
    }

    // Larger than the configured maximum: refused before download.
    let small = OciStore::new(OciConfig {
        max_firmware_size: 1000,
        ..oci_config(&registry)
    })
    .unwrap();
    let downloads = || registry.count_requests("GET", &format!("/blobs/{}", sha256_digest(&good)));
    let before = downloads();
    match small.fetch(&spec("tampered:2.0.0")).await {
        Err(FetchError::Invalid { reason, .. }) => assert!(reason.contains("more than the 1000"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(downloads(), before, "refused before download");
    server.stop().await;
}

#[tokio::test]
async fn a_device_is_updated_from_the_registry_and_again_when_the_tag_is_re_pushed() {
    let registry = OciRegistry::start().await;
    let store = store(&registry);
    let first = firmware_bytes(4000, 7);
    push(&store, "app:latest", "1.0.0", &first).await;
    let server = serve(&registry).await;
    server
        .create_app("app", Some(container("app:latest", "Always")))
        .await;
    server.create_device("app", "d", "pw", None).await;
    let finished = play(&server, "d@app", "0.9.0", 512, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        (finished.version.as_str(), &finished.installed),
        ("1.0.0", &first)
    );
    let status = server.device("app", "d").await;
    assert_eq!(conditions(&status), [("InSync".to_string(), "True".to_string())]);

    // The tag moves to 1.1.0: under Always, the server notices within its recheck interval.
    let second = firmware_bytes(4500, 8);
    push(&store, "app:latest", "1.1.0", &second).await;
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        match send(&server, "d@app", &DeviceStatus::first(b"1.0.0", Some(512), None)).await {
            Received::Sync { .. } => {
                assert!(
                    Instant::now() < give_up,
                    "the re-pushed tag never reached the device"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Received::Write {
                version, offset: 0, ..
            } => {
                assert_eq!(version, "1.1.0");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let finished = play(&server, "d@app", "1.0.0", 512, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        (finished.version.as_str(), &finished.installed),
        ("1.1.0", &second)
    );

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
    let finished = play(&server, "pinned@app", "0", 512, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(finished.version, "1.1.0");
    push(&store, "app:latest", "1.2.0", &firmware_bytes(10, 1)).await;
    let heads = registry.count_requests("HEAD", "/manifests/latest");
    for _ in 0..20 {
        assert!(matches!(
            send(
                &server,
                "pinned@app",
                &DeviceStatus::first(b"1.1.0", Some(512), None)
            )
            .await,
            Received::Sync { .. }
        ));
    }
    assert_eq!(
        registry.count_requests("HEAD", "/manifests/latest"),
        heads,
        "IfNotPresent never re-resolves"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_registry_is_asked_for_each_blob_once_however_many_devices_and_blocks() {
    let registry = OciRegistry::start().await;
    let pusher = store(&registry);
    let image = firmware_bytes(20_000, 9);
    push(&pusher, "shared:1.0.0", "1.0.0", &image).await;
    // A second tag of the very same image.
    push(&pusher, "shared:stable", "1.0.0", &image).await;
    let manifest = skopeo_inspect(&format!("{}/fw/shared:1.0.0", registry.host()), true, None);
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let before = registry.count_requests("GET", &format!("/blobs/{layer}"));

    let server = serve(&registry).await;
    server
        .create_app("fleet", Some(container("shared:1.0.0", "IfNotPresent")))
        .await;
    let devices = 12;
    for i in 0..devices {
        let spec = (i % 2 == 1).then(|| container("shared:stable", "Always"));
        server.create_device("fleet", &format!("d{i}"), "pw", spec).await;
    }
    let runs: Vec<_> = (0..devices)
        .map(|i| {
            let server = &server;
            async move {
                play(
                    server,
                    &format!("d{i}@fleet"),
                    "0.0.1",
                    256,
                    Duration::from_secs(60),
                )
                .await
            }
        })
        .collect();
    for finished in futures_join_all(runs).await {
        let finished = finished.unwrap();
        assert_eq!(
            (finished.version.as_str(), &finished.installed),
            ("1.0.0", &image)
        );
    }
    // 12 devices x 79 blocks, two tags: one download of the layer.
    assert_eq!(
        registry.count_requests("GET", &format!("/blobs/{layer}")) - before,
        1
    );

    // The server's metrics show the source at work.
    let metrics = server.metrics().await;
    for (name, labels) in [
        ("ajour_firmware_cache_total", ["source=\"oci\"", "result=\"hit\""]),
        (
            "ajour_firmware_cache_total",
            ["source=\"oci\"", "result=\"miss\""],
        ),
        (
            "ajour_oci_registry_requests_total",
            ["kind=\"blob\"", "result=\"ok\""],
        ),
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label))),
            "{name} {labels:?} not in:\n{metrics}"
        );
    }

    // A fresh store (a second server) asked by twenty devices at once: still one download.
    let requests = registry.access_log().len();
    let server_store = store(&registry);
    let specs: Vec<FirmwareSpec> = (0..20)
        .map(|i| FirmwareSpec::Container {
            image: if i % 2 == 0 {
                "shared:1.0.0"
            } else {
                "shared:stable"
            }
            .into(),
            pull_policy: ImagePullPolicy::IfNotPresent,
        })
        .collect();
    for fetched in futures_join_all(specs.iter().map(|s| server_store.fetch(s)).collect()).await {
        assert_eq!(&fetched.unwrap().data()[..], &image[..]);
    }
    assert_eq!(
        registry.count_requests("GET", &format!("/blobs/{layer}")) - before,
        2
    );
    let requests_after_load = registry.access_log().len();
    assert!(requests_after_load > requests);

    // The hot path is a lookup: a thousand more fetches ask the registry nothing.
    for _ in 0..1000 {
        server_store.fetch(&spec("shared:1.0.0")).await.unwrap();
    }
    assert_eq!(registry.access_log().len(), requests_after_load);
    server.stop().await;
}

#[tokio::test]
async fn with_the_registry_down_mid_fleet_devices_wait_and_all_finish_correctly_once_it_is_back() {
    let mut registry = OciRegistry::start().await;
    let store = store(&registry);
    let image_a = firmware_bytes(30_000, 10);
    let image_b = firmware_bytes(25_000, 11);
    push(&store, "a:1", "1.0.0-a", &image_a).await;
    push(&store, "b:1", "1.0.0-b", &image_b).await;
    let server = serve(&registry).await;
    server.create_app("fleet", None).await;
    for i in 0..4 {
        server
            .create_device("fleet", &format!("a{i}"), "pw", Some(container("a:1", "Always")))
            .await;
        server
            .create_device(
                "fleet",
                &format!("b{i}"),
                "pw",
                Some(container("b:1", "IfNotPresent")),
            )
            .await;
    }
    // Fleet a is mid-update (its image loaded) when the registry goes down.
    for i in 0..4 {
        let first = send(
            &server,
            &format!("a{i}@fleet"),
            &DeviceStatus::first(b"0", Some(300), None),
        )
        .await;
        assert!(matches!(first, Received::Write { offset: 0, .. }), "{first:?}");
    }
    registry.stop().await;

    // Fleet b cannot get its image: it waits, and its status says why.
    for i in 0..4 {
        assert!(matches!(
            send(
                &server,
                &format!("b{i}@fleet"),
                &DeviceStatus::first(b"0", Some(300), None)
            )
            .await,
            Received::Wait
        ));
    }
    let status = wait_for_status(&server, "fleet", "b0", |s| !reason(s).is_empty()).await;
    assert!(reason(&status).contains("unavailable"), "{status}");

    // Everyone plays on while the registry is down; it comes back once fleet a is done (from
    // the cache: under Always, a failed re-check keeps serving what the tag pointed to).
    let run = |name: String| {
        let server = &server;
        async move {
            let result = play(
                server,
                &format!("{name}@fleet"),
                "0",
                300,
                Duration::from_secs(60),
            )
            .await;
            (name, result)
        }
    };
    let fleet_a = futures_join_all((0..4).map(|i| run(format!("a{i}"))).collect());
    let fleet_b = futures_join_all((0..4).map(|i| run(format!("b{i}"))).collect());
    let registry = &mut registry;
    let (mut results, results_b) = tokio::join!(
        async move {
            let results = fleet_a.await;
            registry.restart().await;
            results
        },
        fleet_b
    );
    results.extend(results_b);
    for (name, finished) in results {
        let finished = finished.unwrap_or_else(|e| panic!("{e}"));
        let (version, image) = if name.starts_with('a') {
            ("1.0.0-a", &image_a)
        } else {
            ("1.0.0-b", &image_b)
        };
        assert_eq!(
            (finished.version.as_str(), &finished.installed),
            (version, image),
            "{name}"
        );
        if name.starts_with('b') {
            assert!(finished.waits > 0, "{name} never waited for the registry");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn an_htpasswd_registry_serves_the_right_credentials_and_refuses_others() {
    let registry = OciRegistry::start_with_auth("fleet-bot", "s3cret").await;
    let with = |auth: OciAuth| store_with_auth(&registry, auth);
    let right = with(OciAuth::Basic {
        username: "fleet-bot".into(),
        password: "s3cret".into(),
    });
    let image = firmware_bytes(1000, 12);
    push(&right, "private:1", "1.0.0", &image).await;
    assert_eq!(
        &right.fetch(&spec("private:1")).await.unwrap().data()[..],
        &image[..]
    );
    // skopeo reads it with the same credentials.
    let summary = skopeo_inspect(
        &format!("{}/fw/private:1", registry.host()),
        false,
        registry.credentials(),
    );
    assert_eq!(summary["Labels"][LABEL_VERSION], "1.0.0");

    for wrong in [
        OciAuth::Anonymous,
        OciAuth::Basic {
            username: "fleet-bot".into(),
            password: "guess".into(),
        },
        OciAuth::Bearer {
            token: "forged".into(),
        },
    ] {
        let error = with(wrong.clone()).fetch(&spec("private:1")).await.unwrap_err();
        assert!(
            matches!(&error, FetchError::Unavailable(m) if m.contains("refused access")),
            "{wrong:?}: {error}"
        );
        let pushed = with(wrong.clone())
            .push("private:2", "2", b"x", Arc::new(|_| {}))
            .await;
        assert!(pushed.is_err(), "{wrong:?} pushed");
    }
}

/// Run futures concurrently on this task, in order of the input.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    futures_util::future::join_all(futures).await
}

/// A device in application `app` (created on first use) whose spec names `image`.
async fn create_device_with_firmware(server: &TestServer, name: &str, image: &str) {
    let (status, _) = server.api_send(reqwest::Method::GET, "apps/app", None).await;
    if status != reqwest::StatusCode::OK {
        server.create_app("app", None).await;
    }
    server
        .create_device("app", name, "pw", Some(container(image, "IfNotPresent")))
        .await;
}

#[tokio::test]
async fn tls_with_an_extra_ca_is_trusted_and_unknown_certificates_are_refused() {
    let registry = OciRegistry::start_with(RegistryOptions {
        tls: true,
        ..RegistryOptions::default()
    })
    .await;
    let tls = |extra_ca_file: Option<std::path::PathBuf>, accept_invalid_certs: bool| {
        OciStore::new(OciConfig {
            plain_http: false,
            extra_ca_file,
            accept_invalid_certs,
            ..oci_config(&registry)
        })
        .unwrap()
    };
    let trusted = tls(Some(registry.ca_file()), false);
    let image = firmware_bytes(3000, 13);
    push(&trusted, "secure:1", "1.0.0", &image).await;
    assert_eq!(
        &trusted.fetch(&spec("secure:1")).await.unwrap().data()[..],
        &image[..]
    );

    // The system's roots alone do not know the test CA.
    let error = tls(None, false).fetch(&spec("secure:1")).await.unwrap_err();
    assert!(matches!(error, FetchError::Unavailable(_)), "{error}");
    // Opting in to any certificate works; so would a man in the middle.
    let anything = tls(None, true).fetch(&spec("secure:1")).await.unwrap();
    assert_eq!(&anything.data()[..], &image[..]);
    // Plain HTTP to a TLS port is an error, not a hang.
    let plain = store(&registry).fetch(&spec("secure:1")).await.unwrap_err();
    assert!(matches!(plain, FetchError::Unavailable(_)), "{plain}");
    // A CA file that holds no certificate is a configuration error.
    let not_a_ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_a_ca.path(), "not a certificate").unwrap();
    assert!(OciStore::new(OciConfig {
        extra_ca_file: Some(not_a_ca.path().to_path_buf()),
        ..oci_config(&registry)
    })
    .is_err());
}

#[tokio::test]
async fn the_distribution_token_flow_trades_credentials_for_bearer_tokens() {
    let registry = OciRegistry::start_with(RegistryOptions {
        credentials: Some(("robot".into(), "t0ken-pass".into())),
        token_auth: true,
        ..RegistryOptions::default()
    })
    .await;
    let with = |auth: OciAuth| store_with_auth(&registry, auth);
    let robot = with(OciAuth::Basic {
        username: "robot".into(),
        password: "t0ken-pass".into(),
    });
    let image = firmware_bytes(2500, 14);
    push(&robot, "tokened:1", "1.0.0", &image).await;
    assert_eq!(
        &robot.fetch(&spec("tokened:1")).await.unwrap().data()[..],
        &image[..]
    );
    assert!(
        registry.tokens_issued() >= 2,
        "pull and push tokens came from the token server"
    );

    // A bearer token obtained elsewhere (here: from the token server by hand) is sent as is.
    let response = reqwest::Client::new()
        .get(registry.token_url().unwrap())
        .query(&[
            ("service", "ajour-test-registry"),
            ("scope", "repository:fw/tokened:pull"),
        ])
        .basic_auth("robot", Some("t0ken-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let token = response.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let bearer = with(OciAuth::Bearer { token });
    assert_eq!(
        &bearer.fetch(&spec("tokened:1")).await.unwrap().data()[..],
        &image[..]
    );

    for wrong in [
        OciAuth::Anonymous,
        OciAuth::Basic {
            username: "robot".into(),
            password: "wrong".into(),
        },
        OciAuth::Bearer {
            token: "forged".into(),
        },
    ] {
        let error = with(wrong.clone()).fetch(&spec("tokened:1")).await.unwrap_err();
        assert!(
            matches!(&error, FetchError::Unavailable(m) if m.contains("refused access")),
            "{wrong:?}: {error}"
        );
    }
}

/// A TCP proxy in front of the registry that can be told to hang: it then stops passing bytes on
/// every connection, old and new, without closing any (a registry that accepts and never answers).
async fn hanging_proxy(upstream: String) -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hang = Arc::new(AtomicBool::new(false));
    let flag = hang.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            for (mut from, mut to) in [
                (
                    Box::new(client_read) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(server_write) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (Box::new(server_read), Box::new(client_write)),
            ] {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if flag.load(Ordering::SeqCst) {
                            // Hold the connection open, pass nothing on.
                            std::future::pending::<()>().await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, hang)
}

#[tokio::test]
async fn an_always_re_check_never_makes_a_device_wait_even_on_a_registry_that_hangs() {
    let registry = OciRegistry::start().await;
    let image = firmware_bytes(1500, 15);
    push(&store(&registry), "slow:1", "1.0.0", &image).await;
    let (proxy, hang) = hanging_proxy(registry.host()).await;
    let store = OciStore::new(OciConfig {
        registry_prefix: format!("{proxy}/fw/"),
        always_recheck: Duration::from_millis(100),
        ..oci_config(&registry)
    })
    .unwrap();
    let always = FirmwareSpec::Container {
        image: "slow:1".into(),
        pull_policy: ImagePullPolicy::Always,
    };
    assert_eq!(store.fetch(&always).await.unwrap().version(), "1.0.0");

    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    // Let the recheck interval pass: every fetch from here on has a re-check due.
    tokio::time::sleep(Duration::from_millis(150)).await;
    for _ in 0..20 {
        let started = Instant::now();
        let served = store.fetch(&always).await.unwrap();
        assert_eq!(&served.data()[..], &image[..]);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a fetch waited {:?} on the hung registry",
            started.elapsed()
        );
    }
}

/// An `ajour serve` child process, killed when dropped.
struct ServeProcess {
    _child: tokio::process::Child,
    http: reqwest::Client,
    url: String,
}

impl DfuEndpoint for ServeProcess {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
    fn url(&self) -> &str {
        &self.url
    }
}

#[tokio::test]
async fn ajour_serve_with_the_oci_flags_updates_a_device_from_the_registry() {
    use tokio::io::AsyncBufReadExt;
    let registry = OciRegistry::start_with_auth("ci", "pass-word").await;
    let image = firmware_bytes(9000, 16);
    let pusher = OciStore::new(OciConfig {
        auth: OciAuth::Basic {
            username: "ci".into(),
            password: "pass-word".into(),
        },
        ..oci_config(&registry)
    })
    .unwrap();
    push(&pusher, "served:2.0.0", "2.0.0", &image).await;

    let data = tempfile::tempdir().unwrap();
    let prefix = format!("{}/fw/", registry.host());
    let mut child = tokio::process::Command::new(AJOUR)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--password-cost",
            "4",
            "--api-token",
            "t0k",
        ])
        .args(["--oci-registry", &prefix, "--oci-plain-http", "--oci-user", "ci"])
        .arg("--data-dir")
        .arg(data.path())
        .env("AJOUR_OCI_PASSWORD", "pass-word")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("Ajour listening on ") {
                return url.to_string();
            }
        }
        panic!("ajour serve ended without printing its address")
    })
    .await
    .expect("ajour serve printed its address");
    let serve = ServeProcess {
        _child: child,
        http: reqwest::Client::new(),
        url,
    };
    let api = |path: &str| format!("{}/api/registry/v1alpha1/{path}", serve.url);
    for (path, body) in [
        (
            "apps",
            json!({"metadata": {"name": "app"}, "spec": {"firmware": container("served:2.0.0", "IfNotPresent")}}),
        ),
        (
            "apps/app/devices",
            json!({"metadata": {"name": "d"}, "spec": {"authentication": {"credentials": [{"pass": "pw"}]}}}),
        ),
    ] {
        let response = serve
            .http
            .post(api(path))
            .bearer_auth("t0k")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{path}");
    }
    let finished = play(&serve, "d@app", "1.0.0", 700, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        (finished.version.as_str(), &finished.installed),
        ("2.0.0", &image)
    );
}
