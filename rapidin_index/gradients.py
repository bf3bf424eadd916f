"""Per-example loss gradients, layer-wise normalised and flattened (paper Sections 2 and 3.2).

Convention used throughout: the flattened gradient of an example is the concatenation, in
``named_parameters()`` order of the selected parameters, of each parameter's gradient in
row-major order. With ``normalization="layer"`` every parameter tensor's gradient is first
scaled to unit L2 norm (in fp32); an all-zero gradient stays zero.

Batched per-example gradients (:meth:`GradientComputer.gradients`). Several examples share
one forward and one backward pass, and each still gets exactly the gradient a batch of one
gives (up to float rounding):

* the loss is the *sum* of the per-example losses, each the mean over that example's own
  labelled tokens, so the gradient of the sum w.r.t. anything an example touches alone is
  that example's gradient;
* examples never see each other: by default they are packed end to end into a few rows
  whose position ids restart at every example, and the model's packed-sequence attention
  mask keeps every example to itself (``batching="packed"``); or each example gets its own
  right-padded row with an attention mask (``batching="padded"``). Padding comes after an
  example's tokens, so causal attention never lets it reach them;
* the backward pass is taken w.r.t. the *outputs* of the modules that own the selected
  parameters, not the parameters: autograd then sums nothing over the batch. For an
  ``nn.Linear`` (LoRA's ``lora_A`` / ``lora_B`` are ones) the weight gradient of example i
  is ``sum_t dY[i, t]^T X[i, t]`` over its own tokens, from the input captured by a forward
  hook; for an ``nn.Embedding`` it is a scatter-add of ``dY`` over its token ids; for any
  other module (norms, ...) its forward is re-run on each example's slice of the captured
  input and differentiated w.r.t. its own parameters. A parameter used by several modules
  (tied embeddings) gets the sum of their contributions.

Because the result must equal the batch of one, the first batch is checked against
:meth:`GradientComputer.gradient` on the example most exposed to its neighbours; a model
whose attention ignores packed position ids (or anything else the batched path cannot split
by example) is logged and handled with the next layout: packed, padded, then one example at
a time.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from rapidin_index.data import IGNORE_INDEX, TokenizedExample
from rapidin_index.errors import DataError, SettingsError

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("layer", "none")
BATCHING = ("packed", "padded", "loop")

# Largest batch the automatic choice picks: on a CPU the dense layers are already near peak
# FLOP/s at a few hundred tokens, so more examples only add memory and latency.
MAX_AUTO_BATCH_CPU = 16
MAX_AUTO_BATCH_GPU = 64
# Relative error per parameter tensor above which a batched gradient is declared wrong by
# the one-off check; float reordering gives ~1e-6, a leak between examples gives ~1.
_CHECK_RTOL = 1e-3


@dataclass(frozen=True)
class GradientSettings:
    """Which gradient is taken and how it is normalised; written to the manifest.

    Attributes:
        params: Shell globs over parameter names (``--params``); empty = all trainable.
        normalization: ``"layer"`` (the paper's layer-wise L2 normalisation) or ``"none"``.
        params_preset: A ``--params-preset`` (``lora-a``, ``lora-b``, ``last-layers:N``;
            see :func:`rapidin_index.model.expand_params_preset`) or None; ``params``
            narrows it further.
    """

    params: tuple[str, ...] = ()
    normalization: str = "layer"
    params_preset: str | None = None

    def validate(self) -> None:
        from rapidin_index.model import check_params_preset

        if self.normalization not in NORMALIZATIONS:
            raise SettingsError(
                f"unknown --normalization {self.normalization!r}; choose from {NORMALIZATIONS}"
            )
        check_params_preset(self.params_preset)


def _no_labels_error() -> DataError:
    return DataError(
        "an example has no response tokens left to take a loss over; raise --max-length"
    )


def example_loss(model: torch.nn.Module, example: TokenizedExample) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response + EOS) tokens.

    Token t's logits predict token t + 1, so logits[:-1] are scored against labels[1:].
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([example.input_ids], device=device)
    labels = torch.tensor(example.labels[1:], device=device)
    if not bool((labels != IGNORE_INDEX).any()):
        raise _no_labels_error()
    logits = model(input_ids=input_ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


class _Unsplittable(RuntimeError):
    """The batched path cannot attribute a captured tensor to examples (internal)."""


@dataclass
class _TokenMap:
    """Where each example's tokens sit along dim 1 of a captured (R, N, ...) tensor.

    Attributes:
        spans: ``(row, start, stop)`` of every example, in input order.
        index: (B, T) int64 into the flattened (R * N) tokens, example by example and padded
            to the longest; None when row i is example i, starting at position 0.
        mask: (B, T, 1) float32, 1 on an example's own tokens and 0 on the padding.
    """

    spans: list[tuple[int, int, int]]
    index: torch.Tensor | None
    mask: torch.Tensor

    def per_example(self, tensor: torch.Tensor, masked: bool = False) -> torch.Tensor:
        """(B, T, ...) view or copy of ``tensor``: example i's tokens in row i."""
        if self.index is not None:
            tensor = tensor.reshape(-1, *tensor.shape[2:])[self.index]
        elif tensor.shape[1] > self.mask.shape[1]:
            tensor = tensor[:, : self.mask.shape[1]]
        if masked:
            mask = self.mask.to(tensor.dtype)
            tensor = tensor * mask.view(*mask.shape[:2], *([1] * (tensor.dim() - 2)))
        return tensor


def _token_map(
    spans: list[tuple[int, int, int]], rows: int, length: int, device: torch.device
) -> _TokenMap:
    longest = max(t - s for _, s, t in spans)
    mask = torch.zeros(len(spans), longest, 1, dtype=torch.float32)
    for i, (_, s, t) in enumerate(spans):
        mask[i, : t - s] = 1.0
    index = None
    if not all(r == i and s == 0 for i, (r, s, _) in enumerate(spans)) or rows != len(spans):
        # Padding slots point at token 0 of the batch: finite values that the zero mask of
        # the output gradient removes from every product.
        index = torch.zeros(len(spans), longest, dtype=torch.int64)
        for i, (r, s, t) in enumerate(spans):
            index[i, : t - s] = torch.arange(r * length + s, r * length + t)
        index = index.to(device)
    return _TokenMap(spans, index, mask.to(device))


@dataclass
class _Layout:
    """Examples laid out as ``(rows, length)`` tokens for one forward pass.

    Attributes:
        input_ids: (R, L) int64.
        position_ids: (R, L) int64 restarting at 0 for every example (packed), or None.
        attention_mask: (R, L) int64, 1 on real tokens (padded), or None.
        keep: (P,) int64 sorted positions whose logits are needed (the ones predicting a
            labelled token in some row), or None for all L positions.
        targets: (R, P) int64 next-token labels at the kept positions, IGNORE_INDEX elsewhere.
        weights: (R, P) float32, 1 / (labelled tokens of the example) at labelled positions.
        tokens: example positions along a dim of length L.
        kept: example positions along a dim of length P (the kept logits' positions).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    keep: torch.Tensor | None
    targets: torch.Tensor
    weights: torch.Tensor
    tokens: _TokenMap
    kept: _TokenMap

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def spans(self) -> list[tuple[int, int, int]]:
        return self.tokens.spans

    def map_for(self, tensor: torch.Tensor) -> _TokenMap:
        """The example positions along dim 1 of a captured (R, L | P, ...) tensor."""
        if tensor.dim() < 2 or tensor.shape[0] != self.rows:
            raise _Unsplittable(f"a tensor of shape {tuple(tensor.shape)} has no batch dim")
        if tensor.shape[1] == self.length:
            return self.tokens
        if self.keep is not None and tensor.shape[1] == self.keep.numel():
            return self.kept
        raise _Unsplittable(f"a tensor of shape {tuple(tensor.shape)} has no token dim")


def _labelled_positions(example: TokenizedExample) -> list[int]:
    """Positions p whose logits predict a labelled token (labels[p + 1] is not ignored)."""
    labels = example.labels
    return [p for p in range(len(labels) - 1) if labels[p + 1] != IGNORE_INDEX]


def _assign_rows(lengths: Sequence[int], rows: int) -> list[list[int]]:
    """Longest-first greedy assignment of examples to ``rows`` rows (balanced lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    filled = [0] * rows
    members: list[list[int]] = [[] for _ in range(rows)]
    for i in order:
        r = min(range(rows), key=lambda j: (filled[j], j))
        members[r].append(i)
        filled[r] += lengths[i]
    return [sorted(m) for m in members if m]


def _packed_rows(lengths: Sequence[int], attention_cost: float) -> list[list[int]]:
    """Pick how many packed rows to use: fewer rows waste less padding but make attention
    (one L x L masked product per row) longer. Minimises R * L * (1 + attention_cost * L).
    """
    best, best_cost = None, float("inf")
    for rows in range(1, len(lengths) + 1):
        members = _assign_rows(lengths, rows)
        length = max(sum(lengths[i] for i in m) for m in members)
        cost = len(members) * length * (1.0 + attention_cost * length)
        if cost < best_cost:
            best, best_cost = members, cost
    return best


def _make_layout(
    examples: Sequence[TokenizedExample],
    mode: str,
    device: torch.device,
    keep_logits: bool,
    attention_cost: float,
    pad_id: int,
) -> _Layout:
    lengths = [len(e.input_ids) for e in examples]
    predicting = [_labelled_positions(e) for e in examples]
    if any(not p for p in predicting):
        raise _no_labels_error()
    if mode == "packed":
        members = _packed_rows(lengths, attention_cost)
    else:
        members = [[i] for i in range(len(examples))]
    length = max(sum(lengths[i] for i in m) for m in members)
    n_rows = len(members)
    ids = torch.full((n_rows, length), pad_id, dtype=torch.int64)
    positions = torch.zeros((n_rows, length), dtype=torch.int64)
    mask = torch.zeros((n_rows, length), dtype=torch.int64)
    targets = torch.full((n_rows, length), IGNORE_INDEX, dtype=torch.int64)
    weights = torch.zeros((n_rows, length), dtype=torch.float32)
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(examples)
    for r, member in enumerate(members):
        start = 0
        for i in member:
            e, n = examples[i], lengths[i]
            ids[r, start : start + n] = torch.tensor(e.input_ids)
            positions[r, start : start + n] = torch.arange(n)
            mask[r, start : start + n] = 1
            p = torch.tensor(predicting[i]) + start
            targets[r, p] = torch.tensor(e.labels)[p - start + 1]
            weights[r, p] = 1.0 / len(predicting[i])
            spans[i] = (r, start, start + n)
            start += n
        # The tail of a packed row is one more "sequence" (positions from 0), so the packed
        # mask keeps it away from the examples without any attention mask.
        positions[r, start:] = torch.arange(length - start)
    tokens = _token_map(spans, n_rows, length, device)
    keep, kept = None, tokens
    if keep_logits:
        keep = torch.nonzero((targets != IGNORE_INDEX).any(dim=0)).flatten()
        targets, weights = targets[:, keep], weights[:, keep]
        kept_spans = [
            (r, int(torch.searchsorted(keep, s)), int(torch.searchsorted(keep, t)))
            for r, s, t in spans
        ]
        kept = _token_map(kept_spans, n_rows, keep.numel(), device)
        keep = keep.to(device)
    return _Layout(
        input_ids=ids.to(device),
        position_ids=positions.to(device) if mode == "packed" else None,
        attention_mask=mask.to(device) if mode == "padded" else None,
        keep=keep,
        targets=targets.to(device),
        weights=weights.to(device),
        tokens=tokens,
        kept=kept,
    )


def _detach_tree(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach_tree(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach_tree(v) for k, v in value.items()}
    return value


def _example_slice(value, layout: _Layout, index: int):
    """Example ``index``'s part of every (R, L | P, ...) tensor in ``value``."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == layout.rows:
            r, start, stop = layout.map_for(value).spans[index]
            return value[r : r + 1, start:stop]
        if value.dim() >= 1 and value.shape[0] == layout.rows and layout.rows > 1:
            raise _Unsplittable(f"cannot split a tensor of shape {tuple(value.shape)}")
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_example_slice(v, layout, index) for v in value)
    if isinstance(value, dict):
        return {k: _example_slice(v, layout, index) for k, v in value.items()}
    return value


@dataclass
class _Owner:
    """A module that owns selected parameters directly: ``(attribute, slot)`` pairs."""

    module: torch.nn.Module
    kind: str  # "linear", "embedding" or "generic"
    slots: list[tuple[str, int]]


def _module_kind(module: torch.nn.Module) -> str:
    # Subclasses that override forward (bitsandbytes' Linear4bit, ...) are not plain linears.
    if isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward:
        return "linear"
    if (
        isinstance(module, torch.nn.Embedding)
        and type(module).forward is torch.nn.Embedding.forward
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    ):
        return "embedding"
    return "generic"


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class GradientComputer:
    """Computes flattened per-example gradients of the selected parameters.

    Args:
        model: The causal LM.
        named_params: ``(name, parameter)`` pairs from :func:`model.select_parameters`.
            Other parameters are frozen so the backward pass skips their weight gradients.
        normalization: One of :data:`NORMALIZATIONS`.
        batching: How :meth:`gradients` batches examples, one of :data:`BATCHING`:
            ``"packed"`` (default), ``"padded"`` or ``"loop"`` (one at a time). A layout
            that fails its one-off check falls back to the next one.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        normalization: str = "layer",
        batching: str = "packed",
    ) -> None:
        GradientSettings(normalization=normalization).validate()
        if batching not in BATCHING:
            raise SettingsError(f"unknown batching {batching!r}; choose from {BATCHING}")
        self.model = model
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.dim = sum(self.sizes)
        self.normalization = normalization
        self.batching = batching
        self.verified = False
        self.check_error: float | None = None
        self.activate()
        self._owners = self._find_owners()
        self._keep_logits = _accepts_logits_to_keep(model)
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None) or 1024
        # Masked attention costs ~2 * hidden flops per (query, key) pair and layer, a dense
        # llama layer ~12 * hidden**2 per token; the masked kernel runs at about half the
        # speed of a dense matmul. Used only to choose how many rows to pack into.
        self._attention_cost = 1.0 / (3.0 * hidden)
        self._pad_id = int(getattr(config, "pad_token_id", None) or 0)

    def activate(self) -> None:
        """Make exactly this computer's parameters require gradients.

        The backward pass skips the gradients of parameters that do not require them, so a
        computer turns off every parameter it does not take. Several computers may share
        one model (one over every trainable tensor and one over a subset, say); each turns
        its own parameters back on before it differentiates, so the last one made does not
        decide for the others.
        """
        chosen = {id(p) for p in self.params}
        for p in self.model.parameters():
            wanted = id(p) in chosen
            if p.requires_grad != wanted:
                p.requires_grad_(wanted)

    def _find_owners(self) -> list[_Owner]:
        slot_of = {id(p): i for i, p in enumerate(self.params)}
        owners = []
        for module in self.model.modules():
            slots = [
                (name, slot_of[id(p)])
                for name, p in module._parameters.items()
                if p is not None and id(p) in slot_of
            ]
            if slots:
                owners.append(_Owner(module, _module_kind(module), slots))
        return owners

    def manifest_entry(self) -> dict:
        return {
            "normalization": self.normalization,
            "dim": self.dim,
            "parameters": [{"name": n, "shape": list(s)} for n, s in zip(self.names, self.shapes)],
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameter_gradients(self, example: TokenizedExample) -> list[torch.Tensor]:
        """Raw (unnormalised) gradients, one fp32 tensor per selected parameter."""
        self.activate()
        loss = example_loss(self.model, example)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [
            torch.zeros(s, dtype=torch.float32, device=p.device) if g is None else g.float()
            for g, s, p in zip(grads, self.shapes, self.params)
        ]

    def layer_scales(self, grads: Sequence[torch.Tensor]) -> list[float]:
        """The factor each parameter's gradient is multiplied by (1 / norm, or 1)."""
        if self.normalization == "none":
            return [1.0] * len(grads)
        norms = [float(torch.linalg.vector_norm(g)) for g in grads]
        return [1.0 / n if n > 0 else 0.0 for n in norms]

    def flatten(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """(D,) float32: normalised parameter gradients, concatenated."""
        scales = self.layer_scales(grads)
        return torch.cat([g.reshape(-1) * s for g, s in zip(grads, scales)])

    def gradient(self, example: TokenizedExample) -> torch.Tensor:
        """(D,) float32 flattened, normalised gradient of one example (the reference)."""
        return self.flatten(self.parameter_gradients(example))

    def gradients(self, examples: Sequence[TokenizedExample]) -> torch.Tensor:
        """(B, D) float32, one row per example, each what a batch of one gives.

        Uses one forward and one backward pass for the whole batch unless ``batching`` is
        ``"loop"`` (or a batched layout failed its check); see the module docstring.
        """
        examples = list(examples)
        while len(examples) > 1 and self.batching != "loop":
            try:
                out = self._batched_gradients(examples, self.batching)
            except _Unsplittable as err:
                self._fall_back(str(err))
                continue
            if not self.verified:
                index = self._most_exposed(examples)
                error = self._relative_error(out[index], self.gradient(examples[index]))
                if error > _CHECK_RTOL:
                    self._fall_back(
                        f"example {index} differs from its batch of one by {error:.2g} (relative)"
                    )
                    continue
                self.verified, self.check_error = True, error
                logger.info(
                    "batched gradients (%s) match a batch of one (relative error %.1e)",
                    self.batching,
                    error,
                )
            return out
        if not examples:
            return torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)
        return torch.stack([self.gradient(e) for e in examples])

    def _fall_back(self, reason: str) -> None:
        following = BATCHING[BATCHING.index(self.batching) + 1]
        logger.warning(
            "batched gradients (%s) are not usable with this model (%s); using %s",
            self.batching,
            reason,
            following,
        )
        self.batching = following
        self.verified = False

    def _most_exposed(self, examples: Sequence[TokenizedExample]) -> int:
        """The example a leak between examples would change most: the one packed after
        the most other tokens, or else the shortest (most padding after it)."""
        if self.batching == "packed":
            layout = _make_layout(
                examples, "packed", torch.device("cpu"), False, self._attention_cost, self._pad_id
            )
            starts = [start for _, start, _ in layout.spans]
            if max(starts) > 0:
                return max(range(len(starts)), key=starts.__getitem__)
        return min(range(len(examples)), key=lambda i: len(examples[i].input_ids))

    def _relative_error(self, got: torch.Tensor, want: torch.Tensor) -> float:
        """Largest per-parameter-tensor ||got - want|| / ||want||."""
        worst = 0.0
        for a, b in zip(torch.split(got, self.sizes), torch.split(want, self.sizes)):
            diff = float(torch.linalg.vector_norm(a - b))
            ref = float(torch.linalg.vector_norm(b))
            worst = max(worst, diff / ref if ref > 0 else diff * 1e6)
        return worst

    def _batched_gradients(self, examples: Sequence[TokenizedExample], mode: str):
        self.activate()
        layout = _make_layout(
            examples, mode, self.device, self._keep_logits, self._attention_cost, self._pad_id
        )
        calls: list[tuple[_Owner, tuple, dict, torch.Tensor]] = []

        def record(owner, module, args, kwargs, output):
            calls.append((owner, _detach_tree(args), _detach_tree(kwargs), output))

        handles = [
            owner.module.register_forward_hook(partial(record, owner), with_kwargs=True)
            for owner in self._owners
        ]
        try:
            loss = self._batch_loss(layout)
        finally:
            for handle in handles:
                handle.remove()
        used = [c for c in calls if isinstance(c[3], torch.Tensor) and c[3].requires_grad]
        if any(not isinstance(c[3], torch.Tensor) for c in calls):
            raise _Unsplittable("a module owning selected parameters returns a non-tensor")
        out = torch.zeros(len(examples), self.dim, dtype=torch.float32, device=self.device)
        if used:
            # Differentiating w.r.t. the module outputs (not the parameters) keeps autograd
            # from summing weight gradients over the batch; they are formed per example below.
            output_grads = torch.autograd.grad(loss, [c[3] for c in used], allow_unused=True)
            for (owner, args, kwargs, output), dy in zip(used, output_grads):
                if dy is not None:
                    self._accumulate(out, layout, owner, args, kwargs, output, dy)
            del output_grads
        self.normalise_rows(out)
        return out

    def _batch_loss(self, layout: _Layout) -> torch.Tensor:
        """Sum over examples of each example's mean token loss."""
        kwargs = {"input_ids": layout.input_ids, "use_cache": False}
        if layout.position_ids is not None:
            kwargs["position_ids"] = layout.position_ids
        if layout.attention_mask is not None:
            kwargs["attention_mask"] = layout.attention_mask
        if layout.keep is not None:
            kwargs["logits_to_keep"] = layout.keep
        logits = self.model(**kwargs).logits
        if logits.shape[:2] != layout.targets.shape:
            raise _Unsplittable(
                f"logits of shape {tuple(logits.shape)} for targets of shape "
                f"{tuple(layout.targets.shape)}"
            )
        token_loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            layout.targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        return (token_loss * layout.weights.reshape(-1)).sum()

    def _slot(self, out: torch.Tensor, row: int, slot: int) -> torch.Tensor:
        return out[row, self.offsets[slot] : self.offsets[slot + 1]]

    def _accumulate(self, out, layout, owner, args, kwargs, output, dy) -> None:
        """Add ``owner``'s contribution of one call to every example's gradient."""
        if owner.kind == "generic":
            self._accumulate_generic(out, layout, owner, args, kwargs, dy)
            return
        x = args[0] if args else kwargs.get("input")
        if x is None:
            raise _Unsplittable(f"no input captured for {type(owner.module).__name__}")
        tokens = layout.map_for(x)
        if layout.map_for(dy) is not tokens:
            raise _Unsplittable("input and output of a module have different token dims")
        batch = len(tokens.spans)
        slots = dict(owner.slots)
        # Example i's tokens in row i, padded; the mask zeroes the output gradient on the
        # padding, so no product below can pick up another example's (or no example's) token.
        dy_e = tokens.per_example(dy, masked=True)
        if owner.kind == "embedding":
            ids = tokens.per_example(x)
            if owner.module.padding_idx is not None:  # F.embedding gives that row no gradient
                dy_e = dy_e * (ids != owner.module.padding_idx).unsqueeze(-1)
            slot = slots["weight"]
            view = out[:, self.offsets[slot] : self.offsets[slot + 1]]
            rows = torch.arange(batch, device=out.device).unsqueeze(1).expand_as(ids)
            view.view(batch, *self.shapes[slot]).index_put_(
                (rows, ids), dy_e.float(), accumulate=True
            )
            return
        x_e = tokens.per_example(x).reshape(batch, -1, x.shape[-1])
        dy_e = dy_e.reshape(batch, -1, dy.shape[-1])
        if "weight" in slots:
            slot = slots["weight"]
            grad = torch.bmm(dy_e.transpose(1, 2), x_e)  # (B, out, in): sum_t dY^T X
            out[:, self.offsets[slot] : self.offsets[slot + 1]] += grad.reshape(batch, -1)
        if "bias" in slots:
            slot = slots["bias"]
            out[:, self.offsets[slot] : self.offsets[slot + 1]] += dy_e.sum(dim=1).float()

    def _accumulate_generic(self, out, layout, owner, args, kwargs, dy) -> None:
        """Re-run the module on each example's slice and differentiate its parameters."""
        params = [getattr(owner.module, name) for name, _ in owner.slots]
        for e in range(len(layout.spans)):
            args_e = _example_slice(args, layout, e)
            kwargs_e = _example_slice(kwargs, layout, e)
            dy_e = _example_slice(dy, layout, e)
            with torch.enable_grad():
                y_e = owner.module(*args_e, **kwargs_e)
            if not isinstance(y_e, torch.Tensor) or y_e.shape != dy_e.shape:
                raise _Unsplittable(f"{type(owner.module).__name__} does not act per token")
            grads = torch.autograd.grad(y_e, params, grad_outputs=dy_e, allow_unused=True)
            for (_, slot), g in zip(owner.slots, grads):
                if g is not None:
                    self._slot(out, e, slot).add_(g.reshape(-1).float())

    def normalise_rows(self, out: torch.Tensor) -> None:
        """Apply this computer's normalisation in place to (B, D) raw flattened gradients."""
        if self.normalization == "none":
            return
        for slot in range(len(self.sizes)):
            part = out[:, self.offsets[slot] : self.offsets[slot + 1]]
            norms = torch.linalg.vector_norm(part, dim=1, keepdim=True)
            part.mul_(torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms)))

    # ---- memory ---------------------------------------------------------------------------

    def activation_bytes(self, rows: int, length: int, kept: int) -> int:
        """Rough peak bytes of one batched forward + backward beyond the model weights.

        Args:
            rows, length: the (R, L) token layout.
            kept: positions whose logits are computed (all of R * L without logits_to_keep).
        """
        config = getattr(self.model, "config", None)
        hidden = getattr(config, "hidden_size", None) or 1024
        inter = getattr(config, "intermediate_size", None) or 4 * hidden
        layers = getattr(config, "num_hidden_layers", None) or 12
        vocab = getattr(config, "vocab_size", None) or 32000
        tokens = rows * length
        # Tensors autograd keeps per token and layer (norm outputs, q/k/v, attention output,
        # residuals, the MLP's gate/up/activation), taken as 16H + 5I floats (about 1.5x what
        # SmolLM2 measures, to stay on the safe side), plus the output gradients of the hooked
        # modules and three vocab-sized rows (logits, their softmax, their gradient) per kept
        # position.
        hooked = sum(getattr(o.module, "out_features", hidden) for o in self._owners)
        floats = tokens * (layers * (16 * hidden + 5 * inter) + hooked) + 3 * kept * vocab
        # The masked attention of a packed row holds an L x L mask per row.
        return floats * 4 + rows * length * length

    def batch_bytes(self, examples: Sequence[TokenizedExample], sketch_bytes=None) -> int:
        """Estimated peak bytes to compute and sketch the gradients of ``examples`` at once.

        Beyond the weights themselves: a fixed part about the size of the weights, plus per
        example the activations of its tokens, its (D,) float32 gradient and its share of
        the sketch workspace. On SmolLM2-135M (LoRA, 78-token examples) the estimate is
        about 1.4x the measured growth of the peak resident memory.

        Args:
            examples: The batch.
            sketch_bytes: ``f(batch) -> bytes`` of the sketch's workspace (e.g.
                :meth:`RapidGradSketch.workspace_bytes`); default 3 x D floats per example.
        """
        batch = len(examples)
        lengths = [len(e.input_ids) for e in examples]
        if self.batching == "packed" and batch > 1:
            members = _packed_rows(lengths, self._attention_cost)
            rows, length = len(members), max(sum(lengths[i] for i in m) for m in members)
        else:
            rows, length = batch, max(lengths)
        kept = (
            sum(len(_labelled_positions(e)) for e in examples)
            if self._keep_logits
            else rows * length
        )
        sketch = sketch_bytes(batch) if sketch_bytes else 3 * batch * self.dim * 4
        # The first backward pass also allocates workspaces that stay (autograd, BLAS):
        # measured at about the size of the weights on SmolLM2, whatever the batch size.
        fixed = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return fixed + self.activation_bytes(rows, length, kept) + batch * self.dim * 4 + sketch


def default_memory_budget(device: torch.device) -> int:
    """Bytes for batch work when none is given: 40% of the host's RAM, or 60% of the GPU
    memory the model leaves free. Derived from totals, not from what happens to be free,
    so a resumed build picks the same batch size (and so writes the same numbers)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(0.6 * (total - torch.cuda.memory_allocated(device)))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return int(0.4 * total)


def choose_batch_size(
    computer: GradientComputer,
    examples: Sequence[TokenizedExample],
    budget_bytes: int | None = None,
    sketch_bytes=None,
    max_batch: int | None = None,
) -> int:
    """The largest batch size whose estimated peak memory fits the budget.

    The estimate (:meth:`GradientComputer.batch_bytes`) is taken for the longest examples
    of the data, so that every batch fits; it grows linearly with the batch size through
    the activations, the (B, D) gradients and the sketch workspace, plus a quadratic term
    for the packed attention masks.

    Args:
        computer: The gradient computer (its model config sizes the activations).
        examples: All examples that will be processed.
        budget_bytes: Memory for batch work beyond the model weights; default
            :func:`default_memory_budget`.
        sketch_bytes: ``f(batch) -> bytes`` of the sketch workspace.
        max_batch: Upper bound; default 16 on a CPU, 64 on a GPU.

    Returns:
        The batch size (at least 1; 1 when not even one example fits, with a warning).
    """
    device = computer.device
    budget = default_memory_budget(device) if budget_bytes is None else int(budget_bytes)
    if max_batch is None:
        max_batch = MAX_AUTO_BATCH_GPU if device.type == "cuda" else MAX_AUTO_BATCH_CPU
    if computer.batching == "loop":
        max_batch = 1
    longest = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    chosen = 1
    for batch in range(1, max(1, min(max_batch, len(examples))) + 1):
        need = computer.batch_bytes(longest[:batch], sketch_bytes)
        if need > budget:
            if batch == 1:
                logger.warning(
                    "one example needs about %.2f GiB, more than the memory budget "
                    "of %.2f GiB; using batch size 1",
                    need / 2**30,
                    budget / 2**30,
                )
            break
        chosen = batch
    logger.info(
        "batch size %d (estimated peak %.2f GiB of a %.2f GiB budget, longest example %d tokens)",
        chosen,
        computer.batch_bytes(longest[:chosen], sketch_bytes) / 2**30,
        budget / 2**30,
        len(longest[0].input_ids) if longest else 0,
    )
    return chosen
