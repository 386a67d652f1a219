//! The registry's behaviour, run against both backends: SQLite in a temp dir and a PostgreSQL
//! database of the test's own.

use ajour_registry::*;
use ajour_testkit::TestDatabase;
use serde_json::{json, Value};
use std::sync::Arc;

struct Backend {
    registry: SqlRegistry,
    _sqlite_dir: Option<tempfile::TempDir>,
    _postgres: Option<TestDatabase>,
}

async fn backends() -> Vec<(&'static str, Backend)> {
    let options = SqlRegistryOptions::default();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqlRegistry::connect(&SqlRegistry::sqlite_url(dir.path()), options.clone())
        .await
        .unwrap();
    let db = TestDatabase::create().await;
    let postgres = SqlRegistry::connect(db.url(), options).await.unwrap();
    vec![
        (
            "sqlite",
            Backend {
                registry: sqlite,
                _sqlite_dir: Some(dir),
                _postgres: None,
            },
        ),
        (
            "postgres",
            Backend {
                registry: postgres,
                _sqlite_dir: None,
                _postgres: Some(db),
            },
        ),
    ]
}

fn app_key(name: &str) -> Key {
    Key::App(AppName::parse(name).unwrap())
}

fn device_key(app: &str, name: &str) -> Key {
    Key::Device(AppName::parse(app).unwrap(), DeviceName::parse(name).unwrap())
}

fn resource(value: Value) -> Resource {
    serde_json::from_value(value).unwrap()
}

#[tokio::test]
async fn create_get_list_delete() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        let app = r
            .create(&app_key("my-app"), resource(json!({"metadata": {"name": "my-app", "labels": {"env": "prod"}}, "spec": {"firmware": {"file": {"name": "fw"}}}})))
            .await
            .unwrap();
        assert_eq!(app.metadata.generation, 1, "{backend}");
        assert!(!app.metadata.uid.is_empty() && !app.metadata.resource_version.is_empty());
        assert!(
            matches!(
                r.create(
                    &app_key("my-app"),
                    resource(json!({"metadata": {"name": "my-app"}}))
                )
                .await,
                Err(RegistryError::AlreadyExists(_))
            ),
            "{backend}"
        );
        r.create(
            &app_key("other"),
            resource(json!({"metadata": {"name": "other"}})),
        )
        .await
        .unwrap();

        let got = r.get(&app_key("my-app")).await.unwrap().unwrap();
        assert_eq!(got, app, "{backend}");

        let all = r.list(&Scope::Apps, &ListParams::default()).await.unwrap();
        assert_eq!(
            all.iter().map(|a| a.metadata.name.as_str()).collect::<Vec<_>>(),
            ["my-app", "other"],
            "{backend}"
        );
        let prod = r
            .list(
                &Scope::Apps,
                &ListParams {
                    labels: Some("env=prod".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(prod.len(), 1, "{backend}");
        let paged = r
            .list(
                &Scope::Apps,
                &ListParams {
                    offset: Some(1),
                    limit: Some(1),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(paged[0].metadata.name, "other", "{backend}");

        // Devices need their application.
        assert!(matches!(
            r.create(
                &device_key("missing", "d1"),
                resource(json!({"metadata": {"name": "d1"}}))
            )
            .await,
            Err(RegistryError::NotFound(_))
        ));
        let device = r
            .create(
                &device_key("my-app", "d1"),
                resource(json!({"metadata": {"name": "d1", "application": "my-app"}})),
            )
            .await
            .unwrap();
        assert_eq!(device.metadata.application.as_deref(), Some("my-app"));
        let devices = r
            .list(
                &Scope::Devices(AppName::parse("my-app").unwrap()),
                &ListParams::default(),
            )
            .await
            .unwrap();
        assert_eq!(devices.len(), 1, "{backend}");

        // Deleting the application deletes its devices.
        r.delete(&app_key("my-app")).await.unwrap();
        assert!(
            r.get(&device_key("my-app", "d1")).await.unwrap().is_none(),
            "{backend}"
        );
        assert!(matches!(
            r.delete(&app_key("my-app")).await,
            Err(RegistryError::NotFound(_))
        ));
    }
}

#[tokio::test]
async fn names_must_match_the_path() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        assert!(
            matches!(
                r.create(&app_key("a"), resource(json!({"metadata": {"name": "b"}})))
                    .await,
                Err(RegistryError::Invalid(_))
            ),
            "{backend}"
        );
        r.create(&app_key("a"), resource(json!({"metadata": {"name": "a"}})))
            .await
            .unwrap();
        assert!(
            matches!(
                r.create(
                    &device_key("a", "d"),
                    resource(json!({"metadata": {"name": "d", "application": "z"}}))
                )
                .await,
                Err(RegistryError::Invalid(_))
            ),
            "{backend}"
        );
    }
}

#[tokio::test]
async fn optimistic_locking_and_generation() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        let created = r
            .create(
                &app_key("app"),
                resource(json!({"metadata": {"name": "app"}, "spec": {"a": 1}})),
            )
            .await
            .unwrap();

        // Same spec, new labels: generation unchanged, resource version changed.
        let mut same_spec = created.clone();
        same_spec.metadata.labels.insert("x".into(), "y".into());
        let updated = r.update(&app_key("app"), same_spec).await.unwrap();
        assert_eq!(updated.metadata.generation, 1, "{backend}");
        assert_ne!(
            updated.metadata.resource_version,
            created.metadata.resource_version
        );

        // A stale resource version is a conflict.
        let mut stale = created.clone();
        stale.spec.insert("a".into(), json!(2));
        assert!(
            matches!(
                r.update(&app_key("app"), stale).await,
                Err(RegistryError::Conflict)
            ),
            "{backend}"
        );

        // Spec change with the current version bumps the generation.
        let mut fresh = updated.clone();
        fresh.spec.insert("a".into(), json!(2));
        let bumped = r.update(&app_key("app"), fresh).await.unwrap();
        assert_eq!(bumped.metadata.generation, 2, "{backend}");

        // An empty resource version means no check; a wrong uid is a conflict.
        let mut unchecked = bumped.clone();
        unchecked.metadata.resource_version.clear();
        r.update(&app_key("app"), unchecked).await.unwrap();
        let mut wrong_uid = r.get(&app_key("app")).await.unwrap().unwrap();
        wrong_uid.metadata.uid = "not-it".into();
        assert!(
            matches!(
                r.update(&app_key("app"), wrong_uid).await,
                Err(RegistryError::Conflict)
            ),
            "{backend}"
        );
    }
}

#[tokio::test]
async fn passwords_are_stored_as_keyed_verifiers_only() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        r.create(&app_key("app"), resource(json!({"metadata": {"name": "app"}})))
            .await
            .unwrap();
        let device = r
            .create(&device_key("app", "d"), resource(json!({"metadata": {"name": "d"}, "spec": {"authentication": {"credentials": [{"pass": "hey-rodney"}]}}})))
            .await
            .unwrap();
        let stored = r.get(&device_key("app", "d")).await.unwrap().unwrap();
        assert_eq!(stored, device);
        let text = serde_json::to_string(&stored).unwrap();
        assert!(!text.contains("hey-rodney"), "{backend}: {text}");
        assert!(text.contains("\"keyed\""), "{backend}: {text}");
        let (app, name) = (AppName::parse("app").unwrap(), DeviceName::parse("d").unwrap());
        let credentials = DeviceCredentials::from_device(&app, &name, &stored.spec, &stored.status);
        let keys = SqlRegistryOptions::default().credential_keys;
        assert!(
            matches!(
                credentials.check_fast(&keys, "d", "hey-rodney"),
                FastCheck::Valid { .. }
            ),
            "{backend}"
        );
        // Another server secret verifies nothing: the database alone is not enough.
        let other = CredentialKeys::generate();
        assert_eq!(
            credentials.check_fast(&other, "d", "hey-rodney"),
            FastCheck::Invalid,
            "{backend}"
        );
        // An empty password is refused, and nothing is stored.
        let empty = r
            .create(&device_key("app", "e"), resource(json!({"metadata": {"name": "e"}, "spec": {"authentication": {"credentials": [{"pass": ""}]}}})))
            .await;
        assert!(
            matches!(empty, Err(RegistryError::Invalid(_))),
            "{backend}: {empty:?}"
        );
        assert!(
            r.get(&device_key("app", "e")).await.unwrap().is_none(),
            "{backend}"
        );
    }
}

#[tokio::test]
async fn unique_user_names_find_their_device_and_are_unique_per_application() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        let app = AppName::parse("app").unwrap();
        for a in ["app", "other"] {
            r.create(&app_key(a), resource(json!({"metadata": {"name": a}})))
                .await
                .unwrap();
        }
        let user = |name: &str, unique: bool| json!({"authentication": {"credentials": [{"user": {"username": name, "password": "pw", "unique": unique}}]}});
        r.create(
            &device_key("app", "d1"),
            resource(json!({"metadata": {"name": "d1"}, "spec": user("alice", true)})),
        )
        .await
        .unwrap();
        r.create(
            &device_key("app", "d2"),
            resource(json!({"metadata": {"name": "d2"}, "spec": user("bob", false)})),
        )
        .await
        .unwrap();
        let found = r.device_by_user(&app, "alice").await.unwrap();
        assert_eq!(found.as_ref().map(|d| d.as_str()), Some("d1"), "{backend}");
        assert_eq!(
            r.device_by_user(&app, "bob").await.unwrap(),
            None,
            "{backend}: not unique"
        );
        // Another application may use the name; the same application may not.
        r.create(
            &device_key("other", "d1"),
            resource(json!({"metadata": {"name": "d1"}, "spec": user("alice", true)})),
        )
        .await
        .unwrap();
        let taken = r
            .create(
                &device_key("app", "d3"),
                resource(json!({"metadata": {"name": "d3"}, "spec": user("alice", true)})),
            )
            .await;
        assert!(
            matches!(taken, Err(RegistryError::AlreadyExists(_))),
            "{backend}: {taken:?}"
        );
        // The refusal names the device that has the name, as an alias's does.
        assert!(
            matches!(&taken, Err(RegistryError::AlreadyExists(m)) if m.contains("'alice' (listed by device 'd1')")),
            "{backend}: {taken:?}"
        );
        assert!(
            r.get(&device_key("app", "d3")).await.unwrap().is_none(),
            "{backend}: nothing half-stored"
        );
        // Renaming the user moves the alias; deleting the device frees it.
        r.update(
            &device_key("app", "d1"),
            resource(json!({"metadata": {"name": "d1"}, "spec": user("carol", true)})),
        )
        .await
        .unwrap();
        assert_eq!(r.device_by_user(&app, "alice").await.unwrap(), None, "{backend}");
        assert!(
            r.device_by_user(&app, "carol").await.unwrap().is_some(),
            "{backend}"
        );
        r.delete(&device_key("app", "d1")).await.unwrap();
        assert_eq!(r.device_by_user(&app, "carol").await.unwrap(), None, "{backend}");
        r.create(
            &device_key("app", "d3"),
            resource(json!({"metadata": {"name": "d3"}, "spec": user("alice", true)})),
        )
        .await
        .unwrap();
        r.delete(&app_key("app")).await.unwrap();
        assert_eq!(r.device_by_user(&app, "alice").await.unwrap(), None, "{backend}");
    }
}

/// A device listing `aliases` in its `spec.alias`.
fn aliased(name: &str, aliases: Value) -> Resource {
    resource(json!({"metadata": {"name": name}, "spec": {"alias": aliases}}))
}

#[tokio::test]
async fn aliases_find_their_device_and_are_unique_per_application() {
    const DN: &str = "O=Drogue IoT, OU=Cloud, CN=Device 1";
    for (backend, b) in backends().await {
        let r = &b.registry;
        let (app, other) = (AppName::parse("app").unwrap(), AppName::parse("other").unwrap());
        for a in ["app", "other"] {
            r.create(&app_key(a), resource(json!({"metadata": {"name": a}})))
                .await
                .unwrap();
        }
        let found = |app: &AppName, alias: &str| {
            let (app, alias) = (app.clone(), alias.to_string());
            async move {
                r.device_by_alias(&app, &alias)
                    .await
                    .unwrap()
                    .map(|d| d.to_string())
            }
        };
        r.create(
            &device_key("app", "sensor-7"),
            aliased("sensor-7", json!([DN, "x"])),
        )
        .await
        .unwrap();
        assert_eq!(found(&app, DN).await.as_deref(), Some("sensor-7"), "{backend}");
        assert_eq!(found(&app, "x").await.as_deref(), Some("sensor-7"), "{backend}");
        assert_eq!(
            found(&app, "sensor-7").await,
            None,
            "{backend}: a name is no alias"
        );
        assert_eq!(found(&other, DN).await, None, "{backend}: per application");
        // Another application may list the alias; another device of the same one may not, and
        // nothing of that write is stored.
        r.create(&device_key("other", "d"), aliased("d", json!([DN])))
            .await
            .unwrap();
        assert_eq!(found(&other, DN).await.as_deref(), Some("d"), "{backend}");
        let taken = r
            .create(&device_key("app", "d2"), aliased("d2", json!(["y", DN])))
            .await;
        let Err(RegistryError::AlreadyExists(message)) = &taken else {
            panic!("{backend}: {taken:?}");
        };
        assert_eq!(
            message,
            &format!("alias '{DN}' (listed by device 'sensor-7') in application 'app'"),
            "{backend}"
        );
        assert!(
            r.get(&device_key("app", "d2")).await.unwrap().is_none(),
            "{backend}"
        );
        assert_eq!(found(&app, "y").await, None, "{backend}: nothing half-stored");
        r.create(&device_key("app", "d2"), aliased("d2", json!(["y"])))
            .await
            .unwrap();
        let taken = r
            .update(&device_key("app", "d2"), aliased("d2", json!(["y", "x"])))
            .await;
        assert!(
            matches!(taken, Err(RegistryError::AlreadyExists(_))),
            "{backend}: {taken:?}"
        );
        assert_eq!(
            found(&app, "y").await.as_deref(),
            Some("d2"),
            "{backend}: kept as it was"
        );
        // An update replaces the list: an alias dropped finds nothing, one added finds the device.
        r.update(
            &device_key("app", "sensor-7"),
            aliased("sensor-7", json!([DN, "z"])),
        )
        .await
        .unwrap();
        assert_eq!(found(&app, "x").await, None, "{backend}");
        assert_eq!(found(&app, "z").await.as_deref(), Some("sensor-7"), "{backend}");
        // Freed aliases can be taken by another device.
        r.update(&device_key("app", "d2"), aliased("d2", json!(["y", "x"])))
            .await
            .unwrap();
        assert_eq!(found(&app, "x").await.as_deref(), Some("d2"), "{backend}");
        // A spec without aliases leaves none behind.
        r.update(
            &device_key("app", "d2"),
            resource(json!({"metadata": {"name": "d2"}, "spec": {}})),
        )
        .await
        .unwrap();
        assert_eq!(found(&app, "x").await, None, "{backend}");
        // Deleting the device frees its aliases.
        r.delete(&device_key("app", "sensor-7")).await.unwrap();
        assert_eq!(found(&app, DN).await, None, "{backend}");
        assert_eq!(found(&app, "z").await, None, "{backend}");
        r.create(&device_key("app", "d3"), aliased("d3", json!([DN])))
            .await
            .unwrap();
        assert_eq!(found(&app, DN).await.as_deref(), Some("d3"), "{backend}");
        // Deleting the application deletes its devices' aliases, and no other application's.
        r.delete(&app_key("app")).await.unwrap();
        assert_eq!(found(&app, DN).await, None, "{backend}");
        assert_eq!(found(&other, DN).await.as_deref(), Some("d"), "{backend}");
        r.create(&app_key("app"), resource(json!({"metadata": {"name": "app"}})))
            .await
            .unwrap();
        r.create(&device_key("app", "again"), aliased("again", json!([DN])))
            .await
            .unwrap();
        assert_eq!(found(&app, DN).await.as_deref(), Some("again"), "{backend}");
    }
}

#[tokio::test]
async fn malformed_alias_lists_are_refused_before_anything_is_stored() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        let app = AppName::parse("app").unwrap();
        r.create(&app_key("app"), resource(json!({"metadata": {"name": "app"}})))
            .await
            .unwrap();
        let too_many: Vec<String> = (0..65).map(|i| format!("a{i}")).collect();
        let cases = [
            (json!("O=Drogue IoT"), "spec.alias: must be a list of strings"),
            (json!(["ok", 7]), "spec.alias: entry 1 is not a string"),
            (json!(["ok", ""]), "spec.alias: entry 1 is empty"),
            (
                json!(["x".repeat(1025)]),
                "spec.alias: entry 0 is 1025 bytes long, at most 1024 are allowed",
            ),
            (
                json!(too_many),
                "spec.alias: 65 aliases listed, at most 64 are allowed",
            ),
        ];
        for (aliases, expected) in &cases {
            let created = r
                .create(&device_key("app", "d"), aliased("d", aliases.clone()))
                .await;
            let Err(RegistryError::Invalid(message)) = &created else {
                panic!("{backend}: {aliases}: {created:?}");
            };
            assert_eq!(message, expected, "{backend}");
            assert!(
                r.get(&device_key("app", "d")).await.unwrap().is_none(),
                "{backend}"
            );
            assert_eq!(r.device_by_alias(&app, "ok").await.unwrap(), None, "{backend}");
        }
        r.create(&device_key("app", "d"), aliased("d", json!(["ok"])))
            .await
            .unwrap();
        for (aliases, expected) in &cases {
            let updated = r
                .update(&device_key("app", "d"), aliased("d", aliases.clone()))
                .await;
            let Err(RegistryError::Invalid(message)) = &updated else {
                panic!("{backend}: {aliases}: {updated:?}");
            };
            assert_eq!(message, expected, "{backend}");
        }
        let stored = r.get(&device_key("app", "d")).await.unwrap().unwrap();
        assert_eq!(stored.spec["alias"], json!(["ok"]), "{backend}");
        assert_eq!(
            r.device_by_alias(&app, "ok")
                .await
                .unwrap()
                .map(|d| d.to_string()),
            Some("d".to_string()),
            "{backend}"
        );
    }
}

#[tokio::test]
async fn concurrent_status_writes_all_land_and_keep_the_spec() {
    for (backend, b) in backends().await {
        let r = Arc::new(b.registry.clone());
        r.create(&app_key("app"), resource(json!({"metadata": {"name": "app"}})))
            .await
            .unwrap();
        r.create(
            &device_key("app", "d"),
            resource(json!({"metadata": {"name": "d"}, "spec": {"keep": true}})),
        )
        .await
        .unwrap();
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let r = r.clone();
                tokio::spawn(async move {
                    r.set_status_section(&device_key("app", "d"), &format!("s{i}"), json!(i))
                        .await
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        let device = r.get(&device_key("app", "d")).await.unwrap().unwrap();
        for i in 0..8 {
            assert_eq!(
                device.status.get(&format!("s{i}")),
                Some(&json!(i)),
                "{backend}: status s{i}"
            );
        }
        assert_eq!(device.spec.get("keep"), Some(&json!(true)));
        assert_eq!(
            device.metadata.generation, 1,
            "{backend}: status writes keep the generation"
        );
        assert!(matches!(
            r.set_status_section(&device_key("app", "gone"), "firmware", json!({}))
                .await,
            Err(RegistryError::NotFound(_))
        ));
    }
}

/// The database holds device credentials: its files are the owner's alone, however the process's
/// umask is set, and an existing file made readable by others is closed again.
#[cfg(unix)]
#[tokio::test]
async fn the_sqlite_database_files_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let registry = SqlRegistry::connect(
        &SqlRegistry::sqlite_url(dir.path()),
        SqlRegistryOptions::default(),
    )
    .await
    .unwrap();
    registry
        .create(&app_key("app"), resource(json!({"metadata": {"name": "app"}})))
        .await
        .unwrap();
    let mut files = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    // The database and, in WAL mode, its -wal and -shm files.
    assert!(files >= 2, "{files} files");
    drop(registry);

    let database = dir.path().join("ajour.db");
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o644)).unwrap();
    SqlRegistry::connect(
        &SqlRegistry::sqlite_url(dir.path()),
        SqlRegistryOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(mode(&database), 0o600);
}

fn updating(percent: f64) -> ajour_types::FirmwareStatus {
    ajour_types::FirmwareStatus {
        current: "1.0.0".into(),
        target: "2.0.0".into(),
        target_digest: Some("d1".into()),
        state: ajour_types::FirmwareState::Updating { percent },
    }
}

/// Write `status` over what is stored, telling the history what changed, as the update service
/// does.
async fn write(r: &SqlRegistry, key: &Key, status: &ajour_types::FirmwareStatus) -> bool {
    let value = ajour_types::FirmwareReport::observe(None, status.clone(), chrono::Utc::now()).to_json();
    let merge = |stored: Option<&Value>| {
        let stored = stored.and_then(|s| ajour_types::FirmwareReport::from_json(s).ok());
        let events = ajour_types::events_between(stored.as_ref().map(|s| &s.status), status);
        Some((value.clone(), events))
    };
    r.merge_status_recording(key, "firmware", &merge).await.unwrap()
}

fn told(history: &[ajour_types::RecordedEvent]) -> Vec<(&'static str, Option<f64>)> {
    history
        .iter()
        .rev()
        .map(|e| (e.event.kind.as_str(), e.event.percent))
        .collect()
}

#[tokio::test]
async fn a_device_history_tells_each_change_once_and_is_bounded() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        r.create(&app_key("app"), resource(json!({"metadata": {"name": "app"}})))
            .await
            .unwrap();
        let key = device_key("app", "d");
        r.create(&key, resource(json!({"metadata": {"name": "d"}})))
            .await
            .unwrap();
        assert_eq!(r.history(&key, 10).await.unwrap(), Some(vec![]), "{backend}");

        for percent in [0.5, 30.0, 55.0] {
            assert!(write(r, &key, &updating(percent)).await);
        }
        // A late write of another instance moves the shown progress back; passing 50% again
        // is not told twice.
        write(r, &key, &updating(35.0)).await;
        write(r, &key, &updating(60.0)).await;
        write(r, &key, &updating(100.0)).await;
        let synced = ajour_types::FirmwareStatus {
            current: "2.0.0".into(),
            state: ajour_types::FirmwareState::InSync,
            ..updating(100.0)
        };
        write(r, &key, &synced).await;
        write(r, &key, &synced).await;
        let history = r.history(&key, 100).await.unwrap().unwrap();
        assert_eq!(
            told(&history),
            [
                ("started", None),
                ("progress", Some(25.0)),
                ("progress", Some(50.0)),
                ("progress", Some(75.0)),
                ("swapping", None),
                ("inSync", None),
            ],
            "{backend}"
        );
        assert!(history.windows(2).all(|w| w[0].time >= w[1].time), "newest first");
        assert_eq!(r.history(&key, 2).await.unwrap().unwrap().len(), 2);

        // Deleted with its device; none for a device that is not there.
        r.delete(&key).await.unwrap();
        assert!(matches!(
            r.history(&key, 10).await,
            Err(RegistryError::NotFound(_))
        ));
        r.create(&key, resource(json!({"metadata": {"name": "d"}})))
            .await
            .unwrap();
        assert_eq!(r.history(&key, 10).await.unwrap(), Some(vec![]), "{backend}");
    }
}

#[tokio::test]
async fn history_keeps_the_newest_entries_within_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::create().await;
    let options = SqlRegistryOptions {
        history: HistoryRetention {
            max_events: 3,
            max_age: std::time::Duration::from_secs(3600),
        },
        ..SqlRegistryOptions::default()
    };
    for url in [SqlRegistry::sqlite_url(dir.path()), db.url().to_string()] {
        let r = SqlRegistry::connect(&url, options.clone()).await.unwrap();
        r.create(&app_key("app"), resource(json!({"metadata": {"name": "app"}})))
            .await
            .unwrap();
        let key = device_key("app", "d");
        r.create(&key, resource(json!({"metadata": {"name": "d"}})))
            .await
            .unwrap();
        for percent in [1.0, 100.0] {
            write(&r, &key, &updating(percent)).await;
        }
        let history = r.history(&key, 100).await.unwrap().unwrap();
        assert_eq!(
            told(&history),
            [
                ("progress", Some(50.0)),
                ("progress", Some(75.0)),
                ("swapping", None)
            ],
            "{url}"
        );
    }
}

/// Two registries on one database (two instances): devices started at the same moment through
/// both never pass the rollout's concurrency limit; each step of a rollout is taken once; devices
/// silent past a timeout fail, told in their history; a deleted device leaves its rollout.
#[tokio::test]
async fn rollouts_hold_their_limit_and_take_each_step_once_across_instances() {
    use ajour_types::rollout::{Member, Phase, RolloutSpec, RolloutState};
    for (backend, b) in backends().await {
        let url = match &b._postgres {
            Some(db) => db.url().to_string(),
            None => SqlRegistry::sqlite_url(b._sqlite_dir.as_ref().unwrap().path()),
        };
        let other = Arc::new(
            SqlRegistry::connect(&url, SqlRegistryOptions::default())
                .await
                .unwrap(),
        );
        let one = &b.registry;
        let app = AppName::parse("fleet").unwrap();
        one.create(
            &app_key("fleet"),
            resource(json!({"metadata": {"name": "fleet"}})),
        )
        .await
        .unwrap();
        let names: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
        for name in &names {
            one.create(
                &device_key("fleet", name),
                resource(json!({"metadata": {"name": name, "application": "fleet"}})),
            )
            .await
            .unwrap();
        }
        let spec: RolloutSpec = serde_json::from_value(json!({
            "firmware": {"file": {"name": "v2"}},
            "waves": [{"percent": 100}],
            "concurrency": 3
        }))
        .unwrap();
        let now = 1_000_000;
        let new = |members| NewRollout {
            app: &app,
            spec: &spec,
            previous: None,
            members,
            now,
        };
        let rollout = one
            .create_rollout(new(names.iter().map(|n| Member::pending(n, 0)).collect()))
            .await
            .unwrap();
        let again = one.create_rollout(new(Vec::new())).await.unwrap_err();
        assert!(
            matches!(again, RegistryError::AlreadyExists(_)),
            "{backend}: {again}"
        );

        // Twelve starts at once, through two more instances: three admitted.
        let third = Arc::new(
            SqlRegistry::connect(&url, SqlRegistryOptions::default())
                .await
                .unwrap(),
        );
        let mut starts = tokio::task::JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let store = if i % 2 == 0 { other.clone() } else { third.clone() };
            let (id, name) = (rollout.id, name.clone());
            starts.spawn(async move { store.start(id, &name, "2.0.0", Some(3), now).await.unwrap() });
        }
        let admissions = starts.join_all().await;
        let started = admissions.iter().filter(|a| **a == Admission::Started).count();
        assert_eq!(started, 3, "{backend}: {admissions:?}");
        assert!(admissions
            .iter()
            .all(|a| matches!(a, Admission::Started | Admission::Full)));
        let members = one.members(rollout.id).await.unwrap();
        let updating: Vec<&Member> = members.iter().filter(|m| m.phase == Phase::Updating).collect();
        let pending = members
            .iter()
            .find(|m| m.phase == Phase::Pending)
            .unwrap()
            .device
            .clone();
        assert_eq!(updating.len(), 3, "{backend}");
        // Starting one of them again (a stale copy thought it pending) lets it go on.
        let again = other
            .start(rollout.id, &updating[0].device, "2.0.0", Some(3), now)
            .await
            .unwrap();
        assert_eq!(again, Admission::Started, "{backend}");

        // One step, tried by both instances at once: taken once.
        let expected = rollout.progress.clone();
        let mut next = expected.clone();
        next.state = RolloutState::Paused;
        next.reason = Some("test".into());
        let (a, b2) = tokio::join!(
            one.advance(rollout.id, &expected, &next, now),
            other.advance(rollout.id, &expected, &next, now)
        );
        assert!(a.unwrap() ^ b2.unwrap(), "{backend}: exactly one wins");
        let paused = one.rollout(&app, rollout.id).await.unwrap().unwrap();
        assert_eq!(paused.progress, next, "{backend}");
        // Paused: nobody starts.
        let refused = one.start(rollout.id, &pending, "2.0.0", None, now).await.unwrap();
        assert_eq!(refused, Admission::Refused, "{backend}");
        // Resumed: the timeouts count from the resume, then expire the silent.
        let mut resumed = next.clone();
        resumed.state = RolloutState::Active;
        resumed.reason = None;
        assert!(one
            .advance(rollout.id, &next, &resumed, now + 60_000)
            .await
            .unwrap());
        let swap = std::time::Duration::from_secs(10);
        let stall = std::time::Duration::from_secs(30);
        assert_eq!(
            one.expire(rollout.id, swap, stall, now + 60_000 + 29_000)
                .await
                .unwrap(),
            0,
            "{backend}"
        );
        assert_eq!(
            one.expire(rollout.id, swap, stall, now + 60_000 + 31_000)
                .await
                .unwrap(),
            3,
            "{backend}"
        );
        let failed = &one.members(rollout.id).await.unwrap();
        let failed: Vec<&Member> = failed.iter().filter(|m| m.phase == Phase::Failed).collect();
        assert_eq!(failed.len(), 3);
        assert_eq!(failed[0].reason.as_deref(), Some("no progress for 30 s"));
        let key = device_key("fleet", &failed[0].device);
        let history = one.history(&key, 10).await.unwrap().unwrap();
        assert_eq!(history[0].event.kind, ajour_types::EventKind::Failed, "{backend}");
        assert_eq!(history[0].event.rollout, Some(rollout.id));
        // Without a limit: a pending device starts (asked twice, once), a failed one does not.
        for _ in 0..2 {
            let unlimited = other
                .start(rollout.id, &pending, "2.0.0", None, now)
                .await
                .unwrap();
            assert_eq!(unlimited, Admission::Started, "{backend}");
        }
        let failed_again = other
            .start(rollout.id, &failed[0].device, "2.0.0", None, now)
            .await
            .unwrap();
        assert_eq!(failed_again, Admission::Refused, "{backend}");

        one.delete(&key).await.unwrap();
        let left = one.members(rollout.id).await.unwrap();
        assert_eq!(left.len(), 11, "{backend}: the deleted device left the rollout");
    }
}

fn token(prefix: &str, user: &str) -> StoredToken {
    StoredToken {
        prefix: prefix.into(),
        user: user.into(),
        hash: format!("hash-of-{prefix}"),
        description: Some(format!("{user}'s")),
        created: format!("2026-12-07T00:00:0{}Z", prefix.len() % 10),
    }
}

#[tokio::test]
async fn access_tokens_owners_members_and_transfers() {
    use ajour_types::access::Role;
    use std::collections::BTreeMap;
    for (name, backend) in backends().await {
        let r = &backend.registry;
        // Tokens: found by prefix, listed per user, deleted only by their user.
        r.add_token(&token("aaaa1111", "alice")).await.unwrap();
        r.add_token(&token("bbbb2222", "bob")).await.unwrap();
        assert!(
            matches!(
                r.add_token(&token("aaaa1111", "bob")).await,
                Err(RegistryError::AlreadyExists(_))
            ),
            "{name}"
        );
        assert_eq!(
            r.token("aaaa1111").await.unwrap(),
            Some(token("aaaa1111", "alice")),
            "{name}"
        );
        assert_eq!(
            r.tokens("alice").await.unwrap(),
            vec![token("aaaa1111", "alice")],
            "{name}"
        );
        assert!(!r.delete_token("bob", "aaaa1111").await.unwrap(), "{name}");
        assert!(r.delete_token("alice", "aaaa1111").await.unwrap(), "{name}");
        assert_eq!(r.token("aaaa1111").await.unwrap(), None, "{name}");

        // Owners and members.
        let app = AppName::parse("fleet").unwrap();
        assert_eq!(r.app_access(&app).await.unwrap(), None, "{name}");
        r.claim_app(&app, Some("alice")).await.unwrap();
        let access = r.app_access(&app).await.unwrap().unwrap();
        assert_eq!(access.owner.as_deref(), Some("alice"), "{name}");
        let members = BTreeMap::from([
            ("bob".to_string(), Role::Reader),
            ("carol".to_string(), Role::Manager),
        ]);
        r.set_members(&app, &members, Some(&access.revision))
            .await
            .unwrap();
        // A stale revision is a conflict and changes nothing.
        assert!(
            matches!(
                r.set_members(&app, &BTreeMap::new(), Some(&access.revision))
                    .await,
                Err(RegistryError::Conflict)
            ),
            "{name}"
        );
        let access = r.app_access(&app).await.unwrap().unwrap();
        assert_eq!(access.members, members, "{name}");
        assert_eq!(
            r.apps_of("bob").await.unwrap().into_iter().collect::<Vec<_>>(),
            vec!["fleet".to_string()],
            "{name}"
        );
        assert!(r.apps_of("mallory").await.unwrap().is_empty(), "{name}");

        // A transfer is accepted only by the user it was offered to.
        r.offer_app(&app, Some("bob")).await.unwrap();
        assert!(!r.accept_app(&app, "carol").await.unwrap(), "{name}");
        assert!(r.accept_app(&app, "bob").await.unwrap(), "{name}");
        let access = r.app_access(&app).await.unwrap().unwrap();
        assert_eq!(access.owner.as_deref(), Some("bob"), "{name}");
        assert_eq!(access.transfer_to, None, "{name}");
        assert_eq!(access.role_of("bob"), Some(Role::Admin), "{name}");
        assert!(!access.members.contains_key("bob"), "{name}");

        // An application created again under the same name starts with no members.
        r.claim_app(&app, Some("dave")).await.unwrap();
        let access = r.app_access(&app).await.unwrap().unwrap();
        assert!(access.members.is_empty(), "{name}");
        r.forget_app(&app).await.unwrap();
        assert_eq!(r.app_access(&app).await.unwrap(), None, "{name}");
        assert!(r.apps_of("dave").await.unwrap().is_empty(), "{name}");

        // An application without a row (made with the bootstrap token) gets one, ownerless.
        let other = AppName::parse("ownerless").unwrap();
        r.set_members(&other, &members, None).await.unwrap();
        assert_eq!(r.app_access(&other).await.unwrap().unwrap().owner, None, "{name}");
    }
}
