//! Staged rollouts: an application's new firmware given to its devices wave by wave, halted by
//! itself when too many of a wave fail.
//!
//! Everything here is pure (no I/O, no clock: times come in as arguments), so the rules are
//! tested on their own and every instance sharing a database applies the same ones:
//!
//! - [`RolloutSpec::assign`]: which wave each device is in, fixed when the rollout is created;
//! - [`choose`]: what one device is given now (the rollout's firmware, its previous one, or
//!   `Wait`), asked for every status;
//! - [`plan`]: what the rollout does next (halt, note a wave's success, start the next wave,
//!   complete), asked periodically;
//! - [`phase_after`]: where a device is in the rollout after a status write, from what its
//!   history was told ([`crate::events_between`]).
//!
//! **Failure**, from what the protocol shows: a device that was sent the whole image and reports
//! its old version again with nothing written (its bootloader rolled back, or the swap failed);
//! a device silent for longer than `swapTimeoutSeconds` after it was sent the whole image; a
//! device whose progress was not recorded for `stallTimeoutSeconds` while updating.

use crate::{EventKind, HistoryEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// A rollout's number, unique in the database.
pub type RolloutId = i64;

/// The most waves a rollout may have.
pub const MAX_WAVES: usize = 20;

/// The longest soak and failure timeout a rollout may ask for: 30 days, in seconds.
pub const MAX_SECONDS: u64 = 30 * 24 * 3600;

/// What a rollout is asked to do, as the API takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// The firmware to roll out, as an application's `spec.firmware` (`file`, `container`, …).
    pub firmware: Value,
    /// Which of the application's devices the rollout is for, as a label selector
    /// (`channel=beta`); none: all of them. A device with its own `spec.firmware` is never in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The waves, in order. The last one takes every device left, and devices that join later.
    pub waves: Vec<WaveSpec>,
    #[serde(default)]
    pub failure: FailurePolicy,
    /// Devices of the rollout updating at once (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// UTC hours within which new devices may start; devices already updating go on outside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<MaintenanceWindow>,
    /// Firmware bytes per second the rollout sends, over all its devices, from each instance
    /// (none: no limit). A device that would pass it is told to wait a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_second: Option<u64>,
}

/// One wave: which devices (exactly one of `percent`, `count`, `selector`) and when it is done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaveSpec {
    /// This share of the rollout's devices (counted when the rollout is created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// This many devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// The devices (not in an earlier wave) whose labels match (`ring=canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// How long the wave must stay successful before the next one starts.
    #[serde(default)]
    pub soak_seconds: u64,
    /// The share of the wave's devices (percent) that must run the new firmware for the wave to
    /// be successful.
    #[serde(default = "default_success_threshold")]
    pub success_threshold: f64,
    /// Whether this wave starts by itself once the one before is successful and soaked, or only
    /// when approved.
    #[serde(default)]
    pub approval: Approval,
}

fn default_success_threshold() -> f64 {
    90.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Approval {
    #[default]
    Auto,
    Manual,
}

/// When the rollout halts by itself, and when a device has failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailurePolicy {
    /// Halt when this share (percent) of the active wave's devices failed.
    #[serde(default = "default_max_failure_rate")]
    pub max_failure_rate: Option<f64>,
    /// Halt when this many of the active wave's devices failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    /// A device sent the whole image and silent for this long has failed.
    #[serde(default = "default_swap_timeout")]
    pub swap_timeout_seconds: u64,
    /// A device updating whose progress was not recorded for this long has failed.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_seconds: u64,
}

fn default_max_failure_rate() -> Option<f64> {
    Some(10.0)
}
fn default_swap_timeout() -> u64 {
    600
}
fn default_stall_timeout() -> u64 {
    1800
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            max_failure_rate: default_max_failure_rate(),
            max_failures: None,
            swap_timeout_seconds: default_swap_timeout(),
            stall_timeout_seconds: default_stall_timeout(),
        }
    }
}

/// Hours of the day (UTC) from `startHour` up to, not including, `endHour`; over midnight when
/// the end is smaller (22 to 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintenanceWindow {
    pub start_hour: u8,
    pub end_hour: u8,
}

impl MaintenanceWindow {
    /// Whether `hour` (0–23, UTC) is within the window.
    pub fn contains(&self, hour: u32) -> bool {
        let (start, end) = (u32::from(self.start_hour), u32::from(self.end_hour));
        if start <= end {
            (start..end).contains(&hour)
        } else {
            hour >= start || hour < end
        }
    }
}

/// A spec that cannot be a rollout, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRollout(pub String);

/// A device as wave assignment sees it: its name and labels.
pub struct Candidate<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl RolloutSpec {
    /// Check what serde cannot: the waves, thresholds and window make sense. `selector_ok` checks
    /// a label selector's syntax (the registry's parser).
    pub fn validate(&self, selector_ok: impl Fn(&str) -> Result<(), String>) -> Result<(), InvalidRollout> {
        let invalid = |why: String| Err(InvalidRollout(why));
        if self.waves.is_empty() || self.waves.len() > MAX_WAVES {
            return invalid(format!(
                "a rollout has 1 to {MAX_WAVES} waves, not {}",
                self.waves.len()
            ));
        }
        if let Some(selector) = &self.selector {
            selector_ok(selector).map_err(InvalidRollout)?;
        }
        for (n, wave) in self.waves.iter().enumerate() {
            let kinds = [
                wave.percent.is_some(),
                wave.count.is_some(),
                wave.selector.is_some(),
            ];
            if kinds.iter().filter(|set| **set).count() != 1 {
                return invalid(format!(
                    "wave {n}: set exactly one of 'percent', 'count', 'selector'"
                ));
            }
            if let Some(percent) = wave.percent {
                if !(percent > 0.0 && percent <= 100.0) {
                    return invalid(format!("wave {n}: percent must be above 0 and at most 100"));
                }
            }
            if let Some(selector) = &wave.selector {
                selector_ok(selector).map_err(|e| InvalidRollout(format!("wave {n}: {e}")))?;
            }
            if !(0.0..=100.0).contains(&wave.success_threshold) {
                return invalid(format!("wave {n}: successThreshold must be from 0 to 100"));
            }
            if wave.soak_seconds > MAX_SECONDS {
                return invalid(format!(
                    "wave {n}: soakSeconds must be at most {MAX_SECONDS} (30 days)"
                ));
            }
        }
        if let Some(rate) = self.failure.max_failure_rate {
            if !(rate > 0.0 && rate <= 100.0) {
                return invalid("failure.maxFailureRate must be above 0 and at most 100".into());
            }
        }
        if self.failure.max_failures == Some(0) {
            return invalid("failure.maxFailures must be at least 1".into());
        }
        let timeouts = [
            self.failure.swap_timeout_seconds,
            self.failure.stall_timeout_seconds,
        ];
        if timeouts.iter().any(|t| !(1..=MAX_SECONDS).contains(t)) {
            return invalid(format!(
                "failure timeouts must be from 1 to {MAX_SECONDS} seconds (30 days)"
            ));
        }
        if self.bandwidth_bytes_per_second == Some(0) {
            return invalid("bandwidthBytesPerSecond must be at least 1 (or left out: no limit)".into());
        }
        if self.concurrency == Some(0) {
            return invalid("concurrency must be at least 1 (or left out: no limit)".into());
        }
        if let Some(window) = self.maintenance_window {
            if window.start_hour > 23 || window.end_hour > 23 || window.start_hour == window.end_hour {
                return invalid("maintenanceWindow: hours are 0 to 23, start and end differ".into());
            }
        }
        Ok(())
    }

    /// Which wave each device is in. Devices go to the first wave that takes them: a selector
    /// wave takes the devices it matches; a share (`percent` of all devices, rounded up, or a
    /// `count`) takes devices not taken yet in an order fixed by `seed` and their names (spread
    /// over the fleet, not the first names, and another order for another rollout); the last
    /// wave takes every device left. `matches(selector, labels)` applies a label selector.
    pub fn assign(
        &self,
        devices: &[Candidate<'_>],
        seed: u64,
        matches: impl Fn(&str, &BTreeMap<String, String>) -> bool,
    ) -> Vec<(String, u32)> {
        let mut order: Vec<(u64, &Candidate<'_>)> =
            devices.iter().map(|d| (spread(seed, d.name), d)).collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(b.1.name)));
        let total = devices.len();
        let mut wave_of: Vec<Option<u32>> = vec![None; order.len()];
        let last = self.waves.len() - 1;
        for (n, wave) in self.waves.iter().enumerate().take(last) {
            let wanted = match (wave.percent, wave.count) {
                (Some(percent), _) => (percent * total as f64 / 100.0).ceil() as usize,
                (_, Some(count)) => count as usize,
                _ => usize::MAX,
            };
            let mut taken = 0;
            for (i, (_, device)) in order.iter().enumerate() {
                if taken >= wanted {
                    break;
                }
                let takes = match &wave.selector {
                    Some(selector) => matches(selector, device.labels),
                    None => true,
                };
                if wave_of[i].is_none() && takes {
                    wave_of[i] = Some(n as u32);
                    taken += 1;
                }
            }
        }
        order
            .iter()
            .zip(wave_of)
            .map(|((_, device), wave)| (device.name.to_string(), wave.unwrap_or(last as u32)))
            .collect()
    }

    /// The index of the last wave, where devices joining later go.
    pub fn last_wave(&self) -> u32 {
        (self.waves.len() - 1) as u32
    }
}

/// A stable 64-bit mix of `seed` and `name` (FNV-1a, then a finaliser): the same on every
/// instance and in every build, unlike `std`'s hasher.
fn spread(seed: u64, name: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutState {
    /// Devices of the active wave (and earlier ones) start.
    Active,
    /// No device starts; devices mid-update are told to wait. By an operator, or by itself.
    Paused,
    /// Every wave succeeded; the application's firmware is the rollout's.
    Completed,
    /// Stopped for good: devices that were not sent the whole image went back to their previous
    /// firmware.
    Cancelled,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Paused => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Active, Self::Paused, Self::Completed, Self::Cancelled]
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    /// Active or paused: at most one such rollout per application.
    pub fn is_open(self) -> bool {
        matches!(self, RolloutState::Active | RolloutState::Paused)
    }
}

/// The part of a rollout that changes, compared and swapped as one by the store, so that every
/// instance's controller can apply [`plan`] and only one of them wins each step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub state: RolloutState,
    /// The active wave.
    pub wave: u32,
    /// When it became active (milliseconds since the epoch).
    pub wave_since: i64,
    /// When it first reached its success threshold.
    pub wave_succeeded_at: Option<i64>,
    /// Failures of the active wave an operator accepted by resuming after a halt: only failures
    /// beyond them count toward the next halt.
    pub forgiven: u32,
    /// Why it is paused, cancelled or completed.
    pub reason: Option<String>,
    /// Paused by itself (auto-halt), not by an operator.
    pub halted: bool,
}

impl Progress {
    pub fn new(now: i64) -> Self {
        Self {
            state: RolloutState::Active,
            wave: 0,
            wave_since: now,
            wave_succeeded_at: None,
            forgiven: 0,
            reason: None,
            halted: false,
        }
    }
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub id: RolloutId,
    pub app: String,
    pub spec: RolloutSpec,
    /// The application's `spec.firmware` when the rollout was created; `None`: it had none.
    pub previous: Option<Value>,
    pub progress: Progress,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Where a device is in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Not started: it runs its previous firmware.
    Pending,
    /// Being sent the rollout's image.
    Updating,
    /// Sent the whole image: it should come back on the new version.
    Swapping,
    /// Runs the rollout's version.
    Succeeded,
    /// Failed (see the module's documentation); it is given its previous firmware.
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Pending,
        Phase::Updating,
        Phase::Swapping,
        Phase::Succeeded,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Updating => "updating",
            Phase::Swapping => "swapping",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|phase| phase.as_str() == text)
    }

    /// Started and not finished: counts toward the concurrency limit.
    pub fn in_flight(self) -> bool {
        matches!(self, Phase::Updating | Phase::Swapping)
    }
}

/// A device of a rollout, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub device: String,
    pub wave: u32,
    pub phase: Phase,
    /// The version it was started toward (known once the image was fetched).
    pub target: Option<String>,
    /// Its firmware before the rollout, when not the rollout's `previous` (it had kept a
    /// cancelled rollout's firmware).
    pub previous: Option<Value>,
    /// Milliseconds since the epoch.
    pub started_at: Option<i64>,
    pub progress_at: Option<i64>,
    pub swapped_at: Option<i64>,
    pub reason: Option<String>,
}

impl Member {
    pub fn pending(device: &str, wave: u32) -> Self {
        Self {
            device: device.to_string(),
            wave,
            phase: Phase::Pending,
            target: None,
            previous: None,
            started_at: None,
            progress_at: None,
            swapped_at: None,
            reason: None,
        }
    }
}

/// What a device is given, by [`choose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The rollout's firmware (it updates, or it runs it already).
    Rollout,
    /// It may start now (the store admits it under the concurrency limit), then the rollout's
    /// firmware; when not admitted, its previous firmware.
    Start,
    /// Its previous firmware.
    Previous,
    /// Not in the rollout yet (registered or labelled after it was created): it joins the last
    /// wave, then is chosen for again.
    Join,
    /// Told to wait: it is mid-update and the rollout is paused.
    Wait,
    /// The rollout does not apply to it.
    Outside,
}

/// What the rollout gives a device now. `member` is the device's place in it (`None`: not in it);
/// `matches` whether the device matches the rollout's selector; `in_flight` the rollout's devices
/// updating now, as this instance knows; `hour` the current UTC hour.
pub fn choose(
    rollout: &Rollout,
    member: Option<&Member>,
    matches: bool,
    in_flight: u32,
    hour: u32,
) -> Choice {
    let progress = &rollout.progress;
    let Some(member) = member else {
        return if progress.state.is_open() && matches {
            Choice::Join
        } else {
            Choice::Outside
        };
    };
    match (progress.state, member.phase) {
        // A device given the whole image keeps it whatever happened to the rollout since:
        // taking the firmware back is a new rollout of the old one.
        (_, Phase::Succeeded | Phase::Swapping) => Choice::Rollout,
        (_, Phase::Failed) => Choice::Previous,
        (RolloutState::Completed, _) => Choice::Rollout,
        (RolloutState::Cancelled, _) => Choice::Previous,
        (RolloutState::Paused, Phase::Updating) => Choice::Wait,
        (RolloutState::Paused, _) => Choice::Previous,
        (RolloutState::Active, Phase::Updating) => Choice::Rollout,
        (RolloutState::Active, Phase::Pending) => {
            let wave_open = member.wave <= progress.wave;
            let in_window = rollout
                .spec
                .maintenance_window
                .is_none_or(|window| window.contains(hour));
            let room = rollout.spec.concurrency.is_none_or(|limit| in_flight < limit);
            if wave_open && in_window && room {
                Choice::Start
            } else {
                Choice::Previous
            }
        }
    }
}

/// A wave's devices by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaveCounts {
    pub pending: u32,
    pub updating: u32,
    pub succeeded: u32,
    pub failed: u32,
}

impl WaveCounts {
    pub fn add(&mut self, phase: Phase) {
        match phase {
            Phase::Pending => self.pending += 1,
            Phase::Updating | Phase::Swapping => self.updating += 1,
            Phase::Succeeded => self.succeeded += 1,
            Phase::Failed => self.failed += 1,
        }
    }

    pub fn total(&self) -> u32 {
        self.pending + self.updating + self.succeeded + self.failed
    }

    /// Counts per wave of `members`, for a rollout of `waves` waves.
    pub fn of<'m>(waves: usize, members: impl IntoIterator<Item = &'m Member>) -> Vec<WaveCounts> {
        let mut counts = vec![WaveCounts::default(); waves];
        for member in members {
            if let Some(wave) = counts.get_mut(member.wave as usize) {
                wave.add(member.phase);
            }
        }
        counts
    }
}

/// The next step of a rollout, by [`plan`].
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Pause by itself: too many of the active wave failed.
    Halt { reason: String },
    /// The active wave reached its success threshold now.
    WaveSucceeded,
    /// Start the next wave.
    Advance,
    /// Every wave is done: the application's firmware becomes the rollout's.
    Complete,
}

/// What an active rollout does next, given its waves' counts and the time (milliseconds since the
/// epoch); `None`: nothing yet (a wave updating, soaking, or waiting for approval).
pub fn plan(rollout: &Rollout, counts: &[WaveCounts], now: i64) -> Option<Step> {
    let progress = &rollout.progress;
    if progress.state != RolloutState::Active {
        return None;
    }
    let n = progress.wave as usize;
    let wave = rollout.spec.waves.get(n)?;
    let count = counts.get(n).copied().unwrap_or_default();
    let failed = count.failed.saturating_sub(progress.forgiven);
    let policy = &rollout.spec.failure;
    let too_many = policy.max_failures.is_some_and(|max| failed >= max);
    let too_high = policy
        .max_failure_rate
        .is_some_and(|rate| failed > 0 && f64::from(failed) * 100.0 >= rate * f64::from(count.total()));
    if too_many || too_high {
        return Some(Step::Halt {
            reason: format!(
                "wave {n}: {failed} of {} devices failed (limits: {}{})",
                count.total(),
                policy
                    .max_failure_rate
                    .map(|rate| format!("{rate}%"))
                    .unwrap_or_else(|| "no rate".into()),
                policy
                    .max_failures
                    .map(|max| format!(", {max} devices"))
                    .unwrap_or_default(),
            ),
        });
    }
    let Some(succeeded_at) = progress.wave_succeeded_at else {
        let successful =
            f64::from(count.succeeded) * 100.0 >= wave.success_threshold * f64::from(count.total());
        return successful.then_some(Step::WaveSucceeded);
    };
    let soaked = now.saturating_sub(succeeded_at) >= (wave.soak_seconds as i64).saturating_mul(1000);
    if !soaked {
        return None;
    }
    match rollout.spec.waves.get(n + 1) {
        None => Some(Step::Complete),
        Some(next) if next.approval == Approval::Auto => Some(Step::Advance),
        Some(_) => None,
    }
}

/// Whether the active wave is successful and soaked, and the next one waits for an approval.
pub fn awaiting_approval(rollout: &Rollout, now: i64) -> bool {
    let progress = &rollout.progress;
    let n = progress.wave as usize;
    let (Some(wave), Some(next), Some(at)) = (
        rollout.spec.waves.get(n),
        rollout.spec.waves.get(n + 1),
        progress.wave_succeeded_at,
    ) else {
        return false;
    };
    progress.state == RolloutState::Active
        && next.approval == Approval::Manual
        && now.saturating_sub(at) >= (wave.soak_seconds as i64).saturating_mul(1000)
}

/// The progress after `step`, taken at `now`.
pub fn apply(progress: &Progress, step: &Step, now: i64) -> Progress {
    let mut next = progress.clone();
    match step {
        Step::Halt { reason } => {
            next.state = RolloutState::Paused;
            next.reason = Some(reason.clone());
            next.halted = true;
        }
        Step::WaveSucceeded => next.wave_succeeded_at = Some(now),
        Step::Advance => {
            next.wave += 1;
            next.wave_since = now;
            next.wave_succeeded_at = None;
            next.forgiven = 0;
        }
        Step::Complete => {
            next.state = RolloutState::Completed;
            next.reason = Some("every wave succeeded".into());
        }
    }
    next
}

/// Why a device that rolled back failed: it was sent the whole image of `target` and came back
/// on `current` holding none of it.
pub fn rolled_back_reason(target: &str, current: &str) -> String {
    format!("sent the whole image of {target}, the device came back on {current} holding none of it (rolled back)")
}

/// A bandwidth budget: a token bucket holding at most a second of `rate` bytes, filled as time
/// passes. A block larger than a second's worth may go when the bucket is full, and leaves it in
/// debt, so every block size passes eventually and the rate holds on average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    tokens: f64,
    at: i64,
}

impl Budget {
    /// A full bucket at `now` (milliseconds).
    pub fn full(rate: u64, now: i64) -> Self {
        Self {
            tokens: rate as f64,
            at: now,
        }
    }

    /// Take `bytes` at `now` (milliseconds) if the budget of `rate` bytes per second allows.
    pub fn take(&mut self, rate: u64, bytes: u64, now: i64) -> bool {
        let capacity = rate as f64;
        let elapsed = now.saturating_sub(self.at).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * capacity).min(capacity);
        self.at = now.max(self.at);
        if self.tokens >= (bytes as f64).min(capacity) {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

/// A device's phase after a status write that told its history `events`, given its phase and
/// the version it was started toward; `None`: unchanged. A device not started (pending) or
/// finished (succeeded, failed) is not moved by its statuses: only [`choose`] starts it, and a
/// finished device stays finished in this rollout.
pub fn phase_after(
    phase: Phase,
    target: Option<&str>,
    events: &[HistoryEvent],
) -> Option<(Phase, Option<String>)> {
    if !phase.in_flight() {
        return None;
    }
    let target = target?;
    let mut now = None;
    for event in events.iter().filter(|event| event.target == target) {
        now = match event.kind {
            EventKind::Swapping => Some((Phase::Swapping, None)),
            EventKind::InSync if event.current == target => Some((Phase::Succeeded, None)),
            EventKind::Failed => {
                // Final in this rollout, whatever the same write tells after it.
                now = Some((Phase::Failed, event.reason.clone()));
                break;
            }
            EventKind::Started => Some((Phase::Updating, None)),
            _ => now,
        };
    }
    now.filter(|(next, _)| *next != phase)
}

#[cfg(test)]
mod tests;
