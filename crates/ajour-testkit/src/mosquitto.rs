//! A Mosquitto MQTT broker of the test's own: Debian's `mosquitto` on a free loopback port, its
//! configuration and log in a temp dir, killed (by its PID) on `Drop`. MQTT 3.1.1 and 5, shared
//! subscriptions, anonymous access; plain, or TLS with a certificate for 127.0.0.1 signed by a
//! CA of its own ([`Mosquitto::start_tls`], [`Mosquitto::ca_file`]).
//!
//! The broker binary is `$AJOUR_TEST_MOSQUITTO`, else `/usr/sbin/mosquitto`, else `mosquitto` on
//! the `PATH` (`scripts/setup-test-env.sh` installs it).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running broker.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    tls: bool,
}

impl Mosquitto {
    /// Start a broker on a free port and wait until it accepts connections.
    pub fn start() -> Self {
        Self::start_any(false)
    }

    /// Start a broker speaking MQTT over TLS only (`mqtts://`), its certificate signed by the CA
    /// in [`Self::ca_file`].
    pub fn start_tls() -> Self {
        Self::start_any(true)
    }

    fn start_any(tls: bool) -> Self {
        // The port is free when asked for, but another process could take it before the broker
        // binds it: then the broker exits at once, and another port is tried.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Self::try_start(port, tls) {
                Ok(broker) => return broker,
                Err(log) => last_log = log,
            }
        }
        panic!("Mosquitto did not start:\n{last_log}");
    }

    /// Start a broker on `port` (e.g. again, after [`Self::stop`], to test reconnection).
    pub fn start_on(port: u16) -> Self {
        // Right after a stop the port may still be held for a moment; try for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::try_start(port, false) {
                Ok(broker) => return broker,
                Err(log) if Instant::now() > deadline => panic!("Mosquitto did not start on {port}:\n{log}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn try_start(port: u16, tls: bool) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("ajour-mosquitto-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let config = dir.join("mosquitto.conf");
        let mut text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
             max_queued_messages 100000\nset_tcp_nodelay true\n"
        );
        if tls {
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
        let child = Command::new(binary())
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("running {}: {e} (install Debian's mosquitto)", binary().display()))?;
        let mut broker = Self {
            child: Some(child),
            port,
            dir,
            tls,
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

fn binary() -> PathBuf {
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
