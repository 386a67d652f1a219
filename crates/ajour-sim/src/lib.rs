//! Simulated devices: what `ajour simulate` plays and what the benchmarks drive. A
//! [`SimulatedDevice`] behaves as `embedded-update`'s updater does but trusts nothing: every Write
//! must be at exactly the offset it holds and the Swap's checksum must be the SHA-256 of what it
//! received, so a wrong answer fails the device instead of passing as a fast one.
//!
//! How statuses and commands travel is a [`Link`]: [`HttpLink`] posts to the HTTP endpoint as
//! Drogue's devices do, [`CoapLink`] sends Confirmable requests to the CoAP endpoint (option 4209,
//! RFC 7252's retransmissions), [`DrogueMqttLink`] plays a device behind Drogue's MQTT integration
//! (statuses as Drogue CloudEvents, commands from `command/{app}/{device}/dfu`). [`run_device`] is
//! the one device loop (status, link, command, again, until Sync), reporting each round trip to an
//! [`Observer`]; [`run_fleet`] runs many devices at once; [`simulate`] is `ajour simulate`.
//!
//! To rehearse a staged rollout, a device can play a [`Fault`] (its bootloader rolls the update
//! back, it goes quiet at the Swap, or it stalls part-way through the download), spread over a
//! fleet by [`assign_faults`]; and given a target version ([`DeviceOptions::target`]) a device
//! not yet told to update waits for its turn, and ends [`Outcome::NotUpdated`] if it never comes.
//!
//! Nothing here decides anything: the server (or, in this crate's tests, `ajour_engine::decide`
//! behind an in-memory link) does.

pub mod coap;
mod device;
mod drogue_mqtt;
mod fault;
mod fleet;
mod http;
mod link;
pub mod mqtt;
mod run;
mod simulate;

pub use coap::CoapLink;
pub use device::{Outcome, SimulatedDevice, StatusEncoding, Step};
pub use drogue_mqtt::{DrogueMqtt, DrogueMqttLink};
pub use fault::{assign_faults, Fault};
pub use fleet::{progress_bar, run_fleet, FleetOptions};
pub use http::HttpLink;
pub use link::{EncodedStatus, Link, LinkError};
pub use mqtt::MqttLink;
pub use run::{run_device, DeviceOptions, Ended, Observer};
pub use simulate::{simulate, simulate_over, ClientCertFiles, DeviceOutcomes, Simulation, Transport};
