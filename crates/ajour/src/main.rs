//! `ajour`: parse the command line, set up logging as it asks, run.

use ajour::cli::{Cli, LogFormat};
use clap::Parser;

/// mimalloc rather than glibc's malloc: a device's round trip allocates and frees a few small
/// buffers on whichever worker thread runs it, and under a fleet glibc spent about a sixth of the
/// server's CPU consolidating and unlinking chunks (docs/benchmarks.md, "Allocator"). See
/// `main` for the transparent huge pages it is kept from.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // No transparent huge pages for this process: where the kernel gives them to every aligned
    // region (`always`, a common default), mimalloc's arenas are backed 2 MiB at a time, and
    // 10,000 devices mid-update held about 25 MiB more (docs/benchmarks.md, "Allocator"). The
    // flag holds for the whole process and what it runs; pages faulted in before it stay as
    // they are, which is little this early. Where the kernel lacks it, nothing changes.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
    // Parsed first: the command line says how to log. Its own errors (and --help) are clap's.
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match ajour::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Log to standard error, filtered by `AJOUR_LOG`, as text or as one JSON object per line.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AJOUR_LOG")
        .unwrap_or_else(|_| "info,tower_http=warn,sqlx=warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colours for people, plain text for files and log collectors.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // The event's fields beside `message` at the top level; the spans it is in, root first,
        // under `spans` (a device's status: `{"name":"device","app":..,"device":..}`).
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}
