//! The command line: `serve`, the management commands over the REST API, `firmware add`, and
//! `simulate`.

use crate::client::ApiClient;
use crate::config;
use crate::server::{self, ServerConfig};
use crate::simulate::{self, SimulateArgs};
use ajour_hawkbit::HawkbitConfig;
use ajour_registry::{SqlRegistry, SqlRegistryOptions};
use ajour_store::{FileStore, FirmwareName, SameVersion};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "ajour",
    version,
    about = "Firmware updates for fleets of small devices"
)]
pub struct Cli {
    /// How log lines are written to standard error: `text` for people, `json` for log collectors
    /// (one object per line; the device and application a line concerns under `spans`).
    #[arg(
        long,
        value_enum,
        env = "AJOUR_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, with the fields of the spans it is in (`device{app=.. device=..}:`).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's fields,
    /// and `spans`, the spans it is in (root first) with their fields.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: device endpoint and REST API.
    Serve(Box<ServeArgs>),
    /// Manage applications.
    #[command(subcommand)]
    App(AppCommand),
    /// Manage devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Manage firmware images.
    #[command(subcommand)]
    Firmware(FirmwareCommand),
    /// Roll new firmware out to an application's devices in waves, halted by itself when too
    /// many fail.
    #[command(subcommand)]
    Rollout(crate::rollout_cli::RolloutCommand),
    /// Build firmware from its source and publish it (see docs/builds.md).
    #[command(subcommand)]
    Build(crate::build_cli::BuildCommand),
    /// Manage users' access tokens (for `drg` and scripts; see docs/drogue-tools.md).
    #[command(subcommand)]
    Token(crate::token_cli::TokenCommand),
    /// Play one device, or a fleet, updating over the HTTP endpoint (or, with --via-mqtt, behind
    /// Drogue's MQTT integration).
    Simulate(SimulateArgs),
    /// Bring the registry database's schema up to date (what `serve` does on start unless
    /// --no-migrate), and say what was applied.
    Migrate(MigrateArgs),
}

/// `ajour migrate`: the database `serve` would use.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Registry database, `postgres://user[:pass]@host[:port]/db` or `sqlite://path?mode=rwc`, as
    /// `serve --database-url` takes it (default: SQLite in the data directory).
    #[arg(long, value_name = "URL", env = "AJOUR_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The data directory whose SQLite database (`ajour.db`) is migrated when no --database-url is
    /// given.
    #[arg(long, value_name = "DIR", env = "AJOUR_DATA_DIR", default_value = server::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

// The flags of `ajour serve`: the one definition of each setting (name, meaning, type, checks,
// default). The config file and the environment are layered under them by `config::resolve`.
#[derive(Debug, Args)]
#[command(
    next_help_heading = "Server",
    mut_args(crate::config::without_env),
    after_long_help = crate::config::layers_help()
)]
pub struct ServeArgs {
    /// The settings given explicitly. First: the fields after it take their values out of the
    /// matches it reads.
    #[command(flatten)]
    pub given: crate::config::Given,
    /// A TOML file of settings, its keys the long flag names (`listen = "0.0.0.0:8080"`); the
    /// environment and flags override it.
    #[arg(long = "config", value_name = "FILE", help_heading = None::<&str>)]
    pub config_file: Option<PathBuf>,
    /// Print the configuration in force as TOML (secrets left out) and exit.
    #[arg(long, help_heading = None::<&str>)]
    pub print_config: bool,
    /// Where the SQLite database (`ajour.db`, by default), firmware files (`firmware/`), API
    /// token (`api-token`) live.
    #[arg(long, value_name = "DIR", default_value = server::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free port. The bound address is printed (`Ajour
    /// listening on http://...`, or `https://` with --tls-cert).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Also serve devices over CoAP (UDP) at this address, as Drogue's CoAP endpoint: `POST
    /// /v1/dfu`, credentials in option 4209 (port 0 picks a free port; CoAP's own is 5683). Off
    /// when not given. See docs/coap.md.
    #[arg(long, value_name = "ADDR:PORT")]
    pub coap_listen: Option<String>,
    /// Also serve devices over MQTT 3.1.1 and 5 at this address, as Drogue's MQTT endpoint:
    /// user name `device@app` and password, statuses published to `dfu`, commands on
    /// `command/inbox//dfu` (port 0 picks a free port; MQTT's own is 1883, 8883 over TLS). Speaks
    /// TLS with --tls-cert. Off when not given. See docs/mqtt.md.
    #[arg(long, value_name = "ADDR:PORT")]
    pub mqtt_listen: Option<String>,
    /// The base URL clients reach this server at, as Drogue's tools are told it
    /// (`/.well-known/drogue-endpoints`, see docs/drogue-tools.md): `https://...` behind a TLS
    /// proxy, with a path when the proxy serves Ajour under one (default: `http://` and the
    /// request's Host header).
    #[arg(long, value_name = "URL", value_parser = ajour_api::parse_public_url)]
    pub public_url: Option<String>,
    /// Registry database, `postgres://user[:pass]@host[:port]/db` or `sqlite://path?mode=rwc`
    /// (default: SQLite in the data directory); migrations run on start, once whichever instance
    /// starts first, unless --no-migrate. In Drogue mode, Ajour's own database beside Drogue's
    /// registry: devices' histories and rollouts.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Do not change the database's schema on start: start only if it is current, else exit
    /// saying so (run `ajour migrate` first, e.g. as a job before a rollout).
    #[arg(long)]
    pub no_migrate: bool,
    /// Entries of each device's update history kept (the newest), in the database.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().history.max_events,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub history_max_events: u32,
    /// Days an entry of a device's update history is kept.
    #[arg(long, value_name = "DAYS",
          default_value_t = ServerConfig::default().history.max_age.as_secs() / SECONDS_PER_DAY,
          value_parser = clap::value_parser!(u64).range(1..=36_500))]
    pub history_max_age_days: u64,
    /// How often rollouts move on (devices past their timeouts failed, waves started, halts):
    /// milliseconds between two rounds of the rollout controller.
    #[arg(long, value_name = "MS", default_value_t = ServerConfig::default().rollout_tick.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub rollout_tick_ms: u64,
    /// The bearer token the REST API requires (default: the one saved in the data directory, or a
    /// new one, saved there and printed once).
    #[arg(long, value_name = "TOKEN")]
    pub api_token: Option<String>,
    /// Block size for devices that state no mtu (or 0).
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().service.engine.default_mtu,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub default_mtu: u32,
    /// Largest block sent, whatever a device asks for.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().service.engine.max_mtu,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_mtu: u32,
    /// Seconds a device waits when its firmware cannot be had.
    #[arg(long, value_name = "S", default_value_t = ServerConfig::default().service.engine.wait_poll)]
    pub wait_poll: u32,
    /// Seconds a device with no firmware set waits before asking again.
    #[arg(long, value_name = "S", default_value_t = ServerConfig::default().service.unmanaged_poll)]
    pub unmanaged_poll: u32,
    /// Seconds a device in sync waits before reporting again, sent with `Sync` (default: the
    /// device decides).
    #[arg(long, value_name = "S")]
    pub sync_poll: Option<u32>,
    /// Milliseconds a device's and application's spec are reused before they are read from the
    /// registry again; writes through this server's API apply at once, and on PostgreSQL writes
    /// through other instances too (announced by NOTIFY).
    #[arg(long, value_name = "MS",
          default_value_t = config::millis(ServerConfig::default().service.spec_cache_ttl))]
    pub spec_cache_ms: u64,
    /// Update progress is written to the registry at most this often per device (milliseconds).
    #[arg(long, value_name = "MS",
          default_value_t = config::millis(ServerConfig::default().service.progress_interval))]
    pub progress_interval_ms: u64,
    /// ... and only when it advanced by this many percentage points (or the device went quiet for
    /// the interval, at least 5 s).
    #[arg(long, value_name = "P", default_value_t = ServerConfig::default().service.progress_step)]
    pub progress_step: f64,
    /// Milliseconds between checks of firmware files for replacement.
    #[arg(long, value_name = "MS",
          default_value_t = config::millis(ServerConfig::default().firmware_recheck))]
    pub firmware_recheck_ms: u64,
    /// The file holding the secret device passwords are sealed with (default:
    /// `credential-secret` in the data directory, created with SQLite). See docs/credentials.md.
    #[arg(long, value_name = "FILE", help_heading = "Device logins")]
    pub credential_secret_file: Option<PathBuf>,
    /// The secret itself instead of a file: base64 keys, current first, separated by commas
    /// (for an environment variable or a Kubernetes Secret).
    #[arg(long, value_name = "KEYS", help_heading = "Device logins")]
    pub credential_secret: Option<String>,
    /// A failed device login is answered no sooner than this many milliseconds after it began,
    /// so that a wrong password and an unknown device look the same.
    #[arg(long, value_name = "MS", help_heading = "Device logins",
          default_value_t = config::millis(ServerConfig::default().service.login_failure_delay))]
    pub login_failure_delay_ms: u64,
    /// Failed logins from one address (IPv6: one /64) within the window before it gets 429 for
    /// the lockout (0: no limit; behind a proxy every client shares its address).
    #[arg(long, value_name = "N", help_heading = "Device logins",
          default_value_t = ServerConfig::default().service.guard.address_failures)]
    pub login_address_failures: u32,
    /// Failed logins for one device within the window before it gets 429 for the lockout, except
    /// from the address it last logged in from (0: no limit).
    #[arg(long, value_name = "N", help_heading = "Device logins",
          default_value_t = ServerConfig::default().service.guard.device_failures)]
    pub login_device_failures: u32,
    /// The window failed logins are counted in (milliseconds).
    #[arg(long, value_name = "MS", help_heading = "Device logins",
          default_value_t = config::millis(ServerConfig::default().service.guard.window),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub login_window_ms: u64,
    /// How long a lockout lasts (milliseconds).
    #[arg(long, value_name = "MS", help_heading = "Device logins",
          default_value_t = config::millis(ServerConfig::default().service.guard.lockout))]
    pub login_lockout_ms: u64,
    /// Milliseconds a request head may take to arrive whole, counted from the connection's accept
    /// or, on a kept-alive connection, from the head's first byte; then the connection is closed.
    #[arg(long, value_name = "MS", help_heading = "Connections",
          default_value_t = config::millis(ServerConfig::default().connections.header_timeout),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,
    /// Milliseconds a request body may take to arrive whole after its head; then the device
    /// endpoint answers 408 and the connection is closed.
    #[arg(long, value_name = "MS", help_heading = "Connections",
          default_value_t = config::millis(ServerConfig::default().connections.body_timeout),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_ms: u64,
    /// Milliseconds a kept-alive connection may wait for its next request with nothing sent
    /// either way; then it is closed.
    #[arg(long, value_name = "MS", help_heading = "Connections",
          default_value_t = config::millis(ServerConfig::default().connections.idle_timeout),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,
    /// Connections served at once; one past it is answered 503 with `Retry-After` and closed.
    /// Lowered at start to fit the open-file limit (its soft value raised to the hard one first),
    /// less 64 files kept for the rest; the cap in force is logged.
    #[arg(long, value_name = "N", help_heading = "Connections",
          default_value_t = ServerConfig::default().connections.max_connections,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Connections the kernel queues until the server accepts them (the kernel caps it at
    /// `net.core.somaxconn`).
    #[arg(long, value_name = "N", help_heading = "Connections",
          default_value_t = ServerConfig::default().connections.listen_backlog,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub listen_backlog: u32,
    /// On SIGTERM or SIGINT, milliseconds open connections get to finish their requests (no new
    /// ones are accepted); then those left are closed and pending statuses are written.
    #[arg(long, value_name = "MS", help_heading = "Connections",
          default_value_t = config::millis(ServerConfig::default().connections.shutdown_timeout))]
    pub shutdown_timeout_ms: u64,
    /// Serve HTTPS, not HTTP, on --listen (devices and the API alike): the server's certificate
    /// in PEM, intermediates after it. Needs --tls-key. The files are read again when they change
    /// (--tls-reload-ms), without a restart. See docs/http-and-api.md, "TLS".
    #[arg(long, value_name = "FILE", help_heading = "TLS", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert in PEM (PKCS#8, PKCS#1 or SEC1). Needs --tls-cert.
    #[arg(long, value_name = "FILE", help_heading = "TLS", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Milliseconds between looks at the modification time and length of --tls-cert and
    /// --tls-key; when either changed, both are read again, and a pair that does not load or
    /// match is logged and the one in use kept.
    #[arg(long, value_name = "MS", help_heading = "TLS",
          default_value_t = config::millis(ServerConfig::default().tls_reload),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tls_reload_ms: u64,
    /// Drogue mode: Drogue's registry and MQTT integration (see docs/drogue.md).
    #[command(flatten, next_help_heading = "Drogue mode")]
    pub drogue: Box<crate::drogue_cli::DrogueArgs>,
    /// The OCI registry firmware source (see docs/oci.md).
    #[command(flatten, next_help_heading = "OCI registry")]
    pub oci: crate::oci_cli::OciServeArgs,
    /// The Hawkbit firmware source (see docs/hawkbit.md).
    #[command(flatten, next_help_heading = "Hawkbit")]
    pub hawkbit: HawkbitServeArgs,
    #[command(flatten, next_help_heading = "Builds")]
    pub builds: crate::build_cli::BuildServeArgs,
}

/// `ajour serve` flags for the Hawkbit firmware source (`spec.firmware.hawkbit`).
#[derive(Debug, Clone, Args)]
pub struct HawkbitServeArgs {
    /// Base URL of Hawkbit's DDI API, e.g. `https://hawkbit.example.com` (`http://` talks plain
    /// HTTP). `serve` reads firmware from Hawkbit only when this is set.
    #[arg(long = "hawkbit-url", value_name = "URL")]
    pub url: Option<String>,
    /// The Hawkbit tenant the controllers belong to.
    #[arg(long = "hawkbit-tenant", value_name = "TENANT",
          default_value_t = HawkbitConfig::new("").tenant)]
    pub tenant: String,
    /// Gateway security token (`Authorization: GatewayToken ...`), used for every controller
    /// without a target token of its own.
    #[arg(long = "hawkbit-gateway-token", value_name = "TOKEN")]
    pub gateway_token: Option<String>,
    /// A file of per-controller target security tokens, `CONTROLLER=TOKEN` per line
    /// (`Authorization: TargetToken ...`); read at start.
    #[arg(long = "hawkbit-target-tokens-file", value_name = "FILE")]
    pub target_tokens_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for Hawkbit, beside the system's.
    #[arg(long = "hawkbit-ca-file", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Accept any TLS certificate from Hawkbit (explicit opt-in, for labs and tests).
    #[arg(long = "hawkbit-insecure-tls")]
    pub insecure_tls: bool,
    /// Milliseconds to wait for Hawkbit to connect or send data; a whole request gets four times
    /// this.
    #[arg(long = "hawkbit-timeout-ms", value_name = "MS",
          default_value_t = config::millis(HawkbitConfig::new("").request_timeout))]
    pub timeout_ms: u64,
    /// Milliseconds a failure (Hawkbit down or answering errors, a download cut short) is
    /// remembered before Hawkbit is asked again; the controller's devices wait meanwhile.
    #[arg(long = "hawkbit-error-retry-ms", value_name = "MS",
          default_value_t = config::millis(HawkbitConfig::new("").error_retry))]
    pub error_retry_ms: u64,
    /// `proceeding` feedback with the progress is sent at most this often per controller
    /// (milliseconds); `closed` feedback is sent at once.
    #[arg(long = "hawkbit-feedback-interval-ms", value_name = "MS",
          default_value_t = config::millis(HawkbitConfig::new("").feedback_interval))]
    pub feedback_interval_ms: u64,
    /// Longest time a poll is trusted, in milliseconds (default: Hawkbit's polling sleep). Each
    /// controller is polled at most once per the shorter of the two.
    #[arg(long = "hawkbit-max-poll-ms", value_name = "MS")]
    pub max_poll_ms: Option<u64>,
    /// Largest artifact accepted from Hawkbit, in bytes; a larger one fails the action before it
    /// is downloaded.
    #[arg(long = "hawkbit-max-firmware-bytes", value_name = "N",
          default_value_t = HawkbitConfig::new("").max_firmware_size)]
    pub max_firmware_bytes: u64,
}

impl HawkbitServeArgs {
    /// The Hawkbit source's configuration, when `--hawkbit-url` is given.
    pub fn config(&self) -> Option<HawkbitConfig> {
        let url = self.url.clone()?;
        Some(HawkbitConfig {
            tenant: self.tenant.clone(),
            gateway_token: self.gateway_token.clone(),
            target_tokens_file: self.target_tokens_file.clone(),
            extra_ca_file: self.ca_file.clone(),
            accept_invalid_certs: self.insecure_tls,
            request_timeout: Duration::from_millis(self.timeout_ms),
            error_retry: Duration::from_millis(self.error_retry_ms),
            feedback_interval: Duration::from_millis(self.feedback_interval_ms),
            max_poll: self.max_poll_ms.map(Duration::from_millis),
            max_firmware_size: self.max_firmware_bytes,
            ..HawkbitConfig::new(url)
        })
    }
}

const SECONDS_PER_DAY: u64 = 24 * 3600;

impl ServeArgs {
    /// The server's configuration from these settings, less Drogue mode and the rules between
    /// settings: [`ServeArgs::server_config`] is the whole of it.
    pub fn config(&self) -> ServerConfig {
        let mut config = ServerConfig::new(&self.data_dir);
        config.database_url = self.database_url.clone();
        config.migrate = !self.no_migrate;
        config.history = ajour_registry::HistoryRetention {
            max_events: self.history_max_events,
            max_age: Duration::from_secs(self.history_max_age_days * SECONDS_PER_DAY),
        };
        config.rollout_tick = Duration::from_millis(self.rollout_tick_ms);
        config.api_token = self.api_token.clone();
        config.service.engine.default_mtu = self.default_mtu;
        config.service.engine.max_mtu = self.max_mtu;
        config.service.engine.wait_poll = self.wait_poll;
        config.service.engine.sync_poll = self.sync_poll;
        config.service.unmanaged_poll = self.unmanaged_poll;
        config.service.spec_cache_ttl = Duration::from_millis(self.spec_cache_ms);
        config.service.progress_interval = Duration::from_millis(self.progress_interval_ms);
        config.service.progress_step = self.progress_step;
        config.firmware_recheck = Duration::from_millis(self.firmware_recheck_ms);
        config.credential_secret_file = self.credential_secret_file.clone();
        config.credential_secret = self.credential_secret.clone();
        config.service.login_failure_delay = Duration::from_millis(self.login_failure_delay_ms);
        config.service.guard = ajour_service::GuardConfig {
            address_failures: self.login_address_failures,
            device_failures: self.login_device_failures,
            window: Duration::from_millis(self.login_window_ms),
            lockout: Duration::from_millis(self.login_lockout_ms),
        };
        config.connections = server::ConnectionLimits {
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections,
            listen_backlog: self.listen_backlog,
            shutdown_timeout: Duration::from_millis(self.shutdown_timeout_ms),
        };
        config.oci = self.oci.config();
        config.hawkbit = self.hawkbit.config();
        config.public_url = self.public_url.clone();
        config.coap_listen = self.coap_listen.clone();
        config.mqtt_listen = self.mqtt_listen.clone();
        config.tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(server::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        config.tls_reload = Duration::from_millis(self.tls_reload_ms);
        config.builds = self.builds.config();
        config
    }

    /// The server's configuration from these settings, Drogue mode included; refused when
    /// settings contradict each other.
    pub fn server_config(&self) -> anyhow::Result<ServerConfig> {
        self.oci.connection.check()?;
        let mut config = self.config();
        config.drogue = self.drogue.config()?;
        Ok(config)
    }
}

/// Where the API is and how to authenticate: shared by the management commands.
#[derive(Debug, Args)]
pub struct Connection {
    /// Base URL of the Ajour server.
    #[arg(
        long,
        env = "AJOUR_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// API token (default: read from the data directory's `api-token`).
    #[arg(long, env = "AJOUR_API_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Data directory to read the API token from when none is given.
    #[arg(long, env = "AJOUR_DATA_DIR", default_value = server::DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,
}

impl Connection {
    pub(crate) fn client(&self) -> anyhow::Result<ApiClient> {
        let token = match &self.token {
            Some(token) => token.clone(),
            None => {
                let path = server::token_path(&self.data_dir);
                std::fs::read_to_string(&path)
                    .with_context(|| format!("no --token given and none readable at {}", path.display()))?
                    .trim()
                    .to_string()
            }
        };
        ApiClient::new(&self.url, &token)
    }
}

/// Which firmware an application or device should run.
#[derive(Debug, Args, Default)]
#[group(multiple = false)]
pub struct FirmwareChoice {
    /// Firmware files `NAME.json`/`NAME.bin` in the server's firmware directory.
    #[arg(long = "firmware-file", value_name = "NAME")]
    pub file: Option<String>,
    /// An image in an OCI registry.
    #[arg(long = "firmware-image", value_name = "IMAGE")]
    pub image: Option<String>,
    /// A Hawkbit controller id.
    #[arg(long = "firmware-hawkbit", value_name = "CONTROLLER")]
    pub hawkbit: Option<String>,
}

impl FirmwareChoice {
    pub(crate) fn to_spec(&self) -> Option<Value> {
        if let Some(name) = &self.file {
            return Some(json!({"file": {"name": name}}));
        }
        if let Some(image) = &self.image {
            return Some(json!({"container": {"image": image}}));
        }
        self.hawkbit
            .as_ref()
            .map(|c| json!({"hawkbit": {"controller": c}}))
    }
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Create an application.
    Create {
        name: String,
        #[command(flatten)]
        firmware: FirmwareChoice,
        #[command(flatten)]
        connection: Connection,
    },
    /// List applications.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// Show an application as JSON.
    Get {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete an application and its devices.
    Delete {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Set (or with none given, clear) the firmware of an application's devices.
    SetFirmware {
        name: String,
        #[command(flatten)]
        firmware: FirmwareChoice,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Create a device (with --count N, devices NAME-0 .. NAME-(N-1)).
    Create {
        app: String,
        name: String,
        /// The device's password (stored only as a keyed verifier). Without it a random one is
        /// generated and printed once, as `device@application PASSWORD`.
        #[arg(long, conflicts_with = "no_password")]
        password: Option<String>,
        /// Create the device without a password (it cannot use the HTTP endpoint).
        #[arg(long)]
        no_password: bool,
        #[arg(long)]
        count: Option<u32>,
        #[command(flatten)]
        firmware: FirmwareChoice,
        #[command(flatten)]
        connection: Connection,
    },
    /// List an application's devices with their firmware status.
    List {
        app: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a device as JSON.
    Get {
        app: String,
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a device.
    Delete {
        app: String,
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Set (or with none given, clear) a device's own firmware, overriding its application's.
    SetFirmware {
        app: String,
        name: String,
        #[command(flatten)]
        firmware: FirmwareChoice,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a device's current and target firmware and its update progress.
    Status {
        app: String,
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a device's update history, oldest of the newest LIMIT entries first.
    History {
        app: String,
        name: String,
        /// How many of the newest entries to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print the entries as the API gives them (JSON, newest first).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum FirmwareCommand {
    /// Store an image as files in the data directory's firmware store (`NAME.bin` + `NAME.json`).
    Add {
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, env = "AJOUR_DATA_DIR", default_value = server::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Replace the version even when it is stored with other bytes (devices in the middle of
        /// the update start again; devices already running it keep the old bytes).
        #[arg(long)]
        force: bool,
    },
    /// Build an OCI image of a firmware file and push it to a registry (see docs/oci.md).
    Push(crate::oci_cli::PushArgs),
    /// Show the firmware metadata Ajour would serve from an OCI image.
    Inspect(crate::oci_cli::InspectArgs),
}

/// Run a command to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::App(command) => app(command).await,
        Command::Device(command) => device(command).await,
        Command::Rollout(command) => crate::rollout_cli::run(command).await,
        Command::Build(command) => crate::build_cli::run(command).await,
        Command::Token(command) => crate::token_cli::run(command).await,
        Command::Firmware(FirmwareCommand::Add {
            name,
            version,
            file,
            data_dir,
            force,
        }) => {
            let name = FirmwareName::parse(&name)?;
            anyhow::ensure!(!version.trim().is_empty(), "--version must not be empty");
            let data = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let store = FileStore::new(server::firmware_dir(&data_dir), Duration::ZERO);
            let same_version = if force {
                SameVersion::Replace
            } else {
                SameVersion::Refuse
            };
            let metadata = store.publish(&name, &version, &data, same_version)?;
            crate::say!(
                "firmware '{name}' version {} ({} bytes, sha256 {}) stored in {}",
                metadata.version,
                metadata.size,
                metadata.checksum,
                store.dir().display()
            );
            Ok(())
        }
        Command::Firmware(FirmwareCommand::Push(args)) => crate::oci_cli::push(args).await,
        Command::Firmware(FirmwareCommand::Inspect(args)) => crate::oci_cli::inspect(args).await,
        Command::Simulate(args) => simulate::run(args).await,
        Command::Migrate(args) => migrate(args).await,
    }
}

/// `ajour migrate`: apply the migrations the database lacks, and say what they were.
async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let url = match args.database_url {
        Some(url) => url,
        None => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
            SqlRegistry::sqlite_url(&args.data_dir)
        }
    };
    let options = SqlRegistryOptions {
        max_connections: 1,
        ..Default::default()
    };
    let registry = SqlRegistry::connect(&url, options)
        .await
        .with_context(|| format!("migrating the registry at {}", server::redact(&url)))?;
    let schema = registry.schema();
    for migration in &schema.applied {
        crate::say!("applied migration {migration}");
    }
    let version = schema
        .version
        .map_or_else(|| "none".to_string(), |v| v.to_string());
    if schema.applied.is_empty() {
        crate::say!("the database schema is current (version {version}): nothing to apply");
    } else {
        crate::say!("the database schema is now at version {version}");
    }
    registry.pool().close().await;
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let args = config::resolve(&args, &config::process_environment())?;
    let config = args.server_config()?;
    if args.print_config {
        crate::say!("{}", config::to_toml(&args).trim_end());
        return Ok(());
    }
    // Caught from before the server listens: a stop asked for at any time is a clean one.
    let termination = server::termination_signal().context("installing signal handlers")?;
    // Connections are capped by the open-file limit (`server::start`): take what the system allows.
    #[cfg(unix)]
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!("cannot raise the open-file limit: {error}");
    }
    let listener = server::bind(&args.listen, config.connections.listen_backlog).await?;
    let running = server::start(listener, config.clone()).await?;
    if running.token_generated {
        crate::say!(
            "Generated an API token, saved in {} (shown only this once): {}",
            server::token_path(&config.data_dir).display(),
            running.token
        );
    }
    let scheme = if running.tls.is_some() { "https" } else { "http" };
    crate::say!("Ajour listening on {scheme}://{}", running.addr);
    if let Some(coap) = running.coap_addr {
        crate::say!("CoAP device endpoint on coap://{coap}");
    }
    if let Some(mqtt) = running.mqtt_addr {
        let scheme = if running.tls.is_some() { "mqtts" } else { "mqtt" };
        crate::say!("MQTT device endpoint on {scheme}://{mqtt}");
    }
    crate::say!("Data directory: {}", config.data_dir.display());
    if let Some(drogue) = &config.drogue {
        crate::say!(
            "Drogue mode: registry {}, MQTT integration {} (client id {}); histories and rollouts in {}",
            server::redact(&drogue.registry.url),
            server::redact(&drogue.integration.mqtt.url),
            drogue.integration.mqtt.client_id,
            server::redact(
                &config
                    .database_url
                    .clone()
                    .unwrap_or_else(|| ajour_registry::SqlRegistry::sqlite_url(&config.data_dir))
            )
        );
    }
    let shutdown = running.shutdown_handle();
    let drain = config.connections.shutdown_timeout;
    tokio::spawn(async move {
        let signal = termination.await;
        tracing::info!(
            "{signal}: shutting down (no new connections, up to {drain:?} for open ones, then pending statuses are written)"
        );
        let _ = shutdown.send(true);
    });
    running.wait().await?;
    tracing::info!("stopped");
    Ok(())
}

fn print_json(value: &Value) {
    crate::say!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// Set (or clear) `spec.firmware` of the object at `path`, re-reading it on a conflict.
async fn set_firmware(
    connection: &Connection,
    path: &str,
    what: &str,
    firmware: &FirmwareChoice,
) -> anyhow::Result<()> {
    let section = firmware.to_spec();
    connection
        .client()?
        .modify(path, |object| {
            let spec = object
                .as_object_mut()
                .map(|o| o.entry("spec").or_insert_with(|| json!({})));
            if let Some(Value::Object(spec)) = spec {
                match &section {
                    Some(section) => spec.insert("firmware".into(), section.clone()),
                    None => spec.remove("firmware"),
                };
            }
        })
        .await?;
    crate::say!(
        "{what}: firmware {}",
        describe_firmware(&section.unwrap_or(Value::Null))
    );
    Ok(())
}

async fn app(command: AppCommand) -> anyhow::Result<()> {
    match command {
        AppCommand::Create {
            name,
            firmware,
            connection,
        } => {
            let mut spec = json!({});
            if let Some(f) = firmware.to_spec() {
                spec["firmware"] = f;
            }
            connection
                .client()?
                .create("apps", &json!({"metadata": {"name": name}, "spec": spec}))
                .await?;
            crate::say!("application '{name}' created");
        }
        AppCommand::List { connection } => {
            let apps = connection.client()?.get("apps").await?;
            for app in apps.as_array().into_iter().flatten() {
                crate::say!(
                    "{}\t{}",
                    app["metadata"]["name"].as_str().unwrap_or_default(),
                    describe_firmware(&app["spec"]["firmware"])
                );
            }
        }
        AppCommand::Get { name, connection } => {
            print_json(&connection.client()?.get(&format!("apps/{name}")).await?)
        }
        AppCommand::Delete { name, connection } => {
            connection.client()?.delete(&format!("apps/{name}")).await?;
            crate::say!("application '{name}' deleted");
        }
        AppCommand::SetFirmware {
            name,
            firmware,
            connection,
        } => {
            let what = format!("application '{name}'");
            set_firmware(&connection, &format!("apps/{name}"), &what, &firmware).await?;
        }
    }
    Ok(())
}

/// A device password with 192 bits of entropy, in characters safe in a Basic auth header.
fn generated_password() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn device(command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Create {
            app,
            name,
            password,
            no_password,
            count,
            firmware,
            connection,
        } => {
            let client = connection.client()?;
            let names: Vec<String> = match count {
                Some(n) => (0..n).map(|i| format!("{name}-{i}")).collect(),
                None => vec![name],
            };
            let mut spec = json!({});
            if let Some(f) = firmware.to_spec() {
                spec["firmware"] = f;
            }
            let generate = password.is_none() && !no_password;
            if generate {
                eprintln!("generated passwords (shown this once; the server keeps only verifiers):");
            }
            let progress = ajour_sim::progress_bar(names.len() as u64, "creating devices");
            for device in &names {
                let secret = match &password {
                    Some(given) => Some(given.clone()),
                    None if generate => Some(generated_password()),
                    None => None,
                };
                if let Some(secret) = &secret {
                    spec["authentication"] = json!({"credentials": [{"pass": secret}]});
                }
                client
                    .create(
                        &format!("apps/{app}/devices"),
                        &json!({"metadata": {"name": device, "application": app}, "spec": spec}),
                    )
                    .await?;
                if let (true, Some(secret)) = (generate, &secret) {
                    progress.suspend(|| crate::say!("{device}@{app} {secret}"));
                }
                progress.inc(1);
            }
            progress.finish_and_clear();
            crate::say!("{} device(s) created in application '{app}'", names.len());
        }
        DeviceCommand::History {
            app,
            name,
            limit,
            json,
            connection,
        } => {
            let path = format!("apps/{app}/devices/{name}/history");
            let events = connection
                .client()?
                .get_dfu(&path, &[("limit", limit.to_string())])
                .await?;
            if json {
                crate::say!("{}", serde_json::to_string_pretty(&events)?);
                return Ok(());
            }
            crate::say!("TIME\tEVENT\tCURRENT\tTARGET\tDETAIL");
            for event in events.as_array().into_iter().flatten().rev() {
                let text = |name: &str| event[name].as_str().unwrap_or_default().to_string();
                let detail = match (event["percent"].as_f64(), event["reason"].as_str()) {
                    (Some(percent), _) => format!("{percent}%"),
                    (None, Some(reason)) => reason.to_string(),
                    (None, None) => text("digest").chars().take(12).collect(),
                };
                crate::say!(
                    "{}\t{}\t{}\t{}\t{detail}",
                    text("time"),
                    text("kind"),
                    text("current"),
                    text("target")
                );
            }
        }
        DeviceCommand::List { app, connection } => {
            let devices = connection.client()?.get(&format!("apps/{app}/devices")).await?;
            crate::say!("NAME\tCURRENT\tTARGET\tSTATE");
            for device in devices.as_array().into_iter().flatten() {
                let (current, target, state) = firmware_status(device);
                crate::say!(
                    "{}\t{current}\t{target}\t{state}",
                    device["metadata"]["name"].as_str().unwrap_or_default()
                );
            }
        }
        DeviceCommand::Get {
            app,
            name,
            connection,
        } => print_json(
            &connection
                .client()?
                .get(&format!("apps/{app}/devices/{name}"))
                .await?,
        ),
        DeviceCommand::Delete {
            app,
            name,
            connection,
        } => {
            connection
                .client()?
                .delete(&format!("apps/{app}/devices/{name}"))
                .await?;
            crate::say!("device '{name}' deleted");
        }
        DeviceCommand::SetFirmware {
            app,
            name,
            firmware,
            connection,
        } => {
            let path = format!("apps/{app}/devices/{name}");
            set_firmware(&connection, &path, &format!("device '{name}'"), &firmware).await?;
        }
        DeviceCommand::Status {
            app,
            name,
            connection,
        } => {
            let device = connection
                .client()?
                .get(&format!("apps/{app}/devices/{name}"))
                .await?;
            let (current, target, state) = firmware_status(&device);
            crate::say!("current: {current}\ntarget:  {target}\nstate:   {state}");
        }
    }
    Ok(())
}

fn describe_firmware(firmware: &Value) -> String {
    if let Some(name) = firmware["file"]["name"].as_str() {
        format!("file {name}")
    } else if let Some(image) = firmware["container"]["image"]
        .as_str()
        .or(firmware["oci"]["image"].as_str())
    {
        format!("image {image}")
    } else if let Some(controller) = firmware["hawkbit"]["controller"].as_str() {
        format!("hawkbit {controller}")
    } else {
        "none".into()
    }
}

/// `(current, target, state)` from `status.firmware`, for people.
pub fn firmware_status(device: &Value) -> (String, String, String) {
    let firmware = &device["status"]["firmware"];
    if firmware.is_null() {
        return ("-".into(), "-".into(), "unknown (no status reported yet)".into());
    }
    match ajour_types::FirmwareReport::from_json(firmware) {
        Ok(report) => (
            report.status.current,
            report.status.target,
            report.status.state.to_string(),
        ),
        Err(error) => ("-".into(), "-".into(), format!("unknown ({error})")),
    }
}
