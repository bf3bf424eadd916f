"""The error-tracing evaluation (paper Section 4.6, Table 5, with Tables 1 and 2) in one
command.

Fine-tunes a LoRA (QLoRA with --load-in-4bit) adapter on the perturbed data made by
tools/make_error_tracing.py, answers each pair's test prompts, keeps the answers that name
E2, builds a RapidIn index per --k / --shuffle-rounds, scores every training example for
each incorrect generation with every method, and with token-wise RapidIn (the generation's
loss restricted to the E2 tokens, as ``query --target-text E2``), and writes OUT/report.md
and OUT/results.json. Every stage is cached under OUT.

    python tools/make_error_tracing.py --source ../shared/data/dolly_first6400.jsonl \
        --out runs/tracing-data --size 1500
    python tools/run_error_tracing.py --data runs/tracing-data --out runs/tracing \
        --load-in-4bit --epochs 3
    python tools/run_error_tracing.py --tiny --out /tmp/tracing-tiny   # plumbing, seconds

--score-variants adds the comparison of score definitions (OUT/score-variants.md); on a
finished OUT, rerun the same command with it added: every other stage comes from the cache.

--tiny uses a tiny random model that learns nothing: its incorrect generations are
injected (E2 put into its answers), so its numbers mean nothing.
"""

from __future__ import annotations

from pathlib import Path

from rapidin_index.evaluate import ErrorTracingPipeline, read_source, run_tool
from rapidin_index.synthetic import DEFAULT_PAIRS, make_error_tracing_set, tiny_entity_records

ROOT = Path(__file__).resolve().parents[1]


def tiny_set() -> tuple[list[dict], dict]:
    """About 40 records, 12 of them naming an E1 (for --tiny)."""
    records = read_source(str(ROOT / "data" / "instructions_sample.jsonl"), limit=30)
    records += tiny_entity_records(DEFAULT_PAIRS)
    return make_error_tracing_set(records, DEFAULT_PAIRS, size=len(records), seed=0)


def main(argv: list[str] | None = None) -> None:
    run_tool(__doc__, ErrorTracingPipeline, tiny_set, "tools/make_error_tracing.py", argv)


if __name__ == "__main__":
    main()
