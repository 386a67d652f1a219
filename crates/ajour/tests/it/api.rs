//! The REST API behaves as Drogue Cloud's registry API does.

use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn registry_api_is_drogue_compatible() {
    for backend in BACKENDS {
        let server = TestServer::start(backend).await;

        // Token required.
        let response = server.http.get(server.api("apps")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let response = server
            .http
            .get(server.api("apps"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        // Drogue clients send Basic user:token.
        let response = server
            .http
            .get(server.api("apps"))
            .basic_auth("me", Some(&server.token))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);

        // POST -> 201 + Location.
        let response = server
            .http
            .post(server.api("apps"))
            .bearer_auth(&server.token)
            .json(&json!({"metadata": {"name": "my-app", "labels": {"tier": "gold"}}, "spec": {"firmware": {"oci": {"image": "fw:1"}}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{backend:?}");
        assert_eq!(
            response.headers()["location"],
            "/api/registry/v1alpha1/apps/my-app"
        );
        let (status, _) = server
            .api_send(
                Method::POST,
                "apps",
                Some(json!({"metadata": {"name": "my-app"}})),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        server.create_app("plain", None).await;

        // List with labels / limit / offset.
        let (_, all) = server.api_send(Method::GET, "apps", None).await;
        assert_eq!(all.as_array().unwrap().len(), 2);
        let (_, gold) = server
            .api_send(Method::GET, "apps?labels=tier%3Dgold", None)
            .await;
        assert_eq!(gold[0]["metadata"]["name"], "my-app");
        assert_eq!(gold.as_array().unwrap().len(), 1);
        let (_, page) = server.api_send(Method::GET, "apps?limit=1&offset=1", None).await;
        assert_eq!(page[0]["metadata"]["name"], "plain");

        // PUT replaces (204); resourceVersion -> 409 when stale; generation on spec change only.
        let (_, app) = server.api_send(Method::GET, "apps/my-app", None).await;
        assert_eq!(app["metadata"]["generation"], 1);
        let mut relabelled = app.clone();
        relabelled["metadata"]["labels"]["tier"] = json!("silver");
        let (status, _) = server
            .api_send(Method::PUT, "apps/my-app", Some(relabelled))
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, after_labels) = server.api_send(Method::GET, "apps/my-app", None).await;
        assert_eq!(after_labels["metadata"]["generation"], 1);
        let mut stale = app.clone();
        stale["spec"]["firmware"] = json!({"container": {"image": "fw:2"}});
        let (status, body) = server.api_send(Method::PUT, "apps/my-app", Some(stale)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::CONFLICT, Some("Conflict"))
        );
        let mut fresh = after_labels.clone();
        fresh["spec"]["firmware"] = json!({"container": {"image": "fw:2"}});
        let (status, _) = server.api_send(Method::PUT, "apps/my-app", Some(fresh)).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, bumped) = server.api_send(Method::GET, "apps/my-app", None).await;
        assert_eq!(bumped["metadata"]["generation"], 2);

        // Devices: the password is stored as a keyed verifier and never returned in plain text.
        server.create_device("my-app", "dev1", "hey-rodney", None).await;
        let device = server.device("my-app", "dev1").await;
        assert_eq!(device["metadata"]["application"], "my-app");
        assert!(!device.to_string().contains("hey-rodney"), "{device}");
        assert!(device["spec"]["authentication"]["credentials"][0]["pass"]["keyed"]["mac"].is_string());

        // Bad requests: malformed JSON, unknown metadata fields, names not matching the path,
        // hostile names, unknown objects.
        let response = server
            .http
            .post(server.api("apps"))
            .bearer_auth(&server.token)
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        for (path, body) in [
            ("apps", json!({"metadata": {"name": "x", "colour": "red"}})),
            ("apps", json!({"metadata": {"name": "../../etc/passwd"}})),
            (
                "apps/my-app/devices",
                json!({"metadata": {"name": "d", "application": "other"}}),
            ),
        ] {
            let (status, body) = server.api_send(Method::POST, path, Some(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
            assert!(body["message"].is_string());
        }
        let (status, _) = server
            .api_send(
                Method::PUT,
                "apps/my-app",
                Some(json!({"metadata": {"name": "other"}})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = server.api_send(Method::GET, "apps/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = server.api_send(Method::GET, "apps/nope/devices", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // DELETE -> 204, then 404.
        let (status, _) = server.api_send(Method::DELETE, "apps/my-app", None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = server
            .api_send(Method::GET, "apps/my-app/devices/dev1", None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        server.stop().await;
    }
}

#[tokio::test]
async fn a_firmware_change_through_the_api_reaches_devices_at_once() {
    use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
    for backend in BACKENDS {
        // Cached specs would otherwise be reused for an hour: only the API's invalidation can
        // make the change reach the device.
        let server = TestServer::start_with(backend, |c| {
            c.service.spec_cache_ttl = std::time::Duration::from_secs(3600)
        })
        .await;
        server.add_firmware("a", "1.0.0", &firmware_bytes(100, 1));
        server.add_firmware("b", "2.0.0", &firmware_bytes(100, 2));
        server
            .create_app("app", Some(json!({"file": {"name": "a"}})))
            .await;
        server.create_device("app", "d", "pw", None).await;
        let status = encode_status(&Status::first(b"1.0.0".to_vec(), None, None), Encoding::Packed);
        let (_, _, body) = server.post_dfu("d@app", "pw", status.clone()).await;
        assert!(matches!(decode_command(&body).unwrap(), Command::Sync { .. }));

        let (_, mut app) = server.api_send(Method::GET, "apps/app", None).await;
        app["spec"]["firmware"] = json!({"file": {"name": "b"}});
        let (code, _) = server.api_send(Method::PUT, "apps/app", Some(app)).await;
        assert_eq!(code, StatusCode::NO_CONTENT);
        let (_, _, body) = server.post_dfu("d@app", "pw", status).await;
        assert!(
            matches!(
                decode_command(&body).unwrap(),
                Command::Write {
                    version: b"2.0.0",
                    offset: 0,
                    ..
                }
            ),
            "{backend:?}"
        );

        // Changing the password through the API voids the remembered credential. The status
        // write for the Write above runs beside the request: let it finish, or the PUT below may
        // carry a resourceVersion it has already replaced (409).
        server.service().settle_status_writes().await;
        let mut device = server.device("app", "d").await;
        device["spec"]["authentication"] = json!({"credentials": [{"pass": "new"}]});
        let (code, _) = server
            .api_send(Method::PUT, "apps/app/devices/d", Some(device))
            .await;
        assert_eq!(code, StatusCode::NO_CONTENT);
        let first = encode_status(&Status::first(b"1.0.0".to_vec(), None, None), Encoding::Packed);
        assert_eq!(
            server.post_dfu("d@app", "pw", first.clone()).await.0,
            StatusCode::FORBIDDEN,
            "{backend:?}"
        );
        assert_eq!(server.post_dfu("d@app", "new", first).await.0, StatusCode::OK);
        server.stop().await;
    }
}

/// `/api/dfu/v1alpha1/.../history`: a device's history, newest first; what it refuses, and how.
#[tokio::test]
async fn a_device_history_is_read_through_the_api() {
    use ajour_protocol::{encode_status, Encoding, Status};
    for backend in BACKENDS {
        let server = TestServer::start(backend).await;
        server.add_firmware("fw", "2.0.0", &firmware_bytes(1000, 3));
        server
            .create_app("app", Some(json!({"file": {"name": "fw"}})))
            .await;
        server.create_device("app", "d", "pw", None).await;
        let first = encode_status(
            &Status::first(b"1.0.0".to_vec(), Some(100), None),
            Encoding::Packed,
        );
        assert_eq!(server.post_dfu("d@app", "pw", first).await.0, StatusCode::OK);
        server.service().settle_status_writes().await;

        let history = |path: &str, token: &str| {
            server
                .http
                .get(format!("{}/api/dfu/v1alpha1/{path}", server.url))
                .bearer_auth(token)
                .send()
        };
        let response = history("apps/app/devices/d/history", &server.token)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let events: serde_json::Value = response.json().await.unwrap();
        assert_eq!(events[0]["kind"], "started", "{backend:?}: {events}");
        assert_eq!(events[0]["current"], "1.0.0");
        assert_eq!(events[0]["target"], "2.0.0");
        assert!(events[0]["time"].as_str().unwrap().ends_with('Z'), "{events}");

        for (path, token, status) in [
            ("apps/app/devices/d/history", "wrong", StatusCode::UNAUTHORIZED),
            (
                "apps/app/devices/nobody/history",
                server.token.as_str(),
                StatusCode::NOT_FOUND,
            ),
            (
                "apps/app/devices/..%2F..%2Fetc/history",
                server.token.as_str(),
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/devices/d/history?limit=0",
                server.token.as_str(),
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/devices/d/history?limit=x",
                server.token.as_str(),
                StatusCode::BAD_REQUEST,
            ),
        ] {
            let response = history(path, token).await.unwrap();
            assert_eq!(response.status(), status, "{backend:?} {path}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert!(body["message"].is_string(), "{path}: {body}");
        }
        server.stop().await;
    }
}

/// `/api/dfu/v1alpha1/apps/{app}/rollouts`: what makes no sense is refused with a status and a
/// message, never half-created; the rollout then works (created, read, controlled).
#[tokio::test]
async fn rollout_requests_that_make_no_sense_are_refused() {
    for backend in BACKENDS {
        let server = TestServer::start(backend).await;
        server.add_firmware("v2", "2.0.0", &firmware_bytes(1000, 3));
        server
            .create_app("app", Some(json!({"file": {"name": "v1"}})))
            .await;
        server.create_device("app", "d", "pw", None).await;
        server
            .create_device("app", "own", "pw", Some(json!({"file": {"name": "v2"}})))
            .await;
        let send = |method: reqwest::Method, path: &str, token: &str, body: Option<&str>| {
            let mut request = server
                .http
                .request(method, format!("{}/api/dfu/v1alpha1/{path}", server.url))
                .bearer_auth(token);
            if let Some(body) = body {
                request = request.body(body.to_string());
            }
            request.send()
        };
        let post = reqwest::Method::POST;
        let good = r#"{"firmware": {"file": {"name": "v2"}}, "waves": [{"count": 1}, {"percent": 100}]}"#;
        let oversize = format!(
            r#"{{"firmware": {{"file": {{"name": "{}"}}}}, "waves": []}}"#,
            "x".repeat(2 << 20)
        );
        for (path, token, body, status) in [
            ("apps/app/rollouts", "wrong", Some(good), StatusCode::UNAUTHORIZED),
            (
                "apps/app/rollouts",
                server.token.as_str(),
                Some("{"),
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/rollouts",
                server.token.as_str(),
                Some(r#"{"firmware": {"file": {"name": "v2"}}, "waves": []}"#),
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/rollouts",
                server.token.as_str(),
                Some(r#"{"firmware": {"file": {"name": "v2"}}, "waves": [{"percent": 0}]}"#),
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/rollouts",
                server.token.as_str(),
                Some(r#"{"firmware": {"disk": {}}, "waves": [{"percent": 100}]}"#),
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/rollouts",
                server.token.as_str(),
                Some(r#"{"firmware": {"file": {"name": "v2"}}, "waves": [{"selector": "a in (b)"}]}"#),
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/rollouts",
                server.token.as_str(),
                Some(r#"{"firmware": {"file": {"name": "v1"}}, "waves": [{"percent": 100}]}"#),
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/rollouts",
                server.token.as_str(),
                Some(oversize.as_str()),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                "apps/nobody/rollouts",
                server.token.as_str(),
                Some(good),
                StatusCode::NOT_FOUND,
            ),
            (
                "apps/..%2F..%2Fetc/rollouts",
                server.token.as_str(),
                Some(good),
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/rollouts/1/explode",
                server.token.as_str(),
                None,
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/rollouts/x/pause",
                server.token.as_str(),
                None,
                StatusCode::BAD_REQUEST,
            ),
            (
                "apps/app/rollouts/99/pause",
                server.token.as_str(),
                None,
                StatusCode::NOT_FOUND,
            ),
        ] {
            let response = send(post.clone(), path, token, body).await.unwrap();
            assert_eq!(
                response.status(),
                status,
                "{backend:?} {path} {:?}",
                body.map(|b| &b[..b.len().min(80)])
            );
            let body: serde_json::Value = response.json().await.unwrap();
            assert!(body["message"].is_string(), "{path}: {body}");
        }
        let listed: serde_json::Value = send(reqwest::Method::GET, "apps/app/rollouts", &server.token, None)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            listed,
            json!([]),
            "{backend:?}: nothing was created by the refused requests"
        );

        let response = send(post.clone(), "apps/app/rollouts", &server.token, Some(good))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let created: serde_json::Value = response.json().await.unwrap();
        let id = created["id"].as_i64().unwrap();
        // The device with its own firmware is outside the rollout.
        assert_eq!(
            created["waves"],
            json!([
                {"total": 1, "pending": 1, "updating": 0, "succeeded": 0, "failed": 0},
                {"total": 0, "pending": 0, "updating": 0, "succeeded": 0, "failed": 0}
            ])
        );
        for (action, status) in [
            ("resume", StatusCode::CONFLICT),
            ("approve", StatusCode::CONFLICT),
            ("pause", StatusCode::OK),
            ("pause", StatusCode::CONFLICT),
            ("cancel", StatusCode::OK),
            ("cancel", StatusCode::CONFLICT),
        ] {
            let path = format!("apps/app/rollouts/{id}/{action}");
            let response = send(post.clone(), &path, &server.token, None).await.unwrap();
            assert_eq!(response.status(), status, "{backend:?} {action}");
        }
        let one: serde_json::Value = send(
            reqwest::Method::GET,
            &format!("apps/app/rollouts/{id}"),
            &server.token,
            None,
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        assert_eq!(one["state"], "cancelled");
        assert_eq!(one["devices"][0]["device"], "d");
        assert_eq!(
            one["outside"],
            json!([{"device": "own", "reason": "its own firmware"}]),
            "{backend:?}"
        );
        server.stop().await;
    }
}
