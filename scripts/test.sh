#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the default test suite: CPU + Triton interpreter,
# no GPU needed, slow tests excluded. Extra arguments replace that default filter and go to pytest, so keep it
# when selecting (e.g. -m "not slow and not gpu" -k engine; -m gpu on a GPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The tests must exercise the compiled kernels: a failed extension build is an error here.
export ALIGNFAST_REQUIRE_EXT=1
# shellcheck disable=SC1091
. scripts/setup.sh
python -m alignfast.info
if [ "$#" -eq 0 ]; then set -- -m "not slow and not gpu"; fi
python -m pytest -q "$@"
