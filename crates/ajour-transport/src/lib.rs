//! Device endpoints: how statuses reach the update service and commands reach devices.
//!
//! [`http`] is Drogue Cloud's HTTP endpoint as devices use it (`POST /v1/{channel}`, Basic auth),
//! so devices and tools built for Drogue (`drgdfu`, `embedded-update`) work against Ajour as they
//! are. Every endpoint only translates: authentication and decisions belong to
//! [`ajour_service::UpdateService`].

pub mod connections;
pub mod http;
