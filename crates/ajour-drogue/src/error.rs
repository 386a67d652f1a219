//! Error policy: configuration problems ([`DrogueError`]) are reported once, at start, with what
//! to change; everything that goes wrong while running (a malformed event, a broker that went
//! away, a registry that answers 5xx) is logged where it happens and never ends the service.
//! Registry failures reach the update service as [`ajour_registry::RegistryError`], which makes
//! the device wait.

use std::path::PathBuf;

/// Why the Drogue integration cannot be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum DrogueError {
    #[error("invalid URL '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("reading the CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("HTTP client set-up: {0}")]
    Http(#[from] reqwest::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}
