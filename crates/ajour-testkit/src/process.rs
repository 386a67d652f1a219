//! [`ServerProcess`]: a server binary a test runs as a process of its own (so its `/metrics`,
//! its log, its signals and its open-file limit are its own): output to files in a temp dir,
//! its address read from the `... listening on http://ADDR` line it prints, killed on `Drop`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Remove from `command` the variables `AJOUR_*` of the test's own environment (but `AJOUR_LOG`)
/// it does not set itself, so a developer's settings cannot change what a test runs.
pub fn without_outside_settings(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let set_here = command.get_envs().any(|(set, _)| set == name);
        let text = name.to_string_lossy();
        if text.starts_with("AJOUR_") && text != "AJOUR_LOG" && !set_here {
            command.env_remove(&name);
        }
    }
}

pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    /// Its stdout and stderr.
    dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Run `command` (the program and its arguments, e.g. `ajour serve --listen 127.0.0.1:0 ...`)
    /// and wait until it says where it listens. Variables `AJOUR_*` of the test's own
    /// environment (but `AJOUR_LOG`) are not passed on, so a developer's settings cannot change
    /// what a test runs; set what the test needs on `command`.
    pub async fn start(mut command: Command) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        without_outside_settings(&mut command);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(file("stdout"))
            .stderr(file("stderr"))
            .spawn()
            .unwrap_or_else(|e| panic!("running {:?}: {e}", command.get_program()));
        let mut addr = None;
        crate::eventually(Duration::from_secs(30), "the server to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{:?} exited ({status}):\n{}",
                    command.get_program(),
                    std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
                );
            }
            addr = std::fs::read_to_string(dir.path().join("stdout"))
                .unwrap_or_default()
                .lines()
                .find_map(|line| line.split_once("listening on http://")?.1.trim().parse().ok());
            std::future::ready(addr.is_some())
        })
        .await;
        Self {
            child,
            addr: addr.unwrap(),
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// What it logged (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// A temp dir that lives as long as the process, for files the test gives it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Kill it (SIGKILL, as a crash would) and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
