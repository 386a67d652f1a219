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
"""

import json
import os
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


def object_meta_validator():
    """Kubernetes' ObjectMeta, strict, from the schemas kubernetes-validate bundles: custom
    resources' metadata is checked as a built-in resource's is."""
    import importlib_resources
    from referencing import Registry, Resource

    root = importlib_resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")
    directory = root.joinpath("v%s-local-strict" % KUBERNETES_VERSION)
    definitions = json.loads(directory.joinpath("_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    meta = {"$ref": "%s#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta" % definitions["$id"]}
    return jsonschema.Draft202012Validator(meta, registry=registry)


def where(error):
    return ".".join(str(p) for p in error.absolute_path) or "(top)"


def check_manifests(files):
    documents, errors = [], []
    meta = None
    for filename in files:
        with open(filename) as f:
            loaded = [d for d in yaml.safe_load_all(f) if d is not None]
        for document in loaded:
            documents.append(document)
            kind = document.get("kind", "?")
            name = (document.get("metadata") or {}).get("name", "?")
            label = "%s %s/%s" % (os.path.basename(filename), kind, name)
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
             "containerfile": lambda: parse_containerfile(argv[2])}
    if len(argv) < 3 or argv[1] not in modes:
        print(__doc__, file=sys.stderr)
        return 2
    result = modes[argv[1]]()
    json.dump(result, sys.stdout)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
