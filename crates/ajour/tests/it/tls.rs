//! HTTPS on the HTTP listener (`--tls-cert`, `--tls-key`): devices and the API over TLS, plain
//! HTTP refused, the certificate reloaded from its files without a restart (a broken pair kept
//! out), and a client that never starts its handshake closed by the header timeout.

use super::support::{eventually, firmware_bytes, update_over_http, updated_to, Connection};
use ajour::server::{self, RunningServer, ServerConfig, TlsFiles};
use ajour_store::{FileStore, FirmwareName};
use ajour_testkit::Metrics;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SerialNumber};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

const MTU: u32 = 256;
const FIRMWARE_LEN: usize = 3000;

/// A test CA and the leaf certificates it signs for `localhost` and `127.0.0.1`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate as files hold it.
struct Leaf {
    /// The leaf, then the CA: a chain.
    chain_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Ajour test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { ca }
    }

    fn leaf(&self, name: &str, serial: u64) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.ca.pem()),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(self.ca.der().to_vec())).unwrap();
        roots
    }
}

/// Replace `path`'s content at once (a new file renamed over it), as deployment tools do.
fn replace(path: &Path, content: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, content).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// A server in this process whose listener speaks TLS only, with its certificate files.
struct TlsServer {
    running: Option<RunningServer>,
    connection: Connection,
    addr: SocketAddr,
    files: TlsFiles,
    pki: Pki,
    dir: tempfile::TempDir,
}

impl TlsServer {
    async fn start(adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let pki = Pki::new();
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let leaf = pki.leaf("first", 1);
        std::fs::write(&files.cert, &leaf.chain_pem).unwrap();
        std::fs::write(&files.key, &leaf.key_pem).unwrap();
        let mut config = ServerConfig::new(dir.path().join("data"));
        config.firmware_recheck = Duration::ZERO;
        config.service.engine.wait_poll = 7;
        config.service.unmanaged_poll = 600;
        config.tls = Some(files.clone());
        config.tls_reload = Duration::from_millis(50);
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = server::start(listener, config).await.unwrap();
        let addr = running.addr;
        let connection = Connection {
            url: format!("https://localhost:{}", addr.port()),
            token: running.token.clone(),
            http: https_client(&pki),
        };
        FileStore::new(server::firmware_dir(&dir.path().join("data")), Duration::ZERO)
            .add(
                &FirmwareName::parse("fw").unwrap(),
                "2.0.0",
                &firmware_bytes(FIRMWARE_LEN, 7),
            )
            .unwrap();
        Self {
            running: Some(running),
            connection,
            addr,
            files,
            pki,
            dir,
        }
    }

    fn reloads(&self) -> (u64, u64) {
        self.running
            .as_ref()
            .unwrap()
            .tls
            .as_ref()
            .expect("TLS is on")
            .reloads()
    }

    /// The certificate the server presents to a new connection now (and the protocol ALPN
    /// chose when the client offered HTTP/1.1 and HTTP/2).
    async fn presented(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        self.presented_at(self.addr).await
    }

    /// ... by the listener at `addr` (the HTTP one, or the MQTT one).
    async fn presented_at(&self, addr: SocketAddr) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(self.pki.roots())
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("the TLS handshake succeeds with the test CA");
        let (_, session) = stream.get_ref();
        let leaf = session.peer_certificates().expect("a certificate")[0].to_vec();
        (leaf, session.alpn_protocol().map(<[u8]>::to_vec))
    }

    /// A device `name` of app `app` (firmware `fw` 2.0.0) created and updated from 1.0.0 over
    /// HTTPS by the simulator, with a client made now.
    async fn device_updates(&self, app: &str, name: &str) {
        let connection = Connection {
            url: self.connection.url.clone(),
            token: self.connection.token.clone(),
            http: https_client(&self.pki),
        };
        connection.create_device(app, name, "pw", None).await;
        let (outcome, _) = update_over_http(&connection, app, name, "1.0.0", Some(MTU)).await;
        assert_eq!(outcome, updated_to("2.0.0", FIRMWARE_LEN));
    }

    /// Application `app` (firmware `fw`) that trusts `ca`'s certificates, in Drogue's form: the
    /// base64 of the PEM text in `spec.trustAnchors`.
    async fn create_app_trusting(&self, app: &str, ca: &CertifiedIssuer<'static, KeyPair>) {
        use base64::Engine;
        let anchor = base64::engine::general_purpose::STANDARD.encode(ca.pem());
        let spec = json!({
            "firmware": {"file": {"name": "fw"}},
            "trustAnchors": {"anchors": [{"certificate": anchor}]},
        });
        let app = json!({"metadata": {"name": app}, "spec": spec});
        let (status, body) = self
            .connection
            .api_send(reqwest::Method::POST, "apps", Some(app))
            .await;
        assert!(status.is_success(), "{status}: {body}");
    }

    /// `status` posted to `/v1/dfu` over HTTPS with no `Authorization`, presenting `identity`
    /// (a client certificate and its key, PEM), if any, from a client made now.
    async fn post_status(&self, identity: Option<&str>, status: &[u8]) -> reqwest::Response {
        let mut client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.pki.ca_pem().as_bytes()).unwrap());
        if let Some(identity) = identity {
            client = client.identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap());
        }
        client
            .build()
            .unwrap()
            .post(format!("{}/v1/dfu", self.connection.url))
            .body(status.to_vec())
            .send()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> Metrics {
        let response = self
            .connection
            .http
            .get(format!("{}/metrics", self.connection.url))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        Metrics(response.text().await.unwrap())
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
        drop(self.dir);
    }
}

/// A reqwest client that trusts the test CA (and nothing else).
fn https_client(pki: &Pki) -> reqwest::Client {
    trusting(pki).build().unwrap()
}

/// A client trusting only `pki`'s CA.
fn trusting(pki: &Pki) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap())
}

#[tokio::test]
async fn a_device_updates_and_the_api_answers_over_https() {
    let server = TlsServer::start(|_| {}).await;
    server
        .connection
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    server.device_updates("app", "dev").await;
    // The API, over the same listener: the device as its update left it.
    let device = server.connection.device("app", "dev").await;
    assert_eq!(device["metadata"]["name"], "dev", "{device}");
    assert!(
        super::support::in_sync(&server.connection.firmware("app", "dev").await, "2.0.0"),
        "{device}"
    );
    // Without --public-url, the discovery documents name https and wss.
    let endpoints: serde_json::Value = server
        .connection
        .http
        .get(format!("{}/.well-known/drogue-endpoints", server.connection.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let base = format!("https://localhost:{}", server.addr.port());
    assert_eq!(endpoints["api"], base.as_str(), "{endpoints}");
    assert_eq!(endpoints["registry"]["url"], base.as_str(), "{endpoints}");
    let info: serde_json::Value = server
        .connection
        .http
        .get(format!("{}/api/console/v1alpha1/info", server.connection.url))
        .basic_auth("admin", Some(&server.connection.token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["http"]["url"], base.as_str(), "{info}");
    assert_eq!(
        info["websocket_integration"]["url"],
        format!("wss://localhost:{}/api/stream/v1alpha1/apps/", server.addr.port()).as_str(),
        "{info}"
    );
    // HTTP/1.1 is what ALPN agrees on, even when the client would rather speak HTTP/2.
    let (_, alpn) = server.presented().await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    server.stop().await;
}

#[tokio::test]
async fn plain_http_to_the_tls_listener_gets_no_answer() {
    let server = TlsServer::start(|_| {}).await;
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let answer = plain
        .get(format!("http://127.0.0.1:{}/healthz", server.addr.port()))
        .send()
        .await;
    assert!(answer.is_err(), "plain HTTP was answered: {answer:?}");
    // The same over HTTPS is answered.
    let answer = server
        .connection
        .http
        .get(format!("{}/healthz", server.connection.url))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    server.stop().await;
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let server = TlsServer::start(|config| config.mqtt_listen = Some("127.0.0.1:0".into())).await;
    let mqtt = server.running.as_ref().unwrap().mqtt_addr.expect("--mqtt-listen");
    server
        .connection
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    let (first, _) = server.presented().await;
    let next = server.pki.leaf("second", 2);
    assert_ne!(first, next.der);
    replace(&server.files.key, &next.key_pem);
    replace(&server.files.cert, &next.chain_pem);
    let mut presented = first.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while presented != next.der {
        assert_eq!(presented, first, "neither the old certificate nor the new one");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served within 20 s; reloads (ok, failed): {:?}",
            server.reloads()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        presented = server.presented().await.0;
    }
    assert!(server.reloads().0 >= 1, "{:?}", server.reloads());
    // The server runs on, and devices update under the new certificate.
    server.device_updates("app", "after-reload").await;
    assert_eq!(server.presented().await.0, next.der);
    // The MQTT listener serves the same certificate, reloaded with it.
    assert_eq!(server.presented_at(mqtt).await.0, next.der);
    server.stop().await;
}

#[tokio::test]
async fn a_broken_certificate_is_not_loaded_and_the_old_one_stays() {
    let server = TlsServer::start(|_| {}).await;
    server
        .connection
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    let (first, _) = server.presented().await;
    assert_eq!(server.reloads(), (0, 0));

    // Not a certificate at all.
    replace(
        &server.files.cert,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    );
    eventually(Duration::from_secs(20), "a failed reload", || async {
        server.reloads().1 >= 1
    })
    .await;
    assert_eq!(server.reloads().0, 0);
    assert_eq!(server.presented().await.0, first);

    // A certificate whose key is another's.
    let other = server.pki.leaf("other", 3);
    replace(&server.files.cert, &other.chain_pem);
    eventually(Duration::from_secs(20), "a second failed reload", || async {
        server.reloads().1 >= 2
    })
    .await;
    assert_eq!(server.reloads().0, 0);
    assert_eq!(server.presented().await.0, first);

    let metrics = server.metrics().await;
    assert!(
        metrics.value("ajour_tls_reloads_total", &[("outcome", "failed")]) >= 2.0,
        "{metrics}"
    );
    server.device_updates("app", "dev").await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_never_says_hello_is_closed_and_others_are_served() {
    let header_timeout = Duration::from_millis(500);
    let server = TlsServer::start(|config| config.connections.header_timeout = header_timeout).await;
    server
        .connection
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    let started = tokio::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Meanwhile a device is served: the silent client holds nothing but its own connection.
    server.device_updates("app", "dev").await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte))
        .await
        .expect("the server closes a connection that sends no ClientHello");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the server sent something to a client that said nothing: {read:?}"
    );
    assert!(started.elapsed() >= header_timeout, "{:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn the_server_does_not_start_without_a_usable_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    let start = |files: TlsFiles| {
        let mut config = ServerConfig::new(dir.path().join("data"));
        config.tls = Some(files);
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            match server::start(listener, config).await {
                Ok(running) => {
                    running.shutdown().await.unwrap();
                    panic!("started without a usable certificate")
                }
                Err(error) => format!("{error:#}"),
            }
        }
    };
    // Missing files.
    let error = start(files.clone()).await;
    assert!(error.contains("tls.crt"), "{error}");
    // A key that is not the certificate's.
    let (leaf, other) = (pki.leaf("a", 1), pki.leaf("b", 2));
    std::fs::write(&files.cert, &leaf.chain_pem).unwrap();
    std::fs::write(&files.key, &other.key_pem).unwrap();
    let error = start(files.clone()).await;
    assert!(error.contains("does not fit"), "{error}");
    // The right pair starts.
    std::fs::write(&files.key, &leaf.key_pem).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = ServerConfig::new(dir.path().join("data"));
    config.tls = Some(files);
    server::start(listener, config)
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_update_over_mqtts_with_the_servers_certificate() {
    let server = TlsServer::start(|config| {
        config.mqtt_listen = Some("127.0.0.1:0".into());
        config.connections.header_timeout = Duration::from_millis(300);
    })
    .await;
    let mqtt = server.running.as_ref().unwrap().mqtt_addr.expect("--mqtt-listen");
    // A client that never says hello is closed by the CONNECT timeout (the handshake is in it).
    let mut silent = tokio::net::TcpStream::connect(mqtt).await.unwrap();
    server
        .connection
        .create_app("app", Some(json!({"file": {"name": "fw"}})))
        .await;
    for name in ["sim-0", "sim-1", "plain"] {
        server.connection.create_device("app", name, "pw", None).await;
    }
    let ca = server.dir.path().join("ca.pem");
    std::fs::write(&ca, server.pki.ca_pem()).unwrap();
    // The simulator over MQTT 5 and TLS, trusting the test CA.
    let mut endpoint = ajour_client::mqtt::MqttConfig::new(format!("mqtts://localhost:{}", mqtt.port()), "t");
    endpoint.tls.ca_file = Some(ca.clone());
    let transport = ajour_sim::Transport::Mqtt {
        endpoint,
        command_timeout: Duration::from_secs(5),
    };
    let outcomes = super::support::simulate(&super::support::fleet("app", 2, transport)).await;
    super::support::assert_all_updated(&outcomes, "2.0.0", FIRMWARE_LEN);
    // Mosquitto's client over TLS is accepted; without TLS it gets no CONNACK.
    let status = server.dir.path().join("status.cbor");
    std::fs::write(
        &status,
        ajour_protocol::encode_status(
            &ajour_protocol::Status::first(b"1.0.0".to_vec(), Some(256), None),
            ajour_protocol::Encoding::Packed,
        ),
    )
    .unwrap();
    let publish = |tls: bool| {
        let mut command = std::process::Command::new("mosquitto_pub");
        command
            .args([
                "-h",
                "localhost",
                "-p",
                &mqtt.port().to_string(),
                "-u",
                "plain@app",
                "-P",
                "pw",
            ])
            .args(["-t", "dfu", "-q", "1", "-f"])
            .arg(&status);
        if tls {
            command.arg("--cafile").arg(&ca);
        }
        command.output().unwrap()
    };
    let over_tls = publish(true);
    assert!(over_tls.status.success(), "{over_tls:?}");
    let plain = publish(false);
    assert!(!plain.status.success(), "{plain:?}");
    let mut nothing = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut nothing))
        .await
        .expect("closed by the server")
        .unwrap();
    assert!(nothing.is_empty());
    server.stop().await;
}

/// A device's certificate as files hold it, for `mosquitto_pub --cert/--key` and reqwest.
struct DeviceCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    /// The certificate and then the key, in one PEM text (reqwest's identity).
    identity: String,
}

/// A CA of an application's own (its trust anchor), named `name`.
fn application_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Drogue IoT");
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A client certificate with subject `O=Drogue IoT, CN=<device>`, signed by `ca`, written to `dir`
/// as `{file}.crt` and `{file}.key`.
fn device_cert(ca: &CertifiedIssuer<'static, KeyPair>, device: &str, dir: &Path, file: &str) -> DeviceCert {
    let subject = [
        (DnType::OrganizationName, "Drogue IoT"),
        (DnType::CommonName, device),
    ];
    subject_cert(ca, &subject, dir, file)
}

/// A client certificate with the subject `subject` (in this order), signed by `ca`, written to
/// `dir` as `{file}.crt` and `{file}.key`.
fn subject_cert(
    ca: &CertifiedIssuer<'static, KeyPair>,
    subject: &[(DnType, &str)],
    dir: &Path,
    file: &str,
) -> DeviceCert {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    // Not rcgen's default subject (a CN of its own, which a push would replace in first place).
    params.distinguished_name = rcgen::DistinguishedName::new();
    for (kind, value) in subject {
        params.distinguished_name.push(kind.clone(), *value);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    let paths = (dir.join(format!("{file}.crt")), dir.join(format!("{file}.key")));
    std::fs::write(&paths.0, cert.pem()).unwrap();
    std::fs::write(&paths.1, key.serialize_pem()).unwrap();
    DeviceCert {
        cert: paths.0,
        key: paths.1,
        identity: format!("{}{}", cert.pem(), key.serialize_pem()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_sign_in_with_client_certificates_over_https_and_mqtts() {
    let server = TlsServer::start(|config| config.mqtt_listen = Some("127.0.0.1:0".into())).await;
    let mqtt = server.running.as_ref().unwrap().mqtt_addr.expect("--mqtt-listen");
    let dir = server.dir.path().to_path_buf();
    let ca = application_ca("Application 1");
    server.create_app_trusting("certs", &ca).await;
    server
        .connection
        .create_device("certs", "dev-1", "pw", None)
        .await;
    let good = device_cert(&ca, "dev-1", &dir, "good");
    let ghost = device_cert(&ca, "ghost", &dir, "ghost");
    let forged = device_cert(&application_ca("Application 1"), "dev-1", &dir, "forged");
    let status_bytes = ajour_protocol::encode_status(
        &ajour_protocol::Status::first(b"1.0.0".to_vec(), Some(256), Some(5)),
        ajour_protocol::Encoding::Packed,
    );

    // HTTPS: no Authorization header, the certificate signs the device in.
    let answered = server.post_status(Some(&good.identity), &status_bytes).await;
    assert_eq!(answered.status(), reqwest::StatusCode::OK);
    let bytes = answered.bytes().await.unwrap();
    let command = ajour_protocol::decode_command(&bytes).unwrap();
    assert_eq!(command.kind(), "write");
    assert_eq!(command.correlation_id(), Some(5));
    // Another CA with the very same name, a device that does not exist: refused alike.
    assert_eq!(
        server
            .post_status(Some(&forged.identity), &status_bytes)
            .await
            .status(),
        reqwest::StatusCode::FORBIDDEN
    );
    assert_eq!(
        server
            .post_status(Some(&ghost.identity), &status_bytes)
            .await
            .status(),
        reqwest::StatusCode::FORBIDDEN
    );
    assert_eq!(
        server.post_status(None, &status_bytes).await.status(),
        reqwest::StatusCode::UNAUTHORIZED
    );

    // MQTTS: Mosquitto's clients with the certificate and no user name or password.
    let mqtts = Mqtts::new(&server, mqtt, &status_bytes);
    let bytes = mqtts.command(&good).await;
    let command = ajour_protocol::decode_command(&bytes).unwrap();
    assert_eq!(command.kind(), "write");
    for refused in [&forged, &ghost] {
        mqtts.refused(refused);
    }
    // A user name and no password: the user name names the application, the certificate the
    // device (the password flag unset, not an empty password). Another application is refused.
    let named = mqtts.publish_with(&good, &["-u", "dev-1@certs"]);
    assert!(named.status.success(), "{named:?}");
    let elsewhere = mqtts.publish_with(&good, &["-u", "dev-1@other"]);
    assert!(!elsewhere.status.success(), "{elsewhere:?}");
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains("not authori"),
        "{elsewhere:?}"
    );
    server.stop().await;
}

/// Mosquitto's clients on the MQTTS listener, trusting the server's CA and publishing one status.
struct Mqtts {
    addr: SocketAddr,
    /// The server's CA, for `--cafile`.
    ca_file: std::path::PathBuf,
    /// The status published, for `-f`.
    status_file: std::path::PathBuf,
}

impl Mqtts {
    fn new(server: &TlsServer, addr: SocketAddr, status: &[u8]) -> Self {
        let (ca_file, status_file) = (
            server.dir.path().join("server-ca.pem"),
            server.dir.path().join("status.cbor"),
        );
        std::fs::write(&ca_file, server.pki.ca_pem()).unwrap();
        std::fs::write(&status_file, status).unwrap();
        Self {
            addr,
            ca_file,
            status_file,
        }
    }

    /// The arguments that connect presenting `cert`, with no user name or password.
    fn args(&self, cert: &DeviceCert) -> Vec<String> {
        vec![
            "-h".to_string(),
            "localhost".into(),
            "-p".into(),
            self.addr.port().to_string(),
            "--cafile".into(),
            self.ca_file.display().to_string(),
            "--cert".into(),
            cert.cert.display().to_string(),
            "--key".into(),
            cert.key.display().to_string(),
        ]
    }

    /// `mosquitto_pub` of the status to `dfu` presenting `cert`.
    fn publish(&self, cert: &DeviceCert) -> std::process::Output {
        self.publish_with(cert, &[])
    }

    /// `mosquitto_pub` of the status presenting `cert`, with `more` arguments.
    fn publish_with(&self, cert: &DeviceCert, more: &[&str]) -> std::process::Output {
        std::process::Command::new("mosquitto_pub")
            .args(self.args(cert))
            .args(more)
            .args(["-t", "dfu", "-q", "1", "-f"])
            .arg(&self.status_file)
            .output()
            .unwrap()
    }

    /// The command answering the status published presenting `cert`, as `mosquitto_sub` gets
    /// it on a connection of its own with the same certificate, subscribed before the publish.
    async fn command(&self, cert: &DeviceCert) -> Vec<u8> {
        use tokio::io::AsyncBufReadExt;
        let mut sub = tokio::process::Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(self.args(cert))
            .args([
                "-V",
                "mqttv5",
                "-t",
                "command/inbox/#",
                "-d",
                "-F",
                "PAYLOAD %x",
                "-C",
                "1",
                "-W",
                "20",
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap());
        let mut seen = String::new();
        while !seen.contains("received SUBACK") {
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(20), lines.read_line(&mut line))
                .await
                .unwrap()
                .unwrap();
            assert!(read > 0, "mosquitto_sub ended before its SUBACK: {seen}");
            seen.push_str(&line);
        }
        let published = self.publish(cert);
        assert!(published.status.success(), "{published:?}");
        let mut rest = String::new();
        tokio::time::timeout(Duration::from_secs(20), lines.read_to_string(&mut rest))
            .await
            .unwrap()
            .unwrap();
        let payload = rest
            .lines()
            .find_map(|line| line.strip_prefix("PAYLOAD "))
            .unwrap_or_else(|| panic!("no command: {rest}"));
        hex::decode(payload.trim()).unwrap()
    }

    /// The connection presenting `cert` is refused (CONNACK not authorized).
    fn refused(&self, cert: &DeviceCert) {
        let output = self.publish(cert);
        assert!(!output.status.success(), "{output:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("not authori"),
            "{output:?}"
        );
    }
}

/// Drogue's other form: a device lists its certificate's whole subject DN in `spec.alias` and is
/// found by it, whatever the certificate's Common Name says, over HTTPS and MQTTS; a certificate
/// without a Common Name signs in by its DN alone; a DN no device lists, with a Common Name that
/// names no device (or none at all), is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_signs_in_by_its_certificates_subject_dn_listed_as_its_alias() {
    const DN: &str = "O=Drogue IoT, OU=Cloud, CN=Device 1";
    const NO_CN: &str = "O=Drogue IoT, OU=Sensors";
    let server = TlsServer::start(|config| config.mqtt_listen = Some("127.0.0.1:0".into())).await;
    let mqtt = server.running.as_ref().unwrap().mqtt_addr.expect("--mqtt-listen");
    let dir = server.dir.path().to_path_buf();
    let ca = application_ca("Application 1");
    server.create_app_trusting("aliased", &ca).await;
    let create = |name: &'static str, spec: serde_json::Value| {
        let connection = &server.connection;
        async move {
            let device = json!({"metadata": {"name": name}, "spec": spec});
            connection
                .api_send(reqwest::Method::POST, "apps/aliased/devices", Some(device))
                .await
        }
    };
    // No password: only a certificate signs these devices in.
    let (status, body) = create("sensor-7", json!({"alias": [DN]})).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    let (status, body) = create("sensor-8", json!({"alias": [NO_CN]})).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    // The API refuses what the registry refuses: a malformed list (400), an alias taken (409).
    let (status, body) = create("bad", json!({"alias": DN})).await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["message"], "spec.alias: must be a list of strings", "{body}");
    let (status, body) = create("copy", json!({"alias": [DN]})).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    assert_eq!(
        body["message"],
        format!("alias '{DN}' (listed by device 'sensor-7') in application 'aliased' already exists"),
        "{body}"
    );

    let subject = |cn: Option<&'static str>, ou: &'static str| {
        let mut subject = vec![
            (DnType::OrganizationName, "Drogue IoT"),
            (DnType::OrganizationalUnitName, ou),
        ];
        subject.extend(cn.map(|cn| (DnType::CommonName, cn)));
        subject
    };
    let listed = subject_cert(&ca, &subject(Some("Device 1"), "Cloud"), &dir, "listed");
    let without_cn = subject_cert(&ca, &subject(None, "Sensors"), &dir, "without-cn");
    // Listed by no device, and its Common Name names none ("Device 2" is not even a device name).
    let unlisted = subject_cert(&ca, &subject(Some("Device 2"), "Cloud"), &dir, "unlisted");
    let unlisted_without_cn = subject_cert(&ca, &subject(None, "Elsewhere"), &dir, "unlisted-without-cn");
    let status_bytes = ajour_protocol::encode_status(
        &ajour_protocol::Status::first(b"1.0.0".to_vec(), Some(MTU), Some(5)),
        ajour_protocol::Encoding::Packed,
    );

    // MQTTS: Mosquitto's clients with the certificate (and no user name or password) get the
    // command that starts sensor-7's update.
    let mqtts = Mqtts::new(&server, mqtt, &status_bytes);
    let bytes = mqtts.command(&listed).await;
    let command = ajour_protocol::decode_command(&bytes).unwrap();
    assert_eq!(command.kind(), "write");
    assert!(
        mqtts.publish(&without_cn).status.success(),
        "a certificate without a CN whose DN is an alias signs in"
    );
    mqtts.refused(&unlisted);
    mqtts.refused(&unlisted_without_cn);

    // HTTPS: the simulator's device, presenting the certificate and sending no password, updates
    // to the end; the registry shows sensor-7 in sync.
    let http = trusting(&server.pki)
        .identity(reqwest::Identity::from_pem(listed.identity.as_bytes()).unwrap())
        .build()
        .unwrap();
    let endpoints = ajour_sim::HttpLink::endpoints(&[&server.connection.url]);
    let mut link = ajour_sim::HttpLink::spread_by_certificate(http, &endpoints, 0, "aliased");
    let mut device = ajour_sim::SimulatedDevice::new("1.0.0", Some(MTU));
    let outcome = super::support::run_to_end(&mut device, &mut link, "sensor-7@aliased").await;
    assert_eq!(outcome, updated_to("2.0.0", FIRMWARE_LEN));
    assert!(
        super::support::in_sync(&server.connection.firmware("aliased", "sensor-7").await, "2.0.0"),
        "{}",
        server.connection.device("aliased", "sensor-7").await
    );
    let answered = server
        .post_status(Some(&without_cn.identity), &status_bytes)
        .await;
    assert_eq!(answered.status(), reqwest::StatusCode::OK);
    let bytes = answered.bytes().await.unwrap();
    let command = ajour_protocol::decode_command(&bytes).unwrap();
    assert_eq!(command.kind(), "write");
    for refused in [&unlisted, &unlisted_without_cn] {
        let answered = server.post_status(Some(&refused.identity), &status_bytes).await;
        assert_eq!(answered.status(), reqwest::StatusCode::FORBIDDEN);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ajour_simulate_trusts_a_private_ca_over_https_and_mqtts() {
    let server = TlsServer::start(|config| config.mqtt_listen = Some("127.0.0.1:0".into())).await;
    let mqtt = server.running.as_ref().unwrap().mqtt_addr.expect("--mqtt-listen");
    server
        .connection
        .create_app("sim", Some(json!({"file": {"name": "fw"}})))
        .await;
    for name in ["h-0", "h-1", "m-0", "m-1"] {
        server.connection.create_device("sim", name, "pw", None).await;
    }
    let ca = server.dir.path().join("ca.pem");
    std::fs::write(&ca, server.pki.ca_pem()).unwrap();
    let https = server.connection.url.clone();
    let mqtts = format!("mqtts://localhost:{}", mqtt.port());
    let simulate = |url: &str, device: &str, ca: Option<&Path>| {
        let mut command = tokio::process::Command::new(super::support::AJOUR);
        command
            .args([
                "simulate", "--url", url, "--app", "sim", "--device", device, "--count", "2",
            ])
            .args(["--password", "pw", "--version", "1.0.0"]);
        match ca {
            Some(ca) => command.arg("--ca-cert").arg(ca),
            // A device that cannot connect retries until its timeout.
            None => command.args(["--timeout", "2"]),
        };
        command.output()
    };
    for (url, device) in [(&https, "h"), (&mqtts, "m")] {
        let said = super::support::succeeded(simulate(url, device, Some(&ca)).await.unwrap());
        assert!(said.contains("2 device(s): 2 updated"), "{url}: {said}");
    }
    // Without the CA the server's certificate is not trusted: every device fails.
    let said = super::support::failed(simulate(&https, "h", None).await.unwrap());
    assert!(said.contains("2 device(s) failed"), "{said}");
    server.stop().await;
}

/// `ajour simulate --client-cert DIR/{device}.crt --client-key DIR/{device}.key`: a fleet whose
/// devices have no password, each presenting a certificate of its own from the application's CA
/// (Common Name: its name), updates over HTTPS and over MQTTS; a path without `{device}` is one
/// certificate for every device; a missing certificate file fails the run before any device
/// starts, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ajour_simulate_presents_each_devices_own_client_certificate_over_https_and_mqtts() {
    let server = TlsServer::start(|config| config.mqtt_listen = Some("127.0.0.1:0".into())).await;
    let mqtt = server.running.as_ref().unwrap().mqtt_addr.expect("--mqtt-listen");
    let ca = application_ca("Fleet CA");
    server.create_app_trusting("fleet", &ca).await;
    let certs = tempfile::tempdir().unwrap();
    let fleets = ["h-0", "h-1", "h-2", "m-0", "m-1", "m-2"];
    // x-2 has no certificate file; solo's is shared by its whole (one-device) fleet.
    let missing = ["x-0", "x-1", "x-2"];
    for name in fleets.iter().chain(&missing).chain(&["solo"]) {
        // No password: only a certificate signs these devices in.
        let device = json!({"metadata": {"name": name}, "spec": {}});
        let (status, body) = server
            .connection
            .api_send(reqwest::Method::POST, "apps/fleet/devices", Some(device))
            .await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
        if *name != "x-2" {
            device_cert(&ca, name, certs.path(), name);
        }
    }
    let server_ca = server.dir.path().join("ca.pem");
    std::fs::write(&server_ca, server.pki.ca_pem()).unwrap();
    let https = server.connection.url.clone();
    let mqtts = format!("mqtts://localhost:{}", mqtt.port());
    let simulate = |url: &str, device: &str, count: &str, cert: &str| {
        let mut command = tokio::process::Command::new(super::support::AJOUR);
        command
            .args(["simulate", "--url", url, "--app", "fleet", "--device", device])
            .args(["--count", count, "--version", "1.0.0", "--timeout", "60"])
            .arg("--ca-cert")
            .arg(&server_ca)
            .arg("--client-cert")
            .arg(certs.path().join(format!("{cert}.crt")))
            .arg("--client-key")
            .arg(certs.path().join(format!("{cert}.key")))
            .env_remove("AJOUR_DEVICE_PASSWORD");
        command.output()
    };
    for (url, device) in [(&https, "h"), (&mqtts, "m")] {
        let said = super::support::succeeded(simulate(url, device, "3", "{device}").await.unwrap());
        assert!(said.contains("3 device(s): 3 updated"), "{url}: {said}");
    }
    let said = super::support::succeeded(simulate(&https, "solo", "1", "solo").await.unwrap());
    assert!(said.contains("1 device(s): 1 updated"), "{said}");
    for name in fleets.iter().chain(&["solo"]) {
        let shown = server.connection.firmware("fleet", name).await;
        assert!(super::support::in_sync(&shown, "2.0.0"), "{name}: {shown:?}");
    }
    let said = super::support::failed(simulate(&https, "x", "3", "{device}").await.unwrap());
    let file = certs.path().join("x-2.crt");
    assert!(
        said.contains(&format!(
            "the client certificate of device x-2: the client certificate file {} cannot be read",
            file.display()
        )),
        "{said}"
    );
    // Read before any device started: none of the fleet reported anything.
    for name in missing {
        assert_eq!(server.connection.firmware("fleet", name).await, None, "{name}");
    }
    server.stop().await;
}

/// A client certificate is presented over TLS only: with a plain URL, CoAP or Drogue's MQTT
/// integration `ajour simulate` refuses it before reading anything; and the certificate and its
/// key go together.
#[tokio::test]
async fn ajour_simulate_refuses_a_client_certificate_where_no_tls_carries_it() {
    let run = |args: &[&str]| {
        std::process::Command::new(super::support::AJOUR)
            .args(["simulate", "--app", "a", "--device", "d", "--version", "1.0.0"])
            .args(args)
            .env_remove("AJOUR_DEVICE_PASSWORD")
            .output()
            .unwrap()
    };
    let pair = [
        "--client-cert",
        "/nonexistent/{device}.crt",
        "--client-key",
        "/nonexistent/{device}.key",
    ];
    let said = super::support::failed(run(&[&["--url", "http://127.0.0.1:1"][..], &pair].concat()));
    assert!(
        said.contains(
            "--client-cert is presented over TLS only: --url http://127.0.0.1:1 is not https:// or mqtts://"
        ),
        "{said}"
    );
    let said = super::support::failed(run(&[&["--url", "mqtt://127.0.0.1:1"][..], &pair].concat()));
    assert!(
        said.contains("--url mqtt://127.0.0.1:1 is not https:// or mqtts://"),
        "{said}"
    );
    let said = super::support::failed(run(&[&["--url", "coap://127.0.0.1:1"][..], &pair].concat()));
    assert!(said.contains("the CoAP endpoint has none"), "{said}");
    let said = super::support::failed(run(&[&["--via-mqtt", "mqtt://127.0.0.1:1"][..], &pair].concat()));
    assert!(said.contains("behind Drogue's MQTT integration"), "{said}");
    // Both or neither; and without one, a password.
    let said = super::support::failed(run(&["--url", "https://127.0.0.1:1", "--client-cert", "c.crt"]));
    assert!(said.contains("--client-key"), "{said}");
    let said = super::support::failed(run(&["--url", "https://127.0.0.1:1"]));
    assert!(said.contains("--password"), "{said}");
}

/// Client certificate files that cannot work are refused when read, naming the file.
#[test]
fn client_certificate_files_that_cannot_work_are_refused_naming_the_file() {
    use ajour_client::ClientCert;
    let dir = tempfile::tempdir().unwrap();
    let ca = application_ca("Files CA");
    let good = device_cert(&ca, "dev", dir.path(), "good");
    let other = device_cert(&ca, "other", dir.path(), "other");
    assert!(ClientCert::read(&good.cert, &good.key).is_ok());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.crt");
    let error = |cert: &Path, key: &Path| ClientCert::read(cert, key).unwrap_err().to_string();
    let name = |path: &Path| path.display().to_string();
    let cases = [
        (
            error(&missing, &good.key),
            format!("the client certificate file {} cannot be read: ", name(&missing)),
        ),
        (
            error(&good.key, &good.key),
            format!("the client certificate file {} holds no PEM CERTIFICATE", name(&good.key)),
        ),
        (
            error(&garbage, &good.key),
            format!("the client certificate file {} is not valid PEM: ", name(&garbage)),
        ),
        (
            error(&good.cert, &missing),
            format!("the client key file {} cannot be read: ", name(&missing)),
        ),
        (
            error(&good.cert, &good.cert),
            format!("the client key file {} holds no PEM private key", name(&good.cert)),
        ),
        (
            error(&good.cert, &other.key),
            format!(
                "the client key file {} holds the key of another certificate than the client certificate file {}",
                name(&other.key),
                name(&good.cert)
            ),
        ),
    ];
    for (said, expected) in cases {
        assert!(said.starts_with(&expected), "{said}\nexpected: {expected}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_certificates_lock_the_address_out_as_wrong_passwords_do() {
    let server = TlsServer::start(|config| config.service.guard.address_failures = 3).await;
    let ca = application_ca("Locked");
    server.create_app_trusting("locked", &ca).await;
    server.connection.create_device("locked", "dev", "pw", None).await;
    let dir = server.dir.path();
    let good = device_cert(&ca, "dev", dir, "locked-good");
    let forged = device_cert(&application_ca("Locked"), "dev", dir, "locked-forged");
    let status_bytes = ajour_protocol::encode_status(
        &ajour_protocol::Status::first(b"1.0.0".to_vec(), Some(256), None),
        ajour_protocol::Encoding::Packed,
    );
    assert_eq!(
        server
            .post_status(Some(&good.identity), &status_bytes)
            .await
            .status(),
        reqwest::StatusCode::OK
    );
    for _ in 0..3 {
        assert_eq!(
            server
                .post_status(Some(&forged.identity), &status_bytes)
                .await
                .status(),
            reqwest::StatusCode::FORBIDDEN
        );
    }
    // Locked out: no certificate is checked from this address for now, not even the right one.
    assert_eq!(
        server
            .post_status(Some(&forged.identity), &status_bytes)
            .await
            .status(),
        reqwest::StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        server
            .post_status(Some(&good.identity), &status_bytes)
            .await
            .status(),
        reqwest::StatusCode::TOO_MANY_REQUESTS
    );
    server.stop().await;
}

/// Over HTTPS the console's cookies are `Secure`: a browser never sends them in clear.
#[tokio::test]
async fn the_consoles_cookies_are_secure_over_https() {
    let server = TlsServer::start(|_| {}).await;
    let client = trusting(&server.pki)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let form = client
        .get(format!("{}/login", server.connection.url))
        .send()
        .await
        .unwrap();
    let login_cookie = form.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(login_cookie.ends_with("; Secure"), "{login_cookie}");
    let page = form.text().await.unwrap();
    let at = page.find(r#"name="csrf" value=""#).unwrap() + 19;
    let signed_in = client
        .post(format!("{}/login", server.connection.url))
        .header(reqwest::header::COOKIE, login_cookie.split_once(';').unwrap().0)
        .form(&[
            ("token", server.connection.token.as_str()),
            ("csrf", &page[at..at + 64]),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), reqwest::StatusCode::SEE_OTHER);
    let session = signed_in.headers()[reqwest::header::SET_COOKIE].to_str().unwrap();
    assert!(
        session.starts_with("ajour_session=") && session.ends_with("; Secure"),
        "{session}"
    );
    server.stop().await;
}
