//! `status.firmware` of each device, kept current without a database write per block.
//!
//! Every status a device sends updates the device's entry here. A change of phase (in sync,
//! updating, failing; or a new current or target version) is written to the registry at once.
//! Progress within an update is written at most once per interval, and only when it advanced by at
//! least a step (20 percentage points by default) or the device has gone quiet for an interval: so
//! a whole update costs a handful of writes however large the image and however slow the device.
//! Writes run beside the request, not in it: the device gets its command without waiting for the
//! database. Writes for one device are serialised and always write the newest state, so a late
//! progress write can never overwrite the final "in sync"; until a state is written, the API shows
//! it from here. Across instances (several sharing one registry) the same holds through the
//! registry's read-and-write step: a write that would turn a device shown in sync since t1 back to
//! "updating" as seen before t1 is dropped ([`ajour_types::FirmwareReport::is_late_over`]). The same
//! step tells the device's history what changed ([`ajour_types::events_between`]), on registries
//! that keep one.

use ajour_registry::{Key, Registry, RegistryError};
use ajour_types::{events_between, FirmwareReport, FirmwareState, FirmwareStatus};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// What an instance knows of what it sent a device, from [`StatusTracker::sent`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Whether the image it last recorded sending the device toward this version is this very
    /// one; `None` when it recorded nothing of the kind (another instance may have).
    pub same_image: Option<bool>,
    /// Swaps sent for this very image since the device last synced.
    pub swaps: u32,
}

/// A device that sent nothing for this long (or the progress interval, if longer) has stopped.
const QUIET_AFTER: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Tracked {
    /// The newest status recorded.
    latest: Option<FirmwareStatus>,
    /// The newest status known to be in the registry.
    written: Option<FirmwareStatus>,
    /// The newest status handed to a writer (written, or being written).
    started: Option<FirmwareStatus>,
    /// `latest` has not been handed to a writer yet.
    dirty: bool,
    /// When the last write started.
    last_write: Option<Instant>,
    /// When the last status was recorded.
    last_record: Option<Instant>,
    /// The newest report rendered: its conditions' times carry over to the next one, so
    /// `lastTransitionTime` moves only when a condition changes.
    report: Option<FirmwareReport>,
    /// Swaps sent for one image (its digest) since the device last synced.
    swaps: Option<(String, u32)>,
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Tracked {
    fn render(&mut self, status: &FirmwareStatus) -> FirmwareReport {
        let report = FirmwareReport::observe(self.report.as_ref(), status.clone(), chrono::Utc::now());
        self.report = Some(report.clone());
        report
    }

    fn due(&self, interval: Duration) -> bool {
        self.last_write.map(|at| at.elapsed() >= interval).unwrap_or(true)
    }

    /// Progress moved at least `step` points since the last write started.
    fn advanced(&self, step: f64) -> bool {
        let percent = |s: &Option<FirmwareStatus>| s.as_ref().and_then(FirmwareStatus::percent);
        match (percent(&self.latest), percent(&self.started)) {
            (Some(latest), Some(started)) => latest - started >= step,
            _ => true,
        }
    }

    /// No status for an interval (and at least [`QUIET_AFTER`]): write where the device stopped,
    /// however little it moved.
    fn quiet(&self, interval: Duration) -> bool {
        let interval = interval.max(QUIET_AFTER);
        self.last_record
            .map(|at| at.elapsed() >= interval)
            .unwrap_or(true)
    }
}

/// Device firmware status, recorded on every status and written to the registry when due.
pub(crate) struct StatusTracker {
    inner: Arc<Inner>,
    writers: TaskTracker,
}

struct Inner {
    registry: Arc<dyn Registry>,
    interval: Duration,
    step: f64,
    devices: Mutex<HashMap<Key, Tracked>>,
    writes: AtomicU64,
    /// Writes rendering their JSON and in the registry's hands at once. When a whole fleet
    /// starts updating together, each device's phase change is a write; without a bound every
    /// one of them would render its report and wait for a database connection holding it
    /// (about 3 KiB each: 35 MiB of 175 at 10,000 devices, docs/benchmarks.md). Waiting here,
    /// before rendering, a write holds only its key, and renders the newest status when its
    /// turn comes.
    write_slots: tokio::sync::Semaphore,
}

/// [`Inner::write_slots`]: well above any database pool Ajour opens (8 connections by default).
const WRITE_SLOTS: usize = 64;

impl StatusTracker {
    /// Progress is written at most once per `interval`, when it advanced `step` percentage points.
    pub fn new(registry: Arc<dyn Registry>, interval: Duration, step: f64) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry,
                interval,
                step,
                devices: Mutex::default(),
                writes: AtomicU64::new(0),
                write_slots: tokio::sync::Semaphore::new(WRITE_SLOTS),
            }),
            writers: TaskTracker::new(),
        }
    }

    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    /// Note the device's status; start writing it when its phase changed or the interval passed.
    /// The write runs beside the caller; its handle, for a caller that must know it landed.
    pub fn record(&self, key: &Key, status: FirmwareStatus) -> Option<tokio::task::JoinHandle<()>> {
        self.record_then(key, status, false)
    }

    /// [`Self::record`], written at once as a change of phase would be, unless it is what was
    /// recorded last.
    pub fn record_now(&self, key: &Key, status: FirmwareStatus) -> Option<tokio::task::JoinHandle<()>> {
        self.record_then(key, status, true)
    }

    fn record_then(
        &self,
        key: &Key,
        status: FirmwareStatus,
        now: bool,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let write_now = {
            let mut devices = self.inner.devices.lock().unwrap();
            let tracked = match devices.get_mut(key) {
                Some(tracked) => tracked,
                None => devices.entry(key.clone()).or_default(),
            };
            if tracked.latest.as_ref() == Some(&status) {
                return None;
            }
            let phase_changed = now
                || tracked
                    .latest
                    .as_ref()
                    .is_none_or(|latest| !latest.same_phase(&status));
            if status.state == FirmwareState::InSync {
                tracked.swaps = None;
            }
            tracked.latest = Some(status);
            tracked.dirty = true;
            tracked.last_record = Some(Instant::now());
            let write_now =
                phase_changed || (tracked.due(self.inner.interval) && tracked.advanced(self.inner.step));
            if write_now {
                // Counted from the start of a write, so statuses arriving while it runs wait for
                // the interval instead of starting more writes.
                tracked.last_write = Some(Instant::now());
                tracked.started = tracked.latest.clone();
            }
            write_now
        };
        write_now.then(|| {
            let write = self.inner.clone().write_latest(key.clone());
            self.writers.spawn(write.instrument(crate::device_span(key)))
        })
    }

    /// What this instance knows of sending the device the image `digest` of version `target`, in
    /// one look (this is asked for every status).
    pub fn sent(&self, key: &Key, target: &str, digest: &str) -> Sent {
        let devices = self.inner.devices.lock().unwrap();
        let Some(tracked) = devices.get(key) else {
            return Sent::default();
        };
        let same_image = tracked
            .latest
            .as_ref()
            .filter(|latest| latest.target == target)
            .and_then(|latest| latest.target_digest.as_deref())
            .map(|sent| sent == digest);
        let swaps = match &tracked.swaps {
            Some((swapped, count)) if swapped == digest => *count,
            _ => 0,
        };
        Sent { same_image, swaps }
    }

    /// Note one more Swap sent for the image `digest`.
    pub fn count_swap(&self, key: &Key, digest: &str) {
        let mut devices = self.inner.devices.lock().unwrap();
        let tracked = devices.entry(key.clone()).or_default();
        match &mut tracked.swaps {
            Some((swapped, count)) if swapped == digest => *count += 1,
            swaps => *swaps = Some((digest.to_string(), 1)),
        }
    }

    /// The device's newest status when the registry does not have it yet, as JSON.
    pub fn pending_json(&self, key: &Key) -> Option<Value> {
        let mut devices = self.inner.devices.lock().unwrap();
        let tracked = devices.get_mut(key)?;
        let latest = tracked.latest.clone()?;
        (tracked.written.as_ref() != Some(&latest)).then(|| tracked.render(&latest).to_json())
    }

    /// [`Self::pending_json`] for every device of `app` that has one, by device name.
    pub fn pending_of_app(&self, app: &ajour_types::AppName) -> HashMap<String, Value> {
        let mut devices = self.inner.devices.lock().unwrap();
        devices
            .iter_mut()
            .filter_map(|(key, tracked)| match key {
                Key::Device(a, device) if a == app => {
                    let latest = tracked.latest.clone()?;
                    (tracked.written.as_ref() != Some(&latest))
                        .then(|| (device.to_string(), tracked.render(&latest).to_json()))
                }
                _ => None,
            })
            .collect()
    }

    /// Write progress that is due (all of it when `force`), and wait for writes in flight.
    pub async fn flush(&self, force: bool) {
        let due: Vec<Key> = {
            let devices = self.inner.devices.lock().unwrap();
            devices
                .iter()
                .filter(|(_, t)| {
                    t.dirty
                        && (force
                            || (t.due(self.inner.interval)
                                && (t.advanced(self.inner.step) || t.quiet(self.inner.interval))))
                })
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in due {
            let span = crate::device_span(&key);
            self.inner.clone().write_latest(key).instrument(span).await;
        }
        if force {
            self.settle().await;
        }
    }

    /// Wait until the writes started so far have finished.
    pub async fn settle(&self) {
        self.writers.close();
        self.writers.wait().await;
        self.writers.reopen();
    }
}

impl Inner {
    /// Write the newest status of `key`, one write at a time per device.
    async fn write_latest(self: Arc<Self>, key: Key) {
        let Some(lock) = self
            .devices
            .lock()
            .unwrap()
            .get(&key)
            .map(|t| t.write_lock.clone())
        else {
            return;
        };
        let _writing = lock.lock().await;
        // Never closed, so acquiring cannot fail.
        let Ok(_slot) = self.write_slots.acquire().await else {
            return;
        };
        let (status, report) = {
            let mut devices = self.devices.lock().unwrap();
            let Some(tracked) = devices.get_mut(&key) else {
                return;
            };
            let Some(status) = tracked.latest.clone().filter(|_| tracked.dirty) else {
                return;
            };
            tracked.dirty = false;
            tracked.last_write = Some(Instant::now());
            tracked.started = Some(status.clone());
            let report = tracked.render(&status);
            (status, report)
        };
        let value = report.to_json();
        // The rule that holds for every backend and any number of instances: a late, older
        // observation never turns a device shown in sync back to updating.
        let newer = Mutex::new(None);
        // What the device's history tells is the change from what is stored to what is written,
        // seen here, in the registry's read-and-write step: once, whichever instance writes.
        let merge = |stored: Option<&Value>| match stored.map(FirmwareReport::from_json) {
            Some(Ok(stored)) if report.is_late_over(&stored) => {
                *newer.lock().unwrap() = Some(stored);
                None
            }
            Some(Ok(stored)) => Some((value.clone(), events_between(Some(&stored.status), &status))),
            _ => Some((value.clone(), events_between(None, &status))),
        };
        let result = self
            .registry
            .merge_status_recording(&key, "firmware", &merge)
            .await;
        let mut devices = self.devices.lock().unwrap();
        match result {
            Ok(true) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                if let Some(tracked) = devices.get_mut(&key) {
                    tracked.written = Some(status);
                }
            }
            Ok(false) => {
                tracing::debug!(%key, "dropping a late firmware status: the device was seen in sync since");
                metrics::counter!("ajour_late_status_writes_total").increment(1);
                // What the registry has is newer than what this instance saw: take it as this
                // instance's view, so the API shows it and the device's next status here is
                // compared with it (a device seen updating again after that is a new phase).
                let newer = newer.into_inner().unwrap();
                if let (Some(tracked), Some(newer)) = (devices.get_mut(&key), newer) {
                    if tracked.latest.as_ref() == Some(&status) {
                        tracked.latest = Some(newer.status.clone());
                        tracked.written = Some(newer.status.clone());
                        tracked.started = Some(newer.status.clone());
                        tracked.dirty = false;
                        tracked.report = Some(newer);
                    }
                }
            }
            Err(RegistryError::NotFound(_)) => {
                devices.remove(&key);
            }
            Err(error) => {
                crate::warn_throttled!(crate::LOG_INTERVAL, %key, %error, "writing firmware status failed; will retry");
                if let Some(tracked) = devices.get_mut(&key) {
                    tracked.dirty = true;
                    tracked.last_write = Some(Instant::now());
                }
            }
        }
    }
}
