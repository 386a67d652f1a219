//! The OCI registry on the command line: the `ajour serve` flags that configure the OCI firmware
//! source, and `ajour firmware push` / `ajour firmware inspect`.

use crate::config::millis;
use ajour_store::{OciAuth, OciConfig, OciStore};
use anyhow::Context;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How to reach the registry: shared by `serve`, `firmware push` and `firmware inspect`. (`serve`
/// reads the environment itself, as a layer of its configuration: see `crate::config`.)
#[derive(Debug, Clone, Args, Default)]
pub struct OciConnectionArgs {
    /// Registry prefix that image names in specs are relative to, e.g. `registry.example.com/fw/`:
    /// `my-fw:1.0.1` then means `registry.example.com/fw/my-fw:1.0.1`. An empty string makes specs
    /// give full references (`host[:port]/path:tag`). `serve` reads firmware from OCI images only
    /// when this is set.
    #[arg(
        id = "oci_registry",
        long = "oci-registry",
        env = "AJOUR_OCI_REGISTRY",
        value_name = "PREFIX"
    )]
    pub registry: Option<String>,
    /// User name for the registry (default: anonymous).
    #[arg(
        id = "oci_user",
        long = "oci-user",
        env = "AJOUR_OCI_USER",
        value_name = "USER"
    )]
    pub user: Option<String>,
    /// Password or access token going with --oci-user. Sent as HTTP Basic when the registry asks
    /// for Basic, or exchanged for a bearer token when it answers with a `Bearer realm=...`
    /// challenge (the distribution token flow, as Docker Hub, Harbor, GitLab, Quay use).
    #[arg(
        id = "oci_password",
        long = "oci-password",
        env = "AJOUR_OCI_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub password: Option<String>,
    /// A bearer token obtained elsewhere, sent as is (instead of --oci-user).
    #[arg(
        id = "oci_token",
        long = "oci-token",
        env = "AJOUR_OCI_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Extra CA certificates (PEM) to trust for the registry, beside the system's.
    #[arg(
        id = "oci_ca_file",
        long = "oci-ca-file",
        env = "AJOUR_OCI_CA_FILE",
        value_name = "PEM"
    )]
    pub ca_file: Option<PathBuf>,
    /// Talk plain HTTP to the registry (explicit opt-in: credentials and firmware travel in clear).
    #[arg(id = "oci_plain_http", long = "oci-plain-http", env = "AJOUR_OCI_PLAIN_HTTP")]
    pub plain_http: bool,
    /// Accept any TLS certificate from the registry (explicit opt-in, for labs and tests).
    #[arg(
        id = "oci_insecure_tls",
        long = "oci-insecure-tls",
        env = "AJOUR_OCI_INSECURE_TLS"
    )]
    pub insecure_tls: bool,
}

impl OciConnectionArgs {
    /// The credentials go together: a password with a user; a token instead of both. (Checked
    /// here rather than by clap, so that `serve` can take them from different layers.)
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.password.is_none() || self.user.is_some(),
            "--oci-password needs --oci-user"
        );
        anyhow::ensure!(
            self.token.is_none() || self.user.is_none(),
            "--oci-token and --oci-user exclude each other: the token is sent instead of user and password"
        );
        Ok(())
    }

    fn config(&self, registry: &str) -> OciConfig {
        OciConfig {
            registry_prefix: registry.to_string(),
            auth: match (&self.user, &self.token) {
                (Some(user), _) => OciAuth::Basic {
                    username: user.clone(),
                    password: self.password.clone().unwrap_or_default(),
                },
                (None, Some(token)) => OciAuth::Bearer { token: token.clone() },
                (None, None) => OciAuth::Anonymous,
            },
            extra_ca_file: self.ca_file.clone(),
            plain_http: self.plain_http,
            accept_invalid_certs: self.insecure_tls,
            ..OciConfig::default()
        }
    }
}

/// `ajour serve` flags for the OCI firmware source.
#[derive(Debug, Clone, Args)]
pub struct OciServeArgs {
    #[command(flatten)]
    pub connection: OciConnectionArgs,
    /// Under `imagePullPolicy: Always`, milliseconds a resolved tag is trusted before the registry
    /// is asked again.
    #[arg(id = "oci_recheck_ms", long = "oci-recheck-ms", value_name = "MS",
          default_value_t = millis(OciConfig::default().always_recheck))]
    pub recheck_ms: u64,
    /// Milliseconds a failure (registry down, image missing, bad image) is remembered before
    /// trying again.
    #[arg(id = "oci_error_retry_ms", long = "oci-error-retry-ms", value_name = "MS",
          default_value_t = millis(OciConfig::default().error_retry))]
    pub error_retry_ms: u64,
    /// Largest firmware accepted from the registry, in bytes; larger images are refused before
    /// they are downloaded.
    #[arg(id = "oci_max_firmware_bytes", long = "oci-max-firmware-bytes", value_name = "N",
          default_value_t = OciConfig::default().max_firmware_size)]
    pub max_firmware_bytes: u64,
    /// Byte budget of the cache of registry blobs.
    #[arg(id = "oci_cache_bytes", long = "oci-cache-bytes", value_name = "N",
          default_value_t = OciConfig::default().cache_max_bytes)]
    pub cache_bytes: u64,
    /// Milliseconds to wait for the registry to connect or send data; a whole request gets four
    /// times this.
    #[arg(id = "oci_timeout_ms", long = "oci-timeout-ms", value_name = "MS",
          default_value_t = millis(OciConfig::default().request_timeout))]
    pub timeout_ms: u64,
}

impl OciServeArgs {
    /// The OCI source's configuration; `None` when no registry is set.
    pub fn config(&self) -> Option<OciConfig> {
        let registry = self.connection.registry.as_deref()?;
        Some(OciConfig {
            always_recheck: Duration::from_millis(self.recheck_ms),
            error_retry: Duration::from_millis(self.error_retry_ms),
            max_firmware_size: self.max_firmware_bytes,
            cache_max_bytes: self.cache_bytes,
            request_timeout: Duration::from_millis(self.timeout_ms),
            ..self.connection.config(registry)
        })
    }
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Image to push to, `name:tag` under --oci-registry (or a full reference without it).
    pub image: String,
    /// The firmware file.
    #[arg(long)]
    pub file: PathBuf,
    /// The firmware's version, as devices report it.
    #[arg(long)]
    pub version: String,
    /// Replace the version even when the tag holds it with other bytes (devices in the middle of
    /// the update start again; devices already running it keep the old bytes).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub connection: OciConnectionArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Image to read, `name[:tag|@digest]` under --oci-registry (or a full reference without it).
    pub image: String,
    #[command(flatten)]
    pub connection: OciConnectionArgs,
}

fn store(connection: &OciConnectionArgs) -> anyhow::Result<OciStore> {
    connection.check()?;
    let registry = connection.registry.as_deref().unwrap_or_default();
    Ok(OciStore::new(connection.config(registry))?)
}

/// `ajour firmware push`: build the image (tar layout, see docs/oci.md), push it with a progress
/// bar, print its digest.
pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    let data = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let store = store(&args.connection)?;
    let bar = indicatif::ProgressBar::new(data.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("pushing {}", args.image));
    let progress: ajour_store::oci::Progress = {
        let bar = bar.clone();
        Arc::new(move |sent: u64| bar.inc(sent))
    };
    let same_version = if args.force {
        ajour_store::SameVersion::Replace
    } else {
        ajour_store::SameVersion::Refuse
    };
    let pushed = store
        .push(&args.image, &args.version, &data, same_version, progress)
        .await;
    bar.finish_and_clear();
    let pushed = pushed?;
    crate::say!(
        "pushed firmware {} ({} bytes, sha256 {}) to {}",
        pushed.metadata.version,
        pushed.metadata.size,
        pushed.metadata.checksum,
        pushed.reference
    );
    crate::say!("digest: {}", pushed.manifest_digest);
    Ok(())
}

/// `ajour firmware inspect`: read the image as `serve` would, verify it, print what devices
/// would be served, as JSON.
pub async fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let store = store(&args.connection)?;
    let resolved = store.inspect(&args.image).await?;
    let summary = json!({
        "image": args.image,
        "digest": resolved.manifest_digest,
        "layout": resolved.layout.to_string(),
        "version": resolved.image.version(),
        "size": resolved.image.size(),
        "checksum": resolved.image.checksum_hex(),
    });
    crate::say!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};
    use ajour_store::OciAuth;
    use clap::{CommandFactory, Parser};
    use std::time::Duration;

    fn serve(args: &[&str]) -> anyhow::Result<Option<ajour_store::OciConfig>> {
        let cli = Cli::try_parse_from(["ajour", "serve"].iter().chain(args))?;
        match cli.command {
            Command::Serve(serve) => Ok(serve.server_config()?.oci),
            _ => unreachable!("parsed as serve"),
        }
    }

    #[test]
    fn serve_flags_configure_the_oci_source() {
        // Argument ids are unique across everything flattened into `serve`.
        Cli::command().debug_assert();
        assert_eq!(serve(&[]).unwrap().map(|c| c.registry_prefix), None);
        let config = serve(&[
            "--oci-registry",
            "registry.example.com/fw/",
            "--oci-user",
            "robot",
            "--oci-password",
            "secret",
            "--oci-plain-http",
            "--oci-recheck-ms",
            "5",
            "--oci-max-firmware-bytes",
            "1000",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(config.registry_prefix, "registry.example.com/fw/");
        assert_eq!(
            config.auth,
            OciAuth::Basic {
                username: "robot".into(),
                password: "secret".into()
            }
        );
        assert!(config.plain_http && !config.accept_invalid_certs);
        assert_eq!(config.always_recheck, Duration::from_millis(5));
        assert_eq!(config.max_firmware_size, 1000);
        let token = serve(&["--oci-registry", "r/fw/", "--oci-token", "t"])
            .unwrap()
            .unwrap();
        assert_eq!(token.auth, OciAuth::Bearer { token: "t".into() });
        // A token and a user at once, or a password without a user, are refused.
        assert!(serve(&["--oci-registry", "r/", "--oci-token", "t", "--oci-user", "u"]).is_err());
        assert!(serve(&["--oci-registry", "r/", "--oci-password", "p"]).is_err());
    }
}
