//! The `ajour` binary's pieces: configuration and wiring of the server ([`server`]), the
//! management CLI over the REST API ([`client`]), and the command line of the device simulator
//! ([`simulate`], over `ajour_sim`).
//!
//! This crate only wires: the protocol, decisions, registry, firmware sources and endpoints live
//! in their own crates, and the backends are chosen in one place, [`server::start`].

pub mod build_cli;
pub mod cli;
pub mod client;
pub mod config;
pub mod drogue_cli;
pub mod oci_cli;
pub mod rollout_cli;
pub mod server;
pub mod simulate;
pub mod token_cli;

/// `println!` for command output that a closed pipe (`ajour device list | head`) ends quietly
/// instead of with a panic.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(error) = writeln!(out, $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}
