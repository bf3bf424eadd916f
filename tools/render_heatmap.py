"""Render a token-wise heat-map page in headless Chromium and save a screenshot.

Usage::

    python tools/render_heatmap.py --out heatmap.png                 # built-in demo page
    python tools/render_heatmap.py --html page.html --out page.png   # an existing page
    python tools/render_heatmap.py --json results.json --out r.png   # `query --format json`

The built-in demo needs no model: it draws made-up scores over long examples with non-ASCII
text ("Zürich 東京 🙂"), HTML special characters and a ``<script>`` in the training data, to
check by eye that everything is displayed literally. Without Chromium it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapidin_index.heatmap import write_html  # noqa: E402

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in ("/usr/bin/chromium", *CHROMIUM_NAMES):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(
    chromium: str, page: Path, png: Path, size: str = "1200,1600", timeout: float = 120.0
) -> Path:
    """Loads ``page`` in headless Chromium (no network, fresh profile) and writes ``png``."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png.resolve()}",
            f"--window-size={size}",
            page.resolve().as_uri(),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-800:]}")
    return png


def _pieces(text: str, field: str, phase: float, scored: bool) -> list[dict]:
    # Word-and-punctuation pieces standing in for tokens, with a smooth made-up score.
    out = []
    for k, m in enumerate(re.finditer(r"\s*[\w']+|\s*[^\w\s]", text)):
        score = 2.0 * math.sin(0.45 * k + phase) + 0.6 * math.cos(1.7 * k) if scored else None
        out.append(
            {"text": m.group(), "start": m.start(), "end": m.end(), "field": field, "score": score}
        )
    return out


def demo_queries() -> list[dict]:
    """A query dict with long, hostile and non-ASCII training text and made-up scores."""
    generation = (
        "The flu can cause fever, chills, cough and a sore throat. In Zürich and "
        "東京 alike, rest and fluids help 🙂. The flu usually passes in a week."
    )
    examples = [
        (
            "What are some common symptoms of influenza?",
            "",
            "Common symptoms of influenza include fever, chills, cough, muscle or body aches, "
            "headaches, fatigue, runny or stuffy nose, and sore throat. Some people may also "
            "experience vomiting and diarrhea, especially in children. The length of time that "
            "symptoms last can vary, but once the virus takes hold, symptoms usually last for one "
            "to two weeks. " * 2,
        ),
        (
            "Render this snippet <b>bold</b> & safe",
            "<script>alert(1)</script>",
            "Use &lt;b&gt; tags: <b>bold</b> & \"quoted\" 'text' <img src=x onerror=alert(2)> "
            "</div></span><script>alert(3)</script> — all of it must show as plain text.",
        ),
        (
            "Greet a traveller in Zürich, 東京 and São Paulo 🙂",
            "",
            "Grüezi in Zürich! こんにちは、東京へようこそ。Olá, bem-vindo a São Paulo 🙂🎉 — "
            "ℕ ≠ ℝ, naïve café, Ελληνικά, العربية, עברית.",
        ),
    ]
    results = []
    for rank, (instruction, extra, output) in enumerate(examples, start=1):
        tokens = (
            _pieces(instruction, "instruction", 0.0, False)
            + _pieces(extra, "input", 0.0, False)
            + _pieces(output, "output", rank * 1.3, True)
            + [{"text": "</s>", "start": 0, "end": 0, "field": "eos", "score": 0.8}]
        )
        scored = [t["score"] for t in tokens if t["score"] is not None]
        results.append(
            {
                "rank": rank,
                "id": 100 + rank,
                "score": 0.9 / rank,
                "exact_score": sum(scored) / len(scored),
                "instruction": instruction,
                "input": extra,
                "output": output,
                "tokens": tokens,
            }
        )
    gen_tokens = _pieces(generation, "generation", 0.0, False)
    for row in results:
        row["generation_scores"] = [math.sin(0.3 * k + row["rank"]) for k in range(len(gen_tokens))]
    at = generation.find("flu")
    spans = [[at, at + 3], [generation.rfind("flu"), generation.rfind("flu") + 3]]
    return [
        {
            "prompt": "What are the symptoms of the flu? <i>not italic</i>",
            "generation": generation,
            "results": results,
            "generation_tokens": gen_tokens,
            "target": {"text": "flu", "spans": spans},
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--html", type=Path, help="An existing heat-map page.")
    source.add_argument("--json", type=Path, help="Output of `query --format json`.")
    parser.add_argument("--out", type=Path, default=Path("heatmap.png"), help="PNG to write.")
    parser.add_argument("--size", default="1200,1600", help="Window size W,H.")
    args = parser.parse_args(argv)

    if args.html is not None:
        page = args.html
    else:
        queries = (
            json.loads(args.json.read_text(encoding="utf-8"))["queries"]
            if args.json is not None
            else demo_queries()
        )
        page = args.out.with_suffix(".html")
        write_html(page, queries)
        print(f"wrote {page}")
    chromium = find_chromium()
    if chromium is None:
        print("chromium not found (apt-get install -y chromium); skipped the screenshot")
        return 0
    screenshot(chromium, page, args.out, args.size)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
