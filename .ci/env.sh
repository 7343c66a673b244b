# Sourced by .ci/run and benchmarks/run.sh: makes (or reuses) a virtual
# environment outside the checkout with the pinned CPU torch, and builds
# fastprune into it. Override the location with FASTPRUNE_VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTPRUNE_VENV:-$HOME/.cache/fastprune-venv}"
TORCH_VERSION="${FASTPRUNE_TORCH:-2.13.0}"

source "$ROOT/.ci/venv.sh"
venv_with_torch "$VENV" "$TORCH_VERSION" numpy pytest hypothesis matplotlib setuptools wheel pytorch_lightning
echo "== building fastprune"
(cd "$ROOT" && TORCH_DEVICE_BACKEND_AUTOLOAD=0 MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
