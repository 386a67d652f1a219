//! `/api/dfu/v1alpha1/apps/{app}/rollouts`: staged rollouts of an application's firmware (see
//! `ajour_types::rollout` for the rules and `docs/rollouts.md` for the shapes).
//!
//! - `POST .../rollouts` with a rollout spec creates one (201); 409 while another is open.
//! - `GET .../rollouts` lists them, newest first, each with its devices counted per wave.
//! - `GET .../rollouts/{id}` is one, with its devices, and the application's devices outside it
//!   (their own firmware, not selected, or registered since and not seen yet).
//! - `POST .../rollouts/{id}/pause|resume|cancel|approve` steers it; 409 when its state does not
//!   allow that (the message says why).

use crate::auth::{require, Caller};
use crate::{ApiError, ApiState};
use ajour_registry::AppName;
use ajour_service::{RolloutAction, RolloutSummary};
use ajour_types::access::Need;
use ajour_types::rollout::{Member, RolloutSpec};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};

const BASE: &str = "/api/dfu/v1alpha1";

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route(&format!("{BASE}/apps/{{app}}/rollouts"), post(create).get(list))
        .route(&format!("{BASE}/apps/{{app}}/rollouts/{{id}}"), get(one))
        .route(
            &format!("{BASE}/apps/{{app}}/rollouts/{{id}}/{{action}}"),
            post(control),
        )
}

fn time(millis: i64) -> Value {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

/// A rollout as the API shows it.
fn summary_json(summary: &RolloutSummary) -> Value {
    let rollout = &summary.rollout;
    let progress = &rollout.progress;
    json!({
        "id": rollout.id,
        "application": rollout.app,
        "state": progress.state.as_str(),
        "wave": progress.wave,
        "waveSince": time(progress.wave_since),
        "waveSucceededAt": progress.wave_succeeded_at.map(time),
        "awaitingApproval": summary.awaiting_approval,
        "halted": progress.halted,
        "reason": progress.reason,
        "createdAt": time(rollout.created_at),
        "updatedAt": time(rollout.updated_at),
        "spec": rollout.spec,
        "previous": rollout.previous,
        "waves": summary.waves.iter().map(|counts| json!({
            "total": counts.total(),
            "pending": counts.pending,
            "updating": counts.updating,
            "succeeded": counts.succeeded,
            "failed": counts.failed,
        })).collect::<Vec<_>>(),
    })
}

fn member_json(member: &Member) -> Value {
    json!({
        "device": member.device,
        "wave": member.wave,
        "phase": member.phase.as_str(),
        "target": member.target,
        "startedAt": member.started_at.map(time),
        "reason": member.reason,
    })
}

async fn create(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let app = AppName::parse(&app)?;
    require(&state, &caller, &app, Need::Write).await?;
    let spec: RolloutSpec =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("rollout spec: {e}")))?;
    let created = state.service.create_rollout(&app, spec).await?;
    let details = state.service.rollout(&app, created.id).await?;
    Ok((StatusCode::CREATED, Json(summary_json(&details.summary))))
}

async fn list(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let app = AppName::parse(&app)?;
    require(&state, &caller, &app, Need::Read).await?;
    let summaries = state.service.list_rollouts(&app).await?;
    Ok(Json(summaries.iter().map(summary_json).collect()))
}

async fn one(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((app, id)): Path<(String, i64)>,
) -> Result<Json<Value>, ApiError> {
    let app = AppName::parse(&app)?;
    require(&state, &caller, &app, Need::Read).await?;
    let details = state.service.rollout(&app, id).await?;
    let mut body = summary_json(&details.summary);
    body["devices"] = details.members.iter().map(member_json).collect();
    body["outside"] = details
        .outside
        .iter()
        .map(|(device, why)| json!({"device": device, "reason": why}))
        .collect();
    Ok(Json(body))
}

async fn control(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((app, id, action)): Path<(String, i64, String)>,
) -> Result<Json<Value>, ApiError> {
    let app = AppName::parse(&app)?;
    require(&state, &caller, &app, Need::Write).await?;
    let action = RolloutAction::parse(&action).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "unknown action '{action}': pause, resume, cancel or approve"
        ))
    })?;
    let summary = state.service.control_rollout(&app, id, action).await?;
    Ok(Json(summary_json(&summary)))
}
