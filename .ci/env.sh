# Sourced by .ci/run and benchmarks/run.sh: makes (or reuses) a virtual
# environment outside the checkout with the pinned CPU torch, and builds
# fastprune into it. Override the location with FASTPRUNE_VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTPRUNE_VENV:-$HOME/.cache/fastprune-venv}"
TORCH_VERSION="${FASTPRUNE_TORCH:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "== installing torch==$TORCH_VERSION (pinned: a bare 'torch' would fetch a multi-GB CUDA build)"
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
"$PY" -m pip install -q numpy pytest hypothesis matplotlib setuptools wheel
echo "== building fastprune"
(cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
