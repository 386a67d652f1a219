//! Start a real server for a test, in this process ([`TestServer`]) or as the `ajour` binary
//! ([`ServeProcess`]), and speak to it ([`Connection`]).

use ajour::server::{self, RunningServer, ServerConfig};
use ajour_registry::CredentialKeys;
use ajour_sim::{
    run_device, DeviceOptions, Ended, HttpLink, Link, Outcome, SimulatedDevice, Simulation, StatusEncoding,
    Transport,
};
use ajour_store::{FileStore, FirmwareName};
pub use ajour_testkit::{eventually, firmware_bytes, Backend, Metrics, BACKENDS};
use ajour_testkit::{ServerProcess, TestDatabase};
use ajour_types::{FirmwareReport, FirmwareState, FirmwareStatus};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The `ajour` binary of this build.
pub const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");

/// How a test speaks to a server, wherever it runs: its URL, API token, and an HTTP client.
pub struct Connection {
    pub url: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Connection {
    pub fn api(&self, path: &str) -> String {
        format!("{}/api/registry/v1alpha1/{path}", self.url)
    }

    pub async fn api_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.api(path)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn create_app(&self, name: &str, firmware: Option<Value>) {
        let mut body = json!({"metadata": {"name": name}, "spec": {}});
        if let Some(firmware) = firmware {
            body["spec"]["firmware"] = firmware;
        }
        let (status, body) = self.api_send(reqwest::Method::POST, "apps", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    pub async fn create_device(&self, app: &str, name: &str, password: &str, firmware: Option<Value>) {
        let mut body = json!({"metadata": {"name": name}, "spec": {"authentication": {"credentials": [{"pass": password}]}}});
        if let Some(firmware) = firmware {
            body["spec"]["firmware"] = firmware;
        }
        let (status, body) = self
            .api_send(reqwest::Method::POST, &format!("apps/{app}/devices"), Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    pub async fn device(&self, app: &str, name: &str) -> Value {
        let (status, body) = self
            .api_send(reqwest::Method::GET, &format!("apps/{app}/devices/{name}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// The device's `status.firmware` as the API shows it; `None` when it has none.
    pub async fn firmware(&self, app: &str, name: &str) -> Option<FirmwareStatus> {
        let device = self.device(app, name).await;
        let section = device["status"].get("firmware")?;
        let report =
            FirmwareReport::from_json(section).unwrap_or_else(|e| panic!("{app}/{name}: {e}: {device}"));
        Some(report.status)
    }

    /// `GET {url}/{path}` (outside the API: `healthz`, `readyz`, `metrics`).
    /// A new access token of `user`, made with the bootstrap token: `{"token", "prefix"}`.
    pub async fn user_token(&self, user: &str) -> Value {
        let response = self
            .http
            .post(format!("{}/api/tokens/v1alpha1?user={user}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    /// POST a raw body to the device endpoint.
    pub async fn post_dfu(
        &self,
        user: &str,
        password: &str,
        body: Vec<u8>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        let response = self
            .http
            .post(format!("{}/v1/dfu?ct=30", self.url))
            .basic_auth(user, Some(password))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        (status, headers, response.bytes().await.unwrap().to_vec())
    }
}

/// Whether `shown` (a device's `status.firmware`) says it runs `version`, the one it should.
pub fn in_sync(shown: &Option<FirmwareStatus>, version: &str) -> bool {
    matches!(shown, Some(s) if s.current == version && s.target == version && s.state == FirmwareState::InSync)
}

/// A server started in this process on a free port, its registry on `backend`.
pub struct TestServer {
    connection: Connection,
    running: Option<RunningServer>,
    pub data_dir: tempfile::TempDir,
    addr: SocketAddr,
    config: ServerConfig,
    database: Option<TestDatabase>,
}

impl Deref for TestServer {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.connection
    }
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        // SQLite where `ajour serve` puts it by default: in the data directory.
        let database = TestDatabase::of(backend).await;
        let mut config = ServerConfig::new(data_dir.path());
        config.database_url = database.as_ref().map(|db| db.url().to_string());
        if database.is_some() {
            config.credential_secret = Some(CredentialKeys::generate().to_text());
        }
        config.firmware_recheck = Duration::ZERO;
        config.service.engine.wait_poll = 7;
        config.service.unmanaged_poll = 600;
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = server::start(listener, config.clone()).await.unwrap();
        let addr = running.addr;
        let connection = Connection {
            url: format!("http://{addr}"),
            token: running.token.clone(),
            http: reqwest::Client::new(),
        };
        Self {
            connection,
            running: Some(running),
            data_dir,
            addr,
            config,
            database,
        }
    }

    pub fn service(&self) -> &ajour_service::UpdateService {
        &self.running.as_ref().expect("the server runs").service
    }

    /// The PostgreSQL database behind the server (on [`Backend::Postgres`]).
    pub fn database(&self) -> Option<&TestDatabase> {
        self.database.as_ref()
    }

    /// Store firmware in the server's file store, as `ajour firmware add` does.
    pub fn add_firmware(&self, name: &str, version: &str, data: &[u8]) {
        FileStore::new(server::firmware_dir(self.data_dir.path()), Duration::ZERO)
            .add(&FirmwareName::parse(name).unwrap(), version, data)
            .unwrap();
    }

    /// Shut the server down as an operator would (pending status is written); its data and
    /// address are kept for [`Self::start_again`]. Meanwhile nothing answers at its address.
    pub async fn shut_down(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
    }

    /// Start the server again, on the same address and data, after [`Self::shut_down`].
    pub async fn start_again(&mut self) {
        assert!(self.running.is_none(), "shut it down first");
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.running = Some(server::start(listener, self.config.clone()).await.unwrap());
    }

    pub async fn stop(mut self) {
        self.shut_down().await;
    }
}

/// `ajour serve` as a child process on a free port, its registry on `backend`, killed when
/// dropped. Its `/metrics` and its log are its own: the metrics recorder is per process, and tests
/// in this process run many servers at once.
pub struct ServeProcess {
    connection: Connection,
    process: ServerProcess,
    /// What it printed before it listened.
    pub printed: Vec<String>,
    /// Holds its data directory (`data/`) and the files tests give it.
    dir: tempfile::TempDir,
    _database: Option<TestDatabase>,
}

impl Deref for ServeProcess {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.connection
    }
}

impl ServeProcess {
    /// `ajour serve --listen 127.0.0.1:0 ARGS`, with its own data directory, the token it
    /// generates, and `envs`; on PostgreSQL with a credential secret of its own (the server
    /// makes one up only for SQLite).
    pub async fn start(backend: Backend, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let database = TestDatabase::of(backend).await;
        let mut command = Command::new(AJOUR);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args)
            .envs(envs.iter().copied());
        if let Some(database) = &database {
            command.args(["--database-url", database.url()]);
            let secret = dir.path().join("credential-secret");
            std::fs::write(&secret, CredentialKeys::generate().to_text()).unwrap();
            command.arg("--credential-secret-file").arg(&secret);
        }
        let process = ServerProcess::start(command).await;
        let printed = process
            .stdout()
            .lines()
            .take_while(|line| !line.starts_with("Ajour listening on "))
            .map(str::to_string)
            .collect();
        let token = std::fs::read_to_string(server::token_path(&data_dir))
            .expect("the API token in the data directory")
            .trim()
            .to_string();
        Self {
            connection: Connection {
                url: process.url(),
                token,
                http: reqwest::Client::new(),
            },
            process,
            printed,
            dir,
            _database: database,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Its Prometheus metrics now.
    pub async fn metrics(&self) -> Metrics {
        Metrics::of(&self.url).await
    }

    /// Store firmware in the server's firmware directory with `ajour firmware add`.
    pub fn add_firmware(&self, name: &str, version: &str, data: &[u8]) {
        let file = self.dir.path().join(format!("{name}-{version}.bin"));
        std::fs::write(&file, data).unwrap();
        let file = file.to_str().unwrap();
        succeeded(self.cli(&["firmware", "add", name, "--version", version, "--file", file]));
    }

    /// Run the `ajour` CLI against this server (its URL, and its token from its data directory).
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_with(&self.data_dir(), &self.url, args)
    }
}

/// Run the `ajour` CLI with `AJOUR_DATA_DIR` (where it reads the API token) and `AJOUR_URL`.
pub fn cli_with(data_dir: &Path, url: &str, args: &[&str]) -> Output {
    Command::new(AJOUR)
        .args(args)
        .env("AJOUR_DATA_DIR", data_dir)
        .env("AJOUR_URL", url)
        .env_remove("AJOUR_API_TOKEN")
        .output()
        .unwrap()
}

/// The stdout of a CLI run that must succeed.
pub fn succeeded(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The stderr of a CLI run that must fail.
pub fn failed(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "expected a failure; stdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    stderr
}

/// A server started in this process from `ajour serve`'s command line, as an operator starts it
/// (`--data-dir` a temp dir, `--listen 127.0.0.1:0`, `flags`), on `backend`; with its
/// [`RunningServer`], where the addresses of the other endpoints are.
pub struct FlagServer {
    connection: Connection,
    running: Option<RunningServer>,
    data_dir: tempfile::TempDir,
    _database: Option<TestDatabase>,
}

impl Deref for FlagServer {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.connection
    }
}

impl FlagServer {
    pub async fn start(backend: Backend, flags: &[&str]) -> Self {
        use clap::Parser;
        let data_dir = tempfile::tempdir().unwrap();
        let database = TestDatabase::of(backend).await;
        let data = data_dir.path().to_str().unwrap().to_string();
        let mut argv = vec!["ajour", "serve", "--data-dir", &data, "--listen", "127.0.0.1:0"];
        argv.extend(["--firmware-recheck-ms", "0"]);
        let secret = CredentialKeys::generate().to_text();
        if let Some(database) = &database {
            argv.extend(["--database-url", database.url(), "--credential-secret", &secret]);
        }
        argv.extend_from_slice(flags);
        let ajour::cli::Command::Serve(args) = ajour::cli::Cli::try_parse_from(&argv).unwrap().command else {
            unreachable!()
        };
        let config = args.server_config().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = server::start(listener, config).await.unwrap();
        Self {
            connection: Connection {
                url: format!("http://{}", running.addr),
                token: running.token.clone(),
                http: reqwest::Client::new(),
            },
            running: Some(running),
            data_dir,
            _database: database,
        }
    }

    pub fn running(&self) -> &RunningServer {
        self.running.as_ref().expect("the server runs")
    }

    pub fn service(&self) -> &ajour_service::UpdateService {
        &self.running().service
    }

    /// The address the CoAP endpoint got (started with `--coap-listen`).
    pub fn coap(&self) -> SocketAddr {
        self.running()
            .coap_addr
            .expect("a CoAP endpoint: start with --coap-listen")
    }

    /// The address the MQTT endpoint got (started with `--mqtt-listen`).
    pub fn mqtt(&self) -> SocketAddr {
        self.running()
            .mqtt_addr
            .expect("an MQTT endpoint: start with --mqtt-listen")
    }

    pub fn add_firmware(&self, name: &str, version: &str, data: &[u8]) {
        FileStore::new(server::firmware_dir(self.data_dir.path()), Duration::ZERO)
            .add(&FirmwareName::parse(name).unwrap(), version, data)
            .unwrap();
    }

    /// Application `app` with firmware `fw` 2.0.0 (`image`), and devices `names`, password `pw`.
    pub async fn with_devices(&self, app: &str, image: &[u8], names: &[&str]) {
        self.add_firmware("fw", "2.0.0", image);
        self.create_app(app, Some(json!({"file": {"name": "fw"}}))).await;
        for name in names {
            self.create_device(app, name, "pw", None).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
    }
}

/// A fleet for the one simulator (`ajour_sim`): devices `sim-0 .. sim-(devices-1)` of `app`,
/// password `pw`, running 1.0.0, sending packed statuses over `transport`; a Wait is honoured for
/// at most a second, and a device not in sync after two minutes fails.
pub fn fleet(app: &str, devices: u32, transport: Transport) -> Simulation {
    Simulation {
        app: app.into(),
        devices: (0..devices).map(|i| format!("sim-{i}")).collect(),
        password: "pw".into(),
        version: "1.0.0".into(),
        mtu: None,
        transport,
        concurrency: devices as usize,
        device: DeviceOptions::new(
            StatusEncoding::Packed,
            Duration::from_secs(1),
            Duration::from_secs(120),
        ),
        faults: Default::default(),
        ca_file: None,
        client_cert: None,
    }
}

/// Devices behind Drogue's MQTT integration at `broker_url`, sending a status again when no
/// command answered it within `command_timeout`.
pub fn via_drogue(broker_url: &str, command_timeout: Duration) -> Transport {
    Transport::DrogueMqtt {
        broker: ajour_client::mqtt::MqttConfig::new(broker_url, "ajour-test-fleet"),
        command_timeout,
    }
}

/// Run `simulation`; how each device ended, by name. A device that failed fails the test.
pub async fn simulate(simulation: &Simulation) -> BTreeMap<String, Outcome> {
    ajour_sim::simulate(simulation)
        .await
        .expect("the simulation set up")
        .into_iter()
        .map(|(name, outcome)| {
            let outcome = outcome.unwrap_or_else(|e| panic!("{name}: {e:#}"));
            (name, outcome)
        })
        .collect()
}

/// Every device of `outcomes` updated from 1.0.0 to `version`, `size` bytes, checksum verified.
pub fn assert_all_updated(outcomes: &BTreeMap<String, Outcome>, version: &str, size: usize) {
    for (name, outcome) in outcomes {
        assert_eq!(
            outcome,
            &Outcome::Updated {
                from: "1.0.0".into(),
                to: version.into(),
                bytes: size
            },
            "{name}"
        );
    }
}

/// Device `name` of `app` (password `pw`) running `version`, asking for `mtu`-byte blocks,
/// updated over HTTP by the one simulator until it is in sync (waits honoured for a second, at
/// most a minute in all): how it ended, and the device as it is then (its version, and the bytes
/// it last received).
pub async fn update_over_http(
    server: &Connection,
    app: &str,
    name: &str,
    version: &str,
    mtu: Option<u32>,
) -> (Outcome, SimulatedDevice) {
    let mut device = SimulatedDevice::new(version, mtu);
    let mut link = HttpLink::new(server.http.clone(), &server.url, app, name, "pw");
    let outcome = run_to_end(&mut device, &mut link, &format!("{name}@{app}")).await;
    (outcome, device)
}

/// Run `device` over `link` until it is in sync (waits honoured for a second, at most a minute
/// in all): how it ended. Anything else fails the test, naming `who`.
pub async fn run_to_end(device: &mut SimulatedDevice, link: &mut impl Link, who: &str) -> Outcome {
    let options = DeviceOptions::new(
        StatusEncoding::Packed,
        Duration::from_secs(1),
        Duration::from_secs(60),
    );
    match run_device(device, link, &options, &mut ()).await {
        Ok(Ended::Done(outcome)) => outcome,
        other => panic!("{who}: {other:?}"),
    }
}

/// A device's update from 1.0.0 to `version`, `bytes` long, every block and the checksum checked.
pub fn updated_to(version: &str, bytes: usize) -> Outcome {
    Outcome::Updated {
        from: "1.0.0".into(),
        to: version.into(),
        bytes,
    }
}

/// The server's OCI source for `registry` (images under `fw/`): quick to re-check `Always` tags and
/// to retry after a failure.
pub fn oci_config(registry: &ajour_testkit::OciRegistry) -> ajour_store::OciConfig {
    ajour_store::OciConfig {
        registry_prefix: format!("{}/fw/", registry.host()),
        plain_http: true,
        always_recheck: Duration::from_millis(200),
        error_retry: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        ..ajour_store::OciConfig::default()
    }
}
