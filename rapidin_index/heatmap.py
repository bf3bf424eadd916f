"""Token-wise influence as a heat map: a self-contained HTML page and a terminal rendering.

Both render the JSON form of query results (``QueryResult.to_json()`` after
:func:`rapidin_index.tokenwise.annotate`), in the spirit of the paper's figures 4 and 8-21: the
prompt and the generation, then the top training examples with each response token shaded by
its influence on the generation (Eq. 6). Red is positive (the token pushed the model towards
the generation), blue negative; each example is scaled to its own largest |score|.

Safety: every piece of data goes through :func:`html.escape` (text and attribute values), the
page contains no script at all, and a Content-Security-Policy forbids scripts anyway, so
training text such as ``<script>`` is shown, never run.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.style import Style
from rich.text import Text

logger = logging.getLogger(__name__)

POSITIVE = (214, 39, 40)  # red: pushes towards the generation
NEGATIVE = (31, 119, 180)  # blue: pushes away from it
MAX_ALPHA = 0.85
PAIRWISE_MAX = 300  # rows/columns of the Eq. 8 table shown in the page


@dataclass(frozen=True)
class Segment:
    """A run of characters ``[start, end)`` of one string.

    Attributes:
        score: Summed score of the tokens in it; None for text outside scored tokens.
        tokens: How many tokens it merges (0 for plain text). Tokens whose character ranges
            overlap (a multi-byte character split between tokens) form one segment.
        target: Whether it belongs to ``--target-text``.
    """

    start: int
    end: int
    score: float | None
    tokens: int
    target: bool = False


def segments(text: str, pieces: Sequence[dict]) -> list[Segment]:
    """Non-overlapping segments covering all of ``text``, from token pieces of it."""
    out: list[Segment] = []
    cursor = 0
    for p in sorted(
        (p for p in pieces if p["end"] > p["start"]), key=lambda p: (p["start"], p["end"])
    ):
        start, end = max(p["start"], 0), min(p["end"], len(text))
        if end <= start:
            continue
        last = out[-1] if out else None
        if last is not None and last.tokens and start < last.end:
            score = (
                None
                if last.score is None and p.get("score") is None
                else (last.score or 0.0) + (p.get("score") or 0.0)
            )
            out[-1] = Segment(
                last.start,
                max(last.end, end),
                score,
                last.tokens + 1,
                last.target or bool(p.get("target")),
            )
        else:
            if start > cursor:
                out.append(Segment(cursor, start, None, 0))
            start = max(start, cursor)
            out.append(Segment(start, end, p.get("score"), 1, bool(p.get("target"))))
        cursor = max(cursor, end)
    if cursor < len(text):
        out.append(Segment(cursor, len(text), None, 0))
    return out


def scale_of(scores: Sequence[float | None]) -> float:
    """Largest |score|, the value that gets full colour (1.0 when there is none)."""
    values = [abs(s) for s in scores if s is not None]
    top = max(values, default=0.0)
    return top if top > 0 else 1.0


def colour(score: float, scale: float) -> tuple[int, int, int, float]:
    """(r, g, b, alpha) of a score on the diverging scale [-scale, +scale].

    Intensity grows with sqrt(|score| / scale): token scores are heavy-tailed (a few tokens
    dominate), and a linear ramp would leave all but the top one or two nearly white.
    """
    base = POSITIVE if score >= 0 else NEGATIVE
    return (*base, round(min(abs(score) / scale, 1.0) ** 0.5 * MAX_ALPHA, 3))


def _blend(score: float, scale: float) -> str:
    # Terminals have no alpha: mix the colour into white; returns "#rrggbb".
    r, g, b, a = colour(score, scale)
    return "#" + "".join(f"{round(255 - a * (255 - c)):02x}" for c in (r, g, b))


def _fmt(score: float) -> str:
    return f"{score:+.4g}"


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.55 system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK JP",
       "Noto Color Emoji", sans-serif; margin: 24px auto; max-width: 1100px; color: #1a1a1a;
       padding: 0 16px; }
h1 { font-size: 20px; margin: 0 0 8px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.label { font-weight: 600; color: #555; margin-top: 6px; }
.text { white-space: pre-wrap; word-wrap: break-word; padding: 4px 8px; border-left: 3px solid
        #eee; }
.tok { border-radius: 3px; }
.eos { font-size: 11px; font-family: monospace; border: 1px solid #bbb; border-radius: 3px;
       padding: 0 3px; margin-left: 2px; }
mark.target { background: #ffe066; outline: 2px solid #e0a800; border-radius: 2px; }
.tok.target { outline: 2px solid #e0a800; }
.example { border: 1px solid #e3e3e3; border-radius: 6px; padding: 6px 12px 10px;
           margin: 12px 0; }
.meta { color: #666; font-size: 13px; font-weight: normal; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 13px; color: #444;
          margin: 8px 0 4px; flex-wrap: wrap; }
.bar { width: 240px; height: 14px; border: 1px solid #ccc; border-radius: 3px;
       background: linear-gradient(to right, rgba(31,119,180,.85), #fff, rgba(214,39,40,.85)); }
.note { color: #666; font-size: 13px; }
details { margin-top: 6px; }
summary { cursor: pointer; color: #444; font-size: 13px; }
.pairwise { overflow: auto; max-height: 600px; border: 1px solid #eee; }
.pairwise table { border-collapse: collapse; font-size: 11px; }
.pairwise td { width: 14px; height: 14px; padding: 0; }
.pairwise th { font-weight: normal; white-space: pre; padding: 0 4px; text-align: right; }
.pairwise th.target { background: #ffe066; font-weight: 600; }
.pairwise thead th { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left;
                     height: 70px; padding: 2px 0; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _shade_style(score: float, scale: float) -> str:
    r, g, b, a = colour(score, scale)
    return f"background-color: rgba({r},{g},{b},{a})"


def _token_html(text: str, seg: Segment, scale: float) -> str:
    piece = text[seg.start : seg.end]
    if seg.tokens == 0 or seg.score is None:
        inner = _esc(piece)
        return f'<mark class="target">{inner}</mark>' if seg.target else inner
    what = repr(piece) if seg.tokens == 1 else f"{piece!r} ({seg.tokens} tokens)"
    classes = "tok target" if seg.target else "tok"
    return (
        f'<span class="{classes}" style="{_shade_style(seg.score, scale)}" '
        f'title="{_esc(what + " · I = " + _fmt(seg.score))}">{_esc(piece)}</span>'
    )


def shaded_html(text: str, pieces: Sequence[dict], scale: float | None = None) -> str:
    """``text`` as escaped HTML, its tokens shaded by score (title = the score)."""
    if scale is None:
        scale = scale_of([p.get("score") for p in pieces])
    return "".join(_token_html(text, seg, scale) for seg in segments(text, pieces))


def _eos_html(pieces: Sequence[dict], scale: float) -> str:
    out = []
    for p in pieces:
        if p.get("field") == "eos" and p.get("score") is not None:
            out.append(
                f'<span class="eos" style="{_shade_style(p["score"], scale)}" '
                f'title="{_esc("end of sequence · I = " + _fmt(p["score"]))}">'
                f"{_esc(p['text'])}</span>"
            )
    return "".join(out)


def _generation_html(query: dict) -> str:
    text = query.get("generation", "")
    spans = (query.get("target") or {}).get("spans") or []
    pieces = [{"start": s, "end": e, "score": None, "target": True} for s, e in spans]
    return "".join(_token_html(text, seg, 1.0) for seg in segments(text, pieces))


def _pair_title(gen_text: str, train_text: str, score: float) -> str:
    return f"{gen_text!r} ← {train_text!r} · I = {_fmt(score)}"


def _pairwise_html(pair: dict) -> str:
    rows, cols, matrix = pair["generation_tokens"], pair["train_tokens"], pair["matrix"]
    shown_rows, shown_cols = rows[:PAIRWISE_MAX], cols[:PAIRWISE_MAX]
    scale = scale_of([x for row in matrix for x in row])
    head = "".join(f'<th title="{_esc(c["text"])}">{_esc(c["text"])}</th>' for c in shown_cols)
    body = []
    for r, row in zip(shown_rows, matrix, strict=False):
        cells = "".join(
            f'<td style="{_shade_style(x, scale)}" '
            f'title="{_esc(_pair_title(r["text"], c["text"], x))}"></td>'
            for c, x in zip(shown_cols, row, strict=False)
        )
        mark = ' class="target"' if r.get("target") else ""
        body.append(f"<tr><th{mark}>{_esc(r['text'])}</th>{cells}</tr>")
    cut = ""
    if len(rows) > PAIRWISE_MAX or len(cols) > PAIRWISE_MAX:
        cut = f'<p class="note">showing the first {PAIRWISE_MAX} tokens of each side</p>'
    return (
        f"<h3>Token × token influence, example {_esc(pair['id'])} (Eq. 8) "
        f'<span class="meta">rows: generation tokens, columns: training response tokens; '
        f"max |I| = {scale:.4g}</span></h3>{cut}"
        f'<div class="pairwise"><table><thead><tr><th></th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _example_html(query: dict, row: dict) -> str:
    tokens = row.get("tokens") or []
    scored = [p for p in tokens if p.get("score") is not None]
    scale = scale_of([p["score"] for p in scored])
    meta = f"sketch score {row['score']:.4g}"
    if "exact_score" in row:
        meta += f", exact score {row['exact_score']:.4g}"
    if scored:
        meta += f", max |I(t, s<sup>i</sup>)| = {scale:.4g}"
    parts = [
        f'<div class="example"><h3>#{_esc(row["rank"])} · training example '
        f'{_esc(row["id"])} <span class="meta">{meta}</span></h3>'
    ]
    for field, label in (
        ("instruction", "Instruction"),
        ("input", "Input"),
        ("output", "Response"),
    ):
        text = row.get(field) or ""
        if not text and field != "output":
            continue
        own = [p for p in tokens if p.get("field") == field]
        body = shaded_html(text, own, scale)
        if field == "output":
            body += _eos_html(tokens, scale)
        parts.append(f'<div class="label">{label}</div><div class="text">{body}</div>')
    gen_scores = row.get("generation_scores")
    gen_tokens = query.get("generation_tokens")
    if gen_scores and gen_tokens and len(gen_scores) == len(gen_tokens):
        pieces = [dict(p, score=s) for p, s in zip(gen_tokens, gen_scores, strict=True)]
        gscale = scale_of(gen_scores)
        body = shaded_html(query.get("generation", ""), pieces, gscale) + _eos_html(pieces, gscale)
        parts.append(
            f"<details><summary>Which generation tokens this example supports "
            f"(I(t<sup>j</sup>, s), Eq. 7; max |I| = {gscale:.4g})</summary>"
            f'<div class="text">{body}</div></details>'
        )
    parts.append("</div>")
    return "".join(parts)


def render_html(queries: Sequence[dict], title: str = "RapidIn token-wise influence") -> str:
    """One self-contained page (no scripts, no external resources) for query results.

    Args:
        queries: ``QueryResult.to_json()`` dicts; results with ``tokens`` are drawn shaded,
            others (when none has tokens) as plain text.
    """
    body = []
    for n, query in enumerate(queries, start=1):
        body.append(f"<h2>Query {n}</h2>")
        body.append(
            f'<div class="label">Prompt</div><div class="text">'
            f"{_esc(query.get('prompt', ''))}</div>"
        )
        target = query.get("target")
        label = "Generation"
        if target:
            label += (
                f' <span class="meta">(target <mark class="target">'
                f"{_esc(target['text'])}</mark>, {len(target['spans'])} occurrence(s); "
                f"retrieval and scores use only its tokens)</span>"
            )
        body.append(
            f'<div class="label">{label}</div><div class="text">{_generation_html(query)}</div>'
        )
        rows = query.get("results") or []
        with_tokens = [r for r in rows if r.get("tokens")]
        for row in with_tokens or rows:
            body.append(_example_html(query, row))
        if query.get("pairwise"):
            body.append(_pairwise_html(query["pairwise"]))
    legend = (
        '<div class="legend"><span>negative</span><span class="bar"></span><span>positive'
        "</span><span>· intensity ∝ √(|score| / max |score| of the example); hover a token for "
        'its score</span></div><p class="note">Token score I(t, s<sup>i</sup>) (paper Eq. 6): '
        "the influence of the training token's own loss term on the generation, from "
        "uncompressed layer-normalised gradients; their mean over an example's response "
        "tokens is the example's exact score. Instruction and input tokens have no loss term "
        "and are not shaded.</p>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1>{legend}{''.join(body)}</body></html>\n"
    )


def write_html(path: str | Path, queries: Sequence[dict], title: str | None = None) -> Path:
    """Writes :func:`render_html` to ``path`` (UTF-8) and returns the path."""
    path = Path(path)
    page = render_html(queries) if title is None else render_html(queries, title)
    path.write_text(page, encoding="utf-8")
    logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------------


def shaded_text(text: str, pieces: Sequence[dict], scale: float | None = None) -> Text:
    """A rich Text of ``text`` with each token's background coloured by its score."""
    if scale is None:
        scale = scale_of([p.get("score") for p in pieces])
    out = Text()
    for seg in segments(text, pieces):
        piece = text[seg.start : seg.end]
        if seg.tokens and seg.score is not None:
            style = Style(color="black", bgcolor=_blend(seg.score, scale), underline=seg.target)
        elif seg.target:
            style = Style(color="black", bgcolor="#ffe066", bold=True)
        else:
            style = Style()
        # Text.append, never markup: training text is shown literally.
        out.append(piece, style=style)
    return out


def tokenwise_renderables(query: dict) -> list:
    """Rich renderables: the generation (target marked), then each scored example."""
    spans = (query.get("target") or {}).get("spans") or []
    gen = Text("generation: ", style="bold")
    gen.append_text(
        shaded_text(
            query.get("generation", ""), [{"start": s, "end": e, "target": True} for s, e in spans]
        )
    )
    out: list = [gen]
    for row in query.get("results") or []:
        tokens = row.get("tokens")
        if not tokens:
            continue
        scored = [p["score"] for p in tokens if p.get("score") is not None]
        scale = scale_of(scored)
        head = Text(f"#{row['rank']} example {row['id']}", style="bold")
        head.append(f"  score {row['score']:.4g}", style="dim")
        if "exact_score" in row:
            head.append(f", exact {row['exact_score']:.4g}", style="dim")
        head.append(f", max |I| {scale:.3g}", style="dim")
        body = shaded_text(
            row.get("output", ""), [p for p in tokens if p.get("field") == "output"], scale
        )
        for p in tokens:
            if p.get("field") == "eos" and p.get("score") is not None:
                body.append(
                    f" {p['text']}", style=Style(color="black", bgcolor=_blend(p["score"], scale))
                )
        out.extend([head, body])
    pair = query.get("pairwise")
    if pair:
        cells = [(x, i, j) for i, row in enumerate(pair["matrix"]) for j, x in enumerate(row)]
        cells.sort(key=lambda c: -c[0])
        lines = Text(f"strongest token pairs, example {pair['id']} (Eq. 8):\n", style="bold")
        for x, i, j in cells[:10]:
            lines.append(
                f"  {pair['generation_tokens'][i]['text']!r} <- "
                f"{pair['train_tokens'][j]['text']!r}: {x:+.4g}\n"
            )
        out.append(lines)
    return out


def print_tokenwise(queries: Sequence[dict], console: Console | None = None) -> None:
    """Prints the token-wise heat map of each query (red positive, blue negative)."""
    console = console or Console()
    for n, query in enumerate(queries, start=1):
        if not (query.get("pairwise") or any(r.get("tokens") for r in query.get("results") or [])):
            continue
        console.print(
            Text(f"Token-wise influence, query {n} (Eq. 6; red +, blue -)", style="bold underline")
        )
        console.print(Group(*tokenwise_renderables(query)), highlight=False)
