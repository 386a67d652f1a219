//! End to end: `ajour serve` in this process on a free port (`TestServer`) or as the binary
//! (`ServeProcess`), its registry on SQLite and on PostgreSQL (a database of the test's own),
//! real HTTP, real peers (Mosquitto, docker-registry; Hawkbit played by `hawkbit_mock`), devices played by the one simulator.
//! What is tested here needs the whole server or the binary; the crates test themselves.

mod support;

mod api;
mod auth;
mod bad_input;
mod binary;
mod builds;
mod coap;
mod console;
mod devices;
mod discovery;
mod drg;
mod drogue;
mod gateway;
mod hawkbit;
mod mqtt;
mod oci;
mod ops;
mod schema_and_logs;
mod status;
mod tls;
