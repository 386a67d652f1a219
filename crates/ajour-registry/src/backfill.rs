//! Data a migration needs filled in from what is already stored, which its SQL cannot do alike on
//! SQLite and PostgreSQL (reading JSON lists): the migration adds a row to `pending_backfills`,
//! and the instance that migrates does the work right after the migrations, still holding the
//! migration lock, deleting the row in the same transaction. A start that stops half-way leaves
//! the row (and none of the work) for the next start.

use crate::aliases::device_aliases;
use crate::RegistryError;
use serde_json::{Map, Value};
use sqlx::{AnyConnection, Connection, Row};

/// Devices read at a time: a large registry is not held in memory whole.
const PAGE: i64 = 500;

/// Do every backfill still pending. A name this build does not know is refused as a schema from
/// another build.
pub(crate) async fn run_pending(connection: &mut AnyConnection) -> Result<(), RegistryError> {
    for name in pending(connection).await? {
        match name.as_str() {
            "device_aliases" => device_aliases_of_stored_devices(connection).await?,
            other => {
                return Err(RegistryError::Schema(format!(
                    "the database has a pending backfill '{other}' this ajour does not know: \
                     it was migrated by another build of ajour; run that build or restore a backup"
                )))
            }
        }
    }
    Ok(())
}

/// The backfills still to do, by name.
pub(crate) async fn pending(connection: &mut AnyConnection) -> Result<Vec<String>, RegistryError> {
    Ok(
        sqlx::query_scalar("SELECT name FROM pending_backfills ORDER BY name")
            .fetch_all(&mut *connection)
            .await?,
    )
}

/// Index the aliases of the devices stored before `device_aliases` existed. An alias two of them
/// list goes to the first by name, with a warning naming both: refusing to start over it would
/// keep every device out, while a write of either device later says what to fix. A spec whose
/// aliases are malformed (written before they were checked) is passed over with a warning.
async fn device_aliases_of_stored_devices(connection: &mut AnyConnection) -> Result<(), RegistryError> {
    let mut tx = connection.begin().await?;
    let (mut indexed, mut after) = (0usize, None::<(String, String)>);
    loop {
        // Only specs that mention "alias" at all are read: most devices list none.
        let page = match &after {
            None => sqlx::query(
                "SELECT application, name, spec FROM devices WHERE spec LIKE $1 \
                 ORDER BY application, name LIMIT $2",
            )
            .bind("%\"alias\"%")
            .bind(PAGE),
            Some((app, name)) => sqlx::query(
                "SELECT application, name, spec FROM devices WHERE spec LIKE $1 \
                 AND (application > $2 OR (application = $2 AND name > $3)) \
                 ORDER BY application, name LIMIT $4",
            )
            .bind("%\"alias\"%")
            .bind(app.clone())
            .bind(name.clone())
            .bind(PAGE),
        };
        let rows = page.fetch_all(&mut *tx).await?;
        for row in &rows {
            let app: String = row.try_get("application")?;
            let device: String = row.try_get("name")?;
            let text: String = row.try_get("spec")?;
            let aliases = serde_json::from_str::<Map<String, Value>>(&text)
                .map_err(|e| RegistryError::Corrupt(format!("spec of {device}@{app}: {e}")))
                .and_then(|spec| device_aliases(&spec));
            let aliases = match aliases {
                Ok(aliases) => aliases,
                Err(error) => {
                    tracing::warn!(%app, %device, %error, "device's aliases not indexed: write the device again with valid ones");
                    continue;
                }
            };
            for alias in aliases {
                let inserted = sqlx::query(
                    "INSERT INTO device_aliases (application, alias, device) VALUES ($1, $2, $3) \
                     ON CONFLICT (application, alias) DO NOTHING",
                )
                .bind(app.as_str())
                .bind(alias.as_str())
                .bind(device.as_str())
                .execute(&mut *tx)
                .await?;
                if inserted.rows_affected() == 1 {
                    indexed += 1;
                    continue;
                }
                let holder: String = sqlx::query_scalar(
                    "SELECT device FROM device_aliases WHERE application = $1 AND alias = $2",
                )
                .bind(app.as_str())
                .bind(alias.as_str())
                .fetch_one(&mut *tx)
                .await?;
                tracing::warn!(
                    %app, %device, %alias, %holder,
                    "two devices list the same alias: it finds only the first; remove it from one of them"
                );
            }
        }
        let full = rows.len() as i64 == PAGE;
        if let Some(last) = rows.last() {
            after = Some((last.try_get("application")?, last.try_get("name")?));
        }
        if !full {
            break;
        }
    }
    sqlx::query("DELETE FROM pending_backfills WHERE name = 'device_aliases'")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(
        aliases = indexed,
        "indexed the aliases of devices stored before aliases were"
    );
    Ok(())
}
