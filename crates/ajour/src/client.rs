//! The CLI's use of the registry API: [`ajour_client::RegistryClient`] with answers turned into
//! messages for people.

use ajour_client::{RegistryClient, RegistryClientConfig};
use anyhow::bail;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// The API answered with an error status.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HttpError {}

/// Ajour's own API, beside the registry's `api/registry/v1alpha1`.
const DFU_API_PATH: &str = "api/dfu/v1alpha1";

pub struct ApiClient {
    client: RegistryClient,
}

impl ApiClient {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        let mut config = RegistryClientConfig::new(base);
        config.token = Some(token.to_string());
        config.timeout = std::time::Duration::from_secs(30);
        Ok(Self {
            client: RegistryClient::new(&config)?,
        })
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let segments: Vec<&str> = path.split('/').collect();
        let url = self.client.url(&segments);
        self.send_to(method, url, path, body).await
    }

    /// GET `path` under Ajour's own API (`/api/dfu/v1alpha1`, beside the registry's) with the
    /// query `query`.
    pub async fn get_dfu(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.dfu(Method::GET, path, query, None).await
    }

    /// `method` on `path` under Ajour's own API (`/api/dfu/v1alpha1`) with `query` and `body`.
    pub async fn dfu(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        self.call(DFU_API_PATH, method, path, query, body).await
    }

    /// `method` on `path` under the API at `api` (`api/tokens/v1alpha1`, say) beside the
    /// registry's, with `query` and `body`.
    pub async fn call(
        &self,
        api: &str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut url = self.client.url(&[]);
        let registry = url.path().trim_end_matches('/').to_string();
        let base = registry
            .strip_suffix(ajour_client::registry::API_PATH)
            .unwrap_or(&registry);
        url.set_path(&format!("{base}{api}"));
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.extend(path.split('/').filter(|s| !s.is_empty()));
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        self.send_to(method, url, path, body).await
    }

    async fn send_to(
        &self,
        method: Method,
        url: reqwest::Url,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let answer = self
            .client
            .send(method.clone(), url.clone(), body)
            .await
            .map_err(|e| anyhow::anyhow!("{method} {url}: {e}: is `ajour serve` running there?"))?;
        if !answer.status.is_success() {
            let (_, message) = answer.error();
            return Err(HttpError {
                status: answer.status,
                message: format!("{method} {path}: {}: {message}", answer.status),
            }
            .into());
        }
        // An answer that is not JSON is shown as text.
        Ok(answer
            .json()
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&answer.body).into_owned())))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(Method::GET, path, None).await
    }

    pub async fn create(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<()> {
        self.send(Method::PUT, path, Some(body)).await.map(|_| ())
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(Method::DELETE, path, None).await.map(|_| ())
    }

    /// Read an object, change it, write it back with its resource version; on a conflict (someone
    /// wrote in between) read again and retry.
    pub async fn modify(&self, path: &str, change: impl Fn(&mut Value)) -> anyhow::Result<Value> {
        for _ in 0..5 {
            let mut object = self.get(path).await?;
            change(&mut object);
            match self.send(Method::PUT, path, Some(&object)).await {
                Ok(_) => return Ok(object),
                Err(e) if e.downcast_ref::<HttpError>().map(|e| e.status) == Some(StatusCode::CONFLICT) => {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        bail!("{path} kept changing while being updated; try again")
    }
}
