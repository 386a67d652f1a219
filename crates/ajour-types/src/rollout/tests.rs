use super::*;
use crate::{events_between, FirmwareState, FirmwareStatus};
use serde_json::json;

fn spec(waves: serde_json::Value) -> RolloutSpec {
    serde_json::from_value(json!({"firmware": {"file": {"name": "app"}}, "waves": waves})).unwrap()
}

fn rollout(spec: RolloutSpec, progress: Progress) -> Rollout {
    Rollout {
        id: 1,
        app: "app".into(),
        spec,
        previous: None,
        progress,
        created_at: 0,
        updated_at: 0,
    }
}

fn member(wave: u32, phase: Phase) -> Member {
    Member {
        phase,
        ..Member::pending("d", wave)
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    match selector.split_once('=') {
        Some((k, v)) => labels.get(k).map(String::as_str) == Some(v),
        None => labels.contains_key(selector),
    }
}

#[test]
fn waves_take_selected_devices_then_shares_then_everyone_left() {
    let spec = spec(json!([{"selector": "ring=canary"}, {"percent": 25}, {"count": 3}, {"percent": 1}]));
    let canary = labels(&[("ring", "canary")]);
    let none = labels(&[]);
    let names: Vec<String> = (0..20).map(|i| format!("dev-{i}")).collect();
    let devices: Vec<Candidate> = names
        .iter()
        .enumerate()
        .map(|(i, name)| Candidate {
            name,
            labels: if i < 2 { &canary } else { &none },
        })
        .collect();
    let assigned = spec.assign(&devices, 7, selector_matches);
    let wave_of = |name: &str| assigned.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(assigned.len(), 20);
    assert_eq!((wave_of("dev-0"), wave_of("dev-1")), (0, 0));
    let in_wave = |w: u32| assigned.iter().filter(|(_, wave)| *wave == w).count();
    // 25% of 20, then 3, then the last wave takes the 10 left whatever its share says.
    assert_eq!([in_wave(0), in_wave(1), in_wave(2), in_wave(3)], [2, 5, 3, 10]);
    // Spread by the seed: the first share is not simply the first names, and another seed gives
    // another order; the same seed the same one (every instance agrees).
    let wave1 = |seed| {
        let mut names: Vec<String> = spec
            .assign(&devices, seed, selector_matches)
            .into_iter()
            .filter(|(_, w)| *w == 1)
            .map(|(n, _)| n)
            .collect();
        names.sort();
        names
    };
    assert_eq!(wave1(7), wave1(7));
    assert_ne!(wave1(7), wave1(8));
    assert_ne!(wave1(7), ["dev-2", "dev-3", "dev-4", "dev-5", "dev-6"]);
}

#[test]
fn specs_that_make_no_sense_are_refused_with_the_reason() {
    let ok = |_: &str| Ok(());
    assert!(spec(json!([{"percent": 10}, {"percent": 100}]))
        .validate(ok)
        .is_ok());
    for (waves, why) in [
        (json!([]), "1 to 20 waves"),
        (json!([{"percent": 10, "count": 3}]), "exactly one"),
        (json!([{"percent": 0}]), "above 0"),
        (json!([{"percent": 101}]), "at most 100"),
        (json!([{"count": 3, "successThreshold": 120}]), "successThreshold"),
    ] {
        let error = spec(waves).validate(ok).unwrap_err();
        assert!(error.0.contains(why), "{error}");
    }
    let mut bad_window = spec(json!([{"percent": 100}]));
    bad_window.maintenance_window = Some(MaintenanceWindow {
        start_hour: 3,
        end_hour: 3,
    });
    assert!(bad_window.validate(ok).is_err());
    let mut zero = spec(json!([{"percent": 100}]));
    zero.concurrency = Some(0);
    assert!(zero.validate(ok).is_err());
    assert!(serde_json::from_value::<RolloutSpec>(json!({"firmware": {}, "waves": [], "wavez": 1})).is_err());
}

#[test]
fn a_device_is_given_what_its_wave_and_the_rollout_state_allow() {
    let mut spec = spec(json!([{"percent": 10}, {"percent": 100}]));
    spec.concurrency = Some(2);
    spec.maintenance_window = Some(MaintenanceWindow {
        start_hour: 22,
        end_hour: 4,
    });
    let active = rollout(spec, Progress::new(0));
    let night = 23;
    // In the active wave, in the window, with room: it starts.
    assert_eq!(
        choose(&active, Some(&member(0, Phase::Pending)), true, 0, night),
        Choice::Start
    );
    // A later wave, outside the window, or no room: it keeps its previous firmware.
    assert_eq!(
        choose(&active, Some(&member(1, Phase::Pending)), true, 0, night),
        Choice::Previous
    );
    assert_eq!(
        choose(&active, Some(&member(0, Phase::Pending)), true, 0, 12),
        Choice::Previous
    );
    assert_eq!(
        choose(&active, Some(&member(0, Phase::Pending)), true, 2, night),
        Choice::Previous
    );
    // Started devices go on, also outside the window and over the limit.
    assert_eq!(
        choose(&active, Some(&member(0, Phase::Updating)), true, 5, 12),
        Choice::Rollout
    );
    // A newcomer matching the selector joins; one not matching is outside.
    assert_eq!(choose(&active, None, true, 0, night), Choice::Join);
    assert_eq!(choose(&active, None, false, 0, night), Choice::Outside);
    assert_eq!(
        choose(&active, Some(&member(0, Phase::Failed)), true, 0, night),
        Choice::Previous
    );

    let mut paused = active.clone();
    paused.progress.state = RolloutState::Paused;
    assert_eq!(
        choose(&paused, Some(&member(0, Phase::Updating)), true, 0, night),
        Choice::Wait
    );
    assert_eq!(
        choose(&paused, Some(&member(0, Phase::Pending)), true, 0, night),
        Choice::Previous
    );
    assert_eq!(
        choose(&paused, Some(&member(0, Phase::Succeeded)), true, 0, night),
        Choice::Rollout
    );

    let mut cancelled = active.clone();
    cancelled.progress.state = RolloutState::Cancelled;
    assert_eq!(
        choose(&cancelled, Some(&member(0, Phase::Updating)), true, 0, night),
        Choice::Previous
    );
    assert_eq!(
        choose(&cancelled, Some(&member(0, Phase::Swapping)), true, 0, night),
        Choice::Rollout
    );
    assert_eq!(
        choose(&cancelled, Some(&member(0, Phase::Succeeded)), true, 0, night),
        Choice::Rollout
    );
    assert_eq!(choose(&cancelled, None, true, 0, night), Choice::Outside);
}

#[test]
fn the_maintenance_window_wraps_over_midnight() {
    let night = MaintenanceWindow {
        start_hour: 22,
        end_hour: 4,
    };
    let day = MaintenanceWindow {
        start_hour: 9,
        end_hour: 17,
    };
    let hours = |w: MaintenanceWindow| (0..24).filter(|h| w.contains(*h)).collect::<Vec<_>>();
    assert_eq!(hours(night), [0, 1, 2, 3, 22, 23]);
    assert_eq!(hours(day), (9..17).collect::<Vec<_>>());
}

fn counts(pending: u32, updating: u32, succeeded: u32, failed: u32) -> WaveCounts {
    WaveCounts {
        pending,
        updating,
        succeeded,
        failed,
    }
}

#[test]
fn a_wave_halts_on_failures_succeeds_soaks_and_hands_over() {
    let mut spec = spec(json!([
        {"percent": 10, "soakSeconds": 60},
        {"percent": 50},
        {"percent": 100, "approval": "manual"}
    ]));
    spec.failure.max_failure_rate = Some(20.0);
    spec.failure.max_failures = Some(3);
    let mut r = rollout(spec, Progress::new(0));
    // Updating: nothing to do.
    assert_eq!(plan(&r, &[counts(5, 5, 0, 0)], 1000), None);
    // 2 of 10 failed: 20% halts.
    let halt = plan(&r, &[counts(0, 4, 4, 2)], 1000).unwrap();
    assert!(
        matches!(&halt, Step::Halt { reason } if reason.contains("2 of 10")),
        "{halt:?}"
    );
    // Resumed with those 2 forgiven: one more is not enough (1 of 10), three more count (3).
    r.progress.forgiven = 2;
    assert_eq!(plan(&r, &[counts(0, 4, 3, 3)], 1000), None);
    let mut count_limited = r.clone();
    count_limited.spec.failure.max_failure_rate = None;
    count_limited.progress.forgiven = 0;
    assert!(matches!(
        plan(&count_limited, &[counts(0, 0, 7, 3)], 0),
        Some(Step::Halt { .. })
    ));
    // 9 of 10 in sync (90%) succeeds the wave, then soaks 60 s, then the next starts.
    assert_eq!(plan(&r, &[counts(0, 0, 9, 1)], 1000), Some(Step::WaveSucceeded));
    r.progress = apply(&r.progress, &Step::WaveSucceeded, 1000);
    assert_eq!(plan(&r, &[counts(0, 0, 9, 1)], 60_999), None);
    assert_eq!(plan(&r, &[counts(0, 0, 9, 1)], 61_000), Some(Step::Advance));
    r.progress = apply(&r.progress, &Step::Advance, 61_000);
    assert_eq!(
        (r.progress.wave, r.progress.forgiven, r.progress.wave_succeeded_at),
        (1, 0, None)
    );
    // The third wave waits for an approval: no step, but awaiting.
    let c = [counts(0, 0, 9, 1), counts(0, 0, 40, 0), counts(50, 0, 0, 0)];
    r.progress = apply(&r.progress, &Step::WaveSucceeded, 62_000);
    assert_eq!(plan(&r, &c, 62_000), None);
    assert!(awaiting_approval(&r, 62_000));
    r.progress = apply(&r.progress, &Step::Advance, 63_000);
    assert!(!awaiting_approval(&r, 63_000));
    // An empty wave succeeds at once; the last one completes the rollout.
    assert_eq!(
        plan(&r, &[counts(0, 0, 0, 0); 3], 63_000),
        Some(Step::WaveSucceeded)
    );
    r.progress = apply(&r.progress, &Step::WaveSucceeded, 63_000);
    assert_eq!(plan(&r, &c, 63_000), Some(Step::Complete));
    r.progress = apply(&r.progress, &Step::Complete, 63_000);
    assert_eq!(r.progress.state, RolloutState::Completed);
    assert_eq!(plan(&r, &c, 63_000), None);
}

fn status(current: &str, state: FirmwareState) -> FirmwareStatus {
    FirmwareStatus {
        current: current.into(),
        target: "2.0.0".into(),
        target_digest: Some("d".into()),
        state,
    }
}

#[test]
fn a_devices_phase_follows_what_its_statuses_tell() {
    let updating = |p| status("1.0.0", FirmwareState::Updating { percent: p });
    let step = |phase, from: &FirmwareStatus, to: &FirmwareStatus| {
        phase_after(phase, Some("2.0.0"), &events_between(Some(from), to)).map(|(p, _)| p)
    };
    assert_eq!(
        step(Phase::Updating, &updating(40.0), &updating(100.0)),
        Some(Phase::Swapping)
    );
    let synced = status("2.0.0", FirmwareState::InSync);
    let synced = FirmwareStatus {
        target: "2.0.0".into(),
        ..synced
    };
    assert_eq!(
        step(Phase::Swapping, &updating(100.0), &synced),
        Some(Phase::Succeeded)
    );
    // Back on the old version holding nothing of the new one: the service records it failed.
    let rolled_back = status(
        "1.0.0",
        FirmwareState::Failed {
            reason: rolled_back_reason("2.0.0", "1.0.0"),
        },
    );
    let failed = phase_after(
        Phase::Swapping,
        Some("2.0.0"),
        &events_between(Some(&updating(100.0)), &rolled_back),
    )
    .unwrap();
    assert_eq!(failed.0, Phase::Failed);
    assert!(failed.1.unwrap().contains("rolled back"));
    // Another target's events, a pending or finished device: unchanged.
    assert_eq!(
        phase_after(
            Phase::Updating,
            Some("3.0.0"),
            &events_between(Some(&updating(40.0)), &updating(100.0))
        ),
        None
    );
    assert_eq!(step(Phase::Pending, &updating(40.0), &updating(100.0)), None);
    assert_eq!(step(Phase::Failed, &updating(100.0), &synced), None);
    assert_eq!(step(Phase::Updating, &updating(10.0), &updating(20.0)), None);
}

#[test]
fn specs_round_trip_with_their_defaults() {
    let spec = spec(json!([{"percent": 10}]));
    assert_eq!(spec.failure, FailurePolicy::default());
    assert_eq!(spec.waves[0].success_threshold, 90.0);
    let again: RolloutSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
    assert_eq!(again, spec);
}

#[test]
fn a_budget_holds_its_rate_and_lets_every_block_size_through() {
    // 1,000 bytes a second: a full second's worth at once, then 1 byte a millisecond.
    let mut budget = Budget::full(1000, 0);
    assert!(budget.take(1000, 600, 0));
    assert!(budget.take(1000, 400, 0));
    assert!(!budget.take(1000, 100, 0));
    assert!(!budget.take(1000, 100, 99));
    assert!(budget.take(1000, 100, 100));
    // Over 10 s of asking every 10 ms for 64 bytes, what passes is 10 s of the rate, plus the
    // first second's bucket, at most.
    let mut budget = Budget::full(1000, 0);
    let sent: u64 = (0..1000).filter(|t| budget.take(1000, 64, t * 10)).count() as u64 * 64;
    assert!((10_000..=11_000).contains(&sent), "{sent}");
    // A block larger than a second's worth goes when the bucket is full, then waits out its debt.
    let mut budget = Budget::full(1000, 0);
    assert!(budget.take(1000, 4000, 0));
    assert!(!budget.take(1000, 4000, 3999));
    assert!(budget.take(1000, 4000, 4000));
    // Time going back (another clock) takes nothing and gives nothing.
    assert!(!budget.take(1000, 1, 3000));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn wave() -> impl Strategy<Value = WaveSpec> {
        let devices = prop_oneof![
            (0.0f64..150.0).prop_map(|p| (Some(p), None, None)),
            (0u32..40).prop_map(|c| (None, Some(c), None)),
            prop_oneof![Just("ring=canary"), Just("ring=late"), Just("x")].prop_map(|s| (
                None,
                None,
                Some(s.to_string())
            )),
        ];
        (devices, 0u64..100, 0.0f64..120.0, any::<bool>()).prop_map(
            |((percent, count, selector), soak_seconds, success_threshold, manual)| WaveSpec {
                percent,
                count,
                selector,
                soak_seconds,
                success_threshold,
                approval: if manual { Approval::Manual } else { Approval::Auto },
            },
        )
    }

    proptest! {
        /// Whatever spec validates, every device is in exactly one wave, a share wave takes no
        /// more than its share, and planning over any counts never panics nor skips a wave.
        #[test]
        fn every_device_is_in_exactly_one_wave_and_plans_move_one_wave_at_a_time(
            waves in proptest::collection::vec(wave(), 0..6),
            devices in 0usize..60,
            seed in any::<u64>(),
            counts in proptest::collection::vec((0u32..20, 0u32..20, 0u32..20, 0u32..20), 6),
            now in 0i64..1_000_000_000,
        ) {
            let spec = RolloutSpec {
                waves,
                ..spec(json!([]))
            };
            prop_assume!(spec.validate(|_| Ok(())).is_ok());
            let names: Vec<String> = (0..devices).map(|i| format!("d{i}")).collect();
            let canary = labels(&[("ring", "canary")]);
            let none = labels(&[]);
            let candidates: Vec<Candidate> = names
                .iter()
                .enumerate()
                .map(|(i, name)| Candidate { name, labels: if i % 3 == 0 { &canary } else { &none } })
                .collect();
            let assigned = spec.assign(&candidates, seed, selector_matches);
            prop_assert_eq!(assigned.len(), devices);
            let mut seen: Vec<&str> = assigned.iter().map(|(n, _)| n.as_str()).collect();
            seen.sort();
            seen.dedup();
            prop_assert_eq!(seen.len(), devices);
            for (n, wave) in spec.waves.iter().enumerate().take(spec.waves.len() - 1) {
                let taken = assigned.iter().filter(|(_, w)| *w as usize == n).count();
                if let Some(count) = wave.count {
                    prop_assert!(taken <= count as usize);
                }
                if let Some(percent) = wave.percent {
                    prop_assert!(taken <= (percent * devices as f64 / 100.0).ceil() as usize);
                }
            }
            let counts: Vec<WaveCounts> = counts
                .into_iter()
                .map(|(pending, updating, succeeded, failed)| WaveCounts { pending, updating, succeeded, failed })
                .collect();
            let mut progress = Progress::new(0);
            for wave in 0..spec.waves.len() as u32 {
                progress.wave = wave;
                let r = rollout(spec.clone(), progress.clone());
                if let Some(step) = plan(&r, &counts, now) {
                    let next = apply(&progress, &step, now);
                    prop_assert!(next.wave == progress.wave || next.wave == progress.wave + 1);
                    prop_assert!((next.wave as usize) < spec.waves.len());
                }
                progress.wave_succeeded_at = Some(now / 2);
            }
        }
    }
}
