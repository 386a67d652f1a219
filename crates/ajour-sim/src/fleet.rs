//! Many devices at once.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// How a fleet is run.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Devices running at the same time; the others wait for their turn (and a device's timeout
    /// starts with its turn).
    pub concurrency: usize,
    /// What the progress bar says it counts.
    pub progress: String,
}

/// A progress bar of `total` items, drawn on stderr when it is a terminal.
pub fn progress_bar(total: u64, message: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.into());
    bar
}

/// Run `device(name)` for every name, at most `options.concurrency` at a time, with a progress
/// bar of devices done; return each name with its result, in the order they finished. `device`
/// is the device's whole life: typically a link, [`crate::run_device`], and what to keep of it.
pub async fn run_fleet<T, F, Fut>(
    names: Vec<String>,
    options: &FleetOptions,
    device: F,
) -> anyhow::Result<Vec<(String, anyhow::Result<T>)>>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let bar = progress_bar(names.len() as u64, options.progress.clone());
    let turns = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let count = names.len();
    for name in names {
        let (turns, bar) = (turns.clone(), bar.clone());
        // Made here, run when its turn comes.
        let run = device(name.clone());
        tasks.spawn(async move {
            let _turn = turns.acquire_owned().await;
            let result = run.await;
            bar.inc(1);
            (name, result)
        });
    }
    let mut results = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.context("simulated device task")?);
    }
    bar.finish_and_clear();
    Ok(results)
}
