//! `HawkbitSource` against a DDI double written here (axum), for what `hawkbit_mock` cannot do:
//! a thousand controllers, Hawkbit answering 503 and then recovering, and every feedback body
//! recorded. The double serves the same JSON shapes as the mock (and as Hawkbit's DDI docs).

use ajour_hawkbit::{HawkbitConfig, HawkbitSource, HawkbitStats};
use ajour_store::{Asking, FetchError, FirmwareSource, FirmwareSpec, Observation, Observed};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every controller is assigned action 1: one distribution set, one artifact.
struct Double {
    url: String,
    artifact: Vec<u8>,
    /// Every request answered 503 while set.
    down: AtomicBool,
    polls: AtomicU64,
    downloads: AtomicU64,
    feedback: Mutex<Vec<(String, Value)>>,
}

type Shared = Arc<Double>;

fn unavailable(double: &Double) -> Option<Response> {
    double
        .down
        .load(Ordering::SeqCst)
        .then(|| StatusCode::SERVICE_UNAVAILABLE.into_response())
}

async fn poll(State(double): State<Shared>, Path(controller): Path<String>) -> Response {
    if let Some(down) = unavailable(&double) {
        return down;
    }
    double.polls.fetch_add(1, Ordering::SeqCst);
    let base = format!("{}/DEFAULT/controller/v1/{controller}", double.url);
    Json(json!({
        "config": {"polling": {"sleep": "00:05:00"}},
        "_links": {"deploymentBase": {"href": format!("{base}/deploymentBase/1?c=-42")}},
    }))
    .into_response()
}

async fn deployment(State(double): State<Shared>, Path(_controller): Path<String>) -> Response {
    if let Some(down) = unavailable(&double) {
        return down;
    }
    let sha256 = hex::encode(Sha256::digest(&double.artifact));
    Json(json!({
        "id": "1",
        "deployment": {"download": "forced", "update": "forced", "chunks": [{
            "part": "firmware", "version": "2.0.0", "name": "fw",
            "artifacts": [{
                "filename": "fw.bin", "size": double.artifact.len(),
                "hashes": {"sha256": sha256, "sha1": "-", "md5": "-"},
                "_links": {"download": {"href": format!("{}/artifacts/fw.bin", double.url)}},
            }],
        }]},
    }))
    .into_response()
}

async fn download(State(double): State<Shared>) -> Response {
    if let Some(down) = unavailable(&double) {
        return down;
    }
    double.downloads.fetch_add(1, Ordering::SeqCst);
    double.artifact.clone().into_response()
}

async fn feedback(
    State(double): State<Shared>,
    Path(controller): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    if let Some(down) = unavailable(&double) {
        return down;
    }
    double.feedback.lock().unwrap().push((controller, body));
    StatusCode::OK.into_response()
}

async fn start(artifact: Vec<u8>) -> Shared {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let double = Arc::new(Double {
        url: format!("http://{}", listener.local_addr().unwrap()),
        artifact,
        down: AtomicBool::new(false),
        polls: AtomicU64::new(0),
        downloads: AtomicU64::new(0),
        feedback: Mutex::default(),
    });
    let app = Router::new()
        .route("/DEFAULT/controller/v1/{controller}", get(poll))
        .route(
            "/DEFAULT/controller/v1/{controller}/deploymentBase/1",
            get(deployment),
        )
        .route(
            "/DEFAULT/controller/v1/{controller}/deploymentBase/1/feedback",
            post(feedback),
        )
        .route("/artifacts/fw.bin", get(download))
        .with_state(double.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    double
}

fn spec(controller: &str) -> FirmwareSpec {
    FirmwareSpec::Hawkbit {
        controller: controller.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_controllers_on_one_distribution_set_download_the_artifact_once() {
    let data = ajour_testkit::firmware_bytes(200_000, 9);
    let double = start(data.clone()).await;
    let source = Arc::new(HawkbitSource::new(HawkbitConfig::new(&double.url)).unwrap());
    let mut devices = tokio::task::JoinSet::new();
    // 250 at a time: within any open-file limit, and far more than take part in one download.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(250));
    for n in 0..1000 {
        let source = source.clone();
        let in_flight = in_flight.clone();
        devices.spawn(async move {
            let _permit = in_flight.acquire_owned().await.unwrap();
            let controller = format!("dev-{n}");
            let asking = Asking {
                device: &controller,
                current: "1.0.0",
            };
            // Every device reports a few times (as it would per block).
            let mut images = Vec::new();
            for _ in 0..3 {
                images.push(source.fetch_for(&spec(&controller), &asking).await.unwrap());
            }
            images
        });
    }
    let first = source
        .fetch_for(
            &spec("dev-0"),
            &Asking {
                device: "d",
                current: "1.0.0",
            },
        )
        .await
        .unwrap();
    while let Some(images) = devices.join_next().await {
        for image in images.unwrap() {
            assert!(
                Arc::ptr_eq(&image, &first),
                "one image shared by every controller"
            );
        }
    }
    assert_eq!(&first.data()[..], &data[..]);
    assert_eq!(double.downloads.load(Ordering::SeqCst), 1);
    assert_eq!(HawkbitStats::get(&source.stats().downloads), 1);
    // One poll per controller: its sleep (5 min) holds for the other reports.
    assert_eq!(double.polls.load(Ordering::SeqCst), 1000);
    assert_eq!(HawkbitStats::get(&source.stats().errors), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hawkbit_answering_503_makes_devices_wait_and_nothing_is_lost() {
    let data = ajour_testkit::firmware_bytes(5000, 10);
    let double = start(data).await;
    let mut config = HawkbitConfig::new(&double.url);
    config.error_retry = Duration::ZERO;
    config.feedback_interval = Duration::ZERO;
    let source = HawkbitSource::new(config).unwrap();
    let asking = Asking {
        device: "app/dev",
        current: "1.0.0",
    };

    double.down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        match source.fetch_for(&spec("dev"), &asking).await {
            Err(FetchError::Unavailable(reason)) => assert!(reason.contains("HTTP 503"), "{reason}"),
            other => panic!("{:?}", other.map(|i| i.version().to_string())),
        }
    }
    assert_eq!(HawkbitStats::get(&source.stats().errors), 3);

    // Back: the device gets its image, without anyone doing anything.
    double.down.store(false, Ordering::SeqCst);
    let image = source.fetch_for(&spec("dev"), &asking).await.unwrap();
    assert_eq!(image.version(), "2.0.0");

    // Progress: each change is sent (no interval here), a repeat is not.
    let observe = |current: &'static str, state| {
        source.observe(
            &spec("dev"),
            &Observation {
                device: "app/dev",
                current,
                target: "2.0.0",
                state,
            },
        )
    };
    for percent in [10.0, 10.4, 60.0] {
        observe("1.0.0", Observed::Updating { percent });
        source.settle().await;
    }

    // Down when the device arrives on the target version: the success is not lost, it is sent
    // when Hawkbit answers again, once.
    double.down.store(true, Ordering::SeqCst);
    observe("2.0.0", Observed::InSync);
    source.settle().await;
    double.down.store(false, Ordering::SeqCst);
    for _ in 0..3 {
        observe("2.0.0", Observed::InSync);
        source.settle().await;
    }
    let sent: Vec<Value> = double
        .feedback
        .lock()
        .unwrap()
        .iter()
        .map(|(controller, body)| {
            assert_eq!(controller, "dev");
            body["status"].clone()
        })
        .collect();
    assert_eq!(
        sent,
        vec![
            json!({"execution": "proceeding", "result": {"finished": "none", "progress": {"cnt": 10, "of": 100}},
                   "details": ["app/dev: 10% of 2.0.0 sent"]}),
            json!({"execution": "proceeding", "result": {"finished": "none", "progress": {"cnt": 60, "of": 100}},
                   "details": ["app/dev: 60% of 2.0.0 sent"]}),
            json!({"execution": "closed", "result": {"finished": "success"}, "details": ["app/dev runs 2.0.0"]}),
        ]
    );
}
