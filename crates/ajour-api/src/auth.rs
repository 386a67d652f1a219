//! Who is calling, and whether they may: the bootstrap token and users' access tokens, and the
//! check of a caller's role on an application (the rules are `ajour_types::access`'s).
//!
//! Credentials are accepted as `Authorization: Bearer <token>` and as Basic `user:token`, as
//! Drogue's tools send them. The bootstrap token (`ajour serve`'s `api-token`) is the server's
//! administrator, with any user name in Basic; a user's access token (`ajr_<prefix>_<secret>`,
//! made through `/api/tokens/v1alpha1`) is that user, and with Basic only with their own name.

use crate::{ApiError, ApiState};
use ajour_registry::{AccessStore, AppName, StoredToken};
use ajour_types::access::{AppAccess, Need};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::distributions::{Alphanumeric, DistString};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The bootstrap token: the server's administrator, for first setup and automation.
#[derive(Clone)]
pub struct ApiToken(String);

impl ApiToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// Whether `presented` is this token (in constant time).
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(***)")
    }
}

/// Who a request comes from, put into its extensions by [`authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The holder of the bootstrap token: everything, every application.
    Administrator,
    /// A user, by one of their access tokens.
    User(String),
}

impl Caller {
    /// The user's name; `None` for the administrator.
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::Administrator => None,
            Caller::User(name) => Some(name),
        }
    }

    /// How the caller is named in messages and events.
    pub fn name(&self) -> &str {
        self.user().unwrap_or("administrator")
    }
}

pub(crate) struct Gate {
    pub bootstrap: ApiToken,
    pub access: Arc<dyn AccessStore>,
}

/// The middleware: find the caller or answer 401.
pub(crate) async fn authenticate(
    State(gate): State<Arc<Gate>>,
    mut request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(header) = header else {
        return ApiError::Unauthorized(
            "missing credentials: send 'Authorization: Bearer <token>' or Basic user:token",
        )
        .into_response();
    };
    match identify(&gate, &header).await {
        Ok(Some(caller)) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Ok(None) => ApiError::Unauthorized("invalid token").into_response(),
        Err(error) => error.into_response(),
    }
}

async fn identify(gate: &Gate, header: &str) -> Result<Option<Caller>, ApiError> {
    let (user, token) = match header.split_once(' ') {
        Some((scheme, value)) if scheme.eq_ignore_ascii_case("bearer") => (None, value.trim().to_string()),
        _ => match ajour_types::basic_auth::parse(header) {
            Some((user, token)) => (Some(user), token),
            None => return Ok(None),
        },
    };
    let caller = caller_of_token(&gate.bootstrap, gate.access.as_ref(), &token).await?;
    Ok(caller.filter(|caller| match (&user, caller) {
        (Some(user), Caller::User(owner)) => user == owner,
        _ => true,
    }))
}

/// Who `token` (the bootstrap token or a user's access token) belongs to; `None`: no one. The
/// one check behind the API's credentials and the console's sign-in.
pub async fn caller_of_token(
    bootstrap: &ApiToken,
    access: &dyn AccessStore,
    token: &str,
) -> Result<Option<Caller>, ApiError> {
    if bootstrap.matches(token) {
        return Ok(Some(Caller::Administrator));
    }
    let Some(prefix) = token_prefix(token) else {
        return Ok(None);
    };
    let Some(stored) = access.token(prefix).await? else {
        return Ok(None);
    };
    let hash_matches: bool = stored.hash.as_bytes().ct_eq(hash(token).as_bytes()).into();
    Ok(hash_matches.then_some(Caller::User(stored.user)))
}

/// What user access tokens start with.
const TOKEN_SCHEME: &str = "ajr_";
const PREFIX_LEN: usize = 8;
const SECRET_LEN: usize = 32;

/// The public prefix of a user access token: `ajr_<prefix>_<secret>`.
fn token_prefix(token: &str) -> Option<&str> {
    let (prefix, secret) = token.strip_prefix(TOKEN_SCHEME)?.split_once('_')?;
    (prefix.len() == PREFIX_LEN && secret.len() == SECRET_LEN).then_some(prefix)
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random access token for `user` (shown once) and what is stored of it.
pub(crate) fn new_token(user: &str, description: Option<String>) -> (String, StoredToken) {
    let mut rng = rand::thread_rng();
    // Lower-case prefixes: they are typed back to delete a token.
    let prefix = Alphanumeric
        .sample_string(&mut rng, PREFIX_LEN)
        .to_ascii_lowercase();
    let secret = Alphanumeric.sample_string(&mut rng, SECRET_LEN);
    let token = format!("{TOKEN_SCHEME}{prefix}_{secret}");
    let stored = StoredToken {
        prefix,
        user: user.to_string(),
        hash: hash(&token),
        description,
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    (token, stored)
}

/// Whether `caller` may do what needs `need` to application `app`. A user who is neither its
/// owner nor a member gets "not found", the answer for an application that does not exist, so
/// names are not found out by trying them.
pub async fn require(state: &ApiState, caller: &Caller, app: &AppName, need: Need) -> Result<(), ApiError> {
    let Caller::User(user) = caller else {
        return Ok(());
    };
    check(state.access.app_access(app).await?.as_ref(), user, app, need)
}

/// [`require`], for a handler that goes on to use the application's owner and members: read once.
pub(crate) async fn access_for(
    state: &ApiState,
    caller: &Caller,
    app: &AppName,
    need: Need,
) -> Result<AppAccess, ApiError> {
    let access = state.access.app_access(app).await?;
    if let Caller::User(user) = caller {
        check(access.as_ref(), user, app, need)?;
    }
    Ok(access.unwrap_or_default())
}

fn check(access: Option<&AppAccess>, user: &str, app: &AppName, need: Need) -> Result<(), ApiError> {
    match access.and_then(|access| access.role_of(user)) {
        None => Err(ajour_registry::RegistryError::NotFound(format!("application '{app}'")).into()),
        Some(role) if role.allows(need) => Ok(()),
        Some(role) => Err(ApiError::Forbidden(format!(
            "{user} is {} of application '{app}': this needs {}",
            role.as_str(),
            need.describe()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_their_prefix_only_when_well_formed() {
        let (token, stored) = new_token("alice", None);
        assert_eq!(token_prefix(&token), Some(stored.prefix.as_str()));
        assert_eq!(stored.hash, hash(&token));
        assert_ne!(new_token("alice", None).0, token);
        for bad in ["", "ajr_", "ajr_abc_def", "drg_abcdefgh_x", "ajr_abcdefgh"] {
            assert_eq!(token_prefix(bad), None, "{bad:?}");
        }
    }
}
