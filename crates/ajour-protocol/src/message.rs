//! The messages themselves. Field order matters: the packed form numbers fields by declaration order.

use serde::{Deserialize, Serialize};

/// Length of the SHA-256 checksum carried by [`Command::Swap`].
pub const CHECKSUM_LEN: usize = 32;

/// What a device reports: the firmware it runs and, while updating, where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The firmware version running now (index 0).
    #[serde(with = "serde_bytes")]
    pub version: Vec<u8>,
    /// The largest block the device accepts (index 1); `None` lets the server choose.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Echoed in every command, so a gateway can multiplex devices (index 2).
    #[serde(default)]
    pub correlation_id: Option<u32>,
    /// The image being written and the next offset the device expects (index 3).
    #[serde(default)]
    pub update: Option<UpdateStatus>,
}

/// The image a device is in the middle of writing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// Version of the image being written (index 0).
    #[serde(with = "serde_bytes")]
    pub version: Vec<u8>,
    /// The next offset the device expects to be written (index 1).
    pub offset: u32,
}

impl Status {
    /// The status a device sends when it is not writing anything.
    pub fn first(version: impl Into<Vec<u8>>, mtu: Option<u32>, correlation_id: Option<u32>) -> Self {
        Self {
            version: version.into(),
            mtu,
            correlation_id,
            update: None,
        }
    }

    /// The status a device sends while writing `next_version`, expecting `offset` next.
    pub fn updating(
        version: impl Into<Vec<u8>>,
        mtu: Option<u32>,
        correlation_id: Option<u32>,
        next_version: impl Into<Vec<u8>>,
        offset: u32,
    ) -> Self {
        Self {
            version: version.into(),
            mtu,
            correlation_id,
            update: Some(UpdateStatus {
                version: next_version.into(),
                offset,
            }),
        }
    }
}

/// What the server tells a device to do next.
///
/// Borrowed so that a `Write` can point straight into a shared firmware image: encoding a block
/// then costs one copy, into the output buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command<'a> {
    /// Report again in `poll` seconds (variant 0).
    Wait {
        correlation_id: Option<u32>,
        poll: Option<u32>,
    },
    /// The device runs `version`, which is the one it should run (variant 1).
    Sync {
        #[serde(borrow, with = "serde_bytes")]
        version: &'a [u8],
        correlation_id: Option<u32>,
        poll: Option<u32>,
    },
    /// Write `data` at `offset` of image `version` (variant 2).
    Write {
        #[serde(borrow, with = "serde_bytes")]
        version: &'a [u8],
        correlation_id: Option<u32>,
        offset: u32,
        #[serde(borrow, with = "serde_bytes")]
        data: &'a [u8],
    },
    /// The whole image is written; install it. `checksum` is the SHA-256 of the image (variant 3).
    Swap {
        #[serde(borrow, with = "serde_bytes")]
        version: &'a [u8],
        correlation_id: Option<u32>,
        #[serde(borrow, with = "serde_bytes")]
        checksum: &'a [u8],
    },
}

impl Command<'_> {
    /// The correlation id this command echoes.
    pub fn correlation_id(&self) -> Option<u32> {
        match self {
            Command::Wait { correlation_id, .. }
            | Command::Sync { correlation_id, .. }
            | Command::Write { correlation_id, .. }
            | Command::Swap { correlation_id, .. } => *correlation_id,
        }
    }

    /// A short name of the variant, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Wait { .. } => "wait",
            Command::Sync { .. } => "sync",
            Command::Write { .. } => "write",
            Command::Swap { .. } => "swap",
        }
    }
}
