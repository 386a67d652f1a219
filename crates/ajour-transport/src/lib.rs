//! Device endpoints: how statuses reach the update service and commands reach devices.
//!
//! [`http`] is Drogue Cloud's HTTP endpoint as devices use it (`POST /v1/{channel}`, Basic auth),
//! so devices and tools built for Drogue (`drgdfu`, `embedded-update`) work against Ajour as they
//! are; [`coap`] is Drogue's CoAP endpoint (`POST /v1/{channel}`, credentials in option 4209),
//! off unless `--coap-listen` is given. Every endpoint only translates: authentication and
//! decisions belong to [`ajour_service::UpdateService`].

pub mod client_cert;
pub mod coap;
pub mod connections;
pub mod http;
pub mod mqtt;
pub mod tls;
