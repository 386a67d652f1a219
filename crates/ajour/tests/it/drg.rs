//! Drogue's own CLI, the real `drg` 0.11.0 built from crates.io (`scripts/setup-test-env.sh`
//! installs it), against `ajour serve`: login with an access token, applications, devices,
//! passwords, labels, the credentials Ajour does not use, tokens, members and roles, the live
//! stream, and a device whose password `drg` set updating to firmware applied with `drg apply`.

use crate::support::*;
use ajour_sim::{HttpLink, SimulatedDevice};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

/// The `drg` to test against: `$DRG`, else the one `cargo install` put in `~/.cargo/bin`, else
/// the one on the `PATH`.
fn drg_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("DRG") {
        return path.into();
    }
    let installed = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|home| home.join("bin/drg"));
    match installed {
        Some(path) if path.exists() => path,
        _ => "drg".into(),
    }
}

/// One user's `drg`, with a config file of its own (so tests never touch the user's).
struct Drg {
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drg {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            config: dir.path().join("drg_config.yaml"),
            _dir: dir,
        }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(drg_binary());
        command
            .args(args)
            .env("DRGCFG", &self.config)
            .env_remove("DRG_APP")
            .env_remove("DRG_CONTEXT");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap_or_else(|e| {
            panic!(
                "running drg ({}): {e}; install it with scripts/setup-test-env.sh",
                drg_binary().display()
            )
        })
    }

    /// Stdout of a run that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "drg {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Stdout and stderr of a run that must fail.
    fn refused(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !output.status.success(),
            "drg {args:?} should have been refused: {text}"
        );
        text
    }

    /// Run `args` (a `drg edit`) with an editor that applies the sed expression `change` to the
    /// file; it must succeed.
    fn edit(&self, args: &[&str], change: &str) {
        let dir = tempfile::tempdir().unwrap();
        let editor = dir.path().join("editor.sh");
        // In place (the same file, not a new one, as editors save): drg reads it back through a
        // handle it kept open.
        std::fs::write(
            &editor,
            "#!/bin/sh\nedited=$(sed \"$DRG_TEST_EDIT\" \"$1\") && printf '%s\\n' \"$edited\" > \"$1\"\n",
        )
        .unwrap();
        make_executable(&editor);
        let output = self
            .command(args)
            .env("EDITOR", &editor)
            .env("VISUAL", &editor)
            .env("DRG_TEST_EDIT", change)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "drg {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let text = self.ok(&args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("drg {args:?}: {e}: {text}"))
    }
}

/// A user's first token, made with `ajour token create --user` and the bootstrap token.
fn first_token(server: &TestServer, user: &str) -> String {
    let output = cli_with(
        server.data_dir.path(),
        &server.url,
        &["token", "create", "--user", user],
    );
    succeeded(output).trim().to_string()
}

// Several threads: `drg` runs as a blocking child process while the server in this process answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drg_manages_standalone_ajour() {
    let server = TestServer::start(Backend::Sqlite).await;
    let image = firmware_bytes(24 * 1024, 7);
    server.add_firmware("fw-2", "2.0.0", &image);

    // Login: the discovery documents and the console info, then the registry.
    let olga = Drg::new();
    let token = first_token(&server, "olga");
    olga.ok(&["login", &server.url, "--access-token", &format!("olga:{token}")]);
    assert!(
        olga.ok(&["whoami"]).contains(&server.url),
        "whoami names the server"
    );
    let wrong = Drg::new();
    wrong.refused(&[
        "login",
        &server.url,
        "--access-token",
        "olga:ajr_abcdefgh_0000000000000000000000000000000",
    ]);

    // Applications and devices, with what Ajour does not use kept.
    olga.ok(&["create", "app", "fleet"]);
    let apps = olga.json(&["get", "apps"]);
    assert_eq!(apps.as_array().unwrap().len(), 1, "{apps}");
    olga.ok(&["create", "device", "dev1", "-a", "fleet"]);
    olga.ok(&["set", "password", "dev1", "s3cret", "-a", "fleet"]);
    olga.ok(&["set", "psk", "dev1", "c2VjcmV0LWtleQ", "-a", "fleet"]);
    olga.ok(&["set", "alias", "dev1", "dev1-serial-42", "-a", "fleet"]);
    olga.ok(&["set", "gateway", "dev1", "ble-bridge", "-a", "fleet"]);
    olga.ok(&[
        "label",
        "device",
        "dev1",
        "ring=canary",
        "site=lab",
        "-a",
        "fleet",
    ]);
    let dev1 = olga.json(&["get", "device", "dev1", "-a", "fleet"]);
    assert_eq!(
        dev1["metadata"]["labels"],
        json!({"ring": "canary", "site": "lab"}),
        "{dev1}"
    );
    assert_eq!(dev1["spec"]["alias"], json!(["dev1-serial-42"]), "{dev1}");
    assert_eq!(
        dev1["spec"]["gatewaySelector"]["matchNames"],
        json!(["ble-bridge"]),
        "{dev1}"
    );
    let credentials = dev1["spec"]["authentication"]["credentials"].to_string();
    assert!(
        credentials.contains("psk"),
        "the pre-shared key is kept: {credentials}"
    );
    assert!(
        !dev1.to_string().contains("s3cret"),
        "no password in clear: {dev1}"
    );

    // `drg edit` through $EDITOR: a script that changes the YAML drg wrote.
    olga.edit(
        &["edit", "device", "dev1", "-a", "fleet"],
        "s/site: lab/site: field/",
    );
    let dev1 = olga.json(&["get", "device", "dev1", "-a", "fleet"]);
    assert_eq!(dev1["metadata"]["labels"]["site"], "field", "{dev1}");
    let wide = olga.ok(&["get", "devices", "-a", "fleet", "-o", "wide"]);
    assert!(wide.contains("dev1") && wide.contains("FIRMWARE"), "{wide}");

    // Tokens: made, listed by prefix, deleted.
    let created = olga.ok(&["create", "token", "--description", "ci-pipeline"]);
    let listed = olga.ok(&["get", "token"]);
    assert!(listed.contains("ci-pipeline"), "{listed}");
    let new_token = created
        .split_whitespace()
        .find(|word| word.starts_with("ajr_"))
        .unwrap_or_else(|| panic!("no token in {created}"));
    let prefix = new_token.split('_').nth(1).unwrap();
    assert!(listed.contains(prefix), "{listed}");
    olga.ok(&["delete", "token", prefix]);
    assert!(!olga.ok(&["get", "token"]).contains(prefix));

    // Members: a reader sees the application and changes nothing.
    olga.ok(&["create", "member", "rita", "--role", "reader", "-a", "fleet"]);
    let members = olga.ok(&["get", "member", "-a", "fleet"]);
    assert!(
        members.contains("rita") && members.contains("Reader"),
        "{members}"
    );
    let rita = Drg::new();
    let rita_token = first_token(&server, "rita");
    rita.ok(&[
        "login",
        &server.url,
        "--access-token",
        &format!("rita:{rita_token}"),
    ]);
    assert_eq!(
        rita.json(&["get", "device", "dev1", "-a", "fleet"])["metadata"]["name"],
        "dev1"
    );
    let before = olga.json(&["get", "device", "dev1", "-a", "fleet"]);
    for write in [
        vec!["create", "device", "dev2", "-a", "fleet"],
        vec!["set", "password", "dev1", "stolen", "-a", "fleet"],
        vec!["label", "device", "dev1", "ring=evil", "-a", "fleet"],
        vec!["delete", "device", "dev1", "-a", "fleet"],
        vec!["delete", "app", "fleet"],
        vec!["create", "member", "rita", "--role", "admin", "-a", "fleet"],
        vec!["delete", "member", "rita", "-a", "fleet"],
    ] {
        rita.refused(&write);
    }
    let after = olga.json(&["get", "device", "dev1", "-a", "fleet"]);
    assert_eq!(before, after, "a reader's writes changed nothing");
    // A user who is no member does not see the application at all.
    let mallory = Drg::new();
    let mallory_token = first_token(&server, "mallory");
    mallory.ok(&[
        "login",
        &server.url,
        "--access-token",
        &format!("mallory:{mallory_token}"),
    ]);
    assert_eq!(mallory.json(&["get", "apps"]), json!([]));
    mallory.refused(&["get", "device", "dev1", "-a", "fleet"]);

    // Firmware applied with `drg apply`, watched with `drg stream` while the device whose
    // password drg set updates.
    let files = tempfile::tempdir().unwrap();
    let app_file = files.path().join("fleet.json");
    std::fs::write(
        &app_file,
        json!({"metadata": {"name": "fleet"}, "spec": {"firmware": {"file": {"name": "fw-2"}}}}).to_string(),
    )
    .unwrap();
    olga.ok(&["apply", "-f", app_file.to_str().unwrap()]);
    assert_eq!(
        olga.json(&["get", "app", "fleet"])["spec"]["firmware"]["file"]["name"],
        "fw-2"
    );

    let mut stream = tokio::process::Command::from(rita.command(&["stream", "-a", "fleet", "-n", "4"]));
    let stream = stream
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(20), "drg stream subscribed", || async {
        Metrics::of(&server.url)
            .await
            .value("ajour_stream_subscribers", &[])
            >= 1.0
    })
    .await;
    let mut device = SimulatedDevice::new("1.0.0", Some(1024));
    let mut link = HttpLink::new(server.http.clone(), &server.url, "fleet", "dev1", "s3cret");
    let outcome = run_to_end(&mut device, &mut link, "dev1").await;
    assert_eq!(outcome, updated_to("2.0.0", image.len()));
    let streamed = tokio::time::timeout(Duration::from_secs(30), stream.wait_with_output())
        .await
        .expect("drg stream ends after 4 events")
        .unwrap();
    let text = String::from_utf8_lossy(&streamed.stdout);
    assert!(
        streamed.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&streamed.stderr)
    );
    let events: Vec<Value> = serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("drg stream printed {text}: {e}"));
    assert_eq!(events.len(), 4, "{text}");
    assert!(
        events
            .iter()
            .all(|e| e["device"] == "dev1" && e["application"] == "fleet"),
        "{text}"
    );
    let status = olga.json(&["get", "device", "dev1", "-a", "fleet"]);
    assert_eq!(status["status"]["firmware"]["current"], "2.0.0", "{status}");

    // Drogue's general command API is not Ajour's.
    let refusal = olga.refused(&["command", "reboot", "dev1", "-a", "fleet", "--payload", "{}"]);
    assert!(refusal.contains("no command endpoint"), "{refusal}");

    // The members document edited in $EDITOR: the reader becomes a manager and may write.
    olga.edit(
        &["edit", "member", "-a", "fleet"],
        "s/role: reader/role: manager/",
    );
    rita.ok(&["create", "device", "dev2", "-a", "fleet"]);

    // Handed over: the new owner accepts, and may delete it; the old one sees it no more.
    // drg 0.11.0's `transfer` commands fail before sending anything (its main.rs parses the word
    // `transfer` itself as the sub-command: "Matching variant not found"), so the requests its
    // client library makes are made here with the same tokens.
    let zed = Drg::new();
    let zed_token = first_token(&server, "zed");
    zed.ok(&[
        "login",
        &server.url,
        "--access-token",
        &format!("zed:{zed_token}"),
    ]);
    let broken = olga.refused(&["transfer", "init", "zed", "-a", "fleet"]);
    assert!(broken.contains("Matching variant not found"), "{broken}");
    let admin_api = format!("{}/api/admin/v1alpha1/apps/fleet", server.url);
    let transfer = |who: &str, token: &str, path: &str, body: Option<Value>| {
        let mut request = server
            .http
            .put(format!("{admin_api}/{path}"))
            .basic_auth(who, Some(token));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };
    let accepted = transfer("zed", &zed_token, "accept-ownership", None)
        .await
        .unwrap();
    assert_eq!(
        accepted.status(),
        reqwest::StatusCode::NOT_FOUND,
        "nothing offered yet"
    );
    let offered = transfer(
        "olga",
        &token,
        "transfer-ownership",
        Some(json!({"newUser": "zed"})),
    )
    .await
    .unwrap();
    assert_eq!(offered.status(), reqwest::StatusCode::NO_CONTENT);
    let accepted = transfer("zed", &zed_token, "accept-ownership", None)
        .await
        .unwrap();
    assert_eq!(accepted.status(), reqwest::StatusCode::NO_CONTENT);
    assert_eq!(olga.json(&["get", "apps"]), json!([]));
    zed.ok(&["delete", "app", "fleet"]);
    assert_eq!(zed.json(&["get", "apps"]), json!([]));
    assert_eq!(rita.json(&["get", "apps"]), json!([]));
}

#[cfg(unix)]
fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
