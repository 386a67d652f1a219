//! The vocabulary every part of Ajour shares, with no I/O and no database: who a device is
//! ([`AppName`], [`DeviceName`], [`Key`]), how it presents itself ([`basic_auth`]), and where it
//! is with its firmware ([`FirmwareStatus`], read from and rendered to Drogue's `status.firmware`
//! JSON in [`firmware`] and nowhere else), what its history tells ([`history`]), how its firmware is built ([`build`]), the rules of staged rollouts ([`rollout`]), and who may do what to an application ([`access`]).
//!
//! Transports, the registry backends, the update service and the CLI all speak these types, so a
//! name that passed [`AppName::parse`] is valid everywhere and a status means the same thing to
//! the server that wrote it and the tool that reads it.

pub mod access;
pub mod basic_auth;
pub mod build;
pub mod firmware;
pub mod history;
mod name;
pub mod rollout;

pub use firmware::{Condition, FirmwareReport, FirmwareState, FirmwareStatus, StatusFormatError};
pub use history::{events_between, EventKind, HistoryEvent, RecordedEvent};
pub use name::{AppName, DeviceName, Key, NameError};
