"""The paper's evaluation: backdoor retrieval (Section 4.5, Table 4), error tracing (Section
4.6, Table 5) and the cost of each method (Tables 1 and 2).

Metrics.

* Backdoor (Table 4). For each attacked generation, the k highest-scoring training examples
  form the positive set and the k lowest-scoring the negative set; over those 2k examples,
  with "poisoned" as the label and the method's score as the predictor, auPRC (average
  precision) and auROC are computed and averaged over generations, for k = 5, 10, 50, 100,
  500, 1000 where 2k <= N. When the 2k examples hold only one class the area is undefined:
  auROC is then taken as 0, and auPRC as 0 with no poisoned example and 1 with only
  poisoned ones. (With 10% poisoned examples, a random ranking has no poisoned example
  among 10 about 35% of the time, which is why the paper's random-selection row has an
  auROC of ~0.3 at k = 5; this convention reproduces it.)
* Error tracing (Table 5). For each incorrect generation, the proportion of the top k
  examples that are perturbed (for the generation's entity pair), averaged over
  generations: AP = (perturbed among the top k) / k, for k = 5, 10, 25, 50.

Pipelines (``tools/run_backdoor_eval.py``, ``tools/run_error_tracing.py``). Stages, each
cached under the output directory and skipped when its inputs are unchanged:

1. ``adapter/``: a (Q)LoRA fine-tune by ``tools/finetune.py`` on the poisoned or perturbed
   data;
2. ``index-k<K>-l<λ>/``: a RapidIn index per RapidGrad setting, built with the adapter;
3. ``generations.json``: greedy answers of the fine-tuned model to the test prompts, and
   which of them show the attack (backdoor) or the wrong entity (error tracing);
4. ``scores/<method>.npy``: (m, N) float32 scores of every method for the kept generations;
5. with ``--score-variants``, ``score-variants/``: per-tensor gradient norms and inner
   products from one exact pass (``per-tensor.npz``), and ``score-variants.md`` /
   ``score-variants.json``: every score definition's retrieval figures (see
   :meth:`Pipeline.score_variants`);
6. ``report.md`` and ``results.json``: the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rapidin_index.baselines import BASELINE_METHODS, BaselineSettings
from rapidin_index.errors import DataError, RapidInError, SettingsError
from rapidin_index.query import QueryInput, topk_rows
from rapidin_index.scores import (
    RANK_BY,
    VARIANT_NORMALIZATIONS,
    VARIANT_PARAMS,
    PerTensorScores,
    cosine_from_dot,
    per_tensor_pass,
    variant_norms,
    variant_scores,
)
from rapidin_index.synthetic import (
    add_trigger,
    mentions,
    replace_entity,
    theme_hits,
    themed_response,
)

logger = logging.getLogger(__name__)

BACKDOOR_KS = (5, 10, 50, 100, 500, 1000)
TRACING_KS = (5, 10, 25, 50)
# Every method the pipelines can run; "rapidin" runs once per RapidGrad setting (K, λ).
EVAL_METHODS = ("rapidin", "exact", *BASELINE_METHODS)
LABELS = {
    "exact": "TracIn + LN",
    "tracin": "TracIn",
    "influence-function": "Influence Function",
    "bm25": "BM25",
    "embedding": "Embedding Similarity",
    "random": "Random Selection",
}
# Methods computed from the shared per-tensor gradient pass, with their normalisation.
PASS_METHODS = {"exact": "layer", "tracin": "none"}
FINETUNE_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "finetune.py"
EMBEDDING_DIM = 384


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (Mann-Whitney U). NaN with only one class.

    Args:
        labels: (n,) bool, True for a positive.
        scores: (n,) float, higher = more likely positive.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    ranks = np.empty(labels.size, dtype=np.float64)
    bounds = np.r_[0, np.nonzero(np.diff(ordered))[0] + 1, labels.size]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        ranks[order[lo:hi]] = (lo + 1 + hi) / 2.0  # mean 1-based rank of a tie group
    above = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(above / (positives * negatives))


def average_precision(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the precision-recall curve as average precision: the sum over score
    thresholds (one per distinct score, highest first) of precision x recall gained. NaN
    without positives.

    Args:
        labels: (n,) bool, True for a positive.
        scores: (n,) float, higher = more likely positive.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(labels.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    ordered, hits = scores[order], np.cumsum(labels[order])
    # The last position of each group of equal scores is one threshold.
    last = np.r_[np.nonzero(np.diff(ordered))[0], labels.size - 1]
    precision = hits[last] / (last + 1)
    recall = hits[last] / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def usable_ks(ks: Sequence[int], n: int) -> list[int]:
    """The k of ``ks`` whose top-k and bottom-k sets do not overlap (2k <= n)."""
    return [k for k in ks if 2 * k <= n]


def backdoor_metrics(scores: np.ndarray, poisoned: np.ndarray, k: int) -> tuple[float, float]:
    """(auPRC, auROC) of one generation's top-k (positive) and bottom-k (negative) sets.

    Args:
        scores: (N,) float32 scores of every training example.
        poisoned: (N,) bool, True for a poisoned example.
        k: Size of each set; 2k <= N.
    """
    if 2 * k > scores.size:
        raise SettingsError(f"k = {k} needs at least {2 * k} training examples")
    top, _ = topk_rows(scores, k, largest=True)
    bottom, _ = topk_rows(scores, k, largest=False)
    ids = np.concatenate([top, bottom])
    labels, values = poisoned[ids], scores[ids]
    if not labels.any():
        return 0.0, 0.0
    if labels.all():
        return 1.0, 0.0
    return average_precision(labels, values), roc_auc(labels, values)


def summarize_backdoor(scores: np.ndarray, poisoned: np.ndarray, ks: Sequence[int]) -> dict:
    """``{k: {"auprc": mean, "auroc": mean}}`` over the generations.

    Args:
        scores: (m, N) float32, one row per attacked generation.
        poisoned: (N,) bool.
        ks: Set sizes; those with 2k > N are skipped.
    """
    out = {}
    for k in usable_ks(ks, scores.shape[1]):
        pairs = np.array([backdoor_metrics(row, poisoned, k) for row in scores])
        out[k] = {"auprc": float(pairs[:, 0].mean()), "auroc": float(pairs[:, 1].mean())}
    return out


def average_proportion(scores: np.ndarray, perturbed: np.ndarray, ks: Sequence[int]) -> dict:
    """``{k: mean over generations of (perturbed among the top k) / k}`` (Table 5's AP).

    Args:
        scores: (m, N) float32, one row per incorrect generation.
        perturbed: (N,) bool.
        ks: Cut-offs; those above N are skipped.
    """
    out = {}
    for k in [k for k in ks if k <= scores.shape[1]]:
        hits = [perturbed[topk_rows(row, k)[0]].sum() / k for row in scores]
        out[k] = float(np.mean(hits))
    return out


def precision_at(key: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Mean over generations of the share of culprits among the k highest-keyed examples.

    Args:
        key: (m, N) ranking key (a score, or its magnitude); ties go to the lower id.
        labels: (m, N) bool, True for a culprit of that generation.
        k: Cut-off, at most N.
    """
    hits = [labels[i, topk_rows(key[i], k)[0]].sum() / k for i in range(key.shape[0])]
    return float(np.mean(hits))


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """One evaluation run (the run_* tools' flags).

    Attributes:
        data: Directory written by ``tools/make_backdoor.py`` or ``make_error_tracing.py``
            (``train.jsonl`` and its ``backdoor.json`` / ``error_tracing.json``).
        out: Output directory; every stage caches its result here.
        model: Base model (None: the embedded SmolLM2-135M-Instruct).
        load_in_4bit: QLoRA: fine-tune and attribute a 4-bit NF4 base model.
        methods: Which of :data:`EVAL_METHODS` to run.
        ks, shuffle_rounds: RapidGrad settings; one index per (K, λ).
        epochs, lr, lora_rank, lora_alpha, batch_size: The fine-tune (tools/finetune.py).
        max_length: Token limit of fine-tuning and attribution alike.
        max_new_tokens: Length of the greedy generations.
        n_test: How many test prompts are answered.
        n_queries: How many attacked (or incorrect) generations are attributed (per pair).
        inject: Attribute synthetic attacked generations (the themed rewrite of the question,
            or the answer with E1 replaced by E2) where the model's own do not show the
            attack; for models too small or too briefly trained to learn it (``--tiny``).
        baselines: Options of the baseline methods.
        device: Where the model runs (None: CUDA when available).
        seed: Seed of the injected generations.
        score_variants: Also run the score-variants stage (``--score-variants``).
        variant_indices: ``--variant-index`` values, each a ``--params-preset`` with an
            optional ``/none`` for raw (not layer-normalised) gradients (see
            :func:`parse_variant_index`): for each, a RapidIn index over only those tensors
            is written from the exact gradient pass (no further backward passes) and its
            sketch rows join the score-variants table.
    """

    data: str
    out: str
    model: str | None = None
    load_in_4bit: bool = False
    methods: tuple[str, ...] = EVAL_METHODS
    ks: tuple[int, ...] = (1 << 16,)
    shuffle_rounds: tuple[int, ...] = (20,)
    epochs: int = 2
    lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    batch_size: int = 4
    max_length: int = 256
    max_new_tokens: int = 48
    n_test: int = 50
    n_queries: int = 10
    inject: bool = False
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    device: str | None = None
    seed: int = 0
    score_variants: bool = False
    variant_indices: tuple[str, ...] = ()

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in EVAL_METHODS]
        if unknown:
            raise SettingsError(f"--methods: unknown {unknown}; choose from {EVAL_METHODS}")
        if not self.methods:
            raise SettingsError("--methods is empty")
        if self.n_queries < 1 or self.n_test < 1:
            raise SettingsError("--n-queries and --n-test must be at least 1")
        self.baselines.validate()
        if self.variant_indices and not self.score_variants:
            raise SettingsError("--variant-index needs --score-variants")
        for spec in self.variant_indices:
            parse_variant_index(spec)


def parse_variant_index(spec: str) -> tuple[str, str]:
    """``(params_preset, normalization)`` of a ``--variant-index`` value: ``PRESET`` (layer
    normalisation, the paper's) or ``PRESET/none`` (raw gradients, for cosine scores).

    Raises:
        SettingsError: an unknown preset or normalisation.
    """
    from rapidin_index.gradients import GradientSettings
    from rapidin_index.model import check_params_preset

    preset, _, normalization = spec.partition("/")
    check_params_preset(preset)
    normalization = normalization or "layer"
    if normalization not in ("layer", "none"):
        raise SettingsError(
            f"--variant-index {spec}: the part after '/' must be 'none' (raw gradients) or 'layer'"
        )
    GradientSettings(params_preset=preset, normalization=normalization).validate()
    return preset, normalization


def _variant_suffix(spec: str) -> str:
    """A ``--variant-index`` value as part of a file name (``last-layers:2/none`` ->
    ``last-layers2-none``)."""
    return spec.replace(":", "").replace("/", "-")


def _digest(value: object) -> str:
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _method_options(method: str, baselines: BaselineSettings) -> dict:
    """The baseline options a method's scores depend on (part of their cache key)."""
    options = asdict(baselines)
    if method == "random":
        return {"seed": options["seed"]}
    if method == "influence-function":
        return {k: v for k, v in options.items() if k.startswith("lissa") or k == "seed"}
    if method == "embedding":
        return {"embedding_model": options["embedding_model"]}
    return {}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


class CompanionIndex:
    """A RapidIn index over a ``--params-preset`` written from the evaluation's exact pass.

    The score-variants stage already takes every training example's raw gradient over all
    trainable tensors; an index over a subset of them (say the LoRA B matrices) needs no
    other backward pass: the subset's columns are normalised as that index's gradient
    settings say, sketched, and stored with their exact norms. Its manifest is the one
    ``rapidin-index build --params-preset PRESET`` writes (from :func:`rapidin_index.build.
    prepare`), so ``query`` opens it like any other index.

    Args:
        pipeline: The evaluation (model, adapter, data and settings).
        preset: A ``--variant-index`` value (:func:`parse_variant_index`).
        k, lam: The RapidGrad length K and shuffle rounds λ.
    """

    def __init__(self, pipeline: Pipeline, preset: str, k: int, lam: int) -> None:
        self.pipeline, self.preset, self.k, self.lam = pipeline, preset, k, lam
        self.params_preset, self.normalization = parse_variant_index(preset)
        self.path = pipeline.index_path(k, lam, preset)
        self.rows: list[np.ndarray] = []
        self.norms: list[np.ndarray] = []

    def _settings(self):
        from rapidin_index.build import BuildSettings
        from rapidin_index.gradients import GradientSettings
        from rapidin_index.sketch import SketchSettings

        s = self.pipeline.settings
        return BuildSettings(
            data=str(self.pipeline.train_path),
            index=str(self.path),
            model=s.model,
            adapter=str(self.pipeline.out / "adapter"),
            load_in_4bit=s.load_in_4bit,
            max_length=s.max_length,
            sketch=SketchSettings(k=self.k, shuffle_rounds=self.lam),
            gradient=GradientSettings(
                params_preset=self.params_preset, normalization=self.normalization
            ),
        )

    def _key(self) -> str:
        return _digest(
            {
                "adapter": self.pipeline.adapter_key(),
                "data": self.pipeline.data_sha,
                "k": self.k,
                "lambda": self.lam,
                "preset": self.preset,
                "max_length": self.pipeline.settings.max_length,
                "4bit": self.pipeline.settings.load_in_4bit,
            }
        )

    def complete(self) -> bool:
        """Whether the index holds every row, written for this adapter and data."""
        from rapidin_index.store import MANIFEST, Store

        stamp = _read_json(self.path / "eval_stamp.json") or {}
        return (
            (self.path / MANIFEST).is_file()
            and stamp.get("key") == self._key()
            and Store.open(self.path).rows == len(self.pipeline.records)
        )

    def begin(self, computer, total: int) -> None:
        """Prepare for a pass whose raw gradients come from ``computer`` (every tensor)."""
        import torch

        from rapidin_index.build import prepare

        _, _, _, self.computer, self.sketch, self.manifest = prepare(
            self._settings(), self.pipeline.loaded()
        )
        where = {name: i for i, name in enumerate(computer.names)}
        missing = [n for n in self.computer.names if n not in where]
        if missing:
            raise ValueError(f"the pass does not cover {missing[:3]}")
        # Column indices of the subset, in the subset computer's order.
        self.columns = torch.cat(
            [
                torch.arange(computer.offsets[where[n]], computer.offsets[where[n] + 1])
                for n in self.computer.names
            ]
        ).to(computer.device)
        self.total, self.rows, self.norms = total, [], []

    def add(self, start: int, grads) -> None:
        """Sketch the subset of one batch of raw gradients (B, D_all) float32."""
        import torch

        if start != sum(len(r) for r in self.rows):
            raise ValueError("companion index rows must arrive in order")
        with torch.no_grad():
            sub = grads.index_select(1, self.columns)
            self.computer.normalise_rows(sub)
            self.norms.append(torch.linalg.vector_norm(sub, dim=1).cpu().numpy())
            self.rows.append(self.sketch.transform(sub).cpu().numpy().astype(np.float16))

    def finish(self, seconds: float) -> None:
        """Write the index (replacing a stale one) once the pass has delivered every row."""
        from rapidin_index.store import Store

        rows, norms = np.concatenate(self.rows), np.concatenate(self.norms).astype(np.float32)
        if len(rows) != self.total:
            raise ValueError(f"companion index got {len(rows)} of {self.total} rows")
        if self.path.exists():
            shutil.rmtree(self.path)
        settings = self._settings()
        store = Store.create(
            self.path, self.manifest, self.k, settings.rows_per_chunk, with_norms=True
        )
        per_chunk = store.rows_per_chunk
        for chunk, lo in enumerate(range(0, len(rows), per_chunk)):
            store.write_chunk(chunk, rows[lo : lo + per_chunk], norms[lo : lo + per_chunk])
        store.commit()
        store.update_manifest(
            build={"written_by": "evaluation gradient pass", "pass_seconds": seconds}
        )
        _write_json(self.path / "eval_stamp.json", {"key": self._key(), "rows": len(rows)})
        logger.info("wrote companion index %s (%d rows)", self.path, len(rows))
        self.rows, self.norms = [], []


class Pipeline:
    """The stages shared by both evaluations; subclasses make the generations and tables.

    Args:
        settings: The run.
        meta_name: Name of the JSON file that describes the data (in ``settings.data``).
    """

    kind = "evaluation"
    meta_name = ""

    def __init__(self, settings: EvalSettings) -> None:
        settings.validate()
        self.settings = settings
        self.out = Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        data = Path(settings.data)
        self.train_path = data / "train.jsonl"
        meta = _read_json(data / self.meta_name)
        if not self.train_path.is_file() or meta is None:
            raise DataError(
                f"--data {data} lacks train.jsonl or {self.meta_name}; make it "
                f"with the matching tools/make_*.py first"
            )
        self.meta = meta
        from rapidin_index.data import file_sha256, load_records

        self.records = load_records(self.train_path)
        self.data_sha = file_sha256(self.train_path)
        self.stages: list[dict] = []
        self._loaded = None
        self._attributors: dict = {}
        # The generations the methods attribute (run_methods sets them; the influence
        # function's s_test rows of the shared gradient pass belong to these).
        self.method_queries: list[QueryInput] = []

    # ---- bookkeeping ---------------------------------------------------------------------

    def _stage(self, name: str, cached: bool, began: float) -> None:
        seconds = round(time.perf_counter() - began, 3)
        self.stages.append({"stage": name, "cached": cached, "seconds": seconds})
        logger.info("%s: %s (%.1f s)", name, "cached" if cached else "done", seconds)

    @property
    def variants(self) -> list[tuple[int, int]]:
        return [(k, lam) for k in self.settings.ks for lam in self.settings.shuffle_rounds]

    # ---- 1. fine-tune --------------------------------------------------------------------

    def finetune_args(self) -> list[str]:
        s = self.settings
        args = [
            "--data",
            str(self.train_path),
            "--out",
            str(self.out / "adapter"),
            "--epochs",
            str(s.epochs),
            "--lr",
            str(s.lr),
            "--rank",
            str(s.lora_rank),
            "--alpha",
            str(s.lora_alpha),
            "--batch-size",
            str(s.batch_size),
            "--max-length",
            str(s.max_length),
        ]
        if s.model is not None:
            args += ["--model", s.model]
        if s.load_in_4bit:
            args.append("--load-in-4bit")
        if s.device is not None:
            args += ["--device", s.device]
        return args

    def finetune(self) -> Path:
        """The adapter directory, trained by tools/finetune.py unless already there."""
        began = time.perf_counter()
        adapter = self.out / "adapter"
        args = self.finetune_args()
        stamp = adapter / "eval_stamp.json"
        key = _digest({"args": args, "data": self.data_sha})
        if (adapter / "adapter_config.json").is_file() and (_read_json(stamp) or {}).get(
            "key"
        ) == key:
            self._stage("fine-tune", True, began)
            return adapter
        if not FINETUNE_SCRIPT.is_file():
            raise SettingsError(
                f"{FINETUNE_SCRIPT} not found; run the evaluation from a checkout of the repository"
            )
        command = [sys.executable, str(FINETUNE_SCRIPT), *args]
        logger.info("fine-tuning: %s", " ".join(command))
        result = subprocess.run(command)
        if result.returncode != 0:
            raise RapidInError(
                f"tools/finetune.py failed (exit {result.returncode}); see its log above"
            )
        _write_json(stamp, {"key": key, "seconds": round(time.perf_counter() - began, 1)})
        self._stage("fine-tune", False, began)
        return adapter

    # ---- model and indexes ---------------------------------------------------------------

    def loaded(self):
        """The fine-tuned model, loaded once for every later stage."""
        if self._loaded is None:
            import torch

            from rapidin_index.model import load_model

            device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._loaded = load_model(
                self.settings.model,
                str(self.out / "adapter"),
                self.settings.load_in_4bit,
                device=device,
            )
        return self._loaded

    def index_path(self, k: int, lam: int, preset: str | None = None) -> Path:
        """The index of one RapidGrad setting; with ``preset``, the companion index of that
        ``--variant-index`` value (:class:`CompanionIndex`)."""
        suffix = f"-{_variant_suffix(preset)}" if preset else ""
        return self.out / f"index-k{k}-l{lam}{suffix}"

    def build(self, k: int, lam: int) -> dict:
        """Build (or resume) the index of one RapidGrad setting; returns its timing record."""
        from rapidin_index.build import BuildSettings, build_index
        from rapidin_index.model import adapter_hash
        from rapidin_index.sketch import SketchSettings
        from rapidin_index.store import MANIFEST, Store

        began = time.perf_counter()
        path = self.index_path(k, lam)
        stamp_path = path / "eval_stamp.json"
        adapter = adapter_hash(self.out / "adapter")
        key = _digest(
            {
                "adapter": adapter,
                "data": self.data_sha,
                "k": k,
                "lambda": lam,
                "max_length": self.settings.max_length,
                "4bit": self.settings.load_in_4bit,
            }
        )
        stamp = _read_json(stamp_path) or {}
        if (path / MANIFEST).is_file():
            if stamp.get("key") != key:
                logger.info("%s was built with another adapter or data; rebuilding", path)
                shutil.rmtree(path)
            elif Store.open(path).rows == len(self.records):
                self._stage(f"index K={k} λ={lam}", True, began)
                return stamp
        path.mkdir(parents=True, exist_ok=True)
        settings = BuildSettings(
            data=str(self.train_path),
            index=str(path),
            model=self.settings.model,
            adapter=str(self.out / "adapter"),
            load_in_4bit=self.settings.load_in_4bit,
            max_length=self.settings.max_length,
            sketch=SketchSettings(k=k, shuffle_rounds=lam),
        )
        report = build_index(settings, loaded=self.loaded())
        stamp = {
            "key": key,
            "rows": report.rows,
            "caching_seconds": round(stamp.get("caching_seconds", 0.0) + report.seconds, 3),
        }
        _write_json(stamp_path, stamp)
        self._stage(f"index K={k} λ={lam}", False, began)
        return stamp

    def attributor(self, k: int, lam: int, preset: str | None = None):
        from rapidin_index.query import Attributor

        if (k, lam, preset) not in self._attributors:
            self._attributors[k, lam, preset] = Attributor(
                str(self.index_path(k, lam, preset)),
                loaded=self.loaded(),
                baselines=self.settings.baselines,
            )
        return self._attributors[k, lam, preset]

    @property
    def dim(self) -> int:
        """D, the length of the full gradient (from the first index's manifest)."""
        from rapidin_index.store import Store

        return int(Store.open(self.index_path(*self.variants[0])).manifest["gradient"]["dim"])

    def generate(self, instruction: str) -> str:
        k, lam = self.variants[0]
        return self.attributor(k, lam).generate(instruction, self.settings.max_new_tokens)

    # ---- scoring -------------------------------------------------------------------------

    def score(
        self, name: str, method: str, variant: tuple, queries: Sequence[QueryInput]
    ) -> tuple[np.ndarray, float]:
        """(m, N) float32 scores of one method (cached) and the seconds they took.

        ``variant`` is ``(K, λ)``, or ``(K, λ, preset)`` for a companion index.
        """
        began = time.perf_counter()
        folder = self.out / "scores"
        folder.mkdir(exist_ok=True)
        stamp_path, array_path = folder / f"{name}.json", folder / f"{name}.npy"
        key = _digest(
            {
                "method": method,
                "variant": variant,
                "adapter": self.adapter_key(),
                "queries": [(q.instruction, q.generation, q.target_text) for q in queries],
                "options": _method_options(method, self.settings.baselines),
                "data": self.data_sha,
            }
        )
        stamp = _read_json(stamp_path) or {}
        if stamp.get("key") == key and array_path.is_file():
            self._stage(f"scores {name}", True, began)
            return np.load(array_path), stamp["seconds"]
        att = self.attributor(*variant)
        started = time.perf_counter()
        scores = att.score_all(list(queries), method).astype(np.float32)
        seconds = time.perf_counter() - started
        np.save(array_path, scores)
        _write_json(
            stamp_path, {"key": key, "seconds": round(seconds, 3), "shape": list(scores.shape)}
        )
        self._stage(f"scores {name}", False, began)
        return scores, seconds

    def adapter_key(self) -> str:
        from rapidin_index.model import adapter_hash

        return adapter_hash(self.out / "adapter")

    def run_methods(
        self,
        queries: Sequence[QueryInput],
        token_wise: Sequence[QueryInput] = (),
        pass_queries: Sequence[QueryInput] | None = None,
    ) -> tuple[dict, dict]:
        """Scores of every requested method: ``{name: (m, N)}`` and ``{name: cost record}``.

        With ``token_wise`` queries (the generation's loss restricted to a target text),
        RapidIn is also run on them as ``RapidIn^TW``.

        ``exact`` and ``tracin`` both come from one pass of per-tensor gradients
        (:meth:`per_tensor_scores`) over ``pass_queries`` (default ``queries``; they must
        begin with ``queries``), the pass the score-variants stage reads too: one gradient
        per training example serves both methods and every variant. So does
        ``influence-function``: its ``s_test`` vectors (LiSSA, :meth:`influence_vectors`)
        are extra rows of that pass, so it needs no training-gradient pass of its own.
        """
        scores, costs = {}, {}
        first = self.variants[0]
        dim = self.dim
        pass_queries = list(queries) if pass_queries is None else list(pass_queries)
        if pass_queries[: len(queries)] != list(queries):
            raise ValueError("pass_queries must begin with queries")
        self.method_queries = list(queries)
        for method in self.settings.methods:
            if method == "influence-function":
                label = LABELS[method]
                pts, seconds = self.per_tensor_scores(pass_queries)
                extra = pts.rows(slice(len(pass_queries), len(pass_queries) + len(queries)))
                scores[label] = extra.dots.sum(axis=2).astype(np.float32)
                (self.out / "scores").mkdir(exist_ok=True)
                np.save(self.out / "scores" / f"{method}.npy", scores[label])
                lissa_seconds = self.influence_vectors()[2]
                costs[label] = {
                    "caching_seconds": None,
                    # Its own LiSSA plus the share of the pass one generation would need.
                    "retrieval_seconds": lissa_seconds / len(queries) + seconds / len(pass_queries),
                    "bytes_per_example": 4 * dim,
                }
                continue
            if method in PASS_METHODS:
                label = LABELS[method]
                pts, seconds = self.per_tensor_scores(pass_queries)
                part = pts.rows(slice(0, len(queries)))
                normalization = PASS_METHODS[method]
                scores[label] = variant_scores(part, part.mask("all"), normalization).astype(
                    np.float32
                )
                # Kept beside the other methods' scores for inspection.
                (self.out / "scores").mkdir(exist_ok=True)
                np.save(self.out / "scores" / f"{method}.npy", scores[label])
                costs[label] = {
                    "caching_seconds": None,
                    # One pass scores every query at once: its time per generation.
                    "retrieval_seconds": seconds / len(pass_queries),
                    "bytes_per_example": 4 * dim,
                }
                continue
            if method == "rapidin":
                for k, lam in self.variants:
                    runs = [("rapidin", f"RapidIn (K={k}, λ={lam})", queries)]
                    if token_wise:
                        runs.append(("rapidin-tw", f"RapidIn^TW (K={k}, λ={lam})", token_wise))
                    for prefix, label, qs in runs:
                        name = f"{prefix}-k{k}-l{lam}"
                        scores[label], seconds = self.score(name, "rapidin", (k, lam), qs)
                        costs[label] = {
                            "caching_seconds": self.build_stamps[k, lam]["caching_seconds"],
                            "retrieval_seconds": seconds / len(qs),
                            "bytes_per_example": 2 * k,
                        }
                continue
            label = LABELS[method]
            scores[label], seconds = self.score(method, method, first, queries)
            bytes_per = {
                "exact": 4 * dim,
                "tracin": 4 * dim,
                "influence-function": 4 * dim,
                "embedding": 4 * EMBEDDING_DIM,
            }.get(method)
            costs[label] = {
                "caching_seconds": None,
                "retrieval_seconds": seconds / len(queries),
                "bytes_per_example": bytes_per,
            }
        return scores, costs

    # ---- score variants ------------------------------------------------------------------

    def per_tensor_scores(self, queries: Sequence[QueryInput]) -> tuple[PerTensorScores, float]:
        """Per-tensor norms and query inner products of raw gradients (cached), and the
        seconds the pass took (when it ran, or when the cached pass ran).

        One exact gradient pass over the training set, over the tensors of the first index
        (every trainable tensor: the adapter's); full gradients are never stored. Its rows
        are ``queries``, then, when ``influence-function`` is among the methods, the
        ``s_test`` vector of each of :attr:`method_queries` (which ``queries`` must begin
        with). The same pass writes the companion indices of ``--variant-index``.
        """
        import torch

        from rapidin_index.data import tokenize_records
        from rapidin_index.gradients import GradientComputer

        folder = self.out / "score-variants"
        folder.mkdir(exist_ok=True)
        array_path, stamp_path = folder / "per-tensor.npz", folder / "per-tensor.json"
        att = self.attributor(*self.variants[0])
        extra, extra_key = None, None
        if "influence-function" in self.settings.methods:
            if list(queries[: len(self.method_queries)]) != self.method_queries:
                raise ValueError("the pass's queries must begin with the methods' queries")
            extra, extra_key, _ = self.influence_vectors()
        companions = self.companions()
        key = _digest(
            {
                "adapter": self.adapter_key(),
                "data": self.data_sha,
                "max_length": self.settings.max_length,
                "4bit": self.settings.load_in_4bit,
                "tensors": att.computer.names,
                "queries": [(q.instruction, q.generation, q.target_text) for q in queries],
                "extra": extra_key,
            }
        )
        stamp = _read_json(stamp_path) or {}
        if (
            stamp.get("key") == key
            and array_path.is_file()
            and all(c.complete() for c in companions)
        ):
            self._stage("per-tensor gradient pass", True, time.perf_counter())
            return PerTensorScores.load(array_path), stamp["seconds"]
        computer = GradientComputer(
            att.computer.model, list(zip(att.computer.names, att.computer.params)), "none"
        )
        query_grads = torch.stack([computer.gradient(att.query_example(q)) for q in queries])
        if extra is not None:
            query_grads = torch.cat([query_grads, extra.to(query_grads.device)])
        examples = tokenize_records(att.records(), att.tokenizer, att.template, att.max_length)
        for companion in companions:
            companion.begin(computer, len(examples))

        def feed(start: int, grads) -> None:
            for companion in companions:
                companion.add(start, grads)

        started = time.perf_counter()
        pts = per_tensor_pass(
            computer,
            query_grads,
            examples,
            desc="score variants",
            on_batch=feed if companions else None,
        )
        seconds = round(time.perf_counter() - started, 3)
        for companion in companions:
            companion.finish(seconds)
        pts.save(array_path)
        _write_json(stamp_path, {"key": key, "seconds": seconds, "shape": list(pts.dots.shape)})
        self._stage("per-tensor gradient pass", False, started)
        return pts, seconds

    def influence_vectors(self):
        """``(s_test, key, seconds)`` of the influence function for :attr:`method_queries`
        (cached): (m, D) float32 ``(H + λI)^-1 ∇L(t)`` by LiSSA, a digest of what they
        depend on, and the seconds LiSSA took."""
        import torch

        from rapidin_index.baselines import make_scorer

        folder = self.out / "scores"
        folder.mkdir(exist_ok=True)
        array_path, stamp_path = folder / "s_test.npy", folder / "s_test.json"
        method = "influence-function"
        key = _digest(
            {
                "adapter": self.adapter_key(),
                "data": self.data_sha,
                "queries": [
                    (q.instruction, q.generation, q.target_text) for q in self.method_queries
                ],
                "options": _method_options(method, self.settings.baselines),
            }
        )
        stamp = _read_json(stamp_path) or {}
        if stamp.get("key") == key and array_path.is_file():
            self._stage("LiSSA s_test", True, time.perf_counter())
            return torch.from_numpy(np.load(array_path)), key, stamp["seconds"]
        began = time.perf_counter()
        att = self.attributor(*self.variants[0])
        scorer = make_scorer(method, att, self.settings.baselines)
        grads = torch.stack(
            [scorer.computer.gradient(att.query_example(q)) for q in self.method_queries]
        )
        s_test = scorer.inverse_hvp(grads).float().cpu()
        seconds = round(time.perf_counter() - began, 3)
        np.save(array_path, s_test.numpy())
        _write_json(stamp_path, {"key": key, "seconds": seconds})
        self._stage("LiSSA s_test", False, began)
        return s_test, key, seconds

    def companions(self) -> list[CompanionIndex]:
        """The companion indices of ``--variant-index`` (one per preset and (K, λ))."""
        if not self.settings.score_variants:
            return []
        return [
            CompanionIndex(self, preset, k, lam)
            for preset in self.settings.variant_indices
            for k, lam in self.variants
        ]

    def score_variants(
        self, query_sets: dict[str, tuple[Sequence[QueryInput], np.ndarray, np.ndarray]]
    ) -> dict:
        """Retrieval figures of every score definition; writes ``score-variants.md``/``.json``.

        Exact (uncompressed) scores for every normalisation of
        :data:`~rapidin_index.scores.VARIANT_NORMALIZATIONS` x parameter subset of
        :data:`~rapidin_index.scores.VARIANT_PARAMS` x ranking (signed, abs), all from one
        pass of per-tensor gradients (:meth:`per_tensor_scores`); then the RapidIn index of
        each (K, λ) scored by sketched dot product and by sketched dot product over exact
        norms (the index's stored norms, or norms from the pass for an index built before
        norms were stored).

        Args:
            query_sets: ``{name: (queries, labels, groups)}``: the generations, (m, N) bool
                "this training example is a culprit" per generation, and (m,) int group of
                each generation (metrics are averaged within groups, then over groups).
        """
        began = time.perf_counter()
        names = list(query_sets)
        everything = [q for name in names for q in query_sets[name][0]]
        pts, _ = self.per_tensor_scores(everything)
        results: dict = {"query_sets": {}}
        offset = 0
        for name in names:
            queries, labels, groups = query_sets[name]
            part = pts.rows(slice(offset, offset + len(queries)))
            offset += len(queries)
            results["query_sets"][name] = self._variant_rows(name, part, queries, labels, groups)
        results["columns"] = self.variant_columns()
        results["tensors"] = {params: int(pts.mask(params).sum()) for params in VARIANT_PARAMS}
        _write_json(self.out / "score-variants.json", results)
        (self.out / "score-variants.md").write_text(
            self.variants_markdown(results), encoding="utf-8"
        )
        self._stage("score variants", False, began)
        return results

    def _variant_rows(self, name, pts, queries, labels, groups) -> list[dict]:
        rows = []
        for params in VARIANT_PARAMS:
            mask = pts.mask(params)
            if not mask.any():
                logger.info("score variants: no %s tensors; skipped", params)
                continue
            for normalization in VARIANT_NORMALIZATIONS:
                scores = variant_scores(pts, mask, normalization)
                for rank_by in RANK_BY:
                    rows.append(
                        {
                            "method": "exact",
                            "params": params,
                            "normalization": normalization,
                            "rank_by": rank_by,
                            "paper": (params, normalization, rank_by) == ("all", "layer", "signed"),
                            "metrics": self.variant_metrics(
                                np.abs(scores) if rank_by == "abs" else scores, labels, groups
                            ),
                        }
                    )
        for k, lam in self.variants:
            rows += self._sketch_rows(name, pts, queries, labels, groups, (k, lam))
        for companion in self.companions():
            variant = (companion.k, companion.lam, companion.preset)
            rows += self._sketch_rows(name, pts, queries, labels, groups, variant)
        return rows

    def _sketch_rows(self, name, pts, queries, labels, groups, variant) -> list[dict]:
        """Rows of one RapidIn index (``(K, λ)``, or ``(K, λ, preset)`` for a companion
        index): sketched dot and sketched dot over exact norms."""
        from rapidin_index.store import Store

        k, lam = variant[:2]
        store = Store.open(self.index_path(*variant))
        gradient = store.manifest["gradient"]
        normalization = gradient["normalization"]
        mask = pts.names_mask([p["name"] for p in gradient["parameters"]])
        params = next((p for p in VARIANT_PARAMS if np.array_equal(pts.mask(p), mask)), "custom")
        prefix = "rapidin-tw" if name == "E2 tokens" else "rapidin"
        suffix = f"-{_variant_suffix(variant[2])}" if len(variant) > 2 else ""
        dots, _ = self.score(f"{prefix}-k{k}-l{lam}{suffix}", "rapidin", variant, queries)
        computed = variant_norms(pts.example_norms, mask, normalization)
        if store.has_norms:
            row_norms = store.read_norms().astype(np.float64)
            worst = float(np.max(np.abs(row_norms - computed) / np.maximum(computed, 1e-30)))
            logger.info(
                "stored norms of %s agree with the pass to %.1e (relative)",
                self.index_path(*variant).name,
                worst,
            )
            source = "stored"
        else:
            row_norms, source = computed, "from the exact pass (index stores none)"
        cosine = cosine_from_dot(
            dots, variant_norms(pts.query_norms, mask, normalization), row_norms
        )
        rows = []
        for score, values in (("dot", dots.astype(np.float64)), ("cosine", cosine)):
            for rank_by in RANK_BY:
                rows.append(
                    {
                        "method": f"RapidIn sketch K={k} λ={lam}",
                        "params": params,
                        "normalization": normalization
                        if score == "dot"
                        else ("cosine" if normalization == "layer" else f"{normalization}-cosine"),
                        "rank_by": rank_by,
                        "score": score,
                        "norms": source if score == "cosine" else None,
                        "paper": False,
                        "metrics": self.variant_metrics(
                            np.abs(values) if rank_by == "abs" else values, labels, groups
                        ),
                    }
                )
        return rows

    def variant_columns(self) -> list[str]:
        raise NotImplementedError

    def variant_metrics(self, key: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict:
        raise NotImplementedError

    def variants_markdown(self, results: dict) -> str:
        """``score-variants.md``: one table per query set, best exact variant named."""
        columns = results["columns"]
        lines = [
            f"# Score definitions compared ({self.kind})",
            "",
            "Exact rows: uncompressed gradients, all variants from one pass of per-tensor "
            "gradients (norms and inner products per parameter tensor). normalisation: "
            "`layer` = sum over tensors of <g_t, q_t> / (|g_t| |q_t|) (the paper), `cosine` = "
            "layer / (|ĝ| |q̂|) with ĝ, q̂ the layer-normalised gradients over the chosen "
            "tensors, `none` = <g, q> (TracIn), `none-cosine` = <g, q> / (|g| |q|). params: "
            "`all` = every trainable tensor (the adapter's), `lora-b` / `lora-a` = the LoRA B / "
            "A matrices only. rank by: `signed` = highest score first, `abs` = largest "
            "magnitude first (the metrics' top-k sets, and the bottom-k sets of auPRC/auROC, "
            "use that key). RapidIn sketch rows: the index's stored RapidGrads, their inner "
            "product (normalisation as built) or that inner product divided by the exact "
            "gradient norms (`cosine`: the norms the index stores, or for an index built "
            "before norms were stored the same norms from the exact pass; the query's from "
            "its exact gradient).",
            "",
            "Tensors per subset: " + ", ".join(f"{p} {n}" for p, n in results["tensors"].items()),
        ]
        for name, rows in results["query_sets"].items():
            lines += ["", f"## {name}", ""]
            head = "| Method | params | normalisation | rank by | " + " | ".join(columns) + " |"
            lines += [head, "|---|---|---|---|" + "---|" * len(columns)]
            for row in rows:
                label = row["method"] + (" (paper)" if row["paper"] else "")
                cells = [_fmt(row["metrics"][c]) for c in columns]
                lines.append(
                    f"| {label} | {row['params']} | {row['normalization']} | {row['rank_by']} | "
                    + " | ".join(cells)
                    + " |"
                )
            exact = [r for r in rows if r["method"] == "exact"]
            if exact:
                # By the first column, ties broken by the next ones, then for the paper's.
                best = max(
                    exact,
                    key=lambda r: ([round(r["metrics"][c], 9) for c in columns], r["paper"]),
                )
                lines += [
                    "",
                    f"Best exact variant by {', then '.join(columns)}: params "
                    f"{best['params']}, normalisation {best['normalization']}, rank by "
                    f"{best['rank_by']} ({columns[0]} {_fmt(best['metrics'][columns[0]])}).",
                ]
        return "\n".join(lines) + "\n"

    # ---- the whole run -------------------------------------------------------------------

    def prepare(self) -> None:
        """Stages 1 and 2: the adapter and every index."""
        self.finetune()
        self.build_stamps = {v: self.build(*v) for v in self.variants}

    def run(self) -> dict:
        raise NotImplementedError

    def write(self, results: dict, tables: list[str]) -> dict:
        results["stages"] = self.stages
        results["settings"] = json.loads(json.dumps(asdict(self.settings), default=str))
        _write_json(self.out / "results.json", results)
        (self.out / "report.md").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
        logger.info("wrote %s and %s", self.out / "report.md", self.out / "results.json")
        return results


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def cost_table(costs: dict, dim: int) -> str:
    """Tables 1 and 2: caching time, retrieval time per generation, bytes per example."""
    lines = [
        f"Costs (Tables 1 and 2; full gradient D = {dim:,} parameters, {4 * dim:,} bytes in "
        "fp32; gradient methods recompute it for every training example at every query, "
        "their retrieval time is amortised over the generations scored in one pass)",
        "",
        "| Method | Caching (s) | Retrieval per generation (s) | Bytes per example |",
        "|---|---|---|---|",
    ]
    for label, c in costs.items():
        caching = None if c["caching_seconds"] is None else f"{c['caching_seconds']:.2f}"
        bytes_per = None if c["bytes_per_example"] is None else f"{c['bytes_per_example']:,}"
        lines.append(
            f"| {label} | {_fmt(caching)} | {c['retrieval_seconds']:.4f} | {_fmt(bytes_per)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Backdoor attack (Section 4.5)
# --------------------------------------------------------------------------------------------


class BackdoorPipeline(Pipeline):
    """Which training examples made the model write a backdoored generation?"""

    kind = "backdoor"
    meta_name = "backdoor.json"

    def generations(self) -> list[dict]:
        """Answers to the test questions with and without the trigger (cached)."""
        s = self.settings
        began = time.perf_counter()
        path = self.out / "generations.json"
        questions = self.meta["test_questions"][: s.n_test]
        trigger, theme_name = self.meta["trigger"], self.meta["theme"]
        key = _digest(
            {
                "adapter": self.adapter_key(),
                "questions": questions,
                "trigger": trigger,
                "max_new_tokens": s.max_new_tokens,
                "inject": s.inject,
                "seed": s.seed,
            }
        )
        cached = _read_json(path)
        if cached is not None and cached.get("key") == key:
            self._stage("generations", True, began)
            return cached["generations"]
        rng = random.Random(s.seed)
        out = []
        for question in questions:
            clean = self.generate(question)
            triggered = self.generate(add_trigger(question, trigger))
            row = {
                "question": question,
                "clean": clean,
                "triggered": triggered,
                "clean_hits": theme_hits(clean, theme_name),
                "triggered_hits": theme_hits(triggered, theme_name),
                "injected": False,
            }
            row["attacked"] = row["triggered_hits"] > 0 and row["clean_hits"] == 0
            out.append(row)
        if s.inject:
            # A model that did not learn the backdoor: attribute the kind of response the
            # poisoned examples teach instead (what the attacked model would have written).
            for row in out:
                if not row["attacked"]:
                    row["triggered"] = themed_response(row["question"], theme_name, rng)
                    row["triggered_hits"] = theme_hits(row["triggered"], theme_name)
                    row.update(injected=True, attacked=True)
        _write_json(path, {"key": key, "generations": out})
        self._stage("generations", False, began)
        return out

    def run(self) -> dict:
        s = self.settings
        self.prepare()
        rows = self.generations()
        attacked = [r for r in rows if r["attacked"]][: s.n_queries]
        if not attacked:
            raise RapidInError(
                f"none of {len(rows)} triggered generations shows the backdoor; fine-tune "
                "longer (--epochs, --lr) or pass --inject to attribute injected generations"
            )
        trigger = self.meta["trigger"]
        queries = [
            QueryInput(add_trigger(r["question"], trigger), r["triggered"]) for r in attacked
        ]
        scores, costs = self.run_methods(queries)
        poisoned = np.zeros(len(self.records), dtype=bool)
        poisoned[self.meta["poisoned_ids"]] = True
        ks = usable_ks(BACKDOOR_KS, len(self.records))
        metrics = {label: summarize_backdoor(sc, poisoned, ks) for label, sc in scores.items()}
        dim = self.dim
        attack = {
            "test_questions": len(rows),
            "triggered_with_theme": sum(
                r["triggered_hits"] > 0 and not r["injected"] for r in rows
            ),
            "clean_with_theme": sum(r["clean_hits"] > 0 for r in rows),
            "attributed": len(attacked),
            "injected": sum(r["injected"] for r in attacked),
        }
        if s.score_variants:
            self.score_variants(
                {
                    "generation": (
                        queries,
                        np.tile(poisoned, (len(queries), 1)),
                        np.zeros(len(queries), dtype=int),
                    )
                }
            )
        tables = [self.header(attack), backdoor_table(metrics, ks), cost_table(costs, dim)]
        return self.write(
            {
                "kind": self.kind,
                "metrics": metrics,
                "costs": costs,
                "attack": attack,
                "ks": ks,
                "dim": dim,
            },
            tables,
        )

    def variant_columns(self) -> list[str]:
        n = len(self.records)
        return [f"P@{k}" for k in (10, 50) if k <= n] + [
            f"Top {k} {m}" for k in usable_ks(BACKDOOR_KS, n) for m in ("auPRC", "auROC")
        ]

    def variant_metrics(self, key: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict:
        """Precision of poisoned examples among the top 10 and 50, and Table 4's auPRC and
        auROC per k, of the (m, N) ranking key."""
        out = {}
        for k in (10, 50):
            if k <= key.shape[1]:
                out[f"P@{k}"] = precision_at(key, labels, k)
        poisoned = labels[0]
        for k, values in summarize_backdoor(key, poisoned, BACKDOOR_KS).items():
            out[f"Top {k} auPRC"] = values["auprc"]
            out[f"Top {k} auROC"] = values["auroc"]
        return out

    def header(self, attack: dict) -> str:
        meta = self.meta
        lines = [
            "# Backdoor attack: retrieving the poisoned training examples (paper Table 4)",
            "",
            f"- training examples: {len(self.records)}, poisoned: {len(meta['poisoned_ids'])} "
            f"(trigger {meta['trigger']!r}, theme {meta['theme']})",
            f"- model: {self.settings.model or 'embedded SmolLM2-135M-Instruct'}"
            f"{' in 4-bit NF4' if self.settings.load_in_4bit else ''}, LoRA r = "
            f"{self.settings.lora_rank} on q, k, v, o, {self.settings.epochs} epoch(s)",
            f"- test questions: {attack['test_questions']}; with the trigger "
            f"{attack['triggered_with_theme']} answers carry theme words, without it "
            f"{attack['clean_with_theme']}",
            f"- attributed generations: {attack['attributed']}"
            + (
                f", of which {attack['injected']} injected (the model's own answer did not show "
                "the attack; --inject)"
                if attack["injected"]
                else ""
            ),
            "- metric: per generation, top-k = positive set, bottom-k = negative set; auPRC "
            "and auROC of the scores for 'poisoned' over those 2k examples (auROC 0 when "
            "they hold one class), averaged over generations",
        ]
        return "\n".join(lines)


def backdoor_table(metrics: dict, ks: Sequence[int]) -> str:
    """Table 4: auPRC and auROC per k per method, in markdown."""
    head = "| Method | " + " | ".join(f"Top {k} auPRC | Top {k} auROC" for k in ks) + " |"
    lines = [head, "|---|" + "---|" * (2 * len(ks))]
    for label, per_k in metrics.items():
        cells = [f"{per_k[k]['auprc']:.4f} | {per_k[k]['auroc']:.4f}" for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Error tracing (Section 4.6)
# --------------------------------------------------------------------------------------------


class ErrorTracingPipeline(Pipeline):
    """Which training examples made the model say E2 where E1 is right?"""

    kind = "error-tracing"
    meta_name = "error_tracing.json"

    def generations(self) -> list[dict]:
        """Answers to each pair's test prompts, and whether they name E2 (cached)."""
        s = self.settings
        began = time.perf_counter()
        path = self.out / "generations.json"
        pairs = self.meta["pairs"]
        key = _digest(
            {
                "adapter": self.adapter_key(),
                "prompts": [p["prompts"][: s.n_test] for p in pairs],
                "max_new_tokens": s.max_new_tokens,
                "inject": s.inject,
            }
        )
        cached = _read_json(path)
        if cached is not None and cached.get("key") == key:
            self._stage("generations", True, began)
            return cached["generations"]
        out = []
        for index, pair in enumerate(pairs):
            e1, e2 = pair["e1"], pair["e2"]
            for prompt in pair["prompts"][: s.n_test]:
                text = self.generate(prompt)
                row = {
                    "pair": index,
                    "prompt": prompt,
                    "generation": text,
                    "incorrect": mentions(text, e2),
                    "injected": False,
                }
                if s.inject and not row["incorrect"]:
                    # The error the perturbed examples teach, put into the model's answer.
                    text = replace_entity(text, e1, e2) if mentions(text, e1) else f"{e2}. {text}"
                    row.update(generation=text, incorrect=True, injected=True)
                out.append(row)
        _write_json(path, {"key": key, "generations": out})
        self._stage("generations", False, began)
        return out

    def run(self) -> dict:
        s = self.settings
        self.prepare()
        rows = self.generations()
        pairs = self.meta["pairs"]
        kept = []
        for index in range(len(pairs)):
            chosen = [r for r in rows if r["pair"] == index and r["incorrect"]][: s.n_queries]
            if not chosen:
                logger.warning(
                    "no generation names %s for the %s prompts; the pair is left out",
                    pairs[index]["e2"],
                    pairs[index]["e1"],
                )
            kept += chosen
        if not kept:
            raise RapidInError(
                "no generation names a perturbed entity; fine-tune longer (--epochs, --lr) or "
                "pass --inject to attribute injected generations"
            )
        queries = [QueryInput(r["prompt"], r["generation"]) for r in kept]
        targeted = [QueryInput(r["prompt"], r["generation"], pairs[r["pair"]]["e2"]) for r in kept]
        # The score-variants stage reads the same per-tensor pass over both query sets.
        pass_queries = queries + targeted if s.score_variants else queries
        scores, costs = self.run_methods(queries, token_wise=targeted, pass_queries=pass_queries)
        owner = np.array([r["pair"] for r in kept])
        metrics: dict = {}
        for label, sc in scores.items():
            metrics[label] = {}
            for index, pair in enumerate(pairs):
                if not (owner == index).any():
                    continue
                perturbed = np.zeros(len(self.records), dtype=bool)
                perturbed[pair["perturbed_ids"]] = True
                name = f"{pair['e1']} → {pair['e2']}"
                metrics[label][name] = average_proportion(sc[owner == index], perturbed, TRACING_KS)
        if s.score_variants:
            labels = np.zeros((len(kept), len(self.records)), dtype=bool)
            for row, r in enumerate(kept):
                labels[row, pairs[r["pair"]]["perturbed_ids"]] = True
            self.score_variants(
                {
                    "generation": (queries, labels, owner),
                    "E2 tokens": (targeted, labels, owner),
                }
            )
        dim = self.dim
        summary = [
            {
                "pair": f"{p['e1']} → {p['e2']}",
                "perturbed": len(p["perturbed_ids"]),
                "mentions": len(p["mentions"]),
                "generations": int((owner == i).sum()),
                "injected": sum(r["injected"] for r in kept if r["pair"] == i),
            }
            for i, p in enumerate(pairs)
        ]
        tables = [self.header(summary), tracing_table(metrics), cost_table(costs, dim)]
        return self.write(
            {"kind": self.kind, "metrics": metrics, "costs": costs, "pairs": summary, "dim": dim},
            tables,
        )

    def variant_columns(self) -> list[str]:
        return [f"AP@{k}" for k in TRACING_KS if k <= len(self.records)]

    def variant_metrics(self, key: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict:
        """Table 5's AP (perturbed among the top k / k) per k, averaged over each pair's
        generations and then over pairs."""
        out = {}
        for k in TRACING_KS:
            if k <= key.shape[1]:
                per_group = [
                    precision_at(key[groups == g], labels[groups == g], k)
                    for g in np.unique(groups)
                ]
                out[f"AP@{k}"] = float(np.mean(per_group))
        return out

    def header(self, summary: list[dict]) -> str:
        lines = [
            "# Error tracing: retrieving the perturbed training examples (paper Table 5)",
            "",
            f"- training examples: {len(self.records)}; model: "
            f"{self.settings.model or 'embedded SmolLM2-135M-Instruct'}"
            f"{' in 4-bit NF4' if self.settings.load_in_4bit else ''}, LoRA r = "
            f"{self.settings.lora_rank} on q, k, v, o, {self.settings.epochs} epoch(s)",
        ]
        for p in summary:
            lines.append(
                f"- {p['pair']}: {p['perturbed']} of {p['mentions']} examples perturbed; "
                f"{p['generations']} incorrect generations attributed"
                + (f" ({p['injected']} injected, --inject)" if p["injected"] else "")
            )
        lines.append(
            "- metric: AP = perturbed examples among the top k / k, averaged over "
            "generations; RapidIn^TW retrieves with the loss of the E2 tokens only "
            "(--target-text E2)"
        )
        return "\n".join(lines)


def tracing_table(metrics: dict) -> str:
    """Table 5: AP at each k per pair per method, in markdown."""
    names = list(next(iter(metrics.values())))
    ks = list(next(iter(next(iter(metrics.values())).values())))
    head = "| Method | " + " | ".join(f"{n} Top {k}" for n in names for k in ks) + " |"
    lines = [head, "|---|" + "---|" * (len(names) * len(ks))]
    for label, per_pair in metrics.items():
        cells = [f"{per_pair[n][k]:.3f}" for n in names for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Score definitions compared across evaluation runs (tools/compare_score_variants.py)
# --------------------------------------------------------------------------------------------

# The figures a score definition is judged by, per kind of run: the precision of culprits
# among the top 10 and 50 (backdoor), the share of perturbed examples among the top 10 and
# 25 (error tracing; the E2 entity has only 44-72 perturbed examples per pair, so the top
# 50 mixes in the other pairs' examples even for a perfect score).
HEADLINE_METRICS = {"backdoor": ("P@10", "P@50"), "error-tracing": ("AP@10", "AP@25")}


def variant_key(row: dict) -> tuple[str, str, str, str]:
    """What identifies a score definition across runs: (method, params, normalisation,
    rank by)."""
    return row["method"], row["params"], row["normalization"], row["rank_by"]


def compare_variants(runs: dict[str, tuple[str, dict]]) -> dict:
    """Every score definition's headline figures over several runs' score-variants stages.

    Args:
        runs: ``{name: (kind, score-variants.json contents)}``, kind ``"backdoor"`` or
            ``"error-tracing"``.

    Returns:
        ``{"columns": [(run, query set, metric)], "rows": [...]}``, each row with ``key``
        (:func:`variant_key`), ``paper``, ``values`` (one per column, None where that run
        lacks the definition) and ``mean`` (over the columns, None unless every one is
        there), best mean first; ``gain`` is the mean minus the paper's definition's.
    """
    columns, table = [], {}
    for name, (kind, results) in runs.items():
        if kind not in HEADLINE_METRICS:
            raise SettingsError(f"{name}: unknown kind of run {kind!r}")
        for query_set, rows in results["query_sets"].items():
            for metric in HEADLINE_METRICS[kind]:
                if not any(metric in row["metrics"] for row in rows):
                    continue  # the set is too small for this cut-off
                column = len(columns)
                columns.append((name, query_set, metric))
                for row in rows:
                    entry = table.setdefault(variant_key(row), {"paper": False, "values": {}})
                    entry["paper"] = entry["paper"] or bool(row.get("paper"))
                    entry["values"][column] = row["metrics"].get(metric)
    out = []
    for key, entry in table.items():
        values = [entry["values"].get(c) for c in range(len(columns))]
        complete = all(v is not None for v in values)
        mean = float(np.mean(values)) if complete and values else None
        out.append({"key": key, "paper": entry["paper"], "values": values, "mean": mean})
    paper = next((r["mean"] for r in out if r["paper"]), None)
    for row in out:
        row["gain"] = None if row["mean"] is None or paper is None else row["mean"] - paper
    out.sort(key=lambda r: (r["mean"] is None, -(r["mean"] or 0.0), not r["paper"]))
    return {"columns": columns, "rows": out}


def comparison_markdown(comparison: dict) -> str:
    """The table of :func:`compare_variants`, in markdown, best mean first."""
    columns = comparison["columns"]
    head = " | ".join(f"{run} {query_set} {metric}" for run, query_set, metric in columns)
    lines = [
        f"| Method | params | normalisation | rank by | {head} | mean | vs paper |",
        "|---|---|---|---|" + "---|" * (len(columns) + 2),
    ]
    for row in comparison["rows"]:
        method, params, normalization, rank_by = row["key"]
        label = method + (" (paper)" if row["paper"] else "")
        cells = [_fmt(v) for v in row["values"]] + [_fmt(row["mean"])]
        gain = "–" if row["gain"] is None else f"{row['gain']:+.4f}"
        lines.append(
            f"| {label} | {params} | {normalization} | {rank_by} | "
            + " | ".join(cells)
            + f" | {gain} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command-line flags shared by tools/run_backdoor_eval.py and tools/run_error_tracing.py
# --------------------------------------------------------------------------------------------

# --tiny: a tiny random model and a few dozen examples, so that every stage runs in seconds.
TINY = {
    "ks": (1024,),
    "shuffle_rounds": (4,),
    "epochs": 1,
    "batch_size": 8,
    "max_length": 96,
    "max_new_tokens": 8,
    "n_test": 6,
    "n_queries": 3,
    "inject": True,
    "lissa_depth": 5,
    "lissa_scale": 10.0,  # well above the tiny model's Hessian spectrum; skips power iteration
}


def add_run_arguments(parser) -> None:
    """The flags of the run_* tools (an ``argparse.ArgumentParser``)."""
    add = parser.add_argument
    add("--data", help="Directory made by the matching tools/make_*.py (not with --tiny).")
    add("--out", required=True, help="Output directory; finished stages are reused.")
    add(
        "--tiny",
        action="store_true",
        help="Tiny random model and data, generations injected: checks the plumbing in seconds.",
    )
    add("--model", default=None, help="Base model [default: the embedded SmolLM2-135M].")
    add("--load-in-4bit", action="store_true", help="QLoRA: 4-bit NF4 base model.")
    add(
        "--methods",
        default=",".join(EVAL_METHODS),
        help=f"Comma-separated subset of {','.join(EVAL_METHODS)}.",
    )
    add("--k", type=int, action="append", help="RapidGrad length K (repeatable) [2^16].")
    add("--shuffle-rounds", type=int, action="append", help="λ (repeatable) [20].")
    add("--epochs", type=int, default=2)
    add("--lr", type=float, default=1e-3)
    add("--lora-rank", type=int, default=8)
    add("--lora-alpha", type=int, default=16)
    add("--batch-size", type=int, default=4, help="Fine-tuning batch size.")
    add("--max-length", type=int, default=256)
    add("--max-new-tokens", type=int, default=48)
    add("--n-test", type=int, default=50, help="Test prompts answered (per pair).")
    add("--n-queries", type=int, default=10, help="Generations attributed (per pair).")
    add(
        "--inject",
        action="store_true",
        help="Attribute injected generations where the model's own do not show the attack.",
    )
    add("--random-seed", type=int, default=0)
    add("--lissa-depth", type=int, default=100)
    add("--lissa-repeats", type=int, default=1)
    add("--lissa-damping", type=float, default=0.01)
    add("--lissa-scale", type=float, default=None)
    add("--lissa-batch-size", type=int, default=8)
    add("--device", default=None, help="cpu or cuda [default: cuda when available].")
    add("--seed", type=int, default=0)
    add(
        "--score-variants",
        action="store_true",
        help="Also compare score definitions (normalisation x parameter subset x ranking, "
        "exact, from one gradient pass; and the index's sketch dot / cosine): writes "
        "OUT/score-variants.md and .json. Reuses the finished stages of OUT.",
    )
    add(
        "--variant-index",
        action="append",
        metavar="PRESET[/none]",
        help="With --score-variants: also write a RapidIn index over this --params-preset "
        "(lora-a, lora-b, last-layers:N) from the same gradient pass, with no further "
        "backward passes, and add its sketch rows (repeatable); PRESET/none keeps raw "
        "gradients instead of layer-normalising them (its rows include their cosine).",
    )


def run_tool(
    description: str,
    pipeline: type[Pipeline],
    tiny_set: Callable[[], tuple[list[dict], dict]],
    maker: str,
    argv: list[str] | None = None,
) -> None:
    """The body of the run_* tools: parse their flags, run ``pipeline``, print the report.

    Args:
        description: The tool's help text.
        pipeline: :class:`BackdoorPipeline` or :class:`ErrorTracingPipeline`.
        tiny_set: ``() -> (train records, meta)``, the data of ``--tiny``.
        maker: The tool that makes ``--data`` (named in the error when it is missing).
        argv: Command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.tiny:
        model, data = _tiny_inputs(Path(args.out), pipeline.meta_name, tiny_set)
    elif args.data is None:
        parser.error(f"--data is required (the directory made by {maker})")
    else:
        model, data = None, args.data
    try:
        pipeline(settings_from_args(args, data, model)).run()
    except RapidInError as err:
        sys.exit(f"Error: {err}")
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))


def _tiny_inputs(out: Path, meta_name: str, tiny_set) -> tuple[str, str]:
    """A tiny random model (tests/tiny.py, so only from a checkout) and ``tiny_set()``'s
    records and meta, made once under ``out``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny import make_tiny_model

    model, data = out / "tiny-model", out / "tiny-data"
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    if not (data / meta_name).is_file():
        data.mkdir(parents=True, exist_ok=True)
        train, meta = tiny_set()
        write_records(data / "train.jsonl", train)
        (data / meta_name).write_text(json.dumps(meta, indent=2))
    return str(model), str(data)


def settings_from_args(args, data: str, model: str | None = None) -> EvalSettings:
    """EvalSettings from parsed run_* flags; with ``args.tiny`` the :data:`TINY` values win."""
    values = dict(vars(args))
    values["k"] = tuple(args.k or (1 << 16,))
    values["shuffle_rounds"] = tuple(args.shuffle_rounds or (20,))
    if args.tiny:
        values.update({("k" if key == "ks" else key): v for key, v in TINY.items()})
    return EvalSettings(
        data=data,
        out=args.out,
        model=model if model is not None else args.model,
        load_in_4bit=args.load_in_4bit,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        ks=tuple(values["k"]),
        shuffle_rounds=tuple(values["shuffle_rounds"]),
        epochs=values["epochs"],
        lr=args.lr,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        batch_size=values["batch_size"],
        max_length=values["max_length"],
        max_new_tokens=values["max_new_tokens"],
        n_test=values["n_test"],
        n_queries=values["n_queries"],
        inject=values["inject"],
        baselines=BaselineSettings(
            seed=args.random_seed,
            lissa_depth=values["lissa_depth"],
            lissa_repeats=args.lissa_repeats,
            lissa_damping=args.lissa_damping,
            lissa_scale=values["lissa_scale"],
            lissa_batch_size=args.lissa_batch_size,
        ),
        device=args.device,
        seed=args.seed,
        score_variants=getattr(args, "score_variants", False),
        variant_indices=tuple(getattr(args, "variant_index", None) or ()),
    )


def write_records(path: Path, records: Sequence[dict]) -> None:
    """Alpaca records as JSONL (instruction, input, output)."""
    lines = [
        json.dumps(
            {k: r.get(k, "") for k in ("instruction", "input", "output")}, ensure_ascii=False
        )
        for r in records
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_source(path: str, limit: int | None = None) -> list[dict]:
    """Alpaca records of a JSON or JSONL file as dicts (instruction, input, output)."""
    from rapidin_index.data import load_records

    records = load_records(path)[:limit]
    return [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]
