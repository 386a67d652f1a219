//! The device loop: status, link, command, again, until the device is in sync.

use crate::{EncodedStatus, Link, LinkError, Outcome, SimulatedDevice, StatusEncoding, Step};
use ajour_protocol::{decode_command, Command};
use anyhow::{bail, Context};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The first wait before sending again after a connection error; it doubles up to
/// [`MAX_BACKOFF`], as devices back off from a server that is away.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a device behaves, whatever its link.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub encoding: StatusEncoding,
    /// The longest wait honoured when told to Wait (the server's poll may be longer); waits are
    /// at least a second, as the protocol counts in seconds.
    pub max_wait: Duration,
    /// Give up when not in sync by then (counted from the start of [`run_device`]). A connection
    /// error is retried until then.
    pub timeout: Duration,
    /// The version the device is to end on, as in a staged rollout. With it, a device told Sync
    /// on another version (or told to Wait) does not end: it waits as told (the command's poll,
    /// within 1 s and [`Self::max_wait`]) and reports again, until it runs the target (then it
    /// ends [`Outcome::Updated`] or [`Outcome::InSync`]) or until [`Self::timeout`]. If the
    /// timeout finds it waiting as told, it ends [`Outcome::NotUpdated`], not an error: a device
    /// of a later wave is not updated yet. If the timeout finds it anywhere else (mid-download, or
    /// unable to reach the server since its last Wait), it fails, as without a target. Without a
    /// target, a Sync on any version ends the device.
    pub target: Option<String>,
    /// Statuses in flight at once, over all the devices sharing it (the HTTP load generator's
    /// connection limit). A round trip's latency counts from when its status got its turn.
    pub in_flight: Option<Arc<Semaphore>>,
}

impl DeviceOptions {
    pub fn new(encoding: StatusEncoding, max_wait: Duration, timeout: Duration) -> Self {
        Self {
            encoding,
            max_wait,
            timeout,
            in_flight: None,
            target: None,
        }
    }
}

/// What the device loop reports as it goes; the benchmarks measure with it. `()` observes
/// nothing.
pub trait Observer: Send {
    /// A command answered a status `latency` after the status was sent, and the device will now
    /// do `step`. `Ok(Break)` stops the device here ([`Ended::Stopped`]); an error fails it.
    fn answered(&mut self, latency: Duration, step: &Step) -> anyhow::Result<ControlFlow<()>> {
        let _ = (latency, step);
        Ok(ControlFlow::Continue(()))
    }

    /// No command answered a status in time; it is sent again.
    fn unanswered(&mut self) {}

    /// The server could not be reached; the status is sent again after a backoff.
    fn connection_lost(&mut self, error: &str) {
        let _ = error;
    }
}

impl Observer for () {}

/// How [`run_device`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The device is in sync, was not updated by its timeout (given a target), or played its
    /// fault through.
    Done(Outcome),
    /// The observer stopped it before.
    Stopped,
}

/// Run `device` over `link` until it is in sync (on [`DeviceOptions::target`] if given), or has
/// played its fault: send its status, follow the command, again. Waits are honoured up to
/// [`DeviceOptions::max_wait`]; a lost answer makes the device send its status again; a
/// connection error, after a backoff, until the timeout. Anything the device refuses, or a link
/// error that a retry would not mend, fails it at once.
pub async fn run_device(
    device: &mut SimulatedDevice,
    link: &mut impl Link,
    options: &DeviceOptions,
    observer: &mut impl Observer,
) -> anyhow::Result<Ended> {
    let deadline = Instant::now() + options.timeout;
    let mut waiting_as_told = false;
    let run = device_loop(device, link, options, observer, deadline, &mut waiting_as_told);
    match tokio::time::timeout_at(deadline, run).await {
        Ok(ended) => ended,
        Err(_) if options.target.is_some() && waiting_as_told => Ok(Ended::Done(Outcome::NotUpdated {
            version: device.version().to_string(),
        })),
        Err(_) => bail!("no Sync within {:?}", options.timeout),
    }
}

/// The loop of [`run_device`], cut short by its timeout. `waiting_as_told` says, whenever the
/// timeout cuts it, whether the device's last command told it to wait, with no connection error
/// since.
async fn device_loop(
    device: &mut SimulatedDevice,
    link: &mut impl Link,
    options: &DeviceOptions,
    observer: &mut impl Observer,
    deadline: Instant,
    waiting_as_told: &mut bool,
) -> anyhow::Result<Ended> {
    // Where answers can be lost, each status gets an id of its own, to tell a late answer apart.
    let mut correlation_id = link.answers_can_be_lost().then(|| rand::random::<u32>() >> 1);
    let mut backoff = MIN_BACKOFF;
    loop {
        if let Some(id) = correlation_id.as_mut() {
            *id = id.wrapping_add(1);
            device.set_correlation_id(Some(*id));
        }
        let status = EncodedStatus {
            bytes: device.encoded_status(options.encoding),
            encoding: options.encoding,
            correlation_id: device.correlation_id(),
        };
        let turn = match &options.in_flight {
            Some(in_flight) => Some(in_flight.acquire().await?),
            None => None,
        };
        let sent = Instant::now();
        let answer = link.exchange(status).await;
        let latency = sent.elapsed();
        drop(turn);
        let command = match answer {
            Ok(command) => command,
            Err(LinkError::NoAnswer) => {
                tracing::debug!("no command in time; sending the status again");
                observer.unanswered();
                continue;
            }
            Err(LinkError::Connection(error)) => {
                // Not a device merely waiting its turn any more: one cut off from its server.
                *waiting_as_told = false;
                observer.connection_lost(&error);
                if Instant::now() + backoff >= deadline {
                    bail!(
                        "{error} (no connection until the device's timeout, {:?})",
                        options.timeout
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(error @ (LinkError::Protocol(_) | LinkError::Stopped(_))) => return Err(error.into()),
        };
        backoff = MIN_BACKOFF;
        let command = decode_command(&command).context("decoding the server's command")?;
        let sync_poll = match command {
            Command::Sync { poll, .. } => poll,
            _ => None,
        };
        let step = match device.apply(command)? {
            // In sync, but not on the target: not yet this device's turn to update (a later wave
            // of a rollout). It reports again as a device in sync does, after the Sync's poll.
            Step::Done(Outcome::InSync { version } | Outcome::Updated { to: version, .. })
                if options.target.as_ref().is_some_and(|target| *target != version) =>
            {
                Step::Wait(sync_poll.unwrap_or(1))
            }
            step => step,
        };
        *waiting_as_told = matches!(step, Step::Wait(_));
        if observer.answered(latency, &step)?.is_break() {
            return Ok(Ended::Stopped);
        }
        match step {
            Step::Continue => {}
            Step::Wait(poll) => {
                let wait = Duration::from_secs(poll.into()).clamp(
                    Duration::from_secs(1),
                    options.max_wait.max(Duration::from_secs(1)),
                );
                let until = Instant::now() + wait;
                if until >= deadline {
                    // The timeout ends the device first: no status goes out at its very end,
                    // which would race it.
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep_until(until).await;
            }
            Step::Done(outcome) => return Ok(Ended::Done(outcome)),
        }
    }
}
