"""The HTML and terminal heat maps: hostile training text is displayed, never interpreted."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from rapidin_index.heatmap import print_tokenwise, render_html, segments, shaded_text

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")

HOSTILE_OUTPUT = (
    "<script>alert(1)</script> & \"q\" 'a' <img src=x onerror=alert(2)> "
    "</div><!-- --> [bold]not markup[/bold] Zürich 東京 🙂"
)
HOSTILE_INSTRUCTION = "Say <b>hi</b> & <style>body{display:none}</style>"


def _pieces(text: str, field: str, scored: bool = True) -> list[dict]:
    # Three characters per "token", plus two tokens sharing one character (as byte-level BPE
    # does with an emoji) to exercise merging.
    out = [
        {
            "text": text[i : i + 3],
            "start": i,
            "end": min(i + 3, len(text)),
            "field": field,
            "score": ((i % 7) - 3) / 3 if scored else None,
        }
        for i in range(0, len(text), 3)
    ]
    at = text.find("🙂")
    if at >= 0:
        out.append(
            {
                "text": "🙂",
                "start": at,
                "end": at + 1,
                "field": field,
                "score": 0.5 if scored else None,
            }
        )
    return out


def hostile_query() -> dict:
    generation = "Hello </textarea><script>alert(4)</script> Zürich 東京 🙂 and Zürich again"
    return {
        "prompt": "<svg onload=alert(5)>",
        "generation": generation,
        "target": {
            "text": "Zürich",
            "spans": [[generation.find("Zürich"), generation.find("Zürich") + 6]],
        },
        "generation_tokens": _pieces(generation, "generation", scored=False),
        "results": [
            {
                "rank": 1,
                "id": 3,
                "score": 0.5,
                "exact_score": 0.4,
                "instruction": HOSTILE_INSTRUCTION,
                "input": 'x" onmouseover="alert(6)',
                "output": HOSTILE_OUTPUT,
                "tokens": (
                    _pieces(HOSTILE_INSTRUCTION, "instruction", scored=False)
                    + _pieces(HOSTILE_OUTPUT, "output")
                    + [{"text": "</s>", "start": 0, "end": 0, "field": "eos", "score": -0.2}]
                ),
            }
        ],
    }


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def test_html_escapes_every_data_string_and_runs_nothing():
    page = render_html([hostile_query()])
    parsed = _Collector()
    parsed.feed(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags and "svg" not in parsed.tags
    assert set(parsed.tags) <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "h2",
        "h3",
        "div",
        "span",
        "mark",
        "sup",
        "p",
        "details",
        "summary",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
    }
    assert not [name for name, _ in parsed.attrs if name.startswith("on")]
    # The only <style> element is ours; the training text's <style> stays text.
    assert page.count("<style>") == 1
    text = "".join(parsed.text)
    for original in (
        HOSTILE_OUTPUT,
        HOSTILE_INSTRUCTION,
        "<svg onload=alert(5)>",
        'x" onmouseover="alert(6)',
        hostile_query()["generation"],
    ):
        assert original in text  # displayed literally, in full and in order


def test_html_declares_utf8_and_forbids_scripts():
    page = render_html([hostile_query()])
    assert '<meta charset="utf-8">' in page
    assert "default-src 'none'" in page and "script-src" not in page
    assert "東京 🙂" in page or "東京" in page  # written as UTF-8, not as entities


def test_segments_cover_the_text_once_and_merge_tokens_sharing_a_character():
    text = "ab 🙂 cd"
    pieces = [
        {"start": 0, "end": 2, "score": 1.0},
        {"start": 3, "end": 4, "score": 0.25},
        {"start": 3, "end": 4, "score": 0.5},
        {"start": 5, "end": 7, "score": -1.0},
    ]
    segs = segments(text, pieces)
    assert "".join(text[s.start : s.end] for s in segs) == text
    assert all(a.end == b.start for a, b in zip(segs, segs[1:], strict=False))
    emoji = next(s for s in segs if text[s.start : s.end] == "🙂")
    assert emoji.tokens == 2 and emoji.score == pytest.approx(0.75)


def test_terminal_heatmap_shows_training_text_literally_not_as_markup():
    query = hostile_query()
    row = query["results"][0]
    text = shaded_text(row["output"], [p for p in row["tokens"] if p["field"] == "output"])
    assert text.plain == HOSTILE_OUTPUT
    assert any(span.style.bgcolor is not None for span in text.spans)
    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor")
    print_tokenwise([query], console)
    shown = console.export_text()
    assert "[bold]not markup[/bold]" in shown.replace("\n", "")
    assert "Token-wise influence" in shown


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_chromium_renders_the_hostile_page_without_running_its_scripts(tmp_path):
    page = tmp_path / "page.html"
    page.write_text(render_html([hostile_query()]), encoding="utf-8")
    dom = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-500:]
    # Parse the live DOM (Chromium leaves "<" unescaped inside attribute values, so a plain
    # substring test would trip over the tooltips): no element came out of the data.
    parsed = _Collector()
    parsed.feed(dom.stdout)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert HOSTILE_OUTPUT in "".join(parsed.text)
    png = tmp_path / "page.png"
    shot = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "render_heatmap.py"),
            "--html",
            str(page),
            "--out",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert shot.returncode == 0, shot.stderr[-500:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
