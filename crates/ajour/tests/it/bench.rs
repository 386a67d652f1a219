//! `ajour bench` end to end, through the real binary, on a tiny fleet: every device must finish on
//! the right image (the load generator checks each block and the checksum, and fails otherwise)
//! and both targets must be reported. Timing is never asserted.

use std::process::Command;

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");

/// Run `ajour bench ARGS`, expect success, and return what it printed.
fn bench(args: &[&str]) -> String {
    let output = Command::new(AJOUR)
        .arg("bench")
        .args(args)
        .env("AJOUR_LOG", "warn")
        .output()
        .expect("running ajour bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "ajour bench {args:?} failed ({}):\n{stdout}\n{}",
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

#[test]
fn bench_http_runs_a_tiny_fleet() {
    let stdout = bench(&[
        "http",
        "--devices",
        "5",
        "--image-size",
        "4096",
        "--timeout",
        "120",
    ]);
    assert_row(&stdout, "ajour", round_trips(5, 4096, 512));
    assert_row(&stdout, "bare", round_trips(5, 4096, 512));
    assert!(stdout.contains("ajour/bare:"), "{stdout}");
}

#[test]
fn bench_mqtt_runs_a_tiny_fleet() {
    let mut args = vec![
        "mqtt",
        "--devices",
        "5",
        "--image-size",
        "4096",
        "--timeout",
        "120",
    ];
    let mosquitto = std::env::var("AJOUR_TEST_MOSQUITTO").ok();
    if let Some(path) = &mosquitto {
        args.extend(["--mosquitto", path]);
    }
    let stdout = bench(&args);
    assert_row(&stdout, "ajour", round_trips(5, 4096, 512));
    assert_row(&stdout, "bare", round_trips(5, 4096, 512));
    assert!(stdout.contains("ajour/bare:"), "{stdout}");
    assert!(stdout.contains("broker cpu during ajour"), "{stdout}");
}
