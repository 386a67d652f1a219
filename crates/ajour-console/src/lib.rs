//! Ajour's web console, served by `ajour serve` itself at `/`: server-rendered pages (maud) to
//! watch a fleet update and steer it: applications and their devices by state, each device's
//! progress and history, builds with their logs, rollouts with their waves, and forms to change
//! firmware, trigger builds and pause, resume, cancel or approve rollouts.
//!
//! Sign-in is with an API token (the bootstrap token or a user's access token), checked as the
//! REST API checks it; the session is a cookie (`HttpOnly`, `SameSite=Strict`, eight hours) that
//! carries the token and its expiry under an HMAC, so any instance sharing the bootstrap token
//! accepts it and a revoked token ends the session at once. Every form carries a CSRF token
//! derived from the session. What a caller sees and may do is what their role allows through the
//! API ([`ajour_api::require`]).
//!
//! The pages work without JavaScript; `live.js` (a few lines, embedded like the stylesheet)
//! refreshes the parts marked `data-live` every second without a reload.

// A page's error is the answer it gives instead (a `Response`), made once per request: boxing it
// would only add an allocation.
#![allow(clippy::result_large_err)]

mod pages;
mod session;

use ajour_api::{ApiState, ApiToken};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, DOCTYPE};

pub use session::SESSION_COOKIE;

/// What the console needs: the API's state (registry, service, builds, access), the bootstrap
/// token (sign-in, and the key sessions are signed with), and whether it is served over TLS (the
/// cookie is then `Secure`).
#[derive(Clone)]
pub struct ConsoleState {
    pub api: ApiState,
    bootstrap: ApiToken,
    keys: session::Keys,
    secure: bool,
}

impl ConsoleState {
    pub fn new(api: ApiState, bootstrap_token: &str, secure: bool) -> Self {
        Self {
            api,
            bootstrap: ApiToken::new(bootstrap_token),
            keys: session::Keys::new(bootstrap_token),
            secure,
        }
    }
}

/// The console's routes.
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/apps/{app}", get(pages::application))
        .route("/apps/{app}/firmware", post(pages::set_app_firmware))
        .route("/apps/{app}/devices", get(pages::devices))
        .route("/apps/{app}/devices/{device}", get(pages::device))
        .route(
            "/apps/{app}/devices/{device}/firmware",
            post(pages::set_device_firmware),
        )
        .route(
            "/apps/{app}/devices/{device}/firmware/remove",
            post(pages::remove_device_firmware),
        )
        .route("/apps/{app}/rollouts/{id}", get(pages::rollout))
        .route("/apps/{app}/rollouts/{id}/action", post(pages::rollout_action))
        .route("/builds", get(pages::builds))
        .route("/builds/trigger", post(pages::trigger_build))
        .route("/builds/{id}", get(pages::build))
        .route(
            "/assets/console.css",
            get(|| asset("text/css", include_str!("../assets/console.css"))),
        )
        .route(
            "/assets/live.js",
            get(|| asset("text/javascript", include_str!("../assets/live.js"))),
        )
        .with_state(state)
        // Its forms are a few fields.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
}

/// The largest form the console takes.
pub const MAX_FORM: usize = 16 * 1024;

async fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// A whole page: the header with navigation (and sign-out, for a session), `title` as the one
/// `h1`, then `body`.
pub(crate) fn page(title: &str, session: Option<&session::Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Ajour" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/live.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "Ajour" }
                    @if let Some(session) = session {
                        nav aria-label="Main" {
                            a href="/" { "Overview" }
                            a href="/builds" { "Builds" }
                        }
                        form #logout method="post" action="/logout" {
                            (session.csrf_field())
                            button type="submit" { "Sign out (" (session.caller.name()) ")" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page answered with `status`.
pub(crate) fn respond(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        markup.into_string(),
    )
        .into_response()
}
