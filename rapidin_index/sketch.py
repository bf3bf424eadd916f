"""RapidGrad: compress a flattened gradient of length D into K numbers (paper Section 3.2).

Two projections are available (``SketchSettings.projection``, recorded in the manifest).

``"shuffle"`` (default, the paper's), for a batch ``v`` of shape ``(B, D)`` float32:

1. pad each row with zeros to ``D_pad``, the smallest multiple of K that is >= D;
2. lambda rounds of Algorithm 1: pick a divisor ``x_row`` of ``D_pad``, view each row as
   ``(x_row, D_pad / x_row)`` and permute its rows; pick a divisor ``x_col``, view it as
   ``(D_pad / x_col, x_col)`` and permute its columns;
3. multiply elementwise by a Rademacher vector ``rho`` of length ``D_pad``;
4. sum each consecutive block of ``D_pad / K`` elements, giving ``(B, K)``.

``"countsketch"``: coordinate ``i`` is added, with the Rademacher sign of ``i``, to entry
``bucket(i) = hash(i) mod K``. One pass, nothing stored; ``D_pad = D``.

Every random choice is derived from the seed on the host with numpy's PCG64 generator or
from a counter-based hash of a position, never from a torch generator, so the same gradient
gives the same RapidGrad on CPU or GPU, in any process. The divisors are recorded in the
index manifest. Each permutation has at most ``max_perm_len`` entries, so no permutation of
length D is ever stored.

Two implementations compute the same function. On a GPU (and with ``backend="torch"``) each
shuffle pass is one ``index_select`` over the batch: 2 * lambda passes over ``B * D_pad``
floats. On the CPU a numba kernel never moves the data until the end: for a tile of output
positions it walks the 2 * lambda index maps backwards (each a divmod and a lookup in one
small permutation) to find the source coordinate of every output position, then gathers,
signs and block-sums all rows of the batch from that one index tile, reading them from a
transposed copy so that one random read serves every row. The index walk is shared by the
batch and the data is read once, so the cost per example falls with the batch size; the
workspace is the transposed copy plus a tile per thread.

The Rademacher signs come from a counter-based hash of the position, computed with 64-bit
integer arithmetic that never overflows, so they need no storage either and are identical on
every device.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from rapidin_index.errors import SettingsError

logger = logging.getLogger(__name__)

PROJECTIONS = ("shuffle", "countsketch")
BACKENDS = ("auto", "numba", "torch")

_MASK32 = 0xFFFFFFFF
# Salts that make the countsketch bucket hash independent of the sign hash.
_BUCKET_SALT_LO = 0x68E31DA4
_BUCKET_SALT_HI = 0xB5297A4D
# Rows of the sign table computed per step; bounds temporary memory for huge D.
_SIGN_TILE = 1 << 24
# Above this many bytes the sign vector is recomputed per call instead of cached.
_SIGN_CACHE_LIMIT = 1 << 29
# Output positions per tile of the CPU kernels: the index tile (and the countsketch bucket
# tile) stays in L2 while every row of the batch is gathered through it.
_CPU_TILE = 1 << 14
# Rows sketched together by the CPU shuffle kernel (one transposed copy of them at a time).
_CPU_GROUP = 16
# Padded lengths below this use int32 index tiles and tables (half the cache footprint).
_INT32_INDEX_LIMIT = 1 << 31


@dataclass(frozen=True)
class SketchSettings:
    """Settings of the RapidGrad transform; all of them are written to the manifest.

    Attributes:
        k: Length of a RapidGrad (a power of two).
        shuffle_rounds: lambda, the number of rounds of Algorithm 1 (``"shuffle"`` only).
        seed: Seed of every random choice of the transform.
        max_perm_len: Upper bound on the length of any single row or column permutation.
        projection: ``"shuffle"`` (the paper's Algorithm 1 plus Rademacher signs) or
            ``"countsketch"`` (hashed buckets and signs, no permutation).
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
        if self.projection not in PROJECTIONS:
            raise SettingsError(
                f"unknown --projection {self.projection!r}; choose from {PROJECTIONS}"
            )
        if self.projection == "countsketch" and self.k > 1 << 32:
            raise SettingsError("--projection countsketch hashes to 32 bits: use --k <= 2**32")
        if self.seed < 0:
            raise SettingsError(f"--seed must be >= 0, got {self.seed}")


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


def _seed_words(seed: int, salt_lo: int = 0, salt_hi: int = 0x5BD1E995) -> tuple[int, int]:
    """The two 32-bit words a position hash is keyed with."""
    return (seed & _MASK32) ^ salt_lo, ((seed >> 32) & _MASK32) ^ salt_hi


def _bucket_words(seed: int) -> tuple[int, int]:
    return _seed_words(seed, _BUCKET_SALT_LO, _BUCKET_SALT_HI)


def _position_hash(positions, seed_lo: int, seed_hi: int):
    """32-bit hash of int64 positions (torch or numpy), keyed with two seed words."""
    h = _mix32((positions & _MASK32) ^ seed_lo)
    return _mix32(h ^ (positions >> 32) ^ seed_hi)


def rademacher_bits(positions, seed: int):
    """Sign bit (0 -> +1, 1 -> -1) of each position; torch or numpy int64 in, same type out."""
    return _position_hash(positions, *_seed_words(seed)) & 1


def countsketch_buckets(positions, seed: int, k: int):
    """Countsketch bucket in [0, k) of each position; torch or numpy int64 in, same type out.

    Keyed with other seed words than :func:`rademacher_bits`, so bucket and sign of a
    coordinate are independent.
    """
    return _position_hash(positions, *_bucket_words(seed)) & (k - 1)


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
    if settings.projection != "shuffle":
        return []
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


# ---------------------------------------------------------------------------------------
# CPU kernels. nogil so that plain Python threads run them in parallel: numba's own
# parallel layers spin-wait next to torch's OpenMP threads on small machines (see scan.py).
# ---------------------------------------------------------------------------------------

try:
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; torch still works
    numba = None

    def njit(*args, **kwargs):
        return lambda fn: fn


_U32 = np.uint64(_MASK32)


@njit(cache=True, nogil=True, inline="always")
def _nb_mix32(x):
    """:func:`_mix32` on one uint64 < 2**32 (products < 2**64, so nothing wraps)."""
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _U32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _U32
    return x ^ (x >> np.uint64(16))


@njit(cache=True, nogil=True, inline="always")
def _nb_hash(position, seed_lo, seed_hi):
    """:func:`_position_hash` of one non-negative int64 position; uint64 seed words."""
    p = np.uint64(position)
    h = _nb_mix32((p & _U32) ^ seed_lo)
    return _nb_mix32(h ^ (p >> np.uint64(32)) ^ seed_hi)


@njit(cache=True, nogil=True, boundscheck=False)
def _nb_shuffle(
    vt,
    block,
    sizes,
    invs,
    is_col,
    tables,
    offsets,
    seed_lo,
    seed_hi,
    k_lo,
    k_hi,
    idx,
    quot,
    sgn,
    acc,
    out,
):
    """Shuffle RapidGrad entries [k_lo, k_hi) of a group of G rows.

    Args:
        vt: (D, G) float32, the rows transposed: one random read fetches a coordinate of
            every row (coordinates >= D read as zero; no padded copy is made).
        block: D_pad // K.
        sizes, invs, is_col: per pass, the chunk length (row pass) or group length (column
            pass), its reciprocal as float64, and which of the two the pass is.
        tables, offsets: all permutations concatenated; pass s uses
            ``tables[offsets[s]:offsets[s + 1]]``.
        seed_lo, seed_hi: uint64 seed words of the sign hash.
        idx, quot: int scratch of one tile (a multiple of ``block`` long); sgn float64
            scratch of one tile; acc (G,) float64 scratch.
        out: (G, K) float32, written for columns [k_lo, k_hi).
    """
    dim, n_rows = vt.shape
    n_pass = sizes.shape[0]
    tile_blocks = idx.shape[0] // block
    for k0 in range(k_lo, k_hi, tile_blocks):
        k1 = min(k_hi, k0 + tile_blocks)
        j0 = k0 * block
        n = (k1 - k0) * block
        for t in range(n):
            idx[t] = j0 + t
        # Undo the passes from the last to the first: idx[t] becomes the coordinate of the
        # padded input that lands on output position j0 + t. (j + 0.5) * (1 / size) is an
        # exact floor division for j < 2**51; in a loop of its own it vectorises.
        for s in range(n_pass - 1, -1, -1):
            size = sizes[s]
            inv = invs[s]
            off = offsets[s]
            for t in range(n):
                quot[t] = np.int64((np.float64(idx[t]) + 0.5) * inv)
            if is_col[s]:
                for t in range(n):
                    j = np.int64(idx[t])
                    r = j - np.int64(quot[t]) * size
                    idx[t] = j - r + tables[np.uint64(off + r)]
            else:
                for t in range(n):
                    q = np.int64(quot[t])
                    idx[t] = tables[np.uint64(off + q)] * size + (np.int64(idx[t]) - q * size)
        for t in range(n):
            bit = _nb_hash(j0 + t, seed_lo, seed_hi) & np.uint64(1)
            sgn[t] = 1.0 - 2.0 * np.float64(bit)
        for kk in range(k1 - k0):
            acc[:] = 0.0
            base = kk * block
            for u in range(base, base + block):
                src = idx[u]
                if src < dim:
                    sign = sgn[u]
                    for b in range(n_rows):
                        acc[b] += sign * vt[src, b]
            for b in range(n_rows):
                out[b, k0 + kk] = acc[b]


@njit(cache=True, nogil=True, boundscheck=False)
def _nb_countsketch(v, k_mask, bucket_lo, bucket_hi, sign_lo, sign_hi, b_lo, b_hi, bkt, sgn, acc):
    """Countsketch of rows [b_lo, b_hi) of ``v`` (B, D) float32 into ``acc`` (B, K) float64.

    Each row is accumulated in coordinate order, so the result does not depend on how the
    rows are split between threads.
    """
    dim = v.shape[1]
    tile = bkt.shape[0]
    for j0 in range(0, dim, tile):
        n = min(tile, dim - j0)
        for t in range(n):
            bkt[t] = np.int64(_nb_hash(j0 + t, bucket_lo, bucket_hi) & k_mask)
            bit = _nb_hash(j0 + t, sign_lo, sign_hi) & np.uint64(1)
            sgn[t] = 1.0 - 2.0 * np.float64(bit)
        for b in range(b_lo, b_hi):
            row = v[b]
            dst = acc[b]
            for t in range(n):
                dst[bkt[t]] += sgn[t] * row[j0 + t]


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _num_threads() -> int:
    """CPU threads for the sketch kernels: NUMBA_NUM_THREADS (default: all CPUs)."""
    return max(1, int(numba.config.NUMBA_NUM_THREADS)) if numba is not None else 1


def _run_parts(fn, parts: list[tuple]) -> None:
    """Run ``fn(*part)`` for every part: the calling thread takes the first one."""
    global _pool
    if len(parts) > 1:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(
                    max_workers=max(1, _num_threads() - 1), thread_name_prefix="rapidin-sketch"
                )
        futures = [_pool.submit(fn, *part) for part in parts[1:]]
        fn(*parts[0])
        for future in futures:
            future.result()
    elif parts:
        fn(*parts[0])


@dataclass
class _CpuPlan:
    """The pass tables of the CPU shuffle kernel (each table <= max_perm_len entries)."""

    sizes: np.ndarray
    invs: np.ndarray
    is_col: np.ndarray
    tables: np.ndarray
    offsets: np.ndarray
    index_dtype: type


@dataclass
class RapidGradSketch:
    """The RapidGrad transform for gradients of one fixed length.

    Args:
        dim: D, the length of the flattened gradient.
        settings: Transform settings.
        divisors: The divisor plan recorded in an existing manifest. When given it must equal
            the plan derived from the seed (a different plan means the index was written by
            an incompatible version); when omitted it is derived.
        backend: ``"auto"`` (numba kernels for CPU tensors, torch ops elsewhere), ``"numba"``
            or ``"torch"``. Every backend computes the same function.
    """

    dim: int
    settings: SketchSettings
    divisors: list[tuple[int, int]] | None = None
    backend: str = "auto"
    padded_dim: int = field(init=False)
    _perms: dict = field(init=False, default_factory=dict, repr=False)
    _signs: dict = field(init=False, default_factory=dict, repr=False)
    _cpu_plan: _CpuPlan | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.settings.validate()
        if self.backend not in BACKENDS:
            raise SettingsError(f"unknown sketch backend {self.backend!r}; choose from {BACKENDS}")
        if self.backend == "numba" and numba is None:
            raise SettingsError("the numba sketch backend needs numba installed")
        k = self.settings.k
        if k > self.dim:
            raise SettingsError(
                f"--k {k} is larger than the gradient length D = {self.dim}; "
                f"choose --k <= {1 << int(math.log2(self.dim))} or select more parameters"
            )
        if self.settings.projection == "countsketch":
            self.padded_dim = self.dim  # buckets need no padding
        else:
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

    def _use_numba(self, device: torch.device) -> bool:
        if self.backend == "auto":
            return numba is not None and device.type == "cpu"
        return self.backend == "numba"

    def workspace_bytes(self, batch: int, device: torch.device | str = "cpu") -> int:
        """Peak temporary bytes of :meth:`transform` on ``batch`` rows, beyond its input.

        The torch shuffle keeps a padded copy and two pass results of the batch alive
        (3 x B x D_pad floats); the CPU kernels need one tile per thread and the output.
        """
        device = torch.device(device)
        out = batch * self.settings.k * 4
        if self._use_numba(device):
            scratch = _num_threads() * (_CPU_TILE + self.block) * 24
            if self.settings.projection == "countsketch":
                return out + batch * self.settings.k * 8 + scratch
            return out + min(batch, _CPU_GROUP) * self.dim * 4 + scratch
        if self.settings.projection == "countsketch":
            return out + batch * self.settings.k * 8 + 3 * batch * _SIGN_TILE * 8
        return out + 3 * batch * self.padded_dim * 4

    # ---- torch implementation (GPU, or backend="torch") -------------------------------

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

    def _torch_shuffle_transform(self, v: torch.Tensor) -> torch.Tensor:
        if self.padded_dim != self.dim:
            v = torch.nn.functional.pad(v, (0, self.padded_dim - self.dim))
        v = self.shuffle(v.contiguous())
        k, block = self.settings.k, self.block
        signs = self.signs(v.device)
        if signs is not None:
            return (v * signs).view(v.shape[0], k, block).sum(dim=2)
        out = torch.empty(v.shape[0], k, dtype=torch.float32, device=v.device)
        tile = max(block, (_SIGN_TILE // block) * block)
        for start in range(0, self.padded_dim, tile):
            stop = min(start + tile, self.padded_dim)
            part = v[:, start:stop] * self._sign_vector(v.device, start, stop)
            out[:, start // block : stop // block] = part.view(v.shape[0], -1, block).sum(2)
        return out

    def _torch_countsketch(self, v: torch.Tensor) -> torch.Tensor:
        k, seed = self.settings.k, self.settings.seed
        # float64 accumulation: on a GPU index_add_ adds in no fixed order, and in float64
        # that order almost never shows in the float32 result.
        acc = torch.zeros(v.shape[0], k, dtype=torch.float64, device=v.device)
        for start in range(0, self.dim, _SIGN_TILE):
            stop = min(start + _SIGN_TILE, self.dim)
            positions = torch.arange(start, stop, dtype=torch.int64, device=v.device)
            signs = 1.0 - 2.0 * rademacher_bits(positions, seed).to(torch.float64)
            buckets = countsketch_buckets(positions, seed, k)
            acc.index_add_(1, buckets, v[:, start:stop].to(torch.float64) * signs)
        return acc.to(torch.float32)

    # ---- CPU kernels --------------------------------------------------------------------

    def _plan_for_cpu(self) -> _CpuPlan:
        if self._cpu_plan is None:
            sizes, is_col, tables = [], [], []
            for r, (x_row, x_col) in enumerate(self.divisors):
                sizes += [self.padded_dim // x_row, x_col]
                is_col += [False, True]
                tables += [
                    _permutation(self.settings.seed, r, 0, x_row),
                    _permutation(self.settings.seed, r, 1, x_col),
                ]
            dtype = np.int32 if self.padded_dim < _INT32_INDEX_LIMIT else np.int64
            offsets = np.zeros(len(tables) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(t) for t in tables])
            self._cpu_plan = _CpuPlan(
                sizes=np.asarray(sizes, dtype=np.int64),
                invs=1.0 / np.asarray(sizes, dtype=np.float64) if sizes else np.zeros(0),
                is_col=np.asarray(is_col, dtype=np.bool_),
                tables=(np.concatenate(tables) if tables else np.zeros(0)).astype(dtype),
                offsets=offsets,
                index_dtype=dtype,
            )
        return self._cpu_plan

    def _numba_shuffle(self, v: np.ndarray) -> np.ndarray:
        plan = self._plan_for_cpu()
        k, block = self.settings.k, self.block
        out = np.empty((v.shape[0], k), dtype=np.float32)
        seed_lo, seed_hi = (np.uint64(w) for w in _seed_words(self.settings.seed))
        tile = max(1, _CPU_TILE // block) * block
        n_parts = max(1, min(_num_threads(), -(-k * block // tile)))
        bounds = np.linspace(0, k, n_parts + 1).astype(np.int64)
        for g0 in range(0, v.shape[0], _CPU_GROUP):
            # The index walk is shared by the rows of a group; transposed, their values at
            # one source coordinate are adjacent, so each random read serves all of them.
            vt = np.ascontiguousarray(v[g0 : g0 + _CPU_GROUP].T)
            group = out[g0 : g0 + _CPU_GROUP]
            # Contiguous ranges of output entries, one per thread; any split gives the same
            # numbers because every entry is summed by one thread in a fixed order.
            parts = [
                (
                    vt,
                    block,
                    plan.sizes,
                    plan.invs,
                    plan.is_col,
                    plan.tables,
                    plan.offsets,
                    seed_lo,
                    seed_hi,
                    int(lo),
                    int(hi),
                    np.empty(tile, dtype=plan.index_dtype),
                    np.empty(tile, dtype=plan.index_dtype),
                    np.empty(tile, dtype=np.float64),
                    np.empty(vt.shape[1], dtype=np.float64),
                    group,
                )
                for lo, hi in zip(bounds[:-1], bounds[1:])
                if hi > lo
            ]
            _run_parts(_nb_shuffle, parts)
        return out

    def _numba_countsketch(self, v: np.ndarray) -> np.ndarray:
        k, seed = self.settings.k, self.settings.seed
        acc = np.zeros((v.shape[0], k), dtype=np.float64)
        bucket_words = _bucket_words(seed)
        sign_words = _seed_words(seed)
        n_parts = max(1, min(_num_threads(), v.shape[0]))
        bounds = np.linspace(0, v.shape[0], n_parts + 1).astype(np.int64)
        parts = [
            (
                v,
                np.uint64(k - 1),
                np.uint64(bucket_words[0]),
                np.uint64(bucket_words[1]),
                np.uint64(sign_words[0]),
                np.uint64(sign_words[1]),
                int(lo),
                int(hi),
                np.empty(_CPU_TILE, dtype=np.int64),
                np.empty(_CPU_TILE, dtype=np.float64),
                acc,
            )
            for lo, hi in zip(bounds[:-1], bounds[1:])
            if hi > lo
        ]
        _run_parts(_nb_countsketch, parts)
        return acc.astype(np.float32)

    def transform(self, grads: torch.Tensor) -> torch.Tensor:
        """Compress gradients.

        Args:
            grads: (B, D) or (D,) float32, already normalised.

        Returns:
            (B, K) or (K,) float32 RapidGrads (stored as float16 by the caller), on the
            device of ``grads``.
        """
        single = grads.dim() == 1
        v = grads.reshape(1, -1) if single else grads
        if v.shape[1] != self.dim:
            raise ValueError(f"expected gradients of length {self.dim}, got {v.shape[1]}")
        v = v.detach().to(torch.float32)
        countsketch = self.settings.projection == "countsketch"
        if self._use_numba(v.device):
            host = v.cpu().contiguous().numpy()
            out = self._numba_countsketch(host) if countsketch else self._numba_shuffle(host)
            out = torch.from_numpy(out).to(v.device)
        elif countsketch:
            out = self._torch_countsketch(v)
        else:
            out = self._torch_shuffle_transform(v)
        return out[0] if single else out
