//! Hostile clients against the HTTP server: slow headers, idle connections, dripping bodies,
//! floods of malformed requests, more connections than the cap, more connections than the process
//! has files, and a stop (SIGTERM, SIGINT) in the middle of an update. Each runs while a good
//! device updates, which must still end with the whole image: the simulated device checks every
//! block's offset and the checksum.
//!
//! Timeouts are configured short (hundreds of milliseconds) so that the tests are quick; a close is
//! late when it comes more than [`MARGIN`] after its timeout.

use ajour::server::{self, ConnectionLimits, RunningServer, ServerConfig};
use ajour_sim::{
    run_device, DeviceOptions, Ended, HttpLink, Observer, Outcome, SimulatedDevice, StatusEncoding, Step,
};
use ajour_store::{FileStore, FirmwareName};
use ajour_testkit::{eventually, firmware_bytes, Metrics, ServerProcess};
use ajour_types::FirmwareReport;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `ajour` binary of this build.
const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");

const APP: &str = "fleet";
/// The device that must update whatever the hostile clients do.
const GOOD: &str = "good";
/// A device whose credentials hostile clients use, to get past authentication.
const HOSTILE: &str = "hostile";
const PASSWORD: &str = "pw";
const IMAGE_SIZE: usize = 64 * 1024;
const MTU: u32 = 1024;
const BLOCKS: usize = IMAGE_SIZE / MTU as usize;

/// How much later than its timeout a close may come on a loaded two-core machine.
const MARGIN: Duration = Duration::from_millis(1500);

/// The short limits of these tests: each timeout well apart from the others, the cap out of reach.
fn short_limits() -> ConnectionLimits {
    ConnectionLimits {
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_millis(1500),
        shutdown_timeout: Duration::from_secs(2),
        ..ConnectionLimits::default()
    }
}

/// Hostile clients hold hundreds of sockets at once, in this process and its servers.
fn allow_many_files() {
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
}

/// A server as the tests see it, in this process or not: where it is, its token, and the fleet
/// set up on it (firmware 1.0.0, application [`APP`] using it, devices [`GOOD`] and [`HOSTILE`]).
struct Fleet {
    addr: SocketAddr,
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Fleet {
    /// The server at `addr` whose data directory is `data_dir`, as it is.
    fn connect(addr: SocketAddr, data_dir: &Path) -> Self {
        let token = std::fs::read_to_string(server::token_path(data_dir))
            .expect("the API token in the data directory")
            .trim()
            .to_string();
        Self {
            addr,
            url: format!("http://{addr}"),
            token,
            // A connection per request, so that the test's own calls hold no place under the cap.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
        }
    }

    /// The server at `addr`, its fleet set up.
    async fn set_up(addr: SocketAddr, data_dir: &Path) -> Self {
        let fleet = Self::connect(addr, data_dir);
        FileStore::new(server::firmware_dir(data_dir), Duration::ZERO)
            .add(&FirmwareName::parse("fw").unwrap(), "1.0.0", &image())
            .unwrap();
        let app = json!({"metadata": {"name": APP}, "spec": {"firmware": {"file": {"name": "fw"}}}});
        assert_eq!(
            fleet.api(Method::POST, "apps", Some(app)).await.0,
            StatusCode::CREATED
        );
        for device in [GOOD, HOSTILE] {
            let body = json!({"metadata": {"name": device},
                              "spec": {"authentication": {"credentials": [{"pass": PASSWORD}]}}});
            let (status, body) = fleet
                .api(Method::POST, &format!("apps/{APP}/devices"), Some(body))
                .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
        fleet
    }

    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}/api/registry/v1alpha1/{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The update progress of `device` the API shows, in percent.
    async fn progress(&self, device: &str) -> f64 {
        let (status, body) = self
            .api(Method::GET, &format!("apps/{APP}/devices/{device}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let report = FirmwareReport::from_json(&body["status"]["firmware"]).unwrap();
        report
            .status
            .percent()
            .unwrap_or_else(|| panic!("{device} is not updating: {body}"))
    }

    /// The good device, from 0.1.0 to 1.0.0, over a kept-alive connection of `http`.
    fn good_device(&self, http: reqwest::Client) -> (SimulatedDevice, HttpLink) {
        let link = HttpLink::new(http, &self.url, APP, GOOD, PASSWORD);
        (SimulatedDevice::new("0.1.0", Some(MTU)), link)
    }

    /// Update the good device to the end; it retries while the server is unreachable or busy.
    async fn update_good_device(&self) {
        let (mut device, mut link) = self.good_device(reqwest::Client::new());
        assert_updated(run_device(&mut device, &mut link, &device_options(), &mut ()).await);
    }

    /// A status of `device` with `body` as a raw request, `Connection: close`.
    fn status_request(&self, device: &str, body: &[u8]) -> Vec<u8> {
        let mut request = format!(
            "POST /v1/dfu HTTP/1.1\r\nhost: {}\r\nauthorization: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.addr,
            ajour_types::basic_auth::encode(&format!("{device}@{APP}"), PASSWORD),
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    }

    /// The value of the server's gauge or counter `name` (no labels) now.
    async fn metric(&self, name: &str) -> f64 {
        Metrics::of(&self.url).await.value(name, &[])
    }
}

/// Assert that the good device ended its update with the whole image, its checksum verified.
fn assert_updated(ended: anyhow::Result<Ended>) {
    let updated = Ended::Done(Outcome::Updated {
        from: "0.1.0".into(),
        to: "1.0.0".into(),
        bytes: IMAGE_SIZE,
    });
    assert_eq!(ended.expect("the good device updates"), updated);
}

fn image() -> Vec<u8> {
    firmware_bytes(IMAGE_SIZE, 7)
}

fn device_options() -> DeviceOptions {
    // A good device may take its time, not for ever: it shares two cores with a thousand hostile
    // clients and this file's other tests, which took it from 6 to 34 s in runs on one machine.
    DeviceOptions::new(
        StatusEncoding::Packed,
        Duration::from_secs(1),
        Duration::from_secs(90),
    )
}

/// A server started in this process, on a free port, with `limits`.
struct InProcess {
    fleet: Fleet,
    running: RunningServer,
    _data_dir: tempfile::TempDir,
}

async fn start(limits: ConnectionLimits) -> InProcess {
    allow_many_files();
    let data_dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(data_dir.path());
    config.connections = limits;
    let listener = server::bind("127.0.0.1:0", limits.listen_backlog).await.unwrap();
    let running = server::start(listener, config).await.unwrap();
    let fleet = Fleet::set_up(running.addr, data_dir.path()).await;
    InProcess {
        fleet,
        running,
        _data_dir: data_dir,
    }
}

/// How a connection ended: what the server sent, and when it closed it.
struct Closed {
    received: Vec<u8>,
    /// From the start the caller gave.
    after: Duration,
}

impl Closed {
    fn status_line(&self) -> String {
        let text = String::from_utf8_lossy(&self.received);
        text.lines().next().unwrap_or_default().to_string()
    }

    /// The status code of the answer; `None` when there was none.
    fn status(&self) -> Option<u16> {
        self.status_line().split(' ').nth(1)?.parse().ok()
    }
}

/// Read what the server sends until it closes the connection (an end of file, or a reset after
/// it refused to read more); panic when it is still open `limit` after `since`.
async fn until_closed(reader: &mut (impl AsyncReadExt + Unpin), since: Instant, limit: Duration) -> Closed {
    let mut received = Vec::new();
    let read = async {
        let mut buffer = [0u8; 4096];
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    let deadline = since + limit;
    let closed = tokio::time::timeout_at(deadline.into(), read).await;
    assert!(
        closed.is_ok(),
        "still open {limit:?} after it began; received: {:?}",
        String::from_utf8_lossy(&received)
    );
    Closed {
        after: since.elapsed(),
        received,
    }
}

/// `clients` clients at once, each sending `head`, then one byte of `drip` every 50 ms, until the
/// server stops reading: how each connection ended, timed from its connect, at most `limit` later.
fn drip(
    clients: usize,
    addr: SocketAddr,
    head: &[u8],
    drip: &[u8],
    limit: Duration,
) -> Vec<tokio::task::JoinHandle<Closed>> {
    (0..clients)
        .map(|_| tokio::spawn(drip_one(addr, head.to_vec(), drip.to_vec(), limit)))
        .collect()
}

async fn drip_one(addr: SocketAddr, head: Vec<u8>, drip: Vec<u8>, limit: Duration) -> Closed {
    let since = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let dripping = tokio::spawn(async move {
        writer.write_all(&head).await?;
        for byte in drip {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.write_all(&[byte]).await?;
        }
        // Hold the connection open, sending nothing more.
        std::future::pending::<()>().await;
        std::io::Result::Ok(writer)
    });
    let closed = until_closed(&mut reader, since, limit).await;
    dripping.abort();
    closed
}

/// Assert that a close came after `timeout` (not before: the timeout is what closed it) and no
/// later than [`MARGIN`] after it.
fn assert_closed_at(closed: &Closed, timeout: Duration, what: &str) {
    assert!(
        closed.after >= timeout,
        "{what}: closed after {:?}, before its timeout {timeout:?}",
        closed.after
    );
    assert!(
        closed.after <= timeout + MARGIN,
        "{what}: closed after {:?}, late for its timeout {timeout:?}",
        closed.after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_at_the_header_timeout_while_a_device_updates() {
    let server = start(short_limits()).await;
    let fleet = &server.fleet;
    let header_timeout = short_limits().header_timeout;
    // Fifty clients that send a request line, then a header one byte every 50 ms (for 50 s).
    let head = b"POST /v1/dfu HTTP/1.1\r\n".to_vec();
    let header = b"x-slow: "
        .iter()
        .chain([b'a'; 1000].iter())
        .copied()
        .collect::<Vec<_>>();
    let slow = drip(50, fleet.addr, &head, &header, header_timeout + MARGIN);
    fleet.update_good_device().await;
    for client in slow {
        let closed = client.await.unwrap();
        assert_closed_at(&closed, header_timeout, "a slow header");
        assert!(closed.received.is_empty(), "{}", closed.status_line());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_while_a_device_updates() {
    let server = start(short_limits()).await;
    let fleet = &server.fleet;
    let limits = short_limits();
    let addr = fleet.addr;
    // Connections that send nothing at all: closed at the header timeout, from their accept.
    let silent: Vec<_> = (0..150)
        .map(|_| {
            tokio::spawn(async move {
                let since = Instant::now();
                let mut stream = TcpStream::connect(addr).await.unwrap();
                until_closed(&mut stream, since, limits.header_timeout + MARGIN).await
            })
        })
        .collect();
    // A kept-alive connection after one whole request: kept past the header timeout, closed at
    // the idle timeout.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    // Before the request: the server's last byte for this connection comes after.
    let kept_since = Instant::now();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: ajour\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 1024];
    let answered = kept.read(&mut answer).await.unwrap();
    assert!(answer[..answered].starts_with(b"HTTP/1.1 200"));
    let kept =
        tokio::spawn(async move { until_closed(&mut kept, kept_since, limits.idle_timeout + MARGIN).await });

    fleet.update_good_device().await;
    for client in silent {
        let closed = client.await.unwrap();
        assert_closed_at(&closed, limits.header_timeout, "a silent connection");
    }
    let kept = kept.await.unwrap();
    assert_closed_at(&kept, limits.idle_timeout, "an idle kept-alive connection");
    assert!(kept.received.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dripping_bodies_get_408_at_the_body_timeout_while_a_device_updates() {
    let server = start(short_limits()).await;
    let fleet = &server.fleet;
    let body_timeout = short_limits().body_timeout;
    // A whole head, with a device's credentials so that the body is read, then a body of 64
    // bytes, one every 50 ms: 3.2 s, were it not cut.
    let mut head = fleet.status_request(HOSTILE, &[0; 64]);
    head.truncate(head.len() - 64);
    let dripping = drip(20, fleet.addr, &head, &[0xa0; 64], body_timeout + MARGIN);
    fleet.update_good_device().await;
    for client in dripping {
        let closed = client.await.unwrap();
        assert_eq!(closed.status(), Some(408), "{}", closed.status_line());
        assert_closed_at(&closed, body_timeout, "a dripping body");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_malformed_requests_are_answered_and_closed_while_a_device_updates() {
    let server = start(short_limits()).await;
    let fleet = &server.fleet;
    let malformed: Vec<(&str, Vec<u8>, u16)> = vec![
        ("not HTTP", b"GARBAGE\r\n\r\n".to_vec(), 400),
        (
            "a head over 16 KiB",
            format!(
                "GET /healthz HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
                "a".repeat(20_000)
            )
            .into_bytes(),
            431,
        ),
        (
            "a content length that is no number",
            b"POST /v1/dfu HTTP/1.1\r\nhost: a\r\ncontent-length: many\r\n\r\n".to_vec(),
            400,
        ),
        (
            "no credentials",
            b"POST /v1/dfu HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc".to_vec(),
            401,
        ),
        (
            "a body that is no status",
            fleet.status_request(HOSTILE, b"\xff\x00 not CBOR"),
            400,
        ),
        (
            "a body over 4 KiB",
            fleet.status_request(HOSTILE, &[0xa0; 5000]),
            413,
        ),
        (
            "the API without a token",
            b"GET /api/registry/v1alpha1/apps HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n".to_vec(),
            401,
        ),
    ];
    let addr = fleet.addr;
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let malformed = malformed.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    for (what, request, answer) in &malformed {
                        let since = Instant::now();
                        let mut stream = TcpStream::connect(addr).await.unwrap();
                        // The server may stop reading a request it refuses before it is all sent.
                        let _ = stream.write_all(request).await;
                        let closed = until_closed(&mut stream, since, MARGIN).await;
                        assert_eq!(closed.status(), Some(*answer), "{what}: {}", closed.status_line());
                    }
                }
            })
        })
        .collect();
    fleet.update_good_device().await;
    for worker in flood {
        worker.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_503_and_are_closed_while_a_device_updates() {
    const CAP: usize = 8;
    let limits = ConnectionLimits {
        max_connections: CAP as u32,
        // Long, so that connections that send nothing keep their places for the whole test.
        header_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        ..short_limits()
    };
    let server = start(limits).await;
    let fleet = &server.fleet;
    let running = &server.running;
    assert_eq!(running.max_connections, CAP);
    let addr = fleet.addr;

    // All places but one held by connections that send nothing.
    let mut holders = Vec::new();
    for _ in 1..CAP {
        holders.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually(Duration::from_secs(10), "the holders' connections", || {
        std::future::ready(running.open_connections() == CAP - 1)
    })
    .await;
    // The good device takes the last place, and keeps it between statuses (its client is held
    // here, so its connection outlives the update).
    let http = reqwest::Client::new();
    let (mut device, mut link) = fleet.good_device(http.clone());
    let updating =
        tokio::spawn(async move { run_device(&mut device, &mut link, &device_options(), &mut ()).await });
    eventually(Duration::from_secs(10), "the device's connection", || {
        std::future::ready(running.open_connections() == CAP)
    })
    .await;

    // Fifty more, half of them sending a request at once: none is served; each is told 503 and
    // when to come back, or, when it sent first, may see its connection reset after the answer.
    let refused: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(async move {
                let since = Instant::now();
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let sent = i % 2 == 0;
                if sent {
                    let _ = stream
                        .write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
                        .await;
                }
                (sent, until_closed(&mut stream, since, MARGIN).await)
            })
        })
        .collect();
    for client in refused {
        let (sent, closed) = client.await.unwrap();
        if sent && closed.received.is_empty() {
            continue;
        }
        assert_eq!(closed.status(), Some(503), "{}", closed.status_line());
        let answer = String::from_utf8_lossy(&closed.received).to_lowercase();
        assert!(answer.contains("\r\nretry-after: "), "{answer}");
        // One whole answer, as its content-length says.
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{answer}"
        );
    }
    assert_updated(updating.await.unwrap());

    // Places are given back: once the holders are gone, a new client is served.
    drop(holders);
    eventually(Duration::from_secs(10), "the holders' places given back", || {
        std::future::ready(running.open_connections() == 1)
    })
    .await;
    let answer = reqwest::get(format!("{}/healthz", fleet.url)).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    drop(http);
}

/// `ajour serve` as a child process on a free port with its own data directory (SQLite), the
/// fleet set up on it; killed when dropped.
struct Serve {
    process: ServerProcess,
    data: tempfile::TempDir,
    fleet: Fleet,
}

impl Serve {
    /// `[WRAPPER..] ajour serve --listen 127.0.0.1:0 --data-dir DIR ARGS`, the
    /// log at `info`.
    async fn start(wrapper: &[&str], args: &[&str]) -> Self {
        allow_many_files();
        let data = tempfile::tempdir().unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(AJOUR);
                command
            }
            None => Command::new(AJOUR),
        };
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir(data.path()))
            .args(args)
            .env("AJOUR_LOG", "info");
        let process = ServerProcess::start(command).await;
        let fleet = Fleet::set_up(process.addr(), &data_dir(data.path())).await;
        Self { process, data, fleet }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.process.pid()).unwrap()
    }

    /// What it logged so far.
    fn log(&self) -> String {
        self.process.log()
    }
}

fn data_dir(dir: &Path) -> PathBuf {
    dir.join("data")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_files_neither_stop_the_server_nor_a_device() {
    // Started with 256 files, it caps connections below them (256 less 64 kept).
    let mut serve = Serve::start(
        &["prlimit", "--nofile=256:256", "--"],
        &["--header-timeout-ms", "300"],
    )
    .await;
    assert!(
        serve.log().contains("accepting at most 192 connections at once"),
        "{}",
        serve.log()
    );
    // Then its files are cut to 64, under the cap: accepting fails with EMFILE once they are
    // used up, and must only pause until connections close.
    rlimit::prlimit(serve.pid(), rlimit::Resource::NOFILE, Some((64, 64)), None).unwrap();
    let since = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(serve.fleet.addr).await.unwrap());
    }
    serve.fleet.update_good_device().await;
    // Every one was accepted in the end, and closed at its header timeout.
    for mut stream in silent {
        until_closed(&mut stream, since, Duration::from_secs(30)).await;
    }
    assert!(
        serve.process.child().try_wait().unwrap().is_none(),
        "the server exited: {}",
        serve.log()
    );
    assert!(
        serve.log().contains("Too many open files"),
        "accepting never ran out of files, so this test tested nothing: {}",
        serve.log()
    );
}

/// Stops the device after it followed this many commands.
struct StopAfter(usize);

impl Observer for StopAfter {
    fn answered(&mut self, _latency: Duration, _step: &Step) -> anyhow::Result<ControlFlow<()>> {
        self.0 -= 1;
        Ok(if self.0 == 0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    }
}

/// Stop `ajour serve` with `signal` half-way through an update, with a status in flight and a
/// client that never finishes its head: the status is answered, the process exits 0 within its
/// shutdown timeout, and the database holds the progress of the last status.
async fn stop_mid_update(signal: nix::sys::signal::Signal) {
    let shutdown_timeout = Duration::from_secs(2);
    let mut serve = Serve::start(
        &[],
        &[
            // Progress is written only when the server stops.
            "--progress-interval-ms",
            "600000",
            "--header-timeout-ms",
            "60000",
            "--shutdown-timeout-ms",
            &shutdown_timeout.as_millis().to_string(),
        ],
    )
    .await;
    let fleet = &serve.fleet;
    // Half the update: the API shows its progress (held in memory), the database only its start.
    let (mut device, mut link) = fleet.good_device(reqwest::Client::new());
    let ended = run_device(
        &mut device,
        &mut link,
        &device_options(),
        &mut StopAfter(BLOCKS / 2),
    )
    .await;
    assert_eq!(ended.unwrap(), Ended::Stopped);
    let shown = fleet.progress(GOOD).await;
    assert!(shown >= 45.0, "{shown}%");

    // A client that never finishes its head: the stop must not wait for it past its timeout.
    let mut stalled = TcpStream::connect(fleet.addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/dfu HTTP/1.1\r\nx-never: ")
        .await
        .unwrap();
    // The device's next status in flight: all but its last byte sent.
    let mut request = fleet.status_request(GOOD, &device.encoded_status(StatusEncoding::Packed));
    let last = request.pop().unwrap();
    let mut in_flight = TcpStream::connect(fleet.addr).await.unwrap();
    in_flight.write_all(&request).await.unwrap();
    // Two: that status, and the request for the metrics.
    eventually(Duration::from_secs(10), "the status in progress", || async {
        fleet.metric("ajour_http_requests_in_progress").await >= 2.0
    })
    .await;

    let signalled = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(serve.pid()), signal).unwrap();
    let taken = format!("{}: shutting down", signal.as_str());
    eventually(Duration::from_secs(10), "the signal taken", || {
        std::future::ready(serve.log().contains(&taken))
    })
    .await;
    in_flight.write_all(&[last]).await.unwrap();
    let answer = until_closed(&mut in_flight, Instant::now(), MARGIN).await;
    assert_eq!(answer.status(), Some(200), "{}", answer.status_line());
    assert!(String::from_utf8_lossy(&answer.received).contains("\r\ncommand: dfu\r\n"));

    let mut exited = None;
    eventually(shutdown_timeout + 2 * MARGIN, "the server to exit", || {
        exited = serve.process.child().try_wait().unwrap();
        std::future::ready(exited.is_some())
    })
    .await;
    let exited = exited.unwrap();
    assert!(exited.success(), "{exited}: {}", serve.log());
    assert!(signalled.elapsed() <= shutdown_timeout + 2 * MARGIN);
    drop(stalled);

    // Started again on its data, the server shows what the database kept.
    let data = data_dir(serve.data.path());
    let listener = server::bind("127.0.0.1:0", 16).await.unwrap();
    let running = server::start(listener, ServerConfig::new(&data)).await.unwrap();
    let kept = Fleet::connect(running.addr, &data).progress(GOOD).await;
    assert!(
        kept > shown,
        "the database kept {kept}%; the API showed {shown}% before the last status"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_update_answers_the_status_in_flight_and_writes_progress() {
    stop_mid_update(nix::sys::signal::Signal::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_mid_update_answers_the_status_in_flight_and_writes_progress() {
    stop_mid_update(nix::sys::signal::Signal::SIGINT).await;
}

/// Wrong passwords from 40 addresses, 1,000 requests in flight at once, for the fleet's devices,
/// a device nobody uses and devices that do not exist, while the fleet updates: every guess is
/// refused (403, or 429 once an address or a device is locked out), the fleet's devices (which
/// logged in before, from their own address) and a device logging in for the first time during
/// the attack all finish their updates with the image verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_from_many_addresses_locks_out_neither_the_fleet_nor_a_new_device() {
    const FLEET: usize = 10;
    const ADDRESSES: u8 = 40;
    const PER_ADDRESS: usize = 25;
    let server = start(ConnectionLimits::default()).await;
    let fleet = &server.fleet;
    let names: Vec<String> = (0..FLEET)
        .map(|i| format!("dev-{i}"))
        .chain(["late".into()])
        .collect();
    for name in &names {
        let body = json!({"metadata": {"name": name},
                          "spec": {"authentication": {"credentials": [{"pass": PASSWORD}]}}});
        let (status, body) = fleet
            .api(Method::POST, &format!("apps/{APP}/devices"), Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // The fleet logs in (its first status) before the attack.
    let http = reqwest::Client::new();
    let mut devices = Vec::new();
    for name in &names[..FLEET] {
        let mut device = SimulatedDevice::new("0.1.0", Some(MTU));
        let mut link = HttpLink::new(http.clone(), &fleet.url, APP, name, PASSWORD);
        let ended = run_device(&mut device, &mut link, &device_options(), &mut StopAfter(1)).await;
        assert_eq!(ended.unwrap(), Ended::Stopped);
        devices.push((device, link));
    }

    let attacking = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let at_full_force = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut targets: Vec<String> = names[..FLEET].to_vec();
    targets.extend([HOSTILE.to_string(), "nobody".into(), "ghost-1".into()]);
    let mut attackers = Vec::new();
    for host in 2..2 + ADDRESSES {
        let local = std::net::IpAddr::from([127, 0, 0, host]);
        let http = reqwest::Client::builder().local_address(local).build().unwrap();
        for task in 0..PER_ADDRESS {
            let (http, url) = (http.clone(), format!("{}/v1/dfu", fleet.url));
            let (attacking, refused, at_full_force) =
                (attacking.clone(), refused.clone(), at_full_force.clone());
            let targets = targets.clone();
            attackers.push(tokio::spawn(async move {
                let mut answers = std::collections::BTreeMap::<u16, usize>::new();
                let mut round = task;
                while attacking.load(std::sync::atomic::Ordering::Relaxed) {
                    let target = &targets[round % targets.len()];
                    round += 1;
                    let response = http
                        .post(&url)
                        .basic_auth(format!("{target}@{APP}"), Some(format!("guess-{round}")))
                        .body(vec![0xa0])
                        .send()
                        .await
                        .expect("the server answers every guess");
                    let code = response.status().as_u16();
                    assert!(code == 403 || code == 429, "a guess answered {code}");
                    if code == 429 {
                        assert!(
                            response.headers().contains_key("retry-after"),
                            "429 without Retry-After"
                        );
                    }
                    *answers.entry(code).or_default() += 1;
                    if refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == 1000 {
                        at_full_force.notify_one();
                    }
                }
                answers
            }));
        }
    }
    at_full_force.notified().await;

    // Under the attack: the fleet finishes, and a device logs in for the first time and updates.
    let mut updates = Vec::new();
    for (mut device, mut link) in devices {
        updates.push(tokio::spawn(async move {
            run_device(&mut device, &mut link, &device_options(), &mut ()).await
        }));
    }
    let mut late = SimulatedDevice::new("0.1.0", Some(MTU));
    let mut late_link = HttpLink::new(http.clone(), &fleet.url, APP, "late", PASSWORD);
    assert_updated(run_device(&mut late, &mut late_link, &device_options(), &mut ()).await);
    for update in updates {
        assert_updated(update.await.unwrap());
    }
    attacking.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    for attacker in attackers {
        for (code, count) in attacker.await.unwrap() {
            *answers.entry(code).or_default() += count;
        }
    }
    assert!(answers.get(&403).copied().unwrap_or(0) >= 1000, "{answers:?}");
    assert!(answers.get(&429).copied().unwrap_or(0) > 0, "{answers:?}");
    let metrics = Metrics::of(&fleet.url).await;
    assert!(metrics.value("ajour_auth_throttled_total", &[("by", "address")]) > 0.0);
    assert!(metrics.value("ajour_auth_throttled_total", &[("by", "device")]) > 0.0);
    assert!(metrics.value("ajour_auth_failures_total", &[]) >= 1000.0);
}
