#!/usr/bin/env bash
# The README's benchmark command: set-up (as the tests do), then the
# benchmark: bench.py (fastprune vs torch.nn.utils.prune, every workload) and
# in_place_bench.py (the 7B-shaped model pruned in place: about 8 minutes and
# 14 GB of memory). Arguments go to bench.py; --out and --quick to both.
set -euo pipefail
source "$(dirname "$0")/../.ci/env.sh"
cd "$ROOT"
"$PY" benchmarks/bench.py "$@"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) exit 0 ;;
    --quick) extra+=(--quick) ;;
    --out) [ $# -ge 2 ] && extra+=(--out "$2") && shift ;;
  esac
  shift
done
"$PY" benchmarks/in_place_bench.py "${extra[@]}"
