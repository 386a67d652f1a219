//! MQTT 3.1.1 and 5 packets as the endpoint sees them: one version-neutral vocabulary over
//! rumqttc's two codecs, so the session is written once. A connection's version is fixed by its
//! CONNECT ([`read_connect`]); every later packet is read and written in it.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as V5QoS;

/// The protocol version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        }
    }
}

/// A client's CONNECT: what signing in needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    /// Seconds; 0 is "no keep-alive" (the endpoint's idle timeout applies).
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT 5 only: the largest packet the client accepts.
    pub max_packet_size: Option<u32>,
}

/// What a client sends after its CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Publish(Publish),
    /// PUBREL of a QoS 2 publish: answered PUBCOMP.
    PubRel {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, QoS)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// Acknowledgements of what the endpoint sent (it sends at QoS 0, so none are expected);
    /// passed over.
    Ack,
    /// A packet no client sends to a server (a second CONNECT, CONNACK, SUBACK, AUTH...).
    Unexpected(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub qos: QoS,
    pub pkid: u16,
    pub payload: Bytes,
    /// MQTT 5's correlation data, echoed on the command answering this publish.
    pub correlation: Option<Bytes>,
}

/// Why CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    BadUserNameOrPassword,
    NotAuthorized,
    ServerUnavailable,
    TooManyAttempts,
}

/// What a PUBLISH at QoS 1 is acknowledged with (MQTT 5 carries the refusals; MQTT 3.1.1 has no
/// negative PUBACK, so the session closes the connection instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubAckCode {
    Success,
    NotAuthorized,
    TopicNameInvalid,
    PayloadFormatInvalid,
    /// The server cannot answer now (the registry is down); the client may try again.
    Unavailable,
}

/// One filter's outcome in a SUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeCode {
    Granted(QoS),
    NotAuthorized,
    TopicFilterInvalid,
}

/// Why the server closes a connection (said in MQTT 5's DISCONNECT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    ProtocolError,
    NotAuthorized,
    TopicNameInvalid,
    PacketTooLarge,
    KeepAliveTimeout,
    ServerShuttingDown,
}

/// What the endpoint sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    ConnAck {
        refused: Option<ConnectRefusal>,
        /// MQTT 5: the largest packet the endpoint accepts, and why it refused.
        max_packet_size: u32,
        reason: Option<String>,
    },
    PubAck {
        pkid: u16,
        code: PubAckCode,
        reason: Option<String>,
    },
    PubRec {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        codes: Vec<SubscribeCode>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    /// A command, at QoS 0.
    Publish {
        topic: String,
        payload: Bytes,
        correlation: Option<Bytes>,
    },
    /// MQTT 5 only; nothing is written for MQTT 3.1.1, whose server closes without a word.
    Disconnect {
        reason: DisconnectReason,
        text: String,
    },
}

/// Why bytes could not be read as a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The packet is larger than the endpoint accepts.
    TooLarge(usize),
    /// Not MQTT 3.1.1 or 5 (MQTT 3.1's `MQIsdp` included): refused with CONNACK 0x01.
    UnsupportedVersion,
    /// The first packet is not a CONNECT.
    NotConnect,
    Malformed(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TooLarge(size) => write!(f, "a packet of {size} bytes is larger than allowed"),
            ReadError::UnsupportedVersion => f.write_str("only MQTT 3.1.1 and 5 are spoken here"),
            ReadError::NotConnect => f.write_str("the first packet must be CONNECT"),
            ReadError::Malformed(why) => write!(f, "malformed packet: {why}"),
        }
    }
}

/// The first packet of a connection, once whole in `buffer` (`Ok(None)`: more bytes needed).
/// Its protocol level chooses the codec for the rest of the connection.
pub fn read_connect(buffer: &mut BytesMut, max_size: usize) -> Result<Option<Connect>, ReadError> {
    // The whole packet first (its size checked): the codecs read it from there.
    match rumqttc::mqttbytes::check(buffer.iter(), max_size) {
        Ok(_) => {}
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
            return Err(ReadError::TooLarge(size))
        }
        Err(error) => return Err(ReadError::Malformed(format!("{error:?}"))),
    };
    if buffer[0] >> 4 != 1 {
        return Err(ReadError::NotConnect);
    }
    // Variable header: after the type byte and the remaining length (1 to 4 bytes, the last
    // without its top bit), the protocol name (2-byte length, "MQTT"), then the protocol level.
    let Some(length_bytes) = buffer.iter().skip(1).take(4).position(|b| b & 0x80 == 0) else {
        return Err(ReadError::Malformed("remaining length".into()));
    };
    let start = 2 + length_bytes;
    let level = match buffer.get(start..start + 7) {
        Some([0, 4, b'M', b'Q', b'T', b'T', level]) => *level,
        _ => return Err(ReadError::UnsupportedVersion),
    };
    // The codecs give a user name without a password an empty password; the connect flags (the
    // byte after the level) say whether one was sent: without one, a client certificate may
    // sign the client in.
    let password_sent = buffer
        .get(start + 7)
        .is_some_and(|flags| flags & PASSWORD_FLAG != 0);
    match level {
        4 => match v4::Packet::read(buffer, max_size).map_err(malformed)? {
            v4::Packet::Connect(connect) => Ok(Some(Connect {
                version: Version::V311,
                client_id: connect.client_id,
                keep_alive: connect.keep_alive,
                username: connect.login.as_ref().map(|l| l.username.clone()),
                password: connect.login.map(|l| l.password).filter(|_| password_sent),
                max_packet_size: None,
            })),
            _ => Err(ReadError::NotConnect),
        },
        5 => match v5::Packet::read(buffer, Some(max_u32(max_size))).map_err(malformed5)? {
            v5::Packet::Connect(connect, _will, login) => Ok(Some(Connect {
                version: Version::V5,
                client_id: connect.client_id,
                keep_alive: connect.keep_alive,
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| l.password).filter(|_| password_sent),
                max_packet_size: connect.properties.and_then(|p| p.max_packet_size),
            })),
            _ => Err(ReadError::NotConnect),
        },
        _ => Err(ReadError::UnsupportedVersion),
    }
}

/// The CONNECT flag saying a password follows (MQTT 3.1.1 §3.1.2.9, MQTT 5 §3.1.2.9).
const PASSWORD_FLAG: u8 = 0x40;

/// MQTT 5's QoS in the one QoS type the session uses (the codecs have one each).
fn qos_of(qos: V5QoS) -> QoS {
    match qos {
        V5QoS::AtMostOnce => QoS::AtMostOnce,
        V5QoS::AtLeastOnce => QoS::AtLeastOnce,
        V5QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: QoS) -> V5QoS {
    match qos {
        QoS::AtMostOnce => V5QoS::AtMostOnce,
        QoS::AtLeastOnce => V5QoS::AtLeastOnce,
        QoS::ExactlyOnce => V5QoS::ExactlyOnce,
    }
}

fn max_u32(size: usize) -> u32 {
    u32::try_from(size).unwrap_or(u32::MAX)
}

fn malformed(error: rumqttc::mqttbytes::Error) -> ReadError {
    match error {
        rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size) => ReadError::TooLarge(size),
        error => ReadError::Malformed(format!("{error:?}")),
    }
}

fn malformed5(error: rumqttc::v5::mqttbytes::Error) -> ReadError {
    match error {
        rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { pkt_size, .. } => {
            ReadError::TooLarge(pkt_size)
        }
        error => ReadError::Malformed(format!("{error:?}")),
    }
}

/// The next packet once whole in `buffer` (`Ok(None)`: more bytes needed).
pub fn read(version: Version, buffer: &mut BytesMut, max_size: usize) -> Result<Option<Inbound>, ReadError> {
    match version {
        Version::V311 => match v4::Packet::read(buffer, max_size) {
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            read => Ok(Some(inbound_v4(read.map_err(malformed)?))),
        },
        Version::V5 => match v5::Packet::read(buffer, Some(max_u32(max_size))) {
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            read => Ok(Some(inbound_v5(read.map_err(malformed5)?))),
        },
    }
}

fn inbound_v4(packet: v4::Packet) -> Inbound {
    match packet {
        v4::Packet::Publish(p) => Inbound::Publish(Publish {
            topic: p.topic,
            qos: p.qos,
            pkid: p.pkid,
            payload: p.payload,
            correlation: None,
        }),
        v4::Packet::PubRel(p) => Inbound::PubRel { pkid: p.pkid },
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, f.qos)).collect(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect,
        v4::Packet::PubAck(_) | v4::Packet::PubRec(_) | v4::Packet::PubComp(_) => Inbound::Ack,
        v4::Packet::Connect(_) => Inbound::Unexpected("a second CONNECT"),
        v4::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Inbound::Unexpected("PINGRESP"),
    }
}

fn inbound_v5(packet: v5::Packet) -> Inbound {
    match packet {
        v5::Packet::Publish(p) => Inbound::Publish(Publish {
            // Topic aliases are not offered (CONNACK says 0), so the topic is always spelled out.
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            qos: qos_of(p.qos),
            pkid: p.pkid,
            payload: p.payload,
            correlation: p.properties.and_then(|p| p.correlation_data),
        }),
        v5::Packet::PubRel(p) => Inbound::PubRel { pkid: p.pkid },
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, qos_of(f.qos))).collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(_) => Inbound::Disconnect,
        v5::Packet::PubAck(_) | v5::Packet::PubRec(_) | v5::Packet::PubComp(_) => Inbound::Ack,
        v5::Packet::Connect(..) => Inbound::Unexpected("a second CONNECT"),
        v5::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Inbound::Unexpected("PINGRESP"),
        v5::Packet::Auth(_) => Inbound::Unexpected("AUTH (no enhanced authentication here)"),
    }
}

/// Append `packet` to `out` in `version`. A packet that cannot be written (larger than the
/// client accepts, `max_size`) is left out and `false` returned.
pub fn write(version: Version, packet: Outbound, out: &mut BytesMut, max_size: usize) -> bool {
    match version {
        Version::V311 => match outbound_v4(packet) {
            Some(packet) => packet.write(out, max_size).is_ok(),
            None => true,
        },
        Version::V5 => outbound_v5(packet).write(out, Some(max_u32(max_size))).is_ok(),
    }
}

fn outbound_v4(packet: Outbound) -> Option<v4::Packet> {
    Some(match packet {
        Outbound::ConnAck { refused, .. } => {
            let code = match refused {
                None => v4::ConnectReturnCode::Success,
                Some(ConnectRefusal::BadUserNameOrPassword) => v4::ConnectReturnCode::BadUserNamePassword,
                Some(ConnectRefusal::NotAuthorized) => v4::ConnectReturnCode::NotAuthorized,
                Some(ConnectRefusal::ServerUnavailable | ConnectRefusal::TooManyAttempts) => {
                    v4::ConnectReturnCode::ServiceUnavailable
                }
            };
            v4::Packet::ConnAck(v4::ConnAck::new(code, false))
        }
        // MQTT 3.1.1 has no negative acknowledgement: the session closes instead.
        Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        Outbound::PubRec { pkid } => v4::Packet::PubRec(v4::PubRec::new(pkid)),
        Outbound::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(pkid)),
        Outbound::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            codes
                .into_iter()
                .map(|code| match code {
                    SubscribeCode::Granted(qos) => v4::SubscribeReasonCode::Success(qos),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        Outbound::Publish { topic, payload, .. } => {
            v4::Packet::Publish(v4::Publish::from_bytes(topic, QoS::AtMostOnce, payload))
        }
        Outbound::Disconnect { .. } => return None,
    })
}

fn outbound_v5(packet: Outbound) -> v5::Packet {
    match packet {
        Outbound::ConnAck {
            refused,
            max_packet_size,
            reason,
        } => {
            let code = match refused {
                None => v5::ConnectReturnCode::Success,
                Some(ConnectRefusal::BadUserNameOrPassword) => v5::ConnectReturnCode::BadUserNamePassword,
                Some(ConnectRefusal::NotAuthorized) => v5::ConnectReturnCode::NotAuthorized,
                Some(ConnectRefusal::ServerUnavailable) => v5::ConnectReturnCode::ServerUnavailable,
                Some(ConnectRefusal::TooManyAttempts) => v5::ConnectReturnCode::ConnectionRateExceeded,
            };
            v5::Packet::ConnAck(v5::ConnAck {
                session_present: false,
                code,
                properties: Some(v5::ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: None,
                    // Statuses are answered whether they come at QoS 0, 1 or 2; commands go out
                    // at QoS 0 (a device that misses one sends its status again).
                    max_qos: None,
                    retain_available: Some(0),
                    max_packet_size: Some(max_packet_size),
                    assigned_client_identifier: None,
                    topic_alias_max: Some(0),
                    reason_string: reason,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: Some(1),
                    subscription_identifiers_available: Some(0),
                    shared_subscription_available: Some(0),
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                }),
            })
        }
        Outbound::PubAck { pkid, code, reason } => {
            let mut ack = v5::PubAck::new(
                pkid,
                reason.map(|reason| v5::PubAckProperties {
                    reason_string: Some(reason),
                    user_properties: Vec::new(),
                }),
            );
            ack.reason = match code {
                PubAckCode::Success => v5::PubAckReason::Success,
                PubAckCode::NotAuthorized => v5::PubAckReason::NotAuthorized,
                PubAckCode::TopicNameInvalid => v5::PubAckReason::TopicNameInvalid,
                PubAckCode::PayloadFormatInvalid => v5::PubAckReason::PayloadFormatInvalid,
                PubAckCode::Unavailable => v5::PubAckReason::ImplementationSpecificError,
            };
            v5::Packet::PubAck(ack)
        }
        Outbound::PubRec { pkid } => v5::Packet::PubRec(v5::PubRec::new(pkid, None)),
        Outbound::PubComp { pkid } => v5::Packet::PubComp(v5::PubComp::new(pkid, None)),
        Outbound::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: codes
                .into_iter()
                .map(|code| match code {
                    SubscribeCode::Granted(qos) => v5::SubscribeReasonCode::Success(qos_v5(qos)),
                    SubscribeCode::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                    SubscribeCode::TopicFilterInvalid => v5::SubscribeReasonCode::TopicFilterInvalid,
                })
                .collect(),
            properties: None,
        }),
        Outbound::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }),
        Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outbound::Publish {
            topic,
            payload,
            correlation,
        } => v5::Packet::Publish(v5::Publish::new(
            topic,
            V5QoS::AtMostOnce,
            payload,
            correlation.map(|correlation| v5::PublishProperties {
                correlation_data: Some(correlation),
                ..Default::default()
            }),
        )),
        Outbound::Disconnect { reason, text } => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: match reason {
                DisconnectReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                DisconnectReason::NotAuthorized => v5::DisconnectReasonCode::NotAuthorized,
                DisconnectReason::TopicNameInvalid => v5::DisconnectReasonCode::TopicNameInvalid,
                DisconnectReason::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                DisconnectReason::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                DisconnectReason::ServerShuttingDown => v5::DisconnectReasonCode::ServerShuttingDown,
            },
            properties: Some(v5::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(text),
                user_properties: Vec::new(),
                server_reference: None,
            }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn connect_v4(user: &str, pass: &str) -> BytesMut {
        let mut connect = v4::Connect::new("dev");
        connect.set_login(user, pass);
        let mut out = BytesMut::new();
        v4::Packet::Connect(connect).write(&mut out, 65_536).unwrap();
        out
    }

    fn connect_v5(user: &str, pass: &str) -> BytesMut {
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: "dev".into(),
            clean_start: true,
            properties: None,
        };
        let mut out = BytesMut::new();
        v5::Packet::Connect(connect, None, Some(v5::Login::new(user, pass)))
            .write(&mut out, None)
            .unwrap();
        out
    }

    #[test]
    fn the_connect_chooses_the_version() {
        let mut v4 = connect_v4("dev@app", "secret");
        let connect = read_connect(&mut v4, 1024).unwrap().unwrap();
        assert_eq!(connect.version, Version::V311);
        assert_eq!(connect.username.as_deref(), Some("dev@app"));
        assert_eq!(connect.password.as_deref(), Some("secret"));
        assert!(v4.is_empty());

        let mut v5 = connect_v5("dev@app", "secret");
        let connect = read_connect(&mut v5, 1024).unwrap().unwrap();
        assert_eq!(connect.version, Version::V5);
        assert_eq!(connect.keep_alive, 30);
        assert_eq!(connect.password.as_deref(), Some("secret"));
    }

    #[test]
    fn a_user_name_without_a_password_is_not_an_empty_password() {
        // The codecs leave the password out when it is empty: the password flag is not set.
        for mut connect in [connect_v4("dev@app", ""), connect_v5("dev@app", "")] {
            // Type, a one-byte length, the protocol name (6), the level: then the flags.
            assert_eq!(connect[9] & PASSWORD_FLAG, 0, "{connect:?}");
            let connect = read_connect(&mut connect, 1024).unwrap().unwrap();
            assert_eq!(connect.username.as_deref(), Some("dev@app"));
            assert_eq!(connect.password, None);
        }
    }

    #[test]
    fn a_partial_connect_waits_and_other_first_packets_are_refused() {
        let whole = connect_v4("dev@app", "secret");
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(read_connect(&mut part, 1024), Ok(None), "cut at {cut}");
        }
        let mut ping = BytesMut::from(&[0xC0u8, 0][..]);
        assert_eq!(read_connect(&mut ping, 1024), Err(ReadError::NotConnect));
        // MQTT 3.1 ("MQIsdp", level 3).
        let mut old = BytesMut::from(&[0x10u8, 8, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p'][..]);
        assert_eq!(read_connect(&mut old, 1024), Err(ReadError::UnsupportedVersion));
        let mut large = connect_v4("dev@app", &"x".repeat(2000));
        assert!(matches!(
            read_connect(&mut large, 1024),
            Err(ReadError::TooLarge(_))
        ));
    }

    #[test]
    fn refusals_are_spoken_in_each_version() {
        let mut out = BytesMut::new();
        let refused = Outbound::ConnAck {
            refused: Some(ConnectRefusal::NotAuthorized),
            max_packet_size: 8192,
            reason: Some("no".into()),
        };
        assert!(write(Version::V311, refused.clone(), &mut out, 1024));
        assert_eq!(&out[..], &[0x20, 2, 0, 5]);
        out.clear();
        assert!(write(Version::V5, refused, &mut out, 1024));
        let back = v5::Packet::read(&mut out, None).unwrap();
        let v5::Packet::ConnAck(ack) = back else {
            panic!("{back:?}")
        };
        assert_eq!(ack.code, v5::ConnectReturnCode::NotAuthorized);
        assert_eq!(ack.properties.unwrap().reason_string.as_deref(), Some("no"));
        // MQTT 3.1.1 has no DISCONNECT from the server: nothing is written.
        out.clear();
        let bye = Outbound::Disconnect {
            reason: DisconnectReason::NotAuthorized,
            text: "no".into(),
        };
        assert!(write(Version::V311, bye, &mut out, 1024));
        assert!(out.is_empty());
    }

    #[test]
    fn commands_carry_the_correlation_data_in_mqtt_5() {
        let mut out = BytesMut::new();
        let command = Outbound::Publish {
            topic: "command/inbox//dfu".into(),
            payload: Bytes::from_static(b"\x81\x00"),
            correlation: Some(Bytes::from_static(b"42")),
        };
        assert!(write(Version::V5, command, &mut out, 1024));
        let v5::Packet::Publish(publish) = v5::Packet::read(&mut out, None).unwrap() else {
            panic!()
        };
        assert_eq!(&publish.topic[..], b"command/inbox//dfu");
        assert_eq!(
            publish.properties.unwrap().correlation_data.as_deref(),
            Some(&b"42"[..])
        );
        // Larger than the client accepts: left out.
        let large = Outbound::Publish {
            topic: "command/inbox//dfu".into(),
            payload: Bytes::from(vec![0u8; 2000]),
            correlation: None,
        };
        assert!(!write(Version::V311, large, &mut out, 1024));
    }

    proptest! {
        #[test]
        fn no_bytes_panic_the_readers(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read_connect(&mut BytesMut::from(&bytes[..]), 8192);
            let _ = read(Version::V311, &mut BytesMut::from(&bytes[..]), 8192);
            let _ = read(Version::V5, &mut BytesMut::from(&bytes[..]), 8192);
        }

        #[test]
        fn no_connect_body_panics(tail in proptest::collection::vec(any::<u8>(), 0..120), level in 3u8..6) {
            let mut bytes = vec![0x10, u8::try_from(tail.len() + 7).unwrap(), 0, 4, b'M', b'Q', b'T', b'T', level];
            bytes.extend_from_slice(&tail);
            let _ = read_connect(&mut BytesMut::from(&bytes[..]), 8192);
        }
    }
}
