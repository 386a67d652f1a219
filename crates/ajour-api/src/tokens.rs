//! `/api/tokens/v1alpha1`: a user's access tokens, as Drogue's token API has them (`drg create
//! token`, `drg get token`, `drg delete token`).
//!
//! - `POST ...?description=TEXT` makes a token and answers 200 `{"token", "prefix"}`: the only
//!   time the token is shown; the server keeps its hash.
//! - `GET ...` lists the caller's tokens: `[{"prefix", "created", "description"}]`.
//! - `DELETE .../{prefix}` deletes one (204; 404 when the caller has none with that prefix).
//!
//! The bootstrap token belongs to no user: with it, `?user=NAME` says whose tokens these are.
//! That is how a user's first token is made (`ajour token create --user NAME`).

use crate::auth::{new_token, Caller};
use crate::{ApiError, ApiState};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};

const BASE: &str = "/api/tokens/v1alpha1";
/// The longest description kept.
const MAX_DESCRIPTION: usize = 256;
/// The most tokens one user may hold at once: enough for every tool and pipeline, and a bound on
/// what a leaked token can fill the database with.
const MAX_TOKENS_PER_USER: usize = 100;

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route(BASE, get(list).post(create))
        .route(&format!("{BASE}/"), get(list).post(create))
        .route(&format!("{BASE}/{{prefix}}"), delete(remove))
}

#[derive(serde::Deserialize)]
struct TokenParams {
    description: Option<String>,
    user: Option<String>,
}

/// Whose tokens a request is about: the caller's own; the administrator names a user.
fn owner(caller: &Caller, named: Option<String>) -> Result<String, ApiError> {
    match (caller, named) {
        (Caller::User(user), None) => Ok(user.clone()),
        (Caller::User(user), Some(named)) if named == *user => Ok(named),
        (Caller::User(_), Some(_)) => Err(ApiError::Forbidden(
            "only the bootstrap token can manage another user's tokens".into(),
        )),
        (Caller::Administrator, Some(named)) => {
            ajour_types::access::check_user_name(&named).map_err(ApiError::BadRequest)?;
            Ok(named)
        }
        (Caller::Administrator, None) => Err(ApiError::BadRequest(
            "the bootstrap token belongs to no user: name one with ?user=NAME".into(),
        )),
    }
}

async fn create(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<TokenParams>,
) -> Result<Json<Value>, ApiError> {
    let user = owner(&caller, params.user)?;
    if let Some(description) = &params.description {
        if description.chars().count() > MAX_DESCRIPTION {
            return Err(ApiError::BadRequest(format!(
                "description longer than {MAX_DESCRIPTION} characters"
            )));
        }
    }
    if state.access.tokens(&user).await?.len() >= MAX_TOKENS_PER_USER {
        return Err(ApiError::Conflict(format!(
            "{user} holds {MAX_TOKENS_PER_USER} tokens already: delete one first"
        )));
    }
    let (token, stored) = new_token(&user, params.description);
    state.access.add_token(&stored).await?;
    tracing::info!(user = %user, prefix = %stored.prefix, by = caller.name(), "access token created");
    Ok(Json(json!({"token": token, "prefix": stored.prefix})))
}

async fn list(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<TokenParams>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let user = owner(&caller, params.user)?;
    let tokens = state.access.tokens(&user).await?;
    Ok(Json(
        tokens
            .iter()
            .map(|t| json!({"prefix": t.prefix, "created": t.created, "description": t.description}))
            .collect(),
    ))
}

async fn remove(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(prefix): Path<String>,
    Query(params): Query<TokenParams>,
) -> Result<Response, ApiError> {
    let user = owner(&caller, params.user)?;
    if state.access.delete_token(&user, &prefix).await? {
        tracing::info!(user = %user, prefix = %prefix, by = caller.name(), "access token deleted");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ajour_registry::RegistryError::NotFound(format!("access token '{prefix}' of {user}")).into())
    }
}
