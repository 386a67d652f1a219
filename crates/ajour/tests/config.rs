//! `ajour serve`'s configuration: defaults, config file, environment and flags in that order, the
//! file's checks, `--print-config`, and docs/configuration.md against the flags.

use ajour::cli::{Cli, Command, ServeArgs};
use ajour::config::{self, Environment};
use ajour_store::OciAuth;
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn environment(variables: &[(&str, &str)]) -> Environment {
    variables
        .iter()
        .map(|(name, value)| (name.to_string(), value.into()))
        .collect()
}

/// `ajour serve FLAGS` in environment `env`, resolved.
fn resolve(flags: &[&str], env: &[(&str, &str)]) -> anyhow::Result<ServeArgs> {
    let cli = Cli::try_parse_from(["ajour", "serve"].iter().chain(flags))?;
    let Command::Serve(args) = cli.command else {
        unreachable!("parsed as serve")
    };
    config::resolve(&args, &environment(env))
}

/// A config file holding `toml`, in a directory kept until the returned guard drops.
fn config_file(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ajour.toml");
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn error(result: anyhow::Result<ServeArgs>) -> String {
    format!("{:#}", result.expect_err("refused"))
}

/// Why a config file holding `toml` is refused, and the file's path.
fn file_refused(toml: &str) -> (String, String) {
    let (_dir, file) = config_file(toml);
    let message = error(resolve(&["--config", path(&file)], &[]));
    (message, path(&file).to_string())
}

#[test]
fn each_layer_overrides_the_ones_before() {
    let (_dir, file) = config_file(
        r#"
        listen = "0.0.0.0:1000"
        spec-cache-ms = 1000
        wait-poll = 1
        drogue-workers = 1
        drogue-refresh-secs = 1
        oci-recheck-ms = 1
        oci-error-retry-ms = 1
        oci-plain-http = true
        application = ["from-file"]
        "#,
    );
    let env = [
        ("AJOUR_CONFIG", path(&file)),
        ("AJOUR_SPEC_CACHE_MS", "2000"),
        ("AJOUR_WAIT_POLL", "2"),
        ("AJOUR_DROGUE_WORKERS", "2"),
        ("AJOUR_OCI_RECHECK_MS", "2"),
        ("AJOUR_OCI_PLAIN_HTTP", "false"),
        ("AJOUR_DROGUE_APPLICATIONS", "env-1,env-2"),
    ];
    let flags = ["--wait-poll", "3", "--drogue-workers=3", "--oci-recheck-ms", "3"];
    let args = resolve(&flags, &env).unwrap();
    // Default: nothing says otherwise.
    assert_eq!(args.max_mtu, 65536);
    assert_eq!(args.oci.timeout_ms, 30_000);
    // File over default.
    assert_eq!(args.listen, "0.0.0.0:1000");
    assert_eq!(args.drogue.drogue_refresh_secs, 1);
    assert_eq!(args.oci.error_retry_ms, 1);
    // Environment over file, a switch turned off and a list included.
    assert_eq!(args.spec_cache_ms, 2000);
    assert!(!args.oci.connection.plain_http);
    assert_eq!(args.drogue.applications, ["env-1", "env-2"]);
    // Flags over environment.
    assert_eq!(args.wait_poll, 3);
    assert_eq!(args.drogue.drogue_workers, 3);
    assert_eq!(args.oci.recheck_ms, 3);

    // Each layer on its own, over the defaults.
    let file_only = resolve(&["--config", path(&file)], &[]).unwrap();
    assert_eq!(file_only.spec_cache_ms, 1000);
    assert!(file_only.oci.connection.plain_http);
    assert_eq!(file_only.drogue.applications, ["from-file"]);
    let defaults = resolve(&[], &[]).unwrap();
    assert_eq!(defaults.listen, "127.0.0.1:8080");
    assert_eq!(defaults.spec_cache_ms, 5000);
    assert_eq!(defaults.drogue.drogue_workers, 16);
    assert!(defaults.drogue.applications.is_empty());
    // What the server is given.
    let config = args.config();
    assert_eq!(config.service.spec_cache_ttl, Duration::from_secs(2));
    assert_eq!(config.service.engine.wait_poll, 3);
}

#[test]
fn the_config_file_is_named_by_flag_or_environment_and_the_flag_wins() {
    let (_one, first) = config_file("wait-poll = 11");
    let (_two, second) = config_file("wait-poll = 12");
    let env = [("AJOUR_CONFIG", path(&first))];
    assert_eq!(resolve(&[], &env).unwrap().wait_poll, 11);
    assert_eq!(resolve(&["--config", path(&second)], &env).unwrap().wait_poll, 12);
    let missing = error(resolve(&["--config", "/nonexistent/ajour.toml"], &[]));
    assert!(missing.contains("/nonexistent/ajour.toml"), "{missing}");
}

#[test]
fn a_key_that_is_no_flag_is_refused_by_name() {
    let (message, file) = file_refused("listen = \"127.0.0.1:1\"\nspec-cache = 1000\n");
    assert!(message.contains("`spec-cache`"), "{message}");
    assert!(message.contains(&file), "{message}");
    // Where settings are, and what to do, are no settings.
    let (message, _) = file_refused("print-config = true");
    assert!(message.contains("`print-config`"), "{message}");
}

#[test]
fn a_value_of_the_wrong_type_is_refused_naming_key_and_file() {
    for (toml, key) in [
        ("spec-cache-ms = \"5000\"", "spec-cache-ms"),
        ("listen = 8080", "listen"),
        ("oci-plain-http = \"yes\"", "oci-plain-http"),
        ("application = [\"a\", 1]", "application"),
        ("data-dir = [\"a\"]", "data-dir"),
        // The right type, but not a value the flag takes.
        ("login-window-ms = 0", "login-window-ms"),
        ("default-mtu = -1", "default-mtu"),
        ("drogue-mqtt-version = \"4\"", "drogue-mqtt-version"),
        ("progress-step = \"fast\"", "progress-step"),
    ] {
        let (message, file) = file_refused(toml);
        assert!(message.contains(&format!("`{key}`")), "{toml}: {message}");
        assert!(message.contains(&file), "{toml}: {message}");
    }
    let (message, _) = file_refused("listen = ");
    assert!(message.contains("not valid TOML"), "{message}");
}

#[test]
fn a_bad_environment_value_is_refused_naming_the_variable() {
    for (name, value) in [
        ("AJOUR_MAX_MTU", "0"),
        ("AJOUR_SPEC_CACHE_MS", "soon"),
        ("AJOUR_OCI_PLAIN_HTTP", "yes"),
        ("AJOUR_DROGUE_CONTENT_MODE", "both"),
    ] {
        let message = error(resolve(&[], &[(name, value)]));
        assert!(message.contains(name), "{name}={value}: {message}");
    }
    // Variables that are no setting's are none of the configuration's business.
    assert!(resolve(&[], &[("AJOUR_LOG", "debug"), ("AJOUR_NONSENSE", "x")]).is_ok());
}

#[test]
fn settings_are_judged_together_whichever_layer_gave_them() {
    // User in the file, password in the environment: fine together.
    let (_dir, file) = config_file("oci-registry = \"r.example/fw/\"\noci-user = \"robot\"");
    let args = resolve(&["--config", path(&file)], &[("AJOUR_OCI_PASSWORD", "secret")]).unwrap();
    let oci = args.server_config().unwrap().oci.unwrap();
    assert_eq!(
        oci.auth,
        OciAuth::Basic {
            username: "robot".into(),
            password: "secret".into()
        }
    );
    // A token as well as a user, from different layers, is refused once merged.
    let args = resolve(&["--config", path(&file), "--oci-token", "t"], &[]).unwrap();
    assert!(args.server_config().is_err());
    // Drogue mode needs both URLs: one in the file, one as a flag is both.
    let (_dir, file) = config_file("drogue-registry-url = \"http://127.0.0.1:1\"");
    let both = ["--config", path(&file), "--drogue-mqtt-url", "mqtt://127.0.0.1:1"];
    assert!(resolve(&both, &[])
        .unwrap()
        .server_config()
        .unwrap()
        .drogue
        .is_some());
    let one = resolve(&["--drogue-mqtt-url", "mqtt://127.0.0.1:1"], &[]).unwrap();
    assert!(format!("{:#}", one.server_config().unwrap_err()).contains("--drogue-registry-url"));
}

const SECRET: &str = "s3cret-value";

#[test]
fn print_config_hides_secrets_and_reads_back_as_the_same_configuration() {
    let flags = [
        "--listen",
        "0.0.0.0:9000",
        "--sync-poll",
        "7",
        "--progress-step",
        "12.5",
        "--database-url",
        "postgres://ajour:s3cret-value@db.example/ajour",
        "--api-token",
        SECRET,
        "--application",
        "one,two",
        "--oci-registry",
        "",
        "--oci-user",
        "robot",
        "--oci-insecure-tls",
        "--drogue-mqtt-version",
        "3.1.1",
    ];
    let env = [
        ("AJOUR_OCI_PASSWORD", SECRET),
        ("AJOUR_DROGUE_TOKEN", SECRET),
        ("AJOUR_DROGUE_CA_FILE", "/etc/drogue ca.pem"),
    ];
    let args = resolve(&flags, &env).unwrap();
    let printed = config::to_toml(&args);
    assert!(!printed.contains(SECRET), "{printed}");
    for line in [
        "listen = \"0.0.0.0:9000\"",
        "sync-poll = 7",
        "progress-step = 12.5",
        "application = [\"one\", \"two\"]",
        "oci-registry = \"\"",
        "oci-insecure-tls = true",
        "drogue-mqtt-version = \"3.1.1\"",
        "drogue-ca-file = \"/etc/drogue ca.pem\"",
        "# api-token = \"***\"",
        "# oci-password = \"***\"",
        "# drogue-token = \"***\"",
        "# database-url = \"postgres://ajour:***@db.example/ajour\"",
        "# oci-token is not set",
    ] {
        assert!(
            printed.lines().any(|l| l.starts_with(line)),
            "no {line:?} in\n{printed}"
        );
    }

    // Read back as the only layer, it says the same, less the secrets.
    let (_dir, file) = config_file(&printed);
    let again = resolve(&["--config", path(&file)], &[]).unwrap();
    let printed_again = config::to_toml(&again);
    let without_secrets = |toml: &str| -> Vec<String> {
        toml.lines()
            .filter(|line| !line.ends_with("(secret hidden)") && !line.ends_with(" is not set"))
            .map(String::from)
            .collect()
    };
    assert_eq!(without_secrets(&printed_again), without_secrets(&printed));
    assert_eq!(again.progress_step, 12.5);
    assert_eq!(again.drogue.applications, ["one", "two"]);
    assert_eq!(again.oci.connection.registry.as_deref(), Some(""));
    assert_eq!(again.api_token, None);
    // Defaults print as values, so the file pins them.
    let defaults = config::to_toml(&resolve(&[], &[]).unwrap());
    assert!(
        defaults.lines().any(|l| l == "spec-cache-ms = 5000"),
        "{defaults}"
    );
}

#[test]
fn print_config_prints_and_exits_without_starting_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ajour"))
        .args([
            "serve",
            "--print-config",
            "--max-mtu",
            "1024",
            "--listen",
            "256.0.0.1:1",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .env("AJOUR_API_TOKEN", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.lines().any(|l| l == "max-mtu = 1024"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("# api-token = \"***\"")),
        "{stdout}"
    );
    assert!(
        !stdout.contains(SECRET) && !stdout.contains("listening"),
        "{stdout}"
    );
    // Nothing was started: no data directory, no token generated, no address bound.
    assert!(!data_dir.exists());
}

/// docs/configuration.md's flag tables are the flags' own: regenerate them with
/// `AJOUR_BLESS=1 cargo test -p ajour config_doc`.
#[test]
fn config_doc() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let generated = config::document_flags(&doc).unwrap();
    if std::env::var_os("AJOUR_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    } else if generated != doc {
        panic!(
            "docs/configuration.md's flag tables differ from the flags in the code; \
             regenerate them with `AJOUR_BLESS=1 cargo test -p ajour config_doc`"
        );
    }
}
