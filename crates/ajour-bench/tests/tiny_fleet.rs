//! `ajour-bench` end to end, through the real binaries, on a tiny fleet: every device must finish
//! on the right image (the load generator checks each block and the checksum, and fails
//! otherwise) and both targets must be reported. Timing is never asserted.
//!
//! The server under test is the `ajour` binary of the same build, `target/debug/ajour`: a test of
//! this package cannot have Cargo build another package's binary, so `cargo build -p ajour` must
//! have run first (`cargo test --workspace`, as `scripts/test.sh` runs it, builds every binary of
//! the workspace before running any test).

use std::path::PathBuf;
use std::process::Command;

const AJOUR_BENCH: &str = env!("CARGO_BIN_EXE_ajour-bench");

/// The `ajour` binary beside `ajour-bench` in this build's target directory.
fn ajour_binary() -> PathBuf {
    let path = PathBuf::from(AJOUR_BENCH).with_file_name("ajour");
    assert!(
        path.is_file(),
        "no ajour binary at {}: run `cargo build -p ajour` before these tests",
        path.display()
    );
    path
}

/// Run `ajour-bench ARGS` against this build's `ajour`, expect success, and return what it
/// printed.
fn bench(args: &[&str]) -> String {
    let output = Command::new(AJOUR_BENCH)
        .args(args)
        .arg("--ajour")
        .arg(ajour_binary())
        .env("AJOUR_LOG", "warn")
        .output()
        .expect("running ajour-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "ajour-bench {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The table has a row for `target` with a non-zero count of round trips.
fn assert_row(stdout: &str, target: &str, round_trips: u64) {
    let row = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(target))
        .unwrap_or_else(|| panic!("no row for {target} in:\n{stdout}"));
    let counted: u64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(counted, round_trips, "round trips of {target} in:\n{stdout}");
}

/// A whole update of `size` bytes at `mtu`: one Write per block, then Swap, then Sync (the
/// device's status after the reboot), each answering one status.
fn round_trips(devices: u64, size: u64, mtu: u64) -> u64 {
    devices * (size.div_ceil(mtu) + 2)
}

/// `ajour-bench KIND` on 5 devices updating to a 4 KiB image: both targets report every round
/// trip, and how they compare. Returns what it printed.
fn tiny_fleet(kind: &str) -> String {
    let stdout = bench(&[kind, "--devices", "5", "--image-size", "4096", "--timeout", "120"]);
    assert_row(&stdout, "ajour", round_trips(5, 4096, 512));
    assert_row(&stdout, "bare", round_trips(5, 4096, 512));
    assert!(stdout.contains("ajour/bare:"), "{stdout}");
    stdout
}

#[test]
fn bench_http_runs_a_tiny_fleet() {
    tiny_fleet("http");
}

#[test]
fn bench_mqtt_runs_a_tiny_fleet() {
    let stdout = tiny_fleet("mqtt");
    assert!(stdout.contains("broker cpu during ajour"), "{stdout}");
}

#[test]
fn a_missing_ajour_binary_is_named_with_how_to_build_it() {
    let output = Command::new(AJOUR_BENCH)
        .args([
            "http",
            "--devices",
            "1",
            "--no-bare",
            "--ajour",
            "/nonexistent/ajour",
        ])
        .output()
        .expect("running ajour-bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/ajour") && stderr.contains("cargo build --release -p ajour"),
        "{stderr}"
    );
}
