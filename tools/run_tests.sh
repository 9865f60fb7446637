#!/usr/bin/env bash
# The test command: sets up .venv (torch, deepspeed, the project), lints, runs the suite.
#   bash tools/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source tools/setup_env.sh
echo "== ruff"
ruff check .
echo "== pytest"
python -m pytest -q -p no:cacheprovider "${@:-tests}"
