//! [`BuildStore`] in the SQL registry's database (table `builds`). Each step is one transaction.
//! A target's one open build is the unique index `builds_one_open`'s to decide, so instances
//! creating builds at once record one; a step that reads a build's row to write it back (its log)
//! locks the row first with an `UPDATE` (PostgreSQL; SQLite's write lock is held already).

use super::{to_text, SqlRegistry};
use crate::builds::{BuildFilter, BuildStore, NewBuild};
use crate::RegistryError;
use ajour_types::build::{append_log, Build, BuildId, BuildLog, BuildOutcome, BuildState, BuildTarget};
use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;

const BUILD_COLUMNS: &str = "id, application, device, runner, spec, state, created_at, started_at, \
     completed_at, image, digest, version, message, reference";
/// The states of an open build, as SQL.
const OPEN: &str = "state IN ('queued', 'running')";
/// How many builds [`BuildStore::builds`] gives when asked for 0, and the most it gives.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;
/// Ids per statement when leases are renewed.
const RENEW_BATCH: usize = 500;
/// How often creating a build is tried when other builds take its id at the same moment.
const CREATE_ATTEMPTS: usize = 10;

fn corrupt(what: &str, error: impl std::fmt::Display) -> RegistryError {
    RegistryError::Corrupt(format!("{what}: {error}"))
}

fn not_found(id: BuildId) -> RegistryError {
    RegistryError::NotFound(format!("build {id}"))
}

/// The `device` column of `target`: '' for the application's own build.
fn device_column(target: &BuildTarget) -> &str {
    target.device.as_ref().map_or("", |device| device.as_str())
}

fn build_from_row(row: &AnyRow) -> Result<Build, RegistryError> {
    let id: i64 = row.try_get("id")?;
    let device: String = row.try_get("device")?;
    let spec: String = row.try_get("spec")?;
    let state: String = row.try_get("state")?;
    Ok(Build {
        id,
        app: row.try_get("application")?,
        device: (!device.is_empty()).then_some(device),
        runner: row.try_get("runner")?,
        spec: serde_json::from_str(&spec).map_err(|e| corrupt(&format!("spec of build {id}"), e))?,
        state: BuildState::parse(&state).ok_or_else(|| corrupt(&format!("state of build {id}"), &state))?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
        image: row.try_get("image")?,
        digest: row.try_get("digest")?,
        version: row.try_get("version")?,
        message: row.try_get("message")?,
        reference: row.try_get("reference")?,
    })
}

fn log_from_row(row: &AnyRow) -> Result<BuildLog, RegistryError> {
    let start: i64 = row.try_get("log_start")?;
    Ok(BuildLog {
        start: u64::try_from(start).map_err(|e| corrupt("log_start", e))?,
        text: row.try_get("log")?,
    })
}

fn log_start(log: &BuildLog) -> i64 {
    i64::try_from(log.start).unwrap_or(i64::MAX)
}

impl SqlRegistry {
    /// The open build of `target` and its state, if it has one.
    async fn open_build(&self, target: &BuildTarget) -> Result<Option<(BuildId, String)>, RegistryError> {
        sqlx::query(&format!(
            "SELECT id, state FROM builds WHERE application = $1 AND device = $2 AND {OPEN}"
        ))
        .bind(target.app.as_str())
        .bind(device_column(target))
        .fetch_optional(&self.pool)
        .await?
        .map(|row| Ok((row.try_get("id")?, row.try_get("state")?)))
        .transpose()
    }

    async fn exists(&self, id: BuildId) -> Result<bool, RegistryError> {
        Ok(sqlx::query("SELECT 1 FROM builds WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }
}

/// Why `target` gets no new build: its open build `id`, `state`.
fn refused(target: &BuildTarget, id: BuildId, state: &str) -> RegistryError {
    RegistryError::AlreadyExists(format!("build {id} of {target} is {state}"))
}

#[async_trait]
impl BuildStore for SqlRegistry {
    async fn create_build(&self, new: NewBuild<'_>) -> Result<Build, RegistryError> {
        let spec = to_text(new.spec)?;
        let device = device_column(new.target);
        for _ in 0..CREATE_ATTEMPTS {
            if let Some((id, state)) = self.open_build(new.target).await? {
                return Err(refused(new.target, id, &state));
            }
            let (_writing, mut tx) = self.begin_write().await?;
            let id: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) + 1 AS id FROM builds")
                .fetch_one(&mut *tx)
                .await?
                .try_get("id")?;
            let inserted = sqlx::query(&format!(
                "INSERT INTO builds ({BUILD_COLUMNS}, renewed_at, log, log_start) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '', 0)"
            ))
            .bind(id)
            .bind(new.target.app.as_str())
            .bind(device)
            .bind(new.runner)
            .bind(&spec)
            .bind(BuildState::Queued.as_str())
            .bind(new.now)
            .execute(&mut *tx)
            .await;
            match inserted {
                // The target's open build (the index `builds_one_open`: another instance created
                // it meanwhile), or another build that took the id at the same moment: the check
                // above tells which, once this transaction (failed, on PostgreSQL) is gone.
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    drop(tx);
                    continue;
                }
                other => other?,
            };
            tx.commit().await?;
            return Ok(Build {
                id,
                app: new.target.app.to_string(),
                device: new.target.device.as_ref().map(|d| d.to_string()),
                runner: new.runner.to_string(),
                spec: new.spec.clone(),
                state: BuildState::Queued,
                created_at: new.now,
                started_at: None,
                completed_at: None,
                image: None,
                digest: None,
                version: None,
                message: None,
                reference: None,
            });
        }
        Err(RegistryError::Conflict)
    }

    async fn build(&self, id: BuildId) -> Result<Option<Build>, RegistryError> {
        sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(build_from_row)
            .transpose()
    }

    async fn builds(&self, filter: BuildFilter<'_>) -> Result<Vec<Build>, RegistryError> {
        let limit = match filter.limit {
            0 => DEFAULT_LIMIT,
            limit => limit.min(MAX_LIMIT),
        };
        let mut conditions = Vec::new();
        let mut values = Vec::new();
        if let Some(app) = filter.app {
            values.push(app);
            conditions.push(format!("application = ${}", values.len()));
        }
        if let Some(device) = filter.device {
            values.push(device.unwrap_or(""));
            conditions.push(format!("device = ${}", values.len()));
        }
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds {clause} ORDER BY id DESC LIMIT ${}",
            values.len() + 1
        );
        let mut query = sqlx::query(&sql);
        for value in values {
            query = query.bind(value);
        }
        query
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(build_from_row)
            .collect()
    }

    /// Only an open build starts (again: a running one takes the new reference and lease); one
    /// closed meanwhile (found stale) stays closed, as [`BuildStore::finish_build`] leaves it.
    async fn start_build(&self, id: BuildId, reference: Option<&str>, now: i64) -> Result<(), RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        let started = sqlx::query(&format!(
            "UPDATE builds SET state = $2, started_at = COALESCE(started_at, $3), renewed_at = $3, \
             reference = COALESCE($4, reference) WHERE id = $1 AND {OPEN}"
        ))
        .bind(id)
        .bind(BuildState::Running.as_str())
        .bind(now)
        .bind(reference.map(str::to_string))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if started == 0 && !self.exists(id).await? {
            return Err(not_found(id));
        }
        Ok(())
    }

    async fn renew_builds(&self, ids: &[BuildId], now: i64) -> Result<(), RegistryError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (_writing, mut tx) = self.begin_write().await?;
        for batch in ids.chunks(RENEW_BATCH) {
            let placeholders: Vec<String> = (0..batch.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "UPDATE builds SET renewed_at = $1 WHERE {OPEN} AND id IN ({})",
                placeholders.join(", ")
            );
            let mut query = sqlx::query(&sql).bind(now);
            for id in batch {
                query = query.bind(*id);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn append_build_log(&self, id: BuildId, chunk: &str) -> Result<(), RegistryError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let (_writing, mut tx) = self.begin_write().await?;
        // Lock the row (PostgreSQL) before reading the log: appends of two writers follow each other.
        let row =
            sqlx::query("UPDATE builds SET log_start = log_start WHERE id = $1 RETURNING log, log_start")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| not_found(id))?;
        let log = append_log(log_from_row(&row)?, chunk);
        sqlx::query("UPDATE builds SET log = $2, log_start = $3 WHERE id = $1")
            .bind(id)
            .bind(&log.text)
            .bind(log_start(&log))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn build_log(&self, id: BuildId) -> Result<Option<BuildLog>, RegistryError> {
        sqlx::query("SELECT log, log_start FROM builds WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(log_from_row)
            .transpose()
    }

    async fn finish_build(&self, id: BuildId, outcome: &BuildOutcome, now: i64) -> Result<(), RegistryError> {
        let (state, image, digest, version, message) = match outcome {
            BuildOutcome::Succeeded {
                image,
                digest,
                version,
            } => (
                BuildState::Succeeded,
                Some(image.clone()),
                digest.clone(),
                Some(version.clone()),
                None,
            ),
            BuildOutcome::Failed { message } => (BuildState::Failed, None, None, None, Some(message.clone())),
        };
        let (_writing, mut tx) = self.begin_write().await?;
        let finished = sqlx::query(&format!(
            "UPDATE builds SET state = $2, completed_at = $3, image = $4, digest = $5, version = $6, message = $7 \
             WHERE id = $1 AND {OPEN}"
        ))
        .bind(id)
        .bind(state.as_str())
        .bind(now)
        .bind(image)
        .bind(digest)
        .bind(version)
        .bind(message)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if finished == 0 && !self.exists(id).await? {
            return Err(not_found(id));
        }
        Ok(())
    }

    async fn close_stale_builds(
        &self,
        stale_before: i64,
        message: &str,
        now: i64,
    ) -> Result<Vec<BuildId>, RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        let candidates: Vec<BuildId> = sqlx::query(&format!(
            "SELECT id FROM builds WHERE {OPEN} AND COALESCE(renewed_at, created_at) < $1 ORDER BY id"
        ))
        .bind(stale_before)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| row.try_get("id"))
        .collect::<Result<_, _>>()?;
        let mut closed = Vec::new();
        for id in candidates {
            // Closed here, unless another instance closed it or its runner renewed it meanwhile
            // (PostgreSQL: this waits for that transaction and looks at the row again); the row
            // stays locked until the log is written.
            let row = sqlx::query(&format!(
                "UPDATE builds SET state = $2, completed_at = $3, message = $4 \
                 WHERE id = $1 AND {OPEN} AND COALESCE(renewed_at, created_at) < $5 RETURNING log, log_start"
            ))
            .bind(id)
            .bind(BuildState::Failed.as_str())
            .bind(now)
            .bind(message)
            .bind(stale_before)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { continue };
            let log = log_from_row(&row)?;
            let line = if log.text.is_empty() || log.text.ends_with('\n') {
                format!("{message}\n")
            } else {
                format!("\n{message}\n")
            };
            let log = append_log(log, &line);
            sqlx::query("UPDATE builds SET log = $2, log_start = $3 WHERE id = $1")
                .bind(id)
                .bind(&log.text)
                .bind(log_start(&log))
                .execute(&mut *tx)
                .await?;
            closed.push(id);
        }
        tx.commit().await?;
        Ok(closed)
    }
}
