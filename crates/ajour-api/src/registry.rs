//! `/api/registry/v1alpha1`: applications and their devices.

use crate::auth::{require, Caller};
use crate::{ApiError, ApiState};
use ajour_registry::{AppName, DeviceName, Key, ListParams, RegistryError, Resource, Scope};
use ajour_types::access::Need;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};

const BASE: &str = "/api/registry/v1alpha1";

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route(&format!("{BASE}/apps"), get(list_apps).post(create_app))
        .route(
            &format!("{BASE}/apps/{{app}}"),
            get(get_app).put(update_app).delete(delete_app),
        )
        .route(
            &format!("{BASE}/apps/{{app}}/devices"),
            get(list_devices).post(create_device),
        )
        .route(
            &format!("{BASE}/apps/{{app}}/devices/{{device}}"),
            get(get_device).put(update_device).delete(delete_device),
        )
}

type ApiResult = Result<Response, ApiError>;

fn app_key(app: &str) -> Result<Key, ApiError> {
    Ok(Key::App(AppName::parse(app)?))
}

fn device_key(app: &str, device: &str) -> Result<Key, ApiError> {
    Ok(Key::Device(AppName::parse(app)?, DeviceName::parse(device)?))
}

/// Parse a body ourselves, so a malformed one gets a message saying what is wrong.
fn parse_body(body: &Bytes) -> Result<Resource, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid object: {e}")))
}

// Pending device statuses are taken before the registry is read: a status write landing in
// between is then in one or the other (see `UpdateService::pending_status`).

async fn list(state: &ApiState, scope: Scope, params: ListParams) -> ApiResult {
    let mut pending = match &scope {
        Scope::Apps => Default::default(),
        Scope::Devices(app) => state.service.pending_statuses(app),
    };
    let mut items = state.registry.list(&scope, &params).await?;
    for item in &mut items {
        if let Some(status) = pending.remove(&item.metadata.name) {
            ajour_service::overlay_pending(item, status);
        }
    }
    Ok(Json(items).into_response())
}

async fn get_one(state: &ApiState, key: Key) -> ApiResult {
    let pending = state.service.pending_status(&key);
    let mut resource = state
        .registry
        .get(&key)
        .await?
        .ok_or_else(|| ajour_registry::RegistryError::NotFound(key.to_string()))?;
    if let Some(status) = pending {
        ajour_service::overlay_pending(&mut resource, status);
    }
    Ok(Json(resource).into_response())
}

async fn create(state: &ApiState, key: Key, body: Bytes, location: String) -> ApiResult {
    let mut resource = parse_body(&body)?;
    if let Key::Device(app, _) = &key {
        // Drogue lets clients omit the application on create; the path says it.
        resource
            .metadata
            .application
            .get_or_insert_with(|| app.to_string());
    }
    let created = state.registry.create(&key, resource).await?;
    state.service.invalidate(&key);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(created)).into_response())
}

/// How often a PUT without `status` is tried again when the object changed between reading its
/// status and writing (a device's status write landed in between).
const KEEP_STATUS_ATTEMPTS: usize = 8;

/// Replace an object's metadata and spec. `status` is its own part, as in Drogue's registry: a
/// body without it (a client changing a label or the firmware) keeps the stored status, which
/// devices' updates write; a body with it replaces it.
async fn update(state: &ApiState, key: Key, body: Bytes) -> ApiResult {
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid object: {e}")))?;
    let keep_status = value.get("status").is_none();
    let resource: Resource =
        serde_json::from_value(value).map_err(|e| ApiError::BadRequest(format!("invalid object: {e}")))?;
    if !keep_status {
        state.registry.update(&key, resource).await?;
    } else {
        // The stored status goes into the write, guarded by the version it was read at: if the
        // client gave no version of its own, a status written in between is a conflict here,
        // and the write is made again on what is stored then.
        let client_version = !resource.metadata.resource_version.is_empty();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let stored = state
                .registry
                .get(&key)
                .await?
                .ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
            let mut write = resource.clone();
            write.status = stored.status;
            if !client_version {
                write.metadata.resource_version = stored.metadata.resource_version;
            }
            match state.registry.update(&key, write).await {
                Err(RegistryError::Conflict) if !client_version && attempt < KEEP_STATUS_ATTEMPTS => continue,
                result => {
                    result?;
                    break;
                }
            }
        }
    }
    state.service.invalidate(&key);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete(state: &ApiState, key: Key) -> ApiResult {
    state.registry.delete(&key).await?;
    state.service.invalidate(&key);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The applications the caller sees: a user, those they own or are a member of.
async fn list_apps(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<ListParams>,
) -> ApiResult {
    let Caller::User(user) = &caller else {
        return list(&state, Scope::Apps, params).await;
    };
    let visible = state.access.apps_of(user).await?;
    // Paged after filtering, so a page holds only what the user sees.
    let all = ListParams {
        labels: params.labels,
        limit: None,
        offset: None,
    };
    let items = state.registry.list(&Scope::Apps, &all).await?;
    let items: Vec<_> = items
        .into_iter()
        .filter(|item| visible.contains(&item.metadata.name))
        .skip(params.offset.unwrap_or(0))
        .take(params.limit.unwrap_or(usize::MAX))
        .collect();
    Ok(Json(items).into_response())
}

/// Any caller may create an application; a user who does owns it.
async fn create_app(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let name = parse_body(&body)?.metadata.name;
    let key = app_key(&name)?;
    let app = AppName::parse(&name)?;
    let response = create(&state, key.clone(), body, format!("{BASE}/apps/{name}")).await?;
    if let Err(error) = state.access.claim_app(&app, caller.user()).await {
        // An application nobody owns would be out of its creator's reach: take it back.
        let _ = state.registry.delete(&key).await;
        state.service.invalidate(&key);
        return Err(error.into());
    }
    Ok(response)
}

async fn get_app(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> ApiResult {
    let key = app_key(&app)?;
    require(&state, &caller, &AppName::parse(&app)?, Need::Read).await?;
    get_one(&state, key).await
}

async fn update_app(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Bytes,
) -> ApiResult {
    let key = app_key(&app)?;
    require(&state, &caller, &AppName::parse(&app)?, Need::Write).await?;
    update(&state, key, body).await
}

async fn delete_app(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> ApiResult {
    let key = app_key(&app)?;
    let app = AppName::parse(&app)?;
    require(&state, &caller, &app, Need::Admin).await?;
    let response = delete(&state, key).await?;
    state.access.forget_app(&app).await?;
    Ok(response)
}

async fn list_devices(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    Query(params): Query<ListParams>,
) -> ApiResult {
    let app = AppName::parse(&app)?;
    require(&state, &caller, &app, Need::Read).await?;
    if state.registry.get(&Key::App(app.clone())).await?.is_none() {
        return Err(ajour_registry::RegistryError::NotFound(format!("application '{app}'")).into());
    }
    list(&state, Scope::Devices(app), params).await
}

/// The key of a device after checking that `caller` may do what needs `need` to its application.
async fn allowed_device(
    state: &ApiState,
    caller: &Caller,
    app: &str,
    device: &str,
    need: Need,
) -> Result<Key, ApiError> {
    let key = device_key(app, device)?;
    require(state, caller, &AppName::parse(app)?, need).await?;
    Ok(key)
}

async fn create_device(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Bytes,
) -> ApiResult {
    let name = parse_body(&body)?.metadata.name;
    let key = allowed_device(&state, &caller, &app, &name, Need::Write).await?;
    create(&state, key, body, format!("{BASE}/apps/{app}/devices/{name}")).await
}

async fn get_device(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((app, device)): Path<(String, String)>,
) -> ApiResult {
    get_one(
        &state,
        allowed_device(&state, &caller, &app, &device, Need::Read).await?,
    )
    .await
}

async fn update_device(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((app, device)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    update(
        &state,
        allowed_device(&state, &caller, &app, &device, Need::Write).await?,
        body,
    )
    .await
}

async fn delete_device(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((app, device)): Path<(String, String)>,
) -> ApiResult {
    delete(
        &state,
        allowed_device(&state, &caller, &app, &device, Need::Write).await?,
    )
    .await
}
