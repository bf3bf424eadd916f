#!/usr/bin/env bash
# The main job on the embedded model: set up, build an index of the 200 bundled instruction
# examples, and ask which of them made the model write a paraphrase of one response.
# Rerunning resumes the build where it stopped (or skips it when the index is complete).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

# Gradients of the (tied input/output) token embedding, 28.3 M parameters, keep the demo to
# a few minutes on a laptop CPU and, on this un-fine-tuned model, single out the paraphrased
# example (docs/fidelity-full-embed.json); drop --params to use every parameter.
rapidin-index build --data data/instructions_sample.jsonl --index demo-index \
    --params 'model.embed_tokens.weight'
rapidin-index info --index demo-index

printf 'Aluminum melts at about 660.3 degrees Celsius.\n' > demo-index/generation.txt
rapidin-index query --index demo-index --topk 5 \
    --prompt "At what temperature does aluminum melt, in degrees Celsius?" \
    --generation demo-index/generation.txt
