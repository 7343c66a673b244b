#!/usr/bin/env bash
# Compile check of the CUDA kernels, for machines without a GPU.
#
# Builds fastprune with FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST=9.0) against a pinned
# CUDA build of torch in a venv of its own (FASTPRUNE_CUDA_VENV, made or reused),
# from a copy of the sources into a build directory inside that venv, so the
# checkout and its editable install are left alone. Then imports the built
# package there and checks that every op has CPU and CUDA kernels registered.
# Any compile error fails the script. Needs nvcc on PATH (or CUDA_HOME set).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTPRUNE_CUDA_VENV:-$HOME/.cache/fastprune-cuda-venv}"
TORCH_VERSION=2.14.1  # a CUDA 13.0 build; pinned: a bare 'torch' would fetch another multi-GB one

source "$ROOT/.ci/venv.sh"
venv_with_torch "$VENV" "$TORCH_VERSION" numpy setuptools wheel
"$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" ||
  { echo "cuda_check: torch in $VENV has no CUDA" >&2; exit 1; }

# torch guesses CUDA_HOME from the nvcc on PATH, which here is a wrapper script;
# nvcc itself names the toolkit root ("#$ TOP=<root>/bin/..").
if [ -z "${CUDA_HOME:-}" ]; then
  command -v nvcc >/dev/null || { echo "cuda_check: nvcc is not on PATH (or set CUDA_HOME)" >&2; exit 1; }
  TOP="$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  [ -n "$TOP" ] || { echo "cuda_check: cannot find the CUDA toolkit root from nvcc" >&2; exit 1; }
  CUDA_HOME="$(cd "$TOP" && pwd -P)"
fi
export CUDA_HOME
echo "== CUDA_HOME=$CUDA_HOME, torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"

# A fresh copy of the sources, stamped now; a file whose contents are those of
# the last check's copy gets that copy's time back, so that ninja in the reused
# build directory recompiles exactly what changed since (an edit made while the
# last check ran included).
SRC="$VENV/fastprune-src"
BUILD="$VENV/fastprune-build"
rm -rf "$SRC.new"
mkdir -p "$SRC.new"
tar -C "$ROOT" --exclude='*.so' --exclude='__pycache__' --exclude='_build_info.py' --exclude='*.egg-info' \
  -cf - setup.py pyproject.toml README.md csrc python | tar -C "$SRC.new" -m -xf -
if [ -d "$SRC" ]; then
  (cd "$SRC.new" && find . -type f) | while read -r f; do
    if cmp -s "$SRC.new/$f" "$SRC/$f"; then touch -r "$SRC/$f" "$SRC.new/$f"; fi
  done
fi
rm -rf "$SRC"
mv "$SRC.new" "$SRC"

echo "== building (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0)"
(cd "$SRC" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py -q build --build-base "$BUILD")
LIB="$(cd "$BUILD" && ls -d "$PWD"/lib.*)"

echo "== loading the built package"
PYTHONPATH="$LIB" "$PY" - "$LIB" <<'EOF'
import sys

import torch

import fastprune

assert fastprune.__file__.startswith(sys.argv[1]), f"imported {fastprune.__file__}, not the build"
info = fastprune.build_info()
print("build_info:", info)
assert info["cuda_built"] and info["cuda_kernels"], info
for op in ("unstructured_mask", "global_unstructured_masks", "segmented_mask", "channel_norms"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastprune::{op}", key), (op, key)
# The CPU kernels of this build work too.
out = fastprune.ops.unstructured_mask(torch.tensor([3.0, -1.0, 2.0, 0.5]), torch.ones(4), count=2)
assert out.tolist() == [1.0, 0.0, 1.0, 0.0], out
print("cuda_check: OK, every op has CPU and CUDA kernels")
EOF
