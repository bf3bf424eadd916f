"""Perturb entities in an instruction set for the error-tracing evaluation (Section 4.6).

For each pair E1:E2 (default: the paper's China:Canada, India:Japan, Australia:England,
each mentioned by dozens of responses in dolly_first6400.jsonl), every response that
mentions E1 (as a whole word) has its E1 replaced by E2 with probability 0.8. The training
set keeps every record that mentions an E1 (at most half of ``--size``) and is filled up
with random others. Test prompts ask questions whose right answer is E1 (built in for the
default pairs; ``--prompts FILE`` for others).

Writes OUT/train.jsonl and OUT/error_tracing.json (pairs, perturbed ids, test prompts).

    python tools/make_error_tracing.py --source ../shared/data/dolly_first6400.jsonl \
        --out runs/tracing-data --size 1500
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rapidin_index.errors import RapidInError
from rapidin_index.evaluate import read_source, write_records
from rapidin_index.synthetic import DEFAULT_PAIRS, make_error_tracing_set, parse_pair

logger = logging.getLogger("make_error_tracing")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, help="Alpaca JSON or JSONL records.")
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--size", type=int, default=1500, help="Training records.")
    parser.add_argument(
        "--pair",
        action="append",
        metavar="E1:E2",
        help="Entity pair (repeatable) [the paper's three].",
    )
    parser.add_argument("--probability", type=float, default=0.8)
    parser.add_argument(
        "--prompts", default=None, help="JSON object: E1 -> list of questions whose answer is E1."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        pairs = [parse_pair(p) for p in args.pair] if args.pair else list(DEFAULT_PAIRS)
        prompts = json.loads(Path(args.prompts).read_text()) if args.prompts else None
        train, meta = make_error_tracing_set(
            read_source(args.source), pairs, args.size, args.probability, args.seed, prompts
        )
    except RapidInError as err:
        sys.exit(f"Error: {err}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "train.jsonl", train)
    meta["source"] = str(Path(args.source).resolve())
    (out / "error_tracing.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    for pair in meta["pairs"]:
        logger.info(
            "%s -> %s: %d perturbed of %d mentions",
            pair["e1"],
            pair["e2"],
            len(pair["perturbed_ids"]),
            len(pair["mentions"]),
        )
    logger.info(
        "wrote %s (%d records) and %s", out / "train.jsonl", len(train), out / "error_tracing.json"
    )


if __name__ == "__main__":
    main()
