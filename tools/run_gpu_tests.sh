#!/usr/bin/env bash
# GPU checks of the scan, for a machine with a CUDA GPU and torch built for CUDA:
#   1. the tests marked `cuda` (GPU result equal to the CPU result, ties included),
#   2. the scan benchmark with the GPU engine on a synthetic store.
#
# Usage: tools/run_gpu_tests.sh [ROWS] [STORE_DIR]
#   ROWS       store rows for the benchmark (default 20000, 2.6 GB at K=65536)
#   STORE_DIR  where the synthetic store goes (default: $TMPDIR/rapidin_bench_store_gpu)
# Environment: PYTHON (default: python), BENCH_ARGS (extra bench_scan.py arguments).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
ROWS="${1:-20000}"
STORE_DIR="${2:-${TMPDIR:-/tmp}/rapidin_bench_store_gpu}"

"$PYTHON" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch: nothing to test here")
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
EOF

echo "== pytest -m cuda"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -m cuda -v -rs tests/test_scan.py

echo "== benchmark, --engine gpu, N=$ROWS"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
"$PYTHON" tools/bench_scan.py --engine gpu --rows "$ROWS" --dir "$STORE_DIR" ${BENCH_ARGS:-}
