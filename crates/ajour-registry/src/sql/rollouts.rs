//! [`RolloutStore`] in the SQL registry's database (tables `rollouts` and `rollout_devices`).
//! Each step is one transaction; on PostgreSQL, starting a device locks its rollout's row, so
//! instances admitting devices at once count one after the other.

use super::{to_text, SqlRegistry, Tx};
use crate::rollouts::{Admission, NewRollout, RolloutStore};
use crate::{AppName, RegistryError};
use ajour_types::rollout::{phase_after, Member, Phase, Progress, Rollout, RolloutId, RolloutState};
use ajour_types::{EventKind, FirmwareReport, HistoryEvent};
use async_trait::async_trait;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::time::Duration;

const ROLLOUT_COLUMNS: &str = "id, application, spec, previous, state, wave, wave_since, wave_succeeded_at, \
     forgiven, reason, halted, created_at, updated_at";
const MEMBER_COLUMNS: &str =
    "device, wave, phase, target, previous, started_at, progress_at, swapped_at, reason";
/// Rows per INSERT when a rollout's devices are stored.
const INSERT_BATCH: usize = 200;

/// A device in `phase` was started already (by another instance, or by this one before a stale
/// copy of the rollout said otherwise): asked to start again, it goes on.
fn started_already(phase: &str) -> bool {
    matches!(
        Phase::parse(phase),
        Some(Phase::Updating | Phase::Swapping | Phase::Succeeded)
    )
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> RegistryError {
    RegistryError::Corrupt(format!("{what}: {error}"))
}

fn json_column(row: &AnyRow, column: &str) -> Result<Option<Value>, RegistryError> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|text| serde_json::from_str(&text).map_err(|e| corrupt(column, e)))
        .transpose()
}

fn rollout_from_row(row: &AnyRow) -> Result<Rollout, RegistryError> {
    let spec: String = row.try_get("spec")?;
    let state: String = row.try_get("state")?;
    let wave: i64 = row.try_get("wave")?;
    let forgiven: i64 = row.try_get("forgiven")?;
    let halted: i64 = row.try_get("halted")?;
    Ok(Rollout {
        id: row.try_get("id")?,
        app: row.try_get("application")?,
        spec: serde_json::from_str(&spec).map_err(|e| corrupt("rollout spec", e))?,
        previous: json_column(row, "previous")?,
        progress: Progress {
            state: RolloutState::parse(&state).ok_or_else(|| corrupt("rollout state", &state))?,
            wave: wave as u32,
            wave_since: row.try_get("wave_since")?,
            wave_succeeded_at: row.try_get("wave_succeeded_at")?,
            forgiven: forgiven as u32,
            reason: row.try_get("reason")?,
            halted: halted != 0,
        },
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn member_from_row(row: &AnyRow) -> Result<Member, RegistryError> {
    let phase: String = row.try_get("phase")?;
    let wave: i64 = row.try_get("wave")?;
    Ok(Member {
        device: row.try_get("device")?,
        wave: wave as u32,
        phase: Phase::parse(&phase).ok_or_else(|| corrupt("rollout device phase", &phase))?,
        target: row.try_get("target")?,
        previous: json_column(row, "previous")?,
        started_at: row.try_get("started_at")?,
        progress_at: row.try_get("progress_at")?,
        swapped_at: row.try_get("swapped_at")?,
        reason: row.try_get("reason")?,
    })
}

impl SqlRegistry {
    /// What a rollout's status write changes, in the write's transaction `tx`: the device's
    /// phase in the newest rollout of its application (when it is updating toward that rollout's
    /// version), from what the write tells its history; and the rollout's id on those events.
    pub(super) async fn follow_rollout(
        tx: &mut Tx<'_>,
        app: &str,
        device: &str,
        events: &mut [HistoryEvent],
    ) -> Result<(), RegistryError> {
        let row = sqlx::query(
            "SELECT rollout_id, phase, target FROM rollout_devices WHERE application = $1 AND device = $2 \
             AND rollout_id = (SELECT MAX(id) FROM rollouts WHERE application = $1)",
        )
        .bind(app)
        .bind(device)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { return Ok(()) };
        let id: i64 = row.try_get("rollout_id")?;
        let phase: String = row.try_get("phase")?;
        let target: Option<String> = row.try_get("target")?;
        let (Some(phase), Some(target)) = (Phase::parse(&phase), target) else {
            return Ok(());
        };
        if !phase.in_flight() {
            return Ok(());
        }
        for event in events.iter_mut().filter(|event| event.target == target) {
            event.rollout = Some(id);
        }
        let now = chrono::Utc::now().timestamp_millis();
        match phase_after(phase, Some(&target), events) {
            Some((next, reason)) => {
                sqlx::query(
                    "UPDATE rollout_devices SET phase = $3, reason = $4, progress_at = $5, \
                     swapped_at = CASE WHEN $3 = 'swapping' THEN $5 ELSE swapped_at END \
                     WHERE rollout_id = $1 AND device = $2",
                )
                .bind(id)
                .bind(device)
                .bind(next.as_str())
                .bind(reason)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            }
            // Any write of an update in flight is progress (the status tracker writes only
            // when it moved), which the stall timeout counts from.
            None => {
                sqlx::query(
                    "UPDATE rollout_devices SET progress_at = $3 WHERE rollout_id = $1 AND device = $2",
                )
                .bind(id)
                .bind(device)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            }
        }
        Ok(())
    }

    /// The version device `device` of `app` runs, as its stored `status.firmware` says.
    async fn current_version(tx: &mut Tx<'_>, app: &str, device: &str) -> Result<String, RegistryError> {
        let status: Option<String> =
            sqlx::query("SELECT status FROM devices WHERE application = $1 AND name = $2")
                .bind(app)
                .bind(device)
                .fetch_optional(&mut **tx)
                .await?
                .map(|row| row.try_get("status"))
                .transpose()?;
        Ok(status
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|status| FirmwareReport::from_json(status.get("firmware")?).ok())
            .map(|report| report.status.current)
            .unwrap_or_default())
    }

    /// [`RolloutStore::start`] without a concurrency limit: nothing to count, so one statement
    /// starts the device if it is pending, its wave open and the rollout active, without the
    /// rollout's lock (1,000 devices starting at once queue for SQLite's one writer otherwise).
    async fn start_unlimited(
        &self,
        id: RolloutId,
        device: &str,
        target: &str,
        now: i64,
    ) -> Result<Admission, RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        let started = sqlx::query(
            "UPDATE rollout_devices SET phase = 'updating', target = $3, started_at = $4, progress_at = $4 \
             WHERE rollout_id = $1 AND device = $2 AND phase = 'pending' \
             AND wave <= (SELECT wave FROM rollouts WHERE id = $1 AND state = 'active')",
        )
        .bind(id)
        .bind(device)
        .bind(target)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let admission = if started == 1 {
            Admission::Started
        } else {
            let phase: Option<String> =
                sqlx::query("SELECT phase FROM rollout_devices WHERE rollout_id = $1 AND device = $2")
                    .bind(id)
                    .bind(device)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|row| row.try_get("phase"))
                    .transpose()?;
            match phase {
                Some(phase) if started_already(&phase) => Admission::Started,
                _ => Admission::Refused,
            }
        };
        tx.commit().await?;
        Ok(admission)
    }

    /// Tell the history of each device of rollout `id` in `phases` (from `rows`) `kind`.
    async fn tell_members(
        &self,
        tx: &mut Tx<'_>,
        app: &str,
        id: RolloutId,
        rows: &[(String, Option<String>)],
        kind: EventKind,
        reason: &str,
    ) -> Result<(), RegistryError> {
        let app_name = AppName::parse(app)?;
        for (device, target) in rows {
            let current = Self::current_version(tx, app, device).await?;
            let event = HistoryEvent {
                kind,
                current,
                target: target.clone().unwrap_or_default(),
                digest: None,
                percent: None,
                reason: Some(reason.to_string()),
                rollout: Some(id),
            };
            let device = crate::DeviceName::parse(device)?;
            self.append_history(tx, &app_name, &device, vec![event]).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl RolloutStore for SqlRegistry {
    async fn create_rollout(&self, new: NewRollout<'_>) -> Result<Rollout, RegistryError> {
        let spec = to_text(new.spec)?;
        let previous = new.previous.map(to_text).transpose()?;
        let progress = Progress::new(new.now);
        for _ in 0..3 {
            let (_writing, mut tx) = self.begin_write().await?;
            let open = sqlx::query(
                "SELECT id FROM rollouts WHERE application = $1 AND state IN ('active', 'paused')",
            )
            .bind(new.app.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(open) = open {
                let id: i64 = open.try_get("id")?;
                return Err(RegistryError::AlreadyExists(format!(
                    "rollout {id} of {} is open (active or paused): cancel it first",
                    new.app
                )));
            }
            let id: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) + 1 AS id FROM rollouts")
                .fetch_one(&mut *tx)
                .await?
                .try_get("id")?;
            let inserted = sqlx::query(&format!(
                "INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, 0, NULL, 0, $7, $7)"
            ))
            .bind(id)
            .bind(new.app.as_str())
            .bind(&spec)
            .bind(previous.clone())
            .bind(progress.state.as_str())
            .bind(0i32)
            .bind(new.now)
            .execute(&mut *tx)
            .await;
            match inserted {
                // Another application's rollout took the id at the same moment: again.
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => continue,
                other => other?,
            };
            for batch in new.members.chunks(INSERT_BATCH) {
                let values: Vec<String> = (0..batch.len())
                    .map(|i| {
                        let p = i * 5;
                        format!(
                            "($1, $2, ${}, ${}, ${}, ${}, ${})",
                            p + 3,
                            p + 4,
                            p + 5,
                            p + 6,
                            p + 7
                        )
                    })
                    .collect();
                let sql = format!(
                    "INSERT INTO rollout_devices (rollout_id, application, device, wave, phase, previous, reason) VALUES {}",
                    values.join(", ")
                );
                let mut query = sqlx::query(&sql).bind(id).bind(new.app.as_str());
                for member in batch {
                    query = query
                        .bind(member.device.clone())
                        .bind(member.wave as i64)
                        .bind(Phase::Pending.as_str())
                        .bind(member.previous.as_ref().map(to_text).transpose()?)
                        .bind(member.reason.clone());
                }
                query.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            return Ok(Rollout {
                id,
                app: new.app.to_string(),
                spec: new.spec.clone(),
                previous: new.previous.cloned(),
                progress,
                created_at: new.now,
                updated_at: new.now,
            });
        }
        Err(RegistryError::Conflict)
    }

    async fn rollouts(&self, app: &AppName) -> Result<Vec<Rollout>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE application = $1 ORDER BY id DESC"
        ))
        .bind(app.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(rollout_from_row)
        .collect()
    }

    async fn rollout(&self, app: &AppName, id: RolloutId) -> Result<Option<Rollout>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE application = $1 AND id = $2"
        ))
        .bind(app.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(rollout_from_row)
        .transpose()
    }

    async fn latest_rollouts(&self) -> Result<Vec<Rollout>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id IN (SELECT MAX(id) FROM rollouts GROUP BY application)"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(rollout_from_row)
        .collect()
    }

    async fn members(&self, id: RolloutId) -> Result<Vec<Member>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {MEMBER_COLUMNS} FROM rollout_devices WHERE rollout_id = $1 ORDER BY wave, device"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(member_from_row)
        .collect()
    }

    async fn join(&self, id: RolloutId, app: &AppName, device: &str, wave: u32) -> Result<(), RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        let present = sqlx::query("SELECT 1 FROM rollout_devices WHERE rollout_id = $1 AND device = $2")
            .bind(id)
            .bind(device)
            .fetch_optional(&mut *tx)
            .await?;
        if present.is_none() {
            let inserted = sqlx::query(
                "INSERT INTO rollout_devices (rollout_id, application, device, wave, phase) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(app.as_str())
            .bind(device)
            .bind(wave as i64)
            .bind(Phase::Pending.as_str())
            .execute(&mut *tx)
            .await;
            match inserted {
                // Another instance added it meanwhile: it is in.
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(()),
                other => other?,
            };
        }
        tx.commit().await?;
        Ok(())
    }

    async fn start(
        &self,
        id: RolloutId,
        device: &str,
        target: &str,
        limit: Option<u32>,
        now: i64,
    ) -> Result<Admission, RegistryError> {
        if limit.is_none() {
            return self.start_unlimited(id, device, target, now).await;
        }
        let (_writing, mut tx) = self.begin_write().await?;
        // Lock the rollout's row (PostgreSQL; SQLite's write lock is held already): the count
        // below and the start are one step for every instance.
        let rollout =
            sqlx::query("UPDATE rollouts SET updated_at = updated_at WHERE id = $1 RETURNING state, wave")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(rollout) = rollout else {
            return Ok(Admission::Refused);
        };
        let state: String = rollout.try_get("state")?;
        let open_wave: i64 = rollout.try_get("wave")?;
        let member =
            sqlx::query("SELECT phase, wave FROM rollout_devices WHERE rollout_id = $1 AND device = $2")
                .bind(id)
                .bind(device)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(member) = member else {
            return Ok(Admission::Refused);
        };
        let phase: String = member.try_get("phase")?;
        let wave: i64 = member.try_get("wave")?;
        if started_already(&phase) {
            return Ok(Admission::Started);
        }
        if state != RolloutState::Active.as_str() || phase != Phase::Pending.as_str() || wave > open_wave {
            return Ok(Admission::Refused);
        }
        if let Some(limit) = limit {
            let in_flight: i64 = sqlx::query(
                "SELECT COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 AND phase IN ('updating', 'swapping')",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
            if in_flight >= i64::from(limit) {
                return Ok(Admission::Full);
            }
        }
        sqlx::query(
            "UPDATE rollout_devices SET phase = $3, target = $4, started_at = $5, progress_at = $5 \
             WHERE rollout_id = $1 AND device = $2",
        )
        .bind(id)
        .bind(device)
        .bind(Phase::Updating.as_str())
        .bind(target)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Admission::Started)
    }

    async fn advance(
        &self,
        id: RolloutId,
        expected: &Progress,
        next: &Progress,
        now: i64,
    ) -> Result<bool, RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE rollouts SET state = $2, wave = $3, wave_since = $4, wave_succeeded_at = $5, forgiven = $6, \
             reason = $7, halted = $8, updated_at = $9 \
             WHERE id = $1 AND state = $10 AND wave = $11 AND wave_since = $12 \
             AND COALESCE(wave_succeeded_at, -1) = $13 AND forgiven = $14 AND COALESCE(reason, '') = $15 AND halted = $16 \
             RETURNING application",
        )
        .bind(id)
        .bind(next.state.as_str())
        .bind(next.wave as i64)
        .bind(next.wave_since)
        .bind(next.wave_succeeded_at)
        .bind(next.forgiven as i64)
        .bind(next.reason.clone())
        .bind(i64::from(next.halted))
        .bind(now)
        .bind(expected.state.as_str())
        .bind(expected.wave as i64)
        .bind(expected.wave_since)
        .bind(expected.wave_succeeded_at.unwrap_or(-1))
        .bind(expected.forgiven as i64)
        .bind(expected.reason.clone().unwrap_or_default())
        .bind(i64::from(expected.halted))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(updated) = updated else {
            return Ok(false);
        };
        if next.state == RolloutState::Active && expected.state == RolloutState::Paused {
            // Nobody made progress in the pause, by design: the timeouts count from the resume.
            sqlx::query(
                "UPDATE rollout_devices SET progress_at = $2, \
                 swapped_at = CASE WHEN phase = 'swapping' THEN $2 ELSE swapped_at END \
                 WHERE rollout_id = $1 AND phase IN ('updating', 'swapping')",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if next.state == RolloutState::Cancelled && expected.state != RolloutState::Cancelled {
            let app: String = updated.try_get("application")?;
            let rows = sqlx::query(
                "SELECT device, target FROM rollout_devices WHERE rollout_id = $1 AND phase = 'updating'",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("device")?, row.try_get("target")?)))
            .collect::<Result<Vec<_>, RegistryError>>()?;
            let reason = next.reason.clone().unwrap_or_else(|| "rollout cancelled".into());
            self.tell_members(&mut tx, &app, id, &rows, EventKind::Cancelled, &reason)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn expire(
        &self,
        id: RolloutId,
        swap_timeout: Duration,
        stall_timeout: Duration,
        now: i64,
    ) -> Result<u64, RegistryError> {
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let (_writing, mut tx) = self.begin_write().await?;
        let rows = sqlx::query(
            "SELECT application, device, phase, target FROM rollout_devices WHERE rollout_id = $1 AND \
             ((phase = 'swapping' AND swapped_at < $2) OR (phase = 'updating' AND progress_at < $3))",
        )
        .bind(id)
        .bind(now.saturating_sub(millis(swap_timeout)))
        .bind(now.saturating_sub(millis(stall_timeout)))
        .fetch_all(&mut *tx)
        .await?;
        let mut expired = 0;
        for row in &rows {
            let app: String = row.try_get("application")?;
            let device: String = row.try_get("device")?;
            let phase: String = row.try_get("phase")?;
            let target: Option<String> = row.try_get("target")?;
            let reason = if phase == Phase::Swapping.as_str() {
                format!(
                    "silent for {} s after it was sent the whole image",
                    swap_timeout.as_secs()
                )
            } else {
                format!("no progress for {} s", stall_timeout.as_secs())
            };
            sqlx::query("UPDATE rollout_devices SET phase = 'failed', reason = $3 WHERE rollout_id = $1 AND device = $2")
                .bind(id)
                .bind(&device)
                .bind(&reason)
                .execute(&mut *tx)
                .await?;
            self.tell_members(&mut tx, &app, id, &[(device, target)], EventKind::Failed, &reason)
                .await?;
            expired += 1;
        }
        tx.commit().await?;
        Ok(expired)
    }
}
