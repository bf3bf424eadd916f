"""Query service (``rapidin-index serve``): one loaded model and index behind HTTP.

One :class:`~rapidin_index.query.Attributor` (the model loaded and the store opened once)
answers every request. The JSON API, described by the OpenAPI schema at ``/openapi.json``
(browsable at ``/docs``):

========================  ===============================================================
``GET /health``           liveness and load, answered at once even during slow queries
``GET /api/info``         the index (rows, K, model, data), the service's limits and counters
``POST /api/attribute``   rank the training examples for a prompt and a given generation
``POST /api/generate``    let the model write the generation, then rank as above
``POST /api/tokenwise``   token-wise scores (Eqs. 6-7, optionally 8) of one training example
========================  ===============================================================

and a web page at ``/`` (:mod:`rapidin_index.webpage`).

How requests share the model and the store:

* Admission. At most ``max_concurrent + max_queue`` requests are in flight; one more is
  answered 503 with a ``Retry-After`` header at once, before it has cost any memory.
* Model work (generation, the query gradient and its RapidGrad, token-wise scores) runs in a
  pool of ``max_concurrent`` threads, so at most that many forward/backward passes hold
  activations at once, and the event loop stays free for ``/health`` and other requests.
  Token-wise scoring swaps the model's parameters for dual tensors (forward-mode AD through
  ``torch.func.functional_call``), which a concurrent pass must not see, so it runs alone
  (:class:`ModelGate`).
* Scans. RapidGrads go to a single scan thread (:class:`ScanBatcher`), which scores all that
  arrived within ``batch_window_ms`` of the first, and all that arrived while the previous
  scan ran, in one pass over the store: the scan reads every row once for m queries, which
  costs far less than m passes (README, "Retrieval engines").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Annotated, Any, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from rapidin_index import __version__, webpage
from rapidin_index.errors import DataError, RapidInError, SettingsError
from rapidin_index.query import Attributor, QueryInput, QueryResult
from rapidin_index.scores import resolve_query_options

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Extra bytes allowed in a request body beyond its text fields (JSON keys, numbers, form
# encoding of the short fields).
_BODY_SLACK = 64 * 1024
# A character can take 12 bytes in a body: 4 UTF-8 bytes, each percent-encoded in a form.
_BYTES_PER_CHAR = 12


@dataclass(frozen=True)
class ServeSettings:
    """Limits and tuning of the service (the ``serve`` command's options).

    Attributes:
        max_concurrent: Model computations (gradient, generation, token-wise) at once; each
            holds one forward/backward pass in memory.
        max_queue: Requests admitted beyond those, waiting for a model thread or a scan;
            more get 503 with ``Retry-After``.
        max_text_chars: Longest prompt, generation or target text, in characters.
        max_topk: Largest ``topk`` a request may ask for.
        max_new_tokens: Longest generation a request may ask the model to write.
        max_heatmaps: Most token heat maps the web page computes per query.
        batch_window_ms: How long the scan thread waits after a query's RapidGrad arrives
            for others to join the same pass over the store.
        max_batch: Most queries in one scan.
        engine: Scan engine (``auto``, ``cpu``, ``gpu``).
    """

    max_concurrent: int = 2
    max_queue: int = 32
    max_text_chars: int = 8000
    max_topk: int = 100
    max_new_tokens: int = 256
    max_heatmaps: int = 5
    batch_window_ms: float = 5.0
    max_batch: int = 64
    engine: str = "auto"

    def validate(self) -> None:
        for name in ("max_concurrent", "max_text_chars", "max_topk", "max_new_tokens", "max_batch"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise SettingsError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.max_heatmaps < 0 or self.batch_window_ms < 0:
            raise SettingsError(
                "--max-queue, the heat-map limit and --batch-window-ms must not be negative"
            )

    @property
    def max_body_bytes(self) -> int:
        """Largest request body accepted: three text fields at the character limit."""
        return 3 * self.max_text_chars * _BYTES_PER_CHAR + _BODY_SLACK


class RequestError(Exception):
    """A request the service refuses, with the HTTP status and the message to send."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def status_of(err: Exception) -> tuple[int, str, dict[str, str]]:
    """HTTP status, message and headers for an error raised while answering a request."""
    if isinstance(err, RequestError):
        return err.status, err.message, err.headers()
    if isinstance(err, (DataError, SettingsError)):
        # What the request asked cannot be done (a target text that does not occur, a
        # generation with no tokens left after truncation): the request's fault.
        return 422, str(err), {}
    if isinstance(err, RapidInError):
        return 500, str(err), {}
    raise err


# --------------------------------------------------------------------------------------------
# Concurrency: admission, the model gate, the scan batcher
# --------------------------------------------------------------------------------------------


class Admission:
    """Counts requests in flight and turns away those over ``running + waiting``.

    The ``Retry-After`` it gives is the expected wait: a moving average of request time
    times the queue length ahead, divided by the requests served at once (1 to 60 s).
    """

    def __init__(self, running: int, waiting: int) -> None:
        self.running = running
        self.capacity = running + waiting
        self.in_flight = 0
        self.admitted = 0
        self.rejected = 0
        self._seconds = 1.0
        self._lock = threading.Lock()

    def enter(self) -> None:
        """Take a slot, or raise a 503 :class:`RequestError` when all are taken."""
        with self._lock:
            if self.in_flight >= self.capacity:
                self.rejected += 1
                ahead = self.in_flight - self.running + 1
                wait = math.ceil(self._seconds * max(ahead, 1) / self.running)
                raise RequestError(
                    503,
                    f"the service is at capacity ({self.in_flight} requests in flight, "
                    f"--max-concurrent {self.running} + --max-queue "
                    f"{self.capacity - self.running}); retry later",
                    retry_after=min(max(wait, 1), 60),
                )
            self.in_flight += 1
            self.admitted += 1

    def leave(self, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self._seconds = 0.8 * self._seconds + 0.2 * seconds


class ModelGate:
    """Shared/exclusive access to the model, waiting exclusive users first.

    Gradient passes and generation only read the parameters and can run side by side;
    token-wise scoring swaps them for dual tensors and must run alone.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            # A waiting exclusive user goes first, so a stream of gradient passes cannot
            # keep token-wise requests out for ever.
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


Ranked = tuple[np.ndarray, np.ndarray]  # (k,) int64 ids, (k,) float32 scores
ScanFn = Callable[[np.ndarray, int, bool], tuple[list[Ranked], list[Ranked] | None]]


@dataclass
class _Pending:
    vector: np.ndarray
    topk: int
    bottom: bool
    future: concurrent.futures.Future


class ScanBatcher:
    """Scores the RapidGrads of queries that arrive close together in one scan.

    Args:
        scan: ``scan(q, k, bottom) -> (tops, bottoms)`` with ``q`` an (m, K) float32 array
            and one ``(ids, scores)`` pair per query (``Attributor._scan``'s contract).
        window_s: After the first query of a batch arrives, how long to wait for others.
        max_batch: Most queries in one scan.
    """

    def __init__(self, scan: ScanFn, window_s: float = 0.005, max_batch: int = 64) -> None:
        self._scan = scan
        self._window = window_s
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self.scans = 0
        self.queries = 0
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="rapidin-scan", daemon=True)
        self._thread.start()

    def submit(self, vector: np.ndarray, topk: int, bottom: bool) -> concurrent.futures.Future:
        """Queue a (K,) float32 RapidGrad; the future gives ``(top, bottom or None)``."""
        if self._closed:
            raise RequestError(503, "the service is shutting down", retry_after=5)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Pending(vector, topk, bottom, future))
        return future

    def close(self, timeout: float = 30.0) -> None:
        """Finish the scan in progress, fail queued queries, stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = [first], False
            deadline = time.monotonic() + self._window
            while len(batch) < self._max_batch:
                # Queries that queued up during the previous scan are taken without waiting;
                # the window only delays the scan of a query that arrived alone.
                try:
                    left = deadline - time.monotonic()
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run(batch)
            if stop:
                break
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(
                    RequestError(503, "the service is shutting down", retry_after=5)
                )

    def _run(self, batch: list[_Pending]) -> None:
        batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not batch:
            return
        topk = max(p.topk for p in batch)
        bottom = any(p.bottom for p in batch)
        q = np.stack([p.vector for p in batch]).astype(np.float32, copy=False)
        began = time.perf_counter()
        try:
            tops, bottoms = self._scan(q, topk, bottom)
        except Exception as err:  # noqa: BLE001 - handed to every waiting request
            for p in batch:
                p.future.set_exception(err)
            return
        seconds = time.perf_counter() - began
        self.scans += 1
        self.queries += len(batch)
        self.seconds += seconds
        logger.debug("scan of %d queries in %.3f s", len(batch), seconds)
        # Ranked lists are prefixes of one total order (score, then lower id), so the
        # first p.topk of the batch's longer list are exactly p's own top-k.
        for i, p in enumerate(batch):
            ids, scores = tops[i]
            low = None
            if p.bottom and bottoms is not None:
                low = (bottoms[i][0][: p.topk], bottoms[i][1][: p.topk])
            p.future.set_result(((ids[: p.topk], scores[: p.topk]), low))


# --------------------------------------------------------------------------------------------
# The service (framework-independent)
# --------------------------------------------------------------------------------------------


class QueryService:
    """Answers attribution requests with one Attributor; see the module docstring.

    Args:
        attributor: The opened index and loaded model.
        settings: Limits and tuning.
    """

    def __init__(self, attributor: Attributor, settings: ServeSettings | None = None) -> None:
        self.settings = settings or ServeSettings()
        self.settings.validate()
        self.attributor = attributor
        # The query command's default score (cosine where the index stores row norms),
        # ranked by signed value.
        self.options = resolve_query_options(None, has_norms=attributor.store.has_norms)
        self.cosine = self.options.score == "cosine"
        self.admission = Admission(self.settings.max_concurrent, self.settings.max_queue)
        self.gate = ModelGate()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.max_concurrent, thread_name_prefix="rapidin-model"
        )
        # The scan thread reloads the store's manifest (to see rows a running build
        # committed); anything else reading the store takes the same lock.
        self._store_lock = threading.Lock()
        self.batcher = ScanBatcher(
            self._scan, self.settings.batch_window_ms / 1000.0, self.settings.max_batch
        )
        try:
            attributor.records()  # read the training data once, before threads race for it
        except DataError as err:
            logger.warning("%s", err)

    def close(self) -> None:
        self.batcher.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- checks ---------------------------------------------------------------------------

    def check_text(self, **fields: str | None) -> None:
        """Raises a 413 RequestError naming the first field over ``max_text_chars``."""
        limit = self.settings.max_text_chars
        for name, value in fields.items():
            if value is not None and len(value) > limit:
                raise RequestError(
                    413,
                    f"{name} has {len(value)} characters; this service "
                    f"accepts at most {limit} (--max-text-chars)",
                )

    def check_topk(self, topk: int) -> None:
        if not 1 <= topk <= self.settings.max_topk:
            raise RequestError(
                422, f"topk must be between 1 and {self.settings.max_topk} (--max-topk), got {topk}"
            )

    def check_example(self, example_id: int) -> None:
        """Raises 404 for an id that is not a training example of the index."""
        try:
            records = len(self.attributor.records())
        except DataError as err:
            raise RequestError(500, str(err)) from None
        rows = min(records, self.attributor.store.rows)
        if not 0 <= example_id < rows:
            raise RequestError(
                404, f"no training example {example_id}: the index has examples 0 to {rows - 1}"
            )

    # -- running work ---------------------------------------------------------------------

    async def _admitted(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` in an admission slot that lasts until the work ends.

        A client that disconnects cancels its handler, not the work: the slot (and the
        memory it stands for) is given back only when the model and scan work is done.
        """
        self.admission.enter()
        began = time.perf_counter()
        task = asyncio.ensure_future(work())

        def done(t: asyncio.Future) -> None:
            self.admission.leave(time.perf_counter() - began)
            if not t.cancelled():
                t.exception()  # retrieved, so an abandoned failure is not logged as lost

        task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _in_pool(self, fn: Callable[..., T], *args: Any, exclusive: bool = False) -> T:
        gate = self.gate.exclusive if exclusive else self.gate.shared

        def call() -> T:
            with gate():
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _scan(self, q: np.ndarray, topk: int, bottom: bool):
        with self._store_lock:
            return self.attributor._scan(q, topk, bottom, self.settings.engine, self.cosine)

    def _prepare(self, query: QueryInput, max_new_tokens: int) -> tuple[QueryInput, np.ndarray]:
        """(the query with its generation, its (K,) float32 RapidGrad); model thread."""
        if query.generation is None:
            query = replace(
                query, generation=self.attributor.generate(query.instruction, max_new_tokens)
            )
        return query, self.attributor.scan_vectors([query], self.cosine)[0]

    # -- requests -------------------------------------------------------------------------

    async def attribute(
        self,
        query: QueryInput,
        topk: int = 10,
        bottom: bool = False,
        max_new_tokens: int = 128,
        heatmaps: int = 0,
    ) -> QueryResult:
        """Rank training examples for ``query`` (writing its generation when None).

        With ``heatmaps`` > 0 the first that many results also get token-wise scores
        (:func:`rapidin_index.tokenwise.annotate`).
        """

        async def work() -> QueryResult:
            full, vector = await self._in_pool(self._prepare, query, max_new_tokens)
            top, low = await asyncio.wrap_future(self.batcher.submit(vector, topk, bottom))
            result = QueryResult(
                prompt=full.instruction,
                generation=full.generation or "",
                results=self.attributor._rows(*top),
                bottom=self.attributor._rows(*low) if low is not None else None,
                score=self.options.score,
                rank_by=self.options.rank_by,
            )
            if full.target_text is not None:
                from rapidin_index.tokenwise import find_target

                spans = find_target(result.generation, full.target_text)
                result.tokenwise = {
                    "target": {"text": full.target_text, "spans": [list(s) for s in spans]}
                }
            if heatmaps > 0 and result.results:
                from rapidin_index.tokenwise import annotate

                await self._in_pool(
                    annotate, self.attributor, [result], heatmaps, full.target_text, exclusive=True
                )
            return result

        return await self._admitted(work)

    async def tokenwise(
        self, query: QueryInput, example_id: int, pairwise: bool = False
    ) -> QueryResult:
        """Token-wise scores of one training example for ``query`` (a one-row result)."""
        self.check_example(example_id)
        return await self._admitted(
            lambda: self._in_pool(self._tokenwise, query, example_id, pairwise, exclusive=True)
        )

    def _tokenwise(self, query: QueryInput, example_id: int, pairwise: bool) -> QueryResult:
        from rapidin_index.tokenwise import annotate

        # Token-wise scores are Eq. 6 inner products, so the sketch score shown beside their
        # mean is the inner product too, whatever score ranks the attribute results.
        vector = self.attributor.rapidgrads([query])[0]
        with self._store_lock:
            stored = self.attributor.store.read_rows([example_id])[0]
        score = np.float32(vector @ stored.astype(np.float32))
        result = QueryResult(
            prompt=query.instruction,
            generation=query.generation or "",
            results=self.attributor._rows(np.array([example_id]), np.array([score])),
        )
        annotate(self.attributor, [result], top=1, target_text=query.target_text, pairwise=pairwise)
        return result

    def warm_up(self) -> None:
        """One query through the whole pipeline, so the first request does not pay for
        compiling the scan and sketch kernels."""
        if self.attributor.store.rows == 0:
            return
        began = time.perf_counter()
        _, vector = self._prepare(QueryInput("Hello.", "Hello!"), 1)
        self.batcher.submit(vector, 1, False).result()
        self.batcher.scans = self.batcher.queries = 0
        self.batcher.seconds = 0.0
        logger.info("warm-up query in %.1f s", time.perf_counter() - began)

    def info(self) -> dict:
        """The index, the limits and the counters (reloads the store's row count)."""
        att = self.attributor
        with self._store_lock:
            att.store.reload()
            rows = att.store.rows
        try:
            records: int | None = len(att.records())
        except DataError:
            records = None
        m = att.manifest
        s = self.settings
        return {
            "index": str(att.store.path),
            "rows": rows,
            "records": records,
            "k": m["sketch"]["k"],
            "model": m["model"],
            "data": {
                key: m["data"].get(key) for key in ("path", "sha256", "template", "max_length")
            },
            "gradient": {
                "normalization": m["gradient"]["normalization"],
                "dim": m["gradient"]["dim"],
                "tensors": len(m["gradient"]["parameters"]),
            },
            "sketch": m["sketch"],
            "package_version": __version__,
            "limits": {
                "max_concurrent": s.max_concurrent,
                "max_queue": s.max_queue,
                "max_text_chars": s.max_text_chars,
                "max_topk": s.max_topk,
                "max_new_tokens": s.max_new_tokens,
                "max_heatmaps": s.max_heatmaps,
                "max_body_bytes": s.max_body_bytes,
            },
            "stats": self.stats(),
        }

    def stats(self) -> dict:
        a, b = self.admission, self.batcher
        return {
            "in_flight": a.in_flight,
            "admitted": a.admitted,
            "rejected": a.rejected,
            "scans": b.scans,
            "scanned_queries": b.queries,
            "scan_seconds": round(b.seconds, 4),
            # Summed over model threads, so it can exceed the wall time.
            "gradient_seconds": round(self.attributor.timings.gradient_seconds, 4),
        }


# --------------------------------------------------------------------------------------------
# HTTP: schema, application, server
# --------------------------------------------------------------------------------------------

_TEXT = "At most --max-text-chars characters (GET /api/info, limits)."


class AttributeRequest(BaseModel):
    prompt: str = Field(min_length=1, description="The instruction. " + _TEXT)
    generation: str = Field(min_length=1, description="The text to attribute. " + _TEXT)
    target_text: str | None = Field(
        None,
        description="Attribute only these characters of the generation (every "
        "occurrence, case-sensitive). " + _TEXT,
    )
    topk: int = Field(10, ge=1, description="Results to return, at most --max-topk.")
    bottom: bool = Field(False, description="Also return the k lowest-scoring examples.")


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, description="The instruction. " + _TEXT)
    max_new_tokens: int = Field(128, ge=1, description="At most --max-new-tokens.")
    topk: int = Field(10, ge=1, description="Results to return, at most --max-topk.")
    bottom: bool = False


class TokenwiseRequest(BaseModel):
    prompt: str = Field(min_length=1, description="The instruction. " + _TEXT)
    generation: str = Field(min_length=1, description="The text to attribute. " + _TEXT)
    id: int = Field(ge=0, description="Training example id (0-based position in the data).")
    target_text: str | None = Field(None, description="As in /api/attribute.")
    pairwise: bool = Field(False, description="Add the token x token matrix (Eq. 8).")
    html: bool = Field(False, description="Add a self-contained HTML heat-map page.")


class Example(BaseModel):
    rank: int
    id: int
    score: float = Field(
        description="RapidGrad inner product: higher pushed the model towards the generation."
    )
    instruction: str | None = None
    input: str | None = None
    output: str | None = None


class Target(BaseModel):
    text: str
    spans: list[list[int]] = Field(description="[start, end) character offsets.")


class AttributeResponse(BaseModel):
    prompt: str
    generation: str
    generated: bool = Field(description="Whether the model wrote the generation.")
    target: Target | None = None
    results: list[Example]
    bottom: list[Example] | None = None
    seconds: float


class Token(BaseModel):
    text: str
    start: int
    end: int
    field: str = Field(description="instruction, input, output, generation or eos.")
    score: float | None = Field(description="Token-wise influence; null without a loss term.")
    target: bool | None = None


class Pairwise(BaseModel):
    id: int
    generation_tokens: list[Token]
    train_tokens: list[Token]
    matrix: list[list[float]] = Field(description="(generation tokens, training tokens).")


class TokenwiseResponse(BaseModel):
    id: int
    score: float = Field(description="Sketch (RapidGrad) score.")
    exact_score: float = Field(description="Uncompressed score: the mean of the Eq. 6 scores.")
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    tokens: list[Token] = Field(description="The example's tokens with Eq. 6 scores.")
    generation: str
    generation_tokens: list[Token]
    generation_scores: list[float] = Field(description="Eq. 7, one per generation token.")
    target: Target | None = None
    pairwise: Pairwise | None = None
    html: str | None = None
    seconds: float


class Health(BaseModel):
    status: str
    in_flight: int
    capacity: int


class Info(BaseModel):
    index: str
    rows: int
    records: int | None
    k: int
    model: dict[str, Any]
    data: dict[str, Any]
    gradient: dict[str, Any]
    sketch: dict[str, Any]
    package_version: str
    limits: dict[str, int]
    stats: dict[str, float]


class ErrorBody(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "A text field over --max-text-chars."},
    422: {
        "description": "Missing or invalid fields, topk out of range, a target text that "
        "does not occur in the generation."
    },
    503: {
        "model": ErrorBody,
        "description": "At capacity; retry after the Retry-After header's seconds.",
    },
}


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes, before they are read."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = JSONResponse(
                {"detail": f"request body over {self.limit} bytes"}, status_code=413
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def limited():
            # Bodies sent without a length (chunked) are counted as they arrive.
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise RequestError(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _attribute_response(result: QueryResult, generated: bool, began: float) -> dict:
    out = result.to_json()
    out["generated"] = generated
    out["seconds"] = round(time.perf_counter() - began, 4)
    return out


def create_app(service: QueryService) -> FastAPI:
    """The FastAPI application of ``service`` (closed when the application shuts down)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="rapidin-index",
        version=__version__,
        summary="Which training examples, and which of their tokens, made the model write "
        "this? RapidIn attribution over an on-disk index.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=service.settings.max_body_bytes)
    settings = service.settings

    @app.exception_handler(RequestError)
    @app.exception_handler(RapidInError)
    async def handle_error(request: Request, err: Exception) -> JSONResponse:
        status, message, headers = status_of(err)
        if status >= 500 and status != 503:
            logger.error("%s %s: %s", request.method, request.url.path, message)
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    @app.exception_handler(MemoryError)
    @app.exception_handler(torch.cuda.OutOfMemoryError)
    async def handle_out_of_memory(request: Request, err: Exception) -> JSONResponse:
        # The admission limits should prevent this; if a long text still does not fit, the
        # request fails and the service lives on.
        logger.warning(
            "out of memory answering %s (lower --max-concurrent or --max-text-chars): %s",
            request.url.path,
            str(err).splitlines()[0],
        )
        return JSONResponse(
            {"detail": "out of memory; retry later"}, status_code=503, headers={"Retry-After": "10"}
        )

    @app.get("/health", response_model=Health, tags=["service"])
    async def health() -> dict:
        """Liveness and load; never waits for model work."""
        a = service.admission
        return {"status": "ok", "in_flight": a.in_flight, "capacity": a.capacity}

    @app.get("/api/info", response_model=Info, tags=["service"])
    async def info() -> dict:
        """The index, this service's limits and its request and scan counters."""
        return await asyncio.to_thread(service.info)

    @app.post(
        "/api/attribute", response_model=AttributeResponse, responses=_ERRORS, tags=["attribution"]
    )
    async def attribute(body: AttributeRequest) -> dict:
        """Rank the training examples that most influenced ``generation`` given ``prompt``.

        Queries that arrive together are scored in one pass over the store.
        """
        began = time.perf_counter()
        service.check_text(
            prompt=body.prompt, generation=body.generation, target_text=body.target_text
        )
        service.check_topk(body.topk)
        query = QueryInput(body.prompt, body.generation, body.target_text)
        result = await service.attribute(query, body.topk, body.bottom)
        return _attribute_response(result, False, began)

    @app.post(
        "/api/generate", response_model=AttributeResponse, responses=_ERRORS, tags=["attribution"]
    )
    async def generate(body: GenerateRequest) -> dict:
        """Let the model answer ``prompt`` (greedy), then rank as /api/attribute does."""
        began = time.perf_counter()
        service.check_text(prompt=body.prompt)
        service.check_topk(body.topk)
        if body.max_new_tokens > settings.max_new_tokens:
            raise RequestError(
                422,
                f"max_new_tokens must be at most {settings.max_new_tokens} "
                f"(--max-new-tokens), got {body.max_new_tokens}",
            )
        result = await service.attribute(
            QueryInput(body.prompt, None),
            body.topk,
            body.bottom,
            max_new_tokens=body.max_new_tokens,
        )
        return _attribute_response(result, True, began)

    @app.post(
        "/api/tokenwise",
        response_model=TokenwiseResponse,
        responses={**_ERRORS, 404: {"model": ErrorBody, "description": "Unknown id."}},
        tags=["attribution"],
    )
    async def tokenwise(body: TokenwiseRequest) -> dict:
        """Token-wise influence between the generation and one training example.

        ``tokens`` scores each training token's own loss term against the generation
        (Eq. 6), ``generation_scores`` each generation token against the example (Eq. 7);
        ``pairwise`` adds the token x token matrix (Eq. 8).
        """
        began = time.perf_counter()
        service.check_text(
            prompt=body.prompt, generation=body.generation, target_text=body.target_text
        )
        query = QueryInput(body.prompt, body.generation, body.target_text)
        result = await service.tokenwise(query, body.id, body.pairwise)
        data = result.to_json()
        row = data["results"][0]
        out = {
            key: row.get(key)
            for key in (
                "id",
                "score",
                "exact_score",
                "instruction",
                "input",
                "output",
                "tokens",
                "generation_scores",
            )
        }
        out.update(
            generation=data["generation"],
            generation_tokens=data["generation_tokens"],
            target=data.get("target"),
            pairwise=data.get("pairwise"),
        )
        if body.html:
            from rapidin_index.heatmap import render_html

            out["html"] = render_html([data])
        out["seconds"] = round(time.perf_counter() - began, 4)
        return out

    # -- the web page (no script; every value escaped, see rapidin_index.webpage) ----------

    def page_response(body: str, status: int = 200, headers: dict | None = None):
        return HTMLResponse(
            body, status_code=status, headers={**webpage.SECURITY_HEADERS, **(headers or {})}
        )

    limits = webpage.Limits(settings.max_text_chars, settings.max_topk, settings.max_heatmaps)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return page_response(webpage.render_page(webpage.FormValues(), limits))

    @app.post("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_query(
        prompt: Annotated[str, Form()] = "",
        generation: Annotated[str, Form()] = "",
        target_text: Annotated[str, Form()] = "",
        topk: Annotated[str, Form()] = "10",
        heatmaps: Annotated[str, Form()] = "3",
    ) -> HTMLResponse:
        form = webpage.FormValues(prompt, generation, target_text, topk, heatmaps)
        try:
            k = _form_int("results", topk, 1, settings.max_topk)
            # More heat maps than results cannot be drawn; not worth an error.
            maps = min(_form_int("heat maps", heatmaps, 0, settings.max_heatmaps), k)
            if not prompt.strip():
                raise RequestError(422, "enter a prompt")
            service.check_text(prompt=prompt, generation=generation, target_text=target_text)
            query = QueryInput(prompt, generation or None, target_text or None)
            result = await service.attribute(
                query, k, max_new_tokens=settings.max_new_tokens, heatmaps=maps
            )
        except (RequestError, RapidInError) as err:
            status, message, headers = status_of(err)
            return page_response(webpage.render_page(form, limits, error=message), status, headers)
        form = replace(form, generation=result.generation)
        return page_response(
            webpage.render_page(form, limits, result.to_json(), generated=not generation)
        )

    @app.post("/example", response_class=HTMLResponse, include_in_schema=False)
    async def page_example(
        prompt: Annotated[str, Form()] = "",
        generation: Annotated[str, Form()] = "",
        target_text: Annotated[str, Form()] = "",
        id: Annotated[str, Form()] = "",
        rank: Annotated[str, Form()] = "1",
    ) -> HTMLResponse:
        form = webpage.FormValues(prompt, generation, target_text)
        try:
            example_id = _form_int("id", id, 0, 2**62)
            if not prompt.strip() or not generation.strip():
                raise RequestError(422, "the heat map needs the prompt and the generation")
            service.check_text(prompt=prompt, generation=generation, target_text=target_text)
            query = QueryInput(prompt, generation, target_text or None)
            result = await service.tokenwise(query, example_id)
        except (RequestError, RapidInError) as err:
            status, message, headers = status_of(err)
            return page_response(webpage.render_page(form, limits, error=message), status, headers)
        data = result.to_json()
        data["results"][0]["rank"] = rank if rank.isdigit() else "?"
        return page_response(webpage.render_example_page(form, limits, data))

    return app


def _form_int(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise RequestError(422, f"{name} must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise RequestError(422, f"{name} must be between {low} and {high}, got {number}")
    return number


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) resolves only to loopback addresses."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def run_server(
    service: QueryService, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Serve ``service`` with uvicorn until interrupted (Ctrl-C finishes open requests)."""
    import uvicorn

    store = service.attributor.store
    logger.info("serving index %s: %d rows, K = %d", store.path, store.rows, store.k)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    if is_loopback(host):
        logger.info("listening on %s, a loopback address: reachable from this machine only", url)
    else:
        logger.warning(
            "listening on %s, NOT a loopback address: anyone who reaches it can "
            "query the model and read the training data (there is no "
            "authentication); use --host 127.0.0.1 unless that is intended",
            url,
        )
    uvicorn.run(
        create_app(service), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30
    )
