//! Build history ([`BuildStore`] of the SQL registry), run against both backends: SQLite in a temp
//! dir and a PostgreSQL database of the test's own.

use ajour_registry::*;
use ajour_testkit::TestDatabase;
use ajour_types::build::{BuildLog, BuildOutcome, BuildState, BuildTarget, LOG_LIMIT};
use serde_json::{json, Value};
use std::sync::Arc;

struct Backend {
    registry: SqlRegistry,
    /// Where a second instance on the same database connects.
    url: String,
    _sqlite_dir: Option<tempfile::TempDir>,
    _postgres: Option<TestDatabase>,
}

async fn backends() -> Vec<(&'static str, Backend)> {
    let options = SqlRegistryOptions::default();
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = SqlRegistry::sqlite_url(dir.path());
    let sqlite = SqlRegistry::connect(&sqlite_url, options.clone()).await.unwrap();
    let db = TestDatabase::create().await;
    let postgres = SqlRegistry::connect(db.url(), options).await.unwrap();
    vec![
        (
            "sqlite",
            Backend {
                registry: sqlite,
                url: sqlite_url,
                _sqlite_dir: Some(dir),
                _postgres: None,
            },
        ),
        (
            "postgres",
            Backend {
                registry: postgres,
                url: db.url().to_string(),
                _sqlite_dir: None,
                _postgres: Some(db),
            },
        ),
    ]
}

fn target(app: &str, device: Option<&str>) -> BuildTarget {
    BuildTarget {
        app: AppName::parse(app).unwrap(),
        device: device.map(|d| DeviceName::parse(d).unwrap()),
    }
}

fn spec(rev: &str) -> Value {
    json!({"container": {"image": "reg/fw:latest", "build": {"source": {"git": {"uri": "https://example.com/fw.git", "rev": rev}}}}})
}

async fn create(
    r: &SqlRegistry,
    target: &BuildTarget,
    now: i64,
) -> Result<ajour_types::build::Build, RegistryError> {
    let spec = spec("main");
    r.create_build(NewBuild {
        target,
        runner: "local",
        spec: &spec,
        now,
    })
    .await
}

fn failed(message: &str) -> BuildOutcome {
    BuildOutcome::Failed {
        message: message.into(),
    }
}

fn ids(builds: &[ajour_types::build::Build]) -> Vec<i64> {
    builds.iter().map(|b| b.id).collect()
}

async fn list(r: &SqlRegistry, filter: BuildFilter<'_>) -> Vec<i64> {
    ids(&r.builds(filter).await.unwrap())
}

/// What [`BuildStore::create_build`] refused with, or a panic when it did not.
fn already_exists(result: Result<ajour_types::build::Build, RegistryError>) -> String {
    match result {
        Err(RegistryError::AlreadyExists(why)) => why,
        Err(other) => panic!("refused, but not as AlreadyExists: {other}"),
        Ok(build) => panic!("a second open build was recorded: {build:?}"),
    }
}

#[tokio::test]
async fn builds_are_recorded_read_and_listed_newest_first() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        let spec = spec("v1");
        let app = target("my-app", None);
        let first = r
            .create_build(NewBuild {
                target: &app,
                runner: "tekton",
                spec: &spec,
                now: 1_000,
            })
            .await
            .unwrap();
        assert_eq!(first.state, BuildState::Queued, "{backend}");
        assert_eq!(first.app, "my-app");
        assert_eq!(first.device, None);
        assert_eq!(first.runner, "tekton");
        assert_eq!(first.spec, spec);
        assert_eq!(first.created_at, 1_000);
        assert_eq!(r.build(first.id).await.unwrap(), Some(first.clone()), "{backend}");
        assert_eq!(r.build(first.id + 100).await.unwrap(), None, "{backend}");
        assert_eq!(
            r.build_log(first.id).await.unwrap(),
            Some(BuildLog {
                start: 0,
                text: String::new()
            }),
            "{backend}"
        );

        r.start_build(first.id, Some("app-my-app-x1"), 2_000)
            .await
            .unwrap();
        let running = r.build(first.id).await.unwrap().unwrap();
        assert_eq!(running.state, BuildState::Running, "{backend}");
        assert_eq!(running.started_at, Some(2_000));
        assert_eq!(running.reference.as_deref(), Some("app-my-app-x1"));
        let outcome = BuildOutcome::Succeeded {
            image: "reg/fw:latest".into(),
            digest: Some("sha256:abc".into()),
            version: "1.0.0".into(),
        };
        r.finish_build(first.id, &outcome, 3_000).await.unwrap();
        let done = r.build(first.id).await.unwrap().unwrap();
        assert_eq!(done.state, BuildState::Succeeded, "{backend}");
        assert_eq!(done.completed_at, Some(3_000));
        assert_eq!(done.image.as_deref(), Some("reg/fw:latest"));
        assert_eq!(done.digest.as_deref(), Some("sha256:abc"));
        assert_eq!(done.version.as_deref(), Some("1.0.0"));
        assert_eq!(done.message, None);
        assert_eq!(done.started_at, Some(2_000));

        let d1 = create(r, &target("my-app", Some("d1")), 4_000).await.unwrap();
        let d2 = create(r, &target("my-app", Some("d2")), 5_000).await.unwrap();
        let other = create(r, &target("other", None), 6_000).await.unwrap();
        let again = create(r, &app, 7_000).await.unwrap();
        assert_eq!(d1.device.as_deref(), Some("d1"));
        assert_eq!(
            r.build(d1.id).await.unwrap().unwrap().device.as_deref(),
            Some("d1"),
            "{backend}"
        );
        // Ids grow: newest first is highest first.
        let all = [first.id, d1.id, d2.id, other.id, again.id];
        assert!(all.windows(2).all(|w| w[0] < w[1]), "{backend}: {all:?}");

        assert_eq!(
            list(r, BuildFilter::default()).await,
            [again.id, other.id, d2.id, d1.id, first.id],
            "{backend}"
        );
        let of_app = BuildFilter {
            app: Some("my-app"),
            ..Default::default()
        };
        assert_eq!(
            list(r, of_app.clone()).await,
            [again.id, d2.id, d1.id, first.id],
            "{backend}"
        );
        assert_eq!(
            list(
                r,
                BuildFilter {
                    device: Some(None),
                    ..of_app.clone()
                }
            )
            .await,
            [again.id, first.id],
            "{backend}: the application's own"
        );
        assert_eq!(
            list(
                r,
                BuildFilter {
                    device: Some(Some("d2")),
                    ..of_app.clone()
                }
            )
            .await,
            [d2.id],
            "{backend}"
        );
        assert_eq!(
            list(
                r,
                BuildFilter {
                    limit: 2,
                    ..of_app.clone()
                }
            )
            .await,
            [again.id, d2.id],
            "{backend}"
        );
        assert!(
            list(
                r,
                BuildFilter {
                    app: Some("nobody"),
                    ..Default::default()
                }
            )
            .await
            .is_empty(),
            "{backend}"
        );
        // The rows read back are the builds as recorded.
        let listed = r.builds(of_app).await.unwrap();
        assert_eq!(listed[3], done, "{backend}");
        assert_eq!(listed[1], d2, "{backend}");
    }
}

#[tokio::test]
async fn listing_gives_a_hundred_by_default_and_a_thousand_at_most() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        for i in 0..1_002 {
            let device = format!("d{i}");
            create(r, &target("app", Some(&device)), i).await.unwrap();
        }
        let newest = list(r, BuildFilter::default()).await;
        assert_eq!(newest.len(), 100, "{backend}");
        assert_eq!(newest[0], 1_002, "{backend}");
        let capped = list(
            r,
            BuildFilter {
                limit: 5_000,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(capped.len(), 1_000, "{backend}");
        assert_eq!(*capped.last().unwrap(), 3, "{backend}");
    }
}

#[tokio::test]
async fn a_target_has_at_most_one_open_build() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        let app = target("my-app", None);
        let queued = create(r, &app, 1_000).await.unwrap();
        assert_eq!(
            already_exists(create(r, &app, 1_001).await),
            format!("build {} of application my-app is queued", queued.id),
            "{backend}"
        );
        // Other targets: a device of the application, another device, another application.
        let d1 = create(r, &target("my-app", Some("d1")), 1_002).await.unwrap();
        create(r, &target("my-app", Some("d2")), 1_003).await.unwrap();
        create(r, &target("other", None), 1_004).await.unwrap();
        create(r, &target("other", Some("d1")), 1_005).await.unwrap();
        r.start_build(d1.id, None, 1_010).await.unwrap();
        assert_eq!(
            already_exists(create(r, &target("my-app", Some("d1")), 1_011).await),
            format!("build {} of device d1@my-app is running", d1.id),
            "{backend}"
        );
        r.start_build(queued.id, None, 1_012).await.unwrap();
        assert_eq!(
            already_exists(create(r, &app, 1_013).await),
            format!("build {} of application my-app is running", queued.id),
            "{backend}"
        );
        // Refusals recorded nothing.
        assert_eq!(
            r.builds(BuildFilter::default()).await.unwrap().len(),
            5,
            "{backend}"
        );

        // Once it is closed, the target can build again.
        r.finish_build(queued.id, &failed("make: *** [all] Error 2"), 2_000)
            .await
            .unwrap();
        let next = create(r, &app, 2_001).await.unwrap();
        assert!(next.id > queued.id, "{backend}");
        assert_eq!(
            already_exists(create(r, &app, 2_002).await),
            format!("build {} of application my-app is queued", next.id),
            "{backend}"
        );
        r.finish_build(
            next.id,
            &BuildOutcome::Succeeded {
                image: "i".into(),
                digest: None,
                version: "v".into(),
            },
            2_003,
        )
        .await
        .unwrap();
        create(r, &app, 2_004).await.unwrap();
    }
}

#[tokio::test]
async fn a_closed_build_stays_as_it_ended() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        let build = create(r, &target("app", None), 1_000).await.unwrap();
        r.start_build(build.id, Some("run-1"), 1_100).await.unwrap();
        r.finish_build(build.id, &failed("the first ending"), 1_200)
            .await
            .unwrap();
        let ended = r.build(build.id).await.unwrap().unwrap();
        assert_eq!(ended.state, BuildState::Failed, "{backend}");
        assert_eq!(ended.message.as_deref(), Some("the first ending"));
        assert_eq!(ended.completed_at, Some(1_200));

        // Finishing again, starting again, renewing, or a sweep: nothing changes.
        r.finish_build(
            build.id,
            &BuildOutcome::Succeeded {
                image: "reg/fw:latest".into(),
                digest: Some("sha256:abc".into()),
                version: "2".into(),
            },
            1_300,
        )
        .await
        .unwrap();
        r.finish_build(build.id, &failed("the second ending"), 1_400)
            .await
            .unwrap();
        r.start_build(build.id, Some("run-2"), 1_500).await.unwrap();
        r.renew_builds(&[build.id], 1_600).await.unwrap();
        assert!(r
            .close_stale_builds(i64::MAX, "stale", 1_700)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(r.build(build.id).await.unwrap(), Some(ended), "{backend}");
        assert_eq!(r.build_log(build.id).await.unwrap().unwrap().text, "");

        // A build that does not exist is not found.
        let missing = build.id + 1;
        assert!(
            matches!(
                r.finish_build(missing, &failed("x"), 1).await,
                Err(RegistryError::NotFound(_))
            ),
            "{backend}"
        );
        assert!(matches!(
            r.start_build(missing, None, 1).await,
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            r.append_build_log(missing, "x").await,
            Err(RegistryError::NotFound(_))
        ));
        assert_eq!(r.build_log(missing).await.unwrap(), None);
    }
}

/// Eight triggers at once for one target, from two instances on the database: one build.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_triggers_record_one_build() {
    for (backend, b) in backends().await {
        let instances = [
            Arc::new(b.registry.clone()),
            Arc::new(
                SqlRegistry::connect(&b.url, SqlRegistryOptions::default())
                    .await
                    .unwrap(),
            ),
        ];
        // Another target's build first, so the ids are not all free.
        create(&instances[0], &target("other", None), 1).await.unwrap();
        for round in 0..3 {
            let start = Arc::new(tokio::sync::Barrier::new(8));
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let r = instances[i % 2].clone();
                    let start = start.clone();
                    tokio::spawn(async move {
                        start.wait().await;
                        create(&r, &target("app", Some("dev")), 10 + i as i64).await
                    })
                })
                .collect();
            let mut created = Vec::new();
            let mut refused = Vec::new();
            for task in tasks {
                match task.await.unwrap() {
                    Ok(build) => created.push(build),
                    Err(RegistryError::AlreadyExists(why)) => refused.push(why),
                    Err(other) => panic!("{backend}: {other}"),
                }
            }
            assert_eq!(created.len(), 1, "{backend} round {round}: {created:?}");
            let id = created[0].id;
            assert_eq!(refused.len(), 7, "{backend}");
            for why in &refused {
                assert_eq!(
                    why,
                    &format!("build {id} of device dev@app is queued"),
                    "{backend}"
                );
            }
            let open = r_open(&instances[1]).await;
            assert_eq!(open, [id], "{backend}");
            instances[0].finish_build(id, &failed("done"), 100).await.unwrap();
        }
    }
}

/// The ids of the open builds of `dev@app`.
async fn r_open(r: &SqlRegistry) -> Vec<i64> {
    r.builds(BuildFilter {
        app: Some("app"),
        device: Some(Some("dev")),
        limit: 0,
    })
    .await
    .unwrap()
    .iter()
    .filter(|b| b.state.is_open())
    .map(|b| b.id)
    .collect()
}

#[tokio::test]
async fn the_log_keeps_its_tail() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        let build = create(r, &target("app", None), 1).await.unwrap();
        let other = create(r, &target("app", Some("d")), 1).await.unwrap();
        r.append_build_log(build.id, "Cloning into 'fw'...\n")
            .await
            .unwrap();
        r.append_build_log(build.id, "Compiling fw v0.1.0\n")
            .await
            .unwrap();
        r.append_build_log(build.id, "").await.unwrap();
        assert_eq!(
            r.build_log(build.id).await.unwrap(),
            Some(BuildLog {
                start: 0,
                text: "Cloning into 'fw'...\nCompiling fw v0.1.0\n".into()
            }),
            "{backend}"
        );

        // 100 KiB more, in lines of 1 KiB: the newest 64 KiB are kept.
        let mut written = "Cloning into 'fw'...\nCompiling fw v0.1.0\n".to_string();
        for i in 0..100 {
            let line = format!("{i:05} {}\n", "x".repeat(1024 - 7));
            r.append_build_log(build.id, &line).await.unwrap();
            written.push_str(&line);
        }
        let log = r.build_log(build.id).await.unwrap().unwrap();
        assert_eq!(log.text.len(), LOG_LIMIT, "{backend}");
        assert_eq!(log.start as usize, written.len() - LOG_LIMIT, "{backend}");
        assert!(log.start > 32 * 1024, "{backend}: {}", log.start);
        assert_eq!(log.text, written[written.len() - LOG_LIMIT..], "{backend}");
        assert!(log.text.ends_with(&format!("00099 {}\n", "x".repeat(1017))));

        // Multi-byte characters are cut on a boundary, and `start` keeps growing.
        let wide = "é".repeat(40 * 1024);
        r.append_build_log(build.id, &wide).await.unwrap();
        written.push_str(&wide);
        let log = r.build_log(build.id).await.unwrap().unwrap();
        assert!(log.text.len() <= LOG_LIMIT && log.text.len() >= LOG_LIMIT - 1);
        assert_eq!(log.start as usize + log.text.len(), written.len(), "{backend}");
        assert!(log.start as usize > LOG_LIMIT, "{backend}: {}", log.start);
        assert!(written.ends_with(&log.text));
        // The other build's log is its own.
        assert_eq!(
            r.build_log(other.id).await.unwrap().unwrap().text,
            "",
            "{backend}"
        );
    }
}

/// Concurrent appends to one build all land, in some order, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_all_land() {
    for (backend, b) in backends().await {
        let r = Arc::new(b.registry.clone());
        let build = create(&r, &target("app", None), 1).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let r = r.clone();
                tokio::spawn(async move {
                    for j in 0..5 {
                        r.append_build_log(build.id, &format!("{i}.{j}\n")).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let log = r.build_log(build.id).await.unwrap().unwrap();
        let mut lines: Vec<&str> = log.text.lines().collect();
        lines.sort();
        let mut expected: Vec<String> = (0..8)
            .flat_map(|i| (0..5).map(move |j| format!("{i}.{j}")))
            .collect();
        expected.sort();
        assert_eq!(lines, expected, "{backend}");
    }
}

#[tokio::test]
async fn stale_open_builds_are_closed_with_the_reason_in_their_log() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        // Queued at 1 000 and never started: stale from its creation.
        let queued = create(r, &target("app", Some("q")), 1_000).await.unwrap();
        // Started at 1 500, its lease last renewed at 2 000.
        let lapsed = create(r, &target("app", Some("l")), 1_000).await.unwrap();
        r.start_build(lapsed.id, None, 1_500).await.unwrap();
        r.append_build_log(lapsed.id, "step 1 of 3").await.unwrap();
        r.renew_builds(&[lapsed.id], 2_000).await.unwrap();
        // Started long ago but renewed recently.
        let renewed = create(r, &target("app", Some("r")), 1_000).await.unwrap();
        r.start_build(renewed.id, None, 1_100).await.unwrap();
        r.renew_builds(&[renewed.id, lapsed.id + 1_000], 5_000)
            .await
            .unwrap();
        // Queued recently.
        let fresh = create(r, &target("app", Some("f")), 4_500).await.unwrap();
        // Ended long ago.
        let ended = create(r, &target("app", None), 1_000).await.unwrap();
        r.finish_build(ended.id, &failed("broken"), 1_200).await.unwrap();

        let message = "the build's runner stopped renewing it (a restart?)";
        let mut closed = r.close_stale_builds(3_000, message, 6_000).await.unwrap();
        closed.sort();
        assert_eq!(closed, [queued.id, lapsed.id], "{backend}");
        for id in [queued.id, lapsed.id] {
            let build = r.build(id).await.unwrap().unwrap();
            assert_eq!(build.state, BuildState::Failed, "{backend}");
            assert_eq!(build.completed_at, Some(6_000));
            assert_eq!(build.message.as_deref(), Some(message));
        }
        assert_eq!(
            r.build_log(queued.id).await.unwrap().unwrap().text,
            format!("{message}\n"),
            "{backend}"
        );
        assert_eq!(
            r.build_log(lapsed.id).await.unwrap().unwrap().text,
            format!("step 1 of 3\n{message}\n"),
            "{backend}"
        );
        for (id, state) in [(renewed.id, BuildState::Running), (fresh.id, BuildState::Queued)] {
            let build = r.build(id).await.unwrap().unwrap();
            assert_eq!(build.state, state, "{backend}");
            assert_eq!(build.completed_at, None);
            assert_eq!(r.build_log(id).await.unwrap().unwrap().text, "");
        }
        let ended_now = r.build(ended.id).await.unwrap().unwrap();
        assert_eq!(ended_now.message.as_deref(), Some("broken"), "{backend}");
        assert_eq!(ended_now.completed_at, Some(1_200));

        // Closed once: a second sweep finds nothing, and the targets can build again.
        assert!(r
            .close_stale_builds(3_000, message, 7_000)
            .await
            .unwrap()
            .is_empty());
        create(r, &target("app", Some("q")), 7_000).await.unwrap();
        // Later, the renewed build lapses too.
        assert_eq!(
            r.close_stale_builds(5_001, message, 8_000).await.unwrap(),
            [renewed.id, fresh.id],
            "{backend}"
        );
    }
}

#[tokio::test]
async fn builds_go_with_their_application_and_device() {
    for (backend, b) in backends().await {
        let r = &b.registry;
        let app_key = Key::App(AppName::parse("my-app").unwrap());
        let device_key = |name: &str| {
            Key::Device(
                AppName::parse("my-app").unwrap(),
                DeviceName::parse(name).unwrap(),
            )
        };
        r.create(
            &app_key,
            serde_json::from_value(json!({"metadata": {"name": "my-app"}})).unwrap(),
        )
        .await
        .unwrap();
        for device in ["d1", "d2"] {
            r.create(
                &device_key(device),
                serde_json::from_value(json!({"metadata": {"name": device, "application": "my-app"}}))
                    .unwrap(),
            )
            .await
            .unwrap();
        }
        let own = create(r, &target("my-app", None), 1).await.unwrap();
        let d1 = create(r, &target("my-app", Some("d1")), 2).await.unwrap();
        r.append_build_log(d1.id, "log of d1\n").await.unwrap();
        let d2 = create(r, &target("my-app", Some("d2")), 3).await.unwrap();
        let other = create(r, &target("other", None), 4).await.unwrap();
        let other_d1 = create(r, &target("other", Some("d1")), 5).await.unwrap();

        // A device's builds go with it.
        r.delete(&device_key("d1")).await.unwrap();
        assert_eq!(r.build(d1.id).await.unwrap(), None, "{backend}");
        assert_eq!(r.build_log(d1.id).await.unwrap(), None, "{backend}");
        assert_eq!(
            list(r, BuildFilter::default()).await,
            [other_d1.id, other.id, d2.id, own.id],
            "{backend}"
        );

        // An application's, its own and its devices', go with it.
        r.delete(&app_key).await.unwrap();
        assert_eq!(
            list(r, BuildFilter::default()).await,
            [other_d1.id, other.id],
            "{backend}"
        );
        // Its targets are free: a new application of the name builds afresh.
        create(r, &target("my-app", None), 10).await.unwrap();
    }
}
