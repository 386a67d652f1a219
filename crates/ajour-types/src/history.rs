//! A device's update history: what happened to it, told by the difference between the status the
//! registry held and the one written over it.
//!
//! [`events_between`] is the one rule. It is applied where a status write replaces the stored one
//! (the registry's read-and-write step), so that however many instances write a device's statuses,
//! each change is seen by exactly one write, and told once.

use crate::{FirmwareState, FirmwareStatus};
use serde_json::{json, Map, Value};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An update toward `target` (the image `digest`) began: the device runs `current`.
    Started,
    /// The update passed a milestone ([`MILESTONES`], `percent`).
    Progress,
    /// The whole image was sent, and the device told to swap to it.
    Swapping,
    /// The device runs `current`, which is what it should run.
    InSync,
    /// The device was given up (it never came back on the new version): `reason`.
    Failed,
    /// The rollout that was updating it was cancelled before it had the whole image.
    Cancelled,
    /// The firmware it should run could not be had: `reason`.
    Error,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Started,
        EventKind::Progress,
        EventKind::Swapping,
        EventKind::InSync,
        EventKind::Failed,
        EventKind::Cancelled,
        EventKind::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Progress => "progress",
            EventKind::Swapping => "swapping",
            EventKind::InSync => "inSync",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::Error => "error",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// The share of an image, in percent, whose passing an update's history records.
pub const MILESTONES: [f64; 3] = [25.0, 50.0, 75.0];

/// One entry of a device's history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEvent {
    pub kind: EventKind,
    /// The version the device ran.
    pub current: String,
    /// The version it should run.
    pub target: String,
    /// The target image's SHA-256 (hex), when known.
    pub digest: Option<String>,
    /// The milestone passed ([`EventKind::Progress`]).
    pub percent: Option<f64>,
    /// Why ([`EventKind::Failed`], [`EventKind::Cancelled`], [`EventKind::Error`]).
    pub reason: Option<String>,
    /// The rollout the update belonged to, if any (the registry adds it).
    pub rollout: Option<i64>,
}

impl HistoryEvent {
    fn of(kind: EventKind, status: &FirmwareStatus) -> Self {
        Self {
            kind,
            current: status.current.clone(),
            target: status.target.clone(),
            digest: status.target_digest.clone(),
            percent: None,
            reason: None,
            rollout: None,
        }
    }

    /// `{"kind": "started", "current": "1.0.0", "target": "2.0.0", "digest": "…"}`, with
    /// `percent`, `reason` and `rollout` where they apply.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("kind".into(), json!(self.kind.as_str()));
        object.insert("current".into(), json!(self.current));
        object.insert("target".into(), json!(self.target));
        if let Some(digest) = &self.digest {
            object.insert("digest".into(), json!(digest));
        }
        if let Some(percent) = self.percent {
            object.insert("percent".into(), json!(percent));
        }
        if let Some(reason) = &self.reason {
            object.insert("reason".into(), json!(reason));
        }
        if let Some(rollout) = self.rollout {
            object.insert("rollout".into(), json!(rollout));
        }
        Value::Object(object)
    }

    /// Read what [`Self::to_json`] wrote; `None` for anything else.
    pub fn from_json(value: &Value) -> Option<Self> {
        let text = |name: &str| value.get(name).and_then(Value::as_str).map(String::from);
        Some(Self {
            kind: EventKind::parse(value.get("kind")?.as_str()?)?,
            current: text("current")?,
            target: text("target")?,
            digest: text("digest"),
            percent: value.get("percent").and_then(Value::as_f64),
            reason: text("reason"),
            rollout: value.get("rollout").and_then(Value::as_i64),
        })
    }
}

/// A [`HistoryEvent`] as the registry keeps it: when it was recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub time: chrono::DateTime<chrono::Utc>,
    pub event: HistoryEvent,
}

impl RecordedEvent {
    /// The event's JSON with `time` (RFC 3339, milliseconds, UTC) first.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert(
            "time".into(),
            json!(self.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
        if let Value::Object(event) = self.event.to_json() {
            object.extend(event);
        }
        Value::Object(object)
    }

    /// Read what [`Self::to_json`] wrote; `None` for anything else.
    pub fn from_json(value: &Value) -> Option<Self> {
        let time = chrono::DateTime::parse_from_rfc3339(value.get("time")?.as_str()?).ok()?;
        Some(Self {
            time: time.with_timezone(&chrono::Utc),
            event: HistoryEvent::from_json(value)?,
        })
    }
}

/// What happened between `stored` (the status the registry held, if any) and `new` (the status
/// written over it), in order. Nothing when only progress moved between milestones.
pub fn events_between(stored: Option<&FirmwareStatus>, new: &FirmwareStatus) -> Vec<HistoryEvent> {
    let mut events = Vec::new();
    match &new.state {
        FirmwareState::Updating { percent } => {
            // The same update goes on: same target, same image, still updating.
            let same_update = stored
                .filter(|stored| stored.target == new.target && stored.target_digest == new.target_digest);
            let from = match same_update.and_then(FirmwareStatus::percent) {
                Some(from) => from,
                None => {
                    events.push(HistoryEvent::of(EventKind::Started, new));
                    0.0
                }
            };
            for milestone in MILESTONES {
                if from < milestone && *percent >= milestone {
                    events.push(HistoryEvent {
                        percent: Some(milestone),
                        ..HistoryEvent::of(EventKind::Progress, new)
                    });
                }
            }
            if from < 100.0 && *percent >= 100.0 {
                events.push(HistoryEvent::of(EventKind::Swapping, new));
            }
        }
        FirmwareState::InSync => {
            let already = stored
                .is_some_and(|stored| stored.state == FirmwareState::InSync && stored.current == new.current);
            if !already {
                events.push(HistoryEvent::of(EventKind::InSync, new));
            }
        }
        FirmwareState::Failed { reason } | FirmwareState::Error { reason } => {
            let already =
                stored.is_some_and(|stored| stored.state == new.state && stored.target == new.target);
            if !already {
                let kind = match new.state {
                    FirmwareState::Failed { .. } => EventKind::Failed,
                    _ => EventKind::Error,
                };
                events.push(HistoryEvent {
                    reason: Some(reason.clone()),
                    ..HistoryEvent::of(kind, new)
                });
            }
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn updating(percent: f64, digest: &str) -> FirmwareStatus {
        FirmwareStatus {
            current: "1.0.0".into(),
            target: "2.0.0".into(),
            target_digest: Some(digest.into()),
            state: FirmwareState::Updating { percent },
        }
    }

    fn in_sync(version: &str) -> FirmwareStatus {
        FirmwareStatus {
            current: version.into(),
            target: version.into(),
            target_digest: Some("d".into()),
            state: FirmwareState::InSync,
        }
    }

    fn kinds(events: &[HistoryEvent]) -> Vec<(EventKind, Option<f64>)> {
        events.iter().map(|e| (e.kind, e.percent)).collect()
    }

    #[test]
    fn an_update_is_told_once_from_start_to_sync_whatever_the_steps() {
        use EventKind::*;
        let first = in_sync("1.0.0");
        assert_eq!(kinds(&events_between(None, &first)), [(InSync, None)]);
        // Again in sync on the same version: nothing new.
        assert!(events_between(Some(&first), &first).is_empty());

        let start = updating(0.2, "d");
        assert_eq!(kinds(&events_between(Some(&first), &start)), [(Started, None)]);
        // A jump over two milestones tells both.
        let later = updating(55.0, "d");
        assert_eq!(
            kinds(&events_between(Some(&start), &later)),
            [(Progress, Some(25.0)), (Progress, Some(50.0))]
        );
        // Between milestones, or back (a late write of another instance): nothing.
        assert!(events_between(Some(&later), &updating(60.0, "d")).is_empty());
        assert!(events_between(Some(&later), &updating(30.0, "d")).is_empty());
        let swap = updating(100.0, "d");
        assert_eq!(
            kinds(&events_between(Some(&later), &swap)),
            [(Progress, Some(75.0)), (Swapping, None)]
        );
        assert_eq!(
            kinds(&events_between(Some(&swap), &in_sync("2.0.0"))),
            [(InSync, None)]
        );
        // First seen half-way: started, and the milestone passed.
        assert_eq!(
            kinds(&events_between(None, &updating(30.0, "d"))),
            [(Started, None), (Progress, Some(25.0))]
        );
    }

    #[test]
    fn another_image_under_the_version_is_another_update() {
        let events = events_between(Some(&updating(40.0, "a")), &updating(0.5, "b"));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Started);
        assert_eq!(events[0].digest.as_deref(), Some("b"));
    }

    #[test]
    fn failures_and_errors_are_told_once_with_their_reason() {
        let failed = FirmwareStatus {
            state: FirmwareState::Failed {
                reason: "never came back".into(),
            },
            ..updating(100.0, "d")
        };
        let events = events_between(Some(&updating(100.0, "d")), &failed);
        assert_eq!(events[0].kind, EventKind::Failed);
        assert_eq!(events[0].reason.as_deref(), Some("never came back"));
        assert!(events_between(Some(&failed), &failed).is_empty());

        let error = FirmwareStatus::error("1.0.0", "firmware file missing");
        assert_eq!(events_between(Some(&failed), &error)[0].kind, EventKind::Error);
        assert!(events_between(Some(&error), &error).is_empty());
    }

    #[test]
    fn events_round_trip_through_json() {
        for event in events_between(None, &updating(80.0, "d"))
            .into_iter()
            .chain(events_between(None, &FirmwareStatus::error("1", "why")))
        {
            assert_eq!(HistoryEvent::from_json(&event.to_json()), Some(event));
        }
        assert_eq!(HistoryEvent::from_json(&json!({"kind": "exploded"})), None);
    }
}
