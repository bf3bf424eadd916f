#!/usr/bin/env python
"""Benchmark of the caching stage: the paper's way against batched gradients + fast sketch.

For each configuration (the embedded SmolLM2-135M-Instruct with a LoRA adapter, the same
in 4-bit NF4 (QLoRA), and full-parameter gradients of a ``--full-params`` subset), on the
same examples in one process:

(a) the paper's way: one example per forward + backward (``GradientComputer.gradient``)
    and the shuffle transform as one torch ``index_select`` per pass (``backend="torch"``);
(b) ours: ``GradientComputer.gradients`` on batches (packed rows, per-example gradients
    from hooks) and the shuffle transform with the CPU kernel (``backend="auto"``).

(a) and (b) alternate batch by batch, so a machine whose load changes during the run
slows both alike and their ratio stays meaningful. Reported per configuration: examples/s
of each, the speed-up, the transform's share of each method's time, the per-example time of
the transform alone (also for ``--projection countsketch`` on the same gradients), peak
resident memory of each method (VmHWM, reset before each phase; whole process from
``resource.getrusage`` at the end), and the largest relative difference between the
RapidGrads of (a) and (b) (they compute the same function).

Example (a few minutes per configuration on 2 CPU cores):

    python tools/bench_build.py --n 32 --configs lora,qlora,full --json bench_build.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from rapidin_index.data import load_records, tokenize_records  # noqa: E402
from rapidin_index.gradients import GradientComputer, choose_batch_size  # noqa: E402
from rapidin_index.model import load_model, select_parameters  # noqa: E402
from rapidin_index.sketch import RapidGradSketch, SketchSettings  # noqa: E402

logger = logging.getLogger("bench_build")

DEFAULT_DATA = "/work/shared/data/rasbt__instruction-data.json"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def peak_rss_reset() -> bool:
    """Reset the kernel's resident-memory high-water mark of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
    return int(match.group(1)) / 1024 if match else float("nan")


def load_config(name: str, full_params: list[str], lora_rank: int):
    """(model, named parameters) of one configuration."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if name == "full":
        loaded = load_model(None)
        return loaded, select_parameters(loaded.model, full_params or None)
    loaded = load_model(None, load_in_4bit=name == "qlora")
    lora = LoraConfig(r=lora_rank, target_modules=LORA_TARGETS, init_lora_weights=False)
    loaded.model = get_peft_model(loaded.model, lora).eval()
    return loaded, select_parameters(loaded.model)


def run_config(name: str, args) -> dict:
    loaded, params = load_config(name, args.full_params if name == "full" else [], args.lora_rank)
    records = load_records(args.data)[args.offset : args.offset + args.n + 4]
    examples = tokenize_records(records, loaded.tokenizer, "alpaca", args.max_length)
    warm, examples = examples[:4], examples[4:]
    paper = GradientComputer(loaded.model, params, "layer", batching="loop")
    ours = GradientComputer(loaded.model, params, "layer", batching="packed")
    settings = SketchSettings(k=args.k)
    sketch_paper = RapidGradSketch(paper.dim, settings, backend="torch")
    sketch_ours = RapidGradSketch(ours.dim, settings)
    sketch_count = RapidGradSketch(ours.dim, SketchSettings(k=args.k, projection="countsketch"))
    budget = None if args.memory_budget is None else int(args.memory_budget * 2**30)
    batch = args.batch_size or choose_batch_size(
        ours, examples, budget, sketch_bytes=sketch_ours.workspace_bytes
    )
    logger.info(
        "%s: D = %d, batch size %d, %d examples (mean %.0f tokens)",
        name,
        ours.dim,
        batch,
        len(examples),
        sum(len(e.input_ids) for e in examples) / max(1, len(examples)),
    )

    # Warm-up (numba compilation, allocator, the one-off batched check), not timed.
    sketch_paper.transform(paper.gradient(warm[0]))
    sketch_ours.transform(ours.gradients(warm))
    sketch_count.transform(ours.gradients(warm[:2]))

    t = {k: 0.0 for k in ("a_grad", "a_sketch", "b_grad", "b_sketch", "count_sketch")}
    peak = {"a": 0.0, "b": 0.0}
    worst = 0.0
    for first in range(0, len(examples), batch):
        chunk = examples[first : first + batch]
        peak_rss_reset()
        rows_a = []
        for example in chunk:
            t0 = time.perf_counter()
            g = paper.gradient(example)
            t1 = time.perf_counter()
            with torch.no_grad():
                rows_a.append(sketch_paper.transform(g))
            t2 = time.perf_counter()
            t["a_grad"] += t1 - t0
            t["a_sketch"] += t2 - t1
            del g
        peak["a"] = max(peak["a"], peak_rss_mib())
        gc.collect()
        peak_rss_reset()
        t0 = time.perf_counter()
        grads = ours.gradients(chunk)
        t1 = time.perf_counter()
        with torch.no_grad():
            rows_b = sketch_ours.transform(grads)
        t2 = time.perf_counter()
        peak["b"] = max(peak["b"], peak_rss_mib())
        t["b_grad"] += t1 - t0
        t["b_sketch"] += t2 - t1
        t0 = time.perf_counter()
        with torch.no_grad():
            sketch_count.transform(grads)
        t["count_sketch"] += time.perf_counter() - t0
        rows_a = torch.stack(rows_a)
        worst = max(worst, float((rows_a - rows_b).norm(dim=1).max() / rows_a.norm(dim=1).min()))
        del grads, rows_a, rows_b
        gc.collect()
        logger.info("%s: %d/%d", name, first + len(chunk), len(examples))
    n = len(examples)
    a_total, b_total = t["a_grad"] + t["a_sketch"], t["b_grad"] + t["b_sketch"]
    result = {
        "config": name,
        "dim": ours.dim,
        "k": args.k,
        "examples": n,
        "batch_size": batch,
        "batching": ours.batching,
        "a_examples_per_s": n / a_total,
        "b_examples_per_s": n / b_total,
        "speedup": a_total / b_total,
        "a_sketch_share": t["a_sketch"] / a_total,
        "b_sketch_share": t["b_sketch"] / b_total,
        "b_sketch_vs_grad": t["b_sketch"] / t["b_grad"],
        "a_grad_ms_per_example": 1e3 * t["a_grad"] / n,
        "b_grad_ms_per_example": 1e3 * t["b_grad"] / n,
        "a_sketch_ms_per_example": 1e3 * t["a_sketch"] / n,
        "b_sketch_ms_per_example": 1e3 * t["b_sketch"] / n,
        "countsketch_ms_per_example": 1e3 * t["count_sketch"] / n,
        "a_peak_rss_mib": peak["a"],
        "b_peak_rss_mib": peak["b"],
        "max_relative_difference": worst,
    }
    del loaded, params, paper, ours
    gc.collect()
    return result


def fidelity(args) -> list[dict]:
    """Pearson correlation of sketched with exact inner products on real LoRA gradients.

    Each query (records ``--fidelity-queries``, their outputs taken as the generations)
    against the first ``--fidelity`` records, layer-normalised gradients, both projections
    at each K, sketches rounded to fp16 as the index stores them. Reported: Pearson r (mean
    and worst over the queries), mean overlap of the top 10, transform time per example.
    """
    import numpy as np

    loaded, params = load_config("lora", [], args.lora_rank)
    records = load_records(args.data)
    examples = tokenize_records(
        records[: args.fidelity], loaded.tokenizer, "alpaca", args.max_length
    )
    queries = tokenize_records(
        [records[i] for i in args.fidelity_queries], loaded.tokenizer, "alpaca", args.max_length
    )
    computer = GradientComputer(loaded.model, params, "layer")
    grads = torch.cat([computer.gradients(examples[i : i + 8]) for i in range(0, len(examples), 8)])
    qs = computer.gradients(queries)
    exact = (qs.double() @ grads.double().T).numpy()
    out = []
    for k in args.fidelity_k:
        for projection in ("shuffle", "countsketch"):
            sketch = RapidGradSketch(computer.dim, SketchSettings(k=k, projection=projection))
            sketch.transform(grads[:2])  # warm-up
            t0 = time.perf_counter()
            small = torch.cat([sketch.transform(grads[i : i + 8]) for i in range(0, len(grads), 8)])
            seconds = time.perf_counter() - t0
            approx = (sketch.transform(qs).half().double() @ small.half().double().T).numpy()
            pearson = [float(np.corrcoef(e, a)[0, 1]) for e, a in zip(exact, approx)]
            overlap = [
                len(set(np.argsort(-e)[:10]) & set(np.argsort(-a)[:10]))
                for e, a in zip(exact, approx)
            ]
            out.append(
                {
                    "k": k,
                    "projection": projection,
                    "queries": len(qs),
                    "pearson_mean": float(np.mean(pearson)),
                    "pearson_min": float(np.min(pearson)),
                    "top10_overlap_mean": float(np.mean(overlap)),
                    "ms_per_example": 1e3 * seconds / len(examples),
                }
            )
            print(json.dumps(out[-1]), flush=True)
    return out


def print_table(results: list[dict]) -> None:
    rows = [
        ("D", "dim", "{:,}"),
        ("batch size (b)", "batch_size", "{}"),
        ("(a) examples/s", "a_examples_per_s", "{:.2f}"),
        ("(b) examples/s", "b_examples_per_s", "{:.2f}"),
        ("speed-up (b)/(a)", "speedup", "{:.2f}x"),
        ("(a) fwd+bwd ms/example", "a_grad_ms_per_example", "{:.0f}"),
        ("(b) fwd+bwd ms/example", "b_grad_ms_per_example", "{:.0f}"),
        ("(a) shuffle (torch) ms/example", "a_sketch_ms_per_example", "{:.1f}"),
        ("(b) shuffle (CPU kernel) ms/example", "b_sketch_ms_per_example", "{:.1f}"),
        ("(b) countsketch ms/example", "countsketch_ms_per_example", "{:.1f}"),
        ("(a) transform share of time", "a_sketch_share", "{:.1%}"),
        ("(b) transform share of time", "b_sketch_share", "{:.1%}"),
        ("(b) transform / fwd+bwd", "b_sketch_vs_grad", "{:.1%}"),
        ("(a) peak RSS MiB", "a_peak_rss_mib", "{:.0f}"),
        ("(b) peak RSS MiB", "b_peak_rss_mib", "{:.0f}"),
        ("max rel. diff (a) vs (b)", "max_relative_difference", "{:.1e}"),
    ]
    print("| | " + " | ".join(r["config"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for label, key, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(r[key]) for r in results) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="Alpaca JSON/JSONL records.")
    parser.add_argument("--n", type=int, default=32, help="Timed examples per configuration.")
    parser.add_argument("--offset", type=int, default=0, help="First record used.")
    parser.add_argument(
        "--configs", default="lora,qlora,full", help="Comma-separated subset of lora, qlora, full."
    )
    parser.add_argument(
        "--full-params",
        nargs="*",
        default=["model.layers.2[4-9].*"],
        metavar="GLOB",
        help="Parameters of the full config (none = all).",
    )
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--k", type=int, default=1 << 16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="Batch size of (b) [default: chosen from --memory-budget].",
    )
    parser.add_argument("--memory-budget", type=float, default=None, metavar="GB")
    parser.add_argument("--json", type=Path, default=None, help="Also write results here.")
    parser.add_argument(
        "--fidelity",
        type=int,
        default=0,
        metavar="N",
        help="Also compare shuffle and countsketch on N real LoRA gradients.",
    )
    parser.add_argument(
        "--fidelity-queries",
        type=int,
        nargs="*",
        default=[500, 600, 700, 800, 900],
        help="Records used as the queries of --fidelity.",
    )
    parser.add_argument("--fidelity-k", type=int, nargs="*", default=[1 << 12, 1 << 14, 1 << 16])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    results = []
    for name in filter(None, args.configs.split(",")):
        if name not in ("lora", "qlora", "full"):
            parser.error(f"unknown config {name!r}")
        results.append(run_config(name, args))
        print(json.dumps(results[-1]), flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"\nthreads {torch.get_num_threads()}, whole-process peak RSS "
        f"{usage.ru_maxrss / 1024:.0f} MiB; command: {' '.join(sys.argv)}\n"
    )
    if results:
        print_table(results)
    scores = fidelity(args) if args.fidelity else []
    if scores:
        print(
            f"\n{args.fidelity} examples x {len(args.fidelity_queries)} queries, LoRA r="
            f"{args.lora_rank}\n"
        )
        print(
            "| K | projection | Pearson r mean (worst) | top-10 overlap | "
            "transform ms/example (batches of 8) |"
        )
        print("|---|---|---|---|---|")
        for r in scores:
            print(
                f"| {r['k']} | {r['projection']} | {r['pearson_mean']:.4f} "
                f"({r['pearson_min']:.4f}) | {r['top10_overlap_mean']:.1f}/10 | "
                f"{r['ms_per_example']:.1f} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"throughput": results, "fidelity": scores}, indent=2))


if __name__ == "__main__":
    main()
