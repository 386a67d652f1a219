//! [`AccessStore`] in the SQL registry's database (tables `access_tokens`, `app_access`,
//! `app_members`).

use super::{SqlRegistry, Tx};
use crate::access::{AccessStore, StoredToken};
use crate::{AppName, RegistryError};
use ajour_types::access::{AppAccess, Role};
use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};

const TOKEN_COLUMNS: &str = "prefix, username, hash, description, created";

fn token_from_row(row: &AnyRow) -> Result<StoredToken, RegistryError> {
    Ok(StoredToken {
        prefix: row.try_get("prefix")?,
        user: row.try_get("username")?,
        hash: row.try_get("hash")?,
        description: row.try_get("description")?,
        created: row.try_get("created")?,
    })
}

fn new_revision() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// An application created with the bootstrap token, or before owners existed, gets its row when
/// its members or owner are first set: without an owner.
async fn ensure_row(tx: &mut Tx<'_>, app: &AppName) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO app_access (application, owner, transfer_to, revision) VALUES ($1, NULL, NULL, $2) \
         ON CONFLICT (application) DO NOTHING",
    )
    .bind(app.as_str())
    .bind(new_revision())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl AccessStore for SqlRegistry {
    async fn add_token(&self, token: &StoredToken) -> Result<(), RegistryError> {
        let result = sqlx::query(&format!(
            "INSERT INTO access_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"
        ))
        .bind(&token.prefix)
        .bind(&token.user)
        .bind(&token.hash)
        .bind(&token.description)
        .bind(&token.created)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(RegistryError::AlreadyExists(
                format!("access token prefix '{}'", token.prefix),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn token(&self, prefix: &str) -> Result<Option<StoredToken>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM access_tokens WHERE prefix = $1"
        ))
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(token_from_row)
        .transpose()
    }

    async fn tokens(&self, user: &str) -> Result<Vec<StoredToken>, RegistryError> {
        sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM access_tokens WHERE username = $1 ORDER BY created, prefix"
        ))
        .bind(user)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(token_from_row)
        .collect()
    }

    async fn delete_token(&self, user: &str, prefix: &str) -> Result<bool, RegistryError> {
        let done = sqlx::query("DELETE FROM access_tokens WHERE username = $1 AND prefix = $2")
            .bind(user)
            .bind(prefix)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn app_access(&self, app: &AppName) -> Result<Option<AppAccess>, RegistryError> {
        let Some(row) =
            sqlx::query("SELECT owner, transfer_to, revision FROM app_access WHERE application = $1")
                .bind(app.as_str())
                .fetch_optional(&self.pool)
                .await?
        else {
            return Ok(None);
        };
        let mut members = BTreeMap::new();
        for member in sqlx::query("SELECT username, role FROM app_members WHERE application = $1")
            .bind(app.as_str())
            .fetch_all(&self.pool)
            .await?
        {
            let role: String = member.try_get("role")?;
            let role = Role::parse(&role)
                .ok_or_else(|| RegistryError::Corrupt(format!("role '{role}' of a member of {app}")))?;
            members.insert(member.try_get("username")?, role);
        }
        Ok(Some(AppAccess {
            owner: row.try_get("owner")?,
            members,
            transfer_to: row.try_get("transfer_to")?,
            revision: row.try_get("revision")?,
        }))
    }

    async fn claim_app(&self, app: &AppName, owner: Option<&str>) -> Result<(), RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        sqlx::query("DELETE FROM app_members WHERE application = $1")
            .bind(app.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM app_access WHERE application = $1")
            .bind(app.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO app_access (application, owner, transfer_to, revision) VALUES ($1, $2, NULL, $3)",
        )
        .bind(app.as_str())
        .bind(owner)
        .bind(new_revision())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_members(
        &self,
        app: &AppName,
        members: &BTreeMap<String, Role>,
        revision: Option<&str>,
    ) -> Result<(), RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        ensure_row(&mut tx, app).await?;
        // The revision check and the bump are one statement, so two writers cannot both pass it.
        let bumped = match revision {
            Some(revision) => {
                sqlx::query("UPDATE app_access SET revision = $1 WHERE application = $2 AND revision = $3")
                    .bind(new_revision())
                    .bind(app.as_str())
                    .bind(revision)
                    .execute(&mut *tx)
                    .await?
            }
            None => {
                sqlx::query("UPDATE app_access SET revision = $1 WHERE application = $2")
                    .bind(new_revision())
                    .bind(app.as_str())
                    .execute(&mut *tx)
                    .await?
            }
        };
        if bumped.rows_affected() == 0 {
            return Err(RegistryError::Conflict);
        }
        sqlx::query("DELETE FROM app_members WHERE application = $1")
            .bind(app.as_str())
            .execute(&mut *tx)
            .await?;
        for (user, role) in members {
            sqlx::query("INSERT INTO app_members (application, username, role) VALUES ($1, $2, $3)")
                .bind(app.as_str())
                .bind(user)
                .bind(role.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn offer_app(&self, app: &AppName, user: Option<&str>) -> Result<(), RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        ensure_row(&mut tx, app).await?;
        sqlx::query("UPDATE app_access SET transfer_to = $1, revision = $2 WHERE application = $3")
            .bind(user)
            .bind(new_revision())
            .bind(app.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn accept_app(&self, app: &AppName, user: &str) -> Result<bool, RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE app_access SET owner = $1, transfer_to = NULL, revision = $2 \
             WHERE application = $3 AND transfer_to = $1",
        )
        .bind(user)
        .bind(new_revision())
        .bind(app.as_str())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        // The new owner's role as a member, if they had one, is now their ownership.
        sqlx::query("DELETE FROM app_members WHERE application = $1 AND username = $2")
            .bind(app.as_str())
            .bind(user)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn forget_app(&self, app: &AppName) -> Result<(), RegistryError> {
        let (_writing, mut tx) = self.begin_write().await?;
        for table in ["app_members", "app_access"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE application = $1"))
                .bind(app.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn apps_of(&self, user: &str) -> Result<BTreeSet<String>, RegistryError> {
        let rows = sqlx::query(
            "SELECT application FROM app_access WHERE owner = $1 \
             UNION SELECT application FROM app_members WHERE username = $1",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>("application").map_err(Into::into))
            .collect()
    }
}
