//! A PostgreSQL server of the caller's own, for tests that stop and start the database under a
//! running Ajour: Debian's `initdb` and `pg_ctl` make a cluster in a temp dir, listening on a free
//! loopback port (and a socket in that dir), with `trust` auth for the `postgres` user. Its data
//! is thrown away on `Drop`, so `fsync` is off. Run as root (as CI does), the cluster belongs to
//! the `postgres` user, because PostgreSQL refuses to run as root.
//!
//! Most tests need only a database of their own on the shared server ([`crate::TestDatabase`]);
//! this one is for the outage tests, which must not stop the server every other test uses.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A running (or stopped, see [`PostgresServer::stop`]) server of its own.
pub struct PostgresServer {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

impl PostgresServer {
    /// Make a cluster on a free port and start it; panics, saying why, when it cannot.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("ajour-postgres-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let as_postgres = run(Command::new("id").arg("-u")).stdout.trim_ascii() == b"0";
        if as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(&dir));
        }
        let server = Self {
            port: free_port(),
            bin: binaries(),
            dir,
            as_postgres,
        };
        server.pg(
            "initdb",
            &[
                "--auth=trust",
                "--username=postgres",
                "--no-sync",
                "--encoding=UTF8",
                "-D",
                server.data().to_str().unwrap(),
            ],
        );
        let config = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n",
            server.port,
            server.dir.display()
        );
        let conf = server.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(&config);
        std::fs::write(&conf, text).expect("write postgresql.conf");
        server.start_again();
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`, to create databases with.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Create database `name` and return its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.pg(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                name,
            ],
        );
        self.url(name)
    }

    /// Stop the server as an operator's restart does (`pg_ctl stop -m fast`: clients are
    /// disconnected, nothing committed is lost) and wait until it is down.
    pub fn stop(&self) {
        self.pg(
            "pg_ctl",
            &["-D", self.data().to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    /// Start the server (again) on the same port and wait until it accepts connections.
    pub fn start_again(&self) {
        let log = self.dir.join("postgres.log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// What the server logged, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// PostgreSQL's program `name`, to be run as the `postgres` user when this is root.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        command.env_remove("PGDATA").env_remove("PGPORT");
        command
    }

    /// Run PostgreSQL's program `name` with `args`; panics, saying why, when it fails.
    fn pg(&self, name: &str, args: &[&str]) -> Output {
        let output = run(self.command(name).args(args));
        if !output.status.success() {
            panic!(
                "{name} {args:?} failed: {}{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
        }
        output
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Immediate: the data is thrown away, nothing to flush.
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"))
}

/// The newest installed PostgreSQL's programs (Debian keeps them out of the `PATH`), or
/// `$AJOUR_TEST_POSTGRES_BIN`.
fn binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("AJOUR_TEST_POSTGRES_BIN") {
        return PathBuf::from(dir);
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<u32> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e} (install Debian's postgresql)", root.display()))
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let newest = versions
        .last()
        .unwrap_or_else(|| panic!("no PostgreSQL version under {}", root.display()));
    root.join(newest.to_string()).join("bin")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
