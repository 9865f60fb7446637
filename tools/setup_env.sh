#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with torch, deepspeed and this project
# installed in editable mode (which builds megatron/data/helpers.cpp).
#   source tools/setup_env.sh          # from the repository root
# VENV selects the folder (default .venv). TORCH_SPEC selects the torch wheel
# (default torch==2.13.0; on a GPU machine use the CUDA build you want).
set -eo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$_root/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC"
  python -m pip install -q "$TORCH_SPEC"
fi
_stamp="$VENV/.megatron-installed"
if [ ! -f "$_stamp" ] || [ "$_root/setup.py" -nt "$_stamp" ] || \
   [ "$_root/requirements.txt" -nt "$_stamp" ] || [ "$_root/megatron/data/helpers.cpp" -nt "$_stamp" ]; then
  echo "setup: installing the project and its requirements (deepspeed, numpy, nltk, ...)"
  python -m pip install -q pybind11 setuptools wheel 2>&1 | grep -v "is ignored" || true
  python -m pip install -q --no-build-isolation -e "$_root[test]" 2>&1 | grep -v "is ignored" || true
  python -c "import megatron.data.helpers, deepspeed" >/dev/null 2>&1 || {
    echo "setup: installing the project failed" >&2; return 1 2>/dev/null || exit 1; }
  touch "$_stamp"
fi
if [ -z "${MEGATRON_VOCAB_DIR:-}" ] && [ -f "$_root/../shared/vocab/gpt2-vocab.json" ]; then
  export MEGATRON_VOCAB_DIR="$(cd "$_root/../shared/vocab" && pwd)"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-}"
[ -z "$DS_ACCELERATOR" ] && unset DS_ACCELERATOR
