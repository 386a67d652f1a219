//! Ajour as an add-on to a Drogue IoT Cloud installation.
//!
//! Devices talk to Drogue's endpoints (HTTP, MQTT, CoAP, LoRaWAN through The Things Network);
//! Drogue forwards what they publish as CloudEvents on its MQTT integration and passes commands
//! published there back to the devices. This crate connects Ajour's update service to both sides
//! of Drogue:
//!
//! - [`Integration`]: the MQTT integration client. Subscribes to applications' event streams
//!   (optionally as a shared subscription, to run several instances), decodes DFU statuses from
//!   events in every form Drogue sends ([`event`]), asks [`ajour_service::UpdateService`] for
//!   the command and publishes it for the device.
//! - [`DrogueRegistry`]: Drogue's device registry API as an [`ajour_registry::Registry`], so
//!   firmware specs are read from Drogue and `status.firmware` is written back to it.
//!
//! It owns no decisions: what a device is sent is the update service's business. It must not
//! depend on the binary crate or on any other transport.

mod error;
pub mod event;
mod integration;
mod registry;

pub use ajour_client::mqtt::{MqttConfig, MqttVersion};
pub use ajour_client::{RegistryClientConfig as RegistryConfig, TlsOptions};
pub use error::DrogueError;
pub use integration::{worker_of, Applications, Integration, IntegrationConfig, IntegrationStats};
pub use registry::DrogueRegistry;

/// Everything Drogue mode needs: where the registry and the integration are.
#[derive(Debug, Clone)]
pub struct DrogueConfig {
    pub registry: RegistryConfig,
    pub integration: IntegrationConfig,
}
