//! The binary in production: `ajour migrate`, `serve --no-migrate`, a schema newer than the binary
//! refused at start with a message saying what to do (both backends), and logs as JSON
//! (`--log-format json`) naming the device and application on every line that concerns one.

use crate::support::*;
use ajour_protocol::{encode_status, Encoding, Status};
use ajour_registry::{known_migrations, CredentialKeys, SqlRegistry};
use ajour_testkit::{without_outside_settings, ServerProcess, TestDatabase};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a run of the binary that ends by itself printed.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// `ajour ARGS` with `envs` (and no `AJOUR_*` of the test's own environment, but `AJOUR_LOG`),
/// run to its end. A server that should have refused to start but listens instead fails the test
/// after a minute rather than running on.
async fn run(args: &[&str], envs: &[(&str, &str)]) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
    let mut command = Command::new(AJOUR);
    command.args(args).envs(envs.iter().copied());
    without_outside_settings(&mut command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ajour {args:?} did not end:\n{}",
                std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    Ran {
        status,
        stdout: read("stdout"),
        stderr: read("stderr"),
    }
}

/// A registry database for the binary: a data directory's SQLite, or a PostgreSQL database of
/// the test's own (with the credential secret every instance on it is given).
struct Target {
    dir: tempfile::TempDir,
    database: Option<TestDatabase>,
}

impl Target {
    async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("credential-secret"),
            CredentialKeys::generate().to_text(),
        )
        .unwrap();
        Self {
            dir,
            database: TestDatabase::of(backend).await,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        match &self.database {
            Some(database) => database.url().to_string(),
            None => SqlRegistry::sqlite_url(&self.data_dir()),
        }
    }

    /// The flags that point a command at this database: `--database-url` on PostgreSQL, the data
    /// directory alone (whose SQLite `serve` and `migrate` default to) otherwise.
    fn flags(&self) -> Vec<String> {
        let mut flags = vec!["--data-dir".to_string(), self.data_dir().display().to_string()];
        if let Some(database) = &self.database {
            flags.extend(["--database-url".to_string(), database.url().to_string()]);
        }
        flags
    }

    /// `ajour serve --listen 127.0.0.1:0 FLAGS EXTRA` (on PostgreSQL with the secret).
    fn serve(&self, extra: &[&str]) -> Command {
        let mut command = Command::new(AJOUR);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(self.flags())
            .args(extra);
        if self.database.is_some() {
            command
                .arg("--credential-secret-file")
                .arg(self.dir.path().join("credential-secret"));
        }
        command
    }

    fn serve_args(&self, extra: &[&str]) -> Vec<String> {
        let command = self.serve(extra);
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    /// A row in `_sqlx_migrations` as a newer ajour would have left it.
    async fn insert_migration(&self, version: i64) {
        sqlx::any::install_default_drivers();
        let mut connection = sqlx::AnyConnection::connect(&self.url()).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, 'from a newer ajour', TRUE, $2, 0)",
        )
        .bind(version)
        .bind(vec![7u8; 48])
        .execute(&mut connection)
        .await
        .unwrap();
    }
}

fn newest_known() -> i64 {
    known_migrations().last().unwrap().version
}

async fn refused_to_serve(target: &Target, extra: &[&str]) -> String {
    let args = target.serve_args(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ran = run(&args, &[]).await;
    assert!(!ran.status.success(), "serve {extra:?} started: {}", ran.stdout);
    ran.stderr
}

#[tokio::test]
async fn ajour_migrate_applies_the_migrations_once_and_serve_no_migrate_needs_them() {
    for backend in BACKENDS {
        let target = Target::new(backend).await;
        let flags = target.flags();
        let migrate: Vec<&str> = std::iter::once("migrate")
            .chain(flags.iter().map(String::as_str))
            .collect();

        // A server told not to migrate refuses an empty database, saying what to run.
        let refused = refused_to_serve(&target, &["--no-migrate"]).await;
        assert!(
            refused.contains(&format!(
                "the database schema is empty, older than this ajour needs ({}), and migrations were turned off \
                 (--no-migrate): run `ajour migrate` first",
                newest_known()
            )),
            "{backend:?}: {refused}"
        );

        // `ajour migrate` applies every migration and says so; again, it finds nothing to do.
        let ran = run(&migrate, &[]).await;
        assert!(ran.status.success(), "{backend:?}: {}", ran.stderr);
        let mut expected: Vec<String> = known_migrations()
            .iter()
            .map(|m| format!("applied migration {} ({})", m.version, m.description))
            .collect();
        expected.push(format!(
            "the database schema is now at version {}",
            newest_known()
        ));
        assert_eq!(ran.stdout.lines().collect::<Vec<_>>(), expected, "{backend:?}");
        // The database from the environment, as a deployment gives it.
        let again = match &target.database {
            Some(database) => run(&["migrate"], &[("AJOUR_DATABASE_URL", database.url())]).await,
            None => {
                let data_dir = target.data_dir();
                run(&["migrate"], &[("AJOUR_DATA_DIR", data_dir.to_str().unwrap())]).await
            }
        };
        assert!(again.status.success(), "{backend:?}: {}", again.stderr);
        assert_eq!(
            again.stdout.trim(),
            format!(
                "the database schema is current (version {}): nothing to apply",
                newest_known()
            ),
            "{backend:?}"
        );

        // Now a server told not to migrate starts, and serves.
        let server = ServerProcess::start(target.serve(&["--no-migrate"])).await;
        let health = reqwest::get(format!("{}/readyz", server.url())).await.unwrap();
        assert_eq!(health.status(), StatusCode::OK, "{backend:?}");
    }
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused_at_start_saying_what_to_do() {
    for backend in BACKENDS {
        let target = Target::new(backend).await;
        // Migrated by a first start, as a newer ajour would have done before a rollback.
        drop(ServerProcess::start(target.serve(&[])).await);
        let future = newest_known() + 1_000_000;
        target.insert_migration(future).await;
        let message = format!(
            "the database schema is at version {future}, newer than this ajour knows ({}): run a newer ajour or restore a backup",
            newest_known()
        );
        for extra in [&[][..], &["--no-migrate"][..]] {
            let refused = refused_to_serve(&target, extra).await;
            assert!(
                refused.contains("error: opening the database at ") && refused.contains(&message),
                "{backend:?} {extra:?}: {refused}"
            );
        }
        let flags = target.flags();
        let migrate: Vec<&str> = std::iter::once("migrate")
            .chain(flags.iter().map(String::as_str))
            .collect();
        let ran = run(&migrate, &[]).await;
        assert!(
            !ran.status.success() && ran.stderr.contains(&message),
            "{backend:?}: {}",
            ran.stderr
        );
    }
}

/// The log lines of a server, as JSON objects; every line must be one.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{log}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(value.get(key).is_some(), "no {key}: {line}");
            }
            value
        })
        .collect()
}

/// The `device` span of a JSON log line, if it is in one.
fn device_span(line: &Value) -> Option<&Value> {
    line["spans"]
        .as_array()?
        .iter()
        .find(|span| span["name"] == "device")
}

/// What makes a server log about devices, at warn: `d` and `sensor-17` (logged in as its unique
/// user name `alice`) report downloads of 2.0.0 that this server never sent (they are started
/// again), and a wrong password locks `d` out (`--login-device-failures 1`).
async fn provoke_device_warnings(connection: &Connection, data_dir: &Path) {
    let file = data_dir.with_file_name("fw.bin");
    std::fs::write(&file, firmware_bytes(2048, 3)).unwrap();
    succeeded(cli_with(
        data_dir,
        &connection.url,
        &[
            "firmware",
            "add",
            "fw",
            "--version",
            "2.0.0",
            "--file",
            file.to_str().unwrap(),
        ],
    ));
    connection
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    connection.create_device("app", "d", "pw", None).await;
    let aliased = json!({"metadata": {"name": "sensor-17"}, "spec": {"authentication": {"credentials": [
        {"user": {"username": "alice", "password": "wonderland", "unique": true}}]}}});
    let (status, body) = connection
        .api_send(Method::POST, "apps/app/devices", Some(aliased))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let resuming = encode_status(
        &Status::updating(b"1.0.0".to_vec(), Some(512), None, b"2.0.0".to_vec(), 512),
        Encoding::Packed,
    );
    for (user, password) in [("d@app", "pw"), ("alice@app", "wonderland")] {
        let (status, _, _) = connection.post_dfu(user, password, resuming.clone()).await;
        assert_eq!(status, StatusCode::OK, "{user}");
    }
    let first = encode_status(
        &Status::first(b"1.0.0".to_vec(), Some(512), None),
        Encoding::Packed,
    );
    let (status, _, _) = connection.post_dfu("d@app", "wrong", first).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

const RESTARTED: &str = "the device was downloading other content under this version";
const LOCKED_OUT: &str = "too many failed logins for one device";

#[tokio::test]
async fn json_logs_name_the_device_and_application_on_every_line_that_concerns_one() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut command = Command::new(AJOUR);
    command
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--login-device-failures", "1"]);
    let server = ServerProcess::start(command).await;
    let token = std::fs::read_to_string(ajour::server::token_path(&data_dir)).unwrap();
    let connection = Connection {
        url: server.url(),
        token: token.trim().to_string(),
        http: reqwest::Client::new(),
    };
    provoke_device_warnings(&connection, &data_dir).await;
    eventually(Duration::from_secs(10), "the device warnings", || {
        let log = server.log();
        std::future::ready(log.contains(RESTARTED) && log.contains(LOCKED_OUT))
    })
    .await;

    let log = server.log();
    let lines = json_lines(&log);
    // Lines of no device (the start) are JSON too, in no device's span.
    assert!(lines.iter().any(|line| device_span(line).is_none()), "{log}");
    let concerning = |message: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|line| line["message"].as_str().is_some_and(|m| m.contains(message)))
            .collect()
    };
    let restarted = concerning(RESTARTED);
    let mut devices: Vec<&str> = restarted
        .iter()
        .map(|line| {
            let span = device_span(line).unwrap_or_else(|| panic!("no device span: {line}"));
            assert_eq!(span["app"], "app", "{line}");
            assert_eq!(line["level"], "WARN", "{line}");
            span["device"].as_str().unwrap()
        })
        .collect();
    devices.sort_unstable();
    // The device a unique user name logged in as, not the user name.
    assert_eq!(devices, ["d", "sensor-17"], "{log}");
    let locked_out = concerning(LOCKED_OUT);
    assert_eq!(locked_out.len(), 1, "{log}");
    let span = device_span(locked_out[0]).unwrap_or_else(|| panic!("no device span: {}", locked_out[0]));
    assert_eq!(
        (&span["app"], &span["device"]),
        (&json!("app"), &json!("d")),
        "{}",
        locked_out[0]
    );
    // The event's own fields sit beside the message; the device's key is `key`, as on every
    // warning about a device, not `device` (the span's field).
    assert!(locked_out[0].get("lockout").is_some(), "{}", locked_out[0]);
    assert_eq!(
        locked_out[0]["key"], "device 'd' of application 'app'",
        "{}",
        locked_out[0]
    );
}

#[tokio::test]
async fn logs_are_text_by_default_and_json_from_the_environment() {
    for (envs, json) in [(&[][..], false), (&[("AJOUR_LOG_FORMAT", "json")][..], true)] {
        let serve = ServeProcess::start(Backend::Sqlite, &["--login-device-failures", "1"], envs).await;
        provoke_device_warnings(&serve, &serve.data_dir()).await;
        eventually(Duration::from_secs(10), "the lockout warning", || {
            std::future::ready(serve.log().contains(LOCKED_OUT))
        })
        .await;
        let log = serve.log();
        let line = log.lines().find(|line| line.contains(LOCKED_OUT)).unwrap();
        if json {
            let lines = json_lines(&log);
            let line = lines.iter().find(|line| line["message"] == LOCKED_OUT).unwrap();
            let span = device_span(line).unwrap();
            assert_eq!((&span["app"], &span["device"]), (&json!("app"), &json!("d")));
        } else {
            assert!(line.contains("device{app=app device=d}"), "{line}");
            assert!(
                serde_json::from_str::<Value>(line).is_err(),
                "text, not JSON: {line}"
            );
        }
    }
}
