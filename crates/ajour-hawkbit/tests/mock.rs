//! `HawkbitSource` against `hawkbit_mock`, the DDI server double of the `hawkbit` crate: every
//! request Ajour makes must match what the mock expects (path, `GatewayToken` header, JSON body
//! exactly), or the mock answers 404.
//!
//! The mock serves `00:01:00` as the polling sleep; tests that need a second poll at once set
//! `max_poll` to zero (every fetch polls), the others keep Hawkbit's sleep and check it holds.

use ajour_hawkbit::{HawkbitConfig, HawkbitSource, HawkbitStats};
use ajour_store::{Asking, FetchError, FirmwareSource, FirmwareSpec, InvalidImage, Observation, Observed};
use hawkbit::ddi::{Execution, Finished, Type};
use hawkbit_mock::ddi::{
    ChunkProtocol, Deployment, DeploymentBuilder, Server, ServerBuilder, TargetAuthorization,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

const DEVICE: &str = "app/dev";

fn server() -> Server {
    ServerBuilder::default()
        .target_authorization(TargetAuthorization::GatewayToken)
        .build()
}

/// A source for `server`, with the gateway token the mock wants (`Key` + tenant).
fn source(server: &Server, adjust: impl FnOnce(&mut HawkbitConfig)) -> HawkbitSource {
    let mut config = HawkbitConfig::new(server.base_url());
    config.gateway_token = Some(format!("Key{}", server.tenant));
    // Progress feedback: the first at once, the next not within a test.
    config.feedback_interval = Duration::from_secs(3600);
    adjust(&mut config);
    HawkbitSource::new(config).unwrap()
}

fn spec(controller: &str) -> FirmwareSpec {
    FirmwareSpec::Hawkbit {
        controller: controller.into(),
    }
}

fn asking(current: &str) -> Asking<'_> {
    Asking {
        device: DEVICE,
        current,
    }
}

fn observation<'a>(current: &'a str, target: &'a str, state: Observed<'a>) -> Observation<'a> {
    Observation {
        device: DEVICE,
        current,
        target,
        state,
    }
}

fn count(counter: &AtomicU64) -> u64 {
    HawkbitStats::get(counter)
}

/// An artifact file in `dir`, and its hex SHA-256.
fn artifact(dir: &Path, name: &str, data: &[u8]) -> (PathBuf, String) {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    (path, hex::encode(Sha256::digest(data)))
}

/// A deployment of one `firmware` module holding `file` (declared with `sha256`).
fn deployment(id: &str, version: &str, file: &Path, sha256: &str) -> Deployment {
    DeploymentBuilder::new(id, Type::Forced, Type::Attempt)
        .chunk(
            ChunkProtocol::HTTP,
            "firmware",
            version,
            "fw",
            vec![(file.to_path_buf(), "md5-not-checked", "sha1-not-checked", sha256)],
        )
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_download_progress_and_success() {
    let dir = tempfile::tempdir().unwrap();
    let data = ajour_testkit::firmware_bytes(10_000, 1);
    let (file, sha256) = artifact(dir.path(), "fw.bin", &data);
    let server = server();
    let target = server.add_target("dev");
    // The attributes Ajour uploads when asked: the version the device reports.
    target.request_config(json!({"mode": "merge", "data": {"version": "0.1.0"}}));
    target.push_deployment(deployment("10", "0.2.0", &file, &sha256));
    let source = source(&server, |_| {});
    let stats = source.stats();

    let image = source.fetch_for(&spec("dev"), &asking("0.1.0")).await.unwrap();
    assert_eq!(image.version(), "0.2.0");
    assert_eq!(image.checksum_hex(), sha256);
    assert_eq!(&image.data()[..], &data[..]);
    assert_eq!(target.poll_hits(), 1);
    assert_eq!(target.config_data_hits(), 1);
    assert_eq!(target.deployment_hits(), 1);
    assert_eq!(count(&stats.downloads), 1);

    // However often the device reports, Hawkbit is asked once per its polling sleep (60 s).
    for _ in 0..50 {
        let again = source.fetch_for(&spec("dev"), &asking("0.1.0")).await.unwrap();
        assert!(std::sync::Arc::ptr_eq(&image, &again));
    }
    assert_eq!(target.poll_hits(), 1);
    assert_eq!(target.deployment_hits(), 1);
    assert_eq!(count(&stats.downloads), 1);

    // Progress: the first at once, then not again within the feedback interval.
    let proceeding = target.expect_deployment_feedback(
        "10",
        Execution::Proceeding,
        Finished::None,
        Some(json!({"cnt": 25, "of": 100})),
        vec!["app/dev: 25% of 0.2.0 sent"],
    );
    for percent in [25.0, 50.0, 75.0, 100.0] {
        source.observe(
            &spec("dev"),
            &observation("0.1.0", "0.2.0", Observed::Updating { percent }),
        );
        source.settle().await;
    }
    assert_eq!(proceeding.calls(), 1);
    assert_eq!(count(&stats.feedbacks), 1);

    // Success once the device reports the target version; once only.
    let success = target.expect_deployment_feedback(
        "10",
        Execution::Closed,
        Finished::Success,
        None,
        vec!["app/dev runs 0.2.0"],
    );
    for _ in 0..3 {
        source.observe(&spec("dev"), &observation("0.2.0", "0.2.0", Observed::InSync));
        source.settle().await;
    }
    assert_eq!(success.calls(), 1);
    assert_eq!(count(&stats.feedbacks), 2);
    assert_eq!(count(&stats.errors), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_given_up_on_closes_the_action_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (file, sha256) = artifact(dir.path(), "fw.bin", &ajour_testkit::firmware_bytes(1000, 2));
    let server = server();
    let target = server.add_target("dev");
    target.push_deployment(deployment("20", "0.2.0", &file, &sha256));
    let source = source(&server, |_| {});
    source.fetch_for(&spec("dev"), &asking("0.1.0")).await.unwrap();

    let failure = target.expect_deployment_feedback(
        "20",
        Execution::Closed,
        Finished::Failure,
        None,
        vec!["app/dev: it never came back on 0.2.0"],
    );
    for _ in 0..3 {
        source.observe(
            &spec("dev"),
            &observation(
                "0.1.0",
                "0.2.0",
                Observed::Failed {
                    reason: "it never came back on 0.2.0",
                },
            ),
        );
        source.settle().await;
    }
    assert_eq!(failure.calls(), 1);
    // A device on the version reached afterwards does not reopen it.
    source.observe(&spec("dev"), &observation("0.2.0", "0.2.0", Observed::InSync));
    source.settle().await;
    assert_eq!(count(&source.stats().feedbacks), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_not_matching_its_sha256_is_never_served_and_fails_the_action() {
    let dir = tempfile::tempdir().unwrap();
    let data = ajour_testkit::firmware_bytes(1000, 3);
    let (file, actual) = artifact(dir.path(), "fw.bin", &data);
    let declared = "0".repeat(64);
    let server = server();
    let target = server.add_target("dev");
    target.push_deployment(deployment("30", "0.2.0", &file, &declared));
    let expected = FetchError::Invalid {
        name: "Hawkbit action 30 of controller 'dev'".into(),
        reason: InvalidImage::ChecksumMismatch {
            declared: declared.clone(),
            actual,
        }
        .to_string(),
    };
    let failure = target.expect_deployment_feedback(
        "30",
        Execution::Closed,
        Finished::Failure,
        None,
        vec![expected.to_string().as_str()],
    );
    let source = source(&server, |_| {});
    for _ in 0..3 {
        let error = source
            .fetch_for(&spec("dev"), &asking("0.1.0"))
            .await
            .unwrap_err();
        assert_eq!(error, expected);
    }
    assert_eq!(failure.calls(), 1);
    assert_eq!(count(&source.stats().downloads), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_is_acknowledged_once_and_the_device_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (file, sha256) = artifact(dir.path(), "fw.bin", &ajour_testkit::firmware_bytes(1000, 4));
    let server = server();
    let target = server.add_target("dev");
    target.push_deployment(deployment("40", "0.2.0", &file, &sha256));
    // Every fetch polls.
    let source = source(&server, |config| config.max_poll = Some(Duration::ZERO));
    source.fetch_for(&spec("dev"), &asking("0.1.0")).await.unwrap();

    target.cancel_action("40");
    let acknowledged = target.expect_cancel_feedback(
        "40",
        Execution::Closed,
        Finished::Success,
        vec!["cancelled: Ajour stopped serving the update"],
    );
    for _ in 0..3 {
        let error = source
            .fetch_for(&spec("dev"), &asking("0.1.0"))
            .await
            .unwrap_err();
        assert_eq!(error, FetchError::NothingAssigned { poll_secs: 1 });
    }
    assert_eq!(target.cancel_action_hits(), 1);
    assert_eq!(acknowledged.calls(), 1);
    // Progress of the cancelled action is not reported.
    source.observe(
        &spec("dev"),
        &observation("0.1.0", "0.2.0", Observed::Updating { percent: 10.0 }),
    );
    source.settle().await;
    assert_eq!(count(&source.stats().feedbacks), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_second_deployment_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let first = ajour_testkit::firmware_bytes(2000, 5);
    let second = ajour_testkit::firmware_bytes(3000, 6);
    let (file1, sha1) = artifact(dir.path(), "fw1.bin", &first);
    let (file2, sha2) = artifact(dir.path(), "fw2.bin", &second);
    let server = server();
    let target = server.add_target("dev");
    target.push_deployment(deployment("50", "0.2.0", &file1, &sha1));
    let source = source(&server, |config| config.max_poll = Some(Duration::ZERO));

    let image = source.fetch_for(&spec("dev"), &asking("0.1.0")).await.unwrap();
    assert_eq!((image.version(), &image.data()[..]), ("0.2.0", &first[..]));
    let success = target.expect_deployment_feedback(
        "50",
        Execution::Closed,
        Finished::Success,
        None,
        vec!["app/dev runs 0.2.0"],
    );
    source.observe(&spec("dev"), &observation("0.2.0", "0.2.0", Observed::InSync));
    source.settle().await;
    assert_eq!(success.calls(), 1);

    target.push_deployment(deployment("51", "0.3.0", &file2, &sha2));
    let image = source.fetch_for(&spec("dev"), &asking("0.2.0")).await.unwrap();
    assert_eq!((image.version(), &image.data()[..]), ("0.3.0", &second[..]));
    assert_eq!(target.deployment_hits(), 1);
    let success = target.expect_deployment_feedback(
        "51",
        Execution::Closed,
        Finished::Success,
        None,
        vec!["app/dev runs 0.3.0"],
    );
    source.observe(&spec("dev"), &observation("0.3.0", "0.3.0", Observed::InSync));
    source.settle().await;
    assert_eq!(success.calls(), 1);
    assert_eq!(count(&source.stats().downloads), 2);
    assert_eq!(count(&source.stats().errors), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_assigned_is_a_wait_as_long_as_hawkbits_polling_sleep() {
    let server = server();
    let target = server.add_target("dev");
    let source = source(&server, |_| {});
    for _ in 0..10 {
        let error = source
            .fetch_for(&spec("dev"), &asking("0.1.0"))
            .await
            .unwrap_err();
        // The mock's sleep, 00:01:00.
        assert_eq!(error, FetchError::NothingAssigned { poll_secs: 60 });
    }
    assert_eq!(target.poll_hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hawkbit_refusing_or_down_is_unavailable_counted_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (file, sha256) = artifact(dir.path(), "fw.bin", &ajour_testkit::firmware_bytes(1000, 7));
    let server = server();

    // A controller Hawkbit does not know (404): unavailable, and asked again only after the
    // error retry.
    let patient = source(&server, |config| config.error_retry = Duration::from_secs(3600));
    for _ in 0..5 {
        match patient.fetch_for(&spec("late"), &asking("0.1.0")).await {
            Err(FetchError::Unavailable(reason)) => assert!(reason.contains("HTTP 404"), "{reason}"),
            other => panic!("{:?}", other.map(|i| i.version().to_string())),
        }
    }
    assert_eq!(count(&patient.stats().polls), 1);
    assert_eq!(count(&patient.stats().errors), 1);

    // It recovers by itself once Hawkbit answers.
    let eager = source(&server, |config| config.error_retry = Duration::ZERO);
    assert!(matches!(
        eager.fetch_for(&spec("late"), &asking("0.1.0")).await,
        Err(FetchError::Unavailable(_))
    ));
    let target = server.add_target("late");
    target.push_deployment(deployment("60", "0.2.0", &file, &sha256));
    let image = eager.fetch_for(&spec("late"), &asking("0.1.0")).await.unwrap();
    assert_eq!(image.version(), "0.2.0");
    assert_eq!(count(&eager.stats().errors), 1);

    // Hawkbit down (nothing listening): unavailable, counted.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let down = HawkbitSource::new(HawkbitConfig::new(url)).unwrap();
    assert!(matches!(
        down.fetch_for(&spec("dev"), &asking("0.1.0")).await,
        Err(FetchError::Unavailable(_))
    ));
    assert_eq!(count(&down.stats().errors), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_tokens_are_sent_for_their_controllers() {
    let dir = tempfile::tempdir().unwrap();
    let (file, sha256) = artifact(dir.path(), "fw.bin", &ajour_testkit::firmware_bytes(500, 8));
    // The mock wants `TargetToken Key{name}` here.
    let server = ServerBuilder::default().build();
    let target = server.add_target("dev");
    target.push_deployment(deployment("70", "0.2.0", &file, &sha256));
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# controller=token\ndev = Keydev\n").unwrap();
    let mut config = HawkbitConfig::new(server.base_url());
    config.gateway_token = Some("not-this-one".into());
    config.target_tokens_file = Some(tokens);
    let source = HawkbitSource::new(config).unwrap();
    let image = source.fetch_for(&spec("dev"), &asking("0.1.0")).await.unwrap();
    assert_eq!(image.version(), "0.2.0");
    // Another controller gets the gateway token, which this mock refuses.
    server.add_target("other");
    assert!(matches!(
        source.fetch_for(&spec("other"), &asking("0.1.0")).await,
        Err(FetchError::Unavailable(_))
    ));
}
