//! `/api/dfu/v1alpha1/apps/{app}/devices/{device}/history`: a device's update history, newest
//! first, as the registry keeps it (see `ajour_types::history`).

use crate::auth::{require, Caller};
use crate::{ApiError, ApiState};
use ajour_registry::{AppName, DeviceName, Key};
use ajour_types::access::Need;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::Value;

const BASE: &str = "/api/dfu/v1alpha1";

/// Entries answered when the request names no `limit`.
const DEFAULT_LIMIT: u32 = 100;
/// The most one request may ask for (a device keeps at most `--history-max-events` anyway).
const MAX_LIMIT: u32 = 10_000;

pub(crate) fn routes() -> Router<ApiState> {
    Router::new().route(
        &format!("{BASE}/apps/{{app}}/devices/{{device}}/history"),
        get(history),
    )
}

#[derive(serde::Deserialize)]
struct HistoryParams {
    limit: Option<u32>,
}

async fn history(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((app, device)): Path<(String, String)>,
    Query(params): Query<HistoryParams>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let app = AppName::parse(&app)?;
    let key = Key::Device(app.clone(), DeviceName::parse(&device)?);
    require(&state, &caller, &app, Need::Read).await?;
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "limit must be from 1 to {MAX_LIMIT}, not {limit}"
        )));
    }
    match state.registry.history(&key, limit).await? {
        Some(events) => Ok(Json(events.iter().map(|e| e.to_json()).collect())),
        None => Err(ApiError::NotImplemented(
            "this server's registry keeps no device history (Drogue mode)".into(),
        )),
    }
}
