"""Retrieval stage: the training examples that most influenced a generation.

The generation's gradient is taken with the same model, parameters, template and
normalisation as the index, compressed with the same RapidGrad transform, and scored
against every stored row by inner product (paper Eq. 5 with one checkpoint): higher means
the training example pushed the model towards writing this generation. ``--score cosine``
divides by both gradients' exact norms and ``--rank-by abs`` ranks by magnitude; see
:mod:`rapidin_index.scores`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from rapidin_index.baselines import (
    BASELINE_METHODS,
    BaselineSettings,
    Scorer,
    gradient_dot_scores,
    make_scorer,
)
from rapidin_index.build import comparable_model
from rapidin_index.data import (
    Record,
    file_sha256,
    format_prompt,
    load_records,
    tokenize_example,
    tokenize_records,
)
from rapidin_index.errors import DataError, ModelError, SettingsError
from rapidin_index.gradients import GradientComputer
from rapidin_index.model import LoadedModel, load_model
from rapidin_index.scores import (
    COSINE_METHODS,
    SCORES,
    ScoreOptions,
    check_paper_index,
    cosine_from_dot,
    effect,
    inverse_norms,
    merge_abs,
    rank_rows,
    resolve_query_options,
)
from rapidin_index.sketch import RapidGradSketch, SketchSettings
from rapidin_index.store import Store, compare_settings

logger = logging.getLogger(__name__)

# rapidin: RapidGrad scan; exact: TracIn with layer-wise normalisation on full gradients;
# the rest are the paper's baselines (rapidin_index/baselines.py).
METHODS = ("rapidin", "exact", *BASELINE_METHODS)


@dataclass(frozen=True)
class QueryInput:
    """One generation to attribute: the instruction (input merged) and the generated text."""

    instruction: str
    generation: str | None
    # Restricts the generation-side loss to these characters' tokens (every occurrence);
    # see tokenwise.restrict_to_target. None: the whole generation.
    target_text: str | None = None


def read_query_inputs(
    generation: str | None, prompt: str | None = None, prompt_file: str | None = None
) -> list[QueryInput]:
    """Turn the query command's inputs into :class:`QueryInput` objects.

    ``generation`` is either a text file with the generated response (the prompt then comes
    from ``prompt`` or ``prompt_file``) or a ``.json`` / ``.jsonl`` file of Alpaca records
    whose ``output`` is the generation. With no ``generation``, the model writes it.
    """
    if prompt is not None and prompt_file is not None:
        raise DataError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        if not Path(prompt_file).is_file():
            raise DataError(f"--prompt-file not found: {prompt_file}")
        prompt = Path(prompt_file).read_text(encoding="utf-8").strip("\n")
    if generation is None:
        if prompt is None:
            raise DataError(
                "nothing to attribute: pass --generation FILE, or --prompt to let "
                "the model generate"
            )
        return [QueryInput(prompt, None)]
    path = Path(generation)
    if not path.is_file():
        raise DataError(f"--generation file not found: {generation}")
    if path.suffix in (".json", ".jsonl"):
        if prompt is not None:
            raise DataError(
                "--prompt/--prompt-file cannot be combined with a JSON "
                "--generation file; put the instruction in each record"
            )
        return [QueryInput(r.merged_instruction, r.output) for r in load_records(path)]
    if prompt is None:
        raise DataError(
            "--generation is a text file: give its prompt with --prompt or --prompt-file"
        )
    text = path.read_text(encoding="utf-8").strip("\n")
    if not text:
        raise DataError(f"--generation file {generation} is empty")
    return [QueryInput(prompt, text)]


@dataclass
class QueryResult:
    """Ranked training examples for one generation; ``results`` and ``bottom`` are dicts
    with ``rank``, ``id``, ``score``, ``instruction``, ``input``, ``output``.

    With ``rank_by="abs"``, ``results`` holds the largest-magnitude scores, each row with
    its signed ``score`` and an ``effect`` (``helpful``, ``harmful`` or ``neutral``);
    ``bottom`` is always the most harmful (lowest signed score) list. The JSON names the
    ``score`` and ``rank_by`` that produced the ranking.
    """

    prompt: str
    generation: str
    results: list[dict]
    bottom: list[dict] | None = None
    # Query-level token-wise output (generation_tokens, target, pairwise); tokenwise.annotate.
    tokenwise: dict | None = None
    score: str = "dot"
    rank_by: str = "signed"

    def to_json(self) -> dict:
        out = {
            "prompt": self.prompt,
            "generation": self.generation,
            "score": self.score,
            "rank_by": self.rank_by,
            "results": self.results,
        }
        if self.bottom is not None:
            out["bottom"] = self.bottom
        if self.tokenwise is not None:
            out.update(self.tokenwise)
        return out


@dataclass
class Timings:
    model_seconds: float = 0.0
    gradient_seconds: float = 0.0
    scan_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def parameters_by_name(model: torch.nn.Module, entries: Sequence[dict]):
    """The parameters the index was built over, by the names and shapes in its manifest."""
    named = dict(model.named_parameters())
    chosen = []
    for entry in entries:
        param = named.get(entry["name"])
        if param is None or list(param.shape) != list(entry["shape"]):
            raise ModelError(
                f"the model has no parameter {entry['name']} of shape {entry['shape']}; "
                "pass the --model/--adapter the index was built with"
            )
        param.requires_grad_(True)
        chosen.append((entry["name"], param))
    return chosen


def topk_rows(scores: np.ndarray, k: int, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top (or bottom) k of a 1-D score array; ties go to the lower id."""
    key = -scores if largest else scores
    order = np.lexsort((np.arange(scores.size), key))[:k]
    return order, scores[order]


class Attributor:
    """An opened index with its model, ready to answer many queries.

    Args:
        index: Index directory.
        model, adapter, load_in_4bit: Overrides of what the manifest records; the model
            must still be the one the index was built with (same config and adapter).
        loaded: An already loaded model (tests and the service pass one in).
        baselines: Options of the baseline methods (``--random-seed``, ``--lissa-*``, ...).
    """

    def __init__(
        self,
        index: str,
        model: str | None = None,
        adapter: str | None = None,
        load_in_4bit: bool | None = None,
        loaded: LoadedModel | None = None,
        baselines: BaselineSettings | None = None,
    ) -> None:
        self.baseline_settings = baselines or BaselineSettings()
        self.baseline_settings.validate()
        self._scorers: dict[str, Scorer] = {}
        self.store = Store.open(index)
        manifest = self.store.manifest
        self.manifest = manifest
        recorded = manifest["model"]
        began = time.perf_counter()
        if loaded is None:
            loaded = load_model(
                model if model is not None else recorded["path"],
                adapter if adapter is not None else recorded["adapter"],
                recorded["load_in_4bit"] if load_in_4bit is None else load_in_4bit,
            )
        self.timings = Timings(model_seconds=time.perf_counter() - began)
        compare_settings(
            comparable_model(recorded),
            comparable_model(loaded.identity),
            hint="pass the --model/--adapter the index was built with, or rebuild the index",
        )
        self.loaded = loaded
        params = parameters_by_name(loaded.model, manifest["gradient"]["parameters"])
        self.computer = GradientComputer(
            loaded.model, params, manifest["gradient"]["normalization"]
        )
        info = manifest["sketch"]
        settings = SketchSettings(
            k=info["k"],
            shuffle_rounds=info["shuffle_rounds"],
            seed=info["seed"],
            max_perm_len=info["max_perm_len"],
            projection=info["projection"],
        )
        self.sketch = RapidGradSketch(self.computer.dim, settings, divisors=info["divisors"])
        self._records: list[Record] | None = None

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def template(self) -> str:
        return self.manifest["data"]["template"]

    @property
    def max_length(self) -> int:
        return self.manifest["data"]["max_length"]

    def records(self) -> list[Record]:
        """The training records, from the data file recorded in the manifest."""
        if self._records is None:
            data = self.manifest["data"]
            path = Path(data["path"])
            if not path.is_file():
                raise DataError(
                    f"the index's training data {path} is gone; restore it to "
                    "show the retrieved examples"
                )
            if file_sha256(path) != data["sha256"]:
                logger.warning("%s changed since the index was built; ids may not match", path)
            self._records = load_records(path)
        return self._records

    def generate(self, instruction: str, max_new_tokens: int = 128) -> str:
        """Greedy decoding of the model's own response to an instruction."""
        prompt = format_prompt(instruction, self.tokenizer, self.template)
        ids = self.tokenizer(
            prompt, add_special_tokens=self.template != "chat", return_tensors="pt"
        )["input_ids"]
        model = self.loaded.model
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(next(model.parameters()).device),
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    def tokenize(self, query: QueryInput):
        prompt = format_prompt(query.instruction, self.tokenizer, self.template)
        return tokenize_example(
            self.tokenizer,
            prompt,
            query.generation or "",
            self.max_length,
            add_special_tokens=self.template != "chat",
        )

    def query_example(self, query: QueryInput):
        """The tokenised generation whose loss is attributed (only --target-text's tokens)."""
        example = self.tokenize(query)
        if query.target_text is None:
            return example
        from rapidin_index.tokenwise import restrict_to_target

        return restrict_to_target(
            self.tokenizer, example, query.generation or "", query.target_text
        )

    def query_gradients(self, queries: Sequence[QueryInput]) -> torch.Tensor:
        """(m, D) float32 normalised gradients of the generations."""
        began = time.perf_counter()
        grads = torch.stack([self.computer.gradient(self.query_example(q)) for q in queries])
        self.timings.gradient_seconds += time.perf_counter() - began
        return grads

    def rapidgrads(self, queries: Sequence[QueryInput]) -> np.ndarray:
        """(m, K) float32 RapidGrads of the generations (kept in fp32, not rounded)."""
        return self.rapidgrads_and_norms(queries)[0]

    def rapidgrads_and_norms(self, queries: Sequence[QueryInput]) -> tuple[np.ndarray, np.ndarray]:
        """(m, K) float32 RapidGrads and (m,) float64 exact norms of the normalised
        gradients they compress (what ``--score cosine`` divides by)."""
        grads = self.query_gradients(queries)
        # float32 reduction (no float64 copy of the (m, D) gradients); relative error ~1e-6
        norms = torch.linalg.vector_norm(grads, dim=1).double().cpu().numpy()
        with torch.no_grad():
            out = self.sketch.transform(grads)
        return out.cpu().numpy().astype(np.float32), norms

    def scan_vectors(self, queries: Sequence[QueryInput], cosine: bool) -> np.ndarray:
        """(m, K) float32 RapidGrads to scan the store with: with ``cosine`` each divided
        by its gradient's exact norm (the rows' norms are the scan's ``row_scale``)."""
        q, norms = self.rapidgrads_and_norms(queries)
        if cosine:
            q = q * inverse_norms(norms).astype(np.float32)[:, None]
        return q

    def require_norms(self) -> None:
        """Raise :class:`SettingsError` unless the index stores its rows' gradient norms."""
        if not self.store.has_norms:
            raise SettingsError(
                f"--score cosine needs the exact gradient norms that indexes store since "
                f"score options exist, and {self.store.path} has none (built by an older "
                "version); rebuild it with rapidin-index build into a new --index, or use "
                "--score dot"
            )

    def check_paper(self) -> None:
        """Raise :class:`SettingsError` unless the index holds the paper's gradients
        (``query --preset paper``)."""
        check_paper_index(self.manifest, str(self.store.path))

    def score_all(
        self, queries: Sequence[QueryInput], method: str = "rapidin", score: str = "dot"
    ) -> np.ndarray:
        """(m, N) float32 scores of every training example; for small stores and checks.

        ``score="cosine"`` (methods ``rapidin`` and ``exact``) divides each inner product by
        the exact norms of both gradients: the stored row norms for ``rapidin``.
        """
        _check_score(method, score)
        if method == "rapidin":
            q, norms = self.rapidgrads_and_norms(queries)
            dots = q @ self.store.read_all().astype(np.float32).T
            if score == "cosine":
                self.require_norms()
                return cosine_from_dot(dots, norms, self.store.read_norms()).astype(np.float32)
            return dots
        if method == "exact":
            return self.exact_scores(queries, cosine=score == "cosine")
        if method in BASELINE_METHODS:
            scorer = self.scorer(method)
            began = time.perf_counter()
            scores = scorer.scores(queries)
            self.timings.scan_seconds += time.perf_counter() - began
            return scores
        raise SettingsError(f"unknown --method {method!r}; choose from {METHODS}")

    def scorer(self, method: str) -> Scorer:
        """The baseline scorer of ``method``, made once per Attributor (it may cache work,
        e.g. the training embeddings)."""
        if method not in self._scorers:
            self._scorers[method] = make_scorer(method, self, self.baseline_settings)
        return self._scorers[method]

    def exact_scores(self, queries: Sequence[QueryInput], cosine: bool = False) -> np.ndarray:
        """(m, N) scores with uncompressed gradients: TracIn with layer-wise normalisation
        (the index's normalisation), divided by both gradients' norms with ``cosine``.

        Recomputes every training gradient, so it costs a full caching pass per call.
        """
        grads = self.query_gradients(queries)
        examples = tokenize_records(self.records(), self.tokenizer, self.template, self.max_length)
        began = time.perf_counter()
        # Batched exact per-example gradients (the same as one at a time, see
        # GradientComputer.gradients), sized by the same memory estimate as a build.
        if cosine:
            scores, norms = gradient_dot_scores(
                self.computer, grads, examples, desc="exact", with_norms=True
            )
            query_norms = torch.linalg.vector_norm(grads, dim=1).double().cpu().numpy()
            scores = cosine_from_dot(scores, query_norms, norms).astype(np.float32)
        else:
            scores = gradient_dot_scores(self.computer, grads, examples, desc="exact")
        self.timings.scan_seconds += time.perf_counter() - began
        return scores

    def attribute(
        self,
        queries: Sequence[QueryInput],
        topk: int = 50,
        bottom: bool = False,
        method: str = "rapidin",
        engine: str = "auto",
        max_new_tokens: int = 128,
        options: ScoreOptions | None = None,
    ) -> list[QueryResult]:
        """Rank training examples for each query (generating missing generations first).

        ``options`` picks the score (``dot`` / ``cosine``) and the ranking (``signed`` /
        ``abs``); default: :func:`~rapidin_index.scores.resolve_query_options`'s defaults
        for ``method`` and this index.
        """
        if options is None:
            options = resolve_query_options(None, method=method, has_norms=self.store.has_norms)
        options.validate()
        if topk < 1:
            raise SettingsError(f"--topk must be at least 1, got {topk}")
        if method not in METHODS:
            raise SettingsError(f"unknown --method {method!r}; choose from {METHODS}")
        _check_score(method, options.score)
        if options.score == "cosine" and method == "rapidin":
            self.require_norms()
        if self.store.rows == 0:
            raise DataError("the index holds no rows yet; run rapidin-index build first")
        queries = [
            q
            if q.generation is not None
            else replace(q, generation=self.generate(q.instruction, max_new_tokens))
            for q in queries
        ]
        absolute = options.rank_by == "abs"
        if method == "rapidin":
            cosine = options.score == "cosine"
            q = self.scan_vectors(queries, cosine)
            began = time.perf_counter()
            # The largest magnitudes are among the highest and the lowest scores.
            tops, bots = self._scan(q, topk, bottom or absolute, engine, cosine=cosine)
            if absolute:
                tops = [merge_abs(t, b, topk) for t, b in zip(tops, bots)]
            if not bottom:
                bots = None
            self.timings.scan_seconds += time.perf_counter() - began
        else:
            scores = self.score_all(queries, method, options.score)
            tops = [rank_rows(s, topk, options.rank_by) for s in scores]
            bots = [topk_rows(s, topk, largest=False) for s in scores] if bottom else None
        out = []
        for i, query in enumerate(queries):
            out.append(
                QueryResult(
                    prompt=query.instruction,
                    generation=query.generation or "",
                    results=self._rows(*tops[i], with_effect=absolute),
                    bottom=self._rows(*bots[i], with_effect=absolute) if bots is not None else None,
                    score=options.score,
                    rank_by=options.rank_by,
                )
            )
        return out

    def _scan(self, q: np.ndarray, topk: int, bottom: bool, engine: str, cosine: bool = False):
        """Top (and bottom) ``topk`` per query over the committed rows of the store.

        With ``cosine`` each row's score is divided by its stored exact gradient norm (the
        query's norm is already divided out of ``q``). Under ``torchrun`` each rank scans
        the chunks it owns and the per-rank lists are merged, which gives the same ids and
        scores as one process scanning everything.
        """
        from rapidin_index.distributed import DistContext, merge_ranked
        from rapidin_index.scan import iter_raw_chunks, scan

        ctx = DistContext.from_env()
        q = ctx.broadcast(q)
        # Read the committed row count once: a concurrent build may append more rows,
        # and the scan must cover exactly the prefix that was committed now.
        self.store.reload()
        rows = self.store.rows
        scale = inverse_norms(self.store.read_norms(rows)) if cosine else None
        files = [f for i, f in enumerate(self.store.chunk_files(rows)) if ctx.owns_chunk(i)]
        found = scan(
            q,
            iter_raw_chunks(files, self.store.k),
            topk,
            bottom=bottom,
            engine=engine,
            row_scale=scale,
        )
        tops = list(zip(found.top_ids, found.top_scores))
        bots = list(zip(found.bottom_ids, found.bottom_scores)) if bottom else None
        if ctx.enabled:
            parts = ctx.gather((tops, bots))
            tops = [merge_ranked([p[0][i] for p in parts], topk) for i in range(len(q))]
            if bottom:
                bots = [
                    merge_ranked([p[1][i] for p in parts], topk, largest=False)
                    for i in range(len(q))
                ]
        return tops, bots

    def _rows(self, ids: np.ndarray, scores: np.ndarray, with_effect: bool = False) -> list[dict]:
        try:
            records = self.records()
        except DataError as err:
            logger.warning("%s", err)
            records = None
        rows = []
        for rank, (row, score) in enumerate(zip(ids.tolist(), scores.tolist()), start=1):
            item = {"rank": rank, "id": int(row), "score": float(score)}
            if with_effect:
                item["effect"] = effect(score)
            if records is not None and row < len(records):
                rec = records[row]
                item.update(instruction=rec.instruction, input=rec.input, output=rec.output)
            rows.append(item)
        return rows


def _check_score(method: str, score: str) -> None:
    if score not in SCORES:
        raise SettingsError(f"unknown --score {score!r}; choose from {SCORES}")
    if score == "cosine" and method not in COSINE_METHODS:
        raise SettingsError(
            f"--score cosine is defined for --method {' or '.join(COSINE_METHODS)} (gradient "
            f"inner products), not for --method {method}; use --score dot"
        )


def results_to_json(results: Sequence[QueryResult], timings: Timings | None = None) -> str:
    payload: dict = {"queries": [r.to_json() for r in results]}
    if timings is not None:
        payload["timings"] = {
            "model_seconds": round(timings.model_seconds, 3),
            "gradient_seconds": round(timings.gradient_seconds, 3),
            "scan_seconds": round(timings.scan_seconds, 3),
        }
    return json.dumps(payload, indent=2, ensure_ascii=False)
