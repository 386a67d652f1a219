//! The device itself, whatever carries its statuses and commands.

use crate::Fault;
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

/// How a simulated device ended. Only a device that failed a check ends with an error instead:
/// every outcome here is the device doing what it was set to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Updated from one version to another, checksum verified.
    Updated { from: String, to: String, bytes: usize },
    /// Already ran the version it should.
    InSync { version: String },
    /// Given a target ([`crate::DeviceOptions::target`]), the device still ran `version`, not the
    /// target, when its timeout found it waiting as its last command told it (a Wait, or a Sync
    /// on `version`): the server had not updated it yet, as a device of a later wave of a rollout.
    NotUpdated { version: String },
    /// Played [`Fault::RollBack`]: sent the Swap to `to`, rolled back, and reported that it still
    /// runs `version`.
    RolledBack { version: String, to: String },
    /// Played [`Fault::Silent`]: went quiet at the Swap to `to`.
    Silent { to: String },
    /// Played [`Fault::Stall`]: went quiet holding `offset` bytes of `to`.
    Stalled { to: String, offset: u32 },
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
///
/// A device may be set to play a [`Fault`] ([`Self::with_fault`]): then it fails its update as
/// that fault says, still checking everything it is sent up to there.
#[derive(Debug, Clone)]
pub struct SimulatedDevice {
    start_version: String,
    version: String,
    mtu: Option<u32>,
    correlation_id: Option<u32>,
    written: Vec<u8>,
    writing: Option<String>,
    swapped: bool,
    fault: Option<Fault>,
    /// Played [`Fault::RollBack`] at the Swap to this version, and has not yet had the status
    /// that shows it answered.
    rolled_back_from_swap_to: Option<String>,
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
            fault: None,
            rolled_back_from_swap_to: None,
        }
    }

    /// The same device, playing `fault`.
    pub fn with_fault(self, fault: Fault) -> Self {
        Self {
            fault: Some(fault),
            ..self
        }
    }

    /// The fault the device plays, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.fault
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
        if let Some(to) = self.rolled_back_from_swap_to.take() {
            // The status after the rollback is what the server had to see; what it answers is
            // the server's own business, to be checked on the server.
            return Ok(Step::Done(Outcome::RolledBack {
                version: self.version.clone(),
                to,
            }));
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
                match self.fault {
                    Some(Fault::Stall { at }) if self.written.len() >= at as usize => {
                        Ok(Step::Done(Outcome::Stalled {
                            to: v,
                            offset: self.written.len() as u32,
                        }))
                    }
                    _ => Ok(Step::Continue),
                }
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
                match self.fault {
                    Some(Fault::RollBack) => {
                        // Rebooted, and the bootloader went back to the old image: nothing is
                        // installed and no update is under way any more.
                        self.writing = None;
                        self.rolled_back_from_swap_to = Some(v);
                        Ok(Step::Continue)
                    }
                    Some(Fault::Silent) => Ok(Step::Done(Outcome::Silent { to: v })),
                    Some(Fault::Stall { at }) if self.written.len() >= at as usize => {
                        // Resumed holding it all already: the Swap is its first command since.
                        Ok(Step::Done(Outcome::Stalled {
                            to: v,
                            offset: self.written.len() as u32,
                        }))
                    }
                    Some(Fault::Stall { at }) => bail!(
                        "Swap to {v} holding {} bytes, before the {at} bytes the device was to stall at: \
                         the image is smaller than the device was told",
                        self.written.len()
                    ),
                    None => {
                        // Install and reboot into the new version.
                        self.version = v;
                        self.writing = None;
                        self.swapped = true;
                        Ok(Step::Continue)
                    }
                }
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

    fn swap(checksum: &[u8]) -> Command<'_> {
        Command::Swap {
            version: b"2.0.0",
            correlation_id: None,
            checksum,
        }
    }

    #[test]
    fn a_device_playing_a_fault_still_refuses_a_wrong_swap_checksum() {
        let wrong: [u8; 32] = Sha256::digest(b"abd").into();
        for fault in [Fault::RollBack, Fault::Silent, Fault::Stall { at: 3 }] {
            let mut device = SimulatedDevice::new("1.0.0", None).with_fault(fault);
            // Resumed holding it all, so that even the stalling device gets to the Swap.
            device = SimulatedDevice {
                written: b"abc".to_vec(),
                writing: Some("2.0.0".into()),
                ..device
            };
            let error = device.apply(swap(&wrong)).unwrap_err();
            assert!(error.to_string().contains("Swap checksum"), "{fault}: {error}");
        }
    }

    #[test]
    fn a_device_that_rolls_back_reports_its_old_version_then_ends() {
        let mut device = SimulatedDevice::new("1.0.0", None).with_fault(Fault::RollBack);
        device.apply(write(0, b"abc")).unwrap();
        let right: [u8; 32] = Sha256::digest(b"abc").into();
        assert_eq!(device.apply(swap(&right)).unwrap(), Step::Continue);
        let status = device.status();
        assert_eq!((status.version.as_slice(), status.update), (&b"1.0.0"[..], None));
        // Whatever the server answers: here, the update from the start again.
        assert_eq!(
            device.apply(write(0, b"abc")).unwrap(),
            Step::Done(Outcome::RolledBack {
                version: "1.0.0".into(),
                to: "2.0.0".into()
            })
        );
    }

    #[test]
    fn a_stalling_device_stops_at_the_write_that_gets_it_to_its_mark() {
        let mut device = SimulatedDevice::new("1.0.0", None).with_fault(Fault::Stall { at: 4 });
        assert_eq!(device.apply(write(0, b"abc")).unwrap(), Step::Continue);
        assert_eq!(
            device.apply(write(3, b"de")).unwrap(),
            Step::Done(Outcome::Stalled {
                to: "2.0.0".into(),
                offset: 5
            })
        );
        // Sent the Swap short of its mark: it was told a larger image than it got.
        let mut device = SimulatedDevice::new("1.0.0", None).with_fault(Fault::Stall { at: 4 });
        device.apply(write(0, b"abc")).unwrap();
        let right: [u8; 32] = Sha256::digest(b"abc").into();
        let error = device.apply(swap(&right)).unwrap_err();
        assert!(error.to_string().contains("stall at"), "{error}");
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
