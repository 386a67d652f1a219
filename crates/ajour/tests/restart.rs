//! A server killed (`kill -9`) in the middle of a fleet's update and started again on the same data
//! directory and address: the devices (`ajour simulate`, which retries as devices do) resume where
//! they were and every one ends with exactly the image (the simulator checks every block's offset
//! and the Swap checksum). Through the real binaries, as an operator would see it.

use ajour_testkit::ServerProcess;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");
const TOKEN: &str = "restart-test-token";
const DEVICES: u32 = 20;
/// 1,024 blocks of 256 bytes per device: long enough to be cut in the middle.
const IMAGE: usize = 256 * 1024;

/// `ajour serve` on `listen` with the fleet's data directory.
async fn serve(data_dir: &std::path::Path, listen: &str) -> ServerProcess {
    let mut command = Command::new(AJOUR);
    command
        .args(["serve", "--listen", listen, "--api-token", TOKEN, "--password-cost", "4"])
        .args(["--progress-interval-ms", "0"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("AJOUR_LOG", "warn");
    ServerProcess::start(command).await
}

/// Run the `ajour` CLI; `url`: a management command against that server.
fn ajour(args: &[&str], url: Option<&str>, data_dir: &std::path::Path) -> std::process::Output {
    let mut command = Command::new(AJOUR);
    command.args(args).arg("--data-dir").arg(data_dir).env("AJOUR_LOG", "warn");
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

/// The value of an unlabelled counter in a Prometheus text page (0 when absent).
async fn counter(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_survives_kill_9_and_a_restart_and_every_device_ends_with_the_right_image() {
    let data = tempfile::tempdir().unwrap();
    let firmware = data.path().join("fw.bin");
    let image: Vec<u8> = (0..IMAGE).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(&firmware, &image).unwrap();

    let mut server = serve(data.path(), "127.0.0.1:0").await;
    let url = server.url();
    let fw = firmware.to_str().unwrap();
    ajour(&["firmware", "add", "fw", "--version", "2.0.0", "--file", fw], None, data.path());
    ajour(&["app", "create", "fleet", "--firmware-file", "fw"], Some(&url), data.path());
    let count = DEVICES.to_string();
    ajour(
        &["device", "create", "fleet", "dev", "--password", "pw", "--count", &count],
        Some(&url),
        data.path(),
    );

    let mut simulate = Command::new(AJOUR)
        .args(["simulate", "--url", &url, "--app", "fleet", "--device", "dev", "--password", "pw"])
        .args(["--version", "1.0.0", "--count", &count, "--concurrency", &count, "--mtu", "256"])
        .args(["--timeout", "120"])
        .env("AJOUR_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Cut it in the middle: once some device is a fifth of the way, before any is done.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut progress = 0.0;
    while progress < 20.0 {
        assert!(Instant::now() < deadline, "the fleet did not get going ({progress}%)");
        assert!(simulate.try_wait().unwrap().is_none(), "the fleet finished before the kill");
        progress = furthest_progress(&url).await;
    }
    assert!(progress < 100.0, "{progress}");
    server.kill();

    // Same data directory, same address: the devices find it again.
    let restarted = serve(data.path(), &server.addr().to_string()).await;
    assert_eq!(restarted.url(), url);
    let finished = tokio::task::spawn_blocking(move || simulate.wait_with_output())
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
        stdout.contains(&format!("{DEVICES} device(s): {DEVICES} updated, 0 already in sync, 0 failed")),
        "{stdout}"
    );
    // They resumed: the restarted server knew from the registry which image each device was
    // downloading, so none had to start again.
    assert_eq!(counter(&url, "ajour_update_restarts_total").await, 0.0);
}
