//! Firmware builds with the local runner, for real: a git repository made by the test, a build
//! command that writes the firmware, the artifact pushed to a real `docker-registry`, and a
//! device (the one simulator, every block and the checksum checked) updated to it through the
//! server, all from one trigger. Then what goes wrong: a bad git URL, a failing command, a
//! missing artifact, an artifact pointing out of the checkout, a timeout, each recorded with a
//! log that says why and the published image left as it was; a second trigger while one runs;
//! builds stopped with their server, or left open by a crashed one. The Tekton runner is tested
//! against a Kubernetes API double in `crates/ajour-build/tests/tekton.rs`; the build store on
//! both databases in `crates/ajour-registry/tests/builds.rs`.

use crate::support::*;
use ajour::server::{BuildRunnerKind, ServerConfig};
use ajour_registry::{BuildStore, NewBuild, SqlRegistry, SqlRegistryOptions};
use ajour_sim::Outcome;
use ajour_testkit::oci_registry::{sha256_digest, skopeo_raw_manifest};
use ajour_testkit::OciRegistry;
use ajour_types::build::BuildTarget;
use ajour_types::AppName;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

async fn build_server(
    backend: Backend,
    registry: &OciRegistry,
    adjust: impl FnOnce(&mut ServerConfig),
) -> TestServer {
    let oci = oci_config(registry);
    TestServer::start_with(backend, move |c| {
        c.oci = Some(oci);
        c.builds.runner = BuildRunnerKind::Local;
        adjust(c);
    })
    .await
}

fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .output()
        .expect("git (scripts/setup-test-env.sh installs it)");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A repository whose `firmware/build.sh` writes `out/firmware.bin` (content naming the commit)
/// and prints its environment; the path, and the short hash of its one commit.
fn firmware_repository(dir: &Path) -> (PathBuf, String) {
    let repo = dir.join("firmware-src");
    std::fs::create_dir_all(repo.join("firmware")).unwrap();
    std::fs::write(
        repo.join("firmware/build.sh"),
        "set -e\n\
         echo \"greeting: $GREETING\"\n\
         env | sort | sed 's/^/env: /'\n\
         mkdir -p out\n\
         seq 1 3000 | sed \"s/^/firmware $AJOUR_BUILD_COMMIT line /\" > out/firmware.bin\n\
         echo \"wrote $(wc -c < out/firmware.bin) bytes\"\n",
    )
    .unwrap();
    git(&repo, &["init", "--quiet", "--initial-branch=main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "--quiet", "-m", "firmware"]);
    let commit = git(&repo, &["rev-parse", "--short=12", "HEAD"]);
    (repo, commit)
}

/// The firmware section of an application built from `repo` with `build` merged over a build
/// that works.
fn built_firmware(repo: &Path, build: Value) -> Value {
    let mut section = json!({
        "source": {"git": {"uri": repo.to_str().unwrap(), "project": "firmware", "rev": "main"}},
        "command": ["sh", "build.sh"],
        "env": [{"name": "GREETING", "value": ["hello", "builder"]}],
        "artifact": {"path": "out/firmware.bin"},
        "timeout": "2m"
    });
    for (key, value) in build.as_object().unwrap() {
        section[key] = value.clone();
    }
    json!({"container": {"image": "app-fw:latest", "imagePullPolicy": "Always", "build": section}})
}

async fn build_api(server: &Connection, method: Method, path: &str) -> (StatusCode, Value) {
    let url = format!("{}/api/build/v1alpha1/{path}", server.url);
    let url = url.trim_end_matches('/');
    let response = server
        .http
        .request(method, url)
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The `ajour` CLI against the server, off the runtime's thread (the server runs on it).
async fn cli(server: &TestServer, args: &[&str]) -> std::process::Output {
    let data_dir = server.data_dir.path().to_path_buf();
    let url = server.url.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_with(&data_dir, &url, &args)
    })
    .await
    .unwrap()
}

async fn trigger(server: &Connection, app: &str) -> Value {
    let (status, build) = build_api(server, Method::POST, &format!("apps/{app}/trigger")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{build}");
    assert_eq!(build["state"], "queued", "{build}");
    build
}

/// Ask for the build until `done` says it is what the test waits for (a minute at most).
async fn wait_for_build(server: &Connection, id: &Value, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, build) = build_api(server, Method::GET, &format!("builds/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{build}");
        if done(&build) {
            return build;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "build {id} never got there: {build}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ended(server: &Connection, id: &Value) -> Value {
    wait_for_build(server, id, |b| {
        matches!(b["state"].as_str(), Some("succeeded" | "failed"))
    })
    .await
}

async fn log_of(server: &Connection, id: &Value) -> String {
    let (status, log) = build_api(server, Method::GET, &format!("builds/{id}/log")).await;
    assert_eq!(status, StatusCode::OK, "{log}");
    log["text"].as_str().unwrap().to_string()
}

async fn set_firmware(server: &Connection, app: &str, firmware: Value) {
    let (status, mut object) = server.api_send(Method::GET, &format!("apps/{app}"), None).await;
    assert_eq!(status, StatusCode::OK);
    object["spec"]["firmware"] = firmware;
    let (status, body) = server
        .api_send(Method::PUT, &format!("apps/{app}"), Some(object))
        .await;
    assert!(status.is_success(), "{body}");
}

#[tokio::test]
async fn one_trigger_builds_pushes_and_updates_a_device_and_the_cli_follows_it() {
    let registry = OciRegistry::start().await;
    let server = build_server(Backend::Sqlite, &registry, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (repo, commit) = firmware_repository(dir.path());
    server
        .create_app("built", Some(built_firmware(&repo, json!({}))))
        .await;
    server.create_device("built", "dev1", "pw", None).await;

    // The CLI triggers and follows the log to the end, and exits with the outcome.
    let output = cli(&server, &["build", "trigger", "built", "--follow"]).await;
    let printed = succeeded(output);
    assert!(printed.contains("greeting: hello builder"), "{printed}");
    assert!(printed.contains(&format!("at commit {commit}")), "{printed}");
    assert!(
        printed.contains(&format!("succeeded, version {commit}")),
        "{printed}"
    );
    // The build command saw the spec's environment, and nothing of the server's own.
    assert!(printed.contains("env: GREETING=hello builder"), "{printed}");
    assert!(
        printed.contains(&format!("env: AJOUR_BUILD_COMMIT={commit}")),
        "{printed}"
    );
    assert!(
        !printed.contains("env: CARGO"),
        "the server's environment leaked: {printed}"
    );

    let (status, listed) = build_api(&server, Method::GET, "apps/built").await;
    assert_eq!(status, StatusCode::OK);
    let build = &listed["builds"][0];
    assert_eq!(listed["current"], Value::Null, "{listed}");
    assert_eq!(build["state"], "succeeded");
    assert_eq!(build["version"], commit.as_str());
    assert_eq!(build["runner"], "local");
    assert_eq!(build["spec"], built_firmware(&repo, json!({})));
    let reference = format!("{}/fw/app-fw:latest", registry.host());
    assert_eq!(build["image"], reference.as_str());
    // The digest recorded is the one the registry serves for the tag.
    assert_eq!(
        build["digest"],
        sha256_digest(&skopeo_raw_manifest(&reference, None)).as_str()
    );
    assert!(build["startedAt"].as_i64() <= build["completedAt"].as_i64());

    // The original's list: the application with its latest build.
    let (_, all) = build_api(&server, Method::GET, "").await;
    let entry = all
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["app"] == "built")
        .expect("listed");
    assert_eq!(entry["status"], "succeeded");
    assert_eq!(entry["version"], commit.as_str());
    assert!(entry["started"].as_str().unwrap().ends_with('Z'));

    // The device updates to what was built: the very bytes the build wrote.
    let (outcome, device) = update_over_http(&server, "built", "dev1", "1.0.0", Some(512)).await;
    let expected: String = (1..=3000)
        .map(|i| format!("firmware {commit} line {i}\n"))
        .collect();
    assert_eq!(outcome, updated_to(&commit, expected.len()));
    assert_eq!(device.written(), expected.as_bytes());
    assert!(in_sync(&server.firmware("built", "dev1").await, &commit));

    // `ajour build get` and `logs` show it too.
    let id = build["id"].to_string();
    let shown = succeeded(cli(&server, &["build", "get", &id]).await);
    assert!(
        shown.contains(&format!("build {id} of built: succeeded, version {commit}")),
        "{shown}"
    );
    let logs = succeeded(cli(&server, &["build", "logs", &id]).await);
    assert!(logs.contains(&format!("pushed {reference}")), "{logs}");
    server.stop().await;
}

#[tokio::test]
async fn failed_builds_say_why_and_leave_devices_and_the_image_alone() {
    let registry = OciRegistry::start().await;
    let server = build_server(Backend::Postgres, &registry, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (repo, commit) = firmware_repository(dir.path());
    server
        .create_app("flaky", Some(built_firmware(&repo, json!({}))))
        .await;
    server.create_device("flaky", "dev1", "pw", None).await;
    let first = trigger(&server, "flaky").await;
    assert_eq!(ended(&server, &first["id"]).await["state"], "succeeded");
    let (outcome, _) = update_over_http(&server, "flaky", "dev1", "1.0.0", None).await;
    assert!(
        matches!(outcome, Outcome::Updated { ref to, .. } if *to == commit),
        "{outcome:?}"
    );
    let reference = format!("{}/fw/app-fw:latest", registry.host());
    let published = skopeo_raw_manifest(&reference, None);

    // A file outside the checkout, for the artifact that points at it.
    std::fs::write(dir.path().join("secret"), "not firmware").unwrap();
    let outside = dir.path().join("secret");
    let cases = [
        (
            json!({"source": {"git": {"uri": dir.path().join("no-such-repo").to_str().unwrap()}}}),
            "cloning",
            "does not exist",
        ),
        (
            json!({"command": ["sh", "-c", "echo compiler exploded >&2; exit 3"]}),
            "the build command failed (exit status: 3)",
            "compiler exploded",
        ),
        (
            json!({"artifact": {"path": "out/missing.bin"}}),
            "the build wrote no artifact at out/missing.bin",
            "wrote",
        ),
        (
            json!({"command": ["sh", "-c", format!("sh build.sh && ln -sf {} out/firmware.bin", outside.display())]}),
            "the artifact out/firmware.bin points outside the build's directory",
            "wrote",
        ),
        (
            json!({"command": ["sh", "-c", "echo waiting; sleep 600"], "timeout": "1s"}),
            "timed out after 1s",
            "waiting",
        ),
        (
            json!({"source": {"git": {"uri": repo.to_str().unwrap(), "project": "firmware", "rev": "no-such-branch"}}}),
            "revision 'no-such-branch' is not in the repository",
            "git clone",
        ),
    ];
    for (build, message, in_log) in cases {
        set_firmware(&server, "flaky", built_firmware(&repo, build.clone())).await;
        let triggered = trigger(&server, "flaky").await;
        let failed = ended(&server, &triggered["id"]).await;
        assert_eq!(failed["state"], "failed", "{build}: {failed}");
        let got = failed["message"].as_str().unwrap();
        assert!(got.contains(message), "{build}: {got}");
        let log = log_of(&server, &triggered["id"]).await;
        assert!(log.contains(in_log), "{build}: {log}");
        assert!(log.contains("build failed: "), "{build}: {log}");
        assert_eq!(failed["image"], Value::Null);
        // The tag holds what the good build pushed, and the device stays in sync on it.
        assert_eq!(skopeo_raw_manifest(&reference, None), published, "{build}");
        let (outcome, _) = update_over_http(&server, "flaky", "dev1", &commit, None).await;
        assert_eq!(
            outcome,
            Outcome::InSync {
                version: commit.clone()
            },
            "{build}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn one_build_per_target_at_a_time_and_a_stopping_server_records_its_builds_failed() {
    let registry = OciRegistry::start().await;
    let mut server = build_server(Backend::Sqlite, &registry, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = firmware_repository(dir.path());
    // The build blocks reading a FIFO nobody writes: it runs until stopped.
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let blocking = json!({"command": ["sh", "-c", format!("echo blocked; cat {}", fifo.display())]});
    server
        .create_app("busy", Some(built_firmware(&repo, blocking)))
        .await;
    server
        .create_device("busy", "own", "pw", Some(built_firmware(&repo, json!({}))))
        .await;

    let running = trigger(&server, "busy").await;
    let id = running["id"].clone();
    wait_for_build(&server, &id, |b| b["state"] == "running").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !log_of(&server, &id).await.contains("blocked") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the build never started its command"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, refused) = build_api(&server, Method::POST, "apps/busy/trigger").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains(&format!("build {id}")),
        "{refused}"
    );
    // Another target (the device's own firmware) builds meanwhile.
    let (status, other) = build_api(&server, Method::POST, "apps/busy/devices/own/trigger").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{other}");
    assert_eq!(ended(&server, &other["id"]).await["state"], "succeeded");
    let (_, current) = build_api(&server, Method::GET, "apps/busy").await;
    assert_eq!(current["current"]["id"], id);

    server.shut_down().await;
    server.start_again().await;
    let stopped = ended(&server, &id).await;
    assert_eq!(stopped["state"], "failed");
    assert_eq!(stopped["message"], "the server stopped during the build");
    // The target is free again.
    let again = trigger(&server, "busy").await;
    assert_ne!(again["id"], id);
    server.stop().await;
}

#[tokio::test]
async fn a_build_left_open_by_a_crashed_instance_is_closed_when_its_lease_runs_out() {
    let registry = OciRegistry::start().await;
    let server = build_server(Backend::Postgres, &registry, |c| {
        c.builds.lease = Duration::from_millis(400)
    })
    .await;
    // What a crashed instance leaves: a build recorded running, its lease renewed long ago.
    let database = SqlRegistry::connect(server.database().unwrap().url(), SqlRegistryOptions::default())
        .await
        .unwrap();
    let target = BuildTarget {
        app: AppName::parse("crashed").unwrap(),
        device: None,
    };
    let long_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let orphan = database
        .create_build(NewBuild {
            target: &target,
            runner: "local",
            spec: &json!({}),
            now: long_ago,
        })
        .await
        .unwrap();
    database.start_build(orphan.id, None, long_ago).await.unwrap();
    let closed = ended(&server, &json!(orphan.id)).await;
    assert_eq!(closed["state"], "failed");
    assert!(
        closed["message"].as_str().unwrap().starts_with("abandoned"),
        "{closed}"
    );
    assert!(log_of(&server, &json!(orphan.id)).await.contains("abandoned"));
    server.stop().await;
}

#[tokio::test]
async fn triggers_that_cannot_build_are_answered_clearly() {
    let registry = OciRegistry::start().await;
    let server = build_server(Backend::Sqlite, &registry, |c| {
        c.builds.allowed_apps = vec!["allowed".into(), "files".into(), "nocommand".into()]
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (repo, _) = firmware_repository(dir.path());
    server
        .create_app("allowed", Some(json!({"container": {"image": "fw:1"}})))
        .await;
    server
        .create_app("files", Some(json!({"file": {"name": "fw"}})))
        .await;
    server
        .create_app("other", Some(built_firmware(&repo, json!({}))))
        .await;
    let mut no_command = built_firmware(&repo, json!({}));
    no_command["container"]["build"]
        .as_object_mut()
        .unwrap()
        .remove("command");
    server.create_app("nocommand", Some(no_command)).await;

    let cases = [
        (
            "apps/files/trigger",
            StatusCode::NOT_IMPLEMENTED,
            "not a container image",
        ),
        (
            "apps/allowed/trigger",
            StatusCode::NOT_IMPLEMENTED,
            "has no build section",
        ),
        ("apps/other/trigger", StatusCode::FORBIDDEN, "not allowed"),
        (
            "apps/nocommand/trigger",
            StatusCode::BAD_REQUEST,
            "needs build.command",
        ),
        ("apps/ghost/trigger", StatusCode::FORBIDDEN, "not allowed"),
        (
            "apps/allowed/devices/ghost/trigger",
            StatusCode::NOT_FOUND,
            "not found",
        ),
        ("apps/..%2F..%2Fetc%2Fpasswd/trigger", StatusCode::BAD_REQUEST, ""),
    ];
    for (path, code, message) in cases {
        let (status, body) = build_api(&server, Method::POST, path).await;
        assert_eq!(status, code, "{path}: {body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains(message),
            "{path}: {body}"
        );
    }
    let (status, _) = build_api(&server, Method::GET, "builds/999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // No token, no builds.
    let response = server
        .http
        .post(format!("{}/api/build/v1alpha1/apps/allowed/trigger", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    server.stop().await;

    // Builds off (the default): 501 saying how to turn them on.
    let off = TestServer::start(Backend::Sqlite).await;
    let (status, body) = build_api(&off, Method::POST, "apps/any/trigger").await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    assert!(
        body["message"].as_str().unwrap().contains("--build-runner"),
        "{body}"
    );
    off.stop().await;
}

#[tokio::test]
async fn a_build_can_start_a_rollout_of_its_result_leaving_the_served_tag_alone() {
    let registry = OciRegistry::start().await;
    let server = build_server(Backend::Sqlite, &registry, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (repo, first) = firmware_repository(dir.path());
    server
        .create_app("rolled", Some(built_firmware(&repo, json!({}))))
        .await;
    for device in ["d1", "d2"] {
        server.create_device("rolled", device, "pw", None).await;
    }
    let built = trigger(&server, "rolled").await;
    assert_eq!(ended(&server, &built["id"]).await["state"], "succeeded");
    let served = format!("{}/fw/app-fw:latest", registry.host());
    let served_manifest = skopeo_raw_manifest(&served, None);

    // A new commit, built with a rollout of its result.
    std::fs::write(repo.join("firmware/VERSION"), "2\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "--quiet", "-m", "second"]);
    let second = git(&repo, &["rev-parse", "--short=12", "HEAD"]);
    let url = format!("{}/api/build/v1alpha1/apps/rolled/trigger", server.url);
    let post = |body: Value| {
        server
            .http
            .post(&url)
            .bearer_auth(&server.token)
            .json(&body)
            .send()
    };

    // Refused up front: a rollout spec that does not hold, and a body with unknown fields.
    let refused = post(json!({"rollout": {"waves": []}})).await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert!(refused.text().await.unwrap().contains("rollout: "));
    let refused = post(json!({"rollout": {"waves": [{"percent": 100}]}, "extra": 1}))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);

    // Through the CLI, as a user would.
    let printed = succeeded(
        cli(
            &server,
            &["build", "trigger", "rolled", "--rollout-wave", "100%", "--follow"],
        )
        .await,
    );
    assert!(
        printed.contains("started rollout 1 of application rolled"),
        "{printed}"
    );
    let (_, builds) = build_api(&server, Method::GET, "apps/rolled").await;
    let build = builds["builds"][0].clone();
    assert_eq!(build["state"], "succeeded", "{build}");
    assert_eq!(build["version"], second.as_str());
    // Published under its version's tag; the tag the application serves is as it was.
    let versioned = format!("{}/fw/app-fw:{second}", registry.host());
    assert_eq!(build["image"], versioned.as_str());
    assert_eq!(skopeo_raw_manifest(&served, None), served_manifest);
    let log = log_of(&server, &build["id"]).await;
    assert!(log.contains("started rollout 1 of application rolled"), "{log}");

    // The rollout rolls out exactly that image, its build section kept.
    let (status, rollout) = server
        .http
        .get(format!("{}/api/dfu/v1alpha1/apps/rolled/rollouts/1", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .map(|r| (r.status(), r))
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let rollout: Value = rollout.json().await.unwrap();
    let mut expected = built_firmware(&repo, json!({}));
    expected["container"]["image"] = json!(format!("app-fw:{second}"));
    assert_eq!(rollout["spec"]["firmware"], expected, "{rollout}");

    // And the devices get it through the rollout.
    for device in ["d1", "d2"] {
        let (outcome, _) = update_over_http(&server, "rolled", device, &first, None).await;
        assert!(
            matches!(outcome, Outcome::Updated { ref to, .. } if *to == second),
            "{device}: {outcome:?}"
        );
    }
    server.stop().await;
}
