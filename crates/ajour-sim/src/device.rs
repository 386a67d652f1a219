//! The device itself, whatever carries its statuses and commands.

use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status, UpdateStatus};
use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

/// How a device encodes its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusEncoding {
    /// As `embedded-update` devices send it (sent with content type `application/cbor`).
    Packed,
    /// As `drgdfu` sends it (sent with no content type).
    Named,
}

impl From<StatusEncoding> for Encoding {
    fn from(encoding: StatusEncoding) -> Self {
        match encoding {
            StatusEncoding::Packed => Encoding::Packed,
            StatusEncoding::Named => Encoding::Named,
        }
    }
}

/// How a simulated device ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Updated from one version to another, checksum verified.
    Updated { from: String, to: String, bytes: usize },
    /// Already ran the version it should.
    InSync { version: String },
}

/// What a device does after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Report again at once.
    Continue,
    /// Report again after this many seconds (as the server asked).
    Wait(u32),
    /// The device is done.
    Done(Outcome),
}

/// A simulated device's state, independent of how statuses and commands travel.
///
/// It behaves as `embedded-update`'s `FirmwareUpdater` does, but checks what it is sent: a Write
/// must be at exactly the offset it holds (as drogue-device insists), a Swap's checksum must be the
/// SHA-256 of the bytes it received, and after the swap it "reboots" into the new version and
/// expects Sync. A command that echoes another correlation id than its status carried is refused
/// too. Anything else is an error naming what was wrong.
#[derive(Debug, Clone)]
pub struct SimulatedDevice {
    start_version: String,
    version: String,
    mtu: Option<u32>,
    correlation_id: Option<u32>,
    written: Vec<u8>,
    writing: Option<String>,
    swapped: bool,
}

impl SimulatedDevice {
    /// A device running `version`, asking for blocks of `mtu` bytes (none: the server's default).
    pub fn new(version: &str, mtu: Option<u32>) -> Self {
        Self {
            start_version: version.to_string(),
            version: version.to_string(),
            mtu,
            correlation_id: None,
            written: Vec::new(),
            writing: None,
            swapped: false,
        }
    }

    /// A device running `version` that restarted part-way through writing version `writing`: it
    /// holds `written` and reports its length as its offset, as `embedded-update` does after a
    /// reboot. The server decides whether that is a prefix to continue from.
    pub fn resuming(version: &str, mtu: Option<u32>, writing: &str, written: Vec<u8>) -> Self {
        Self {
            writing: Some(writing.to_string()),
            written,
            ..Self::new(version, mtu)
        }
    }

    /// Use `correlation_id` from now on (a link that may deliver late answers gives each status
    /// its own, to tell them apart).
    pub fn set_correlation_id(&mut self, correlation_id: Option<u32>) {
        self.correlation_id = correlation_id;
    }

    pub fn correlation_id(&self) -> Option<u32> {
        self.correlation_id
    }

    /// The version the device runs now.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The status the device sends now.
    pub fn status(&self) -> Status {
        Status {
            version: self.version.as_bytes().to_vec(),
            mtu: self.mtu,
            correlation_id: self.correlation_id,
            update: self.writing.as_ref().map(|v| UpdateStatus {
                version: v.as_bytes().to_vec(),
                offset: self.written.len() as u32,
            }),
        }
    }

    /// The status, encoded as this kind of device sends it.
    pub fn encoded_status(&self, encoding: StatusEncoding) -> Vec<u8> {
        encode_status(&self.status(), encoding.into())
    }

    /// Follow a command received as bytes.
    pub fn apply_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<Step> {
        let command = decode_command(bytes).context("decoding the server's command")?;
        self.apply(command)
    }

    /// Follow a command.
    pub fn apply(&mut self, command: Command<'_>) -> anyhow::Result<Step> {
        if command.correlation_id() != self.correlation_id {
            bail!(
                "command for correlation id {:?}, expected {:?}",
                command.correlation_id(),
                self.correlation_id
            );
        }
        match command {
            Command::Write {
                version: v,
                offset,
                data,
                ..
            } => {
                let v = String::from_utf8_lossy(v).into_owned();
                if offset == 0 {
                    self.written.clear();
                    self.writing = Some(v.clone());
                }
                if self.writing.as_deref() != Some(v.as_str()) {
                    bail!("Write of version {v} while writing {:?}", self.writing);
                }
                if offset as usize != self.written.len() {
                    bail!(
                        "Write at offset {offset}, but the device holds {} bytes",
                        self.written.len()
                    );
                }
                if data.is_empty() {
                    bail!("empty Write at offset {offset}: the update would never progress");
                }
                self.written.extend_from_slice(data);
                Ok(Step::Continue)
            }
            Command::Swap {
                version: v, checksum, ..
            } => {
                let v = String::from_utf8_lossy(v).into_owned();
                if self.writing.as_deref() != Some(v.as_str()) {
                    bail!("Swap to {v}, but the device wrote {:?}", self.writing);
                }
                let actual = Sha256::digest(&self.written);
                if actual.as_slice() != checksum {
                    bail!(
                        "Swap checksum {} does not match the {} bytes received (sha256 {})",
                        hex::encode(checksum),
                        self.written.len(),
                        hex::encode(actual)
                    );
                }
                // Install and reboot into the new version.
                self.version = v;
                self.writing = None;
                self.swapped = true;
                Ok(Step::Continue)
            }
            Command::Sync { version: v, .. } => {
                let v = String::from_utf8_lossy(v).into_owned();
                if v != self.version {
                    bail!("Sync to {v}, but the device runs {}", self.version);
                }
                Ok(Step::Done(if self.swapped {
                    Outcome::Updated {
                        from: self.start_version.clone(),
                        to: self.version.clone(),
                        bytes: self.written.len(),
                    }
                } else {
                    Outcome::InSync {
                        version: self.version.clone(),
                    }
                }))
            }
            Command::Wait { poll, .. } => Ok(Step::Wait(poll.unwrap_or(1))),
        }
    }

    /// The bytes received of the image being (or last) written.
    pub fn written(&self) -> &[u8] {
        &self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write<'a>(offset: u32, data: &'a [u8]) -> Command<'a> {
        Command::Write {
            version: b"2.0.0",
            correlation_id: None,
            offset,
            data,
        }
    }

    #[test]
    fn refuses_a_write_at_another_offset_than_it_holds() {
        let mut device = SimulatedDevice::new("1.0.0", None);
        assert_eq!(device.apply(write(0, b"abc")).unwrap(), Step::Continue);
        let error = device.apply(write(2, b"de")).unwrap_err();
        assert!(error.to_string().contains("offset 2"), "{error}");
        assert!(
            device.apply(write(3, b"")).is_err(),
            "an empty Write never progresses"
        );
    }

    #[test]
    fn refuses_a_swap_whose_checksum_is_not_of_what_it_received() {
        let mut device = SimulatedDevice::new("1.0.0", None);
        device.apply(write(0, b"abc")).unwrap();
        let wrong: [u8; 32] = Sha256::digest(b"abd").into();
        let swap = |checksum| Command::Swap {
            version: b"2.0.0",
            correlation_id: None,
            checksum,
        };
        assert!(device.apply(swap(&wrong)).is_err());
        let right: [u8; 32] = Sha256::digest(b"abc").into();
        assert_eq!(device.apply(swap(&right)).unwrap(), Step::Continue);
        assert_eq!(device.version(), "2.0.0");
        let sync = |version| Command::Sync {
            version,
            correlation_id: None,
            poll: None,
        };
        assert!(
            device.apply(sync(b"1.0.0")).is_err(),
            "Sync to a version it does not run"
        );
        assert_eq!(
            device.apply(sync(b"2.0.0")).unwrap(),
            Step::Done(Outcome::Updated {
                from: "1.0.0".into(),
                to: "2.0.0".into(),
                bytes: 3
            })
        );
    }

    #[test]
    fn refuses_a_command_for_another_status() {
        let mut device = SimulatedDevice::new("1.0.0", None);
        device.set_correlation_id(Some(7));
        let wait = |correlation_id| Command::Wait {
            correlation_id,
            poll: Some(5),
        };
        assert!(device.apply(wait(Some(6))).is_err());
        assert!(device.apply(wait(None)).is_err());
        assert_eq!(device.apply(wait(Some(7))).unwrap(), Step::Wait(5));
    }

    #[test]
    fn a_resuming_device_reports_what_it_holds() {
        let device = SimulatedDevice::resuming("1.0.0", Some(64), "2.0.0", vec![0; 100]);
        let status = device.status();
        assert_eq!(status.version, b"1.0.0");
        assert_eq!(status.mtu, Some(64));
        assert_eq!(
            status.update,
            Some(UpdateStatus {
                version: b"2.0.0".to_vec(),
                offset: 100
            })
        );
    }
}
