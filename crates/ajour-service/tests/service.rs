//! The update service against an in-memory registry (and, where instances share one, a PostgreSQL
//! database of the test's own): what it reads, what it writes, and whom it lets in. Statuses are
//! handed over as bytes, as transports hand them over.

use ajour_engine::FirmwareImage;
use ajour_protocol::{encode_status, Encoding, Status};
use ajour_registry::{Registry, SqlRegistry, SqlRegistryOptions};
use ajour_service::{AuthError, Credentials, GuardConfig, ServiceConfig, UpdateService};
use ajour_store::{FetchError, FirmwareSource, FirmwareSpec};
use ajour_testkit::{MemoryRegistry, TestDatabase};
use ajour_types::{AppName, DeviceName, FirmwareReport, FirmwareState, Key};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const FROM: &str = "1.0.0";
const TO: &str = "2.0.0";
/// 100 blocks of 100 bytes.
const SIZE: usize = 10_000;
const MTU: u32 = 100;

/// Serves one image for every spec.
struct OneImage(Arc<FirmwareImage>);

#[async_trait::async_trait]
impl FirmwareSource for OneImage {
    async fn fetch(&self, _: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError> {
        Ok(self.0.clone())
    }
}

fn image() -> Arc<FirmwareImage> {
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    Arc::new(FirmwareImage::new(TO, data).unwrap())
}

fn app() -> Key {
    Key::App(AppName::parse("app").unwrap())
}

fn device(name: &str) -> Key {
    Key::Device(AppName::parse("app").unwrap(), DeviceName::parse(name).unwrap())
}

/// An application whose devices should run `fw`, and `devices` devices with password `pw`.
async fn fleet(registry: &dyn Registry, devices: &[&str]) {
    registry
        .create(
            &app(),
            serde_json::from_value(
                json!({"metadata": {"name": "app"}, "spec": {"firmware": {"file": {"name": "fw"}}}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    for name in devices {
        let resource = json!({"metadata": {"name": name},
            "spec": {"authentication": {"credentials": [{"pass": "pw"}]}}});
        registry
            .create(&device(name), serde_json::from_value(resource).unwrap())
            .await
            .unwrap();
    }
}

fn service(registry: Arc<dyn Registry>, config: ServiceConfig) -> UpdateService {
    UpdateService::new(registry, Arc::new(OneImage(image())), config)
}

fn config(spec_cache: Duration, progress_interval: Duration) -> ServiceConfig {
    ServiceConfig {
        spec_cache_ttl: spec_cache,
        progress_interval,
        ..ServiceConfig::default()
    }
}

/// The status of a device running `FROM` that holds `offset` bytes of `TO`; `None`: it runs `TO`.
fn status_at(offset: Option<u32>) -> Vec<u8> {
    let status = match offset {
        Some(0) => Status::first(FROM, Some(MTU), None),
        Some(offset) => Status::updating(FROM, Some(MTU), None, TO, offset),
        None => Status::first(TO, Some(MTU), None),
    };
    encode_status(&status, Encoding::Packed)
}

/// Send `status` for `key` (no credentials: as Drogue mode does) and return the command's kind.
async fn send(service: &UpdateService, key: &Key, status: &[u8]) -> &'static str {
    let device = service.device(key, None).await.unwrap();
    device.handle_status(status).await.unwrap().kind
}

/// Send `status` as device `name` of the application, logging in with `password` (as the HTTP
/// endpoint does), and return the command's kind.
async fn logged_in(service: &UpdateService, name: &str, password: &str, status: &[u8]) -> &'static str {
    let credentials = Credentials {
        username: name,
        password,
        peer: None,
    };
    let device = service.device(&device(name), Some(credentials)).await.unwrap();
    device.handle_status(status).await.unwrap().kind
}

fn stored(registry: &MemoryRegistry, key: &Key) -> FirmwareReport {
    FirmwareReport::from_json(&registry.status_section(key, "firmware").expect("a stored status")).unwrap()
}

#[tokio::test]
async fn the_context_is_read_once_per_status_and_reused_within_the_ttl() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &["a", "b"]).await;

    // No reuse: each status reads the device and its application, once each, however the
    // transport checks credentials and decides.
    let uncached = service(
        registry.clone(),
        config(Duration::ZERO, Duration::from_secs(3600)),
    );
    let before = registry.gets();
    for _ in 0..5 {
        assert_eq!(
            logged_in(&uncached, "a", "pw", &status_at(Some(0))).await,
            "write"
        );
    }
    assert_eq!(registry.gets() - before, 5 * 2);

    // Reused: one read of each device and one of their common application.
    let cached = service(
        registry.clone(),
        config(Duration::from_secs(3600), Duration::from_secs(3600)),
    );
    let before = registry.gets();
    for _ in 0..5 {
        for name in ["a", "b"] {
            send(&cached, &device(name), &status_at(Some(0))).await;
        }
    }
    assert_eq!(registry.gets() - before, 2 + 1);

    // A write through this server (the API invalidates) is seen at once: the application's
    // devices and the application are read again.
    cached.invalidate(&app());
    send(&cached, &device("a"), &status_at(Some(0))).await;
    assert_eq!(registry.gets() - before, 2 + 1 + 2);
}

/// Past a few dozen cached devices of one application, expired contexts are read again with one
/// list of the application's devices, not one read each; a device gone from the list is refused.
#[tokio::test]
async fn many_expired_contexts_of_one_application_are_read_again_with_one_list() {
    let registry = Arc::new(MemoryRegistry::new());
    let names: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    fleet(registry.as_ref(), &names).await;
    // Every context expires at once: each read below finds its own expired.
    let service = service(
        registry.clone(),
        config(Duration::ZERO, Duration::from_secs(3600)),
    );
    for name in &names {
        assert!(service.device(&device(name), None).await.is_ok());
    }
    let (gets, lists) = (registry.gets(), registry.lists());
    assert_eq!(lists, 0, "first reads are one by one");
    registry.delete(&device("d7")).await.unwrap();
    for name in &names {
        let kind = send(&service, &device(name), &status_at(Some(0))).await;
        assert_eq!(kind, if *name == "d7" { "wait" } else { "write" }, "{name}");
    }
    // Each of the 39 devices still there was refreshed by a list (with a read of its
    // application); the deleted one, forgotten by the first list, was read on its own and found
    // gone: no device was read one by one.
    assert_eq!(registry.lists() - lists, 39);
    assert_eq!(registry.gets() - gets, 39 + 1);
}

#[tokio::test]
async fn credentials_are_checked_and_a_changed_password_voids_the_verified_one() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &["a"]).await;
    let hash = bcrypt::hash("secret", 4).unwrap();
    registry.put(
        &device("b"),
        json!({"authentication": {"credentials": [{"pass": {"bcrypt": hash}},
            {"user": {"username": "gateway-7", "password": "other"}}]}}),
    );
    let service = service(
        registry.clone(),
        config(Duration::ZERO, Duration::from_secs(3600)),
    );
    let login = |name: &'static str, username: &'static str, password: &'static str| {
        let service = &service;
        async move {
            service
                .device(
                    &device(name),
                    Some(Credentials {
                        username,
                        password,
                        peer: None,
                    }),
                )
                .await
                .map(|_| ())
        }
    };

    assert_eq!(login("a", "a", "pw").await, Ok(()));
    assert_eq!(login("a", "a", "wrong").await, Err(AuthError::Denied));
    assert_eq!(login("b", "b", "secret").await, Ok(()));
    // Verified once, then recognised: the same again.
    assert_eq!(login("b", "b", "secret").await, Ok(()));
    // A `user` credential answers to its own user name only.
    assert_eq!(login("b", "gateway-7", "other").await, Ok(()));
    assert_eq!(login("b", "b", "other").await, Err(AuthError::Denied));
    // Unknown devices get the same answer as wrong passwords.
    assert_eq!(login("nobody", "nobody", "pw").await, Err(AuthError::Denied));

    // The password changes in the registry: the one verified before is refused at once.
    registry.put(
        &device("b"),
        json!({"authentication": {"credentials": [{"pass": "new"}]}}),
    );
    assert_eq!(login("b", "b", "secret").await, Err(AuthError::Denied));
    assert_eq!(login("b", "b", "new").await, Ok(()));

    // The registry is down. A device read before is checked against its credentials as last
    // read (its context expired: the TTL is zero here) and told to wait: its spec may have
    // changed meanwhile.
    registry.set_down(true);
    assert_eq!(login("a", "a", "wrong").await, Err(AuthError::Denied));
    assert_eq!(logged_in(&service, "a", "pw", &status_at(Some(0))).await, "wait");
    // Without credentials to check (Drogue mode), the same.
    assert_eq!(send(&service, &device("a"), &status_at(Some(0))).await, "wait");
    // One never read cannot be checked: not a denial, but unavailable (the HTTP endpoint
    // answers 503).
    assert!(matches!(
        login("c", "c", "pw").await,
        Err(AuthError::Unavailable(_))
    ));

    // Back: what the registry says counts again.
    registry.put(
        &device("a"),
        json!({"authentication": {"credentials": [{"pass": "changed"}]}}),
    );
    registry.set_down(false);
    assert_eq!(login("a", "a", "pw").await, Err(AuthError::Denied));
    assert_eq!(login("a", "a", "changed").await, Ok(()));
}

async fn login_from(
    service: &UpdateService,
    name: &str,
    password: &str,
    peer: &str,
) -> Result<Key, AuthError> {
    let credentials = Credentials {
        username: name,
        password,
        peer: Some(peer.parse().unwrap()),
    };
    service
        .device(&device(name), Some(credentials))
        .await
        .map(|d| d.key().clone())
}

#[tokio::test]
async fn an_imported_hash_costs_one_slow_check_per_device_across_restarts() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &[]).await;
    let hash = bcrypt::hash("secret", 4).unwrap();
    for name in ["a", "b", "c"] {
        registry.put(
            &device(name),
            json!({"authentication": {"credentials": [{"pass": {"bcrypt": hash}}]}}),
        );
    }
    let first = service(
        registry.clone(),
        config(Duration::ZERO, Duration::from_secs(3600)),
    );
    for _ in 0..3 {
        for name in ["a", "b", "c"] {
            assert_eq!(
                login_from(&first, name, "secret", "10.0.0.1").await,
                Ok(device(name))
            );
        }
    }
    assert_eq!(first.slow_password_checks(), 3, "one per device");
    // The verifier derived from the first check is stored with the device, not in memory: a
    // restarted server (a new service on the same registry) checks fast from the start.
    let restarted = service(
        registry.clone(),
        config(Duration::ZERO, Duration::from_secs(3600)),
    );
    for name in ["a", "b", "c"] {
        assert_eq!(
            login_from(&restarted, name, "secret", "10.0.0.1").await,
            Ok(device(name))
        );
    }
    assert_eq!(restarted.slow_password_checks(), 0);
    // A wrong password for a device whose hash verified before costs no slow check either.
    assert_eq!(
        login_from(&restarted, "a", "guess", "10.0.0.9").await,
        Err(AuthError::Denied)
    );
    assert_eq!(restarted.slow_password_checks(), 0);
    // Replacing the hash voids the verifier.
    registry.put(
        &device("a"),
        json!({"authentication": {"credentials": [{"pass": {"bcrypt": bcrypt::hash("new", 4).unwrap()}}]}}),
    );
    assert_eq!(
        login_from(&restarted, "a", "secret", "10.0.0.1").await,
        Err(AuthError::Denied)
    );
    assert_eq!(
        login_from(&restarted, "a", "new", "10.0.0.1").await,
        Ok(device("a"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_wrong_password_and_an_unknown_device_take_the_same_time_and_answer() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &["a"]).await;
    let delay = Duration::from_millis(250);
    let service = service(
        registry.clone(),
        ServiceConfig {
            login_failure_delay: delay,
            ..config(Duration::ZERO, Duration::from_secs(3600))
        },
    );
    let timed = |name: &'static str, password: &'static str| {
        let service = &service;
        async move {
            let started = tokio::time::Instant::now();
            let result = login_from(service, name, password, "10.0.0.1").await;
            (result, started.elapsed())
        }
    };
    // The clock is paused: elapsed time is what the service waited, exactly.
    assert_eq!(timed("a", "wrong").await, (Err(AuthError::Denied), delay));
    assert_eq!(timed("nobody", "pw").await, (Err(AuthError::Denied), delay));
    assert_eq!(timed("a", "pw").await, (Ok(device("a")), Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn failed_logins_are_throttled_without_locking_a_device_out_of_its_own_address() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &["a", "b"]).await;
    let service = service(
        registry.clone(),
        ServiceConfig {
            guard: GuardConfig {
                address_failures: 5,
                device_failures: 3,
                window: Duration::from_secs(60),
                lockout: Duration::from_secs(30),
            },
            ..config(Duration::ZERO, Duration::from_secs(3600))
        },
    );
    // Device `a` logged in from its address before the attack.
    assert!(login_from(&service, "a", "pw", "192.168.0.10").await.is_ok());
    // Guesses for `a` from three addresses lock the device out for everyone else...
    for attacker in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        assert_eq!(
            login_from(&service, "a", "guess", attacker).await,
            Err(AuthError::Denied)
        );
    }
    let locked = login_from(&service, "a", "pw", "10.0.0.4").await;
    assert_eq!(
        locked,
        Err(AuthError::Throttled {
            retry_after: Duration::from_secs(30)
        })
    );
    // ... but not from the address it last logged in from.
    assert_eq!(
        login_from(&service, "a", "pw", "192.168.0.10").await,
        Ok(device("a"))
    );
    // Five failures from one address (spread over devices, known or not) lock the address out,
    // whatever it tries next; other addresses are not affected.
    for name in ["b", "x", "y", "z", "b"] {
        assert_eq!(
            login_from(&service, name, "guess", "10.9.9.9").await,
            Err(AuthError::Denied)
        );
    }
    assert!(matches!(
        login_from(&service, "b", "pw", "10.9.9.9").await,
        Err(AuthError::Throttled { .. })
    ));
    assert_eq!(login_from(&service, "b", "pw", "10.9.9.8").await, Ok(device("b")));
    // The lockout ends by itself.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(login_from(&service, "b", "pw", "10.9.9.9").await, Ok(device("b")));
    assert_eq!(login_from(&service, "a", "pw", "10.0.0.4").await, Ok(device("a")));
}

#[tokio::test]
async fn a_unique_user_name_finds_its_device_and_a_removed_password_is_refused_at_once() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &[]).await;
    registry.put(
        &device("sensor-17"),
        json!({"authentication": {"credentials": [
            {"user": {"username": "alice", "password": "wonderland", "unique": true}},
            {"pass": "own"}
        ]}}),
    );
    // A long cache: only the invalidation a write through the API makes lets a change through.
    let service = service(
        registry.clone(),
        config(Duration::from_secs(3600), Duration::from_secs(3600)),
    );
    assert_eq!(
        login_from(&service, "alice", "wonderland", "10.0.0.1").await,
        Ok(device("sensor-17"))
    );
    assert_eq!(
        login_from(&service, "sensor-17", "own", "10.0.0.1").await,
        Ok(device("sensor-17"))
    );
    // The device's own password does not log in as the user, nor the user's as the device.
    assert_eq!(
        login_from(&service, "alice", "own", "10.0.0.1").await,
        Err(AuthError::Denied)
    );
    assert_eq!(
        login_from(&service, "sensor-17", "wonderland", "10.0.0.1").await,
        Err(AuthError::Denied)
    );
    // The credentials are removed (as the API does: write, then invalidate).
    registry.put(&device("sensor-17"), json!({}));
    service.invalidate(&device("sensor-17"));
    assert_eq!(
        login_from(&service, "sensor-17", "own", "10.0.0.1").await,
        Err(AuthError::Denied)
    );
    assert_eq!(
        login_from(&service, "alice", "wonderland", "10.0.0.1").await,
        Err(AuthError::Denied)
    );
}

#[tokio::test]
async fn a_malformed_status_is_an_error_and_nothing_is_recorded() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &["a"]).await;
    let service = service(registry.clone(), config(Duration::ZERO, Duration::ZERO));
    let device_a = service.device(&device("a"), None).await.unwrap();
    for bytes in [&b""[..], b"\xff\xff", b"not cbor at all"] {
        assert!(device_a.handle_status(bytes).await.is_err(), "{bytes:?}");
    }
    service.settle_status_writes().await;
    assert_eq!(registry.status_writes(), 0);
    assert_eq!(registry.status_section(&device("a"), "firmware"), None);
}

#[tokio::test]
async fn phases_are_written_at_once_and_progress_by_steps() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &["a"]).await;
    // Progress is due at every status; only the 20-point step holds it back.
    let service = service(
        registry.clone(),
        config(Duration::from_secs(3600), Duration::ZERO),
    );
    let key = device("a");
    for block in 0..50 {
        assert_eq!(send(&service, &key, &status_at(Some(block * MTU))).await, "write");
    }
    service.settle_status_writes().await;
    // Half-way (the last block sent ended at 50%): the newest write started at the 41% step or
    // later, so the registry shows at least that much and at most what the device has.
    let halfway = stored(&registry, &key);
    let FirmwareState::Updating { percent } = halfway.status.state else {
        panic!("expected updating, got {:?}", halfway.status);
    };
    assert!((41.0..=50.0).contains(&percent), "{percent}");
    assert_eq!(
        (halfway.status.current.as_str(), halfway.status.target.as_str()),
        (FROM, TO)
    );

    for block in 50..100 {
        send(&service, &key, &status_at(Some(block * MTU))).await;
    }
    assert_eq!(send(&service, &key, &status_at(Some(SIZE as u32))).await, "swap");
    assert_eq!(send(&service, &key, &status_at(None)).await, "sync");
    service.settle_status_writes().await;
    assert_eq!(stored(&registry, &key).status.state, FirmwareState::InSync);
    // 1% (a new phase), 21, 41, 61, 81 (steps), in sync (a new phase): never one per block.
    let writes = registry.status_writes();
    assert!(
        (2..=6).contains(&writes),
        "{writes} status writes for 102 statuses"
    );
}

/// Two instances share a registry. A saw the device half-way and holds that progress, not yet
/// written; B saw it finish and wrote "in sync". A's write comes later, but it is older news.
async fn late_progress_is_dropped(a: &UpdateService, b: &UpdateService, registry: &dyn Registry, name: &str) {
    let key = device(name);
    let read = || read_report(registry, &key);
    send(a, &key, &status_at(Some(0))).await;
    a.settle_status_writes().await;
    send(a, &key, &status_at(Some(50 * MTU))).await;
    assert_eq!(send(b, &key, &status_at(None)).await, "sync");
    b.settle_status_writes().await;
    assert_eq!(read().await.status.state, FirmwareState::InSync);

    a.flush_status(true).await;
    assert_eq!(
        read().await.status.state,
        FirmwareState::InSync,
        "a late write turned it back"
    );
    // The API of A shows what the registry has, not its own stale view.
    assert!(a.pending_status(&key).is_none(), "{:?}", a.pending_status(&key));

    // Reflashed to the old version after it synced: not late, shown as updating again. (A
    // reflash takes seconds; here it must at least come after the millisecond of the sync, as
    // statuses within one millisecond count as concurrent.)
    let synced_at = read().await.condition("InSync").unwrap().since;
    while chrono::Utc::now() - synced_at < chrono::TimeDelta::milliseconds(2) {
        tokio::task::yield_now().await;
    }
    send(a, &key, &status_at(Some(0))).await;
    a.settle_status_writes().await;
    assert!(matches!(
        read().await.status.state,
        FirmwareState::Updating { .. }
    ));
}

#[tokio::test]
async fn a_late_older_observation_never_turns_a_synced_device_back() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &["a"]).await;
    let long = Duration::from_secs(3600);
    let (a, b) = (
        service(registry.clone(), config(long, long)),
        service(registry.clone(), config(long, long)),
    );
    late_progress_is_dropped(&a, &b, registry.as_ref(), "a").await;
}

async fn postgres_registry(url: &str) -> Arc<dyn Registry> {
    Arc::new(
        SqlRegistry::connect(url, SqlRegistryOptions::default())
            .await
            .unwrap(),
    )
}

async fn read_report(registry: &dyn Registry, key: &Key) -> FirmwareReport {
    let resource = registry.get(key).await.unwrap().unwrap();
    FirmwareReport::from_json(&resource.status["firmware"]).unwrap()
}

#[tokio::test]
async fn two_instances_on_one_postgresql_database_never_leave_a_synced_device_out_of_sync() {
    let database = TestDatabase::create().await;
    // Each instance has a connection pool of its own, as two processes would.
    let (registry_a, registry_b) = (
        postgres_registry(database.url()).await,
        postgres_registry(database.url()).await,
    );
    let names: Vec<String> = (0..20).map(|i| format!("d{i}")).collect();
    fleet(
        registry_a.as_ref(),
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let long = Duration::from_secs(3600);
    let a = service(registry_a.clone(), config(long, Duration::ZERO));
    let b = service(registry_b.clone(), config(long, Duration::ZERO));

    // The scenario step by step, read back through B's pool.
    let long_a = service(registry_a.clone(), config(long, long));
    late_progress_is_dropped(&long_a, &b, registry_b.as_ref(), "d0").await;

    // Then a fleet whose statuses land on either instance in turn, as with a load balancer:
    // each device's statuses alternate between A and B in a pattern of its own, and both write
    // progress at every step. Once every device synced, each is shown in sync, whatever order
    // the two instances' writes landed in.
    let mut tasks = tokio::task::JoinSet::new();
    let (a, b) = (Arc::new(a), Arc::new(b));
    for (i, name) in names.iter().enumerate().skip(1) {
        let (a, b, key) = (a.clone(), b.clone(), device(name));
        tasks.spawn(async move {
            let pick = |n: usize| if (n * (i + 1)).is_multiple_of(3) { &a } else { &b };
            for block in 0..100u32 {
                let command = send(pick(block as usize), &key, &status_at(Some(block * MTU))).await;
                assert_eq!(command, "write");
            }
            send(pick(100), &key, &status_at(Some(SIZE as u32))).await;
            assert_eq!(send(pick(101), &key, &status_at(None)).await, "sync");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    a.flush_status(true).await;
    b.flush_status(true).await;
    for name in names.iter().skip(1) {
        let report = read_report(registry_a.as_ref(), &device(name)).await;
        assert_eq!(report.status.state, FirmwareState::InSync, "{name}: {report:?}");
    }
}

/// Serves one image for every spec, replaceable while devices update (as `firmware add --force`
/// or a moved OCI tag would replace it).
struct ReplaceableImage(std::sync::Mutex<Arc<FirmwareImage>>);

#[async_trait::async_trait]
impl FirmwareSource for ReplaceableImage {
    async fn fetch(&self, _: &FirmwareSpec) -> Result<Arc<FirmwareImage>, FetchError> {
        Ok(self.0.lock().unwrap().clone())
    }
}

/// The Write a command is, as `(offset, data)`; panics on anything else.
fn write_of(reply: &[u8]) -> (u32, Vec<u8>) {
    match ajour_protocol::decode_command(reply).unwrap() {
        ajour_protocol::Command::Write { offset, data, .. } => (offset, data.to_vec()),
        other => panic!("expected a Write, got {other:?}"),
    }
}

async fn command(service: &UpdateService, key: &Key, status: &[u8]) -> Vec<u8> {
    let device = service.device(key, None).await.unwrap();
    device.handle_status(status).await.unwrap().command
}

#[tokio::test]
async fn content_replaced_under_the_same_version_is_never_spliced_into_an_update() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &["a", "b"]).await;
    let first = image();
    let second = Arc::new(FirmwareImage::new(TO, vec![0x5a; SIZE]).unwrap());
    let source = Arc::new(ReplaceableImage(std::sync::Mutex::new(first.clone())));
    let long = Duration::from_secs(3600);
    let service = UpdateService::new(registry.clone(), source.clone(), config(long, long));
    let key = device("a");

    for block in 0..50 {
        let (offset, data) = write_of(&command(&service, &key, &status_at(Some(block * MTU))).await);
        assert_eq!(offset, block * MTU);
        assert_eq!(data, first.block(offset, MTU));
    }
    // Same version, other bytes: the device holds 5,000 bytes of the first image and must not
    // get the rest of the second. It starts again from 0, with the second.
    *source.0.lock().unwrap() = second.clone();
    let (offset, data) = write_of(&command(&service, &key, &status_at(Some(50 * MTU))).await);
    assert_eq!((offset, data.as_slice()), (0, second.block(0, MTU)));
    // From then on it resumes the second image, here and on another instance (a restart), which
    // knows what the device was sent from the registry alone.
    let (offset, _) = write_of(&command(&service, &key, &status_at(Some(MTU))).await);
    assert_eq!(offset, MTU);
    service.settle_status_writes().await;
    let restarted = UpdateService::new(registry.clone(), source.clone(), config(long, long));
    let (offset, data) = write_of(&command(&restarted, &key, &status_at(Some(2 * MTU))).await);
    assert_eq!((offset, data.as_slice()), (2 * MTU, second.block(2 * MTU, MTU)));

    // A device half-way through this version of which no instance recorded what it was sent
    // (updated by an older server, or its record lost): it starts again rather than risk it.
    let (offset, _) = write_of(&command(&restarted, &device("b"), &status_at(Some(30 * MTU))).await);
    assert_eq!(offset, 0);
}

#[tokio::test]
async fn a_device_that_never_comes_back_on_the_new_version_is_not_sent_swap_for_ever() {
    let registry = Arc::new(MemoryRegistry::new());
    fleet(registry.as_ref(), &["a"]).await;
    let long = Duration::from_secs(3600);
    let source = Arc::new(ReplaceableImage(std::sync::Mutex::new(image())));
    let service = UpdateService::new(registry.clone(), source.clone(), config(long, long));
    let key = device("a");
    // The device holds the whole image (every block was sent by this instance) and asks again
    // and again: the swap does not take.
    for block in 0..100 {
        send(&service, &key, &status_at(Some(block * MTU))).await;
    }
    for _ in 0..ajour_service::MAX_SWAPS {
        assert_eq!(send(&service, &key, &status_at(Some(SIZE as u32))).await, "swap");
    }
    assert_eq!(send(&service, &key, &status_at(Some(SIZE as u32))).await, "wait");
    // Rolled back by its bootloader and starting over: still left alone.
    assert_eq!(send(&service, &key, &status_at(Some(0))).await, "wait");
    service.settle_status_writes().await;
    let report = stored(&registry, &key);
    assert!(
        matches!(&report.status.state, FirmwareState::Failed { reason } if reason.contains("Swap")),
        "{report:?}"
    );

    // A new image is a new start.
    *source.0.lock().unwrap() = Arc::new(FirmwareImage::new(TO, vec![1; SIZE]).unwrap());
    assert_eq!(send(&service, &key, &status_at(Some(0))).await, "write");
}

/// Two instances on one PostgreSQL database, each caching specs for an hour: a password changed
/// or removed through one is refused by the other as soon as PostgreSQL's notification arrives,
/// not after the hour.
#[tokio::test]
async fn a_credential_changed_through_one_instance_is_seen_by_another_at_once() {
    let database = TestDatabase::create().await;
    let (registry_a, registry_b) = (
        postgres_registry(database.url()).await,
        postgres_registry(database.url()).await,
    );
    fleet(registry_a.as_ref(), &["d"]).await;
    let long = Duration::from_secs(3600);
    let b = Arc::new(service(registry_b.clone(), config(long, long)));
    tokio::spawn(
        b.follow_registry_changes()
            .await
            .expect("PostgreSQL announces changes"),
    );
    // B caches the device's context with password `pw`.
    assert_eq!(login_from(&b, "d", "pw", "10.0.0.1").await, Ok(device("d")));

    let mut changed = registry_a.get(&device("d")).await.unwrap().unwrap();
    changed.spec = json!({"authentication": {"credentials": [{"pass": "new"}]}})
        .as_object()
        .unwrap()
        .clone();
    registry_a.update(&device("d"), changed).await.unwrap();
    ajour_testkit::eventually(Duration::from_secs(10), "B to accept the new password", || {
        let b = b.clone();
        async move { login_from(&b, "d", "new", "10.0.0.1").await.is_ok() }
    })
    .await;
    assert_eq!(
        login_from(&b, "d", "pw", "10.0.0.1").await,
        Err(AuthError::Denied)
    );

    registry_a.delete(&device("d")).await.unwrap();
    ajour_testkit::eventually(Duration::from_secs(10), "B to refuse the deleted device", || {
        let b = b.clone();
        async move { login_from(&b, "d", "new", "10.0.0.1").await.is_err() }
    })
    .await;
}
