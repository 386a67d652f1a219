//! Firmware stored in an OCI registry (`spec.firmware.container`, alias `oci`).
//!
//! Specs name images relative to the configured registry prefix. An image is read in one of three
//! layouts, told apart by its manifest (see [`layout`]); every blob is checked against its digest
//! and the firmware against its declared size and SHA-256 before it is served.
//!
//! Three caches keep the registry out of the hot path, which [`OciStore::fetch`] is (it runs for
//! every status a device sends):
//! - per spec (image + pull policy): the verified image, reused for ever under `IfNotPresent`
//!   and for [`OciConfig::always_recheck`] under `Always` (then one HEAD request, made by a
//!   background task while devices keep being served, asks whether the tag moved); a failure is
//!   remembered for [`OciConfig::error_retry`], so a fleet waiting on a down registry does not
//!   hammer it;
//! - per manifest digest: the decoded image, so two tags of one image share it;
//! - per blob digest ([`BlobCache`]): bounded by bytes, single-flight.
//!
//! When an `Always` re-check cannot reach the registry, the image already resolved keeps being
//! served (it is verified and immutable); a tag that moved is picked up once the registry answers.

mod cache;
mod client;
pub mod layout;
mod publish;
mod reference;

pub use cache::BlobCache;
pub use client::Progress;
pub use publish::{build_image, BuiltImage, PushedImage};
pub use reference::{ImageRef, InvalidImageRef};

use crate::checked::{CheckedCache, Slot};
use crate::{FetchError, FirmwareImage, FirmwareSource, FirmwareSpec, ImagePullPolicy};
use async_trait::async_trait;
use client::RegistryClient;
use layout::{LabelMetadata, Manifest, Plan};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How to log in to the registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum OciAuth {
    #[default]
    Anonymous,
    /// User and password (or token): sent as HTTP Basic, or exchanged for a bearer token when
    /// the registry uses the distribution token flow.
    Basic { username: String, password: String },
    /// A bearer token obtained elsewhere, sent as is.
    Bearer { token: String },
}

impl fmt::Debug for OciAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OciAuth::Anonymous => f.write_str("Anonymous"),
            OciAuth::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            OciAuth::Bearer { .. } => f.write_str("Bearer(***)"),
        }
    }
}

/// The OCI source's configuration. [`Default`] is a working configuration for a registry that
/// needs no login, except for the prefix.
#[derive(Debug, Clone)]
pub struct OciConfig {
    /// Prepended to image names from specs (`registry.example.com/fw/`); empty: specs give full
    /// references.
    pub registry_prefix: String,
    pub auth: OciAuth,
    /// Extra PEM CA certificates to trust, beside the system's.
    pub extra_ca_file: Option<PathBuf>,
    /// Talk plain HTTP to the registry. Explicit opt-in: credentials and firmware travel in clear.
    pub plain_http: bool,
    /// Accept any TLS certificate. Explicit opt-in, for tests and labs.
    pub accept_invalid_certs: bool,
    /// Under `Always`, how long a resolved tag is trusted before the registry is asked again.
    pub always_recheck: Duration,
    /// How long a failure is remembered before the registry is tried again.
    pub error_retry: Duration,
    /// Largest firmware accepted; larger images are refused before they are downloaded.
    pub max_firmware_size: u64,
    /// Byte budget of the blob cache.
    pub cache_max_bytes: u64,
    /// Timeout for connecting and for each read; a whole request gets four times this.
    pub request_timeout: Duration,
}

impl Default for OciConfig {
    fn default() -> Self {
        Self {
            registry_prefix: String::new(),
            auth: OciAuth::Anonymous,
            extra_ca_file: None,
            plain_http: false,
            accept_invalid_certs: false,
            always_recheck: Duration::from_secs(60),
            error_retry: Duration::from_secs(10),
            max_firmware_size: 64 << 20,
            cache_max_bytes: 256 << 20,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Room in a tar layer for headers, `firmware.json` and padding beside `firmware.bin`.
pub const TAR_OVERHEAD: u64 = 1 << 20;
/// Largest image config read for its labels.
const MAX_CONFIG: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OciError {
    #[error("invalid OCI registry configuration: {0}")]
    Config(String),
    #[error(transparent)]
    InvalidImage(#[from] InvalidImageRef),
    #[error("image '{0}' not found in the registry")]
    NotFound(String),
    #[error("the registry refused access to '{image}' (check the credentials): {reason}")]
    Denied { image: String, reason: String },
    #[error("registry unavailable for '{image}': {reason}")]
    Unavailable { image: String, reason: String },
    #[error("image '{image}' is unusable: {reason}")]
    Invalid { image: String, reason: String },
}

impl From<OciError> for FetchError {
    fn from(error: OciError) -> Self {
        match error {
            OciError::NotFound(image) => FetchError::NotFound(image),
            OciError::Invalid { image, reason } => FetchError::Invalid { name: image, reason },
            OciError::InvalidImage(e) => FetchError::Invalid {
                name: e.image.clone(),
                reason: e.to_string(),
            },
            other => FetchError::Unavailable(other.to_string()),
        }
    }
}

/// Which layout an image was read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `firmware.bin` + `firmware.json` in a tar layer.
    TarWithJson,
    /// `firmware.bin` in a tar layer, metadata from labels or annotations.
    TarWithLabels,
    /// One raw layer; version from the tag.
    RawWithTag,
    /// One raw layer; version from labels or annotations.
    RawWithLabels,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::TarWithJson => "tar layer with firmware.bin and firmware.json",
            Layout::TarWithLabels => "tar layer with firmware.bin, metadata from labels",
            Layout::RawWithTag => "raw layer, version from the tag",
            Layout::RawWithLabels => "raw layer, metadata from labels",
        })
    }
}

/// An image read from the registry: what Ajour serves for it.
#[derive(Debug)]
pub struct ResolvedImage {
    pub image: Arc<FirmwareImage>,
    pub manifest_digest: String,
    pub layout: Layout,
}

/// Firmware from one OCI registry. Cheap to share: the state lives behind one `Arc`, which
/// background re-checks of `Always` tags hold while they run.
pub struct OciStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: OciConfig,
    client: RegistryClient,
    blobs: BlobCache,
    specs: CheckedCache<(String, ImagePullPolicy), Loaded>,
    decoded: Mutex<HashMap<String, Weak<ResolvedImage>>>,
}

/// What resolving one spec found: the image, or why not.
type Loaded = Result<Arc<ResolvedImage>, FetchError>;

impl OciStore {
    pub fn new(config: OciConfig) -> Result<Self, OciError> {
        Ok(Self {
            inner: Arc::new(Inner::new(config)?),
        })
    }

    pub fn config(&self) -> &OciConfig {
        &self.inner.config
    }

    /// `(blobs, bytes)` in the blob cache.
    pub fn cache_usage(&self) -> (usize, u64) {
        self.inner.blobs.usage()
    }

    /// Read `image` from the registry now, bypassing the per-spec cache: what `ajour firmware
    /// inspect` shows and what devices would be served.
    pub async fn inspect(&self, image: &str) -> Result<Arc<ResolvedImage>, OciError> {
        let reference = ImageRef::parse(&self.inner.config.registry_prefix, image)?;
        self.inner.load(&reference).await
    }

    pub(crate) fn client(&self) -> &RegistryClient {
        &self.inner.client
    }
}

impl Inner {
    fn new(config: OciConfig) -> Result<Self, OciError> {
        if config.max_firmware_size == 0 || config.max_firmware_size > u64::from(u32::MAX) {
            return Err(OciError::Config(
                "the maximum firmware size must be between 1 byte and 4 GiB".into(),
            ));
        }
        if !config.registry_prefix.is_empty() {
            ImageRef::parse(&config.registry_prefix, "probe")
                .and_then(|probe| probe.to_client_reference().map(|_| ()))
                .map_err(|_| {
                    OciError::Config(format!(
                        "registry prefix '{}' is not 'host[:port]/path/'",
                        config.registry_prefix
                    ))
                })?;
        }
        Ok(Self {
            client: RegistryClient::new(&config)?,
            blobs: BlobCache::new(config.cache_max_bytes),
            config,
            specs: CheckedCache::default(),
            decoded: Mutex::default(),
        })
    }

    async fn fetch_image(
        self: &Arc<Self>,
        image: &str,
        policy: ImagePullPolicy,
    ) -> Result<Arc<FirmwareImage>, FetchError> {
        let slot = self.specs.slot(&(image.to_string(), policy));
        if let Some(fresh) = self.fresh(&slot, image, policy) {
            cache_total("hit");
            return fresh;
        }
        // A good image whose `Always` re-check is due: keep serving it while one background task
        // asks the registry, so no device waits on the network.
        let stale = slot.last().and_then(|checked| checked.value.ok());
        if let Some(stale) = stale {
            if let Some(loading) = slot.try_lock_loading() {
                let (this, slot, image) = (self.clone(), slot.clone(), image.to_string());
                tokio::spawn(async move {
                    let _loading = loading;
                    let _ = this.reload(&slot, &image, policy).await;
                });
            }
            cache_total("stale");
            return Ok(stale.image.clone());
        }
        let loading = slot.lock_loading().await;
        // Another caller may have loaded it while this one waited.
        if let Some(fresh) = self.fresh(&slot, image, policy) {
            cache_total("hit");
            return fresh;
        }
        cache_total("miss");
        // The load runs in a task of its own: a device that gives up (its request is dropped)
        // does not cancel a download the next device would have to start again.
        let (this, slot, image) = (self.clone(), slot.clone(), image.to_string());
        let load = tokio::spawn(async move {
            let _loading = loading;
            this.reload(&slot, &image, policy).await
        });
        match load.await {
            Ok(result) => result.map(|resolved| resolved.image.clone()),
            Err(error) => Err(FetchError::Unavailable(format!(
                "loading did not finish: {error}"
            ))),
        }
    }

    /// Resolve the spec again and remember the outcome. The caller holds the slot's loading lock.
    async fn reload(&self, slot: &Slot<Loaded>, image: &str, policy: ImagePullPolicy) -> Loaded {
        let previous = slot.last().map(|checked| checked.value);
        let result = self.refresh(image, policy, previous.as_ref()).await;
        match (&result, previous.as_ref()) {
            (Err(error), _) => tracing::warn!(image, %error, "OCI firmware not served"),
            (Ok(new), Some(Ok(old))) if Arc::ptr_eq(new, old) => {}
            (Ok(new), _) => tracing::info!(
                image,
                version = new.image.version(),
                digest = new.manifest_digest,
                layout = %new.layout,
                "OCI firmware loaded"
            ),
        }
        slot.store(result.clone());
        result
    }

    fn fresh(
        &self,
        slot: &Slot<Loaded>,
        image: &str,
        policy: ImagePullPolicy,
    ) -> Option<Result<Arc<FirmwareImage>, FetchError>> {
        let pinned = image.contains('@');
        slot.fresh(|checked| match &checked.value {
            Ok(_) if policy == ImagePullPolicy::IfNotPresent || pinned => true,
            Ok(_) => checked.checked_at.elapsed() < self.config.always_recheck,
            Err(_) => checked.checked_at.elapsed() < self.config.error_retry,
        })
        .map(|loaded| loaded.map(|resolved| resolved.image.clone()))
    }

    async fn refresh(&self, image: &str, policy: ImagePullPolicy, previous: Option<&Loaded>) -> Loaded {
        let reference = ImageRef::parse(&self.config.registry_prefix, image).map_err(OciError::from)?;
        let previous = previous.and_then(|p| p.as_ref().ok());
        if let (ImagePullPolicy::Always, Some(previous)) = (policy, previous) {
            match self.client.manifest_digest(&reference).await {
                Ok(digest) if digest == previous.manifest_digest => return Ok(previous.clone()),
                Ok(digest) => {
                    tracing::info!(
                        image,
                        from = previous.manifest_digest,
                        to = digest,
                        "OCI tag moved"
                    );
                    return match self.load(&reference.pinned_to(&digest)).await {
                        Ok(resolved) => Ok(resolved),
                        Err(error @ OciError::Unavailable { .. }) => {
                            tracing::warn!(image, %error, "cannot load the moved tag yet; serving the previous image");
                            Ok(previous.clone())
                        }
                        Err(error) => Err(error.into()),
                    };
                }
                Err(error @ OciError::Unavailable { .. }) => {
                    tracing::warn!(image, %error, "cannot re-check the tag; serving what it pointed to");
                    return Ok(previous.clone());
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(self.load(&reference).await?)
    }

    /// Fetch the manifest of `reference` and the image it describes.
    async fn load(&self, reference: &ImageRef) -> Result<Arc<ResolvedImage>, OciError> {
        let (bytes, digest) = self.client.manifest(reference).await?;
        if let Some(resolved) = self.decoded(&digest) {
            return Ok(resolved);
        }
        let invalid = |reason: String| OciError::Invalid {
            image: reference.to_string(),
            reason,
        };
        let manifest = match layout::parse_manifest(&bytes).map_err(invalid)? {
            Manifest::Image(manifest) => manifest,
            Manifest::Index(entries) => {
                let chosen = layout::pick_from_index(&entries).map_err(invalid)?;
                let (bytes, _) = self.client.manifest(&reference.pinned_to(&chosen.digest)).await?;
                match layout::parse_manifest(&bytes).map_err(invalid)? {
                    Manifest::Image(manifest) => manifest,
                    Manifest::Index(_) => return Err(invalid("an image index inside an image index".into())),
                }
            }
        };
        let (image, layout) = self.decode(reference, &manifest).await?;
        let resolved = Arc::new(ResolvedImage {
            image: Arc::new(image),
            manifest_digest: digest.clone(),
            layout,
        });
        let mut decoded = self.decoded.lock().unwrap();
        decoded.retain(|_, image| image.strong_count() > 0);
        decoded.insert(digest, Arc::downgrade(&resolved));
        Ok(resolved)
    }

    fn decoded(&self, digest: &str) -> Option<Arc<ResolvedImage>> {
        self.decoded.lock().unwrap().get(digest)?.upgrade()
    }

    async fn decode(
        &self,
        reference: &ImageRef,
        manifest: &layout::ImageManifest,
    ) -> Result<(FirmwareImage, Layout), OciError> {
        let invalid = |reason: String| OciError::Invalid {
            image: reference.to_string(),
            reason,
        };
        let mut labels = LabelMetadata::from_labels(&manifest.annotations).map_err(invalid)?;
        if labels.is_none() && layout::config_has_labels(&manifest.config) {
            let config = self.blob(reference, &manifest.config, MAX_CONFIG).await?;
            let config_labels = layout::config_labels(&config).map_err(invalid)?;
            labels = LabelMetadata::from_labels(&config_labels).map_err(invalid)?;
        }
        let max = self.config.max_firmware_size;
        match layout::plan(manifest).map_err(invalid)? {
            Plan::Raw(layer) => {
                let data = self.blob(reference, &layer, max).await?;
                let checksum = layer.digest.trim_start_matches("sha256:").to_string();
                let (version, layout) = match &labels {
                    Some(labels) => {
                        check_labels(labels, layer.size, &checksum).map_err(invalid)?;
                        (labels.version.clone(), Layout::RawWithLabels)
                    }
                    None => match reference.tag() {
                        Some(tag) => (tag.to_string(), Layout::RawWithTag),
                        None => {
                            return Err(invalid(format!(
                                "a raw layer takes its version from the tag or the {} label; \
                                 the image is named by digest and has no label",
                                layout::LABEL_VERSION
                            )))
                        }
                    },
                };
                Ok((
                    verify(version, data, layer.size, checksum)
                        .await
                        .map_err(invalid)?,
                    layout,
                ))
            }
            Plan::Tar(layers) => {
                for layer in &layers {
                    let blob = self.blob(reference, layer, max + TAR_OVERHEAD).await?;
                    let found = tokio::task::spawn_blocking(move || {
                        layout::read_tar_layer(&blob, max, max + TAR_OVERHEAD)
                    })
                    .await
                    .map_err(|e| invalid(format!("reading the layer did not finish: {e}")))?
                    .map_err(invalid)?;
                    let Some(bin) = found.bin else { continue };
                    return match (found.json, &labels) {
                        (Some(json), _) => Ok((
                            verify(json.version, bin.into(), json.size, json.checksum)
                                .await
                                .map_err(invalid)?,
                            Layout::TarWithJson,
                        )),
                        (None, Some(labels)) => {
                            let size = labels.size.unwrap_or(bin.len() as u64);
                            let checksum = labels.checksum.clone();
                            let image = match checksum {
                                Some(checksum) => {
                                    verify(labels.version.clone(), bin.into(), size, checksum).await
                                }
                                // The layer digest already vouches for the bytes.
                                None => check_size(&labels.version, bin, size),
                            };
                            Ok((image.map_err(invalid)?, Layout::TarWithLabels))
                        }
                        (None, None) => Err(invalid(format!(
                            "firmware.bin has no firmware.json beside it and the image no {} label",
                            layout::LABEL_VERSION
                        ))),
                    };
                }
                Err(invalid("no layer holds firmware.bin at its root".into()))
            }
        }
    }

    async fn blob(
        &self,
        reference: &ImageRef,
        descriptor: &layout::Descriptor,
        limit: u64,
    ) -> Result<bytes::Bytes, OciError> {
        self.blobs
            .get_or_load(&descriptor.digest, || {
                self.client.blob(reference, descriptor, limit)
            })
            .await
    }
}

#[async_trait]
impl FirmwareSource for OciStore {
    async fn fetch(&self, spec: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError> {
        let FirmwareSpec::Container { image, pull_policy } = spec else {
            return Err(FetchError::NotConfigured("OCI store asked for another kind"));
        };
        self.inner.fetch_image(image, *pull_policy).await
    }
}

/// `ajour_firmware_cache_total{source="oci", result}`: `hit` (served from memory), `stale` (served
/// from memory while an `Always` re-check runs), `miss` (the caller waited for the registry).
fn cache_total(result: &'static str) {
    metrics::counter!("ajour_firmware_cache_total", "source" => "oci", "result" => result).increment(1);
}

fn check_labels(labels: &LabelMetadata, size: u64, checksum: &str) -> Result<(), String> {
    if labels.size.is_some_and(|declared| declared != size) {
        return Err(format!(
            "label {} says {:?} bytes, the layer has {size}",
            layout::LABEL_SIZE,
            labels.size
        ));
    }
    match &labels.checksum {
        Some(declared) if !declared.trim().eq_ignore_ascii_case(checksum) => Err(format!(
            "label {} says {declared}, the layer hashes to {checksum}",
            layout::LABEL_CHECKSUM
        )),
        _ => Ok(()),
    }
}

fn check_size(version: &str, data: Vec<u8>, declared: u64) -> Result<FirmwareImage, String> {
    if data.len() as u64 != declared {
        return Err(format!(
            "firmware size mismatch: declared {declared} bytes, found {}",
            data.len()
        ));
    }
    FirmwareImage::new(version, data).map_err(|e| e.to_string())
}

/// Check the bytes against the declared size and checksum, off the async workers (hashing a large
/// image takes milliseconds).
async fn verify(
    version: String,
    data: bytes::Bytes,
    size: u64,
    checksum: String,
) -> Result<FirmwareImage, String> {
    tokio::task::spawn_blocking(move || FirmwareImage::verified(version, data, size, &checksum))
        .await
        .map_err(|e| format!("verification did not finish: {e}"))?
        .map_err(|e| e.to_string())
}
