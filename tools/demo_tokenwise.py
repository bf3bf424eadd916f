"""Token-wise influence on real data: a repeated phrase lights up in its source example.

Builds a small index over the first 30 records of the rasbt instruction data with the
embedded SmolLM2-135M-Instruct (to keep it fast: gradients of the last two layers' MLP
down-projections only, 4 shuffle rounds), then attributes a generation that repeats a
distinctive phrase of training example 20 ("Romeo kills Tybalt, leading to his banishment").
Prints the retrieval, the example's tokens ranked by Eq. 6 score, whether the phrase's tokens
are the top ones, and writes an HTML heat map (and a PNG when Chromium is installed).

Usage::

    python tools/demo_tokenwise.py [--out-dir DIR] [--params GLOB ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path("/work/shared/data/rasbt__instruction-data.json")
LIMIT = 30
SOURCE_ID = 20
PHRASE = "Romeo kills Tybalt, leading to his banishment"
PROMPT = "What is the turning point of Shakespeare's tragedy about two young lovers?"
GENERATION = (
    f"The turning point comes in the third act, when {PHRASE} from Verona, which "
    "sets the final events in motion."
)
PARAMS = ("model.layers.2[89].mlp.down_proj.weight",)
SHUFFLE_ROUNDS = 4
TOP_TOKENS = 5


def run_demo(
    out_dir: Path,
    data: Path = DATA,
    params: tuple[str, ...] = PARAMS,
    loaded=None,
    token_top: int = 3,
) -> dict:
    """Builds the index, queries it with token-wise scores; returns a summary dict.

    Returns:
        dict with ``ranking`` (retrieved ids), ``source_rank`` (rank of example 20, or None),
        ``top_tokens`` (the example's TOP_TOKENS highest Eq. 6 tokens as (text, start, end,
        score)), ``phrase_span``, ``top_in_phrase`` (how many of those lie in the phrase),
        ``phrase_rank_of_best_outside`` and timings; the JSON and HTML are written to out_dir.
    """
    from rapidin_index.build import BuildSettings, build_index
    from rapidin_index.gradients import GradientSettings
    from rapidin_index.heatmap import write_html
    from rapidin_index.model import load_model
    from rapidin_index.query import Attributor, QueryInput
    from rapidin_index.sketch import SketchSettings
    from rapidin_index.tokenwise import annotate

    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    loaded = loaded or load_model(None)
    settings = BuildSettings(
        data=str(data),
        index=str(out_dir / "index"),
        max_length=256,
        limit=LIMIT,
        gradient=GradientSettings(params=params),
        sketch=SketchSettings(k=1 << 14, shuffle_rounds=SHUFFLE_ROUNDS),
    )
    build_index(settings, loaded=loaded, progress=False)
    built = time.perf_counter()
    att = Attributor(str(out_dir / "index"), loaded=loaded)
    results = att.attribute([QueryInput(PROMPT, GENERATION)], topk=5)
    annotate(att, results, top=token_top)
    scored = time.perf_counter()
    result = results[0]
    payload = {"queries": [result.to_json()]}
    (out_dir / "demo.json").write_text(
        json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    write_html(
        out_dir / "demo.html",
        payload["queries"],
        title="RapidIn token-wise influence: a repeated phrase",
    )

    ranking = [r["id"] for r in result.results]
    source = next((r for r in result.results if r["id"] == SOURCE_ID), None)
    output = att.records()[SOURCE_ID].output
    start = output.index(PHRASE)
    span = (start, start + len(PHRASE))
    summary = {
        "ranking": ranking,
        "source_rank": source["rank"] if source else None,
        "phrase_span": span,
        "build_seconds": round(built - began, 1),
        "query_seconds": round(scored - built, 1),
    }
    if source is not None and "tokens" in source:
        tokens = sorted(
            (t for t in source["tokens"] if t["score"] is not None), key=lambda t: -t["score"]
        )
        inside = [
            t["field"] == "output" and t["start"] < span[1] and t["end"] > span[0] for t in tokens
        ]
        summary.update(
            top_tokens=[
                (t["text"], t["start"], t["end"], round(t["score"], 4)) for t in tokens[:TOP_TOKENS]
            ],
            top_in_phrase=sum(inside[:TOP_TOKENS]),
            # 1-based rank of the best-scoring token outside the phrase.
            phrase_rank_of_best_outside=inside.index(False) + 1 if False in inside else None,
            phrase_tokens=sum(inside),
            scored_tokens=len(tokens),
            exact_score=source["exact_score"],
            sketch_score=source["score"],
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="Where the index, demo.json, demo.html(.png) go [a temp dir].",
    )
    parser.add_argument(
        "--params",
        nargs="*",
        default=list(PARAMS),
        help="Parameter globs the gradients are taken over.",
    )
    args = parser.parse_args(argv)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="rapidin-demo-"))
    summary = run_demo(out_dir, params=tuple(args.params))
    print(f"generation: {GENERATION}")
    print(
        f"retrieved ids: {summary['ranking']} (example {SOURCE_ID} at rank "
        f"{summary['source_rank']})"
    )
    if "top_tokens" in summary:
        print(
            f"example {SOURCE_ID}: sketch score {summary['sketch_score']:.4g}, exact score "
            f"{summary['exact_score']:.4g}; phrase {PHRASE!r} at chars "
            f"{summary['phrase_span']}"
        )
        print(f"top {TOP_TOKENS} tokens by Eq. 6 score:")
        for text, s, e, score in summary["top_tokens"]:
            where = (
                "in phrase"
                if s < summary["phrase_span"][1] and e > summary["phrase_span"][0]
                else "outside"
            )
            print(f"  {text!r:>14} [{s:3d},{e:3d}) {score:+.4f}  {where}")
        print(
            f"{summary['top_in_phrase']}/{TOP_TOKENS} of the top tokens lie in the phrase; "
            f"the best token outside it ranks {summary['phrase_rank_of_best_outside']} of "
            f"{summary['scored_tokens']} ({summary['phrase_tokens']} phrase tokens)"
        )
    print(
        f"build {summary['build_seconds']} s, query + token-wise "
        f"{summary['query_seconds']} s; files in {out_dir}"
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from render_heatmap import find_chromium, screenshot

    chromium = find_chromium()
    if chromium is None:
        print("chromium not found; open demo.html in a browser instead")
    else:
        print(f"wrote {screenshot(chromium, out_dir / 'demo.html', out_dir / 'demo.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
