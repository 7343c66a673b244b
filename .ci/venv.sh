# Sourced: venv_with_torch DIR VERSION [PACKAGES...] makes (or reuses) a
# virtual environment at DIR with torch==VERSION (always pinned: a bare
# 'torch' would fetch a multi-GB CUDA build) and the packages, and sets PY.
venv_with_torch() {
  local dir="$1" version="$2"
  shift 2
  if [ ! -x "$dir/bin/python" ]; then
    echo "== creating $dir"
    python3 -m venv "$dir"
  fi
  PY="$dir/bin/python"
  # A fastprune left installed (editable) from a checkout that is gone makes
  # torch's extension autoload, and so 'import torch', fail: set-up loads no
  # extensions (and env.sh's build re-points the install to this checkout).
  local noload="TORCH_DEVICE_BACKEND_AUTOLOAD=0"
  if ! env "$noload" "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
    echo "== installing torch==$version"
    env "$noload" "$PY" -m pip install -q "torch==$version"
  fi
  if ! env "$noload" "$PY" -c "import $(IFS=,; echo "$*")" 2>/dev/null; then
    env "$noload" "$PY" -m pip install -q "$@"
  fi
}
