//! The server under test as a child process: started on a free port, measured through `/proc`,
//! killed on drop.

use anyhow::{bail, Context};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `/proc` reports CPU time in clock ticks of `USER_HZ`, fixed at 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

pub struct ServerProcess {
    child: Child,
    pub url: String,
    /// The CoAP endpoint's address, when the server printed one (`CoAP device endpoint on
    /// coap://ADDR`): read by [`Self::coap_url`].
    lines: std::sync::mpsc::Receiver<String>,
    /// The MQTT endpoint's address, when the server printed one (`MQTT device endpoint on
    /// mqtt://ADDR`): read by [`Self::mqtt_address`].
    mqtt_lines: std::sync::mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Start `binary` with `args`; it must print a line `... listening on http://ADDR` (or the
    /// broker URL, for the bare MQTT server).
    pub fn start(binary: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(args)
            .env("AJOUR_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the server under test, {}", binary.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let (sender, receiver) = std::sync::mpsc::channel();
        let (coap_sender, coap_lines) = std::sync::mpsc::channel();
        let (mqtt_sender, mqtt_lines) = std::sync::mpsc::channel();
        // Read the addresses from a thread of its own, so a server that never prints one times out.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((_, url)) = line.split_once("listening on ") {
                    let _ = sender.send(url.trim().to_string());
                } else if let Some((_, address)) = line.split_once(" endpoint on coap://") {
                    let _ = coap_sender.send(address.trim().to_string());
                } else if let Some((_, address)) = line.split_once(" endpoint on mqtt://") {
                    let _ = mqtt_sender.send(address.trim().to_string());
                }
            }
        });
        let mut server = Self {
            child,
            url: String::new(),
            lines: coap_lines,
            mqtt_lines,
        };
        match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => server.url = url,
            Err(_) => bail!("the server under test did not report its address within 30 s"),
        }
        Ok(server)
    }

    /// The CoAP endpoint's `HOST:PORT`, as the server printed it (started with `--coap-listen`).
    pub fn coap_address(&self) -> anyhow::Result<String> {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .context("the server under test did not report a CoAP endpoint within 30 s")
    }

    /// The MQTT endpoint's `HOST:PORT`, as the server printed it (started with `--mqtt-listen`).
    pub fn mqtt_address(&self) -> anyhow::Result<String> {
        self.mqtt_lines
            .recv_timeout(Duration::from_secs(30))
            .context("the server under test did not report an MQTT endpoint within 30 s")
    }

    /// Stop the server as a service manager would (SIGTERM) and wait until it has exited, its
    /// pending statuses written.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("signalling the server")?;
        let status = self.child.wait().context("waiting for the server to stop")?;
        anyhow::ensure!(
            status.success(),
            "the server under test exited with {status} on SIGTERM"
        );
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) the server has used so far.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid())
    }

    /// Peak resident memory in MiB (`VmHWM`).
    pub fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        peak_rss_mib(self.pid())
    }
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks =
        |i: usize| -> anyhow::Result<f64> { Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?) };
    // utime and stime are fields 14 and 15 of stat; 11 and 12 after the name.
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
}

/// Peak resident memory of process `pid` in MiB (`VmHWM`).
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
