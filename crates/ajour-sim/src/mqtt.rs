//! Devices on the MQTT endpoint (`ajour serve --mqtt-listen`), as Drogue's MQTT endpoint serves
//! them: each device connects with its own credentials (`device@app` and a password, or only a
//! client certificate over TLS), subscribes to
//! `command/inbox//dfu`, publishes its status to `dfu` and takes the command that comes back.
//!
//! Commands go out at QoS 0, and a connection can drop between a status and its answer: as on
//! Drogue's integration, a status unanswered within the command timeout is sent again, and the
//! answer to an earlier one is recognised by its correlation id and passed over.

use crate::{EncodedStatus, Link, LinkError};
use ajour_client::mqtt::{Inbox, MqttConfig};
use bytes::Bytes;
use std::time::Duration;

/// How long the endpoint has to confirm the subscription to the commands.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The topic a device publishes its status to, and the filter its commands arrive under.
pub const STATUS_TOPIC: &str = "dfu";
pub const COMMAND_FILTER: &str = "command/inbox//dfu";

/// One device's own MQTT connection to the endpoint. Dropping it closes the connection.
pub struct MqttLink {
    inbox: Inbox,
    url: String,
    command_timeout: Duration,
}

impl MqttLink {
    /// Connect as device `name` of `app` (user name `name@app`, `password`) to the endpoint of
    /// `endpoint` (its URL, version and TLS; its own user name and client id are replaced), and
    /// wait until the subscription to the device's commands is granted.
    pub async fn connect(
        endpoint: &MqttConfig,
        app: &str,
        name: &str,
        password: &str,
        command_timeout: Duration,
    ) -> Result<Self, LinkError> {
        Self::connect_as(endpoint, app, name, Some(password), command_timeout).await
    }

    /// [`Self::connect`] signing in by the client certificate in `endpoint.tls.client_cert`
    /// (over `mqtts://`), which names the device; its issuer finds the application. No user name
    /// is sent, and no password: the endpoint signs in by password whenever CONNECT has a user
    /// name (it reads one without a password as an empty password).
    pub async fn connect_by_certificate(
        endpoint: &MqttConfig,
        app: &str,
        name: &str,
        command_timeout: Duration,
    ) -> Result<Self, LinkError> {
        if endpoint.tls.client_cert.is_none() {
            return Err(LinkError::Protocol(format!(
                "{name}@{app}: no client certificate to sign in with"
            )));
        }
        Self::connect_as(endpoint, app, name, None, command_timeout).await
    }

    /// Connect as device `name` of `app`, with its password, or (`None`) with no credentials in
    /// CONNECT at all.
    async fn connect_as(
        endpoint: &MqttConfig,
        app: &str,
        name: &str,
        password: Option<&str>,
        command_timeout: Duration,
    ) -> Result<Self, LinkError> {
        let mut config = endpoint.clone();
        config.username = password.map(|_| format!("{name}@{app}"));
        config.password = password.map(str::to_string);
        config.client_id = ajour_client::mqtt::unique_client_id(name);
        let mut inbox = Inbox::connect(&config, vec![COMMAND_FILTER.to_string()])
            .map_err(|e| LinkError::Protocol(format!("MQTT set-up: {e}")))?;
        if !inbox.subscribed(1, SUBSCRIBE_TIMEOUT).await {
            return Err(LinkError::Connection(format!(
                "{} did not accept {name}@{app} and its subscription to {COMMAND_FILTER} within {SUBSCRIBE_TIMEOUT:?}",
                endpoint.url
            )));
        }
        Ok(Self {
            inbox,
            url: endpoint.url.clone(),
            command_timeout,
        })
    }
}

impl Link for MqttLink {
    fn answers_can_be_lost(&self) -> bool {
        true
    }

    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        let deadline = tokio::time::Instant::now() + self.command_timeout;
        self.inbox
            .client
            .publish(STATUS_TOPIC, status.bytes)
            .await
            .map_err(|e| LinkError::Connection(format!("publishing a status to {}: {e}", self.url)))?;
        loop {
            match tokio::time::timeout_at(deadline, self.inbox.messages.recv()).await {
                Err(_) => return Err(LinkError::NoAnswer),
                Ok(None) => return Err(LinkError::Stopped("the MQTT connection has stopped".into())),
                Ok(Some(message)) => {
                    // The answer to an earlier status, sent again since: pass over it. What
                    // cannot be read at all goes to the device, which says so.
                    let echoed = ajour_protocol::decode_command(&message.payload).map(|c| c.correlation_id());
                    if matches!(echoed, Ok(id) if id != status.correlation_id) {
                        continue;
                    }
                    return Ok(message.payload);
                }
            }
        }
    }
}
