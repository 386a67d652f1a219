//! The schema's migrations: run once however many instances start together, and a database this
//! build cannot use (newer, migrated by another build, half-migrated, or not migrated while
//! migrations are off) refused with a message saying what to do. On both backends.

use ajour_registry::{known_migrations, RegistryError, SqlRegistry, SqlRegistryOptions};
use ajour_testkit::{Backend, TestDatabase, BACKENDS};
use sqlx::Connection;

/// A fresh database on `backend`: its URL, and what keeps it alive.
struct Database {
    url: String,
    _sqlite_dir: Option<tempfile::TempDir>,
    _postgres: Option<TestDatabase>,
}

async fn database(backend: Backend) -> Database {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            Database {
                url: SqlRegistry::sqlite_url(dir.path()),
                _sqlite_dir: Some(dir),
                _postgres: None,
            }
        }
        Backend::Postgres => {
            let db = TestDatabase::create().await;
            Database {
                url: db.url().to_string(),
                _sqlite_dir: None,
                _postgres: Some(db),
            }
        }
    }
}

fn options(migrate: bool) -> SqlRegistryOptions {
    SqlRegistryOptions {
        migrate,
        ..Default::default()
    }
}

async fn connect(url: &str, migrate: bool) -> Result<SqlRegistry, RegistryError> {
    SqlRegistry::connect(url, options(migrate)).await
}

/// Why connecting to `url` is refused, with and without migrating: the same schema error.
async fn refused(url: &str) -> String {
    let mut messages = Vec::new();
    for migrate in [true, false] {
        match connect(url, migrate).await {
            Err(RegistryError::Schema(message)) => messages.push(message),
            Err(other) => panic!("refused, but not for the schema (migrate: {migrate}): {other}"),
            Ok(_) => panic!("a schema this build cannot use was accepted (migrate: {migrate})"),
        }
    }
    assert_eq!(messages[0], messages[1]);
    messages.remove(0)
}

fn newest_known() -> i64 {
    known_migrations().last().unwrap().version
}

/// The `_sqlx_migrations` rows: version and success, by version.
async fn migration_rows(registry: &SqlRegistry) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT version, COUNT(*) FROM _sqlx_migrations GROUP BY version ORDER BY version")
        .fetch_all(registry.pool())
        .await
        .unwrap()
}

/// Instances starting at the same moment on one PostgreSQL database: made to by a transaction
/// that holds `_sqlx_migrations` (as sqlx creates it) locked until every instance is waiting, so
/// that without the advisory lock all of them would find nothing applied and apply everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_together_on_postgres_apply_each_migration_once() {
    const INSTANCES: usize = 4;
    let known: Vec<i64> = known_migrations().iter().map(|m| m.version).collect();
    assert!(known.len() >= 2, "{known:?}");
    let db = TestDatabase::create().await;
    let mut holder = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
         installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, \
         checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL)",
    )
    .execute(&mut holder)
    .await
    .unwrap();
    let mut held = holder.begin().await.unwrap();
    sqlx::raw_sql("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *held)
        .await
        .unwrap();
    let started: Vec<_> = (0..INSTANCES)
        .map(|_| {
            let url = db.url().to_string();
            tokio::spawn(async move { connect(&url, true).await })
        })
        .collect();
    // One holds the advisory lock and waits for the table, the others wait for the advisory lock.
    // (Another connection: a transaction sees one snapshot of pg_stat_activity.)
    let mut watcher = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting as usize == INSTANCES {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waiting} instances waiting"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    held.commit().await.unwrap();
    let mut registries = Vec::new();
    for task in started {
        registries.push(task.await.unwrap().unwrap());
    }
    let rows = migration_rows(&registries[0]).await;
    assert_eq!(rows, known.iter().map(|v| (*v, 1)).collect::<Vec<_>>());
    // Exactly one of them applied each migration; the others found nothing to do.
    let applied: Vec<usize> = registries.iter().map(|r| r.schema().applied.len()).collect();
    assert_eq!(applied.iter().sum::<usize>(), known.len(), "{applied:?}");
    assert!(applied.contains(&known.len()), "{applied:?}");
    for registry in &registries {
        assert_eq!(registry.schema().version, Some(newest_known()));
    }
    // The lock was let go of: one more start goes through, and applies nothing.
    let again = connect(db.url(), true).await.unwrap();
    assert!(again.schema().applied.is_empty());
}

#[tokio::test]
async fn a_schema_newer_than_this_build_is_refused_saying_what_to_do() {
    for backend in BACKENDS {
        let db = database(backend).await;
        let registry = connect(&db.url, true).await.unwrap();
        let future = newest_known() + 1_000_000;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, 'from a newer ajour', TRUE, $2, 0)",
        )
        .bind(future)
        .bind(vec![7u8; 48])
        .execute(registry.pool())
        .await
        .unwrap();
        drop(registry);
        let message = refused(&db.url).await;
        assert_eq!(
            message,
            format!(
                "the database schema is at version {future}, newer than this ajour knows ({}): \
                 run a newer ajour or restore a backup",
                newest_known()
            ),
            "{backend:?}"
        );
    }
}

#[tokio::test]
async fn an_unknown_older_migration_is_refused_as_another_builds() {
    for backend in BACKENDS {
        let db = database(backend).await;
        let registry = connect(&db.url, true).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (1, 'from another build', TRUE, $1, 0)",
        )
        .bind(vec![7u8; 48])
        .execute(registry.pool())
        .await
        .unwrap();
        drop(registry);
        let message = refused(&db.url).await;
        assert!(
            message.contains("migration 1 applied, which this ajour does not know")
                && message.contains("another build"),
            "{backend:?}: {message}"
        );
    }
}

#[tokio::test]
async fn a_migration_applied_with_other_contents_is_refused() {
    for backend in BACKENDS {
        let db = database(backend).await;
        let registry = connect(&db.url, true).await.unwrap();
        let first = &known_migrations()[0];
        sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2")
            .bind(vec![7u8; 48])
            .bind(first.version)
            .execute(registry.pool())
            .await
            .unwrap();
        drop(registry);
        let message = refused(&db.url).await;
        assert!(
            message.starts_with(&format!(
                "database migration {} ({}) was applied with other contents",
                first.version, first.description
            )) && message.contains("checksum differs"),
            "{backend:?}: {message}"
        );
    }
}

#[tokio::test]
async fn a_migration_that_failed_half_way_is_refused() {
    for backend in BACKENDS {
        let db = database(backend).await;
        let registry = connect(&db.url, true).await.unwrap();
        let newest = newest_known();
        sqlx::query("UPDATE _sqlx_migrations SET success = FALSE WHERE version = $1")
            .bind(newest)
            .execute(registry.pool())
            .await
            .unwrap();
        drop(registry);
        let message = refused(&db.url).await;
        assert!(
            message.starts_with(&format!("database migration {newest} failed part-way")),
            "{backend:?}: {message}"
        );
    }
}

#[tokio::test]
async fn without_migrating_only_a_current_schema_is_accepted() {
    for backend in BACKENDS {
        let db = database(backend).await;
        // Nothing applied yet: refused, and nothing was created.
        let Err(RegistryError::Schema(message)) = connect(&db.url, false).await else {
            panic!("{backend:?}: an empty database accepted without migrating");
        };
        assert_eq!(
            message,
            format!(
                "the database schema is empty, older than this ajour needs ({}), and migrations were turned off \
                 (--no-migrate): run `ajour migrate` first",
                newest_known()
            ),
            "{backend:?}"
        );
        // Migrated: everything applied once, then nothing more.
        let registry = connect(&db.url, true).await.unwrap();
        assert_eq!(registry.schema().applied, known_migrations(), "{backend:?}");
        assert_eq!(registry.schema().version, Some(newest_known()));
        let again = connect(&db.url, true).await.unwrap();
        assert!(again.schema().applied.is_empty(), "{backend:?}");
        let checked = connect(&db.url, false).await.unwrap();
        assert!(checked.schema().applied.is_empty(), "{backend:?}");
        assert_eq!(checked.schema().version, Some(newest_known()));

        // One migration short (as after an upgrade of the binary alone): refused, naming where
        // the schema is.
        let newest = newest_known();
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
            .bind(newest)
            .execute(registry.pool())
            .await
            .unwrap();
        let previous = known_migrations().iter().rev().nth(1).map(|m| m.version).unwrap();
        let Err(RegistryError::Schema(message)) = connect(&db.url, false).await else {
            panic!("{backend:?}: a schema one migration behind accepted without migrating");
        };
        assert!(
            message.starts_with(&format!(
                "the database schema is at version {previous}, older than this ajour needs ({newest})"
            )),
            "{backend:?}: {message}"
        );
    }
}

/// The migration that made `device_aliases`.
const ALIASES_MIGRATION: i64 = 20261214000001;

/// `url`'s database with the migrations before `ALIASES_MIGRATION` applied, as an older ajour
/// left it, and devices written to it then (application `app`): name and spec.
async fn before_aliases(url: &str, devices: &[(String, serde_json::Value)]) {
    use sqlx::migrate::Migrate;
    static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
    sqlx::any::install_default_drivers();
    let mut connection = sqlx::AnyConnection::connect(url).await.unwrap();
    connection.ensure_migrations_table().await.unwrap();
    let older = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && m.version < ALIASES_MIGRATION);
    for migration in older {
        connection.apply(migration).await.unwrap();
    }
    let row = |table: &str| {
        format!(
            "INSERT INTO {table} VALUES ({})",
            (1..=if table == "devices" { 10 } else { 9 })
                .map(|n| format!("${n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // Columns in the order of the first migration.
    sqlx::query(&row("applications"))
        .bind("app")
        .bind("uid-app")
        .bind("2026-12-01T00:00:00.000Z")
        .bind(1i64)
        .bind("v1")
        .bind("{}")
        .bind("{}")
        .bind("{}")
        .bind("{}")
        .execute(&mut connection)
        .await
        .unwrap();
    // One transaction: a thousand devices are written at once, not synced one by one.
    let mut tx = connection.begin().await.unwrap();
    for (name, spec) in devices {
        sqlx::query(&row("devices"))
            .bind("app")
            .bind(name.as_str())
            .bind(format!("uid-{name}"))
            .bind("2026-12-01T00:00:00.000Z")
            .bind(1i64)
            .bind("v1")
            .bind("{}")
            .bind("{}")
            .bind(spec.to_string())
            .bind("{}")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    connection.close().await.unwrap();
}

#[tokio::test]
async fn aliases_of_devices_stored_before_the_migration_are_indexed_once() {
    use ajour_registry::{AppName, Key, Registry};
    use serde_json::json;
    const DN: &str = "O=Drogue IoT, OU=Cloud, CN=Device 1";
    for backend in BACKENDS {
        let db = database(backend).await;
        let mut devices = vec![
            ("sensor-7".to_string(), json!({"alias": [DN, "both"]})),
            // Listed by two devices before anything checked: the first by name keeps it.
            ("sensor-8".into(), json!({"alias": ["both", "eight"]})),
            // Written before aliases were checked: passed over, the rest still indexed.
            ("broken".into(), json!({"alias": ["fine", 7]})),
            ("plain".into(), json!({"firmware": {"file": {"name": "fw"}}})),
        ];
        // More than one page of devices (500 are read at a time), sorting between the others.
        devices.extend((0..1001).map(|i| (format!("many-{i:04}"), json!({"alias": [format!("m{i}")]}))));
        before_aliases(&db.url, &devices).await;
        let registry = connect(&db.url, true).await.unwrap();
        assert_eq!(
            registry
                .schema()
                .applied
                .iter()
                .map(|m| m.version)
                .collect::<Vec<_>>(),
            [ALIASES_MIGRATION],
            "{backend:?}"
        );
        let app = AppName::parse("app").unwrap();
        let found = |alias: &str| {
            let alias = alias.to_string();
            let (registry, app) = (&registry, app.clone());
            async move {
                registry
                    .device_by_alias(&app, &alias)
                    .await
                    .unwrap()
                    .map(|d| d.to_string())
            }
        };
        assert_eq!(found(DN).await.as_deref(), Some("sensor-7"), "{backend:?}");
        assert_eq!(found("both").await.as_deref(), Some("sensor-7"), "{backend:?}");
        assert_eq!(found("eight").await.as_deref(), Some("sensor-8"), "{backend:?}");
        assert_eq!(found("fine").await, None, "{backend:?}");
        for i in [0, 499, 500, 999, 1000] {
            let expected = format!("many-{i:04}");
            assert_eq!(
                found(&format!("m{i}")).await.as_deref(),
                Some(expected.as_str()),
                "{backend:?}"
            );
        }
        let indexed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM device_aliases")
            .fetch_one(registry.pool())
            .await
            .unwrap();
        assert_eq!(indexed, 1001 + 3, "{backend:?}");
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pending_backfills")
            .fetch_one(registry.pool())
            .await
            .unwrap();
        assert_eq!(rows, 0, "{backend:?}: done, and marked done");
        // The device that lost the contested alias is refused when written again with it.
        let eight = Key::Device(
            app.clone(),
            ajour_registry::DeviceName::parse("sensor-8").unwrap(),
        );
        let mut stored = registry.get(&eight).await.unwrap().unwrap();
        stored.metadata.resource_version.clear();
        let written = registry.update(&eight, stored).await;
        assert!(
            matches!(&written, Err(RegistryError::AlreadyExists(m)) if m.contains("'both' (listed by device 'sensor-7')")),
            "{backend:?}: {written:?}"
        );
        // The index is then kept by writes as for any device: deleting one frees its aliases.
        let device = Key::Device(
            app.clone(),
            ajour_registry::DeviceName::parse("sensor-7").unwrap(),
        );
        registry.delete(&device).await.unwrap();
        assert_eq!(found(DN).await, None, "{backend:?}");
        // Once: a later start does not index again (the alias taken out by hand stays out).
        sqlx::query("DELETE FROM device_aliases WHERE alias = 'eight'")
            .execute(registry.pool())
            .await
            .unwrap();
        drop(registry);
        let again = connect(&db.url, true).await.unwrap();
        assert!(again.schema().applied.is_empty(), "{backend:?}");
        let eight = again.device_by_alias(&app, "eight").await.unwrap();
        assert_eq!(eight, None, "{backend:?}");
    }
}

#[tokio::test]
async fn an_unfinished_backfill_is_done_by_the_next_migrating_start_and_refused_without() {
    use ajour_registry::{AppName, Registry};
    use serde_json::json;
    for backend in BACKENDS {
        let db = database(backend).await;
        before_aliases(&db.url, &[("d".to_string(), json!({"alias": ["a"]}))]).await;
        // As a start that applied the migration and stopped before filling in: the migration
        // applied (its row in pending_backfills with it), nothing filled in.
        {
            use sqlx::migrate::Migrate;
            static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
            let mut connection = sqlx::AnyConnection::connect(&db.url).await.unwrap();
            let aliases = MIGRATOR.iter().find(|m| m.version == ALIASES_MIGRATION).unwrap();
            connection.apply(aliases).await.unwrap();
            connection.close().await.unwrap();
        }
        let Err(RegistryError::Schema(message)) = connect(&db.url, false).await else {
            panic!("{backend:?}: a pending backfill accepted without migrating");
        };
        assert_eq!(
            message,
            format!(
                "the database schema is at version {}, but filling in data after its migrations (device_aliases) \
                 did not finish, and migrations were turned off (--no-migrate): run `ajour migrate` first",
                newest_known()
            ),
            "{backend:?}"
        );
        let registry = connect(&db.url, true).await.unwrap();
        assert!(registry.schema().applied.is_empty(), "{backend:?}");
        let app = AppName::parse("app").unwrap();
        let found = registry.device_by_alias(&app, "a").await.unwrap();
        assert_eq!(found.map(|d| d.to_string()).as_deref(), Some("d"), "{backend:?}");
        connect(&db.url, false).await.unwrap();
    }
}
