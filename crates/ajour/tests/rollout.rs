//! Staged rollouts through the real server (`ajour serve`, its REST API and `ajour rollout`) with a
//! fleet of simulated devices (`ajour_sim`, whose devices check every block and the checksum), on
//! SQLite, on PostgreSQL, and with two instances on one PostgreSQL database (each device's
//! statuses alternate between them):
//!
//! - healthy devices: three waves complete in order, never more devices updating at once than
//!   the concurrency limit, the last wave only once approved, and every device's history tells
//!   its update with the rollout's id;
//! - 20% of the fleet failing (rolling back after the swap, or going silent): the rollout halts in
//!   its first wave, and no device of another wave is sent a single block; cancelled, devices not
//!   sent the whole image go back to their previous firmware, devices updated stay;
//! - paused: no device starts; resumed: every device updates.

use ajour_sim::{DeviceOptions, Fault, Outcome, Simulation, StatusEncoding, Transport};
use ajour_testkit::{eventually, Metrics, ServerProcess, TestDatabase};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");
const TOKEN: &str = "rollout-test-token";
/// The secret device passwords are sealed with, the same for instances on one database (a
/// test's own, not a secret).
const CREDENTIAL_SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// 32 blocks of 256 bytes per device.
const IMAGE: usize = 8 * 1024;

/// Where the rollouts run.
#[derive(Debug, Clone, Copy)]
enum Deployment {
    Sqlite,
    Postgres,
    TwoOnPostgres,
}

struct Servers {
    data: tempfile::TempDir,
    servers: Vec<ServerProcess>,
    _database: Option<TestDatabase>,
}

impl Servers {
    async fn start(deployment: Deployment) -> Self {
        let data = tempfile::tempdir().unwrap();
        for (name, version) in [("v1", "1.0.0"), ("v2", "2.0.0")] {
            let file = data.path().join(format!("{name}.bin"));
            let seed = usize::from(name.as_bytes()[1]);
            let image: Vec<u8> = (0..IMAGE).map(|i| (i * seed + i / 256) as u8).collect();
            std::fs::write(&file, image).unwrap();
            let output = Command::new(AJOUR)
                .args(["firmware", "add", name, "--version", version, "--file"])
                .arg(&file)
                .arg("--data-dir")
                .arg(data.path())
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
        }
        let (instances, database) = match deployment {
            Deployment::Sqlite => (1, None),
            Deployment::Postgres => (1, Some(TestDatabase::create().await)),
            Deployment::TwoOnPostgres => (2, Some(TestDatabase::create().await)),
        };
        let mut servers = Vec::new();
        for _ in 0..instances {
            let mut command = Command::new(AJOUR);
            command
                .args(["serve", "--listen", "127.0.0.1:0", "--api-token", TOKEN])
                .args([
                    "--rollout-tick-ms",
                    "100",
                    "--wait-poll",
                    "1",
                    "--progress-interval-ms",
                    "0",
                ])
                .args(["--credential-secret", CREDENTIAL_SECRET])
                .arg("--data-dir")
                .arg(data.path())
                .env("AJOUR_LOG", "warn");
            if let Some(database) = &database {
                command.args(["--database-url", database.url()]);
            }
            servers.push(ServerProcess::start(command).await);
        }
        Self {
            data,
            servers,
            _database: database,
        }
    }

    fn urls(&self) -> Vec<String> {
        self.servers.iter().map(ServerProcess::url).collect()
    }

    /// The last instance: what it shows was written through the other one, with two.
    fn observer(&self) -> String {
        self.servers.last().unwrap().url()
    }

    /// Run `ajour ARGS` against the first instance; its stdout, or its stderr when it failed.
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(AJOUR)
            .args(args)
            .args(["--url", &self.servers[0].url(), "--token", TOKEN])
            .env("AJOUR_LOG", "warn")
            .output()
            .unwrap();
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        if output.status.success() {
            Ok(text(&output.stdout))
        } else {
            Err(text(&output.stderr))
        }
    }

    /// `ajour rollout create APP --firmware-file v2 FLAGS`; the rollout's id.
    fn create_rollout(&self, app: &str, flags: &[&str]) -> u64 {
        let args = [&["rollout", "create", app, "--firmware-file", "v2"], flags].concat();
        created_id(&self.cli(&args).unwrap())
    }

    /// Application `app` on firmware v1 with `count` devices `app-0` … that run 1.0.0 (each
    /// reports once, so it is in sync before any rollout).
    async fn fleet(&self, app: &str, count: u32) -> Vec<String> {
        self.cli(&["app", "create", app, "--firmware-file", "v1"])
            .unwrap();
        let count_text = count.to_string();
        self.cli(&[
            "device",
            "create",
            app,
            app,
            "--password",
            "pw",
            "--count",
            &count_text,
        ])
        .unwrap();
        let devices: Vec<String> = (0..count).map(|i| format!("{app}-{i}")).collect();
        let outcomes = self.simulate(app, &devices, None, HashMap::new(), 30).await;
        assert!(outcomes
            .values()
            .all(|o| matches!(o, Ok(Outcome::InSync { version }) if version == "1.0.0")));
        devices
    }

    /// Play `devices` of `app`, starting on 1.0.0, until each runs `target` (or, without one, is
    /// told Sync) or `timeout` seconds pass; how each ended.
    async fn simulate(
        &self,
        app: &str,
        devices: &[String],
        target: Option<&str>,
        faults: HashMap<String, Fault>,
        timeout: u64,
    ) -> HashMap<String, Result<Outcome, String>> {
        let mut options = DeviceOptions::new(
            StatusEncoding::Packed,
            Duration::from_secs(1),
            Duration::from_secs(timeout),
        );
        options.target = target.map(String::from);
        let simulation = Simulation {
            app: app.into(),
            devices: devices.to_vec(),
            password: "pw".into(),
            version: "1.0.0".into(),
            mtu: Some(256),
            transport: Transport::Http { urls: self.urls() },
            concurrency: devices.len(),
            device: options,
            faults,
            ca_file: None,
            client_cert: None,
        };
        ajour_sim::simulate(&simulation)
            .await
            .unwrap()
            .into_iter()
            .map(|(name, outcome)| (name, outcome.map_err(|e| format!("{e:#}"))))
            .collect()
    }

    async fn get(&self, path: &str) -> Value {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.observer()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    async fn rollout(&self, app: &str, id: u64) -> Value {
        self.get(&format!("/api/dfu/v1alpha1/apps/{app}/rollouts/{id}"))
            .await
    }

    /// The device's history, oldest first.
    async fn history(&self, app: &str, device: &str) -> Vec<Value> {
        let history = self
            .get(&format!("/api/dfu/v1alpha1/apps/{app}/devices/{device}/history"))
            .await;
        let mut events = history.as_array().unwrap().clone();
        events.reverse();
        events
    }

    /// Each device of rollout `id` by wave.
    async fn waves(&self, app: &str, id: u64) -> Vec<Vec<String>> {
        let rollout = self.rollout(app, id).await;
        let mut waves = vec![Vec::new(); rollout["waves"].as_array().unwrap().len()];
        for device in rollout["devices"].as_array().unwrap() {
            waves[device["wave"].as_u64().unwrap() as usize]
                .push(device["device"].as_str().unwrap().to_string());
        }
        waves
    }

    /// Wait (up to `secs`) until rollout `id` is in `state`; else fail showing it and the logs.
    async fn wait_for_state(&self, app: &str, id: u64, state: &str, secs: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let rollout = self.rollout(app, id).await;
            if rollout["state"] == state {
                return;
            }
            if std::time::Instant::now() > deadline {
                let logs: Vec<String> = self.servers.iter().map(ServerProcess::log).collect();
                let mut shown = rollout.clone();
                shown["devices"] = rollout["devices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|d| d["phase"] != "succeeded")
                    .cloned()
                    .collect();
                shown["spec"] = Value::Null;
                panic!("rollout {id} of {app} not {state} after {secs} s (devices not succeeded shown): {shown:#}\nlogs: {logs:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The id of the rollout `ajour rollout create` said it created (`rollout 3 of app: ...`).
fn created_id(output: &str) -> u64 {
    output
        .strip_prefix("rollout ")
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(id, _)| id.parse().ok())
        .unwrap_or_else(|| panic!("no rollout id in {output:?}"))
}

/// When each of `events` of `kind` toward 2.0.0 was recorded (milliseconds since the epoch).
fn times(events: &[Value], kind: &str) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["target"] == "2.0.0")
        .map(|e| {
            ajour_types::RecordedEvent::from_json(e)
                .unwrap()
                .time
                .timestamp_millis()
        })
        .collect()
}

/// Healthy devices: three waves in order (each starts once every device of the one before is
/// updated), at most `concurrency` updating at once, the last one only once approved.
async fn waves_complete_in_order(servers: &Servers) {
    let devices = servers.fleet("healthy", 20).await;
    let spec = json!({
        "firmware": {"file": {"name": "v2"}},
        "waves": [
            {"percent": 20, "successThreshold": 100},
            {"percent": 50, "successThreshold": 100},
            {"percent": 100, "successThreshold": 100, "approval": "manual"}
        ],
        "concurrency": 3
    });
    let spec_file = servers.data.path().join("healthy.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let created = servers
        .cli(&[
            "rollout",
            "create",
            "healthy",
            "--spec",
            spec_file.to_str().unwrap(),
        ])
        .unwrap();
    assert!(
        created.starts_with("rollout 1 of healthy: active, wave 0"),
        "{created}"
    );
    let waves = servers.waves("healthy", 1).await;
    assert_eq!(waves.iter().map(Vec::len).collect::<Vec<_>>(), [4, 10, 6]);
    // One open rollout per application.
    let again = servers
        .cli(&["rollout", "create", "healthy", "--firmware-file", "v2"])
        .unwrap_err();
    assert!(again.contains("409") && again.contains("is open"), "{again}");

    // Every instance holds the rollout before a device asks: one that has not read it yet answers
    // as if there were none (docs/rollouts.md), and each device's history would tell two starts.
    for url in servers.urls() {
        let labels = [("app", "healthy"), ("state", "active")];
        eventually(
            Duration::from_secs(20),
            "every instance to hold the rollout",
            || async { Metrics::of(&url).await.value("ajour_rollout_state", &labels) == 1.0 },
        )
        .await;
    }
    let fleet = servers.simulate("healthy", &devices, Some("2.0.0"), HashMap::new(), 120);
    let approve = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let rollout = servers.rollout("healthy", 1).await;
            if rollout["awaitingApproval"] == true {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "wave 2 never waited for its approval: {rollout:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Nothing of the last wave started before the approval.
        for device in &waves[2] {
            let history = servers.history("healthy", device).await;
            assert!(times(&history, "started").is_empty(), "{device}: {history:?}");
        }
        let approved = servers.cli(&["rollout", "approve", "healthy", "1"]).unwrap();
        assert!(approved.contains("wave 2"), "{approved}");
    };
    let (outcomes, ()) = tokio::join!(fleet, approve);
    for (device, outcome) in &outcomes {
        assert!(
            matches!(outcome, Ok(Outcome::Updated { to, .. }) if to == "2.0.0"),
            "{device}: {outcome:?}"
        );
    }
    servers.wait_for_state("healthy", 1, "completed", 10).await;
    let app = servers.get("/api/registry/v1alpha1/apps/healthy").await;
    assert_eq!(app["spec"]["firmware"], json!({"file": {"name": "v2"}}));

    // Each device's history: its update, told with the rollout; waves one after the other; never
    // more than 3 updating at once.
    let mut spans = Vec::new();
    let mut wave_spans = Vec::new();
    for wave in &waves {
        let (mut first_start, mut last_sync) = (i64::MAX, i64::MIN);
        for device in wave {
            let history = servers.history("healthy", device).await;
            let started = times(&history, "started");
            let in_sync = times(&history, "inSync");
            assert_eq!((started.len(), in_sync.len()), (1, 1), "{device}: {history:?}");
            assert!(
                history
                    .iter()
                    .filter(|e| e["target"] == "2.0.0")
                    .all(|e| e["rollout"] == 1),
                "{device}: {history:?}"
            );
            spans.push((started[0], in_sync[0]));
            first_start = first_start.min(started[0]);
            last_sync = last_sync.max(in_sync[0]);
        }
        wave_spans.push((first_start, last_sync));
    }
    for pair in wave_spans.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "a wave started before the one before it was done: {wave_spans:?}"
        );
    }
    let most_at_once = spans
        .iter()
        .map(|(start, _)| spans.iter().filter(|(s, e)| s <= start && start <= e).count())
        .max()
        .unwrap();
    assert!(
        most_at_once <= 3,
        "{most_at_once} devices updating at once: {spans:?}"
    );
}

/// A fifth of the fleet fails; the rollout halts in its first wave, and no other wave's device
/// gets a block. Cancelled, devices go back or stay as they should.
async fn failures_halt_the_first_wave(servers: &Servers) {
    let devices = servers.fleet("failing", 30).await;
    let created = servers
        .cli(&[
            "rollout",
            "create",
            "failing",
            "--firmware-file",
            "v2",
            "--wave",
            "30%",
            "--wave",
            "60%",
            "--wave",
            "100%",
            "--max-failure-rate",
            "20",
            "--swap-timeout",
            "2",
        ])
        .unwrap();
    assert!(created.contains("wave 0 (active): 9 devices"), "{created}");
    let id = created_id(&created);
    let id_text = id.to_string();
    let waves = servers.waves("failing", id).await;
    // 6 of 30 fail (20%), in every wave, rolling back after the swap or going silent: in the
    // first wave 2 of 9 (22%: over the 20% the rollout allows), 3 of 18, 1 of 3.
    assert_eq!(waves.iter().map(Vec::len).collect::<Vec<_>>(), [9, 18, 3]);
    let mut faults = HashMap::new();
    for (wave, failing) in waves.iter().zip([2, 3, 1]) {
        for (n, device) in wave.iter().take(failing).enumerate() {
            let fault = if n % 2 == 0 {
                Fault::RollBack
            } else {
                Fault::Silent
            };
            faults.insert(device.clone(), fault);
        }
    }
    assert_eq!(faults.len(), 6);
    let fleet = servers.simulate("failing", &devices, Some("2.0.0"), faults.clone(), 60);
    let halt = async {
        servers.wait_for_state("failing", id, "paused", 60).await;
    };
    // The simulation is dropped once the rollout halted: its devices of later waves would only
    // keep asking (and be told their previous firmware) until their timeout.
    tokio::select! {
        outcomes = fleet => panic!("the fleet ended before the rollout halted: {outcomes:?}"),
        () = halt => {}
    }
    let rollout = servers.rollout("failing", id).await;
    assert_eq!(rollout["halted"], true);
    assert_eq!(rollout["wave"], 0);
    let reason = rollout["reason"].as_str().unwrap();
    assert!(reason.contains("2 of 9 devices failed"), "{reason}");
    let failed: Vec<&Value> = rollout["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["phase"] == "failed")
        .collect();
    assert_eq!(failed.len(), 2, "{rollout:#}");
    let reasons: Vec<&str> = failed.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert!(reasons.iter().any(|r| r.contains("rolled back")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("silent for 2 s")),
        "{reasons:?}"
    );
    // Not a block to any device of another wave.
    for device in waves[1..].iter().flatten() {
        let history = servers.history("failing", device).await;
        assert!(times(&history, "started").is_empty(), "{device}: {history:?}");
        let status = servers
            .get(&format!("/api/registry/v1alpha1/apps/failing/devices/{device}"))
            .await;
        assert_eq!(
            status["status"]["firmware"]["target"], "1.0.0",
            "{device}: {status:#}"
        );
    }
    // Resuming accepts the two failures; a third would halt it again. Cancel it instead.
    let cancelled = servers.cli(&["rollout", "cancel", "failing", &id_text]).unwrap();
    assert!(cancelled.contains("cancelled"), "{cancelled}");
    let again = servers
        .cli(&["rollout", "resume", "failing", &id_text])
        .unwrap_err();
    assert!(
        again.contains("cannot resume a rollout that is cancelled"),
        "{again}"
    );
    // Devices updated stay on 2.0.0; every other device (failed, waiting, never started) is told
    // its previous firmware, 1.0.0. A device reports where it is: the updated ones 2.0.0.
    let members = servers.rollout("failing", id).await["devices"].clone();
    let updated: Vec<String> = members
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["phase"] == "succeeded")
        .map(|d| d["device"].as_str().unwrap().to_string())
        .collect();
    let others: Vec<String> = devices.iter().filter(|d| !updated.contains(d)).cloned().collect();
    let outcomes = servers
        .simulate("failing", &others, None, HashMap::new(), 30)
        .await;
    for (device, outcome) in &outcomes {
        assert!(
            matches!(outcome, Ok(Outcome::InSync { version }) if version == "1.0.0"),
            "{device}: {outcome:?}"
        );
    }
    for device in &updated {
        let status = servers
            .get(&format!("/api/registry/v1alpha1/apps/failing/devices/{device}"))
            .await;
        assert_eq!(status["status"]["firmware"]["current"], "2.0.0", "{device}");
    }
}

/// Paused before any device asked: none starts; resumed: all update.
async fn pause_and_resume(servers: &Servers) {
    let devices = servers.fleet("paused", 10).await;
    let created = servers
        .cli(&[
            "rollout",
            "create",
            "paused",
            "--firmware-file",
            "v2",
            "--wave",
            "50%",
            "--wave",
            "100%",
        ])
        .unwrap();
    let id = created_id(&created);
    let id_text = id.to_string();
    let paused = servers.cli(&["rollout", "pause", "paused", &id_text]).unwrap();
    assert!(
        paused.contains(": paused, wave 0: paused by an operator"),
        "{paused}"
    );
    let approve = servers
        .cli(&["rollout", "approve", "paused", &id_text])
        .unwrap_err();
    assert!(
        approve.contains("cannot approve a rollout that is paused"),
        "{approve}"
    );
    // Three seconds of the fleet asking (three rounds each): nobody starts.
    let outcomes = servers
        .simulate("paused", &devices, Some("2.0.0"), HashMap::new(), 3)
        .await;
    for (device, outcome) in &outcomes {
        assert!(
            matches!(outcome, Ok(Outcome::NotUpdated { version }) if version == "1.0.0"),
            "{device}: {outcome:?}"
        );
        assert!(times(&servers.history("paused", device).await, "started").is_empty());
    }
    servers.cli(&["rollout", "resume", "paused", &id_text]).unwrap();
    let outcomes = servers
        .simulate("paused", &devices, Some("2.0.0"), HashMap::new(), 60)
        .await;
    for (device, outcome) in &outcomes {
        assert!(
            matches!(outcome, Ok(Outcome::Updated { .. })),
            "{device}: {outcome:?}"
        );
    }
    servers.wait_for_state("paused", id, "completed", 10).await;
    let list = servers.cli(&["rollout", "list", "paused"]).unwrap();
    let line = format!("{id}\tcompleted\t1\t0\t0\t10\t0\tevery wave succeeded");
    assert!(list.contains(&line), "{list}");
}

/// A bandwidth budget of 8 KiB/s: four devices of 8 KiB take three seconds at least (a second's
/// worth goes at once), waiting when it is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_budget_holds() {
    let servers = Servers::start(Deployment::Sqlite).await;
    let devices = servers.fleet("budget", 4).await;
    let budget = (IMAGE as u64).to_string();
    let created = servers
        .cli(&[
            "rollout",
            "create",
            "budget",
            "--firmware-file",
            "v2",
            "--bandwidth",
            &budget,
        ])
        .unwrap();
    let outcomes = servers
        .simulate("budget", &devices, Some("2.0.0"), HashMap::new(), 60)
        .await;
    assert!(
        outcomes
            .values()
            .all(|o| matches!(o, Ok(Outcome::Updated { .. }))),
        "{outcomes:?}"
    );
    // Completed: every device's update is in its history.
    servers
        .wait_for_state("budget", created_id(&created), "completed", 10)
        .await;
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for device in &devices {
        let history = servers.history("budget", device).await;
        first = first.min(times(&history, "started")[0]);
        last = last.max(times(&history, "inSync")[0]);
    }
    // 32 KiB at 8 KiB/s after a full first second's worth: 3 s at least (less a block: the last
    // one goes as soon as the bucket holds it).
    let least = 3000 - (256 * 1000 / IMAGE as i64);
    assert!(last - first >= least, "{} ms", last - first);
    let metrics = reqwest::get(format!("{}/metrics", servers.observer()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("ajour_rollout_budget_waits_total"), "{metrics}");
}

/// A maintenance window two hours from now: for three seconds of the fleet asking, nobody
/// starts. Cancelled, and a new rollout in a window around now: every device updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_its_maintenance_window_no_device_starts() {
    let servers = Servers::start(Deployment::Sqlite).await;
    let devices = servers.fleet("window", 4).await;
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let hour = (since_epoch.as_secs() / 3600) % 24;
    let later = format!("{}-{}", (hour + 2) % 24, (hour + 3) % 24);
    let created = servers.create_rollout("window", &["--window", &later]);
    let outcomes = servers
        .simulate("window", &devices, Some("2.0.0"), HashMap::new(), 3)
        .await;
    for (device, outcome) in &outcomes {
        assert!(
            matches!(outcome, Ok(Outcome::NotUpdated { .. })),
            "{device}: {outcome:?}"
        );
        assert!(times(&servers.history("window", device).await, "started").is_empty());
    }
    servers
        .cli(&["rollout", "cancel", "window", &created.to_string()])
        .unwrap();
    // From an hour ago to two hours from now: the test cannot leave it.
    let now = format!("{}-{}", (hour + 23) % 24, (hour + 2) % 24);
    servers.create_rollout("window", &["--window", &now]);
    let outcomes = servers
        .simulate("window", &devices, Some("2.0.0"), HashMap::new(), 60)
        .await;
    for (device, outcome) in &outcomes {
        assert!(
            matches!(outcome, Ok(Outcome::Updated { .. })),
            "{device}: {outcome:?}"
        );
    }
}

async fn every_scenario(deployment: Deployment) {
    let servers = Servers::start(deployment).await;
    waves_complete_in_order(&servers).await;
    failures_halt_the_first_wave(&servers).await;
    pause_and_resume(&servers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_on_sqlite() {
    every_scenario(Deployment::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_on_postgres() {
    every_scenario(Deployment::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_with_two_instances_on_postgres() {
    every_scenario(Deployment::TwoOnPostgres).await;
}
