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
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored object is corrupt: {0}")]
    Corrupt(String),
    #[error("password hashing failed: {0}")]
    Hashing(String),
    /// A registry reached over the network (Drogue's) failed or could not be reached.
    #[error("remote registry: {0}")]
    Remote(String),
}
