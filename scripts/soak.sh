#!/usr/bin/env bash
# Soak (not in CI; BENCHMARKS.md "Soak"): starts `fieldkey serve` on the embedded defaults
# (release build) and drives mixed traffic at it for N minutes (benches/soak.rs), printing
# a line per minute: calls/s per kind, errors by status code, unexpected outcomes, and the
# sidecar's RSS (now, highest sampled in the minute, VmHWM).
#
#   scripts/soak.sh                                   10 minutes
#   scripts/soak.sh --minutes 2 --concurrency 32      options of benches/soak.rs:
#                                                     --minutes, --interval-secs,
#                                                     --concurrency, --connections
# Linux only (reads /proc/<pid>/status).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --bench soak -- "$@"
