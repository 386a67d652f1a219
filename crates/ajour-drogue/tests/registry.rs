//! [`DrogueRegistry`], the client of Drogue's registry API, against a server of that API: Ajour's
//! own (`ajour_api::router`, same paths, object shape, optimistic locking and status codes as
//! Drogue's), served in-process on a free port over a `SqlRegistry` on SQLite and on PostgreSQL.
//! What the client wrote is read back from the database behind the API, not through the client.

use ajour_api::{ApiState, ApiToken};
use ajour_drogue::{DrogueRegistry, RegistryConfig};
use ajour_registry::{
    AppName, DeviceName, Key, ListParams, Metadata, Registry, RegistryError, Resource, Scope, SqlRegistry,
    SqlRegistryOptions,
};
use ajour_service::{ServiceConfig, UpdateService};
use ajour_testkit::{Backend, TestDatabase, BACKENDS};
use serde_json::{json, Value};
use std::sync::Arc;

const TOKEN: &str = "registry-api-token";

/// Ajour's registry API on a free port, over a database of this test's own.
struct RegistryApi {
    url: String,
    /// The database behind the API, to check what the client did.
    stored: Arc<SqlRegistry>,
    server: tokio::task::JoinHandle<()>,
    _sqlite_dir: tempfile::TempDir,
    _postgres: Option<TestDatabase>,
}

impl RegistryApi {
    async fn start(backend: Backend) -> Self {
        let sqlite_dir = tempfile::tempdir().unwrap();
        let postgres = TestDatabase::of(backend).await;
        let url = match &postgres {
            Some(database) => database.url().to_string(),
            None => SqlRegistry::sqlite_url(sqlite_dir.path()),
        };
        let options = SqlRegistryOptions::default();
        let stored = Arc::new(SqlRegistry::connect(&url, options).await.unwrap());
        // The API tells the update service of writes; this one serves no devices.
        let service = Arc::new(UpdateService::new(
            stored.clone(),
            Arc::new(ajour_store::Firmware::default()),
            ServiceConfig::default(),
        ));
        let router = ajour_api::router(
            ApiState {
                registry: stored.clone(),
                service,
                access: stored.clone(),
                builds: None,
                public_url: Default::default(),
            },
            ApiToken::new(TOKEN),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self {
            url,
            stored,
            server,
            _sqlite_dir: sqlite_dir,
            _postgres: postgres,
        }
    }

    fn client_config(&self) -> RegistryConfig {
        let mut config = RegistryConfig::new(&self.url);
        config.token = Some(TOKEN.into());
        config
    }
}

impl Drop for RegistryApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn resource(name: &str, application: Option<&str>, spec: Value) -> Resource {
    Resource {
        metadata: Metadata {
            name: name.into(),
            application: application.map(str::to_string),
            ..Default::default()
        },
        spec: spec.as_object().cloned().unwrap_or_default(),
        status: Default::default(),
    }
}

#[tokio::test]
async fn the_registry_client_speaks_drogues_api_and_redoes_writes_on_conflict() {
    for backend in BACKENDS {
        let api = RegistryApi::start(backend).await;
        let mut config = api.client_config();
        let registry = Arc::new(DrogueRegistry::new(&config).unwrap());
        // Basic user:token works as well as Bearer.
        config.user = Some("someone".into());
        let basic = DrogueRegistry::new(&config).unwrap();

        let app = AppName::parse("reg-app").unwrap();
        let app_key = Key::App(app.clone());
        let created = registry
            .create(
                &app_key,
                resource("reg-app", None, json!({"firmware": {"file": {"name": "fw"}}})),
            )
            .await
            .unwrap();
        let stored_app = api.stored.get(&app_key).await.unwrap().expect("stored");
        assert_eq!(
            created.metadata.resource_version, stored_app.metadata.resource_version,
            "{backend:?}"
        );
        assert_eq!(stored_app.spec["firmware"], json!({"file": {"name": "fw"}}));
        assert!(matches!(
            registry
                .create(&app_key, resource("reg-app", None, json!({})))
                .await,
            Err(RegistryError::AlreadyExists(_))
        ));
        let device_key = Key::Device(app.clone(), DeviceName::parse("contested").unwrap());
        registry
            .create(
                &device_key,
                resource(
                    "contested",
                    Some("reg-app"),
                    json!({"authentication": {"credentials": [{"pass": "pw"}]}, "keep": {"me": true}}),
                ),
            )
            .await
            .unwrap();
        let names =
            |resources: Vec<Resource>| resources.into_iter().map(|r| r.metadata.name).collect::<Vec<_>>();
        assert_eq!(
            names(basic.list(&Scope::Apps, &ListParams::default()).await.unwrap()),
            ["reg-app"]
        );
        assert_eq!(
            names(
                basic
                    .list(&Scope::Devices(app.clone()), &ListParams::default())
                    .await
                    .unwrap()
            ),
            ["contested"]
        );
        assert!(registry
            .get(&Key::Device(app.clone(), DeviceName::parse("nobody").unwrap()))
            .await
            .unwrap()
            .is_none());

        // Optimistic locking: a stale resourceVersion is a Conflict.
        let mut stale = registry.get(&device_key).await.unwrap().unwrap();
        let mut fresh = stale.clone();
        fresh.metadata.labels.insert("a".into(), "1".into());
        registry.update(&device_key, fresh).await.unwrap();
        stale.metadata.labels.insert("b".into(), "2".into());
        assert!(matches!(
            registry.update(&device_key, stale).await,
            Err(RegistryError::Conflict)
        ));

        // Concurrent writers: status sections through the client (GET + PUT, redone on 409), and
        // label changes by another client of the same API. Nothing any of them wrote may be lost.
        let mut writers = tokio::task::JoinSet::new();
        for writer in 0..8 {
            let (registry, key) = (registry.clone(), device_key.clone());
            writers.spawn(async move {
                for round in 0..5 {
                    // The client redoes a write on 409 a bounded number of times; past that it
                    // says Conflict and the status writer tries again later, as here.
                    loop {
                        let section = format!("s{writer}");
                        match registry
                            .set_status_section(&key, &section, json!({"round": round}))
                            .await
                        {
                            Ok(()) => break,
                            Err(RegistryError::Conflict) => continue,
                            Err(other) => panic!("{other}"),
                        }
                    }
                }
            });
        }
        for writer in 0..2 {
            let (registry, key) = (registry.clone(), device_key.clone());
            writers.spawn(async move {
                for round in 0..5 {
                    loop {
                        let mut current = registry.get(&key).await.unwrap().unwrap();
                        current
                            .metadata
                            .labels
                            .insert(format!("writer-{writer}"), round.to_string());
                        match registry.update(&key, current).await {
                            Ok(_) => break,
                            Err(RegistryError::Conflict) => continue,
                            Err(other) => panic!("{other}"),
                        }
                    }
                }
            });
        }
        while let Some(done) = writers.join_next().await {
            done.unwrap();
        }
        let device = api.stored.get(&device_key).await.unwrap().expect("stored");
        for writer in 0..8 {
            assert_eq!(
                device.status[&format!("s{writer}")]["round"],
                4,
                "{backend:?}: {device:?}"
            );
        }
        let labels = &device.metadata.labels;
        assert_eq!(
            (
                labels["writer-0"].as_str(),
                labels["writer-1"].as_str(),
                labels["a"].as_str()
            ),
            ("4", "4", "1"),
            "{backend:?}"
        );
        assert_eq!(device.spec["keep"], json!({"me": true}), "the spec is left alone");
        assert!(
            registry.conflicts_retried() > 0,
            "{backend:?}: concurrent writers must have met 409s"
        );

        // Errors map back to the registry's kinds.
        registry.delete(&device_key).await.unwrap();
        assert!(api.stored.get(&device_key).await.unwrap().is_none());
        assert!(matches!(
            registry
                .set_status_section(&device_key, "firmware", json!({}))
                .await,
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            registry.delete(&device_key).await,
            Err(RegistryError::NotFound(_))
        ));
        let mut wrong = api.client_config();
        wrong.token = Some("wrong".into());
        assert!(matches!(
            DrogueRegistry::new(&wrong).unwrap().get(&app_key).await,
            Err(RegistryError::Remote(message)) if message.contains("401")
        ));
    }
    // Nothing listening (a port that was free a moment ago): an error, not a hang.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = DrogueRegistry::new(&RegistryConfig::new(format!("http://{closed}"))).unwrap();
    assert!(matches!(
        unreachable.get(&Key::App(AppName::parse("any").unwrap())).await,
        Err(RegistryError::Remote(_))
    ));
}
