//! A client of the Drogue-shaped registry API (`/api/registry/v1alpha1`): Ajour's own REST API
//! or Drogue Cloud's. It speaks HTTP and JSON and maps nothing: the CLI turns answers into
//! messages for people, Drogue mode's registry backend into registry errors.

use crate::tls::{client_config, TlsOptions};
use crate::SetupError;
use ajour_types::Key;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use std::time::Duration;

/// The registry API's path under the base URL.
pub const API_PATH: &str = "api/registry/v1alpha1";

/// Where the registry is and how to authenticate.
#[derive(Debug, Clone)]
pub struct RegistryClientConfig {
    /// Base URL of the server, e.g. `https://api.drogue.example.com` (a URL already ending in
    /// `/api/registry/v1alpha1` is taken as it is).
    pub url: String,
    /// With a user, the token is sent as Basic `user:token`; without, as `Bearer token`.
    pub user: Option<String>,
    pub token: Option<String>,
    pub tls: TlsOptions,
    /// Per request.
    pub timeout: Duration,
}

impl RegistryClientConfig {
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

/// An answer of the registry, whatever its status.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: bytes::Bytes,
}

impl Answer {
    /// The body as JSON; `Null` when empty (Drogue answers writes with no body).
    pub fn json(&self) -> Result<Value, RequestError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| RequestError::InvalidJson(e.to_string()))
    }

    /// Drogue's error shape: `(error, message)`, e.g. `("AlreadyExists", "...")`; the start of
    /// the body as the message when it is not that shape.
    pub fn error(&self) -> (String, String) {
        let parsed: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        let error = parsed["error"].as_str().unwrap_or_default().to_string();
        let message = parsed["message"].as_str().map(str::to_string).unwrap_or_else(|| {
            String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
                .trim()
                .to_string()
        });
        (error, message)
    }
}

/// Why a request got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// Not sent, or no answer (connection refused, timeout, TLS), down to its cause.
    #[error("{0}")]
    Transport(String),
    #[error("invalid JSON in the answer: {0}")]
    InvalidJson(String),
}

/// The registry API over HTTP.
pub struct RegistryClient {
    http: reqwest::Client,
    base: Url,
    user: Option<String>,
    token: Option<String>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base.as_str())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    pub fn new(config: &RegistryClientConfig) -> Result<Self, SetupError> {
        let invalid = |reason: &str| SetupError::InvalidUrl {
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
        })
    }

    /// The URL of `segments` under the API (each segment percent-encoded as needed).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// The URL of an application or device.
    pub fn object_url(&self, key: &Key) -> Url {
        match key {
            Key::App(app) => self.url(&["apps", app.as_str()]),
            Key::Device(app, device) => self.url(&["apps", app.as_str(), "devices", device.as_str()]),
        }
    }

    /// Send a request with the configured authentication and an optional JSON body.
    pub async fn send(&self, method: Method, url: Url, body: Option<&Value>) -> Result<Answer, RequestError> {
        let request = self.http.request(method, url);
        let mut request = match (&self.user, &self.token) {
            (Some(user), token) => request.basic_auth(user, token.as_deref()),
            (None, Some(token)) => request.bearer_auth(token),
            (None, None) => request,
        };
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| RequestError::Transport(error_chain(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| RequestError::Transport(format!("reading the answer: {}", error_chain(&e))))?;
        Ok(Answer { status, body })
    }
}

/// An error down to its cause (reqwest's top-level message alone rarely says what happened).
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

#[cfg(test)]
mod tests {
    use super::*;
    use ajour_types::AppName;

    #[test]
    fn base_urls() {
        let client = RegistryClient::new(&RegistryClientConfig::new("http://127.0.0.1:1/")).unwrap();
        assert_eq!(
            client
                .object_url(&Key::App(AppName::parse("a").unwrap()))
                .as_str(),
            "http://127.0.0.1:1/api/registry/v1alpha1/apps/a"
        );
        let client = RegistryClient::new(&RegistryClientConfig::new(
            "https://x.example/base/api/registry/v1alpha1",
        ))
        .unwrap();
        assert_eq!(
            client.url(&["apps"]).as_str(),
            "https://x.example/base/api/registry/v1alpha1/apps"
        );
        // A segment is one segment, whatever it holds.
        assert_eq!(
            client.url(&["apps", "../x"]).as_str(),
            "https://x.example/base/api/registry/v1alpha1/apps/..%2Fx"
        );
        assert!(RegistryClient::new(&RegistryClientConfig::new("ftp://x")).is_err());
    }
}
