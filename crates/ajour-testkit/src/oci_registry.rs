//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution registry),
//! on a free loopback port with its storage in a temp dir, optionally behind htpasswd auth or the
//! distribution token flow (with a token server of its own), optionally over TLS with a CA of its
//! own, killed on `Drop`. Its access log (one line per request) lets tests count what clients asked.
//!
//! Also [`OciLayout`]: an OCI image layout on disk, built byte by byte, for `skopeo copy` to push
//! images that no code of ours assembled on the wire.

use base64::Engine as _;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A running `docker-registry serve`.
pub struct OciRegistry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    options: RegistryOptions,
    token_server: Option<TokenServer>,
}

/// How a test registry is set up.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `(user, password)` a client must present.
    pub credentials: Option<(String, String)>,
    /// Ask for the credentials through the distribution token flow (a bearer token from a token
    /// server of this harness) instead of HTTP Basic.
    pub token_auth: bool,
    /// Serve HTTPS with a certificate from a CA of this harness ([`OciRegistry::ca_file`]).
    pub tls: bool,
}

impl OciRegistry {
    /// A registry that needs no login.
    pub async fn start() -> Self {
        Self::start_with(RegistryOptions::default()).await
    }

    /// A registry that wants HTTP Basic `user`/`password` for everything.
    pub async fn start_with_auth(user: &str, password: &str) -> Self {
        Self::start_with(RegistryOptions {
            credentials: Some((user.to_string(), password.to_string())),
            ..RegistryOptions::default()
        })
        .await
    }

    pub async fn start_with(options: RegistryOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let token_server = match (&options.credentials, options.token_auth) {
            (Some((user, password)), true) => Some(TokenServer::start(dir.path(), user, password).await),
            (Some((user, password)), false) => {
                let hash = bcrypt::hash_with_result(password, 4)
                    .expect("bcrypt")
                    .format_for_version(bcrypt::Version::TwoY);
                std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
                None
            }
            (None, _) => None,
        };
        if options.tls {
            write_tls_files(dir.path());
        }
        let mut registry = Self {
            dir,
            port: 0,
            child: None,
            options,
            token_server,
        };
        // A port found free may be taken before the registry binds it: try a few.
        for _ in 0..5 {
            registry.port = free_port();
            if registry.run().await {
                return registry;
            }
        }
        panic!(
            "docker-registry did not start; is it installed (scripts/setup-test-env.sh)? log:\n{}",
            registry.log()
        );
    }

    /// `127.0.0.1:PORT`, what image references start with.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.options
            .credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The PEM CA that signed the registry's certificate (with [`RegistryOptions::tls`]).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `http://127.0.0.1:PORT/token` of the token server (with [`RegistryOptions::token_auth`]).
    pub fn token_url(&self) -> Option<String> {
        self.token_server.as_ref().map(|t| t.url.clone())
    }

    /// Tokens the token server issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.token_server
            .as_ref()
            .map(|t| t.issued.load(std::sync::atomic::Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// Stop the registry (a crash, as far as clients can tell). Its storage stays.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Stopped means the port refuses connections.
        let addr: SocketAddr = self.host().parse().unwrap();
        wait_until("the registry to stop", || TcpStream::connect(addr).is_err()).await;
    }

    /// Start it again on the same port with the same storage.
    pub async fn restart(&mut self) {
        self.stop().await;
        assert!(
            self.run().await,
            "docker-registry did not restart:\n{}",
            self.log()
        );
    }

    /// Requests the registry served so far, one access-log line each
    /// (`127.0.0.1 - - [time] "GET /v2/... HTTP/1.1" 200 ...`).
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// How many `method` requests for a path ending with `path_suffix` were made.
    pub fn count_requests(&self, method: &str, path_suffix: &str) -> usize {
        let needle = format!("{path_suffix} HTTP/");
        self.access_log()
            .iter()
            .filter(|line| line.contains(&format!("\"{method} /v2/")) && line.contains(&needle))
            .count()
    }

    /// Where the registry keeps the blob `digest` (`sha256:...`): overwrite it to make the
    /// registry serve bytes that do not match their digest.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Start the process on `self.port`; `false` when it exits instead of answering.
    async fn run(&mut self) -> bool {
        let dir = self.dir.path();
        let auth = match (&self.options.credentials, &self.token_server) {
            (Some(_), Some(tokens)) => format!(
                "auth: {{token: {{realm: \"{}\", service: {TOKEN_SERVICE}, issuer: {TOKEN_ISSUER}, rootcertbundle: {}}}}}\n",
                tokens.url,
                dir.join("token-ca.pem").display()
            ),
            (Some(_), None) => format!(
                "auth: {{htpasswd: {{realm: ajour-test, path: {}}}}}\n",
                dir.join("htpasswd").display()
            ),
            (None, _) => String::new(),
        };
        let tls = if self.options.tls {
            format!(
                ", tls: {{certificate: {}, key: {}}}",
                dir.join("server.pem").display(),
                dir.join("server.key").display()
            )
        } else {
            String::new()
        };
        let config = format!(
            "version: 0.1\nlog: {{level: warn, accesslog: {{disabled: false}}}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: {}, secret: ajour-test{tls}}}\n{auth}",
            dir.join("data").display(),
            self.host(),
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let open_append = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .unwrap()
        };
        let mut child = match Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(open_append("access.log"))
            .stderr(open_append("registry.log"))
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("cannot run docker-registry ({e}); run scripts/setup-test-env.sh"),
        };
        let addr: SocketAddr = self.host().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            // 200, or 401 behind auth, or 400 to plain HTTP sent to its TLS port: it answers.
            if matches!(v2_status(addr).as_deref(), Some("200" | "401" | "400")) {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        if let Some(tokens) = self.token_server.take() {
            tokens.task.abort();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const TOKEN_SERVICE: &str = "ajour-test-registry";
const TOKEN_ISSUER: &str = "ajour-test-issuer";

/// A CA (`ca.pem`) and a certificate for 127.0.0.1 signed by it (`server.pem`, `server.key`).
pub(crate) fn write_tls_files(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ajour test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
}

/// The token server of the distribution token flow: `GET /token?service=..&scope=..` with the
/// right HTTP Basic credentials answers a JWT (ES256, its certificate in the `x5c` header, which
/// the registry trusts through `token-ca.pem`) granting the repository actions asked for.
struct TokenServer {
    url: String,
    issued: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

struct TokenIssuer {
    signer: ring::signature::EcdsaKeyPair,
    x5c: String,
    expected_authorization: String,
    issued: Arc<AtomicUsize>,
}

impl TokenServer {
    async fn start(dir: &Path, user: &str, password: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, TOKEN_ISSUER);
        let certificate = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("token-ca.pem"), certificate.pem()).unwrap();
        let base64 = base64::engine::general_purpose::STANDARD;
        let issued = Arc::new(AtomicUsize::new(0));
        let issuer = Arc::new(TokenIssuer {
            signer: ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &key.serialize_der(),
                &ring::rand::SystemRandom::new(),
            )
            .unwrap(),
            x5c: base64.encode(certificate.der()),
            expected_authorization: format!("Basic {}", base64.encode(format!("{user}:{password}"))),
            issued: issued.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let issuer = issuer.clone();
                tokio::spawn(async move {
                    let _ = issuer.answer(stream).await;
                });
            }
        });
        Self { url, issued, task }
    }
}

impl TokenIssuer {
    async fn answer(&self, mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let target = head.split_whitespace().nth(1).unwrap_or_default().to_string();
        let authorized = head.lines().any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("authorization") && value.trim() == self.expected_authorization
            })
        });
        let (status, body) = if authorized {
            ("200 OK", self.token_for(&target)?)
        } else {
            (
                "401 Unauthorized",
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#.to_string(),
            )
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await
    }

    /// `{"token": JWT}` granting what `scope=repository:NAME:ACTIONS` in `target` asks for.
    fn token_for(&self, target: &str) -> std::io::Result<String> {
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let access: Vec<serde_json::Value> = query
            .split('&')
            .filter_map(|pair| pair.strip_prefix("scope="))
            .map(percent_decode)
            .filter_map(|scope| {
                let mut parts = scope.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({
                    "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()
                }))
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let n = self.issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": "test", "aud": TOKEN_SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("token-{n}"),
            "access": access,
        });
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing_input = format!(
            "{}.{}",
            url.encode(header.to_string()),
            url.encode(claims.to_string())
        );
        let signature = self
            .signer
            .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| std::io::Error::other("signing failed"))?;
        let token = format!("{signing_input}.{}", url.encode(signature.as_ref()));
        Ok(serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string())
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The status code `GET /v2/` gets, if anything answers.
fn v2_status(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    // "HTTP/1.x NNN"
    Some(String::from_utf8_lossy(&head[9..12]).into_owned())
}

/// [`crate::eventually`] for a condition that needs no awaiting, within 20 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    crate::eventually(Duration::from_secs(20), what, || std::future::ready(condition())).await
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`), written by
/// hand from the spec, for `skopeo copy oci:DIR:TAG docker://...`.
pub struct OciLayout {
    dir: tempfile::TempDir,
    manifests: Vec<serde_json::Value>,
}

/// A blob to put in a layout: media type, bytes, annotations.
pub struct LayoutBlob<'a> {
    pub media_type: &'a str,
    pub data: &'a [u8],
    pub annotations: serde_json::Value,
}

impl OciLayout {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        Self {
            dir,
            manifests: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Store a blob; its descriptor.
    pub fn blob(&self, blob: &LayoutBlob) -> serde_json::Value {
        let digest = sha256_digest(blob.data);
        std::fs::write(
            self.dir
                .path()
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
            blob.data,
        )
        .unwrap();
        let mut descriptor = serde_json::json!({
            "mediaType": blob.media_type,
            "digest": digest,
            "size": blob.data.len(),
        });
        if blob.annotations.is_object() {
            descriptor["annotations"] = blob.annotations.clone();
        }
        descriptor
    }

    /// Add an image manifest under `tag`; its digest.
    pub fn image(
        &mut self,
        tag: &str,
        config: &LayoutBlob,
        layers: &[LayoutBlob],
        annotations: serde_json::Value,
    ) -> String {
        let mut manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": self.blob(config),
            "layers": layers.iter().map(|l| self.blob(l)).collect::<Vec<_>>(),
        });
        if annotations.is_object() {
            manifest["annotations"] = annotations;
        }
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let mut descriptor = self.blob(&LayoutBlob {
            media_type: "application/vnd.oci.image.manifest.v1+json",
            data: &bytes,
            annotations: serde_json::Value::Null,
        });
        descriptor["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        let digest = descriptor["digest"].as_str().unwrap().to_string();
        self.manifests.push(descriptor);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.manifests});
        std::fs::write(
            self.dir.path().join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        digest
    }

    /// `skopeo copy` the image tagged `tag` to `docker://{destination}` over plain HTTP.
    pub fn copy_to(&self, tag: &str, destination: &str, credentials: Option<(&str, &str)>) {
        let mut command = Command::new("skopeo");
        command
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", self.dir.path().display()))
            .arg(format!("docker://{destination}"));
        if let Some((user, password)) = credentials {
            command.arg(format!("--dest-creds={user}:{password}"));
        }
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("cannot run skopeo ({e}); run scripts/setup-test-env.sh"));
        assert!(
            output.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Default for OciLayout {
    fn default() -> Self {
        Self::new()
    }
}

/// `skopeo inspect` of `docker://{image}` over plain HTTP: `--raw` gives the manifest, without it
/// skopeo's summary (with the config's labels).
pub fn skopeo_inspect(image: &str, raw: bool, credentials: Option<(&str, &str)>) -> serde_json::Value {
    serde_json::from_slice(&skopeo_inspect_bytes(image, raw, credentials)).expect("skopeo prints JSON")
}

/// The manifest of `docker://{image}` exactly as the registry serves it: the bytes its digest is
/// the SHA-256 of.
pub fn skopeo_raw_manifest(image: &str, credentials: Option<(&str, &str)>) -> Vec<u8> {
    skopeo_inspect_bytes(image, true, credentials)
}

fn skopeo_inspect_bytes(image: &str, raw: bool, credentials: Option<(&str, &str)>) -> Vec<u8> {
    let mut command = Command::new("skopeo");
    command.args(["inspect", "--tls-verify=false"]);
    if raw {
        command.arg("--raw");
    }
    if let Some((user, password)) = credentials {
        command.arg(format!("--creds={user}:{password}"));
    }
    let output = command
        .arg(format!("docker://{image}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run skopeo ({e}); run scripts/setup-test-env.sh"));
    assert!(
        output.status.success(),
        "skopeo inspect failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}
