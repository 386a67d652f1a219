//! Error policy: configuration problems ([`DrogueError`]) are reported once, at start, with what
//! to change; everything that goes wrong while running (a malformed event, a broker that went
//! away, a registry that answers 5xx) is logged where it happens and never ends the service.
//! Registry failures reach the update service as [`ajour_registry::RegistryError`], which makes
//! the device wait.

/// Why the Drogue integration cannot be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum DrogueError {
    /// The MQTT or registry client (URL, CA file, TLS).
    #[error(transparent)]
    Client(#[from] ajour_client::SetupError),
    #[error("invalid configuration: {0}")]
    Config(String),
}
