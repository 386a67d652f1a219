//! How HTTP connections reach the endpoints and the API: one accept loop (hyper's HTTP/1) that
//! times every connection (head, body, idle), caps how many are open (past the cap a client is
//! answered `503` at once and closed), keeps accepting when the process is out of files, and drains
//! for a bounded time on shutdown. No client, slow, idle or hostile, can hold the server's files or
//! its shutdown (docs/http-and-api.md, "Connections, timeouts and shutdown").

use ajour_service::hot_metrics::HotGauge;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// How HTTP connections are timed, capped and drained, so that no client, slow, idle or hostile,
/// can hold the server's files or its shutdown (docs/http-and-api.md, "Connections, timeouts and
/// shutdown"). The defaults suit a fleet of 10,000 devices polling over kept-alive connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A request head must have arrived whole this long after the connection was accepted, or,
    /// on a kept-alive connection, after its first byte; else the connection is closed.
    pub header_timeout: Duration,
    /// A request body must have arrived whole this long after its head (`408` on the device
    /// endpoint, and the connection is closed).
    pub body_timeout: Duration,
    /// A kept-alive connection with no request in progress is closed after this long without a
    /// byte in either direction.
    pub idle_timeout: Duration,
    /// Connections open at once; past it a connection is answered `503` and closed. Lowered at
    /// start to what the open-file limit leaves (see [`connection_cap`]).
    pub max_connections: u32,
    /// Connections the kernel queues for the server to accept (capped by `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// On shutdown, how long open connections get to finish their requests before they are
    /// closed; pending statuses are written after.
    pub shutdown_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            // Longer than the header timeout: a device polling on a kept-alive connection keeps
            // it between statuses.
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            listen_backlog: 4096,
            // Within `docker stop`'s 10 s before SIGKILL, with time left to write statuses.
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// Bind `listen` (`ADDR:PORT`, or `HOST:PORT`: the first address that binds) with a listen
/// backlog of `backlog` connections, where tokio's `TcpListener::bind` always asks for 128.
pub async fn bind(listen: &str, backlog: u32) -> std::io::Result<TcpListener> {
    let with =
        |what: String, error: std::io::Error| std::io::Error::new(error.kind(), format!("{what}: {error}"));
    let mut failure = None;
    for addr in tokio::net::lookup_host(listen)
        .await
        .map_err(|e| with(format!("resolving {listen}"), e))?
    {
        match bind_addr(addr, backlog) {
            Ok(listener) => return Ok(listener),
            Err(error) => failure = Some(with(format!("binding {addr}"), error)),
        }
    }
    Err(failure.unwrap_or_else(|| {
        std::io::Error::new(
            ErrorKind::AddrNotAvailable,
            format!("{listen} resolves to no address"),
        )
    }))
}

fn bind_addr(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // As `TcpListener::bind` does: a restarted server binds its port while old connections linger.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// Files kept for what is not a connection (the database and its journal, firmware files, the
/// runtime, the log) when the open-file limit is what caps connections.
const FILES_KEPT: u64 = 64;

/// `configured`, lowered so that connections cannot use up the open-file limit ([`FILES_KEPT`],
/// or a quarter of a smaller limit, are kept for the rest): past the cap a client is told to come
/// back later, instead of the accept loop failing for every client.
pub fn connection_cap(configured: u32) -> usize {
    let configured = usize::try_from(configured).unwrap_or(usize::MAX).max(1);
    #[cfg(unix)]
    if let Ok((open_files, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let fits = usize::try_from(open_files - FILES_KEPT.min(open_files / 4)).unwrap_or(usize::MAX);
        let cap = configured.min(fits).max(1);
        tracing::info!(
            "accepting at most {cap} connections at once (--max-connections {configured}, open-file limit {open_files})"
        );
        return cap;
    }
    tracing::info!("accepting at most {configured} connections at once");
    configured
}

/// The first pause of the accept loop when accepting fails (out of files or memory), doubling up
/// to [`ACCEPT_PAUSE_MAX`] while it keeps failing.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(20);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Accept failures are logged at most this often.
const ACCEPT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a connection past the cap is told, in one write that fits the empty send buffer of a new
/// socket, so that refusing never waits on the client.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain\r\n\
retry-after: 5\r\n\
connection: close\r\n\
content-length: 34\r\n\
\r\n\
too many connections; retry later\n";

/// The largest request head (request line and headers) read; hyper answers `431` past it. Small,
/// so that 10,000 connections sending heads cannot hold much memory.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Counted on every request (the handle looked up once).
static REQUESTS_IN_PROGRESS: HotGauge = HotGauge::new("ajour_http_requests_in_progress");

/// Accept connections until `stop` resolves and serve `app` on each under `limits`, at most as
/// many at once as `slots` has permits. Then stop accepting, let the connections finish what they
/// are doing for up to `limits.shutdown_timeout`, and close those still open.
///
/// Accepting never ends the loop: out of files (EMFILE, ENFILE) or memory, the connection stays
/// queued in the backlog and the loop pauses while open connections finish and free theirs.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    stop: impl Future<Output = ()>,
) {
    serve_with(listener, app, limits, slots, None, stop).await;
}

/// [`serve`], over TLS when `tls` is given: then every connection speaks TLS only, and its
/// handshake runs in its own task under the header timeout (counted from its accept, as for a
/// request head), so a client that never sends its hello is closed like one that never sends a
/// request, and holds its place under the cap meanwhile, as any connection does.
pub async fn serve_with(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    tls: Option<TlsAcceptor>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut connections = JoinSet::new();
    let (drain, draining) = watch::channel(false);
    let mut pause = ACCEPT_PAUSE_MIN;
    let mut last_logged: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                pause = ACCEPT_PAUSE_MIN;
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    refuse(stream, peer);
                    continue;
                };
                let slot = ConnectionSlot::new(permit);
                connections.spawn(accept_connection(
                    stream,
                    peer,
                    app.clone(),
                    limits,
                    slot,
                    tls.clone(),
                    draining.clone(),
                ));
            }
            // The client gave up before its connection was accepted.
            Err(error)
                if matches!(
                    error.kind(),
                    ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
                ) => {}
            Err(error) => {
                metrics::counter!("ajour_http_accept_failures_total").increment(1);
                if last_logged.is_none_or(|at| at.elapsed() >= ACCEPT_FAILURE_LOG_INTERVAL) {
                    last_logged = Some(Instant::now());
                    tracing::warn!(
                        open = connections.len(),
                        "cannot accept connections ({error}); retrying while open ones finish"
                    );
                }
                tokio::select! {
                    () = &mut stop => break,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
            }
        }
    }
    // New connections are refused by the kernel from here on.
    drop(listener);
    let _ = drain.send(true);
    if !connections.is_empty() {
        tracing::info!(
            "waiting up to {:?} for {} connections to finish",
            limits.shutdown_timeout,
            connections.len()
        );
    }
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "closing {} connections still open after {:?}",
            connections.len(),
            limits.shutdown_timeout
        );
        connections.shutdown().await;
    }
}

/// Answer a connection past the cap with [`REFUSAL`] and close it, without waiting for anything.
fn refuse(stream: TcpStream, peer: SocketAddr) {
    metrics::counter!("ajour_http_connections_refused_total").increment(1);
    tracing::debug!(%peer, "refused: too many connections");
    // Read what the client already sent: closing a socket with unread bytes resets the connection,
    // which can make the client lose the answer.
    let mut request = [0u8; 4096];
    let _ = stream.try_read(&mut request);
    let _ = stream.try_write(REFUSAL);
}

/// Serve `app` on one accepted connection, over TLS when `tls` is given (the handshake first,
/// within the header timeout from the accept). `slot` is its place under the cap, given back when
/// it closes.
async fn accept_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    limits: ConnectionLimits,
    slot: ConnectionSlot,
    tls: Option<TlsAcceptor>,
    draining: watch::Receiver<bool>,
) {
    let clock = Arc::new(ConnectionClock::new());
    let stream = WatchedStream {
        stream,
        clock: clock.clone(),
    };
    match tls {
        None => serve_connection(stream, peer, None, app, limits, clock, draining).await,
        Some(tls) => {
            // The clock's header deadline, from the accept: the handshake and then the request
            // head must both arrive within it.
            let deadline = Instant::now() + limits.header_timeout;
            match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let chain = crate::client_cert::peer_chain(stream.get_ref().1)
                        .map(|chain| crate::client_cert::ClientChain(Arc::new(chain)));
                    serve_connection(stream, peer, chain, app, limits, clock, draining).await
                }
                Ok(Err(error)) => tracing::debug!(%peer, "TLS handshake failed: {error}"),
                Err(_) => {
                    metrics::counter!(
                        "ajour_http_connections_timed_out_total",
                        "timeout" => ConnectionTimeout::Header.name()
                    )
                    .increment(1);
                    tracing::debug!(%peer, "closing the connection: no TLS handshake within the header timeout");
                }
            }
        }
    }
    drop(slot);
}

/// Serve `app` on one connection until the client closes it, a timeout of `limits` closes it,
/// or the server drains (`draining`): then the request in progress is finished and the connection
/// closed. `clock` is the one `stream` reports to; `chain`, the client certificate it presented
/// over TLS, goes with each request.
async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    chain: Option<crate::client_cert::ClientChain>,
    app: axum::Router,
    limits: ConnectionLimits,
    clock: Arc<ConnectionClock>,
    mut draining: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let clock = clock.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let serving = clock.request_started();
            let mut request = request.map(|body| DeadlineBody::new(body, limits.body_timeout));
            // Handlers see the client's address as axum's `ConnectInfo` (failed logins are
            // counted per address).
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            if let Some(chain) = &chain {
                request.extensions_mut().insert(chain.clone());
            }
            let response = app.clone().oneshot(request);
            async move {
                let response = response.await;
                drop(serving);
                response
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        // hyper's own header timeout also runs while a kept-alive connection waits for its next
        // request, so it would be the idle timeout too; `ConnectionClock` keeps the two apart.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service)
        // WebSocket handshakes (the API's live stream): once a connection is upgraded, hyper
        // hands it to the handler and this task ends, so it no longer counts under the cap nor
        // runs these timeouts: the stream keeps its own (`ajour-api/src/stream.rs`).
        .with_upgrades();
    tokio::pin!(connection);
    let mut drain_seen = false;
    loop {
        let check_at = clock.next_check(&limits);
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    tracing::debug!(%peer, "connection ended: {error}");
                }
                break;
            }
            _ = draining.wait_for(|draining| *draining), if !drain_seen => {
                drain_seen = true;
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(check_at) => {
                if let Some(timeout) = clock.expired(&limits) {
                    metrics::counter!("ajour_http_connections_timed_out_total", "timeout" => timeout.name())
                        .increment(1);
                    tracing::debug!(%peer, "closing the connection: {} timeout", timeout.name());
                    break;
                }
            }
        }
    }
}

/// A connection's place under the cap: given back, and the connection counted out of those open,
/// when it is dropped, however the connection's task ends (closed, failed, or aborted at the end
/// of a drain).
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        metrics::gauge!("ajour_http_connections_open").increment(1);
        Self { _permit: permit }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        metrics::gauge!("ajour_http_connections_open").decrement(1);
    }
}

/// Which timeout closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectionTimeout {
    Header,
    Idle,
}

impl ConnectionTimeout {
    fn name(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Idle => "idle",
        }
    }
}

/// What a connection's header and idle timeouts look at, kept up to date by its socket
/// ([`WatchedStream`]) and its requests. The body timeout is the body's own ([`DeadlineBody`]).
struct ConnectionClock(std::sync::Mutex<ClockState>);

struct ClockState {
    /// When a byte last moved either way, or a request began or ended.
    last_activity: Instant,
    /// Since when a request head is awaited that has not arrived whole: on a new connection from
    /// its accept, later from the first byte read while no request is in progress.
    head_since: Option<Instant>,
    /// Requests being handled.
    requests: usize,
}

impl ConnectionClock {
    fn new() -> Self {
        let now = Instant::now();
        Self(std::sync::Mutex::new(ClockState {
            last_activity: now,
            head_since: Some(now),
            requests: 0,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bytes_read(&self) {
        let mut state = self.state();
        let now = Instant::now();
        state.last_activity = now;
        if state.requests == 0 && state.head_since.is_none() {
            state.head_since = Some(now);
        }
    }

    fn bytes_written(&self) {
        self.state().last_activity = Instant::now();
    }

    /// A request head arrived whole; the request is in progress until the guard drops.
    fn request_started(self: &Arc<Self>) -> RequestInProgress {
        let mut state = self.state();
        state.requests += 1;
        state.head_since = None;
        state.last_activity = Instant::now();
        REQUESTS_IN_PROGRESS.increment(1.0);
        RequestInProgress(self.clone())
    }

    /// When the connection is to be closed if nothing happens before, and by which timeout;
    /// `None` while a request is in progress.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, ConnectionTimeout)> {
        let state = self.state();
        if state.requests > 0 {
            return None;
        }
        Some(match state.head_since {
            Some(since) => (since + limits.header_timeout, ConnectionTimeout::Header),
            None => (state.last_activity + limits.idle_timeout, ConnectionTimeout::Idle),
        })
    }

    /// When to look at the deadline again. Never later than one header timeout from now: a head
    /// that starts after now is due no earlier than that, so waking then is in time for it, and
    /// no wake-up is needed when the state changes.
    fn next_check(&self, limits: &ConnectionLimits) -> Instant {
        let soonest = Instant::now() + limits.header_timeout;
        self.deadline(limits)
            .map_or(soonest, |(deadline, _)| deadline.min(soonest))
    }

    /// The timeout that has run out, if one has.
    fn expired(&self, limits: &ConnectionLimits) -> Option<ConnectionTimeout> {
        self.deadline(limits)
            .filter(|(deadline, _)| *deadline <= Instant::now())
            .map(|(_, timeout)| timeout)
    }
}

/// A request in progress on a connection ([`ConnectionClock::request_started`]).
struct RequestInProgress(Arc<ConnectionClock>);

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.requests -= 1;
        state.last_activity = Instant::now();
        REQUESTS_IN_PROGRESS.decrement(1.0);
    }
}

/// A connection's socket, telling the connection's clock when bytes move.
struct WatchedStream {
    stream: TcpStream,
    clock: Arc<ConnectionClock>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.bytes_read();
        }
        polled
    }
}

impl WatchedStream {
    fn wrote(&self, polled: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.clock.bytes_written();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A request body that fails with `TimedOut` unless it has arrived whole within its timeout of
/// the request's head. tower-http's `RequestBodyTimeout` bounds only the wait for each frame,
/// which a body dripped byte by byte never exceeds.
struct DeadlineBody<B> {
    body: B,
    /// `None` for a body that is already complete (no body at all).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
}

impl<B: http_body::Body> DeadlineBody<B> {
    fn new(body: B, timeout: Duration) -> Self {
        let deadline = (!body.is_end_stream()).then(|| Box::pin(tokio::time::sleep(timeout)));
        Self {
            body,
            deadline,
            timeout,
        }
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let timed_out = this
            .deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
        if !timed_out {
            return Poll::Pending;
        }
        let error = std::io::Error::new(
            ErrorKind::TimedOut,
            format!("the request body did not arrive within {:?}", this.timeout),
        );
        Poll::Ready(Some(Err(error.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
