#!/usr/bin/env bash
# Tests of the Python client and Django integration against a real fieldkey sidecar.
#
#   clients/python/run-tests.sh [pytest args...]
#
# Makes (or reuses) a venv with the exact versions of requirements-test.txt under
# ${FIELDKEY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fieldkey}/venv-pyclient-<hash>,
# installs this package into it (its build step generates the gRPC stubs from
# ../../proto), type-checks it (mypy --strict), and runs pytest.
#
# The sidecar binary: $FIELDKEY_BIN, else ${CARGO_TARGET_DIR:-<repo>/target}/debug/fieldkey.
# The database: $FIELDKEY_TEST_DATABASE_URL (a throwaway database is created there and
# dropped), else PostgreSQL on 127.0.0.1:5432 if it answers, else SQLite
# (FIELDKEY_TEST_SQLITE=1 forces SQLite).
set -euo pipefail
cd "$(dirname "$0")"
HERE="$(pwd)"
REPO="$(cd ../.. && pwd)"

CACHE="${FIELDKEY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fieldkey}"
PY="${FIELDKEY_PYTHON:-python3}"
HASH="$( { cat requirements-test.txt; "$PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-12)"
VENV="$CACHE/venv-pyclient-$HASH"
log() { printf '[python client] %s\n' "$*" >&2; }

if [ ! -f "$VENV/.complete" ]; then
    log "creating $VENV"
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements-test.txt
    touch "$VENV/.complete"
fi

export FIELDKEY_BIN="${FIELDKEY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/fieldkey}"
if [ ! -x "$FIELDKEY_BIN" ]; then
    log "no fieldkey binary at $FIELDKEY_BIN: run 'cargo build' first or set FIELDKEY_BIN"
    exit 1
fi

# The package's own build step makes the stubs (no build isolation: the pinned
# setuptools and grpcio-tools of the venv build it).
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall .
rm -rf build

log "mypy --strict"
"$VENV/bin/mypy" --cache-dir "$VENV/.mypy_cache" --config-file pyproject.toml

log "pytest (sidecar: $FIELDKEY_BIN)"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
