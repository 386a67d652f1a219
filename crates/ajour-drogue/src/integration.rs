//! The MQTT integration client: Drogue's event stream in, commands out.
//!
//! One MQTT connection per instance, with a client id of its own. It subscribes `app/{app}` for
//! each application served (`$share/{group}/app/{app}` with a group, so that instances share the
//! stream), decodes each event ([`crate::event`]), hands DFU statuses to the update service and
//! publishes the answer on `command/{app}/{device}/{dfu|port:223}` at QoS 1.
//!
//! Concurrency: a status is answered on the connection's own task when it can be at once (the
//! device's context is cached, the firmware in memory, the command fits the connection's queue),
//! which is nearly every block of an update: no hand-over between tasks, as a server with nothing
//! else to do would answer. What has to wait (the registry, for a device not seen lately) is
//! handed, where it stopped, to one of a fixed number of workers, chosen by device, so different
//! devices wait concurrently. A device's statuses are answered in the order they arrived: while a
//! worker holds anything, the statuses of its devices queue behind it instead of being answered
//! on the connection's task.
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
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

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
    /// Devices that can wait (for the registry) at the same time.
    pub workers: usize,
    /// Room per worker in the connection's queue of outgoing requests (commands, subscriptions).
    pub queue: usize,
}

impl IntegrationConfig {
    /// Devices that can wait (for the registry) at the same time, unless configured otherwise.
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
        // Commands go out through the connection's request queue, which only the connection task
        // drains (by polling). The connection task never waits for room in it: an answer that
        // finds it full goes on waiting in a worker (whose queues are unbounded, see `run`), and
        // so that wait ends.
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

/// What a worker is handed: a status to answer, or an answer started on the connection's task
/// that has to wait for something.
enum Job {
    Status(DfuRequest),
    Started(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// One worker, as the connection task sees it.
struct Shard {
    jobs: mpsc::UnboundedSender<Job>,
    /// Jobs handed to the worker and not finished yet. Only the connection task adds to it, so
    /// when it reads 0 nothing of this worker's devices is outstanding.
    held: Arc<AtomicUsize>,
}

/// What answering a status needs.
struct Answerer {
    service: Arc<UpdateService>,
    client: MqttClient,
    stats: Arc<IntegrationStats>,
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
    let answerer = Arc::new(Answerer {
        service: service.clone(),
        client: client.clone(),
        stats: stats.clone(),
    });
    for _ in 0..config.workers {
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(AtomicUsize::new(0));
        shards.push(Shard {
            jobs: tx,
            held: held.clone(),
        });
        workers.spawn(worker(rx, held, answerer.clone()));
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
        answerer: &answerer,
        idle_waker: Waker::from(Arc::new(Idle)),
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
/// DFU status answered, at once or by the worker of its device.
struct Session<'a> {
    applications: &'a Mutex<BTreeSet<AppName>>,
    config: &'a IntegrationConfig,
    stats: &'a IntegrationStats,
    shards: &'a [Shard],
    answerer: &'a Arc<Answerer>,
    /// Wakes nobody: see [`Session::message`].
    idle_waker: Waker,
}

/// A waker that does nothing.
struct Idle;

impl Wake for Idle {
    fn wake(self: Arc<Self>) {}
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
        let shard = &self.shards[worker_of(&request.key, self.shards.len())];
        let job = if shard.held.load(Ordering::Acquire) == 0 {
            // Nothing of this worker's devices is outstanding: answer here, as far as it goes
            // without waiting. Polled with a waker that does nothing: what it would wait for is
            // waited for by the worker, which polls it again with its own.
            let mut answering = Box::pin(answer(self.answerer.clone(), request));
            let mut context = Context::from_waker(&self.idle_waker);
            if let Poll::Ready(()) = answering.as_mut().poll(&mut context) {
                return ControlFlow::Continue(());
            }
            Job::Started(answering)
        } else {
            Job::Status(request)
        };
        shard.held.fetch_add(1, Ordering::AcqRel);
        if shard.jobs.send(job).is_err() {
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

/// Answer the jobs of one worker's devices, one after the other.
async fn worker(mut jobs: mpsc::UnboundedReceiver<Job>, held: Arc<AtomicUsize>, answerer: Arc<Answerer>) {
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Status(request) => answer(answerer.clone(), request).await,
            Job::Started(answering) => answering.await,
        }
        held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Ask the update service for the command answering `request` and publish it, in the device's
/// span: every line logged meanwhile names the device and its application.
async fn answer(answerer: Arc<Answerer>, request: DfuRequest) {
    let span = ajour_service::device_span(&request.key);
    answer_in_span(answerer, request).instrument(span).await
}

async fn answer_in_span(answerer: Arc<Answerer>, request: DfuRequest) {
    let Answerer {
        service,
        client,
        stats,
    } = answerer.as_ref();
    // Drogue authenticated the device: no credentials to check here.
    let reply = match service.device(&request.key, None).await {
        Ok(device) => device.handle_status(&request.status).await,
        Err(error) => {
            tracing::warn!(key = %request.key, %error, "device unavailable");
            return;
        }
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(error) => {
            bump(&stats.malformed);
            count_event("malformed");
            tracing::warn!(key = %request.key, %error, "skipping a malformed status");
            return;
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
