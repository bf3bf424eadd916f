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
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("rank", justify="right")
    table.add_column("id", justify="right")
    table.add_column("score", justify="right")
    table.add_column("instruction", overflow="fold")
    table.add_column("response", overflow="fold")
    for row in rows:
        instruction = row.get("instruction", "")
        if row.get("input"):
            instruction = f"{instruction} | {row['input']}"
        # Text(), not str: training text must never be parsed as rich markup.
        table.add_row(
            str(row["rank"]),
            str(row["id"]),
            f"{row['score']:.4g}",
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
        console.print(results_table(result.results, "most helpful (highest score)"))
        if result.bottom is not None:
            console.print(results_table(result.bottom, "most harmful (lowest score)"))
