"""Sketch fidelity and a paraphrase-retrieval check on the embedded model with real data.

Builds an index over N real instruction examples, then for a query whose generation
paraphrases one training response it reports:

* where that training example ranks (RapidGrad scan and exact TracIn);
* the Pearson correlation between RapidGrad scores and exact scores over all N examples.

Run it for full-parameter gradients of a parameter subset and for a LoRA adapter::

    python tools/check_fidelity.py --params 'model.layers.2[6-9].mlp.*' --out docs/fid-full.json
    python tools/check_fidelity.py --lora 8 --out docs/fid-lora.json
    python tools/check_fidelity.py --adapter runs/lora-sample --out docs/fid-lora-trained.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from rapidin_index.build import BuildSettings, build_index
from rapidin_index.gradients import GradientSettings
from rapidin_index.query import Attributor, QueryInput
from rapidin_index.sketch import SketchSettings

ROOT = Path(__file__).resolve().parents[1]

# (training id in data/instructions_sample.jsonl, instruction, paraphrased generation)
PARAPHRASES = [
    (
        47,
        "At what temperature does aluminum melt, in degrees Celsius?",
        "Aluminum melts at about 660.3 degrees Celsius.",
    ),
    (
        27,
        "Which city is the capital of the state of California?",
        "Sacramento is the capital city of California.",
    ),
    (38, "Differentiate x^3 + 5x^2 - 3x + 7.", "The derivative is 3x^2 + 10x - 3."),
]


def make_random_adapter(out: Path, rank: int, seed: int = 0) -> Path:
    """Save a LoRA adapter (q, k, v, o) with random A and B, as a stand-in for a fine-tune."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rapidin_index.model import load_model

    torch.manual_seed(seed)
    base = load_model(None).model
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft's random B is large; keep the adapter a small change
                param.mul_(0.01)
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT / "data" / "instructions_sample.jsonl"))
    parser.add_argument("--n", type=int, default=200, help="training examples")
    parser.add_argument("--params", action="append", default=[], help="parameter globs")
    parser.add_argument("--lora", type=int, default=0, help="use a random LoRA of this rank")
    parser.add_argument("--adapter", help="use this trained LoRA adapter (tools/finetune.py)")
    parser.add_argument("--k", type=int, default=1 << 16)
    parser.add_argument("--index", help="index directory (default: a temporary one)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    work = Path(tempfile.mkdtemp(prefix="fidelity-"))
    adapter = args.adapter
    if args.lora:
        adapter = str(make_random_adapter(work / "adapter", args.lora))
    index = args.index or str(work / "index")
    settings = BuildSettings(
        data=args.data,
        index=index,
        adapter=adapter,
        limit=args.n,
        gradient=GradientSettings(params=tuple(args.params)),
        sketch=SketchSettings(k=args.k),
    )
    began = time.perf_counter()
    build_index(settings)
    build_seconds = time.perf_counter() - began

    att = Attributor(index)
    queries = [QueryInput(instr, gen) for _, instr, gen in PARAPHRASES]
    sketch = att.score_all(queries, "rapidin")
    began = time.perf_counter()
    exact = att.score_all(queries, "exact")
    exact_seconds = time.perf_counter() - began
    report = {
        "n": args.n,
        "k": args.k,
        "params": args.params,
        "lora_rank": args.lora,
        "adapter": args.adapter,
        "dim": att.computer.dim,
        "build_seconds": round(build_seconds, 1),
        "exact_seconds": round(exact_seconds, 1),
        "queries": [],
    }
    for (target, instr, gen), s, e in zip(PARAPHRASES, sketch, exact):
        rank_sketch = int((s > s[target]).sum()) + 1
        rank_exact = int((e > e[target]).sum()) + 1
        report["queries"].append(
            {
                "target": target,
                "instruction": instr,
                "generation": gen,
                "rank_rapidin": rank_sketch,
                "rank_exact": rank_exact,
                "pearson": round(float(np.corrcoef(s, e)[0, 1]), 4),
                "top3_rapidin": np.argsort(-s)[:3].tolist(),
            }
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
