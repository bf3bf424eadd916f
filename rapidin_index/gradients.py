"""Per-example loss gradients, layer-wise normalised and flattened (paper Sections 2 and 3.2).

Convention used throughout: the flattened gradient of an example is the concatenation, in
``named_parameters()`` order of the selected parameters, of each parameter's gradient in
row-major order. With ``normalization="layer"`` every parameter tensor's gradient is first
scaled to unit L2 norm (in fp32); an all-zero gradient stays zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rapidin_index.data import IGNORE_INDEX, TokenizedExample
from rapidin_index.errors import DataError, SettingsError

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("layer", "none")


@dataclass(frozen=True)
class GradientSettings:
    """Which gradient is taken and how it is normalised; written to the manifest.

    Attributes:
        params: Shell globs over parameter names (``--params``); empty = all trainable.
        normalization: ``"layer"`` (the paper's layer-wise L2 normalisation) or ``"none"``.
    """

    params: tuple[str, ...] = ()
    normalization: str = "layer"

    def validate(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise SettingsError(
                f"unknown --normalization {self.normalization!r}; choose from {NORMALIZATIONS}"
            )


def example_loss(model: torch.nn.Module, example: TokenizedExample) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response + EOS) tokens.

    Token t's logits predict token t + 1, so logits[:-1] are scored against labels[1:].
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([example.input_ids], device=device)
    labels = torch.tensor(example.labels[1:], device=device)
    if not bool((labels != IGNORE_INDEX).any()):
        raise DataError(
            "an example has no response tokens left to take a loss over; raise --max-length"
        )
    logits = model(input_ids=input_ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


class GradientComputer:
    """Computes flattened per-example gradients of the selected parameters.

    Args:
        model: The causal LM.
        named_params: ``(name, parameter)`` pairs from :func:`model.select_parameters`.
            Other parameters are frozen so the backward pass skips their weight gradients.
        normalization: One of :data:`NORMALIZATIONS`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        normalization: str = "layer",
    ) -> None:
        GradientSettings(normalization=normalization).validate()
        self.model = model
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.normalization = normalization
        chosen = {id(p) for p in self.params}
        for p in model.parameters():
            if id(p) not in chosen:
                p.requires_grad_(False)

    def manifest_entry(self) -> dict:
        return {
            "normalization": self.normalization,
            "dim": self.dim,
            "parameters": [{"name": n, "shape": list(s)} for n, s in zip(self.names, self.shapes)],
        }

    def parameter_gradients(self, example: TokenizedExample) -> list[torch.Tensor]:
        """Raw (unnormalised) gradients, one fp32 tensor per selected parameter."""
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
        """(D,) float32 flattened, normalised gradient of one example."""
        return self.flatten(self.parameter_gradients(example))

    def gradients(self, examples: Sequence[TokenizedExample]) -> torch.Tensor:
        """(B, D) float32, one row per example, each exactly what a batch of one gives."""
        return torch.stack([self.gradient(e) for e in examples])
