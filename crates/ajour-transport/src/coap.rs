//! Drogue-compatible CoAP device endpoint (RFC 7252 over UDP), off unless `--coap-listen` is
//! given.
//!
//! `POST /v1/{channel}` with Uri-Query `ct=N` (accepted and ignored, as on HTTP),
//! `application=APP` and `as=DEVICE`, the credentials in option 4209 as
//! `Basic base64(device@app:password)`, the status as payload. On channel `dfu` the answer is
//! 2.05 Content with option 4210 = `dfu`, Content-Format application/cbor (60) and the CBOR
//! command as payload; other channels get 2.04 Changed and no payload. Authentication, `as=` and
//! decoding are the HTTP endpoint's ([`crate::http`]), through the same service calls, so only
//! the codes differ:
//!
//! | case | answer |
//! |---|---|
//! | no or malformed option 4209; no application | 4.01 |
//! | unknown device or wrong password | 4.03, after the same delay as on HTTP |
//! | `as=` a device that does not name the gateway (or does not exist) | 4.03, saying so |
//! | too many failed logins from this address or for this device | 4.29, Max-Age = retry after |
//! | payload larger than a status can be ([`MAX_STATUS_SIZE`]) | 4.13, Size1 = the limit |
//! | payload that is not a status | 4.00, naming what is wrong |
//! | a command that would not fit one message ([`MAX_MESSAGE_SIZE`]; no Block2) | 4.00, saying which mtu fits |
//! | path other than `/v1/{channel}` | 4.04 |
//! | method other than POST | 4.05 |
//! | `Accept` other than application/cbor | 4.06 |
//! | an unsupported critical option (Block1/Block2, If-Match, OSCORE, ...), or option 4209 twice | 4.02 |
//! | Proxy-Uri or Proxy-Scheme | 5.05 |
//! | registry unreachable while authenticating | 5.03, Max-Age 5 |
//! | [`CoapConfig::max_in_flight`] requests already being handled | 5.03, Max-Age 1 |
//!
//! Messaging (RFC 7252 §4): a Confirmable request is answered with a piggybacked ACK (its message
//! id and token), a Non-confirmable one with a NON response echoing its token. A request seen
//! again from the same address with the same message id within [`EXCHANGE_LIFETIME`] is a
//! retransmission: it is answered from a bounded cache (the very bytes sent the first time), or
//! dropped while the first is still being handled, and never handled twice. A datagram that is
//! not a request (an ACK or RST, a response, a message that does not parse) is ignored, or reset
//! when it is Confirmable and its message id can be read; an empty CON (a CoAP ping) is reset, as
//! the RFC says. No datagram, however broken, is a reason to panic or to stop the loop. To a peer
//! that has not logged in (its address may be forged) no answer is larger than its request, so
//! that the endpoint cannot amplify a flood (RFC 7252 §11.3).

use ajour_protocol::MAX_STATUS_SIZE;
use ajour_service::hot_metrics::{HotGauge, HotLabeledCounter};
use ajour_service::{error_total, Refusal, SignIn, UpdateService};
use ajour_types::{basic_auth, Key};
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;

pub use crate::http::DFU_CHANNEL;

/// CoAP's port when a `coap://` URL names none.
pub const DEFAULT_PORT: u16 = 5683;

/// Drogue's option carrying the device's credentials, `Basic base64(device@app:password)`.
pub const AUTHORIZATION_OPTION: u16 = 4209;

/// Drogue's option naming the command a response carries (`dfu`).
pub const COMMAND_OPTION: u16 = 4210;

/// Content-Format application/cbor.
pub const CONTENT_FORMAT_CBOR: u16 = 60;

/// RFC 7252 §4.8.2: how long a Confirmable message's retransmissions can arrive, and so how long
/// an answer is kept for them (ACK_TIMEOUT 2 s, ACK_RANDOM_FACTOR 1.5, MAX_RETRANSMIT 4,
/// MAX_LATENCY 100 s, PROCESSING_DELAY 2 s). Non-confirmable duplicates are kept as long.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// The largest message the endpoint sends: RFC 7252 §4.6's bound for a path whose MTU is not
/// known (an IPv6 minimum MTU of 1280 less headers). Without Block2, a command is one message.
pub const MAX_MESSAGE_SIZE: usize = 1152;

/// The largest block a command can carry and still fit [`MAX_MESSAGE_SIZE`], whatever its
/// offset, correlation id and token, for a version name of up to 64 bytes (the tests of this
/// module check it): devices on CoAP ask for an mtu of at most this, and the server's default
/// mtu (512) is well within it.
pub const MAX_BLOCK: u32 = 1024;

/// A datagram is read whole into a buffer this large (the largest UDP payload), so that an
/// oversized status is answered 4.13 rather than read truncated.
const RECEIVE_BUFFER: usize = 65_536;

/// Diagnostic payloads are cut to this, however long a text the request chose (a device name in
/// a refusal).
const MAX_DIAGNOSTIC: usize = 256;

/// Max-Age of a 5.03 while the registry cannot be read: retry in a few seconds.
const UNAVAILABLE_RETRY_SECS: u32 = 5;

/// Max-Age of a 5.03 for a request past [`CoapConfig::max_in_flight`].
const OVERLOAD_RETRY_SECS: u32 = 1;

/// How the endpoint bounds what it holds.
#[derive(Debug, Clone)]
pub struct CoapConfig {
    /// Requests handled at once; one more is answered 5.03 at once. Each holds little (its
    /// datagram, the device's context), so this bounds the memory a flood can take.
    pub max_in_flight: usize,
    /// Answers kept for retransmissions; past it the oldest is forgotten early (a retransmission
    /// of it would be handled again, which a status tolerates: the same status gets the same
    /// command).
    pub dedupe_capacity: usize,
    /// How long an answer is kept for retransmissions.
    pub exchange_lifetime: Duration,
    /// On shutdown, how long requests being handled get to finish.
    pub shutdown_timeout: Duration,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            dedupe_capacity: 10_000,
            exchange_lifetime: EXCHANGE_LIFETIME,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Bind the endpoint's UDP socket to `addr` (`HOST:PORT`; port 0 picks a free one).
pub async fn bind(addr: &str) -> std::io::Result<UdpSocket> {
    let mut last_error = None;
    for candidate in tokio::net::lookup_host(addr).await? {
        match bind_one(candidate) {
            Ok(socket) => return Ok(socket),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: no address"))
    }))
}

fn bind_one(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // A burst of a fleet's statuses waits in the kernel while the loop hands them out; the kernel
    // caps this at net.core.rmem_max, and a smaller buffer only means more drops (and
    // retransmissions), so a refusal is no error.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Serve devices on `socket` until `stop` resolves; then give the requests being handled up to
/// [`CoapConfig::shutdown_timeout`] to finish, and return.
pub async fn serve(
    socket: UdpSocket,
    service: Arc<UpdateService>,
    config: CoapConfig,
    stop: impl Future<Output = ()>,
) {
    let endpoint = Arc::new(Endpoint {
        socket,
        service,
        exchanges: Mutex::new(Exchanges::new(config.dedupe_capacity, config.exchange_lifetime)),
        slots: Arc::new(Semaphore::new(config.max_in_flight)),
        next_message_id: AtomicU16::new(rand::random()),
    });
    let engine = &endpoint.service.config().engine;
    if engine.block_size(None) > MAX_BLOCK {
        tracing::warn!(
            default_mtu = engine.default_mtu,
            "CoAP devices that state no mtu are sent blocks larger than one CoAP message can carry \
             ({MAX_BLOCK} bytes, no Block2): lower --default-mtu, or have them state an mtu"
        );
    }
    let mut buffer = vec![0u8; RECEIVE_BUFFER];
    tokio::pin!(stop);
    loop {
        let received = tokio::select! {
            biased;
            () = &mut stop => break,
            received = endpoint.socket.recv_from(&mut buffer) => received,
        };
        match received {
            Ok((len, peer)) => endpoint.clone().on_datagram(&buffer[..len], peer),
            // On Linux an ICMP error for an earlier answer (the device went away) can surface
            // here; nothing to do but carry on.
            Err(error) => {
                ajour_service::warn_throttled!(ajour_service::LOG_INTERVAL, %error, "CoAP receive failed");
            }
        }
    }
    // Every slot back: every request handled and answered.
    let all = u32::try_from(config.max_in_flight).unwrap_or(u32::MAX);
    if tokio::time::timeout(config.shutdown_timeout, endpoint.slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = config.max_in_flight - endpoint.slots.available_permits(),
            "CoAP requests still being handled at the end of the shutdown timeout"
        );
    }
}

struct Endpoint {
    socket: UdpSocket,
    service: Arc<UpdateService>,
    exchanges: Mutex<Exchanges>,
    slots: Arc<Semaphore>,
    /// The message id of the next NON response (RFC 7252 §4.4: the sender's own sequence).
    next_message_id: AtomicU16,
}

/// What a datagram is, as far as the endpoint cares.
#[derive(Debug)]
enum Incoming {
    /// A request to handle (CON or NON).
    Request(Packet),
    /// Answer with a Reset of this message id: a CON the endpoint cannot or will not process
    /// (malformed, a ping, a response it never asked for).
    Reset(u16, &'static str),
    /// Silently ignored, as RFC 7252 says for what cannot even be rejected.
    Ignore(&'static str),
}

/// Sort one datagram, without trusting anything in it.
fn classify(datagram: &[u8]) -> Incoming {
    // Too short for a header: there is no message id to reset.
    if datagram.len() < 4 {
        return Incoming::Ignore("malformed");
    }
    // §3: a message with an unknown version is silently ignored.
    if datagram[0] >> 6 != 1 {
        return Incoming::Ignore("malformed");
    }
    let message_id = u16::from_be_bytes([datagram[2], datagram[3]]);
    let confirmable = (datagram[0] >> 4) & 0b11 == 0;
    let reject = |reason| {
        if confirmable {
            Incoming::Reset(message_id, reason)
        } else {
            Incoming::Ignore(reason)
        }
    };
    let packet = match Packet::from_bytes(datagram) {
        Ok(packet) => packet,
        Err(_) => return reject("malformed"),
    };
    match (packet.header.get_type(), packet.header.code) {
        // §4.2/4.3: the endpoint sends no CON, so an ACK or RST refers to nothing of its own.
        (MessageType::Acknowledgement | MessageType::Reset, _) => Incoming::Ignore("unexpected"),
        // §4.3: an empty CON is a ping, answered with a Reset; an empty message that carries a
        // token or anything after the header is a format error, rejected the same way.
        (_, MessageClass::Empty) => reject(if datagram.len() == 4 { "ping" } else { "malformed" }),
        (_, MessageClass::Request(_)) => Incoming::Request(packet),
        // A response nobody asked for, or a reserved code class.
        (_, MessageClass::Response(_) | MessageClass::Reserved(_)) => reject("unexpected"),
    }
}

/// Where an exchange is, for its retransmissions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Exchange {
    /// Being handled: a retransmission is dropped, the answer will come.
    InProgress,
    /// Answered with these bytes: a retransmission gets them again.
    Answered(Arc<[u8]>),
}

/// The deduplication cache: one entry per (peer, message id) seen within the exchange lifetime,
/// at most `capacity`, the oldest forgotten first. Entries are in a map for the look-up and in a
/// queue in the order they were made (all live equally long, so the front is always the first to
/// expire); a queue entry whose sequence number no longer matches the map's is a leftover of a
/// forgotten one.
struct Exchanges {
    entries: HashMap<(SocketAddr, u16), (u64, Exchange)>,
    order: VecDeque<(Instant, u64, (SocketAddr, u16))>,
    next: u64,
    capacity: usize,
    lifetime: Duration,
}

/// What to do with a request, given its exchange.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// New: handle it, and record the answer under this sequence number.
    New(u64),
    /// A retransmission still being handled.
    InProgress,
    /// A retransmission already answered.
    Answered(Arc<[u8]>),
}

impl Exchanges {
    fn new(capacity: usize, lifetime: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            capacity: capacity.max(1),
            lifetime,
        }
    }

    /// Look `key` up at `now`; a new exchange is recorded in progress.
    fn begin(&mut self, key: (SocketAddr, u16), now: Instant) -> Seen {
        self.expire(now);
        if let Some((_, exchange)) = self.entries.get(&key) {
            return match exchange {
                Exchange::InProgress => Seen::InProgress,
                Exchange::Answered(bytes) => Seen::Answered(bytes.clone()),
            };
        }
        while self.entries.len() >= self.capacity {
            let Some((_, seq, old)) = self.order.pop_front() else {
                break;
            };
            self.forget(old, seq);
        }
        let seq = self.next;
        self.next += 1;
        self.entries.insert(key, (seq, Exchange::InProgress));
        self.order.push_back((now, seq, key));
        // Exchanges abandoned (a flood answered 5.03) leave their place in the queue behind
        // until it reaches the front: swept here, so the queue stays within twice the capacity.
        if self.order.len() > 2 * self.capacity {
            let entries = &self.entries;
            self.order
                .retain(|(_, seq, key)| entries.get(key).is_some_and(|(live, _)| live == seq));
        }
        Seen::New(seq)
    }

    /// Record the answer of exchange `seq` (unless it was forgotten meanwhile).
    fn answer(&mut self, key: (SocketAddr, u16), seq: u64, bytes: Arc<[u8]>) {
        if let Some((entry_seq, exchange)) = self.entries.get_mut(&key) {
            if *entry_seq == seq {
                *exchange = Exchange::Answered(bytes);
            }
        }
    }

    /// Forget exchange `seq` without an answer: a retransmission is handled anew.
    fn abandon(&mut self, key: (SocketAddr, u16), seq: u64) {
        self.forget(key, seq);
    }

    fn forget(&mut self, key: (SocketAddr, u16), seq: u64) {
        if self
            .entries
            .get(&key)
            .is_some_and(|(entry_seq, _)| *entry_seq == seq)
        {
            self.entries.remove(&key);
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(made, seq, key)) = self.order.front() {
            let live = self
                .entries
                .get(&key)
                .is_some_and(|(entry_seq, _)| *entry_seq == seq);
            if live && now.saturating_duration_since(made) < self.lifetime {
                break;
            }
            self.order.pop_front();
            self.forget(key, seq);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// An answer before it is put in a message.
#[derive(Debug, Clone)]
struct Reply {
    code: ResponseType,
    /// Options other than those of the message layer, by number.
    options: Vec<(u16, Vec<u8>)>,
    payload: Vec<u8>,
    /// The peer logged in (as a device, or a gateway): its answer may be larger than its
    /// request. Before that its address may be forged, and the answer is cut to the request's
    /// size, so that the endpoint cannot be used to amplify a flood (RFC 7252 §11.3).
    authenticated: bool,
}

impl Reply {
    fn new(code: ResponseType) -> Self {
        Self {
            code,
            options: Vec::new(),
            payload: Vec::new(),
            authenticated: false,
        }
    }

    /// With a diagnostic payload (RFC 7252 §5.5.2: UTF-8 text for people), cut to
    /// [`MAX_DIAGNOSTIC`] bytes. Texts say what matters first: they may be cut further.
    fn saying(mut self, text: impl Into<String>) -> Self {
        self.payload = text.into().into_bytes();
        cut_text(&mut self.payload, MAX_DIAGNOSTIC);
        self
    }

    /// 2.05 with the command: Content-Format CBOR, option 4210 `dfu`.
    fn command(command: Vec<u8>) -> Self {
        Self {
            code: ResponseType::Content,
            options: vec![
                (CoapOption::ContentFormat.into(), uint(CONTENT_FORMAT_CBOR.into())),
                (COMMAND_OPTION, DFU_CHANNEL.as_bytes().to_vec()),
            ],
            payload: command,
            authenticated: true,
        }
    }

    fn authenticated(mut self) -> Self {
        self.authenticated = true;
        self
    }

    fn with_option(mut self, number: u16, value: Vec<u8>) -> Self {
        self.options.push((number, value));
        self
    }

    /// Max-Age: when to try again, for 4.29 and 5.03.
    fn retry_after(self, seconds: u32) -> Self {
        self.with_option(CoapOption::MaxAge.into(), uint(seconds.into()))
    }
}

/// Cut UTF-8 `text` to at most `max` bytes, at a character's start.
fn cut_text(text: &mut Vec<u8>, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    // A continuation byte (0b10xxxxxx) is no character's start.
    while end > 0 && text[end] & 0xc0 == 0x80 {
        end -= 1;
    }
    text.truncate(end);
}

/// An option's unsigned integer value: big-endian, no leading zero bytes (§3.2).
fn uint(value: u64) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[first..].to_vec()
}

/// Counted on every request (handles looked up once).
static IN_PROGRESS: HotGauge = HotGauge::new("ajour_coap_requests_in_progress");
static REQUESTS: HotLabeledCounter<4> = HotLabeledCounter::new(
    "ajour_coap_requests_total",
    "code",
    ["2.05", "2.04", "4.01", "4.03"],
);

/// The code as CoAP writes it, `c.dd`, for metrics.
fn code_name(code: ResponseType) -> &'static str {
    match code {
        ResponseType::Changed => "2.04",
        ResponseType::Content => "2.05",
        ResponseType::BadRequest => "4.00",
        ResponseType::Unauthorized => "4.01",
        ResponseType::BadOption => "4.02",
        ResponseType::Forbidden => "4.03",
        ResponseType::NotFound => "4.04",
        ResponseType::MethodNotAllowed => "4.05",
        ResponseType::NotAcceptable => "4.06",
        ResponseType::RequestEntityTooLarge => "4.13",
        ResponseType::TooManyRequests => "4.29",
        ResponseType::InternalServerError => "5.00",
        ResponseType::ServiceUnavailable => "5.03",
        ResponseType::ProxyingNotSupported => "5.05",
        _ => "other",
    }
}

/// The response to `request` carrying `reply`: a piggybacked ACK for a CON, a NON for a NON;
/// the token echoed either way.
fn response(request: &Packet, reply: Reply, non_message_id: impl FnOnce() -> u16) -> Packet {
    let mut response = Packet::new();
    match request.header.get_type() {
        MessageType::Confirmable => {
            response.header.set_type(MessageType::Acknowledgement);
            response.header.message_id = request.header.message_id;
        }
        _ => {
            response.header.set_type(MessageType::NonConfirmable);
            response.header.message_id = non_message_id();
        }
    }
    response.header.code = MessageClass::Response(reply.code);
    response.set_token(request.get_token().to_vec());
    for (number, value) in reply.options {
        response.add_option(CoapOption::from(number), value);
    }
    response.payload = reply.payload;
    response
}

/// A Reset of `message_id`.
fn reset(message_id: u16) -> Vec<u8> {
    // Version 1, type RST, no token; code 0.00.
    let [high, low] = message_id.to_be_bytes();
    vec![0x70, 0x00, high, low]
}

impl Endpoint {
    /// Take one datagram: sort it, answer what needs no handling at once, and hand a new request
    /// to a task of its own. Never waits.
    fn on_datagram(self: Arc<Self>, datagram: &[u8], peer: SocketAddr) {
        let request = match classify(datagram) {
            Incoming::Request(request) => request,
            Incoming::Reset(message_id, reason) => {
                metrics::counter!("ajour_coap_rejected_total", "reason" => reason).increment(1);
                self.send(&reset(message_id), peer);
                return;
            }
            Incoming::Ignore(reason) => {
                metrics::counter!("ajour_coap_rejected_total", "reason" => reason).increment(1);
                return;
            }
        };
        let key = (peer, request.header.message_id);
        let seen = self
            .exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .begin(key, Instant::now());
        let seq = match seen {
            Seen::New(seq) => seq,
            Seen::InProgress => {
                metrics::counter!("ajour_coap_duplicates_total").increment(1);
                return;
            }
            Seen::Answered(bytes) => {
                metrics::counter!("ajour_coap_duplicates_total").increment(1);
                self.send(&bytes, peer);
                return;
            }
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            // Not recorded: a retransmission of it is handled if there is room by then.
            self.exchanges
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .abandon(key, seq);
            error_total("coap_overload");
            let reply = Reply::new(ResponseType::ServiceUnavailable)
                .retry_after(OVERLOAD_RETRY_SECS)
                .saying("too many requests in progress; try again later");
            if let Some(bytes) = self.encode(&request, reply, datagram.len()) {
                self.send(&bytes, peer);
            }
            return;
        };
        let request_len = datagram.len();
        tokio::spawn(async move {
            IN_PROGRESS.increment(1.0);
            let reply = answer(&self.service, &request, peer).await;
            let bytes: Option<Arc<[u8]>> = self.encode(&request, reply, request_len).map(Into::into);
            let mut exchanges = self.exchanges.lock().unwrap_or_else(PoisonError::into_inner);
            match &bytes {
                Some(bytes) => exchanges.answer(key, seq, bytes.clone()),
                None => exchanges.abandon(key, seq),
            }
            drop(exchanges);
            if let Some(bytes) = bytes {
                self.send(&bytes, peer);
            }
            IN_PROGRESS.decrement(1.0);
            drop(slot);
        });
    }

    /// The bytes of the response to `request` (`request_len` bytes), counted by code; a command
    /// too large for one message becomes a 4.00 saying so, and an answer to a peer that did not
    /// log in is cut to the request's size.
    fn encode(&self, request: &Packet, mut reply: Reply, request_len: usize) -> Option<Vec<u8>> {
        let next_id = || self.next_message_id.fetch_add(1, Ordering::Relaxed);
        let mut bytes = response(request, reply.clone(), next_id)
            .to_bytes_unlimited()
            .ok()?;
        if bytes.len() > MAX_MESSAGE_SIZE {
            error_total("coap_command_too_large");
            reply = Reply::new(ResponseType::BadRequest)
                .saying(format!(
                    "the command does not fit one CoAP message ({} bytes, at most {MAX_MESSAGE_SIZE}; \
                     no Block2): state an mtu of at most {MAX_BLOCK}",
                    bytes.len()
                ))
                .authenticated();
            bytes = response(request, reply.clone(), next_id)
                .to_bytes_unlimited()
                .ok()?;
        }
        if !reply.authenticated && bytes.len() > request_len {
            let keep = reply.payload.len().saturating_sub(bytes.len() - request_len);
            cut_text(&mut reply.payload, keep);
            bytes = response(request, reply.clone(), next_id)
                .to_bytes_unlimited()
                .ok()?;
        }
        REQUESTS.increment(code_name(reply.code), 1);
        Some(bytes)
    }

    fn send(&self, bytes: &[u8], peer: SocketAddr) {
        // UDP: the datagram is queued or dropped at once, never waited on; a device that missed
        // it retransmits.
        if let Err(error) = self.socket.try_send_to(bytes, peer) {
            if error.kind() != std::io::ErrorKind::WouldBlock {
                ajour_service::warn_throttled!(ajour_service::LOG_INTERVAL, %error, %peer, "CoAP send failed");
            }
        }
    }
}

/// Critical options (odd numbers, §5.4.1) the endpoint understands. Any other critical option
/// makes the request one it must not process: 4.02.
const UNDERSTOOD_CRITICAL: [u16; 6] = [3, 7, 11, 15, 17, AUTHORIZATION_OPTION];

/// Critical options that may appear once only (§5.4.5: a repeated one is an unrecognised one).
const ONCE: [u16; 4] = [3, 7, 17, AUTHORIZATION_OPTION];

/// What the request's Uri-Query says.
#[derive(Debug, Default)]
struct Query {
    application: Option<String>,
    as_device: Option<String>,
}

/// The answer to one request: the message layer's checks, then the HTTP endpoint's.
async fn answer(service: &UpdateService, request: &Packet, peer: SocketAddr) -> Reply {
    for (&number, values) in request.options() {
        if number == u16::from(CoapOption::ProxyUri) || number == u16::from(CoapOption::ProxyScheme) {
            return Reply::new(ResponseType::ProxyingNotSupported).saying("no proxy");
        }
        let critical = number % 2 == 1;
        let understood =
            UNDERSTOOD_CRITICAL.contains(&number) && !(ONCE.contains(&number) && values.len() > 1);
        if critical && !understood {
            return Reply::new(ResponseType::BadOption)
                .saying(format!("option {number} is not supported here"));
        }
    }
    let Some(channel) = channel(request) else {
        return Reply::new(ResponseType::NotFound).saying("not found: POST /v1/{channel}");
    };
    if request.header.code != MessageClass::Request(RequestType::Post) {
        return Reply::new(ResponseType::MethodNotAllowed).saying("POST only");
    }
    if let Some(accept) = request.get_first_option(CoapOption::Accept) {
        if accept[..] != uint(CONTENT_FORMAT_CBOR.into())[..] {
            return Reply::new(ResponseType::NotAcceptable).saying("only application/cbor (60)");
        }
    }
    let query = match query(request) {
        Ok(query) => query,
        Err(reason) => return Reply::new(ResponseType::BadRequest).saying(reason),
    };
    let credentials = request
        .get_first_option(CoapOption::Unknown(AUTHORIZATION_OPTION))
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(basic_auth::parse);
    let Some((user, password)) = credentials else {
        error_total("auth_missing");
        return Reply::new(ResponseType::Unauthorized).saying(format!(
            "option {AUTHORIZATION_OPTION} missing or malformed: Basic base64(device@application:password)"
        ));
    };
    let given = SignIn {
        user: &user,
        password: &password,
        application: query.application.as_deref(),
        as_device: query.as_device.as_deref(),
        peer: Some(peer.ip()),
    };
    let key = match given.key() {
        Ok(key) => key,
        Err(refusal) => return refused(refusal),
    };
    // Everything logged from here on names the device and its application, as on HTTP.
    let span = ajour_service::device_span(&key);
    handle(service, &key, &given, channel, &request.payload)
        .instrument(span)
        .await
}

/// What a refused request is answered: HTTP's refusals in CoAP's codes.
fn refused(refusal: Refusal) -> Reply {
    match refusal {
        Refusal::NoApplication => Reply::new(ResponseType::Unauthorized)
            .saying("no application: authenticate as device@application or add application="),
        Refusal::Denied => Reply::new(ResponseType::Forbidden),
        Refusal::Throttled { retry_after } => {
            let seconds = u32::try_from(retry_after.as_secs().max(1)).unwrap_or(u32::MAX);
            Reply::new(ResponseType::TooManyRequests)
                .retry_after(seconds)
                .saying("too many failed logins; try again later")
        }
        Refusal::NotListed(why) => Reply::new(ResponseType::Forbidden).saying(why),
        Refusal::Unavailable => {
            Reply::new(ResponseType::ServiceUnavailable).retry_after(UNAVAILABLE_RETRY_SECS)
        }
    }
}

/// Sign the device in (or, with `as=`, the gateway acting for it) and answer its status: the
/// HTTP endpoint's `answer`, with CoAP's codes.
async fn handle(
    service: &UpdateService,
    key: &Key,
    given: &SignIn<'_>,
    channel: String,
    status: &[u8],
) -> Reply {
    match service.sign_in(key, given).await {
        Ok(device) => answer_status(key, device, &channel, status).await.authenticated(),
        // The gateway signed in: its answer may be longer than its request.
        Err(refusal @ Refusal::NotListed(_)) => refused(refusal).authenticated(),
        Err(refusal) => refused(refusal),
    }
}

/// The answer to a device signed in.
async fn answer_status(key: &Key, device: ajour_service::Device<'_>, channel: &str, status: &[u8]) -> Reply {
    if status.len() > MAX_STATUS_SIZE {
        error_total("payload_too_large");
        return Reply::new(ResponseType::RequestEntityTooLarge)
            .with_option(CoapOption::Size1.into(), uint(MAX_STATUS_SIZE as u64))
            .saying(format!("a status is at most {MAX_STATUS_SIZE} bytes"));
    }
    if channel != DFU_CHANNEL {
        return Reply::new(ResponseType::Changed);
    }
    let reply = match device.handle_status(status).await {
        Ok(reply) => reply,
        Err(error) => return Reply::new(ResponseType::BadRequest).saying(error.to_string()),
    };
    tracing::trace!(%key, command = reply.kind, "status answered");
    Reply::command(reply.command)
}

/// The channel of a `/v1/{channel}` path; `None` for any other path.
fn channel(request: &Packet) -> Option<String> {
    let segments = request.get_option(CoapOption::UriPath)?;
    let mut segments = segments.iter().map(|segment| std::str::from_utf8(segment).ok());
    match (segments.next(), segments.next(), segments.next()) {
        (Some(Some("v1")), Some(Some(channel)), None) if !channel.is_empty() => Some(channel.to_string()),
        _ => None,
    }
}

/// The request's Uri-Query, as the HTTP endpoint reads its query string: `ct` must be a number
/// (and is then ignored), unknown names are passed over.
fn query(request: &Packet) -> Result<Query, String> {
    let mut query = Query::default();
    for item in request.get_option(CoapOption::UriQuery).into_iter().flatten() {
        let item = std::str::from_utf8(item).map_err(|_| "a Uri-Query that is not UTF-8".to_string())?;
        let (name, value) = item.split_once('=').unwrap_or((item, ""));
        match name {
            "ct" => {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("ct={value}: not a number of seconds"))?;
            }
            "application" => query.application = Some(value.to_string()),
            "as" => query.as_device = Some(value.to_string()),
            _ => {}
        }
    }
    Ok(query)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ajour_protocol::{decode_command, encode_command, Command};
    use proptest::prelude::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn post(message_type: MessageType, path: &[&str]) -> Packet {
        let mut packet = Packet::new();
        packet.header.set_type(message_type);
        packet.header.code = MessageClass::Request(RequestType::Post);
        packet.header.message_id = 0x1234;
        packet.set_token(vec![1, 2, 3, 4, 5, 6, 7, 8]);
        for segment in path {
            packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        packet
    }

    #[test]
    fn the_largest_command_fits_one_message() {
        // The worst case: the largest block at the largest offset of a version of 64 bytes,
        // with a correlation id, an 8-byte token, and every option a command response carries.
        let block = vec![0xa5; MAX_BLOCK as usize];
        let version = [b'9'; 64];
        let command = encode_command(&Command::Write {
            version: &version,
            correlation_id: Some(u32::MAX),
            offset: u32::MAX,
            data: &block,
        });
        assert!(matches!(decode_command(&command), Ok(Command::Write { .. })));
        let request = post(MessageType::NonConfirmable, &["v1", "dfu"]);
        let bytes = response(&request, Reply::command(command), || 7)
            .to_bytes_unlimited()
            .unwrap();
        assert!(bytes.len() <= MAX_MESSAGE_SIZE, "{} bytes", bytes.len());
        // And the server's default mtu is within the limit.
        assert!(ajour_service::ServiceConfig::default().engine.block_size(None) <= MAX_BLOCK);
    }

    #[test]
    fn responses_echo_the_exchange() {
        let con = post(MessageType::Confirmable, &["v1", "dfu"]);
        let answer = response(&con, Reply::new(ResponseType::Changed), || unreachable!());
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(answer.header.message_id, 0x1234);
        assert_eq!(answer.get_token(), con.get_token());
        let non = post(MessageType::NonConfirmable, &["v1", "dfu"]);
        let answer = response(&non, Reply::new(ResponseType::Changed), || 99);
        assert_eq!(answer.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(answer.header.message_id, 99);
        assert_eq!(answer.get_token(), non.get_token());
        // Parsed back, the bytes say the same.
        let bytes = response(
            &con,
            Reply::new(ResponseType::TooManyRequests).retry_after(30),
            || 0,
        )
        .to_bytes_unlimited()
        .unwrap();
        let parsed = Packet::from_bytes(&bytes).unwrap();
        assert_eq!(
            parsed.header.code,
            MessageClass::Response(ResponseType::TooManyRequests)
        );
        assert_eq!(parsed.get_first_option(CoapOption::MaxAge), Some(&vec![30]));
    }

    #[test]
    fn datagrams_are_sorted_without_trusting_them() {
        let con = post(MessageType::Confirmable, &["v1", "dfu"])
            .to_bytes_unlimited()
            .unwrap();
        assert!(matches!(classify(&con), Incoming::Request(_)));
        // Too short to have a message id; another version.
        assert!(matches!(classify(&[0x40, 0x02, 0x12]), Incoming::Ignore(_)));
        assert!(matches!(classify(&[0x80, 0x02, 0x12, 0x34]), Incoming::Ignore(_)));
        // A CON ping is reset; a CON whose token is cut short is reset.
        assert!(matches!(
            classify(&[0x40, 0x00, 0x12, 0x34]),
            Incoming::Reset(0x1234, "ping")
        ));
        assert!(matches!(
            classify(&con[..6]),
            Incoming::Reset(0x1234, "malformed")
        ));
        // An ACK, and a NON response, are nothing the endpoint asked for.
        assert!(matches!(
            classify(&[0x60, 0x45, 0, 1]),
            Incoming::Ignore("unexpected")
        ));
        assert!(matches!(
            classify(&[0x50, 0x45, 0, 1]),
            Incoming::Ignore("unexpected")
        ));
        // Token length 9..15 is a format error (§3).
        assert!(matches!(
            classify(&[0x49, 0x02, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Incoming::Reset(1, _)
        ));
        // Option delta 15 without the payload marker.
        assert!(matches!(
            classify(&[0x40, 0x02, 0, 2, 0xf1, 0]),
            Incoming::Reset(2, _)
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Whatever the bytes, sorting them and reading a request out of them ends.
        #[test]
        fn no_datagram_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Incoming::Request(packet) = classify(&bytes) {
                let _ = channel(&packet);
                let _ = query(&packet);
                let _ = response(&packet, Reply::new(ResponseType::BadRequest).saying("x"), || 0)
                    .to_bytes_unlimited();
            }
        }

        /// A valid request's header with anything after it, as a fuzzer would send.
        #[test]
        fn no_request_body_panics(tail in proptest::collection::vec(any::<u8>(), 0..300), tkl in 0u8..16) {
            let mut bytes = vec![0x40 | tkl, 0x02, 0xab, 0xcd];
            bytes.extend(tail);
            if let Incoming::Request(packet) = classify(&bytes) {
                let _ = channel(&packet);
                let _ = query(&packet);
            }
        }
    }

    #[test]
    fn paths_and_queries_read_as_on_http() {
        let mut request = post(MessageType::Confirmable, &["v1", "dfu"]);
        assert_eq!(channel(&request).as_deref(), Some("dfu"));
        assert_eq!(channel(&post(MessageType::Confirmable, &["v1"])), None);
        assert_eq!(channel(&post(MessageType::Confirmable, &["v2", "dfu"])), None);
        assert_eq!(
            channel(&post(MessageType::Confirmable, &["v1", "dfu", "x"])),
            None
        );
        assert_eq!(channel(&post(MessageType::Confirmable, &[])), None);
        for item in ["ct=30", "application=app", "as=sensor", "other=1"] {
            request.add_option(CoapOption::UriQuery, item.as_bytes().to_vec());
        }
        let read = query(&request).unwrap();
        assert_eq!(read.application.as_deref(), Some("app"));
        assert_eq!(read.as_device.as_deref(), Some("sensor"));
        request.add_option(CoapOption::UriQuery, b"ct=soon".to_vec());
        assert!(query(&request).unwrap_err().contains("ct=soon"));
    }

    #[test]
    fn diagnostics_are_cut_short() {
        let reply = Reply::new(ResponseType::Forbidden).saying("é".repeat(1000));
        assert!(reply.payload.len() <= MAX_DIAGNOSTIC);
        assert!(std::str::from_utf8(&reply.payload).is_ok());
        let mut text = "aé".as_bytes().to_vec();
        cut_text(&mut text, 2);
        assert_eq!(text, b"a");
        cut_text(&mut text, 0);
        assert!(text.is_empty());
    }

    #[tokio::test]
    async fn past_its_capacity_the_endpoint_answers_5_03_and_keeps_no_answer() {
        let service = Arc::new(UpdateService::new(
            Arc::new(ajour_testkit::MemoryRegistry::new()),
            Arc::new(ajour_store::Firmware::default()),
            Default::default(),
        ));
        let socket = bind("127.0.0.1:0").await.unwrap();
        let server = socket.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = CoapConfig {
            max_in_flight: 0,
            ..Default::default()
        };
        let serving = tokio::spawn(serve(socket, service, config, async {
            let _ = stopped.await;
        }));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let request = post(MessageType::Confirmable, &["v1", "dfu"])
            .to_bytes_unlimited()
            .unwrap();
        // Sent twice: the second is no retransmission of a kept answer, it is tried again.
        for _ in 0..2 {
            client.send_to(&request, server).await.unwrap();
            let mut buffer = [0u8; 1500];
            let (len, _) = tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut buffer))
                .await
                .unwrap()
                .unwrap();
            let answer = Packet::from_bytes(&buffer[..len]).unwrap();
            assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
            assert_eq!(answer.header.message_id, 0x1234);
            assert_eq!(
                answer.header.code,
                MessageClass::Response(ResponseType::ServiceUnavailable)
            );
            assert_eq!(answer.get_first_option(CoapOption::MaxAge), Some(&vec![1]));
        }
        stop.send(()).unwrap();
        serving.await.unwrap();
    }

    #[test]
    fn exchanges_answer_retransmissions_and_forget_in_time_and_in_number() {
        let lifetime = Duration::from_secs(247);
        let mut exchanges = Exchanges::new(3, lifetime);
        let start = Instant::now();
        let Seen::New(seq) = exchanges.begin((addr(1), 7), start) else {
            panic!()
        };
        // The same message id from another peer is another exchange.
        assert!(matches!(exchanges.begin((addr(2), 7), start), Seen::New(_)));
        assert_eq!(exchanges.begin((addr(1), 7), start), Seen::InProgress);
        let bytes: Arc<[u8]> = Arc::from(&b"answer"[..]);
        exchanges.answer((addr(1), 7), seq, bytes.clone());
        assert_eq!(
            exchanges.begin((addr(1), 7), start + lifetime / 2),
            Seen::Answered(bytes.clone())
        );
        // Past the lifetime, the message id is new again.
        assert!(matches!(
            exchanges.begin((addr(1), 7), start + lifetime),
            Seen::New(_)
        ));
        // Capacity: the oldest is forgotten first.
        let mut exchanges = Exchanges::new(3, lifetime);
        for id in 0..5u16 {
            assert!(matches!(exchanges.begin((addr(1), id), start), Seen::New(_)));
            assert!(exchanges.len() <= 3);
        }
        assert!(matches!(exchanges.begin((addr(1), 0), start), Seen::New(_)));
        assert_eq!(exchanges.begin((addr(1), 4), start), Seen::InProgress);
        // An abandoned exchange is handled anew; a late answer to it is not recorded.
        let mut exchanges = Exchanges::new(3, lifetime);
        let Seen::New(seq) = exchanges.begin((addr(1), 9), start) else {
            panic!()
        };
        exchanges.abandon((addr(1), 9), seq);
        let Seen::New(again) = exchanges.begin((addr(1), 9), start) else {
            panic!()
        };
        exchanges.answer((addr(1), 9), seq, bytes.clone());
        assert_eq!(exchanges.begin((addr(1), 9), start), Seen::InProgress);
        exchanges.answer((addr(1), 9), again, bytes.clone());
        assert_eq!(exchanges.begin((addr(1), 9), start), Seen::Answered(bytes));
    }
}
