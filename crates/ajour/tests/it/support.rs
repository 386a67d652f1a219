//! Start a real server for a test, and speak to it.

use ajour::server::{self, RunningServer, ServerConfig};
use ajour_store::{FileStore, FirmwareName};
use ajour_testkit::TestDatabase;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

pub struct TestServer {
    pub running: Option<RunningServer>,
    pub url: String,
    pub token: String,
    pub data_dir: tempfile::TempDir,
    pub http: reqwest::Client,
    _database: Option<TestDatabase>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TestDatabase::create().await),
        };
        let mut config = ServerConfig::new(data_dir.path());
        config.database_url = database.as_ref().map(|db| db.url().to_string());
        config.password_cost = 4;
        config.firmware_recheck = Duration::ZERO;
        config.service.engine.wait_poll = 7;
        config.service.unmanaged_poll = 600;
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = server::start(listener, config).await.unwrap();
        let url = format!("http://{}", running.addr);
        let token = running.token.clone();
        Self {
            running: Some(running),
            url,
            token,
            data_dir,
            http: reqwest::Client::new(),
            _database: database,
        }
    }

    pub fn service(&self) -> &ajour_service::UpdateService {
        &self.running.as_ref().unwrap().service
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/registry/v1alpha1/{path}", self.url)
    }

    pub async fn api_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.api(path)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn create_app(&self, name: &str, firmware: Option<Value>) {
        let mut body = json!({"metadata": {"name": name}, "spec": {}});
        if let Some(firmware) = firmware {
            body["spec"]["firmware"] = firmware;
        }
        let (status, body) = self.api_send(reqwest::Method::POST, "apps", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    pub async fn create_device(&self, app: &str, name: &str, password: &str, firmware: Option<Value>) {
        let mut body = json!({"metadata": {"name": name}, "spec": {"authentication": {"credentials": [{"pass": password}]}}});
        if let Some(firmware) = firmware {
            body["spec"]["firmware"] = firmware;
        }
        let (status, body) = self
            .api_send(reqwest::Method::POST, &format!("apps/{app}/devices"), Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    pub async fn device(&self, app: &str, name: &str) -> Value {
        let (status, body) = self
            .api_send(reqwest::Method::GET, &format!("apps/{app}/devices/{name}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// The server's Prometheus metrics, as text.
    pub async fn metrics(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    }

    /// Store firmware in the server's file store, as `ajour firmware add` does.
    pub fn add_firmware(&self, name: &str, version: &str, data: &[u8]) {
        FileStore::new(server::firmware_dir(self.data_dir.path()), Duration::ZERO)
            .add(&FirmwareName::parse(name).unwrap(), version, data)
            .unwrap();
    }

    /// POST a raw body to the device endpoint.
    pub async fn post_dfu(
        &self,
        user: &str,
        password: &str,
        body: Vec<u8>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        let response = self
            .http
            .post(format!("{}/v1/dfu?ct=30", self.url))
            .basic_auth(user, Some(password))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        (status, headers, response.bytes().await.unwrap().to_vec())
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
    }
}

/// Deterministic test firmware.
pub fn firmware_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// `status.firmware` conditions of a device, as `(type, status)`.
pub fn conditions(device: &Value) -> Vec<(String, String)> {
    device["status"]["firmware"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["type"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
