//! Where firmware comes from. A [`FirmwareSource`] turns the firmware section of a device's or
//! application's spec ([`FirmwareSpec`]) into a verified [`FirmwareImage`], shared by every device
//! updating to it.
//!
//! Sources are called for every status a device sends, so each one caches: the hot path is a map
//! lookup. Bytes that do not match their declared size or checksum are refused and never served.
//! [`Firmware`] is the one place that maps a spec to the backend that serves it; a backend that is
//! not configured answers [`FetchError::NotConfigured`] rather than failing silently.
//!
//! Most sources only need the spec. A source that acts for the device toward another system
//! (Hawkbit, in `ajour-hawkbit`) also needs to know who asks and what it runs
//! ([`FirmwareSource::fetch_for`]), and to hear how the update went
//! ([`FirmwareSource::observe`]); both default to what a plain source does, so the file and OCI
//! sources implement `fetch` alone. Such a source may also answer that nothing is assigned now
//! ([`FetchError::NothingAssigned`]): the device waits as long as it says, and is not in error.
//!
//! This crate knows nothing of devices, transports or the registry's storage: a device is only
//! the name and version the service passes in.

pub mod checked;
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
    /// Not an error of the device's firmware: the source has nothing for it now (Hawkbit between
    /// deployments, or a deployment cancelled) and asks it to come back in `poll_secs`.
    #[error("nothing is assigned to this device now; ask again in {poll_secs} s")]
    NothingAssigned { poll_secs: u32 },
}

/// Who asks a source for firmware: the device (its key, `app/device`) and the version it reports.
#[derive(Debug, Clone, Copy)]
pub struct Asking<'a> {
    pub device: &'a str,
    pub current: &'a str,
}

/// What the service made of a device's status, told to the source that gave the image.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub device: &'a str,
    /// The version the device runs.
    pub current: &'a str,
    /// The version of the image it is being given.
    pub target: &'a str,
    pub state: Observed<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observed<'a> {
    /// It runs the target version.
    InSync,
    /// Blocks are being written; this much of the image is sent (0-100).
    Updating { percent: f64 },
    /// It was given up on (it never came back on the target version).
    Failed { reason: &'a str },
}

/// One backend that serves firmware: plain files, an OCI registry, Hawkbit.
#[async_trait]
pub trait FirmwareSource: Send + Sync + 'static {
    /// The image `spec` names, verified. Called for every status; implementations cache.
    async fn fetch(&self, spec: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError>;

    /// [`Self::fetch`] for a given device: what the service calls. Sources that act for the
    /// device elsewhere (Hawkbit) use who asks and what it runs; the others need only the spec.
    async fn fetch_for(
        &self,
        spec: &FirmwareSpec,
        _asking: &Asking<'_>,
    ) -> Result<Arc<FirmwareImage>, FetchError> {
        self.fetch(spec).await
    }

    /// Told, for every status that was answered with an image of this source, where the device
    /// is. Must return at once (it runs on the device's request): a source that reports
    /// elsewhere does so in the background. Default: nothing.
    fn observe(&self, _spec: &FirmwareSpec, _observation: &Observation<'_>) {}
}

/// The firmware sources a server has, one per kind of spec. Chosen once, when the server is wired.
#[derive(Default, Clone)]
pub struct Firmware {
    pub file: Option<Arc<dyn FirmwareSource>>,
    pub container: Option<Arc<dyn FirmwareSource>>,
    pub hawkbit: Option<Arc<dyn FirmwareSource>>,
}

impl Firmware {
    fn source(&self, spec: &FirmwareSpec) -> Result<&Arc<dyn FirmwareSource>, FetchError> {
        let (source, kind) = match spec {
            FirmwareSpec::File { .. } => (&self.file, "file"),
            FirmwareSpec::Container { .. } => (&self.container, "container"),
            FirmwareSpec::Hawkbit { .. } => (&self.hawkbit, "hawkbit"),
        };
        source.as_ref().ok_or(FetchError::NotConfigured(kind))
    }
}

#[async_trait]
impl FirmwareSource for Firmware {
    async fn fetch(&self, spec: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError> {
        self.source(spec)?.fetch(spec).await
    }

    async fn fetch_for(
        &self,
        spec: &FirmwareSpec,
        asking: &Asking<'_>,
    ) -> Result<Arc<FirmwareImage>, FetchError> {
        self.source(spec)?.fetch_for(spec, asking).await
    }

    fn observe(&self, spec: &FirmwareSpec, observation: &Observation<'_>) {
        if let Ok(source) = self.source(spec) {
            source.observe(spec, observation);
        }
    }
}
