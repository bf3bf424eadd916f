"""Caching stage: one RapidGrad per training example, appended to the store.

A build is resumable: rows are committed chunk by chunk (and at least every
``flush_seconds``), and rerunning the same command continues after the last committed row.
Each row depends only on its own example, so a resumed build writes exactly the rows an
uninterrupted one would have.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rapidin_index import __version__
from rapidin_index.data import file_sha256, load_records, tokenize_records
from rapidin_index.errors import RapidInError, SettingsError
from rapidin_index.gradients import GradientComputer, GradientSettings
from rapidin_index.model import LoadedModel, load_model, select_parameters
from rapidin_index.progress import progress_bar
from rapidin_index.sketch import RapidGradSketch, SketchSettings
from rapidin_index.store import MANIFEST, Store, compare_settings

logger = logging.getLogger(__name__)


class BuildInterrupted(RapidInError, RuntimeError):
    """The build was stopped by a signal after committing what it had computed."""


@dataclass(frozen=True)
class BuildSettings:
    """Everything ``rapidin-index build`` takes; the settings parts go to the manifest."""

    data: str
    index: str
    model: str | None = None
    adapter: str | None = None
    load_in_4bit: bool = False
    template: str = "alpaca"
    max_length: int = 512
    gradient: GradientSettings = field(default_factory=GradientSettings)
    sketch: SketchSettings = field(default_factory=SketchSettings)
    rows_per_chunk: int | None = None
    batch_size: int = 1
    flush_seconds: float = 30.0
    limit: int | None = None


def model_section(identity: dict) -> dict:
    return dict(identity)


def comparable_model(identity: dict) -> dict:
    """The parts of a model identity that must match between build and query."""
    return {k: identity[k] for k in ("config_hash", "adapter_hash", "load_in_4bit")}


def prepare(settings: BuildSettings, loaded: LoadedModel | None = None):
    """Load what a build needs; returns (loaded, records, examples, computer, sketch, manifest)."""
    settings.gradient.validate()
    settings.sketch.validate()
    if settings.batch_size < 1:
        raise SettingsError(f"--batch-size must be at least 1, got {settings.batch_size}")
    records = load_records(settings.data)
    if settings.limit is not None:
        records = records[: settings.limit]
    loaded = loaded or load_model(settings.model, settings.adapter, settings.load_in_4bit)
    examples = tokenize_records(records, loaded.tokenizer, settings.template, settings.max_length)
    params = select_parameters(loaded.model, settings.gradient.params)
    computer = GradientComputer(loaded.model, params, settings.gradient.normalization)
    sketch = RapidGradSketch(computer.dim, settings.sketch)
    manifest = {
        "package_version": __version__,
        "model": model_section(loaded.identity),
        "data": {
            "path": str(Path(settings.data).resolve()),
            "sha256": file_sha256(settings.data),
            "records": len(records),
            "template": settings.template,
            "max_length": settings.max_length,
            "truncated": sum(e.truncated for e in examples),
        },
        "gradient": {"params": list(settings.gradient.params), **computer.manifest_entry()},
        "sketch": sketch.manifest_entry(),
    }
    return loaded, records, examples, computer, sketch, manifest


def open_or_create(settings: BuildSettings, manifest: dict) -> Store:
    """Open the index for appending after checking its settings, or create it."""
    path = Path(settings.index)
    if (path / MANIFEST).exists():
        store = Store.open(path)
        recorded = store.manifest
        requested = {
            "model": comparable_model(manifest["model"]),
            "data": {k: manifest["data"][k] for k in ("sha256", "template", "max_length")},
            "gradient": manifest["gradient"],
            "sketch": manifest["sketch"],
        }
        compare_settings(
            recorded, requested, hint="use the original flags, or a new --index for new settings"
        )
        return store
    return Store.create(path, manifest, settings.sketch.k, settings.rows_per_chunk)


@dataclass
class BuildReport:
    index: str
    rows: int
    computed: int
    seconds: float

    @property
    def examples_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def build_index(
    settings: BuildSettings, loaded: LoadedModel | None = None, progress: bool = True
) -> BuildReport:
    """Cache a RapidGrad for every training example that the index does not hold yet."""
    loaded, records, examples, computer, sketch, manifest = prepare(settings, loaded)
    store = open_or_create(settings, manifest)
    store.lock()
    start = store.rows
    total = len(examples)
    if start > total:
        raise RapidInError(f"the index holds {start} rows but the data has only {total}")
    if start:
        logger.info("resuming %s at row %d of %d", settings.index, start, total)

    # SIGTERM (kill, a scheduler's time limit) commits like Ctrl-C; kill -9 loses at most
    # the rows computed since the last flush, which the next run recomputes.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    began = time.perf_counter()
    last_flush = began
    done = start
    try:
        with progress_bar(
            total=total, initial=start, unit="ex", desc="caching", enabled=progress
        ) as bar:
            for first in range(start, total, settings.batch_size):
                batch = examples[first : first + settings.batch_size]
                grads = computer.gradients(batch)
                with torch.no_grad():
                    rapid = sketch.transform(grads)
                store.append(rapid.cpu().numpy())
                done = first + len(batch)
                bar.update(len(batch))
                if time.perf_counter() - last_flush >= settings.flush_seconds:
                    store.flush()
                    last_flush = time.perf_counter()
        store.flush()
    except KeyboardInterrupt:
        store.flush()
        raise BuildInterrupted(
            f"interrupted after {store.rows} of {total} rows (all committed); "
            "rerun the same command to continue"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        store.unlock()
    seconds = time.perf_counter() - began
    report = BuildReport(settings.index, store.rows, done - start, seconds)
    store.update_manifest(
        build={
            "last_run_examples": report.computed,
            "last_run_seconds": round(seconds, 3),
            "settings": _jsonable(asdict(settings)),
        }
    )
    logger.info(
        "wrote %d rows to %s in %.1f s (%.2f examples/s)",
        report.computed,
        settings.index,
        seconds,
        report.examples_per_second,
    )
    return report


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
