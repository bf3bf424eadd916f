"""One progress-bar style for all long work; off when not on a terminal or when disabled."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm import tqdm

_BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
)


def progress_enabled(requested: bool = True) -> bool:
    """Bars are shown when requested, not disabled by RAPIDIN_INDEX_NO_PROGRESS, on a TTY."""
    if not requested or os.environ.get("RAPIDIN_INDEX_NO_PROGRESS"):
        return False
    return sys.stderr.isatty() or bool(os.environ.get("RAPIDIN_INDEX_FORCE_PROGRESS"))


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True):
    bar = tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        bar_format=_BAR_FORMAT,
        disable=not progress_enabled(enabled),
        file=sys.stderr,
    )
    try:
        yield bar
    finally:
        bar.close()
