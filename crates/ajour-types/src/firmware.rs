//! A device's firmware status, typed, and its one rendering as Drogue's `status.firmware`:
//!
//! ```json
//! {"current": "0.1.0", "target": "0.2.0", "conditions": [
//!   {"type": "InSync", "status": "False", "lastTransitionTime": "2026-11-29T10:00:00.000Z"},
//!   {"type": "UpdateProgress", "status": "Unknown", "message": "45.00", "lastTransitionTime": "…"}]}
//! ```
//!
//! In sync is `InSync=True`; updating adds `UpdateProgress` with the percentage as its message; an
//! error is `InSync=False` with the reason, and target `Unknown` when the firmware could not be
//! had (the original's shape, which Drogue's console shows). The server writes it
//! ([`FirmwareReport::to_json`]), the CLI and tests read it ([`FirmwareReport::from_json`]).

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde_json::{json, Value};
use std::fmt;

/// Where a device is with its firmware.
#[derive(Debug, Clone, PartialEq)]
pub enum FirmwareState {
    InSync,
    Updating {
        percent: f64,
    },
    /// The firmware the device should run could not be had (missing, corrupt, not configured).
    Error {
        reason: String,
    },
    /// The device could not be updated (it never came back on the new version): it is left alone
    /// until its firmware changes.
    Failed {
        reason: String,
    },
}

impl fmt::Display for FirmwareState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FirmwareState::InSync => f.write_str("in sync"),
            FirmwareState::Updating { percent } => write!(f, "updating {percent:.2}%"),
            FirmwareState::Error { reason } => write!(f, "error: {reason}"),
            FirmwareState::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// What a device runs, what it should run, and how far along it is.
#[derive(Debug, Clone, PartialEq)]
pub struct FirmwareStatus {
    pub current: String,
    pub target: String,
    /// The SHA-256 (hex) of the target image: with the version, the identity of what the device is
    /// sent. A device may resume an update only of this very image (`targetDigest` in the JSON).
    pub target_digest: Option<String>,
    pub state: FirmwareState,
}

/// The target shown when the firmware a device should run could not be had.
pub const UNKNOWN_TARGET: &str = "Unknown";

impl FirmwareStatus {
    /// The firmware could not be had (missing, corrupt, not configured): target "Unknown".
    pub fn error(current: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            current: current.into(),
            target: UNKNOWN_TARGET.into(),
            target_digest: None,
            state: FirmwareState::Error {
                reason: reason.into(),
            },
        }
    }

    /// Progress of an update, in percent.
    pub fn percent(&self) -> Option<f64> {
        match self.state {
            FirmwareState::Updating { percent } => Some(percent),
            _ => None,
        }
    }

    /// Equal but for progress within an update. Another image under the same version is
    /// another phase: which image a device is downloading must reach the registry at once, for
    /// the instance its next status goes to.
    pub fn same_phase(&self, other: &Self) -> bool {
        let phase = |s: &FirmwareState| match s {
            FirmwareState::Updating { .. } => None,
            other => Some(other.clone()),
        };
        self.current == other.current
            && self.target == other.target
            && self.target_digest == other.target_digest
            && phase(&self.state) == phase(&other.state)
    }

    /// The conditions in Drogue's shape, without their times.
    fn conditions(&self) -> Vec<(&'static str, &'static str, Option<String>, Option<String>)> {
        match &self.state {
            FirmwareState::InSync => vec![(IN_SYNC, "True", None, None)],
            FirmwareState::Updating { percent } => vec![
                (IN_SYNC, "False", None, None),
                (UPDATE_PROGRESS, "Unknown", None, Some(format!("{percent:.2}"))),
            ],
            FirmwareState::Error { reason } => {
                vec![(IN_SYNC, "False", Some(reason.clone()), Some(ERROR_MESSAGE.into()))]
            }
            FirmwareState::Failed { reason } => {
                vec![(
                    IN_SYNC,
                    "False",
                    Some(reason.clone()),
                    Some(FAILED_MESSAGE.into()),
                )]
            }
        }
    }
}

const IN_SYNC: &str = "InSync";
/// The message of an `InSync=False` condition whose reason is a firmware error (the original's).
const ERROR_MESSAGE: &str = "Error retrieving firmware metadata";
/// ... and of one whose reason is a failed update.
const FAILED_MESSAGE: &str = "Update failed";
const UPDATE_PROGRESS: &str = "UpdateProgress";

/// One condition of a report, as Drogue writes conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// `InSync` or `UpdateProgress`.
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    /// When this condition last changed its status.
    pub since: DateTime<Utc>,
}

/// `status.firmware`: a status, and since when each of its conditions has held.
#[derive(Debug, Clone, PartialEq)]
pub struct FirmwareReport {
    pub status: FirmwareStatus,
    pub conditions: Vec<Condition>,
}

/// A `status.firmware` that is not in the shape [`FirmwareReport::to_json`] writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("status.firmware: {0}")]
pub struct StatusFormatError(String);

impl FirmwareReport {
    /// The report of `status` observed at `now`, after `previous`: a condition whose status did
    /// not change keeps the time it changed at, as Drogue's `lastTransitionTime` does.
    pub fn observe(previous: Option<&FirmwareReport>, status: FirmwareStatus, now: DateTime<Utc>) -> Self {
        // Kept at the precision it is written in, so a report read back compares as written.
        let now = now.trunc_subsecs(3);
        let conditions = status
            .conditions()
            .into_iter()
            .map(|(kind, condition_status, reason, message)| {
                let since = previous
                    .and_then(|p| p.condition(kind))
                    .filter(|c| c.status == condition_status)
                    .map(|c| c.since)
                    .unwrap_or(now);
                Condition {
                    kind: kind.into(),
                    status: condition_status.into(),
                    reason,
                    message,
                    since,
                }
            })
            .collect();
        Self { status, conditions }
    }

    pub fn condition(&self, kind: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }

    /// Whether writing `self` over `stored` would undo a later observation.
    ///
    /// Status writes run beside requests, and with several instances every instance sees some of
    /// a device's statuses and writes its newest one a little later. An instance that saw the
    /// device updating toward version T, but not its final status, may come to write "not in
    /// sync since t0" after another wrote "in sync since t1 > t0": that write is late and would
    /// leave the device shown as updating for ever. A write for another target, or one that saw
    /// the device out of sync after t1 (it was reflashed), is not late. Within the same
    /// millisecond the two are taken as concurrent, and in sync wins: no device is reflashed
    /// and rebooted that fast.
    pub fn is_late_over(&self, stored: &FirmwareReport) -> bool {
        if stored.status.target != self.status.target {
            return false;
        }
        match (stored.condition(IN_SYNC), self.condition(IN_SYNC)) {
            (Some(stored), Some(new)) => {
                stored.status == "True" && new.status != "True" && new.since <= stored.since
            }
            _ => false,
        }
    }

    /// Drogue's `status.firmware` JSON.
    pub fn to_json(&self) -> Value {
        let conditions: Vec<Value> = self
            .conditions
            .iter()
            .map(|c| {
                let mut condition = json!({
                    "type": c.kind,
                    "status": c.status,
                    "lastTransitionTime": c.since.to_rfc3339_opts(SecondsFormat::Millis, true),
                });
                if let Some(reason) = &c.reason {
                    condition["reason"] = reason.as_str().into();
                }
                if let Some(message) = &c.message {
                    condition["message"] = message.as_str().into();
                }
                condition
            })
            .collect();
        let mut value =
            json!({"current": self.status.current, "target": self.status.target, "conditions": conditions});
        if let Some(digest) = &self.status.target_digest {
            value["targetDigest"] = digest.as_str().into();
        }
        value
    }

    /// Read `status.firmware` as [`Self::to_json`] writes it.
    pub fn from_json(value: &Value) -> Result<Self, StatusFormatError> {
        let text = |field: &str| {
            value[field]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| StatusFormatError(format!("no '{field}'")))
        };
        let (current, target) = (text("current")?, text("target")?);
        let mut conditions = Vec::new();
        for c in value["conditions"]
            .as_array()
            .ok_or_else(|| StatusFormatError("no 'conditions' list".into()))?
        {
            let field = |name: &str| c[name].as_str().map(str::to_string);
            let since = field("lastTransitionTime")
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .ok_or_else(|| StatusFormatError("a condition without a valid lastTransitionTime".into()))?;
            conditions.push(Condition {
                kind: field("type").ok_or_else(|| StatusFormatError("a condition without a type".into()))?,
                status: field("status")
                    .ok_or_else(|| StatusFormatError("a condition without a status".into()))?,
                reason: field("reason"),
                message: field("message"),
                since: since.with_timezone(&Utc),
            });
        }
        let find = |kind: &str| conditions.iter().find(|c| c.kind == kind);
        let state = match (find(IN_SYNC), find(UPDATE_PROGRESS)) {
            (Some(sync), _) if sync.status == "True" => FirmwareState::InSync,
            (_, Some(progress)) => FirmwareState::Updating {
                percent: progress
                    .message
                    .as_deref()
                    .and_then(|m| m.parse().ok())
                    .ok_or_else(|| StatusFormatError("UpdateProgress without a percentage".into()))?,
            },
            (Some(sync), None) => {
                let reason = sync.reason.clone().unwrap_or_default();
                if sync.message.as_deref() == Some(FAILED_MESSAGE) {
                    FirmwareState::Failed { reason }
                } else {
                    FirmwareState::Error { reason }
                }
            }
            (None, None) => return Err(StatusFormatError("no InSync condition".into())),
        };
        Ok(Self {
            status: FirmwareStatus {
                current,
                target,
                target_digest: value["targetDigest"].as_str().map(str::to_string),
                state,
            },
            conditions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn status(target: &str, state: FirmwareState) -> FirmwareStatus {
        FirmwareStatus {
            current: "1.0.0".into(),
            target: target.into(),
            target_digest: None,
            state,
        }
    }

    #[test]
    fn drogue_shape() {
        let report = FirmwareReport::observe(
            None,
            status("2.0.0", FirmwareState::Updating { percent: 45.0 }),
            at(0),
        );
        assert_eq!(
            report.to_json(),
            json!({"current": "1.0.0", "target": "2.0.0", "conditions": [
                {"type": "InSync", "status": "False", "lastTransitionTime": "2027-01-15T08:00:00.000Z"},
                {"type": "UpdateProgress", "status": "Unknown", "message": "45.00",
                 "lastTransitionTime": "2027-01-15T08:00:00.000Z"}]})
        );
        let error =
            FirmwareReport::observe(None, FirmwareStatus::error("1.0.0", "no such file"), at(0)).to_json();
        assert_eq!(error["target"], "Unknown");
        assert_eq!(error["conditions"][0]["reason"], "no such file");
        assert_eq!(
            error["conditions"][0]["message"],
            "Error retrieving firmware metadata"
        );
    }

    #[test]
    fn transition_times_move_only_on_a_change() {
        let first =
            FirmwareReport::observe(None, status("2", FirmwareState::Updating { percent: 1.0 }), at(0));
        let later = FirmwareReport::observe(
            Some(&first),
            status("2", FirmwareState::Updating { percent: 50.0 }),
            at(9),
        );
        assert_eq!(later.condition("InSync").unwrap().since, at(0));
        let synced = FirmwareReport::observe(Some(&later), status("2", FirmwareState::InSync), at(12));
        assert_eq!(synced.condition("InSync").unwrap().since, at(12));
    }

    #[test]
    fn a_late_out_of_sync_write_does_not_undo_in_sync() {
        let stored = FirmwareReport::observe(None, status("2", FirmwareState::InSync), at(5));
        let updating = |since| {
            FirmwareReport::observe(
                None,
                status("2", FirmwareState::Updating { percent: 10.0 }),
                at(since),
            )
        };
        // Seen updating before the device was seen in sync: late.
        assert!(updating(1).is_late_over(&stored));
        // Seen out of sync after it was in sync (reflashed): not late.
        assert!(!updating(9).is_late_over(&stored));
        // Another target (the firmware changed): not late.
        let other = FirmwareReport::observe(
            None,
            status("3", FirmwareState::Updating { percent: 10.0 }),
            at(1),
        );
        assert!(!other.is_late_over(&stored));
        // Nothing in sync stored: not late.
        assert!(!updating(9).is_late_over(&updating(1)));
    }

    #[test]
    fn malformed_statuses_are_refused_with_a_reason() {
        for (value, expected) in [
            (json!({}), "no 'current'"),
            (json!({"current": "1", "target": "2"}), "no 'conditions' list"),
            (
                json!({"current": "1", "target": "2", "conditions": []}),
                "no InSync condition",
            ),
            (
                json!({"current": "1", "target": "2", "conditions": [{"type": "InSync", "status": "True"}]}),
                "lastTransitionTime",
            ),
        ] {
            let error = FirmwareReport::from_json(&value).unwrap_err();
            assert!(error.to_string().contains(expected), "{value}: {error}");
        }
    }

    fn any_state() -> impl Strategy<Value = FirmwareState> {
        prop_oneof![
            Just(FirmwareState::InSync),
            // Percentages as written: two decimals.
            (0u32..=10_000).prop_map(|p| FirmwareState::Updating {
                percent: f64::from(p) / 100.0
            }),
            "[ -~]{0,40}".prop_map(|reason| FirmwareState::Error { reason }),
            "[ -~]{0,40}".prop_map(|reason| FirmwareState::Failed { reason }),
        ]
    }

    proptest! {
        #[test]
        fn what_is_written_reads_back_the_same(
            current in "[ -~]{0,20}", target in "[ -~]{0,20}", target_digest in proptest::option::of("[0-9a-f]{64}"),
            state in any_state(), seconds in 0i64..10_000_000,
        ) {
            let status = FirmwareStatus { current, target, target_digest, state };
            let report = FirmwareReport::observe(None, status, at(seconds));
            prop_assert_eq!(FirmwareReport::from_json(&report.to_json()).unwrap(), report);
        }
    }
}
