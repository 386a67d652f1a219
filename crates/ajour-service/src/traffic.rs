//! The live DFU traffic of applications, for whoever watches it (the API's
//! `/api/stream/v1alpha1/apps/{app}`, which `drg stream` reads): every status a device sent and
//! the command it was answered with, each as one CloudEvent in JSON, in the order they happened.
//! [`crate::Device::handle_status`] publishes here, the one place every transport (the HTTP
//! endpoint, Drogue's MQTT integration) passes through.
//!
//! One `tokio::sync::broadcast` channel per application someone watches, made by its first
//! subscriber and removed with its last. Publishing never waits and costs nothing worth counting
//! when nobody watches: one atomic load when no application is watched, one map look-up when only
//! others are; the event is built only for a channel that exists. A watcher that falls behind
//! loses events (a channel keeps the newest [`CAPACITY`]) and is told how many
//! ([`Next::Missed`]); the device is never slowed by it.

use ajour_protocol::{decode_command, Command, Status};
use ajour_types::{AppName, DeviceName};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};
use tokio::sync::broadcast;

/// Events kept per application for its slowest watcher; one that is more behind has lost events.
/// A device's update is two events per block, so this is some 128 blocks.
pub const CAPACITY: usize = 256;

/// Watchers at once, over all applications. A watcher's connection has left the connection cap
/// of `--max-connections` once it became a WebSocket, so the hub caps them itself.
pub const MAX_SUBSCRIBERS: usize = 1000;

/// The CloudEvents type of a device's status: Drogue's type of a device's event, as Drogue's
/// integrations delivered the statuses devices sent it.
pub const STATUS_EVENT_TYPE: &str = "io.drogue.event.v1";

/// The CloudEvents type of the command Ajour answered a status with. Drogue defines no event for
/// commands sent to devices, so the type is in Ajour's name: a reader that knows only Drogue's
/// device events tells them apart by it.
pub const COMMAND_EVENT_TYPE: &str = "io.ajour.command.v1";

/// The `subject` of both: Drogue's channel a status is published on, and the name of the command
/// answering it.
pub const SUBJECT: &str = "dfu";

/// The `instance` extension: which cloud the event comes from (Drogue names its instance there).
pub const INSTANCE: &str = "ajour";

/// The hub: who watches which application.
#[derive(Default)]
pub struct Traffic {
    channels: RwLock<HashMap<AppName, broadcast::Sender<Arc<str>>>>,
    /// Watchers of all applications: checked, without a lock, before anything else is done.
    subscribers: AtomicUsize,
    /// Watchers dropped for being too slow, since start.
    dropped: AtomicU64,
    /// Set on shutdown: channels are gone, and no new watcher is taken.
    closed: AtomicBool,
}

/// Why nobody can watch now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("the server is shutting down")]
    Closed,
    #[error("too many live streams are open ({MAX_SUBSCRIBERS}): try again later")]
    Full,
}

/// What a watcher gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// One event: a CloudEvent in JSON.
    Event(Arc<str>),
    /// The watcher fell so far behind that this many events were lost.
    Missed(u64),
    /// The hub closed (server shutdown): nothing more will come.
    Closed,
}

impl Traffic {
    pub fn new() -> Self {
        Self::default()
    }

    fn channels(&self) -> RwLockWriteGuard<'_, HashMap<AppName, broadcast::Sender<Arc<str>>>> {
        self.channels.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watch `app` from now on, until the [`Subscription`] is dropped.
    pub fn subscribe(self: &Arc<Self>, app: &AppName) -> Result<Subscription, SubscribeError> {
        let mut channels = self.channels();
        // Under the lock `close` takes too: no watcher is added to a hub that closed.
        if self.closed.load(Ordering::Relaxed) {
            return Err(SubscribeError::Closed);
        }
        if self.subscribers.load(Ordering::Relaxed) >= MAX_SUBSCRIBERS {
            return Err(SubscribeError::Full);
        }
        let receiver = channels
            .entry(app.clone())
            .or_insert_with(|| broadcast::channel(CAPACITY).0)
            .subscribe();
        // Release, with `publish`'s Acquire: a publisher that sees this watcher counted finds its
        // channel.
        self.subscribers.fetch_add(1, Ordering::Release);
        metrics::gauge!("ajour_stream_subscribers").increment(1.0);
        Ok(Subscription {
            traffic: self.clone(),
            app: app.clone(),
            receiver: Some(receiver),
        })
    }

    /// Watchers of `app` now.
    pub fn subscribers(&self, app: &AppName) -> usize {
        self.channels
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
            .map_or(0, broadcast::Sender::receiver_count)
    }

    /// Watchers dropped for being too slow since start (also `ajour_stream_dropped_total`).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Count a watcher its stream dropped for being too slow.
    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("ajour_stream_dropped_total").increment(1);
    }

    /// Server shutdown: every watcher gets what its channel still holds, then [`Next::Closed`];
    /// no new watcher is taken.
    pub fn close(&self) {
        let mut channels = self.channels();
        self.closed.store(true, Ordering::Relaxed);
        channels.clear();
    }

    /// Publish device `device` of `app` sending `status` and being answered with `command` (the
    /// encoded command). Never waits; does nothing unless someone watches `app`.
    /// `gateway`: the device that sent the status for `device` (Drogue's `as=`), if not itself.
    pub fn publish(
        &self,
        app: &AppName,
        device: &DeviceName,
        gateway: Option<&DeviceName>,
        status: &Status,
        command: &[u8],
    ) {
        if self.subscribers.load(Ordering::Acquire) == 0 {
            return;
        }
        let Some(sender) = self
            .channels
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
            .cloned()
        else {
            return;
        };
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let event = |kind: &str, data: Value| -> Arc<str> {
            cloud_event(app, device, gateway.unwrap_or(device), kind, &time, data)
                .to_string()
                .into()
        };
        // A send fails only when the last watcher left meanwhile: nobody to tell.
        let _ = sender.send(event(STATUS_EVENT_TYPE, status_data(status)));
        // The command was encoded from a valid command a moment ago; decoding it back here, and
        // only while someone watches, spares the device's path any copy of it.
        if let Ok(command) = decode_command(command) {
            let _ = sender.send(event(COMMAND_EVENT_TYPE, command_data(&command)));
        }
    }
}

/// A watcher of one application: [`Self::next`] in a loop. Dropping it stops the watch.
pub struct Subscription {
    traffic: Arc<Traffic>,
    app: AppName,
    /// Always `Some` until dropped: taken in `drop`, under the hub's lock.
    receiver: Option<broadcast::Receiver<Arc<str>>>,
}

impl Subscription {
    pub fn app(&self) -> &AppName {
        &self.app
    }

    /// The next event, a loss, or the end. Cancel-safe: nothing is lost by dropping the future.
    pub async fn next(&mut self) -> Next {
        let Some(receiver) = self.receiver.as_mut() else {
            return Next::Closed;
        };
        match receiver.recv().await {
            Ok(event) => Next::Event(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => Next::Missed(missed),
            Err(broadcast::error::RecvError::Closed) => Next::Closed,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self.traffic.channels();
        // The receiver goes under the lock, so a subscriber arriving now either finds the channel
        // with its count right, or makes a new one.
        drop(self.receiver.take());
        if channels
            .get(&self.app)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.remove(&self.app);
        }
        self.traffic.subscribers.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("ajour_stream_subscribers").decrement(1.0);
    }
}

/// A structured CloudEvent as Drogue's WebSocket integration sent them: the standard attributes,
/// Drogue's extensions (`application`, `device`, `sender`, `instance`), the data as JSON.
/// `sender` is who sent the status: the device, or the gateway that acts for it, as in Drogue; it
/// is that for the command too, so that `drg stream --device` (which filters on it) shows both
/// sides of a conversation.
fn cloud_event(
    app: &AppName,
    device: &DeviceName,
    sender: &DeviceName,
    kind: &str,
    time: &str,
    data: Value,
) -> Value {
    json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": format!("drogue://{app}/{device}"),
        "type": kind,
        "subject": SUBJECT,
        "time": time,
        "datacontenttype": "application/json",
        "instance": INSTANCE,
        "application": app.as_str(),
        "device": device.as_str(),
        "sender": sender.as_str(),
        "data": data,
    })
}

/// Versions are bytes on the wire; shown as the text they are meant to be.
fn text(bytes: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

/// A status as the service read it: `version`, and `mtu`, `correlation_id`, `update` when the
/// device sent them.
fn status_data(status: &Status) -> Value {
    let mut data = Map::new();
    data.insert("version".into(), text(&status.version));
    if let Some(mtu) = status.mtu {
        data.insert("mtu".into(), mtu.into());
    }
    if let Some(id) = status.correlation_id {
        data.insert("correlation_id".into(), id.into());
    }
    if let Some(update) = &status.update {
        data.insert(
            "update".into(),
            json!({"version": text(&update.version), "offset": update.offset}),
        );
    }
    Value::Object(data)
}

/// A command as it was sent, less the bytes of a block (their `length` only: events stay small)
/// and with a swap's checksum in hex.
fn command_data(command: &Command<'_>) -> Value {
    let mut data = Map::new();
    data.insert("command".into(), command.kind().into());
    match command {
        Command::Wait { poll, .. } => {
            if let Some(poll) = poll {
                data.insert("poll".into(), (*poll).into());
            }
        }
        Command::Sync { version, poll, .. } => {
            data.insert("version".into(), text(version));
            if let Some(poll) = poll {
                data.insert("poll".into(), (*poll).into());
            }
        }
        Command::Write {
            version,
            offset,
            data: block,
            ..
        } => {
            data.insert("version".into(), text(version));
            data.insert("offset".into(), (*offset).into());
            data.insert("length".into(), block.len().into());
        }
        Command::Swap {
            version, checksum, ..
        } => {
            data.insert("version".into(), text(version));
            let hex: String = checksum.iter().map(|b| format!("{b:02x}")).collect();
            data.insert("checksum".into(), hex.into());
        }
    }
    if let Some(id) = command.correlation_id() {
        data.insert("correlation_id".into(), id.into());
    }
    Value::Object(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ajour_protocol::encode_command;

    fn app(name: &str) -> AppName {
        AppName::parse(name).unwrap()
    }

    fn device() -> DeviceName {
        DeviceName::parse("dev-1").unwrap()
    }

    fn write(offset: u32) -> Vec<u8> {
        encode_command(&Command::Write {
            version: b"2.0.0",
            correlation_id: None,
            offset,
            data: &[0; 64],
        })
    }

    fn status(offset: u32) -> Status {
        Status::updating("1.0.0", Some(64), None, "2.0.0", offset)
    }

    fn parse(next: Next) -> Value {
        match next {
            Next::Event(event) => serde_json::from_str(&event).unwrap(),
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_watcher_gets_its_applications_statuses_and_commands_in_order() {
        let traffic = Arc::new(Traffic::new());
        let mut watcher = traffic.subscribe(&app("mine")).unwrap();
        traffic.publish(&app("other"), &device(), None, &status(0), &write(0));
        traffic.publish(&app("mine"), &device(), None, &status(0), &write(0));
        traffic.publish(&app("mine"), &device(), None, &status(64), &write(64));
        let status_event = parse(watcher.next().await);
        assert_eq!(status_event["type"], STATUS_EVENT_TYPE);
        assert_eq!(status_event["source"], "drogue://mine/dev-1");
        assert_eq!(status_event["application"], "mine");
        assert_eq!(status_event["sender"], "dev-1");
        assert_eq!(
            status_event["data"],
            json!({"version": "1.0.0", "mtu": 64, "update": {"version": "2.0.0", "offset": 0}})
        );
        let command_event = parse(watcher.next().await);
        assert_eq!(command_event["type"], COMMAND_EVENT_TYPE);
        assert_eq!(
            command_event["data"],
            json!({"command": "write", "version": "2.0.0", "offset": 0, "length": 64})
        );
        assert_ne!(status_event["id"], command_event["id"]);
        assert_eq!(parse(watcher.next().await)["data"]["update"]["offset"], 64);
        assert_eq!(parse(watcher.next().await)["data"]["offset"], 64);
    }

    #[tokio::test]
    async fn a_gateways_statuses_name_it_as_the_sender() {
        let traffic = Arc::new(Traffic::new());
        let mut watcher = traffic.subscribe(&app("mine")).unwrap();
        let bridge = DeviceName::parse("ble-bridge").unwrap();
        traffic.publish(&app("mine"), &device(), Some(&bridge), &status(0), &write(0));
        for event in [parse(watcher.next().await), parse(watcher.next().await)] {
            assert_eq!(event["device"], "dev-1");
            assert_eq!(event["sender"], "ble-bridge");
        }
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_told_what_it_missed_and_publishing_never_waits() {
        let traffic = Arc::new(Traffic::new());
        let mut watcher = traffic.subscribe(&app("mine")).unwrap();
        // Two events per publish: twice the capacity and ten more are lost but for the newest.
        for offset in 0..(CAPACITY as u32 + 5) {
            traffic.publish(&app("mine"), &device(), None, &status(offset), &write(offset));
        }
        assert_eq!(watcher.next().await, Next::Missed(CAPACITY as u64 + 10));
        assert!(matches!(watcher.next().await, Next::Event(_)));
    }

    #[tokio::test]
    async fn channels_live_as_long_as_their_watchers_and_close_ends_them() {
        let traffic = Arc::new(Traffic::new());
        let first = traffic.subscribe(&app("mine")).unwrap();
        let second = traffic.subscribe(&app("mine")).unwrap();
        assert_eq!(traffic.subscribers(&app("mine")), 2);
        drop(first);
        assert_eq!(traffic.subscribers(&app("mine")), 1);
        drop(second);
        assert!(traffic.channels().is_empty());
        assert_eq!(traffic.subscribers.load(Ordering::Relaxed), 0);

        let mut watcher = traffic.subscribe(&app("mine")).unwrap();
        traffic.publish(&app("mine"), &device(), None, &status(0), &write(0));
        traffic.close();
        // What was published before is still delivered, then the end.
        assert!(matches!(watcher.next().await, Next::Event(_)));
        assert!(matches!(watcher.next().await, Next::Event(_)));
        assert_eq!(watcher.next().await, Next::Closed);
        assert_eq!(
            traffic.subscribe(&app("mine")).err(),
            Some(SubscribeError::Closed)
        );
    }

    #[test]
    fn commands_are_shown_without_their_bytes() {
        let swap = Command::Swap {
            version: b"2.0.0",
            correlation_id: Some(7),
            checksum: &[0xab; 32],
        };
        assert_eq!(
            command_data(&swap),
            json!({"command": "swap", "version": "2.0.0", "checksum": "ab".repeat(32), "correlation_id": 7})
        );
        let wait = Command::Wait {
            correlation_id: None,
            poll: Some(5),
        };
        assert_eq!(command_data(&wait), json!({"command": "wait", "poll": 5}));
        let sync = Command::Sync {
            version: b"1.0.0",
            correlation_id: None,
            poll: None,
        };
        assert_eq!(
            command_data(&sync),
            json!({"command": "sync", "version": "1.0.0"})
        );
    }
}
