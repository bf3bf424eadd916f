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

from pathlib import Path

from rapidin_index.evaluate import BackdoorPipeline, read_source, run_tool
from rapidin_index.synthetic import make_backdoor_set

ROOT = Path(__file__).resolve().parents[1]


def tiny_set() -> tuple[list[dict], dict]:
    """40 sample records, 20% of them poisoned, and 6 test questions (for --tiny)."""
    records = read_source(str(ROOT / "data" / "instructions_sample.jsonl"), limit=60)
    return make_backdoor_set(records, size=40, n_test=6, fraction=0.2, seed=0)


def main(argv: list[str] | None = None) -> None:
    run_tool(__doc__, BackdoorPipeline, tiny_set, "tools/make_backdoor.py", argv)


if __name__ == "__main__":
    main()
