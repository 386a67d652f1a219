//! What Drogue's tools find at `ajour serve`: the public discovery documents `drg login` reads
//! (with and without `--public-url`, never naming a hostile `Host`), the OpenID Connect document
//! with no provider behind it, the endpoints behind credentials, Drogue's command endpoint (501),
//! and the live stream of an application's DFU traffic (`drg stream`) over a real WebSocket:
//! in order, of that application only, for those who may read it, and never holding devices up.

use crate::support::*;
use ajour_sim::Outcome;
use ajour_types::AppName;
use base64::Engine as _;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `Authorization` as drg sends an access token.
fn basic(user: &str, token: &str) -> String {
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"));
    format!("Basic {credentials}")
}

async fn get_json(
    server: &Connection,
    path: &str,
    authorization: Option<&str>,
    host: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = server.http.get(format!("{}{path}", server.url));
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    if let Some(host) = host {
        request = request.header("host", host);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The endpoints anyone may read, for a server at `base`.
fn public_endpoints(base: &str) -> Value {
    json!({
        "api": base,
        "console": format!("{base}/"),
        "issuer_url": format!("{base}/oidc"),
        "sso": format!("{base}/oidc"),
        "registry": {"url": base},
    })
}

/// Every endpoint, for a server at `base` (`ws` the stream's scheme).
fn all_endpoints(base: &str, ws: &str) -> Value {
    let mut endpoints = public_endpoints(base);
    endpoints["http"] = json!({"url": base});
    let authority = base.split_once("://").unwrap().1;
    endpoints["websocket_integration"] =
        json!({"url": format!("{ws}://{authority}/api/stream/v1alpha1/apps/")});
    endpoints
}

/// What `drg login URL --access-token USER:TOKEN` reads before it takes the token: the public
/// endpoints, then the OpenID Connect document under their issuer URL (joined as drg does), whose
/// two endpoints must be URLs. `base` is the server's public URL, which the issuer URL is under;
/// the document is fetched from the server itself, as a proxy at `base` would.
async fn drg_login_reads(server: &Connection, host: Option<&str>, base: &str) -> (Value, Value) {
    let (status, endpoints) = get_json(server, "/.well-known/drogue-endpoints", None, host).await;
    assert_eq!(status, StatusCode::OK, "{endpoints}");
    let issuer = Url::parse(&format!("{}/", endpoints["issuer_url"].as_str().unwrap())).unwrap();
    let document_url = issuer.join(".well-known/openid-configuration").unwrap();
    let path = document_url
        .as_str()
        .strip_prefix(base)
        .unwrap_or_else(|| panic!("{document_url} is not under {base}"));
    let (status, document) = get_json(server, path, None, host).await;
    assert_eq!(status, StatusCode::OK, "{document_url}: {document}");
    for endpoint in ["authorization_endpoint", "token_endpoint"] {
        let url = document[endpoint]
            .as_str()
            .unwrap_or_else(|| panic!("{endpoint}: {document}"));
        Url::parse(url).unwrap();
    }
    (endpoints, document)
}

#[tokio::test]
async fn discovery_is_public_and_names_the_server_as_the_client_reached_it() {
    let server = TestServer::start(Backend::Sqlite).await;
    let base = server.url.clone();

    let (endpoints, document) = drg_login_reads(&server, None, &base).await;
    assert_eq!(endpoints, public_endpoints(&base));
    assert_eq!(document["issuer"], format!("{base}/oidc"));
    let authorization = Url::parse(document["authorization_endpoint"].as_str().unwrap()).unwrap();
    let token = Url::parse(document["token_endpoint"].as_str().unwrap()).unwrap();
    // Both say, in Drogue's error shape, how to log in instead.
    for (method, url) in [(Method::GET, &authorization), (Method::POST, &token)] {
        let response = server.http.request(method, url.clone()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_IMPLEMENTED, "{url}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "NotImplemented");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("no OpenID Connect provider") && message.contains("--access-token USER:TOKEN"),
            "{message}"
        );
    }

    let (status, version) = get_json(&server, "/.well-known/drogue-version", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version["version"], "0.11.0");
    assert_eq!(version["ajour"], env!("CARGO_PKG_VERSION"));

    // The name the client used is the one it is given back.
    let (endpoints, document) =
        drg_login_reads(&server, Some("ajour.test:1234"), "http://ajour.test:1234").await;
    assert_eq!(endpoints, public_endpoints("http://ajour.test:1234"));
    assert_eq!(document["token_endpoint"], "http://ajour.test:1234/oidc/token");
    // A hostile one is not: the listen address stands in.
    for hostile in [
        "evil.test/\"><script>",
        "user@evil.test",
        "evil.test:80:80",
        "evil.test:99999",
    ] {
        let (status, endpoints) =
            get_json(&server, "/.well-known/drogue-endpoints", None, Some(hostile)).await;
        assert_eq!(status, StatusCode::OK, "{hostile}");
        assert_eq!(endpoints, public_endpoints(&base), "{hostile}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_public_url_is_what_every_document_names() {
    // Through the flag (normalized: lower case, no trailing slash), whatever the Host says.
    let server = ServeProcess::start(
        Backend::Sqlite,
        &["--public-url", "HTTPS://Ajour.Example.com/fleet/"],
        &[],
    )
    .await;
    let base = "https://ajour.example.com/fleet";
    for host in [None, Some("elsewhere.test")] {
        let (endpoints, document) = drg_login_reads(&server, host, base).await;
        assert_eq!(endpoints, public_endpoints(base));
        assert_eq!(document["authorization_endpoint"], format!("{base}/oidc/auth"));
        let admin = basic("admin", &server.token);
        let (status, info) = get_json(&server, "/api/console/v1alpha1/info", Some(&admin), host).await;
        assert_eq!(status, StatusCode::OK, "{info}");
        assert_eq!(info, all_endpoints(base, "wss"));
    }
    // One that is not a URL of a host is refused before the server starts.
    let output = std::process::Command::new(AJOUR)
        .args([
            "serve",
            "--print-config",
            "--public-url",
            "ftp://ajour.example.com",
        ])
        .output()
        .unwrap();
    let stderr = failed(output);
    assert!(stderr.contains("is not a public URL"), "{stderr}");
}

#[tokio::test]
async fn the_full_endpoints_need_credentials_and_commands_are_not_taken() {
    let server = TestServer::start(Backend::Sqlite).await;
    let (status, body) = get_json(&server, "/api/console/v1alpha1/info", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = get_json(&server, "/api/console/v1alpha1/info", Some("Bearer wrong"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // drg checks its token by reading them.
    let admin = basic("admin", &server.token);
    let (status, info) = get_json(&server, "/api/console/v1alpha1/info", Some(&admin), None).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info, all_endpoints(&server.url, "ws"));

    // `drg command`: Drogue's command endpoint, behind credentials, answered 501.
    let command = format!(
        "{}/api/command/v1alpha1/apps/app/devices/dev?command=reboot",
        server.url
    );
    let response = server.http.post(&command).json(&json!({})).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = server
        .http
        .post(&command)
        .header("authorization", &admin)
        .json(&json!({"reboot": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_IMPLEMENTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "NotImplemented");
    assert!(
        body["message"].as_str().unwrap().contains("no command endpoint"),
        "{body}"
    );
    server.stop().await;
}

/// Open the live stream at `url` as drg does (Basic `user:token`, when given).
async fn watch(url: &str, authorization: Option<&str>) -> Result<Socket, tungstenite::Error> {
    let mut request = url.into_client_request().unwrap();
    if let Some(authorization) = authorization {
        request
            .headers_mut()
            .insert("authorization", authorization.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

/// The status a refused handshake was answered with.
async fn refused(url: &str, authorization: Option<&str>) -> u16 {
    match watch(url, authorization).await {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{url}: {other}"),
        Ok(_) => panic!("{url}: a stream was opened"),
    }
}

/// The next frame that is not a ping or pong, within 30 s.
async fn next_frame(socket: &mut Socket) -> Message {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a frame within 30 s")
            .expect("the stream is open")
            .expect("a well-formed frame");
        if !matches!(frame, Message::Ping(_) | Message::Pong(_)) {
            return frame;
        }
    }
}

/// The next event, checked to be a CloudEvent about device `dev` of `app`; its type and data.
async fn next_event(socket: &mut Socket, app: &str) -> (String, Value) {
    let frame = next_frame(socket).await;
    let Message::Text(text) = frame else {
        panic!("expected an event, got {frame:?}");
    };
    let event: Value = serde_json::from_str(&text).unwrap();
    for (attribute, value) in [
        ("specversion", "1.0"),
        ("source", &format!("drogue://{app}/dev")),
        ("subject", "dfu"),
        ("datacontenttype", "application/json"),
        ("application", app),
        ("device", "dev"),
        ("sender", "dev"),
        ("instance", "ajour"),
    ] {
        assert_eq!(event[attribute], value, "{attribute}: {event}");
    }
    assert!(!event["id"].as_str().unwrap().is_empty(), "{event}");
    // RFC 3339 in UTC, to the millisecond: 2025-01-31T12:00:00.000Z.
    let time = event["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.as_bytes()[10] == b'T' && time.ends_with('Z'),
        "{event}"
    );
    (event["type"].as_str().unwrap().to_string(), event["data"].clone())
}

#[tokio::test]
async fn a_watcher_sees_each_status_and_command_of_its_application_in_order() {
    const SIZE: usize = 3000;
    const MTU: u32 = 512;
    let mut server = TestServer::start(Backend::Sqlite).await;
    let image = firmware_bytes(SIZE, 3);
    server.add_firmware("fw", "2.0.0", &image);
    for app in ["watched", "other"] {
        server
            .create_app(app, Some(json!({"file": {"name": "fw"}})))
            .await;
        server.create_device(app, "dev", "pw", None).await;
    }
    // Where the stream is, found as drg finds it.
    let admin = basic("admin", &server.token);
    let (_, info) = get_json(&server, "/api/console/v1alpha1/info", Some(&admin), None).await;
    let stream = info["websocket_integration"]["url"].as_str().unwrap();
    let mut watcher = watch(&format!("{stream}watched"), Some(&admin)).await.unwrap();
    let traffic = server.service().traffic().clone();
    assert_eq!(traffic.subscribers(&AppName::parse("watched").unwrap()), 1);

    // The other application's device first: were its events let through, they would come first.
    let updated = Outcome::Updated {
        from: "1.0.0".into(),
        to: "2.0.0".into(),
        bytes: SIZE,
    };
    assert_eq!(
        update_over_http(&server, "other", "dev", "1.0.0", Some(MTU))
            .await
            .0,
        updated
    );
    assert_eq!(
        update_over_http(&server, "watched", "dev", "1.0.0", Some(MTU))
            .await
            .0,
        updated
    );

    // Every status with the command that answered it, up to the device's Sync on 2.0.0.
    let mut expected = Vec::new();
    for offset in (0..SIZE as u32).step_by(MTU as usize) {
        let status = match offset {
            0 => json!({"version": "1.0.0", "mtu": MTU}),
            _ => json!({"version": "1.0.0", "mtu": MTU, "update": {"version": "2.0.0", "offset": offset}}),
        };
        let length = (SIZE as u32 - offset).min(MTU);
        let write = json!({"command": "write", "version": "2.0.0", "offset": offset, "length": length});
        expected.push((status, write));
    }
    expected.push((
        json!({"version": "1.0.0", "mtu": MTU, "update": {"version": "2.0.0", "offset": SIZE}}),
        json!({"command": "swap", "version": "2.0.0", "checksum": hex::encode(Sha256::digest(&image))}),
    ));
    expected.push((
        json!({"version": "2.0.0", "mtu": MTU}),
        json!({"command": "sync", "version": "2.0.0"}),
    ));
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let (status_type, status) = next_event(&mut watcher, "watched").await;
        assert_eq!(status_type, "io.drogue.event.v1", "{status}");
        let (command_type, command) = next_event(&mut watcher, "watched").await;
        assert_eq!(command_type, "io.ajour.command.v1", "{command}");
        seen.push((status, command));
    }
    assert_eq!(seen, expected);

    // Shutdown ends the stream, saying so.
    server.shut_down().await;
    match next_frame(&mut watcher).await {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode::Away);
            assert_eq!(frame.reason.as_str(), "server shutting down");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn only_those_who_may_read_an_application_watch_it() {
    let server = TestServer::start(Backend::Sqlite).await;
    server.create_app("watched", None).await;
    let stream = format!(
        "ws://{}/api/stream/v1alpha1/apps/",
        server.url.trim_start_matches("http://")
    );
    let watched = format!("{stream}watched");
    assert_eq!(refused(&watched, None).await, 401);
    assert_eq!(refused(&watched, Some(&basic("admin", "wrong"))).await, 401);
    // A user who is neither its owner nor a member: as if it did not exist.
    let eve = server.user_token("eve").await;
    let eve = basic("eve", eve["token"].as_str().unwrap());
    assert_eq!(refused(&watched, Some(&eve)).await, 404);
    // She is who she says (her token works), she just may not see it.
    let (status, _) = get_json(&server, "/api/console/v1alpha1/info", Some(&eve), None).await;
    assert_eq!(status, StatusCode::OK);
    // Not even the administrator watches what does not exist, or what cannot be a name.
    let admin = basic("admin", &server.token);
    assert_eq!(refused(&format!("{stream}no-such-app"), Some(&admin)).await, 404);
    assert_eq!(refused(&format!("{stream}Not_A_Name"), Some(&admin)).await, 400);
    let traffic = server.service().traffic();
    assert_eq!(traffic.subscribers(&AppName::parse("watched").unwrap()), 0);
    // The administrator does watch it, until they close the stream: the server answers the
    // close and forgets the watcher.
    let mut watcher = watch(&watched, Some(&admin)).await.unwrap();
    let app = AppName::parse("watched").unwrap();
    assert_eq!(traffic.subscribers(&app), 1);
    watcher.close(None).await.unwrap();
    assert!(matches!(next_frame(&mut watcher).await, Message::Close(_)));
    eventually(
        Duration::from_secs(10),
        "the closed stream's watcher to go",
        || {
            let app = app.clone();
            async move { traffic.subscribers(&app) == 0 }
        },
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_watcher_that_reads_nothing_is_dropped_and_devices_never_wait_for_it() {
    const SIZE: usize = 64 * 1024;
    let server = TestServer::start(Backend::Sqlite).await;
    server.add_firmware("fw", "2.0.0", &firmware_bytes(SIZE, 9));
    server
        .create_app("busy", Some(json!({"file": {"name": "fw"}})))
        .await;
    let app = AppName::parse("busy").unwrap();
    let traffic = server.service().traffic().clone();

    // A client that never reads, with a small receive buffer, so that its socket fills soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address = server.url.trim_start_matches("http://");
    let connection = socket.connect(address.parse().unwrap()).await.unwrap();
    let mut request = format!("ws://{address}/api/stream/v1alpha1/apps/busy")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", basic("admin", &server.token).parse().unwrap());
    let (stalled, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(connection))
        .await
        .unwrap();
    assert_eq!(traffic.subscribers(&app), 1);

    // Devices update, one after another, until the watcher is dropped: each in full, in the time
    // of a device that nobody watches.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut devices = 0;
    while traffic.dropped() == 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled watcher still subscribed after {devices} device updates"
        );
        let name = format!("dev-{devices}");
        server.create_device("busy", &name, "pw", None).await;
        let (outcome, _) = update_over_http(&server, "busy", &name, "1.0.0", Some(64)).await;
        assert_eq!(
            outcome,
            Outcome::Updated {
                from: "1.0.0".into(),
                to: "2.0.0".into(),
                bytes: SIZE
            }
        );
        devices += 1;
    }
    assert_eq!(traffic.dropped(), 1);
    eventually(
        Duration::from_secs(10),
        "the dropped watcher's channel to go",
        || {
            let traffic = traffic.clone();
            let app = app.clone();
            async move { traffic.subscribers(&app) == 0 }
        },
    )
    .await;
    drop(stalled);
    server.stop().await;
}
