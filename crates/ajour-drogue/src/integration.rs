//! The MQTT integration client: Drogue's event stream in, commands out.
//!
//! One MQTT connection per instance, with a client id of its own. It subscribes `app/{app}` for
//! each application served (`$share/{group}/app/{app}` with a group, so that instances share the
//! stream), decodes each event ([`crate::event`]), hands DFU statuses to the update service and
//! publishes the answer on `command/{app}/{device}/{dfu|port:223}` at QoS 1.
//!
//! Concurrency: statuses are sharded by device onto a fixed number of workers, so different
//! devices are served concurrently and the statuses of one device in the order they arrived.
//! Faults: a malformed event is logged and skipped; a lost connection is re-established with
//! exponential backoff, and every (re)connection subscribes again (the session is clean); a
//! registry error reaches the device as a Wait (the update service's policy).

use crate::event::{dfu_request_in, DfuRequest};
use crate::DrogueError;
use ajour_client::mqtt::{
    connect, disconnect, run_session, Message, MqttClient, MqttConfig, MqttConnection, SessionHandler,
    SessionOptions,
};
use ajour_registry::{AppName, Key, ListParams, Registry, Scope};
use ajour_service::UpdateService;
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a failed application listing waits before it is tried again (at most the refresh).
const LIST_RETRY: Duration = Duration::from_secs(5);
/// How long a stopping instance lets its workers finish what they hold.
const DRAIN: Duration = Duration::from_secs(5);

/// Which applications to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applications {
    /// These, and only these.
    Listed(Vec<AppName>),
    /// All the registry lists (all the token can read), listed again every `refresh`: one created
    /// later is served without a restart, one deleted is unsubscribed.
    All { refresh: Duration },
}

/// How the integration runs.
#[derive(Debug, Clone)]
pub struct IntegrationConfig {
    pub mqtt: MqttConfig,
    pub applications: Applications,
    /// Never served, whether listed or found.
    pub exclude: BTreeSet<String>,
    /// Shared-subscription group: instances in one group share each application's events.
    pub shared_group: Option<String>,
    /// Ask for binary content mode (MQTT 5 only; both modes are decoded either way).
    pub binary_content_mode: bool,
    /// Devices served at the same time.
    pub workers: usize,
    /// Room per worker in the connection's queue of outgoing requests (commands, subscriptions).
    pub queue: usize,
}

impl IntegrationConfig {
    /// Devices served at the same time, unless configured otherwise.
    pub const DEFAULT_WORKERS: u16 = 16;

    pub fn new(mqtt: MqttConfig, applications: Applications) -> Self {
        Self {
            mqtt,
            applications,
            exclude: BTreeSet::new(),
            shared_group: None,
            binary_content_mode: false,
            workers: Self::DEFAULT_WORKERS.into(),
            queue: 64,
        }
    }

    /// The topic filter for `app`.
    pub fn filter(&self, app: &AppName) -> String {
        match &self.shared_group {
            Some(group) => format!("$share/{group}/app/{app}"),
            None => format!("app/{app}"),
        }
    }
}

/// Counters of what the integration did, for tests, logs and operators.
#[derive(Debug, Default)]
pub struct IntegrationStats {
    events: AtomicU64,
    statuses: AtomicU64,
    ignored: AtomicU64,
    malformed: AtomicU64,
    commands: AtomicU64,
    publish_failures: AtomicU64,
    connections: AtomicU64,
    subscriptions: AtomicU64,
}

impl IntegrationStats {
    /// Messages received.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
    /// DFU statuses handed to the update service.
    pub fn statuses(&self) -> u64 {
        self.statuses.load(Ordering::Relaxed)
    }
    /// Events not for Ajour (other channels).
    pub fn ignored(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }
    /// Events or payloads skipped as malformed.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
    /// Commands handed to the connection.
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }
    pub fn publish_failures(&self) -> u64 {
        self.publish_failures.load(Ordering::Relaxed)
    }
    /// Successful connections to the broker (1 + reconnections).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Subscriptions the broker granted.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::Relaxed)
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// `ajour_drogue_events_total{result}`: `dfu`, `ignored` (not Ajour's) or `malformed`.
fn count_event(result: &'static str) {
    metrics::counter!("ajour_drogue_events_total", "result" => result).increment(1);
}

/// `ajour_drogue_commands_total{result}`: `published` or `failed`.
fn count_command(result: &'static str) {
    metrics::counter!("ajour_drogue_commands_total", "result" => result).increment(1);
}

/// A running integration.
pub struct Integration {
    stats: Arc<IntegrationStats>,
    applications: Arc<Mutex<BTreeSet<AppName>>>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Integration {
    /// Start serving. Fails only on configuration errors; the broker and the registry may be down
    /// at start, they are retried.
    pub fn start(
        config: IntegrationConfig,
        service: Arc<UpdateService>,
        registry: Arc<dyn Registry>,
    ) -> Result<Self, DrogueError> {
        if config.workers == 0 || config.queue == 0 {
            return Err(DrogueError::Config("workers and queue must be at least 1".into()));
        }
        if let Some(group) = &config.shared_group {
            if group.is_empty() || group.contains(['/', '+', '#']) {
                return Err(DrogueError::Config(format!(
                    "invalid shared-subscription group '{group}': no '/', '+' or '#'"
                )));
            }
        }
        // Workers publish through the connection's request queue, which only the connection task
        // drains (by polling); a worker finding it full waits until it does. The connection task
        // never waits on a worker (their queues are unbounded, see `run`), so that wait ends.
        let capacity = config.workers * config.queue * 2 + 1024;
        let (client, connection) = connect(&config.mqtt, capacity)?;
        let stats = Arc::new(IntegrationStats::default());
        let applications = Arc::new(Mutex::new(match &config.applications {
            Applications::Listed(apps) => apps
                .iter()
                .filter(|app| {
                    let excluded = config.exclude.contains(app.as_str());
                    if excluded {
                        tracing::warn!(%app, "application both listed and excluded: not served");
                    }
                    !excluded
                })
                .cloned()
                .collect(),
            Applications::All { .. } => BTreeSet::new(),
        }));
        let (shutdown, stopped) = watch::channel(false);
        let task = tokio::spawn(run(
            Arc::new(config),
            service,
            registry,
            client,
            connection,
            stats.clone(),
            applications.clone(),
            stopped,
        ));
        Ok(Self {
            stats,
            applications,
            shutdown,
            task,
        })
    }

    pub fn stats(&self) -> Arc<IntegrationStats> {
        self.stats.clone()
    }

    /// The applications served now.
    pub fn applications(&self) -> Vec<AppName> {
        self.applications.lock().unwrap().iter().cloned().collect()
    }

    /// Stop: let the workers finish what they hold (briefly), then disconnect.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// A status to answer.
struct Job {
    request: DfuRequest,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    config: Arc<IntegrationConfig>,
    service: Arc<UpdateService>,
    registry: Arc<dyn Registry>,
    client: MqttClient,
    mut connection: MqttConnection,
    stats: Arc<IntegrationStats>,
    applications: Arc<Mutex<BTreeSet<AppName>>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut workers = JoinSet::new();
    let mut shards = Vec::with_capacity(config.workers);
    // Unbounded: a connection task waiting for room in a worker's queue stops polling, so the
    // commands the workers publish stop leaving, the workers stop, and nothing moves again (seen
    // with 10,000 devices: more statuses came in than the request queue holds commands). What
    // waits here is bounded by the devices: each waits for the answer to its status before
    // sending another (or for its own timeout, to send it again).
    for _ in 0..config.workers {
        let (tx, rx) = mpsc::unbounded_channel();
        shards.push(tx);
        workers.spawn(worker(rx, service.clone(), client.clone(), stats.clone()));
    }
    let mut helpers = JoinSet::new();
    if let Applications::All { refresh } = config.applications {
        helpers.spawn(refresh_applications(
            config.clone(),
            registry,
            client.clone(),
            applications.clone(),
            refresh,
            stopped.clone(),
        ));
    }
    tracing::info!(
        client_id = %config.mqtt.client_id,
        url = %config.mqtt.url,
        group = config.shared_group.as_deref().unwrap_or("-"),
        "Drogue integration starting"
    );

    let mut session = Session {
        applications: &applications,
        config: &config,
        stats: &stats,
        shards: &shards,
    };
    let options = SessionOptions {
        binary_content_mode: config.binary_content_mode,
        min_backoff: MIN_BACKOFF,
        max_backoff: MAX_BACKOFF,
    };
    run_session(&client, &mut connection, &options, &mut session, async {
        let _ = stopped.wait_for(|s| *s).await;
    })
    .await;

    // Stopping: no new statuses; answer those taken (while the connection still sends), then
    // say goodbye. Statuses not answered are sent again by their devices.
    helpers.abort_all();
    drop(shards);
    {
        let drain = async { while workers.join_next().await.is_some() {} };
        tokio::pin!(drain);
        let deadline = tokio::time::sleep(DRAIN);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut drain => break,
                _ = &mut deadline => break,
                polled = connection.poll() => if polled.is_err() { break },
            }
        }
    }
    workers.abort_all();
    disconnect(&client, &mut connection).await;
    tracing::info!(client_id = %config.mqtt.client_id, "Drogue integration stopped");
}

/// The integration's side of the MQTT session: subscriptions on every connection, and each
/// DFU status to the worker of its device.
struct Session<'a> {
    applications: &'a Mutex<BTreeSet<AppName>>,
    config: &'a IntegrationConfig,
    stats: &'a IntegrationStats,
    shards: &'a [mpsc::UnboundedSender<Job>],
}

impl SessionHandler for Session<'_> {
    fn connected(&mut self) -> Vec<String> {
        bump(&self.stats.connections);
        metrics::counter!("ajour_drogue_connections_total").increment(1);
        let apps: Vec<AppName> = self.applications.lock().unwrap().iter().cloned().collect();
        tracing::info!(
            applications = apps.len(),
            "connected to the MQTT integration; subscribing"
        );
        apps.iter().map(|app| self.config.filter(app)).collect()
    }

    fn subscribed(&mut self, granted: bool) {
        if granted {
            bump(&self.stats.subscriptions);
        } else {
            tracing::error!("the broker refused a subscription: check the user's access to the application");
        }
    }

    fn message(&mut self, message: Message) -> ControlFlow<()> {
        bump(&self.stats.events);
        let Some(request) = classify(&message, self.stats) else {
            return ControlFlow::Continue(());
        };
        let shard = worker_of(&request.key, self.shards.len());
        if self.shards[shard].send(Job { request }).is_err() {
            tracing::error!("a worker of the Drogue integration has stopped");
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn connection_lost(&mut self, error: &str) -> ControlFlow<()> {
        tracing::warn!(%error, "MQTT connection lost; reconnecting");
        metrics::counter!("ajour_drogue_connection_errors_total").increment(1);
        ControlFlow::Continue(())
    }
}

async fn subscribe(client: &MqttClient, config: &IntegrationConfig, app: &AppName) {
    let filter = config.filter(app);
    if let Err(error) = client.subscribe(&filter, config.binary_content_mode).await {
        tracing::warn!(%error, %filter, "subscribing failed");
    }
}

/// The DFU request in a message, if any; logs and counts what is skipped.
fn classify(message: &Message, stats: &IntegrationStats) -> Option<DfuRequest> {
    let result = dfu_request_in(
        &message.topic,
        &message.payload,
        message.content_type.as_deref(),
        &message.user_properties,
    );
    match result {
        Ok(Some(request)) => {
            bump(&stats.statuses);
            count_event("dfu");
            Some(request)
        }
        Ok(None) => {
            bump(&stats.ignored);
            count_event("ignored");
            None
        }
        Err(error) => {
            bump(&stats.malformed);
            count_event("malformed");
            tracing::warn!(topic = %message.topic, %error, "skipping a malformed event");
            None
        }
    }
}

/// Which of `workers` workers handles the statuses of device `key`. One worker per device keeps
/// a device's statuses in order; a device whose firmware is slow to come holds up only the
/// devices that share its worker.
pub fn worker_of(key: &Key, workers: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % workers as u64) as usize
}

async fn worker(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    service: Arc<UpdateService>,
    client: MqttClient,
    stats: Arc<IntegrationStats>,
) {
    while let Some(Job { request }) = jobs.recv().await {
        // Drogue authenticated the device: no credentials to check here.
        let reply = match service.device(&request.key, None).await {
            Ok(device) => device.handle_status(&request.status).await,
            Err(error) => {
                tracing::warn!(key = %request.key, %error, "device unavailable");
                continue;
            }
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                bump(&stats.malformed);
                count_event("malformed");
                tracing::warn!(key = %request.key, %error, "skipping a malformed status");
                continue;
            }
        };
        let topic = request.command_topic();
        tracing::trace!(%topic, command = reply.kind, "answering");
        match client.publish(&topic, reply.command).await {
            Ok(()) => {
                bump(&stats.commands);
                count_command("published");
            }
            Err(error) => {
                bump(&stats.publish_failures);
                count_command("failed");
                tracing::warn!(%error, %topic, "publishing a command failed");
            }
        }
    }
}

/// Keep the subscriptions in line with the applications the registry lists.
async fn refresh_applications(
    config: Arc<IntegrationConfig>,
    registry: Arc<dyn Registry>,
    client: MqttClient,
    applications: Arc<Mutex<BTreeSet<AppName>>>,
    refresh: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let delay = match registry.list(&Scope::Apps, &ListParams::default()).await {
            Ok(resources) => {
                let wanted: BTreeSet<AppName> = resources
                    .iter()
                    .filter_map(|r| AppName::parse(&r.metadata.name).ok())
                    .filter(|app| !config.exclude.contains(app.as_str()))
                    .collect();
                let (added, removed) = {
                    let mut current = applications.lock().unwrap();
                    let added: Vec<AppName> = wanted.difference(&current).cloned().collect();
                    let removed: Vec<AppName> = current.difference(&wanted).cloned().collect();
                    *current = wanted;
                    (added, removed)
                };
                for app in added {
                    tracing::info!(%app, "serving application");
                    subscribe(&client, &config, &app).await;
                }
                for app in removed {
                    tracing::info!(%app, "application gone: no longer served");
                    if let Err(error) = client.unsubscribe(&config.filter(&app)).await {
                        tracing::warn!(%error, %app, "unsubscribing failed");
                    }
                }
                refresh
            }
            Err(error) => {
                tracing::warn!(%error, "listing applications failed; will try again");
                refresh.min(LIST_RETRY)
            }
        };
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_use_the_shared_group() {
        let mut config = IntegrationConfig::new(
            MqttConfig::new("mqtt://127.0.0.1:1883", "t"),
            Applications::All {
                refresh: Duration::from_secs(60),
            },
        );
        let app = AppName::parse("my-app").unwrap();
        assert_eq!(config.filter(&app), "app/my-app");
        config.shared_group = Some("ajour".into());
        assert_eq!(config.filter(&app), "$share/ajour/app/my-app");
    }
}
