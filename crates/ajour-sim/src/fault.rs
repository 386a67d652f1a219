//! Faults a simulated device can play, and which devices of a fleet play them: to rehearse what
//! the server does with devices that fail an update (a staged rollout halting on them, a device
//! marked failed), failing devices are needed on purpose, not only by accident.

use anyhow::{bail, ensure};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;

/// A way a device fails its update, played on purpose. A played fault ends the device with an
/// [`Outcome`](crate::Outcome) of its own, not an error: the device did what it was set to. The
/// device still checks what it is sent: a Swap whose checksum is not of the bytes it received
/// fails it, fault or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// At the Swap the device reboots, but its bootloader rolls the update back: it still runs
    /// its start version, holds no update (`update: None`), and reports that status again. Once
    /// that status is answered (whatever the answer) it ends,
    /// [`Outcome::RolledBack`](crate::Outcome::RolledBack).
    RollBack,
    /// At the Swap the device goes quiet for good: it sends nothing more and ends at once,
    /// [`Outcome::Silent`](crate::Outcome::Silent).
    Silent,
    /// Part-way through the download the device goes quiet for good: once it holds at least `at`
    /// bytes after a Write, it sends nothing more and ends,
    /// [`Outcome::Stalled`](crate::Outcome::Stalled). A device learns the image's size only at
    /// the Swap, so where half the image is must be told: `at` is typically half its size. Sent
    /// the Swap before it holds `at` bytes (the image is smaller than it was told), the device
    /// fails.
    Stall { at: u32 },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::RollBack => "rollback",
            Fault::Silent => "silent",
            Fault::Stall { .. } => "stall",
        })
    }
}

/// Float sums of percentages that should make 100 (33.3 + 33.3 + 33.4) may exceed it by a hair.
const SHARE_TOLERANCE: f64 = 1e-9;

/// Which of `devices` play which fault: `shares` gives, in order, each fault and the percentage
/// of the devices that play it (0 to 100, adding up to at most 100; anything else is refused).
///
/// The choice is deterministic and spread over the fleet, not the first names: the devices are
/// ordered by the SHA-256 of their name, the first fault goes to the first `round(share% ×
/// count)` of that order, the next fault to the devices after them, and so on. Boundaries are
/// rounded on the running total of the shares, so the devices given faults never outnumber the
/// fleet and each fault's count is within one of its share. The same names and shares always
/// give the same devices, whatever order the names come in.
pub fn assign_faults(devices: &[String], shares: &[(Fault, f64)]) -> anyhow::Result<HashMap<String, Fault>> {
    for (fault, share) in shares {
        ensure!(
            share.is_finite() && (0.0..=100.0).contains(share),
            "the share of devices playing {fault} must be a percentage from 0 to 100, not {share}"
        );
    }
    let total: f64 = shares.iter().map(|(_, share)| share).sum();
    if total > 100.0 + SHARE_TOLERANCE {
        bail!("the shares of failing devices add up to {total}%, more than 100%");
    }
    let mut order: Vec<(_, &String)> = devices
        .iter()
        .map(|name| (Sha256::digest(name.as_bytes()), name))
        .collect();
    order.sort();
    let count = order.len();
    let mut faults = HashMap::new();
    let (mut cumulative, mut start) = (0.0, 0);
    for (fault, share) in shares {
        cumulative += share;
        let end = ((cumulative / 100.0 * count as f64).round() as usize).clamp(start, count);
        for (_, name) in &order[start..end] {
            faults.insert((*name).clone(), *fault);
        }
        start = end;
    }
    Ok(faults)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("dev-{i}")).collect()
    }

    fn count_of(faults: &HashMap<String, Fault>, fault: Fault) -> usize {
        faults.values().filter(|f| **f == fault).count()
    }

    const STALL: Fault = Fault::Stall { at: 512 };

    #[test]
    fn each_fault_gets_its_share_of_the_devices() {
        let devices = names(1000);
        let faults = assign_faults(
            &devices,
            &[(Fault::RollBack, 10.0), (Fault::Silent, 5.0), (STALL, 2.5)],
        )
        .unwrap();
        assert_eq!(count_of(&faults, Fault::RollBack), 100);
        assert_eq!(count_of(&faults, Fault::Silent), 50);
        assert_eq!(count_of(&faults, STALL), 25);
        assert_eq!(faults.len(), 175);
        assert!(faults.keys().all(|name| devices.contains(name)));
    }

    #[test]
    fn shares_are_rounded_on_their_running_total_never_past_the_fleet() {
        // 1.5 + 1.5 devices: rounding each share on its own would give 2 + 2 of 3 devices.
        let faults = assign_faults(&names(3), &[(Fault::RollBack, 50.0), (Fault::Silent, 50.0)]).unwrap();
        assert_eq!(count_of(&faults, Fault::RollBack), 2);
        assert_eq!(count_of(&faults, Fault::Silent), 1);
        // Shares making 100 in floats that add up to a hair more.
        let faults = assign_faults(
            &names(10),
            &[(Fault::RollBack, 33.3), (Fault::Silent, 33.3), (STALL, 33.4)],
        )
        .unwrap();
        assert_eq!(faults.len(), 10, "every device plays a fault");
        assert_eq!(
            [Fault::RollBack, Fault::Silent, STALL].map(|fault| count_of(&faults, fault)),
            [3, 4, 3]
        );
        assert!(assign_faults(&names(0), &[(Fault::RollBack, 50.0)])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_failing_devices_are_spread_over_the_fleet_and_the_same_every_time() {
        let devices = names(100);
        let shares = [(Fault::RollBack, 10.0), (Fault::Silent, 10.0)];
        let faults = assign_faults(&devices, &shares).unwrap();
        // Not the first names: faulty devices among the first and the last half of the names.
        let faulty = |range: std::ops::Range<usize>| {
            devices[range]
                .iter()
                .filter(|name| faults.contains_key(*name))
                .count()
        };
        let (first_half, second_half) = (faulty(0..50), faulty(50..100));
        assert_eq!(first_half + second_half, 20);
        assert!(
            first_half >= 3 && second_half >= 3,
            "{first_half} + {second_half}: {faults:?}"
        );
        // Deterministic, whatever order the names come in.
        let mut reversed = devices.clone();
        reversed.reverse();
        assert_eq!(assign_faults(&reversed, &shares).unwrap(), faults);
        // A device keeps its fault when the shares grow: the order is the names' own.
        let more = assign_faults(&devices, &[(Fault::RollBack, 20.0)]).unwrap();
        for (name, fault) in &faults {
            if *fault == Fault::RollBack {
                assert_eq!(more.get(name), Some(&Fault::RollBack), "{name}");
            }
        }
    }

    #[test]
    fn shares_past_100_or_not_percentages_are_refused() {
        let devices = names(10);
        let error = assign_faults(
            &devices,
            &[(Fault::RollBack, 50.0), (Fault::Silent, 40.0), (STALL, 20.0)],
        )
        .unwrap_err();
        assert!(error.to_string().contains("110"), "{error}");
        for share in [-1.0, 100.5, f64::NAN, f64::INFINITY] {
            let error = assign_faults(&devices, &[(Fault::Silent, share)]).unwrap_err();
            assert!(error.to_string().contains("silent"), "{share}: {error}");
        }
        assert_eq!(
            assign_faults(&devices, &[(Fault::Silent, 100.0)]).unwrap().len(),
            10
        );
    }
}
