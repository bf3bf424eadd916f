"""Readable terminal output of query results."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rapidin_index.query import QueryResult


def _snippet(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def results_table(rows: Sequence[dict], title: str) -> Table:
    """A table of ranked rows; an ``effect`` column when the rows carry one (--rank-by abs)."""
    effects = any("effect" in row for row in rows)
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("rank", justify="right")
    table.add_column("id", justify="right")
    table.add_column("score", justify="right")
    if effects:
        table.add_column("effect")
    table.add_column("instruction", overflow="fold")
    table.add_column("response", overflow="fold")
    for row in rows:
        instruction = row.get("instruction", "")
        if row.get("input"):
            instruction = f"{instruction} | {row['input']}"
        # Text(), not str: training text must never be parsed as rich markup.
        cells = [str(row["rank"]), str(row["id"]), f"{row['score']:.4g}"]
        if effects:
            cells.append(row.get("effect", ""))
        table.add_row(
            *cells,
            Text(_snippet(instruction, 60)),
            Text(_snippet(row.get("output", ""), 60)),
        )
    return table


def print_results(results: Sequence[QueryResult], console: Console | None = None) -> None:
    console = console or Console()
    for i, result in enumerate(results, start=1):
        header = Text(f"Query {i}", style="bold")
        header.append(f"  prompt: {_snippet(result.prompt, 100)}", style="")
        console.print(header, highlight=False)
        console.print(
            f"generation: {_snippet(result.generation, 200)}", markup=False, highlight=False
        )
        score = "cosine" if result.score == "cosine" else "score"
        if result.rank_by == "abs":
            title = f"most influential (largest |{score}|, helpful or harmful)"
        else:
            title = f"most helpful (highest {score})"
        console.print(results_table(result.results, title))
        if result.bottom is not None:
            console.print(results_table(result.bottom, f"most harmful (lowest {score})"))
