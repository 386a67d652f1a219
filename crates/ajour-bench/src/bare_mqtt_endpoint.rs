//! The minimal MQTT device endpoint: the least a server must do per block over MQTT 3.1.1 or 5,
//! as the baseline of `ajour-bench mqtt-endpoint`. It shares no code with Ajour: rumqttc's packet
//! codecs (`rumqttc::mqttbytes::v4` for 3.1.1, `rumqttc::v5::mqttbytes::v5` for 5) and the
//! baselines' own wire ([`crate::bare_wire`]).
//!
//! A task per TCP connection: it reads CONNECT (either version) and answers CONNACK success
//! without looking at the credentials; grants every SUBSCRIBE; for each PUBLISH to `dfu` it
//! acknowledges it (PUBACK, at QoS 1, as the devices publish), takes the payload as a status,
//! slices the command from the image in memory and publishes it on `command/inbox//dfu` at QoS 0;
//! answers PINGREQ. Whatever a read turns up is answered before the answers are written, in one
//! write. Nothing else: no credentials, no registry, no routing between connections (the command
//! goes back on the connection the status came on), no topic checks, no limits, no metrics.

use crate::bare::BareServerArgs;
use crate::bare_wire::{answer, Image};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The topic statuses are published to, and the one commands go out on.
const STATUS_TOPIC: &str = "dfu";
const COMMAND_TOPIC: &str = "command/inbox//dfu";
/// The largest packet read or written.
const MAX_PACKET: usize = 1024 * 1024;

pub async fn serve(args: BareServerArgs) -> anyhow::Result<()> {
    let image = Arc::new(Image::new(
        args.version,
        crate::fleet::bench_image(args.image_size),
    ));
    let listener = TcpListener::bind(&args.listen).await?;
    println!(
        "bare MQTT endpoint listening on mqtt://{}",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of files, say: let open connections finish.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A status and its command are small packets each waiting on the other.
        let _ = stream.set_nodelay(true);
        let image = image.clone();
        tokio::spawn(async move {
            // A connection ends when its client leaves or sends what cannot be read.
            let _ = connection(stream, &image).await;
        });
    }
}

/// Serve one connection until the client closes it.
async fn connection(mut stream: TcpStream, image: &Image) -> anyhow::Result<()> {
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    // CONNECT: MQTT 5's reader refuses a 3.1.1 CONNECT (protocol level 4), which 3.1.1's reads.
    let v5 = loop {
        let mut attempt = input.clone();
        match v5::Packet::read(&mut attempt, Some(MAX_PACKET as u32)) {
            Ok(v5::Packet::Connect(..)) => {
                input = attempt;
                let connack = v5::ConnAck {
                    session_present: false,
                    code: v5::ConnectReturnCode::Success,
                    properties: None,
                };
                v5::Packet::ConnAck(connack).write(&mut output, None)?;
                break true;
            }
            Err(rumqttc::v5::mqttbytes::Error::InvalidProtocolLevel(4)) => {
                match v4::Packet::read(&mut input, MAX_PACKET)? {
                    v4::Packet::Connect(_) => {}
                    other => anyhow::bail!("{other:?} before CONNECT"),
                }
                let connack = v4::ConnAck::new(v4::ConnectReturnCode::Success, false);
                v4::Packet::ConnAck(connack).write(&mut output, MAX_PACKET)?;
                break false;
            }
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {
                if stream.read_buf(&mut input).await? == 0 {
                    return Ok(());
                }
            }
            Ok(other) => anyhow::bail!("{other:?} before CONNECT"),
            Err(error) => return Err(error.into()),
        }
    };
    loop {
        // Every whole packet read is answered, then the answers written at once.
        loop {
            let more = if v5 {
                match v5::Packet::read(&mut input, Some(MAX_PACKET as u32)) {
                    Ok(packet) => {
                        let Some(replies) = respond_v5(packet, image) else {
                            return Ok(());
                        };
                        for reply in replies {
                            reply.write(&mut output, None)?;
                        }
                        true
                    }
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => false,
                    Err(error) => return Err(error.into()),
                }
            } else {
                match v4::Packet::read(&mut input, MAX_PACKET) {
                    Ok(packet) => {
                        let Some(replies) = respond_v4(packet, image) else {
                            return Ok(());
                        };
                        for reply in replies {
                            reply.write(&mut output, MAX_PACKET)?;
                        }
                        true
                    }
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => false,
                    Err(error) => return Err(error.into()),
                }
            };
            if !more {
                break;
            }
        }
        if !output.is_empty() {
            stream.write_all(&output).await?;
            output.clear();
        }
        if stream.read_buf(&mut input).await? == 0 {
            return Ok(());
        }
    }
}

/// What answers an MQTT 3.1.1 packet; `None` to close the connection (DISCONNECT).
fn respond_v4(packet: v4::Packet, image: &Image) -> Option<Vec<v4::Packet>> {
    use rumqttc::mqttbytes::QoS;
    Some(match packet {
        v4::Packet::Publish(publish) => {
            let mut replies = Vec::with_capacity(2);
            if publish.qos == QoS::AtLeastOnce {
                replies.push(v4::Packet::PubAck(v4::PubAck::new(publish.pkid)));
            }
            if publish.topic == STATUS_TOPIC {
                if let Some(command) = answer(image, &publish.payload) {
                    replies.push(v4::Packet::Publish(v4::Publish::new(
                        COMMAND_TOPIC,
                        QoS::AtMostOnce,
                        command,
                    )));
                }
            }
            replies
        }
        v4::Packet::Subscribe(subscribe) => {
            let codes = subscribe
                .filters
                .iter()
                .map(|filter| v4::SubscribeReasonCode::Success(filter.qos))
                .collect();
            vec![v4::Packet::SubAck(v4::SubAck::new(subscribe.pkid, codes))]
        }
        v4::Packet::PingReq => vec![v4::Packet::PingResp],
        v4::Packet::Disconnect => return None,
        _ => Vec::new(),
    })
}

/// What answers an MQTT 5 packet; `None` to close the connection (DISCONNECT).
fn respond_v5(packet: v5::Packet, image: &Image) -> Option<Vec<v5::Packet>> {
    use rumqttc::v5::mqttbytes::QoS;
    Some(match packet {
        v5::Packet::Publish(publish) => {
            let mut replies = Vec::with_capacity(2);
            if publish.qos == QoS::AtLeastOnce {
                replies.push(v5::Packet::PubAck(v5::PubAck::new(publish.pkid, None)));
            }
            if publish.topic == STATUS_TOPIC.as_bytes() {
                if let Some(command) = answer(image, &publish.payload) {
                    replies.push(v5::Packet::Publish(v5::Publish::new(
                        COMMAND_TOPIC,
                        QoS::AtMostOnce,
                        command,
                        None,
                    )));
                }
            }
            replies
        }
        v5::Packet::Subscribe(subscribe) => {
            let return_codes = subscribe
                .filters
                .iter()
                .map(|filter| v5::SubscribeReasonCode::Success(filter.qos))
                .collect();
            vec![v5::Packet::SubAck(v5::SubAck {
                pkid: subscribe.pkid,
                return_codes,
                properties: None,
            })]
        }
        v5::Packet::PingReq(_) => vec![v5::Packet::PingResp(v5::PingResp)],
        v5::Packet::Disconnect(_) => return None,
        _ => Vec::new(),
    })
}
