//! The `ajour` binary as a user runs it: `serve` on port 0, then the CLI and the simulator.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ajour(data_dir: &std::path::Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(AJOUR)
        .args(args)
        .env("AJOUR_DATA_DIR", data_dir)
        .env("AJOUR_URL", url)
        .env_remove("AJOUR_API_TOKEN")
        .output()
        .unwrap()
}

fn ok(output: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn quick_start_from_the_readme() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(AJOUR)
        .args(["serve", "--listen", "127.0.0.1:0", "--password-cost", "4"])
        .env("AJOUR_DATA_DIR", &data)
        .env_remove("AJOUR_API_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let serve = Serve(child);
    // The server prints the token it generated, then the address it bound.
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    let url = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        printed.push(line.clone());
        if let Some(addr) = line.strip_prefix("Ajour listening on ") {
            break addr.to_string();
        }
    };
    let token = std::fs::read_to_string(data.join("api-token")).unwrap();
    assert!(
        printed.iter().any(|l| l.contains(token.trim())),
        "the generated token is printed once"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("api-token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the token file is readable only by its owner"
        );
    }

    let firmware = dir.path().join("fw.bin");
    std::fs::write(&firmware, crate::support::firmware_bytes(20_000, 8)).unwrap();
    let firmware = firmware.to_str().unwrap();
    ok(ajour(
        &data,
        &url,
        &[
            "firmware",
            "add",
            "my-fw",
            "--version",
            "0.2.0",
            "--file",
            firmware,
        ],
    ));
    ok(ajour(
        &data,
        &url,
        &["app", "create", "my-app", "--firmware-file", "my-fw"],
    ));
    ok(ajour(
        &data,
        &url,
        &["device", "create", "my-app", "dev", "--password", "hey-rodney"],
    ));
    let simulated = ok(ajour(
        &data,
        &url,
        &[
            "simulate",
            "--app",
            "my-app",
            "--device",
            "dev",
            "--password",
            "hey-rodney",
            "--version",
            "0.1.0",
        ],
    ));
    assert!(simulated.contains("updated 0.1.0 -> 0.2.0"), "{simulated}");
    let status = ok(ajour(&data, &url, &["device", "status", "my-app", "dev"]));
    assert!(
        status.contains("current: 0.2.0") && status.contains("in sync"),
        "{status}"
    );
    let listed = ok(ajour(&data, &url, &["app", "list"]));
    assert!(listed.contains("my-app\tfile my-fw"), "{listed}");

    // A device's own firmware overrides its application's, and can be cleared again.
    ok(ajour(
        &data,
        &url,
        &[
            "device",
            "set-firmware",
            "my-app",
            "dev",
            "--firmware-image",
            "fw/special:1",
        ],
    ));
    let device: serde_json::Value =
        serde_json::from_str(&ok(ajour(&data, &url, &["device", "get", "my-app", "dev"]))).unwrap();
    assert_eq!(device["spec"]["firmware"]["container"]["image"], "fw/special:1");
    assert!(
        device["spec"]["authentication"].is_object(),
        "the rest of the spec is kept: {device}"
    );
    ok(ajour(&data, &url, &["device", "set-firmware", "my-app", "dev"]));
    let device: serde_json::Value =
        serde_json::from_str(&ok(ajour(&data, &url, &["device", "get", "my-app", "dev"]))).unwrap();
    assert!(device["spec"].get("firmware").is_none(), "{device}");
    ok(ajour(
        &data,
        &url,
        &["app", "set-firmware", "my-app", "--firmware-file", "other-fw"],
    ));
    let app: serde_json::Value =
        serde_json::from_str(&ok(ajour(&data, &url, &["app", "get", "my-app"]))).unwrap();
    assert_eq!(app["spec"]["firmware"]["file"]["name"], "other-fw");

    // Failures exit non-zero with a message.
    let wrong = ajour(
        &data,
        &url,
        &[
            "simulate",
            "--app",
            "my-app",
            "--device",
            "dev",
            "--password",
            "nope",
            "--version",
            "0.1.0",
        ],
    );
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("403"));
    let hostile = ajour(
        &data,
        &url,
        &[
            "firmware",
            "add",
            "../../etc/passwd",
            "--version",
            "1",
            "--file",
            firmware,
        ],
    );
    assert!(!hostile.status.success());
    assert!(String::from_utf8_lossy(&hostile.stderr).contains("invalid firmware name"));
    let no_token = ajour(&dir.path().join("elsewhere"), &url, &["app", "list"]);
    assert!(!no_token.status.success());
    drop(serve);
}
