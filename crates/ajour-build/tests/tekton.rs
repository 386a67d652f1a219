//! The Tekton runner against a Kubernetes API server double: an axum server that stores
//! PipelineRuns as the API server does (create, get, merge patch, `Status` errors), records each
//! request, and lets a test play Tekton by setting a run's `status`.

use ajour_build::tekton::{go_duration, pipeline_run_name, TektonConfig, TektonRunner};
use ajour_build::{BuildEvent, BuildFailure, BuildJob, BuildReporter, BuildRunner, Publish, Published};
use ajour_types::build::{BuildPlan, BuildTarget};
use ajour_types::{AppName, DeviceName};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long a test waits for something that should happen at once before it fails.
const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq)]
struct Request {
    method: String,
    path: String,
    content_type: Option<String>,
    body: Option<Value>,
}

#[derive(Default)]
struct Inner {
    objects: HashMap<(String, String), Value>,
    requests: Vec<Request>,
    next_uid: u64,
    /// Answer this many GETs with a 500 first.
    failing_gets: usize,
}

#[derive(Clone)]
struct Double {
    inner: Arc<Mutex<Inner>>,
    /// Counts the POSTs received, so a test can wait for the run to be created.
    posts: Arc<watch::Sender<usize>>,
    /// Counts the GETs answered, so a test can wait for the runner to have read a change.
    gets: Arc<watch::Sender<usize>>,
}

fn status(code: StatusCode, reason: &str, message: String, name: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason,
        "details": {"name": name, "group": "tekton.dev", "kind": "pipelineruns"},
        "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = json!({});
            }
            let target = target.as_object_mut().unwrap();
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Double {
    async fn start() -> (Self, String) {
        let double = Double {
            inner: Arc::default(),
            posts: Arc::new(watch::channel(0).0),
            gets: Arc::new(watch::channel(0).0),
        };
        let app = Router::new()
            .route(
                "/apis/tekton.dev/v1/namespaces/{ns}/pipelineruns",
                post(Self::create),
            )
            .route(
                "/apis/tekton.dev/v1/namespaces/{ns}/pipelineruns/{name}",
                get(Self::get).patch(Self::patch),
            )
            .with_state(double.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (double, url)
    }

    fn record(&self, method: Method, path: String, headers: &HeaderMap, body: &Bytes) {
        let body = (!body.is_empty()).then(|| serde_json::from_slice(body).unwrap());
        let content_type = headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        self.inner.lock().unwrap().requests.push(Request {
            method: method.to_string(),
            path,
            content_type,
            body,
        });
    }

    async fn create(
        State(this): State<Self>,
        Path(ns): Path<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        this.record(
            Method::POST,
            format!("/apis/tekton.dev/v1/namespaces/{ns}/pipelineruns"),
            &headers,
            &body,
        );
        let response = {
            let mut inner = this.inner.lock().unwrap();
            let mut object: Value = serde_json::from_slice(&body).unwrap();
            let name = object["metadata"]["name"].as_str().unwrap().to_string();
            if inner.objects.contains_key(&(ns.clone(), name.clone())) {
                status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("pipelineruns.tekton.dev \"{name}\" already exists"),
                    &name,
                )
            } else {
                inner.next_uid += 1;
                let meta = object["metadata"].as_object_mut().unwrap();
                meta.insert(
                    "uid".into(),
                    format!("00000000-0000-0000-0000-{:012}", inner.next_uid).into(),
                );
                meta.insert("resourceVersion".into(), inner.next_uid.to_string().into());
                meta.insert("generation".into(), 1.into());
                meta.insert("creationTimestamp".into(), "2026-01-01T00:00:00Z".into());
                meta.insert("namespace".into(), ns.clone().into());
                // The status subresource: what a create sends as status is dropped.
                object.as_object_mut().unwrap().remove("status");
                inner.objects.insert((ns, name), object.clone());
                (StatusCode::CREATED, Json(object)).into_response()
            }
        };
        this.posts.send_modify(|n| *n += 1);
        response
    }

    async fn get(
        State(this): State<Self>,
        Path((ns, name)): Path<(String, String)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        this.record(
            Method::GET,
            format!("/apis/tekton.dev/v1/namespaces/{ns}/pipelineruns/{name}"),
            &headers,
            &body,
        );
        let response = this.answer_get(ns, name);
        this.gets.send_modify(|n| *n += 1);
        response
    }

    fn answer_get(&self, ns: String, name: String) -> Response {
        let mut inner = self.inner.lock().unwrap();
        if inner.failing_gets > 0 {
            inner.failing_gets -= 1;
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "etcdserver: request timed out".into(),
                &name,
            );
        }
        match inner.objects.get(&(ns, name.clone())) {
            Some(object) => Json(object.clone()).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("pipelineruns.tekton.dev \"{name}\" not found"),
                &name,
            ),
        }
    }

    async fn patch(
        State(this): State<Self>,
        Path((ns, name)): Path<(String, String)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        this.record(
            Method::PATCH,
            format!("/apis/tekton.dev/v1/namespaces/{ns}/pipelineruns/{name}"),
            &headers,
            &body,
        );
        let patch: Value = serde_json::from_slice(&body).unwrap();
        let mut inner = this.inner.lock().unwrap();
        inner.next_uid += 1;
        let version = inner.next_uid.to_string();
        match inner.objects.get_mut(&(ns, name.clone())) {
            Some(object) => {
                merge(object, &patch);
                object["metadata"]["resourceVersion"] = version.into();
                Json(object.clone()).into_response()
            }
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("pipelineruns.tekton.dev \"{name}\" not found"),
                &name,
            ),
        }
    }

    /// Wait until `n` POSTs were received.
    async fn posted(&self, n: usize) {
        let mut posts = self.posts.subscribe();
        tokio::time::timeout(PATIENCE, posts.wait_for(|count| *count >= n))
            .await
            .expect("the runner never created its PipelineRun")
            .unwrap();
    }

    /// Wait until the runner has read the run twice more: once perhaps already under way, and
    /// once that began after this call, so it saw what was set before.
    async fn read_again(&self) {
        let mut gets = self.gets.subscribe();
        let now = *gets.borrow_and_update();
        tokio::time::timeout(PATIENCE, gets.wait_for(|count| *count >= now + 2))
            .await
            .expect("the runner stopped reading its PipelineRun")
            .unwrap();
    }

    /// Play Tekton: set a run's `status`.
    fn set_status(&self, ns: &str, name: &str, status: Value) {
        let mut inner = self.inner.lock().unwrap();
        let object = inner
            .objects
            .get_mut(&(ns.to_string(), name.to_string()))
            .expect("no such PipelineRun");
        object["status"] = status;
    }

    fn insert(&self, ns: &str, name: &str, object: Value) {
        let mut inner = self.inner.lock().unwrap();
        inner.objects.insert((ns.into(), name.into()), object);
    }

    fn delete(&self, ns: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.objects.remove(&(ns.to_string(), name.to_string()));
    }

    fn object(&self, ns: &str, name: &str) -> Option<Value> {
        let inner = self.inner.lock().unwrap();
        inner.objects.get(&(ns.to_string(), name.to_string())).cloned()
    }

    fn requests(&self) -> Vec<Request> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// The (method, path) of each request, in order.
    fn calls(&self) -> Vec<(String, String)> {
        self.requests().into_iter().map(|r| (r.method, r.path)).collect()
    }
}

const NS: &str = "builds";

fn config() -> TektonConfig {
    TektonConfig {
        namespace: NS.into(),
        poll: Duration::from_millis(20),
        ..TektonConfig::default()
    }
}

fn runner(url: &str, config: TektonConfig) -> TektonRunner {
    // As the server does: ring is the provider (the workspace's tests link aws-lc-rs too).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    TektonRunner::new(client, config)
}

fn target(device: Option<&str>) -> BuildTarget {
    BuildTarget {
        app: AppName::parse("my-app").unwrap(),
        device: device.map(|d| DeviceName::parse(d).unwrap()),
    }
}

fn full_build() -> Value {
    json!({
        "image": "ghcr.io/drogue-iot/firmware-builder:1",
        "source": {"git": {"uri": "https://example.com/fw.git", "project": "app", "rev": "v1.2"}},
        "args": ["--release", "--features=x"],
        "env": [{"name": "A", "value": "x"}, {"name": "FEATURES", "value": ["a", "b"]}],
        "artifact": {"path": "out/firmware.bin"},
        "timeout": "1h",
        "version": "1.2.0",
    })
}

fn minimal_build() -> Value {
    json!({
        "image": "builder:latest",
        "source": {"git": {"uri": "https://example.com/other.git"}},
    })
}

fn job(id: i64, device: Option<&str>, build: Value) -> BuildJob {
    let target = target(device);
    let firmware = json!({"container": {"image": "registry:5000/my-fw:latest", "build": build}});
    BuildJob {
        id,
        plan: BuildPlan::from_firmware(&target, Some(&firmware)).unwrap(),
        target,
        publish: Publish::SpecImage,
    }
}

/// The reporter a build runs with, and what it reported.
struct Events {
    rx: mpsc::UnboundedReceiver<BuildEvent>,
    log: Vec<String>,
    references: Vec<String>,
}

fn reporting() -> (BuildReporter, Events) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        BuildReporter::new(tx),
        Events {
            rx,
            log: Vec::new(),
            references: Vec::new(),
        },
    )
}

impl Events {
    fn take(&mut self, event: BuildEvent) {
        match event {
            BuildEvent::Log(text) => self.log.extend(text.lines().map(str::to_string)),
            BuildEvent::Reference(reference) => self.references.push(reference),
        }
    }

    /// Wait for the log line `line`.
    async fn line(&mut self, line: &str) {
        let wait = async {
            while !self.log.iter().any(|l| l == line) {
                let event = self.rx.recv().await.expect("the build ended");
                self.take(event);
            }
        };
        if tokio::time::timeout(PATIENCE, wait).await.is_err() {
            panic!("no log line {line:?} in {:#?}", self.log);
        }
    }

    /// Everything reported so far (after the build ended: everything).
    fn drain(&mut self) {
        while let Ok(event) = self.rx.try_recv() {
            self.take(event);
        }
    }
}

/// Start `job` on a runner against the double, in the background.
fn spawn(
    runner: &Arc<TektonRunner>,
    job: BuildJob,
    reporter: BuildReporter,
) -> tokio::task::JoinHandle<Result<Published, BuildFailure>> {
    let runner = runner.clone();
    tokio::spawn(async move { runner.run(&job, &reporter).await })
}

async fn finished(
    handle: tokio::task::JoinHandle<Result<Published, BuildFailure>>,
) -> Result<Published, BuildFailure> {
    tokio::time::timeout(PATIENCE, handle)
        .await
        .expect("the build did not end")
        .unwrap()
}

fn succeeded_status(results: Value) -> Value {
    json!({
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded",
                        "message": "Tasks Completed: 3 (Failed: 0, Cancelled 0), Skipped: 0",
                        "lastTransitionTime": "2026-01-01T00:05:00Z"}],
        "startTime": "2026-01-01T00:00:01Z",
        "completionTime": "2026-01-01T00:05:00Z",
        "results": results,
    })
}

#[tokio::test]
async fn the_pipeline_run_of_an_application_build_is_the_pipelines_contract() {
    let (double, url) = Double::start().await;
    let runner = Arc::new(runner(&url, config()));
    let (reporter, mut events) = reporting();
    let build = spawn(&runner, job(42, None, full_build()), reporter);
    double.posted(1).await;
    double.set_status(
        NS,
        "app-my-app-42",
        json!({"conditions": [{"type": "Succeeded", "status": "False", "reason": "Failed", "message": "x"}]}),
    );
    finished(build).await.unwrap_err();

    let requests = double.requests();
    assert_eq!(requests[0].method, "POST");
    assert_eq!(
        requests[0].path,
        "/apis/tekton.dev/v1/namespaces/builds/pipelineruns"
    );
    assert_eq!(requests[0].content_type.as_deref(), Some("application/json"));
    let expected = json!({
        "apiVersion": "tekton.dev/v1",
        "kind": "PipelineRun",
        "metadata": {
            "name": "app-my-app-42",
            "namespace": "builds",
            "labels": {
                "app.kubernetes.io/managed-by": "ajour",
                "ajour.drogue.io/build": "42",
                "ajour.drogue.io/application": "my-app",
            },
        },
        "spec": {
            "pipelineRef": {"name": "oci-firmware"},
            "taskRunTemplate": {"serviceAccountName": "pipeline"},
            "timeouts": {"pipeline": "1h0m0s"},
            "params": [
                {"name": "GIT_REPO", "value": "https://example.com/fw.git"},
                {"name": "GIT_REVISION", "value": "v1.2"},
                {"name": "PROJECT_PATH", "value": "app"},
                {"name": "BUILDER_IMAGE", "value": "ghcr.io/drogue-iot/firmware-builder:1"},
                {"name": "BUILD_ARGS", "value": ["--release", "--features=x"]},
                {"name": "BUILD_ENV", "value": ["A=x", "FEATURES=a b"]},
                {"name": "ARTIFACT_PATH", "value": "out/firmware.bin"},
                {"name": "IMAGE", "value": "registry:5000/my-fw:latest"},
                {"name": "VERSION", "value": "1.2.0"},
            ],
            "workspaces": [{
                "name": "source",
                "volumeClaimTemplate": {"spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                }},
            }],
        },
    });
    assert_eq!(requests[0].body.as_ref(), Some(&expected));
    // The params keep their order.
    let names: Vec<&str> = requests[0].body.as_ref().unwrap()["spec"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "GIT_REPO",
            "GIT_REVISION",
            "PROJECT_PATH",
            "BUILDER_IMAGE",
            "BUILD_ARGS",
            "BUILD_ENV",
            "ARTIFACT_PATH",
            "IMAGE",
            "VERSION"
        ]
    );
    events.drain();
    assert_eq!(events.references, ["app-my-app-42"]);
    assert_eq!(
        events.log[0],
        "created PipelineRun app-my-app-42 in namespace builds"
    );
}

#[tokio::test]
async fn the_pipeline_run_of_a_device_build_takes_defaults_and_the_config() {
    let (double, url) = Double::start().await;
    let config = TektonConfig {
        pipeline: "my-pipeline".into(),
        service_account: "builder".into(),
        workspace_size: "5Gi".into(),
        ..config()
    };
    let runner = Arc::new(runner(&url, config));
    let (reporter, _events) = reporting();
    let build = spawn(&runner, job(43, Some("dev1"), minimal_build()), reporter);
    double.posted(1).await;
    double.delete(NS, "dev-my-app-dev1-43");
    finished(build).await.unwrap_err();

    let expected = json!({
        "apiVersion": "tekton.dev/v1",
        "kind": "PipelineRun",
        "metadata": {
            "name": "dev-my-app-dev1-43",
            "namespace": "builds",
            "labels": {
                "app.kubernetes.io/managed-by": "ajour",
                "ajour.drogue.io/build": "43",
                "ajour.drogue.io/application": "my-app",
                "ajour.drogue.io/device": "dev1",
            },
        },
        "spec": {
            "pipelineRef": {"name": "my-pipeline"},
            "taskRunTemplate": {"serviceAccountName": "builder"},
            "timeouts": {"pipeline": "30m0s"},
            "params": [
                {"name": "GIT_REPO", "value": "https://example.com/other.git"},
                {"name": "GIT_REVISION", "value": ""},
                {"name": "PROJECT_PATH", "value": "."},
                {"name": "BUILDER_IMAGE", "value": "builder:latest"},
                {"name": "BUILD_ARGS", "value": []},
                {"name": "BUILD_ENV", "value": []},
                {"name": "ARTIFACT_PATH", "value": "firmware.bin"},
                {"name": "IMAGE", "value": "registry:5000/my-fw:latest"},
                {"name": "VERSION", "value": ""},
            ],
            "workspaces": [{
                "name": "source",
                "volumeClaimTemplate": {"spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "5Gi"}},
                }},
            }],
        },
    });
    assert_eq!(double.requests()[0].body.as_ref(), Some(&expected));
}

#[test]
fn names_fit_kubernetes_and_labels_are_left_out_when_they_would_not() {
    assert_eq!(pipeline_run_name(&target(None), 42), "app-my-app-42");
    assert_eq!(pipeline_run_name(&target(Some("dev1")), 43), "dev-my-app-dev1-43");
    // Characters a Kubernetes name cannot have become '-', and long names are cut to 63.
    assert_eq!(
        pipeline_run_name(&target(Some("Sensor_1:a.b")), 7),
        "dev-my-app-sensor-1-a-b-7"
    );
    let long = format!("{}-x", "d".repeat(60));
    let name = pipeline_run_name(&target(Some(&long)), 123456);
    assert_eq!(name, format!("dev-my-app-{}-123456", "d".repeat(45)));
    assert_eq!(name.len(), 63);
    // A cut that would end in '-' drops it.
    let dashes = format!("{}-{}", "d".repeat(44), "e".repeat(20));
    assert_eq!(
        pipeline_run_name(&target(Some(&dashes)), 123456),
        format!("dev-my-app-{}-123456", "d".repeat(44))
    );

    let config = config();
    let run = |device: &str| {
        ajour_build::tekton::pipeline_run(&job(9, Some(device), minimal_build()), &config).unwrap()
    };
    assert_eq!(
        run("Sensor_1.b")["metadata"]["labels"]["ajour.drogue.io/device"],
        "Sensor_1.b"
    );
    for invalid in ["a:b", &"d".repeat(64), "_x"] {
        let labels = run(invalid)["metadata"]["labels"].clone();
        assert_eq!(
            labels,
            json!({"app.kubernetes.io/managed-by": "ajour", "ajour.drogue.io/build": "9",
                   "ajour.drogue.io/application": "my-app"}),
            "{invalid}"
        );
    }
}

#[tokio::test]
async fn a_succeeded_run_publishes_its_results_and_logs_each_condition() {
    let (double, url) = Double::start().await;
    let runner = Arc::new(runner(&url, config()));
    let (reporter, mut events) = reporting();
    let build = spawn(&runner, job(44, None, full_build()), reporter);
    double.posted(1).await;
    let name = "app-my-app-44";
    events
        .line("created PipelineRun app-my-app-44 in namespace builds")
        .await;

    double.set_status(
        NS,
        name,
        json!({"conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Started", "message": ""}]}),
    );
    events
        .line("PipelineRun app-my-app-44 Succeeded=Unknown (Started)")
        .await;
    double.set_status(
        NS,
        name,
        json!({"conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Running",
                               "message": "Tasks Completed: 1 (Failed: 0, Cancelled 0), Incomplete: 2, Skipped: 0"}]}),
    );
    events
        .line("PipelineRun app-my-app-44 Succeeded=Unknown (Running): Tasks Completed: 1 (Failed: 0, Cancelled 0), Incomplete: 2, Skipped: 0")
        .await;
    double.set_status(
        NS,
        name,
        succeeded_status(json!([
            {"name": "IMAGE_URL", "value": "registry:5000/my-fw:latest\n"},
            {"name": "IMAGE_DIGEST", "value": "sha256:0123abcd"},
            {"name": "VERSION", "value": "1.2.0"},
            {"name": "OTHER", "value": ["a"]},
        ])),
    );
    let published = finished(build).await.unwrap();
    assert_eq!(
        published,
        Published {
            image: "registry:5000/my-fw:latest".into(),
            digest: Some("sha256:0123abcd".into()),
            version: "1.2.0".into(),
        }
    );
    events.drain();
    assert_eq!(
        events.log,
        [
            "created PipelineRun app-my-app-44 in namespace builds",
            "PipelineRun app-my-app-44 Succeeded=Unknown (Started)",
            "PipelineRun app-my-app-44 Succeeded=Unknown (Running): Tasks Completed: 1 (Failed: 0, Cancelled 0), Incomplete: 2, Skipped: 0",
            "PipelineRun app-my-app-44 Succeeded=True (Succeeded): Tasks Completed: 3 (Failed: 0, Cancelled 0), Skipped: 0",
            "published registry:5000/my-fw:latest (sha256:0123abcd), version 1.2.0",
        ]
    );
    assert_eq!(events.references, [name]);
    // Nothing but the create and reads: no cancel.
    let calls = double.calls();
    assert_eq!(calls[0].0, "POST");
    assert!(calls[1..].iter().all(|(method, path)| method == "GET"
        && path == "/apis/tekton.dev/v1/namespaces/builds/pipelineruns/app-my-app-44"));
}

#[tokio::test]
async fn a_run_without_the_results_fails_clearly_and_a_digest_is_optional() {
    let (double, url) = Double::start().await;
    let runner = Arc::new(runner(&url, config()));

    let (reporter, _events) = reporting();
    let build = spawn(&runner, job(50, None, minimal_build()), reporter);
    double.posted(1).await;
    double.set_status(
        NS,
        "app-my-app-50",
        succeeded_status(
            json!([{"name": "IMAGE_URL", "value": "reg/fw:1"}, {"name": "VERSION", "value": "abc1234"}]),
        ),
    );
    assert_eq!(
        finished(build).await,
        Ok(Published {
            image: "reg/fw:1".into(),
            digest: None,
            version: "abc1234".into()
        })
    );

    let (reporter, _events) = reporting();
    let build = spawn(&runner, job(51, None, minimal_build()), reporter);
    double.posted(2).await;
    double.set_status(
        NS,
        "app-my-app-51",
        succeeded_status(json!([{"name": "IMAGE_URL", "value": "reg/fw:1"}])),
    );
    assert_eq!(
        finished(build).await,
        Err(BuildFailure::new(
            "PipelineRun app-my-app-51 succeeded but has no VERSION result: is its pipeline Ajour's oci-firmware?"
        ))
    );

    let (reporter, _events) = reporting();
    let build = spawn(&runner, job(52, None, minimal_build()), reporter);
    double.posted(3).await;
    double.set_status(NS, "app-my-app-52", succeeded_status(json!("nonsense")));
    assert_eq!(
        finished(build).await,
        Err(BuildFailure::new(
            "PipelineRun app-my-app-52 succeeded but has no IMAGE_URL result: is its pipeline Ajour's oci-firmware?"
        ))
    );
}

#[tokio::test]
async fn a_failed_run_fails_the_build_with_its_reason_and_message() {
    let (double, url) = Double::start().await;
    let runner = Arc::new(runner(&url, config()));
    let (reporter, mut events) = reporting();
    let build = spawn(&runner, job(45, Some("dev1"), full_build()), reporter);
    double.posted(1).await;
    double.set_status(
        NS,
        "dev-my-app-dev1-45",
        json!({"conditions": [{"type": "Succeeded", "status": "False", "reason": "Failed",
                               "message": "Tasks Completed: 2 (Failed: 1, Cancelled 0), Skipped: 1"}]}),
    );
    assert_eq!(
        finished(build).await,
        Err(BuildFailure::new(
            "PipelineRun dev-my-app-dev1-45 failed: Failed: Tasks Completed: 2 (Failed: 1, Cancelled 0), Skipped: 1"
        ))
    );
    events.drain();
    assert_eq!(
        events.log.last().unwrap(),
        "PipelineRun dev-my-app-dev1-45 Succeeded=False (Failed): Tasks Completed: 2 (Failed: 1, Cancelled 0), Skipped: 1"
    );
    assert!(double.calls().iter().all(|(method, _)| method != "PATCH"));
}

#[tokio::test]
async fn a_run_past_its_timeout_is_cancelled() {
    let (double, url) = Double::start().await;
    let runner = Arc::new(runner(
        &url,
        TektonConfig {
            grace: Duration::ZERO,
            ..config()
        },
    ));
    let mut build = minimal_build();
    build["timeout"] = "1s".into();
    let (reporter, mut events) = reporting();
    let started = std::time::Instant::now();
    let handle = spawn(&runner, job(46, None, build), reporter);
    double.posted(1).await;
    double.set_status(
        NS,
        "app-my-app-46",
        json!({"conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Running", "message": "..."}]}),
    );
    assert_eq!(
        finished(handle).await,
        Err(BuildFailure::new(
            "timed out after 1s (plus 0s grace): PipelineRun app-my-app-46 cancelled"
        ))
    );
    assert!(started.elapsed() >= Duration::from_secs(1));

    let patches: Vec<Request> = double
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(
        patches,
        [Request {
            method: "PATCH".into(),
            path: "/apis/tekton.dev/v1/namespaces/builds/pipelineruns/app-my-app-46".into(),
            content_type: Some("application/merge-patch+json".into()),
            body: Some(json!({"spec": {"status": "Cancelled"}})),
        }]
    );
    assert_eq!(double.calls().last().unwrap().0, "PATCH");
    let stored = double.object(NS, "app-my-app-46").unwrap();
    assert_eq!(stored["spec"]["status"], "Cancelled");
    assert_eq!(stored["spec"]["pipelineRef"]["name"], "oci-firmware");
    events.drain();
    assert_eq!(
        events.log.last().unwrap(),
        "timed out after 1s (plus 0s grace): cancelled PipelineRun app-my-app-46"
    );
}

#[tokio::test]
async fn a_duplicate_name_fails_without_touching_the_existing_run() {
    let (double, url) = Double::start().await;
    let existing = json!({"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
                          "metadata": {"name": "app-my-app-47", "namespace": NS, "uid": "other"}});
    double.insert(NS, "app-my-app-47", existing.clone());
    let runner = Arc::new(runner(&url, config()));
    let (reporter, mut events) = reporting();
    let result = finished(spawn(&runner, job(47, None, full_build()), reporter)).await;
    assert_eq!(
        result,
        Err(BuildFailure::new(
            "a PipelineRun named app-my-app-47 already exists in namespace builds: build 47 was not started over it (another Ajour instance, or a database that was reset?)"
        ))
    );
    assert_eq!(
        double.calls(),
        [(
            "POST".to_string(),
            "/apis/tekton.dev/v1/namespaces/builds/pipelineruns".to_string()
        )]
    );
    assert_eq!(double.object(NS, "app-my-app-47"), Some(existing));
    events.drain();
    assert!(events.references.is_empty());
    assert!(events.log.is_empty());
}

#[tokio::test]
async fn a_run_deleted_while_followed_fails_the_build() {
    let (double, url) = Double::start().await;
    let runner = Arc::new(runner(&url, config()));
    let (reporter, mut events) = reporting();
    let build = spawn(&runner, job(48, None, full_build()), reporter);
    double.posted(1).await;
    double.set_status(
        NS,
        "app-my-app-48",
        json!({"conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Running", "message": ""}]}),
    );
    events
        .line("PipelineRun app-my-app-48 Succeeded=Unknown (Running)")
        .await;
    double.delete(NS, "app-my-app-48");
    assert_eq!(
        finished(build).await,
        Err(BuildFailure::new(
            "PipelineRun app-my-app-48 was deleted while the build ran (404 Not Found in namespace builds)"
        ))
    );
    assert!(double.calls().iter().all(|(method, _)| method != "PATCH"));
}

#[tokio::test]
async fn read_errors_are_retried_then_fail_the_build() {
    let (double, url) = Double::start().await;
    let runner = Arc::new(runner(&url, config()));

    // Two errors, then the run is read again and succeeds.
    double.inner.lock().unwrap().failing_gets = 2;
    let (reporter, mut events) = reporting();
    let build = spawn(&runner, job(60, None, full_build()), reporter);
    double.posted(1).await;
    events
        .line("reading PipelineRun app-my-app-60 failed (2 of 5 attempts): 500 InternalError: etcdserver: request timed out")
        .await;
    double.set_status(
        NS,
        "app-my-app-60",
        succeeded_status(
            json!([{"name": "IMAGE_URL", "value": "reg/fw:1"}, {"name": "VERSION", "value": "1"}]),
        ),
    );
    assert_eq!(finished(build).await.unwrap().image, "reg/fw:1");

    // Errors that go on fail it.
    double.inner.lock().unwrap().failing_gets = 1000;
    let (reporter, _events) = reporting();
    let result = finished(spawn(&runner, job(61, None, full_build()), reporter)).await;
    assert_eq!(
        result,
        Err(BuildFailure::new(
            "could not read PipelineRun app-my-app-61 (5 attempts): 500 InternalError: etcdserver: request timed out"
        ))
    );
}

#[tokio::test]
async fn the_runner_refuses_a_spec_without_a_builder_image() {
    let (double, url) = Double::start().await;
    let runner = runner(&url, config());
    assert_eq!(runner.name(), "tekton");
    let mut build = minimal_build();
    build.as_object_mut().unwrap().remove("image");
    let job = job(49, None, build);
    assert_eq!(
        runner.check(&job.plan, Publish::SpecImage),
        Err("the Tekton runner needs build.image, the builder image".to_string())
    );
    assert_eq!(
        runner.check(&self::job(49, None, minimal_build()).plan, Publish::SpecImage),
        Ok(())
    );
    let (reporter, _events) = reporting();
    assert_eq!(
        runner.run(&job, &reporter).await,
        Err(BuildFailure::new(
            "the Tekton runner needs build.image, the builder image"
        ))
    );
    assert!(double.calls().is_empty());
}

#[tokio::test]
async fn an_empty_namespace_is_the_clients_default() {
    let (_double, url) = Double::start().await;
    let runner = runner(
        &url,
        TektonConfig {
            namespace: String::new(),
            ..config()
        },
    );
    assert_eq!(runner.config().namespace, "default");
    assert_eq!(TektonConfig::default().pipeline, "oci-firmware");
    assert_eq!(TektonConfig::default().service_account, "pipeline");
    assert_eq!(TektonConfig::default().poll, Duration::from_secs(5));
    assert_eq!(TektonConfig::default().workspace_size, "1Gi");
    assert_eq!(TektonConfig::default().grace, Duration::from_secs(120));
}

#[tokio::test]
async fn no_shape_of_status_breaks_the_runner() {
    let (double, url) = Double::start().await;
    let runner = Arc::new(runner(&url, config()));
    let (reporter, mut events) = reporting();
    let build = spawn(&runner, job(70, None, minimal_build()), reporter);
    double.posted(1).await;
    let name = "app-my-app-70";
    for status in [
        json!(null),
        json!("x"),
        json!([]),
        json!({"conditions": {}}),
        json!({"conditions": [1, null, "x", {"type": 3}, {"type": "Ready", "status": "True"}]}),
    ] {
        double.set_status(NS, name, status);
        double.read_again().await;
        assert!(!build.is_finished());
    }
    // A Succeeded condition of odd types reads as Unknown, with no reason or message.
    double.set_status(
        NS,
        name,
        json!({"conditions": [{"type": "Succeeded", "status": 1, "reason": ["x"], "message": {}}]}),
    );
    events.line("PipelineRun app-my-app-70 Succeeded=Unknown").await;
    // Results of odd shapes are missing results; a message over lines is one line.
    double.set_status(
        NS,
        name,
        json!({"conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded",
                               "message": "all\n  done"}],
               "results": [{"name": "IMAGE_URL", "value": {"a": 1}}, {"name": "VERSION"}, 7]}),
    );
    assert_eq!(
        finished(build).await,
        Err(BuildFailure::new(
            "PipelineRun app-my-app-70 succeeded but has no IMAGE_URL result: is its pipeline Ajour's oci-firmware?"
        ))
    );
    events.drain();
    assert_eq!(
        events.log,
        [
            "created PipelineRun app-my-app-70 in namespace builds",
            "PipelineRun app-my-app-70 Succeeded=Unknown",
            "PipelineRun app-my-app-70 Succeeded=True (Succeeded): all done",
        ]
    );
}

#[test]
fn timeouts_are_written_as_go_durations() {
    let cases = [
        (Duration::from_secs(1800), "30m0s"),
        (Duration::from_secs(3600), "1h0m0s"),
        (Duration::from_secs(5400), "1h30m0s"),
        (Duration::from_secs(90), "1m30s"),
        (Duration::from_secs(1), "1s"),
        (Duration::from_millis(1500), "1.5s"),
        (Duration::from_millis(500), "500ms"),
        (Duration::from_secs(24 * 3600), "24h0m0s"),
    ];
    for (duration, text) in cases {
        assert_eq!(go_duration(duration), text);
        // Go reads fractions too ("1.5s"); Ajour's parser reads the rest back.
        if !text.contains('.') {
            assert_eq!(ajour_types::build::parse_duration(text), Ok(duration));
        }
    }
    assert_eq!(go_duration(Duration::ZERO), "0s");
}

/// For a rollout, the pipeline pushes under the version's tag, which it must know up front.
#[tokio::test]
async fn publishing_under_the_version_tag_needs_the_version_and_names_that_tag() {
    let config = TektonConfig {
        namespace: "builds".into(),
        ..TektonConfig::default()
    };
    let mut versioned = minimal_build();
    versioned["version"] = json!("2.1.0");
    let mut job = self::job(50, None, versioned);
    job.publish = Publish::VersionTag;
    let run = ajour_build::tekton::pipeline_run(&job, &config).unwrap();
    let image = run["spec"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "IMAGE")
        .unwrap();
    assert_eq!(image["value"], "registry:5000/my-fw:2.1.0");

    let unversioned = self::job(51, None, minimal_build());
    let runner = runner("http://127.0.0.1:9", config);
    assert!(runner
        .check(&unversioned.plan, Publish::VersionTag)
        .unwrap_err()
        .contains("needs build.version"));
    assert_eq!(runner.check(&unversioned.plan, Publish::SpecImage), Ok(()));
}

/// A configured registry Secret is bound as the pipeline's `registry-credentials` workspace.
#[test]
fn a_registry_secret_is_bound_as_the_credentials_workspace() {
    let job = self::job(52, None, minimal_build());
    let without = TektonConfig {
        namespace: "builds".into(),
        ..TektonConfig::default()
    };
    let run = ajour_build::tekton::pipeline_run(&job, &without).unwrap();
    assert_eq!(run["spec"]["workspaces"].as_array().unwrap().len(), 1);
    let with = TektonConfig {
        registry_secret: Some("firmware-registry".into()),
        ..without
    };
    let run = ajour_build::tekton::pipeline_run(&job, &with).unwrap();
    assert_eq!(
        run["spec"]["workspaces"][1],
        json!({"name": "registry-credentials", "secret": {"secretName": "firmware-registry"}})
    );
}
