//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution registry),
//! on a free loopback port with its storage in a temp dir, optionally behind htpasswd auth,
//! killed on `Drop`. Its access log (one line per request) lets tests count what clients asked.
//!
//! Also [`OciLayout`]: an OCI image layout on disk, built byte by byte, for `skopeo copy` to push
//! images that no code of ours assembled on the wire.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `docker-registry serve`.
pub struct OciRegistry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    credentials: Option<(String, String)>,
}

impl OciRegistry {
    /// A registry that needs no login.
    pub async fn start() -> Self {
        Self::start_inner(None).await
    }

    /// A registry that wants HTTP Basic `user`/`password` for everything.
    pub async fn start_with_auth(user: &str, password: &str) -> Self {
        Self::start_inner(Some((user.to_string(), password.to_string()))).await
    }

    async fn start_inner(credentials: Option<(String, String)>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        if let Some((user, password)) = &credentials {
            let hash = bcrypt::hash_with_result(password, 4)
                .expect("bcrypt")
                .format_for_version(bcrypt::Version::TwoY);
            std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
        }
        let mut registry = Self {
            dir,
            port: 0,
            child: None,
            credentials,
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
        self.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
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
        let auth = if self.credentials.is_some() {
            format!(
                "auth: {{htpasswd: {{realm: ajour-test, path: {}}}}}\n",
                dir.join("htpasswd").display()
            )
        } else {
            String::new()
        };
        let config = format!(
            "version: 0.1\nlog: {{level: warn, accesslog: {{disabled: false}}}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: {}, secret: ajour-test}}\n{auth}",
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
            // 200, or 401 behind auth: the registry answers.
            if matches!(v2_status(addr).as_deref(), Some("200" | "401")) {
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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

/// Poll `condition` every 20 ms until it holds; panic after 20 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    serde_json::from_slice(&output.stdout).expect("skopeo prints JSON")
}
