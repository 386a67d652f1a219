//! A device on the CoAP endpoint (`ajour serve --coap-listen`), as Drogue's CoAP devices speak
//! to it: each status is a Confirmable `POST /v1/dfu` carrying the credentials in option 4209,
//! retransmitted as RFC 7252 §4.2 says until the answer comes, and the command is the payload of
//! a 2.05 answer.
//!
//! The link is a client of its own: it shares nothing with the server's endpoint (only the
//! message format, `coap-lite`, and the numbers Drogue chose), so a server that answered wrongly
//! fails the device rather than agreeing with itself.

use crate::{EncodedStatus, Link, LinkError, StatusEncoding};
use anyhow::Context;
use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// The CoAP message format the link speaks, for tests and tools that build messages by hand.
pub use coap_lite;

/// CoAP's port when a `coap://` URL names none.
pub const DEFAULT_PORT: u16 = 5683;

/// Drogue's option carrying a device's credentials, `Basic base64(device@app:password)`.
pub const AUTHORIZATION_OPTION: u16 = 4209;

/// Drogue's option naming the command an answer carries.
pub const COMMAND_OPTION: u16 = 4210;

/// Content-Format application/cbor.
pub const CONTENT_FORMAT_CBOR: u16 = 60;

/// RFC 7252 §4.8: the first wait for an answer is ACK_TIMEOUT times a random factor from 1 to
/// ACK_RANDOM_FACTOR; it doubles with each of at most MAX_RETRANSMIT retransmissions.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
pub const ACK_RANDOM_FACTOR: f64 = 1.5;
pub const MAX_RETRANSMIT: u32 = 4;

/// How long an answer announced by an empty ACK (a separate response, §5.2.2) is waited for.
const SEPARATE_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A datagram is read into this much; the server's answers are at most 1152 bytes.
const RECEIVE_BUFFER: usize = 8192;

/// One device sending its statuses as Confirmable requests to the CoAP endpoint of one server or
/// several (instances of one Ajour on one database), to each in turn as [`crate::HttpLink`] does.
/// Its socket is its own, bound on the first exchange: the server tells devices (and their
/// retransmissions) apart by address and port.
#[derive(Debug)]
pub struct CoapLink {
    servers: Arc<[SocketAddr]>,
    /// The server the next status goes to (an index into `servers`, modulo its length).
    next: usize,
    authorization: String,
    /// The device a gateway sends statuses for (`as=`); `None`: the device speaks for itself.
    acting_for: Option<String>,
    socket: Option<UdpSocket>,
    message_id: u16,
    ack_timeout: Duration,
}

impl CoapLink {
    /// The addresses of the CoAP endpoints at `urls` (`coap://HOST[:PORT][/]` or `HOST:PORT`), once
    /// for a whole fleet.
    pub async fn resolve(urls: &[impl AsRef<str>]) -> anyhow::Result<Arc<[SocketAddr]>> {
        let mut servers = Vec::new();
        for url in urls {
            let url = url.as_ref();
            let authority = url.strip_prefix("coap://").unwrap_or(url).trim_end_matches('/');
            anyhow::ensure!(
                !authority.is_empty() && !authority.contains('/') && !authority.contains("://"),
                "{url}: a CoAP endpoint is coap://HOST[:PORT] (coaps, DTLS, is not supported)"
            );
            let with_port = match authority.rsplit_once(':') {
                // `[::1]` alone, or a host name alone: the default port.
                Some((_, port)) if port.parse::<u16>().is_ok() && !authority.ends_with(']') => {
                    authority.to_string()
                }
                _ => format!("{authority}:{DEFAULT_PORT}"),
            };
            let address = tokio::net::lookup_host(&with_port)
                .await
                .with_context(|| format!("resolving {url}"))?
                .next()
                .with_context(|| format!("{url}: no address"))?;
            servers.push(address);
        }
        anyhow::ensure!(
            !servers.is_empty(),
            "no CoAP endpoint to simulate devices against"
        );
        Ok(servers.into())
    }

    /// Device `device` of application `app` at the endpoint at `server`.
    pub fn new(server: SocketAddr, app: &str, device: &str, password: &str) -> Self {
        Self::spread(&Arc::from([server]), 0, app, device, password)
    }

    /// Device `device` of application `app`, its statuses going to each of `servers` in turn,
    /// starting with the one at `first`.
    pub fn spread(
        servers: &Arc<[SocketAddr]>,
        first: usize,
        app: &str,
        device: &str,
        password: &str,
    ) -> Self {
        assert!(!servers.is_empty(), "a device needs a server to talk to");
        Self {
            servers: servers.clone(),
            next: first % servers.len(),
            authorization: ajour_types::basic_auth::encode(&format!("{device}@{app}"), password),
            acting_for: None,
            socket: None,
            message_id: rand::random(),
            ack_timeout: ACK_TIMEOUT,
        }
    }

    /// This link's device is a gateway sending the statuses of `device` of its application
    /// (Drogue's `as=`): it logs in as itself, the statuses and commands are `device`'s.
    pub fn acting_for(mut self, device: &str) -> Self {
        self.acting_for = Some(device.to_string());
        self
    }

    /// Wait `timeout` (instead of [`ACK_TIMEOUT`]) for the first answer, for tests of the
    /// retransmissions that cannot wait seconds.
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    async fn socket(&mut self, server: SocketAddr) -> Result<&UdpSocket, LinkError> {
        if self.socket.is_none() {
            let local: SocketAddr = if server.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(local)
                .await
                .map_err(|e| LinkError::Connection(format!("binding a UDP socket: {e}")))?;
            self.socket = Some(socket);
        }
        Ok(self.socket.as_ref().expect("bound above"))
    }
}

/// A `POST /v1/dfu` request as a device sends it: `authorization` in option 4209 (none: left
/// out), each of `query` as a Uri-Query (`ct=30`, `as=DEVICE`), `status` as payload.
pub fn dfu_request(
    message_type: MessageType,
    message_id: u16,
    token: &[u8],
    authorization: Option<&str>,
    query: &[&str],
    status: &[u8],
) -> Packet {
    let mut request = Packet::new();
    request.header.set_type(message_type);
    request.header.code = MessageClass::Request(RequestType::Post);
    request.header.message_id = message_id;
    request.set_token(token.to_vec());
    request.add_option(CoapOption::UriPath, b"v1".to_vec());
    request.add_option(CoapOption::UriPath, b"dfu".to_vec());
    for item in query {
        request.add_option(CoapOption::UriQuery, item.as_bytes().to_vec());
    }
    if let Some(authorization) = authorization {
        request.add_option(
            CoapOption::Unknown(AUTHORIZATION_OPTION),
            authorization.as_bytes().to_vec(),
        );
    }
    request.payload = status.to_vec();
    request
}

/// The command answering a status, or why there is none, from the server's `answer`.
fn command(answer: Packet, server: SocketAddr) -> Result<Bytes, LinkError> {
    let diagnostic = || String::from_utf8_lossy(&answer.payload).trim().to_string();
    match answer.header.code {
        MessageClass::Response(ResponseType::Content) => Ok(Bytes::from(answer.payload)),
        MessageClass::Response(ResponseType::Forbidden) => Err(LinkError::Protocol(format!(
            "authentication refused (4.03): check application, device and password {}",
            diagnostic()
        ))),
        // A server that cannot take the status now (overloaded, registry away), or logins for
        // this device held back for a while: try again later.
        MessageClass::Response(ResponseType::ServiceUnavailable | ResponseType::TooManyRequests) => {
            Err(LinkError::Connection(format!(
                "coap://{server}: {}: {}",
                answer.header.code,
                diagnostic()
            )))
        }
        other => Err(LinkError::Protocol(format!(
            "unexpected answer {other}: {}",
            diagnostic()
        ))),
    }
}

impl Link for CoapLink {
    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        let server = self.servers[self.next];
        self.next = (self.next + 1) % self.servers.len();
        self.message_id = self.message_id.wrapping_add(1);
        let message_id = self.message_id;
        // A random token (§5.3.1): an answer to an earlier exchange cannot pass for this one's.
        let token: [u8; 8] = rand::random();
        let factor = rand::thread_rng().gen_range(1.0..ACK_RANDOM_FACTOR);
        let mut timeout = self.ack_timeout.mul_f64(factor);
        // `ct=30`: wait up to 30 s for a command, as devices ask Drogue to.
        let mut query = vec!["ct=30".to_string()];
        if let Some(device) = &self.acting_for {
            query.push(format!("as={device}"));
        }
        let query: Vec<&str> = query.iter().map(String::as_str).collect();
        let mut request = dfu_request(
            MessageType::Confirmable,
            message_id,
            &token,
            Some(&self.authorization),
            &query,
            &status.bytes,
        );
        // drgdfu's named form goes without a content format, as over HTTP.
        if status.encoding == StatusEncoding::Packed {
            request.add_option(CoapOption::ContentFormat, vec![CONTENT_FORMAT_CBOR as u8]);
        }
        let datagram = request
            .to_bytes_unlimited()
            .map_err(|e| LinkError::Protocol(format!("encoding the request: {e}")))?;
        let socket = self.socket(server).await?;
        let unreachable = |e: std::io::Error| LinkError::Connection(format!("coap://{server}: {e}"));
        let mut buffer = vec![0u8; RECEIVE_BUFFER];
        for _ in 0..=MAX_RETRANSMIT {
            socket.send_to(&datagram, server).await.map_err(unreachable)?;
            let deadline = Instant::now() + timeout;
            timeout *= 2;
            loop {
                let Ok(received) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buffer)).await
                else {
                    break;
                };
                let (len, from) = received.map_err(unreachable)?;
                // Anything else (another sender, a late answer to an earlier exchange, noise)
                // is passed over.
                let Ok(answer) = Packet::from_bytes(&buffer[..len]) else {
                    continue;
                };
                if from != server {
                    continue;
                }
                let ours = answer.header.message_id == message_id;
                match answer.header.get_type() {
                    MessageType::Reset if ours => {
                        return Err(LinkError::Connection(format!(
                            "coap://{server}: reset the request"
                        )))
                    }
                    MessageType::Acknowledgement if ours && answer.get_token() == token => {
                        return command(answer, server);
                    }
                    // An empty ACK: the answer comes later, in a message of its own.
                    MessageType::Acknowledgement if ours && answer.header.code == MessageClass::Empty => {
                        return separate_response(socket, server, &token, &mut buffer).await;
                    }
                    _ => {}
                }
            }
        }
        Err(LinkError::Connection(format!(
            "coap://{server}: no answer after {MAX_RETRANSMIT} retransmissions"
        )))
    }
}

/// The answer the server announced with an empty ACK (RFC 7252 §5.2.2): a CON (acknowledged) or
/// NON response carrying the request's token.
async fn separate_response(
    socket: &UdpSocket,
    server: SocketAddr,
    token: &[u8],
    buffer: &mut [u8],
) -> Result<Bytes, LinkError> {
    let deadline = Instant::now() + SEPARATE_RESPONSE_TIMEOUT;
    loop {
        let Ok(received) = tokio::time::timeout_at(deadline, socket.recv_from(buffer)).await else {
            return Err(LinkError::Connection(format!(
                "coap://{server}: the answer announced did not come"
            )));
        };
        let (len, from) = received.map_err(|e| LinkError::Connection(format!("coap://{server}: {e}")))?;
        let Ok(answer) = Packet::from_bytes(&buffer[..len]) else {
            continue;
        };
        if from != server
            || answer.get_token() != token
            || !matches!(answer.header.code, MessageClass::Response(_))
        {
            continue;
        }
        if answer.header.get_type() == MessageType::Confirmable {
            let mut ack = Packet::new();
            ack.header.set_type(MessageType::Acknowledgement);
            ack.header.code = MessageClass::Empty;
            ack.header.message_id = answer.header.message_id;
            if let Ok(bytes) = ack.to_bytes_unlimited() {
                let _ = socket.send_to(&bytes, server).await;
            }
        }
        return command(answer, server);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> EncodedStatus {
        EncodedStatus {
            bytes: vec![0x84, 0x45, b'1', b'.', b'0', b'.', b'0', 0xf6, 0xf6, 0xf6],
            encoding: StatusEncoding::Packed,
            correlation_id: None,
        }
    }

    /// A server that answers the `nth` copy of each request it gets (the ones before are lost)
    /// with `reply` built from the request, and counts what it received.
    async fn lossy_server(
        nth: usize,
        reply: impl Fn(&Packet) -> Vec<Vec<u8>> + Send + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<Packet>>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut received = Vec::new();
            let mut buffer = vec![0u8; 2048];
            while let Ok(Ok((len, from))) =
                tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buffer)).await
            {
                let request = Packet::from_bytes(&buffer[..len]).unwrap();
                received.push(request.clone());
                if received.len() == nth {
                    for datagram in reply(&request) {
                        socket.send_to(&datagram, from).await.unwrap();
                    }
                    break;
                }
            }
            received
        });
        (addr, task)
    }

    fn answer(request: &Packet, message_type: MessageType, code: ResponseType, payload: &[u8]) -> Packet {
        let mut answer = Packet::new();
        answer.header.set_type(message_type);
        answer.header.message_id = request.header.message_id;
        answer.header.code = MessageClass::Response(code);
        answer.set_token(request.get_token().to_vec());
        answer.payload = payload.to_vec();
        answer
    }

    #[tokio::test]
    async fn a_lost_request_is_sent_again_until_answered() {
        let (addr, server) = lossy_server(3, |request| {
            // Noise first: another exchange's answer, and one with the wrong token.
            let mut other = answer(
                request,
                MessageType::Acknowledgement,
                ResponseType::Content,
                b"old",
            );
            other.header.message_id = request.header.message_id.wrapping_sub(1);
            let mut wrong_token = answer(
                request,
                MessageType::Acknowledgement,
                ResponseType::Content,
                b"bad",
            );
            wrong_token.set_token(vec![0; 8]);
            [
                other,
                wrong_token,
                answer(
                    request,
                    MessageType::Acknowledgement,
                    ResponseType::Content,
                    b"cmd",
                ),
            ]
            .iter()
            .map(|p| p.to_bytes_unlimited().unwrap())
            .collect()
        })
        .await;
        let mut link = CoapLink::new(addr, "app", "dev", "pw")
            .acting_for("sensor")
            .with_ack_timeout(Duration::from_millis(20));
        assert_eq!(link.exchange(status()).await.unwrap(), Bytes::from_static(b"cmd"));
        let received = server.await.unwrap();
        assert_eq!(received.len(), 3);
        // The same message: message id, token, credentials, query, payload.
        assert!(received.windows(2).all(|w| w[0] == w[1]));
        let request = &received[0];
        assert_eq!(request.header.get_type(), MessageType::Confirmable);
        assert_eq!(
            request.get_first_option(CoapOption::Unknown(AUTHORIZATION_OPTION)),
            Some(&ajour_types::basic_auth::encode("dev@app", "pw").into_bytes())
        );
        let query: Vec<_> = request
            .get_option(CoapOption::UriQuery)
            .unwrap()
            .iter()
            .cloned()
            .collect();
        assert_eq!(query, [b"ct=30".to_vec(), b"as=sensor".to_vec()]);
        assert_eq!(request.payload, status().bytes);
    }

    #[tokio::test]
    async fn retransmissions_end_and_back_off() {
        let (addr, server) = lossy_server(usize::MAX, |_| Vec::new()).await;
        let mut link = CoapLink::new(addr, "app", "dev", "pw").with_ack_timeout(Duration::from_millis(10));
        let started = Instant::now();
        let error = link.exchange(status()).await.unwrap_err();
        assert!(
            matches!(error, LinkError::Connection(ref e) if e.contains("no answer")),
            "{error}"
        );
        // 1 + MAX_RETRANSMIT sends, waiting at least 10 + 20 + 40 + 80 + 160 ms between them.
        assert!(
            started.elapsed() >= Duration::from_millis(310),
            "{:?}",
            started.elapsed()
        );
        drop(link);
        let received = server.await.unwrap();
        assert_eq!(received.len(), 1 + MAX_RETRANSMIT as usize);
    }

    #[tokio::test]
    async fn a_separate_response_is_acknowledged_and_taken() {
        let (addr, server) = lossy_server(1, |request| {
            let mut empty = Packet::new();
            empty.header.set_type(MessageType::Acknowledgement);
            empty.header.code = MessageClass::Empty;
            empty.header.message_id = request.header.message_id;
            let mut later = answer(request, MessageType::Confirmable, ResponseType::Content, b"later");
            later.header.message_id = 4242;
            vec![
                empty.to_bytes_unlimited().unwrap(),
                later.to_bytes_unlimited().unwrap(),
            ]
        })
        .await;
        let mut link = CoapLink::new(addr, "app", "dev", "pw");
        assert_eq!(
            link.exchange(status()).await.unwrap(),
            Bytes::from_static(b"later")
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn refusals_and_overload_are_told_apart() {
        for (code, retried) in [
            (ResponseType::Forbidden, false),
            (ResponseType::BadRequest, false),
            (ResponseType::ServiceUnavailable, true),
            (ResponseType::TooManyRequests, true),
        ] {
            let (addr, _server) = lossy_server(1, move |request| {
                vec![answer(request, MessageType::Acknowledgement, code, b"why")
                    .to_bytes_unlimited()
                    .unwrap()]
            })
            .await;
            let error = CoapLink::new(addr, "app", "dev", "pw")
                .exchange(status())
                .await
                .unwrap_err();
            assert_eq!(
                matches!(error, LinkError::Connection(_)),
                retried,
                "{code:?}: {error}"
            );
            assert!(error.to_string().contains("why"), "{error}");
        }
    }

    #[tokio::test]
    async fn urls_resolve_with_the_default_port() {
        let servers = CoapLink::resolve(&["coap://127.0.0.1", "127.0.0.1:7000", "coap://[::1]:5684/"])
            .await
            .unwrap();
        assert_eq!(
            servers[..],
            [
                SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
                SocketAddr::from(([127, 0, 0, 1], 7000)),
                "[::1]:5684".parse().unwrap(),
            ]
        );
        assert!(CoapLink::resolve(&["coaps://127.0.0.1"]).await.is_err());
        assert!(CoapLink::resolve(&["coap://127.0.0.1/v1/dfu"]).await.is_err());
    }
}
