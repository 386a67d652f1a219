//! Error policy: every failure a caller can act on has its own variant (the API maps them to
//! status codes in one place); database failures keep their source for the logs.

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The object changed since the caller read it (`resourceVersion` or `uid` differ).
    #[error("Conflict")]
    Conflict,
    /// The request is malformed; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// The database failed; the source is kept for the logs.
    #[error("database error: {0}")]
    Database(Box<dyn std::error::Error + Send + Sync>),
    #[error("database migration failed: {0}")]
    Migration(Box<dyn std::error::Error + Send + Sync>),
    /// The database's schema is not one this build can use (newer than it knows, migrated by
    /// another build, half-migrated, or not migrated while migrations are off); the message says
    /// what to do.
    #[error("{0}")]
    Schema(String),
    #[error("stored object is corrupt: {0}")]
    Corrupt(String),
    /// A registry reached over the network (Drogue's) failed or could not be reached.
    #[error("remote registry: {0}")]
    Remote(String),
}

impl From<ajour_types::NameError> for RegistryError {
    fn from(error: ajour_types::NameError) -> Self {
        RegistryError::Invalid(error.to_string())
    }
}

#[cfg(feature = "sql")]
impl From<sqlx::Error> for RegistryError {
    fn from(error: sqlx::Error) -> Self {
        RegistryError::Database(Box::new(error))
    }
}

#[cfg(feature = "sql")]
impl From<sqlx::migrate::MigrateError> for RegistryError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        RegistryError::Migration(Box::new(error))
    }
}
