//! Signing in and out, the session cookie and the CSRF token.
//!
//! The cookie is `v1.{expiry}.{token}.{mac}`: the API token (base64url), when the session ends
//! (seconds since the epoch), and an HMAC-SHA256 of both under a key derived from the bootstrap
//! token. Each request checks the MAC and the expiry, then the token itself as the API does, so a
//! revoked token ends its sessions at once. The CSRF token of a session is another HMAC of its
//! cookie: a form posted from another site cannot know it (and `SameSite=Strict` keeps the cookie
//! off such a post anyway).

use crate::{page, respond, ConsoleState};
use ajour_api::{caller_of_token, Caller};
use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use maud::{html, Markup};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const SESSION_COOKIE: &str = "ajour_session";
/// How long a session lasts.
const SESSION_SECONDS: i64 = 8 * 3600;

/// The keys sessions and CSRF tokens are made with.
#[derive(Clone)]
pub(crate) struct Keys {
    session: [u8; 32],
}

impl Keys {
    pub fn new(bootstrap_token: &str) -> Self {
        let mut digest = Sha256::new();
        digest.update(b"ajour console session v1\0");
        digest.update(bootstrap_token.as_bytes());
        Self {
            session: digest.finalize().into(),
        }
    }

    fn mac(&self, purpose: &str, text: &str) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.session).expect("any key length");
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(text.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    fn cookie(&self, token: &str, expiry: i64) -> String {
        let body = format!("v1.{expiry}.{}", URL_SAFE_NO_PAD.encode(token));
        let mac = URL_SAFE_NO_PAD.encode(self.mac("session", &body));
        format!("{body}.{mac}")
    }

    /// The token of a cookie whose MAC holds and that has not expired.
    fn token_of(&self, cookie: &str, now: i64) -> Option<String> {
        let (body, mac) = cookie.rsplit_once('.')?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        if !bool::from(self.mac("session", body).ct_eq(&mac)) {
            return None;
        }
        let mut parts = body.splitn(3, '.');
        let (Some("v1"), Some(expiry), Some(token)) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        if expiry.parse::<i64>().ok()? <= now {
            return None;
        }
        String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()
    }

    fn csrf(&self, cookie: &str) -> String {
        hex::encode(self.mac("csrf", cookie))
    }

    /// The sign-in form's CSRF token for the browser holding `nonce` (its `ajour_login`
    /// cookie): so that no other site can sign a browser in under a token of its choosing.
    fn login_csrf(&self, nonce: &str) -> String {
        hex::encode(self.mac("login", nonce))
    }
}

/// The cookie that ties a sign-in form to the browser it was given to.
const LOGIN_COOKIE: &str = "ajour_login";

/// A signed-in caller, and the CSRF token of their session.
pub(crate) struct Session {
    pub caller: Caller,
    csrf: String,
}

impl Session {
    /// The hidden field every form of the console carries.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.csrf); }
    }

    /// Whether a posted form's `csrf` is this session's.
    pub fn check_csrf(&self, posted: Option<&str>) -> Result<(), Response> {
        match posted {
            Some(posted) if bool::from(posted.as_bytes().ct_eq(self.csrf.as_bytes())) => Ok(()),
            _ => Err(respond(
                StatusCode::FORBIDDEN,
                page(
                    "Form refused",
                    Some(self),
                    html! { p.error { "The form was not sent from this console (missing or wrong CSRF token): open the page again and resend it." } },
                ),
            )),
        }
    }
}

fn cookie_of<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The request's session, or the answer that sends the browser to sign in.
pub(crate) async fn session(state: &ConsoleState, headers: &HeaderMap) -> Result<Session, Response> {
    let to_login = || Redirect::to("/login").into_response();
    let cookie = cookie_of(headers, SESSION_COOKIE).ok_or_else(to_login)?;
    let now = chrono::Utc::now().timestamp();
    let token = state.keys.token_of(cookie, now).ok_or_else(to_login)?;
    match caller_of_token(&state.bootstrap, state.api.access.as_ref(), &token).await {
        Ok(Some(caller)) => Ok(Session {
            caller,
            csrf: state.keys.csrf(cookie),
        }),
        Ok(None) => Err(to_login()),
        Err(error) => Err(error.into_response()),
    }
}

fn login_form(csrf: &str, error: Option<&str>) -> Markup {
    html! {
        @if let Some(error) = error {
            p.error role="alert" { (error) }
        }
        form #login method="post" action="/login" {
            input type="hidden" name="csrf" value=(csrf);
            label for="token" { "API token" }
            input #token type="password" name="token" autocomplete="current-password" required autofocus;
            button type="submit" { "Sign in" }
        }
        p.hint {
            "The server's API token (printed when it first started, kept in "
            code { "api-token" }
            " in its data directory) or a user's access token ("
            code { "ajour token create" }
            ")."
        }
    }
}

/// The sign-in page, with `error`, and a fresh `ajour_login` nonce for its form.
fn login_answer(state: &ConsoleState, status: StatusCode, error: Option<&str>) -> Response {
    let mut nonce = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
    let nonce = hex::encode(nonce);
    let cookie = format!(
        "{LOGIN_COOKIE}={nonce}; Path=/login; Max-Age=3600; HttpOnly; SameSite=Strict{}",
        if state.secure { "; Secure" } else { "" }
    );
    let mut response = respond(
        status,
        page("Sign in", None, login_form(&state.keys.login_csrf(&nonce), error)),
    );
    if let Ok(value) = header::HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

pub(crate) async fn login_page(State(state): State<ConsoleState>) -> Response {
    login_answer(&state, StatusCode::OK, None)
}

#[derive(serde::Deserialize)]
pub(crate) struct LoginForm {
    token: String,
    csrf: Option<String>,
}

pub(crate) async fn login(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let expected = cookie_of(&headers, LOGIN_COOKIE).map(|nonce| state.keys.login_csrf(nonce));
    let forged = match (&expected, &form.csrf) {
        (Some(expected), Some(posted)) => !bool::from(expected.as_bytes().ct_eq(posted.as_bytes())),
        _ => true,
    };
    if forged {
        return login_answer(
            &state,
            StatusCode::FORBIDDEN,
            Some("The sign-in form was not sent from this page: sign in again."),
        );
    }
    let token = form.token.trim();
    match caller_of_token(&state.bootstrap, state.api.access.as_ref(), token).await {
        Ok(Some(_)) => {
            let expiry = chrono::Utc::now().timestamp() + SESSION_SECONDS;
            let cookie = format!(
                "{SESSION_COOKIE}={}; Path=/; Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Strict{}",
                state.keys.cookie(token, expiry),
                if state.secure { "; Secure" } else { "" }
            );
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Ok(None) => login_answer(&state, StatusCode::UNAUTHORIZED, Some("That token is not valid.")),
        Err(error) => error.into_response(),
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct CsrfForm {
    csrf: Option<String>,
}

pub(crate) async fn logout(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let session = match session(&state, &headers).await {
        Ok(session) => session,
        Err(response) => return response,
    };
    if let Err(response) = session.check_csrf(form.csrf.as_deref()) {
        return response;
    }
    let cookie = format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_holds_its_token_until_it_expires_and_only_untouched() {
        let keys = Keys::new("bootstrap");
        let cookie = keys.cookie("ajr_token", 1_000);
        assert_eq!(keys.token_of(&cookie, 999).as_deref(), Some("ajr_token"));
        assert_eq!(keys.token_of(&cookie, 1_000), None, "expired");
        let later = cookie.replacen("v1.1000.", "v1.9999.", 1);
        assert_eq!(keys.token_of(&later, 999), None, "expiry changed");
        assert_eq!(
            Keys::new("other").token_of(&cookie, 999),
            None,
            "another server's"
        );
        for junk in ["", ".", "v1..", "a.b.c.d", "v1.1000.%%%.xx"] {
            assert_eq!(keys.token_of(junk, 0), None, "{junk}");
        }
        assert_ne!(keys.csrf(&cookie), keys.csrf(&later));
    }
}
