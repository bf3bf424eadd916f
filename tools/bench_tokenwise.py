"""Naive vs fast token-wise influence (Eq. 6) on the embedded model, for one real example.

Naive ("loop"): one forward pass, then one backward pass per response token (graph retained),
each token gradient dotted with the layer-scaled generation gradient. Fast ("jvp"): a single
forward-mode pass of all per-token losses along that fixed direction. Also timed: the
"double-backward" fallback. Each setting reports seconds and the largest deviation from the
naive scores relative to their largest magnitude.

Usage::

    python tools/bench_tokenwise.py [--example 20] [--repeat 1] [--settings full lora]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path("/work/shared/data/rasbt__instruction-data.json")
PROMPT = "What is the turning point of Shakespeare's tragedy about two young lovers?"
GENERATION = (
    "The turning point comes in the third act, when Romeo kills Tybalt, leading to "
    "his banishment from Verona, which sets the final events in motion."
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(setting: str):
    from rapidin_index.model import load_model, select_parameters

    loaded = load_model(None)
    model = loaded.model
    if setting == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
        torch.manual_seed(0)
        # A fresh adapter has B = 0 and so zero A gradients; a trained one does not.
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
        model.eval()
    return loaded.tokenizer, model, select_parameters(model)


def _timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        began = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - began)
    return best, out


def bench(setting: str, example_id: int, repeat: int, methods: list[str]) -> dict:
    from rapidin_index.data import Record, format_prompt, tokenize_example, tokenize_records
    from rapidin_index.gradients import GradientComputer
    from rapidin_index.tokenwise import TokenwiseScorer

    tokenizer, model, params = _model(setting)
    computer = GradientComputer(model, params, "layer")
    raw = json.loads(DATA.read_text(encoding="utf-8"))[example_id]
    record = Record(example_id, raw["instruction"], raw.get("input", ""), raw["output"])
    train = tokenize_records([record], tokenizer, "alpaca", 512)[0]
    gen = tokenize_example(tokenizer, format_prompt(PROMPT, tokenizer, "alpaca"), GENERATION, 512)
    scorer = TokenwiseScorer(computer, "jvp")
    prep_seconds, (s, t) = _timed(lambda: (scorer.prepare(train), scorer.prepare(gen)), 1)
    row = {
        "setting": setting,
        "params": computer.dim,
        "tensors": len(computer.params),
        "tokens": len(train.input_ids),
        "response_tokens": len(s.positions),
        "prepare_seconds": round(prep_seconds, 2),
    }
    scores = {}
    for method in methods:
        timed = TokenwiseScorer(computer, method)
        seconds, scores[method] = _timed(lambda m=timed: m.token_influence(s, t), repeat)
        row[f"{method}_seconds"] = round(seconds, 2)
    naive = scores.get("loop")
    if naive is not None:
        for method in methods:
            if method != "loop":
                dev = float((scores[method] - naive).abs().max() / naive.abs().max())
                row[f"{method}_rel_dev"] = f"{dev:.1e}"
                row[f"{method}_speedup"] = round(row["loop_seconds"] / row[f"{method}_seconds"], 1)
    # The identity mean_i Eq.6 = sentence score, against a float64 reference: over ~1e8
    # terms an fp32 dot product alone is off by ~1e-3 relative.
    x, y = computer.flatten(s.grads), computer.flatten(t.grads)
    exact = float(x.double() @ y.double())
    for label, value in (
        ("fp32_dot", float(x @ y)),
        ("mean_jvp", float(scores["jvp"].double().mean())),
    ):
        row[f"{label}_rel_err"] = f"{abs(value - exact) / abs(exact):.1e}"
    row["sentence_fp64"] = round(exact, 5)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=int, default=20, help="Training record id.")
    parser.add_argument("--repeat", type=int, default=1, help="Best of N timings.")
    parser.add_argument("--settings", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--methods", nargs="+", default=["loop", "jvp", "double-backward"])
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, example "
        f"{args.example} vs a {len(GENERATION)}-character generation"
    )
    for setting in args.settings:
        row = bench(setting, args.example, args.repeat, args.methods)
        print(json.dumps(row))
        if "jvp_speedup" in row:
            print(
                f"  {setting}: naive loop {row['loop_seconds']} s, jvp {row['jvp_seconds']} s "
                f"-> {row['jvp_speedup']}x faster ({row['response_tokens']} response tokens, "
                f"D = {row['params']:,}); max deviation {row['jvp_rel_dev']} of max |score|"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
