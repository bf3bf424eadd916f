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

import argparse
import json
import logging
import sys
from pathlib import Path

from rapidin_index.errors import RapidInError
from rapidin_index.evaluate import (
    ErrorTracingPipeline,
    add_run_arguments,
    read_source,
    settings_from_args,
    write_records,
)
from rapidin_index.synthetic import DEFAULT_PAIRS, make_error_tracing_set, tiny_entity_records

ROOT = Path(__file__).resolve().parents[1]


def make_tiny(out: Path) -> tuple[str, str]:
    """A tiny random model (tests/tiny.py) and ~40 records, 12 of them naming an E1."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_tiny_model

    model, data = out / "tiny-model", out / "tiny-data"
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    if not (data / "error_tracing.json").is_file():
        data.mkdir(parents=True, exist_ok=True)
        records = read_source(str(ROOT / "data" / "instructions_sample.jsonl"), limit=30)
        records += tiny_entity_records(DEFAULT_PAIRS)
        train, meta = make_error_tracing_set(records, DEFAULT_PAIRS, size=len(records), seed=0)
        write_records(data / "train.jsonl", train)
        (data / "error_tracing.json").write_text(json.dumps(meta, indent=2))
    return str(model), str(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.tiny:
        model, data = make_tiny(Path(args.out))
    elif args.data is None:
        parser.error("--data is required (the directory made by tools/make_error_tracing.py)")
    else:
        model, data = None, args.data
    try:
        ErrorTracingPipeline(settings_from_args(args, data, model)).run()
    except RapidInError as err:
        sys.exit(f"Error: {err}")
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
