//! [`MemoryRegistry`]: a [`Registry`] in memory, for tests of the layers above the registry (the
//! update service, the Drogue integration) that need no database. It keeps the rules the SQL
//! registry keeps (names, optimistic locking on `resourceVersion`, `generation` bumped on spec
//! changes, an application's devices deleted with it) but stores passwords as given. It can be
//! made to fail, as a database outage would, and counts its calls.

use ajour_registry::{
    AppName, DeviceName, Key, LabelSelector, ListParams, Registry, RegistryError, Resource, Scope,
    StatusMerge,
};
use async_trait::async_trait;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryRegistry {
    objects: Mutex<BTreeMap<String, (Key, Resource)>>,
    down: AtomicBool,
    gets: AtomicU64,
    lists: AtomicU64,
    status_writes: AtomicU64,
}

/// Applications sort before their devices, devices by name.
fn sort_key(key: &Key) -> String {
    match key {
        Key::App(app) => format!("{app}/"),
        Key::Device(app, device) => format!("{app}/{device}"),
    }
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Store `spec` (a JSON object) under `key`, creating the object or replacing its spec.
    pub fn put(&self, key: &Key, spec: Value) {
        let mut objects = self.objects.lock().unwrap();
        let entry = objects.entry(sort_key(key)).or_insert_with(|| {
            let mut resource = Resource::default();
            resource.metadata.name = match key {
                Key::App(app) => app.to_string(),
                Key::Device(_, device) => device.to_string(),
            };
            resource.metadata.generation = 1;
            resource.metadata.resource_version = uuid::Uuid::new_v4().to_string();
            (key.clone(), resource)
        });
        entry.1.spec = spec.as_object().cloned().unwrap_or_default();
        entry.1.metadata.resource_version = uuid::Uuid::new_v4().to_string();
    }

    /// `status.{section}` of `key` as stored.
    pub fn status_section(&self, key: &Key, section: &str) -> Option<Value> {
        let objects = self.objects.lock().unwrap();
        objects.get(&sort_key(key))?.1.status.get(section).cloned()
    }

    /// Make every call fail (`true`), as a database that went away, or answer again (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// `get` calls so far.
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }

    /// `list` calls so far.
    pub fn lists(&self) -> u64 {
        self.lists.load(Ordering::SeqCst)
    }

    /// Status sections written so far.
    pub fn status_writes(&self) -> u64 {
        self.status_writes.load(Ordering::SeqCst)
    }

    fn available(&self) -> Result<(), RegistryError> {
        if self.down.load(Ordering::SeqCst) {
            Err(RegistryError::Remote(
                "the in-memory registry is down (set_down)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn create(&self, key: &Key, mut resource: Resource) -> Result<Resource, RegistryError> {
        self.available()?;
        let mut objects = self.objects.lock().unwrap();
        if let Key::Device(app, _) = key {
            if !objects.contains_key(&sort_key(&Key::App(app.clone()))) {
                return Err(RegistryError::NotFound(format!("application '{app}'")));
            }
        }
        if objects.contains_key(&sort_key(key)) {
            return Err(RegistryError::AlreadyExists(key.to_string()));
        }
        let m = &mut resource.metadata;
        m.application = match key {
            Key::App(_) => None,
            Key::Device(app, _) => Some(app.to_string()),
        };
        m.uid = uuid::Uuid::new_v4().to_string();
        m.generation = 1;
        m.resource_version = uuid::Uuid::new_v4().to_string();
        objects.insert(sort_key(key), (key.clone(), resource.clone()));
        Ok(resource)
    }

    async fn device_by_user(
        &self,
        app: &AppName,
        username: &str,
    ) -> Result<Option<DeviceName>, RegistryError> {
        self.available()?;
        let objects = self.objects.lock().unwrap();
        Ok(objects.values().find_map(|(key, resource)| match key {
            Key::Device(a, device)
                if a == app
                    && ajour_registry::unique_user_names(&resource.spec)
                        .iter()
                        .any(|u| u == username) =>
            {
                Some(device.clone())
            }
            _ => None,
        }))
    }

    async fn device_by_alias(&self, app: &AppName, alias: &str) -> Result<Option<DeviceName>, RegistryError> {
        self.available()?;
        let objects = self.objects.lock().unwrap();
        Ok(objects.values().find_map(|(key, resource)| match key {
            Key::Device(a, device)
                if a == app
                    && ajour_registry::device_aliases(&resource.spec)
                        .is_ok_and(|aliases| aliases.iter().any(|listed| listed == alias)) =>
            {
                Some(device.clone())
            }
            _ => None,
        }))
    }

    async fn get(&self, key: &Key) -> Result<Option<Resource>, RegistryError> {
        self.available()?;
        self.gets.fetch_add(1, Ordering::SeqCst);
        Ok(self
            .objects
            .lock()
            .unwrap()
            .get(&sort_key(key))
            .map(|(_, r)| r.clone()))
    }

    async fn list(&self, scope: &Scope, params: &ListParams) -> Result<Vec<Resource>, RegistryError> {
        self.available()?;
        self.lists.fetch_add(1, Ordering::SeqCst);
        let selector = LabelSelector::parse(params.labels.as_deref().unwrap_or_default())?;
        let objects = self.objects.lock().unwrap();
        Ok(objects
            .values()
            .filter(|(key, _)| match (scope, key) {
                (Scope::Apps, Key::App(_)) => true,
                (Scope::Devices(app), Key::Device(a, _)) => a == app,
                _ => false,
            })
            .filter(|(_, r)| selector.matches(&r.metadata.labels))
            .skip(params.offset.unwrap_or(0))
            .take(params.limit.unwrap_or(usize::MAX))
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn update(&self, key: &Key, mut resource: Resource) -> Result<Resource, RegistryError> {
        self.available()?;
        let mut objects = self.objects.lock().unwrap();
        let (_, current) = objects
            .get_mut(&sort_key(key))
            .ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
        let given = &resource.metadata;
        if (!given.resource_version.is_empty() && given.resource_version != current.metadata.resource_version)
            || (!given.uid.is_empty() && given.uid != current.metadata.uid)
        {
            return Err(RegistryError::Conflict);
        }
        let m = &mut resource.metadata;
        m.uid = current.metadata.uid.clone();
        m.application = current.metadata.application.clone();
        m.generation = current.metadata.generation + u64::from(resource.spec != current.spec);
        m.resource_version = uuid::Uuid::new_v4().to_string();
        *current = resource.clone();
        Ok(resource)
    }

    async fn delete(&self, key: &Key) -> Result<(), RegistryError> {
        self.available()?;
        let mut objects = self.objects.lock().unwrap();
        if objects.remove(&sort_key(key)).is_none() {
            return Err(RegistryError::NotFound(key.to_string()));
        }
        if let Key::App(app) = key {
            objects.retain(|_, (k, _)| k.app() != app);
        }
        Ok(())
    }

    async fn merge_status_section(
        &self,
        key: &Key,
        section: &str,
        merge: StatusMerge<'_>,
    ) -> Result<bool, RegistryError> {
        self.available()?;
        let mut objects = self.objects.lock().unwrap();
        let (_, resource) = objects
            .get_mut(&sort_key(key))
            .ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
        let Some(value) = merge(resource.status.get(section)) else {
            return Ok(false);
        };
        resource.status.insert(section.to_string(), value);
        resource.metadata.resource_version = uuid::Uuid::new_v4().to_string();
        self.status_writes.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }
}
