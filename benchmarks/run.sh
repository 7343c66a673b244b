#!/usr/bin/env bash
# The README's benchmark command: set-up (as the tests do), then the benchmark.
set -euo pipefail
source "$(dirname "$0")/../.ci/env.sh"
cd "$ROOT"
"$PY" benchmarks/bench.py "$@"
