//! The minimal MQTT server: the least a server behind Drogue's MQTT integration must do per
//! block, as the baseline of `ajour-bench mqtt`. It shares no code with Ajour: rumqttc directly
//! (MQTT 5, as the integration speaks by default), its own serde struct for the structured
//! CloudEvent, and the baselines' own wire code ([`crate::bare_wire`]: the status decoded with
//! `serde_cbor_2`, the command's bytes written by hand).
//!
//! Per message it decodes the event and the status, slices the image and publishes the command on
//! `command/{app}/{device}/dfu` at QoS 1 (as the integration does), all on the connection's own
//! task. Nothing else: no registry, no authentication, no status tracking, no metrics.

use crate::bare_wire::{command, Image, Status};
use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;
use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ClientError, Event, EventLoop, MqttOptions, Request};
use serde::Deserialize;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bare_wire::Image;
    use ajour_protocol::{encode_status, Encoding};

    #[test]
    fn events_as_the_simulator_publishes_them_are_answered() {
        let image = Image::new("2.0.0".into(), crate::fleet::bench_image(65536));
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
