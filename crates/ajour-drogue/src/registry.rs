//! [`DrogueRegistry`]: Drogue Cloud's device registry (`/api/registry/v1alpha1`) over HTTP, as an
//! [`ajour_registry::Registry`], so the update service reads specs from and writes
//! `status.firmware` to Drogue instead of its own database.
//!
//! Reads are not cached here: the update service already reuses a device's context for a bounded
//! time and coalesces status writes, so this client makes plain REST calls. A status write is a PUT
//! of the object as read, with only `status.{section}` replaced and the `resourceVersion` kept, so
//! Drogue's optimistic locking turns a concurrent change into a 409, on which the write is redone
//! on a fresh read: nothing another writer changed is lost.
//!
//! The object a write starts from is the one the last [`Registry::get`] of that device returned,
//! when it is recent and no write through this client came since (the update service reads a
//! device's context, then writes its status: the read just made is as good as a new one);
//! otherwise it is read again. Should it be out of date after all, the registry refuses the write
//! (409) and it is redone on a fresh read, as any conflict is: a write never rests on anything
//! but the object as the registry has it.

use crate::DrogueError;
use ajour_client::registry::Answer;
use ajour_client::{RegistryClient, RegistryClientConfig};
use ajour_registry::{Key, ListParams, Registry, RegistryError, Resource, Scope, StatusMerge};
use async_trait::async_trait;
use rand::Rng;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a status write is redone after a 409 before giving up (it is retried by the
/// status writer later anyway).
const CONFLICT_RETRIES: u32 = 16;

/// How long an object read stays the starting point of a status write.
const RECENT: Duration = Duration::from_secs(10);

/// Objects read kept at most; past that, the older ones are forgotten.
const RECENT_MAX: usize = 100_000;

/// Drogue's device registry, over HTTP.
#[derive(Debug)]
pub struct DrogueRegistry {
    client: RegistryClient,
    conflicts: AtomicU64,
    /// Each device's object as the last read returned it (the body as received), and when.
    recent: Mutex<HashMap<Key, (Instant, bytes::Bytes)>>,
}

impl DrogueRegistry {
    pub fn new(config: &RegistryClientConfig) -> Result<Self, DrogueError> {
        Ok(Self {
            client: RegistryClient::new(config)?,
            conflicts: AtomicU64::new(0),
            recent: Mutex::default(),
        })
    }

    /// Keep `body`, the object of device `key` as just read, for a status write to start from.
    fn remember(&self, key: &Key, body: bytes::Bytes) {
        let mut recent = self.recent.lock().unwrap();
        if recent.len() >= RECENT_MAX {
            recent.retain(|_, (at, _)| at.elapsed() < RECENT);
            if recent.len() >= RECENT_MAX {
                recent.clear();
            }
        }
        recent.insert(key.clone(), (Instant::now(), body));
    }

    /// The object of `key` as recently read, if no write came since; taken, as the write about to
    /// be made changes it.
    fn take_recent(&self, key: &Key) -> Option<bytes::Bytes> {
        let (at, body) = self.recent.lock().unwrap().remove(key)?;
        (at.elapsed() < RECENT).then_some(body)
    }

    fn forget(&self, key: &Key) {
        self.recent.lock().unwrap().remove(key);
    }

    /// 409s met (and retried) by status writes so far.
    pub fn conflicts_retried(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    fn collection_url(&self, scope: &Scope) -> Url {
        match scope {
            Scope::Apps => self.client.url(&["apps"]),
            Scope::Devices(app) => self.client.url(&["apps", app.as_str(), "devices"]),
        }
    }

    /// Send a request; a request that got no answer is a [`RegistryError::Remote`].
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Answer, RegistryError> {
        self.client
            .send(method, url, body)
            .await
            .map_err(|e| RegistryError::Remote(format!("{what}: {e}")))
    }

    /// The object as Drogue has it, untyped, so a write-back keeps fields Ajour does not model.
    async fn get_raw(&self, key: &Key) -> Result<Option<Value>, RegistryError> {
        let what = format!("GET {key}");
        let answer = self
            .send(Method::GET, self.client.object_url(key), None, &what)
            .await?;
        match answer.status {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => answer
                .json()
                .map(Some)
                .map_err(|e| RegistryError::Remote(format!("{what}: {e}"))),
            _ => Err(failure(key, &answer, &what)),
        }
    }
}

/// Map an unsuccessful answer to the registry's error kinds, as Ajour's API maps them back.
fn failure(key: &Key, answer: &Answer, what: &str) -> RegistryError {
    let (error, message) = answer.error();
    match answer.status {
        StatusCode::NOT_FOUND => RegistryError::NotFound(key.to_string()),
        StatusCode::CONFLICT if error == "AlreadyExists" => RegistryError::AlreadyExists(key.to_string()),
        StatusCode::CONFLICT => RegistryError::Conflict,
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => RegistryError::Invalid(message),
        status => RegistryError::Remote(format!("{what}: {status}: {}", message.trim())),
    }
}

#[async_trait]
impl Registry for DrogueRegistry {
    async fn create(&self, key: &Key, resource: Resource) -> Result<Resource, RegistryError> {
        let scope = match key {
            Key::App(_) => Scope::Apps,
            Key::Device(app, _) => Scope::Devices(app.clone()),
        };
        let what = format!("POST {key}");
        let body = serde_json::to_value(&resource).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let answer = self
            .send(Method::POST, self.collection_url(&scope), Some(&body), &what)
            .await?;
        if !answer.status.is_success() {
            return Err(failure(key, &answer, &what));
        }
        // Drogue answers 201 with no body; Ajour with the object. Either way, return what is stored.
        match serde_json::from_slice::<Resource>(&answer.body) {
            Ok(created) => Ok(created),
            Err(_) => self
                .get(key)
                .await?
                .ok_or_else(|| RegistryError::NotFound(key.to_string())),
        }
    }

    async fn get(&self, key: &Key) -> Result<Option<Resource>, RegistryError> {
        let what = format!("GET {key}");
        let answer = self
            .send(Method::GET, self.client.object_url(key), None, &what)
            .await?;
        match answer.status {
            StatusCode::NOT_FOUND => {
                self.forget(key);
                Ok(None)
            }
            status if status.is_success() => {
                let resource: Resource = serde_json::from_slice(&answer.body)
                    .map_err(|e| RegistryError::Remote(format!("{what}: unexpected object: {e}")))?;
                // Only an object with a version can be written back guarded by it.
                if matches!(key, Key::Device(..)) && !resource.metadata.resource_version.is_empty() {
                    // A copy of its own: the body may be a slice of a much larger read buffer.
                    self.remember(key, bytes::Bytes::copy_from_slice(&answer.body));
                }
                Ok(Some(resource))
            }
            _ => Err(failure(key, &answer, &what)),
        }
    }

    async fn list(&self, scope: &Scope, params: &ListParams) -> Result<Vec<Resource>, RegistryError> {
        let mut url = self.collection_url(scope);
        {
            let mut query = url.query_pairs_mut();
            if let Some(labels) = &params.labels {
                query.append_pair("labels", labels);
            }
            if let Some(limit) = params.limit {
                query.append_pair("limit", &limit.to_string());
            }
            if let Some(offset) = params.offset {
                query.append_pair("offset", &offset.to_string());
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let what = match scope {
            Scope::Apps => "list applications".to_string(),
            Scope::Devices(app) => format!("list devices of application '{app}'"),
        };
        let answer = self.send(Method::GET, url, None, &what).await?;
        if !answer.status.is_success() {
            return Err(match scope {
                Scope::Devices(app) if answer.status == StatusCode::NOT_FOUND => {
                    RegistryError::NotFound(Key::App(app.clone()).to_string())
                }
                _ => RegistryError::Remote(format!("{what}: {}: {}", answer.status, answer.error().1)),
            });
        }
        let parsed = answer
            .json()
            .map_err(|e| RegistryError::Remote(format!("{what}: {e}")))?;
        // A plain array, as Drogue and Ajour answer; `{"items": [...]}` is accepted too.
        let items = match parsed {
            Value::Array(items) => items,
            Value::Object(mut object) => match object.remove("items") {
                Some(Value::Array(items)) => items,
                _ => return Err(RegistryError::Remote(format!("{what}: expected a list"))),
            },
            _ => return Err(RegistryError::Remote(format!("{what}: expected a list"))),
        };
        let mut resources = Vec::with_capacity(items.len());
        for item in items {
            match serde_json::from_value::<Resource>(item) {
                Ok(resource) => resources.push(resource),
                // One object Ajour cannot read must not hide all others.
                Err(error) => tracing::warn!(%error, "{what}: skipping an object that cannot be read"),
            }
        }
        Ok(resources)
    }

    async fn update(&self, key: &Key, resource: Resource) -> Result<Resource, RegistryError> {
        self.forget(key);
        let what = format!("PUT {key}");
        let body = serde_json::to_value(&resource).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let answer = self
            .send(Method::PUT, self.client.object_url(key), Some(&body), &what)
            .await?;
        if !answer.status.is_success() {
            return Err(failure(key, &answer, &what));
        }
        // Drogue answers 204: read back what is stored now (new resourceVersion, generation).
        self.get(key)
            .await?
            .ok_or_else(|| RegistryError::NotFound(key.to_string()))
    }

    async fn delete(&self, key: &Key) -> Result<(), RegistryError> {
        self.forget(key);
        let what = format!("DELETE {key}");
        let answer = self
            .send(Method::DELETE, self.client.object_url(key), None, &what)
            .await?;
        if answer.status.is_success() {
            Ok(())
        } else {
            Err(failure(key, &answer, &what))
        }
    }

    async fn merge_status_section(
        &self,
        key: &Key,
        section: &str,
        merge: StatusMerge<'_>,
    ) -> Result<bool, RegistryError> {
        let what = format!("writing status.{section} of {key}");
        let mut recent = self.take_recent(key);
        let mut attempt = 0;
        while attempt < CONFLICT_RETRIES {
            let read_now = recent.is_none();
            let mut object = match recent
                .take()
                .and_then(|body| serde_json::from_slice::<Value>(&body).ok())
            {
                Some(object) => object,
                None => self
                    .get_raw(key)
                    .await?
                    .ok_or_else(|| RegistryError::NotFound(key.to_string()))?,
            };
            let Some(fields) = object.as_object_mut() else {
                return Err(RegistryError::Remote(format!(
                    "{what}: the object is not a JSON object"
                )));
            };
            let status = fields
                .entry("status")
                .or_insert_with(|| Value::Object(Default::default()));
            if !status.is_object() {
                *status = Value::Object(Default::default());
            }
            if let Some(status) = status.as_object_mut() {
                let Some(value) = merge(status.get(section)) else {
                    if read_now {
                        return Ok(false);
                    }
                    // Nothing to write, as the object was: whether that holds is for the object as
                    // it is now to say.
                    continue;
                };
                status.insert(section.to_string(), value);
            }
            let answer = self
                .send(Method::PUT, self.client.object_url(key), Some(&object), &what)
                .await;
            // Whatever came of it, an object read before is out of date now, or may be.
            self.forget(key);
            let answer = answer?;
            match answer.status {
                code if code.is_success() => return Ok(true),
                // The object read a moment ago changed since (or is gone): read it again, at once.
                status if !read_now => {
                    tracing::debug!(%key, %status, "status write on an object read before refused; reading it again");
                }
                StatusCode::CONFLICT => {
                    attempt += 1;
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("ajour_drogue_registry_conflicts_total").increment(1);
                    tracing::debug!(%key, attempt, "status write met a concurrent change; redoing it");
                    // Spread out writers that collided, so they do not collide again in step.
                    let jitter = rand::thread_rng().gen_range(0..=5 * attempt as u64);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                _ => return Err(failure(key, &answer, &what)),
            }
        }
        Err(RegistryError::Conflict)
    }
}
