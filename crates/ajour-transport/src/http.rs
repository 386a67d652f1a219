//! Drogue-compatible HTTP device endpoint.
//!
//! `POST /v1/{channel}[?ct=N][&application=APP][&as=DEVICE]`, Basic auth `device@app:password`
//! (or `device:password` with `?application=`). With `as=DEVICE`, the device logged in is a
//! gateway (a BLE bridge, say) sending the status of `DEVICE` of its application, which must name
//! it in `spec.gatewaySelector.matchNames`, as on Drogue's endpoint. On channel `dfu` the body is a CBOR status and the
//! answer is `200` with header `command: dfu` and the CBOR command as body, at once: a command is
//! always ready, so `ct` needs no waiting. Other channels are accepted with `202` and no body.
//!
//! | case | answer |
//! |---|---|
//! | no or malformed `Authorization` (and no client certificate) | 401 |
//! | a client certificate (over TLS, no `Authorization`) no application trusts, or naming no device of it | 403 |
//! | unknown device or wrong password | 403, after the same delay |
//! | `as=` a device that does not name the gateway (or does not exist) | 403, saying so |
//! | too many failed logins from this address or for this device | 429 with `Retry-After` |
//! | body larger than a status can be | 413 |
//! | body not arrived within the server's body timeout | 408 |
//! | body that is not a status | 400, naming what is wrong |
//! | registry unreachable while authenticating | 503 |

use crate::client_cert::ClientChain;
use ajour_protocol::MAX_STATUS_SIZE;
use ajour_service::{error_total, CertSignIn, Refusal, SignIn, UpdateService};
use ajour_types::basic_auth;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Extension;
use axum::Router;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::Instrument;

/// The channel DFU statuses arrive on, and the name of the command they are answered with.
pub const DFU_CHANNEL: &str = "dfu";

#[derive(Debug, Deserialize)]
pub struct EndpointQuery {
    /// How long the device is willing to wait for a command. Ajour answers at once.
    #[allow(dead_code)]
    ct: Option<u64>,
    application: Option<String>,
    #[serde(rename = "as")]
    as_device: Option<String>,
}

/// The device endpoint's routes.
pub fn router(service: Arc<UpdateService>) -> Router {
    Router::new()
        .route("/v1/{channel}", post(publish))
        .with_state(service)
}

async fn publish(
    State(service): State<Arc<UpdateService>>,
    Path(channel): Path<String>,
    Query(query): Query<EndpointQuery>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    chain: Option<Extension<ClientChain>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let peer = peer.map(|Extension(ConnectInfo(address))| address.ip());
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(basic_auth::parse);
    let Some((user, password)) = credentials else {
        // No password: a client certificate, when the device presented one over TLS.
        if let Some(Extension(ClientChain(chain))) = chain {
            let given = CertSignIn {
                chain: &chain,
                application: query.application.as_deref(),
                as_device: query.as_device.as_deref(),
                peer,
            };
            let device = match service.sign_in_certificate(&given).await {
                Ok(device) => device,
                Err(refusal) => return refused(refusal),
            };
            let span = ajour_service::device_span(device.key());
            return answer(device, &channel, body).instrument(span).await;
        }
        error_total("auth_missing");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"ajour\"")],
            "missing or malformed Basic authorization: use device@application:password\n",
        )
            .into_response();
    };
    let given = SignIn {
        user: &user,
        password: &password,
        application: query.application.as_deref(),
        as_device: query.as_device.as_deref(),
        peer,
    };
    let key = match given.key() {
        Ok(key) => key,
        Err(refusal) => return refused(refusal),
    };
    // Everything logged from here on, down to the registry and the firmware source, names the
    // device and its application.
    let span = ajour_service::device_span(&key);
    async {
        match service.sign_in(&key, &given).await {
            Ok(device) => answer(device, &channel, body).await,
            Err(refusal) => refused(refusal),
        }
    }
    .instrument(span)
    .await
}

/// What a refused request is answered.
fn refused(refusal: Refusal) -> Response {
    match refusal {
        Refusal::NoApplication => (
            StatusCode::UNAUTHORIZED,
            "no application: authenticate as device@application or add ?application=\n",
        )
            .into_response(),
        Refusal::Denied => StatusCode::FORBIDDEN.into_response(),
        Refusal::Throttled { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after.as_secs().to_string())],
            "too many failed logins; try again later\n",
        )
            .into_response(),
        Refusal::NotListed(why) => (StatusCode::FORBIDDEN, format!("{why}\n")).into_response(),
        Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// Answer the status of a device signed in (or, with `as=`, the status the gateway sends for
/// that device), in the device's span.
async fn answer(device: ajour_service::Device<'_>, channel: &str, body: Body) -> Response {
    let bytes = match axum::body::to_bytes(body, MAX_STATUS_SIZE).await {
        Ok(bytes) => bytes,
        Err(error) if timed_out(&error) => {
            error_total("body_timeout");
            return (StatusCode::REQUEST_TIMEOUT, format!("{error}\n")).into_response();
        }
        Err(_) => {
            error_total("payload_too_large");
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a status is at most {MAX_STATUS_SIZE} bytes\n"),
            )
                .into_response();
        }
    };
    if channel != DFU_CHANNEL {
        return StatusCode::ACCEPTED.into_response();
    }
    let reply = match device.handle_status(&bytes).await {
        Ok(reply) => reply,
        Err(error) => return (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response(),
    };
    tracing::trace!(key = %device.key(), command = reply.kind, "status answered");
    (
        StatusCode::OK,
        [
            ("command", HeaderValue::from_static(DFU_CHANNEL)),
            (
                header::CONTENT_TYPE.as_str(),
                HeaderValue::from_static("application/cbor"),
            ),
        ],
        reply.command,
    )
        .into_response()
}

/// Whether reading the body failed because it did not arrive in time (the server's body timeout
/// fails it with `TimedOut`).
fn timed_out(error: &axum::Error) -> bool {
    std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |error| {
        error.source()
    })
    .filter_map(|error| error.downcast_ref::<std::io::Error>())
    .any(|error| error.kind() == std::io::ErrorKind::TimedOut)
}
