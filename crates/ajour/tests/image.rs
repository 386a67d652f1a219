//! The server's container image, built without a container engine: `scripts/build-image.sh`
//! (umoci) on this test's own `ajour` binary, pushed to a real `docker-registry`, inspected with
//! skopeo (one layer, user, entry point, command, environment, port, labels), pulled back, and
//! run: its root file system unpacked and `ajour` started in it with `chroot` as the image's user
//! and with the image's environment, so the image holds everything the binary needs and its
//! data directory is writable by that user. The Containerfile itself is not built here (no
//! container engine; docs/deployment.md).
//!
//! Needs root (umoci keeps the files' owners, chroot), umoci and skopeo:
//! scripts/setup-test-env.sh installs them.

use ajour_testkit::oci_registry::skopeo_inspect;
use ajour_testkit::{OciRegistry, ServerProcess};
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");
const REVISION: &str = "0123456789abcdef0123456789abcdef01234567";
/// The image's user, as the Containerfile's (distroless `nonroot`).
const USER: &str = "65532:65532";

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", command.get_program()));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `VERSION` of `ajour VERSION`, as the binary says.
fn binary_version() -> String {
    let out = text(&run(Command::new(AJOUR).arg("--version")));
    out.trim()
        .strip_prefix("ajour ")
        .unwrap_or_else(|| panic!("ajour --version printed {out:?}"))
        .to_string()
}

/// `chroot` into `rootfs` as the image's user, with exactly the image's environment (and
/// `extra`), running `args` as a container runtime would: the first one found on the image's
/// PATH.
fn in_image(rootfs: &Path, env: &[String], extra: &[(&str, &str)], args: &[&str]) -> Command {
    let mut command = Command::new("chroot");
    command
        .arg(format!("--userspec={USER}"))
        .arg(rootfs)
        .args(args)
        .current_dir("/");
    image_environment(&mut command, env, extra);
    command
}

/// Exactly the image's environment (`NAME=VALUE`s), and `extra`.
fn image_environment(command: &mut Command, env: &[String], extra: &[(&str, &str)]) {
    command.env_clear();
    for pair in env {
        let (name, value) = pair.split_once('=').expect("NAME=VALUE");
        command.env(name, value);
    }
    command.envs(extra.iter().copied());
}

/// [`in_image`] in a mount namespace of its own where the root file system is read-only and
/// `data` and `tmp` are mounted at /var/lib/ajour and /tmp, as a pod with
/// `readOnlyRootFilesystem: true` and two `emptyDir` volumes has them. `unshare` and `sh` exec
/// `chroot`, which execs the command: one process, killed as the test ends.
fn read_only_pod(
    rootfs: &Path,
    data: &Path,
    tmp: &Path,
    env: &[String],
    extra: &[(&str, &str)],
    args: &[&str],
) -> Command {
    let script = r#"set -e
root=$1 data=$2 tmp=$3; shift 3
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount --bind "$data" "$root/var/lib/ajour"
mount --bind "$tmp" "$root/tmp"
exec chroot --userspec=65532:65532 "$root" "$@""#;
    let mut pod = Command::new("unshare");
    pod.args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(rootfs)
        .arg(data)
        .arg(tmp)
        .args(args)
        .current_dir("/");
    image_environment(&mut pod, env, extra);
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_built_without_a_daemon_is_pushed_inspected_and_runs() {
    let uid = text(&run(Command::new("id").arg("-u")));
    assert_eq!(
        uid.trim(),
        "0",
        "this test needs root (umoci keeps owners; chroot)"
    );
    let version = binary_version();
    let registry = OciRegistry::start().await;
    let image = format!("{}/ajour:{version}", registry.host());
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");

    // Build and push, as docs/deployment.md says, on the binary this test was built with.
    let started = std::time::Instant::now();
    let build = run(Command::new("bash")
        .arg(repository().join("scripts/build-image.sh"))
        .arg("--layout")
        .arg(&layout)
        .args([
            "--revision",
            REVISION,
            "--strip",
            "--push",
            &image,
            "--push-insecure",
        ])
        .arg(AJOUR));
    let progress = text(&build);
    for step in [
        "build-image: adding /usr/local/bin/ajour",
        "(from ldd)",
        "build-image: adding /etc/passwd",
        "build-image: adding /etc/ssl/certs/ca-certificates.crt",
        &format!("build-image: pushed docker://{image}"),
    ] {
        assert!(
            progress.contains(step),
            "no {step:?} in the progress:\n{progress}"
        );
    }
    eprintln!("image built and pushed in {:?}", started.elapsed());

    // What the registry has: skopeo's summary, the manifest, the configuration.
    let summary = skopeo_inspect(&image, false, None);
    let labels = &summary["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], version.as_str());
    assert_eq!(labels["org.opencontainers.image.revision"], REVISION);
    assert_eq!(labels["org.opencontainers.image.title"], "ajour");
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .is_some_and(|s| s.starts_with("https://")),
        "source label: {summary}"
    );
    assert_eq!(summary["Os"], "linux");
    let manifest = skopeo_inspect(&image, true, None);
    // An OCI manifest (umoci leaves out its optional mediaType; the config's says it all).
    assert_eq!(
        manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json",
        "{manifest}"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.version"],
        version.as_str()
    );
    let config: Value = serde_json::from_slice(
        &run(Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--config"])
            .arg(format!("docker://{image}")))
        .stdout,
    )
    .unwrap();
    let config = &config["config"];
    assert_eq!(config["User"], USER, "non-root user: {config}");
    assert_eq!(config["Entrypoint"], serde_json::json!(["ajour"]));
    assert_eq!(config["Cmd"], serde_json::json!(["serve"]));
    assert_eq!(config["WorkingDir"], "/var/lib/ajour");
    assert!(config["ExposedPorts"]["8080/tcp"].is_object(), "{config}");
    assert!(config["Volumes"]["/var/lib/ajour"].is_object(), "{config}");
    assert_eq!(config["Labels"], summary["Labels"]);
    let env: Vec<String> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for wanted in ["AJOUR_LISTEN=0.0.0.0:8080", "AJOUR_DATA_DIR=/var/lib/ajour"] {
        assert!(env.iter().any(|e| e == wanted), "no {wanted} in {env:?}");
    }
    assert!(env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
    // The Containerfile (not built here: no engine) describes the same image.
    containerfile_matches(config, &env);

    // Pulled back from the registry and unpacked: the root file system a runtime would get.
    let pulled = work.path().join("pulled");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:pulled", pulled.display())));
    let rootfs = work.path().join("rootfs");
    run(Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:pulled", pulled.display()))
        .arg(&rootfs));
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
    let data_dir = std::fs::metadata(rootfs.join("var/lib/ajour")).unwrap();
    assert_eq!((data_dir.uid(), data_dir.gid()), (65532, 65532));
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").is_file());
    assert!(!rootfs.join("bin/sh").exists(), "no shell in the image");

    // The binary runs in it, as the image's user, with only what the image holds: every library
    // and the loader are there.
    let out = text(&run(&mut in_image(&rootfs, &env, &[], &["ajour", "--version"])));
    assert_eq!(out.trim(), format!("ajour {version}"));

    // A mounted config file (as the Kubernetes manifests mount their ConfigMap) is read, under
    // the image's environment, which wins over it.
    std::fs::create_dir_all(rootfs.join("etc/ajour")).unwrap();
    std::fs::write(
        rootfs.join("etc/ajour/ajour.toml"),
        "spec-cache-ms = 1234\nlisten = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let config_env = [("AJOUR_CONFIG", "/etc/ajour/ajour.toml")];
    let printed = text(&run(&mut in_image(
        &rootfs,
        &env,
        &config_env,
        &["ajour", "serve", "--print-config"],
    )));
    for wanted in [
        "spec-cache-ms = 1234",
        "listen = \"0.0.0.0:8080\"",
        "data-dir = \"/var/lib/ajour\"",
    ] {
        assert!(printed.contains(wanted), "no {wanted:?} in:\n{printed}");
    }

    // The server runs as the Kubernetes manifests run it (deploy/base/deployment.yaml): as the
    // image's user, on a read-only root file system, with an empty writable volume at the data
    // directory and at /tmp, and the config file mounted. It writes its database there and
    // answers its probes, /metrics and the API.
    let data = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for dir in [data.path(), tmp.path()] {
        std::os::unix::fs::chown(dir, Some(65532), Some(65532)).unwrap();
    }
    let server = ServerProcess::start(read_only_pod(
        &rootfs,
        data.path(),
        tmp.path(),
        &env,
        &[
            ("AJOUR_CONFIG", "/etc/ajour/ajour.toml"),
            ("AJOUR_API_TOKEN", "image-test-token"),
            ("AJOUR_LOG", "warn"),
        ],
        &["ajour", "serve", "--listen", "127.0.0.1:0"],
    ))
    .await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = reqwest::get(format!("{}{path}", server.url())).await.unwrap();
        assert!(
            response.status().is_success(),
            "GET {path}: {}\n{}",
            response.status(),
            server.log()
        );
    }
    let apps = reqwest::Client::new()
        .get(format!("{}/api/registry/v1alpha1/apps", server.url()))
        .bearer_auth("image-test-token")
        .send()
        .await
        .unwrap();
    assert!(
        apps.status().is_success(),
        "API with the token from the environment: {}",
        apps.status()
    );
    let database = std::fs::metadata(data.path().join("ajour.db")).unwrap();
    assert_eq!(database.uid(), 65532, "the database belongs to the image's user");
    assert!(!rootfs.join("var/lib/ajour/ajour.db").exists());
    eprintln!("whole test in {:?}", started.elapsed());
}

/// The virtualenv of scripts/setup-test-env.sh (same rule for where it is).
fn venv_python() -> PathBuf {
    let venv = match std::env::var_os("AJOUR_TEST_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"))
            .join("ajour-test/venv"),
    };
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-test-env.sh",
        python.display()
    );
    python
}

/// The Containerfile, parsed by BuildKit's own parser (the `dockerfile` package, through
/// tests/data/deploy/validate.py): its instructions (`cmd`, `value`, `flags`).
fn containerfile() -> Vec<Value> {
    let output = run(Command::new(venv_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/deploy/validate.py"))
        .arg("containerfile")
        .arg(repository().join("Containerfile")));
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    answer["instructions"].as_array().unwrap().clone()
}

fn values(instruction: &Value) -> Vec<&str> {
    instruction["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// The Containerfile's final stage sets what scripts/build-image.sh set in `config` (the image
/// configuration as skopeo shows it): user, entry point, command, working directory, port,
/// volume, environment and label names; it builds with `--locked` on the Debian release of its
/// runtime image.
fn containerfile_matches(config: &Value, env: &[String]) {
    let instructions = containerfile();
    let last_from = instructions.iter().rposition(|i| i["cmd"] == "FROM").unwrap();
    let (build, runtime) = instructions.split_at(last_from);
    let from = |stage: &[Value]| values(&stage[0]).join(" ");
    assert!(from(build).contains("bookworm"), "build stage: {}", from(build));
    assert!(
        from(runtime).contains("debian12"),
        "runtime stage: {}",
        from(runtime)
    );
    assert!(
        build
            .iter()
            .any(|i| i["cmd"] == "RUN" && values(i)[0].contains("cargo build --release --locked -p ajour")),
        "no cargo build --release --locked -p ajour"
    );
    let last = |cmd: &str| -> Vec<&str> {
        runtime
            .iter()
            .rev()
            .find(|i| i["cmd"] == cmd)
            .map(values)
            .unwrap_or_else(|| panic!("no {cmd} in the Containerfile's last stage"))
    };
    assert_eq!(json!(last("USER")[0]), config["User"]);
    assert_eq!(json!(last("ENTRYPOINT")), config["Entrypoint"]);
    assert_eq!(json!(last("CMD")), config["Cmd"]);
    assert_eq!(json!(last("WORKDIR")[0]), config["WorkingDir"]);
    let ports: Vec<String> = last("EXPOSE").iter().map(|p| format!("{p}/tcp")).collect();
    let image_ports: Vec<&String> = config["ExposedPorts"].as_object().unwrap().keys().collect();
    assert_eq!(ports.iter().collect::<Vec<_>>(), image_ports);
    let volumes: Vec<&str> = config["Volumes"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(last("VOLUME"), volumes);
    // ENV and LABEL values come as name, value, name, value...
    let pairs = |cmd: &str| -> Vec<(String, String)> {
        runtime
            .iter()
            .filter(|i| i["cmd"] == cmd)
            .flat_map(|i| {
                let v = values(i);
                v.chunks(2)
                    .map(|p| (p[0].to_string(), p[1].trim_matches('"').to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let containerfile_env: Vec<String> = pairs("ENV").iter().map(|(k, v)| format!("{k}={v}")).collect();
    let image_env: Vec<&String> = env.iter().filter(|e| !e.starts_with("PATH=")).collect();
    assert_eq!(containerfile_env.iter().collect::<Vec<_>>(), image_env, "ENV");
    let mut containerfile_labels: Vec<String> = pairs("LABEL").into_iter().map(|(k, _)| k).collect();
    containerfile_labels.push("org.opencontainers.image.created".into());
    containerfile_labels.sort();
    let image_labels: Vec<&String> = config["Labels"].as_object().unwrap().keys().collect();
    assert_eq!(
        containerfile_labels.iter().collect::<Vec<_>>(),
        image_labels,
        "LABEL names"
    );
    for (name, value) in pairs("LABEL") {
        if !value.starts_with("${") {
            assert_eq!(config["Labels"][&name], value.as_str(), "label {name}");
        }
    }
}

/// The script says what is wrong, and stops, when it cannot build.
#[test]
fn build_script_fails_clearly() {
    let work = tempfile::tempdir().unwrap();
    let script = repository().join("scripts/build-image.sh");
    let fails = |args: &[&str], wanted: &str| {
        let output = Command::new("bash").arg(&script).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(wanted), "{args:?}: no {wanted:?} in:\n{stderr}");
    };
    let missing = work.path().join("no-such-binary");
    fails(&[missing.to_str().unwrap()], "no binary at");
    // Not an ajour binary.
    fails(&["/bin/true"], "not 'ajour VERSION'");
    // A directory that is not an image layout is never replaced.
    std::fs::write(work.path().join("keep"), "mine").unwrap();
    fails(
        &["--layout", work.path().to_str().unwrap(), AJOUR],
        "is not an OCI image layout",
    );
    assert!(work.path().join("keep").exists());
    fails(&["--no-such-option"], "unknown option");
}
