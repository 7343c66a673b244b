#!/usr/bin/env bash
# The C++ tests and a sample of the Python tests under AddressSanitizer + UBSan:
#
#   tests/sanitize.sh [PYTHON [PYTEST_ARGS...]]
#
# Builds into build-sanitize/ (the C++ tests with -DFASTPRUNE_SANITIZE=ON, and
# a separate copy of the fastprune package whose _C is built with
# FASTPRUNE_SANITIZE=1), leaving the normal build and install alone. The Python
# tests run with that copy first on PYTHONPATH and the ASan runtime preloaded
# (Python itself is not instrumented, so its leaks are not reported). Any ASan
# or UBSan report aborts the run. Default sample: the op tests, the reference
# comparisons and the error tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="$(command -v "${1:-python3}")"
shift || true
OUT=build-sanitize

echo "== C++ tests under ASan + UBSan"
BUILD_DIR="$OUT/cmake" bash tests/cpp/run.sh "$PYTHON" -DFASTPRUNE_SANITIZE=ON

echo "== Python tests under ASan + UBSan"
FASTPRUNE_SANITIZE=1 "$PYTHON" setup.py -q build_ext --build-lib "$OUT/python" --build-temp "$OUT/ext"
cp python/fastprune/*.py "$OUT/python/fastprune/"
# The ASan runtime must come first; libstdc++ too, or ASan cannot intercept
# the C++ throws of the extension (python itself does not link libstdc++).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
PYTHONPATH="$PWD/$OUT/python" "$PYTHON" - <<'PY'
import fastprune, os
assert fastprune.__file__.startswith(os.environ["PYTHONPATH"]), fastprune.__file__
print("fastprune from", os.path.dirname(fastprune.__file__))
PY
if [ "$#" -eq 0 ]; then
  set -- tests/test_ops.py tests/test_prune_reference.py tests/test_errors.py
fi
# --capture=sys: a sanitizer report (written to fd 2) reaches the terminal.
PYTHONPATH="$PWD/$OUT/python" "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys -m "not slow" "$@"
