//! Ajour's own database beside a registry that is not Ajour's (Drogue's): devices and their
//! statuses stay in that registry, and each device's history and the rollouts are kept here.

use super::SqlRegistry;
use crate::{Change, Key, ListParams, RecordingMerge, Registry, RegistryError, Resource, Scope, StatusMerge};
use ajour_types::{HistoryEvent, RecordedEvent};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};

/// `registry` with its devices' histories kept in `own`. A status write goes to `registry`; what
/// the write told (its last attempt: the one that landed) is then recorded in `own`, in a
/// transaction of its own, so a crash between the two can lose that entry, never the status.
pub struct BesideRegistry {
    registry: Arc<dyn Registry>,
    own: Arc<SqlRegistry>,
}

impl BesideRegistry {
    pub fn new(registry: Arc<dyn Registry>, own: Arc<SqlRegistry>) -> Self {
        Self { registry, own }
    }
}

#[async_trait]
impl Registry for BesideRegistry {
    async fn create(&self, key: &Key, resource: Resource) -> Result<Resource, RegistryError> {
        self.registry.create(key, resource).await
    }
    async fn get(&self, key: &Key) -> Result<Option<Resource>, RegistryError> {
        self.registry.get(key).await
    }
    async fn list(&self, scope: &Scope, params: &ListParams) -> Result<Vec<Resource>, RegistryError> {
        self.registry.list(scope, params).await
    }
    async fn update(&self, key: &Key, resource: Resource) -> Result<Resource, RegistryError> {
        self.registry.update(key, resource).await
    }
    /// The object's history and rollout entries go with it.
    async fn delete(&self, key: &Key) -> Result<(), RegistryError> {
        self.registry.delete(key).await?;
        self.own.forget(key).await
    }
    async fn merge_status_section(
        &self,
        key: &Key,
        section: &str,
        merge: StatusMerge<'_>,
    ) -> Result<bool, RegistryError> {
        self.registry.merge_status_section(key, section, merge).await
    }

    async fn merge_status_recording(
        &self,
        key: &Key,
        section: &str,
        merge: RecordingMerge<'_>,
    ) -> Result<bool, RegistryError> {
        let told: Mutex<Vec<HistoryEvent>> = Mutex::default();
        let wrote = self
            .registry
            .merge_status_section(key, section, &|stored| {
                let (value, events) = merge(stored)?;
                *told.lock().unwrap() = events;
                Some(value)
            })
            .await?;
        if let (true, Key::Device(app, device)) = (wrote, key) {
            let events = std::mem::take(&mut *told.lock().unwrap());
            self.own.record(app, device, events).await?;
        }
        Ok(wrote)
    }

    async fn history(&self, key: &Key, limit: u32) -> Result<Option<Vec<RecordedEvent>>, RegistryError> {
        let Key::Device(app, device) = key else {
            return Err(RegistryError::Invalid("only devices have a history".into()));
        };
        if self.registry.get(key).await?.is_none() {
            return Err(RegistryError::NotFound(key.to_string()));
        }
        self.own.history_of(app, device, limit).await.map(Some)
    }

    async fn device_by_user(
        &self,
        app: &crate::AppName,
        username: &str,
    ) -> Result<Option<crate::DeviceName>, RegistryError> {
        self.registry.device_by_user(app, username).await
    }
    async fn device_by_alias(
        &self,
        app: &crate::AppName,
        alias: &str,
    ) -> Result<Option<crate::DeviceName>, RegistryError> {
        self.registry.device_by_alias(app, alias).await
    }
    async fn changes(&self) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<Change>>, RegistryError> {
        self.registry.changes().await
    }
    fn shared(&self) -> bool {
        self.registry.shared()
    }
    async fn ping(&self) -> Result<(), RegistryError> {
        self.registry.ping().await
    }
}
