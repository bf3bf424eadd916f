#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the test suite; GPU-only tests are skipped on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error RAPIDIN_INDEX_NO_PROGRESS=1
python -m pytest -q -ra "$@"
