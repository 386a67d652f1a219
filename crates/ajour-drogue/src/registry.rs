//! [`DrogueRegistry`]: Drogue Cloud's device registry (`/api/registry/v1alpha1`) over HTTP, as an
//! [`ajour_registry::Registry`], so the update service reads specs from and writes
//! `status.firmware` to Drogue instead of its own database.
//!
//! Reads are not cached here: the update service already reuses a device's context for a bounded
//! time and coalesces status writes, so this client makes plain REST calls. A status write is a GET
//! and a PUT of the very object read, with only `status.{section}` replaced and the
//! `resourceVersion` kept, so Drogue's optimistic locking turns a concurrent change into a 409,
//! on which the write is redone on the fresh object: nothing another writer changed is lost.

use crate::tls::{client_config, TlsOptions};
use crate::DrogueError;
use ajour_registry::{Key, ListParams, Registry, RegistryError, Resource, Scope};
use async_trait::async_trait;
use rand::Rng;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The registry API's path under the base URL.
const API_PATH: &str = "api/registry/v1alpha1";

/// How often a status write is redone after a 409 before giving up (it is retried by the
/// status writer later anyway).
const CONFLICT_RETRIES: u32 = 16;

/// Where Drogue's registry is and how to authenticate.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Base URL of the Drogue API, e.g. `https://api.drogue.example.com` (a URL already ending in
    /// `/api/registry/v1alpha1` is taken as it is).
    pub url: String,
    /// With a user, the token is sent as Basic `user:token`; without, as `Bearer token`.
    pub user: Option<String>,
    pub token: Option<String>,
    pub tls: TlsOptions,
    /// Per request.
    pub timeout: Duration,
}

impl RegistryConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            user: None,
            token: None,
            tls: TlsOptions::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Drogue's device registry, over HTTP.
pub struct DrogueRegistry {
    http: reqwest::Client,
    base: Url,
    user: Option<String>,
    token: Option<String>,
    conflicts: AtomicU64,
}

impl std::fmt::Debug for DrogueRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrogueRegistry")
            .field("base", &self.base.as_str())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl DrogueRegistry {
    pub fn new(config: &RegistryConfig) -> Result<Self, DrogueError> {
        let invalid = |reason: &str| DrogueError::InvalidUrl {
            url: config.url.clone(),
            reason: reason.into(),
        };
        let mut base = Url::parse(&config.url).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("use http:// or https://"));
        }
        let path = base.path().trim_end_matches('/').to_string();
        if !path.ends_with(API_PATH) {
            base.set_path(&format!("{path}/{API_PATH}"));
        }
        let tls = client_config(&config.tls)?;
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .use_preconfigured_tls((*tls).clone())
            .build()?;
        Ok(Self {
            http,
            base,
            user: config.user.clone().filter(|u| !u.is_empty()),
            token: config.token.clone().filter(|t| !t.is_empty()),
            conflicts: AtomicU64::new(0),
        })
    }

    /// 409s met (and retried) by status writes so far.
    pub fn conflicts_retried(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn object_url(&self, key: &Key) -> Url {
        match key {
            Key::App(app) => self.url(&["apps", app.as_str()]),
            Key::Device(app, device) => self.url(&["apps", app.as_str(), "devices", device.as_str()]),
        }
    }

    fn collection_url(&self, scope: &Scope) -> Url {
        match scope {
            Scope::Apps => self.url(&["apps"]),
            Scope::Devices(app) => self.url(&["apps", app.as_str(), "devices"]),
        }
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match (&self.user, &self.token) {
            (Some(user), token) => request.basic_auth(user, token.as_deref()),
            (None, Some(token)) => request.bearer_auth(token),
            (None, None) => request,
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(StatusCode, Vec<u8>), RegistryError> {
        let response = request
            .send()
            .await
            .map_err(|e| RegistryError::Remote(format!("{what}: {}", error_chain(&e))))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| RegistryError::Remote(format!("{what}: reading the answer: {e}")))?;
        Ok((status, body.to_vec()))
    }

    /// The object as Drogue has it, untyped, so a write-back keeps fields Ajour does not model.
    async fn get_raw(&self, key: &Key) -> Result<Option<Value>, RegistryError> {
        let what = format!("GET {key}");
        let (status, body) = self
            .send(self.request(Method::GET, self.object_url(key)), &what)
            .await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| RegistryError::Remote(format!("{what}: invalid JSON: {e}"))),
            status => Err(failure(key, status, &body, &what)),
        }
    }
}

/// The error behind an HTTP failure, down to its cause (reqwest's top-level message alone rarely
/// says what happened).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Map an unsuccessful answer to the registry's error kinds, as Ajour's API maps them back.
fn failure(key: &Key, status: StatusCode, body: &[u8], what: &str) -> RegistryError {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = parsed["error"].as_str().unwrap_or_default();
    let message = parsed["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    match status {
        StatusCode::NOT_FOUND => RegistryError::NotFound(key.to_string()),
        StatusCode::CONFLICT if error == "AlreadyExists" => RegistryError::AlreadyExists(key.to_string()),
        StatusCode::CONFLICT => RegistryError::Conflict,
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => RegistryError::Invalid(message),
        status => RegistryError::Remote(format!("{what}: {status}: {}", message.trim())),
    }
}

/// Whether writing `new` as `status.firmware` over `stored` would undo a later observation.
///
/// With several instances sharing a subscription, the statuses of one device reach all of them,
/// and each writes its latest one, coalesced, some time later. An instance that saw the device
/// updating toward version T, but not its final status, may write "not in sync since t0" after
/// another wrote "in sync since t1 > t0": that write is late and would leave the device shown as
/// updating for ever. A write for another target, or one that saw the device out of sync after
/// t1, is not late.
fn is_late_firmware_write(stored: Option<&Value>, new: &Value) -> bool {
    let Some(stored) = stored else {
        return false;
    };
    if stored["target"] != new["target"] {
        return false;
    }
    match (in_sync_since(stored), in_sync_since(new)) {
        (Some((true, in_sync_since)), Some((false, out_of_sync_since))) => out_of_sync_since < in_sync_since,
        _ => false,
    }
}

/// The `InSync` condition of a `status.firmware`: its status and since when.
fn in_sync_since(firmware: &Value) -> Option<(bool, chrono::DateTime<chrono::Utc>)> {
    let condition = firmware["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "InSync")?;
    let since = chrono::DateTime::parse_from_rfc3339(condition["lastTransitionTime"].as_str()?).ok()?;
    Some((condition["status"] == "True", since.with_timezone(&chrono::Utc)))
}

fn to_resource(value: Value, what: &str) -> Result<Resource, RegistryError> {
    serde_json::from_value(value)
        .map_err(|e| RegistryError::Remote(format!("{what}: unexpected object: {e}")))
}

#[async_trait]
impl Registry for DrogueRegistry {
    async fn create(&self, key: &Key, resource: Resource) -> Result<Resource, RegistryError> {
        let scope = match key {
            Key::App(_) => Scope::Apps,
            Key::Device(app, _) => Scope::Devices(app.clone()),
        };
        let what = format!("POST {key}");
        let request = self
            .request(Method::POST, self.collection_url(&scope))
            .json(&resource);
        let (status, body) = self.send(request, &what).await?;
        if !status.is_success() {
            return Err(failure(key, status, &body, &what));
        }
        // Drogue answers 201 with no body; Ajour with the object. Either way, return what is stored.
        match serde_json::from_slice::<Resource>(&body) {
            Ok(created) => Ok(created),
            Err(_) => self
                .get(key)
                .await?
                .ok_or_else(|| RegistryError::NotFound(key.to_string())),
        }
    }

    async fn get(&self, key: &Key) -> Result<Option<Resource>, RegistryError> {
        match self.get_raw(key).await? {
            Some(value) => to_resource(value, &format!("GET {key}")).map(Some),
            None => Ok(None),
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
        let (status, body) = self.send(self.request(Method::GET, url), &what).await?;
        if !status.is_success() {
            let key = match scope {
                Scope::Apps => None,
                Scope::Devices(app) => Some(Key::App(app.clone())),
            };
            return Err(match (status, key) {
                (StatusCode::NOT_FOUND, Some(key)) => RegistryError::NotFound(key.to_string()),
                (status, _) => RegistryError::Remote(format!(
                    "{what}: {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
                )),
            });
        }
        let parsed: Value = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Remote(format!("{what}: invalid JSON: {e}")))?;
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
        let what = format!("PUT {key}");
        let request = self.request(Method::PUT, self.object_url(key)).json(&resource);
        let (status, body) = self.send(request, &what).await?;
        if !status.is_success() {
            return Err(failure(key, status, &body, &what));
        }
        // Drogue answers 204: read back what is stored now (new resourceVersion, generation).
        self.get(key)
            .await?
            .ok_or_else(|| RegistryError::NotFound(key.to_string()))
    }

    async fn delete(&self, key: &Key) -> Result<(), RegistryError> {
        let what = format!("DELETE {key}");
        let (status, body) = self
            .send(self.request(Method::DELETE, self.object_url(key)), &what)
            .await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(failure(key, status, &body, &what))
        }
    }

    async fn set_status_section(&self, key: &Key, section: &str, value: Value) -> Result<(), RegistryError> {
        let what = format!("writing status.{section} of {key}");
        for attempt in 0..CONFLICT_RETRIES {
            let mut object = self
                .get_raw(key)
                .await?
                .ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
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
                if section == "firmware" && is_late_firmware_write(status.get(section), &value) {
                    tracing::debug!(%key, "dropping a late firmware status: the device was seen in sync since");
                    metrics::counter!("ajour_drogue_late_status_writes_total").increment(1);
                    return Ok(());
                }
                status.insert(section.to_string(), value.clone());
            }
            let request = self.request(Method::PUT, self.object_url(key)).json(&object);
            let (code, body) = self.send(request, &what).await?;
            match code {
                code if code.is_success() => return Ok(()),
                StatusCode::CONFLICT => {
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("ajour_drogue_registry_conflicts_total").increment(1);
                    tracing::debug!(%key, attempt, "status write met a concurrent change; redoing it");
                    // Spread out writers that collided, so they do not collide again in step.
                    let jitter = rand::thread_rng().gen_range(0..=5 * (attempt as u64 + 1));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                code => return Err(failure(key, code, &body, &what)),
            }
        }
        Err(RegistryError::Conflict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn firmware(target: &str, in_sync: bool, since: &str) -> Value {
        json!({"current": "1", "target": target, "conditions": [
            {"type": "InSync", "status": if in_sync { "True" } else { "False" }, "lastTransitionTime": since}
        ]})
    }

    #[test]
    fn a_late_out_of_sync_write_does_not_undo_in_sync() {
        let stored = firmware("2", true, "2026-11-27T10:00:05.000Z");
        // Seen updating before the device was seen in sync: late.
        assert!(is_late_firmware_write(
            Some(&stored),
            &firmware("2", false, "2026-11-27T10:00:01.000Z")
        ));
        // Seen out of sync after it was in sync (reflashed): written.
        assert!(!is_late_firmware_write(
            Some(&stored),
            &firmware("2", false, "2026-11-27T10:00:09.000Z")
        ));
        // Another target (firmware changed): written.
        assert!(!is_late_firmware_write(
            Some(&stored),
            &firmware("3", false, "2026-11-27T10:00:01.000Z")
        ));
        // Nothing stored, or nothing to compare: written.
        assert!(!is_late_firmware_write(
            None,
            &firmware("2", false, "2026-11-27T10:00:01.000Z")
        ));
        assert!(!is_late_firmware_write(
            Some(&json!({"target": "2"})),
            &firmware("2", false, "x")
        ));
    }

    #[test]
    fn base_urls() {
        let registry = DrogueRegistry::new(&RegistryConfig::new("http://127.0.0.1:1/")).unwrap();
        assert_eq!(
            registry
                .object_url(&Key::App(ajour_registry::AppName::parse("a").unwrap()))
                .as_str(),
            "http://127.0.0.1:1/api/registry/v1alpha1/apps/a"
        );
        let registry = DrogueRegistry::new(&RegistryConfig::new(
            "https://x.example/base/api/registry/v1alpha1",
        ))
        .unwrap();
        assert_eq!(
            registry.collection_url(&Scope::Apps).as_str(),
            "https://x.example/base/api/registry/v1alpha1/apps"
        );
        assert!(DrogueRegistry::new(&RegistryConfig::new("ftp://x")).is_err());
    }
}
