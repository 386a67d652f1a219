//! Where firmware comes from. A [`FirmwareSource`] turns the firmware section of a device's or
//! application's spec ([`FirmwareSpec`]) into a verified [`FirmwareImage`], shared by every device
//! updating to it.
//!
//! Sources are called for every status a device sends, so each one caches: the hot path is a map
//! lookup. Bytes that do not match their declared size or checksum are refused and never served.
//! [`Firmware`] is the one place that maps a spec to the backend that serves it; a backend that is
//! not configured answers [`FetchError::NotConfigured`] rather than failing silently.
//!
//! This crate knows nothing of devices, transports or the registry's storage.

mod checked;
mod file;
mod name;
pub mod oci;
mod spec;

pub use file::{FileStore, FirmwareMetadata};
pub use name::{FirmwareName, InvalidName};
pub use oci::{OciAuth, OciConfig, OciStore};
pub use spec::{FirmwareSpec, ImagePullPolicy, SpecError};

pub use ajour_engine::{FirmwareImage, InvalidImage};

use async_trait::async_trait;
use std::sync::Arc;

/// What publishing firmware does when its version is published already with other bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameVersion {
    /// Refuse: the usual answer, since devices identify firmware by its version.
    Refuse,
    /// Replace it (`--force`): devices in the middle of the update start again from offset 0.
    Replace,
}

/// Why firmware could not be had. Shown to operators in the device's status: say what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("firmware '{0}' not found")]
    NotFound(String),
    #[error("firmware '{name}' is unusable: {reason}")]
    Invalid { name: String, reason: String },
    #[error("firmware source '{0}' is not configured on this server")]
    NotConfigured(&'static str),
    #[error("firmware source unavailable: {0}")]
    Unavailable(String),
}

/// One backend that serves firmware: plain files, an OCI registry, Hawkbit.
#[async_trait]
pub trait FirmwareSource: Send + Sync + 'static {
    /// The image `spec` names, verified. Called for every status; implementations cache.
    async fn fetch(&self, spec: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError>;
}

/// The firmware sources a server has, one per kind of spec. Chosen once, when the server is wired.
#[derive(Default, Clone)]
pub struct Firmware {
    pub file: Option<Arc<dyn FirmwareSource>>,
    pub container: Option<Arc<dyn FirmwareSource>>,
    pub hawkbit: Option<Arc<dyn FirmwareSource>>,
}

#[async_trait]
impl FirmwareSource for Firmware {
    async fn fetch(&self, spec: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError> {
        let (source, kind) = match spec {
            FirmwareSpec::File { .. } => (&self.file, "file"),
            FirmwareSpec::Container { .. } => (&self.container, "container"),
            FirmwareSpec::Hawkbit { .. } => (&self.hawkbit, "hawkbit"),
        };
        match source {
            Some(source) => source.fetch(spec).await,
            None => Err(FetchError::NotConfigured(kind)),
        }
    }
}
