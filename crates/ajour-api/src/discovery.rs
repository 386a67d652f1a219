//! Discovery, as Drogue's tools do it (`drg login`, `drg endpoints`, `drg stream`): where this
//! server's API, registry, device endpoint and live stream are, in drogue-client's `Endpoints`
//! shape, and the documents `drg login` insists on before it takes an access token.
//!
//! Public, without credentials (see [`public_routes`]): `/.well-known/drogue-endpoints` (the public
//! subset of the endpoints), `/.well-known/drogue-version`, and an OpenID Connect discovery
//! document under the issuer URL named there (`{base}/oidc`). Ajour has no OpenID Connect
//! provider; `drg login URL --access-token USER:TOKEN` reads the document all the same and
//! requires its authorization and token endpoints to be URLs, then never calls them. They
//! answer 501 saying to log in with an access token.
//!
//! Behind the credentials check ([`routes`]): `/api/console/v1alpha1/info`, all of the
//! endpoints, which `drg login` fetches to check the token and `drg stream` to find the stream.
//!
//! The URLs start from the server's public base: `--public-url` when given (behind a proxy or
//! TLS terminator, which is the only way to say `https`), else `http://` and the request's `Host`
//! header, when it is a well-formed `host[:port]` (a hostile one never reaches a document), else
//! the address the server listens on.

use crate::{ApiError, ApiState};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::net::SocketAddr;

/// The Drogue Cloud API version Ajour claims in `/.well-known/drogue-version`: the one whose
/// registry, discovery and WebSocket integration APIs it speaks (those of Drogue Cloud 0.11).
/// drg 0.11 is written against it (its `COMPATIBLE_DROGUE_VERSION` is `0.11`) and shows it as the
/// connected cloud's version; Ajour's own version is beside it, under `ajour`.
pub const DROGUE_API_VERSION: &str = "0.11.0";

/// Where the issuer URL points, under the public base.
const ISSUER_PATH: &str = "/oidc";

/// Where `websocket_integration` points, under the public base: the application's name follows
/// (drg appends it to this URL as it is, so the trailing slash matters).
pub const STREAM_PATH: &str = "/api/stream/v1alpha1/apps/";

const NO_OIDC: &str = "Ajour has no OpenID Connect provider: log in with an access token: \
                       drg login URL --access-token USER:TOKEN";

/// The base URL clients reach this server at, as the discovery documents name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl {
    /// `--public-url`, normalized ([`parse_public_url`]); `None`: from each request.
    configured: Option<Base>,
    /// `host:port` used when a request has no usable `Host` header: the listen address.
    fallback: String,
    /// The CoAP endpoint's port, when it is on (`--coap-listen`): named at the public host.
    coap_port: Option<u16>,
    /// The listener itself speaks TLS (`--tls-cert`): without `--public-url`, `https` and `wss`.
    secure: bool,
}

impl Default for PublicUrl {
    /// From each request's `Host`, else `localhost`.
    fn default() -> Self {
        Self {
            configured: None,
            fallback: "localhost".into(),
            coap_port: None,
            secure: false,
        }
    }
}

impl PublicUrl {
    /// `configured` (`--public-url`) when given, else from each request, falling back to `listen`,
    /// the address the server is bound to.
    pub fn new(configured: Option<&str>, listen: SocketAddr) -> Result<Self, String> {
        Ok(Self {
            configured: configured.map(Base::parse).transpose()?,
            fallback: listen.to_string(),
            coap_port: None,
            secure: false,
        })
    }

    /// The server's own listener speaks TLS: a URL taken from a request is `https` (`wss`).
    /// A configured `--public-url` is kept as it is.
    pub fn with_tls(mut self) -> Self {
        self.secure = true;
        self
    }

    /// The CoAP device endpoint is on, at `port` of the public host.
    pub fn with_coap_port(mut self, port: u16) -> Self {
        self.coap_port = Some(port);
        self
    }

    /// The base a request is answered with.
    fn base(&self, headers: &HeaderMap) -> Base {
        if let Some(base) = &self.configured {
            return base.clone();
        }
        let host = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .filter(|host| is_authority(host));
        Base {
            secure: self.secure,
            authority: host.unwrap_or(&self.fallback).to_ascii_lowercase(),
            path: String::new(),
        }
    }
}

/// `--public-url`'s check: `http[s]://host[:port][/path]`, returned without a trailing slash.
pub fn parse_public_url(url: &str) -> Result<String, String> {
    Base::parse(url).map(|base| base.url())
}

/// A public base URL, in parts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Base {
    /// `https` (and `wss`) rather than `http` (and `ws`).
    secure: bool,
    /// `host[:port]`, checked by [`is_authority`].
    authority: String,
    /// `""`, or a path prefix a proxy strips (`/ajour`), without a trailing slash.
    path: String,
}

impl Base {
    fn parse(url: &str) -> Result<Self, String> {
        let invalid =
            |why: &str| format!("'{url}' is not a public URL ({why}): give http[s]://HOST[:PORT][/PATH]");
        let lower = url.to_ascii_lowercase();
        let (secure, rest) = if lower.starts_with("https://") {
            (true, &url["https://".len()..])
        } else if lower.starts_with("http://") {
            (false, &url["http://".len()..])
        } else {
            return Err(invalid("it must start with http:// or https://"));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if !is_authority(authority) {
            return Err(invalid(
                "the host is not a host name or address with an optional port",
            ));
        }
        let path = path.trim_end_matches('/');
        let path_ok = path.split('/').skip(1).all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        });
        if !path_ok {
            return Err(invalid(
                "the path may hold only letters, digits and - . _ ~ between slashes",
            ));
        }
        Ok(Self {
            secure,
            authority: authority.to_ascii_lowercase(),
            path: path.to_string(),
        })
    }

    /// `http[s]://authority[/path]`.
    fn url(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.path)
    }

    /// The live stream's URL, up to the application's name.
    fn stream_url(&self) -> String {
        let scheme = if self.secure { "wss" } else { "ws" };
        format!("{scheme}://{}{}{STREAM_PATH}", self.authority, self.path)
    }

    /// The host alone, without the port (an IPv6 address keeps its brackets).
    fn host(&self) -> &str {
        match self.authority.find(']') {
            Some(end) => &self.authority[..=end],
            None => self.authority.split(':').next().unwrap_or_default(),
        }
    }

    fn issuer_url(&self) -> String {
        format!("{}{ISSUER_PATH}", self.url())
    }
}

/// Whether `text` is `host[:port]` and nothing else: a DNS name or IPv4 address (letters, digits,
/// `-`, `.`) or an IPv6 address in brackets, and a port of up to five digits. What a `Host`
/// header must be to be written into a document.
fn is_authority(text: &str) -> bool {
    const MAX_LEN: usize = 261; // a DNS name's 253, a colon, a port's five digits
    if text.is_empty() || text.len() > MAX_LEN {
        return false;
    }
    let (host_ok, port) = match text.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((address, port)) => (
                !address.is_empty()
                    && address
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
                port,
            ),
            None => return false,
        },
        None => {
            let (host, port) = text.split_at(text.find(':').unwrap_or(text.len()));
            (
                !host.is_empty()
                    && !host.starts_with(['.', '-'])
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
                port,
            )
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|digits| {
            digits.bytes().all(|b| b.is_ascii_digit()) && digits.parse::<u16>().is_ok_and(|port| port > 0)
        });
    host_ok && port_ok
}

/// What anyone may read: `Endpoints.publicize()` of drogue-client. `console` is the API's base:
/// there is no web console, but `drg` prints it after some commands.
fn public_endpoints(base: &Base) -> Value {
    let api = base.url();
    json!({
        "api": api,
        "console": format!("{api}/"),
        "issuer_url": base.issuer_url(),
        "sso": base.issuer_url(),
        "registry": {"url": api},
    })
}

/// All of the endpoints: the public ones, the device endpoints (devices `POST /v1/dfu` there, as
/// to Drogue's HTTP endpoint; CoAP when it is on) and the live stream. No MQTT endpoint: Ajour
/// serves none of its own.
fn all_endpoints(base: &Base, coap_port: Option<u16>) -> Value {
    let mut endpoints = public_endpoints(base);
    endpoints["http"] = json!({"url": base.url()});
    if let Some(port) = coap_port {
        endpoints["coap"] = json!({"url": format!("coap://{}:{port}", base.host())});
    }
    endpoints["websocket_integration"] = json!({"url": base.stream_url()});
    endpoints
}

/// The public routes, outside the credentials check.
pub(crate) fn public_routes() -> Router<ApiState> {
    Router::new()
        .route("/.well-known/drogue-endpoints", get(drogue_endpoints))
        .route("/.well-known/drogue-version", get(drogue_version))
        .route(
            &format!("{ISSUER_PATH}/.well-known/openid-configuration"),
            get(openid_configuration),
        )
        .route(&format!("{ISSUER_PATH}/auth"), any(no_oidc))
        .route(&format!("{ISSUER_PATH}/token"), any(no_oidc))
}

/// The routes behind the credentials check.
pub(crate) fn routes() -> Router<ApiState> {
    Router::new().route("/api/console/v1alpha1/info", get(console_info))
}

async fn drogue_endpoints(State(state): State<ApiState>, headers: HeaderMap) -> Json<Value> {
    Json(public_endpoints(&state.public_url.base(&headers)))
}

async fn drogue_version() -> Json<Value> {
    Json(json!({"version": DROGUE_API_VERSION, "ajour": env!("CARGO_PKG_VERSION")}))
}

/// Just enough of OpenID Connect discovery for `drg login` to read: no grant is supported.
async fn openid_configuration(State(state): State<ApiState>, headers: HeaderMap) -> Json<Value> {
    let issuer = state.public_url.base(&headers).issuer_url();
    Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/auth"),
        "token_endpoint": format!("{issuer}/token"),
        "response_types_supported": [],
        "grant_types_supported": [],
        "subject_types_supported": [],
        "id_token_signing_alg_values_supported": [],
    }))
}

async fn no_oidc() -> ApiError {
    ApiError::NotImplemented(NO_OIDC.into())
}

async fn console_info(State(state): State<ApiState>, headers: HeaderMap) -> Json<Value> {
    let public = &state.public_url;
    Json(all_endpoints(&public.base(&headers), public.coap_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_host_and_port_pass_as_an_authority() {
        for good in [
            "localhost",
            "localhost:8080",
            "ajour.example.com",
            "127.0.0.1:65535",
            "[::1]",
            "[::1]:8080",
            "[::ffff:10.0.0.1]:80",
        ] {
            assert!(is_authority(good), "{good:?}");
        }
        for bad in [
            "",
            "evil.com/path",
            "evil.com:80:80",
            "a b",
            "evil.com\"><script>",
            "user@evil.com",
            "evil.com:",
            "evil.com:123456",
            "evil.com:65536",
            "evil.com:0",
            "evil.com:+80",
            "::1",
            "[::1",
            "[::1]x",
            "[]",
            ".evil",
            "-evil",
            &"a".repeat(300),
        ] {
            assert!(!is_authority(bad), "{bad:?}");
        }
    }

    #[test]
    fn public_urls_are_checked_and_normalized() {
        assert_eq!(
            parse_public_url("https://Ajour.Example.com/").unwrap(),
            "https://ajour.example.com"
        );
        assert_eq!(
            parse_public_url("http://10.0.0.1:8080").unwrap(),
            "http://10.0.0.1:8080"
        );
        assert_eq!(
            parse_public_url("HTTPS://h/ajour/v1/").unwrap(),
            "https://h/ajour/v1"
        );
        for bad in [
            "ftp://h",
            "h:8080",
            "http://",
            "http://h/a b",
            "http://h/a?b",
            "http://h//a",
            "http://u@h",
        ] {
            assert!(parse_public_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endpoints_follow_the_base() {
        let public = PublicUrl::new(
            Some("https://ajour.example.com/x"),
            "0.0.0.0:8080".parse().unwrap(),
        )
        .unwrap();
        let all = all_endpoints(&public.base(&HeaderMap::new()), None);
        assert_eq!(
            all,
            json!({
                "api": "https://ajour.example.com/x",
                "console": "https://ajour.example.com/x/",
                "issuer_url": "https://ajour.example.com/x/oidc",
                "sso": "https://ajour.example.com/x/oidc",
                "registry": {"url": "https://ajour.example.com/x"},
                "http": {"url": "https://ajour.example.com/x"},
                "websocket_integration": {"url": "wss://ajour.example.com/x/api/stream/v1alpha1/apps/"},
            })
        );
        // The CoAP endpoint, when on, at the public host and its own port.
        for (host, coap) in [
            ("Ajour.local:8080", "coap://ajour.local:5683"),
            ("[::1]:8080", "coap://[::1]:5683"),
            ("ajour.local", "coap://ajour.local:5683"),
        ] {
            let public = PublicUrl::new(None, "127.0.0.1:9999".parse().unwrap())
                .unwrap()
                .with_coap_port(5683);
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, host.parse().unwrap());
            let all = all_endpoints(&public.base(&headers), public.coap_port);
            assert_eq!(all["coap"], json!({"url": coap}), "{host}");
        }
        let from_requests = PublicUrl::new(None, "127.0.0.1:9999".parse().unwrap()).unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(from_requests.base(&headers).url(), "http://127.0.0.1:9999");
        headers.insert(header::HOST, "Ajour.local:8080".parse().unwrap());
        assert_eq!(
            from_requests.base(&headers).stream_url(),
            "ws://ajour.local:8080/api/stream/v1alpha1/apps/"
        );
        headers.insert(header::HOST, "evil.com/#".parse().unwrap());
        assert_eq!(from_requests.base(&headers).url(), "http://127.0.0.1:9999");
    }
}
