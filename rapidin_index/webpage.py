"""The query service's web page: a query form, the ranked examples and their token heat maps.

Rendered on the server as plain HTML forms, with no script at all: the heat maps are the
ones of :mod:`rapidin_index.heatmap` (the same markup as its self-contained page), every
piece of text goes through :func:`html.escape`, and a Content-Security-Policy (meta tag and
HTTP header) forbids scripts anyway, so training text such as ``<script>`` is shown, never
run, and an HTML entity in it is shown as written.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass

from rapidin_index import heatmap

logger = logging.getLogger(__name__)

_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
SNIPPET_CHARS = 400  # of each field in the results list; heat maps show the full text

_CSS = """
form.query { display: grid; gap: 6px; margin: 12px 0 18px; }
form.query textarea, form.query input[type=text] { font: inherit; width: 100%;
  box-sizing: border-box; padding: 6px; border: 1px solid #bbb; border-radius: 4px; }
form.query .row { display: flex; gap: 18px; align-items: center; flex-wrap: wrap; }
form.query input[type=number] { width: 5em; font: inherit; }
button { font: inherit; padding: 4px 14px; cursor: pointer; }
.error { background: #fdecea; border: 1px solid #f5c2bd; color: #8a1f11; padding: 8px 12px;
         border-radius: 4px; }
ol.results { padding-left: 2.2em; }
ol.results li { margin: 10px 0; }
ol.results .field { white-space: pre-wrap; word-wrap: break-word; color: #333; }
ol.results form { display: inline; }
ol.results button { font-size: 12px; padding: 1px 8px; margin-left: 8px; }
.score { font-family: monospace; }
"""


@dataclass(frozen=True)
class Limits:
    """What the form allows (the service's settings)."""

    max_text_chars: int
    max_topk: int
    max_heatmaps: int


@dataclass(frozen=True)
class FormValues:
    """The form's fields as submitted (numbers as the text typed, to show them back)."""

    prompt: str = ""
    generation: str = ""
    target_text: str = ""
    topk: str = "10"
    heatmaps: str = "3"


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _shell(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(_CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{heatmap._CSS}{_CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1>{body}</body></html>\n"
    )


def _form_html(form: FormValues, limits: Limits) -> str:
    cap = limits.max_text_chars
    return (
        '<form class="query" method="post" action="/">'
        '<label class="label" for="prompt">Prompt</label>'
        f'<textarea id="prompt" name="prompt" rows="3" required maxlength="{cap}">'
        f"{_esc(form.prompt)}</textarea>"
        '<label class="label" for="generation">Generation <span class="meta">(leave empty '
        "to let the model write it)</span></label>"
        f'<textarea id="generation" name="generation" rows="4" maxlength="{cap}">'
        f"{_esc(form.generation)}</textarea>"
        '<label class="label" for="target_text">Target text <span class="meta">(optional: '
        "attribute only these characters of the generation, every occurrence, "
        "case-sensitive)</span></label>"
        f'<input type="text" id="target_text" name="target_text" maxlength="{cap}" '
        f'value="{_esc(form.target_text)}">'
        '<div class="row">'
        f'<label>Results <input type="number" name="topk" min="1" max="{limits.max_topk}" '
        f'value="{_esc(form.topk)}"></label>'
        '<label>Token heat maps for the top <input type="number" name="heatmaps" min="0" '
        f'max="{limits.max_heatmaps}" value="{_esc(form.heatmaps)}"></label>'
        '<button type="submit" id="submit">Attribute</button></div></form>'
    )


def _hidden(name: str, value: object) -> str:
    return f'<input type="hidden" name="{_esc(name)}" value="{_esc(value)}">'


def _snippet(text: str) -> str:
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def _result_item(form: FormValues, query: dict, row: dict) -> str:
    fields = []
    for name in ("instruction", "input", "output"):
        text = row.get(name)
        if text:
            fields.append(
                f'<div class="field"><span class="label">{name}:</span> '
                f"{_esc(_snippet(text))}</div>"
            )
    # The heat-map button re-sends the query with the example's id: the page has no
    # script, so a form of hidden fields carries the state.
    button = (
        '<form method="post" action="/example">'
        + _hidden("prompt", query["prompt"])
        + _hidden("generation", query["generation"])
        + _hidden("target_text", form.target_text)
        + _hidden("id", row["id"])
        + _hidden("rank", row["rank"])
        + '<button type="submit" class="heatmap">token heat map</button></form>'
    )
    return (
        f'<li data-id="{_esc(row["id"])}"><span class="score">{row["score"]:+.4g}</span> '
        f"training example <b>{_esc(row['id'])}</b>{button}{''.join(fields)}</li>"
    )


def _query_html(query: dict, generated: bool) -> str:
    target = query.get("target")
    label = "Generation"
    if generated:
        label += ' <span class="meta">(written by the model)</span>'
    if target:
        label += (
            f' <span class="meta">(target <mark class="target">{_esc(target["text"])}'
            f"</mark>, {len(target['spans'])} occurrence(s); retrieval and scores use "
            "only its tokens)</span>"
        )
    return (
        f'<h2>Query</h2><div class="label">Prompt</div><div class="text" id="shown-prompt">'
        f'{_esc(query.get("prompt", ""))}</div><div class="label">{label}</div>'
        f'<div class="text" id="shown-generation">{heatmap._generation_html(query)}</div>'
    )


_LEGEND = (
    '<div class="legend"><span>negative</span><span class="bar"></span><span>positive</span>'
    "<span>each training token's influence on the generation (paper Eq. 6), scaled to the "
    "example's largest |score|; hover a token for its score</span></div>"
)


def render_page(
    form: FormValues,
    limits: Limits,
    query: dict | None = None,
    generated: bool = False,
    error: str | None = None,
) -> str:
    """The service's page: the form, then an error or the results of ``query``.

    Args:
        form: Values to show in the form.
        limits: The service's limits (the form's bounds).
        query: ``QueryResult.to_json()``; its results with ``tokens`` get heat maps.
        generated: Whether the model wrote the generation.
        error: A message shown above the results (the response is then a 4xx or 503).
    """
    parts = [_form_html(form, limits)]
    if error is not None:
        parts.append(f'<p class="error" role="alert">{_esc(error)}</p>')
    if query is not None:
        rows = query.get("results") or []
        parts.append(_query_html(query, generated))
        parts.append(
            f'<h2>Most influential training examples <span class="meta">'
            f"({len(rows)}, RapidGrad scores)</span></h2>"
        )
        if rows:
            items = "".join(_result_item(form, query, row) for row in rows)
            parts.append(f'<ol class="results">{items}</ol>')
        else:
            parts.append('<p class="note">The index holds no rows yet.</p>')
        mapped = [row for row in rows if row.get("tokens")]
        if mapped:
            parts.append(f'<h2>Token heat maps</h2>{_LEGEND}<div id="heatmaps">')
            parts.extend(heatmap._example_html(query, row) for row in mapped)
            parts.append("</div>")
    return _shell("Which training examples made the model write this?", "".join(parts))


def render_example_page(form: FormValues, limits: Limits, query: dict) -> str:
    """The token heat map of one training example (``query`` has one annotated result)."""
    parts = [
        _query_html(query, False),
        f'<h2>Token heat map</h2>{_LEGEND}<div id="heatmaps">',
        "".join(heatmap._example_html(query, row) for row in query["results"]),
        "</div><h2>New query</h2>",
        _form_html(form, limits),
    ]
    return _shell("Token-wise influence of one training example", "".join(parts))
