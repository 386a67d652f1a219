//! Users, tokens and roles, in process on the SQL registry (SQLite): every role against every
//! kind of request, and the token API's rules. The same store runs on PostgreSQL in
//! `ajour-registry`'s tests; the real `drg` drives these APIs in `ajour`'s `drg` test.

use ajour_api::{router, ApiState, ApiToken};
use ajour_registry::SqlRegistry;
use ajour_service::{ServiceConfig, UpdateService};
use ajour_types::basic_auth;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const BOOTSTRAP: &str = "bootstrap-token";

struct Api {
    router: axum::Router,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stored = Arc::new(
            SqlRegistry::connect(&SqlRegistry::sqlite_url(dir.path()), Default::default())
                .await
                .unwrap(),
        );
        let service = Arc::new(
            UpdateService::new(
                stored.clone(),
                Arc::new(ajour_store::Firmware::default()),
                ServiceConfig::default(),
            )
            .with_rollouts(stored.clone()),
        );
        let state = ApiState {
            registry: stored.clone(),
            service,
            access: stored,
            builds: None,
            public_url: Default::default(),
        };
        Self {
            router: router(state, ApiToken::new(BOOTSTRAP)),
            _dir: dir,
        }
    }

    /// `authorization` is the whole header value, or `None` for none.
    async fn call(
        &self,
        authorization: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(Some(&format!("Bearer {BOOTSTRAP}")), method, path, body)
            .await
    }

    /// A user's first token, made with the bootstrap token; returns Basic credentials for it.
    async fn user(&self, name: &str) -> String {
        let (status, body) = self
            .admin(
                Method::POST,
                &format!("/api/tokens/v1alpha1?user={name}&description=first"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        basic_auth::encode(name, body["token"].as_str().unwrap())
    }
}

fn device(name: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {"authentication": {"credentials": [{"pass": "secret"}]}}})
}

#[tokio::test]
async fn every_role_against_every_kind_of_request() {
    let api = Api::start().await;
    let owner = api.user("olga").await;
    let roles = [
        ("owner", owner.clone()),
        ("admin", api.user("ada").await),
        ("manager", api.user("max").await),
        ("reader", api.user("rita").await),
        ("stranger", api.user("mallory").await),
    ];
    let registry = "/api/registry/v1alpha1/apps";
    let (status, body) = api
        .call(
            Some(&owner),
            Method::POST,
            registry,
            Some(json!({"metadata": {"name": "fleet"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = api
        .call(
            Some(&owner),
            Method::POST,
            &format!("{registry}/fleet/devices"),
            Some(device("dev1")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let members = json!({"members": {"ada": {"role": "admin"}, "max": {"role": "manager"}, "rita": {"role": "reader"}}});
    let members_path = "/api/admin/v1alpha1/apps/fleet/members";
    let (status, body) = api
        .call(Some(&owner), Method::PUT, members_path, Some(members.clone()))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    use StatusCode as S;
    // What each kind of request answers to each role: (owner, admin, manager, reader, stranger).
    // A stranger sees nothing: "not found", as for an application that does not exist.
    let read = [S::OK, S::OK, S::OK, S::OK, S::NOT_FOUND];
    let app_spec = json!({"metadata": {"name": "fleet"}, "spec": {"firmware": {"file": {"name": "fw-2"}}}});
    for (index, (role, auth)) in roles.iter().enumerate() {
        let auth = Some(auth.as_str());
        let mine = format!("new-{role}");
        let write_ok = index <= 2;
        let write = |ok: StatusCode| match index {
            0..=2 => ok,
            3 => S::FORBIDDEN,
            _ => S::NOT_FOUND,
        };
        let admin = |ok: StatusCode| match index {
            0 | 1 => ok,
            2 | 3 => S::FORBIDDEN,
            _ => S::NOT_FOUND,
        };
        let cases: Vec<(Method, String, Option<Value>, StatusCode)> = vec![
            (Method::GET, format!("{registry}/fleet"), None, read[index]),
            (
                Method::GET,
                format!("{registry}/fleet/devices"),
                None,
                read[index],
            ),
            (
                Method::GET,
                format!("{registry}/fleet/devices/dev1"),
                None,
                read[index],
            ),
            (
                Method::GET,
                "/api/dfu/v1alpha1/apps/fleet/devices/dev1/history".into(),
                None,
                read[index],
            ),
            (
                Method::GET,
                "/api/dfu/v1alpha1/apps/fleet/rollouts".into(),
                None,
                read[index],
            ),
            (
                Method::POST,
                format!("{registry}/fleet/devices"),
                Some(device(&mine)),
                write(S::CREATED),
            ),
            (
                Method::PUT,
                format!("{registry}/fleet/devices/dev1"),
                Some(device("dev1")),
                write(S::NO_CONTENT),
            ),
            (
                Method::PUT,
                format!("{registry}/fleet"),
                Some(app_spec.clone()),
                write(S::NO_CONTENT),
            ),
            // An unknown action is refused only after the role check: 400 means it got that far.
            (
                Method::POST,
                "/api/dfu/v1alpha1/apps/fleet/rollouts/1/explode".into(),
                None,
                write(S::BAD_REQUEST),
            ),
            (
                Method::DELETE,
                format!(
                    "{registry}/fleet/devices/{}",
                    if write_ok { mine.as_str() } else { "dev1" }
                ),
                None,
                write(S::NO_CONTENT),
            ),
            (Method::GET, members_path.into(), None, admin(S::OK)),
            (
                Method::PUT,
                members_path.into(),
                Some(members.clone()),
                admin(S::NO_CONTENT),
            ),
        ];
        for (method, path, body, expected) in cases {
            let (status, answer) = api.call(auth, method.clone(), &path, body).await;
            assert_eq!(status, expected, "{role}: {method} {path}: {answer}");
            if status == S::FORBIDDEN {
                assert!(answer["message"].as_str().unwrap().contains("needs"), "{answer}");
            }
        }
        // Handing the application over is the owner's alone.
        let transfer = "/api/admin/v1alpha1/apps/fleet/transfer-ownership";
        let expected = match index {
            0 => S::NO_CONTENT,
            1..=3 => S::FORBIDDEN,
            _ => S::NOT_FOUND,
        };
        let (status, _) = api
            .call(auth, Method::PUT, transfer, Some(json!({"newUser": "zed"})))
            .await;
        assert_eq!(status, expected, "{role}: transfer");
        // And deleting it needs the admin role: tried by those who may not, it stays.
        if index >= 2 {
            let (status, _) = api
                .call(auth, Method::DELETE, &format!("{registry}/fleet"), None)
                .await;
            assert_eq!(status, admin(S::NO_CONTENT), "{role}: delete");
        }
    }

    // Listing: each user sees the applications they own or are a member of, the bootstrap token all.
    let (status, _) = api
        .call(
            Some(&roles[4].1),
            Method::POST,
            registry,
            Some(json!({"metadata": {"name": "mallorys"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let names = |body: Value| -> Vec<String> {
        body.as_array()
            .unwrap()
            .iter()
            .map(|a| a["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, listed) = api.call(Some(&roles[3].1), Method::GET, registry, None).await;
    assert_eq!(names(listed), ["fleet"]);
    let (_, listed) = api.call(Some(&roles[4].1), Method::GET, registry, None).await;
    assert_eq!(names(listed), ["mallorys"]);
    let (_, listed) = api.admin(Method::GET, registry, None).await;
    assert_eq!(names(listed), ["fleet", "mallorys"]);

    // The member with the admin role deletes it; its members go with it.
    let (status, _) = api
        .call(
            Some(&roles[1].1),
            Method::DELETE,
            &format!("{registry}/fleet"),
            None,
        )
        .await;
    assert_eq!(status, S::NO_CONTENT);
    let (status, _) = api
        .call(Some(&owner), Method::GET, &format!("{registry}/fleet"), None)
        .await;
    assert_eq!(status, S::NOT_FOUND);
    let (_, listed) = api.call(Some(&roles[3].1), Method::GET, registry, None).await;
    assert_eq!(names(listed), Vec::<String>::new());
}

#[tokio::test]
async fn a_transfer_makes_the_new_user_owner_once_accepted() {
    let api = Api::start().await;
    let olga = api.user("olga").await;
    let zed = api.user("zed").await;
    let apps = "/api/registry/v1alpha1/apps";
    api.call(
        Some(&olga),
        Method::POST,
        apps,
        Some(json!({"metadata": {"name": "fleet"}})),
    )
    .await;
    let transfer = "/api/admin/v1alpha1/apps/fleet/transfer-ownership";
    let accept = "/api/admin/v1alpha1/apps/fleet/accept-ownership";
    // Not offered yet: to zed, there is nothing to accept.
    assert_eq!(
        api.call(Some(&zed), Method::PUT, accept, None).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, _) = api
        .call(
            Some(&olga),
            Method::PUT,
            transfer,
            Some(json!({"newUser": "zed"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, offer) = api.call(Some(&olga), Method::GET, transfer, None).await;
    assert_eq!(offer, json!({"newUser": "zed"}));
    assert_eq!(
        api.call(Some(&zed), Method::PUT, accept, None).await.0,
        StatusCode::NO_CONTENT
    );
    // Zed owns it now; Olga, no member, sees it no more.
    assert_eq!(
        api.call(Some(&zed), Method::GET, &format!("{apps}/fleet"), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        api.call(Some(&olga), Method::GET, &format!("{apps}/fleet"), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    // Hostile names and unknown roles are refused.
    let members = "/api/admin/v1alpha1/apps/fleet/members";
    for (path, body) in [
        (transfer, json!({"newUser": "../../etc/passwd"})),
        (members, json!({"members": {"a:b": {"role": "reader"}}})),
        (members, json!({"members": {"ann": {"role": "owner"}}})),
    ] {
        let (status, answer) = api.call(Some(&zed), Method::PUT, path, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
}

#[tokio::test]
async fn access_tokens_are_shown_once_stored_hashed_and_bound_to_their_user() {
    let api = Api::start().await;
    let tokens = "/api/tokens/v1alpha1";
    // The bootstrap token belongs to no user: it must name one.
    let (status, body) = api.admin(Method::POST, tokens, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, created) = api
        .admin(Method::POST, &format!("{tokens}?user=alice"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let token = created["token"].as_str().unwrap().to_string();
    let prefix = created["prefix"].as_str().unwrap().to_string();
    assert!(token.contains(&prefix));

    // Accepted as Bearer and as Basic with the user's own name only.
    let bearer = format!("Bearer {token}");
    let basic = basic_auth::encode("alice", &token);
    for auth in [&bearer, &basic] {
        let (status, listed) = api.call(Some(auth), Method::GET, tokens, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(listed.as_array().unwrap().len(), 1);
        // Listed by prefix, never the token itself.
        assert_eq!(listed[0]["prefix"], prefix.as_str());
        assert!(!listed.to_string().contains(&token));
    }
    for wrong in [
        basic_auth::encode("bob", &token),
        format!("Bearer {token}x"),
        format!("Bearer ajr_{prefix}_{}", "0".repeat(32)),
        "Basic !!!".to_string(),
    ] {
        assert_eq!(
            api.call(Some(&wrong), Method::GET, tokens, None).await.0,
            StatusCode::UNAUTHORIZED,
            "{wrong}"
        );
    }
    assert_eq!(
        api.call(None, Method::GET, tokens, None).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A user makes more for themselves, with a description, but not for others.
    let (status, second) = api
        .call(
            Some(&bearer),
            Method::POST,
            &format!("{tokens}?description=ci"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, listed) = api.call(Some(&bearer), Method::GET, tokens, None).await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["description"] == "ci"));
    let (status, _) = api
        .call(Some(&bearer), Method::POST, &format!("{tokens}?user=bob"), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A deleted token is refused at once; the other one goes on.
    let second_bearer = format!("Bearer {}", second["token"].as_str().unwrap());
    let path = format!("{tokens}/{}", second["prefix"].as_str().unwrap());
    assert_eq!(
        api.call(Some(&bearer), Method::DELETE, &path, None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.call(Some(&bearer), Method::DELETE, &path, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.call(Some(&second_bearer), Method::GET, tokens, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call(Some(&bearer), Method::GET, tokens, None).await.0,
        StatusCode::OK
    );

    // Hostile user names never become users.
    let (status, _) = api
        .admin(
            Method::POST,
            &format!("{tokens}?user=..%2F..%2Fetc%2Fpasswd"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn members_are_locked_optimistically_and_tokens_per_user_are_bounded() {
    let api = Api::start().await;
    let olga = api.user("olga").await;
    let (status, _) = api
        .call(
            Some(&olga),
            Method::POST,
            "/api/registry/v1alpha1/apps",
            Some(json!({"metadata": {"name": "fleet"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let members = "/api/admin/v1alpha1/apps/fleet/members";
    let (_, read) = api.call(Some(&olga), Method::GET, members, None).await;
    let version = read["resourceVersion"].as_str().unwrap().to_string();
    let with =
        |role: &str, version: &str| json!({"resourceVersion": version, "members": {"rita": {"role": role}}});
    let (status, _) = api
        .call(Some(&olga), Method::PUT, members, Some(with("reader", &version)))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Written meanwhile: the version read before is stale, and nothing changes.
    let (status, body) = api
        .call(Some(&olga), Method::PUT, members, Some(with("admin", &version)))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, read) = api.call(Some(&olga), Method::GET, members, None).await;
    assert_eq!(read["members"], json!({"rita": {"role": "reader"}}));

    // A user holds at most 100 tokens (the first one included).
    let tokens = "/api/tokens/v1alpha1";
    for _ in 1..100 {
        let (status, _) = api.call(Some(&olga), Method::POST, tokens, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = api.call(Some(&olga), Method::POST, tokens, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, listed) = api.call(Some(&olga), Method::GET, tokens, None).await;
    assert_eq!(listed.as_array().unwrap().len(), 100);
}
