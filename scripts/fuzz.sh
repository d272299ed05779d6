#!/usr/bin/env bash
# Fuzzes every parser of untrusted input (docs/FUZZING.md): builds the cargo-fuzz targets
# in fuzz/ and runs each on its checked-in corpus (fuzz/corpus/<target>).
#
#   scripts/fuzz.sh                 each target for $FUZZ_SECONDS (default 20) seconds,
#                                   no sanitizer: the short run CI does
#   scripts/fuzz.sh --long          each target for $FUZZ_SECONDS (default 600) seconds,
#                                   keeping what it learns in fuzz/scratch/<target>
#   scripts/fuzz.sh --write-seeds   rewrites fuzz/corpus/<target> from the real code
#   scripts/fuzz.sh [options] TARGET...   only these targets
#
# Options: --seconds N (per target), --sanitizer none|address (default none; address
# needs its own build, about 20 minutes cold), --runs N (stop after N executions instead
# of a time; for a fixed-size run).
# Environment: FIELDKEY_FUZZ_TARGET_DIR (build cache, default
# $HOME/.cache/fieldkey/fuzz-target), FUZZ_SECONDS.
#
# A crash (a panic, a failed property, a timeout or an out-of-memory) fails the script;
# the failing input is printed (path, base64, the command that replays it) and kept in
# fuzz/artifacts/<target>/. Runs on the stable toolchain: RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass the flags it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
TARGETS_ALL=(envelope blind_index receipt audit_export job_spec config)

mode=short
seconds=""
runs=""
sanitizer=none
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --long) mode=long ;;
        --write-seeds) mode=seeds ;;
        --seconds) seconds="$2"; shift ;;
        --runs) runs="$2"; shift ;;
        --sanitizer) sanitizer="$2"; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1") ;;
    esac
    shift
done
[ ${#targets[@]} -gt 0 ] || targets=("${TARGETS_ALL[@]}")
if [ -z "$seconds" ]; then
    if [ "$mode" = long ]; then seconds="${FUZZ_SECONDS:-600}"; else seconds="${FUZZ_SECONDS:-20}"; fi
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
target_dir="${FIELDKEY_FUZZ_TARGET_DIR:-$HOME/.cache/fieldkey/fuzz-target}"

installed="$(cargo fuzz --version 2>/dev/null || true)"
if [ "$installed" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION (found: ${installed:-none})"
    CARGO_TARGET_DIR="$target_dir/cargo-fuzz-install" \
        cargo install --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi

# The lock file is checked in: refuse to build if it would change.
cargo fetch --locked --manifest-path fuzz/Cargo.toml

echo "== building fuzz targets (sanitizer: $sanitizer, cache: $target_dir)"
build_start=$SECONDS
build() {
    # The compile lines of a cold build (hundreds) are left out of the log.
    cargo fuzz build --sanitizer "$sanitizer" --target-dir "$target_dir" "$@" 2>&1 \
        | { grep -v '^ *Compiling ' || true; }
    return "${PIPESTATUS[0]}"
}
if [ ${#targets[@]} -eq ${#TARGETS_ALL[@]} ]; then
    build
else
    for t in "${targets[@]}"; do build "$t"; done
fi
echo "== built in $((SECONDS - build_start)) s"

if [ "$mode" = seeds ]; then
    for t in "${targets[@]}"; do
        # Reproducers of fixed findings (regression-*) stay; the rest is made anew.
        mkdir -p "fuzz/corpus/$t"
        find "fuzz/corpus/$t" -type f ! -name 'regression-*' -delete
        empty="$(mktemp -d)"
        # The target's init writes its seeds; -runs=0 on an empty corpus runs nothing else.
        FIELDKEY_FUZZ_WRITE_SEEDS="fuzz/corpus/$t" cargo fuzz run --sanitizer "$sanitizer" \
            --target-dir "$target_dir" "$t" "$empty" -- -runs=0 >/dev/null 2>&1
        rm -rf "$empty"
        echo "$t: $(ls "fuzz/corpus/$t" | wc -l) seeds, $(cat "fuzz/corpus/$t"/* | wc -c) bytes"
    done
    exit 0
fi

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
failed=()
summary=()
for t in "${targets[@]}"; do
    if [ "$mode" = long ]; then
        work="fuzz/scratch/$t"
        mkdir -p "$work"
    else
        work="$logs/corpus-$t"
        mkdir -p "$work"
    fi
    limit=(-max_total_time="$seconds")
    [ -z "$runs" ] || limit=(-runs="$runs")
    if [ -n "$runs" ]; then echo "== $t ($runs runs)"; else echo "== $t ($seconds s)"; fi
    start=$SECONDS
    set +e
    cargo fuzz run --sanitizer "$sanitizer" --target-dir "$target_dir" "$t" \
        "$work" "fuzz/corpus/$t" -- \
        "${limit[@]}" -timeout=10 -rss_limit_mb=4096 -max_len=65536 \
        -dict="fuzz/dict/$t.dict" -print_final_stats=1 \
        >"$logs/$t.log" 2>&1
    rc=$?
    set -e
    took=$((SECONDS - start))
    # libFuzzer's last status line: "#<execs> DONE cov: <edges> ft: <features> corp: ..."
    last="$(grep -E '^#[0-9]+' "$logs/$t.log" | tail -1 || true)"
    execs="$(grep -E '^stat::number_of_executed_units:' "$logs/$t.log" | awk '{print $2}' || true)"
    if [ $rc -ne 0 ]; then
        failed+=("$t")
        echo "!! $t FAILED (exit $rc) after ${took} s; the end of its log:"
        tail -n 60 "$logs/$t.log"
        for a in $(grep -oE 'fuzz/artifacts/[^ ]+' "$logs/$t.log" | sort -u); do
            [ -f "$a" ] || continue
            echo "!! reproducer: $a ($(wc -c <"$a") bytes), base64:"
            base64 -w 100 "$a"
            echo "!! replay: RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer --target-dir '$target_dir' $t $a"
        done
    else
        echo "   ${execs:-?} executions in ${took} s; $last"
    fi
    summary+=("$t: ${execs:-?} execs, ${took} s, ${last:-no status line}")
done

echo "== summary"
printf '   %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets passed"
