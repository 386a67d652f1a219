//! `/api/build/v1alpha1`: firmware builds, on the original's paths.
//!
//! - `GET /api/build/v1alpha1`: every application and device with a build section the caller can
//!   see, with its latest build (`{app, device?, started?, completed?, status?}` as the original,
//!   plus the build's `id`, `image`, `version`);
//! - `POST …/apps/{app}/trigger`, `POST …/apps/{app}/devices/{device}/trigger`: start a build
//!   (202 with the build; 409 while one runs for the target; 501 for firmware that is not a
//!   container image; 403 for an application outside `--build-application`); an application's
//!   with the body `{"rollout": {...}}` starts a staged rollout of the result when it succeeds;
//! - `GET …/apps/{app}[/devices/{device}]`: the target's builds, current and past, newest first;
//! - `GET …/builds/{id}` and `GET …/builds/{id}/log?from=N`: one build, and its log from byte `N`
//!   (what `ajour build logs --follow` polls).

use crate::auth::{require, Caller};
use crate::{ApiError, ApiState};
use ajour_build::{Builds, TriggerError};
use ajour_registry::{AppName, BuildFilter, DeviceName, ListParams, RegistryError, Scope};
use ajour_types::access::Need;
use ajour_types::build::{has_build_section, Build, BuildTarget};
use ajour_types::rollout::RolloutSpec;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Map, Value};
use std::sync::Arc;

const BASE: &str = "/api/build/v1alpha1";
/// Builds answered per target when the request names no `limit`.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1000;

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route(BASE, get(overview))
        .route(&format!("{BASE}/apps/{{app}}"), get(app_builds))
        .route(&format!("{BASE}/apps/{{app}}/trigger"), post(trigger_app))
        .route(
            &format!("{BASE}/apps/{{app}}/devices/{{device}}"),
            get(device_builds),
        )
        .route(
            &format!("{BASE}/apps/{{app}}/devices/{{device}}/trigger"),
            post(trigger_device),
        )
        .route(&format!("{BASE}/builds/{{id}}"), get(one_build))
        .route(&format!("{BASE}/builds/{{id}}/log"), get(build_log))
}

fn builds(state: &ApiState) -> Result<&Arc<Builds>, ApiError> {
    state
        .builds
        .as_ref()
        .ok_or_else(|| ApiError::NotImplemented("builds are off on this server (--build-runner off)".into()))
}

impl From<TriggerError> for ApiError {
    fn from(error: TriggerError) -> Self {
        match error {
            TriggerError::NotFound(what) => ApiError::Registry(RegistryError::NotFound(what)),
            TriggerError::NotAllowed(_) => ApiError::Forbidden(error.to_string()),
            TriggerError::NotBuildable(message) => ApiError::NotImplemented(message),
            TriggerError::Invalid(message) => ApiError::BadRequest(message),
            TriggerError::Running(message) => ApiError::Conflict(message),
            TriggerError::Store(error) => ApiError::Registry(error),
        }
    }
}

/// The caller may see `app`, and it may be built here.
async fn allowed(
    state: &ApiState,
    caller: &Caller,
    app: &AppName,
    need: Need,
) -> Result<Arc<Builds>, ApiError> {
    let builds = builds(state)?.clone();
    require(state, caller, app, need).await?;
    if !builds.allows(app.as_str()) {
        return Err(TriggerError::NotAllowed(app.to_string()).into());
    }
    Ok(builds)
}

/// A trigger's body: empty, or `{"rollout": {...}}`, a rollout spec without `firmware` (the
/// build's result is its firmware).
fn rollout_of(body: &[u8]) -> Result<Option<RolloutSpec>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let bad = |e: String| ApiError::BadRequest(format!("trigger: {e}"));
    let body: Map<String, Value> = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    if let Some(unknown) = body.keys().find(|k| *k != "rollout") {
        return Err(bad(format!("unknown field '{unknown}', expected 'rollout'")));
    }
    let Some(rollout) = body.get("rollout").filter(|r| !r.is_null()) else {
        return Ok(None);
    };
    let mut rollout = rollout.clone();
    match rollout.as_object_mut() {
        Some(fields) if fields.contains_key("firmware") => {
            return Err(bad(
                "rollout: no 'firmware': what the build publishes is rolled out".into(),
            ))
        }
        Some(fields) => fields.insert("firmware".into(), Value::Null),
        None => return Err(bad("rollout: expected an object".into())),
    };
    serde_json::from_value(rollout)
        .map(Some)
        .map_err(|e| bad(format!("rollout: {e}")))
}

async fn trigger(
    state: &ApiState,
    caller: &Caller,
    target: BuildTarget,
    body: &[u8],
) -> Result<(StatusCode, Json<Build>), ApiError> {
    let builds = allowed(state, caller, &target.app, Need::Write).await?;
    let build = builds.trigger(target, rollout_of(body)?).await?;
    Ok((StatusCode::ACCEPTED, Json(build)))
}

async fn trigger_app(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Build>), ApiError> {
    let target = BuildTarget {
        app: AppName::parse(&app)?,
        device: None,
    };
    trigger(&state, &caller, target, &body).await
}

async fn trigger_device(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((app, device)): Path<(String, String)>,
    body: Bytes,
) -> Result<(StatusCode, Json<Build>), ApiError> {
    let target = BuildTarget {
        app: AppName::parse(&app)?,
        device: Some(DeviceName::parse(&device)?),
    };
    trigger(&state, &caller, target, &body).await
}

#[derive(serde::Deserialize)]
struct LimitParams {
    limit: Option<u32>,
}

fn limit(params: &LimitParams) -> Result<u32, ApiError> {
    match params.limit.unwrap_or(DEFAULT_LIMIT) {
        limit @ 1..=MAX_LIMIT => Ok(limit),
        other => Err(ApiError::BadRequest(format!(
            "limit must be from 1 to {MAX_LIMIT}, not {other}"
        ))),
    }
}

async fn target_builds(
    state: &ApiState,
    caller: &Caller,
    target: BuildTarget,
    params: LimitParams,
) -> Result<Json<Value>, ApiError> {
    let builds = allowed(state, caller, &target.app, Need::Read).await?;
    let device = target.device.as_ref().map(|d| d.as_str());
    let list = builds
        .store()
        .builds(BuildFilter {
            app: Some(target.app.as_str()),
            device: Some(device),
            limit: limit(&params)?,
        })
        .await?;
    let current = list.iter().find(|b| b.state.is_open());
    Ok(Json(json!({
        "app": target.app.as_str(),
        "device": device,
        "current": current,
        "builds": list,
    })))
}

async fn app_builds(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    Query(params): Query<LimitParams>,
) -> Result<Json<Value>, ApiError> {
    let target = BuildTarget {
        app: AppName::parse(&app)?,
        device: None,
    };
    target_builds(&state, &caller, target, params).await
}

async fn device_builds(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((app, device)): Path<(String, String)>,
    Query(params): Query<LimitParams>,
) -> Result<Json<Value>, ApiError> {
    let target = BuildTarget {
        app: AppName::parse(&app)?,
        device: Some(DeviceName::parse(&device)?),
    };
    target_builds(&state, &caller, target, params).await
}

/// A build the caller may read, else 404 (as for a build that does not exist: its number tells
/// nothing of applications the caller cannot see).
async fn readable_build(
    state: &ApiState,
    caller: &Caller,
    id: i64,
) -> Result<(Arc<Builds>, Build), ApiError> {
    let builds = builds(state)?.clone();
    let not_found = || ApiError::Registry(RegistryError::NotFound(format!("build {id}")));
    let build = builds.store().build(id).await?.ok_or_else(not_found)?;
    let app = AppName::parse(&build.app).map_err(|_| not_found())?;
    require(state, caller, &app, Need::Read)
        .await
        .map_err(|_| not_found())?;
    Ok((builds, build))
}

async fn one_build(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<i64>,
) -> Result<Json<Build>, ApiError> {
    Ok(Json(readable_build(&state, &caller, id).await?.1))
}

#[derive(serde::Deserialize)]
struct LogParams {
    /// The offset in the whole log to answer from; 0 when absent.
    from: Option<u64>,
}

/// `{"start", "text", "next", "state"}`: the log from `from` (or from the oldest byte kept, when
/// `from` was dropped already: then `start` > `from`), where to ask next, and the build's state,
/// so a follower knows when to stop.
async fn build_log(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<i64>,
    Query(params): Query<LogParams>,
) -> Result<Json<Value>, ApiError> {
    // The build (its state) is read before the log: a build seen ended has its whole log in
    // what follows.
    let (builds, build) = readable_build(&state, &caller, id).await?;
    let log = builds.store().build_log(id).await?.unwrap_or_default();
    let from = params.from.unwrap_or(0).max(log.start);
    let end = log.start + log.text.len() as u64;
    let skip = usize::try_from(from.min(end) - log.start).unwrap_or(0);
    // A byte offset inside a character: answer from the character's start.
    let skip = (0..=skip)
        .rev()
        .find(|i| log.text.is_char_boundary(*i))
        .unwrap_or(0);
    Ok(Json(json!({
        "start": log.start + skip as u64,
        "text": &log.text[skip..],
        "next": end,
        "state": build.state,
    })))
}

/// The original's list: one entry per application or device with a build section, with its
/// latest build.
async fn overview(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let builds = builds(&state)?.clone();
    let all = ListParams::default();
    let apps = state.registry.list(&Scope::Apps, &all).await?;
    let visible = match &caller {
        Caller::User(user) => Some(state.access.apps_of(user).await?),
        _ => None,
    };
    let mut entries = Vec::new();
    for app in apps {
        let name = app.metadata.name.clone();
        if visible.as_ref().is_some_and(|v| !v.contains(&name)) || !builds.allows(&name) {
            continue;
        }
        let Ok(app_name) = AppName::parse(&name) else {
            continue;
        };
        let latest = builds
            .store()
            .builds(BuildFilter {
                app: Some(&name),
                device: None,
                limit: MAX_LIMIT,
            })
            .await?;
        if has_build(&app.spec) {
            entries.push(entry(&name, None, latest.iter().find(|b| b.device.is_none())));
        }
        for device in state.registry.list(&Scope::Devices(app_name), &all).await? {
            if has_build(&device.spec) {
                let device_name = device.metadata.name.as_str();
                let build = latest.iter().find(|b| b.device.as_deref() == Some(device_name));
                entries.push(entry(&name, Some(device_name), build));
            }
        }
    }
    Ok(Json(entries))
}

fn has_build(spec: &Map<String, Value>) -> bool {
    has_build_section(spec.get("firmware"))
}

fn entry(app: &str, device: Option<&str>, build: Option<&Build>) -> Value {
    let mut entry = json!({"app": app});
    if let Some(device) = device {
        entry["device"] = json!(device);
    }
    if let Some(build) = build {
        let time = |ms: Option<i64>| {
            ms.and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        };
        entry["id"] = json!(build.id);
        entry["status"] = json!(build.state);
        if let Some(started) = time(build.started_at) {
            entry["started"] = json!(started);
        }
        if let Some(completed) = time(build.completed_at) {
            entry["completed"] = json!(completed);
        }
        if let Some(image) = &build.image {
            entry["image"] = json!(image);
        }
        if let Some(version) = &build.version {
            entry["version"] = json!(version);
        }
    }
    entry
}
