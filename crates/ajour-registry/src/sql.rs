//! The registry in SQL: SQLite or PostgreSQL through `sqlx`'s `Any` driver, so both run the same
//! queries and the same migrations (`migrations/`). Placeholders are `$n`, which both accept.

use crate::aliases::device_aliases;
use crate::credentials::{seal_plain_passwords, unique_user_names, CredentialKeys};
use crate::model::{AppName, DeviceName, Key, ListParams, Metadata, Resource, Scope};
use crate::schema::{self, SchemaReport};
use crate::selector::LabelSelector;
use crate::{Change, HistoryRetention, RecordingMerge, Registry, RegistryError, StatusMerge};
use ajour_types::{EventKind, HistoryEvent, RecordedEvent};
use async_trait::async_trait;
use serde_json::{Map, Value};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

mod access;
mod beside;
mod builds;
mod rollouts;

pub use beside::BesideRegistry;

/// A transaction on the registry's database.
type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

/// How often a status write is retried when other writers keep changing the object.
const STATUS_WRITE_ATTEMPTS: usize = 10;

/// How long a query waits for a connection to a database server, including connecting: the bound
/// on a request that needs the database while it is away.
const SERVER_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The same for a SQLite file (sqlx's default).
const SQLITE_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct SqlRegistryOptions {
    /// The server secret device passwords are sealed with (see [`crate::credentials`]).
    pub credential_keys: Arc<CredentialKeys>,
    pub max_connections: u32,
    /// Bring the schema up to date on connect (see [`crate::schema`]); otherwise only check that
    /// it is, and refuse a database that is not (`ajour serve --no-migrate`).
    pub migrate: bool,
    /// How much of each device's history is kept.
    pub history: HistoryRetention,
}

impl Default for SqlRegistryOptions {
    /// This process's random credential key: right for tests, while a server passes the one it keeps.
    fn default() -> Self {
        Self {
            credential_keys: CredentialKeys::for_this_process(),
            max_connections: 8,
            migrate: true,
            history: HistoryRetention::default(),
        }
    }
}

/// The registry on SQLite or PostgreSQL.
#[derive(Clone)]
pub struct SqlRegistry {
    pool: AnyPool,
    options: SqlRegistryOptions,
    /// PostgreSQL's URL: writes are announced on [`CHANGES_CHANNEL`] and can be listened to.
    postgres_url: Option<String>,
    /// What connecting found and did to the schema.
    schema: SchemaReport,
    /// SQLite: held by the one status write in a transaction. SQLite lets one writer at a time
    /// in anyway; waiting here rather than in the database keeps the other pooled connections
    /// free for reads (a device's first status reads its spec).
    sqlite_writer: Arc<tokio::sync::Semaphore>,
}

/// The PostgreSQL notification channel spec writes are announced on; the payload is `app` or
/// `app/device` (names never hold a `/`).
const CHANGES_CHANNEL: &str = "ajour_registry_changes";

const COLUMNS: &str =
    "name, uid, creation_timestamp, generation, resource_version, labels, annotations, spec, status";

impl SqlRegistry {
    /// A transaction that will write. SQLite: take the write lock at the start (IMMEDIATE), as a
    /// transaction that read first and then wants to write while another writes fails at once
    /// instead of waiting; and hold the one-writer permit (returned) until it ends.
    async fn begin_write(&self) -> Result<(Option<tokio::sync::SemaphorePermit<'_>>, Tx<'_>), RegistryError> {
        Ok(match self.postgres_url {
            Some(_) => (None, self.pool.begin().await?),
            None => {
                let writing = self.sqlite_writer.acquire().await.ok();
                (writing, self.pool.begin_with("BEGIN IMMEDIATE").await?)
            }
        })
    }

    /// Append `events` to the history of `device`, within the status write's transaction `tx`,
    /// then drop what the retention no longer keeps. Progress told already in the device's
    /// current update is not told again: a late write of another instance can move a device's
    /// shown progress back, and the next write past a milestone would tell it a second time.
    async fn append_history(
        &self,
        tx: &mut Tx<'_>,
        app: &AppName,
        device: &DeviceName,
        mut events: Vec<HistoryEvent>,
    ) -> Result<(), RegistryError> {
        let recent = sqlx::query(
            "SELECT seq, event FROM device_history WHERE application = $1 AND device = $2 \
             ORDER BY seq DESC LIMIT 16",
        )
        .bind(app.as_str())
        .bind(device.as_str())
        .fetch_all(&mut **tx)
        .await?;
        let last_seq = match recent.first() {
            Some(row) => row.try_get::<i64, _>("seq")?,
            None => 0,
        };
        // What this update told so far, newest first, back to its start.
        let mut told = Vec::new();
        for row in &recent {
            let text: String = row.try_get("event")?;
            let Some(event) = serde_json::from_str(&text)
                .ok()
                .and_then(|v| HistoryEvent::from_json(&v))
            else {
                continue;
            };
            let started = event.kind == EventKind::Started;
            told.push(event);
            if started {
                break;
            }
        }
        events.retain(|event| {
            !matches!(event.kind, EventKind::Progress | EventKind::Swapping)
                || !told.iter().any(|earlier| {
                    earlier.kind == event.kind
                        && earlier.digest == event.digest
                        && earlier.percent == event.percent
                })
        });
        let now = chrono::Utc::now().timestamp_millis();
        for (seq, event) in (last_seq + 1..).zip(&events) {
            sqlx::query("INSERT INTO device_history (application, device, seq, at, event) VALUES ($1, $2, $3, $4, $5)")
                .bind(app.as_str())
                .bind(device.as_str())
                .bind(seq)
                .bind(now)
                .bind(event.to_json().to_string())
                .execute(&mut **tx)
                .await?;
        }
        let retention = self.options.history;
        let newest = last_seq + events.len() as i64;
        let oldest_kept = newest - i64::from(retention.max_events);
        let max_age = i64::try_from(retention.max_age.as_millis()).unwrap_or(i64::MAX);
        sqlx::query(
            "DELETE FROM device_history WHERE application = $1 AND device = $2 AND (seq <= $3 OR at < $4)",
        )
        .bind(app.as_str())
        .bind(device.as_str())
        .bind(oldest_kept)
        .bind(now.saturating_sub(max_age))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The newest `limit` entries of the history of `device` of `app`, newest first, whether or
    /// not this database holds the device (beside another registry it does not).
    pub(crate) async fn history_of(
        &self,
        app: &AppName,
        device: &DeviceName,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, RegistryError> {
        let rows = sqlx::query(
            "SELECT at, event FROM device_history WHERE application = $1 AND device = $2 \
             ORDER BY seq DESC LIMIT $3",
        )
        .bind(app.as_str())
        .bind(device.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let at: i64 = row.try_get("at")?;
                let text: String = row.try_get("event")?;
                let event = serde_json::from_str(&text)
                    .ok()
                    .and_then(|value| HistoryEvent::from_json(&value))
                    .ok_or_else(|| RegistryError::Corrupt(format!("history of {device}@{app}: {text}")))?;
                let time = chrono::DateTime::from_timestamp_millis(at)
                    .ok_or_else(|| RegistryError::Corrupt(format!("history of {device}@{app}: time {at}")))?;
                Ok(RecordedEvent { time, event })
            })
            .collect()
    }

    /// Tell the history of `device` of `app` `events`, and move its place in a rollout, in one
    /// transaction: what a status write does in this database, for a status written elsewhere.
    pub(crate) async fn record(
        &self,
        app: &AppName,
        device: &DeviceName,
        mut events: Vec<HistoryEvent>,
    ) -> Result<(), RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        Self::follow_rollout(&mut tx, app.as_str(), device.as_str(), &mut events).await?;
        if !events.is_empty() {
            self.append_history(&mut tx, app, device, events).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Delete what this database keeps of `key` beside its registry entry (its history and
    /// rollout entries; an application's: of all its devices, and its rollouts).
    pub(crate) async fn forget(&self, key: &Key) -> Result<(), RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        Self::forget_in(&mut tx, key).await?;
        tx.commit().await?;
        Ok(())
    }

    /// [`Self::forget`] within `tx`.
    async fn forget_in(tx: &mut Tx<'_>, key: &Key) -> Result<(), RegistryError> {
        let (app, device, tables): (_, _, &[&str]) = match key {
            Key::App(app) => (
                app,
                None,
                &["device_history", "rollout_devices", "rollouts", "builds"],
            ),
            Key::Device(app, device) => (
                app,
                Some(device),
                &["device_history", "rollout_devices", "builds"],
            ),
        };
        for table in tables {
            let query = match device {
                Some(_) => format!("DELETE FROM {table} WHERE application = $1 AND device = $2"),
                None => format!("DELETE FROM {table} WHERE application = $1"),
            };
            let mut delete = sqlx::query(&query).bind(app.as_str());
            if let Some(device) = device {
                delete = delete.bind(device.as_str());
            }
            delete.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Connect to `url` (`sqlite://...` or `postgres://...`) and bring the schema up to date, once
    /// across every instance starting together; a schema newer than this build, or migrated by
    /// another build, is refused ([`RegistryError::Schema`]). With `options.migrate` off, the
    /// schema is only checked and must be current.
    pub async fn connect(url: &str, options: SqlRegistryOptions) -> Result<Self, RegistryError> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        if let Some(path) = sqlite_file(url) {
            owner_only(path)?;
        }
        let pool = AnyPoolOptions::new()
            // A database server can go away: then a device's request that needs it should get
            // its answer (503, or Wait) soon, not after sqlx's 30 s. A SQLite file cannot; there a
            // wait for a connection means load, and a flood of requests is better slowed than
            // failed.
            .acquire_timeout(if is_sqlite {
                SQLITE_ACQUIRE_TIMEOUT
            } else {
                SERVER_ACQUIRE_TIMEOUT
            })
            // SQLite serialises writers anyway; a few connections serve concurrent readers.
            .max_connections(if is_sqlite {
                options.max_connections.min(4)
            } else {
                options.max_connections
            })
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if is_sqlite {
                        // WAL: readers never wait for the writer, and a commit appends to the log
                        // instead of syncing the database file twice; NORMAL still survives a
                        // crash of the process (only a power cut can lose the last commits).
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = NORMAL",
                            "PRAGMA busy_timeout = 5000",
                        ] {
                            sqlx::Executor::execute(&mut *connection, pragma).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let schema = if options.migrate {
            schema::migrate(&pool).await?
        } else {
            schema::check(&pool, is_sqlite).await?
        };
        let postgres_url = (!is_sqlite).then(|| url.to_string());
        Ok(Self {
            pool,
            options,
            postgres_url,
            schema,
            sqlite_writer: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    /// The SQLite database file in `data_dir`, created when missing (readable by its owner only).
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!("sqlite://{}?mode=rwc", data_dir.join("ajour.db").display())
    }

    /// What connecting found and did to the schema: the migrations it applied, the version now.
    pub fn schema(&self) -> &SchemaReport {
        &self.schema
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    async fn fetch_row(&self, key: &Key) -> Result<Option<Resource>, RegistryError> {
        let row = match key {
            Key::App(app) => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM applications WHERE name = $1"))
                    .bind(app.as_str())
                    .fetch_optional(&self.pool)
                    .await?
            }
            Key::Device(app, device) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM devices WHERE application = $1 AND name = $2"
                ))
                .bind(app.as_str())
                .bind(device.as_str())
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.map(|row| resource_from_row(&row, key)).transpose()
    }

    /// Write `resource` over the stored object if its resource version is still `expected`.
    /// Returns false when someone else wrote in between.
    async fn replace_if_unchanged(
        &self,
        key: &Key,
        resource: &Resource,
        expected: &str,
    ) -> Result<bool, RegistryError> {
        let m = &resource.metadata;
        let (table, key_clause) = match key {
            Key::App(_) => ("applications", "name = $6"),
            Key::Device(..) => ("devices", "application = $7 AND name = $6"),
        };
        let sql = format!(
            "UPDATE {table} SET generation = $1, resource_version = $2, labels = $3, annotations = $4, spec = $5, status = $8 \
             WHERE {key_clause} AND resource_version = $9"
        );
        let (app, name) = key_parts(key);
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(&sql)
            .bind(m.generation as i64)
            .bind(m.resource_version.as_str())
            .bind(to_text(&m.labels)?)
            .bind(to_text(&m.annotations)?)
            .bind(to_text(&resource.spec)?)
            .bind(name)
            .bind(app)
            .bind(to_text(&resource.status)?)
            .bind(expected)
            .execute(&mut *tx)
            .await?;
        if result.rows_affected() != 1 {
            return Ok(false);
        }
        Self::record_user_names(&mut tx, key, &resource.spec).await?;
        Self::record_aliases(&mut tx, key, &resource.spec).await?;
        self.announce(&mut tx, key).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Check a device's spec and seal the plain-text passwords in it (one keyed hash each: no
    /// need to leave the async workers): a malformed credential or alias list is refused before
    /// anything is written.
    fn check_and_seal(&self, key: &Key, spec: &mut Map<String, Value>) -> Result<(), RegistryError> {
        match key {
            Key::Device(app, device) => {
                device_aliases(spec)?;
                seal_plain_passwords(app, device, spec, &self.options.credential_keys)
            }
            Key::App(_) => Ok(()),
        }
    }

    /// Announce a write to `key` to every instance listening ([`Registry::changes`]), when the
    /// transaction commits (PostgreSQL sends notifications on commit, and none on rollback).
    async fn announce(&self, tx: &mut Tx<'_>, key: &Key) -> Result<(), RegistryError> {
        if self.postgres_url.is_none() {
            return Ok(());
        }
        let payload = match key {
            Key::App(app) => app.to_string(),
            Key::Device(app, device) => format!("{app}/{device}"),
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(payload)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Record the `unique` user names of device `key` (replacing its old ones) within `tx`.
    async fn record_user_names(
        tx: &mut Tx<'_>,
        key: &Key,
        spec: &Map<String, Value>,
    ) -> Result<(), RegistryError> {
        record_names(tx, key, &USER_NAMES, unique_user_names(spec)).await
    }

    /// The device of `app` that has `name` in `index`.
    async fn device_by_name(
        &self,
        index: &NameIndex,
        app: &AppName,
        name: &str,
    ) -> Result<Option<DeviceName>, RegistryError> {
        let NameIndex { table, column, .. } = index;
        let row = sqlx::query(&format!(
            "SELECT device FROM {table} WHERE application = $1 AND {column} = $2"
        ))
        .bind(app.as_str())
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let device: String = row.try_get("device")?;
            Ok(DeviceName::parse(&device)?)
        })
        .transpose()
    }

    /// Record the aliases (`spec.alias`) of device `key` (replacing its old ones) within `tx`.
    async fn record_aliases(
        tx: &mut Tx<'_>,
        key: &Key,
        spec: &Map<String, Value>,
    ) -> Result<(), RegistryError> {
        record_names(tx, key, &ALIASES, device_aliases(spec)?).await
    }
}

/// A table in which a name finds one device of an application: `(application, NAME, device)`,
/// its key `(application, NAME)`.
struct NameIndex {
    table: &'static str,
    column: &'static str,
    /// What a name is, in errors.
    what: &'static str,
}

/// `unique` user names: a device logs in as `username@app`.
const USER_NAMES: NameIndex = NameIndex {
    table: "device_users",
    column: "username",
    what: "unique user name",
};

/// `spec.alias`: a client certificate's subject DN finds its device.
const ALIASES: NameIndex = NameIndex {
    table: "device_aliases",
    column: "alias",
    what: "alias",
};

/// Make `names` device `key`'s in `index`, replacing its old ones, within `tx`. A name another
/// device of the application has is refused, naming that device.
async fn record_names(
    tx: &mut Tx<'_>,
    key: &Key,
    index: &NameIndex,
    names: Vec<String>,
) -> Result<(), RegistryError> {
    let Key::Device(app, device) = key else {
        return Ok(());
    };
    let NameIndex { table, column, what } = index;
    sqlx::query(&format!(
        "DELETE FROM {table} WHERE application = $1 AND device = $2"
    ))
    .bind(app.as_str())
    .bind(device.as_str())
    .execute(&mut **tx)
    .await?;
    for name in names {
        // Looked for first so that the refusal can name the device: after a failed insert a
        // PostgreSQL transaction takes no more queries. The unique key still decides between two
        // writers racing for one name.
        let holder = sqlx::query(&format!(
            "SELECT device FROM {table} WHERE application = $1 AND {column} = $2"
        ))
        .bind(app.as_str())
        .bind(name.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(holder) = holder {
            let holder: String = holder.try_get("device")?;
            return Err(RegistryError::AlreadyExists(format!(
                "{what} '{name}' (listed by device '{holder}') in application '{app}'"
            )));
        }
        let inserted = sqlx::query(&format!(
            "INSERT INTO {table} (application, {column}, device) VALUES ($1, $2, $3)"
        ))
        .bind(app.as_str())
        .bind(name.as_str())
        .bind(device.as_str())
        .execute(&mut **tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(RegistryError::AlreadyExists(format!(
                    "{what} '{name}' in application '{app}'"
                )))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The file of a `sqlite://PATH[?options]` URL; `None` for an in-memory database or another URL.
fn sqlite_file(url: &str) -> Option<&Path> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.starts_with(':')).then(|| Path::new(path))
}

/// Make the database file readable and writable by its owner only, creating it (empty, which
/// SQLite takes as a new database) when missing: it holds device credentials. SQLite gives its
/// `-wal` and `-shm` files the permissions of the database file.
#[cfg(unix)]
fn owner_only(path: &Path) -> Result<(), RegistryError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let failed = |e: std::io::Error| RegistryError::Database(format!("{}: {e}", path.display()).into());
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(failed)
}

#[cfg(not(unix))]
fn owner_only(_: &Path) -> Result<(), RegistryError> {
    Ok(())
}

#[async_trait]
impl Registry for SqlRegistry {
    async fn create(&self, key: &Key, mut resource: Resource) -> Result<Resource, RegistryError> {
        check_names(key, &resource.metadata)?;
        if let Key::Device(app, _) = key {
            if self.fetch_row(&Key::App(app.clone())).await?.is_none() {
                return Err(RegistryError::NotFound(format!("application '{app}'")));
            }
        }
        self.check_and_seal(key, &mut resource.spec)?;
        let (app, name) = key_parts(key);
        let m = &mut resource.metadata;
        m.application = app.map(str::to_string);
        m.uid = uuid::Uuid::new_v4().to_string();
        m.creation_timestamp = Some(now());
        m.generation = 1;
        m.resource_version = uuid::Uuid::new_v4().to_string();
        let sql = match key {
            Key::App(_) => format!(
                "INSERT INTO applications ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ),
            Key::Device(..) => format!(
                "INSERT INTO devices (application, {COLUMNS}) VALUES ($10, $1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ),
        };
        let mut query = sqlx::query(&sql)
            .bind(name)
            .bind(m.uid.as_str())
            .bind(m.creation_timestamp.as_deref().unwrap_or_default())
            .bind(m.generation as i64)
            .bind(m.resource_version.as_str())
            .bind(to_text(&m.labels)?)
            .bind(to_text(&m.annotations)?)
            .bind(to_text(&resource.spec)?)
            .bind(to_text(&resource.status)?);
        if let Some(app) = app {
            query = query.bind(app);
        }
        let mut tx = self.pool.begin().await?;
        match query.execute(&mut *tx).await {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(RegistryError::AlreadyExists(key.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
        Self::record_user_names(&mut tx, key, &resource.spec).await?;
        Self::record_aliases(&mut tx, key, &resource.spec).await?;
        self.announce(&mut tx, key).await?;
        tx.commit().await?;
        Ok(resource)
    }

    async fn get(&self, key: &Key) -> Result<Option<Resource>, RegistryError> {
        self.fetch_row(key).await
    }

    async fn list(&self, scope: &Scope, params: &ListParams) -> Result<Vec<Resource>, RegistryError> {
        let selector = LabelSelector::parse(params.labels.as_deref().unwrap_or_default())?;
        let rows = match scope {
            Scope::Apps => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM applications ORDER BY name"))
                    .fetch_all(&self.pool)
                    .await?
            }
            Scope::Devices(app) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM devices WHERE application = $1 ORDER BY name"
                ))
                .bind(app.as_str())
                .fetch_all(&self.pool)
                .await?
            }
        };
        let application = match scope {
            Scope::Apps => None,
            Scope::Devices(app) => Some(app.as_str()),
        };
        let mut out = Vec::new();
        // Labels are JSON text, so the selector is applied here rather than in SQL.
        for row in rows {
            let resource = resource_from_parts(&row, application)?;
            if selector.matches(&resource.metadata.labels) {
                out.push(resource);
            }
        }
        let offset = params.offset.unwrap_or(0);
        let limit = params.limit.unwrap_or(usize::MAX);
        Ok(out.into_iter().skip(offset).take(limit).collect())
    }

    async fn update(&self, key: &Key, mut resource: Resource) -> Result<Resource, RegistryError> {
        check_names(key, &resource.metadata)?;
        let current = self
            .fetch_row(key)
            .await?
            .ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
        let given = &resource.metadata;
        if (!given.resource_version.is_empty() && given.resource_version != current.metadata.resource_version)
            || (!given.uid.is_empty() && given.uid != current.metadata.uid)
        {
            return Err(RegistryError::Conflict);
        }
        self.check_and_seal(key, &mut resource.spec)?;
        let m = &mut resource.metadata;
        m.uid = current.metadata.uid.clone();
        m.creation_timestamp = current.metadata.creation_timestamp.clone();
        m.application = current.metadata.application.clone();
        m.generation = current.metadata.generation + u64::from(resource.spec != current.spec);
        m.resource_version = uuid::Uuid::new_v4().to_string();
        if self
            .replace_if_unchanged(key, &resource, &current.metadata.resource_version)
            .await?
        {
            Ok(resource)
        } else {
            // Changed (or deleted) between our read and our write.
            Err(RegistryError::Conflict)
        }
    }

    async fn delete(&self, key: &Key) -> Result<(), RegistryError> {
        let deleted = match key {
            Key::App(app) => {
                let mut tx = self.pool.begin().await?;
                for index in ["device_users", "device_aliases"] {
                    sqlx::query(&format!("DELETE FROM {index} WHERE application = $1"))
                        .bind(app.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                Self::forget_in(&mut tx, key).await?;
                sqlx::query("DELETE FROM devices WHERE application = $1")
                    .bind(app.as_str())
                    .execute(&mut *tx)
                    .await?;
                let result = sqlx::query("DELETE FROM applications WHERE name = $1")
                    .bind(app.as_str())
                    .execute(&mut *tx)
                    .await?;
                self.announce(&mut tx, key).await?;
                tx.commit().await?;
                result.rows_affected()
            }
            Key::Device(app, device) => {
                let mut tx = self.pool.begin().await?;
                Self::record_user_names(&mut tx, key, &Map::new()).await?;
                Self::record_aliases(&mut tx, key, &Map::new()).await?;
                Self::forget_in(&mut tx, key).await?;
                let deleted = sqlx::query("DELETE FROM devices WHERE application = $1 AND name = $2")
                    .bind(app.as_str())
                    .bind(device.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                self.announce(&mut tx, key).await?;
                tx.commit().await?;
                deleted
            }
        };
        if deleted == 0 {
            return Err(RegistryError::NotFound(key.to_string()));
        }
        Ok(())
    }

    async fn merge_status_recording(
        &self,
        key: &Key,
        section: &str,
        merge: RecordingMerge<'_>,
    ) -> Result<bool, RegistryError> {
        // Only the status column is read and written: status writes are the registry's most
        // frequent ones, and the spec and metadata need not travel for them.
        let (table, key_clause, next_param, expected_param) = match key {
            Key::App(_) => ("applications", "name = $1", 2, 4),
            Key::Device(..) => ("devices", "name = $1 AND application = $2", 3, 5),
        };
        let select = format!("SELECT status, resource_version FROM {table} WHERE {key_clause}");
        let update = format!(
            "UPDATE {table} SET status = ${next_param}, resource_version = ${} WHERE {key_clause} AND resource_version = ${expected_param}",
            next_param + 1
        );
        let (app, name) = key_parts(key);
        for _ in 0..STATUS_WRITE_ATTEMPTS {
            // One transaction: the status and what the history tells of its change land together
            // or not at all. On PostgreSQL the update holds the row until the commit, so the
            // history of one device is written by one instance at a time.
            let (_writing, mut tx) = self.begin_write().await?;
            let mut query = sqlx::query(&select).bind(name);
            if let Some(app) = app {
                query = query.bind(app);
            }
            let row = query
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
            let mut status: Map<String, Value> = from_text(&row, "status")?;
            let expected: String = row.try_get("resource_version")?;
            let Some((value, events)) = merge(status.get(section)) else {
                return Ok(false);
            };
            status.insert(section.to_string(), value);
            let mut query = sqlx::query(&update).bind(name);
            if let Some(app) = app {
                query = query.bind(app);
            }
            let updated = query
                .bind(to_text(&status)?)
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(expected)
                .execute(&mut *tx)
                .await?;
            if updated.rows_affected() != 1 {
                continue; // another writer came first: read again (the transaction rolls back)
            }
            if let Key::Device(app, device) = key {
                let mut events = events;
                Self::follow_rollout(&mut tx, app.as_str(), device.as_str(), &mut events).await?;
                if !events.is_empty() {
                    self.append_history(&mut tx, app, device, events).await?;
                }
            }
            tx.commit().await?;
            return Ok(true);
        }
        Err(RegistryError::Conflict)
    }

    async fn history(&self, key: &Key, limit: u32) -> Result<Option<Vec<RecordedEvent>>, RegistryError> {
        let Key::Device(app, device) = key else {
            return Err(RegistryError::Invalid("only devices have a history".into()));
        };
        let exists = sqlx::query("SELECT 1 FROM devices WHERE application = $1 AND name = $2")
            .bind(app.as_str())
            .bind(device.as_str())
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_none() {
            return Err(RegistryError::NotFound(key.to_string()));
        }
        self.history_of(app, device, limit).await.map(Some)
    }

    async fn device_by_user(
        &self,
        app: &AppName,
        username: &str,
    ) -> Result<Option<DeviceName>, RegistryError> {
        self.device_by_name(&USER_NAMES, app, username).await
    }

    async fn device_by_alias(&self, app: &AppName, alias: &str) -> Result<Option<DeviceName>, RegistryError> {
        self.device_by_name(&ALIASES, app, alias).await
    }

    async fn changes(&self) -> Result<Option<tokio::sync::mpsc::UnboundedReceiver<Change>>, RegistryError> {
        let Some(url) = &self.postgres_url else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let first_retry = std::time::Duration::from_millis(100);
            let mut retry = first_retry;
            // Set while the listening connection is down: notifications sent meanwhile are lost,
            // so once it is back, every cached copy is to be forgotten. Not before: while the
            // database is away, cached copies are what keeps known devices served.
            let mut missed = false;
            loop {
                if missed {
                    // Reconnects the listener (and listens again) when the database is back.
                    if sqlx::query("SELECT 1").execute(&mut listener).await.is_err() {
                        tokio::select! {
                            _ = tokio::time::sleep(retry) => {}
                            _ = sender.closed() => return,
                        }
                        retry = (retry * 2).min(std::time::Duration::from_secs(5));
                        continue;
                    }
                    missed = false;
                    retry = first_retry;
                    if sender.send(Change::Everything).is_err() {
                        return;
                    }
                }
                let received = tokio::select! {
                    received = listener.try_recv() => received,
                    // Nobody listens any more: let the connection go.
                    _ = sender.closed() => return,
                };
                let change = match received {
                    Ok(Some(notification)) => match change_of(notification.payload()) {
                        Some(key) => Change::Object(key),
                        None => continue,
                    },
                    // The connection was lost (sqlx makes it again on the next use): what is
                    // sent until then is gone. Cached copies are forgotten once it is back.
                    Ok(None) => {
                        missed = true;
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "listening for registry changes failed; retrying");
                        missed = true;
                        continue;
                    }
                };
                if sender.send(change).is_err() {
                    return; // nobody listens any more
                }
            }
        });
        Ok(Some(receiver))
    }

    /// A SQLite file serves this process alone; a PostgreSQL database, every instance on it.
    fn shared(&self) -> bool {
        self.postgres_url.is_some()
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn merge_status_section(
        &self,
        key: &Key,
        section: &str,
        merge: StatusMerge<'_>,
    ) -> Result<bool, RegistryError> {
        self.merge_status_recording(key, section, &|stored| {
            merge(stored).map(|value| (value, Vec::new()))
        })
        .await
    }
}

/// The key a change notification names; `None` for a payload this version does not know.
fn change_of(payload: &str) -> Option<Key> {
    match payload.split_once('/') {
        None => AppName::parse(payload).ok().map(Key::App),
        Some((app, device)) => Some(Key::Device(
            AppName::parse(app).ok()?,
            DeviceName::parse(device).ok()?,
        )),
    }
}

fn check_names(key: &Key, metadata: &Metadata) -> Result<(), RegistryError> {
    let (app, name) = key_parts(key);
    if metadata.name != name {
        return Err(RegistryError::Invalid(format!(
            "metadata.name '{}' does not match the name in the path '{name}'",
            metadata.name
        )));
    }
    match (app, metadata.application.as_deref()) {
        (None, Some(_)) => Err(RegistryError::Invalid(
            "an application has no metadata.application".into(),
        )),
        (Some(app), Some(given)) if given != app => Err(RegistryError::Invalid(format!(
            "metadata.application '{given}' does not match the application in the path '{app}'"
        ))),
        _ => Ok(()),
    }
}

fn key_parts(key: &Key) -> (Option<&str>, &str) {
    match key {
        Key::App(app) => (None, app.as_str()),
        Key::Device(app, device) => (Some(app.as_str()), device.as_str()),
    }
}

fn resource_from_row(row: &AnyRow, key: &Key) -> Result<Resource, RegistryError> {
    resource_from_parts(row, key_parts(key).0)
}

fn resource_from_parts(row: &AnyRow, application: Option<&str>) -> Result<Resource, RegistryError> {
    let generation: i64 = row.try_get("generation")?;
    let metadata = Metadata {
        name: row.try_get("name")?,
        application: application.map(str::to_string),
        uid: row.try_get("uid")?,
        creation_timestamp: Some(row.try_get("creation_timestamp")?),
        generation: generation as u64,
        resource_version: row.try_get("resource_version")?,
        labels: from_text::<BTreeMap<String, String>>(row, "labels")?,
        annotations: from_text::<BTreeMap<String, String>>(row, "annotations")?,
        ..Default::default()
    };
    Ok(Resource {
        metadata,
        spec: from_text(row, "spec")?,
        status: from_text(row, "status")?,
    })
}

fn from_text<T: serde::de::DeserializeOwned>(row: &AnyRow, column: &str) -> Result<T, RegistryError> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| RegistryError::Corrupt(format!("column {column}: {e}")))
}

fn to_text<T: serde::Serialize>(value: &T) -> Result<String, RegistryError> {
    serde_json::to_string(value).map_err(|e| RegistryError::Corrupt(e.to_string()))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
