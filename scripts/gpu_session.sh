#!/usr/bin/env bash
# Everything only a GPU can tell, in ONE device call (see bench/GPU-SESSION.md).
#
#   bash scripts/gpu_session.sh [all | build+test | bench] [quick | full]      default: all quick
#
# A session gets 15 minutes of device time, the machine's start-up included, and one call may run 10 minutes.
# So the script is sized to one call: it starts nothing new once ALIGNFAST_GPU_BUDGET_S seconds (default 500)
# have passed, and runs each stage under `timeout` with the smaller of its own cap and what is left, so that the
# logs always come back. Stages run in order of value: the build, the gpu tests (correctness before any timing),
# then the benchmarks issue 13 asks for first.
#
# Meant for the lent H100/H200 (torch, triton, nvcc, cmake, ninja, transformers, pytest, peft preinstalled; no
# network) or any CUDA machine with those. Logs and bench/RESULTS.md go to $OUT when it is set (5 files: the device
# tool returns at most 8).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# TRITON_INTERPRET=0: the Triton kernels compile for the GPU whatever tests/conftest.py would guess from /dev.
export PYTHONUNBUFFERED=1 ALIGNFAST_REQUIRE_EXT=1 TRITON_INTERPRET=0
export ALIGNFAST_CUDA_ARCHS=${ALIGNFAST_CUDA_ARCHS:-9.0}   # Hopper only: halves the nvcc time on the lent machines
PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/alignfast-gpu}
BUDGET=${ALIGNFAST_GPU_BUDGET_S:-500}
mkdir -p "$LOGS"
stage=${1:-all}
mode=${2:-quick}
status=0
started=$SECONDS

seconds_left() { echo $((BUDGET - (SECONDS - started))); }

# capped CAP LOG SHOW CMD...: CMD under `timeout min(CAP, seconds left)`, its output appended to LOG, the last SHOW
# lines of it printed; skipped when fewer than ALIGNFAST_GPU_MIN_STAGE_S seconds (default 20) are left. Returns CMD's
# status (124: it ran out of time).
capped() {
  local cap=$1 log=$2 show=$3 limit rc
  shift 3
  limit=$(seconds_left)
  ((limit > cap)) && limit=$cap
  if ((limit < ${ALIGNFAST_GPU_MIN_STAGE_S:-20})); then
    echo "== SKIPPED, the ${BUDGET}s budget is spent: $*" | tee -a "$log"
    return 1
  fi
  echo "== $* (limit ${limit}s, $((SECONDS - started))s into the call)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log" | tail -n "$show"
  rc=${PIPESTATUS[0]}
  ((rc == 124 || rc == 137)) && echo "== TIMED OUT after ${limit}s: $*" | tee -a "$log"
  return "$rc"
}

build() {
  if [ -d .whl ]; then  # optional baselines carried as wheels (TRL, Liger-Kernel): see bench/GPU-SESSION.md
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # ~1 min of nvcc + g++ for sm_90 (60 s on the 2-core CPU machine, against the device's torch 2.11.0+cu130)
  if ! capped 300 "$LOGS/build.log" 0 $PY -m pip install -v --no-build-isolation --no-deps -e .; then
    tail -60 "$LOGS/build.log"; echo "build failed"; return 1
  fi
  # What ran where, for the record; neither may stop the tests and benchmarks that follow.
  capped 60 "$LOGS/info.txt" 100 $PY -m alignfast.info || true
  capped 30 "$LOGS/info.txt" 5 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader || true
  return 0
}

gpu_tests() {
  # 'interpret' tests run the Triton launchers on CUDA tensors when a GPU is present (tests/kernels)
  local per_test=()
  $PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
  # --durations: which tests the 240 s went to (first Triton compiles), to size the next session's run
  capped 240 "$LOGS/gpu_tests.log" 60 $PY -m pytest -m "gpu or interpret" -q -rs -p no:cacheprovider \
    --durations=20 "${per_test[@]}" tests
}

bench() {
  # Recorded in RESULTS.md either way; a quick run's sections are titled "Quick run (...)", which the README's table
  # never quotes (bench/harness.py QUICK_TITLE).
  local q=() cap=240 run name flags this_cap
  [ "$mode" = quick ] && q=(--quick) && cap=90
  # Issue 13's rows first: token_logprobs (fwd, fwd+bwd), linear_token_logprobs fwd+bwd; then the rest.
  for run in "logprobs" "logprobs --backward" "linear_logprobs --backward" "advantages" "ppo_loss" \
             "logprobs --policy-loss" "linear_logprobs" "trainer" "engine --providers padded engine"; do
    read -r name flags <<< "$run"
    # The trainer builds and saves two 0.5B models, then times rounds of two providers: more than the op
    # benchmarks need. The engine bench leaves out per-prompt
    # `generate` (64 prompts one at a time, 7 calls: minutes on a 0.5B model) and compares with padded batching.
    this_cap=$cap
    [ "$name" = trainer ] && this_cap=$((cap * 2))
    # shellcheck disable=SC2086  # $flags: zero or more words
    capped "$this_cap" "$LOGS/bench.log" 25 $PY -m "bench.bench_$name" --device cuda --record $flags "${q[@]}" \
      || status=1
  done
  cp bench/RESULTS.md "$LOGS/RESULTS.md"
}

case "$mode" in quick | full) ;; *) echo "usage: $0 [all | build+test | bench] [quick | full]" >&2; exit 2 ;; esac
case "$stage" in
  build+test) build && { gpu_tests || status=1; } || status=1 ;;
  bench) bench ;;
  all) if build; then gpu_tests || status=1; bench; else status=1; fi ;;
  *) echo "usage: $0 [all | build+test | bench] [quick | full]" >&2; exit 2 ;;
esac
echo "== done in $((SECONDS - started))s of a ${BUDGET}s budget, status $status"
exit $status
