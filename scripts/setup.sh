#!/usr/bin/env bash
# Creates .venv (once) with torch and the project's dependencies, then builds and installs alignfast
# in editable mode with its C++/CUDA extension. Safe to run again: it only rebuilds what changed.
# Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "alignfast setup: creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# torch first: pinned to the release this machine's pip takes from local disk (a CUDA 13.0 build, so its
# headers let the CUDA sources compile even where no GPU runs them). Override with ALIGNFAST_TORCH_SPEC.
TORCH_SPEC=${ALIGNFAST_TORCH_SPEC:-torch==2.14.1}
stamp=.venv/.alignfast-deps
want="$TORCH_SPEC $(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "alignfast setup: installing dependencies ($TORCH_SPEC, build tools, test tools)"
  python -m pip install -q --upgrade "pip>=23" 2>&1 | grep -v "is ignored: it is neither" || true
  python -m pip install -q "$TORCH_SPEC" setuptools wheel "cmake>=3.27" ninja \
      "transformers>=5.5" tokenizers safetensors numpy pyyaml tqdm matplotlib \
      pytest pytest-benchmark peft "openai>=1.0" "accelerate>=1.0" "torchao>=0.18" datasets 2>&1 | grep -v "is ignored: it is neither" || true
  python -c "import torch, transformers, pytest" || { echo "alignfast setup: dependency install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# The CUDA toolkit on these machines is minimal; torch's CMake needs to be told where it is.
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi

# The build's full output (CMake, compiler, setuptools' notices) goes to a log that is shown only when
# the build fails, so a good build prints three lines and a bad one shows everything needed to fix it.
echo "alignfast setup: building and installing alignfast (editable, with the extension; log in .venv/build.log)"
if ! python -m pip install -v --no-build-isolation --no-deps -e . > .venv/build.log 2>&1; then
  cat .venv/build.log >&2
  echo "alignfast setup: building alignfast failed (full log above and in .venv/build.log)" >&2
  exit 1
fi
grep -E "^\s*alignfast:" .venv/build.log | sed -E "s/^\s+//" || true
python -c "import alignfast" || { echo "alignfast setup: install failed" >&2; exit 1; }
