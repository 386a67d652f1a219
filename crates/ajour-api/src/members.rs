//! `/api/admin/v1alpha1/apps/{app}/...`: an application's members and its owner, as Drogue's
//! admin API has them (`drg get member`, `drg create member`, `drg edit member`, `drg transfer`).
//!
//! - `GET|PUT .../members`: `{"resourceVersion", "members": {"USER": {"role": "admin|manager|reader"}}}`;
//!   needs the admin role. A PUT with a `resourceVersion` that is not the stored one is a 409.
//! - `PUT .../transfer-ownership` `{"newUser"}` offers the application to a user, `DELETE` withdraws
//!   the offer, `GET` shows it: the owner's (or the bootstrap token's) to do.
//! - `PUT .../accept-ownership`: the user it was offered to becomes the owner.

use crate::auth::{access_for, require, Caller};
use crate::{ApiError, ApiState};
use ajour_registry::{AppName, Key, RegistryError};
use ajour_types::access::{check_user_name, AppAccess, Need, Role};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

const BASE: &str = "/api/admin/v1alpha1/apps/{app}";
/// The most members an application may have.
const MAX_MEMBERS: usize = 1000;

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route(&format!("{BASE}/members"), get(members).put(set_members))
        .route(
            &format!("{BASE}/transfer-ownership"),
            get(offer).put(make_offer).delete(withdraw_offer),
        )
        .route(&format!("{BASE}/accept-ownership"), put(accept))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MembersBody {
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    members: BTreeMap<String, MemberEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberEntry {
    role: Role,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TransferBody {
    new_user: String,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid {what}: {e}")))
}

/// The application, which must exist: its owner and members are about something.
async fn existing(state: &ApiState, app: &str) -> Result<AppName, ApiError> {
    let app = AppName::parse(app)?;
    if state.registry.get(&Key::App(app.clone())).await?.is_none() {
        return Err(RegistryError::NotFound(format!("application '{app}'")).into());
    }
    Ok(app)
}

/// The owner's to do (or the bootstrap token's): handing the application over. Its owner and
/// members, as read for the check.
async fn owner_access(state: &ApiState, caller: &Caller, app: &AppName) -> Result<AppAccess, ApiError> {
    let access = access_for(state, caller, app, Need::Read).await?;
    match caller {
        Caller::User(user) if !access.is_owner(user) => Err(ApiError::Forbidden(format!(
            "only the owner of application '{app}' can hand it over"
        ))),
        _ => Ok(access),
    }
}

async fn members(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let app = existing(&state, &app).await?;
    let access = access_for(&state, &caller, &app, Need::Admin).await?;
    let members: BTreeMap<_, _> = access
        .members
        .iter()
        .map(|(user, role)| (user.clone(), json!({"role": role})))
        .collect();
    let mut body = json!({"members": members});
    if !access.revision.is_empty() {
        body["resourceVersion"] = json!(access.revision);
    }
    Ok(Json(body))
}

async fn set_members(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let app = existing(&state, &app).await?;
    require(&state, &caller, &app, Need::Admin).await?;
    let body: MembersBody = parse(&body, "members")?;
    if body.members.len() > MAX_MEMBERS {
        return Err(ApiError::BadRequest(format!("more than {MAX_MEMBERS} members")));
    }
    for user in body.members.keys() {
        check_user_name(user).map_err(ApiError::BadRequest)?;
    }
    let members = body
        .members
        .into_iter()
        .map(|(user, entry)| (user, entry.role))
        .collect();
    let revision = body.resource_version.filter(|r| !r.is_empty());
    state
        .access
        .set_members(&app, &members, revision.as_deref())
        .await?;
    tracing::info!(app = %app, members = members.len(), by = caller.name(), "application members set");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn offer(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let app = existing(&state, &app).await?;
    match owner_access(&state, &caller, &app).await?.transfer_to {
        Some(user) => Ok(Json(json!({"newUser": user}))),
        None => Err(RegistryError::NotFound(format!("transfer of application '{app}'")).into()),
    }
}

async fn make_offer(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let app = existing(&state, &app).await?;
    owner_access(&state, &caller, &app).await?;
    let body: TransferBody = parse(&body, "transfer")?;
    check_user_name(&body.new_user).map_err(ApiError::BadRequest)?;
    state.access.offer_app(&app, Some(&body.new_user)).await?;
    tracing::info!(app = %app, to = %body.new_user, by = caller.name(), "application offered");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn withdraw_offer(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Response, ApiError> {
    let app = existing(&state, &app).await?;
    owner_access(&state, &caller, &app).await?;
    state.access.offer_app(&app, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn accept(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Response, ApiError> {
    let app = existing(&state, &app).await?;
    let Caller::User(user) = &caller else {
        return Err(ApiError::BadRequest(
            "the bootstrap token belongs to no user and cannot accept an application".into(),
        ));
    };
    if state.access.accept_app(&app, user).await? {
        tracing::info!(app = %app, owner = %user, "application ownership accepted");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        // Not offered to this user: to them it is as if the application did not exist.
        Err(RegistryError::NotFound(format!("transfer of application '{app}' to {user}")).into())
    }
}
