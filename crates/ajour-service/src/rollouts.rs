//! Staged rollouts in the service: what a device of an application with a rollout is given (per
//! status, from memory), and the controller that moves rollouts on (periodically, on every
//! instance; the store makes each step once).
//!
//! The rules are `ajour_types::rollout`'s; this module keeps each application's newest rollout
//! and its devices in memory (read again every tick), asks the store to admit a device when it
//! starts (the concurrency limit holds across instances), and writes the application's firmware
//! when a rollout completes.
//!
//! A rollout applies to an application's devices while the application's `spec.firmware` is the
//! one the rollout started from (a completed one: the one it rolled out). Changing the
//! application's firmware by hand cancels an open rollout ("superseded") and the devices follow
//! the application again.

use crate::context::DeviceContext;
use ajour_registry::{
    Admission, AppName, Key, LabelSelector, NewRollout, Registry, RegistryError, RolloutStore,
};
use ajour_store::FirmwareSpec;
use ajour_types::rollout::{
    self, apply, awaiting_approval, plan, Budget, Candidate, Choice, Member, Phase, Progress, Rollout,
    RolloutId, RolloutSpec, RolloutState, Step, WaveCounts,
};
use chrono::Timelike;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Why a rollout request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The request makes no sense; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    /// Not now: another rollout is open, or the rollout is not in a state that allows it.
    #[error("{0}")]
    Conflict(String),
    /// This server keeps no rollouts (Drogue mode).
    #[error("this server keeps no rollouts: they need Ajour's own database (standalone mode)")]
    Unavailable,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// A rollout, its devices' counts per wave, and whether its next wave waits for an approval.
#[derive(Debug, Clone)]
pub struct RolloutSummary {
    pub rollout: Rollout,
    pub waves: Vec<WaveCounts>,
    pub awaiting_approval: bool,
}

/// A rollout with its devices, and the application's devices outside it with why.
#[derive(Debug, Clone)]
pub struct RolloutDetails {
    pub summary: RolloutSummary,
    pub members: Vec<Member>,
    pub outside: Vec<(String, &'static str)>,
}

/// An application's newest rollout as the service uses it.
pub(crate) struct Book {
    pub rollout: Rollout,
    /// The rollout's firmware; `Err` when it no longer parses (checked when created).
    pub firmware: Result<FirmwareSpec, String>,
    previous: Result<Option<FirmwareSpec>, String>,
    selector: Option<LabelSelector>,
    /// By device name; starts by this instance are noted here at once.
    members: Mutex<HashMap<String, Member>>,
    /// Of `members`, how many are updating (asked for every status of a pending device: counted
    /// once, not per status).
    in_flight: AtomicU32,
}

/// What a device of an application with a rollout is given.
pub(crate) enum Given {
    /// The rollout does not apply: the device's own context decides.
    Context,
    /// The rollout's firmware; `start`: the store must admit the device first.
    Rollout { book: Arc<Book>, start: bool },
    /// Its firmware from before the rollout (`None`: it had none).
    Previous(Result<Option<FirmwareSpec>, String>),
    /// Wait: it is mid-update and the rollout is paused.
    Wait,
}

pub(crate) struct Rollouts {
    store: Arc<dyn RolloutStore>,
    books: RwLock<HashMap<AppName, Arc<Book>>>,
    /// Each rollout's bandwidth budget on this instance (kept apart from the books, which are
    /// read again every tick).
    budgets: Mutex<HashMap<RolloutId, Budget>>,
    /// Rounds of [`Self::tick`] and [`Self::refresh`] so far.
    refreshes: AtomicU64,
}

/// A completed or cancelled rollout's devices are read again every this many rounds.
const FINISHED_READ_EVERY: u64 = 10;

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn parse_previous(previous: Option<&Value>) -> Result<Option<FirmwareSpec>, String> {
    previous
        .map(|section| FirmwareSpec::from_json(section).map_err(|e| e.to_string()))
        .transpose()
}

impl Book {
    fn new(rollout: Rollout, members: Vec<Member>) -> Self {
        Self {
            firmware: FirmwareSpec::from_json(&rollout.spec.firmware).map_err(|e| e.to_string()),
            previous: parse_previous(rollout.previous.as_ref()),
            selector: rollout
                .spec
                .selector
                .as_deref()
                .and_then(|s| LabelSelector::parse(s).ok()),
            in_flight: AtomicU32::new(members.iter().filter(|m| m.phase.in_flight()).count() as u32),
            members: Mutex::new(members.into_iter().map(|m| (m.device.clone(), m)).collect()),
            rollout,
        }
    }

    /// Whether the rollout applies to devices of an application whose firmware is `current` (as
    /// the device's context read it, up to `--spec-cache-ms` ago). A completed rollout also
    /// applies while a context still shows the firmware from before it: the moment it completes
    /// must not hand devices already updated their previous firmware again.
    fn applies(&self, current: Option<&Value>) -> bool {
        let from_before = current == self.rollout.previous.as_ref();
        match self.rollout.progress.state {
            RolloutState::Completed => from_before || current == Some(&self.rollout.spec.firmware),
            _ => from_before,
        }
    }
}

impl Rollouts {
    pub fn new(store: Arc<dyn RolloutStore>) -> Self {
        Self {
            store,
            books: RwLock::default(),
            budgets: Mutex::default(),
            refreshes: AtomicU64::new(0),
        }
    }

    fn book(&self, app: &AppName) -> Option<Arc<Book>> {
        self.books.read().unwrap().get(app).cloned()
    }

    /// What device `key` (with its `context`) is given now.
    pub async fn given(&self, key: &Key, context: &DeviceContext) -> Result<Given, RegistryError> {
        let Key::Device(app, device) = key else {
            return Ok(Given::Context);
        };
        let Some(book) = self.book(app) else {
            return Ok(Given::Context);
        };
        if context.own_firmware || !book.applies(context.application_firmware.as_ref()) {
            return Ok(Given::Context);
        }
        let matches = book
            .selector
            .as_ref()
            .is_none_or(|selector| selector.matches(&context.labels));
        let hour = chrono::Utc::now().hour();
        let choice = {
            let members = book.members.lock().unwrap();
            let member = members.get(device.as_str());
            let in_flight = book.in_flight.load(Ordering::Relaxed);
            rollout::choose(&book.rollout, member, matches, in_flight, hour)
        };
        Ok(match choice {
            Choice::Outside => Given::Context,
            Choice::Rollout => Given::Rollout { book, start: false },
            Choice::Start => Given::Rollout { book, start: true },
            Choice::Previous => self.previous_of(&book, key),
            Choice::Wait => Given::Wait,
            Choice::Join => {
                let wave = book.rollout.spec.last_wave();
                self.store
                    .join(book.rollout.id, app, device.as_str(), wave)
                    .await?;
                book.members
                    .lock()
                    .unwrap()
                    .entry(device.to_string())
                    .or_insert_with(|| Member::pending(device.as_str(), wave));
                tracing::info!(%key, rollout = book.rollout.id, wave, "device joined the rollout's last wave");
                return Box::pin(self.given(key, context)).await;
            }
        })
    }

    /// What device `key` had before `book`'s rollout.
    pub fn previous_of(&self, book: &Book, key: &Key) -> Given {
        let own = match key {
            Key::Device(_, device) => book
                .members
                .lock()
                .unwrap()
                .get(device.as_str())
                .and_then(|m| m.previous.clone()),
            Key::App(_) => None,
        };
        match own {
            Some(own) => Given::Previous(parse_previous(Some(&own))),
            None => Given::Previous(book.previous.clone()),
        }
    }

    /// Whether `book`'s rollout can afford to send `bytes` now (always, without a budget).
    pub fn afford(&self, book: &Book, bytes: u32) -> bool {
        let Some(rate) = book.rollout.spec.bandwidth_bytes_per_second else {
            return true;
        };
        let now = now_millis();
        let mut budgets = self.budgets.lock().unwrap();
        let budget = budgets
            .entry(book.rollout.id)
            .or_insert_with(|| Budget::full(rate, now));
        let afforded = budget.take(rate, u64::from(bytes), now);
        if !afforded {
            metrics::counter!("ajour_rollout_budget_waits_total").increment(1);
        }
        afforded
    }

    /// Ask the store to start device `key` toward `target` in `book`'s rollout; whether it did.
    pub async fn start(&self, book: &Book, key: &Key, target: &str) -> Result<bool, RegistryError> {
        let Key::Device(_, device) = key else {
            return Ok(false);
        };
        let now = now_millis();
        let admission = self
            .store
            .start(
                book.rollout.id,
                device.as_str(),
                target,
                book.rollout.spec.concurrency,
                now,
            )
            .await?;
        if admission == Admission::Started {
            if let Some(member) = book.members.lock().unwrap().get_mut(device.as_str()) {
                if !member.phase.in_flight() {
                    book.in_flight.fetch_add(1, Ordering::Relaxed);
                }
                member.phase = Phase::Updating;
                member.target = Some(target.to_string());
                member.started_at = Some(now);
            }
            metrics::counter!("ajour_rollout_starts_total").increment(1);
        }
        Ok(admission == Admission::Started)
    }

    /// Create a rollout of `app` as `spec` says.
    pub async fn create(
        &self,
        registry: &dyn Registry,
        app: &AppName,
        spec: RolloutSpec,
    ) -> Result<Rollout, RolloutError> {
        spec.validate(|s| LabelSelector::parse(s).map(|_| ()).map_err(|e| e.to_string()))
            .map_err(|e| RolloutError::Invalid(e.0))?;
        FirmwareSpec::from_json(&spec.firmware)
            .map_err(|e| RolloutError::Invalid(format!("firmware: {e}")))?;
        let application = registry
            .get(&Key::App(app.clone()))
            .await?
            .ok_or_else(|| RolloutError::NotFound(format!("application {app}")))?;
        let previous = application.spec.get("firmware");
        if previous == Some(&spec.firmware) {
            return Err(RolloutError::Invalid(format!(
                "application {app} has this firmware already"
            )));
        }
        let devices = registry
            .list(&ajour_registry::Scope::Devices(app.clone()), &Default::default())
            .await?;
        let selector = spec.selector.as_deref().map(LabelSelector::parse).transpose()?;
        let candidates: Vec<Candidate<'_>> = devices
            .iter()
            .filter(|d| !d.spec.contains_key("firmware"))
            .filter(|d| selector.as_ref().is_none_or(|s| s.matches(&d.metadata.labels)))
            .map(|d| Candidate {
                name: &d.metadata.name,
                labels: &d.metadata.labels,
            })
            .collect();
        // Devices that kept a cancelled rollout's firmware start from it, not from the
        // application's.
        let earlier = self.store.rollouts(app).await?;
        let kept: HashMap<String, Value> = match earlier.first() {
            Some(last)
                if last.progress.state == RolloutState::Cancelled && last.previous.as_ref() == previous =>
            {
                self.store
                    .members(last.id)
                    .await?
                    .into_iter()
                    .filter(|m| matches!(m.phase, Phase::Succeeded | Phase::Swapping))
                    .map(|m| (m.device, last.spec.firmware.clone()))
                    .collect()
            }
            _ => HashMap::new(),
        };
        let now = now_millis();
        // The order devices are taken in: another for each rollout of the application, the same
        // for the same history (a rehearsal on a copy of the fleet takes the same devices first).
        let seed = earlier.len() as u64 + 1;
        let members = spec
            .assign(&candidates, seed, |selector, labels| {
                LabelSelector::parse(selector).is_ok_and(|s| s.matches(labels))
            })
            .into_iter()
            .map(|(device, wave)| Member {
                previous: kept.get(&device).cloned(),
                ..Member::pending(&device, wave)
            })
            .collect();
        let created = self
            .store
            .create_rollout(NewRollout {
                app,
                spec: &spec,
                previous,
                members,
                now,
            })
            .await
            .map_err(|e| match e {
                RegistryError::AlreadyExists(why) => RolloutError::Conflict(why),
                other => RolloutError::Registry(other),
            })?;
        tracing::info!(%app, rollout = created.id, waves = spec.waves.len(), "rollout created");
        self.refresh().await?;
        Ok(created)
    }

    pub async fn list(&self, app: &AppName) -> Result<Vec<RolloutSummary>, RolloutError> {
        let mut summaries = Vec::new();
        for rollout in self.store.rollouts(app).await? {
            summaries.push(self.summary(rollout).await?);
        }
        Ok(summaries)
    }

    pub async fn get(
        &self,
        registry: &dyn Registry,
        app: &AppName,
        id: RolloutId,
    ) -> Result<RolloutDetails, RolloutError> {
        let rollout = self.find(app, id).await?;
        let members = self.store.members(id).await?;
        let devices = registry
            .list(&ajour_registry::Scope::Devices(app.clone()), &Default::default())
            .await?;
        let selector = rollout
            .spec
            .selector
            .as_deref()
            .and_then(|s| LabelSelector::parse(s).ok());
        let names: std::collections::HashSet<&str> = members.iter().map(|m| m.device.as_str()).collect();
        let outside = devices
            .iter()
            .filter(|d| !names.contains(d.metadata.name.as_str()))
            .map(|d| {
                let why = if d.spec.contains_key("firmware") {
                    "its own firmware"
                } else if selector.as_ref().is_some_and(|s| !s.matches(&d.metadata.labels)) {
                    "not selected"
                } else {
                    "joins the last wave on its next status"
                };
                (d.metadata.name.clone(), why)
            })
            .collect();
        Ok(RolloutDetails {
            summary: summarise(rollout, &members),
            members,
            outside,
        })
    }

    async fn find(&self, app: &AppName, id: RolloutId) -> Result<Rollout, RolloutError> {
        self.store
            .rollout(app, id)
            .await?
            .ok_or_else(|| RolloutError::NotFound(format!("rollout {id} of {app}")))
    }

    async fn summary(&self, rollout: Rollout) -> Result<RolloutSummary, RolloutError> {
        let members = self.store.members(rollout.id).await?;
        Ok(summarise(rollout, &members))
    }

    /// Pause, resume, cancel or approve rollout `id`, as an operator asks.
    pub async fn control(
        &self,
        app: &AppName,
        id: RolloutId,
        action: Action,
    ) -> Result<RolloutSummary, RolloutError> {
        // The controller may move the rollout between our read and our write: read again then.
        for _ in 0..5 {
            let rollout = self.find(app, id).await?;
            let members = self.store.members(id).await?;
            let progress = &rollout.progress;
            let now = now_millis();
            let refuse = |why: String| Err(RolloutError::Conflict(format!("rollout {id}: {why}")));
            let mut next = progress.clone();
            match (action, progress.state) {
                (Action::Pause, RolloutState::Active) => {
                    next.state = RolloutState::Paused;
                    next.reason = Some("paused by an operator".into());
                    next.halted = false;
                }
                (Action::Resume, RolloutState::Paused) => {
                    next.state = RolloutState::Active;
                    next.reason = None;
                    next.halted = false;
                    // The failures that halted it are accepted; only new ones count.
                    let counts = WaveCounts::of(rollout.spec.waves.len(), &members);
                    next.forgiven = counts.get(progress.wave as usize).map_or(0, |c| c.failed);
                }
                (Action::Cancel, state) if state.is_open() => {
                    next.state = RolloutState::Cancelled;
                    next.reason = Some("cancelled by an operator".into());
                }
                (Action::Approve, RolloutState::Active) if awaiting_approval(&rollout, now) => {
                    next = apply(progress, &Step::Advance, now);
                }
                (Action::Approve, RolloutState::Active) => {
                    return refuse(format!(
                        "wave {} is not ready for the next one (successful, soaked, and the next wave asks for approval)",
                        progress.wave
                    ))
                }
                (action, state) => return refuse(format!("cannot {} a rollout that is {}", action.as_str(), state.as_str())),
            }
            if self.store.advance(id, progress, &next, now).await? {
                tracing::info!(%app, rollout = id, action = action.as_str(), "rollout {}", next.state.as_str());
                self.refresh().await?;
                let rollout = self.find(app, id).await?;
                return self.summary(rollout).await;
            }
        }
        Err(RolloutError::Conflict(format!(
            "rollout {id} keeps changing; try again"
        )))
    }

    /// One round of the controller: fail devices past their timeouts, move each open rollout on
    /// as [`plan`] says, and keep what was read (every application's newest rollout and its
    /// devices) for the statuses until the next round. Returns the applications whose firmware
    /// it changed (a rollout completed).
    pub async fn tick(&self, registry: &dyn Registry) -> Result<Vec<AppName>, RegistryError> {
        let now = now_millis();
        let round = self.refreshes.fetch_add(1, Ordering::Relaxed);
        let mut completed = Vec::new();
        let mut books = HashMap::new();
        for mut rollout in self.store.latest_rollouts().await? {
            let Ok(app) = AppName::parse(&rollout.app) else {
                continue;
            };
            let mut members = None;
            if rollout.progress.state.is_open() {
                // Only while active: in a pause nobody makes progress, by design.
                if rollout.progress.state == RolloutState::Active {
                    let policy = &rollout.spec.failure;
                    let expired = self
                        .store
                        .expire(
                            rollout.id,
                            Duration::from_secs(policy.swap_timeout_seconds),
                            Duration::from_secs(policy.stall_timeout_seconds),
                            now,
                        )
                        .await?;
                    if expired > 0 {
                        metrics::counter!("ajour_rollout_timeouts_total").increment(expired);
                    }
                }
                let read = self.store.members(rollout.id).await?;
                if let Some(next) = self.step(registry, &app, &rollout, &read, now).await? {
                    if next.state == RolloutState::Completed {
                        completed.push(app.clone());
                    }
                    rollout.progress = next;
                }
                members = Some(read);
            }
            let book = self.book_of(&app, rollout, members, round).await?;
            books.insert(app, book);
        }
        self.install(books);
        Ok(completed)
    }

    /// Take the next step of `rollout`, whose devices are `members`, if any; the rollout's
    /// progress after it, when this instance took it.
    async fn step(
        &self,
        registry: &dyn Registry,
        app: &AppName,
        rollout: &Rollout,
        members: &[Member],
        now: i64,
    ) -> Result<Option<Progress>, RegistryError> {
        let Some(application) = registry.get(&Key::App(app.clone())).await? else {
            return Ok(None);
        };
        let current = application.spec.get("firmware");
        let progress = &rollout.progress;
        if current != rollout.previous.as_ref() && current != Some(&rollout.spec.firmware) {
            let mut next = progress.clone();
            next.state = RolloutState::Cancelled;
            next.reason =
                Some("superseded: the application's firmware was changed outside the rollout".into());
            if !self.store.advance(rollout.id, progress, &next, now).await? {
                return Ok(None);
            }
            tracing::warn!(%app, rollout = rollout.id, "rollout cancelled: the application's firmware was changed by hand");
            return Ok(Some(next));
        }
        let counts = WaveCounts::of(rollout.spec.waves.len(), members);
        let Some(step) = plan(rollout, &counts, now) else {
            return Ok(None);
        };
        if step == Step::Complete && current != Some(&rollout.spec.firmware) {
            // The application's firmware becomes the rollout's first: devices that join later, or
            // never reported during the rollout, get it from there.
            let mut application = application;
            application
                .spec
                .insert("firmware".into(), rollout.spec.firmware.clone());
            registry.update(&Key::App(app.clone()), application).await?;
        }
        let next = apply(progress, &step, now);
        if !self.store.advance(rollout.id, progress, &next, now).await? {
            return Ok(None); // another instance took this step
        }
        match &step {
            Step::Halt { reason } => {
                metrics::counter!("ajour_rollout_halts_total").increment(1);
                tracing::warn!(%app, rollout = rollout.id, reason, "rollout halted");
            }
            Step::WaveSucceeded => {
                tracing::info!(%app, rollout = rollout.id, wave = progress.wave, "wave successful")
            }
            Step::Advance => {
                tracing::info!(%app, rollout = rollout.id, wave = next.wave, "next wave started")
            }
            Step::Complete => tracing::info!(%app, rollout = rollout.id, "rollout completed"),
        }
        Ok(Some(next))
    }

    /// Read every application's newest rollout and its devices again (after a change through
    /// the API, not to wait for the next round).
    pub async fn refresh(&self) -> Result<(), RegistryError> {
        let round = self.refreshes.fetch_add(1, Ordering::Relaxed);
        let mut books = HashMap::new();
        for rollout in self.store.latest_rollouts().await? {
            let Ok(app) = AppName::parse(&rollout.app) else {
                continue;
            };
            let book = self.book_of(&app, rollout, None, round).await?;
            books.insert(app, book);
        }
        self.install(books);
        Ok(())
    }

    /// `rollout` of `app` with its devices: `members` when they were read this round; else read
    /// now, except that a completed or cancelled rollout's devices, which change only as the last
    /// of its updates end, are read again only every [`FINISHED_READ_EVERY`] rounds (a fleet of
    /// them would be read every second for ever).
    async fn book_of(
        &self,
        app: &AppName,
        rollout: Rollout,
        members: Option<Vec<Member>>,
        round: u64,
    ) -> Result<Arc<Book>, RegistryError> {
        let members = match members {
            Some(members) => members,
            None => {
                let finished = !rollout.progress.state.is_open();
                let unchanged = self.book(app).filter(|book| {
                    book.rollout == rollout && finished && !round.is_multiple_of(FINISHED_READ_EVERY)
                });
                if let Some(book) = unchanged {
                    return Ok(book);
                }
                self.store.members(rollout.id).await?
            }
        };
        record_metrics(&rollout, &members);
        Ok(Arc::new(Book::new(rollout, members)))
    }

    /// Answer statuses from `books` from now on; forget the budgets of rollouts no longer newest.
    fn install(&self, books: HashMap<AppName, Arc<Book>>) {
        let ids: std::collections::HashSet<RolloutId> = books.values().map(|b| b.rollout.id).collect();
        self.budgets.lock().unwrap().retain(|id, _| ids.contains(id));
        *self.books.write().unwrap() = books;
    }
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Cancel,
    Approve,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Cancel => "cancel",
            Action::Approve => "approve",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Action::Pause, Action::Resume, Action::Cancel, Action::Approve]
            .into_iter()
            .find(|a| a.as_str() == text)
    }
}

fn summarise(rollout: Rollout, members: &[Member]) -> RolloutSummary {
    RolloutSummary {
        waves: WaveCounts::of(rollout.spec.waves.len(), members),
        awaiting_approval: awaiting_approval(&rollout, now_millis()),
        rollout,
    }
}

fn record_metrics(rollout: &Rollout, members: &[Member]) {
    let app = rollout.app.clone();
    for state in [
        RolloutState::Active,
        RolloutState::Paused,
        RolloutState::Completed,
        RolloutState::Cancelled,
    ] {
        let value = if rollout.progress.state == state { 1.0 } else { 0.0 };
        metrics::gauge!("ajour_rollout_state", "app" => app.clone(), "state" => state.as_str()).set(value);
    }
    let mut by_phase: HashMap<Phase, u32> = HashMap::new();
    for member in members {
        *by_phase.entry(member.phase).or_default() += 1;
    }
    for phase in Phase::ALL {
        metrics::gauge!("ajour_rollout_devices", "app" => app.clone(), "phase" => phase.as_str())
            .set(f64::from(by_phase.get(&phase).copied().unwrap_or(0)));
    }
    metrics::gauge!("ajour_rollout_wave", "app" => app).set(f64::from(rollout.progress.wave));
}
