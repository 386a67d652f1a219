//! Counts calls to any registry backend (`ajour_registry_calls_total{op, outcome}`), so the cost of
//! the registry per device update can be watched in production, whatever the backend.

use crate::{
    AppName, Change, DeviceName, Key, ListParams, RecordingMerge, Registry, RegistryError, Resource, Scope,
    StatusMerge,
};
use ajour_types::RecordedEvent;
use async_trait::async_trait;
use std::sync::Arc;

/// A registry that counts the calls made to the one it wraps.
pub struct MeteredRegistry {
    inner: Arc<dyn Registry>,
}

impl MeteredRegistry {
    pub fn new(inner: Arc<dyn Registry>) -> Self {
        Self { inner }
    }
}

fn count<T>(op: &'static str, result: &Result<T, RegistryError>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(RegistryError::NotFound(_)) => "not_found",
        Err(RegistryError::Conflict) | Err(RegistryError::AlreadyExists(_)) => "conflict",
        Err(RegistryError::Invalid(_)) => "invalid",
        Err(_) => "error",
    };
    metrics::counter!("ajour_registry_calls_total", "op" => op, "outcome" => outcome).increment(1);
}

#[async_trait]
impl Registry for MeteredRegistry {
    async fn create(&self, key: &Key, resource: Resource) -> Result<Resource, RegistryError> {
        let result = self.inner.create(key, resource).await;
        count("create", &result);
        result
    }

    async fn get(&self, key: &Key) -> Result<Option<Resource>, RegistryError> {
        let result = self.inner.get(key).await;
        count("get", &result);
        result
    }

    async fn list(&self, scope: &Scope, params: &ListParams) -> Result<Vec<Resource>, RegistryError> {
        let result = self.inner.list(scope, params).await;
        count("list", &result);
        result
    }

    async fn update(&self, key: &Key, resource: Resource) -> Result<Resource, RegistryError> {
        let result = self.inner.update(key, resource).await;
        count("update", &result);
        result
    }

    async fn delete(&self, key: &Key) -> Result<(), RegistryError> {
        let result = self.inner.delete(key).await;
        count("delete", &result);
        result
    }

    async fn merge_status_section(
        &self,
        key: &Key,
        section: &str,
        merge: StatusMerge<'_>,
    ) -> Result<bool, RegistryError> {
        let result = self.inner.merge_status_section(key, section, merge).await;
        count("set_status", &result);
        result
    }

    async fn merge_status_recording(
        &self,
        key: &Key,
        section: &str,
        merge: RecordingMerge<'_>,
    ) -> Result<bool, RegistryError> {
        let result = self.inner.merge_status_recording(key, section, merge).await;
        count("set_status", &result);
        result
    }

    async fn history(&self, key: &Key, limit: u32) -> Result<Option<Vec<RecordedEvent>>, RegistryError> {
        let result = self.inner.history(key, limit).await;
        count("history", &result);
        result
    }

    async fn device_by_user(
        &self,
        app: &AppName,
        username: &str,
    ) -> Result<Option<DeviceName>, RegistryError> {
        let result = self.inner.device_by_user(app, username).await;
        count("get", &result);
        result
    }

    async fn device_by_alias(&self, app: &AppName, alias: &str) -> Result<Option<DeviceName>, RegistryError> {
        let result = self.inner.device_by_alias(app, alias).await;
        count("get", &result);
        result
    }

    async fn changes(&self) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<Change>>, RegistryError> {
        self.inner.changes().await
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        self.inner.ping().await
    }
}
