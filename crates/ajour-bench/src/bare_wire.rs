//! The wire as the bare baselines speak it, sharing no code with Ajour: a device's CBOR status
//! decoded with serde derive over `serde_cbor_2` (which reads both the packed and the named
//! form), the rule of what to send, and the command's bytes written by hand (the packed form of
//! `../shared/docs/wire-protocol.md`; a unit test proves them equal to `ajour_protocol`'s, byte
//! for byte, so a baseline sends exactly what Ajour sends).

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// The image served: its version, bytes and SHA-256.
pub struct Image {
    version: String,
    bytes: Vec<u8>,
    checksum: [u8; 32],
}

impl Image {
    pub fn new(version: String, bytes: Vec<u8>) -> Self {
        let checksum = Sha256::digest(&bytes).into();
        Self {
            version,
            bytes,
            checksum,
        }
    }
}

/// A device's status, in the packed form (integer keys) or the named one: serde's derived field
/// visitor takes a field's index as readily as its name.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Status<'a> {
    #[serde(borrow, with = "serde_bytes")]
    version: Cow<'a, [u8]>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    correlation_id: Option<u32>,
    #[serde(default, borrow)]
    update: Option<Update<'a>>,
}

#[derive(Debug, Deserialize, PartialEq)]
pub struct Update<'a> {
    #[serde(borrow, with = "serde_bytes")]
    version: Cow<'a, [u8]>,
    offset: u32,
}

/// The command answering the CBOR status `bytes`; `None` when they are not a status.
pub fn answer(image: &Image, bytes: &[u8]) -> Option<Vec<u8>> {
    let status: Status = serde_cbor_2::from_slice(bytes).ok()?;
    Some(command(image, &status))
}

/// The rule: the target's version → Sync; else the next `min(mtu or 512, rest)` bytes from the
/// reported offset when the device is writing this version (else from 0); past the end → Swap.
pub fn command(image: &Image, status: &Status) -> Vec<u8> {
    let version = image.version.as_bytes();
    let cid = status.correlation_id;
    if *status.version == *version {
        return sync(version, cid);
    }
    let size = image.bytes.len();
    let offset = match &status.update {
        Some(update) if *update.version == *version && update.offset as usize <= size => {
            update.offset as usize
        }
        _ => 0,
    };
    if offset >= size {
        return swap(version, cid, &image.checksum);
    }
    let mtu = match status.mtu {
        None | Some(0) => 512,
        Some(mtu) => (mtu as usize).min(64 * 1024),
    };
    let end = size.min(offset + mtu);
    write(version, cid, offset as u32, &image.bytes[offset..end])
}

// The packed CBOR form of the commands: a one-entry map {variant index: {field index: value}},
// `null` for an absent option, byte strings for versions, data and checksums.

fn sync(version: &[u8], cid: Option<u32>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + version.len());
    out.extend([0xa1, 0x01, 0xa3, 0x00]);
    bytes(&mut out, version);
    out.push(0x01);
    option(&mut out, cid);
    out.extend([0x02, 0xf6]);
    out
}

fn write(version: &[u8], cid: Option<u32>, offset: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + version.len() + data.len());
    out.extend([0xa1, 0x02, 0xa4, 0x00]);
    bytes(&mut out, version);
    out.push(0x01);
    option(&mut out, cid);
    out.push(0x02);
    head(&mut out, 0, offset.into());
    out.push(0x03);
    bytes(&mut out, data);
    out
}

fn swap(version: &[u8], cid: Option<u32>, checksum: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + version.len());
    out.extend([0xa1, 0x03, 0xa3, 0x00]);
    bytes(&mut out, version);
    out.push(0x01);
    option(&mut out, cid);
    out.push(0x02);
    bytes(&mut out, checksum);
    out
}

fn option(out: &mut Vec<u8>, value: Option<u32>) {
    match value {
        Some(value) => head(out, 0, value.into()),
        None => out.push(0xf6),
    }
}

fn bytes(out: &mut Vec<u8>, value: &[u8]) {
    head(out, 2, value.len() as u64);
    out.extend_from_slice(value);
}

/// A CBOR item head: major type and argument, in the shortest form.
fn head(out: &mut Vec<u8>, major: u8, value: u64) {
    let major = major << 5;
    match value {
        0..=23 => out.push(major | value as u8),
        24..=0xff => out.extend([major | 24, value as u8]),
        0x100..=0xffff => {
            out.push(major | 25);
            out.extend((value as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(major | 26);
            out.extend((value as u32).to_be_bytes());
        }
        _ => {
            out.push(major | 27);
            out.extend(value.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    //! The baseline must send exactly what Ajour sends for the same status, or the comparison
    //! means nothing: its hand-written bytes are checked against `ajour_protocol` and
    //! `ajour_engine` here (and only here).

    use super::*;
    use ajour_engine::{decide, EngineConfig, FirmwareImage, Target};
    use ajour_protocol::{encode_command, encode_status, Encoding, UpdateStatus};

    fn images(size: usize) -> (Image, FirmwareImage) {
        let bytes = crate::fleet::bench_image(size);
        (
            Image::new("2.0.0".into(), bytes.clone()),
            FirmwareImage::new("2.0.0", bytes).unwrap(),
        )
    }

    fn statuses() -> Vec<ajour_protocol::Status> {
        let mut statuses = Vec::new();
        for cid in [
            None,
            Some(0),
            Some(23),
            Some(24),
            Some(255),
            Some(256),
            Some(70_000),
            Some(u32::MAX),
        ] {
            for mtu in [None, Some(0), Some(100), Some(512), Some(4096), Some(1 << 20)] {
                let first = |version: &str| ajour_protocol::Status {
                    version: version.as_bytes().to_vec(),
                    mtu,
                    correlation_id: cid,
                    update: None,
                };
                statuses.push(first("1.0.0"));
                statuses.push(first("2.0.0"));
                for (version, offset) in [
                    ("2.0.0", 0),
                    ("2.0.0", 512),
                    ("2.0.0", 70_000),
                    ("2.0.0", 99_999),
                    ("2.0.0", 100_000),
                    ("2.0.0", 100_001),
                    ("3.0.0", 512),
                ] {
                    let mut status = first("1.0.0");
                    status.update = Some(UpdateStatus {
                        version: version.as_bytes().to_vec(),
                        offset,
                    });
                    statuses.push(status);
                }
            }
        }
        statuses
    }

    #[test]
    fn commands_are_byte_for_byte_ajours() {
        let (image, ajour_image) = images(100_000);
        let config = EngineConfig::default();
        let mut checked = 0;
        for status in statuses() {
            for encoding in [Encoding::Packed, Encoding::Named] {
                let encoded = encode_status(&status, encoding);
                let ours: Status = serde_cbor_2::from_slice(&encoded)
                    .unwrap_or_else(|e| panic!("{status:?} ({encoding:?}): {e}"));
                let expected = encode_command(&decide(&status, Target::Ready(&ajour_image), &config).command);
                assert_eq!(command(&image, &ours), expected, "{status:?} ({encoding:?})");
                checked += 1;
            }
        }
        assert!(checked > 500);
    }

    #[test]
    fn the_protocol_documents_example() {
        // Write{version "0.1.1", cid null, offset 0, data "hello"}, from the wire-protocol notes.
        assert_eq!(
            write(b"0.1.1", None, 0, b"hello"),
            [
                0xa1, 0x02, 0xa4, 0x00, 0x45, b'0', b'.', b'1', b'.', b'1', 0x01, 0xf6, 0x02, 0x00, 0x03,
                0x45, b'h', b'e', b'l', b'l', b'o'
            ]
        );
    }
}
