#!/usr/bin/env bash
# Validates the Kubernetes manifests (deploy/k8s/) and the Dockerfile, offline:
#
#   1. deploy/k8s/base/policies/ is a byte-identical copy of policies/, and every file
#      of policies/ (README.md aside) is listed in the base's configMapGenerator;
#   2. the kustomizations (base and every overlay) render with kustomize itself
#      (pykustomize: kustomize's Go API as a library, deploy/k8s/kustomize-requirements.txt);
#   3. every rendered object, and the Job templates of deploy/k8s/jobs/, pass
#      kubernetes-validate --strict against the bundled schemas of one Kubernetes version
#      (K8S_VERSION below); Linkerd policy objects instead pass jsonschema against their
#      CRD schemas in deploy/k8s/schemas/;
#   4. the fieldkey configuration files parse as TOML and use only keys that
#      src/config.rs (and src/config/*.rs) declares; with a fieldkey binary (FIELDKEY_BIN, else a debug build
#      of the working tree, the one `cargo test` reuses), the containers' command lines
#      pass the CLI's parser, and `fieldkey serve` starts on every rendered configuration
#      with the rendered policies ConfigMap (config keys, Cedar policies against the
#      schema, limits, rotation policy), on loopback with a throw-away store;
#   5. checkov (kubernetes framework over the rendered manifests, dockerfile framework
#      over the Dockerfile) reports no failed check. A check may only be skipped inline,
#      with its reason (checkov.io/skipN annotations, `# checkov:skip=ID:reason`).
#
# The tools come from PyPI, pinned (deploy/k8s/validate-requirements.txt), into a venv
# cached under ${FIELDKEY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fieldkey}, keyed by
# a hash of the pins: a warm run takes seconds. Nothing is downloaded at run time
# (kubernetes-validate uses the schemas its package bundles).
#
# Exit status: 0 when everything passes, 1 on any failure (the reasons are printed).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION="${K8S_VERSION:-1.33.0}"
PYTHON="${PYTHON:-python3}"
reqs=deploy/k8s/validate-requirements.txt
kreqs=deploy/k8s/kustomize-requirements.txt
cache="${FIELDKEY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fieldkey}"
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$(cat "$reqs" "$kreqs" <(echo "python $pyver") | sha256sum | cut -c1-16)"
venv="$cache/venv-k8s-$key"

if [[ ! -f "$venv/.complete" ]]; then
    echo "validate-k8s: installing the validators into $venv (once per set of pins)"
    # Built in place and marked complete only at the end: an interrupted install is
    # thrown away and redone by the next run.
    rm -rf "$venv"
    mkdir -p "$cache"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
        -c "$reqs" kubernetes-validate checkov jsonschema
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
        --no-deps --ignore-requires-python --require-hashes -r "$kreqs"
    touch "$venv/.complete"
fi

# The fieldkey binary for the command-line and configuration checks: FIELDKEY_BIN, or
# a debug build of the working tree (the one `cargo test` builds and reuses: in CI this
# costs nothing extra). FIELDKEY_BIN=none skips those checks.
if [[ -z "${FIELDKEY_BIN:-}" ]] && command -v cargo >/dev/null; then
    echo "validate-k8s: cargo build --bin fieldkey (for the command-line and configuration checks)"
    cargo build --locked --quiet --bin fieldkey
    FIELDKEY_BIN="${CARGO_TARGET_DIR:-target}/debug/fieldkey"
fi
[[ "${FIELDKEY_BIN:-}" == none ]] && FIELDKEY_BIN=
export FIELDKEY_BIN="${FIELDKEY_BIN:-}"
export K8S_VERSION VENV="$venv"
# checkov: no network (no guideline download, no version check, no platform).
export BC_SKIP_MAPPING=TRUE CHECKOV_SKIP_VERSION_CHECK=TRUE LOG_LEVEL=ERROR

exec "$venv/bin/python" - <<'PY'
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

import pykustomize

ROOT = Path.cwd()
K8S = ROOT / "deploy" / "k8s"
VERSION = os.environ["K8S_VERSION"]
VENV = Path(os.environ["VENV"])
FIELDKEY_BIN = os.environ.get("FIELDKEY_BIN", "")
IMAGE = "registry.example.org/fieldkey"

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"  FAIL {msg}")


def section(title: str) -> None:
    print(f"-- {title}")


# 1. policies ---------------------------------------------------------------------
section("policies: deploy/k8s/base/policies/ against policies/")
src_dir, copy_dir = ROOT / "policies", K8S / "base" / "policies"
kust = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
listed = set()
for gen in kust.get("configMapGenerator", []):
    if gen["name"] == "fieldkey-policies":
        for f in gen.get("files", []):
            listed.add(f.split("=", 1)[-1])
wanted = sorted(p.name for p in src_dir.iterdir() if p.is_file() and p.name != "README.md")
copies = sorted(p.name for p in copy_dir.iterdir() if p.is_file())
for name in wanted:
    copy = copy_dir / name
    if not copy.exists():
        fail(f"policies/{name} has no copy in deploy/k8s/base/policies/ (cp policies/{name} deploy/k8s/base/policies/)")
    elif copy.read_bytes() != (src_dir / name).read_bytes():
        fail(f"deploy/k8s/base/policies/{name} differs from policies/{name} (cp policies/{name} deploy/k8s/base/policies/)")
    if f"policies/{name}" not in listed:
        fail(f"policies/{name} is not in the fieldkey-policies configMapGenerator of deploy/k8s/base/kustomization.yaml")
for name in copies:
    if name not in wanted:
        fail(f"deploy/k8s/base/policies/{name} is not in policies/ (stale copy?)")
if not failures:
    print(f"  {len(wanted)} policy files: copies identical, all in the configMapGenerator")


# 2. render -------------------------------------------------------------------------
section("kustomize build (pykustomize " + pykustomize.native_version() + ")")
targets = [K8S / "base"] + sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
rendered: dict[str, list[dict]] = {}


async def render_all() -> None:
    for t in targets:
        rel = t.relative_to(K8S).as_posix()
        try:
            r = await pykustomize.build_json(str(t))
        except Exception as e:  # noqa: BLE001 - report whatever kustomize says
            fail(f"kustomize build deploy/k8s/{rel}: {e}")
            continue
        rendered[rel] = list(r.resources)
        print(f"  deploy/k8s/{rel}: {len(r.resources)} objects")


asyncio.run(render_all())
for f in sorted((K8S / "jobs").glob("*.yaml")):
    rel = f.relative_to(K8S).as_posix()
    rendered[rel] = [d for d in yaml.safe_load_all(f.read_text()) if d]
    print(f"  deploy/k8s/{rel}: {len(rendered[rel])} objects (template, not kustomized)")


# 3. schemas ------------------------------------------------------------------------
section(f"schemas: kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''} --strict, Kubernetes {VERSION}; Linkerd CRDs with jsonschema")
linkerd_schemas = {}
for p in sorted((K8S / "schemas").glob("*.json")):
    # <kind>-<group prefix>-<version>.json, e.g. server-policy-v1beta3.json
    kind, _, version = p.stem.rpartition("-")
    linkerd_schemas[(kind.split("-")[0], version)] = json.loads(p.read_text())
kv = {"passed": 0, "failed": 0}
js = {"passed": 0, "failed": 0}
for rel, objs in rendered.items():
    for o in objs:
        what = f"deploy/k8s/{rel}: {o.get('kind')}/{o.get('metadata', {}).get('namespace', '-')}/{o.get('metadata', {}).get('name')}"
        group = o.get("apiVersion", "").split("/")[0]
        if group.endswith("linkerd.io"):
            version = o["apiVersion"].split("/")[-1]
            schema = linkerd_schemas.get((o["kind"].lower(), version))
            if schema is None:
                js["failed"] += 1
                fail(f"{what}: no schema deploy/k8s/schemas/{o['kind'].lower()}-*-{version}.json")
                continue
            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(o), key=lambda e: list(e.path))
            if errors:
                js["failed"] += 1
                for e in errors:
                    fail(f"{what}: {'/'.join(map(str, e.path)) or '(root)'}: {e.message}")
            else:
                js["passed"] += 1
            continue
        try:
            kubernetes_validate.validate(o, VERSION, strict=True)
            kv["passed"] += 1
        except kv_utils.ValidationError as e:
            kv["failed"] += 1
            fail(f"{what}: {'/'.join(map(str, e.path)) or '(root)'}: {e.message}")
        except Exception as e:  # SchemaNotFound, VersionNotSupported, ...
            kv["failed"] += 1
            fail(f"{what}: {type(e).__name__}: {e}")
print(f"  kubernetes-validate: {kv['passed']} passed, {kv['failed']} failed")
print(f"  jsonschema (Linkerd): {js['passed']} passed, {js['failed']} failed")


# 4. fieldkey configuration and command lines ----------------------------------------
section("fieldkey: configuration keys and command lines")
declared = set()
config_sources = ["src/config.rs", "src/transport/mtls.rs"]
config_sources += sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "src/config").glob("*.rs"))
for src in config_sources:
    declared |= set(re.findall(r"^\s*pub (\w+):", (ROOT / src).read_text(), re.M))


def keys(table: dict, prefix: str = ""):
    for k, v in table.items():
        path = f"{prefix}{k}"
        if prefix == "blind_index.fields.":
            # a field name, then its profile
            for kk in (v if isinstance(v, dict) else {}):
                yield f"{path}.{kk}", kk
            continue
        yield path, k
        if isinstance(v, dict):
            yield from keys(v, path + ".")


configs = sorted(K8S.rglob("*.toml")) + sorted((ROOT / "deploy" / "docker").glob("*.toml"))
n_cfg = 0
for c in configs:
    rel = c.relative_to(ROOT).as_posix()
    try:
        doc = tomllib.loads(c.read_text())
    except tomllib.TOMLDecodeError as e:
        fail(f"{rel}: not TOML: {e}")
        continue
    if c.parent.name == "policies":
        continue  # loaded by `fieldkey serve` below
    if "name" in doc and "table" in doc:  # a re-encryption job spec
        spec_keys = set(re.findall(r"^\s*pub (\w+):", (ROOT / "src/jobs/spec.rs").read_text(), re.M))
        for path, k in keys(doc):
            if k not in spec_keys and not path.startswith("columns"):
                fail(f"{rel}: key {path} is not a job spec key (src/jobs/spec.rs)")
        for col in doc.get("columns", []):
            for k in col:
                if k not in spec_keys:
                    fail(f"{rel}: key columns.{k} is not a job spec key (src/jobs/spec.rs)")
        continue
    n_cfg += 1
    for path, k in keys(doc):
        if k not in declared:
            fail(f"{rel}: key {path} is not a configuration key of fieldkey (src/config.rs)")
print(f"  {n_cfg} configuration files checked against src/config.rs")

cmdlines = []
for rel, objs in rendered.items():
    for o in objs:
        spec = o.get("spec", {})
        pod = (spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
               or spec.get("template", {}).get("spec") or {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            if c.get("image", "").startswith(IMAGE):
                cmdlines.append((f"deploy/k8s/{rel}: {o['kind']}/{o['metadata']['name']}/{c['name']}", c.get("command", []) + c.get("args", [])))
if FIELDKEY_BIN:
    for what, args in cmdlines:
        r = subprocess.run([FIELDKEY_BIN, *args, "--help"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        if r.returncode != 0:
            fail(f"{what}: `fieldkey {' '.join(args)}` is refused by the CLI: {r.stderr.strip().splitlines()[:3]}")
    print(f"  {len(cmdlines)} command lines accepted by the CLI's parser")
else:
    print(f"  {len(cmdlines)} command lines NOT checked: no fieldkey binary")


def serve_check(what: str, config_text: str, policies: dict[str, str]) -> None:
    """Starts `fieldkey serve` on `config_text` and the policy files (as mounted), on
    loopback with a throw-away SQLite store and local KMS, until it serves; then stops it.
    The configuration is parsed as fieldkey parses it (unknown keys are errors), and every
    policy file is loaded and validated against fieldkey's Cedar schema."""
    with tempfile.TemporaryDirectory(prefix="fieldkey-serve-") as t:
        t = Path(t)
        (t / "policies").mkdir()
        for name, text in policies.items():
            (t / "policies" / name).write_text(text)
        # The erasure ledger is a PostgreSQL URL there; it cannot be overridden by a flag.
        (t / "fieldkey.toml").write_text(re.sub(r"(?m)^ledger\s*=.*$", "", config_text))
        log = t / "log"
        with log.open("w") as out:
            p = subprocess.Popen(
                [FIELDKEY_BIN, "serve", "--config", str(t / "fieldkey.toml"), "--data-dir", str(t / "data"),
                 "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                 "--policies", str(t / "policies"), "--rotation-policy", str(t / "policies" / "rotation.toml")],
                stdout=out, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", "HOME": str(t)},
            )
            deadline = time.monotonic() + 60
            while p.poll() is None and time.monotonic() < deadline and "serving gRPC on TCP" not in log.read_text():
                time.sleep(0.1)
            up = p.poll() is None and "serving gRPC on TCP" in log.read_text()
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        text = log.read_text()
        loaded = re.search(r"authorization policies loaded.*", text)
        if not up:
            fail(f"{what}: fieldkey serve did not start: {text.strip().splitlines()[-1:] or '(no output)'}")
        elif not loaded or any(f'"{n}"' not in loaded.group(0) for n in policies if n.endswith(".cedar")):
            fail(f"{what}: not every policy file was loaded: {loaded.group(0) if loaded else '(none)'}")


if FIELDKEY_BIN:
    n_serve = 0
    for rel, objs in rendered.items():
        cms = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "ConfigMap"}
        pol = next((o for n, o in cms.items() if n.startswith("fieldkey-policies")), None)
        cfg = next((o for n, o in cms.items() if n.startswith("fieldkey-config")), None)
        if not (pol and cfg):
            continue
        for key, text in cfg["data"].items():
            serve_check(f"deploy/k8s/{rel}: ConfigMap {cfg['metadata']['name']} {key}", text, pol["data"])
            n_serve += 1
    serve_check("deploy/docker/fieldkey.toml", (ROOT / "deploy/docker/fieldkey.toml").read_text(),
                {p.name: p.read_text() for p in (ROOT / "policies").iterdir() if p.name != "README.md"})
    n_serve += 1
    print(f"  {n_serve} configurations started by `fieldkey serve` with their policies")


# 5. checkov ------------------------------------------------------------------------
section("checkov")
with tempfile.TemporaryDirectory(prefix="fieldkey-k8s-") as tmp:
    files = []
    for rel, objs in rendered.items():
        out = Path(tmp) / (rel.replace("/", "_").removesuffix(".yaml") + ".yaml")
        out.write_text(yaml.safe_dump_all(objs, sort_keys=False))
        files.append(out)
    started = time.monotonic()
    # One run per framework: checkov 3.3 running both frameworks in one process may hang
    # in its parallel runner after the checks are done.
    for fw, targets_ in (("kubernetes", files), ("dockerfile", [ROOT / "Dockerfile"])):
        r = subprocess.run(
            [str(VENV / "bin" / "checkov"), "--compact", "--skip-download",
             "--framework", fw, "-o", "json", *[a for f in targets_ for a in ("-f", str(f))]],
            capture_output=True, text=True, cwd=ROOT, timeout=600,
        )
        try:
            reports = json.loads(r.stdout)
        except json.JSONDecodeError:
            fail(f"checkov {fw} did not report (exit {r.returncode}): {r.stderr[-2000:]}")
            continue
        for rep in reports if isinstance(reports, list) else [reports]:
            if rep.get("check_type") != fw:
                fail(f"checkov {fw}: unexpected report {str(rep)[:300]}")
                continue
            s = rep.get("summary", {})
            res = rep.get("results", {})
            print(f"  checkov {fw}: {s.get('passed', 0)} passed, {s.get('failed', 0)} failed, "
                  f"{s.get('skipped', 0)} skipped, {s.get('parsing_errors', 0)} parsing errors "
                  f"({s.get('resource_count', 0)} resources, checkov {s.get('checkov_version', '?')})")
            if not s.get("passed"):
                fail(f"checkov {fw} ran no checks")
            for c in res.get("failed_checks", []):
                fail(f"checkov {c['check_id']} {c['check_name']}: {c.get('resource')} in {Path(c.get('file_path', '')).name}")
            for c in res.get("skipped_checks", []):
                reason = ((c.get("check_result") or {}).get("suppress_comment") or "").strip()
                print(f"    skipped {c['check_id']} on {c.get('resource')} ({Path(c.get('file_path', '')).name}): {reason}")
                if not reason or reason.lower() == "no comment provided":
                    fail(f"checkov {c['check_id']} on {c.get('resource')} is skipped without a reason")
            if s.get("parsing_errors"):
                fail(f"checkov {fw}: parsing errors in {res.get('parsing_errors')}")
    print(f"  ({time.monotonic() - started:.1f} s)")

if failures:
    print(f"validate-k8s: FAILED ({len(failures)} problems above)")
    sys.exit(1)
print("validate-k8s: ok")
PY
