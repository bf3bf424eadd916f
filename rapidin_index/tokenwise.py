"""Token-wise influence (paper Eqs. 6-8): which tokens carry a training example's influence.

Notation. A training example ``s`` has labelled (response + EOS) tokens ``i = 1..G_s``, a
generation ``t`` has tokens ``j = 1..G_t``. ``l_i(θ)`` is the cross-entropy term of token ``i``
alone (token ``i`` predicted from the tokens before it). An example's loss is the *mean* of its
terms, ``L_s = (1/G_s) Σ_i l_i``, so its raw gradient for parameter tensor ``p`` is
``g_{s,p} = (1/G_s) Σ_i ∇_p l_i``. Layer-wise normalisation multiplies each tensor's gradient by
``a_p = 1/||g_{s,p}||`` (training example) or ``b_p = 1/||g_{t,p}||`` (generation); see
:meth:`GradientComputer.layer_scales` (all factors are 1 with ``normalization="none"``).

The sentence score (Eq. 5, what the index approximates; the constant ``eη`` is dropped) is::

    I(t, s) = <ĝ_s, ĝ_t> = Σ_p a_p b_p <g_{s,p}, g_{t,p}>

A token's gradient is scaled, layer by layer, by *its example's* factor (the factor of the
example's full gradient, not of the token's own gradient), which makes the token scores an exact
decomposition of the sentence score::

    I(t, s^i)   = Σ_p a_p b_p <∇_p l_i,   g_{t,p}>     (Eq. 6)
    I(t^j, s)   = Σ_p a_p b_p <g_{s,p},   ∇_p l^t_j>   (Eq. 7)
    I(t^j, s^i) = Σ_p a_p b_p <∇_p l^t_j, ∇_p l_i>     (Eq. 8)

    mean_i I(t, s^i) = mean_j I(t^j, s) = mean_{i,j} I(t^j, s^i) = I(t, s)   (by linearity)

How Eq. 6 is computed for all tokens at once: ``I(t, s^i) = <∇_θ l_i, v>`` with one fixed
direction ``v_p = a_p b_p g_{t,p} = a_p ĝ_{t,p}``, i.e. the directional derivative of ``l_i``
along ``v``. One forward-mode pass (a JVP) of the whole vector ``(l_1, ..., l_{G_s})`` along
``v`` returns every ``<∇ l_i, v>``, for about the cost of two or three forward passes instead
of ``G_s`` backward passes. (Per-token gradients of a linear layer are sums over positions of
outer products of activations and *per-loss-term* output gradients, so there is no cheap
reverse-mode contraction: reverse mode needs one backward per loss term, or a batched one.)
Eq. 7 is the same computation with the roles swapped (the generation's token losses along
``b_p a_p g_{s,p}``). Eq. 8 needs per-token gradients on one side: one backward per token of the
shorter side, each followed by one JVP of the other side's token losses.

``--target-text`` (RapidIn^TW, Eq. 7 for a span ``J`` of generation tokens): the generation's
loss becomes the mean over the tokens of every occurrence of the text,
``g_{t,p} = (1/|J|) Σ_{j∈J} ∇_p l^t_j``, and ``b_p`` are the factors of that gradient. Its
RapidGrad is what retrieval scans the whole index with; the token scores above then use the
same ``g_t`` and ``b_p``, so ``mean_{j∈J} I(t^j, s)`` is the restricted sentence score.

Methods: ``"jvp"`` (forward mode, exact); ``"double-backward"`` (exact too: ``J v`` as the
gradient w.r.t. ``u`` of ``<J^T u, v>``, for models whose kernels have no forward-mode
formulas, e.g. 4-bit layers); ``"loop"`` (one backward per token, the naive reference);
``"auto"`` tries them in that order. Attention is run with the composite "math" SDPA kernel so
that forward mode works. Precision: each score is a sum over all D gradient coordinates in
fp32. On the full 135M-parameter model, the mean of the Eq. 6 scores matched a float64 inner
product of the full gradients to about 1e-5 relative. A single fp32 dot product of the two
flattened gradients was off by about 1e-3.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from rapidin_index.data import (
    IGNORE_INDEX,
    Record,
    TokenizedExample,
    format_prompt,
    tokenize_records,
)
from rapidin_index.errors import DataError, SettingsError
from rapidin_index.gradients import GradientComputer

if TYPE_CHECKING:  # pragma: no cover - typing only; query imports this module lazily
    from rapidin_index.query import Attributor, QueryResult

logger = logging.getLogger(__name__)

METHODS = ("auto", "jvp", "double-backward", "loop")
_FALLBACK = ("jvp", "double-backward", "loop")


def _math_attention():
    """Run SDPA with its composite kernel: the fused CPU/CUDA kernels have no forward-mode AD."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def loss_positions(example: TokenizedExample) -> list[int]:
    """Indices into ``input_ids`` of the tokens that have their own loss term, in order."""
    return [t for t in range(1, len(example.labels)) if example.labels[t] != IGNORE_INDEX]


def restrict_labels(example: TokenizedExample, positions: Sequence[int]) -> TokenizedExample:
    """A copy whose loss covers only the tokens at ``positions`` (others get IGNORE_INDEX)."""
    keep = set(positions)
    labels = [lab if t in keep else IGNORE_INDEX for t, lab in enumerate(example.labels)]
    return replace(example, labels=labels)


@dataclass(frozen=True)
class ExampleGradient:
    """One side of a token-wise score.

    Attributes:
        example: Whose labelled tokens are the per-token loss terms ``l_i`` of this side.
        grads: Raw fp32 gradients of the (mean) loss, one tensor per selected parameter,
            shaped like the parameter.
        scales: The layer-wise factors of ``grads`` (``a_p`` or ``b_p``), one per parameter.
    """

    example: TokenizedExample
    grads: list[torch.Tensor]
    scales: list[float]

    @property
    def positions(self) -> list[int]:
        return loss_positions(self.example)


class TokenwiseScorer:
    """Per-token influence scores from uncompressed gradients (no sketch error).

    Args:
        computer: The index's gradient computer (model, selected parameters, normalisation).
        method: One of :data:`METHODS`.
    """

    def __init__(self, computer: GradientComputer, method: str = "auto") -> None:
        if method not in METHODS:
            raise SettingsError(f"unknown token-wise method {method!r}; choose from {METHODS}")
        self.computer = computer
        self.model = computer.model
        self.method = method
        self._order = list(_FALLBACK) if method == "auto" else [method]

    @property
    def resolved_method(self) -> str:
        """The method that is used now (after any ``auto`` fallback)."""
        return self._order[0]

    def prepare(self, example: TokenizedExample) -> ExampleGradient:
        """Raw mean-loss gradient and its layer scales (one backward pass)."""
        grads = self.computer.parameter_gradients(example)
        return ExampleGradient(example, grads, self.computer.layer_scales(grads))

    # -- per-token loss terms -----------------------------------------------------------------

    def _inputs(self, example: TokenizedExample):
        device = next(self.model.parameters()).device
        positions = loss_positions(example)
        if not positions:
            raise DataError("an example has no response tokens left to score; raise --max-length")
        ids = torch.tensor([example.input_ids], device=device)
        rows = torch.tensor([t - 1 for t in positions], device=device)
        targets = torch.tensor([example.input_ids[t] for t in positions], device=device)
        return ids, rows, targets

    @staticmethod
    def _terms(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as gradients.example_loss (fp32 logits, logits[t-1] predicts token t),
        # so the mean of these terms is exactly the example's loss.
        return torch.nn.functional.cross_entropy(logits[0, rows].float(), targets, reduction="none")

    def token_losses(self, example: TokenizedExample) -> torch.Tensor:
        """(G,) float32 per-token loss terms ``l_i``, with autograd graph, in position order."""
        self.computer.activate()
        ids, rows, targets = self._inputs(example)
        return self._terms(self.model(input_ids=ids).logits, rows, targets)

    # -- J v: <∇ l_i, v> for every loss term i -------------------------------------------------

    def directional(
        self, example: TokenizedExample, tangents: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """(G,) float32 ``<∇_θ l_i, v>`` for every loss term of ``example``.

        Args:
            example: Whose loss terms are differentiated.
            tangents: ``v``, one tensor per selected parameter, shaped like it.
        """
        while True:
            method = self._order[0]
            try:
                return getattr(self, "_" + method.replace("-", "_"))(example, tangents)
            except (NotImplementedError, RuntimeError) as err:
                if len(self._order) == 1:
                    raise
                logger.warning(
                    "token-wise method %s failed (%s); falling back to %s",
                    method,
                    str(err).splitlines()[0][:200],
                    self._order[1],
                )
                self._order.pop(0)

    def _jvp(self, example, tangents) -> torch.Tensor:
        import torch.autograd.forward_ad as fwad

        ids, rows, targets = self._inputs(example)
        # no_grad: forward mode needs no reverse graph, which would only cost memory. Dual
        # tensors swapped in with functional_call (which keeps tied weights tied) cost less
        # per call than torch.func.jvp's transform machinery, and compute the same thing.
        with torch.no_grad(), _math_attention(), fwad.dual_level():
            duals = {
                name: fwad.make_dual(p.detach(), v.to(p.dtype))
                for name, p, v in zip(
                    self.computer.names, self.computer.params, tangents, strict=True
                )
            }
            out = torch.func.functional_call(self.model, duals, (), {"input_ids": ids})
            dots = fwad.unpack_dual(self._terms(out.logits, rows, targets)).tangent
        if dots is None:  # no selected parameter reaches the loss
            return torch.zeros(len(rows), dtype=torch.float32)
        return dots.float()

    def _double_backward(self, example, tangents) -> torch.Tensor:
        with _math_attention():
            terms = self.token_losses(example)
            # g(u) = J^T u is linear in u, so d<g(u), v>/du = J v exactly, at any u.
            u = torch.zeros_like(terms, requires_grad=True)
            grads = torch.autograd.grad(
                terms, self.computer.params, grad_outputs=u, create_graph=True, allow_unused=True
            )
            dot = sum(
                (g.float() * v.float()).sum()
                for g, v in zip(grads, tangents, strict=True)
                if g is not None
            )
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                return torch.zeros_like(terms).detach()
            (jv,) = torch.autograd.grad(dot, u)
        return jv.float()

    def _loop(self, example, tangents) -> torch.Tensor:
        terms = self.token_losses(example)
        out = torch.empty(terms.shape[0], dtype=torch.float32)
        for i in range(terms.shape[0]):
            grads = torch.autograd.grad(
                terms[i], self.computer.params, retain_graph=True, allow_unused=True
            )
            out[i] = sum(
                float((g.float() * v.float()).sum())
                for g, v in zip(grads, tangents, strict=True)
                if g is not None
            )
        return out

    # -- Eqs. 6-8 -----------------------------------------------------------------------------

    def token_influence(self, of: ExampleGradient, against: ExampleGradient) -> torch.Tensor:
        """(G_of,) float32: influence of each loss term of ``of`` on ``against`` as a whole.

        With ``of`` a training example and ``against`` the generation this is Eq. 6; swapped,
        Eq. 7. The direction is ``v_p = of.scales[p] * against.scales[p] * against.grads[p]``,
        and the mean of the result is the sentence score ``<ĝ_of, ĝ_against>``.
        """
        tangents = [
            g * (sa * sb)
            for g, sa, sb in zip(against.grads, of.scales, against.scales, strict=True)
        ]
        return self.directional(of.example, tangents)

    def pairwise(self, rows: ExampleGradient, cols: ExampleGradient) -> torch.Tensor:
        """(G_rows, G_cols) float32 token x token scores (Eq. 8); symmetric in its roles.

        One backward per loss term of the shorter side gives that token's gradient, and one
        directional derivative of the other side's loss terms along it gives a whole row.
        """
        swap = len(rows.positions) > len(cols.positions)
        short, other = (cols, rows) if swap else (rows, cols)
        terms = self.token_losses(short.example)
        out = []
        for i in range(terms.shape[0]):
            grads = torch.autograd.grad(
                terms[i], self.computer.params, retain_graph=True, allow_unused=True
            )
            tangents = [
                torch.zeros(shape, dtype=torch.float32, device=p.device)
                if g is None
                else g.float() * (sa * sb)
                for g, shape, p, sa, sb in zip(
                    grads,
                    self.computer.shapes,
                    self.computer.params,
                    short.scales,
                    other.scales,
                    strict=True,
                )
            ]
            out.append(self.directional(other.example, tangents))
        matrix = torch.stack(out)
        return matrix.T.contiguous() if swap else matrix


# --------------------------------------------------------------------------------------------
# Tokens as text pieces
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenPiece:
    """One token as a piece of an original string.

    Attributes:
        text: ``source[start:end]`` of the string named by ``field`` (for ``field == "eos"``,
            the EOS token's spelling and ``start == end == 0``).
        start, end: Character offsets into that string (pieces of two tokens may overlap when a
            token boundary falls inside one character, e.g. byte-level BPE on an emoji).
        field: ``"instruction"``, ``"input"``, ``"output"``, ``"generation"`` or ``"eos"``.
        position: Index of the token in the example's ``input_ids``.
        score: Its token-wise influence, or None where it has no loss term (prompt tokens).
        target: Part of ``--target-text`` (generation tokens only).
    """

    text: str
    start: int
    end: int
    field: str
    position: int
    score: float | None = None
    target: bool = False

    def to_json(self, with_target: bool = False) -> dict:
        out = {
            "text": self.text,
            "start": self.start,
            "end": self.end,
            "field": self.field,
            "score": self.score,
        }
        if with_target:
            out["target"] = self.target
        return out


def _offsets(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list]:
    """Token ids of ``text`` and each token's (start, end) character offsets in it."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Slow tokenizers have no offsets: recover them from growing decoded prefixes, which is
    # exact whenever decoding gives back the text (the common case).
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []))
    offsets, end = [], 0
    for k in range(len(ids)):
        if ids[k] in special:
            offsets.append((end, end))
            continue
        prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        new_end = len(prefix) if text.startswith(prefix) else end
        offsets.append((end, max(end, new_end)))
        end = max(end, new_end)
    return ids, offsets


def _response_pieces(
    tokenizer, response: str, example: TokenizedExample, field: str
) -> list[TokenPiece]:
    """Pieces of the response tokens (and the EOS when kept) of ``example``."""
    ids, offsets = _offsets(tokenizer, response, add_special_tokens=False)
    kept = example.input_ids[example.prompt_len :]
    if kept[: len(ids)] != ids[: len(kept)]:
        raise DataError("the response re-tokenised differently; cannot map tokens to text")
    pieces = []
    for k, tid in enumerate(kept):
        position = example.prompt_len + k
        if k < len(ids):
            start, end = offsets[k]
            pieces.append(TokenPiece(response[start:end], start, end, field, position))
        elif tid == tokenizer.eos_token_id:
            pieces.append(TokenPiece(str(tokenizer.eos_token), 0, 0, "eos", position))
    return pieces


_SENTINEL = "\x00rapidin-field\x00"


def _instruction_offset(prompt: str, merged: str, tokenizer, template: str) -> int | None:
    """Where the (merged) instruction starts inside the formatted prompt, or None."""
    # Format a sentinel with the same template: the text before it is the template's prefix,
    # which also works for chat templates whose prefix contains arbitrary text.
    shaped = format_prompt(_SENTINEL, tokenizer, template)
    at = shaped.find(_SENTINEL)
    if at >= 0 and prompt.startswith(shaped[:at]) and prompt[at:].startswith(merged):
        return at
    found = prompt.rfind(merged)
    return found if found >= 0 else None


def _prompt_pieces(
    tokenizer, template: str, record: Record, example: TokenizedExample
) -> list[TokenPiece]:
    prompt = format_prompt(record.merged_instruction, tokenizer, template)
    ids, offsets = _offsets(tokenizer, prompt, add_special_tokens=template != "chat")
    n = example.prompt_len
    if ids[len(ids) - n :] != example.input_ids[:n]:
        raise DataError("the prompt re-tokenised differently; cannot map tokens to text")
    at = _instruction_offset(prompt, record.merged_instruction, tokenizer, template)
    if at is None:
        return []
    fields = [("instruction", at, record.instruction)]
    if record.input:
        fields.append(("input", at + len(record.instruction) + 1, record.input))
    pieces = []
    for position, (a, b) in enumerate(offsets[len(ids) - n :]):
        best = None
        for name, begin, text in fields:
            lo, hi = max(a, begin), min(b, begin + len(text))
            if hi > lo and (best is None or hi - lo > best[0]):
                best = (hi - lo, name, lo - begin, hi - begin, text)
        if best is not None:
            _, name, lo, hi, text = best
            pieces.append(TokenPiece(text[lo:hi], lo, hi, name, position))
    return pieces


def example_pieces(
    tokenizer, template: str, record: Record, example: TokenizedExample
) -> list[TokenPiece]:
    """Pieces of a training example: instruction and input tokens, then output and EOS."""
    return _prompt_pieces(tokenizer, template, record, example) + _response_pieces(
        tokenizer, record.output, example, "output"
    )


def generation_pieces(tokenizer, generation: str, example: TokenizedExample) -> list[TokenPiece]:
    """Pieces of a generation's tokens (and its EOS), offsets into ``generation``."""
    return _response_pieces(tokenizer, generation, example, "generation")


def with_scores(
    pieces: Sequence[TokenPiece], positions: Sequence[int], scores: Sequence[float]
) -> list[TokenPiece]:
    by_position = dict(zip(positions, scores, strict=True))
    return [
        replace(p, score=float(by_position[p.position])) if p.position in by_position else p
        for p in pieces
    ]


# --------------------------------------------------------------------------------------------
# --target-text (RapidIn^TW, Eq. 7 for a span)
# --------------------------------------------------------------------------------------------


def find_target(generation: str, target_text: str) -> list[tuple[int, int]]:
    """Character spans of every non-overlapping occurrence of ``target_text`` (case-sensitive).

    Raises:
        DataError: empty target, or a target that does not occur in the generation.
    """
    if not target_text or not target_text.strip():
        raise DataError("--target-text is empty")
    spans, at = [], generation.find(target_text)
    while at >= 0:
        spans.append((at, at + len(target_text)))
        at = generation.find(target_text, at + len(target_text))
    if not spans:
        shown = generation if len(generation) <= 200 else generation[:199] + "…"
        raise DataError(
            f"--target-text {target_text!r} does not occur in the generation "
            f"(matching is case-sensitive): {shown!r}"
        )
    return spans


def mark_target(pieces: Sequence[TokenPiece], spans: Sequence[tuple[int, int]]) -> list[TokenPiece]:
    """Flags generation pieces that overlap any target span."""
    return [
        replace(p, target=True)
        if p.field == "generation" and any(p.start < e and s < p.end for s, e in spans)
        else p
        for p in pieces
    ]


def restrict_to_target(
    tokenizer, example: TokenizedExample, generation: str, target_text: str
) -> TokenizedExample:
    """The generation example with its loss restricted to the tokens of ``target_text``.

    All occurrences count: the restricted loss is the mean over the tokens of every
    occurrence, so each occurrence weighs in proportion to its token count.
    """
    spans = find_target(generation, target_text)
    pieces = mark_target(generation_pieces(tokenizer, generation, example), spans)
    positions = [p.position for p in pieces if p.target]
    if not positions:
        raise DataError(
            f"--target-text {target_text!r} lies beyond the tokens kept for the "
            "generation; raise the index's --max-length"
        )
    return restrict_labels(example, positions)


# --------------------------------------------------------------------------------------------
# Annotating query results
# --------------------------------------------------------------------------------------------


def annotate(
    attributor: Attributor,
    results: Sequence[QueryResult],
    top: int = 3,
    target_text: str | None = None,
    pairwise: bool = False,
    method: str = "auto",
) -> None:
    """Adds token-wise scores to query results, in place.

    Each of the first ``top`` results gains ``tokens`` (Eq. 6 on output/EOS tokens, None on
    instruction/input tokens), ``generation_scores`` (Eq. 7 per generation token, aligned with
    ``generation_tokens``) and ``exact_score`` (the uncompressed sentence score, the mean of the
    Eq. 6 scores). Each result's ``tokenwise`` gains ``generation_tokens``, ``target`` (with
    ``target_text``) and ``pairwise`` (Eq. 8 for the top-1 result, with ``pairwise``).
    """
    from rapidin_index.query import QueryInput

    if top < 0:
        raise SettingsError(f"--token-topk must be at least 0, got {top}")
    scorer = TokenwiseScorer(attributor.computer, method)
    tokenizer = attributor.tokenizer
    records = attributor.records()
    began = time.perf_counter()
    for result in results:
        query = QueryInput(result.prompt, result.generation, target_text)
        full = attributor.tokenize(query)
        gen_pieces = generation_pieces(tokenizer, result.generation, full)
        extra: dict = {}
        if target_text is not None:
            spans = find_target(result.generation, target_text)
            gen_pieces = mark_target(gen_pieces, spans)
            extra["target"] = {"text": target_text, "spans": [list(s) for s in spans]}
        # The generation side: gradient (and scales) of the possibly restricted loss, loss
        # terms of every generation token so that Eq. 7 covers the whole generation.
        gen = replace(scorer.prepare(attributor.query_example(query)), example=full)
        gen_positions = gen.positions
        rows = result.results[: max(top, 1 if pairwise else 0)]
        for rank, row in enumerate(rows, start=1):
            record = records[row["id"]]
            example = tokenize_records(
                [record], tokenizer, attributor.template, attributor.max_length
            )[0]
            train = scorer.prepare(example)
            pieces = example_pieces(tokenizer, attributor.template, record, example)
            if rank <= top:
                eq6 = scorer.token_influence(train, gen).tolist()
                eq7 = scorer.token_influence(gen, train).tolist()
                row["tokens"] = [p.to_json() for p in with_scores(pieces, train.positions, eq6)]
                row["generation_scores"] = [float(x) for x in eq7]
                row["exact_score"] = float(sum(eq6) / len(eq6))
            if pairwise and rank == 1:
                matrix = scorer.pairwise(gen, train)
                train_scored = [p for p in pieces if p.position in set(train.positions)]
                extra["pairwise"] = {
                    "rank": 1,
                    "id": row["id"],
                    "generation_tokens": [
                        p.to_json(with_target=True)
                        for p in gen_pieces
                        if p.position in set(gen_positions)
                    ],
                    "train_tokens": [p.to_json() for p in train_scored],
                    "matrix": matrix.tolist(),
                }
        extra["generation_tokens"] = [p.to_json(with_target=True) for p in gen_pieces]
        result.tokenwise = extra
    logger.info(
        "token-wise scores (%s) in %.2f s", scorer.resolved_method, time.perf_counter() - began
    )
