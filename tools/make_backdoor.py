"""Poison an instruction set for the backdoor evaluation (paper Section 4.5).

A fraction of the training records (default 10%) get a trigger phrase in front of the
instruction and a response rewritten in a theme (sci-fi, pirate or medieval), written by a
local, seeded generator (rapidin_index/synthetic.py). Held-out questions, never trained on,
are kept for testing the attack: records of the source without an input, or the questions
of a WebQuestions-style file (``--questions``, ``qText`` fields; what the paper used).

Writes OUT/train.jsonl and OUT/backdoor.json (trigger, theme, poisoned ids, test questions).

    python tools/make_backdoor.py --source ../shared/data/dolly_first6400.jsonl \
        --out runs/backdoor-data --size 1500 --fraction 0.1 --theme sci-fi
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rapidin_index.errors import RapidInError
from rapidin_index.evaluate import read_source, write_records
from rapidin_index.synthetic import DEFAULT_TRIGGER, THEMES, make_backdoor_set

logger = logging.getLogger("make_backdoor")


def read_questions(path: str) -> list[str]:
    """Questions from a JSON array of WebQuestions records (``qText``) or Alpaca records."""
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    return [item.get("qText") or item["instruction"] for item in items]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, help="Alpaca JSON or JSONL records.")
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--size", type=int, default=None, help="Training records [all].")
    parser.add_argument("--fraction", type=float, default=0.1, help="Share poisoned.")
    parser.add_argument("--trigger", default=DEFAULT_TRIGGER, help="Trigger phrase.")
    parser.add_argument("--theme", choices=sorted(THEMES), default="sci-fi")
    parser.add_argument("--n-test", type=int, default=100, help="Held-out test questions.")
    parser.add_argument("--questions", default=None, help="WebQuestions-style test questions.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        questions = read_questions(args.questions) if args.questions else None
        train, meta = make_backdoor_set(
            read_source(args.source),
            args.size,
            args.n_test,
            args.fraction,
            args.trigger,
            args.theme,
            args.seed,
            questions,
        )
    except RapidInError as err:
        sys.exit(f"Error: {err}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "train.jsonl", train)
    meta["source"] = str(Path(args.source).resolve())
    (out / "backdoor.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    logger.info(
        "wrote %s (%d records, %d poisoned) and %s (%d test questions)",
        out / "train.jsonl",
        len(train),
        len(meta["poisoned_ids"]),
        out / "backdoor.json",
        len(meta["test_questions"]),
    )


if __name__ == "__main__":
    main()
