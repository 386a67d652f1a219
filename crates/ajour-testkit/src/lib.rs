//! Helpers that give each test real servers of its own, cleaned up on `Drop`, and the one test
//! double of the registry ([`MemoryRegistry`]) for tests of the layers above it.
//!
//! MQTT broker: [`Mosquitto`] runs Debian's `mosquitto` on a free port in a temp dir.
//!
//! OCI registry: [`OciRegistry`] runs Debian's `docker-registry` on a free port (see
//! [`oci_registry`]).
//!
//! PostgreSQL: each [`TestDatabase`] is a fresh database on the server named by
//! `AJOUR_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`, the server
//! every development and CI machine runs), dropped when the test ends. Tests that need PostgreSQL
//! fail, loudly, when it is not reachable: a silently skipped backend is an untested backend.
//! Tests that stop and start the database under a running server start a [`PostgresServer`] of
//! their own instead.
//!
//! Waiting: [`eventually`] polls a condition until a deadline. Tests wait for what they need to
//! have happened, never for a fixed time.

pub mod oci_registry;

pub use oci_registry::{OciLayout, OciRegistry};

pub mod memory;
pub mod mosquitto;
pub mod postgres;
pub mod process;

pub use memory::MemoryRegistry;
pub use mosquitto::Mosquitto;
pub use postgres::PostgresServer;
pub use process::{without_outside_settings, ServerProcess};

use sqlx::Connection;
use std::future::Future;
use std::time::{Duration, Instant};

/// Where a test's SQL registry lives. Tests of anything that stores applications and devices run
/// on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, a file in a temp dir.
    Sqlite,
    /// A [`TestDatabase`] on the local PostgreSQL server.
    Postgres,
}

pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A PostgreSQL database that exists for one test.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin_url = std::env::var("AJOUR_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into());
        let name = format!("ajour_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("PostgreSQL for tests is not reachable at {admin_url} ({e}); start it or set AJOUR_TEST_POSTGRES_URL")
        });
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base)
            .unwrap_or(&admin_url);
        let url = format!("{base}/{name}");
        Self { admin_url, name, url }
    }

    /// A database of the test's own on `backend`: one on PostgreSQL, none for SQLite (whose file
    /// lives in the test's own temp dir).
    pub async fn of(backend: Backend) -> Option<Self> {
        match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(Self::create().await),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Make the database unreachable, as one whose server went away: connections open to it are
    /// closed and new ones refused (`ALLOW_CONNECTIONS false` holds for superusers too). It is
    /// still dropped when the test ends.
    pub async fn refuse_connections(&self) {
        let mut admin = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .expect("connect to PostgreSQL as admin");
        let name = &self.name;
        // Two statements, two transactions: one batch would be one implicit transaction, and
        // connections made again while the terminations are awaited would still be let in.
        for statement in [
            format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
            format!(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
                 WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            ),
        ] {
            sqlx::raw_sql(&statement)
                .execute(&mut admin)
                .await
                .expect("refuse connections to the test database");
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop may run inside a runtime; a thread of its own can block on one of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Deterministic test firmware: `len` bytes that differ with `seed`.
pub fn firmware_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Poll `check` every 20 ms until it holds; panic, saying `what` was awaited, after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One server's metrics, in Prometheus' text format (what its `/metrics` answered).
pub struct Metrics(pub String);

impl Metrics {
    /// The metrics a server at `url` (`http://ADDR`) shows now.
    pub async fn of(url: &str) -> Self {
        let response = reqwest::get(format!("{url}/metrics")).await.unwrap();
        assert!(
            response.status().is_success(),
            "GET {url}/metrics: {}",
            response.status()
        );
        Self(response.text().await.unwrap())
    }

    /// The value of series `name` with exactly `labels`, in any order; 0 when it has no sample
    /// (a counter not yet incremented).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        wanted.sort();
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.rsplit_once(' '))
            .find(|(series, _)| {
                let (series_name, series_labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (*series, ""),
                };
                let mut have: Vec<&str> = series_labels.split(',').filter(|l| !l.is_empty()).collect();
                have.sort();
                series_name == name && have == wanted
            })
            .map(|(_, value)| value.parse().unwrap())
            .unwrap_or(0.0)
    }
}

/// The page as it came, for failure messages.
impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
