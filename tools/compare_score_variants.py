"""Compare score definitions over several evaluation runs (their --score-variants stage).

Reads OUT/score-variants.json and OUT/results.json of each run made by
tools/run_backdoor_eval.py or tools/run_error_tracing.py with --score-variants, and prints
one table: each score definition's headline figures in every run (precision of poisoned
examples among the top 10 and 50 for a backdoor run; share of perturbed examples among the
top 10 and 25 for error tracing, for each of its query sets), their mean, and the mean's
difference from the paper's definition; best mean first.

    python tools/compare_score_variants.py runs/bd2 runs/bd3 runs/et > docs/eval/score-variants.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rapidin_index.evaluate import compare_variants, comparison_markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="Output directories of the run_* tools.")
    parser.add_argument("--json", default=None, help="Also write the comparison here.")
    args = parser.parse_args(argv)
    runs = {}
    for path in map(Path, args.runs):
        variants, results = path / "score-variants.json", path / "results.json"
        if not variants.is_file() or not results.is_file():
            sys.exit(
                f"Error: {path} has no score-variants.json / results.json; run its "
                "run_* tool with --score-variants first"
            )
        kind = json.loads(results.read_text(encoding="utf-8"))["kind"]
        runs[path.name] = (kind, json.loads(variants.read_text(encoding="utf-8")))
    comparison = compare_variants(runs)
    if args.json:
        Path(args.json).write_text(json.dumps(comparison, indent=2), encoding="utf-8")
    print(comparison_markdown(comparison))


if __name__ == "__main__":
    main()
