//! A Mosquitto MQTT broker of the caller's own: Debian's `mosquitto` on a free loopback port, its
//! configuration and log in a temp dir, killed (by its PID) on `Drop`. MQTT 3.1.1 and 5, shared
//! subscriptions, anonymous access; plain, or TLS with a certificate for 127.0.0.1 signed by a
//! CA of its own ([`Mosquitto::start_tls`], [`Mosquitto::ca_file`]). The tests start one per test;
//! `ajour-bench mqtt` starts one per run ([`MosquittoOptions`] says how), and measures its CPU
//! through [`Mosquitto::pid`].
//!
//! The broker binary is the one in the options, else `$AJOUR_TEST_MOSQUITTO`, else
//! `/usr/sbin/mosquitto`, else `mosquitto` on the `PATH` (`scripts/setup-test-env.sh` installs it).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to run a broker.
#[derive(Debug, Clone)]
pub struct MosquittoOptions {
    /// The broker binary (none: `$AJOUR_TEST_MOSQUITTO`, else Debian's, else the `PATH`'s).
    pub binary: Option<PathBuf>,
    /// MQTT over TLS only (`mqtts://`), the certificate signed by the CA in
    /// [`Mosquitto::ca_file`].
    pub tls: bool,
    /// Messages queued per client (Mosquitto's `max_queued_messages`); past it, QoS 1 messages
    /// are dropped. A load generator needs room for a status from every device at once.
    pub max_queued_messages: u32,
}

impl Default for MosquittoOptions {
    fn default() -> Self {
        Self {
            binary: None,
            tls: false,
            max_queued_messages: 100_000,
        }
    }
}

/// Why a broker could not be started, with what it logged.
#[derive(Debug)]
pub struct StartError(String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mosquitto did not start: {}", self.0)
    }
}

impl std::error::Error for StartError {}

/// A running broker.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    tls: bool,
}

impl Mosquitto {
    /// Start a broker on a free port and wait until it accepts connections.
    pub fn start() -> Result<Self, StartError> {
        Self::start_with(&MosquittoOptions::default())
    }

    /// Start a broker speaking MQTT over TLS only (`mqtts://`), its certificate signed by the CA
    /// in [`Self::ca_file`].
    pub fn start_tls() -> Result<Self, StartError> {
        Self::start_with(&MosquittoOptions {
            tls: true,
            ..MosquittoOptions::default()
        })
    }

    /// Start a broker as `options` say, on a free port.
    pub fn start_with(options: &MosquittoOptions) -> Result<Self, StartError> {
        // The port is free when asked for, but another process could take it before the broker
        // binds it: then the broker exits at once, and another port is tried.
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(free_port()?, options) {
                Ok(broker) => return Ok(broker),
                Err(error) => last = error,
            }
        }
        Err(StartError(last))
    }

    /// Start a broker with the default options on `port` (e.g. again, after [`Self::stop`], to
    /// test reconnection).
    pub fn start_on(port: u16) -> Result<Self, StartError> {
        // Right after a stop the port may still be held for a moment; try for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::try_start(port, &MosquittoOptions::default()) {
                Ok(broker) => return Ok(broker),
                Err(error) if Instant::now() > deadline => {
                    return Err(StartError(format!("on port {port}: {error}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn try_start(port: u16, options: &MosquittoOptions) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("ajour-mosquitto-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let config = dir.join("mosquitto.conf");
        // No persistence (nothing to write per message); no Nagle, or every small packet waits
        // for a delayed ACK.
        let mut text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
             max_queued_messages {}\nset_tcp_nodelay true\n",
            options.max_queued_messages
        );
        if options.tls {
            crate::oci_registry::write_tls_files(&dir);
            text.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                dir.join("ca.pem").display(),
                dir.join("server.pem").display(),
                dir.join("server.key").display()
            ));
        }
        std::fs::write(&config, text).map_err(|e| format!("writing {}: {e}", config.display()))?;
        let log = std::fs::File::create(dir.join("mosquitto.log")).map_err(|e| e.to_string())?;
        let binary = options.binary.clone().unwrap_or_else(default_binary);
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("running {}: {e} (install Debian's mosquitto)", binary.display()))?;
        let mut broker = Self {
            child: Some(child),
            port,
            dir,
            tls: options.tls,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Some(child) = broker.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    broker.child = None;
                    return Err(format!("exited with {status}: {}", broker.log()));
                }
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(broker);
            }
            if Instant::now() > deadline {
                return Err(format!("not accepting connections after 10 s: {}", broker.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`, or `mqtts://` for a TLS broker.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The broker's process id, while it runs (to read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The CA that signed a TLS broker's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// What the broker logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Kill the broker (as a crash would: clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn default_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AJOUR_TEST_MOSQUITTO") {
        return PathBuf::from(path);
    }
    let debian = Path::new("/usr/sbin/mosquitto");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("mosquitto")
    }
}

fn free_port() -> Result<u16, StartError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| StartError(format!("no free loopback port: {e}")))
}
