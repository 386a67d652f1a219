//! A fleet updating through the real binaries (`ajour serve`, `ajour simulate`, whose devices check
//! every block's offset and the Swap checksum and retry as devices do) while an operator gets in
//! the way: the server killed (`kill -9`) and started again, the firmware replaced under the same
//! version. Every device ends with exactly one image, whole.

use ajour_testkit::{Metrics, ServerProcess};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");
const TOKEN: &str = "restart-test-token";
const DEVICES: u32 = 20;
/// 512 blocks of 256 bytes per device: long enough to be cut in the middle.
const IMAGE: usize = 128 * 1024;

/// `ajour serve` on `listen` with the fleet's data directory.
async fn serve(data_dir: &std::path::Path, listen: &str) -> ServerProcess {
    let mut command = Command::new(AJOUR);
    command
        .args(["serve", "--listen", listen, "--api-token", TOKEN])
        .args(["--progress-interval-ms", "0"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("AJOUR_LOG", "warn");
    ServerProcess::start(command).await
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

/// The highest update progress any device of the fleet shows, in percent.
async fn furthest_progress(url: &str) -> f64 {
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
        .filter_map(|report| report.status.percent())
        .fold(0.0, f64::max)
}

/// A server with an application `fleet` of `DEVICES` devices that should run `fw` 2.0.0, made of
/// `image`, and `ajour simulate` updating them from 1.0.0.
struct Fleet {
    data: tempfile::TempDir,
    server: ServerProcess,
    simulate: std::process::Child,
}

impl Fleet {
    async fn start(image: &[u8]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let firmware = data.path().join("fw.bin");
        std::fs::write(&firmware, image).unwrap();
        let server = serve(data.path(), "127.0.0.1:0").await;
        let url = server.url();
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
        let simulate = Command::new(AJOUR)
            .args([
                "simulate",
                "--url",
                &url,
                "--app",
                "fleet",
                "--device",
                "dev",
                "--password",
                "pw",
            ])
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
            server,
            simulate,
        }
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
            progress = furthest_progress(&self.server.url()).await;
        }
        assert!(
            progress < 50.0,
            "the fleet went too fast for the test: {progress}%"
        );
    }

    /// Wait for `ajour simulate` and check that every device was updated, checksum verified.
    async fn all_updated(self) -> (tempfile::TempDir, ServerProcess) {
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
                "{DEVICES} device(s): {DEVICES} updated, 0 already in sync, 0 failed"
            )),
            "{stdout}"
        );
        (self.data, self.server)
    }
}

fn image(seed: usize) -> Vec<u8> {
    (0..IMAGE).map(|i| (i * 31 % 253 + seed) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_survives_kill_9_and_a_restart_and_every_device_ends_with_the_right_image() {
    let mut fleet = Fleet::start(&image(0)).await;
    fleet.in_the_middle().await;
    fleet.server.kill();
    // Same data directory, same address: the devices find it again.
    let url = fleet.server.url();
    fleet.server = serve(fleet.data.path(), &fleet.server.addr().to_string()).await;
    assert_eq!(fleet.server.url(), url);
    let (_data, server) = fleet.all_updated().await;
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
    let (_data, server) = fleet.all_updated().await;
    // Every device holds the new image, whole: the ones in the middle started again.
    assert!(
        Metrics::of(&server.url())
            .await
            .value("ajour_update_restarts_total", &[])
            >= 1.0
    );
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&other));
    let devices: Value = reqwest::Client::new()
        .get(format!(
            "{}/api/registry/v1alpha1/apps/fleet/devices",
            server.url()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), DEVICES as usize);
    for device in devices {
        let report = ajour_types::FirmwareReport::from_json(&device["status"]["firmware"]).unwrap();
        assert_eq!(
            report.status.state,
            ajour_types::FirmwareState::InSync,
            "{device}"
        );
        assert_eq!(
            report.status.target_digest.as_deref(),
            Some(digest.as_str()),
            "{device}"
        );
    }
}
