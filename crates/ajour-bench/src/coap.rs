//! `ajour-bench coap`: N devices updating concurrently over the CoAP endpoint (`ajour serve
//! --coap-listen`), each on its own UDP socket with the simulator's `CoapLink` (confirmable
//! requests, RFC 7252 retransmissions), against the bare CoAP server in the same run.

use crate::fleet::{alternate, drive, FleetArgs, Load, RoundsArgs, APP, PASSWORD};
use crate::process::ServerProcess;
use crate::report::{print_rounds, LoadReport};
use ajour_sim::CoapLink;
use clap::Args;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Clone, Args)]
pub struct CoapBenchArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub rounds: RoundsArgs,
}

pub async fn run(args: CoapBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.fleet.devices > 0, "--devices must be at least 1");
    // A socket per device, in this process.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // The server and the address it printed (once).
    let ajour = match args.fleet.no_ajour {
        false => {
            let (data, server) = args
                .fleet
                .start_ajour_with(&["--coap-listen", "127.0.0.1:0"])
                .await?;
            let coap = server.coap_address()?;
            Some((data, server, coap))
        }
        true => None,
    };
    let bare = match args.fleet.no_bare {
        false => Some(args.fleet.start_bare("bare-coap-server")?),
        true => None,
    };
    let bare_address = bare
        .as_ref()
        .map(|server| server.url.trim_start_matches("coap://").to_string());
    let rounds = alternate(
        args.rounds.rounds,
        args.fleet.devices,
        ajour
            .as_ref()
            .map(|(_data, server, address)| (server, address.as_str())),
        bare.as_ref().zip(bare_address.as_deref()),
        async |server, address, target| drive_coap(server, address, &args, target).await,
    )
    .await?;
    let title = format!(
        "CoAP endpoint: {} devices, image {} bytes, mtu {}, whole update, confirmable requests, one UDP socket per device",
        args.fleet.devices, args.fleet.image_size, args.fleet.mtu
    );
    print_rounds(&title, &rounds);
    Ok(())
}

/// Every device on its own [`CoapLink`] to `address` (`HOST:PORT`).
async fn drive_coap(
    server: &ServerProcess,
    address: &str,
    args: &CoapBenchArgs,
    target: &'static str,
) -> anyhow::Result<LoadReport> {
    let endpoints = CoapLink::resolve(&[address]).await?;
    let load = Load {
        target,
        blocks: 0,
        in_flight: None,
        broker_pid: None,
    };
    let first = AtomicUsize::new(0);
    drive(std::slice::from_ref(server), &args.fleet, &load, |name| {
        let first = first.fetch_add(1, Ordering::Relaxed);
        CoapLink::spread(&endpoints, first, APP, name, PASSWORD)
    })
    .await
}
