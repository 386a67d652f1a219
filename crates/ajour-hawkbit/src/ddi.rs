//! The DDI (Direct Device Integration) API as Ajour speaks it: the JSON Hawkbit sends and takes,
//! and one HTTP client shared by every controller. No decisions here: what to do with a poll is
//! [`crate::HawkbitSource`]'s.

use crate::HawkbitConfig;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// Why a request to Hawkbit failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DdiError {
    /// Not reached, timed out, or a 5xx: Hawkbit is down or busy.
    #[error("{url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// Hawkbit answered with another status (401: check the token; 404: unknown controller).
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    /// The body is not what DDI says it is.
    #[error("{url}: unexpected answer: {reason}")]
    Invalid { url: String, reason: String },
    /// More bytes than the artifact was declared to have.
    #[error("{url}: more than the {limit} bytes declared")]
    TooLong { url: String, limit: u64 },
}

/// The answer to a poll of the controller base (`GET /{tenant}/controller/v1/{controller}`).
#[derive(Debug, Default, Deserialize)]
pub struct PollReply {
    #[serde(default)]
    pub config: Option<PollConfig>,
    #[serde(rename = "_links", default)]
    pub links: PollLinks,
}

#[derive(Debug, Default, Deserialize)]
pub struct PollConfig {
    #[serde(default)]
    pub polling: Option<Polling>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Polling {
    #[serde(default)]
    pub sleep: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PollLinks {
    #[serde(rename = "configData")]
    pub config_data: Option<Link>,
    #[serde(rename = "deploymentBase")]
    pub deployment_base: Option<Link>,
    #[serde(rename = "cancelAction")]
    pub cancel_action: Option<Link>,
    #[serde(rename = "confirmationBase")]
    pub confirmation_base: Option<Link>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Link {
    pub href: String,
}

impl PollReply {
    /// Hawkbit's polling sleep, when it gave one that parses.
    pub fn sleep(&self) -> Option<Duration> {
        parse_sleep(self.config.as_ref()?.polling.as_ref()?.sleep.as_deref()?)
    }
}

/// `HH:MM:SS` as Hawkbit writes its polling sleep.
pub fn parse_sleep(text: &str) -> Option<Duration> {
    let mut parts = text.trim().split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (h, m, s): (u64, u64, u64) = (h.parse().ok()?, m.parse().ok()?, s.parse().ok()?);
    if m >= 60 || s >= 60 {
        return None;
    }
    Some(Duration::from_secs(h * 3600 + m * 60 + s))
}

/// `GET deploymentBase/{action}`.
#[derive(Debug, Deserialize)]
pub struct DeploymentReply {
    /// The action id; Hawkbit writes it as a string, some servers as a number.
    pub id: Value,
    pub deployment: Deployment,
}

#[derive(Debug, Deserialize)]
pub struct Deployment {
    #[serde(default)]
    pub chunks: Vec<Chunk>,
}

/// A software module of the distribution set.
#[derive(Debug, Deserialize)]
pub struct Chunk {
    #[serde(default)]
    pub part: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    #[serde(default)]
    pub metadata: Vec<KeyValue>,
}

#[derive(Debug, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
pub struct Artifact {
    pub filename: String,
    #[serde(default)]
    pub hashes: Hashes,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(rename = "_links", default)]
    pub links: ArtifactLinks,
}

#[derive(Debug, Default, Deserialize)]
pub struct Hashes {
    pub sha256: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ArtifactLinks {
    pub download: Option<Link>,
    #[serde(rename = "download-http")]
    pub download_http: Option<Link>,
}

/// `GET cancelAction/{action}`.
#[derive(Debug, Deserialize)]
pub struct CancelReply {
    pub id: Value,
}

/// An action id as text, whether Hawkbit wrote it as a string or a number.
pub fn id_text(id: &Value) -> String {
    match id {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `execution` and `result.finished` of a feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    /// Under way, with `cnt` of `of` done.
    Proceeding {
        cnt: u32,
        of: u32,
    },
    Success,
    Failure,
}

/// The body of a feedback to an action (deployment or cancel).
pub fn feedback_body(id: &str, feedback: Feedback, details: &[String]) -> Value {
    let (execution, result) = match feedback {
        Feedback::Proceeding { cnt, of } => (
            "proceeding",
            json!({"finished": "none", "progress": {"cnt": cnt, "of": of}}),
        ),
        Feedback::Success => ("closed", json!({"finished": "success"})),
        Feedback::Failure => ("closed", json!({"finished": "failure"})),
    };
    json!({
        "id": id,
        "status": {"execution": execution, "result": result, "details": details},
    })
}

/// The body of a `configData` upload: the attributes of the controller, merged into those
/// Hawkbit has.
pub fn config_data_body(version: &str) -> Value {
    json!({"mode": "merge", "data": {"version": version}})
}

/// The HTTP client every controller shares, and how each one authenticates.
pub struct Ddi {
    http: reqwest::Client,
    /// `{url}/{tenant}/controller/v1/`.
    controllers: String,
    /// `scheme://host[:port]` of Hawkbit: only URLs there get the token.
    origin: Option<String>,
    config: HawkbitConfig,
}

impl Ddi {
    pub fn new(config: &HawkbitConfig) -> Result<Self, String> {
        let url = reqwest::Url::parse(config.url.trim_end_matches('/'))
            .map_err(|e| format!("--hawkbit-url '{}': {e}", config.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("--hawkbit-url '{}': not http(s)", config.url));
        }
        if config.tenant.is_empty() || !config.tenant.chars().all(safe_in_path) {
            return Err(format!(
                "--hawkbit-tenant '{}': letters, digits and -_.: only",
                config.tenant
            ));
        }
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(config.request_timeout)
            .read_timeout(config.request_timeout)
            .timeout(config.request_timeout * 4)
            .danger_accept_invalid_certs(config.accept_invalid_certs);
        if let Some(path) = &config.extra_ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("--hawkbit-ca-file {}: {e}", path.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("--hawkbit-ca-file {}: {e}", path.display()))?;
            for certificate in certificates {
                http = http.add_root_certificate(certificate);
            }
        }
        Ok(Self {
            http: http.build().map_err(|e| format!("Hawkbit's HTTP client: {e}"))?,
            controllers: format!(
                "{}/{}/controller/v1/",
                url.as_str().trim_end_matches('/'),
                config.tenant
            ),
            origin: Some(url.origin().ascii_serialization()),
            config: config.clone(),
        })
    }

    /// The controller base of `controller`.
    pub fn controller_url(&self, controller: &str) -> String {
        format!("{}{controller}", self.controllers)
    }

    /// The `Authorization` header for `controller`'s requests to `url`: its own target token,
    /// else the gateway token; none to a URL outside Hawkbit (an artifact served from elsewhere
    /// must not learn the token).
    fn authorization(&self, controller: &str, url: &str) -> Option<String> {
        let same_origin = reqwest::Url::parse(url)
            .ok()
            .map(|url| url.origin().ascii_serialization())
            == self.origin;
        if !same_origin {
            return None;
        }
        if let Some(token) = self.config.target_tokens.get(controller) {
            return Some(format!("TargetToken {token}"));
        }
        self.config
            .gateway_token
            .as_ref()
            .map(|token| format!("GatewayToken {token}"))
    }

    async fn send(
        &self,
        controller: &str,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, DdiError> {
        let mut request = self
            .http
            .request(method, url)
            .header("Accept", "application/json");
        if let Some(authorization) = self.authorization(controller, url) {
            request = request.header("Authorization", authorization);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let unreachable = |e: reqwest::Error| DdiError::Unreachable {
            url: url.to_string(),
            reason: error_chain(&e),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        if status.is_server_error() {
            return Err(DdiError::Unreachable {
                url: url.to_string(),
                reason: format!("HTTP {}", status.as_u16()),
            });
        }
        if !status.is_success() {
            return Err(DdiError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        Ok(response)
    }

    /// GET `url` as JSON.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        controller: &str,
        url: &str,
    ) -> Result<T, DdiError> {
        let response = self.send(controller, reqwest::Method::GET, url, None).await?;
        let bytes = response.bytes().await.map_err(|e| DdiError::Unreachable {
            url: url.to_string(),
            reason: error_chain(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| DdiError::Invalid {
            url: url.to_string(),
            reason: e.to_string(),
        })
    }

    /// POST (feedback) or PUT (configData) `body` to `url`.
    pub async fn send_json(
        &self,
        controller: &str,
        method: reqwest::Method,
        url: &str,
        body: &Value,
    ) -> Result<(), DdiError> {
        self.send(controller, method, url, Some(body)).await.map(drop)
    }

    /// The bytes at `url`, refusing more than `limit`.
    pub async fn download(&self, controller: &str, url: &str, limit: u64) -> Result<Bytes, DdiError> {
        let mut response = self.send(controller, reqwest::Method::GET, url, None).await?;
        let mut data = BytesMut::new();
        loop {
            let chunk = response.chunk().await.map_err(|e| DdiError::Unreachable {
                url: url.to_string(),
                reason: error_chain(&e),
            })?;
            let Some(chunk) = chunk else { break };
            if data.len() as u64 + chunk.len() as u64 > limit {
                return Err(DdiError::TooLong {
                    url: url.to_string(),
                    limit,
                });
            }
            data.extend_from_slice(&chunk);
        }
        Ok(data.freeze())
    }
}

/// Characters Ajour accepts in a controller id or tenant: they go into URL paths as they are.
pub fn safe_in_path(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.:~".contains(c)
}

/// An error and its causes in one line (reqwest's own message alone says little).
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

    #[test]
    fn polling_sleep_is_hours_minutes_seconds() {
        assert_eq!(parse_sleep("00:01:00"), Some(Duration::from_secs(60)));
        assert_eq!(parse_sleep("12:00:05"), Some(Duration::from_secs(43205)));
        for bad in [
            "",
            "60",
            "00:60:00",
            "00:00:60",
            "a:b:c",
            "00:00:00:01",
            "-1:00:00",
        ] {
            assert_eq!(parse_sleep(bad), None, "{bad}");
        }
    }

    #[test]
    fn feedback_bodies_are_ddis() {
        assert_eq!(
            feedback_body("7", Feedback::Proceeding { cnt: 40, of: 100 }, &["x".into()]),
            json!({"id": "7", "status": {"execution": "proceeding",
                   "result": {"finished": "none", "progress": {"cnt": 40, "of": 100}}, "details": ["x"]}})
        );
        assert_eq!(
            feedback_body("7", Feedback::Failure, &[]),
            json!({"id": "7", "status": {"execution": "closed", "result": {"finished": "failure"}, "details": []}})
        );
    }
}
