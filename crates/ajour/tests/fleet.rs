//! A fleet updating through the real binaries (`ajour serve`, `ajour simulate`, whose devices check
//! every block's offset and the Swap checksum and retry as devices do) while an operator gets in
//! the way: the server killed (`kill -9`) and started again, the firmware replaced under the same
//! version; and two instances on one PostgreSQL database, one of them killed, or the database
//! restarted under both. Every device ends with exactly one image, whole, and shown in sync.

use ajour_testkit::{eventually, Metrics, PostgresServer, ServerProcess, TestDatabase};
use futures_util::FutureExt;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");
const TOKEN: &str = "restart-test-token";
const DEVICES: u32 = 20;
/// 512 blocks of 256 bytes per device: long enough to be cut in the middle.
const IMAGE: usize = 128 * 1024;

/// The secret device passwords are sealed with, the same for every instance on one database
/// (a test's own, not a secret).
const CREDENTIAL_SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// `ajour serve` on `listen` with the fleet's data directory (its firmware files; and its SQLite
/// registry, unless `registry` names a database).
async fn serve(data_dir: &std::path::Path, listen: &str, registry: &[String]) -> ServerProcess {
    let mut command = Command::new(AJOUR);
    command
        .args(["serve", "--listen", listen, "--api-token", TOKEN])
        .args(["--progress-interval-ms", "0"])
        .args(registry)
        .arg("--data-dir")
        .arg(data_dir)
        .env("AJOUR_LOG", "warn");
    ServerProcess::start(command).await
}

/// The registry options of instances sharing the PostgreSQL database at `url`.
fn on_postgres(url: &str) -> Vec<String> {
    ["--database-url", url, "--credential-secret", CREDENTIAL_SECRET]
        .map(String::from)
        .to_vec()
}

/// Run the `ajour` CLI; `url`: a management command against that server.
fn ajour(args: &[&str], url: Option<&str>, data_dir: &std::path::Path) -> std::process::Output {
    let mut command = Command::new(AJOUR);
    command
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("AJOUR_LOG", "warn");
    if let Some(url) = url {
        command.args(["--url", url, "--token", TOKEN]);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "ajour {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The fleet's devices' `status.firmware` as the server at `url` shows them; none when it does
/// not answer (it may be down on purpose).
async fn fleet_reports(url: &str) -> Vec<ajour_types::FirmwareReport> {
    let devices: Value = match reqwest::Client::new()
        .get(format!("{url}/api/registry/v1alpha1/apps/fleet/devices"))
        .bearer_auth(TOKEN)
        .send()
        .await
    {
        Ok(response) => response.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    devices
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| ajour_types::FirmwareReport::from_json(&d["status"]["firmware"]).ok())
        .collect()
}

/// The highest update progress any device of the fleet shows, in percent.
async fn furthest_progress(url: &str) -> f64 {
    fleet_reports(url)
        .await
        .into_iter()
        .filter_map(|report| report.status.percent())
        .fold(0.0, f64::max)
}

/// Whether every device of the fleet is shown in sync on `digest` by the server at `url`.
async fn all_in_sync(url: &str, digest: &str) -> bool {
    let reports = fleet_reports(url).await;
    reports.len() == DEVICES as usize
        && reports.iter().all(|report| {
            report.status.state == ajour_types::FirmwareState::InSync
                && report.status.target_digest.as_deref() == Some(digest)
        })
}

/// Check that the history of every device of the fleet, as the server at `url` shows it, tells
/// its update once: started, each milestone, (swapping,) in sync on 2.0.0, in that order.
async fn each_history_tells_the_update_once(url: &str) {
    for i in 0..DEVICES {
        let history: Value = reqwest::Client::new()
            .get(format!(
                "{url}/api/dfu/v1alpha1/apps/fleet/devices/dev-{i}/history"
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let told: Vec<String> = history
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .map(|e| match e["percent"].as_f64() {
                Some(percent) => format!("{} {percent}", e["kind"].as_str().unwrap()),
                None => e["kind"].as_str().unwrap().to_string(),
            })
            .filter(|kind| kind != "swapping") // told when the 100% status was written
            .collect();
        assert_eq!(
            told,
            ["started", "progress 25", "progress 50", "progress 75", "inSync"],
            "dev-{i}: {history:#}"
        );
        let in_sync = &history[0];
        assert_eq!(in_sync["current"], "2.0.0", "dev-{i}: {history:#}");
    }
}

/// Wait until the server at `url` shows every device of the fleet in sync on `image`.
async fn wait_all_in_sync(url: &str, image: &[u8], what: &str) {
    let digest = digest(image);
    eventually(Duration::from_secs(30), what, || all_in_sync(url, &digest)).await;
}

fn digest(image: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(image))
}

/// Whether the server at `url` answers `/readyz` with `status`.
async fn readiness_is(url: &str, status: reqwest::StatusCode) -> bool {
    reqwest::get(format!("{url}/readyz"))
        .await
        .is_ok_and(|response| response.status() == status)
}

/// Servers (one, or several sharing a database) with an application `fleet` of `DEVICES`
/// devices that should run `fw` 2.0.0, made of `image`, and `ajour simulate` updating them from
/// 1.0.0, its statuses spread over every server in turn.
struct Fleet {
    data: tempfile::TempDir,
    servers: Vec<ServerProcess>,
    simulate: std::process::Child,
}

impl Fleet {
    /// One server on its own SQLite registry.
    async fn start(image: &[u8]) -> Self {
        Self::start_instances(image, 1, &[]).await
    }

    /// `instances` servers on the registry `registry` names, sharing a data directory (the
    /// firmware files) as replicas share a volume or an image.
    async fn start_instances(image: &[u8], instances: usize, registry: &[String]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let firmware = data.path().join("fw.bin");
        std::fs::write(&firmware, image).unwrap();
        let mut servers = Vec::new();
        for _ in 0..instances {
            servers.push(serve(data.path(), "127.0.0.1:0", registry).await);
        }
        let url = servers[0].url();
        let fw = firmware.to_str().unwrap();
        ajour(
            &["firmware", "add", "fw", "--version", "2.0.0", "--file", fw],
            None,
            data.path(),
        );
        ajour(
            &["app", "create", "fleet", "--firmware-file", "fw"],
            Some(&url),
            data.path(),
        );
        let count = DEVICES.to_string();
        let create = [
            "device",
            "create",
            "fleet",
            "dev",
            "--password",
            "pw",
            "--count",
            &count,
        ];
        ajour(&create, Some(&url), data.path());
        let mut simulate = Command::new(AJOUR);
        simulate.arg("simulate");
        for server in &servers {
            simulate.args(["--url", &server.url()]);
        }
        let simulate = simulate
            .args(["--app", "fleet", "--device", "dev", "--password", "pw"])
            .args([
                "--version",
                "1.0.0",
                "--count",
                &count,
                "--concurrency",
                &count,
                "--mtu",
                "256",
            ])
            .args(["--timeout", "120"])
            .env("AJOUR_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            data,
            servers,
            simulate,
        }
    }

    fn urls(&self) -> Vec<String> {
        self.servers.iter().map(ServerProcess::url).collect()
    }

    /// Wait until some device is a fifth of the way and none past half of it, so what the test
    /// does next (within a second) reaches every device before it is done.
    async fn in_the_middle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut progress = 0.0;
        while progress < 20.0 {
            assert!(
                Instant::now() < deadline,
                "the fleet did not get going ({progress}%)"
            );
            assert!(
                self.simulate.try_wait().unwrap().is_none(),
                "the fleet finished too soon"
            );
            progress = furthest_progress(&self.servers[0].url()).await;
        }
        assert!(
            progress < 50.0,
            "the fleet went too fast for the test: {progress}%"
        );
    }

    /// Wait for `ajour simulate` and check that every device was updated, checksum verified.
    async fn all_updated(self) -> (tempfile::TempDir, Vec<ServerProcess>) {
        let finished = tokio::task::spawn_blocking(move || self.simulate.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&finished.stdout);
        assert!(
            finished.status.success(),
            "simulate failed: {stdout}\n{}",
            String::from_utf8_lossy(&finished.stderr)
        );
        assert!(
            stdout.contains(&format!(
                "{DEVICES} device(s): {DEVICES} updated, 0 already in sync, 0 not updated, 0 rolled back, 0 silent, 0 stalled, 0 failed"
            )),
            "{stdout}"
        );
        (self.data, self.servers)
    }
}

fn image(seed: usize) -> Vec<u8> {
    (0..IMAGE).map(|i| (i * 31 % 253 + seed) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_survives_kill_9_and_a_restart_and_every_device_ends_with_the_right_image() {
    let mut fleet = Fleet::start(&image(0)).await;
    fleet.in_the_middle().await;
    fleet.servers[0].kill();
    // Same data directory, same address: the devices find it again.
    let url = fleet.servers[0].url();
    let addr = fleet.servers[0].addr().to_string();
    fleet.servers[0] = serve(fleet.data.path(), &addr, &[]).await;
    assert_eq!(fleet.servers[0].url(), url);
    let (data, servers) = fleet.all_updated().await;
    let server = &servers[0];
    // The history, as `ajour device history` shows it, oldest first, once the last status write
    // landed: it is written beside the device's requests, which do not wait for it.
    let history = || {
        let shown = ajour(
            &["device", "history", "fleet", "dev-3"],
            Some(&server.url()),
            data.path(),
        );
        String::from_utf8_lossy(&shown.stdout).into_owned()
    };
    eventually(
        Duration::from_secs(10),
        "dev-3's history to tell it in sync",
        || std::future::ready(history().contains("\tinSync\t")),
    )
    .await;
    let shown = history();
    let kinds: Vec<&str> = shown
        .lines()
        .skip(1)
        .filter_map(|line| line.split('\t').nth(1))
        .filter(|kind| *kind != "swapping")
        .collect();
    assert_eq!(
        kinds,
        ["started", "progress", "progress", "progress", "inSync"],
        "{shown}"
    );
    // They resumed: the restarted server knew from the registry which image each device was
    // downloading, so none had to start again.
    assert_eq!(
        Metrics::of(&server.url())
            .await
            .value("ajour_update_restarts_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_replaced_under_the_same_version_mid_update_is_never_spliced() {
    let mut fleet = Fleet::start(&image(0)).await;
    fleet.in_the_middle().await;
    let other = image(7);
    let replacement = fleet.data.path().join("other.bin");
    std::fs::write(&replacement, &other).unwrap();
    let add = [
        "firmware",
        "add",
        "fw",
        "--version",
        "2.0.0",
        "--file",
        replacement.to_str().unwrap(),
    ];

    // Refused unless forced: devices name firmware by version.
    let refused = Command::new(AJOUR)
        .args(add)
        .arg("--data-dir")
        .arg(fleet.data.path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--force"),
        "{refused:?}"
    );

    ajour(&[&add[..], &["--force"]].concat(), None, fleet.data.path());
    let (_data, servers) = fleet.all_updated().await;
    let server = &servers[0];
    // Every device holds the new image, whole: the ones in the middle started again.
    assert!(
        Metrics::of(&server.url())
            .await
            .value("ajour_update_restarts_total", &[])
            >= 1.0
    );
    // In sync is written as the device reports it: nothing left pending here.
    assert!(all_in_sync(&server.url(), &digest(&other)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_postgres_database_one_killed_with_sigkill_mid_update() {
    let database = TestDatabase::create().await;
    let image = image(0);
    let mut fleet = Fleet::start_instances(&image, 2, &on_postgres(database.url())).await;
    fleet.in_the_middle().await;
    // Every device has sent statuses to both; from now on, every other one of them fails to
    // connect, and the device tries again, reaching the other instance.
    fleet.servers[0].kill();
    let (_data, servers) = fleet.all_updated().await;
    let survivor = &servers[1];
    wait_all_in_sync(
        &survivor.url(),
        &image,
        "every device shown in sync on the new image by the surviving instance",
    )
    .await;
    // It resumed every device where it was: the registry says which image each was
    // downloading, whichever instance sent the blocks so far.
    assert_eq!(
        Metrics::of(&survivor.url())
            .await
            .value("ajour_update_restarts_total", &[]),
        0.0
    );
    // Both instances wrote each device's statuses; its history tells its update once.
    each_history_tells_the_update_once(&survivor.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_two_instances_mid_update_loses_nothing() {
    let postgres = PostgresServer::start();
    let url = postgres.create_database("ajour");
    let image = image(0);
    // Devices are served from their cached specs until those expire, database or not: with the
    // default 5 s, a fast machine finishes the rest of the update (half of it, or more) before
    // any device is told to wait. 200 ms is far less than that rest takes (seconds).
    let options = [on_postgres(&url), vec!["--spec-cache-ms".into(), "200".into()]].concat();
    let mut fleet = Fleet::start_instances(&image, 2, &options).await;
    fleet.in_the_middle().await;
    let urls = fleet.urls();

    postgres.stop();
    for url in &urls {
        eventually(Duration::from_secs(30), "/readyz to report the outage", || {
            readiness_is(url, reqwest::StatusCode::SERVICE_UNAVAILABLE)
        })
        .await;
    }
    // The devices are told to wait (once their specs are older than --spec-cache-ms, as they
    // could have changed meanwhile), and what they reported meanwhile is held to be written.
    let waits = |urls: Vec<String>| async move {
        let mut sum = 0.0;
        for url in &urls {
            sum += Metrics::of(url)
                .await
                .value("ajour_commands_sent_total", &[("kind", "wait")]);
        }
        sum
    };
    let before = waits(urls.clone()).await;
    eventually(
        Duration::from_secs(60),
        "the devices told to wait while the database is away",
        || waits(urls.clone()).map(|now| now >= before + f64::from(DEVICES)),
    )
    .await;
    assert!(readiness_is(&urls[0], reqwest::StatusCode::SERVICE_UNAVAILABLE).await);
    assert!(
        fleet.simulate.try_wait().unwrap().is_none(),
        "the fleet finished without the database"
    );

    postgres.start_again();
    for url in &urls {
        eventually(
            Duration::from_secs(30),
            "the instance to recover by itself",
            || readiness_is(url, reqwest::StatusCode::OK),
        )
        .await;
    }
    let (_data, servers) = fleet.all_updated().await;
    // What each instance held back during the outage is written now: each shows every device
    // in sync, and so does the database itself (a server started now has nothing pending).
    for server in &servers {
        wait_all_in_sync(
            &server.url(),
            &image,
            "every device shown in sync on the new image",
        )
        .await;
    }
    let data = tempfile::tempdir().unwrap();
    let fresh = serve(data.path(), "127.0.0.1:0", &on_postgres(&url)).await;
    wait_all_in_sync(&fresh.url(), &image, "the database to hold every device in sync").await;
    each_history_tells_the_update_once(&fresh.url()).await;
}
