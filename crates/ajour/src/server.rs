//! `ajour serve`: configuration and wiring. The backends are chosen here and nowhere else; the
//! HTTP connections are served by [`ajour_transport::connections`] under the configured
//! [`ConnectionLimits`], and, when `--coap-listen` is given, the CoAP endpoint
//! ([`ajour_transport::coap`]) beside them.

use ajour_api::{ApiState, ApiToken};
use ajour_build::local::{LocalConfig, LocalRunner};
use ajour_build::tekton::TektonRunner;
use ajour_build::{BuildRunner, Builds, BuildsConfig, RolloutStarter};
use ajour_hawkbit::{HawkbitConfig, HawkbitSource, HawkbitStats};
use ajour_registry::{
    AccessStore, BesideRegistry, BuildStore, CredentialKeys, HistoryRetention, KeyError, MeteredRegistry,
    Registry, RolloutStore, SqlRegistry, SqlRegistryOptions,
};
use ajour_service::{ServiceConfig, UpdateService};
use ajour_store::{FileStore, Firmware, FirmwareSource, OciConfig, OciStore};
use ajour_transport::connections;
pub use ajour_transport::connections::{bind, ConnectionLimits};
pub use ajour_transport::tls::{CertReloader, TlsFiles};
use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rand::RngCore;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

/// The data directory of `ajour serve` and the management commands when none is given.
pub const DEFAULT_DATA_DIR: &str = "ajour-data";

/// Everything `ajour serve` needs, with defaults that run on a fresh machine. These defaults (and
/// those of [`ServiceConfig`], [`OciConfig`] and [`HawkbitConfig`] it holds) are the ones the flags of `ajour serve`
/// show and use: they are written here, not again in `cli.rs`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// `postgres://...` or `sqlite://...`; default: `ajour.db` in the data directory.
    pub database_url: Option<String>,
    /// Bring the database's schema up to date on start; otherwise refuse one that is not.
    pub migrate: bool,
    /// How much of each device's update history the database keeps.
    pub history: HistoryRetention,
    /// How often the rollout controller moves rollouts on.
    pub rollout_tick: Duration,
    /// The API token; default: the one saved in the data directory, or a new one.
    pub api_token: Option<String>,
    pub service: ServiceConfig,
    /// How often firmware files are checked for replacement.
    pub firmware_recheck: Duration,
    /// The secret device passwords are sealed with, as text (`--credential-secret`); else read
    /// from `credential_secret_file`, else from `credential-secret` in the data directory.
    pub credential_secret: Option<String>,
    pub credential_secret_file: Option<PathBuf>,
    /// Drogue mode: the registry is Drogue's and statuses arrive on its MQTT integration.
    pub drogue: Option<ajour_drogue::DrogueConfig>,
    /// The OCI registry firmware source; `None`: specs naming a container image are refused.
    pub oci: Option<OciConfig>,
    /// The Hawkbit firmware source; `None`: specs naming a Hawkbit controller are refused.
    pub hawkbit: Option<HawkbitConfig>,
    /// How HTTP connections are timed, capped and drained.
    pub connections: ConnectionLimits,
    /// The base URL Drogue's tools are told to use (`--public-url`); default: `http://` and each
    /// request's `Host`.
    pub public_url: Option<String>,
    /// Where the CoAP device endpoint listens (`--coap-listen`, UDP); `None`: no CoAP endpoint.
    pub coap_listen: Option<String>,
    /// Where the MQTT device endpoint listens (`--mqtt-listen`, TCP; MQTT over TLS with
    /// `--tls-cert`); `None`: no MQTT endpoint.
    pub mqtt_listen: Option<String>,
    /// HTTPS on the HTTP listener and MQTTS on the MQTT one (`--tls-cert`, `--tls-key`); `None`:
    /// plain.
    pub tls: Option<TlsFiles>,
    /// How often the TLS certificate and key files are checked for a change (`--tls-reload-ms`).
    pub tls_reload: Duration,
    /// Firmware builds: the runner, and how builds run.
    pub builds: BuildServerConfig,
}

/// Where builds run (`--build-runner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BuildRunnerKind {
    /// No builds: the build API answers 501.
    Off,
    /// On this machine (`ajour_build::local`).
    Local,
    /// As Tekton PipelineRuns (`ajour_build::tekton`).
    Tekton,
}

impl std::fmt::Display for BuildRunnerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BuildRunnerKind::Off => "off",
            BuildRunnerKind::Local => "local",
            BuildRunnerKind::Tekton => "tekton",
        })
    }
}

/// How `ajour serve` builds firmware.
#[derive(Debug, Clone)]
pub struct BuildServerConfig {
    /// Off by default: the local runner runs commands from specs, which must be a choice.
    pub runner: BuildRunnerKind,
    pub concurrency: usize,
    /// How long a build's record outlives its instance before any instance closes it.
    pub lease: Duration,
    /// Applications whose firmware may be built; empty: every one.
    pub allowed_apps: Vec<String>,
    /// The local runner's directory; default: `builds` in the data directory.
    pub work_dir: Option<PathBuf>,
    pub tekton: ajour_build::tekton::TektonConfig,
}

impl Default for BuildServerConfig {
    fn default() -> Self {
        let builds = BuildsConfig::default();
        Self {
            runner: BuildRunnerKind::Off,
            concurrency: builds.concurrency,
            lease: builds.lease,
            allowed_apps: builds.allowed_apps,
            work_dir: None,
            tekton: Default::default(),
        }
    }
}

impl BuildServerConfig {
    fn builds(&self) -> BuildsConfig {
        BuildsConfig {
            concurrency: self.concurrency,
            lease: self.lease,
            allowed_apps: self.allowed_apps.clone(),
        }
    }
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            database_url: None,
            migrate: true,
            history: HistoryRetention::default(),
            rollout_tick: Duration::from_secs(1),
            api_token: None,
            service: ServiceConfig::default(),
            firmware_recheck: Duration::from_secs(1),
            credential_secret: None,
            credential_secret_file: None,
            drogue: None,
            oci: None,
            hawkbit: None,
            connections: ConnectionLimits::default(),
            public_url: None,
            coap_listen: None,
            mqtt_listen: None,
            tls: None,
            tls_reload: Duration::from_secs(5),
            builds: BuildServerConfig::default(),
        }
    }

    pub fn firmware_dir(&self) -> PathBuf {
        firmware_dir(&self.data_dir)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::new(DEFAULT_DATA_DIR)
    }
}

/// Where firmware files live under a data directory.
pub fn firmware_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("firmware")
}

/// The build runner `config` chooses, `None` when builds are off: the one place a runner is
/// chosen.
async fn build_runner(
    config: &ServerConfig,
    oci: Option<Arc<OciStore>>,
) -> anyhow::Result<Option<Arc<dyn BuildRunner>>> {
    Ok(match config.builds.runner {
        BuildRunnerKind::Off => None,
        BuildRunnerKind::Local => {
            let work_dir = config
                .builds
                .work_dir
                .clone()
                .unwrap_or_else(|| config.data_dir.join("builds"));
            Some(Arc::new(LocalRunner::new(LocalConfig::new(work_dir), oci)))
        }
        BuildRunnerKind::Tekton => Some(Arc::new(
            TektonRunner::connect(ajour_build::tekton::TektonConfig {
                registry_prefix: config
                    .oci
                    .as_ref()
                    .map(|oci| oci.registry_prefix.clone())
                    .unwrap_or_default(),
                ..config.builds.tekton.clone()
            })
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .context("--build-runner tekton: connecting to the Kubernetes API")?,
        )),
    })
}

/// A running server.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub token: String,
    /// Set when the token was generated by this start (it is printed once, then only in the file).
    pub token_generated: bool,
    pub service: Arc<UpdateService>,
    /// Drogue mode: what the MQTT integration did.
    pub drogue: Option<Arc<ajour_drogue::IntegrationStats>>,
    /// What the Hawkbit source asked of Hawkbit, when it is configured.
    pub hawkbit: Option<Arc<HawkbitStats>>,
    /// The most connections served at once: `--max-connections`, lowered to fit the open-file
    /// limit.
    pub max_connections: usize,
    /// The address the CoAP endpoint is bound to, when `--coap-listen` is given.
    pub coap_addr: Option<SocketAddr>,
    /// The address the MQTT endpoint is bound to, when `--mqtt-listen` is given.
    pub mqtt_addr: Option<SocketAddr>,
    /// The HTTP listener's certificate, when it speaks TLS (`--tls-cert`): what it serves now and
    /// how its reloads went.
    pub tls: Option<Arc<CertReloader>>,
    connection_slots: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// Stop accepting connections, let requests in flight finish (for at most the configured
    /// shutdown timeout), write pending status, and return.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await.context("server task")?
    }

    /// Run until the server stops by itself (or fails).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task")?
    }

    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// HTTP connections open now.
    pub fn open_connections(&self) -> usize {
        self.max_connections - self.connection_slots.available_permits()
    }
}

/// Wire the server on `listener` and start serving.
pub async fn start(listener: TcpListener, config: ServerConfig) -> anyhow::Result<RunningServer> {
    // First: the handles of `ajour_service::hot_metrics` are taken from the recorder installed
    // when they are first used, and devices must never be counted before it is.
    let metrics = metrics_handle();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let (token, token_generated) = api_token(&config)?;
    // Read before anything is started: missing or unusable files fail the start.
    let tls = match &config.tls {
        Some(files) => {
            let reloader = Arc::new(
                CertReloader::new(files.clone())
                    .map_err(|e| anyhow::anyhow!(e))
                    .context("--tls-cert, --tls-key")?,
            );
            let acceptor =
                ajour_transport::tls::acceptor(reloader.clone()).map_err(|e| anyhow::anyhow!(e))?;
            Some((reloader, acceptor))
        }
        None => None,
    };
    // Bound before anything is opened or started: an address in use fails the start at once.
    let coap_socket = match &config.coap_listen {
        Some(listen) => Some(
            ajour_transport::coap::bind(listen)
                .await
                .with_context(|| format!("binding the CoAP endpoint to {listen} (UDP)"))?,
        ),
        None => None,
    };
    let coap_addr = coap_socket
        .as_ref()
        .map(|socket| socket.local_addr())
        .transpose()?;
    let mqtt_listener = match &config.mqtt_listen {
        Some(listen) => Some(
            connections::bind(listen, config.connections.listen_backlog)
                .await
                .with_context(|| format!("binding the MQTT endpoint to {listen}"))?,
        ),
        None => None,
    };
    let mqtt_addr = mqtt_listener
        .as_ref()
        .map(|listener| listener.local_addr())
        .transpose()?;
    let mut service_config = config.service.clone();

    // Ajour's own database: the registry itself, or (Drogue mode) beside Drogue's registry for
    // the devices' histories and the rollouts.
    let database_url = config
        .database_url
        .clone()
        .unwrap_or_else(|| SqlRegistry::sqlite_url(&config.data_dir));
    let mut options = SqlRegistryOptions {
        migrate: config.migrate,
        history: config.history,
        ..Default::default()
    };
    if config.drogue.is_none() {
        // Only Ajour's own registry stores device passwords (sealed with the secret).
        options.credential_keys = credential_keys(&config, &database_url)?;
        service_config.credential_keys = options.credential_keys.clone();
    }
    let database = Arc::new(
        SqlRegistry::connect(&database_url, options)
            .await
            .with_context(|| format!("opening the database at {}", redact(&database_url)))?,
    );
    let registry: Arc<dyn Registry> = match &config.drogue {
        Some(drogue) => Arc::new(BesideRegistry::new(
            Arc::new(
                ajour_drogue::DrogueRegistry::new(&drogue.registry)
                    .context("configuring Drogue's registry")?,
            ),
            database.clone(),
        )),
        None => database.clone(),
    };
    let access: Arc<dyn AccessStore> = database.clone();
    let build_store: Arc<dyn BuildStore> = database.clone();
    let rollout_store: Arc<dyn RolloutStore> = database;
    let registry: Arc<dyn Registry> = Arc::new(MeteredRegistry::new(registry));

    let hawkbit = match &config.hawkbit {
        Some(hawkbit) => Some(Arc::new(
            HawkbitSource::new(hawkbit.clone())
                .map_err(|e| anyhow::anyhow!(e))
                .context("configuring the Hawkbit source")?,
        )),
        None => None,
    };
    let oci = match &config.oci {
        Some(oci) => Some(Arc::new(
            OciStore::new(oci.clone()).context("configuring the OCI registry source")?,
        )),
        None => None,
    };
    let firmware: Arc<dyn FirmwareSource> = Arc::new(Firmware {
        file: Some(Arc::new(FileStore::new(
            config.firmware_dir(),
            config.firmware_recheck,
        ))),
        container: oci.clone().map(|source| source as Arc<dyn FirmwareSource>),
        hawkbit: hawkbit.clone().map(|source| source as Arc<dyn FirmwareSource>),
    });
    let service =
        Arc::new(UpdateService::new(registry.clone(), firmware, service_config).with_rollouts(rollout_store));

    let integration = match &config.drogue {
        Some(drogue) => Some(
            ajour_drogue::Integration::start(drogue.integration.clone(), service.clone(), registry.clone())
                .context("starting the Drogue integration")?,
        ),
        None => None,
    };
    let drogue = integration.as_ref().map(|i| i.stats());

    let builds = build_runner(&config, oci.clone()).await?.map(|runner| {
        // A build may start a rollout of what it published: the update service's.
        let rollouts = service.clone();
        let start_rollout: RolloutStarter = Arc::new(move |app, spec| {
            let rollouts = rollouts.clone();
            Box::pin(async move {
                rollouts
                    .create_rollout(&app, spec)
                    .await
                    .map(|rollout| rollout.id)
                    .map_err(|e| e.to_string())
            })
        });
        Arc::new(
            Builds::new(build_store, registry.clone(), runner, config.builds.builds())
                .with_rollouts(start_rollout),
        )
    });
    let api_state = ApiState {
        registry: registry.clone(),
        service: service.clone(),
        access,
        builds: builds.clone(),
        public_url: {
            let public = ajour_api::PublicUrl::new(config.public_url.as_deref(), listener.local_addr()?)
                .map_err(|e| anyhow::anyhow!(e))
                .context("--public-url")?;
            let public = match coap_addr {
                Some(coap) => public.with_coap_port(coap.port()),
                None => public,
            };
            if tls.is_some() {
                public.with_tls()
            } else {
                public
            }
        },
    };
    let ready_registry = registry.clone();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || readiness(ready_registry.clone())),
        )
        .route(
            "/metrics",
            axum::routing::get(move || std::future::ready(metrics.render())),
        )
        .merge(ajour_transport::http::router(service.clone()))
        .merge(ajour_api::router(api_state.clone(), ApiToken::new(token.clone())))
        .merge(ajour_api::public_router(api_state.clone()))
        .merge(ajour_console::router(ajour_console::ConsoleState::new(
            api_state,
            &token,
            config.tls.is_some(),
        )))
        .layer(tower_http::trace::TraceLayer::new_for_http());

    let addr = listener.local_addr()?;
    let max_connections = connections::connection_cap(config.connections.max_connections);
    let connection_slots = Arc::new(Semaphore::new(max_connections));
    let (shutdown, mut stopped) = watch::channel(false);
    let (stop_writer, writer_stopped) = oneshot::channel::<()>();
    // Specs and credentials written through other instances on the same PostgreSQL database
    // are forgotten here as soon as PostgreSQL announces them.
    let following = service.follow_registry_changes().await.map(tokio::spawn);
    let writer = tokio::spawn(service.clone().run_status_writer(async move {
        let _ = writer_stopped.await;
    }));
    let mut controller_stopped = shutdown.subscribe();
    let controller = tokio::spawn(
        service
            .clone()
            .run_rollout_controller(config.rollout_tick, async move {
                let _ = controller_stopped.wait_for(|s| *s).await;
            }),
    );
    let coap = coap_socket.map(|socket| {
        let coap_config = ajour_transport::coap::CoapConfig {
            shutdown_timeout: config.connections.shutdown_timeout,
            ..Default::default()
        };
        let mut coap_stopped = shutdown.subscribe();
        tokio::spawn(ajour_transport::coap::serve(
            socket,
            service.clone(),
            coap_config,
            async move {
                let _ = coap_stopped.wait_for(|s| *s).await;
            },
        ))
    });
    let (tls, acceptor) = tls.unzip();
    let mqtt = mqtt_listener.map(|listener| {
        let mqtt_config = ajour_transport::mqtt::MqttConfig {
            max_connections,
            // A CONNECT is an MQTT client's request head.
            connect_timeout: config.connections.header_timeout,
            shutdown_timeout: config.connections.shutdown_timeout,
            ..Default::default()
        };
        let mut mqtt_stopped = shutdown.subscribe();
        tokio::spawn(ajour_transport::mqtt::serve(
            listener,
            service.clone(),
            mqtt_config,
            acceptor.clone(),
            async move {
                let _ = mqtt_stopped.wait_for(|s| *s).await;
            },
        ))
    });
    let tls_watch = tls.clone().map(|reloader| {
        let mut tls_stopped = shutdown.subscribe();
        tokio::spawn(reloader.watch(config.tls_reload, async move {
            let _ = tls_stopped.wait_for(|s| *s).await;
        }))
    });
    let build_maintenance = builds.clone().map(|builds| {
        let mut builds_stopped = shutdown.subscribe();
        tokio::spawn(async move {
            builds
                .run_maintenance(async move {
                    let _ = builds_stopped.wait_for(|s| *s).await;
                })
                .await;
            // Builds under way stop with the server, recorded as failed.
            builds.shutdown().await;
        })
    });
    let limits = config.connections;
    let slots = connection_slots.clone();
    let traffic = service.traffic().clone();
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = stopped.wait_for(|s| *s).await;
            // Live streams end now, with a close frame, rather than at the drain's end.
            traffic.close();
        };
        connections::serve_with(listener, app, limits, slots, acceptor, stop).await;
        if let Some(tls_watch) = tls_watch {
            tls_watch.await.context("TLS certificate reloads")?;
        }
        // It stopped taking requests with the HTTP side and drained beside it.
        if let Some(coap) = coap {
            coap.await.context("CoAP endpoint")?;
        }
        if let Some(mqtt) = mqtt {
            mqtt.await.context("MQTT endpoint")?;
        }
        if let Some(integration) = integration {
            integration.stop().await;
        }
        if let Some(build_maintenance) = build_maintenance {
            build_maintenance.await.context("builds")?;
        }
        // Last, so that what the drained requests and the integration recorded is written too.
        let _ = stop_writer.send(());
        writer.await.context("status writer")?;
        if let Some(following) = following {
            following.abort();
        }
        controller.await.context("rollout controller")?;
        Ok(())
    });
    Ok(RunningServer {
        addr,
        token,
        token_generated,
        service,
        drogue,
        hawkbit: hawkbit.map(|source| source.stats()),
        max_connections,
        coap_addr,
        mqtt_addr,
        tls,
        connection_slots,
        shutdown,
        task,
    })
}

/// A future that resolves on the first SIGTERM or SIGINT (Ctrl-C) and names it: systemd,
/// containers and Kubernetes stop a service with SIGTERM, people with Ctrl-C. The handlers are
/// installed when this returns, so a signal that comes any time after is caught.
pub fn termination_signal() -> std::io::Result<impl Future<Output = &'static str> + Send> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        })
    }
}

/// The process-wide Prometheus recorder: the `metrics` facade has one global recorder, so every
/// server started in this process (tests start several) renders the same one.
fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder was installed first; then ours just stays empty.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Ready when the registry answers.
async fn readiness(registry: Arc<dyn Registry>) -> (axum::http::StatusCode, String) {
    match registry.ping().await {
        Ok(()) => (axum::http::StatusCode::OK, "ready\n".into()),
        Err(error) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("registry: {error}\n"),
        ),
    }
}

/// The credential secret file in a data directory.
pub fn credential_secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("credential-secret")
}

/// The keys device passwords are sealed with: given as text, else read from the file. The file
/// is created only for SQLite: instances sharing a PostgreSQL database must share the secret,
/// and one instance making up its own would lock every device registered through another out.
fn credential_keys(config: &ServerConfig, database_url: &str) -> anyhow::Result<Arc<CredentialKeys>> {
    if let Some(text) = &config.credential_secret {
        let keys = CredentialKeys::parse(text).context("--credential-secret")?;
        return Ok(Arc::new(keys));
    }
    let path = config
        .credential_secret_file
        .clone()
        .unwrap_or_else(|| credential_secret_path(&config.data_dir));
    let create = config.credential_secret_file.is_none() && database_url.starts_with("sqlite:");
    let (keys, created) = CredentialKeys::load_or_create(&path, create).map_err(|error| match error {
        KeyError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "no credential secret at {}: instances sharing a database must share it, so it is not made up here. \
             Create one (`head -c 32 /dev/urandom | base64 > FILE`, readable by the server only) and pass \
             --credential-secret-file FILE or AJOUR_CREDENTIAL_SECRET (see docs/credentials.md)",
            path.display()
        ),
        other => anyhow::Error::new(other).context("reading the credential secret"),
    })?;
    if created {
        tracing::info!(path = %path.display(), "created a credential secret: back it up apart from the database");
    }
    tracing::info!(
        key = keys.current().id(),
        previous = keys.ids().count() - 1,
        "device passwords sealed with credential key"
    );
    Ok(Arc::new(keys))
}

/// The token file in a data directory.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("api-token")
}

/// The configured token, else the saved one, else a new one saved readable only by its owner.
fn api_token(config: &ServerConfig) -> anyhow::Result<(String, bool)> {
    if let Some(token) = &config.api_token {
        anyhow::ensure!(!token.trim().is_empty(), "the API token must not be empty");
        return Ok((token.trim().to_string(), false));
    }
    let path = token_path(&config.data_dir);
    if let Ok(saved) = std::fs::read_to_string(&path) {
        let saved = saved.trim().to_string();
        anyhow::ensure!(
            !saved.is_empty(),
            "{} is empty: delete it to generate a new token",
            path.display()
        );
        return Ok((saved, false));
    }
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = format!("ajour_{}", hex::encode(bytes));
    write_private(&path, &token).with_context(|| format!("saving the API token to {}", path.display()))?;
    Ok((token, true))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
