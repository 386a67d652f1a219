//! `ajour bench`: the load generator. It starts the server under test as a child process (so its
//! CPU time and peak memory can be read from `/proc`), provisions an application and N devices,
//! drives the devices concurrently with [`crate::simulate::SimulatedDevice`] (every device checks
//! every block and the final checksum, so a fast wrong answer cannot pass), and reports round trips
//! per second, latency percentiles, server CPU seconds, peak memory and registry writes per device.
//!
//! The same load is run against the *bare endpoint* (`ajour bench bare-server`: decode, slice the
//! image, encode; no auth, no registry) in the same run, as the baseline the targets compare to.

mod bare;
mod http;
mod process;

pub use bare::BareServerArgs;
pub use http::HttpBenchArgs;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// N devices updating concurrently over the HTTP endpoint, against `ajour serve` and the bare endpoint.
    Http(HttpBenchArgs),
    /// The bare baseline endpoint (started by `ajour bench http`).
    #[command(hide = true)]
    BareServer(BareServerArgs),
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Http(args) => http::run(args).await,
        BenchCommand::BareServer(args) => bare::serve(args).await,
    }
}

/// The firmware every benchmark serves: deterministic, so runs are comparable.
pub fn bench_image(size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}
