#!/usr/bin/env bash
# The whole GPU check in one command, for the few minutes a GPU is lent:
#
#   bash tests/gpu/run.sh              # on the GPU machine, from the repository root or anywhere
#   bash tests/gpu/run.sh --dry-run    # anywhere: prints every stage's command, writes the summary
#
# Stages, each under its own time limit (seconds), all of them together under
# TOTAL_S; a stage that fails or runs out of time is reported and the next one
# still runs:
#   build       pip install --no-build-isolation -e . for the visible GPUs' archs, all cores
#   info        fastprune.build_info(), the card, nvidia-smi; fails without CUDA kernels
#   tests       the CUDA tests (pytest, JUnit XML)
#   bench-l1    l1_unstructured on 1e9 fp32 elements vs torch.nn.utils.prune and the HBM floor
#   bench-gpt2  global L1 prune of a GPT-2-small-like layer set vs torch.nn.utils.prune
#   bench-7e9   global L1 prune of 7e9 bf16 parameters, in place with bits and in the reference layout: time, peak torch.cuda memory; the reference's outcome
#
# Results go to $OUT (default ./gpu-results), at most 8 plain files:
#   run.log (everything printed), build.log, tests.log, junit.xml, bench.log,
#   bench.json, bench.md (both name the card), summary.md (the table printed last).
# Uses python3, or $PYTHON. Exit status: 0 when every stage passed, 1 otherwise, 2 on bad arguments.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-./gpu-results}"
TOTAL_S=470
ALL_STAGES=(build info tests bench-l1 bench-gpt2 bench-7e9)
declare -A BUDGET=([build]=150 [info]=15 [tests]=125 [bench-l1]=45 [bench-gpt2]=40 [bench-7e9]=95)
declare -A LOG=([build]=build.log [info]=build.log [tests]=tests.log [bench-l1]=bench.log [bench-gpt2]=bench.log
  [bench-7e9]=bench.log)
OUTPUTS=(run.log build.log tests.log junit.xml bench.log bench.json bench.md summary.md)

usage() {
  cat <<EOF
usage: bash tests/gpu/run.sh [--dry-run] [--out DIR] [--stages NAME,NAME,...]

  --dry-run       print every stage's command and write the summary; runs nothing on a GPU
  --out DIR       where results go (default: \$OUT, else ./gpu-results)
  --stages LIST   run only these stages, in the usual order (default: all):
                  ${ALL_STAGES[*]}
  -h, --help      this text
Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the visible GPUs'), MAX_JOBS (default: nproc).
EOF
}

die_usage() {
  echo "run.sh: $1" >&2
  usage >&2
  exit 2
}

DRY=0
SELECTED=("${ALL_STAGES[@]}")
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out)
      [ $# -ge 2 ] && [ -n "$2" ] || die_usage "--out needs a directory"
      OUT="$2"
      shift ;;
    --stages)
      [ $# -ge 2 ] && [ -n "$2" ] || die_usage "--stages needs a comma-separated list"
      IFS=, read -r -a SELECTED <<<"$2"
      for s in "${SELECTED[@]}"; do
        [ -n "${BUDGET[$s]+x}" ] || die_usage "unknown stage '$s' (stages: ${ALL_STAGES[*]})"
      done
      shift ;;
    -h | --help) usage; exit 0 ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
  shift
done

mkdir -p "$OUT" || die_usage "cannot create the output directory '$OUT'"
OUT="$(cd "$OUT" && pwd)"
for f in "${OUTPUTS[@]}"; do rm -f "$OUT/$f"; done
exec 3>&1 4>&2
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!

JOBS="${MAX_JOBS:-$(nproc)}"
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  ARCHS="$TORCH_CUDA_ARCH_LIST"
elif [ "$DRY" = 1 ]; then
  ARCHS="<each visible GPU: torch.cuda.get_device_capability()>"
else
  ARCHS="$("$PY" -c 'import torch
print(";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))' 2>/dev/null)"
fi

# The CUDA tests: every CUDA file, and the CUDA cases of the others.
TESTS="tests/test_cuda.py tests/test_cuda_in_place.py tests/test_cuda_prune.py tests/test_ops.py tests/test_errors.py tests/test_semi_structured.py tests/test_fsdp.py"
PYTEST_TIMEOUT=""
if [ "$DRY" = 1 ] || "$PY" -c 'import pytest_timeout' 2>/dev/null; then PYTEST_TIMEOUT="--timeout=100"; fi

declare -A CMD=(
  [build]="test -n '$ARCHS' || { echo 'build: no CUDA GPU visible to torch' >&2; exit 1; }
TORCH_CUDA_ARCH_LIST='$ARCHS' MAX_JOBS=$JOBS $PY -m pip install --no-build-isolation --no-deps -v -e ."
  [info]="nvidia-smi || true
$PY -c 'import json, fastprune, torch
info = fastprune.build_info()
print(\"build_info:\", json.dumps(info))
print(\"device:\", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
assert info[\"cuda_kernels\"], \"fastprune has no CUDA kernels\"'"
  [tests]="$PY -m pytest -p no:cacheprovider $PYTEST_TIMEOUT -v -rs -k 'cuda or two_devices' --junitxml='$OUT/junit.xml' $TESTS"
  [bench-l1]="$PY benchmarks/gpu_bench.py l1 --out '$OUT'"
  [bench-gpt2]="$PY benchmarks/gpu_bench.py gpt2 --out '$OUT'"
  [bench-7e9]="$PY benchmarks/gpu_bench.py scale --out '$OUT' --budget-s 80"
)

echo "== fastprune GPU check: $(date -u +%FT%TZ), out $OUT, python $PY, archs $ARCHS, jobs $JOBS$([ "$DRY" = 1 ] && echo ', DRY RUN')"
START=$(date +%s)
declare -A STATUS SECONDS_TAKEN LIMIT
for stage in "${ALL_STAGES[@]}"; do
  [[ " ${SELECTED[*]} " == *" $stage "* ]] || continue
  left=$((TOTAL_S - ($(date +%s) - START)))
  limit=$((BUDGET[$stage] < left ? BUDGET[$stage] : left))
  LIMIT[$stage]=$limit
  echo
  echo "== stage $stage (limit ${limit} s, log ${LOG[$stage]})"
  echo "${CMD[$stage]}" | sed 's/^/$ /'
  if [ "$DRY" = 1 ]; then
    STATUS[$stage]=dry-run SECONDS_TAKEN[$stage]=0
    continue
  fi
  if [ "$left" -lt 5 ]; then
    echo "== $stage: skipped, only ${left} s left of the ${TOTAL_S} s in all"
    STATUS[$stage]=skipped SECONDS_TAKEN[$stage]=0
    continue
  fi
  t0=$(date +%s)
  (cd "$ROOT" && timeout --kill-after=10 "$limit" bash -eo pipefail -c "${CMD[$stage]}") 2>&1 | tee -a "$OUT/${LOG[$stage]}"
  rc=${PIPESTATUS[0]}
  SECONDS_TAKEN[$stage]=$(($(date +%s) - t0))
  case $rc in
    0) STATUS[$stage]=ok ;;
    124 | 137) STATUS[$stage]=timeout ;;
    *) STATUS[$stage]=failed ;;
  esac
  echo "== $stage: ${STATUS[$stage]} (exit $rc) in ${SECONDS_TAKEN[$stage]} s"
done

{
  echo "| stage | status | seconds | limit |"
  echo "|---|---|---:|---:|"
  for stage in "${ALL_STAGES[@]}"; do
    [ -n "${STATUS[$stage]+x}" ] || continue
    echo "| $stage | ${STATUS[$stage]} | ${SECONDS_TAKEN[$stage]} | ${LIMIT[$stage]} |"
  done
} >"$OUT/summary.md"
FAILED=0
for stage in "${!STATUS[@]}"; do
  case "${STATUS[$stage]}" in ok | dry-run) ;; *) FAILED=1 ;; esac
done
echo
echo "== summary ($(($(date +%s) - START)) s in all; results in $OUT)"
cat "$OUT/summary.md"
exec 1>&3 2>&4 3>&- 4>&-
wait "$TEE_PID" 2>/dev/null
exit $FAILED
