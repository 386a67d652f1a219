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

pub mod oci_registry;

pub use oci_registry::{OciLayout, OciRegistry};

pub mod memory;
pub mod mosquitto;

pub use memory::MemoryRegistry;
pub use mosquitto::Mosquitto;

use sqlx::Connection;

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

    pub fn url(&self) -> &str {
        &self.url
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
