//! The console's pages and forms. Each page reads through the same registry, service and build
//! store as the REST API, with the caller's role checked by [`ajour_api::require`]; each form is
//! checked for its CSRF token, does one thing, and redirects back to a page that says it was done
//! (post/redirect/get, so a reload never posts twice).

use crate::session::{session, Session};
use crate::{page, respond, ConsoleState};
use ajour_api::{require, ApiError, Caller};
use ajour_registry::{AppName, BuildFilter, DeviceName, Key, ListParams, RegistryError, Resource, Scope};
use ajour_service::RolloutAction;
use ajour_types::access::Need;
use ajour_types::build::{has_build_section, Build, BuildState, BuildTarget};
use ajour_types::rollout::{Phase, RolloutState};
use ajour_types::{FirmwareReport, FirmwareState};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Devices per page of the devices list.
const PAGE_SIZE: usize = 50;
/// Builds listed on the builds page.
const BUILDS_LISTED: u32 = 100;
/// History entries shown on a device's page.
const HISTORY_SHOWN: u32 = 50;

type PageResult = Result<Response, Response>;

/// Where a device is, as the console groups devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum DeviceState {
    InSync,
    Updating,
    Failed,
    Unknown,
}

impl DeviceState {
    const ALL: [DeviceState; 4] = [
        DeviceState::InSync,
        DeviceState::Updating,
        DeviceState::Failed,
        DeviceState::Unknown,
    ];

    fn slug(self) -> &'static str {
        match self {
            DeviceState::InSync => "in-sync",
            DeviceState::Updating => "updating",
            DeviceState::Failed => "failed",
            DeviceState::Unknown => "unknown",
        }
    }

    fn label(self) -> &'static str {
        match self {
            DeviceState::InSync => "in sync",
            DeviceState::Updating => "updating",
            DeviceState::Failed => "failed",
            DeviceState::Unknown => "unknown",
        }
    }
}

/// One device as the console shows it.
struct DeviceView {
    name: String,
    current: String,
    target: String,
    state: DeviceState,
    percent: f64,
    /// Why it failed, when it did.
    reason: Option<String>,
    /// When its status last changed.
    last_change: Option<chrono::DateTime<chrono::Utc>>,
    report: Option<FirmwareReport>,
    /// Its own firmware section, when it has one.
    own_firmware: Option<Value>,
}

impl DeviceView {
    fn of(resource: &Resource) -> Self {
        let report = resource
            .status
            .get("firmware")
            .and_then(|f| FirmwareReport::from_json(f).ok());
        let (state, percent, reason) = match report.as_ref().map(|r| &r.status.state) {
            None => (DeviceState::Unknown, 0.0, None),
            Some(FirmwareState::InSync) => (DeviceState::InSync, 100.0, None),
            Some(FirmwareState::Updating { percent }) => {
                (DeviceState::Updating, percent.clamp(0.0, 100.0), None)
            }
            Some(FirmwareState::Error { reason } | FirmwareState::Failed { reason }) => {
                (DeviceState::Failed, 0.0, Some(reason.clone()))
            }
        };
        Self {
            name: resource.metadata.name.clone(),
            current: report
                .as_ref()
                .map(|r| r.status.current.clone())
                .unwrap_or_default(),
            target: report
                .as_ref()
                .map(|r| r.status.target.clone())
                .unwrap_or_default(),
            state,
            percent,
            reason,
            last_change: report
                .as_ref()
                .and_then(|r| r.conditions.iter().map(|c| c.since).max()),
            report,
            own_firmware: resource.spec.get("firmware").cloned(),
        }
    }
}

/// An API error as a page: the API's status code and message.
fn error_page(session: &Session, error: ApiError) -> Response {
    let (status, _, message) = error.parts();
    respond(
        status,
        page(
            "Not done",
            Some(session),
            html! { p.error role="alert" { (message) } },
        ),
    )
}

fn app_name(session: &Session, app: &str) -> Result<AppName, Response> {
    AppName::parse(app).map_err(|e| error_page(session, e.into()))
}

/// The signed-in session, with `need` on `app`.
async fn allowed(
    state: &ConsoleState,
    headers: &HeaderMap,
    app: &str,
    need: Need,
) -> Result<(Session, AppName), Response> {
    let session = session(state, headers).await?;
    let app = app_name(&session, app)?;
    require(&state.api, &session.caller, &app, need)
        .await
        .map_err(|e| error_page(&session, e))?;
    Ok((session, app))
}

/// The applications `caller` may see, by name.
async fn visible_apps(state: &ConsoleState, session: &Session) -> Result<Vec<Resource>, Response> {
    let apps = state
        .api
        .registry
        .list(&Scope::Apps, &ListParams::default())
        .await
        .map_err(|e| error_page(session, e.into()))?;
    let Caller::User(user) = &session.caller else {
        return Ok(apps);
    };
    let visible = state
        .api
        .access
        .apps_of(user)
        .await
        .map_err(|e| error_page(session, e.into()))?;
    Ok(apps
        .into_iter()
        .filter(|a| visible.contains(&a.metadata.name))
        .collect())
}

/// The application's devices as shown now (progress not yet written included).
async fn device_views(
    state: &ConsoleState,
    session: &Session,
    app: &AppName,
) -> Result<Vec<DeviceView>, Response> {
    let mut pending = state.api.service.pending_statuses(app);
    let mut devices = state
        .api
        .registry
        .list(&Scope::Devices(app.clone()), &ListParams::default())
        .await
        .map_err(|e| error_page(session, e.into()))?;
    for device in &mut devices {
        if let Some(status) = pending.remove(&device.metadata.name) {
            ajour_service::overlay_pending(device, status);
        }
    }
    Ok(devices.iter().map(DeviceView::of).collect())
}

fn counts(devices: &[DeviceView]) -> BTreeMap<DeviceState, usize> {
    let mut counts: BTreeMap<DeviceState, usize> = DeviceState::ALL.iter().map(|s| (*s, 0)).collect();
    for device in devices {
        *counts.entry(device.state).or_default() += 1;
    }
    counts
}

fn describe_firmware(firmware: Option<&Value>) -> String {
    let Some(firmware) = firmware else {
        return "none".into();
    };
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    if let Some(file) = firmware.get("file") {
        format!("file {}", text(file, "name"))
    } else if let Some(container) = firmware.get("container").or_else(|| firmware.get("oci")) {
        let built = if has_build_section(Some(firmware)) {
            " (built from source)"
        } else {
            ""
        };
        format!("container image {}{built}", text(container, "image"))
    } else if let Some(hawkbit) = firmware.get("hawkbit") {
        format!("Hawkbit controller {}", text(hawkbit, "controller"))
    } else {
        "unknown kind".into()
    }
}

fn time(time: Option<chrono::DateTime<chrono::Utc>>) -> Markup {
    match time {
        Some(time) => html! { time datetime=(time.to_rfc3339()) { (time.format("%Y-%m-%d %H:%M:%S")) } },
        None => html! { "—" },
    }
}

fn millis(ms: Option<i64>) -> Markup {
    time(ms.and_then(chrono::DateTime::from_timestamp_millis))
}

fn progress(id: Option<&str>, label: &str, percent: f64) -> Markup {
    let value = format!("{percent:.0}");
    html! {
        progress id=[id] max="100" value=(value) aria-label=(label) { (value) "%" }
    }
}

/// A notice named by a redirect's `?notice=` (a fixed set: nothing from the query is echoed).
fn notice(code: Option<&str>) -> Markup {
    let text = match code {
        Some("firmware-set") => "The firmware was changed: devices get it on their next status.",
        Some("override-set") => "The device's own firmware was set.",
        Some("override-removed") => "The device follows its application's firmware again.",
        Some("rollout-done") => "Done.",
        _ => return html! {},
    };
    html! { p.notice role="status" { (text) } }
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct OverviewQuery {
    app: Option<String>,
}

pub(crate) async fn overview(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Query(query): Query<OverviewQuery>,
) -> PageResult {
    let session = session(&state, &headers).await?;
    let apps = visible_apps(&state, &session).await?;
    let mut rows = Vec::new();
    for app in &apps {
        let Ok(name) = AppName::parse(&app.metadata.name) else {
            continue;
        };
        let devices = device_views(&state, &session, &name).await?;
        rows.push((
            name,
            describe_firmware(app.spec.get("firmware")),
            counts(&devices),
        ));
    }
    let builds = match &state.api.builds {
        Some(builds) => {
            let names: Vec<&str> = apps.iter().map(|a| a.metadata.name.as_str()).collect();
            let list = builds
                .store()
                .builds(BuildFilter {
                    limit: 1000,
                    ..BuildFilter::default()
                })
                .await
                .map_err(|e| error_page(&session, e.into()))?;
            let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
            for build in list.iter().filter(|b| names.contains(&b.app.as_str())) {
                *by_state.entry(build.state.as_str()).or_default() += 1;
            }
            Some(by_state)
        }
        None => None,
    };
    let chosen = query.app.as_deref().or(rows.first().map(|r| r.0.as_str()));
    let chart = match chosen.and_then(|a| AppName::parse(a).ok()) {
        Some(app) if rows.iter().any(|r| r.0 == app) => rollout_chart(&state, &app).await,
        _ => None,
    };
    let body = html! {
        section aria-labelledby="apps-heading" {
            h2 #apps-heading { "Applications" }
            @if rows.is_empty() {
                p { "No applications yet: create one with " code { "ajour app create" } "." }
            } @else {
                div.scroll data-live #apps-live {
                    table #apps {
                        caption.visually-hidden { "Devices of each application by state" }
                        thead { tr {
                            th scope="col" { "Application" }
                            th scope="col" { "Firmware" }
                            @for s in DeviceState::ALL { th scope="col" { (s.label()) } }
                        } }
                        tbody {
                            @for (name, firmware, counts) in &rows {
                                tr data-app=(name) {
                                    th scope="row" { a href={"/apps/" (name)} { (name) } }
                                    td { (firmware) }
                                    @for s in DeviceState::ALL {
                                        td data-state=(s.slug()) { (counts[&s]) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(by_state) = builds {
            section #builds-by-state aria-labelledby="builds-heading" {
                h2 #builds-heading { "Builds" }
                div data-live #builds-live {
                    @if by_state.is_empty() {
                        p { "No builds yet." }
                    } @else {
                        ul.states {
                            @for (state, count) in &by_state { li { (state) ": " (count) } }
                        }
                    }
                }
                a href="/builds" { "All builds" }
            }
        }
        section aria-labelledby="chart-heading" {
            h2 #chart-heading { "Rollout progress" }
            @if rows.len() > 1 {
                form #chart-app method="get" action="/" {
                    label for="chart-app-select" { "Application" }
                    select #chart-app-select name="app" {
                        @for (name, _, _) in &rows {
                            option value=(name) selected[Some(name.as_str()) == chosen] { (name) }
                        }
                    }
                    button type="submit" { "Show" }
                }
            }
            div data-live #chart-live {
                @match chart {
                    Some(chart) => (chart),
                    None => p { "No rollout of " (chosen.unwrap_or("any application")) " yet." },
                }
            }
        }
    };
    Ok(respond(StatusCode::OK, page("Overview", Some(&session), body)))
}

/// The latest rollout of `app` as a picture: its devices updated (and failed) over time.
async fn rollout_chart(state: &ConsoleState, app: &AppName) -> Option<Markup> {
    let latest = state
        .api
        .service
        .list_rollouts(app)
        .await
        .ok()?
        .into_iter()
        .next()?;
    let details = state.api.service.rollout(app, latest.rollout.id).await.ok()?;
    let start = latest.rollout.created_at;
    let now = chrono::Utc::now().timestamp_millis();
    let mut succeeded: Vec<i64> = details
        .members
        .iter()
        .filter(|m| m.phase == Phase::Succeeded)
        .filter_map(|m| m.swapped_at.or(m.progress_at))
        .collect();
    succeeded.sort_unstable();
    let mut failed: Vec<i64> = details
        .members
        .iter()
        .filter(|m| m.phase == Phase::Failed)
        .filter_map(|m| m.progress_at.or(m.started_at))
        .collect();
    failed.sort_unstable();
    let total = details.members.len().max(1) as f64;
    let end = succeeded
        .iter()
        .chain(&failed)
        .copied()
        .max()
        .unwrap_or(now)
        .max(start + 1)
        .max(if latest.rollout.progress.state == RolloutState::Active {
            now
        } else {
            0
        });
    let (width, height) = (600.0, 200.0);
    let x = |t: i64| (t - start) as f64 / (end - start) as f64 * width;
    let y = |n: usize| height - n as f64 / total * height;
    let steps = |times: &[i64]| {
        let mut points = vec![format!("0,{height}")];
        for (n, t) in times.iter().enumerate() {
            points.push(format!("{:.1},{:.1}", x(*t), y(n)));
            points.push(format!("{:.1},{:.1}", x(*t), y(n + 1)));
        }
        points.push(format!("{width},{:.1}", y(times.len())));
        points.join(" ")
    };
    let summary = format!(
        "Rollout {} of {}: {} of {} devices updated, {} failed, {}",
        latest.rollout.id,
        app,
        succeeded.len(),
        details.members.len(),
        failed.len(),
        latest.rollout.progress.state.as_str()
    );
    Some(html! {
        figure {
            svg #rollout-chart viewBox="0 0 600 200" role="img" aria-labelledby="rollout-chart-title" preserveAspectRatio="none" {
                title #rollout-chart-title { (summary) }
                polyline.succeeded points=(steps(&succeeded)) {}
                polyline.failed points=(steps(&failed)) {}
            }
            figcaption {
                (summary) ". "
                a href={"/apps/" (app) "/rollouts/" (latest.rollout.id)} { "Rollout " (latest.rollout.id) }
            }
        }
    })
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct NoticeQuery {
    notice: Option<String>,
}

pub(crate) async fn application(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(app): Path<String>,
    Query(query): Query<NoticeQuery>,
) -> PageResult {
    let (session, app) = allowed(&state, &headers, &app, Need::Read).await?;
    let resource = state
        .api
        .registry
        .get(&Key::App(app.clone()))
        .await
        .map_err(|e| error_page(&session, e.into()))?
        .ok_or_else(|| {
            error_page(
                &session,
                RegistryError::NotFound(format!("application '{app}'")).into(),
            )
        })?;
    let devices = device_views(&state, &session, &app).await?;
    let counts = counts(&devices);
    // The version its devices are told to run: the most common target.
    let mut targets: BTreeMap<&str, usize> = BTreeMap::new();
    for device in devices
        .iter()
        .filter(|d| !d.target.is_empty() && d.own_firmware.is_none())
    {
        *targets.entry(device.target.as_str()).or_default() += 1;
    }
    let target = targets
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(t, _)| *t)
        .unwrap_or("—");
    let firmware = resource.spec.get("firmware");
    let rollouts = state.api.service.list_rollouts(&app).await.unwrap_or_default();
    let body = html! {
        (notice(query.notice.as_deref()))
        dl #firmware {
            dt { "Firmware" } dd { (describe_firmware(firmware)) }
            dt { "Target version" } dd data-live #target-live { (target) }
        }
        section aria-labelledby="devices-heading" {
            h2 #devices-heading { "Devices" }
            div data-live #counts-live {
                ul #counts.states {
                    @for s in DeviceState::ALL {
                        li data-state=(s.slug()) {
                            a href={"/apps/" (app) "/devices?state=" (s.slug())} { (s.label()) ": " (counts[&s]) }
                        }
                    }
                }
            }
            a #devices-link href={"/apps/" (app) "/devices"} { "All " (devices.len()) " devices" }
        }
        section aria-labelledby="set-heading" {
            h2 #set-heading { "Set the firmware" }
            (firmware_form("set-firmware", "firmware", &format!("/apps/{app}/firmware"), firmware, &session))
        }
        @if !rollouts.is_empty() {
            section aria-labelledby="rollouts-heading" {
                h2 #rollouts-heading { "Rollouts" }
                ul {
                    @for r in &rollouts {
                        li { a href={"/apps/" (app) "/rollouts/" (r.rollout.id)} { "Rollout " (r.rollout.id) } ": " (r.rollout.progress.state.as_str()) }
                    }
                }
            }
        }
    };
    Ok(respond(
        StatusCode::OK,
        page(&format!("Application {app}"), Some(&session), body),
    ))
}

/// A form setting a firmware spec: its kind and the name, image or controller.
fn firmware_form(id: &str, prefix: &str, action: &str, current: Option<&Value>, session: &Session) -> Markup {
    let kind = current
        .and_then(|f| {
            ["file", "container", "hawkbit"]
                .into_iter()
                .find(|k| f.get(k).is_some())
        })
        .unwrap_or("file");
    let value = current
        .and_then(|f| f.get(kind))
        .and_then(|s| {
            s.get(match kind {
                "file" => "name",
                "container" => "image",
                _ => "controller",
            })
        })
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind_id = format!("{prefix}-kind");
    let value_id = format!("{prefix}-value");
    html! {
        form id=(id) method="post" action=(action) {
            (session.csrf_field())
            label for=(kind_id) { "Source" }
            select id=(kind_id) name="kind" {
                option value="file" selected[kind == "file"] { "File (name)" }
                option value="container" selected[kind == "container"] { "Container image" }
                option value="hawkbit" selected[kind == "hawkbit"] { "Hawkbit controller" }
            }
            label for=(value_id) { "Name, image or controller" }
            input id=(value_id) name="value" type="text" value=(value) required;
            button type="submit" { "Set" }
        }
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct FirmwareForm {
    csrf: Option<String>,
    kind: String,
    value: String,
}

/// The firmware section `form` asks for, over `current` (a container's pull policy and build
/// section are kept when only its image changes).
fn firmware_section(form: &FirmwareForm, current: Option<&Value>) -> Result<Value, ApiError> {
    let value = form.value.trim();
    if value.is_empty() {
        return Err(ApiError::BadRequest(
            "give the firmware's name, image or controller".into(),
        ));
    }
    let section = match form.kind.as_str() {
        "file" => {
            ajour_store::FirmwareName::parse(value).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            json!({"file": {"name": value}})
        }
        "hawkbit" => json!({"hawkbit": {"controller": value}}),
        "container" => {
            let mut container = current
                .and_then(|c| c.get("container"))
                .cloned()
                .unwrap_or_else(|| json!({"imagePullPolicy": "Always"}));
            container["image"] = json!(value);
            json!({"container": container})
        }
        other => return Err(ApiError::BadRequest(format!("unknown firmware source '{other}'"))),
    };
    // Refused here, as the server would refuse it for every device.
    ajour_store::FirmwareSpec::from_json(&section).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(section)
}

/// Replace `key`'s `spec.firmware` (`None`: remove it), keeping everything else.
async fn write_firmware(state: &ConsoleState, key: &Key, firmware: Option<Value>) -> Result<(), ApiError> {
    let mut resource = state
        .api
        .registry
        .get(key)
        .await?
        .ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
    match firmware {
        Some(firmware) => {
            resource.spec.insert("firmware".into(), firmware);
        }
        None => {
            resource.spec.remove("firmware");
        }
    }
    state.api.registry.update(key, resource).await?;
    state.api.service.invalidate(key);
    Ok(())
}

pub(crate) async fn set_app_firmware(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(app): Path<String>,
    Form(form): Form<FirmwareForm>,
) -> PageResult {
    let (session, app) = allowed(&state, &headers, &app, Need::Write).await?;
    session.check_csrf(form.csrf.as_deref())?;
    let key = Key::App(app.clone());
    let current = state.api.registry.get(&key).await.ok().flatten();
    let current = current.as_ref().and_then(|r| r.spec.get("firmware"));
    let section = firmware_section(&form, current).map_err(|e| error_page(&session, e))?;
    write_firmware(&state, &key, Some(section))
        .await
        .map_err(|e| error_page(&session, e))?;
    Ok(Redirect::to(&format!("/apps/{app}?notice=firmware-set")).into_response())
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct DevicesQuery {
    state: Option<String>,
    sort: Option<String>,
    page: Option<usize>,
}

pub(crate) async fn devices(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(app): Path<String>,
    Query(query): Query<DevicesQuery>,
) -> PageResult {
    let (session, app) = allowed(&state, &headers, &app, Need::Read).await?;
    let mut devices = device_views(&state, &session, &app).await?;
    let filter = query
        .state
        .as_deref()
        .and_then(|s| DeviceState::ALL.into_iter().find(|d| d.slug() == s));
    if let Some(filter) = filter {
        devices.retain(|d| d.state == filter);
    }
    let sort = query.sort.as_deref().unwrap_or("name");
    match sort {
        "state" => devices.sort_by(|a, b| a.state.cmp(&b.state).then_with(|| a.name.cmp(&b.name))),
        "progress" => {
            devices.sort_by(|a, b| b.percent.total_cmp(&a.percent).then_with(|| a.name.cmp(&b.name)))
        }
        "last-seen" => devices.sort_by(|a, b| {
            b.last_change
                .cmp(&a.last_change)
                .then_with(|| a.name.cmp(&b.name))
        }),
        _ => devices.sort_by(|a, b| a.name.cmp(&b.name)),
    }
    let pages = devices.len().div_ceil(PAGE_SIZE).max(1);
    let page_no = query.page.unwrap_or(1).clamp(1, pages);
    let shown = devices.iter().skip((page_no - 1) * PAGE_SIZE).take(PAGE_SIZE);
    let state_slug = filter.map_or("all", DeviceState::slug);
    let link = |page: usize| format!("/apps/{app}/devices?state={state_slug}&sort={sort}&page={page}");
    let body = html! {
        form #filter method="get" action={"/apps/" (app) "/devices"} {
            label for="state" { "State" }
            select #state name="state" {
                option value="all" selected[filter.is_none()] { "all" }
                @for s in DeviceState::ALL { option value=(s.slug()) selected[filter == Some(s)] { (s.label()) } }
            }
            label for="sort" { "Sort by" }
            select #sort name="sort" {
                @for (value, label) in [("name", "name"), ("state", "state"), ("progress", "progress"), ("last-seen", "last seen")] {
                    option value=(value) selected[sort == value] { (label) }
                }
            }
            button type="submit" { "Show" }
        }
        div.scroll data-live #devices-live {
            table #devices {
                caption { (devices.len()) " devices" @if let Some(f) = filter { " " (f.label()) } ", page " (page_no) " of " (pages) }
                thead { tr {
                    th scope="col" { "Device" }
                    th scope="col" { "Current" }
                    th scope="col" { "Target" }
                    th scope="col" { "State" }
                    th scope="col" { "Progress" }
                    th scope="col" { "Last seen" }
                } }
                tbody {
                    @for d in shown {
                        tr data-device=(d.name) {
                            th scope="row" { a href={"/apps/" (app) "/devices/" (d.name)} { (d.name) } }
                            td.current { (d.current) }
                            td.target { (d.target) }
                            td.state data-state=(d.state.slug()) { (d.state.label()) }
                            td {
                                (progress(None, &format!("Progress of {}", d.name), d.percent))
                                " " span.percent { (format!("{:.0}", d.percent)) "%" }
                            }
                            td.last-seen { (time(d.last_change)) }
                        }
                    }
                }
            }
        }
        @if pages > 1 {
            nav.pages aria-label="Pages" {
                @if page_no > 1 { a rel="prev" href=(link(page_no - 1)) { "Previous" } }
                span { "Page " (page_no) " of " (pages) }
                @if page_no < pages { a rel="next" href=(link(page_no + 1)) { "Next" } }
            }
        }
    };
    Ok(respond(
        StatusCode::OK,
        page(&format!("Devices of {app}"), Some(&session), body),
    ))
}

pub(crate) async fn device(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((app, device)): Path<(String, String)>,
    Query(query): Query<NoticeQuery>,
) -> PageResult {
    let (session, app) = allowed(&state, &headers, &app, Need::Read).await?;
    let name = DeviceName::parse(&device).map_err(|e| error_page(&session, e.into()))?;
    let key = Key::Device(app.clone(), name.clone());
    let mut resource = state
        .api
        .registry
        .get(&key)
        .await
        .map_err(|e| error_page(&session, e.into()))?
        .ok_or_else(|| {
            error_page(
                &session,
                RegistryError::NotFound(format!("device '{name}'")).into(),
            )
        })?;
    state.api.service.overlay_status(&key, &mut resource);
    let view = DeviceView::of(&resource);
    let history = state
        .api
        .registry
        .history(&key, HISTORY_SHOWN)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let body = html! {
        (notice(query.notice.as_deref()))
        div data-live #device-live {
            p {
                "State: " span #state data-state=(view.state.slug()) { (view.state.label()) }
                @if let Some(reason) = &view.reason { " (" (reason) ")" }
            }
            p {
                (progress(Some("progress"), "Update progress", view.percent))
                " " span #percent { (format!("{:.0}", view.percent)) "%" }
            }
            dl #versions {
                dt { "Current" } dd { (if view.current.is_empty() { "—" } else { &view.current }) }
                dt { "Target" } dd { (if view.target.is_empty() { "—" } else { &view.target }) }
                dt { "Last seen" } dd { (time(view.last_change)) }
            }
            h2 { "Conditions" }
            @match &view.report {
                Some(report) => {
                    div.scroll {
                        table #conditions {
                            thead { tr { th scope="col" { "Type" } th scope="col" { "Status" } th scope="col" { "Reason" } th scope="col" { "Message" } th scope="col" { "Since" } } }
                            tbody {
                                @for c in &report.conditions {
                                    tr { td { (c.kind) } td { (c.status) } td { (c.reason.as_deref().unwrap_or("")) } td { (c.message.as_deref().unwrap_or("")) } td { (time(Some(c.since))) } }
                                }
                            }
                        }
                    }
                }
                None => p { "It has not reported yet." },
            }
            h2 { "History" }
            @if history.is_empty() {
                p { "No update events yet." }
            } @else {
                ol #history reversed {
                    @for e in &history {
                        li {
                            (time(Some(e.time))) " "
                            strong { (e.event.kind.as_str()) }
                            " " (e.event.current) " → " (e.event.target)
                            @if let Some(p) = e.event.percent { " (" (format!("{p:.0}")) "%)" }
                            @if let Some(r) = &e.event.reason { ": " (r) }
                        }
                    }
                }
            }
        }
        h2 { "Its own firmware" }
        p { "Now: " (match &view.own_firmware { Some(f) => describe_firmware(Some(f)), None => "none: it follows its application".into() }) }
        (firmware_form("set-override", "override", &format!("/apps/{app}/devices/{name}/firmware"), view.own_firmware.as_ref(), &session))
        @if view.own_firmware.is_some() {
            form #remove-override method="post" action={"/apps/" (app) "/devices/" (name) "/firmware/remove"} {
                (session.csrf_field())
                button type="submit" { "Remove its own firmware" }
            }
        }
    };
    Ok(respond(
        StatusCode::OK,
        page(&format!("Device {name} of {app}"), Some(&session), body),
    ))
}

async fn device_key(
    state: &ConsoleState,
    headers: &HeaderMap,
    app: &str,
    device: &str,
) -> Result<(Session, Key), Response> {
    let (session, app) = allowed(state, headers, app, Need::Write).await?;
    let name = DeviceName::parse(device).map_err(|e| error_page(&session, e.into()))?;
    Ok((session, Key::Device(app, name)))
}

pub(crate) async fn set_device_firmware(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((app, device)): Path<(String, String)>,
    Form(form): Form<FirmwareForm>,
) -> PageResult {
    let (session, key) = device_key(&state, &headers, &app, &device).await?;
    session.check_csrf(form.csrf.as_deref())?;
    let current = state.api.registry.get(&key).await.ok().flatten();
    let current = current.as_ref().and_then(|r| r.spec.get("firmware"));
    let section = firmware_section(&form, current).map_err(|e| error_page(&session, e))?;
    write_firmware(&state, &key, Some(section))
        .await
        .map_err(|e| error_page(&session, e))?;
    Ok(Redirect::to(&format!("/apps/{app}/devices/{device}?notice=override-set")).into_response())
}

#[derive(serde::Deserialize)]
pub(crate) struct CsrfOnly {
    csrf: Option<String>,
}

pub(crate) async fn remove_device_firmware(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((app, device)): Path<(String, String)>,
    Form(form): Form<CsrfOnly>,
) -> PageResult {
    let (session, key) = device_key(&state, &headers, &app, &device).await?;
    session.check_csrf(form.csrf.as_deref())?;
    write_firmware(&state, &key, None)
        .await
        .map_err(|e| error_page(&session, e))?;
    Ok(Redirect::to(&format!("/apps/{app}/devices/{device}?notice=override-removed")).into_response())
}

pub(crate) async fn rollout(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((app, id)): Path<(String, i64)>,
    Query(query): Query<NoticeQuery>,
) -> PageResult {
    let (session, app) = allowed(&state, &headers, &app, Need::Read).await?;
    let details = state
        .api
        .service
        .rollout(&app, id)
        .await
        .map_err(|e| error_page(&session, e.into()))?;
    let summary = &details.summary;
    let progress_state = &summary.rollout.progress;
    let open = matches!(progress_state.state, RolloutState::Active | RolloutState::Paused);
    let body = html! {
        (notice(query.notice.as_deref()))
        div data-live #rollout-live {
            p { "State: " span #rollout-state { (progress_state.state.as_str()) } @if progress_state.halted { " (halted)" } ", wave " (progress_state.wave + 1) " of " (summary.waves.len()) }
            @if let Some(reason) = &progress_state.reason {
                p #halt-reason role="status" { "Why: " (reason) }
            }
            @if summary.awaiting_approval { p { "The next wave waits for an approval." } }
            div.scroll {
                table #waves {
                    caption { "Devices of each wave by phase" }
                    thead { tr { th scope="col" { "Wave" } th scope="col" { "Pending" } th scope="col" { "Updating" } th scope="col" { "Succeeded" } th scope="col" { "Failed" } th scope="col" { "Progress" } } }
                    tbody {
                        @for (n, w) in summary.waves.iter().enumerate() {
                            @let total = (w.pending + w.updating + w.succeeded + w.failed).max(1) as f64;
                            tr {
                                th scope="row" { (n + 1) }
                                td { (w.pending) } td { (w.updating) } td { (w.succeeded) } td { (w.failed) }
                                td { (progress(None, &format!("Wave {} succeeded", n + 1), w.succeeded as f64 / total * 100.0)) }
                            }
                        }
                    }
                }
            }
        }
        @if open {
            form #rollout-actions method="post" action={"/apps/" (app) "/rollouts/" (id) "/action"} {
                (session.csrf_field())
                @if progress_state.state == RolloutState::Active { button type="submit" name="action" value="pause" { "Pause" } }
                @if progress_state.state == RolloutState::Paused { button type="submit" name="action" value="resume" { "Resume" } }
                @if summary.awaiting_approval { button type="submit" name="action" value="approve" { "Approve the next wave" } }
                button type="submit" name="action" value="cancel" { "Cancel" }
            }
        }
    };
    Ok(respond(
        StatusCode::OK,
        page(&format!("Rollout {id} of {app}"), Some(&session), body),
    ))
}

#[derive(serde::Deserialize)]
pub(crate) struct ActionForm {
    csrf: Option<String>,
    action: String,
}

pub(crate) async fn rollout_action(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path((app, id)): Path<(String, i64)>,
    Form(form): Form<ActionForm>,
) -> PageResult {
    let (session, app) = allowed(&state, &headers, &app, Need::Write).await?;
    session.check_csrf(form.csrf.as_deref())?;
    let action = RolloutAction::parse(&form.action).ok_or_else(|| {
        error_page(
            &session,
            ApiError::BadRequest(format!("unknown action '{}'", form.action)),
        )
    })?;
    state
        .api
        .service
        .control_rollout(&app, id, action)
        .await
        .map_err(|e| error_page(&session, e.into()))?;
    Ok(Redirect::to(&format!("/apps/{app}/rollouts/{id}?notice=rollout-done")).into_response())
}

/// The targets with a build section the caller sees: each application and device whose firmware
/// says how to build it.
async fn buildable(state: &ConsoleState, session: &Session) -> Result<Vec<BuildTarget>, Response> {
    let has_build = |spec: &Map<String, Value>| has_build_section(spec.get("firmware"));
    let mut targets = Vec::new();
    for app in visible_apps(state, session).await? {
        let Ok(name) = AppName::parse(&app.metadata.name) else {
            continue;
        };
        if has_build(&app.spec) {
            targets.push(BuildTarget {
                app: name.clone(),
                device: None,
            });
        }
        let devices = state
            .api
            .registry
            .list(&Scope::Devices(name.clone()), &ListParams::default())
            .await
            .map_err(|e| error_page(session, e.into()))?;
        for device in devices.iter().filter(|d| has_build(&d.spec)) {
            if let Ok(device) = DeviceName::parse(&device.metadata.name) {
                targets.push(BuildTarget {
                    app: name.clone(),
                    device: Some(device),
                });
            }
        }
    }
    Ok(targets)
}

fn build_target(build: &Build) -> String {
    match &build.device {
        Some(device) => format!("{device}@{}", build.app),
        None => build.app.clone(),
    }
}

pub(crate) async fn builds(State(state): State<ConsoleState>, headers: HeaderMap) -> PageResult {
    let session = session(&state, &headers).await?;
    let Some(builds) = state.api.builds.clone() else {
        let body = html! { p { "Builds are off on this server: start it with " code { "--build-runner local" } " or " code { "tekton" } " (docs/builds.md)." } };
        return Ok(respond(StatusCode::OK, page("Builds", Some(&session), body)));
    };
    let apps: Vec<String> = visible_apps(&state, &session)
        .await?
        .into_iter()
        .map(|a| a.metadata.name)
        .collect();
    let list: Vec<Build> = builds
        .store()
        .builds(BuildFilter {
            limit: BUILDS_LISTED,
            ..BuildFilter::default()
        })
        .await
        .map_err(|e| error_page(&session, e.into()))?
        .into_iter()
        .filter(|b| apps.contains(&b.app))
        .collect();
    let targets = buildable(&state, &session).await?;
    let body = html! {
        section aria-labelledby="trigger-heading" {
            h2 #trigger-heading { "Build" }
            @if targets.is_empty() {
                p { "No application or device has a build section (" code { "spec.firmware.container.build" } ")." }
            } @else {
                ul.targets {
                    @for t in &targets {
                        li {
                            form.trigger method="post" action="/builds/trigger" data-app=(t.app) data-device=[t.device.as_ref()] {
                                (session.csrf_field())
                                input type="hidden" name="app" value=(t.app);
                                @if let Some(device) = &t.device { input type="hidden" name="device" value=(device); }
                                button type="submit" { "Build " (t) }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="builds-heading" {
            h2 #builds-heading { "Builds" }
            div.scroll data-live #builds-live {
                table #builds {
                    caption.visually-hidden { "Builds, newest first" }
                    thead { tr { th scope="col" { "Build" } th scope="col" { "Target" } th scope="col" { "State" } th scope="col" { "Started" } th scope="col" { "Completed" } th scope="col" { "Version" } } }
                    tbody {
                        @for b in &list {
                            tr data-build=(b.id) {
                                th scope="row" { a href={"/builds/" (b.id)} { (b.id) } }
                                td { (build_target(b)) }
                                td.state { (b.state.as_str()) }
                                td { (millis(b.started_at)) }
                                td { (millis(b.completed_at)) }
                                td { (b.version.as_deref().unwrap_or("—")) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(respond(StatusCode::OK, page("Builds", Some(&session), body)))
}

#[derive(serde::Deserialize)]
pub(crate) struct TriggerForm {
    csrf: Option<String>,
    app: String,
    device: Option<String>,
}

pub(crate) async fn trigger_build(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<TriggerForm>,
) -> PageResult {
    let (session, app) = allowed(&state, &headers, &form.app, Need::Write).await?;
    session.check_csrf(form.csrf.as_deref())?;
    let Some(builds) = state.api.builds.clone() else {
        return Err(error_page(
            &session,
            ApiError::NotImplemented("builds are off on this server".into()),
        ));
    };
    let device = match form.device.as_deref().filter(|d| !d.is_empty()) {
        Some(device) => Some(DeviceName::parse(device).map_err(|e| error_page(&session, e.into()))?),
        None => None,
    };
    let build = builds
        .trigger(BuildTarget { app, device }, None)
        .await
        .map_err(|e| error_page(&session, e.into()))?;
    Ok(Redirect::to(&format!("/builds/{}", build.id)).into_response())
}

pub(crate) async fn build(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> PageResult {
    let session = session(&state, &headers).await?;
    let not_found = || error_page(&session, RegistryError::NotFound(format!("build {id}")).into());
    let Some(builds) = state.api.builds.clone() else {
        return Err(not_found());
    };
    let build = builds
        .store()
        .build(id)
        .await
        .map_err(|e| error_page(&session, e.into()))?
        .ok_or_else(not_found)?;
    let app = AppName::parse(&build.app).map_err(|_| not_found())?;
    require(&state.api, &session.caller, &app, Need::Read)
        .await
        .map_err(|_| not_found())?;
    let log = builds
        .store()
        .build_log(id)
        .await
        .map_err(|e| error_page(&session, e.into()))?
        .unwrap_or_default();
    let body = html! {
        div data-live #build-live {
            p { "State: " span #build-state { (build.state.as_str()) } }
            dl {
                dt { "Target" } dd { (build_target(&build)) }
                dt { "Runner" } dd { (build.runner) }
                dt { "Created" } dd { (millis(Some(build.created_at))) }
                dt { "Started" } dd { (millis(build.started_at)) }
                dt { "Completed" } dd { (millis(build.completed_at)) }
                @if let Some(version) = &build.version { dt { "Version" } dd { (version) } }
                @if let Some(image) = &build.image { dt { "Image" } dd { (image) } }
                @if let Some(message) = &build.message { dt { "Why it failed" } dd { (message) } }
            }
            h2 { "Log" }
            @if log.start > 0 { p { "(the first " (log.start) " bytes are no longer kept)" } }
            pre #log tabindex="0" aria-label="Build log" { (log.text) }
        }
        @if build.state == BuildState::Succeeded || build.state == BuildState::Failed {
            p { a href="/builds" { "All builds" } }
        }
    };
    Ok(respond(
        StatusCode::OK,
        page(&format!("Build {id}"), Some(&session), body),
    ))
}
