//! Drogue's integration APIs, as far as Ajour has them: the live stream of an application's DFU
//! traffic over a WebSocket, where Drogue's WebSocket integration was
//! (`/api/stream/v1alpha1/apps/{app}`, what `drg stream` reads), and Drogue's command endpoint
//! (`/api/command/...`), which Ajour answers 501: it sends devices DFU commands only, and those
//! of its own choosing.
//!
//! A watcher needs read access to the application, like any read of it. It gets each status a
//! device of the application sent and the command that answered it, one CloudEvent in JSON per
//! text frame (shapes: `ajour_service::traffic`), from the moment the handshake is answered. A
//! watcher too slow to take them is dropped (the devices never wait for it): one that fell more
//! than the hub keeps behind is sent a close frame saying how many events it missed, one whose
//! socket takes nothing for [`SEND_TIMEOUT`] is closed. Server shutdown closes every stream with
//! 1001. What a client sends is not read beyond answering pings (drg sends token refreshes, which
//! mean nothing for access tokens).

use crate::auth::{require, Caller};
use crate::{ApiError, ApiState};
use ajour_registry::{AppName, Key, RegistryError};
use ajour_service::traffic::{Next, Subscription, Traffic};
use ajour_types::access::Need;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{any, get};
use axum::{Extension, Router};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The stream of one application; `discovery::STREAM_PATH` names it to clients.
const STREAM: &str = "/api/stream/v1alpha1/apps/{app}";

/// Largest frame or message taken from a watcher: it has nothing to say but pings, pongs, close,
/// and drg's small token refreshes.
const MAX_INCOMING: usize = 8 * 1024;

/// A watcher whose socket takes no frame for this long is too slow, and dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A ping is sent this often; a watcher heard from (a pong, anything) in none of the last two
/// periods is gone, and its stream closed.
const PING_INTERVAL: Duration = Duration::from_secs(30);

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route(STREAM, get(stream))
        .route("/api/command", any(no_commands))
        .route("/api/command/{*rest}", any(no_commands))
}

async fn no_commands() -> ApiError {
    ApiError::NotImplemented(
        "Ajour sends devices firmware update commands only, of its own choosing: it has no \
         command endpoint (set a device's or application's firmware instead)"
            .into(),
    )
}

async fn stream(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let app = AppName::parse(&app)?;
    require(&state, &caller, &app, Need::Read).await?;
    // The administrator may watch any name: one that is no application is a typo, said now
    // rather than shown as a stream where nothing ever comes.
    if state.registry.get(&Key::App(app.clone())).await?.is_none() {
        return Err(RegistryError::NotFound(format!("application '{app}'")).into());
    }
    let traffic = state.service.traffic().clone();
    // Subscribed before the handshake is answered: whatever happens once the client has its
    // answer reaches it.
    let subscription = traffic
        .subscribe(&app)
        .map_err(|error| ApiError::Conflict(error.to_string()))?;
    tracing::debug!(%app, caller = caller.name(), "live stream opened");
    Ok(upgrade
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING)
        .on_upgrade(move |socket| watch(socket, subscription, traffic, caller)))
}

/// How a send went.
enum Sent {
    Ok,
    /// The client went away.
    Gone,
    /// The socket took nothing for [`SEND_TIMEOUT`].
    TooSlow,
}

async fn send(socket: &mut WebSocket, message: Message) -> Sent {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await {
        Ok(Ok(())) => Sent::Ok,
        Ok(Err(_)) => Sent::Gone,
        Err(_) => Sent::TooSlow,
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: String) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = send(socket, Message::Close(Some(frame))).await;
}

/// Forward `subscription`'s events to `socket` until either side ends.
async fn watch(mut socket: WebSocket, mut subscription: Subscription, traffic: Arc<Traffic>, caller: Caller) {
    let app = subscription.app().clone();
    let too_slow = |why: &str| {
        traffic.count_dropped();
        tracing::info!(%app, caller = caller.name(), "live stream dropped: {why}");
    };
    let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            next = subscription.next() => match next {
                Next::Event(event) => match send(&mut socket, Message::Text((*event).into())).await {
                    Sent::Ok => {}
                    Sent::Gone => return,
                    Sent::TooSlow => {
                        // Its socket is full: a close frame would not get through either.
                        too_slow(&format!("took no event for {SEND_TIMEOUT:?}"));
                        return;
                    }
                },
                Next::Missed(missed) => {
                    let reason = format!("too slow: {missed} events missed");
                    too_slow(&reason);
                    close(&mut socket, close_code::POLICY, reason).await;
                    return;
                }
                Next::Closed => {
                    close(&mut socket, close_code::AWAY, "server shutting down".into()).await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                // Gone, or a frame too large.
                None | Some(Err(_)) => return,
                // Closing: tungstenite queued the answering close frame; reading once more sends
                // it, completing the closing handshake.
                Some(Ok(Message::Close(_))) => {
                    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.recv()).await;
                    return;
                }
                // Pings are answered by tungstenite; whatever else it says is not listened to.
                Some(Ok(_)) => heard = Instant::now(),
            },
            _ = ping.tick() => {
                if heard.elapsed() > 2 * PING_INTERVAL {
                    tracing::debug!(%app, "live stream closed: the client answers no ping");
                    return;
                }
                match send(&mut socket, Message::Ping(Default::default())).await {
                    Sent::Ok => {}
                    Sent::Gone => return,
                    Sent::TooSlow => {
                        too_slow(&format!("took no ping for {SEND_TIMEOUT:?}"));
                        return;
                    }
                }
            }
        }
    }
}
