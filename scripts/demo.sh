#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs `alignfast demo`; extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
alignfast demo "$@"
