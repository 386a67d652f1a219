"""Checks for Ajour's deployment files, run by crates/ajour/tests/deploy.rs in the virtualenv that
scripts/setup-test-env.sh makes (kubernetes-validate, which bundles the Kubernetes JSON schemas,
and promql-parser). Prints one JSON object on stdout; exits 1 when anything failed.

  validate.py manifests FILE...   every YAML document of each FILE (a rendered overlay) against
                                  the Kubernetes schemas of KUBERNETES_VERSION in strict mode
                                  (unknown fields are errors), and custom resources against the
                                  schemas in this directory (CUSTOM_SCHEMAS); a kind with no schema
                                  is an error too. Output: {"documents": [...], "errors": [...]},
                                  the documents as JSON (so the Rust test needs no YAML parser).
  validate.py promql DASHBOARD    every query of a Grafana dashboard parsed as PromQL (Grafana's
                                  variables replaced by sample values first), and the
                                  selectors of its label_values() variables. Output:
                                  {"queries": N, "metrics": {name: ["rated" and/or "raw"]},
                                  "errors": [...]}: "rated" when inside rate/irate/increase.
  validate.py containerfile FILE  the Containerfile parsed by BuildKit's own parser (the PyPI
                                  package dockerfile): {"instructions": [{"cmd", "flags",
                                  "value", "json"}], "errors": [...]}.
  validate.py tekton-wiring FILE RUN
                                  the Tekton resources of FILE (a rendered deploy/tekton) fit
                                  together and fit RUN, the PipelineRun Ajour's runner creates:
                                  RUN's params, workspaces and pipelineRef are the Pipeline's;
                                  each pipeline task's Task exists and declares what it is
                                  given; every $(params.X), $(tasks.T.results.R), $(results.X.path)
                                  and $(workspaces.X...) names something declared; each Pipeline
                                  result is a task's result. Output: {"errors": [...]}.

Tekton's resources (tekton.dev/v1 Pipeline, Task, PipelineRun) are validated in `manifests` mode
against a JSON schema made from Tekton's own OpenAPI document, tekton-pipeline-v1.swagger.json in
this directory (README.md says where it comes from): each definition strict (unknown fields are
errors), the Kubernetes types it names (containers' env, volumes, security contexts, ObjectMeta)
taken from the strict Kubernetes schemas, with the corrections TEKTON_OVERRIDES and
TEKTON_INLINED list.
"""

import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

# The Kubernetes version whose schemas the manifests must satisfy: the newest the pinned
# kubernetes-validate bundles (scripts/setup-test-env.sh pins it).
KUBERNETES_VERSION = "1.37.0"
HERE = os.path.dirname(os.path.abspath(__file__))
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.schema.json",
}


def kubernetes_definitions():
    """The strict Kubernetes definitions kubernetes-validate bundles, and a registry holding them
    for schemas that refer to them."""
    import importlib_resources
    from referencing import Registry, Resource

    root = importlib_resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")
    directory = root.joinpath("v%s-local-strict" % KUBERNETES_VERSION)
    definitions = json.loads(directory.joinpath("_definitions.json").read_text())
    return definitions, Resource.from_contents(definitions) @ Registry()


def object_meta_validator():
    """Kubernetes' ObjectMeta, strict, from the schemas kubernetes-validate bundles: custom
    resources' metadata is checked as a built-in resource's is."""
    definitions, registry = kubernetes_definitions()
    meta = {"$ref": "%s#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta" % definitions["$id"]}
    return jsonschema.Draft202012Validator(meta, registry=registry)


# Tekton Pipelines' v1 API: the kinds validated, and the definition of each in the document.
TEKTON_SWAGGER = "tekton-pipeline-v1.swagger.json"
TEKTON_KINDS = {
    ("tekton.dev/v1", "Pipeline"): "v1.Pipeline",
    ("tekton.dev/v1", "Task"): "v1.Task",
    ("tekton.dev/v1", "PipelineRun"): "v1.PipelineRun",
}
# Names the document uses for Kubernetes' own types (Tekton's generator writes `v1.X` for
# k8s.io/api/core/v1 and k8s.io/apimachinery/pkg/apis/meta/v1 alike): the strict Kubernetes
# definitions stand for them.
KUBERNETES_META = {"v1.ObjectMeta", "v1.Time"}
KUBERNETES_CORE = {
    "v1.Affinity", "v1.CSIVolumeSource", "v1.ConfigMapVolumeSource", "v1.ContainerPort",
    "v1.EmptyDirVolumeSource", "v1.EnvFromSource", "v1.EnvVar", "v1.HostAlias", "v1.Lifecycle",
    "v1.LocalObjectReference", "v1.PersistentVolumeClaim", "v1.PersistentVolumeClaimVolumeSource",
    "v1.PodDNSConfig", "v1.PodSecurityContext", "v1.Probe", "v1.ProjectedVolumeSource",
    "v1.ResourceRequirements", "v1.SecretVolumeSource", "v1.SecurityContext", "v1.Toleration",
    "v1.TopologySpreadConstraint", "v1.Volume", "v1.VolumeDevice", "v1.VolumeMount",
}
# Where the document does not say what the JSON is:
TEKTON_OVERRIDES = {
    # A param value is a string, an array of strings or an object of strings (ParamValue has its
    # own JSON (un)marshalling; the document describes the Go struct).
    "v1.ParamValue": {
        "type": ["string", "array", "object"],
        "items": {"type": "string"},
        "additionalProperties": {"type": "string"},
    },
    # metav1.Duration: a Go duration, as time.ParseDuration reads it (30m0s, 1h30m, 90s).
    "v1.Duration": {
        "type": "string",
        "pattern": r"^[-+]?(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)$",
    },
    # Status and opaque types the document names but does not define: left unchecked.
    "knative.Condition": {"type": "object"},
    "github.com.tektoncd.pipeline.pkg.apis.config.FeatureFlags": {"type": "object"},
    "k8s.io.apimachinery.pkg.runtime.RawExtension": {"type": "object"},
}
# Embedded Go structs whose fields JSON inlines but the document leaves out: TaskRef, PipelineRef
# and a step's ref embed ResolverRef (`resolver`, `params`: remote resolution).
TEKTON_INLINED = {"v1.TaskRef": "v1.ResolverRef", "v1.PipelineRef": "v1.ResolverRef", "v1.Ref": "v1.ResolverRef"}
# Keywords of the document that only document; every other keyword must be one this conversion
# knows, so that a new document cannot loosen the check unnoticed.
TEKTON_DOCUMENTING = {"description", "default"}


def tekton_schemas():
    """A strict JSON schema (draft 2020-12) for each of TEKTON_KINDS, from Tekton's OpenAPI v2
    document; and the registry of the Kubernetes definitions they refer to."""
    k8s, registry = kubernetes_definitions()
    with open(os.path.join(HERE, TEKTON_SWAGGER)) as f:
        tekton = json.load(f)["definitions"]

    def ref(name):
        if name in TEKTON_OVERRIDES or name in tekton:
            return {"$ref": "#/$defs/%s" % name}
        if name in KUBERNETES_META or name in KUBERNETES_CORE:
            package = "apimachinery.pkg.apis.meta" if name in KUBERNETES_META else "api.core"
            target = "io.k8s.%s.%s" % (package, name)
            assert target in k8s["$defs"], "no Kubernetes definition %s" % target
            return {"$ref": "%s#/$defs/%s" % (k8s["$id"], target)}
        raise KeyError("%s names %s, which neither it nor Kubernetes defines" % (TEKTON_SWAGGER, name))

    def convert(schema):
        if "$ref" in schema:
            return ref(schema["$ref"].rsplit("/", 1)[-1])
        out = {}
        for key, value in schema.items():
            if key == "properties":
                out[key] = {name: convert(property) for name, property in value.items()}
            elif key == "items":
                out[key] = convert(value)
            elif key == "additionalProperties":
                out[key] = convert(value) if isinstance(value, dict) else value
            elif key in ("type", "format", "required", "enum"):
                out[key] = value
            elif key not in TEKTON_DOCUMENTING and not key.startswith("x-"):
                raise KeyError("%s: keyword %s is not converted" % (TEKTON_SWAGGER, key))
        # Strict: an object whose fields are listed has no others.
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out

    definitions = {name: convert(schema) for name, schema in tekton.items()}
    definitions.update(TEKTON_OVERRIDES)
    for name, embedded in TEKTON_INLINED.items():
        definitions[name]["properties"].update(definitions[embedded]["properties"])
    schemas = {}
    for (api_version, kind), name in TEKTON_KINDS.items():
        schemas[(api_version, kind)] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$defs": definitions,
            "allOf": [{"$ref": "#/$defs/%s" % name}],
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}},
            "required": ["apiVersion", "kind", "metadata", "spec"],
        }
    return schemas, registry


def where(error):
    return ".".join(str(p) for p in error.absolute_path) or "(top)"


def check_manifests(files):
    documents, errors = [], []
    meta = None
    tekton = None
    for filename in files:
        with open(filename) as f:
            loaded = [d for d in yaml.safe_load_all(f) if d is not None]
        for document in loaded:
            documents.append(document)
            kind = document.get("kind", "?")
            name = (document.get("metadata") or {}).get("name", "?")
            label = "%s %s/%s" % (os.path.basename(filename), kind, name)
            if (document.get("apiVersion"), kind) in TEKTON_KINDS:
                tekton = tekton or tekton_schemas()
                schemas, registry = tekton
                schema = schemas[(document.get("apiVersion"), kind)]
                validator = jsonschema.Draft202012Validator(schema, registry=registry)
                for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
                    errors.append("%s: %s: %s" % (label, where(error), error.message))
                continue
            custom = CUSTOM_SCHEMAS.get((document.get("apiVersion"), kind))
            if custom:
                with open(os.path.join(HERE, custom)) as f:
                    validator = jsonschema.Draft202012Validator(json.load(f))
                for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
                    errors.append("%s: %s: %s" % (label, where(error), error.message))
                meta = meta or object_meta_validator()
                for error in meta.iter_errors(document.get("metadata") or {}):
                    errors.append("%s: metadata.%s: %s" % (label, where(error), error.message))
                continue
            try:
                kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                errors.append("%s: %s: %s" % (label, where(error), error.message))
            except kubernetes_validate.SchemaNotFoundError as error:
                errors.append("%s: no schema: %s" % (label, error.message))
    return {"documents": documents, "errors": errors}


# Tekton's variables that name what a Pipeline or a Task declares.
PARAM_REF = re.compile(r"\$\(params\.([A-Za-z0-9_.-]+?)(\[\*\]|\[[0-9]+\])?\)")
TASK_RESULT_REF = re.compile(r"\$\(tasks\.([A-Za-z0-9_-]+)\.results\.([A-Za-z0-9_.-]+?)(\[\*\]|\[[0-9]+\])?\)")
RESULT_PATH_REF = re.compile(r"\$\(results\.([A-Za-z0-9_.-]+?)\.path\)")
WORKSPACE_REF = re.compile(r"\$\(workspaces\.([A-Za-z0-9_-]+)\.[a-zA-Z]+\)")


def strings(node):
    """Every string in a document, at any depth."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def type_of(value):
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def check_params(who, declared, given, errors):
    """`given` (name -> value) against `declared` (ParamSpecs): each given is declared, with a
    value of its type; each declared without a default is given."""
    specs = {p["name"]: p for p in declared}
    for name, value in given.items():
        spec = specs.get(name)
        if spec is None:
            errors.append("%s: passes param %s, which is not declared" % (who, name))
        elif type_of(value) != spec.get("type", "string"):
            errors.append("%s: param %s is %s, declared %s" % (who, name, type_of(value), spec.get("type", "string")))
    for name, spec in specs.items():
        if "default" not in spec and name not in given:
            errors.append("%s: does not pass param %s, which has no default" % (who, name))


def check_tekton_wiring(manifests, run_file):
    documents = []
    for filename in (manifests, run_file):
        with open(filename) as f:
            documents.append([d for d in yaml.safe_load_all(f) if d is not None])
    resources, (run,) = documents
    errors = []
    pipelines = {d["metadata"]["name"]: d for d in resources if d.get("kind") == "Pipeline"}
    tasks = {d["metadata"]["name"]: d for d in resources if d.get("kind") == "Task"}
    run_spec = run["spec"]
    who = "PipelineRun %s" % run["metadata"]["name"]
    pipeline = pipelines.get(run_spec["pipelineRef"]["name"])
    if pipeline is None:
        return {"errors": ["%s: runs Pipeline %s, which is not among the manifests" % (who, run_spec["pipelineRef"]["name"])]}
    spec = pipeline["spec"]
    declared = {p["name"] for p in spec.get("params", [])}
    check_params(who, spec.get("params", []), {p["name"]: p["value"] for p in run_spec.get("params", [])}, errors)
    workspaces = {w["name"]: w for w in spec.get("workspaces", [])}
    bound = {w["name"] for w in run_spec.get("workspaces", [])}
    for name in sorted(bound - set(workspaces)):
        errors.append("%s: binds workspace %s, which the Pipeline does not declare" % (who, name))
    for name, workspace in workspaces.items():
        if not workspace.get("optional") and name not in bound:
            errors.append("%s: does not bind workspace %s, which is not optional" % (who, name))

    who = "Pipeline %s" % pipeline["metadata"]["name"]
    pipeline_tasks = {t["name"]: t for t in spec.get("tasks", []) + spec.get("finally", [])}
    for text in strings(spec):
        for match in PARAM_REF.finditer(text):
            if match.group(1) not in declared:
                errors.append("%s: %s: it declares no param %s" % (who, match.group(0), match.group(1)))
        for match in TASK_RESULT_REF.finditer(text):
            task, result = match.group(1), match.group(2)
            target = pipeline_tasks.get(task)
            task_spec = tasks.get(((target or {}).get("taskRef") or {}).get("name"), {}).get("spec", {})
            if result not in {r["name"] for r in task_spec.get("results", [])}:
                errors.append("%s: %s: task %s emits no result %s" % (who, match.group(0), task, result))
    for result in spec.get("results", []):
        if not (isinstance(result["value"], str) and TASK_RESULT_REF.fullmatch(result["value"])):
            errors.append("%s: result %s is not a task's result: %r" % (who, result["name"], result["value"]))
    for name, pipeline_task in pipeline_tasks.items():
        where = "%s: task %s" % (who, name)
        for after in pipeline_task.get("runAfter", []):
            if after not in pipeline_tasks:
                errors.append("%s: runs after %s, which is no task of the Pipeline" % (where, after))
        task_name = (pipeline_task.get("taskRef") or {}).get("name")
        task = tasks.get(task_name)
        if task is None:
            errors.append("%s: refers to Task %s, which is not among the manifests" % (where, task_name))
            continue
        task_spec = task["spec"]
        check_params(where, task_spec.get("params", []), {p["name"]: p["value"] for p in pipeline_task.get("params", [])}, errors)
        task_workspaces = {w["name"]: w for w in task_spec.get("workspaces", [])}
        given = {w["name"]: w.get("workspace", w["name"]) for w in pipeline_task.get("workspaces", [])}
        for task_workspace, pipeline_workspace in given.items():
            if task_workspace not in task_workspaces:
                errors.append("%s: binds workspace %s, which Task %s does not declare" % (where, task_workspace, task_name))
            elif pipeline_workspace not in workspaces:
                errors.append("%s: binds the Pipeline's workspace %s, which it does not declare" % (where, pipeline_workspace))
            elif workspaces[pipeline_workspace].get("optional") and not task_workspaces[task_workspace].get("optional"):
                errors.append("%s: binds optional workspace %s to %s, which Task %s needs" % (where, pipeline_workspace, task_workspace, task_name))
        for task_workspace, declaration in task_workspaces.items():
            if not declaration.get("optional") and task_workspace not in given:
                errors.append("%s: does not bind workspace %s, which Task %s needs" % (where, task_workspace, task_name))

    for task_name, task in tasks.items():
        who = "Task %s" % task_name
        task_spec = task["spec"]
        params = {p["name"] for p in task_spec.get("params", [])}
        results = {r["name"] for r in task_spec.get("results", [])}
        task_workspaces = {w["name"] for w in task_spec.get("workspaces", [])}
        for text in strings(task_spec):
            for match in PARAM_REF.finditer(text):
                if match.group(1) not in params:
                    errors.append("%s: %s: it declares no param %s" % (who, match.group(0), match.group(1)))
            for match in RESULT_PATH_REF.finditer(text):
                if match.group(1) not in results:
                    errors.append("%s: %s: it declares no result %s" % (who, match.group(0), match.group(1)))
            for match in WORKSPACE_REF.finditer(text):
                if match.group(1) not in task_workspaces:
                    errors.append("%s: %s: it declares no workspace %s" % (who, match.group(0), match.group(1)))
    return {"errors": errors}


# Grafana's built-in variables a query may use, and a value that parses in their place; the
# dashboard's own variables (its templating list) are replaced by a label value.
GRAFANA_BUILTINS = [("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")]
RATE_FUNCTIONS = {"rate", "irate", "increase"}


def queries(node):
    """Every `expr` of every target of every panel, rows' nested panels included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "targets" and isinstance(value, list):
                for target in value:
                    if isinstance(target, dict) and "expr" in target:
                        yield target["expr"]
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for value in node:
            yield from queries(value)


def variable_queries(dashboard):
    """The series selectors of the dashboard's `label_values(SELECTOR, label)` variables."""
    for variable in (dashboard.get("templating") or {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        query = (query or "").strip()
        if query.startswith("label_values(") and query.endswith(")"):
            selector = query[len("label_values(") : -1].rsplit(",", 1)[0]
            yield selector


def metric_uses(expr, uses, rated=False):
    """Each metric selected in `expr` -> how: "rated" (inside rate/irate/increase) or "raw"."""
    import promql_parser

    if isinstance(expr, promql_parser.VectorSelector):
        if expr.name:
            uses.setdefault(expr.name, set()).add("rated" if rated else "raw")
        return
    if isinstance(expr, promql_parser.Call):
        inside = expr.func.name in RATE_FUNCTIONS
        for child in expr.args or []:
            metric_uses(child, uses, rated or inside)
        return
    for attribute in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(expr, attribute, None)
        if child is not None and not isinstance(child, (str, int, float)):
            metric_uses(child, uses, rated)


def check_promql(dashboard_file):
    import promql_parser

    with open(dashboard_file) as f:
        dashboard = json.load(f)
    variables = [
        ("$" + v["name"], "sample")
        for v in (dashboard.get("templating") or {}).get("list", [])
        if v.get("type") != "datasource"
    ]
    substitutions = GRAFANA_BUILTINS + sorted(variables, key=lambda v: -len(v[0]))
    uses, errors, count = {}, [], 0
    for expr in list(queries(dashboard)) + list(variable_queries(dashboard)):
        count += 1
        text = expr
        for variable, value in substitutions:
            text = text.replace("${%s}" % variable[1:], value).replace(variable, value)
        if "$" in text:
            errors.append("%r: uses a variable the dashboard does not define" % expr)
            continue
        try:
            parsed = promql_parser.parse(text)
        except Exception as error:  # the parser raises ValueError with the reason
            errors.append("%r: %s" % (expr, error))
            continue
        found = {}
        metric_uses(parsed, found)
        if not found:
            errors.append("%r: queries no metric" % expr)
        for name, how in found.items():
            uses.setdefault(name, set()).update(how)
    return {
        "queries": count,
        "metrics": {name: sorted(how) for name, how in sorted(uses.items())},
        "errors": errors,
    }


def parse_containerfile(filename):
    import dockerfile

    try:
        commands = dockerfile.parse_file(filename)
    except dockerfile.GoParseError as error:
        return {"instructions": [], "errors": [str(error)]}
    instructions = [
        {"cmd": c.cmd.upper(), "flags": list(c.flags), "value": list(c.value), "json": c.json} for c in commands
    ]
    # The parser is lexical: it takes any word as an instruction, a builder would not.
    errors = [
        "line %d: unknown instruction %s" % (c.start_line, c.cmd)
        for c in commands
        if c.cmd.upper() not in INSTRUCTIONS
    ]
    return {"instructions": instructions, "errors": errors}


INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}


def main(argv):
    modes = {"manifests": lambda: check_manifests(argv[2:]), "promql": lambda: check_promql(argv[2]),
             "containerfile": lambda: parse_containerfile(argv[2]),
             "tekton-wiring": lambda: check_tekton_wiring(argv[2], argv[3])}
    if len(argv) < 3 or argv[1] not in modes or (argv[1] == "tekton-wiring" and len(argv) < 4):
        print(__doc__, file=sys.stderr)
        return 2
    result = modes[argv[1]]()
    json.dump(result, sys.stdout)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
