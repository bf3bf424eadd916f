"""Score definitions: what "influence of training example s on generation t" means.

The paper's score (``--preset paper``) is TracIn with one checkpoint after layer-wise
normalisation over every trainable tensor, ranked by signed value: ``sum_t <g_t/|g_t|,
q_t/|q_t|>`` over the selected parameter tensors ``t``, with ``g`` the training example's
loss gradient and ``q`` the generation's. The options, and when they are fixed:

* build time (they change what is stored, so the manifest records them): the normalisation
  (``--normalization layer|none``) and the parameter selection (``--params GLOB``,
  ``--params-preset lora-a|lora-b|last-layers:N``);
* query time (they only change how stored rows are scored): ``--score dot|cosine`` and
  ``--rank-by signed|abs``.

``cosine`` divides each score by the exact L2 norms of the two flattened gradients after
the index's normalisation (with layer normalisation: the layer-normalised gradient over the
selected tensors). An index stores every row's exact norm next to its RapidGrad
(:mod:`rapidin_index.store`), so a query divides the sketched inner product by exact norms,
not by the norms of the sketches. Note that a layer-normalised gradient has norm
``sqrt(number of tensors with a non-zero gradient)``, so on a layer-normalised index
``cosine`` is ``dot`` divided by an almost constant factor; on a ``--normalization none``
index it is the cosine similarity of the raw gradients.

``abs`` ranks by magnitude: the most influential examples whichever the sign, each still
reported with its signed score and labelled helpful (positive) or harmful (negative).

The second half of the module computes many score definitions from one gradient pass, for
the evaluation's score-variants stage: per-example, per-tensor raw gradient norms and
per-tensor inner products with each query, from which every (normalisation, parameter
subset) score is a cheap sum (:func:`per_tensor_pass`, :func:`variant_scores`).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rapidin_index.errors import SettingsError

logger = logging.getLogger(__name__)

SCORES = ("dot", "cosine")
# Methods whose scores are gradient inner products, which --score cosine divides by norms.
COSINE_METHODS = ("rapidin", "exact")
RANK_BY = ("signed", "abs")
PRESETS = ("paper",)

# Defaults of the options, chosen by the retrieval figures of the evaluation harness
# (docs/eval/score-variants.md: two backdoor sets and the error-tracing set, exact gradients
# and RapidGrads). Those runs fine-tuned LoRA adapters, so the build defaults that change
# what is stored apply to adapter gradients only; a full-parameter index keeps the paper's
# layer normalisation over every tensor, for which there is no evidence either way here.
# --preset paper keeps the paper's definition whatever these are.
DEFAULT_NORMALIZATION = "layer"
DEFAULT_PARAMS_PRESET: str | None = None
ADAPTER_DEFAULT_NORMALIZATION = "none"
ADAPTER_DEFAULT_PARAMS_PRESET: str | None = "lora-b"
DEFAULT_SCORE = "cosine"
DEFAULT_RANK_BY = "signed"

PAPER_NORMALIZATION = "layer"
PAPER_SCORE = "dot"
PAPER_RANK_BY = "signed"

EFFECTS = ("helpful", "harmful", "neutral")


# --------------------------------------------------------------------------------------------
# Options and presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreOptions:
    """Query-time score options; without arguments, the paper's (signed inner product).
    :func:`resolve_query_options` gives the command line's defaults.

    Attributes:
        score: ``"dot"`` (inner product of the stored gradients) or ``"cosine"`` (divided by
            both gradients' exact norms).
        rank_by: ``"signed"`` (highest score first) or ``"abs"`` (largest magnitude first).
    """

    score: str = PAPER_SCORE
    rank_by: str = PAPER_RANK_BY

    def validate(self) -> None:
        if self.score not in SCORES:
            raise SettingsError(f"unknown --score {self.score!r}; choose from {SCORES}")
        if self.rank_by not in RANK_BY:
            raise SettingsError(f"unknown --rank-by {self.rank_by!r}; choose from {RANK_BY}")

    @property
    def is_paper(self) -> bool:
        return (self.score, self.rank_by) == (PAPER_SCORE, PAPER_RANK_BY)


def _check_preset(preset: str | None) -> None:
    if preset is not None and preset not in PRESETS:
        raise SettingsError(f"unknown --preset {preset!r}; choose from {PRESETS}")


def resolve_build_options(
    preset: str | None,
    normalization: str | None,
    params: Sequence[str] = (),
    params_preset: str | None = None,
    adapter: bool = False,
) -> tuple[str, tuple[str, ...], str | None]:
    """The build's ``(normalization, params, params_preset)`` from its flags.

    ``None`` means "not given": the default applies. With ``adapter`` (gradients of a LoRA
    adapter's tensors) the defaults are :data:`ADAPTER_DEFAULT_NORMALIZATION` and, when
    neither ``--params`` nor ``--params-preset`` is given, :data:`ADAPTER_DEFAULT_PARAMS_PRESET`;
    otherwise :data:`DEFAULT_NORMALIZATION` over every trainable tensor. ``--preset paper``
    fixes the paper's definition (layer normalisation, every trainable tensor) and refuses
    flags that contradict it.

    Raises:
        SettingsError: unknown preset, or a flag that contradicts it.
    """
    _check_preset(preset)
    if preset == "paper":
        clashes = []
        if normalization not in (None, PAPER_NORMALIZATION):
            clashes.append(f"--normalization {normalization}")
        if params:
            clashes.append("--params")
        if params_preset is not None:
            clashes.append(f"--params-preset {params_preset}")
        if clashes:
            raise SettingsError(
                f"--preset paper means layer normalisation over every trainable tensor; "
                f"drop {', '.join(clashes)} or drop --preset paper"
            )
        return PAPER_NORMALIZATION, (), None
    if normalization is None:
        normalization = ADAPTER_DEFAULT_NORMALIZATION if adapter else DEFAULT_NORMALIZATION
    if params_preset is None and not params:
        params_preset = ADAPTER_DEFAULT_PARAMS_PRESET if adapter else DEFAULT_PARAMS_PRESET
    return normalization, tuple(params), params_preset


def resolve_query_options(
    preset: str | None,
    score: str | None = None,
    rank_by: str | None = None,
    method: str = "rapidin",
    has_norms: bool = True,
) -> ScoreOptions:
    """Query-time :class:`ScoreOptions` from the flags (``None``: not given).

    The default score, :data:`DEFAULT_SCORE`, falls back to ``dot`` where ``cosine`` is not
    defined: for methods other than ``rapidin`` and ``exact``, and for a ``rapidin`` query of
    an index built before row norms were stored (``has_norms=False``; logged). A ``--score``
    given explicitly is never replaced.

    Raises:
        SettingsError: unknown values, or ``--preset paper`` with a contradicting flag.
    """
    _check_preset(preset)
    if preset == "paper":
        clashes = [
            f"{flag} {value}"
            for flag, value, paper in (
                ("--score", score, PAPER_SCORE),
                ("--rank-by", rank_by, PAPER_RANK_BY),
            )
            if value not in (None, paper)
        ]
        if clashes:
            raise SettingsError(
                f"--preset paper scores by signed inner product; drop {', '.join(clashes)} "
                "or drop --preset paper"
            )
        options = ScoreOptions(PAPER_SCORE, PAPER_RANK_BY)
    else:
        if score is None:
            score = DEFAULT_SCORE
            if score == "cosine" and method not in COSINE_METHODS:
                score = "dot"
            elif score == "cosine" and method == "rapidin" and not has_norms:
                logger.warning(
                    "this index stores no row norms (built by an older version), so the "
                    "default --score cosine falls back to dot; rebuild it for cosine"
                )
                score = "dot"
        options = ScoreOptions(score, rank_by if rank_by is not None else DEFAULT_RANK_BY)
    options.validate()
    return options


def is_paper_gradient(gradient: dict) -> bool:
    """Whether a manifest's ``gradient`` section is the paper's: layer normalisation over
    every trainable tensor (no --params, no --params-preset)."""
    return (
        gradient.get("normalization") == PAPER_NORMALIZATION
        and not gradient.get("params")
        and gradient.get("params_preset") is None
    )


def check_paper_index(manifest: dict, index: str) -> None:
    """Raise :class:`SettingsError` unless the index was built with the paper's gradient
    (what ``query --preset paper`` needs)."""
    gradient = manifest["gradient"]
    if not is_paper_gradient(gradient):
        built = [f"--normalization {gradient.get('normalization')}"]
        if gradient.get("params"):
            built.append(f"--params {' '.join(gradient['params'])}")
        if gradient.get("params_preset") is not None:
            built.append(f"--params-preset {gradient['params_preset']}")
        raise SettingsError(
            f"--preset paper needs an index of layer-normalised gradients over every "
            f"trainable tensor, but {index} was built with {', '.join(built)}; build one "
            "with rapidin-index build --preset paper, or drop --preset paper"
        )


def manifest_section(preset: str | None, gradient: dict, norms: bool) -> dict:
    """The manifest's ``scores`` section: what the stored rows support.

    Args:
        preset: The build's ``--preset`` (None without one).
        gradient: The manifest's ``gradient`` section.
        norms: Whether the rows' exact gradient norms are stored.
    """
    return {
        "preset": preset,
        "paper_gradient": is_paper_gradient(gradient),
        "stored_norms": norms,
        "query_scores": list(SCORES) if norms else ["dot"],
        "rank_by": list(RANK_BY),
    }


# --------------------------------------------------------------------------------------------
# Scoring and ranking helpers
# --------------------------------------------------------------------------------------------


def inverse_norms(norms: np.ndarray) -> np.ndarray:
    """(n,) float64 ``1 / norms``, 0 where a norm is 0 (a zero gradient scores 0)."""
    norms = np.asarray(norms, dtype=np.float64)
    out = np.zeros_like(norms)
    np.divide(1.0, norms, out=out, where=norms > 0)
    return out


def cosine_from_dot(dots: np.ndarray, query_norms: np.ndarray, row_norms: np.ndarray):
    """(m, N) float64 ``dots / (query_norms[:, None] * row_norms[None, :])``, 0 where either
    norm is 0.

    Args:
        dots: (m, N) inner products.
        query_norms: (m,) exact norms of the query gradients.
        row_norms: (N,) exact norms of the training gradients.
    """
    return (
        np.asarray(dots, dtype=np.float64)
        * inverse_norms(query_norms)[:, None]
        * inverse_norms(row_norms)[None, :]
    )


def rank_rows(scores: np.ndarray, k: int, rank_by: str = "signed") -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` rows of a 1-D score array by ``rank_by``; ties go to the lower id.

    Returns:
        ``(ids, scores)``: (k',) int64 and the rows' signed scores (k' = min(k, N)).
    """
    scores = np.asarray(scores)
    key = -np.abs(scores) if rank_by == "abs" else -scores
    order = np.lexsort((np.arange(scores.size), key))[:k]
    return order, scores[order]


def merge_abs(
    top: tuple[np.ndarray, np.ndarray], bottom: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest-magnitude rows from a top-k and a bottom-k list of signed scores.

    The k largest ``|score|`` are always among the k highest and the k lowest scores, so
    the two lists of a scan are enough; ties go to the lower id.

    Args:
        top: ``(ids, scores)`` highest first. bottom: ``(ids, scores)`` lowest first.
        k: List length.

    Returns:
        ``(ids, scores)`` (k',) int64 and float32 signed scores, largest magnitude first.
    """
    ids = np.concatenate([np.asarray(top[0]), np.asarray(bottom[0])]).astype(np.int64)
    values = np.concatenate([np.asarray(top[1]), np.asarray(bottom[1])]).astype(np.float32)
    ids, first = np.unique(ids, return_index=True)
    values = values[first]
    order = np.lexsort((ids, -np.abs(values)))[:k]
    return ids[order], values[order]


def effect(score: float) -> str:
    """``"helpful"`` for a positive score, ``"harmful"`` for a negative one, else
    ``"neutral"``."""
    if score > 0:
        return "helpful"
    if score < 0:
        return "harmful"
    return "neutral"


# --------------------------------------------------------------------------------------------
# Score variants from one pass of per-tensor gradients (evaluation)
# --------------------------------------------------------------------------------------------

# The normalisations compared by the score-variants stage. "layer" is the paper's, "none" raw
# TracIn, "cosine" the layer score divided by both layer-normalised gradients' norms (what
# query --score cosine gives on a layer index), "none-cosine" the cosine similarity of the
# raw gradients (query --score cosine on a --normalization none index).
VARIANT_NORMALIZATIONS = ("layer", "cosine", "none", "none-cosine")
# Parameter subsets: every tensor the pass covers, or a --params-preset's tensors.
VARIANT_PARAMS = ("all", "lora-b", "lora-a")


@dataclass
class PerTensorScores:
    """What one gradient pass keeps: enough to compute every score variant, no gradients.

    Attributes:
        names: (T,) parameter tensor names, in flattening order.
        dots: (m, N, T) float64, ``<g_t, q_t>`` of raw (unnormalised) gradients of training
            example n and query j over tensor t.
        example_norms: (N, T) float64, ``|g_t|`` of each training example.
        query_norms: (m, T) float64, ``|q_t|`` of each query.
    """

    names: list[str]
    dots: np.ndarray
    example_norms: np.ndarray
    query_norms: np.ndarray

    def mask(self, params: str) -> np.ndarray:
        """(T,) bool: the tensors of a :data:`VARIANT_PARAMS` subset (or of a
        --params-preset name)."""
        if params == "all":
            return np.ones(len(self.names), dtype=bool)
        from rapidin_index.model import PARAM_PRESETS

        if params not in PARAM_PRESETS:
            raise SettingsError(
                f"unknown parameter subset {params!r}; choose from {VARIANT_PARAMS}"
            )
        globs = PARAM_PRESETS[params]
        return np.array([any(fnmatch.fnmatchcase(n, g) for g in globs) for n in self.names])

    def rows(self, queries: slice) -> PerTensorScores:
        """The same pass restricted to a slice of its queries (views, no copies)."""
        return PerTensorScores(
            self.names, self.dots[queries], self.example_norms, self.query_norms[queries]
        )

    def names_mask(self, names: Sequence[str]) -> np.ndarray:
        """(T,) bool: the tensors named in ``names`` (e.g. an index manifest's)."""
        wanted = set(names)
        missing = wanted - set(self.names)
        if missing:
            raise SettingsError(f"tensors {sorted(missing)[:3]} are not in the gradient pass")
        return np.array([n in wanted for n in self.names])

    def save(self, path) -> None:
        np.savez(
            path,
            names=np.array(self.names),
            dots=self.dots,
            example_norms=self.example_norms,
            query_norms=self.query_norms,
        )

    @classmethod
    def load(cls, path) -> PerTensorScores:
        with np.load(path) as data:
            return cls(
                [str(n) for n in data["names"]],
                data["dots"],
                data["example_norms"],
                data["query_norms"],
            )


def per_tensor_pass(
    computer,
    query_grads: torch.Tensor,
    examples: Sequence,
    desc: str = "per-tensor gradients",
    batch_size: int | None = None,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
) -> PerTensorScores:
    """One pass of per-example gradients, keeping per-tensor norms and query inner products.

    Args:
        computer: A :class:`~rapidin_index.gradients.GradientComputer` with normalisation
            ``"none"`` (raw gradients).
        query_grads: (m, D) float32 raw flattened gradients of the queries (same tensors).
        examples: The N tokenised training examples.
        desc: Progress bar label.
        batch_size: Examples per gradient pass (default: by the build's memory estimate).
        on_batch: Called as ``on_batch(start, grads)`` with each batch's (B, D) float32 raw
            gradients (rows ``start .. start + B``), for work that wants the same gradients
            without another backward pass (the evaluation's companion indices). It must not
            modify ``grads``.

    Returns:
        :class:`PerTensorScores`; inner products and norms are accumulated in float64.
    """
    from rapidin_index.gradients import choose_batch_size
    from rapidin_index.progress import progress_bar

    if computer.normalization != "none":
        raise ValueError("per_tensor_pass needs raw gradients (normalization 'none')")
    if query_grads.dim() != 2 or query_grads.shape[1] != computer.dim:
        raise ValueError(f"query_grads must be (m, {computer.dim})")
    m, n, t = query_grads.shape[0], len(examples), len(computer.sizes)
    slices = list(zip(computer.offsets[:-1], computer.offsets[1:]))
    query_grads = query_grads.to(computer.device)
    query_norms = np.array(
        [
            [float(torch.linalg.vector_norm(query_grads[j, lo:hi].double())) for lo, hi in slices]
            for j in range(m)
        ]
    ).reshape(m, t)
    dots = np.zeros((m, n, t), dtype=np.float64)
    example_norms = np.zeros((n, t), dtype=np.float64)
    batch = batch_size or choose_batch_size(computer, examples)
    with progress_bar(total=n, desc=desc, unit="ex") as bar:
        for start in range(0, n, batch):
            part = examples[start : start + batch]
            stop = start + len(part)
            grads = computer.gradients(part)
            with torch.no_grad():
                if on_batch is not None:
                    on_batch(start, grads)
                for i, (lo, hi) in enumerate(slices):
                    g = grads[:, lo:hi].double()
                    example_norms[start:stop, i] = torch.linalg.vector_norm(g, dim=1).cpu().numpy()
                    dots[:, start:stop, i] = (query_grads[:, lo:hi].double() @ g.T).cpu().numpy()
            del grads
            bar.update(len(part))
    return PerTensorScores(list(computer.names), dots, example_norms, query_norms)


def variant_norms(norms: np.ndarray, mask: np.ndarray, normalization: str) -> np.ndarray:
    """Exact norms of flattened gradients restricted to ``mask``, after a normalisation.

    Args:
        norms: (..., T) float64 per-tensor raw gradient norms.
        mask: (T,) bool, the tensors kept.
        normalization: ``"layer"`` (each non-zero tensor scaled to norm 1, so the norm is
            the square root of their count) or ``"none"``.

    Returns:
        (...,) float64.
    """
    kept = norms[..., mask]
    if normalization == "layer":
        return np.sqrt((kept > 0).sum(axis=-1).astype(np.float64))
    if normalization == "none":
        return np.sqrt((kept**2).sum(axis=-1))
    raise SettingsError(f"unknown normalization {normalization!r}")


def variant_scores(pts: PerTensorScores, mask: np.ndarray, normalization: str) -> np.ndarray:
    """(m, N) float64 scores of one variant, as sums over the tensors in ``mask``.

    ``layer``: ``sum_t <g_t, q_t> / (|g_t| |q_t|)`` (a zero tensor contributes 0);
    ``none``: ``sum_t <g_t, q_t>``; ``cosine``: the layer score over ``|ĝ| |q̂|``, the norms
    of the layer-normalised gradients restricted to the tensors; ``none-cosine``: the none
    score over the raw gradients' norms. A zero norm gives a zero score.
    """
    if normalization not in VARIANT_NORMALIZATIONS:
        raise SettingsError(
            f"unknown score variant {normalization!r}; choose from {VARIANT_NORMALIZATIONS}"
        )
    dots = pts.dots[:, :, mask]
    if normalization in ("none", "none-cosine"):
        scores = dots.sum(axis=-1)
        if normalization == "none":
            return scores
        return cosine_from_dot(
            scores,
            variant_norms(pts.query_norms, mask, "none"),
            variant_norms(pts.example_norms, mask, "none"),
        )
    inv_g = inverse_norms(pts.example_norms[:, mask])  # (N, S)
    inv_q = inverse_norms(pts.query_norms[:, mask])  # (m, S)
    scores = np.einsum("mns,ns,ms->mn", dots, inv_g, inv_q)
    if normalization == "layer":
        return scores
    return cosine_from_dot(
        scores,
        variant_norms(pts.query_norms, mask, "layer"),
        variant_norms(pts.example_norms, mask, "layer"),
    )
