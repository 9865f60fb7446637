#!/usr/bin/env bash
# The test command: sets up .venv (torch, deepspeed, the project), lints, runs the suite.
#   bash tools/run_tests.sh [pytest args]
# The real GPT-2/BERT vocabularies come from MEGATRON_VOCAB_DIR or ../shared/vocab; without
# them the tests train small ones from tests/data, and the tests of the published ids skip
# (the last lines say how many; dataset/download_vocab.sh fetches the files).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source tools/setup_env.sh
echo "== ruff"
ruff check .
echo "== pytest"
python -m pytest -q -p no:cacheprovider "${@:-tests}"
