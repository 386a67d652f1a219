//! How firmware sits in an OCI image, and reading it out. Pure functions over bytes the registry
//! sent (already checked against their digests): no I/O, so every hostile input can be tested.
//!
//! Three layouts, told apart by the manifest:
//! - **tar**: a layer (tar, or tar+gzip) whose root holds `firmware.bin` and `firmware.json`
//!   (`{"version","size","checksum"}`); what `ajour firmware push` writes;
//! - **raw**: one layer that is the firmware itself (`application/octet-stream`, as `oras push`
//!   writes): version = the tag, size and checksum from the layer descriptor;
//! - **labels**: the version (and optionally size and checksum) as [`LABEL_VERSION`],
//!   [`LABEL_SIZE`], [`LABEL_CHECKSUM`] annotations on the manifest or labels on the image config;
//!   the bytes are `firmware.bin` in a tar layer, or the single raw layer.

use crate::FirmwareMetadata;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;

/// Manifest annotation or image-config label holding the firmware version.
pub const LABEL_VERSION: &str = "io.drogue.ajour.version";
/// Manifest annotation or image-config label holding the firmware size in bytes (optional).
pub const LABEL_SIZE: &str = "io.drogue.ajour.size";
/// Manifest annotation or image-config label holding the firmware's hex SHA-256 (optional).
pub const LABEL_CHECKSUM: &str = "io.drogue.ajour.checksum";
/// The annotation `oras push` puts on each layer: the file name.
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";

pub const FIRMWARE_BIN: &str = "firmware.bin";
pub const FIRMWARE_JSON: &str = "firmware.json";

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Manifest media types asked for when pulling.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_LIST,
];

/// At most this many layers are looked at: a firmware image has one.
pub const MAX_LAYERS: usize = 64;
/// Largest `firmware.json` read.
const MAX_METADATA_JSON: u64 = 64 * 1024;

/// A reference to a blob, as a manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    Image(ImageManifest),
    /// An index (multi-platform list): its image manifests.
    Index(Vec<Descriptor>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Parse a manifest or index. Every digest must be a sha256 digest (the only algorithm this store
/// checks), so nothing unchecked can be fetched later.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let any: AnyManifest = serde_json::from_slice(bytes).map_err(|e| format!("malformed manifest: {e}"))?;
    if any.schema_version != 2 {
        return Err(format!(
            "unsupported manifest schema version {}",
            any.schema_version
        ));
    }
    let check = |descriptors: &[Descriptor]| {
        if descriptors.len() > MAX_LAYERS {
            return Err(format!(
                "manifest lists {} entries; at most {MAX_LAYERS} are read",
                descriptors.len()
            ));
        }
        match descriptors
            .iter()
            .find(|d| !super::reference::is_sha256_digest(&d.digest))
        {
            Some(bad) => Err(format!(
                "unsupported digest '{}' in manifest",
                truncate(&bad.digest)
            )),
            None => Ok(()),
        }
    };
    let is_index = matches!(
        any.media_type.as_deref(),
        Some(MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST)
    );
    if let Some(manifests) = any.manifests {
        check(&manifests)?;
        return Ok(Manifest::Index(manifests));
    }
    if is_index {
        return Err("image index without manifests".into());
    }
    let (Some(config), Some(layers)) = (any.config, any.layers) else {
        return Err("manifest has no config or no layers".into());
    };
    check(std::slice::from_ref(&config))?;
    check(&layers)?;
    Ok(Manifest::Image(ImageManifest {
        config,
        layers,
        annotations: any.annotations,
    }))
}

/// Which manifest of an index to read: firmware is not built per platform, so the first image
/// manifest is taken.
pub fn pick_from_index(manifests: &[Descriptor]) -> Result<&Descriptor, String> {
    manifests
        .iter()
        .find(|d| matches!(d.media_type.as_str(), MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST))
        .ok_or_else(|| "the image index lists no image manifest".to_string())
}

/// Whether the config blob is an image config that may carry labels.
pub fn config_has_labels(config: &Descriptor) -> bool {
    matches!(config.media_type.as_str(), MEDIA_OCI_CONFIG | MEDIA_DOCKER_CONFIG)
}

/// The `config.Labels` of an image config.
pub fn config_labels(config: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let value: Value = serde_json::from_slice(config).map_err(|e| format!("malformed image config: {e}"))?;
    let labels = value
        .get("config")
        .and_then(|c| c.get("Labels"))
        .and_then(Value::as_object);
    Ok(labels
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect())
}

/// Firmware metadata given as annotations or labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMetadata {
    pub version: String,
    pub size: Option<u64>,
    pub checksum: Option<String>,
}

impl LabelMetadata {
    /// `None` when the version label is absent; an error when a label is malformed.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        let Some(version) = labels.get(LABEL_VERSION) else {
            return Ok(None);
        };
        let size = match labels.get(LABEL_SIZE) {
            Some(size) => Some(
                size.trim()
                    .parse()
                    .map_err(|_| format!("label {LABEL_SIZE} is not a number: '{}'", truncate(size)))?,
            ),
            None => None,
        };
        Ok(Some(Self {
            version: version.clone(),
            size,
            checksum: labels.get(LABEL_CHECKSUM).cloned(),
        }))
    }
}

/// Whether a layer is a tar archive (possibly compressed) rather than the firmware itself.
pub fn is_tar_layer(media_type: &str) -> bool {
    media_type.contains(".tar") || media_type.ends_with("/tar") || media_type.contains("rootfs.diff")
}

/// What the manifest says to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Look for `firmware.bin` (and `firmware.json`) in these tar layers, the top-most first.
    Tar(Vec<Descriptor>),
    /// This layer is the firmware.
    Raw(Descriptor),
}

/// Decide from the layers alone where the firmware is.
pub fn plan(manifest: &ImageManifest) -> Result<Plan, String> {
    if manifest.layers.is_empty() {
        return Err("the image has no layers".into());
    }
    let raw: Vec<&Descriptor> = manifest
        .layers
        .iter()
        .filter(|d| !is_tar_layer(&d.media_type))
        .collect();
    let tar: Vec<Descriptor> = manifest
        .layers
        .iter()
        .rev()
        .filter(|d| is_tar_layer(&d.media_type))
        .cloned()
        .collect();
    let titled = raw
        .iter()
        .find(|d| d.annotations.get(ANNOTATION_TITLE).map(String::as_str) == Some(FIRMWARE_BIN));
    match (raw.as_slice(), titled) {
        (_, Some(layer)) => Ok(Plan::Raw((*layer).clone())),
        ([layer], None) if tar.is_empty() => Ok(Plan::Raw((*layer).clone())),
        _ if !tar.is_empty() => Ok(Plan::Tar(tar)),
        _ => Err(format!(
            "the image has {} non-tar layers and none titled '{FIRMWARE_BIN}': which is the firmware?",
            raw.len()
        )),
    }
}

/// What one tar layer holds at its root.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TarFirmware {
    pub bin: Option<Vec<u8>>,
    pub json: Option<FirmwareMetadata>,
}

/// Read `firmware.bin` and `firmware.json` from the root of a tar layer (gzip-compressed or not,
/// told by its magic bytes). `firmware.bin` larger than `max_firmware` and archives that unpack to
/// more than `max_unpacked` bytes are refused before they are read into memory.
pub fn read_tar_layer(blob: &[u8], max_firmware: u64, max_unpacked: u64) -> Result<TarFirmware, String> {
    if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err("zstd-compressed layers are not supported; use gzip or none".into());
    }
    let reader: Box<dyn Read + '_> = if blob.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(blob))
    } else {
        Box::new(blob)
    };
    let mut archive = tar::Archive::new(Limited {
        inner: reader,
        left: max_unpacked,
    });
    let mut found = TarFirmware::default();
    let entries = archive
        .entries()
        .map_err(|e| format!("layer is not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("layer is not a readable tar archive: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("tar entry with a bad path: {e}"))?;
        let path = path.to_string_lossy();
        let name = path.trim_start_matches("./").trim_start_matches('/');
        let is_file = matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        );
        let size = entry
            .header()
            .size()
            .map_err(|e| format!("tar entry with a bad size: {e}"))?;
        match name {
            FIRMWARE_BIN if is_file => {
                if size > max_firmware {
                    return Err(format!(
                        "{FIRMWARE_BIN} is {size} bytes, more than the {max_firmware} allowed"
                    ));
                }
                found.bin = Some(read_entry(&mut entry, size, FIRMWARE_BIN)?);
            }
            FIRMWARE_JSON if is_file => {
                if size > MAX_METADATA_JSON {
                    return Err(format!("{FIRMWARE_JSON} is {size} bytes; that is not metadata"));
                }
                let json = read_entry(&mut entry, size, FIRMWARE_JSON)?;
                found.json = Some(
                    serde_json::from_slice(&json).map_err(|e| format!("malformed {FIRMWARE_JSON}: {e}"))?,
                );
            }
            _ => {}
        }
    }
    Ok(found)
}

fn read_entry(entry: &mut impl Read, size: u64, name: &str) -> Result<Vec<u8>, String> {
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(64 << 20));
    entry
        .take(size)
        .read_to_end(&mut data)
        .map_err(|e| format!("reading {name} from the layer: {e}"))?;
    if data.len() as u64 != size {
        return Err(format!("{name} is cut short in the layer"));
    }
    Ok(data)
}

/// A reader that fails once more than `left` bytes have come through: a gzip bomb stops here.
struct Limited<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the layer unpacks to more than the configured maximum",
            )
        })?;
        Ok(n)
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn tar_of(files: &[(&str, &[u8])], gzip: bool) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        if !gzip {
            return tar;
        }
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut encoder, &tar).unwrap();
        encoder.finish().unwrap()
    }

    fn descriptor(media_type: &str, title: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
            annotations: title
                .map(|t| BTreeMap::from([(ANNOTATION_TITLE.to_string(), t.to_string())]))
                .unwrap_or_default(),
        }
    }

    #[test]
    fn reads_firmware_from_plain_and_gzipped_tar_layers() {
        let json = br#"{"version":"1.0","size":3,"checksum":"abc"}"#;
        for gzip in [false, true] {
            let blob = tar_of(
                &[
                    ("./firmware.json", json),
                    ("firmware.bin", b"fw!"),
                    ("other", b"x"),
                ],
                gzip,
            );
            let found = read_tar_layer(&blob, 100, 1 << 20).unwrap();
            assert_eq!(found.bin.as_deref(), Some(&b"fw!"[..]));
            assert_eq!(found.json.unwrap().version, "1.0");
        }
        // Not at the root: not the firmware.
        let blob = tar_of(&[("sub/firmware.bin", b"no")], true);
        assert_eq!(
            read_tar_layer(&blob, 100, 1 << 20).unwrap(),
            TarFirmware::default()
        );
    }

    #[test]
    fn oversized_bombs_and_garbage_are_refused() {
        let blob = tar_of(&[("firmware.bin", &[7u8; 1000])], true);
        assert!(read_tar_layer(&blob, 999, 1 << 20)
            .unwrap_err()
            .contains("more than"));
        let bomb = tar_of(&[("filler", &vec![0u8; 1 << 20]), ("firmware.bin", b"x")], true);
        assert!(bomb.len() < 10_000);
        assert!(read_tar_layer(&bomb, 100, 64 * 1024).is_err());
        assert!(read_tar_layer(b"\x1f\x8bnot gzip at all", 100, 1000).is_err());
        let bad_json = tar_of(&[("firmware.json", b"{nope")], false);
        assert!(read_tar_layer(&bad_json, 100, 1 << 20)
            .unwrap_err()
            .contains("malformed"));
        assert!(read_tar_layer(&[0x28, 0xb5, 0x2f, 0xfd, 0], 100, 100)
            .unwrap_err()
            .contains("zstd"));
    }

    #[test]
    fn manifests_parse_and_malformed_ones_are_refused() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": digest, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": 5,
                        "annotations": {ANNOTATION_TITLE: "fw"}}],
            "annotations": {LABEL_VERSION: "1.2.3"}
        });
        let Manifest::Image(image) = parse_manifest(manifest.to_string().as_bytes()).unwrap() else {
            panic!("an image manifest")
        };
        assert_eq!(image.annotations[LABEL_VERSION], "1.2.3");
        assert_eq!(plan(&image).unwrap(), Plan::Raw(image.layers[0].clone()));

        let index = json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX,
            "manifests": [{"mediaType": MEDIA_OCI_MANIFEST, "digest": digest, "size": 9}]});
        let Manifest::Index(entries) = parse_manifest(index.to_string().as_bytes()).unwrap() else {
            panic!("an index")
        };
        assert_eq!(pick_from_index(&entries).unwrap().size, 9);

        for bad in [
            json!({"schemaVersion": 1}),
            json!({"schemaVersion": 2}),
            json!({"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:00", "size": 1}, "layers": []}),
            json!({"schemaVersion": 2, "config": {"mediaType": "x", "digest": digest, "size": -1}, "layers": []}),
            json!({"schemaVersion": 2, "manifests": [{"mediaType": "x", "digest": "md5:1", "size": 1}]}),
            json!([1, 2]),
        ] {
            assert!(parse_manifest(bad.to_string().as_bytes()).is_err(), "{bad}");
        }
        assert!(parse_manifest(b"\xff\x00").is_err());
    }

    #[test]
    fn layouts_are_told_apart_by_their_layers() {
        let image = |layers| ImageManifest {
            config: descriptor(MEDIA_OCI_CONFIG, None),
            layers,
            annotations: BTreeMap::new(),
        };
        let tar = descriptor(MEDIA_OCI_LAYER_GZIP, None);
        let raw = descriptor("application/octet-stream", None);
        assert_eq!(
            plan(&image(vec![tar.clone()])).unwrap(),
            Plan::Tar(vec![tar.clone()])
        );
        assert_eq!(plan(&image(vec![raw.clone()])).unwrap(), Plan::Raw(raw.clone()));
        assert!(plan(&image(vec![])).is_err());
        assert!(plan(&image(vec![raw.clone(), raw.clone()])).is_err());
        let titled = descriptor("application/vnd.acme.fw", Some(FIRMWARE_BIN));
        assert_eq!(
            plan(&image(vec![raw.clone(), titled.clone()])).unwrap(),
            Plan::Raw(titled)
        );
        assert!(is_tar_layer("application/vnd.docker.image.rootfs.diff.tar.gzip"));
        assert!(!is_tar_layer("application/octet-stream"));
    }

    proptest::proptest! {
        /// Whatever a registry sends, parsing answers (Ok or Err) and never panics.
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = parse_manifest(&bytes);
            let _ = config_labels(&bytes);
            let _ = read_tar_layer(&bytes, 1 << 16, 1 << 20);
            let mut gzipped = vec![0x1f, 0x8b];
            gzipped.extend_from_slice(&bytes);
            let _ = read_tar_layer(&gzipped, 1 << 16, 1 << 20);
        }

        /// A real archive cut anywhere or with any byte flipped is read or refused, never panics.
        #[test]
        fn damaged_archives_never_panic(cut in 0usize..4096, flip in 0usize..4096) {
            let json = br#"{"version":"1","size":3,"checksum":"x"}"#;
            let mut blob = tar_of(&[("firmware.json", json), ("firmware.bin", b"abc")], true);
            let at = flip % blob.len();
            blob[at] ^= 0x5a;
            blob.truncate(cut % (blob.len() + 1));
            let _ = read_tar_layer(&blob, 1 << 16, 1 << 20);
        }
    }

    #[test]
    fn labels_give_metadata() {
        let labels = BTreeMap::from([
            (LABEL_VERSION.to_string(), "2.0".to_string()),
            (LABEL_SIZE.to_string(), "12".to_string()),
        ]);
        assert_eq!(
            LabelMetadata::from_labels(&labels).unwrap(),
            Some(LabelMetadata {
                version: "2.0".into(),
                size: Some(12),
                checksum: None
            })
        );
        assert_eq!(LabelMetadata::from_labels(&BTreeMap::new()).unwrap(), None);
        let bad = BTreeMap::from([
            (LABEL_VERSION.to_string(), "2.0".to_string()),
            (LABEL_SIZE.to_string(), "big".to_string()),
        ]);
        assert!(LabelMetadata::from_labels(&bad).is_err());
        let config = json!({"architecture": "x", "config": {"Labels": {LABEL_VERSION: "3"}}});
        assert_eq!(
            config_labels(config.to_string().as_bytes()).unwrap()[LABEL_VERSION],
            "3"
        );
        assert!(config_labels(b"{}").unwrap().is_empty());
        assert!(config_labels(b"nope").is_err());
    }
}
