//! Ajour's clients of other servers, each behind a small interface of its own:
//!
//! - [`mqtt`]: one MQTT connection, 3.1.1 or 5, and [`mqtt::run_session`], the one loop that keeps
//!   it connected and subscribed; used by the Drogue integration, the device simulator and the
//!   benchmarks.
//! - [`registry`]: a client of the Drogue-shaped registry API (`/api/registry/v1alpha1`), Ajour's
//!   or Drogue Cloud's; used by the CLI and by Drogue mode's registry backend.
//! - [`tls`]: the TLS set-up both use (system roots plus a CA file, a client certificate, rustls
//!   with ring).
//!
//! Nothing here knows about firmware or decisions.

pub mod mqtt;
pub mod registry;
pub mod tls;

pub use registry::{RegistryClient, RegistryClientConfig};
pub use tls::{ClientCert, TlsOptions};

use std::path::PathBuf;

/// Why a client cannot be set up as configured: reported once, at start, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
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
    /// The client certificate file: unreadable, not PEM, no certificate, or one that cannot be used.
    #[error("the client certificate file {path} {reason}")]
    ClientCert { path: PathBuf, reason: String },
    /// The client key file: unreadable, not PEM, no key, or one that cannot be used.
    #[error("the client key file {path} {reason}")]
    ClientKey { path: PathBuf, reason: String },
    #[error("the client key file {key} holds the key of another certificate than the client certificate file {cert}")]
    ClientKeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("HTTP client set-up: {0}")]
    Http(#[from] reqwest::Error),
}
