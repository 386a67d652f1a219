//! Simulated devices against the decision rule itself: `ajour_engine::decide` behind in-memory
//! links, so every property of an update (exactly the image, checksum verified, resumed where the
//! device left off) is checked for any image, block sizes and starting point, with no server.
//! Time is paused: waits and backoffs run to their end at once.

use ajour_engine::{decide, EngineConfig, FirmwareImage, Target};
use ajour_protocol::{decode_status, encode_command, Command, Status};
use ajour_sim::{
    assign_faults, run_device, run_fleet, simulate_over, DeviceOptions, EncodedStatus, Ended, Fault,
    FleetOptions, Link, LinkError, Observer, Outcome, SimulatedDevice, Simulation, StatusEncoding, Step,
    Transport,
};
use bytes::Bytes;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const FROM: &str = "0.0.1";
const TO: &str = "9.9.9";

/// The server as a pure function: `decide` on one image. It records what it decided, can give
/// each status another block size (as devices that change their mtu), can lose answers, and
/// fails the device past a number of round trips, so that a loop is a failure, not a hang.
struct EngineLink {
    image: Arc<FirmwareImage>,
    config: EngineConfig,
    /// Block sizes the statuses ask for in turn (empty: as the device says).
    mtus: Vec<Option<u32>>,
    /// Whether each answer in turn is lost (empty: none is).
    losses: Vec<bool>,
    max_exchanges: usize,
    exchanges: usize,
    decisions: Vec<ajour_engine::Outcome>,
    correlation_ids: Vec<Option<u32>>,
    /// The image is not there for the first statuses: they are told to wait.
    unavailable_for: usize,
    /// The first statuses are answered for this image instead, the target of an earlier wave of
    /// a rollout: (how many statuses, the image).
    earlier: Option<(usize, Arc<FirmwareImage>)>,
    /// Every status received, as decoded.
    statuses: Vec<Status>,
}

impl EngineLink {
    fn new(image: Arc<FirmwareImage>) -> Self {
        let max_exchanges = image.size() as usize + 10;
        Self {
            image,
            config: EngineConfig::default(),
            mtus: Vec::new(),
            losses: Vec::new(),
            max_exchanges,
            exchanges: 0,
            decisions: Vec::new(),
            correlation_ids: Vec::new(),
            unavailable_for: 0,
            earlier: None,
            statuses: Vec::new(),
        }
    }
}

impl Link for EngineLink {
    fn answers_can_be_lost(&self) -> bool {
        !self.losses.is_empty()
    }

    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        let turn = self.exchanges;
        self.exchanges += 1;
        if self.exchanges > self.max_exchanges {
            return Err(LinkError::Protocol(format!(
                "more than {} round trips",
                self.max_exchanges
            )));
        }
        let mut decoded = decode_status(&status.bytes).map_err(|e| LinkError::Protocol(e.to_string()))?;
        assert_eq!(
            decoded.correlation_id, status.correlation_id,
            "the status carries its id"
        );
        self.correlation_ids.push(decoded.correlation_id);
        if !self.mtus.is_empty() {
            decoded.mtu = self.mtus[turn % self.mtus.len()];
        }
        self.statuses.push(decoded.clone());
        let target = match &self.earlier {
            Some((statuses, earlier)) if turn < *statuses => Target::Ready(earlier),
            _ if turn < self.unavailable_for => Target::Unavailable,
            _ => Target::Ready(&self.image),
        };
        let decision = decide(&decoded, target, &self.config);
        assert_eq!(decision.command.correlation_id(), decoded.correlation_id);
        if let Command::Write { data, .. } = decision.command {
            assert!(
                data.len() as u32 <= self.config.block_size(decoded.mtu),
                "a block no larger than the device asked for"
            );
        }
        self.decisions.push(decision.outcome);
        if !self.losses.is_empty() && self.losses[turn % self.losses.len()] {
            return Err(LinkError::NoAnswer);
        }
        Ok(Bytes::from(encode_command(&decision.command)))
    }
}

fn options() -> DeviceOptions {
    DeviceOptions::new(
        StatusEncoding::Packed,
        Duration::from_secs(5),
        Duration::from_secs(300),
    )
}

/// Devices with a target version: they end on it, or not updated at their timeout.
fn options_with_target(target: &str, timeout: Duration) -> DeviceOptions {
    DeviceOptions {
        target: Some(target.into()),
        ..DeviceOptions::new(StatusEncoding::Packed, Duration::from_secs(5), timeout)
    }
}

fn image(len: usize) -> Arc<FirmwareImage> {
    image_of(TO, len)
}

fn image_of(version: &str, len: usize) -> Arc<FirmwareImage> {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    Arc::new(FirmwareImage::new(version, data).unwrap())
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Where a device starts: fresh, or rebooted part-way through an update.
#[derive(Debug, Clone)]
enum Start {
    Fresh,
    /// Holding the first bytes of the target image, any number of them (all of them too).
    Prefix(prop::sample::Index),
    /// Holding bytes of another version.
    OtherVersion(Vec<u8>),
    /// Reporting more bytes of the target version than the image has.
    PastTheEnd(Vec<u8>),
}

fn start() -> impl Strategy<Value = Start> {
    prop_oneof![
        Just(Start::Fresh),
        any::<prop::sample::Index>().prop_map(Start::Prefix),
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(Start::OtherVersion),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Start::PastTheEnd),
    ]
}

proptest! {
    /// Whatever the image, block sizes and lost answers, and wherever the device starts, it ends
    /// running the target version holding exactly the image (its checksum verified by the
    /// device at the Swap), having resumed where it left off when what it held was a prefix of
    /// the image, and from the start otherwise.
    #[test]
    fn device_following_commands_ends_with_exactly_the_image_from_any_starting_point(
        data in proptest::collection::vec(any::<u8>(), 1..5000),
        mtus in proptest::collection::vec(proptest::option::of(0u32..3000), 1..8),
        max_mtu in 1u32..2048,
        losses in proptest::collection::vec(any::<bool>(), 0..4),
        start in start(),
    ) {
        let image = Arc::new(FirmwareImage::new(TO, data.clone()).unwrap());
        let len = data.len();
        let (mut device, resumed_at) = match &start {
            Start::Fresh => (SimulatedDevice::new(FROM, None), None),
            Start::Prefix(index) => {
                let held = index.index(len + 1);
                (SimulatedDevice::resuming(FROM, None, TO, data[..held].to_vec()), Some(held))
            }
            Start::OtherVersion(bytes) => (SimulatedDevice::resuming(FROM, None, "1.2.3", bytes.clone()), None),
            Start::PastTheEnd(extra) => {
                let held = [data.as_slice(), extra].concat();
                (SimulatedDevice::resuming(FROM, None, TO, held), None)
            }
        };
        let mut link = EngineLink::new(image);
        link.config.max_mtu = max_mtu;
        link.mtus = mtus;
        // Never lose every answer: some get through.
        let losses = if losses.iter().all(|lost| *lost) { Vec::new() } else { losses };
        // 2 × (len + 10) answers that get through, whatever the losses: the pattern repeats, so
        // each `delivered` answers of it cost `losses.len()` round trips (with 1-byte blocks and
        // two answers lost in three, the old bound of 2 × (len + 10) round trips in all was too
        // few for an update the rule does right).
        let delivered = losses.iter().filter(|lost| !**lost).count();
        link.max_exchanges = match delivered {
            0 => 2 * (len + 10),
            delivered => (2 * (len + 10)).div_ceil(delivered) * losses.len(),
        };
        link.losses = losses;
        let ended = paused_runtime()
            .block_on(run_device(&mut device, &mut link, &options(), &mut ()))
            .unwrap();
        prop_assert_eq!(ended, Ended::Done(Outcome::Updated { from: FROM.into(), to: TO.into(), bytes: len }));
        prop_assert_eq!(device.written(), data.as_slice());
        prop_assert_eq!(device.version(), TO);
        let first = link.decisions[0];
        match resumed_at {
            Some(held) if held == len => prop_assert_eq!(first, ajour_engine::Outcome::Swapping),
            Some(held) => prop_assert!(
                matches!(first, ajour_engine::Outcome::Writing { offset, .. } if offset as usize == held),
                "resumed at {held}: {first:?}"
            ),
            None => prop_assert!(
                matches!(first, ajour_engine::Outcome::Writing { offset: 0, .. }),
                "started over: {first:?}"
            ),
        }
        // Each status that got an answer through carried an id of its own.
        if link.answers_can_be_lost() {
            let ids: HashSet<_> = link.correlation_ids.iter().collect();
            prop_assert_eq!(ids.len(), link.correlation_ids.len());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_device_on_the_target_version_is_in_sync_in_one_round_trip() {
    let mut link = EngineLink::new(image(1000));
    let mut device = SimulatedDevice::new(TO, Some(256));
    let ended = run_device(&mut device, &mut link, &options(), &mut ())
        .await
        .unwrap();
    assert_eq!(ended, Ended::Done(Outcome::InSync { version: TO.into() }));
    assert_eq!(link.exchanges, 1);
}

#[tokio::test(start_paused = true)]
async fn a_device_resuming_with_bytes_not_of_the_image_refuses_the_swap() {
    let image = image(1000);
    let mut held = image.data()[..600].to_vec();
    held[17] ^= 0xff;
    let mut device = SimulatedDevice::resuming(FROM, Some(256), TO, held);
    let mut link = EngineLink::new(image);
    let error = run_device(&mut device, &mut link, &options(), &mut ())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("Swap checksum"), "{error:#}");
    assert_eq!(device.version(), FROM, "not installed");
}

#[tokio::test(start_paused = true)]
async fn wait_is_honoured_up_to_the_longest_wait() {
    let mut link = EngineLink::new(image(1000));
    link.config.wait_poll = 3600;
    link.unavailable_for = 2;
    let mut device = SimulatedDevice::new(FROM, Some(512));
    let started = Instant::now();
    let ended = run_device(&mut device, &mut link, &options(), &mut ())
        .await
        .unwrap();
    assert!(
        matches!(ended, Ended::Done(Outcome::Updated { bytes: 1000, .. })),
        "{ended:?}"
    );
    // Two waits of at most 5 s each, not of an hour.
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}

/// What the device loop reported.
#[derive(Default)]
struct Counts {
    latencies: usize,
    unanswered: usize,
    connection_errors: Vec<String>,
    stop_after: Option<usize>,
}

impl Observer for Counts {
    fn answered(&mut self, _latency: Duration, _step: &Step) -> anyhow::Result<ControlFlow<()>> {
        self.latencies += 1;
        Ok(match self.stop_after {
            Some(n) if self.latencies >= n => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        })
    }

    fn unanswered(&mut self) {
        self.unanswered += 1;
    }

    fn connection_lost(&mut self, error: &str) {
        self.connection_errors.push(error.to_string());
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_answer_is_asked_for_again_under_a_fresh_correlation_id() {
    let mut link = EngineLink::new(image(2048));
    link.losses = vec![false, true, true];
    let mut device = SimulatedDevice::new(FROM, Some(512));
    let mut counts = Counts::default();
    let ended = run_device(&mut device, &mut link, &options(), &mut counts)
        .await
        .unwrap();
    assert!(matches!(ended, Ended::Done(Outcome::Updated { bytes: 2048, .. })));
    // 4 Writes, a Swap and a Sync got through; two statuses were lost between each two.
    assert_eq!(counts.latencies, 6);
    assert_eq!(counts.unanswered, 10);
    assert_eq!(link.exchanges, 16);
    let ids: HashSet<_> = link.correlation_ids.iter().collect();
    assert_eq!(ids.len(), 16, "{:?}", link.correlation_ids);
    assert!(link.correlation_ids.iter().all(Option::is_some));
}

/// A link that cannot reach the server for its first `failures` statuses, then is `inner`.
struct Unreachable<L> {
    failures: usize,
    inner: L,
}

impl<L: Link> Link for Unreachable<L> {
    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        if self.failures > 0 {
            self.failures -= 1;
            return Err(LinkError::Connection("connection refused".into()));
        }
        self.inner.exchange(status).await
    }
}

#[tokio::test(start_paused = true)]
async fn connection_errors_are_retried_with_a_growing_backoff() {
    let mut link = Unreachable {
        failures: 4,
        inner: EngineLink::new(image(512)),
    };
    let mut device = SimulatedDevice::new(FROM, Some(512));
    let mut counts = Counts::default();
    let started = Instant::now();
    let ended = run_device(&mut device, &mut link, &options(), &mut counts)
        .await
        .unwrap();
    assert!(matches!(ended, Ended::Done(Outcome::Updated { .. })));
    assert_eq!(counts.connection_errors.len(), 4);
    assert_eq!(started.elapsed(), Duration::from_millis(100 + 200 + 400 + 800));
}

#[tokio::test(start_paused = true)]
async fn a_server_away_past_the_timeout_fails_the_device_with_the_connection_error() {
    let mut link = Unreachable {
        failures: usize::MAX,
        inner: EngineLink::new(image(512)),
    };
    let mut device = SimulatedDevice::new(FROM, Some(512));
    let started = Instant::now();
    let error = run_device(&mut device, &mut link, &options(), &mut ())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("connection refused"), "{error:#}");
    assert!(started.elapsed() <= Duration::from_secs(300));
    assert!(
        started.elapsed() > Duration::from_secs(290),
        "{:?}",
        started.elapsed()
    );
}

/// A server that refuses the device.
struct Refusing {
    exchanges: usize,
}

impl Link for Refusing {
    async fn exchange(&mut self, _status: EncodedStatus) -> Result<Bytes, LinkError> {
        self.exchanges += 1;
        Err(LinkError::Protocol("authentication refused (403)".into()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_refusal_fails_the_device_at_once() {
    let mut link = Refusing { exchanges: 0 };
    let mut device = SimulatedDevice::new(FROM, None);
    let error = run_device(&mut device, &mut link, &options(), &mut ())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("403"), "{error:#}");
    assert_eq!(link.exchanges, 1);
}

#[tokio::test(start_paused = true)]
async fn an_observer_can_stop_a_device_part_way() {
    let mut link = EngineLink::new(image(4096));
    let mut device = SimulatedDevice::new(FROM, Some(512));
    let mut counts = Counts {
        stop_after: Some(3),
        ..Counts::default()
    };
    let ended = run_device(&mut device, &mut link, &options(), &mut counts)
        .await
        .unwrap();
    assert_eq!(ended, Ended::Stopped);
    assert_eq!(device.written().len(), 3 * 512);
}

#[tokio::test(start_paused = true)]
async fn a_fleet_runs_every_device_once_at_most_concurrency_at_a_time() {
    let image = image(3000);
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let names: Vec<String> = (0..20).map(|i| format!("dev-{i}")).collect();
    let fleet = FleetOptions {
        concurrency: 3,
        progress: "devices".into(),
    };
    let started = Instant::now();
    let results = run_fleet(names, &fleet, |name| {
        let (image, running, most) = (image.clone(), running.clone(), most.clone());
        async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            // dev-7 rebooted holding a block that is not the image's: it must fail, alone.
            let mut device = if name == "dev-7" {
                SimulatedDevice::resuming(FROM, Some(512), TO, vec![0xa5; 1024])
            } else {
                SimulatedDevice::new(FROM, Some(512))
            };
            let ended = run_device(&mut device, &mut EngineLink::new(image), &options(), &mut ()).await;
            // Each device takes a second of (paused) time, so that turns overlap.
            tokio::time::sleep(Duration::from_secs(1)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            ended
        }
    })
    .await
    .unwrap();
    assert_eq!(most.load(Ordering::SeqCst), 3);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(7),
        "20 devices, 3 at a time"
    );
    let names: HashSet<_> = results.iter().map(|(name, _)| name.clone()).collect();
    assert_eq!((results.len(), names.len()), (20, 20));
    for (name, result) in &results {
        match result {
            Err(error) if name == "dev-7" => {
                assert!(error.to_string().contains("Swap checksum"), "{error:#}")
            }
            Ok(Ended::Done(Outcome::Updated { bytes: 3000, .. })) if name != "dev-7" => {}
            other => panic!("{name}: {other:?}"),
        }
    }
}

fn writing(offset: u32, len: u32, size: u32) -> ajour_engine::Outcome {
    ajour_engine::Outcome::Writing { offset, len, size }
}

#[tokio::test(start_paused = true)]
async fn a_device_that_rolls_back_reports_its_old_version_after_the_swap_and_ends_rolled_back() {
    let mut link = EngineLink::new(image(1000));
    let mut device = SimulatedDevice::new(FROM, Some(256)).with_fault(Fault::RollBack);
    let ended = run_device(&mut device, &mut link, &options(), &mut ())
        .await
        .unwrap();
    assert_eq!(
        ended,
        Ended::Done(Outcome::RolledBack {
            version: FROM.into(),
            to: TO.into()
        })
    );
    // The whole image and its Swap, then the status after the rollback, which the engine answers
    // with the update from the start.
    assert_eq!(
        link.decisions,
        [
            writing(0, 256, 1000),
            writing(256, 256, 1000),
            writing(512, 256, 1000),
            writing(768, 232, 1000),
            ajour_engine::Outcome::Swapping,
            writing(0, 256, 1000),
        ]
    );
    let after = link.statuses.last().unwrap();
    assert_eq!(
        (after.version.as_slice(), &after.update),
        (FROM.as_bytes(), &None)
    );
    assert_eq!(device.version(), FROM);
}

#[tokio::test(start_paused = true)]
async fn a_silent_device_sends_nothing_after_the_swap() {
    let mut link = EngineLink::new(image(1000));
    let mut device = SimulatedDevice::new(FROM, Some(256)).with_fault(Fault::Silent);
    let ended = run_device(&mut device, &mut link, &options(), &mut ())
        .await
        .unwrap();
    assert_eq!(ended, Ended::Done(Outcome::Silent { to: TO.into() }));
    assert_eq!(link.exchanges, 5, "4 Writes and the Swap: {:?}", link.decisions);
    assert_eq!(link.decisions.last(), Some(&ajour_engine::Outcome::Swapping));
}

#[tokio::test(start_paused = true)]
async fn a_stalling_device_sends_nothing_once_it_holds_half_the_image() {
    let mut link = EngineLink::new(image(1000));
    let mut device = SimulatedDevice::new(FROM, Some(256)).with_fault(Fault::Stall { at: 500 });
    let ended = run_device(&mut device, &mut link, &options(), &mut ())
        .await
        .unwrap();
    assert_eq!(
        ended,
        Ended::Done(Outcome::Stalled {
            to: TO.into(),
            offset: 512
        })
    );
    assert_eq!(link.decisions, [writing(0, 256, 1000), writing(256, 256, 1000)]);
    assert_eq!(device.written(), &image(1000).data()[..512]);
}

#[tokio::test(start_paused = true)]
async fn with_a_target_a_device_in_sync_on_another_version_waits_its_turn_and_ends_not_updated() {
    let mut link = EngineLink::new(image_of(FROM, 1000));
    link.config.sync_poll = Some(3600);
    let mut device = SimulatedDevice::new(FROM, Some(256));
    // Without a target, a Sync on any version ends the device.
    let ended = run_device(&mut device, &mut link, &options(), &mut ())
        .await
        .unwrap();
    assert_eq!(ended, Ended::Done(Outcome::InSync { version: FROM.into() }));
    assert_eq!(link.exchanges, 1);

    let mut link = EngineLink::new(image_of(FROM, 1000));
    link.config.sync_poll = Some(3600);
    let mut counts = Counts::default();
    let started = Instant::now();
    let options = options_with_target(TO, Duration::from_secs(60));
    let ended = run_device(&mut device, &mut link, &options, &mut counts)
        .await
        .unwrap();
    assert_eq!(ended, Ended::Done(Outcome::NotUpdated { version: FROM.into() }));
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    // Statuses at 0, 5, .. 55 s: the Sync's poll of an hour honoured for at most 5 s.
    assert_eq!((link.exchanges, counts.latencies), (12, 12));
}

#[tokio::test(start_paused = true)]
async fn with_a_target_a_device_updates_when_its_turn_comes() {
    let mut link = EngineLink::new(image(1000));
    link.earlier = Some((3, image_of(FROM, 1000)));
    link.config.sync_poll = Some(2);
    let mut device = SimulatedDevice::new(FROM, Some(256));
    let started = Instant::now();
    let options = options_with_target(TO, Duration::from_secs(300));
    let ended = run_device(&mut device, &mut link, &options, &mut ())
        .await
        .unwrap();
    assert_eq!(
        ended,
        Ended::Done(Outcome::Updated {
            from: FROM.into(),
            to: TO.into(),
            bytes: 1000
        })
    );
    // Three Syncs on the version it ran, 2 s apart; then 4 Writes, the Swap and the Sync.
    assert_eq!(started.elapsed(), Duration::from_secs(6));
    assert_eq!(link.exchanges, 3 + 6);
}

#[tokio::test(start_paused = true)]
async fn with_a_target_a_device_updated_to_another_version_waits_for_the_target() {
    let mut link = EngineLink::new(image(1000));
    let mut device = SimulatedDevice::new(FROM, Some(512));
    let options = options_with_target("10.0.0", Duration::from_secs(30));
    let ended = run_device(&mut device, &mut link, &options, &mut ())
        .await
        .unwrap();
    assert_eq!(ended, Ended::Done(Outcome::NotUpdated { version: TO.into() }));
    // 2 Writes and the Swap, then a status a second (no poll given) for 30 s.
    assert_eq!(link.exchanges, 3 + 30);
}

#[tokio::test(start_paused = true)]
async fn with_a_target_a_device_told_to_wait_ends_not_updated_and_without_one_fails() {
    let waiting = || {
        let mut link = EngineLink::new(image(1000));
        link.unavailable_for = usize::MAX;
        link
    };
    let mut device = SimulatedDevice::new(FROM, Some(256));
    let options = options_with_target(TO, Duration::from_secs(60));
    let ended = run_device(&mut device, &mut waiting(), &options, &mut ())
        .await
        .unwrap();
    assert_eq!(ended, Ended::Done(Outcome::NotUpdated { version: FROM.into() }));

    let options = DeviceOptions::new(
        StatusEncoding::Packed,
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let error = run_device(&mut device, &mut waiting(), &options, &mut ())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("no Sync within"), "{error:#}");
}

/// A link whose every round trip takes `latency`.
struct Slow<L> {
    latency: Duration,
    inner: L,
}

impl<L: Link> Link for Slow<L> {
    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        tokio::time::sleep(self.latency).await;
        self.inner.exchange(status).await
    }
}

#[tokio::test(start_paused = true)]
async fn with_a_target_a_device_mid_download_at_the_timeout_fails() {
    let mut link = Slow {
        latency: Duration::from_secs(1),
        inner: EngineLink::new(image(4096)),
    };
    let mut device = SimulatedDevice::new(FROM, Some(256));
    let options = options_with_target(TO, Duration::from_millis(5500));
    let error = run_device(&mut device, &mut link, &options, &mut ())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("no Sync within"), "{error:#}");
    assert_eq!(device.written().len(), 5 * 256, "cut off in its sixth round trip");
}

#[tokio::test(start_paused = true)]
async fn a_simulation_plays_the_faults_of_its_devices_and_leaves_a_later_wave_not_updated() {
    let names: Vec<String> = (0..40).map(|i| format!("sim-{i}")).collect();
    let faults = assign_faults(
        &names,
        &[
            (Fault::RollBack, 10.0),
            (Fault::Silent, 10.0),
            (Fault::Stall { at: 500 }, 10.0),
        ],
    )
    .unwrap();
    // The later wave: five healthy devices, and one that would roll back if it were updated.
    let mut later_wave: HashSet<&String> = names
        .iter()
        .filter(|n| !faults.contains_key(*n))
        .take(5)
        .collect();
    later_wave.extend(names.iter().find(|n| faults.get(*n) == Some(&Fault::RollBack)));
    let simulation = Simulation {
        app: "app".into(),
        devices: names.clone(),
        password: "pw".into(),
        version: FROM.into(),
        mtu: Some(256),
        transport: Transport::Http { urls: Vec::new() },
        concurrency: names.len(),
        device: options_with_target(TO, Duration::from_secs(60)),
        faults: faults.clone(),
        ca_file: None,
        client_cert: None,
    };
    let (image, earlier) = (image(1000), image_of(FROM, 1000));
    let results = simulate_over(&simulation, |name| {
        let mut link = EngineLink::new(image.clone());
        if later_wave.contains(&name.to_string()) {
            link.earlier = Some((usize::MAX, earlier.clone()));
        }
        link
    })
    .await
    .unwrap();
    assert_eq!(results.len(), names.len());
    let mut ended: HashMap<&str, usize> = HashMap::new();
    for (name, result) in &results {
        let outcome = result.as_ref().unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let expected = match faults.get(name) {
            _ if later_wave.contains(name) => Outcome::NotUpdated { version: FROM.into() },
            None => Outcome::Updated {
                from: FROM.into(),
                to: TO.into(),
                bytes: 1000,
            },
            Some(Fault::RollBack) => Outcome::RolledBack {
                version: FROM.into(),
                to: TO.into(),
            },
            Some(Fault::Silent) => Outcome::Silent { to: TO.into() },
            Some(Fault::Stall { .. }) => Outcome::Stalled {
                to: TO.into(),
                offset: 512,
            },
        };
        assert_eq!(outcome, &expected, "{name}");
        let kind = match outcome {
            Outcome::Updated { .. } => "updated",
            Outcome::NotUpdated { .. } => "not updated",
            Outcome::RolledBack { .. } => "rolled back",
            Outcome::Silent { .. } => "silent",
            Outcome::Stalled { .. } => "stalled",
            Outcome::InSync { .. } => "in sync",
        };
        *ended.entry(kind).or_default() += 1;
    }
    assert_eq!(
        ended,
        HashMap::from([
            ("updated", 40 - 12 - 5),
            ("not updated", 6),
            ("rolled back", 3),
            ("silent", 4),
            ("stalled", 4),
        ])
    );
}
