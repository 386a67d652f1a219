//! `ajour-bench http`: N devices updating concurrently over the HTTP endpoint.

use crate::fleet::{
    data_dir_with_firmware, drive, provision, serve_flags, Credentials, FleetArgs, Load, APP, PASSWORD,
};
use crate::process::ServerProcess;
use crate::report::{print_table, status_writes, LoadReport};
use ajour_sim::HttpLink;
use clap::Args;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct HttpBenchArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Stop each device after this many blocks (0: the whole update, through Swap and Sync).
    /// With a large image this holds the fleet in the middle of its update, to measure memory.
    #[arg(long, default_value_t = 0)]
    pub blocks: u32,
    /// Most requests in flight at once (one connection each).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Registry database for `ajour serve` (default: SQLite in a temp dir).
    #[arg(long)]
    pub database_url: Option<String>,
    /// How the devices' password is registered: `plain` as users are told to (the default: what
    /// a user gets), or `bcrypt4`, imported pre-hashed at cost 4 (verified slowly once per device).
    #[arg(long, value_enum, default_value_t = Credentials::Plain)]
    pub credentials: Credentials,
    /// Wrong passwords kept in flight while Ajour's fleet updates: this many clients, 25 per
    /// loopback address from 127.0.0.2 up, each posting statuses for devices that do not exist
    /// with a wrong password as fast as they are answered. The first-contact latency of the fleet
    /// (`1st p50`, `1st p99`) shows whether they delay a device logging in for the first time.
    #[arg(long, default_value_t = 0)]
    pub guessers: usize,
    /// Give the devices their firmware through a staged rollout (`POST
    /// /api/dfu/v1alpha1/apps/{app}/rollouts`, one wave of every device, as docs/rollouts.md
    /// shows) instead of the application's firmware: each device is then started by the rollout
    /// (one transaction) and every status asks the rollout what it is given.
    #[arg(long)]
    pub rollout: bool,
    /// After the first rollout, restart `ajour serve` (SIGTERM, then start it on the same data)
    /// and measure the same devices updating again from the start (row `restart`).
    #[arg(long)]
    pub restart: bool,
    /// Instances of `ajour serve` on one PostgreSQL database (`--database-url`), each device's
    /// statuses going to each in turn as a load balancer would spread them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub instances: u32,
}

pub async fn run(args: HttpBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.fleet.devices > 0, "--devices must be at least 1");
    // Each in-flight request holds a socket in both processes.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut reports = Vec::new();
    if !args.fleet.no_ajour {
        reports.extend(run_ajour(&args).await?);
    }
    if !args.fleet.no_bare {
        reports.push(run_bare(&args).await?);
    }
    print_reports(&args, &reports);
    Ok(())
}

async fn run_ajour(args: &HttpBenchArgs) -> anyhow::Result<Vec<LoadReport>> {
    let ajour = args.fleet.ajour_binary()?;
    let shared_database = args
        .database_url
        .as_deref()
        .is_some_and(|url| url.starts_with("postgres"));
    anyhow::ensure!(
        args.instances == 1 || shared_database,
        "--instances {}: several instances share one PostgreSQL database; give it with --database-url postgres://...",
        args.instances
    );
    // One data directory for all instances, as a volume every replica mounts: the firmware
    // files (the registry is in PostgreSQL then).
    let (_data, data_dir) = data_dir_with_firmware(&ajour, args.fleet.image_size)?;
    let mut serve_args = serve_flags(&data_dir);
    serve_args.extend(["--max-mtu", "65536"]);
    if let Some(url) = &args.database_url {
        serve_args.extend(["--database-url", url]);
    }
    // On PostgreSQL, Ajour keeps no secret of its own: every instance is given the same one, as
    // docs/credentials.md tells.
    let secret_file = format!("{data_dir}/credential-secret");
    if shared_database {
        write_credential_secret(&secret_file)?;
        serve_args.extend(["--credential-secret-file", &secret_file]);
    }
    serve_args.extend(args.fleet.serve_args.iter().map(String::as_str));
    let start = || -> anyhow::Result<Vec<ServerProcess>> {
        (0..args.instances)
            .map(|_| ServerProcess::start(&ajour, &serve_args))
            .collect()
    };
    let servers = start()?;
    provision(
        &servers[0].url,
        args.fleet.devices,
        Some(args.credentials),
        args.rollout,
    )
    .await?;
    let mut reports = vec![drive_ajour(&servers, args, "ajour").await?];
    if args.restart {
        for server in servers {
            server.stop()?;
        }
        let servers = start()?;
        // The same devices start again from the old version: the registry says they run the
        // new one, so each is a new update, and each device's first contact with this process.
        reports.push(drive_ajour(&servers, args, "restart").await?);
    }
    Ok(reports)
}

/// A fresh credential secret (one random key, base64) in `path`.
fn write_credential_secret(path: &str) -> anyhow::Result<()> {
    use base64::Engine;
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    std::fs::write(path, base64::engine::general_purpose::STANDARD.encode(key))?;
    Ok(())
}

async fn drive_ajour(
    servers: &[ServerProcess],
    args: &HttpBenchArgs,
    target: &'static str,
) -> anyhow::Result<LoadReport> {
    let guessing = Guessers::start(&servers[0].url, args.guessers)?;
    let mut report = drive_http(servers, args, target).await?;
    let mut writes = 0.0;
    for server in servers {
        writes += status_writes(&server.url).await?;
    }
    report.status_writes = Some(writes / f64::from(args.fleet.devices));
    let answers = guessing.stop().await;
    if args.guessers > 0 {
        println!(
            "{target}: {} wrong-password requests answered during the run, by status: {answers:?}",
            answers.values().sum::<u64>()
        );
    }
    Ok(report)
}

async fn run_bare(args: &HttpBenchArgs) -> anyhow::Result<LoadReport> {
    let server = args.fleet.start_bare("bare-server")?;
    drive_http(std::slice::from_ref(&server), args, "bare").await
}

/// Every device on its own [`HttpLink`] (its statuses spread over `servers`), at most
/// `--connections` requests in flight.
async fn drive_http(
    servers: &[ServerProcess],
    args: &HttpBenchArgs,
    target: &'static str,
) -> anyhow::Result<LoadReport> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(60))
        .build()?;
    let load = Load {
        target,
        blocks: args.blocks,
        in_flight: Some(args.connections),
        broker_pid: None,
    };
    let urls: Vec<&str> = servers.iter().map(|server| server.url.as_str()).collect();
    let endpoints = HttpLink::endpoints(&urls);
    let first = std::sync::atomic::AtomicUsize::new(0);
    drive(servers, &args.fleet, &load, |name| {
        let first = first.fetch_add(1, Ordering::Relaxed);
        HttpLink::spread(http.clone(), &endpoints, first, APP, name, PASSWORD)
    })
    .await
}

fn print_reports(args: &HttpBenchArgs, reports: &[LoadReport]) {
    let title = format!(
        "HTTP endpoint{}{}: {} devices, image {} bytes, mtu {}, {}, {} connections, credentials {}",
        if args.restart {
            " (restart: ajour serve restarted on the same data, the same devices updating again)"
        } else {
            ""
        },
        if args.instances > 1 {
            format!(
                ", {} instances of ajour serve on one PostgreSQL database (CPU and memory summed)",
                args.instances
            )
        } else {
            String::new()
        },
        args.fleet.devices,
        args.fleet.image_size,
        args.fleet.mtu,
        if args.blocks == 0 {
            "whole update".to_string()
        } else {
            format!("{} blocks each", args.blocks)
        },
        args.connections,
        match args.credentials {
            Credentials::Plain => "plain (as documented)",
            Credentials::Bcrypt4 => "imported bcrypt hashes, cost 4",
        }
    );
    print_table(&title, reports);
}

/// Clients posting wrong passwords for devices that do not exist, until stopped.
struct Guessers {
    running: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<BTreeMap<u16, u64>>>,
}

impl Guessers {
    fn start(url: &str, count: usize) -> anyhow::Result<Self> {
        let running = Arc::new(AtomicBool::new(true));
        let mut tasks = Vec::new();
        for (i, client) in (0..count).enumerate() {
            let address = std::net::Ipv4Addr::from(u32::from_be_bytes([127, 0, 0, 2]) + (client / 25) as u32);
            let http = reqwest::Client::builder()
                .local_address(std::net::IpAddr::V4(address))
                .timeout(Duration::from_secs(60))
                .build()?;
            let (url, running) = (format!("{url}/v1/dfu"), running.clone());
            tasks.push(tokio::spawn(async move {
                let mut answers = BTreeMap::new();
                let mut round = 0u64;
                while running.load(Ordering::Relaxed) {
                    round += 1;
                    let sent = http
                        .post(&url)
                        .basic_auth(format!("nobody-{i}@{APP}"), Some(format!("guess-{round}")))
                        .body(vec![0xa0])
                        .send()
                        .await;
                    let code = sent.map(|r| r.status().as_u16()).unwrap_or(0);
                    *answers.entry(code).or_default() += 1;
                }
                answers
            }));
        }
        Ok(Self { running, tasks })
    }

    /// Stop, and count the answers by status code (0: no answer).
    async fn stop(self) -> BTreeMap<u16, u64> {
        self.running.store(false, Ordering::Relaxed);
        let mut answers = BTreeMap::new();
        for task in self.tasks {
            for (code, count) in task.await.unwrap_or_default() {
                *answers.entry(code).or_default() += count;
            }
        }
        answers
    }
}
