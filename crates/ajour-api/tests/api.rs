//! The REST API in process, on the in-memory registry: the parts of its contract that no other
//! layer decides.

use ajour_api::{router, ApiState, ApiToken, MAX_BODY};
use ajour_registry::{Registry, SqlRegistry};
use ajour_service::{ServiceConfig, UpdateService};
use ajour_testkit::MemoryRegistry;
use ajour_types::{AppName, DeviceName, Key};
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const TOKEN: &str = "test-token";

/// The API on `registry`, with its access store on a SQLite file in the returned directory.
async fn api(registry: Arc<MemoryRegistry>) -> (axum::Router, tempfile::TempDir) {
    let service = Arc::new(UpdateService::new(
        registry.clone(),
        Arc::new(ajour_store::Firmware::default()),
        ServiceConfig::default(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let access = Arc::new(
        SqlRegistry::connect(&SqlRegistry::sqlite_url(dir.path()), Default::default())
            .await
            .unwrap(),
    );
    (
        router(
            ApiState {
                registry,
                service,
                access,
                builds: None,
                public_url: Default::default(),
            },
            ApiToken::new(TOKEN),
        ),
        dir,
    )
}

async fn call(api: &axum::Router, method: Method, path: &str, body: Vec<u8>) -> (StatusCode, String, Value) {
    let request = Request::builder()
        .method(method)
        .uri(format!("/api/registry/v1alpha1/{path}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let response = api.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|t| t.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        content_type,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn device() -> Key {
    Key::Device(AppName::parse("app").unwrap(), DeviceName::parse("dev").unwrap())
}

#[tokio::test]
async fn a_put_without_status_keeps_the_stored_status_and_one_with_it_replaces_it() {
    let registry = Arc::new(MemoryRegistry::new());
    let (api, _dir) = api(registry.clone()).await;
    let create = |path: &'static str, body: Value| {
        let api = api.clone();
        async move {
            call(&api, Method::POST, path, body.to_string().into_bytes())
                .await
                .0
        }
    };
    assert_eq!(
        create("apps", json!({"metadata": {"name": "app"}})).await,
        StatusCode::CREATED
    );
    assert_eq!(
        create("apps/app/devices", json!({"metadata": {"name": "dev"}})).await,
        StatusCode::CREATED
    );
    let firmware = json!({"current": "1.0.0", "target": "1.0.0", "conditions": []});
    registry
        .set_status_section(&device(), "firmware", firmware.clone())
        .await
        .unwrap();

    // A label changed as kubectl-style tools do: metadata and spec only, with or without the
    // resource version read before.
    for with_version in [false, true] {
        let (_, _, stored) = call(&api, Method::GET, "apps/app/devices/dev", Vec::new()).await;
        let mut metadata = json!({"name": "dev", "labels": {"ring": format!("canary-{with_version}")}});
        if with_version {
            metadata["resourceVersion"] = stored["metadata"]["resourceVersion"].clone();
        }
        let body = json!({"metadata": metadata, "spec": {}}).to_string().into_bytes();
        let (status, _, _) = call(&api, Method::PUT, "apps/app/devices/dev", body).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, _, after) = call(&api, Method::GET, "apps/app/devices/dev", Vec::new()).await;
        assert_eq!(
            after["metadata"]["labels"]["ring"],
            format!("canary-{with_version}")
        );
        assert_eq!(
            after["status"]["firmware"], firmware,
            "with_version: {with_version}"
        );
    }

    // A status in the body is the client's to set.
    let body = json!({"metadata": {"name": "dev"}, "status": {}})
        .to_string()
        .into_bytes();
    assert_eq!(
        call(&api, Method::PUT, "apps/app/devices/dev", body).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(registry.status_section(&device(), "firmware"), None);
}

#[tokio::test]
async fn every_error_is_json_in_drogues_shape() {
    let (api, _dir) = api(Arc::new(MemoryRegistry::new())).await;
    let too_large = vec![b' '; MAX_BODY + 1];
    for (method, path, body, expected, error) in [
        (
            Method::POST,
            "apps",
            too_large,
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
        ),
        (
            Method::POST,
            "apps",
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            Method::GET,
            "apps/..",
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
        (
            Method::GET,
            "apps/nope",
            Vec::new(),
            StatusCode::NOT_FOUND,
            "NotFound",
        ),
        (
            Method::PATCH,
            "apps",
            Vec::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
        ),
        (
            Method::GET,
            "apps?limit=lots",
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
    ] {
        let (status, content_type, body) = call(&api, method.clone(), path, body).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
        assert!(
            content_type.starts_with("application/json"),
            "{method} {path}: {content_type}"
        );
        assert_eq!(body["error"], error, "{method} {path}: {body}");
        assert!(
            !body["message"].as_str().unwrap_or_default().is_empty(),
            "{method} {path}: {body}"
        );
    }
}
