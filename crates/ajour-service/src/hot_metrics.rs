//! Handles of the metrics counted on every device request, looked up once. The `metrics` macros
//! find a metric's handle by hashing its name and labels in the recorder's registry on every
//! call, and over a fleet that lookup was about a twentieth of the server's CPU
//! (docs/benchmarks.md, "Allocator, metric handles and status writes"); a handle kept here is
//! only an atomic add.
//!
//! A handle taken before a recorder is installed counts nowhere, and would be kept: `ajour
//! serve` installs its recorder first thing (`server::start`), before it serves any device, so
//! the first lookup comes after it.

use metrics::{Counter, Gauge};
use std::sync::OnceLock;

/// A counter without labels.
pub struct HotCounter {
    name: &'static str,
    handle: OnceLock<Counter>,
}

impl HotCounter {
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            handle: OnceLock::new(),
        }
    }

    pub fn increment(&self, by: u64) {
        self.handle
            .get_or_init(|| metrics::counter!(self.name))
            .increment(by);
    }
}

/// A gauge without labels.
pub struct HotGauge {
    name: &'static str,
    handle: OnceLock<Gauge>,
}

impl HotGauge {
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            handle: OnceLock::new(),
        }
    }

    fn handle(&self) -> &Gauge {
        self.handle.get_or_init(|| metrics::gauge!(self.name))
    }

    pub fn increment(&self, by: f64) {
        self.handle().increment(by);
    }

    pub fn decrement(&self, by: f64) {
        self.handle().decrement(by);
    }
}

/// A counter with one label whose usual values are known: each of those has its handle (taken
/// when first counted, so a value never counted is not reported as 0); any other value is
/// counted through the macro, as it would be without this.
pub struct HotLabeledCounter<const N: usize> {
    name: &'static str,
    label: &'static str,
    values: [&'static str; N],
    handles: [OnceLock<Counter>; N],
}

impl<const N: usize> HotLabeledCounter<N> {
    pub const fn new(name: &'static str, label: &'static str, values: [&'static str; N]) -> Self {
        Self {
            name,
            label,
            values,
            handles: [const { OnceLock::new() }; N],
        }
    }

    pub fn increment(&self, value: &'static str, by: u64) {
        match self.values.iter().position(|known| *known == value) {
            Some(i) => self.handles[i]
                .get_or_init(|| metrics::counter!(self.name, self.label => value))
                .increment(by),
            None => metrics::counter!(self.name, self.label => value).increment(by),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    /// A metric as the recorder holds it: name, labels, value.
    type Counted = (String, Vec<(String, String)>, u64);

    /// Everything the recorder holds, sorted.
    fn counted(recorder: &DebuggingRecorder) -> Vec<Counted> {
        let mut counted: Vec<_> = recorder
            .snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| {
                let labels = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_string(), l.value().to_string()))
                    .collect();
                match value {
                    DebugValue::Counter(n) => Some((key.key().name().to_string(), labels, n)),
                    DebugValue::Gauge(g) => {
                        Some((key.key().name().to_string(), labels, g.into_inner() as u64))
                    }
                    DebugValue::Histogram(_) => None,
                }
            })
            .collect();
        counted.sort();
        counted
    }

    #[test]
    fn handles_count_as_the_macros_do() {
        let recorder = DebuggingRecorder::new();
        static PLAIN: HotCounter = HotCounter::new("plain_total");
        static IN_PROGRESS: HotGauge = HotGauge::new("in_progress");
        static KINDS: HotLabeledCounter<2> = HotLabeledCounter::new("kinds_total", "kind", ["a", "b"]);
        metrics::with_local_recorder(&recorder, || {
            PLAIN.increment(1);
            PLAIN.increment(2);
            IN_PROGRESS.increment(3.0);
            IN_PROGRESS.decrement(1.0);
            KINDS.increment("a", 1);
            KINDS.increment("a", 1);
            // Not one of the known values: counted all the same.
            KINDS.increment("c", 5);
        });
        let label = |v: &str| vec![("kind".to_string(), v.to_string())];
        assert_eq!(
            counted(&recorder),
            [
                ("in_progress".to_string(), vec![], 2),
                ("kinds_total".to_string(), label("a"), 2),
                // "b" was never counted, so it is not reported.
                ("kinds_total".to_string(), label("c"), 5),
                ("plain_total".to_string(), vec![], 3),
            ]
        );
    }
}
