//! How a device's statuses reach the server and its commands come back.

use crate::StatusEncoding;
use bytes::Bytes;
use std::future::Future;

/// One status on its way out: the bytes the device sends, and what a link may need to know about
/// them to send them as a real device of that kind would.
#[derive(Debug, Clone)]
pub struct EncodedStatus {
    pub bytes: Vec<u8>,
    pub encoding: StatusEncoding,
    /// The correlation id the status carries, which the command answering it echoes.
    pub correlation_id: Option<u32>,
}

/// Why a status got no command back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The server (or broker) cannot be reached now: refused, reset, timed out, or answering that
    /// it is unavailable, as while it restarts. A device tries again after a backoff.
    #[error("{0}")]
    Connection(String),
    /// No command answered the status in time, on a link that can lose messages
    /// ([`Link::answers_can_be_lost`]): the device sends its status again.
    #[error("no command answered the status in time")]
    NoAnswer,
    /// The server answered, but not with a command (refused credentials, a status it could not
    /// read): trying again would get the same answer.
    #[error("{0}")]
    Protocol(String),
    /// The link itself has stopped (its connection was closed for good).
    #[error("{0}")]
    Stopped(String),
}

/// A device's way to the server: one status out, one command back, both as bytes. MQTT and CoAP
/// device endpoints will be more links.
pub trait Link: Send {
    /// Whether a status can go unanswered, or be answered late (a device behind Drogue's MQTT
    /// integration: Drogue does not buffer commands). Then each status carries a correlation id
    /// of its own, [`LinkError::NoAnswer`] makes the device send its status again, and the link
    /// hands back only the command that echoes the status it was given.
    fn answers_can_be_lost(&self) -> bool {
        false
    }

    /// Send `status` and return the command that answers it.
    fn exchange(&mut self, status: EncodedStatus) -> impl Future<Output = Result<Bytes, LinkError>> + Send;
}
