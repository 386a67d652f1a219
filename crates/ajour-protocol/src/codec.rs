//! Encoding and decoding. The codec is `serde_cbor_2`, which reproduces `serde_cbor` 0.11 (what the
//! devices use) byte for byte; this module only fixes the form used in each direction and turns
//! failures into [`DecodeError`].

use crate::message::{Command, Status};
use serde::Serialize;

/// The largest status accepted. A real status is under 64 bytes (two short versions and three
/// integers); anything near this bound is not a status.
pub const MAX_STATUS_SIZE: usize = 4096;

/// Which CBOR layout to write. Devices accept commands only in [`Encoding::Packed`]; statuses are
/// sent in either, so both are offered for simulators and gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Integer field and variant indices: what `embedded-update` devices send and expect.
    #[default]
    Packed,
    /// String keys: what `drgdfu` sends for its status.
    Named,
}

/// Why a message could not be decoded. The message is meant for whoever sent the bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty payload: expected a CBOR-encoded DFU status")]
    Empty,
    #[error("payload of {size} bytes is larger than the {max} bytes a status may have")]
    TooLarge { size: usize, max: usize },
    #[error("invalid CBOR status: {reason}")]
    Malformed { offset: u64, reason: String },
    #[error("invalid checksum: a Swap carries a 32-byte SHA-256, got {0} bytes")]
    ChecksumLength(usize),
}

impl From<serde_cbor_2::Error> for DecodeError {
    fn from(error: serde_cbor_2::Error) -> Self {
        DecodeError::Malformed {
            offset: error.offset(),
            reason: error.to_string(),
        }
    }
}

/// Decode a status in either the packed or the named form (the CBOR tells which).
pub fn decode_status(bytes: &[u8]) -> Result<Status, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > MAX_STATUS_SIZE {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: MAX_STATUS_SIZE,
        });
    }
    Ok(serde_cbor_2::from_slice(bytes)?)
}

/// Encode a status, as a device would.
pub fn encode_status(status: &Status, encoding: Encoding) -> Vec<u8> {
    encode(status, encoding)
}

/// Encode a command in the packed form devices expect.
pub fn encode_command(command: &Command<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_size_hint(command));
    encode_command_into(command, &mut out);
    out
}

/// Encode a command in the packed form, appending to `out` (lets a hot path reuse a buffer).
pub fn encode_command_into(command: &Command<'_>, out: &mut Vec<u8>) {
    let mut serializer = serde_cbor_2::Serializer::new(out).packed_format();
    command
        .serialize(&mut serializer)
        .expect("writing CBOR into a Vec cannot fail");
}

/// Decode a command (either form), as a device or simulator would.
pub fn decode_command(bytes: &[u8]) -> Result<Command<'_>, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let command: Command<'_> = serde_cbor_2::from_slice(bytes)?;
    if let Command::Swap { checksum, .. } = &command {
        if checksum.len() != crate::message::CHECKSUM_LEN {
            return Err(DecodeError::ChecksumLength(checksum.len()));
        }
    }
    Ok(command)
}

fn encode<T: Serialize>(value: &T, encoding: Encoding) -> Vec<u8> {
    let result = match encoding {
        Encoding::Packed => serde_cbor_2::ser::to_vec_packed(value),
        Encoding::Named => serde_cbor_2::to_vec(value),
    };
    result.expect("writing CBOR into a Vec cannot fail")
}

fn encoded_size_hint(command: &Command<'_>) -> usize {
    match command {
        Command::Write { data, version, .. } => data.len() + version.len() + 32,
        _ => 64,
    }
}
