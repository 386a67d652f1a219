//! The web console's doors, without a browser (the browser drives it in `tests/console.rs`): the
//! sign-in (its form tied to the browser it was given to) and its cookie, pages closed without a session or with a forged one, forms refused
//! without their CSRF token, hostile names and oversize forms answered with an error page, a
//! user seeing only their applications, and a deleted token ending its sessions at once.

use crate::support::*;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{redirect, StatusCode};

/// A client that shows redirects instead of following them.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .unwrap()
}

/// The sign-in form as a browser gets it: its cookie (`ajour_login=…`) and CSRF token.
async fn login_form(server: &Connection) -> (String, String) {
    let response = browser()
        .get(format!("{}/login", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let set = response.headers()[SET_COOKIE].to_str().unwrap().to_string();
    let cookie = set.split_once(';').unwrap().0.to_string();
    (cookie, csrf(&response.text().await.unwrap()))
}

/// Post the sign-in form with `token`, as the browser holding `form` does.
async fn post_login(server: &Connection, form: &(String, String), token: &str) -> reqwest::Response {
    browser()
        .post(format!("{}/login", server.url))
        .header(COOKIE, &form.0)
        .form(&[("token", token), ("csrf", &form.1)])
        .send()
        .await
        .unwrap()
}

/// Sign in with `token`: the session cookie (`name=value`) and its attributes.
async fn sign_in(server: &Connection, token: &str) -> (String, String) {
    let form = login_form(server).await;
    let response = post_login(server, &form, token).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/");
    let set = response.headers()[SET_COOKIE].to_str().unwrap().to_string();
    let (pair, attributes) = set.split_once(';').unwrap();
    (pair.to_string(), attributes.to_string())
}

async fn get(server: &Connection, cookie: Option<&str>, path: &str) -> (StatusCode, String, Option<String>) {
    let mut request = browser().get(format!("{}{path}", server.url));
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let location = response
        .headers()
        .get(LOCATION)
        .map(|l| l.to_str().unwrap().to_string());
    (status, response.text().await.unwrap(), location)
}

async fn post(
    server: &Connection,
    cookie: &str,
    path: &str,
    form: &[(&str, &str)],
) -> (StatusCode, String, Option<String>) {
    let response = browser()
        .post(format!("{}{path}", server.url))
        .header(COOKIE, cookie)
        .form(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let location = response
        .headers()
        .get(LOCATION)
        .map(|l| l.to_str().unwrap().to_string());
    (status, response.text().await.unwrap(), location)
}

/// The CSRF token in a page's forms.
fn csrf(page: &str) -> String {
    let at = page
        .find(r#"name="csrf" value=""#)
        .expect("a form with its CSRF token")
        + 19;
    page[at..at + 64].to_string()
}

#[tokio::test]
async fn sign_in_sessions_and_forms_hold_against_what_a_browser_should_not_do() {
    let server = TestServer::start(Backend::Sqlite).await;
    server.add_firmware("fw", "2.0.0", &[7u8; 1024]);
    server
        .create_app("mine", Some(serde_json::json!({"file": {"name": "fw"}})))
        .await;

    // Without a session every page sends the browser to sign in; a wrong token is refused.
    for path in ["/", "/apps/mine", "/apps/mine/devices", "/builds"] {
        let (status, _, location) = get(&server, None, path).await;
        assert_eq!(
            (status, location.as_deref()),
            (StatusCode::SEE_OTHER, Some("/login")),
            "{path}"
        );
    }
    let form = login_form(&server).await;
    let response = post_login(&server, &form, "wrong").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("That token is not valid."));
    // Another site cannot sign a browser in (under a token of its choosing): the form must come
    // with the cookie it was given with.
    let forged = browser()
        .post(format!("{}/login", server.url))
        .form(&[("token", server.token.as_str()), ("csrf", form.1.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let sessions = forged
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter(|c| c.to_str().unwrap().starts_with("ajour_session="))
        .count();
    assert_eq!(sessions, 0);
    let other = login_form(&server).await;
    let mixed = post_login(&server, &(other.0, form.1.clone()), &server.token).await;
    assert_eq!(mixed.status(), StatusCode::FORBIDDEN);

    let (cookie, attributes) = sign_in(&server, &server.token).await;
    for attribute in ["HttpOnly", "SameSite=Strict", "Max-Age=28800", "Path=/"] {
        assert!(attributes.contains(attribute), "{attributes}");
    }
    let (status, overview, _) = get(&server, Some(&cookie), "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(overview.contains(r#"<tr data-app="mine">"#), "{overview}");

    // A forged or altered cookie is no session.
    let (name, value) = cookie.split_once('=').unwrap();
    let altered = format!("{name}={}", value.replacen("v1.1", "v1.2", 1));
    let (status, _, location) = get(&server, Some(&altered), "/").await;
    assert_eq!(
        (status, location.as_deref()),
        (StatusCode::SEE_OTHER, Some("/login"))
    );

    // Forms need the page's CSRF token.
    let (_, page, _) = get(&server, Some(&cookie), "/apps/mine").await;
    let token = csrf(&page);
    let (status, _, _) = post(
        &server,
        &cookie,
        "/apps/mine/firmware",
        &[("kind", "file"), ("value", "fw")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = post(
        &server,
        &cookie,
        "/apps/mine/firmware",
        &[("csrf", &"0".repeat(64)), ("kind", "file"), ("value", "fw")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, location) = post(
        &server,
        &cookie,
        "/apps/mine/firmware",
        &[("csrf", &token), ("kind", "file"), ("value", "fw")],
    )
    .await;
    assert_eq!(
        (status, location.as_deref()),
        (StatusCode::SEE_OTHER, Some("/apps/mine?notice=firmware-set"))
    );

    // Hostile names and oversize forms: an error page, nothing written.
    let (status, body, _) = post(
        &server,
        &cookie,
        "/apps/mine/firmware",
        &[("csrf", &token), ("kind", "file"), ("value", "../../etc/passwd")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _, _) = post(
        &server,
        &cookie,
        "/apps/mine/firmware",
        &[("csrf", &token), ("kind", "script"), ("value", "x")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = get(&server, Some(&cookie), "/apps/..%2F..%2Fetc%2Fpasswd").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = get(&server, Some(&cookie), "/apps/ghost").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let big = "x".repeat(32 * 1024);
    let (status, _, _) = post(
        &server,
        &cookie,
        "/apps/mine/firmware",
        &[("csrf", &token), ("kind", "file"), ("value", &big)],
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (_, object) = server.api_send(reqwest::Method::GET, "apps/mine", None).await;
    assert_eq!(
        object["spec"]["firmware"],
        serde_json::json!({"file": {"name": "fw"}})
    );
    // Markup in a name is text, never markup.
    let (_, page, _) = get(&server, Some(&cookie), "/apps/mine/devices?state=<script>").await;
    assert!(!page.contains("<script>"), "{page}");

    // A user sees only the applications they may, and their session ends with their token.
    let eve = server.user_token("eve").await;
    let (eve_cookie, _) = sign_in(&server, eve["token"].as_str().unwrap()).await;
    let (status, overview, _) = get(&server, Some(&eve_cookie), "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!overview.contains("mine"), "{overview}");
    let (status, _, _) = get(&server, Some(&eve_cookie), "/apps/mine").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let prefix = eve["prefix"].as_str().expect("the token's prefix");
    let response = server
        .http
        .delete(format!("{}/api/tokens/v1alpha1/{prefix}?user=eve", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, _, location) = get(&server, Some(&eve_cookie), "/").await;
    assert_eq!(
        (status, location.as_deref()),
        (StatusCode::SEE_OTHER, Some("/login"))
    );

    // A device's own firmware, set and removed from its page.
    server.create_device("mine", "dev", "pw", None).await;
    let (_, page, _) = get(&server, Some(&cookie), "/apps/mine/devices/dev").await;
    let token = csrf(&page);
    let (status, _, location) = post(
        &server,
        &cookie,
        "/apps/mine/devices/dev/firmware",
        &[("csrf", &token), ("kind", "container"), ("value", "fw-image:2")],
    )
    .await;
    assert_eq!(
        (status, location.as_deref()),
        (
            StatusCode::SEE_OTHER,
            Some("/apps/mine/devices/dev?notice=override-set")
        )
    );
    let device = server.device("mine", "dev").await;
    assert_eq!(
        device["spec"]["firmware"],
        serde_json::json!({"container": {"image": "fw-image:2", "imagePullPolicy": "Always"}})
    );
    let (_, page, _) = get(&server, Some(&cookie), "/apps/mine/devices/dev").await;
    assert!(page.contains("container image fw-image:2"), "{page}");
    let (status, _, _) = post(
        &server,
        &cookie,
        "/apps/mine/devices/dev/firmware/remove",
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(server.device("mine", "dev").await["spec"].get("firmware"), None);

    // Signing out clears the cookie.
    let (_, page, _) = get(&server, Some(&cookie), "/").await;
    let response = browser()
        .post(format!("{}/logout", server.url))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf(&page))])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert!(response.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    server.stop().await;
}
