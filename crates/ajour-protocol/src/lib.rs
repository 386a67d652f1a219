//! The Ajour DFU wire protocol, exactly as devices in the field speak it.
//!
//! A device sends a [`Status`] (what it runs, how large a block it accepts, and what it is in the
//! middle of writing); the server answers with one [`Command`]. Both travel as CBOR in the layout
//! that `embedded-update` 0.12 and `drgdfu` 0.6 produce with `serde_cbor`: commands in the *packed*
//! form (struct fields and enum variants as integer indices, `null` for absent options, byte strings
//! for versions, data and checksums), statuses in either the packed or the *named* form.
//!
//! This crate does no I/O and needs no async runtime, so gateways and device simulators can use it
//! as they are. Decoding never panics: any input gives either a value or a [`DecodeError`].

mod codec;
mod message;

pub use codec::{decode_command, decode_status, encode_command, encode_command_into, encode_status};
pub use codec::{DecodeError, Encoding, MAX_STATUS_SIZE};
pub use message::{Command, Status, UpdateStatus, CHECKSUM_LEN};
