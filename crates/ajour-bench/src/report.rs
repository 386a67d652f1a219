//! What a run measured, and the one table every benchmark prints.

use hdrhistogram::Histogram;
use std::time::Duration;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub target: &'static str,
    pub round_trips: u64,
    pub elapsed: Duration,
    /// Each device's first round trip: password verification and first registry read.
    pub first_p50_us: u64,
    pub first_p99_us: u64,
    /// All later round trips: the steady cost per block.
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
    pub status_writes: Option<f64>,
    /// CPU seconds the MQTT broker spent carrying this run's messages (MQTT benchmarks only).
    pub broker_cpu_seconds: Option<f64>,
}

/// The longest latency recorded: ten minutes, in microseconds.
const MAX_LATENCY_US: u64 = 600_000_000;

/// The latencies of one run: each device's first round trip, and all the others.
pub struct Latencies {
    pub first: Histogram<u64>,
    pub rest: Histogram<u64>,
}

impl Latencies {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            first: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
            rest: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
        })
    }
}

impl LoadReport {
    /// A report of a run of `target`, before the figures only some targets have.
    pub fn new(
        target: &'static str,
        round_trips: u64,
        elapsed: Duration,
        latencies: &Latencies,
        cpu_seconds: f64,
        peak_rss_mib: f64,
    ) -> Self {
        Self {
            target,
            round_trips,
            elapsed,
            first_p50_us: latencies.first.value_at_quantile(0.50),
            first_p99_us: latencies.first.value_at_quantile(0.99),
            p50_us: latencies.rest.value_at_quantile(0.50),
            p99_us: latencies.rest.value_at_quantile(0.99),
            max_us: latencies.rest.max(),
            cpu_seconds,
            peak_rss_mib,
            status_writes: None,
            broker_cpu_seconds: None,
        }
    }

    pub fn round_trips_per_second(&self) -> f64 {
        self.round_trips as f64 / self.elapsed.as_secs_f64()
    }
}

/// `status.firmware` writes the server made, from its `/metrics`.
pub async fn status_writes(url: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("ajour_registry_calls_total") && l.contains("op=\"set_status\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The table every benchmark prints: one row per target, then how Ajour compares to the bare
/// baseline when both ran.
pub fn print_table(title: &str, reports: &[LoadReport]) {
    println!("{title}");
    print_rows(reports);
    if let Some(bare) = reports.iter().find(|r| r.target == "bare") {
        for ajour in reports.iter().filter(|r| r.target != "bare") {
            println!(
                "{}/bare: {:.0}% of the round trips per second, p99 {:.2}x (after each device's first round trip)",
                ajour.target,
                ratio(ajour, bare),
                ajour.p99_us as f64 / bare.p99_us.max(1) as f64
            );
        }
    }
    for r in reports {
        if let Some(cpu) = r.broker_cpu_seconds {
            println!("broker cpu during {}: {cpu:.2} s", r.target);
        }
    }
}

/// The tables of several rounds (each Ajour's run then the baseline's), then the ratio of each
/// round and their median: the figure to compare with a target, as one round can fall on a
/// moment the machine was busy with something else.
pub fn print_rounds(title: &str, rounds: &[Vec<LoadReport>]) {
    if let [only] = rounds {
        return print_table(title, only);
    }
    for (i, reports) in rounds.iter().enumerate() {
        print_table(&format!("{title}: round {} of {}", i + 1, rounds.len()), reports);
    }
    let mut ratios: Vec<f64> = rounds
        .iter()
        .filter_map(|reports| {
            let bare = reports.iter().find(|r| r.target == "bare")?;
            let ajour = reports.iter().find(|r| r.target == "ajour")?;
            Some(ratio(ajour, bare))
        })
        .collect();
    if ratios.is_empty() {
        return;
    }
    let each = ratios
        .iter()
        .map(|r| format!("{r:.0}%"))
        .collect::<Vec<_>>()
        .join(", ");
    ratios.sort_by(f64::total_cmp);
    println!(
        "ajour/bare over {} rounds: median {:.0}% of the round trips per second (rounds: {each})",
        ratios.len(),
        median(&ratios)
    );
}

/// Ajour's round trips per second as a percentage of the baseline's.
fn ratio(ajour: &LoadReport, bare: &LoadReport) -> f64 {
    100.0 * ajour.round_trips_per_second() / bare.round_trips_per_second()
}

/// The median of sorted, non-empty `values` (the mean of the middle two of an even count).
fn median(values: &[f64]) -> f64 {
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// One row per report, under the columns' names.
fn print_rows(reports: &[LoadReport]) {
    println!(
        "{:<7} {:>11} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>9} {:>8}",
        "target",
        "round trips",
        "seconds",
        "rt/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "1st p50",
        "1st p99",
        "server cpu",
        "peak MiB",
        "writes/d"
    );
    let ms = |us: u64| us as f64 / 1000.0;
    for r in reports {
        println!(
            "{:<7} {:>11} {:>8.2} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>10.2} {:>9.1} {:>8}",
            r.target,
            r.round_trips,
            r.elapsed.as_secs_f64(),
            r.round_trips_per_second(),
            ms(r.p50_us),
            ms(r.p99_us),
            ms(r.max_us),
            ms(r.first_p50_us),
            ms(r.first_p99_us),
            r.cpu_seconds,
            r.peak_rss_mib,
            r.status_writes
                .map(|w| format!("{w:.2}"))
                .unwrap_or_else(|| "-".into())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[1.0]), 1.0);
        assert_eq!(median(&[1.0, 5.0, 9.0]), 5.0);
        assert_eq!(median(&[1.0, 3.0, 5.0, 9.0]), 4.0);
    }
}
