//! `ajour bench`: the load generator. It starts the server under test as a child process (so its
//! CPU time and peak memory can be read from `/proc`), provisions an application and N devices,
//! drives the devices concurrently with [`crate::simulate::SimulatedDevice`] (every device checks
//! every block and the final checksum, so a fast wrong answer cannot pass), and reports round trips
//! per second, latency percentiles, server CPU seconds, peak memory and registry writes per device.
//!
//! The same load is run against the *bare endpoint* (`ajour bench bare-server`: decode, slice the
//! image, encode; no auth, no registry) in the same run, as the baseline the targets compare to;
//! `ajour bench mqtt` does the same through the Drogue MQTT integration path and a Mosquitto
//! broker, against a bare server behind the same broker (`ajour bench bare-mqtt-server`).

mod bare;
mod bare_mqtt;
mod http;
mod mqtt;
mod process;

pub use bare::BareServerArgs;
pub use bare_mqtt::BareMqttServerArgs;
pub use http::HttpBenchArgs;
pub use mqtt::MqttBenchArgs;

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
    /// N devices updating concurrently through the Drogue MQTT integration path (a Mosquitto of
    /// its own), against `ajour serve` in Drogue mode and a bare server behind the same broker.
    Mqtt(MqttBenchArgs),
    /// The bare baseline behind a broker (started by `ajour bench mqtt`).
    #[command(hide = true)]
    BareMqttServer(BareMqttServerArgs),
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Http(args) => http::run(args).await,
        BenchCommand::BareServer(args) => bare::serve(args).await,
        BenchCommand::Mqtt(args) => mqtt::run(args).await,
        BenchCommand::BareMqttServer(args) => bare_mqtt::serve(args).await,
    }
}

/// The firmware every benchmark serves: deterministic, so runs are comparable.
pub fn bench_image(size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

/// What every load generator takes: the fleet, the image, and which servers to measure.
#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// Devices updating at the same time.
    #[arg(long, default_value_t = 1000)]
    pub devices: u32,
    /// Firmware image size in bytes.
    #[arg(long, default_value_t = 65536)]
    pub image_size: usize,
    /// Block size the devices ask for.
    #[arg(long, default_value_t = 512)]
    pub mtu: u32,
    /// An extra flag for the `ajour serve` under test, e.g. `--serve-arg=--spec-cache-ms=60000`
    /// (repeatable).
    #[arg(long = "serve-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub serve_args: Vec<String>,
    /// Skip the bare baseline.
    #[arg(long)]
    pub no_bare: bool,
    /// Skip `ajour serve` (measure only the bare baseline).
    #[arg(long)]
    pub no_ajour: bool,
    /// Give up after this many seconds (per target).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}
