//! The database schema: the migrations in `migrations/`, run by whichever instance starts first.
//!
//! sqlx's `Migrator` keeps what was applied in `_sqlx_migrations` (version, checksum). The run
//! here uses its steps (through `sqlx::migrate::Migrate`, which the `Any` driver hands to the
//! backend's own) with three differences:
//!
//! - on PostgreSQL it holds sqlx's advisory lock (`pg_advisory_lock`, one per database) from
//!   before it looks at `_sqlx_migrations` until it is done, and lets go of it on failure too (by
//!   closing the session), so instances starting together apply each migration once, the others
//!   waiting and then finding nothing to do. SQLite needs no lock: one file has one server.
//! - a database that is newer than this build (a migration applied that it does not know), was
//!   migrated by another build (a checksum differs) or is half-migrated is refused with a message
//!   saying what to do, instead of sqlx's bare `VersionMissing`/`VersionMismatch`/`Dirty`;
//! - it says what it applied ([`SchemaReport`]), for `ajour migrate`;
//! - still holding the lock, it fills in data a migration asked for that SQL cannot fill in alike
//!   on both backends ([`crate::backfill`]).
//!
//! [`check`] looks without changing anything, for a server told not to migrate (and refuses a
//! database with a backfill pending, as it refuses one with a migration pending).

use crate::RegistryError;
use sqlx::migrate::{AppliedMigration, Migrate, Migration, Migrator};
use sqlx::AnyConnection;
use sqlx::AnyPool;
use std::collections::HashMap;

/// The migrations of this build.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// One migration, by version and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaVersion {
    pub version: i64,
    pub description: String,
}

impl std::fmt::Display for SchemaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.version, self.description)
    }
}

/// The schema as a connect found and left it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaReport {
    /// The migrations this connect applied, oldest first (none when another instance had, or
    /// when it was told not to migrate).
    pub applied: Vec<SchemaVersion>,
    /// The newest migration the database has now.
    pub version: Option<i64>,
}

/// The migrations this build has, oldest first.
pub fn known_migrations() -> Vec<SchemaVersion> {
    up_migrations()
        .map(|m| SchemaVersion {
            version: m.version,
            description: m.description.to_string(),
        })
        .collect()
}

fn up_migrations() -> impl Iterator<Item = &'static Migration> {
    MIGRATOR.iter().filter(|m| !m.migration_type.is_down_migration())
}

/// The newest migration this build knows.
fn newest_known() -> i64 {
    up_migrations().map(|m| m.version).max().unwrap_or(0)
}

/// Bring the schema up to date, once across every instance on the database.
pub(crate) async fn migrate(pool: &AnyPool) -> Result<SchemaReport, RegistryError> {
    let mut connection = pool.acquire().await?;
    // Waits while another instance migrates (PostgreSQL; a no-op on SQLite).
    connection.lock().await?;
    let result = migrate_locked(&mut connection).await;
    match &result {
        // Another instance waiting for the lock can go on.
        Ok(_) => {
            if connection.unlock().await.is_err() {
                let _ = connection.close().await;
            }
        }
        // Closing the session releases the lock whatever state the connection is in.
        Err(_) => {
            let _ = connection.close().await;
        }
    }
    result
}

async fn migrate_locked(connection: &mut AnyConnection) -> Result<SchemaReport, RegistryError> {
    connection.ensure_migrations_table().await?;
    let pending = examine(connection).await?;
    let mut applied = Vec::new();
    for migration in pending {
        connection.apply(migration).await?;
        tracing::info!(
            version = migration.version,
            description = %migration.description,
            "applied a database migration"
        );
        applied.push(SchemaVersion {
            version: migration.version,
            description: migration.description.to_string(),
        });
    }
    // Still under the lock: one instance fills in what the migrations left to fill in.
    crate::backfill::run_pending(connection).await?;
    Ok(SchemaReport {
        applied,
        version: Some(newest_known()),
    })
}

/// The schema as it is, changing nothing, and refused unless it is exactly this build's (all of
/// its migrations applied, and no other): for a server told not to migrate.
pub(crate) async fn check(pool: &AnyPool, is_sqlite: bool) -> Result<SchemaReport, RegistryError> {
    let mut connection = pool.acquire().await?;
    let exists: i64 = sqlx::query_scalar(if is_sqlite {
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
    } else {
        "SELECT COUNT(*) FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'"
    })
    .fetch_one(&mut *connection)
    .await?;
    let pending = if exists > 0 {
        examine(&mut connection).await?
    } else {
        up_migrations().collect()
    };
    let newest = newest_known();
    if !pending.is_empty() {
        let at = up_migrations()
            .filter(|m| !pending.iter().any(|p| p.version == m.version))
            .map(|m| m.version)
            .max()
            .map_or_else(|| "empty".to_string(), |version| format!("at version {version}"));
        return Err(RegistryError::Schema(format!(
            "the database schema is {at}, older than this ajour needs ({newest}), and migrations were turned off \
             (--no-migrate): run `ajour migrate` first"
        )));
    }
    let backfills = crate::backfill::pending(&mut connection).await?;
    if !backfills.is_empty() {
        return Err(RegistryError::Schema(format!(
            "the database schema is at version {newest}, but filling in data after its migrations ({}) did not finish, \
             and migrations were turned off (--no-migrate): run `ajour migrate` first",
            backfills.join(", ")
        )));
    }
    Ok(SchemaReport {
        applied: Vec::new(),
        version: Some(newest),
    })
}

/// The migrations still to apply, oldest first, once what the database has applied is known to
/// be this build's: no migration failed half-way, none is unknown, none differs.
async fn examine(connection: &mut AnyConnection) -> Result<Vec<&'static Migration>, RegistryError> {
    if let Some(version) = connection.dirty_version().await? {
        return Err(RegistryError::Schema(format!(
            "database migration {version} failed part-way on an earlier start (marked unsuccessful in _sqlx_migrations): \
             repair the database by hand or restore a backup"
        )));
    }
    let applied = connection.list_applied_migrations().await?;
    refuse_foreign(&applied)?;
    let applied: HashMap<i64, &AppliedMigration> = applied.iter().map(|m| (m.version, m)).collect();
    let mut pending = Vec::new();
    for migration in up_migrations() {
        match applied.get(&migration.version) {
            Some(done) if done.checksum != migration.checksum => {
                return Err(RegistryError::Schema(format!(
                    "database migration {} ({}) was applied with other contents than this ajour's (its checksum differs): \
                     the database was migrated by another build of ajour; run that build or restore a backup",
                    migration.version, migration.description
                )));
            }
            Some(_) => {}
            None => pending.push(migration),
        }
    }
    Ok(pending)
}

/// Refuse a database holding migrations this build does not know: made by a newer ajour (the
/// usual case: a rollback of the binary), or by another build.
fn refuse_foreign(applied: &[AppliedMigration]) -> Result<(), RegistryError> {
    let newest = newest_known();
    let unknown: Vec<i64> = applied
        .iter()
        .map(|m| m.version)
        .filter(|version| !MIGRATOR.version_exists(*version))
        .collect();
    let Some(&highest) = unknown.iter().max() else {
        return Ok(());
    };
    if highest > newest {
        return Err(RegistryError::Schema(format!(
            "the database schema is at version {highest}, newer than this ajour knows ({newest}): \
             run a newer ajour or restore a backup"
        )));
    }
    Err(RegistryError::Schema(format!(
        "the database has migration {highest} applied, which this ajour does not know (its newest is {newest}): \
         the database was migrated by another build of ajour; run that build or restore a backup"
    )))
}
