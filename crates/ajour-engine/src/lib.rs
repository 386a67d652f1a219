//! The decision at the heart of Ajour: given what a device reports and the firmware it should run,
//! which command comes next.
//!
//! [`decide`] is a pure function: no I/O, no clock, no async. Everything it needs arrives as
//! arguments, so it is tested exhaustively with property tests and runs the same in every
//! transport. The rule is the one devices in the field rely on (see `docs/protocol.md`):
//!
//! 1. no firmware metadata yet: `Wait`;
//! 2. the device runs the target version: `Sync`;
//! 3. otherwise `Write` the next block from the offset the device reported (from 0 when it was
//!    writing another version, or reports an offset past the image), and `Swap` once it has it all.
//!
//! Every command echoes the status's `correlation_id`.

mod image;

pub use image::{FirmwareImage, InvalidImage};

use ajour_protocol::{Command, Status};

/// Tunables of the decision. The defaults are the original server's where it had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Block size when the device states no `mtu` (or an `mtu` of 0, which would never progress).
    pub default_mtu: u32,
    /// Blocks are never larger than this, whatever the device asks for.
    pub max_mtu: u32,
    /// Seconds a device waits when its firmware is not available yet.
    pub wait_poll: u32,
    /// Seconds a device in sync waits before reporting again (`None`: the device decides).
    pub sync_poll: Option<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            default_mtu: 512,
            max_mtu: 64 * 1024,
            wait_poll: 30,
            sync_poll: None,
        }
    }
}

impl EngineConfig {
    /// The block size to use for a device that asked for `mtu`.
    pub fn block_size(&self, mtu: Option<u32>) -> u32 {
        match mtu {
            None | Some(0) => self.default_mtu.min(self.max_mtu),
            Some(mtu) => mtu.min(self.max_mtu),
        }
        .max(1)
    }
}

/// The firmware a device should run, as far as it is known.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// The image, verified and ready to send.
    Ready(&'a FirmwareImage),
    /// The device's firmware is set but cannot be had now; the reason is for status and logs.
    Unavailable,
}

/// What the decision means for the device, so that callers can report progress without
/// re-deriving it from the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The device runs the target version.
    InSync,
    /// A block was sent; the device will hold `offset + len` of `size` bytes.
    Writing { offset: u32, len: u32, size: u32 },
    /// The image is complete; the device was told to install it.
    Swapping,
    /// The device was told to wait: the firmware is unavailable (or unusable).
    Waiting,
}

/// The command to send and what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    pub command: Command<'a>,
    pub outcome: Outcome,
}

/// Decide the next command for a device that sent `status` and should run `target`.
pub fn decide<'a>(status: &Status, target: Target<'a>, config: &EngineConfig) -> Decision<'a> {
    let correlation_id = status.correlation_id;
    let image = match target {
        Target::Ready(image) if !image.is_empty() => image,
        // An empty image is never installed: a device swapping to nothing is bricked.
        Target::Ready(_) | Target::Unavailable => return wait(correlation_id, config.wait_poll),
    };
    let version = image.version().as_bytes();

    if status.version == version {
        return Decision {
            command: Command::Sync {
                version,
                correlation_id,
                poll: config.sync_poll,
            },
            outcome: Outcome::InSync,
        };
    }

    let size = image.size();
    let offset = match &status.update {
        Some(update) if update.version == version && update.offset <= size => update.offset,
        // Another version, or an offset past the image: what the device holds is not a prefix of
        // this image, so start over rather than mix blocks of two images.
        _ => 0,
    };

    if offset < size {
        let len = config.block_size(status.mtu).min(size - offset);
        let data = image.block(offset, len);
        Decision {
            command: Command::Write {
                version,
                correlation_id,
                offset,
                data,
            },
            outcome: Outcome::Writing { offset, len, size },
        }
    } else {
        Decision {
            command: Command::Swap {
                version,
                correlation_id,
                checksum: image.checksum().as_slice(),
            },
            outcome: Outcome::Swapping,
        }
    }
}

/// The answer when the firmware cannot be had (or a device should not be updated at all).
pub fn wait<'a>(correlation_id: Option<u32>, poll: u32) -> Decision<'a> {
    Decision {
        command: Command::Wait {
            correlation_id,
            poll: Some(poll),
        },
        outcome: Outcome::Waiting,
    }
}

#[cfg(test)]
mod tests;
