//! Firmware as plain files: `{dir}/{name}.json` (`{"version","size","checksum"}`, checksum the hex
//! SHA-256) beside `{dir}/{name}.bin`, the original Ajour's layout.
//!
//! Each name is loaded once and kept in memory, shared by every device. The files are looked at
//! again (a `stat`, not a read) at most once per `recheck` interval, and read again only when they
//! changed, so replacing a file reaches devices within that interval. One load per name runs at a
//! time; devices asking meanwhile wait for it instead of reading the same bytes again.

use crate::checked::{CheckedCache, Slot};
use crate::{FetchError, FirmwareImage, FirmwareName, FirmwareSource, FirmwareSpec, SameVersion};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The metadata file beside each image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareMetadata {
    pub version: String,
    pub size: u64,
    pub checksum: String,
}

/// Firmware stored as files in one directory.
pub struct FileStore {
    dir: PathBuf,
    recheck: Duration,
    loaded: CheckedCache<FirmwareName, Loaded>,
}

/// What a load of one name found: the image (or why not), and the files it was read from.
#[derive(Clone)]
struct Loaded {
    result: Result<Arc<FirmwareImage>, FetchError>,
    stamp: Option<Stamp>,
}

/// What identifies one version of the two files without reading them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    metadata: (Option<SystemTime>, u64),
    image: (Option<SystemTime>, u64),
}

impl FileStore {
    pub fn new(dir: impl Into<PathBuf>, recheck: Duration) -> Self {
        Self {
            dir: dir.into(),
            recheck,
            loaded: CheckedCache::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn paths(&self, name: &FirmwareName) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.json")),
            self.dir.join(format!("{name}.bin")),
        )
    }

    /// [`Self::add`], unless `name` is published already as `version` with other bytes and
    /// `same_version` says to refuse: devices identify firmware by version, so a device that runs
    /// the old bytes would never be updated to the new ones (and devices in the middle of the
    /// update start again from the beginning).
    pub fn publish(
        &self,
        name: &FirmwareName,
        version: &str,
        data: &[u8],
        same_version: SameVersion,
    ) -> io::Result<FirmwareMetadata> {
        let (json_path, _) = self.paths(name);
        if same_version == SameVersion::Refuse {
            if let Ok(json) = std::fs::read(&json_path) {
                if let Ok(published) = serde_json::from_slice::<FirmwareMetadata>(&json) {
                    let checksum = hex::encode(Sha256::digest(data));
                    if published.version == version && !published.checksum.eq_ignore_ascii_case(&checksum) {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!(
                                "firmware '{name}' version {version} is published with other bytes (sha256 {}); \
                                 publish these as a new version, or replace it with --force (devices already \
                                 running {version} keep the old bytes)",
                                published.checksum
                            ),
                        ));
                    }
                }
            }
        }
        self.add(name, version, data)
    }

    /// Store `data` as version `version` of `name`, replacing what was there. The image is written
    /// first and the metadata last, each through a rename, so a reader never sees a half-written
    /// file; a reader that catches the pair mid-change sees a checksum mismatch, serves nothing,
    /// and looks again at the next recheck.
    pub fn add(&self, name: &FirmwareName, version: &str, data: &[u8]) -> io::Result<FirmwareMetadata> {
        std::fs::create_dir_all(&self.dir)?;
        let metadata = FirmwareMetadata {
            version: version.to_string(),
            size: data.len() as u64,
            checksum: hex::encode(Sha256::digest(data)),
        };
        let (json_path, bin_path) = self.paths(name);
        write_atomically(&bin_path, data)?;
        let json = serde_json::to_vec_pretty(&metadata).map_err(io::Error::other)?;
        write_atomically(&json_path, &json)?;
        Ok(metadata)
    }

    async fn fetch_name(&self, name: FirmwareName) -> Result<Arc<FirmwareImage>, FetchError> {
        let slot = self.loaded.slot(&name);
        if let Some(fresh) = self.fresh(&slot) {
            cache_total("hit");
            return fresh;
        }
        let _loading = slot.lock_loading().await;
        // Another caller may have loaded it while this one waited.
        if let Some(fresh) = self.fresh(&slot) {
            cache_total("hit");
            return fresh;
        }
        let previous = slot.last().map(|checked| checked.value);
        let (json_path, bin_path) = self.paths(&name);
        let stamp = stamp(&json_path, &bin_path).await;
        let result = match (&previous, &stamp) {
            (Some(previous), Some(stamp)) if previous.stamp.as_ref() == Some(stamp) => {
                cache_total("hit");
                previous.result.clone()
            }
            (_, None) => Err(FetchError::NotFound(name.to_string())),
            (_, Some(_)) => {
                cache_total("miss");
                load(&name, &json_path, &bin_path).await
            }
        };
        if let Err(error) = &result {
            tracing::warn!(firmware = %name, %error, "firmware file not served");
        } else if previous.as_ref().map(|p| p.stamp != stamp).unwrap_or(true) {
            tracing::info!(firmware = %name, "firmware file loaded");
        }
        slot.store(Loaded {
            result: result.clone(),
            stamp,
        });
        result
    }

    /// The last outcome for a name, when it was checked within the re-check interval.
    fn fresh(&self, slot: &Slot<Loaded>) -> Option<Result<Arc<FirmwareImage>, FetchError>> {
        slot.fresh(|checked| checked.checked_at.elapsed() < self.recheck)
            .map(|loaded| loaded.result)
    }
}

#[async_trait]
impl FirmwareSource for FileStore {
    async fn fetch(&self, spec: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError> {
        let FirmwareSpec::File { name } = spec else {
            return Err(FetchError::NotConfigured("file store asked for another kind"));
        };
        let name = FirmwareName::parse(name).map_err(|e| FetchError::Invalid {
            name: e.name.clone(),
            reason: format!("invalid firmware name: {}", e.reason),
        })?;
        self.fetch_name(name).await
    }
}

/// `ajour_firmware_cache_total{source="file", result}`: served from memory, or read from disk.
fn cache_total(result: &'static str) {
    metrics::counter!("ajour_firmware_cache_total", "source" => "file", "result" => result).increment(1);
}

async fn stamp(json: &Path, bin: &Path) -> Option<Stamp> {
    let of = |m: std::fs::Metadata| (m.modified().ok(), m.len());
    let metadata = tokio::fs::metadata(json).await.ok()?;
    let image = tokio::fs::metadata(bin).await.ok()?;
    Some(Stamp {
        metadata: of(metadata),
        image: of(image),
    })
}

async fn load(
    name: &FirmwareName,
    json_path: &Path,
    bin_path: &Path,
) -> Result<Arc<FirmwareImage>, FetchError> {
    let invalid = |reason: String| FetchError::Invalid {
        name: name.to_string(),
        reason,
    };
    let json = tokio::fs::read(json_path)
        .await
        .map_err(|e| invalid(format!("reading {}: {e}", json_path.display())))?;
    let metadata: FirmwareMetadata =
        serde_json::from_slice(&json).map_err(|e| invalid(format!("{}: {e}", json_path.display())))?;
    let data = tokio::fs::read(bin_path)
        .await
        .map_err(|e| invalid(format!("reading {}: {e}", bin_path.display())))?;
    // Hashing a large image takes milliseconds: keep it off the async workers.
    let image = tokio::task::spawn_blocking(move || {
        FirmwareImage::verified(metadata.version, data, metadata.size, &metadata.checksum)
    })
    .await
    .map_err(|e| invalid(format!("verification did not finish: {e}")))?
    .map_err(|e| invalid(e.to_string()))?;
    Ok(Arc::new(image))
}

fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> FirmwareSpec {
        FirmwareSpec::File { name: name.into() }
    }

    #[test]
    fn a_version_published_with_other_bytes_is_replaced_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path(), Duration::ZERO);
        let name = FirmwareName::parse("app").unwrap();
        store
            .publish(&name, "1.0.0", b"first", SameVersion::Refuse)
            .unwrap();
        // The same bytes again, and a new version, are fine.
        store
            .publish(&name, "1.0.0", b"first", SameVersion::Refuse)
            .unwrap();
        let error = store
            .publish(&name, "1.0.0", b"other", SameVersion::Refuse)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert!(error.to_string().contains("--force"), "{error}");
        let stored = std::fs::read(dir.path().join("app.bin")).unwrap();
        assert_eq!(stored, b"first", "a refused publish changes nothing");
        let replaced = store
            .publish(&name, "1.0.0", b"other", SameVersion::Replace)
            .unwrap();
        assert_eq!(replaced.checksum, hex::encode(Sha256::digest(b"other")));
        store
            .publish(&name, "1.0.1", b"third", SameVersion::Refuse)
            .unwrap();
    }

    #[tokio::test]
    async fn serves_added_firmware_and_notices_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path(), Duration::ZERO);
        let name = FirmwareName::parse("app").unwrap();
        store.add(&name, "1.0.0", b"first image").unwrap();
        let first = store.fetch(&spec("app")).await.unwrap();
        assert_eq!(
            (first.version(), &first.data()[..]),
            ("1.0.0", &b"first image"[..])
        );
        // Unchanged files: the very same shared image, not a new read.
        assert!(Arc::ptr_eq(&first, &store.fetch(&spec("app")).await.unwrap()));

        store.add(&name, "1.0.1", b"second image, longer").unwrap();
        let second = store.fetch(&spec("app")).await.unwrap();
        assert_eq!(
            (second.version(), &second.data()[..]),
            ("1.0.1", &b"second image, longer"[..])
        );
    }

    #[tokio::test]
    async fn within_the_recheck_interval_the_cached_image_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path(), Duration::from_secs(3600));
        let name = FirmwareName::parse("app").unwrap();
        store.add(&name, "1", b"one").unwrap();
        let first = store.fetch(&spec("app")).await.unwrap();
        std::fs::remove_file(dir.path().join("app.bin")).unwrap();
        assert!(Arc::ptr_eq(&first, &store.fetch(&spec("app")).await.unwrap()));
    }

    #[tokio::test]
    async fn refuses_bytes_that_do_not_match_their_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path(), Duration::ZERO);
        let name = FirmwareName::parse("app").unwrap();
        store.add(&name, "1.0.0", b"good bytes").unwrap();
        std::fs::write(dir.path().join("app.bin"), b"evil bytes").unwrap();
        let error = store.fetch(&spec("app")).await.unwrap_err();
        assert!(error.to_string().contains("checksum mismatch"), "{error}");

        std::fs::write(dir.path().join("app.bin"), b"good bytes, and more").unwrap();
        let error = store.fetch(&spec("app")).await.unwrap_err();
        assert!(error.to_string().contains("size mismatch"), "{error}");

        std::fs::write(dir.path().join("app.json"), b"{not json").unwrap();
        assert!(matches!(
            store.fetch(&spec("app")).await,
            Err(FetchError::Invalid { .. })
        ));
    }

    #[tokio::test]
    async fn missing_and_hostile_names_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("firmware"), Duration::ZERO);
        assert_eq!(
            store.fetch(&spec("nope")).await,
            Err(FetchError::NotFound("nope".into()))
        );
        assert!(matches!(
            store.fetch(&spec("../../etc/passwd")).await,
            Err(FetchError::Invalid { .. })
        ));
    }
}
