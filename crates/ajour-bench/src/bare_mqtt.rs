//! The minimal MQTT server: the least a server behind Drogue's MQTT integration must do per
//! block, as the baseline of `ajour-bench mqtt`. It shares no code with Ajour: rumqttc directly
//! (MQTT 5, as the integration speaks by default), its own serde struct for the structured
//! CloudEvent, its own decoding of the CBOR status (serde derive over `serde_cbor_2`, which reads
//! both the packed and the named form), the block sliced from an image held in memory, and the
//! command's CBOR bytes written by hand (the packed form of `../shared/docs/wire-protocol.md`; a
//! unit test proves them equal to `ajour_protocol`'s).
//!
//! Per message it decodes the event and the status, slices the image and publishes the command on
//! `command/{app}/{device}/dfu` at QoS 1 (as the integration does), all on the connection's own
//! task. Nothing else: no registry, no authentication, no status tracking, no metrics.

use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ClientError, Event, EventLoop, MqttOptions, Request};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct BareMqttServerArgs {
    /// The broker, `mqtt://HOST:PORT`.
    #[arg(long)]
    pub broker: String,
    /// The application whose events are answered.
    #[arg(long, default_value = "bench")]
    pub app: String,
    #[arg(long, default_value_t = 65536)]
    pub image_size: usize,
    #[arg(long, default_value = "2.0.0")]
    pub version: String,
}

/// Publishes the connection may queue. Each device waits for the answer to its status before it
/// sends another, so this is far more than a fleet of the benchmark's sizes ever has outstanding;
/// should it fill, a publish waits in a task of its own.
const QUEUE: usize = 64 * 1024;

/// The largest packet sent or received.
const MAX_PACKET: u32 = 1024 * 1024;

pub async fn serve(args: BareMqttServerArgs) -> anyhow::Result<()> {
    let image = Image::new(args.version, crate::fleet::bench_image(args.image_size));
    let (client, mut eventloop) = connect(&args.broker)?;
    let filter = format!("app/{}", args.app);
    let started = tokio::time::Instant::now();
    let mut subscribed = false;
    let mut buffer = Vec::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => client
                .try_subscribe(filter.clone(), QoS::AtLeastOnce)
                .context("subscribing")?,
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if !ack
                    .return_codes
                    .iter()
                    .all(|code| matches!(code, SubscribeReasonCode::Success(_)))
                {
                    bail!("the broker refused the subscription to {filter}");
                }
                if !subscribed {
                    subscribed = true;
                    println!("bare MQTT server listening on {}", args.broker);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                match answer(&image, &args.app, &publish.payload, &mut buffer) {
                    Some((topic, command)) => send(&client, topic, command),
                    None => tracing::warn!("bare MQTT server: not a DFU status"),
                }
            }
            Ok(_) => {}
            Err(error) => {
                // The benchmark's own broker on loopback: losing it ends the run.
                if subscribed || started.elapsed() > Duration::from_secs(30) {
                    bail!("bare MQTT server: connection lost: {error}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A client for the broker at `mqtt://host:port`: clean start, no Nagle (a status and its command
/// are small packets each waiting on the other).
fn connect(broker: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let address = broker
        .strip_prefix("mqtt://")
        .or_else(|| broker.strip_prefix("tcp://"))
        .with_context(|| format!("{broker}: give the broker as mqtt://HOST:PORT"))?;
    let (host, port) = address
        .rsplit_once(':')
        .with_context(|| format!("{broker}: no port"))?;
    let port = port.parse().with_context(|| format!("{broker}: bad port"))?;
    let mut options = MqttOptions::new(format!("bench-bare-{}", std::process::id()), host, port);
    options
        .set_clean_start(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(MAX_PACKET));
    let mut network = options.network_options();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    Ok(AsyncClient::new(options, QUEUE))
}

/// Publish at QoS 1 without waiting; if the queue is ever full, wait for room in a task.
fn send(client: &AsyncClient, topic: String, command: Vec<u8>) {
    match client.try_publish(topic, QoS::AtLeastOnce, false, command) {
        Ok(()) => {}
        Err(ClientError::TryRequest(Request::Publish(publish))) => {
            let client = client.clone();
            tokio::spawn(async move {
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                if let Err(error) = client
                    .publish_bytes(topic, QoS::AtLeastOnce, false, publish.payload)
                    .await
                {
                    tracing::warn!(%error, "bare MQTT server: publishing a command failed");
                }
            });
        }
        Err(error) => tracing::warn!(%error, "bare MQTT server: publishing a command failed"),
    }
}

/// The image served: its version, bytes and SHA-256.
struct Image {
    version: String,
    bytes: Vec<u8>,
    checksum: [u8; 32],
}

impl Image {
    fn new(version: String, bytes: Vec<u8>) -> Self {
        let checksum = Sha256::digest(&bytes).into();
        Self {
            version,
            bytes,
            checksum,
        }
    }
}

/// What the structured CloudEvent carries that is needed here; everything else is skipped.
#[derive(Deserialize)]
struct CloudEvent<'a> {
    #[serde(borrow)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow)]
    application: Option<Cow<'a, str>>,
    #[serde(borrow)]
    device: Option<Cow<'a, str>>,
    /// CBOR data (`application/cbor`, or octet-stream when the device gave no type).
    #[serde(borrow)]
    data_base64: Option<Cow<'a, str>>,
}

/// A device's status, in the packed form (integer keys) or the named one: serde's derived field
/// visitor takes a field's index as readily as its name.
#[derive(Debug, Deserialize, PartialEq)]
struct Status<'a> {
    #[serde(borrow, with = "serde_bytes")]
    version: Cow<'a, [u8]>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    correlation_id: Option<u32>,
    #[serde(default, borrow)]
    update: Option<Update<'a>>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct Update<'a> {
    #[serde(borrow, with = "serde_bytes")]
    version: Cow<'a, [u8]>,
    offset: u32,
}

/// The command topic and bytes answering the event `payload`; `None` when it is not a DFU status.
/// `buffer` is scratch space for the decoded data.
fn answer(image: &Image, app: &str, payload: &[u8], buffer: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let event: CloudEvent = serde_json::from_slice(payload).ok()?;
    if event.subject.as_deref() != Some("dfu") {
        return None;
    }
    let device = event.device?;
    let app = event.application.as_deref().unwrap_or(app);
    buffer.clear();
    base64::engine::general_purpose::STANDARD
        .decode_vec(event.data_base64?.as_bytes(), buffer)
        .ok()?;
    let status: Status = serde_cbor_2::from_slice(buffer).ok()?;
    Some((format!("command/{app}/{device}/dfu"), command(image, &status)))
}

/// The rule: the target's version → Sync; else the next `min(mtu or 512, rest)` bytes from the
/// reported offset when the device is writing this version (else from 0); past the end → Swap.
fn command(image: &Image, status: &Status) -> Vec<u8> {
    let version = image.version.as_bytes();
    let cid = status.correlation_id;
    if *status.version == *version {
        return sync(version, cid);
    }
    let size = image.bytes.len();
    let offset = match &status.update {
        Some(update) if *update.version == *version && update.offset as usize <= size => {
            update.offset as usize
        }
        _ => 0,
    };
    if offset >= size {
        return swap(version, cid, &image.checksum);
    }
    let mtu = match status.mtu {
        None | Some(0) => 512,
        Some(mtu) => (mtu as usize).min(64 * 1024),
    };
    let end = size.min(offset + mtu);
    write(version, cid, offset as u32, &image.bytes[offset..end])
}

// The packed CBOR form of the commands: a one-entry map {variant index: {field index: value}},
// `null` for an absent option, byte strings for versions, data and checksums.

fn sync(version: &[u8], cid: Option<u32>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + version.len());
    out.extend([0xa1, 0x01, 0xa3, 0x00]);
    bytes(&mut out, version);
    out.push(0x01);
    option(&mut out, cid);
    out.extend([0x02, 0xf6]);
    out
}

fn write(version: &[u8], cid: Option<u32>, offset: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + version.len() + data.len());
    out.extend([0xa1, 0x02, 0xa4, 0x00]);
    bytes(&mut out, version);
    out.push(0x01);
    option(&mut out, cid);
    out.push(0x02);
    head(&mut out, 0, offset.into());
    out.push(0x03);
    bytes(&mut out, data);
    out
}

fn swap(version: &[u8], cid: Option<u32>, checksum: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + version.len());
    out.extend([0xa1, 0x03, 0xa3, 0x00]);
    bytes(&mut out, version);
    out.push(0x01);
    option(&mut out, cid);
    out.push(0x02);
    bytes(&mut out, checksum);
    out
}

fn option(out: &mut Vec<u8>, value: Option<u32>) {
    match value {
        Some(value) => head(out, 0, value.into()),
        None => out.push(0xf6),
    }
}

fn bytes(out: &mut Vec<u8>, value: &[u8]) {
    head(out, 2, value.len() as u64);
    out.extend_from_slice(value);
}

/// A CBOR item head: major type and argument, in the shortest form.
fn head(out: &mut Vec<u8>, major: u8, value: u64) {
    let major = major << 5;
    match value {
        0..=23 => out.push(major | value as u8),
        24..=0xff => out.extend([major | 24, value as u8]),
        0x100..=0xffff => {
            out.push(major | 25);
            out.extend((value as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(major | 26);
            out.extend((value as u32).to_be_bytes());
        }
        _ => {
            out.push(major | 27);
            out.extend(value.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    //! The baseline must send exactly what Ajour sends for the same status, or the comparison
    //! means nothing: its hand-written bytes are checked against `ajour_protocol` and
    //! `ajour_engine` here (and only here).

    use super::*;
    use ajour_engine::{decide, EngineConfig, FirmwareImage, Target};
    use ajour_protocol::{encode_command, encode_status, Encoding, UpdateStatus};

    fn images(size: usize) -> (Image, FirmwareImage) {
        let bytes = crate::fleet::bench_image(size);
        (
            Image::new("2.0.0".into(), bytes.clone()),
            FirmwareImage::new("2.0.0", bytes).unwrap(),
        )
    }

    fn statuses() -> Vec<ajour_protocol::Status> {
        let mut statuses = Vec::new();
        for cid in [
            None,
            Some(0),
            Some(23),
            Some(24),
            Some(255),
            Some(256),
            Some(70_000),
            Some(u32::MAX),
        ] {
            for mtu in [None, Some(0), Some(100), Some(512), Some(4096), Some(1 << 20)] {
                let first = |version: &str| ajour_protocol::Status {
                    version: version.as_bytes().to_vec(),
                    mtu,
                    correlation_id: cid,
                    update: None,
                };
                statuses.push(first("1.0.0"));
                statuses.push(first("2.0.0"));
                for (version, offset) in [
                    ("2.0.0", 0),
                    ("2.0.0", 512),
                    ("2.0.0", 70_000),
                    ("2.0.0", 99_999),
                    ("2.0.0", 100_000),
                    ("2.0.0", 100_001),
                    ("3.0.0", 512),
                ] {
                    let mut status = first("1.0.0");
                    status.update = Some(UpdateStatus {
                        version: version.as_bytes().to_vec(),
                        offset,
                    });
                    statuses.push(status);
                }
            }
        }
        statuses
    }

    #[test]
    fn commands_are_byte_for_byte_ajours() {
        let (image, ajour_image) = images(100_000);
        let config = EngineConfig::default();
        let mut checked = 0;
        for status in statuses() {
            for encoding in [Encoding::Packed, Encoding::Named] {
                let encoded = encode_status(&status, encoding);
                let ours: Status = serde_cbor_2::from_slice(&encoded)
                    .unwrap_or_else(|e| panic!("{status:?} ({encoding:?}): {e}"));
                let expected = encode_command(&decide(&status, Target::Ready(&ajour_image), &config).command);
                assert_eq!(command(&image, &ours), expected, "{status:?} ({encoding:?})");
                checked += 1;
            }
        }
        assert!(checked > 500);
    }

    #[test]
    fn the_protocol_documents_example() {
        // Write{version "0.1.1", cid null, offset 0, data "hello"}, from the wire-protocol notes.
        assert_eq!(
            write(b"0.1.1", None, 0, b"hello"),
            [
                0xa1, 0x02, 0xa4, 0x00, 0x45, b'0', b'.', b'1', b'.', b'1', 0x01, 0xf6, 0x02, 0x00, 0x03,
                0x45, b'h', b'e', b'l', b'l', b'o'
            ]
        );
    }

    #[test]
    fn events_as_the_simulator_publishes_them_are_answered() {
        let (image, _) = images(65536);
        let status = ajour_protocol::Status {
            version: b"1.0.0".to_vec(),
            mtu: Some(512),
            correlation_id: Some(7),
            update: None,
        };
        let data = encode_status(&status, Encoding::Packed);
        let event = ajour_drogue::event::structured_event("bench", "dev-1", "dfu", "application/cbor", &data);
        let mut buffer = Vec::new();
        let (topic, bytes) = answer(&image, "bench", event.to_string().as_bytes(), &mut buffer).unwrap();
        assert_eq!(topic, "command/bench/dev-1/dfu");
        let command = ajour_protocol::decode_command(&bytes).unwrap();
        assert_eq!(command.correlation_id(), Some(7));
        assert_eq!(command.kind(), "write");

        let other =
            ajour_drogue::event::structured_event("bench", "dev-1", "telemetry", "application/cbor", &data);
        assert!(answer(&image, "bench", other.to_string().as_bytes(), &mut buffer).is_none());
        assert!(answer(&image, "bench", b"not json", &mut buffer).is_none());
    }
}
