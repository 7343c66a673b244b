#!/usr/bin/env bash
# Configures, builds and runs the C++ tests (CMake + GoogleTest + CTest):
#
#   tests/cpp/run.sh [PYTHON [CMAKE_ARGS...]]
#
# PYTHON (default: python3 on PATH) is the interpreter whose torch is built
# against; CMAKE_ARGS go to the configure step (e.g. -DFASTPRUNE_SANITIZE=ON).
# The build lives in build-cmake/ at the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON="$(command -v "${1:-python3}")"
shift || true
BUILD_DIR="${BUILD_DIR:-build-cmake}"

if [ ! -d /usr/include/gtest ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev
fi

# A cache made with another interpreter would keep that one's torch.
if [ -f "$BUILD_DIR/CMakeCache.txt" ] &&
   ! grep -qxF "Python_EXECUTABLE:FILEPATH=$PYTHON" "$BUILD_DIR/CMakeCache.txt"; then
  rm "$BUILD_DIR/CMakeCache.txt"
fi

cmake -S . -B "$BUILD_DIR" -DPython_EXECUTABLE="$PYTHON" "$@"
cmake --build "$BUILD_DIR" -j2
ctest --test-dir "$BUILD_DIR" --output-on-failure
