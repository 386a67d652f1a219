//! A small client of Ajour's REST API, for the CLI (and usable against Drogue Cloud's registry).

use anyhow::{bail, Context};
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

pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

const REGISTRY: &str = "api/registry/v1alpha1";

impl ApiClient {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{REGISTRY}/{path}", self.base)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self
            .http
            .request(method.clone(), self.url(path))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {}: is `ajour serve` running there?", self.url(path)))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let message = value
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            return Err(HttpError {
                status,
                message: format!("{method} {path}: {status}: {message}"),
            }
            .into());
        }
        Ok((status, value))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.send(Method::GET, path, None).await?.1)
    }

    pub async fn create(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Ok(self.send(Method::POST, path, Some(body)).await?.1)
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
