"""RapidGrad: compress a flattened gradient of length D into K numbers (paper Section 3.2).

The transform, for a batch ``v`` of shape ``(B, D)`` float32:

1. pad each row with zeros to ``D_pad``, the smallest multiple of K that is >= D;
2. lambda rounds of Algorithm 1: pick a divisor ``x_row`` of ``D_pad``, view each row as
   ``(x_row, D_pad / x_row)`` and permute its rows; pick a divisor ``x_col``, view it as
   ``(D_pad / x_col, x_col)`` and permute its columns;
3. multiply elementwise by a Rademacher vector ``rho`` of length ``D_pad``;
4. sum each consecutive block of ``D_pad / K`` elements, giving ``(B, K)``.

Every random choice is derived from the seed on the host with numpy's PCG64 generator,
never from a torch generator, so the same gradient gives the same RapidGrad on CPU or GPU,
in any process. The divisors are recorded in the index manifest. Each permutation has at
most ``max_perm_len`` entries, so no permutation of length D is ever stored; the price is
2 * lambda passes over the batch, one per row or column shuffle.

The Rademacher signs come from a counter-based hash of the position, computed with 64-bit
integer arithmetic that never overflows, so they need no storage either and are identical on
every device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from rapidin_index.errors import SettingsError

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF
# Rows of the sign table computed per step; bounds temporary memory for huge D.
_SIGN_TILE = 1 << 24
# Above this many bytes the sign vector is recomputed per call instead of cached.
_SIGN_CACHE_LIMIT = 1 << 29


@dataclass(frozen=True)
class SketchSettings:
    """Settings of the RapidGrad transform; all of them are written to the manifest.

    Attributes:
        k: Length of a RapidGrad (a power of two).
        shuffle_rounds: lambda, the number of rounds of Algorithm 1.
        seed: Seed of every random choice of the transform.
        max_perm_len: Upper bound on the length of any single row or column permutation.
        projection: ``"shuffle"`` (the paper's Algorithm 1 plus Rademacher signs).
    """

    k: int = 1 << 16
    shuffle_rounds: int = 20
    seed: int = 42
    max_perm_len: int = 1 << 20
    projection: str = "shuffle"

    def validate(self) -> None:
        if self.k < 1 or self.k & (self.k - 1):
            raise SettingsError(f"--k must be a power of two, got {self.k}")
        if self.shuffle_rounds < 0:
            raise SettingsError(f"--shuffle-rounds must be >= 0, got {self.shuffle_rounds}")
        if self.max_perm_len < 2:
            raise SettingsError(f"max_perm_len must be >= 2, got {self.max_perm_len}")
        if self.projection != "shuffle":
            raise SettingsError(f"unknown --projection {self.projection!r}; use 'shuffle'")


def _mul32(x: torch.Tensor | np.ndarray, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32, in int64 without any intermediate overflow."""
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _MASK32


def _mix32(x):
    """A 32-bit avalanche hash (xorshift-multiply); works on torch int64 and numpy int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rademacher_bits(positions, seed: int):
    """Sign bit (0 -> +1, 1 -> -1) of each position; torch or numpy int64 in, same type out."""
    seed_lo = seed & _MASK32
    seed_hi = (seed >> 32) & _MASK32 ^ 0x5BD1E995
    h = _mix32((positions & _MASK32) ^ seed_lo)
    h = _mix32(h ^ (positions >> 32) ^ seed_hi)
    return h & 1


def _divisors(n: int) -> list[int]:
    """All divisors of n, sorted, by trial division over the prime factorisation."""
    factors: dict[int, int] = {}
    m, p = n, 2
    while p * p <= m:
        while m % p == 0:
            factors[p] = factors.get(p, 0) + 1
            m //= p
        p += 1 if p == 2 else 2
    if m > 1:
        factors[m] = factors.get(m, 0) + 1
    divs = [1]
    for prime, power in factors.items():
        divs = [d * prime**e for d in divs for e in range(power + 1)]
    return sorted(divs)


def plan_divisors(padded_dim: int, settings: SketchSettings) -> list[tuple[int, int]]:
    """The (x_row, x_col) divisor pair of every shuffle round, drawn from the seed."""
    upper = min(settings.max_perm_len, padded_dim // 2)
    candidates = [d for d in _divisors(padded_dim) if 2 <= d <= upper]
    if not candidates:
        return []
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(settings.seed)))
    picks = rng.choice(np.asarray(candidates, dtype=np.int64), size=(settings.shuffle_rounds, 2))
    return [(int(r), int(c)) for r, c in picks]


def _permutation(seed: int, round_index: int, axis: int, length: int) -> np.ndarray:
    seq = np.random.SeedSequence(seed, spawn_key=(1, round_index, axis))
    return np.random.Generator(np.random.PCG64(seq)).permutation(length)


@dataclass
class RapidGradSketch:
    """The RapidGrad transform for gradients of one fixed length.

    Args:
        dim: D, the length of the flattened gradient.
        settings: Transform settings.
        divisors: The divisor plan recorded in an existing manifest. When given it must equal
            the plan derived from the seed (a different plan means the index was written by
            an incompatible version); when omitted it is derived.
    """

    dim: int
    settings: SketchSettings
    divisors: list[tuple[int, int]] | None = None
    padded_dim: int = field(init=False)
    _perms: dict = field(init=False, default_factory=dict, repr=False)
    _signs: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.settings.validate()
        k = self.settings.k
        if k > self.dim:
            raise SettingsError(
                f"--k {k} is larger than the gradient length D = {self.dim}; "
                f"choose --k <= {1 << int(math.log2(self.dim))} or select more parameters"
            )
        self.padded_dim = -(-self.dim // k) * k
        planned = plan_divisors(self.padded_dim, self.settings)
        if self.divisors is not None:
            recorded = [tuple(int(x) for x in pair) for pair in self.divisors]
            if recorded != planned:
                raise SettingsError(
                    "the shuffle divisors recorded in the manifest differ from the ones this "
                    "version derives from the seed; rebuild the index with this version"
                )
        self.divisors = planned

    @property
    def block(self) -> int:
        """Number of consecutive shuffled elements summed into one RapidGrad entry."""
        return self.padded_dim // self.settings.k

    def manifest_entry(self) -> dict:
        s = self.settings
        return {
            "projection": s.projection,
            "k": s.k,
            "shuffle_rounds": s.shuffle_rounds,
            "seed": s.seed,
            "max_perm_len": s.max_perm_len,
            "dim": self.dim,
            "padded_dim": self.padded_dim,
            "divisors": [list(pair) for pair in self.divisors],
        }

    def _perm(self, round_index: int, axis: int, length: int, device: torch.device):
        key = (round_index, axis, str(device))
        if key not in self._perms:
            perm = _permutation(self.settings.seed, round_index, axis, length)
            self._perms[key] = torch.from_numpy(perm).to(device)
        return self._perms[key]

    def _sign_vector(self, device: torch.device, start: int, stop: int) -> torch.Tensor:
        """(stop - start,) float32 of +-1 for positions [start, stop)."""
        positions = torch.arange(start, stop, dtype=torch.int64, device=device)
        bits = rademacher_bits(positions, self.settings.seed)
        return 1.0 - 2.0 * bits.to(torch.float32)

    def signs(self, device: torch.device) -> torch.Tensor | None:
        """Cached full sign vector, or None when it would exceed the cache limit."""
        key = str(device)
        if key not in self._signs:
            if self.padded_dim * 4 > _SIGN_CACHE_LIMIT:
                return None
            self._signs[key] = self._sign_vector(device, 0, self.padded_dim)
        return self._signs[key]

    def shuffle(self, v: torch.Tensor) -> torch.Tensor:
        """Algorithm 1 on each row of ``v`` (B, D_pad); returns a new (B, D_pad) tensor."""
        batch = v.shape[0]
        for round_index, (x_row, x_col) in enumerate(self.divisors):
            rows = self._perm(round_index, 0, x_row, v.device)
            v = v.view(batch, x_row, -1).index_select(1, rows).view(batch, -1)
            cols = self._perm(round_index, 1, x_col, v.device)
            v = v.view(batch, -1, x_col).index_select(2, cols).view(batch, -1)
        return v

    def transform(self, grads: torch.Tensor) -> torch.Tensor:
        """Compress gradients.

        Args:
            grads: (B, D) or (D,) float32, already normalised.

        Returns:
            (B, K) or (K,) float32 RapidGrads (stored as float16 by the caller).
        """
        single = grads.dim() == 1
        v = grads.reshape(1, -1) if single else grads
        if v.shape[1] != self.dim:
            raise ValueError(f"expected gradients of length {self.dim}, got {v.shape[1]}")
        v = v.to(torch.float32)
        if self.padded_dim != self.dim:
            v = torch.nn.functional.pad(v, (0, self.padded_dim - self.dim))
        v = self.shuffle(v.contiguous())
        k, block = self.settings.k, self.block
        signs = self.signs(v.device)
        if signs is not None:
            out = (v * signs).view(v.shape[0], k, block).sum(dim=2)
        else:
            out = torch.empty(v.shape[0], k, dtype=torch.float32, device=v.device)
            tile = max(block, (_SIGN_TILE // block) * block)
            for start in range(0, self.padded_dim, tile):
                stop = min(start + tile, self.padded_dim)
                part = v[:, start:stop] * self._sign_vector(v.device, start, stop)
                out[:, start // block : stop // block] = part.view(v.shape[0], -1, block).sum(2)
        return out[0] if single else out
