//! Log lines that a failing dependency would otherwise repeat for every request: during a
//! database outage every device's status fails the same way, and a hundred identical warnings a
//! second bury what an operator needs to see. One line per interval per call site goes out, with
//! how many were held back since.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// At most one line per `interval`; the others are counted.
pub struct LogThrottle {
    interval: Duration,
    /// Milliseconds since `epoch()` when a line last went out (0: never).
    last: AtomicU64,
    held_back: AtomicU64,
}

/// The moment the throttles count from (the first use in the process).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogThrottle {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may go out now, `n` the lines held back since the last one; `None`
    /// when this one is held back.
    pub fn allow(&self) -> Option<u64> {
        // +1 so that 0 stays "never", even in the process's first millisecond.
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!` at most once per interval at this call site, saying how many were held back.
#[macro_export]
macro_rules! warn_throttled {
    ($interval:expr, $($arg:tt)+) => {{
        static THROTTLE: $crate::throttle::LogThrottle = $crate::throttle::LogThrottle::new($interval);
        if let Some(held_back) = THROTTLE.allow() {
            tracing::warn!(held_back, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let throttle = LogThrottle::new(Duration::from_secs(3600));
        assert_eq!(throttle.allow(), Some(0));
        for _ in 0..99 {
            assert_eq!(throttle.allow(), None);
        }
        assert_eq!(throttle.held_back.load(Ordering::Relaxed), 99);
        let open = LogThrottle::new(Duration::ZERO);
        assert_eq!(open.allow(), Some(0));
        assert_eq!(open.allow(), Some(0));
    }
}
