//! The bare MQTT server: the least a server behind Drogue's MQTT integration must do per block,
//! as the baseline of `ajour-bench mqtt`. It subscribes to `app/{app}` at QoS 1, parses each event
//! exactly as the real integration does (the same [`ajour_drogue::event`] functions), decides on
//! an image held in memory and publishes the command on `command/{app}/{device}/dfu` at QoS 1.
//! No registry, no authentication, no status tracking.

use ajour_client::mqtt::{connect, Incoming, Message, MqttConfig};
use ajour_drogue::event::{dfu_request_in, DfuRequest};
use ajour_engine::{decide, EngineConfig, FirmwareImage, Target};
use ajour_protocol::encode_command;
use anyhow::{bail, Context};
use clap::Args;
use std::time::Duration;
use tokio::sync::mpsc;

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

/// Requests (commands) the connection may queue.
const QUEUE: usize = 64 * 1024;

pub async fn serve(args: BareMqttServerArgs) -> anyhow::Result<()> {
    let image = FirmwareImage::new(args.version, crate::fleet::bench_image(args.image_size))?;
    let config = EngineConfig::default();
    let (client, mut connection) = connect(&MqttConfig::new(&args.broker, "ajour-bare"), QUEUE)?;
    let filter = format!("app/{}", args.app);

    // One task answers, as the integration's workers do; the connection only reads and parses,
    // as the integration's connection task does. Unbounded for the same reason: a connection
    // task waiting on the answering task would stop sending the commands it waits for.
    let (requests, mut pending) = mpsc::unbounded_channel::<DfuRequest>();
    let answering = client.clone();
    tokio::spawn(async move {
        while let Some(request) = pending.recv().await {
            let Ok(status) = ajour_protocol::decode_status(&request.status) else {
                tracing::warn!("bare MQTT server: not a DFU status");
                continue;
            };
            let command = encode_command(&decide(&status, Target::Ready(&image), &config).command);
            if let Err(error) = answering.publish(&request.command_topic(), command).await {
                tracing::warn!(%error, "bare MQTT server: publishing a command failed");
            }
        }
    });

    let started = tokio::time::Instant::now();
    let mut subscribed = false;
    loop {
        let polled = connection.poll().await;
        match polled {
            Ok(Incoming::Connected) => {
                let (client, filter) = (client.clone(), filter.clone());
                tokio::spawn(async move { client.subscribe(&filter, false).await });
            }
            Ok(Incoming::Subscribed { granted }) => {
                if !granted {
                    bail!("the broker refused the subscription to {filter}");
                }
                if !subscribed {
                    subscribed = true;
                    println!("bare MQTT server listening on {}", args.broker);
                }
            }
            Ok(Incoming::Message(message)) => match parse(&message) {
                Some(request) => requests.send(request).context("the answering task stopped")?,
                None => tracing::warn!(topic = %message.topic, "bare MQTT server: not a DFU status"),
            },
            Ok(Incoming::Other) => {}
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

/// The DFU request in a message, as the integration finds it.
fn parse(message: &Message) -> Option<DfuRequest> {
    dfu_request_in(
        &message.topic,
        &message.payload,
        message.content_type.as_deref(),
        &message.user_properties,
    )
    .ok()
    .flatten()
}
