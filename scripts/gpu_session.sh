#!/usr/bin/env bash
# Everything only a GPU can tell, in as few device calls as possible (see bench/GPU-SESSION.md).
#
#   bash scripts/gpu_session.sh build+test     build alignfast._C against this machine's torch, run the gpu tests
#   bash scripts/gpu_session.sh bench [quick]  the GPU benchmarks, appended to bench/RESULTS.md
#   bash scripts/gpu_session.sh all            both (fits one 10-minute call only with 'quick')
#
# Meant for the lent H100/H200 (torch, triton, nvcc, cmake, ninja, transformers, pytest, peft preinstalled;
# no network) or any CUDA machine with those. Logs and bench/RESULTS.md are copied to $OUT when it is set.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 ALIGNFAST_REQUIRE_EXT=1
export ALIGNFAST_CUDA_ARCHS=${ALIGNFAST_CUDA_ARCHS:-9.0}   # Hopper only: halves the nvcc time on the lent machines
PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/alignfast-gpu}
mkdir -p "$LOGS"
stage=${1:-all}
quick=${2:-}
status=0

build_and_test() {
  echo "== build (log: $LOGS/build.log)"
  if [ -d .whl ]; then  # optional baselines carried as wheels (TRL, Liger-Kernel): see bench/GPU-SESSION.md
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! $PY -m pip install -v --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1; then
    tail -60 "$LOGS/build.log"; echo "build failed"; return 1
  fi
  $PY -m alignfast.info | tee "$LOGS/info.txt"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOGS/info.txt"
  echo "== gpu tests (log: $LOGS/gpu_tests.log)"
  # 'interpret' tests run the Triton launchers on CUDA tensors when a GPU is present (tests/kernels)
  $PY -m pytest -m "gpu or interpret" -q -rs tests 2>&1 | tee "$LOGS/gpu_tests.log" | tail -40
  return "${PIPESTATUS[0]}"
}

bench() {
  local q=()
  [ "$quick" = quick ] && q=(--quick)
  for b in advantages ppo_loss logprobs linear_logprobs engine trainer; do
    echo "== bench $b ${q[*]}"
    $PY -m bench.bench_"$b" --device cuda --record "${q[@]}" 2>&1 | tee -a "$LOGS/bench.log" | tail -25 || status=1
  done
  for extra in "--backward" "--policy-loss"; do
    echo "== bench logprobs $extra ${q[*]}"
    $PY -m bench.bench_logprobs --device cuda --record $extra "${q[@]}" 2>&1 | tee -a "$LOGS/bench.log" | tail -25 || status=1
  done
  $PY -m bench.bench_linear_logprobs --device cuda --record --backward "${q[@]}" 2>&1 | tee -a "$LOGS/bench.log" | tail -25 || status=1
  cp bench/RESULTS.md "$LOGS/RESULTS.md"
}

case "$stage" in
  build+test) build_and_test || status=1 ;;
  bench) bench ;;
  all) build_and_test || status=1; bench ;;
  *) echo "usage: $0 build+test | bench [quick] | all [quick]" >&2; exit 2 ;;
esac
exit $status
