//! Drogue's events, as its MQTT integration delivers them, and what Ajour reads from them.
//!
//! Pure functions over bytes, no I/O. An event arrives in one of two content modes:
//!
//! - *structured* (MQTT 3.1.1, and MQTT 5 by default): the payload is a CloudEvent in JSON; its
//!   data is `data` (a JSON value, or a string for `text/plain`) or `data_base64` (everything
//!   else, e.g. CBOR);
//! - *binary* (MQTT 5 with the subscription's user property `content-mode: binary`): the payload
//!   is the data itself, the content type is `datacontenttype`, and every attribute and extension
//!   is a user property.
//!
//! An event is a DFU status when its `subject` (the channel the device published on) is `dfu`, or
//! when it is a LoRaWAN uplink on FPort 223 forwarded by The Things Network (`sender`
//! `ttn-gateway`, subject `223`, the status base64 in `uplink_message.frm_payload`), answered with
//! command `port:223`. Everything else is not Ajour's and is ignored.

use ajour_types::{AppName, DeviceName, Key};
use base64::Engine;
use serde_json::{json, Map, Value};

/// The channel devices publish DFU statuses on, and the command that answers them.
pub const DFU_SUBJECT: &str = "dfu";
/// The `sender` of events forwarded from The Things Network.
pub const TTN_SENDER: &str = "ttn-gateway";
/// The LoRaWAN FPort DFU statuses are sent on, as the event's subject.
pub const TTN_DFU_PORT: &str = "223";
/// The command answering a LoRaWAN status: TTN sends it down on FPort 223.
pub const TTN_COMMAND: &str = "port:223";
/// The CloudEvents type Drogue gives device events.
pub const EVENT_TYPE: &str = "io.drogue.event.v1";

/// An event's data.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    None,
    Binary(Vec<u8>),
    Text(String),
    Json(Value),
}

/// The attributes Ajour reads, and the data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    /// The channel: `dfu` for update statuses; the FPort for LoRaWAN.
    pub subject: Option<String>,
    pub application: Option<String>,
    pub device: Option<String>,
    pub sender: Option<String>,
    pub content_type: Option<String>,
    pub data: Data,
}

/// Why an event was skipped. Meant for the log: the sender of a bad event is not told.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum EventError {
    #[error("not a JSON CloudEvent: {0}")]
    NotJson(String),
    #[error("a structured CloudEvent must be a JSON object")]
    NotObject,
    #[error("attribute '{0}' must be a string")]
    NotString(String),
    #[error("invalid base64 data: {0}")]
    Base64(String),
    #[error("the event names no application (no 'application' extension, no app/ topic)")]
    NoApplication,
    #[error("the event names application '{event}' but came on the topic of '{topic}'")]
    ApplicationMismatch { event: String, topic: String },
    #[error("the event names no device (no 'device' extension)")]
    NoDevice,
    #[error("{0}")]
    InvalidName(String),
    #[error("the DFU event carries no data")]
    NoData,
    #[error("JSON data is not a DFU status (a status is CBOR)")]
    JsonStatus,
    #[error("LoRaWAN uplink without a base64 uplink_message.frm_payload")]
    NoFrmPayload,
}

/// A DFU status for Ajour, and where the answer goes.
#[derive(Debug, Clone, PartialEq)]
pub struct DfuRequest {
    pub key: Key,
    /// `dfu`, or `port:223` for LoRaWAN.
    pub command: &'static str,
    /// The status as the device sent it (CBOR), decoded by the update service.
    pub status: Vec<u8>,
}

impl DfuRequest {
    /// `command/{app}/{device}/{command}`, where Drogue's integration takes commands for devices.
    pub fn command_topic(&self) -> String {
        match &self.key {
            Key::Device(app, device) => command_topic(app.as_str(), device.as_str(), self.command),
            Key::App(app) => format!("command/{app}"),
        }
    }
}

/// `command/{app}/{device}/{command}`.
pub fn command_topic(app: &str, device: &str, command: &str) -> String {
    format!("command/{app}/{device}/{command}")
}

/// Parse a structured CloudEvent (JSON).
///
/// The attributes Ajour reads are taken straight from the JSON text, and every other member is
/// skipped without being built: this runs for every event on the connection's task, so an event
/// costs a handful of small allocations rather than a JSON tree.
pub fn parse_structured(payload: &[u8]) -> Result<Event, EventError> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Not an object (or not JSON at all): say which.
        serde_json::from_slice::<serde::de::IgnoredAny>(payload)
            .map_err(|e| EventError::NotJson(e.to_string()))?;
        return Err(EventError::NotObject);
    }
    let raw: structured::RawEvent =
        serde_json::from_slice(payload).map_err(|e| EventError::NotJson(e.to_string()))?;
    // In this order, whatever the order in the event, so the error names the same attribute.
    let id = raw.id.string("id")?;
    let subject = raw.subject.string("subject")?;
    let application = raw.application.string("application")?;
    let device = raw.device.string("device")?;
    let sender = raw.sender.string("sender")?;
    let content_type = raw.content_type.string("datacontenttype")?;
    let data = match (raw.data_base64, raw.data) {
        (structured::Attribute::String(encoded), _) => Data::Binary(
            base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| EventError::Base64(e.to_string()))?,
        ),
        (structured::Attribute::Absent, None | Some(Value::Null)) => Data::None,
        (structured::Attribute::Absent, Some(Value::String(text))) => Data::Text(text),
        (structured::Attribute::Absent, Some(json)) => Data::Json(json),
        (structured::Attribute::Other, _) => return Err(EventError::NotString("data_base64".into())),
    };
    Ok(Event {
        id,
        subject,
        application,
        device,
        sender,
        content_type,
        data,
    })
}

/// The members of a structured event that Ajour reads, borrowed from the JSON text where it
/// can be (a string with no escapes).
mod structured {
    use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde_json::Value;
    use std::borrow::Cow;
    use std::fmt;

    /// An attribute as it appeared: absent or `null`, a string, or anything else (an error for
    /// the attributes Ajour reads).
    #[derive(Default)]
    pub(super) enum Attribute<'a> {
        #[default]
        Absent,
        String(Cow<'a, str>),
        Other,
    }

    impl Attribute<'_> {
        pub(super) fn string(self, name: &str) -> Result<Option<String>, super::EventError> {
            match self {
                Attribute::Absent => Ok(None),
                Attribute::String(s) => Ok(Some(s.into_owned())),
                Attribute::Other => Err(super::EventError::NotString(name.into())),
            }
        }
    }

    impl<'de> Deserialize<'de> for Attribute<'de> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct AttributeVisitor;
            impl<'de> Visitor<'de> for AttributeVisitor {
                type Value = Attribute<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(Attribute::String(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(Attribute::String(Cow::Owned(v.to_string())))
                }
                fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                    Ok(Attribute::String(Cow::Owned(v)))
                }
                fn visit_unit<E>(self) -> Result<Self::Value, E> {
                    Ok(Attribute::Absent)
                }
                fn visit_none<E>(self) -> Result<Self::Value, E> {
                    Ok(Attribute::Absent)
                }
                fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                    Ok(Attribute::Other)
                }
                fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                    Ok(Attribute::Other)
                }
                fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                    Ok(Attribute::Other)
                }
                fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                    Ok(Attribute::Other)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Attribute::Other)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(Attribute::Other)
                }
            }
            deserializer.deserialize_any(AttributeVisitor)
        }
    }

    #[derive(serde::Deserialize)]
    #[serde(field_identifier)]
    enum Field {
        #[serde(rename = "id")]
        Id,
        #[serde(rename = "subject")]
        Subject,
        #[serde(rename = "application")]
        Application,
        #[serde(rename = "device")]
        Device,
        #[serde(rename = "sender")]
        Sender,
        #[serde(rename = "datacontenttype")]
        ContentType,
        #[serde(rename = "data_base64")]
        DataBase64,
        #[serde(rename = "data")]
        Data,
        #[serde(other)]
        Other,
    }

    /// A structured event: a JSON object. A member given twice counts as its last occurrence, as
    /// in a JSON tree.
    #[derive(Default)]
    pub(super) struct RawEvent<'a> {
        pub id: Attribute<'a>,
        pub subject: Attribute<'a>,
        pub application: Attribute<'a>,
        pub device: Attribute<'a>,
        pub sender: Attribute<'a>,
        pub content_type: Attribute<'a>,
        pub data_base64: Attribute<'a>,
        pub data: Option<Value>,
    }

    impl<'de> Deserialize<'de> for RawEvent<'de> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct EventVisitor;
            impl<'de> Visitor<'de> for EventVisitor {
                type Value = RawEvent<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a CloudEvent (a JSON object)")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut event = RawEvent::default();
                    while let Some(field) = map.next_key::<Field>()? {
                        match field {
                            Field::Id => event.id = map.next_value()?,
                            Field::Subject => event.subject = map.next_value()?,
                            Field::Application => event.application = map.next_value()?,
                            Field::Device => event.device = map.next_value()?,
                            Field::Sender => event.sender = map.next_value()?,
                            Field::ContentType => event.content_type = map.next_value()?,
                            Field::DataBase64 => event.data_base64 = map.next_value()?,
                            Field::Data => event.data = Some(map.next_value()?),
                            Field::Other => {
                                map.next_value::<IgnoredAny>()?;
                            }
                        }
                    }
                    Ok(event)
                }
            }
            deserializer.deserialize_map(EventVisitor)
        }
    }
}

/// Whether an MQTT 5 message is in binary content mode: its attributes are user properties.
pub fn is_binary_mode(user_properties: &[(String, String)]) -> bool {
    user_properties
        .iter()
        .any(|(k, _)| k == "specversion" || k == "ce_specversion")
}

/// Parse an event in binary content mode: `payload` is the data, the attributes are user
/// properties (plain, or with the `ce_` prefix some bindings use).
pub fn parse_binary(
    payload: &[u8],
    content_type: Option<&str>,
    user_properties: &[(String, String)],
) -> Event {
    let attribute = |name: &str| {
        user_properties
            .iter()
            .find(|(k, _)| k == name || k.strip_prefix("ce_") == Some(name))
            .map(|(_, v)| v.clone())
    };
    let content_type = content_type
        .map(str::to_string)
        .or_else(|| attribute("datacontenttype"));
    let data = if payload.is_empty() {
        Data::None
    } else if content_type.as_deref().is_some_and(is_text) {
        match std::str::from_utf8(payload) {
            Ok(text) => Data::Text(text.to_string()),
            Err(_) => Data::Binary(payload.to_vec()),
        }
    } else {
        // JSON is kept as bytes and parsed only when Ajour needs it (LoRaWAN uplinks).
        Data::Binary(payload.to_vec())
    };
    Event {
        id: attribute("id"),
        subject: attribute("subject"),
        application: attribute("application"),
        device: attribute("device"),
        sender: attribute("sender"),
        content_type,
        data,
    }
}

fn is_text(content_type: &str) -> bool {
    content_type.split(';').next().map(str::trim) == Some("text/plain")
}

/// The DFU status in `event`, if it carries one. `topic_app` is the application named by the
/// topic the event came on, used when the event has no `application` extension.
///
/// `Ok(None)`: not Ajour's (another channel). `Err`: meant for Ajour but unusable.
pub fn dfu_request(event: &Event, topic_app: Option<&str>) -> Result<Option<DfuRequest>, EventError> {
    let Some((key, lorawan)) = dfu_key(event, topic_app)? else {
        return Ok(None);
    };
    let (status, command) = if lorawan {
        (frm_payload(&event.data)?, TTN_COMMAND)
    } else {
        (status_bytes(&event.data)?, DFU_SUBJECT)
    };
    Ok(Some(DfuRequest { key, command, status }))
}

/// [`dfu_request`], taking the status bytes out of the event rather than copying them.
fn into_dfu_request(event: Event, topic_app: Option<&str>) -> Result<Option<DfuRequest>, EventError> {
    let Some((key, lorawan)) = dfu_key(&event, topic_app)? else {
        return Ok(None);
    };
    let (status, command) = match event.data {
        data if lorawan => (frm_payload(&data)?, TTN_COMMAND),
        Data::Binary(bytes) if !bytes.is_empty() => (bytes, DFU_SUBJECT),
        data => (status_bytes(&data)?, DFU_SUBJECT),
    };
    Ok(Some(DfuRequest { key, command, status }))
}

/// The device a DFU event is from, and whether it is a LoRaWAN uplink; `None` when the event is
/// not a DFU status.
fn dfu_key(event: &Event, topic_app: Option<&str>) -> Result<Option<(Key, bool)>, EventError> {
    let subject = event.subject.as_deref().unwrap_or_default();
    let lorawan = event.sender.as_deref() == Some(TTN_SENDER) && subject == TTN_DFU_PORT;
    if subject != DFU_SUBJECT && !lorawan {
        return Ok(None);
    }
    // Only the cloud publishes on an application's topic; an event claiming another application
    // is not trusted to speak for it.
    if let (Some(event_app), Some(topic_app)) = (event.application.as_deref(), topic_app) {
        if event_app != topic_app {
            return Err(EventError::ApplicationMismatch {
                event: event_app.to_string(),
                topic: topic_app.to_string(),
            });
        }
    }
    let app = event
        .application
        .as_deref()
        .or(topic_app)
        .ok_or(EventError::NoApplication)?;
    let device = event.device.as_deref().ok_or(EventError::NoDevice)?;
    let app = AppName::parse(app).map_err(|e| EventError::InvalidName(e.to_string()))?;
    let device = DeviceName::parse(device).map_err(|e| EventError::InvalidName(e.to_string()))?;
    Ok(Some((Key::Device(app, device), lorawan)))
}

/// The DFU request in a message of Drogue's integration, whichever content mode it came in: binary
/// (MQTT 5 user property `content-mode: binary`) or structured. An event that names no
/// application is taken to be for the application of its topic ([`topic_application`]). What the
/// integration and every tool reading Drogue's stream use, so they cannot drift apart.
pub fn dfu_request_in(
    topic: &str,
    payload: &[u8],
    content_type: Option<&str>,
    user_properties: &[(String, String)],
) -> Result<Option<DfuRequest>, EventError> {
    let topic_app = topic_application(topic);
    if is_binary_mode(user_properties) {
        into_dfu_request(parse_binary(payload, content_type, user_properties), topic_app)
    } else {
        parse_structured(payload).and_then(|event| into_dfu_request(event, topic_app))
    }
}

/// The application a topic is for: `app/{app}` (or Drogue's aliases `a/`, `application/`).
pub fn topic_application(topic: &str) -> Option<&str> {
    ["app/", "a/", "application/"]
        .iter()
        .find_map(|prefix| topic.strip_prefix(prefix))
        .filter(|app| !app.is_empty() && !app.contains('/'))
}

/// The status bytes of a `dfu` event.
fn status_bytes(data: &Data) -> Result<Vec<u8>, EventError> {
    match data {
        Data::None => Err(EventError::NoData),
        Data::Binary(bytes) if bytes.is_empty() => Err(EventError::NoData),
        Data::Binary(bytes) => Ok(bytes.clone()),
        // A CBOR status is never valid UTF-8 (its first byte is a map header), so text data can
        // only carry one base64-encoded, as some gateways send it.
        Data::Text(text) => {
            let trimmed = text.trim();
            if trimmed.is_empty() {
                return Err(EventError::NoData);
            }
            base64::engine::general_purpose::STANDARD
                .decode(trimmed)
                .map_err(|e| EventError::Base64(format!("text data is not a base64 status: {e}")))
        }
        Data::Json(_) => Err(EventError::JsonStatus),
    }
}

/// The status bytes of a LoRaWAN uplink from The Things Network.
fn frm_payload(data: &Data) -> Result<Vec<u8>, EventError> {
    let json = match data {
        Data::Json(json) => json.clone(),
        Data::Binary(bytes) => {
            serde_json::from_slice(bytes).map_err(|e| EventError::NotJson(e.to_string()))?
        }
        Data::Text(text) => serde_json::from_str(text).map_err(|e| EventError::NotJson(e.to_string()))?,
        Data::None => return Err(EventError::NoData),
    };
    let payload = json["uplink_message"]["frm_payload"]
        .as_str()
        .ok_or(EventError::NoFrmPayload)?;
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| EventError::Base64(e.to_string()))
}

/// The attributes Drogue sets on a device event, for those who play the cloud (the simulator,
/// tests): `(name, value)` in the order Drogue writes them.
pub fn device_event_attributes(
    app: &str,
    device: &str,
    subject: &str,
    content_type: &str,
) -> Vec<(String, String)> {
    let attributes = [
        ("specversion", "1.0".to_string()),
        ("id", uuid::Uuid::new_v4().to_string()),
        ("type", EVENT_TYPE.to_string()),
        (
            "source",
            format!("drogue://{}/{}", percent_encode(app), percent_encode(device)),
        ),
        ("subject", subject.to_string()),
        (
            "time",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
        ("datacontenttype", content_type.to_string()),
        ("application", app.to_string()),
        ("device", device.to_string()),
        ("sender", device.to_string()),
        ("partitionkey", format!("{app}/{device}")),
        ("instance", "drogue".to_string()),
    ];
    attributes.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A structured CloudEvent (JSON) of a device publishing `data` on channel `subject`, as Drogue's
/// integration delivers it: binary data as `data_base64`.
pub fn structured_event(app: &str, device: &str, subject: &str, content_type: &str, data: &[u8]) -> Value {
    let mut object: Map<String, Value> = device_event_attributes(app, device, subject, content_type)
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    object.insert(
        "data_base64".into(),
        json!(base64::engine::general_purpose::STANDARD.encode(data)),
    );
    Value::Object(object)
}

/// Percent-encoding as Drogue applies it to `source`: everything but unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> Vec<(String, String, Value)> {
        let text = include_str!("../tests/data/drogue-events.json");
        let parsed: Value = serde_json::from_str(text).unwrap();
        parsed["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["topic"].as_str().unwrap().to_string(),
                    e["event"].clone(),
                )
            })
            .collect()
    }

    fn request_of(event: &Value) -> Result<Option<DfuRequest>, EventError> {
        let parsed = parse_structured(event.to_string().as_bytes())?;
        dfu_request(&parsed, Some("my-app"))
    }

    #[test]
    fn topics_name_applications() {
        assert_eq!(topic_application("app/my-app"), Some("my-app"));
        assert_eq!(topic_application("a/x"), Some("x"));
        assert_eq!(topic_application("application/y"), Some("y"));
        assert_eq!(topic_application("app/"), None);
        assert_eq!(topic_application("app/a/b"), None);
        assert_eq!(topic_application("command/a/b/dfu"), None);
    }

    #[test]
    fn every_vector_is_classified() {
        let vectors = vectors();
        assert_eq!(vectors.len(), 4);
        let mut seen = Vec::new();
        for (name, topic, event) in &vectors {
            assert_eq!(topic, "app/my-app", "{name}");
            let request = request_of(event).unwrap_or_else(|e| panic!("{name}: {e}"));
            seen.push(request.map(|r| {
                let status = ajour_protocol::decode_status(&r.status).unwrap();
                assert_eq!(status.version, b"0.1.0", "{name}");
                assert_eq!(status.mtu, Some(512), "{name}");
                r.command_topic()
            }));
        }
        assert_eq!(
            seen,
            [
                Some("command/my-app/dev-1/dfu".to_string()),
                Some("command/my-app/dev-2/dfu".to_string()),
                None,
                Some("command/my-app/lora-1/port:223".to_string()),
            ]
        );
    }

    #[test]
    fn binary_mode_gives_the_same_requests() {
        for (name, _, event) in vectors() {
            let structured = parse_structured(event.to_string().as_bytes()).unwrap();
            let (payload, content_type) = match &structured.data {
                Data::Binary(bytes) => (bytes.clone(), structured.content_type.clone()),
                Data::Json(json) => (json.to_string().into_bytes(), structured.content_type.clone()),
                other => panic!("{name}: {other:?}"),
            };
            let properties: Vec<(String, String)> = event
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| !k.starts_with("data"))
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            assert!(is_binary_mode(&properties));
            let binary = parse_binary(&payload, content_type.as_deref(), &properties);
            assert_eq!(
                dfu_request(&binary, None).unwrap(),
                dfu_request(&structured, None).unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn text_data_carries_a_base64_status() {
        let mut event = vectors()[1].2.clone();
        let encoded = event["data_base64"].take();
        let object = event.as_object_mut().unwrap();
        object.remove("data_base64");
        object.insert("datacontenttype".into(), json!("text/plain"));
        object.insert("data".into(), encoded);
        let request = request_of(&event).unwrap().unwrap();
        assert_eq!(
            ajour_protocol::decode_status(&request.status).unwrap().version,
            b"0.1.0"
        );

        object_set(&mut event, "data", json!("not a status"));
        assert!(matches!(request_of(&event), Err(EventError::Base64(_))));
    }

    fn object_set(event: &mut Value, key: &str, value: Value) {
        event.as_object_mut().unwrap().insert(key.into(), value);
    }

    #[test]
    fn bad_events_are_errors_not_panics() {
        let good = vectors()[1].2.clone();
        for payload in [&b""[..], b"not json", b"[1,2]", b"\"text\"", b"{\"subject\": 5}"] {
            assert!(parse_structured(payload).is_err(), "{payload:?}");
        }
        let cases: Vec<(&str, Value)> = vec![("bad base64", json!("!!!")), ("empty data", json!(""))];
        for (name, data) in cases {
            let mut event = good.clone();
            object_set(&mut event, "data_base64", data);
            assert!(request_of(&event).is_err(), "{name}");
        }
        for (field, value) in [
            ("device", json!("../../etc")),
            ("device", json!("a/b")),
            ("application", json!("UPPER")),
            ("device", json!("x".repeat(300))),
        ] {
            let mut event = good.clone();
            object_set(&mut event, field, value);
            let parsed = parse_structured(event.to_string().as_bytes()).unwrap();
            assert!(
                matches!(dfu_request(&parsed, None), Err(EventError::InvalidName(_))),
                "{field}"
            );
        }
        let mut event = good.clone();
        event.as_object_mut().unwrap().remove("device");
        assert_eq!(request_of(&event), Err(EventError::NoDevice));
        let mut event = good.clone();
        object_set(&mut event, "data", json!({"version": "1"}));
        event.as_object_mut().unwrap().remove("data_base64");
        assert_eq!(request_of(&event), Err(EventError::JsonStatus));
        let mut lora = vectors()[3].2.clone();
        lora["data"]["uplink_message"]
            .as_object_mut()
            .unwrap()
            .remove("frm_payload");
        assert_eq!(request_of(&lora), Err(EventError::NoFrmPayload));
    }

    #[test]
    fn the_topic_names_the_application_when_the_event_does_not() {
        let mut event = vectors()[0].2.clone();
        event.as_object_mut().unwrap().remove("application");
        let parsed = parse_structured(event.to_string().as_bytes()).unwrap();
        assert_eq!(dfu_request(&parsed, None), Err(EventError::NoApplication));
        let request = dfu_request(&parsed, Some("other-app")).unwrap().unwrap();
        assert_eq!(request.command_topic(), "command/other-app/dev-1/dfu");

        // An event on one application's topic does not speak for another.
        let parsed = parse_structured(vectors()[0].2.to_string().as_bytes()).unwrap();
        assert!(matches!(
            dfu_request(&parsed, Some("other-app")),
            Err(EventError::ApplicationMismatch { .. })
        ));
    }

    #[test]
    fn built_events_parse_back() {
        let status = ajour_protocol::encode_status(
            &ajour_protocol::Status::first("1.2.3", Some(128), Some(7)),
            ajour_protocol::Encoding::Packed,
        );
        let event = structured_event("fleet", "dev-1", "dfu", "application/cbor", &status);
        assert_eq!(event["source"], "drogue://fleet/dev%2D1");
        let request = dfu_request(&parse_structured(event.to_string().as_bytes()).unwrap(), None)
            .unwrap()
            .unwrap();
        assert_eq!(
            ajour_protocol::decode_status(&request.status).unwrap(),
            ajour_protocol::Status::first("1.2.3", Some(128), Some(7))
        );
    }
}
