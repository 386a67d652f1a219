//! `ajour-bench`: the load generator. It starts the server under test, the `ajour` binary, as a
//! child process (so its CPU time and peak memory can be read from `/proc`), provisions an
//! application and N devices, drives the devices concurrently with `ajour_sim` (every device checks
//! every block and the final checksum, so a fast wrong answer cannot pass), and reports round trips
//! per second, latency percentiles, server CPU seconds, peak memory and registry writes per device.
//!
//! The same load is run against the *bare endpoint* (`ajour-bench bare-server`: decode, slice the
//! image, encode; no auth, no registry) in the same run, as the baseline the targets compare to;
//! `ajour-bench mqtt` does the same through the Drogue MQTT integration path and a Mosquitto
//! broker, against a bare server behind the same broker (`ajour-bench bare-mqtt-server`);
//! `ajour-bench coap` over the CoAP endpoint, against a bare CoAP server
//! (`ajour-bench bare-coap-server`); `ajour-bench mqtt-endpoint` over the MQTT device endpoint,
//! against a bare MQTT endpoint (`ajour-bench bare-mqtt-endpoint-server`). See docs/benchmarks.md.

mod bare;
mod bare_coap;
mod bare_mqtt;
mod bare_mqtt_endpoint;
mod bare_wire;
mod coap;
mod fleet;
mod http;
mod mqtt;
mod mqtt_endpoint;
mod process;
mod report;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ajour-bench",
    about = "Measure `ajour serve` under load (see docs/benchmarks.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// N devices updating concurrently over the HTTP endpoint, against `ajour serve` and the bare endpoint.
    Http(http::HttpBenchArgs),
    /// The bare baseline endpoint (started by `ajour-bench http`).
    #[command(hide = true)]
    BareServer(bare::BareServerArgs),
    /// N devices updating concurrently through the Drogue MQTT integration path (a Mosquitto of
    /// its own), against `ajour serve` in Drogue mode and a bare server behind the same broker.
    Mqtt(mqtt::MqttBenchArgs),
    /// The bare baseline behind a broker (started by `ajour-bench mqtt`).
    #[command(hide = true)]
    BareMqttServer(bare_mqtt::BareMqttServerArgs),
    /// N devices updating concurrently over the CoAP endpoint (`--coap-listen`), against `ajour
    /// serve` and a bare CoAP server.
    Coap(coap::CoapBenchArgs),
    /// The bare CoAP baseline (started by `ajour-bench coap`).
    #[command(hide = true)]
    BareCoapServer(bare::BareServerArgs),
    /// N devices updating concurrently over the MQTT device endpoint (`--mqtt-listen`), each on
    /// its own connection, against `ajour serve` and a bare MQTT endpoint.
    MqttEndpoint(mqtt_endpoint::MqttEndpointBenchArgs),
    /// The bare MQTT endpoint baseline (started by `ajour-bench mqtt-endpoint`).
    #[command(hide = true)]
    BareMqttEndpointServer(bare::BareServerArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AJOUR_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        BenchCommand::Http(args) => http::run(args).await,
        BenchCommand::BareServer(args) => bare::serve(args).await,
        BenchCommand::Mqtt(args) => mqtt::run(args).await,
        BenchCommand::BareMqttServer(args) => bare_mqtt::serve(args).await,
        BenchCommand::Coap(args) => coap::run(args).await,
        BenchCommand::BareCoapServer(args) => bare_coap::serve(args).await,
        BenchCommand::MqttEndpoint(args) => mqtt_endpoint::run(args).await,
        BenchCommand::BareMqttEndpointServer(args) => bare_mqtt_endpoint::serve(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
