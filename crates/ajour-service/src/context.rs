//! What the service needs to know about a device, read from the registry and reused for a short
//! while: a device sends one status per block, and reading two objects from the database for each
//! would make the database the bottleneck.

use ajour_registry::{
    AppName, Change, DeviceCredentials, DeviceName, Key, ListParams, Registry, RegistryError, Resource, Scope,
};
use ajour_store::FirmwareSpec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// A device's firmware and credentials, resolved.
#[derive(Debug)]
pub(crate) struct DeviceContext {
    /// The firmware to run: the device's section over the application's; `None` when neither has
    /// one (the device is not managed); `Err` when the applicable section is malformed.
    pub firmware: Result<Option<FirmwareSpec>, String>,
    /// The device's password credentials and the verifiers derived from them.
    pub credentials: DeviceCredentials,
    /// `device@app`, as firmware sources name the device (made once here, not per status).
    pub name: String,
    /// Whether the firmware is the device's own `spec.firmware` (then no rollout applies to it).
    pub own_firmware: bool,
    /// The application's `spec.firmware` as stored: a rollout applies while it is the one the
    /// rollout started from.
    pub application_firmware: Option<serde_json::Value>,
    /// The device's labels (rollouts select devices by them).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The devices that may act for this one (Drogue's `spec.gatewaySelector.matchNames`).
    pub gateways: Vec<String>,
}

/// From this many cached devices of one application, expired contexts are read again all at once:
/// one list of the application's devices instead of a read per device. With 10,000 devices and
/// the 5 s TTL, reads one by one are 2,000 requests a second to the registry (Drogue's, over
/// HTTP, in Drogue mode); one list every TTL is what the registry can carry.
const BATCH_REFRESH_MIN: usize = 32;

/// Cached contexts, and how many of each application's devices are among them.
#[derive(Default)]
struct Entries {
    by_key: HashMap<Key, (Instant, Arc<DeviceContext>)>,
    per_app: HashMap<AppName, usize>,
}

impl Entries {
    fn insert(&mut self, key: Key, at: Instant, context: Arc<DeviceContext>) {
        let app = key.app().clone();
        if self.by_key.insert(key, (at, context)).is_none() {
            *self.per_app.entry(app).or_default() += 1;
        }
    }

    fn remove(&mut self, key: &Key) {
        if self.by_key.remove(key).is_some() {
            if let Some(count) = self.per_app.get_mut(key.app()) {
                *count = count.saturating_sub(1);
            }
        }
    }

    fn remove_app(&mut self, app: &AppName) {
        self.by_key.retain(|k, _| k.app() != app);
        self.per_app.remove(app);
    }
}

pub(crate) struct ContextCache {
    ttl: Duration,
    entries: RwLock<Entries>,
    /// Applications apart: one read serves all of an application's devices.
    applications: RwLock<HashMap<AppName, (Instant, Arc<Resource>)>>,
    /// One batch refresh at a time: the requests that find their context expired together wait
    /// for one list rather than each making its own.
    refreshing: tokio::sync::Mutex<()>,
    /// Changes announced by the registry and followed so far.
    followed: std::sync::atomic::AtomicU64,
    /// Whether the registry could not be read, last time it was tried.
    outage: Outage,
}

/// Whether the registry is down, and whether a request is trying it again: while it is down, one
/// request at a time finds out (and waits for the database's timeout), not all of them.
#[derive(Default)]
struct Outage {
    /// Why the last read failed, while it is the last word.
    down: std::sync::Mutex<Option<String>>,
    probing: Arc<AtomicBool>,
}

/// Held by the one request trying a registry that was down; lets the next one try on drop.
struct Probe(Arc<AtomicBool>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Outage {
    /// `Ok` when this request may read the registry: it is up (nothing held), or it is down and
    /// no other request is trying it (the probe is held until dropped). Down and another request
    /// trying: why it is down.
    fn probe(&self) -> Result<Option<Probe>, RegistryError> {
        let Some(why) = self.down.lock().unwrap().clone() else {
            return Ok(None);
        };
        if self.probing.swap(true, Ordering::AcqRel) {
            return Err(RegistryError::Database(why.into()));
        }
        Ok(Some(Probe(self.probing.clone())))
    }

    fn began(&self, error: &RegistryError) {
        *self.down.lock().unwrap() = Some(error.to_string());
    }

    fn ended(&self) {
        let mut down = self.down.lock().unwrap();
        if down.is_some() {
            *down = None;
        }
    }
}

impl ContextCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::default(),
            applications: RwLock::default(),
            refreshing: tokio::sync::Mutex::new(()),
            followed: std::sync::atomic::AtomicU64::new(0),
            outage: Outage::default(),
        }
    }

    /// The cached context of `key` if it was stored at or after `since` and is within the TTL
    /// (or was stored at or after `since`, by a refresh this request waited for).
    fn cached(&self, key: &Key, since: Option<Instant>) -> Option<Arc<DeviceContext>> {
        let entries = self.entries.read().unwrap();
        let (at, context) = entries.by_key.get(key)?;
        let fresh = at.elapsed() < self.ttl || since.is_some_and(|since| *at >= since);
        fresh.then(|| context.clone())
    }

    /// The context of device `key`; `None` when the device (or its application) does not exist.
    /// Only existing devices are cached, so names sent by strangers take no memory.
    pub async fn get(
        &self,
        registry: &dyn Registry,
        key: &Key,
    ) -> Result<Option<Arc<DeviceContext>>, RegistryError> {
        let asked = Instant::now();
        if let Some(context) = self.cached(key, None) {
            return Ok(Some(context));
        }
        // While the registry is down, one request at a time finds out whether it still is; the
        // others get its error at once rather than each waiting for the database's timeout.
        let _probe = self.outage.probe()?;
        let result = self.read(registry, key, asked).await;
        match &result {
            Err(error @ (RegistryError::Database(_) | RegistryError::Remote(_))) => self.outage.began(error),
            _ => self.outage.ended(),
        }
        result
    }

    /// The context of `key` as last read, however long ago: while the registry is down, what
    /// says whether a device is who it claims to be.
    pub fn last_read(&self, key: &Key) -> Option<Arc<DeviceContext>> {
        let entries = self.entries.read().unwrap();
        entries.by_key.get(key).map(|(_, context)| context.clone())
    }

    /// Read the context of `key` from the registry and cache it.
    async fn read(
        &self,
        registry: &dyn Registry,
        key: &Key,
        asked: Instant,
    ) -> Result<Option<Arc<DeviceContext>>, RegistryError> {
        let Key::Device(app, _) = key else {
            return Ok(None);
        };
        let expired_among_many = {
            let entries = self.entries.read().unwrap();
            entries.by_key.contains_key(key)
                && entries.per_app.get(app).copied().unwrap_or(0) >= BATCH_REFRESH_MIN
        };
        if expired_among_many {
            let _refreshing = self.refreshing.lock().await;
            // Refreshed while this request waited?
            if let Some(context) = self.cached(key, Some(asked)) {
                return Ok(Some(context));
            }
            self.refresh_application(registry, app).await?;
            if let Some(context) = self.cached(key, Some(asked)) {
                return Ok(Some(context));
            }
            // Not listed: deleted (the read below says so) or created meanwhile.
        }
        let Some(device) = registry.get(key).await? else {
            self.entries.write().unwrap().remove(key);
            return Ok(None);
        };
        let Some(application) = self.application(registry, app).await? else {
            return Ok(None);
        };
        let context = Arc::new(resolve(key, &device, &application));
        self.entries
            .write()
            .unwrap()
            .insert(key.clone(), Instant::now(), context.clone());
        Ok(Some(context))
    }

    /// Read every cached device of `app` again with one list of its devices; devices no longer
    /// listed are forgotten.
    async fn refresh_application(&self, registry: &dyn Registry, app: &AppName) -> Result<(), RegistryError> {
        let Some(application) = self.application(registry, app).await? else {
            self.entries.write().unwrap().remove_app(app);
            return Ok(());
        };
        let devices = registry
            .list(&Scope::Devices(app.clone()), &ListParams::default())
            .await?;
        let now = Instant::now();
        let mut entries = self.entries.write().unwrap();
        let mut listed = std::collections::HashSet::with_capacity(devices.len());
        for device in &devices {
            let Ok(name) = DeviceName::parse(&device.metadata.name) else {
                continue;
            };
            let key = Key::Device(app.clone(), name);
            if entries.by_key.contains_key(&key) {
                let context = Arc::new(resolve(&key, device, &application));
                entries.insert(key.clone(), now, context);
            }
            listed.insert(key);
        }
        let gone: Vec<Key> = entries
            .by_key
            .keys()
            .filter(|k| k.app() == app && !listed.contains(*k))
            .cloned()
            .collect();
        for key in &gone {
            entries.remove(key);
        }
        Ok(())
    }

    async fn application(
        &self,
        registry: &dyn Registry,
        app: &AppName,
    ) -> Result<Option<Arc<Resource>>, RegistryError> {
        if let Some((at, application)) = self.applications.read().unwrap().get(app) {
            if at.elapsed() < self.ttl {
                return Ok(Some(application.clone()));
            }
        }
        let Some(application) = registry.get(&Key::App(app.clone())).await? else {
            return Ok(None);
        };
        let application = Arc::new(application);
        self.applications
            .write()
            .unwrap()
            .insert(app.clone(), (Instant::now(), application.clone()));
        Ok(Some(application))
    }

    pub fn invalidate_all(&self) {
        *self.entries.write().unwrap() = Entries::default();
        self.applications.write().unwrap().clear();
    }

    pub fn invalidate(&self, key: &Key) {
        let mut entries = self.entries.write().unwrap();
        match key {
            Key::Device(..) => entries.remove(key),
            Key::App(app) => {
                entries.remove_app(app);
                self.applications.write().unwrap().remove(app);
            }
        }
    }
}

fn resolve(key: &Key, device: &Resource, application: &Resource) -> DeviceContext {
    // A device section that fails to parse is an error, not a fall-through to the application's:
    // silently serving the application's firmware to a device meant to differ would be worse.
    let firmware = match (device.spec.get("firmware"), application.spec.get("firmware")) {
        (Some(section), _) | (None, Some(section)) => FirmwareSpec::from_json(section)
            .map(Some)
            .map_err(|e| e.to_string()),
        (None, None) => Ok(None),
    };
    let (credentials, name) = match key {
        Key::Device(app, name) => (
            DeviceCredentials::from_device(app, name, &device.spec, &device.status),
            format!("{name}@{app}"),
        ),
        Key::App(app) => (DeviceCredentials::default(), app.to_string()),
    };
    DeviceContext {
        firmware,
        credentials,
        name,
        own_firmware: device.spec.contains_key("firmware"),
        application_firmware: application.spec.get("firmware").cloned(),
        labels: device.metadata.labels.clone(),
        gateways: device
            .spec
            .get("gatewaySelector")
            .and_then(|selector| selector.get("matchNames"))
            .and_then(serde_json::Value::as_array)
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| n.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

// Here rather than in lib.rs: it is about the cache, and this module may reach the service's
// private fields (it is a child of the crate root).
impl crate::UpdateService {
    /// Forget cached contexts as the registry reports writes by any instance: specs and
    /// credentials changed through another instance sharing the database are then seen within
    /// milliseconds, not only after `spec_cache_ttl`. This starts listening (so that no write
    /// after it returns is missed) and returns the loop to run for the server's life; `None` for
    /// a registry that cannot report changes (SQLite, Drogue's).
    pub async fn follow_registry_changes(
        self: &Arc<Self>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let mut changes = match self.registry.changes().await {
            Ok(Some(changes)) => changes,
            Ok(None) => return None,
            Err(error) => {
                tracing::warn!(%error, "cannot follow registry changes; cached specs expire after --spec-cache-ms");
                return None;
            }
        };
        let service = self.clone();
        Some(async move {
            while let Some(change) = changes.recv().await {
                match change {
                    Change::Object(key) => service.contexts.invalidate(&key),
                    Change::Everything => service.contexts.invalidate_all(),
                }
                service
                    .contexts
                    .followed
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    }

    /// Changes announced by the registry and applied to the cache so far (tests wait on it: a
    /// write's announcement arrives a moment after the write).
    pub fn registry_changes_followed(&self) -> u64 {
        self.contexts.followed.load(std::sync::atomic::Ordering::SeqCst)
    }
}
