//! End-to-end tests of `ajour serve`: a real server on a free port, a real database (SQLite in a
//! temp dir, and a PostgreSQL database of the test's own), real HTTP.

mod support;

mod api;
mod bad_input;
mod bench;
mod binary;
mod devices;
mod drogue;
mod oci;
mod ops;
mod status;
