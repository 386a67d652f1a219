//! `ajour serve` in Drogue mode: the flags and environment variables that make Ajour an add-on to
//! a Drogue IoT Cloud installation (see `docs/drogue.md`). Given `--drogue-mqtt-url`, the registry
//! is Drogue's (specs read from it, `status.firmware` written to it) and statuses arrive as
//! Drogue events on its MQTT integration; the HTTP endpoint and REST API keep working, over
//! Drogue's registry.

use ajour_drogue::{
    Applications, DrogueConfig, IntegrationConfig, MqttConfig, MqttVersion, RegistryConfig, TlsOptions,
};
use ajour_registry::AppName;
use anyhow::Context;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// The MQTT protocol version, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum MqttVersionArg {
    /// MQTT 3.1.1.
    #[value(name = "3.1.1", alias = "3")]
    V3,
    /// MQTT 5.
    #[default]
    #[value(name = "5")]
    V5,
}

impl From<MqttVersionArg> for MqttVersion {
    fn from(version: MqttVersionArg) -> Self {
        match version {
            MqttVersionArg::V3 => MqttVersion::V3,
            MqttVersionArg::V5 => MqttVersion::V5,
        }
    }
}

/// How Drogue should deliver events (MQTT 5 only; both are understood either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ContentMode {
    /// The CloudEvent as JSON, data base64-encoded.
    Structured,
    /// The data as the payload, attributes as user properties: no base64.
    #[default]
    Binary,
}

// The `ajour serve` flags of Drogue mode; their environment variables and config file keys follow
// from their names (see `crate::config`).
#[derive(Debug, Clone, Args)]
pub struct DrogueArgs {
    /// Drogue mode: URL of Drogue's MQTT integration, `mqtts://HOST[:PORT]` (TLS, default port
    /// 8883) or `mqtt://HOST[:PORT]` (plain, 1883); `ssl://`, `tls://`, `tcp://` are accepted too.
    /// Goes with --drogue-registry-url.
    #[arg(long = "drogue-mqtt-url", value_name = "URL")]
    pub drogue_mqtt_url: Option<String>,
    /// Base URL of Drogue's API, where the device registry is; `/api/registry/v1alpha1` is
    /// appended unless the URL already ends with it. Goes with --drogue-mqtt-url.
    #[arg(long = "drogue-registry-url", value_name = "URL")]
    pub drogue_registry_url: Option<String>,
    /// Drogue user: MQTT user name, and Basic `user:token` to the registry. Without it the token
    /// is sent to the registry as `Bearer` and the MQTT connection has no credentials (MQTT has no
    /// password without a user name).
    #[arg(long = "drogue-user", value_name = "USER")]
    pub drogue_user: Option<String>,
    /// Drogue access token (`drg_...`): MQTT password and registry credential (never printed).
    #[arg(long = "drogue-token", value_name = "TOKEN")]
    pub drogue_token: Option<String>,
    /// Serve this application; repeat, or comma-separate, for more. Without any: every application
    /// the registry lists, listed again periodically.
    #[arg(long = "application", value_delimiter = ',', value_name = "APP")]
    pub applications: Vec<String>,
    /// Never serve this application (repeat, or comma-separate), whether listed with
    /// --application or found in the registry.
    #[arg(long = "exclude-application", value_delimiter = ',', value_name = "APP")]
    pub exclude_applications: Vec<String>,
    /// Shared-subscription group: subscribe `$share/GROUP/app/{app}`, so that instances in one
    /// group share the events (no `/`, `+`, `#`).
    #[arg(long = "drogue-group", value_name = "GROUP")]
    pub drogue_group: Option<String>,
    /// PEM file of CA certificates trusted (beside the system's) for the MQTT integration and the
    /// registry.
    #[arg(long = "drogue-ca-file", value_name = "FILE")]
    pub drogue_ca_file: Option<PathBuf>,
    /// Accept any TLS certificate from Drogue (test installations only).
    #[arg(long = "drogue-insecure-tls")]
    pub drogue_insecure_tls: bool,
    /// MQTT protocol version: `5` or `3.1.1`.
    #[arg(long = "drogue-mqtt-version", value_name = "V", value_enum, default_value_t)]
    pub drogue_mqtt_version: MqttVersionArg,
    /// Content mode asked of Drogue on MQTT 5: `binary` (subscription user property
    /// `content-mode: binary`) or `structured`. Both are decoded whatever is asked; MQTT 3.1.1 is
    /// always structured.
    #[arg(long = "drogue-content-mode", value_name = "M", value_enum, default_value_t)]
    pub drogue_content_mode: ContentMode,
    /// Seconds between listings of the applications when none is given with --application; a
    /// failed listing is retried after `min(S, 5)` s.
    #[arg(long = "drogue-refresh-secs", value_name = "S", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub drogue_refresh_secs: u64,
    /// Devices served at the same time (statuses of one device are always handled in order).
    #[arg(long = "drogue-workers", value_name = "N", default_value_t = ajour_drogue::IntegrationConfig::DEFAULT_WORKERS,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub drogue_workers: u16,
    /// Prefix of the MQTT client id, which is `P-{random}`: unique per instance and per start.
    #[arg(long = "drogue-client-id-prefix", value_name = "P", default_value = "ajour")]
    pub drogue_client_id_prefix: String,
}

impl DrogueArgs {
    /// The Drogue configuration, or `None` when Drogue mode is not asked for.
    pub fn config(&self) -> anyhow::Result<Option<DrogueConfig>> {
        let (Some(mqtt_url), Some(registry_url)) = (&self.drogue_mqtt_url, &self.drogue_registry_url) else {
            anyhow::ensure!(
                self.drogue_mqtt_url.is_none() && self.drogue_registry_url.is_none(),
                "Drogue mode needs both --drogue-mqtt-url and --drogue-registry-url"
            );
            anyhow::ensure!(
                self.applications.is_empty() && self.drogue_group.is_none(),
                "--application and --drogue-group need Drogue mode (--drogue-mqtt-url and --drogue-registry-url)"
            );
            return Ok(None);
        };
        let tls = TlsOptions {
            ca_file: self.drogue_ca_file.clone(),
            insecure: self.drogue_insecure_tls,
            client_cert: None,
        };
        let mut registry = RegistryConfig::new(registry_url);
        registry.user = self.drogue_user.clone();
        registry.token = self.drogue_token.clone();
        registry.tls = tls.clone();

        let mut mqtt = MqttConfig::new(mqtt_url, &self.drogue_client_id_prefix);
        mqtt.username = self.drogue_user.clone();
        mqtt.password = self.drogue_token.clone();
        mqtt.version = self.drogue_mqtt_version.into();
        mqtt.tls = tls;

        let applications = if self.applications.is_empty() {
            Applications::All {
                refresh: Duration::from_secs(self.drogue_refresh_secs),
            }
        } else {
            Applications::Listed(
                self.applications
                    .iter()
                    .map(|name| AppName::parse(name.trim()).with_context(|| format!("--application {name}")))
                    .collect::<anyhow::Result<_>>()?,
            )
        };
        let mut integration = IntegrationConfig::new(mqtt, applications);
        integration.exclude = self
            .exclude_applications
            .iter()
            .map(|s| s.trim().to_string())
            .collect();
        integration.shared_group = self.drogue_group.clone().filter(|g| !g.is_empty());
        integration.binary_content_mode =
            self.drogue_content_mode == ContentMode::Binary && self.drogue_mqtt_version == MqttVersionArg::V5;
        integration.workers = usize::from(self.drogue_workers);
        Ok(Some(DrogueConfig {
            registry,
            integration,
        }))
    }
}
