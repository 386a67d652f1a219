//! A firmware image in memory: its bytes, version and SHA-256, checked once when it is built.

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// A firmware image whose bytes are known to hash to its checksum.
///
/// Cheap to clone (the bytes are shared), so one image serves every device updating to it.
#[derive(Clone, PartialEq, Eq)]
pub struct FirmwareImage {
    version: String,
    data: Bytes,
    checksum: [u8; 32],
    /// The checksum in hex, made once: it names the image in every device's status.
    checksum_hex: String,
}

/// Why bytes were refused as an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidImage {
    #[error("firmware size mismatch: declared {declared} bytes, found {actual}")]
    SizeMismatch { declared: u64, actual: u64 },
    #[error("firmware checksum mismatch: declared {declared}, the bytes hash to {actual}")]
    ChecksumMismatch { declared: String, actual: String },
    #[error("firmware of {size} bytes is larger than the 4 GiB the protocol can address")]
    TooLarge { size: u64 },
    #[error("firmware version is empty")]
    EmptyVersion,
}

impl FirmwareImage {
    /// Build an image from bytes, computing their checksum.
    pub fn new(version: impl Into<String>, data: impl Into<Bytes>) -> Result<Self, InvalidImage> {
        let version = version.into();
        let data = data.into();
        if version.is_empty() {
            return Err(InvalidImage::EmptyVersion);
        }
        if u32::try_from(data.len()).is_err() {
            return Err(InvalidImage::TooLarge {
                size: data.len() as u64,
            });
        }
        let checksum: [u8; 32] = Sha256::digest(&data).into();
        Ok(Self {
            version,
            data,
            checksum_hex: hex::encode(checksum),
            checksum,
        })
    }

    /// Build an image from bytes and the metadata published beside them, refusing bytes that do
    /// not match the declared size or checksum (hex SHA-256, either case).
    pub fn verified(
        version: impl Into<String>,
        data: impl Into<Bytes>,
        declared_size: u64,
        declared_checksum: &str,
    ) -> Result<Self, InvalidImage> {
        let image = Self::new(version, data)?;
        let actual = image.data.len() as u64;
        if actual != declared_size {
            return Err(InvalidImage::SizeMismatch {
                declared: declared_size,
                actual,
            });
        }
        let actual_hex = image.checksum_hex.clone();
        if !actual_hex.eq_ignore_ascii_case(declared_checksum.trim()) {
            return Err(InvalidImage::ChecksumMismatch {
                declared: declared_checksum.to_string(),
                actual: actual_hex,
            });
        }
        Ok(image)
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Size in bytes; fits in `u32` by construction.
    pub fn size(&self) -> u32 {
        self.data.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The raw SHA-256 of the bytes.
    pub fn checksum(&self) -> &[u8; 32] {
        &self.checksum
    }

    /// The SHA-256 in lower-case hex: with the version, the image's identity.
    pub fn checksum_hex(&self) -> &str {
        &self.checksum_hex
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// `len` bytes from `offset`, clamped to the image.
    pub fn block(&self, offset: u32, len: u32) -> &[u8] {
        let start = (offset as usize).min(self.data.len());
        let end = start.saturating_add(len as usize).min(self.data.len());
        &self.data[start..end]
    }
}

impl std::fmt::Debug for FirmwareImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirmwareImage")
            .field("version", &self.version)
            .field("size", &self.data.len())
            .field("checksum", &self.checksum_hex())
            .finish()
    }
}
