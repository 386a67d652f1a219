//! Publishing firmware as an OCI image (`ajour firmware push`).
//!
//! The image written is the tar layout: one `tar+gzip` layer whose root holds `firmware.json`
//! and `firmware.bin`, which the original Ajour reads and so does this store. The same metadata
//! is also put on the image config as labels and on the manifest as annotations, so tools that
//! only look at labels (`skopeo inspect`) see the version too. The bytes are deterministic (no
//! timestamps), so pushing the same firmware and version twice gives the same digest.

use super::client::{sha256_digest, Progress};
use super::layout::{
    FIRMWARE_BIN, FIRMWARE_JSON, LABEL_CHECKSUM, LABEL_SIZE, LABEL_VERSION, MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_MANIFEST,
};
use super::{ImageRef, OciError, OciStore};
use crate::FirmwareMetadata;
use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::sync::Arc;

/// The standard annotation for a version, set beside Ajour's own.
const ANNOTATION_VERSION: &str = "org.opencontainers.image.version";

/// An image built in memory, ready to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub metadata: FirmwareMetadata,
    pub layer: Bytes,
    pub layer_digest: String,
    pub config: Bytes,
    pub config_digest: String,
    pub manifest: Bytes,
    pub manifest_digest: String,
}

/// What a push stored.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// The full reference pushed to (registry prefix applied).
    pub reference: String,
    pub manifest_digest: String,
    pub metadata: FirmwareMetadata,
}

/// Build the image for `data` as version `version`.
pub fn build_image(version: &str, data: &[u8]) -> Result<BuiltImage, String> {
    if version.trim().is_empty() {
        return Err("the version must not be empty".into());
    }
    if u32::try_from(data.len()).is_err() {
        return Err("firmware larger than 4 GiB cannot be served".into());
    }
    let metadata = FirmwareMetadata {
        version: version.to_string(),
        size: data.len() as u64,
        checksum: hex::encode(Sha256::digest(data)),
    };
    let json = serde_json::to_vec(&metadata).map_err(|e| e.to_string())?;
    let tar = tar_of(&[(FIRMWARE_JSON, &json), (FIRMWARE_BIN, data)])
        .map_err(|e| format!("building the layer: {e}"))?;
    let diff_id = sha256_digest(&tar);
    let mut gzip = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    gzip.write_all(&tar).map_err(|e| e.to_string())?;
    let layer = Bytes::from(gzip.finish().map_err(|e| e.to_string())?);
    let layer_digest = sha256_digest(&layer);

    let labels = json!({
        LABEL_VERSION: metadata.version,
        LABEL_SIZE: metadata.size.to_string(),
        LABEL_CHECKSUM: metadata.checksum,
        ANNOTATION_VERSION: metadata.version,
    });
    // Firmware is for no OS or architecture a container runtime knows.
    let config = json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {"Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "ajour firmware push"}],
    });
    let config = Bytes::from(serde_json::to_vec(&config).map_err(|e| e.to_string())?);
    let config_digest = sha256_digest(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": MEDIA_OCI_LAYER_GZIP, "digest": layer_digest, "size": layer.len()}],
        "annotations": labels,
    });
    let manifest = Bytes::from(serde_json::to_vec(&manifest).map_err(|e| e.to_string())?);
    Ok(BuiltImage {
        metadata,
        layer_digest,
        layer,
        config_digest,
        config,
        manifest_digest: sha256_digest(&manifest),
        manifest,
    })
}

/// A tar archive of regular files at its root, with fixed owner, mode and time.
fn tar_of(files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, *data)?;
    }
    builder.into_inner()
}

impl OciStore {
    /// Build and push firmware `data` as version `version` to `image` (relative to the registry
    /// prefix, like a spec's). `progress` is told how many bytes of the firmware layer were sent.
    /// Unless `same_version` says to replace it, a tag that holds this version with other bytes
    /// is refused (see [`crate::FileStore::publish`]).
    pub async fn push(
        &self,
        image: &str,
        version: &str,
        data: &[u8],
        same_version: crate::SameVersion,
        progress: Progress,
    ) -> Result<PushedImage, OciError> {
        let reference = ImageRef::parse(&self.config().registry_prefix, image)?;
        if reference.tag().is_none() {
            return Err(OciError::Invalid {
                image: image.to_string(),
                reason: "push to a tag (name:tag), not a digest".into(),
            });
        }
        let invalid = |reason: String| OciError::Invalid {
            image: reference.to_string(),
            reason,
        };
        if data.len() as u64 > self.config().max_firmware_size {
            return Err(invalid(format!(
                "firmware of {} bytes is more than the {} allowed",
                data.len(),
                self.config().max_firmware_size
            )));
        }
        let built = build_image(version, data).map_err(invalid)?;
        if same_version == crate::SameVersion::Refuse {
            // What the tag holds now, as a device would be served it; nothing (or no firmware) is
            // fine to push over.
            if let Ok(published) = self.inspect(image).await {
                if published.image.version() == version
                    && published.image.checksum_hex() != built.metadata.checksum
                {
                    return Err(invalid(format!(
                        "it holds version {version} with other bytes (sha256 {}); push these as a new \
                         version, or replace it with --force (devices already running {version} keep the old bytes)",
                        published.image.checksum_hex()
                    )));
                }
            }
        }
        self.client().authenticate_push(&reference).await?;
        self.client()
            .push_blob(&reference, built.layer.clone(), &built.layer_digest, progress)
            .await?;
        self.client()
            .push_blob(
                &reference,
                built.config.clone(),
                &built.config_digest,
                Arc::new(|_| {}),
            )
            .await?;
        let digest = self
            .client()
            .push_manifest(&reference, built.manifest.clone(), MEDIA_OCI_MANIFEST)
            .await?;
        Ok(PushedImage {
            reference: reference.to_string(),
            manifest_digest: digest,
            metadata: built.metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout;
    use super::*;

    #[test]
    fn the_built_image_reads_back_in_the_tar_layout() {
        let built = build_image("1.2.3", b"firmware bytes").unwrap();
        assert_eq!(
            built,
            build_image("1.2.3", b"firmware bytes").unwrap(),
            "deterministic"
        );
        let layout::Manifest::Image(manifest) = layout::parse_manifest(&built.manifest).unwrap() else {
            panic!("an image manifest")
        };
        assert_eq!(manifest.layers[0].digest, built.layer_digest);
        assert_eq!(manifest.layers[0].size, built.layer.len() as u64);
        assert_eq!(manifest.config.digest, built.config_digest);
        assert_eq!(
            layout::plan(&manifest).unwrap(),
            layout::Plan::Tar(manifest.layers.clone())
        );
        let found = layout::read_tar_layer(&built.layer, 100, 1 << 20).unwrap();
        assert_eq!(found.bin.as_deref(), Some(&b"firmware bytes"[..]));
        assert_eq!(found.json.unwrap(), built.metadata);
        let labels = layout::config_labels(&built.config).unwrap();
        assert_eq!(labels[LABEL_VERSION], "1.2.3");
        assert_eq!(labels[LABEL_CHECKSUM], built.metadata.checksum);
        assert!(build_image(" ", b"x").is_err());
    }
}
