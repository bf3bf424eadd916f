"""Caching stage: one RapidGrad per training example, appended to the store.

A build is resumable: rows are committed chunk by chunk (and at least every
``flush_seconds``), and rerunning the same command continues after the last committed row.
Each row depends only on its own example, so a resumed build writes exactly the rows an
uninterrupted one would have. Next to each row the exact L2 norm of the example's
normalised gradient is stored (for ``query --score cosine``); an index begun by a version
without norms is continued without them.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from rapidin_index import __version__
from rapidin_index.data import file_sha256, load_records, tokenize_records
from rapidin_index.distributed import DistContext
from rapidin_index.errors import RapidInError, SettingsError
from rapidin_index.gradients import GradientComputer, GradientSettings, choose_batch_size
from rapidin_index.model import (
    LoadedModel,
    expand_params_preset,
    load_model,
    select_parameters,
)
from rapidin_index.progress import progress_bar
from rapidin_index.scores import manifest_section
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
    # Examples per forward/backward pass; None picks the largest that fits
    # memory_budget_gb (default: a share of the machine's memory, see
    # gradients.default_memory_budget).
    batch_size: int | None = None
    memory_budget_gb: float | None = None
    flush_seconds: float = 30.0
    limit: int | None = None
    # The --preset the score definition came from (recorded in the manifest), or None.
    preset: str | None = None


def model_section(identity: dict) -> dict:
    return dict(identity)


def comparable_model(identity: dict) -> dict:
    """The parts of a model identity that must match between build and query."""
    return {k: identity[k] for k in ("config_hash", "adapter_hash", "load_in_4bit")}


def prepare(settings: BuildSettings, loaded: LoadedModel | None = None):
    """Load what a build needs; returns (loaded, records, examples, computer, sketch, manifest)."""
    settings.gradient.validate()
    settings.sketch.validate()
    if settings.batch_size is not None and settings.batch_size < 1:
        raise SettingsError(f"--batch-size must be at least 1, got {settings.batch_size}")
    if settings.memory_budget_gb is not None and settings.memory_budget_gb <= 0:
        raise SettingsError(f"--memory-budget must be positive, got {settings.memory_budget_gb}")
    records = load_records(settings.data)
    if settings.limit is not None:
        records = records[: settings.limit]
    loaded = loaded or load_model(settings.model, settings.adapter, settings.load_in_4bit)
    examples = tokenize_records(records, loaded.tokenizer, settings.template, settings.max_length)
    preset_globs = expand_params_preset(loaded.model, settings.gradient.params_preset)
    params = select_parameters(loaded.model, settings.gradient.params, preset_globs)
    computer = GradientComputer(loaded.model, params, settings.gradient.normalization)
    sketch = RapidGradSketch(computer.dim, settings.sketch)
    gradient = {
        "params": list(settings.gradient.params),
        "params_preset": settings.gradient.params_preset,
        "preset_globs": preset_globs if settings.gradient.params_preset else None,
        **computer.manifest_entry(),
    }
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
        "gradient": gradient,
        "sketch": sketch.manifest_entry(),
        "scores": manifest_section(settings.preset, gradient, norms=True),
    }
    return loaded, records, examples, computer, sketch, manifest


def resolve_batch_size(
    settings: BuildSettings, computer: GradientComputer, sketch: RapidGradSketch, examples
) -> int:
    """``settings.batch_size``, or the largest batch that fits the memory budget.

    The automatic choice depends only on the data, the model and the budget (not on the
    memory free at the moment), so a resumed build batches its rows the same way.
    """
    if settings.batch_size is not None:
        return settings.batch_size
    budget = settings.memory_budget_gb
    return choose_batch_size(
        computer,
        examples,
        None if budget is None else int(budget * 2**30),
        sketch_bytes=partial(sketch.workspace_bytes, device=computer.device),
    )


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
        if not store.has_norms:
            logger.warning(
                "%s was begun by a version that stores no gradient norms; continuing without "
                "them (query --score cosine will need a new --index)",
                path,
            )
        return store
    return Store.create(path, manifest, settings.sketch.k, settings.rows_per_chunk, with_norms=True)


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
    """Cache a RapidGrad for every training example that the index does not hold yet.

    Under ``torchrun`` each rank computes the chunks it owns (see
    :mod:`rapidin_index.distributed`); otherwise one process computes all of them.
    """
    ctx = DistContext.from_env()
    if loaded is None:
        loaded = load_model(
            settings.model, settings.adapter, settings.load_in_4bit, device=ctx.device()
        )
    loaded, records, examples, computer, sketch, manifest = prepare(settings, loaded)
    settings = replace(
        settings, batch_size=resolve_batch_size(settings, computer, sketch, examples)
    )
    total = len(examples)

    # Rank 0 creates the index or checks its settings; the others open it afterwards.
    store = open_or_create(settings, manifest) if ctx.is_main else None
    ctx.barrier()
    if store is None:
        store = open_or_create(settings, manifest)
    store.lock(f".lock-rank{ctx.rank}" if ctx.enabled else ".lock")
    if ctx.is_main:
        store.commit()  # fold in markers a crash left ahead of the manifest
    ctx.barrier()
    if store.rows > total:
        raise RapidInError(f"the index holds {store.rows} rows but the data has only {total}")

    per_chunk = store.rows_per_chunk
    written = {c: n for c, (n, _) in store.chunk_progress().items()}
    mine = [c for c in range(-(-total // per_chunk)) if ctx.owns_chunk(c)]
    todo = sum(min(per_chunk, total - c * per_chunk) - written.get(c, 0) for c in mine)
    if store.rows:
        logger.info(
            "resuming %s: %d rows committed, %d left for rank %d",
            settings.index,
            store.rows,
            todo,
            ctx.rank,
        )

    # SIGTERM (kill, a scheduler's time limit) commits like Ctrl-C; kill -9 loses at most
    # the rows computed since the last flush, which the next run recomputes.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    began = time.perf_counter()
    computed = 0
    try:
        with progress_bar(
            total=todo,
            unit="ex",
            desc=f"caching (rank {ctx.rank})" if ctx.enabled else "caching",
            enabled=progress,
        ) as bar:
            for chunk in mine:
                computed += _build_chunk(
                    settings, store, ctx, examples, computer, sketch, chunk, bar
                )
    except KeyboardInterrupt:
        if ctx.is_main:
            store.commit()
        raise BuildInterrupted(
            f"interrupted with {store.rows} of {total} rows committed; "
            "rerun the same command to continue"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        store.unlock()
    seconds = time.perf_counter() - began
    counts = ctx.gather(computed)
    ctx.barrier()
    if ctx.is_main:
        store.commit()
        store.update_manifest(
            build={
                "last_run_examples": sum(counts),
                "last_run_seconds": round(seconds, 3),
                "world_size": ctx.world_size,
                "settings": _jsonable(asdict(settings)),
            }
        )
    else:
        store.reload()
    report = BuildReport(settings.index, store.rows, sum(counts), seconds)
    logger.info(
        "rank %d wrote %d rows to %s in %.1f s (%.2f examples/s)",
        ctx.rank,
        computed,
        settings.index,
        seconds,
        computed / seconds if seconds else 0.0,
    )
    return report


def _build_chunk(settings, store, ctx, examples, computer, sketch, chunk, bar) -> int:
    """Compute the missing rows of one chunk; returns how many were computed.

    Batches start at the chunk's first row (and flushes happen between batches), so a
    row's batch companions do not depend on the number of ranks or on earlier crashes.
    """
    per_chunk = store.rows_per_chunk
    lo = chunk * per_chunk
    hi = min(lo + per_chunk, len(examples))
    rows = list(store.read_chunk_rows(chunk))
    norms = list(store.read_chunk_norms(chunk))
    if lo + len(rows) >= hi:
        return 0
    last_flush, computed = time.perf_counter(), 0

    def write() -> None:
        store.write_chunk(chunk, np.stack(rows), np.array(norms, dtype=np.float32))
        if ctx.is_main:
            store.commit()

    try:
        for first in range(lo + len(rows), hi, settings.batch_size):
            batch = examples[first : min(first + settings.batch_size, hi)]
            grads = computer.gradients(batch)
            with torch.no_grad():
                # The exact norm of each normalised gradient, before the transform.
                batch_norms = torch.linalg.vector_norm(grads, dim=1).cpu().numpy()
                rapid = sketch.transform(grads).cpu().numpy()
            rows.extend(rapid.astype(np.float16))
            norms.extend(batch_norms.astype(np.float32))
            computed += len(batch)
            bar.update(len(batch))
            if time.perf_counter() - last_flush >= settings.flush_seconds:
                write()
                last_flush = time.perf_counter()
    finally:
        if rows:
            write()
    return computed


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
