"""The backdoor evaluation (paper Section 4.5, Table 4, with Tables 1 and 2) in one command.

Fine-tunes a LoRA (QLoRA with --load-in-4bit) adapter on the poisoned data made by
tools/make_backdoor.py, answers the held-out questions with and without the trigger, keeps
the answers that show the attack (theme words with the trigger, none without), builds a
RapidIn index per --k / --shuffle-rounds, scores every training example for each attacked
generation with every method and writes OUT/report.md and OUT/results.json. Every stage is
cached under OUT: rerunning the command redoes only what changed.

    python tools/make_backdoor.py --source ../shared/data/dolly_first6400.jsonl \
        --out runs/backdoor-data --size 1500
    python tools/run_backdoor_eval.py --data runs/backdoor-data --out runs/backdoor \
        --load-in-4bit --epochs 3
    python tools/run_backdoor_eval.py --tiny --out /tmp/backdoor-tiny   # plumbing, seconds

--score-variants adds the comparison of score definitions (OUT/score-variants.md); on a
finished OUT, rerun the same command with it added: every other stage comes from the cache.

--tiny uses a tiny random model that cannot learn the backdoor: its attacked generations
are injected (themed rewrites of the questions), so its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rapidin_index.errors import RapidInError
from rapidin_index.evaluate import (
    BackdoorPipeline,
    add_run_arguments,
    read_source,
    settings_from_args,
    write_records,
)
from rapidin_index.synthetic import make_backdoor_set

ROOT = Path(__file__).resolve().parents[1]


def make_tiny(out: Path) -> tuple[str, str]:
    """A tiny random model (tests/tiny.py) and 40 poisoned sample records, under ``out``."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_tiny_model

    model, data = out / "tiny-model", out / "tiny-data"
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    if not (data / "backdoor.json").is_file():
        data.mkdir(parents=True, exist_ok=True)
        records = read_source(str(ROOT / "data" / "instructions_sample.jsonl"), limit=60)
        train, meta = make_backdoor_set(records, size=40, n_test=6, fraction=0.2, seed=0)
        write_records(data / "train.jsonl", train)
        (data / "backdoor.json").write_text(json.dumps(meta, indent=2))
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
        parser.error("--data is required (the directory made by tools/make_backdoor.py)")
    else:
        model, data = None, args.data
    try:
        BackdoorPipeline(settings_from_args(args, data, model)).run()
    except RapidInError as err:
        sys.exit(f"Error: {err}")
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
