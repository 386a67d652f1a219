//! The CoAP device endpoint end to end (`ajour serve --coap-listen`): a fleet of simulated devices
//! over it on both registries, Debian's `coap-client` (libcoap) as a peer no one here wrote,
//! retransmissions answered from the exchange cache and never handled twice, every refusal with
//! its code, datagrams that are not requests, and the same command bytes as over HTTP.

use crate::support::*;
use ajour::server;
use ajour_protocol::{decode_command, encode_status, Command, Encoding, Status};
use ajour_registry::AppName;
use ajour_service::traffic::{Next, STATUS_EVENT_TYPE};
use ajour_sim::coap::coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use ajour_sim::coap::{dfu_request, AUTHORIZATION_OPTION, COMMAND_OPTION};
use ajour_sim::{CoapLink, SimulatedDevice, Transport};
use clap::Parser;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// How long a test waits for one answer before failing (never a synchronisation: answers are
/// awaited, this only bounds a hang).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// A server started in this process with `--coap-listen 127.0.0.1:0` and `extra` flags.
async fn coap_server(backend: Backend, extra: &[&str]) -> FlagServer {
    let server = FlagServer::start(backend, &[&["--coap-listen", "127.0.0.1:0"][..], extra].concat()).await;
    assert_ne!(server.coap().port(), 0);
    server
}

/// A device's first status: running 1.0.0, 256-byte blocks, correlation id 9.
fn first_status() -> Vec<u8> {
    encode_status(
        &Status::first(b"1.0.0".to_vec(), Some(256), Some(9)),
        Encoding::Packed,
    )
}

fn basic(device: &str, app: &str, password: &str) -> String {
    ajour_types::basic_auth::encode(&format!("{device}@{app}"), password)
}

/// A peer speaking raw CoAP from a socket of its own.
struct Peer {
    socket: UdpSocket,
    server: SocketAddr,
}

impl Peer {
    async fn new(server: SocketAddr) -> Self {
        Self {
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
        }
    }

    async fn send(&self, datagram: &[u8]) {
        self.socket.send_to(datagram, self.server).await.unwrap();
    }

    /// The next datagram from the server, as bytes.
    async fn receive(&self) -> Vec<u8> {
        let mut buffer = vec![0u8; 65_536];
        let (len, from) = tokio::time::timeout(ANSWER_TIMEOUT, self.socket.recv_from(&mut buffer))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(from, self.server);
        buffer.truncate(len);
        buffer
    }

    /// Send `request` and return the next datagram, which must be its piggybacked answer.
    async fn exchange(&self, request: &Packet) -> Packet {
        self.send(&request.to_bytes_unlimited().unwrap()).await;
        let answer = Packet::from_bytes(&self.receive().await).unwrap();
        assert_eq!(answer.header.message_id, request.header.message_id);
        assert_eq!(answer.get_token(), request.get_token());
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        answer
    }
}

fn con(message_id: u16, authorization: Option<&str>, query: &[&str], status: &[u8]) -> Packet {
    dfu_request(
        MessageType::Confirmable,
        message_id,
        &message_id.to_be_bytes(),
        authorization,
        query,
        status,
    )
}

fn code(packet: &Packet) -> ResponseType {
    match packet.header.code {
        MessageClass::Response(code) => code,
        other => panic!("not a response: {other}"),
    }
}

fn diagnostic(packet: &Packet) -> String {
    String::from_utf8_lossy(&packet.payload).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_updates_over_coap() {
    for backend in BACKENDS {
        let server = coap_server(backend, &[]).await;
        let image = firmware_bytes(8 * 1024, 4);
        let names: Vec<String> = (0..20).map(|i| format!("sim-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        server.with_devices("fleet", &image, &names).await;
        let transport = Transport::Coap {
            urls: vec![format!("coap://{}", server.coap())],
        };
        let outcomes = simulate(&fleet("fleet", 20, transport)).await;
        assert_eq!(outcomes.len(), 20, "{backend:?}");
        assert_all_updated(&outcomes, "2.0.0", image.len());
        // The server saw it so: every device in sync on the new version.
        server.service().settle_status_writes().await;
        for name in &names {
            assert!(
                in_sync(&server.firmware("fleet", name).await, "2.0.0"),
                "{backend:?} {name}"
            );
        }
        server.stop().await;
    }
}

/// libcoap's `coap-client`, from Debian's libcoap3-bin (scripts/setup-test-env.sh installs it):
/// the first of its builds on PATH.
fn coap_client() -> &'static str {
    [
        "coap-client",
        "coap-client-notls",
        "coap-client-openssl",
        "coap-client-gnutls",
    ]
    .into_iter()
    .find(|name| std::process::Command::new(name).arg("-h").output().is_ok())
    .expect("coap-client (Debian's libcoap3-bin: run scripts/setup-test-env.sh)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_client_gets_a_command_that_decodes() {
    let server = coap_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(4096, 6);
    server.with_devices("lib", &image, &["dev"]).await;
    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("status.cbor");
    std::fs::write(&status, first_status()).unwrap();
    let run = |password: &str, output: &str| {
        let mut command = tokio::process::Command::new(coap_client());
        command
            .args(["-m", "post", "-t", "60", "-B", "20"])
            .args([
                "-O",
                &format!("{AUTHORIZATION_OPTION},{}", basic("dev", "lib", password)),
            ])
            .arg("-f")
            .arg(&status)
            .arg("-o")
            .arg(dir.path().join(output))
            .arg(format!("coap://{}/v1/dfu?ct=30", server.coap()));
        command.output()
    };
    let output = run("pw", "command.cbor").await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(dir.path().join("command.cbor")).unwrap();
    match decode_command(&bytes) {
        Ok(Command::Write {
            version: b"2.0.0",
            correlation_id: Some(9),
            offset: 0,
            data,
        }) => assert_eq!(data, &image[..256]),
        other => panic!("{other:?}"),
    }
    // A wrong password: libcoap reports the 4.03, and writes no command.
    let output = run("wrong", "refused.cbor").await.unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("4.03"), "{said}");
    let refused = std::fs::read(dir.path().join("refused.cbor")).unwrap_or_default();
    assert!(decode_command(&refused).is_err());
    server.stop().await;
}

/// The status events the service published for `device` that `subscription` holds now.
async fn statuses_seen(subscription: &mut ajour_service::traffic::Subscription, device: &str) -> usize {
    let mut seen = 0;
    // A zero timeout polls once: what is in the channel now, without waiting for more.
    while let Ok(next) = tokio::time::timeout(Duration::ZERO, subscription.next()).await {
        let Next::Event(event) = next else {
            panic!("{next:?}")
        };
        let event: Value = serde_json::from_str(&event).unwrap();
        if event["type"] == STATUS_EVENT_TYPE && event["device"] == device {
            seen += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmission_gets_the_same_answer_and_is_handled_once() {
    let server = coap_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(2048, 8);
    server.with_devices("dups", &image, &["dev"]).await;
    let mut traffic = server
        .service()
        .traffic()
        .subscribe(&AppName::parse("dups").unwrap())
        .unwrap();
    let duplicates = || async {
        Metrics::of(&server.url)
            .await
            .value("ajour_coap_duplicates_total", &[])
    };
    let duplicates_before = duplicates().await;
    let peer = Peer::new(server.coap()).await;
    let auth = basic("dev", "dups", "pw");
    let request = con(0x4242, Some(&auth), &["ct=30"], &first_status())
        .to_bytes_unlimited()
        .unwrap();
    peer.send(&request).await;
    let first = peer.receive().await;
    peer.send(&request).await;
    let second = peer.receive().await;
    assert_eq!(
        first, second,
        "a retransmission is answered with the very same bytes"
    );
    let answer = Packet::from_bytes(&first).unwrap();
    assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(answer.header.message_id, 0x4242);
    assert_eq!(answer.get_token(), 0x4242u16.to_be_bytes());
    assert_eq!(code(&answer), ResponseType::Content);
    assert_eq!(
        answer.get_first_option(CoapOption::Unknown(COMMAND_OPTION)),
        Some(&b"dfu".to_vec())
    );
    assert_eq!(
        answer.get_first_option(CoapOption::ContentFormat),
        Some(&vec![60])
    );
    assert!(matches!(
        decode_command(&answer.payload),
        Ok(Command::Write { offset: 0, .. })
    ));
    // A next status, as a fence: its answer comes after anything the service did for the two
    // above (each status is published before it is answered).
    let next = encode_status(
        &Status::updating(b"1.0.0".to_vec(), Some(256), Some(10), b"2.0.0".to_vec(), 256),
        Encoding::Packed,
    );
    let fence = peer.exchange(&con(0x4243, Some(&auth), &[], &next)).await;
    assert!(matches!(
        decode_command(&fence.payload),
        Ok(Command::Write { offset: 256, .. })
    ));
    assert_eq!(
        statuses_seen(&mut traffic, "dev").await,
        2,
        "the retransmission was handled again"
    );
    assert!(duplicates().await > duplicates_before);

    // Non-confirmable: the same, in a NON answer echoing the token.
    let non = dfu_request(
        MessageType::NonConfirmable,
        0x5000,
        b"non-tok",
        Some(&auth),
        &[],
        &first_status(),
    )
    .to_bytes_unlimited()
    .unwrap();
    peer.send(&non).await;
    let first = peer.receive().await;
    peer.send(&non).await;
    assert_eq!(first, peer.receive().await);
    let answer = Packet::from_bytes(&first).unwrap();
    assert_eq!(answer.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(answer.get_token(), b"non-tok");
    assert_eq!(code(&answer), ResponseType::Content);
    let fence = peer.exchange(&con(0x4244, Some(&auth), &[], &next)).await;
    assert_eq!(code(&fence), ResponseType::Content);
    assert_eq!(statuses_seen(&mut traffic, "dev").await, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_their_codes_and_nothing_breaks_the_endpoint() {
    let server = coap_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(3000, 2);
    server.with_devices("app", &image, &["dev", "bridge"]).await;
    for (sensor, gateway) in [("sensor-a", "bridge"), ("sensor-c", "other-bridge")] {
        let body =
            json!({"metadata": {"name": sensor}, "spec": {"gatewaySelector": {"matchNames": [gateway]}}});
        let (status, answer) = server
            .api_send(reqwest::Method::POST, "apps/app/devices", Some(body))
            .await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{answer}");
    }
    let peer = Peer::new(server.coap()).await;
    let good = basic("dev", "app", "pw");
    let mut id = 100u16;
    let mut ask = |authorization: Option<&str>, query: &[&str], status: &[u8]| {
        id += 1;
        con(id, authorization, query, status)
    };

    // Credentials. To a peer that did not log in (its address may be forged), no answer is
    // larger than its request: the endpoint amplifies no flood.
    let request = ask(None, &[], &first_status());
    let answer = peer.exchange(&request).await;
    assert_eq!(code(&answer), ResponseType::Unauthorized);
    assert!(diagnostic(&answer).contains("4209"), "{}", diagnostic(&answer));
    let size = |packet: &Packet| packet.to_bytes_unlimited().unwrap().len();
    assert!(
        size(&answer) <= size(&request),
        "{} > {}",
        size(&answer),
        size(&request)
    );
    let mut tiny = Packet::new();
    tiny.header.message_id = 77;
    tiny.header.code = MessageClass::Request(RequestType::Get);
    let answer = peer.exchange(&tiny).await;
    assert_eq!(code(&answer), ResponseType::NotFound);
    assert_eq!(size(&answer), 4, "{answer:?}");
    let answer = peer
        .exchange(&ask(Some("Bearer xyz"), &[], &first_status()))
        .await;
    assert_eq!(code(&answer), ResponseType::Unauthorized);
    let answer = peer
        .exchange(&ask(Some(&basic("dev", "app", "wrong")), &[], &first_status()))
        .await;
    assert_eq!(code(&answer), ResponseType::Forbidden);
    let answer = peer
        .exchange(&ask(Some(&basic("nobody", "app", "pw")), &[], &first_status()))
        .await;
    assert_eq!(code(&answer), ResponseType::Forbidden);
    // `device:password` with application= is the same login as `device@app`.
    let plain = ajour_types::basic_auth::encode("dev", "pw");
    let answer = peer
        .exchange(&ask(Some(&plain), &["application=app"], &first_status()))
        .await;
    assert_eq!(code(&answer), ResponseType::Content);
    let answer = peer.exchange(&ask(Some(&plain), &[], &first_status())).await;
    assert_eq!(code(&answer), ResponseType::Unauthorized);

    // Gateways: only for a device that names it.
    let bridge = basic("bridge", "app", "pw");
    let answer = peer
        .exchange(&ask(Some(&bridge), &["as=sensor-c"], &first_status()))
        .await;
    assert_eq!(code(&answer), ResponseType::Forbidden);
    assert!(
        diagnostic(&answer).contains("does not name 'bridge'"),
        "{}",
        diagnostic(&answer)
    );
    let answer = peer
        .exchange(&ask(Some(&bridge), &["as=../etc"], &first_status()))
        .await;
    assert_eq!(code(&answer), ResponseType::Forbidden);
    let answer = peer
        .exchange(&ask(Some(&bridge), &["as=sensor-a"], &first_status()))
        .await;
    assert_eq!(code(&answer), ResponseType::Content);
    assert!(matches!(
        decode_command(&answer.payload),
        Ok(Command::Write { offset: 0, .. })
    ));
    server.service().settle_status_writes().await;
    assert!(
        server.firmware("app", "sensor-a").await.is_some(),
        "the status was sensor-a's"
    );
    assert_eq!(server.firmware("app", "bridge").await, None);

    // The payload.
    let answer = peer.exchange(&ask(Some(&good), &[], b"not cbor")).await;
    assert_eq!(code(&answer), ResponseType::BadRequest);
    assert!(!diagnostic(&answer).is_empty());
    let huge = vec![0u8; 60_000];
    let answer = peer.exchange(&ask(Some(&good), &[], &huge)).await;
    assert_eq!(code(&answer), ResponseType::RequestEntityTooLarge);
    assert_eq!(
        answer.get_first_option(CoapOption::Size1),
        Some(&4096u16.to_be_bytes().to_vec())
    );
    let answer = peer
        .exchange(&ask(Some(&good), &["ct=soon"], &first_status()))
        .await;
    assert_eq!(code(&answer), ResponseType::BadRequest);
    // A block too large for one message: refused, saying which mtu fits.
    let big_mtu = encode_status(
        &Status::first(b"1.0.0".to_vec(), Some(2048), None),
        Encoding::Packed,
    );
    let answer = peer.exchange(&ask(Some(&good), &[], &big_mtu)).await;
    assert_eq!(code(&answer), ResponseType::BadRequest);
    assert!(
        diagnostic(&answer).contains("mtu of at most 1024"),
        "{}",
        diagnostic(&answer)
    );

    // Another channel, path, method, an option it cannot honour.
    let mut other = ask(Some(&good), &[], b"telemetry");
    other.clear_option(CoapOption::UriPath);
    other.add_option(CoapOption::UriPath, b"v1".to_vec());
    other.add_option(CoapOption::UriPath, b"telemetry".to_vec());
    let answer = peer.exchange(&other).await;
    assert_eq!(code(&answer), ResponseType::Changed);
    assert!(answer.payload.is_empty());
    let mut wrong_path = ask(Some(&good), &[], &first_status());
    wrong_path.clear_option(CoapOption::UriPath);
    wrong_path.add_option(CoapOption::UriPath, b"dfu".to_vec());
    assert_eq!(code(&peer.exchange(&wrong_path).await), ResponseType::NotFound);
    let mut get = ask(Some(&good), &[], &[]);
    get.header.code = MessageClass::Request(RequestType::Get);
    assert_eq!(code(&peer.exchange(&get).await), ResponseType::MethodNotAllowed);
    let mut block = ask(Some(&good), &[], &first_status());
    block.add_option(CoapOption::Block1, vec![0x0e]);
    assert_eq!(code(&peer.exchange(&block).await), ResponseType::BadOption);
    let mut twice = ask(Some(&good), &[], &first_status());
    twice.add_option(
        CoapOption::Unknown(AUTHORIZATION_OPTION),
        good.as_bytes().to_vec(),
    );
    assert_eq!(code(&peer.exchange(&twice).await), ResponseType::BadOption);
    let mut elective = ask(Some(&good), &[], &first_status());
    elective.add_option(CoapOption::Unknown(2048), b"ignored".to_vec());
    assert_eq!(code(&peer.exchange(&elective).await), ResponseType::Content);

    // Datagrams that are no request: a CON that can be read far enough is reset, the rest is
    // ignored. Each is followed by a request: the next datagram the peer gets must be what the
    // former earns (a Reset) or, when it earns nothing, the request's answer.
    let truncated_token = {
        let mut bytes = ask(Some(&good), &[], &[]).to_bytes_unlimited().unwrap();
        bytes.truncate(5);
        bytes
    };
    let resets: [&[u8]; 4] = [
        &[0x40, 0x00, 0xbe, 0xef],             // a ping
        &truncated_token,                      // a token cut short
        &[0x40, 0x02, 0xbe, 0xef, 0xf1, 0x00], // option delta 15
        &[0x40, 0x45, 0xbe, 0xef],             // a response nobody asked for
    ];
    for datagram in resets {
        peer.send(datagram).await;
        let reset = Packet::from_bytes(&peer.receive().await).unwrap();
        assert_eq!(reset.header.get_type(), MessageType::Reset, "{datagram:?}");
        assert_eq!(
            reset.header.message_id,
            u16::from_be_bytes([datagram[2], datagram[3]])
        );
        assert_eq!(reset.header.code, MessageClass::Empty);
    }
    let ignored: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x40],
        vec![0x40, 0x02, 0x00],             // a truncated header
        vec![0x80, 0x02, 0x00, 0x01],       // version 2
        vec![0x60, 0x00, 0x00, 0x01],       // an ACK
        vec![0x70, 0x00, 0x00, 0x01],       // a RST
        vec![0x50, 0x02, 0x00, 0x01, 0xf1], // a NON that does not parse
        (0..1500u32).map(|i| (i * 7919 % 251) as u8).collect(),
        vec![0xff; 65_000],
    ];
    for datagram in &ignored {
        peer.send(datagram).await;
    }
    let answer = peer.exchange(&ask(Some(&good), &[], &first_status())).await;
    assert_eq!(code(&answer), ResponseType::Content);

    // After all that, a device updates from first block to last.
    let mut device = SimulatedDevice::new("1.0.0", Some(512));
    let mut link = CoapLink::new(server.coap(), "app", "dev", "pw");
    let outcome = run_to_end(&mut device, &mut link, "dev@app").await;
    assert_eq!(outcome, updated_to("2.0.0", image.len()));
    let metrics = Metrics::of(&server.url).await;
    for code in ["2.05", "4.01", "4.03", "4.13"] {
        assert!(
            metrics.value("ajour_coap_requests_total", &[("code", code)]) >= 1.0,
            "{code}"
        );
    }
    assert!(metrics.value("ajour_coap_rejected_total", &[("reason", "malformed")]) >= 1.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_status_gets_the_same_command_over_http_and_coap() {
    let server = coap_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(5000, 3);
    server
        .with_devices("both", &image, &["over-http", "over-coap"])
        .await;
    let peer = Peer::new(server.coap()).await;
    let statuses = [
        first_status(),
        encode_status(
            &Status::updating(b"1.0.0".to_vec(), Some(300), Some(1), b"2.0.0".to_vec(), 4800),
            Encoding::Packed,
        ),
        encode_status(
            &Status::updating(b"1.0.0".to_vec(), None, None, b"2.0.0".to_vec(), 5000),
            Encoding::Packed,
        ),
    ];
    let mut kinds = Vec::new();
    for (n, status) in statuses.iter().enumerate() {
        let (code_http, headers, over_http) = server.post_dfu("over-http@both", "pw", status.clone()).await;
        assert_eq!(code_http, reqwest::StatusCode::OK);
        assert_eq!(headers["command"], "dfu");
        let request = con(
            n as u16,
            Some(&basic("over-coap", "both", "pw")),
            &["ct=30"],
            status,
        );
        let answer = peer.exchange(&request).await;
        assert_eq!(code(&answer), ResponseType::Content);
        assert_eq!(answer.payload, over_http, "status {n}");
        kinds.push(decode_command(&answer.payload).unwrap().kind());
    }
    // The first block, the last (200 bytes), the Swap: the comparison covered each kind of answer.
    assert_eq!(kinds, ["write", "write", "swap"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ajour_simulate_drives_devices_over_coap() {
    let server = coap_server(Backend::Sqlite, &[]).await;
    let image = firmware_bytes(6000, 5);
    server.with_devices("cli", &image, &["d-0", "d-1", "d-2"]).await;
    let output = tokio::process::Command::new(AJOUR)
        .args([
            "simulate",
            "--app",
            "cli",
            "--device",
            "d",
            "--count",
            "3",
            "--password",
            "pw",
        ])
        .args([
            "--version",
            "1.0.0",
            "--coap-url",
            &format!("coap://{}", server.coap()),
        ])
        // Not used with --coap-url: nothing listens there.
        .args(["--url", "http://127.0.0.1:9"])
        .env("AJOUR_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("3 device(s): 3 updated"), "{stdout}");
    server.service().settle_status_writes().await;
    for name in ["d-0", "d-1", "d-2"] {
        assert!(in_sync(&server.firmware("cli", name).await, "2.0.0"), "{name}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessed_password_locks_the_address_out_with_4_29() {
    let flags = ["--login-address-failures", "2", "--login-failure-delay-ms", "1"];
    let server = coap_server(Backend::Sqlite, &flags).await;
    server
        .with_devices("guarded", &firmware_bytes(1000, 1), &["dev"])
        .await;
    let peer = Peer::new(server.coap()).await;
    let wrong = basic("dev", "guarded", "guess");
    for id in 1..=2 {
        let answer = peer.exchange(&con(id, Some(&wrong), &[], &first_status())).await;
        assert_eq!(code(&answer), ResponseType::Forbidden);
    }
    // Locked out, the right password too, with when to try again.
    let right = basic("dev", "guarded", "pw");
    let answer = peer.exchange(&con(3, Some(&right), &[], &first_status())).await;
    assert_eq!(
        code(&answer),
        ResponseType::TooManyRequests,
        "{}",
        diagnostic(&answer)
    );
    let max_age = answer.get_first_option(CoapOption::MaxAge).expect("Max-Age");
    assert!(
        !max_age.is_empty() && max_age.iter().any(|b| *b != 0),
        "{max_age:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_coap_address_in_use_fails_the_start_and_none_means_no_endpoint() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let data_dir = tempfile::tempdir().unwrap();
    let data = data_dir.path().to_str().unwrap();
    let config = |extra: &[&str]| {
        let mut argv = vec!["ajour", "serve", "--data-dir", data];
        argv.extend_from_slice(extra);
        let ajour::cli::Command::Serve(args) = ajour::cli::Cli::try_parse_from(&argv).unwrap().command else {
            unreachable!()
        };
        args.server_config().unwrap()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = server::start(listener, config(&["--coap-listen", &taken]))
        .await
        .err()
        .expect("refused");
    assert!(format!("{error:#}").contains("CoAP"), "{error:#}");
    // Off unless asked for.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(listener, config(&[])).await.unwrap();
    assert_eq!(running.coap_addr, None);
    running.shutdown().await.unwrap();
}
