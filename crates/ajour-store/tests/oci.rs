//! `OciStore` against a real OCI registry (Debian's `docker-registry`, on a free port, see
//! `ajour_testkit::oci_registry`): images pushed by the store itself, or made by `skopeo copy`
//! from OCI layouts built here byte by byte, in each of the three layouts; bad images of every
//! kind; htpasswd, the distribution token flow and TLS; the registry's load; a registry that
//! hangs. What devices see of all this, through the server, is in `crates/ajour/tests/it/oci.rs`.

use ajour_store::oci::layout::{LABEL_CHECKSUM, LABEL_SIZE, LABEL_VERSION};
use ajour_store::oci::OciError;
use ajour_store::{
    FetchError, FirmwareSource, FirmwareSpec, ImagePullPolicy, OciAuth, OciConfig, OciStore, SameVersion,
};
use ajour_testkit::oci_registry::{sha256_digest, skopeo_inspect, LayoutBlob, RegistryOptions};
use ajour_testkit::{eventually, firmware_bytes, OciLayout, OciRegistry};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
const IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

fn oci_config(registry: &OciRegistry) -> OciConfig {
    OciConfig {
        registry_prefix: format!("{}/fw/", registry.host()),
        plain_http: true,
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

async fn push(store: &OciStore, image: &str, version: &str, data: &[u8]) {
    store
        .push(
            image,
            version,
            data,
            ajour_store::SameVersion::Replace,
            Arc::new(|_| {}),
        )
        .await
        .unwrap();
}

fn spec(image: &str) -> FirmwareSpec {
    FirmwareSpec::Container {
        image: image.into(),
        pull_policy: ImagePullPolicy::IfNotPresent,
    }
}

fn empty_config() -> LayoutBlob<'static> {
    LayoutBlob {
        media_type: EMPTY_CONFIG,
        data: b"{}",
        annotations: Value::Null,
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

#[tokio::test]
async fn images_made_by_skopeo_are_read_in_every_layout() {
    let registry = OciRegistry::start().await;
    let mut layout = OciLayout::new();

    // (a) firmware.json + firmware.bin in an uncompressed tar layer.
    let tar_image = firmware_bytes(5000, 1);
    let tar = tar_of(&[
        ("firmware.bin", &tar_image),
        ("firmware.json", &metadata_json("1.0.0", &tar_image)),
    ]);
    layout.image(
        "tar",
        &empty_config(),
        &[LayoutBlob {
            media_type: "application/vnd.oci.image.layer.v1.tar",
            data: &tar,
            annotations: Value::Null,
        }],
        Value::Null,
    );
    // (b) one raw octet-stream layer, as `oras push` writes: the version is the tag.
    let raw_image = firmware_bytes(7000, 2);
    layout.image(
        "3.1.4",
        &empty_config(),
        &[LayoutBlob {
            media_type: "application/octet-stream",
            data: &raw_image,
            annotations: json!({"org.opencontainers.image.title": "firmware.bin"}),
        }],
        Value::Null,
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
        Value::Null,
    );
    // (c') annotations on the manifest over a raw layer: the annotation, not the tag, is the version.
    let annotated_image = firmware_bytes(100, 4);
    layout.image(
        "annotated",
        &empty_config(),
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
}

#[tokio::test]
async fn lying_metadata_corrupt_blobs_oversized_missing_and_hostile_images_are_refused() {
    let registry = OciRegistry::start().await;
    let mut layout = OciLayout::new();
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
        &empty_config(),
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
        &empty_config(),
        &[LayoutBlob {
            media_type: "application/octet-stream",
            data: &good,
            annotations: Value::Null,
        }],
        Value::Null,
    );
    layout.copy_to("lie", &format!("{}/fw/lie:1", registry.host()), None);
    layout.copy_to("2.0.0", &format!("{}/fw/tampered:2.0.0", registry.host()), None);
    // Larger than a store's configured maximum: refused before download (asked first, before the
    // tampering, so only the descriptor's size can be what refuses it).
    let small = OciStore::new(OciConfig {
        max_firmware_size: 1000,
        ..oci_config(&registry)
    })
    .unwrap();
    let downloads = || registry.count_requests("GET", &format!("/blobs/{}", sha256_digest(&good)));
    match small.fetch(&spec("tampered:2.0.0")).await {
        Err(FetchError::Invalid { reason, .. }) => {
            assert!(reason.contains("more than the 1000"), "{reason}")
        }
        other => panic!("expected a refusal for the size, got {other:?}"),
    }
    assert_eq!(downloads(), 0, "refused before download");

    // Tamper: same length, other bytes.
    let mut evil = good.clone();
    evil[1234] ^= 0xff;
    std::fs::write(registry.blob_path(&sha256_digest(&good)), &evil).unwrap();

    let store = store(&registry);
    for (image, expected) in [
        ("lie:1", "checksum mismatch"),
        ("tampered:2.0.0", "digest mismatch"),
        ("../../etc/passwd", "invalid image reference"),
    ] {
        match store.fetch(&spec(image)).await {
            Err(FetchError::Invalid { reason, .. }) => {
                assert!(reason.contains(expected), "{image}: {reason}")
            }
            other => panic!("{image}: expected Invalid ({expected}), got {other:?}"),
        }
    }
    assert_eq!(downloads(), 1, "the tampered layer was downloaded, then refused");
    let missing = store.fetch(&spec("nothing-here:1")).await;
    assert!(
        matches!(&missing, Err(FetchError::NotFound(image)) if image.contains("nothing-here")),
        "{missing:?}"
    );
}

#[tokio::test]
async fn a_store_asked_by_many_at_once_downloads_each_blob_once_then_asks_nothing() {
    let registry = OciRegistry::start().await;
    let pusher = store(&registry);
    let image = firmware_bytes(20_000, 9);
    push(&pusher, "shared:1.0.0", "1.0.0", &image).await;
    // A second tag of the very same image.
    push(&pusher, "shared:stable", "1.0.0", &image).await;
    let manifest = skopeo_inspect(&format!("{}/fw/shared:1.0.0", registry.host()), true, None);
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let layer_downloads = || registry.count_requests("GET", &format!("/blobs/{layer}"));
    assert_eq!(layer_downloads(), 0);

    // Twenty callers at once, over both tags: one download of the layer.
    let store = store(&registry);
    let specs: Vec<FirmwareSpec> = (0..20)
        .map(|i| {
            spec(if i % 2 == 0 {
                "shared:1.0.0"
            } else {
                "shared:stable"
            })
        })
        .collect();
    let fetched = futures_util::future::join_all(specs.iter().map(|s| store.fetch(s))).await;
    for image_served in fetched {
        assert_eq!(&image_served.unwrap().data()[..], &image[..]);
    }
    assert_eq!(layer_downloads(), 1);

    // The hot path is a lookup: a thousand more fetches ask the registry nothing.
    let requests = registry.access_log().len();
    for _ in 0..1000 {
        store.fetch(&spec("shared:1.0.0")).await.unwrap();
    }
    assert_eq!(registry.access_log().len(), requests);
}

/// What a registry that wants `user`'s password must refuse: nothing, a wrong password, a
/// forged token.
fn wrong_credentials(user: &str) -> [OciAuth; 3] {
    [
        OciAuth::Anonymous,
        OciAuth::Basic {
            username: user.into(),
            password: "wrong".into(),
        },
        OciAuth::Bearer {
            token: "forged".into(),
        },
    ]
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

    for wrong in wrong_credentials("fleet-bot") {
        let error = with(wrong.clone()).fetch(&spec("private:1")).await.unwrap_err();
        assert!(
            matches!(&error, FetchError::Unavailable(m) if m.contains("refused access")),
            "{wrong:?}: {error}"
        );
        let pushed = with(wrong.clone())
            .push("private:2", "2", b"x", SameVersion::Refuse, Arc::new(|_| {}))
            .await;
        // Refused for its credentials. (An anonymous push's 401 comes back as "unavailable",
        // not as "refused access": the registry's answer is kept in the reason.)
        assert!(
            matches!(&pushed, Err(OciError::Denied { .. }))
                || matches!(&pushed, Err(OciError::Unavailable { reason, .. }) if reason.contains("401")),
            "{wrong:?}: {pushed:?}"
        );
        assert_eq!(
            registry.count_requests("PUT", "/manifests/2"),
            0,
            "{wrong:?}: nothing pushed"
        );
    }
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
    let refused = OciStore::new(OciConfig {
        extra_ca_file: Some(not_a_ca.path().to_path_buf()),
        ..oci_config(&registry)
    });
    assert!(
        matches!(&refused, Err(OciError::Config(m)) if m.contains("certificate")),
        "{:?}",
        refused.as_ref().err()
    );
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
    let robot = || {
        with(OciAuth::Basic {
            username: "robot".into(),
            password: "t0ken-pass".into(),
        })
    };
    let image = firmware_bytes(2500, 14);
    push(&robot(), "tokened:1", "1.0.0", &image).await;
    let pushing = registry.tokens_issued();
    assert!(pushing >= 1, "the push got its token from the token server");
    // Another store (another server) pulls with a token of its own.
    assert_eq!(
        &robot().fetch(&spec("tokened:1")).await.unwrap().data()[..],
        &image[..]
    );
    assert!(
        registry.tokens_issued() > pushing,
        "the pull got its token from the token server"
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

    for wrong in wrong_credentials("robot") {
        let error = with(wrong.clone()).fetch(&spec("tokened:1")).await.unwrap_err();
        assert!(
            matches!(&error, FetchError::Unavailable(m) if m.contains("refused access")),
            "{wrong:?}: {error}"
        );
    }
}

/// A TCP proxy in front of the registry that can be told to hang: it then stops passing bytes on
/// every connection, old and new, without closing any (a registry that accepts and never answers).
struct HangingProxy {
    addr: String,
    hang: Arc<AtomicBool>,
    /// Reads from clients that were held instead of passed on.
    held: Arc<AtomicUsize>,
}

impl HangingProxy {
    async fn start(upstream: String) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (hang, held) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (flag, held_count) = (hang.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (from_client, mut from, mut to) in [
                    (
                        true,
                        Box::new(client_read) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(server_write) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    ),
                    (false, Box::new(server_read), Box::new(client_write)),
                ] {
                    let (flag, held_count) = (flag.clone(), held_count.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if flag.load(Ordering::SeqCst) {
                                if from_client {
                                    held_count.fetch_add(1, Ordering::SeqCst);
                                }
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
        Self { addr, hang, held }
    }
}

#[tokio::test]
async fn an_always_re_check_never_makes_a_caller_wait_even_on_a_registry_that_hangs() {
    let registry = OciRegistry::start().await;
    let image = firmware_bytes(1500, 15);
    push(&store(&registry), "slow:1", "1.0.0", &image).await;
    let proxy = HangingProxy::start(registry.host()).await;
    // A re-check is due on every fetch after the first.
    let store = OciStore::new(OciConfig {
        registry_prefix: format!("{}/fw/", proxy.addr),
        always_recheck: Duration::ZERO,
        ..oci_config(&registry)
    })
    .unwrap();
    let always = FirmwareSpec::Container {
        image: "slow:1".into(),
        pull_policy: ImagePullPolicy::Always,
    };
    assert_eq!(store.fetch(&always).await.unwrap().version(), "1.0.0");

    proxy.hang.store(true, Ordering::SeqCst);
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
    // The re-check was made, and it is what hangs.
    eventually(Duration::from_secs(10), "a re-check held by the proxy", || {
        std::future::ready(proxy.held.load(Ordering::SeqCst) > 0)
    })
    .await;
}

#[tokio::test]
async fn a_tag_holding_the_version_with_other_bytes_is_replaced_only_with_force() {
    let registry = OciRegistry::start().await;
    let store = store(&registry);
    let push_as = |data: &'static [u8], same_version| {
        let store = &store;
        async move {
            store
                .push("app:stable", "1.0.0", data, same_version, Arc::new(|_| {}))
                .await
        }
    };
    let first = push_as(b"first image", SameVersion::Refuse).await.unwrap();
    // The same bytes again are fine (and give the same image).
    assert_eq!(
        push_as(b"first image", SameVersion::Refuse)
            .await
            .unwrap()
            .manifest_digest,
        first.manifest_digest
    );
    let refused = push_as(b"other bytes", SameVersion::Refuse).await.unwrap_err();
    assert!(
        matches!(&refused, OciError::Invalid { reason, .. } if reason.contains("--force")),
        "{refused}"
    );
    let served = store.inspect("app:stable").await.unwrap();
    assert_eq!(
        served.manifest_digest, first.manifest_digest,
        "a refused push changes nothing"
    );

    let replaced = push_as(b"other bytes", SameVersion::Replace).await.unwrap();
    assert_ne!(replaced.manifest_digest, first.manifest_digest);
    let served = store.inspect("app:stable").await.unwrap();
    assert_eq!(served.image.data().as_ref(), b"other bytes");
}
