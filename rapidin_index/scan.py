"""Exact top-k / bottom-k inner-product scan over a store of fp16 RapidGrads.

The store is an ``(N, K)`` fp16 matrix kept as raw row chunks on disk. A query is an
``(m, K)`` float32 matrix; :func:`scan` streams the store once and returns, for each of the
``m`` query vectors, the ``k`` rows with the highest (and optionally the lowest) inner
product. Everything is exact: no quantisation, no approximate index.

Semantics shared by every engine:

* Scores are ``queries @ rows.astype(float32).T``. The CPU engine multiplies in float32 and
  accumulates in float32 (8-lane vector partial sums) over column tiles of 2,048-16,384,
  then adds the tile sums in float64: float32 arithmetic keeps one query at memory
  bandwidth and 16 queries at the FMA limit (float64 would halve both), and the float64
  tile sums keep the error of a 65,536-term dot product around 1e-6 of the largest score.
  Returned scores are rounded to float32. The GPU engine uses a float32 matmul with TF32
  disabled.
* Top lists are ordered by score descending, bottom lists by score ascending; equal
  scores are ordered by the lower row id in both lists. Identical rows get bit-identical
  scores from the CPU kernel (every row goes through the same instruction sequence), so
  duplicates tie exactly and the lower id wins.
* NaN scores (a row or query holding NaN, or ``inf * 0``, ``inf - inf``) rank after every
  number, ``-inf`` and ``+inf`` included, in both lists; among themselves they are ordered
  by id. They therefore only show up when ``k`` exceeds the number of non-NaN rows. A
  warning is logged when any were seen.

The CPU engine decodes fp16 bit patterns inside a numba kernel: with the hardware fp16 to
fp32 conversion (``vcvtph2ps`` on x86 with F16C, ``fcvtl`` on AArch64) when the CPU has it,
else with integer bit operations (sign, exponent, mantissa, subnormals, inf, NaN). Both are
exact; the hardware path is about 2.4x faster per core and is what keeps one query at
memory bandwidth (the bit decoding costs ~11 vector instructions per 8 values). Set
``RAPIDIN_SCAN_DECODE=bits`` to force the portable decoder.

Each block is split into one contiguous row range per CPU (``NUMBA_NUM_THREADS``), scored
by nogil numba kernels on a small thread pool, and offered to bounded per-query heaps.
:func:`iter_raw_chunks` feeds the scan from raw chunk files with bounded resident memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from rapidin_index.errors import DataError, SettingsError, StoreError

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINES",
    "RawChunkIterator",
    "ScanResult",
    "block_scores",
    "decode_f16_bits",
    "iter_raw_chunks",
    "scan",
]

#: Engine names accepted by :func:`scan`.
ENGINES = ("cpu", "gpu", "auto")

# Rows handed to one kernel call. Blocks larger than this are split so the (rows, m)
# float64 score buffer stays small (4096 x 64 x 8 B = 2 MiB) whatever the caller yields.
_MAX_KERNEL_ROWS = 4096

# Column tile of the one-query kernel: float32 partial sums over this many products, then
# float64 across tiles. Long tiles keep each row a single sequential stream.
_TILE_ONE_QUERY = 8192

_FASTMATH = {"reassoc", "contract"}  # vectorised reductions + FMA; NaN/inf stay IEEE


# ----------------------------------------------------------------------------------------
# fp16 decoding
# ----------------------------------------------------------------------------------------


def _host_has_hw_f16() -> bool:
    """Whether LLVM can lower an fp16 -> fp32 conversion to one instruction on this CPU."""
    forced = os.environ.get("RAPIDIN_SCAN_DECODE", "").strip().lower()
    if forced in ("bits", "sw", "software"):
        return False
    if forced in ("hw", "hardware", "f16c"):
        return True
    # numba compiles for the host unless NUMBA_CPU_NAME says otherwise; a generic target
    # has no F16C and LLVM would emit a libcall (__extendhfsf2) the JIT may not resolve.
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return "+f16c" in (numba.config.CPU_FEATURES or "")
    triple = llvm_binding.get_process_triple()
    if triple.startswith(("aarch64", "arm64")):
        return True
    if triple.startswith(("x86_64", "i686", "i386")):
        try:
            return bool(llvm_binding.get_host_cpu_features().get("f16c", False))
        except RuntimeError:  # feature detection unsupported: stay portable
            return False
    return False


_HW_F16 = _host_has_hw_f16()

_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _as_i16(builder, value, bitwidth):
    if bitwidth > 16:
        return builder.trunc(value, _I16)
    if bitwidth < 16:
        return builder.zext(value, _I16)
    return value


def _emit_decode_bits(builder, h16):
    """LLVM IR: fp16 bits (i16) -> float32 with integer ops only (vectorises to SIMD).

    ``(h & 0x7fff) << 13`` puts the fp16 exponent and mantissa in the fp32 fields; as a
    float that is the value times 2^-112 (normal) or exactly the scaled subnormal, so one
    multiply by 2^112 fixes both. Exponent 31 (inf/NaN) gets the fp32 exponent 255 ORed
    in, which the multiply keeps. The sign is copied last.
    """
    x = builder.zext(h16, _I32)
    em = builder.and_(x, ir.Constant(_I32, 0x7FFF))
    sign = builder.shl(builder.xor(x, em), ir.Constant(_I32, 16))
    bits = builder.or_(builder.shl(em, ir.Constant(_I32, 13)), sign)
    special = builder.icmp_unsigned(">=", em, ir.Constant(_I32, 0x7C00))
    bits = builder.select(special, builder.or_(bits, ir.Constant(_I32, 0x7F800000)), bits)
    value = builder.bitcast(bits, _F32)
    return builder.fmul(value, ir.Constant(_F32, 2.0**112))


def _emit_decode_hw(builder, h16):
    """LLVM IR: fp16 bits (i16) -> float32 via ``fpext half`` (one SIMD instruction)."""
    return builder.fpext(builder.bitcast(h16, ir.HalfType()), _F32)


def _decode_intrinsic(emit):
    def impl(typingctx, h):
        if not isinstance(h, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return emit(builder, _as_i16(builder, args[0], h.bitwidth))

        return types.float32(h), codegen

    return impl


@intrinsic
def _f16_bits_sw(typingctx, h):
    """fp16 bit pattern (any integer type, low 16 bits used) -> float32, integer decoding."""
    return _decode_intrinsic(_emit_decode_bits)(typingctx, h)


@intrinsic
def _f16_bits_hw(typingctx, h):
    """fp16 bit pattern -> float32 with the CPU's conversion instruction."""
    return _decode_intrinsic(_emit_decode_hw)(typingctx, h)


@intrinsic
def _f16(typingctx, h):
    """fp16 bit pattern -> float32 with the decoder chosen for this host at import time.

    Both decoders give bit-identical results for every non-NaN input, so a cache entry
    compiled with one is still correct if the other is forced later.
    """
    emit = _emit_decode_hw if _HW_F16 else _emit_decode_bits
    return _decode_intrinsic(emit)(typingctx, h)


@njit(cache=True)
def _decode_array_sw(bits, out):  # pragma: no cover - compiled
    for i in range(bits.shape[0]):
        out[i] = _f16_bits_sw(bits[i])


@njit(cache=True)
def _decode_array_hw(bits, out):  # pragma: no cover - compiled
    for i in range(bits.shape[0]):
        out[i] = _f16_bits_hw(bits[i])


def decode_f16_bits(bits: np.ndarray, *, hardware: bool | None = None) -> np.ndarray:
    """Decode fp16 bit patterns with the scan kernel's decoder (for tests and tools).

    Args:
        bits: (n,) uint16 fp16 bit patterns.
        hardware: True for the conversion instruction, False for the integer decoder,
            None for what the scan kernel uses on this host.

    Returns:
        (n,) float32 values.

    Raises:
        SettingsError: ``hardware=True`` on a CPU without fp16 conversion.
    """
    bits = np.ascontiguousarray(bits, dtype=np.uint16).reshape(-1)
    out = np.empty(bits.shape[0], dtype=np.float32)
    use_hw = _HW_F16 if hardware is None else hardware
    if use_hw and not _host_has_hw_f16():
        raise SettingsError("this CPU has no fp16 conversion instruction (F16C)")
    (_decode_array_hw if use_hw else _decode_array_sw)(bits, out)
    return out


# ----------------------------------------------------------------------------------------
# CPU score kernels
# ----------------------------------------------------------------------------------------


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _dot1(x, q):  # pragma: no cover - compiled
    """float32 dot of one fp16-bits row tile with one query tile."""
    acc = np.float32(0.0)
    for t in range(x.shape[0]):
        acc += _f16(x[t]) * q[t]
    return acc


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _micro_r3q4(x0, x1, x2, q0, q1, q2, q3):  # pragma: no cover - compiled
    """3 rows x 4 queries register tile: each decoded value feeds 4 FMAs, each query 3.

    12 independent accumulators cover the FMA latency on both FMA pipes, and the loads
    (3 row vectors, 4 query vectors per 12 FMAs) stay under the load ports' limit.
    """
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    for t in range(x0.shape[0]):
        v0 = _f16(x0[t])
        v1 = _f16(x1[t])
        v2 = _f16(x2[t])
        w = q0[t]
        a00 += v0 * w
        a10 += v1 * w
        a20 += v2 * w
        w = q1[t]
        a01 += v0 * w
        a11 += v1 * w
        a21 += v2 * w
        w = q2[t]
        a02 += v0 * w
        a12 += v1 * w
        a22 += v2 * w
        w = q3[t]
        a03 += v0 * w
        a13 += v1 * w
        a23 += v2 * w
    return a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _micro_r3q2(x0, x1, x2, q0, q1):  # pragma: no cover - compiled
    """3 rows x 2 queries register tile (remainder queries)."""
    a00 = a01 = a10 = a11 = a20 = a21 = np.float32(0.0)
    for t in range(x0.shape[0]):
        v0 = _f16(x0[t])
        v1 = _f16(x1[t])
        v2 = _f16(x2[t])
        w = q0[t]
        a00 += v0 * w
        a10 += v1 * w
        a20 += v2 * w
        w = q1[t]
        a01 += v0 * w
        a11 += v1 * w
        a21 += v2 * w
    return a00, a01, a10, a11, a20, a21


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _micro_r3q1(x0, x1, x2, q0):  # pragma: no cover - compiled
    """3 rows x 1 query register tile (remainder query)."""
    a0 = a1 = a2 = np.float32(0.0)
    for t in range(x0.shape[0]):
        w = q0[t]
        a0 += _f16(x0[t]) * w
        a1 += _f16(x1[t]) * w
        a2 += _f16(x2[t]) * w
    return a0, a1, a2


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _scores_one_query(x, q, out, kt):  # pragma: no cover - compiled
    """Scores of the rows of a block (one thread's row range) against one query.

    Args:
        x: (n, K) uint16 fp16 bit patterns, C-contiguous.
        q: (K,) float32 query.
        out: (n,) float64 scores, written.
        kt: column tile (float32 within a tile, float64 across tiles).
    """
    n, k_dim = x.shape
    for r in range(n):
        acc = 0.0
        for k0 in range(0, k_dim, kt):
            k1 = min(k_dim, k0 + kt)
            acc += _dot1(x[r, k0:k1], q[k0:k1])
        out[r] = acc


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _scores_multi_query(x, q, out, kt):  # pragma: no cover - compiled
    """Scores of the rows of a block (one thread's row range) against m >= 2 queries.

    One pass over the rows serves all queries. Columns are processed in tiles of ``kt``:
    for a tile, every group of 3 rows is multiplied with the tile of all queries, so the
    query tile (m * kt * 4 bytes) is reused across the rows from cache while each row
    byte comes from memory once. The last group repeats the last row (clamped index) and
    drops the duplicate results, so every row goes through the same instruction sequence
    (bit-identical scores for equal rows, whatever their position).

    Args:
        x: (n, K) uint16 fp16 bit patterns, C-contiguous.
        q: (m, K) float32 queries, C-contiguous, m >= 2.
        out: (n, m) float64 scores, overwritten.
        kt: column tile.
    """
    n, k_dim = x.shape
    m = q.shape[0]
    m4 = m - m % 4
    rem = m - m4
    for r in range(n):
        for j in range(m):
            out[r, j] = 0.0
    for k0 in range(0, k_dim, kt):
        k1 = min(k_dim, k0 + kt)
        for r0 in range(0, n, 3):
            r1 = min(r0 + 1, n - 1)
            r2 = min(r0 + 2, n - 1)
            x0 = x[r0, k0:k1]
            x1 = x[r1, k0:k1]
            x2 = x[r2, k0:k1]
            for j in range(0, m4, 4):
                a = _micro_r3q4(
                    x0, x1, x2, q[j, k0:k1], q[j + 1, k0:k1], q[j + 2, k0:k1], q[j + 3, k0:k1]
                )
                out[r0, j] += a[0]
                out[r0, j + 1] += a[1]
                out[r0, j + 2] += a[2]
                out[r0, j + 3] += a[3]
                if r1 > r0:
                    out[r1, j] += a[4]
                    out[r1, j + 1] += a[5]
                    out[r1, j + 2] += a[6]
                    out[r1, j + 3] += a[7]
                if r2 > r1:
                    out[r2, j] += a[8]
                    out[r2, j + 1] += a[9]
                    out[r2, j + 2] += a[10]
                    out[r2, j + 3] += a[11]
            j = m4
            if rem >= 2:
                b = _micro_r3q2(x0, x1, x2, q[j, k0:k1], q[j + 1, k0:k1])
                out[r0, j] += b[0]
                out[r0, j + 1] += b[1]
                if r1 > r0:
                    out[r1, j] += b[2]
                    out[r1, j + 1] += b[3]
                if r2 > r1:
                    out[r2, j] += b[4]
                    out[r2, j + 1] += b[5]
                j += 2
            if rem % 2 == 1:
                c = _micro_r3q1(x0, x1, x2, q[j, k0:k1])
                out[r0, j] += c[0]
                if r1 > r0:
                    out[r1, j] += c[1]
                if r2 > r1:
                    out[r2, j] += c[2]


def _multi_query_tile(m: int, k_dim: int) -> int:
    """Column tile for the multi-query kernel: query tile about 512 KiB, 2k..16k columns."""
    kt = (512 * 1024) // (4 * m)
    kt = max(2048, min(16384, kt))
    return min(kt, k_dim)


def _num_threads() -> int:
    """Worker threads for the score kernels: NUMBA_NUM_THREADS (default: all CPUs)."""
    return max(1, int(numba.config.NUMBA_NUM_THREADS))


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _thread_pool() -> ThreadPoolExecutor:
    """Process-wide pool that runs the nogil kernels on row ranges.

    Plain Python threads instead of ``prange``: numba's default OpenMP layer spin-waits
    its workers next to the calling thread and stalled every parallel launch by 8-12 ms on
    a 2-CPU machine (10x the work of a 16 MiB block), the workqueue layer aborts when two
    threads launch kernels at once, and TBB is not a dependency. A pool task costs tens of
    microseconds, is safe to use from several threads, and touches no global settings.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(1, _num_threads() - 1), thread_name_prefix="rapidin-scan"
            )
        return _pool


# Below this many bytes per block, one thread does the work: handing rows to the pool
# would cost more than it saves.
_MIN_PARALLEL_BYTES = 1 << 20


def block_scores(x: np.ndarray, queries: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact scores of one block against all queries with the CPU kernels.

    The rows are split into one contiguous range per thread (each thread streams its own
    part of the block sequentially); the calling thread takes the first range.

    Args:
        x: (n, K) uint16 fp16 bit patterns (C-contiguous).
        queries: (m, K) float32 queries (C-contiguous).
        out: optional (>= n, m) float64 buffer to write into.

    Returns:
        (n, m) float64 scores (a view of ``out`` when given).
    """
    # One kernel specialisation only: read-only uint16 blocks (memmaps are read-only;
    # numba would compile everything again for writable arrays) and writable queries.
    x = np.ascontiguousarray(x, dtype=np.uint16).view()
    x.flags.writeable = False
    if not queries.flags.writeable or queries.dtype != np.float32:
        queries = np.array(queries, dtype=np.float32, order="C")
    queries = np.ascontiguousarray(queries)
    n, k_dim = x.shape
    m = queries.shape[0]
    if out is None:
        out = np.empty((n, m), dtype=np.float64)
    res = out[:n]
    if res.shape != (n, m) or res.dtype != np.float64 or not res.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous (>= {n}, {m}) float64 array")
    if n == 0:
        return res
    if m == 1:
        kernel, q, target, kt = _scores_one_query, queries[0], res.reshape(n), _TILE_ONE_QUERY
        group = 1
    else:
        kernel, q, target, kt = _scores_multi_query, queries, res, _multi_query_tile(m, k_dim)
        group = 3  # the multi-query kernel takes rows by threes
    kt = min(kt, k_dim)
    threads = min(_num_threads(), n)
    if threads == 1 or x.nbytes < _MIN_PARALLEL_BYTES:
        kernel(x, q, target, kt)
        return res
    per = -(-n // threads)
    per = -(-per // group) * group
    bounds = [(lo, min(n, lo + per)) for lo in range(0, n, per)]
    pool = _thread_pool()
    futures = [pool.submit(kernel, x[lo:hi], q, target[lo:hi], kt) for lo, hi in bounds[1:]]
    lo, hi = bounds[0]
    kernel(x[lo:hi], q, target[lo:hi], kt)
    for f in futures:
        f.result()
    return res


# ----------------------------------------------------------------------------------------
# Bounded top-k / bottom-k heaps
# ----------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _ranks_before(s1, i1, s2, i2, top):  # pragma: no cover - compiled
    """Whether (score s1, id i1) ranks strictly before (s2, i2); NaN last, then lower id."""
    nan1 = s1 != s1
    nan2 = s2 != s2
    if nan1 or nan2:
        if nan1 and nan2:
            return i1 < i2
        return nan2
    if s1 != s2:
        return s1 > s2 if top else s1 < s2
    return i1 < i2


@njit(cache=True, nogil=True)
def _heap_offer(hs, hi, count, s, i, top):  # pragma: no cover - compiled
    """Offer (s, i) to a bounded heap whose root is the worst-ranked kept entry.

    Args:
        hs: (k,) float64 heap scores. hi: (k,) int64 heap ids.
        count: entries in use. Returns the new count.
    """
    cap = hs.shape[0]
    if count < cap:
        p = count
        while p > 0:  # sift up: a parent must rank after (be worse than) its children
            parent = (p - 1) // 2
            if _ranks_before(hs[parent], hi[parent], s, i, top):
                hs[p] = hs[parent]
                hi[p] = hi[parent]
                p = parent
            else:
                break
        hs[p] = s
        hi[p] = i
        return count + 1
    if cap == 0 or not _ranks_before(s, i, hs[0], hi[0], top):
        return count
    p = 0
    while True:  # sift down from the root with the new entry
        c = 2 * p + 1
        if c >= cap:
            break
        if c + 1 < cap and _ranks_before(hs[c], hi[c], hs[c + 1], hi[c + 1], top):
            c += 1  # the right child ranks later: it is the worse one
        if _ranks_before(s, i, hs[c], hi[c], top):
            hs[p] = hs[c]
            hi[p] = hi[c]
            p = c
        else:
            break
    hs[p] = s
    hi[p] = i
    return count


@njit(cache=True, nogil=True)
def _heaps_update(scores, ids, hs, hi, counts, top):  # pragma: no cover - compiled
    """Offer every row of a block to every query's heap.

    Serial: n * m cheap comparisons per block (most rows fail the root test) are noise
    next to the n * m * K multiply-adds of the scores.

    Args:
        scores: (n, m) float64. ids: (n,) int64 global row ids.
        hs: (m, k) float64, hi: (m, k) int64, counts: (m,) int64 heap state, updated.
    Returns:
        Number of NaN scores seen.
    """
    n, m = scores.shape
    nan_seen = 0
    for j in range(m):
        c = counts[j]
        hsj = hs[j]
        hij = hi[j]
        for r in range(n):
            s = scores[r, j]
            if s != s:
                nan_seen += 1
            c = _heap_offer(hsj, hij, c, s, ids[r], top)
        counts[j] = c
    return nan_seen


@njit(cache=True, nogil=True)
def _heaps_sorted(hs, hi, count, top):  # pragma: no cover - compiled
    """Drain each heap into best-first order. Returns (m, count) float64, int64 arrays."""
    m = hs.shape[0]
    out_s = np.empty((m, count), dtype=np.float64)
    out_i = np.empty((m, count), dtype=np.int64)
    for j in range(m):
        s = hs[j, :count].copy()
        ids = hi[j, :count].copy()
        c = count
        while c > 0:
            # the root is the worst remaining entry: it goes to the back
            out_s[j, c - 1] = s[0]
            out_i[j, c - 1] = ids[0]
            c -= 1
            last_s = s[c]
            last_i = ids[c]
            p = 0
            while True:
                ch = 2 * p + 1
                if ch >= c:
                    break
                if ch + 1 < c and _ranks_before(s[ch], ids[ch], s[ch + 1], ids[ch + 1], top):
                    ch += 1
                if _ranks_before(last_s, last_i, s[ch], ids[ch], top):
                    s[p] = s[ch]
                    ids[p] = ids[ch]
                    p = ch
                else:
                    break
            if c > 0:
                s[p] = last_s
                ids[p] = last_i
    return out_s, out_i


class _Heaps:
    """Running top-k (or bottom-k) of every query: (m, k) bounded heaps.

    The heap arrays grow with the rows seen up to k, so a large k over a small store
    costs no more memory than the store's rows (the kernel treats the array length as the
    bound, which is why the arrays are grown *before* a block could fill them).
    """

    def __init__(self, m: int, k: int, top: bool) -> None:
        self.top = top
        self.k = k
        cap = min(k, 1024)
        self.scores = np.empty((m, cap), dtype=np.float64)
        self.ids = np.empty((m, cap), dtype=np.int64)
        self.counts = np.zeros(m, dtype=np.int64)
        self.nan_seen = 0

    def offer(self, scores: np.ndarray, ids: np.ndarray) -> None:
        cap = self.scores.shape[1]
        if cap < self.k:
            need = min(self.k, int(self.counts.max(initial=0)) + scores.shape[0])
            if need > cap:
                new_cap = min(self.k, max(need, 2 * cap))
                m = self.scores.shape[0]
                grown_s = np.empty((m, new_cap), dtype=np.float64)
                grown_i = np.empty((m, new_cap), dtype=np.int64)
                grown_s[:, :cap] = self.scores  # a heap stays a heap when its array grows
                grown_i[:, :cap] = self.ids
                self.scores, self.ids = grown_s, grown_i
        self.nan_seen += int(
            _heaps_update(scores, ids, self.scores, self.ids, self.counts, self.top)
        )

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        count = int(self.counts[0]) if self.counts.size else 0
        s, i = _heaps_sorted(self.scores, self.ids, count, self.top)
        return i, s.astype(np.float32)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


@dataclass
class ScanResult:
    """Result of :func:`scan`.

    Attributes:
        top_ids: (m, k') int64 global row ids, best first; k' = min(k, rows_scanned).
        top_scores: (m, k') float32 scores matching ``top_ids``.
        bottom_ids: (m, k') int64, lowest score first, or None without ``bottom=True``.
        bottom_scores: (m, k') float32 or None.
        rows_scanned: rows seen in the blocks.
    """

    top_ids: np.ndarray
    top_scores: np.ndarray
    bottom_ids: np.ndarray | None
    bottom_scores: np.ndarray | None
    rows_scanned: int


def _as_queries(queries: np.ndarray) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] == 0:
        raise DataError(f"queries must be (m, K) or (K,) with m, K >= 1, got shape {q.shape}")
    if not np.issubdtype(q.dtype, np.floating):
        raise DataError(f"queries must be floating point, got {q.dtype}")
    return np.array(q, dtype=np.float32, order="C")  # own writable copy (m * K * 4 bytes)


def _as_block(block: np.ndarray, k_dim: int) -> np.ndarray:
    """View a yielded block as a C-contiguous (n, K) uint16 ndarray (no copy if possible)."""
    x = np.asarray(block)  # drops the np.memmap subclass, keeps the mapping
    if x.dtype == np.float16:
        x = x.view(np.uint16)
    if x.dtype != np.uint16:
        raise DataError(f"store blocks must hold fp16 bit patterns (uint16), got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != k_dim:
        raise DataError(f"store block has shape {x.shape}, queries need (n, {k_dim})")
    if not x.flags.c_contiguous:
        logger.debug("copying a non-contiguous block of shape %s", x.shape)
        x = np.ascontiguousarray(x)
    return x


def _resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise SettingsError(
            f"unknown scan engine {engine!r}: use --engine cpu, --engine gpu or --engine auto"
        )
    if engine == "cpu":
        return "cpu"
    cuda = _cuda_available()
    if engine == "gpu" and not cuda:
        raise SettingsError("--engine gpu needs torch with a CUDA GPU; use --engine cpu")
    return "gpu" if cuda else "cpu"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _progress_bar(blocks: Iterable, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    total = getattr(blocks, "total_rows", None)
    return tqdm(total=total, unit="row", unit_scale=True, desc="scan", smoothing=0.1)


def scan(
    queries: np.ndarray,
    blocks: Iterable[tuple[int, np.ndarray]],
    k: int,
    *,
    bottom: bool = False,
    engine: str = "cpu",
    progress: bool = False,
    row_scale: np.ndarray | None = None,
) -> ScanResult:
    """Exact top-k (and bottom-k) rows by inner product, streaming the store once.

    Args:
        queries: (m, K) float32 query vectors, or (K,) for m = 1. Other float dtypes are
            converted to float32.
        blocks: iterable of ``(row_start, block)`` in increasing, non-overlapping row order;
            ``block`` is an (n, K) uint16 array of fp16 bit patterns (float16 accepted),
            typically a memmapped chunk from :func:`iter_raw_chunks`. Row ids are
            ``row_start + local index``. Consumed lazily: a generator that yields more
            blocks while the scan runs is fine, the result covers exactly the rows seen.
        k: list length per query (>= 0); fewer rows than k gives k' = rows scanned.
        bottom: also return the k lowest-scoring rows.
        engine: ``"cpu"`` (numba), ``"gpu"`` (torch CUDA streaming) or ``"auto"``.
        progress: show a tqdm bar over rows.
        row_scale: optional (N,) float factor per global row id; row i's scores are
            multiplied by ``row_scale[i]`` before ranking (``query --score cosine`` passes
            the inverse gradient norms). Must cover every row id the blocks hold.

    Returns:
        A :class:`ScanResult`; see the module docstring for ordering, ties and NaN.

    Raises:
        SettingsError: unknown engine, ``gpu`` without CUDA, negative k.
        DataError: malformed queries or blocks, blocks out of row order.
    """
    q = _as_queries(queries)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise SettingsError(f"k must be a non-negative integer, got {k!r}")
    k = int(k)
    if row_scale is not None:
        row_scale = np.ascontiguousarray(row_scale, dtype=np.float64).reshape(-1)
    resolved = _resolve_engine(engine)
    if resolved == "gpu":
        return _scan_torch(
            q, blocks, k, bottom=bottom, device="cuda", progress=progress, row_scale=row_scale
        )
    return _scan_cpu(q, blocks, k, bottom=bottom, progress=progress, row_scale=row_scale)


def _check_scale(row_scale: np.ndarray | None, stop: int) -> None:
    if row_scale is not None and stop > row_scale.size:
        raise DataError(f"row_scale covers {row_scale.size} rows, the store has row {stop - 1}")


def _scan_cpu(
    q: np.ndarray,
    blocks: Iterable[tuple[int, np.ndarray]],
    k: int,
    *,
    bottom: bool,
    progress: bool,
    row_scale: np.ndarray | None = None,
) -> ScanResult:
    m, k_dim = q.shape
    top = _Heaps(m, k, top=True)
    low = _Heaps(m, k, top=False) if bottom else None
    score_buf = np.empty((_MAX_KERNEL_ROWS, m), dtype=np.float64)
    rows = 0
    next_row = None
    t_start = time.perf_counter()
    bar = _progress_bar(blocks, progress)
    try:
        for row_start, block in blocks:
            x = _as_block(block, k_dim)
            n = x.shape[0]
            row_start = int(row_start)
            if next_row is not None and row_start < next_row:
                raise DataError(
                    f"store blocks out of order: block at row {row_start} overlaps rows "
                    f"before {next_row}"
                )
            next_row = row_start + n
            if n == 0:
                continue
            _check_scale(row_scale, next_row)
            t0 = time.perf_counter()
            t_select = 0.0
            for s0 in range(0, n, _MAX_KERNEL_ROWS):
                s1 = min(n, s0 + _MAX_KERNEL_ROWS)
                scores = block_scores(x[s0:s1], q, score_buf)
                ids = np.arange(row_start + s0, row_start + s1, dtype=np.int64)
                if row_scale is not None:
                    scores *= row_scale[row_start + s0 : row_start + s1, None]
                ts = time.perf_counter()
                top.offer(scores, ids)
                if low is not None:
                    low.offer(scores, ids)
                t_select += time.perf_counter() - ts
            dt = time.perf_counter() - t0
            rows += n
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "rows %d..%d: %.2f ms (%.2f GB/s), selection %.2f ms",
                    row_start,
                    row_start + n,
                    dt * 1e3,
                    x.nbytes / max(dt, 1e-9) / 1e9,
                    t_select * 1e3,
                )
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_start
    logger.debug("scanned %d rows x %d queries in %.3f s", rows, m, elapsed)
    nan_seen = top.nan_seen
    if nan_seen:
        logger.warning(
            "%d NaN scores in the scan (NaN in the store or queries); they rank last", nan_seen
        )
    top_ids, top_scores = top.result()
    bottom_ids = bottom_scores = None
    if low is not None:
        bottom_ids, bottom_scores = low.result()
    return ScanResult(top_ids, top_scores, bottom_ids, bottom_scores, rows)


# ----------------------------------------------------------------------------------------
# GPU engine (torch)
# ----------------------------------------------------------------------------------------

# Bytes of store rows per host->device transfer: large enough that copy and kernel
# launch overheads vanish, small enough for two pinned + two device buffers anywhere.
_GPU_STAGE_BYTES = 64 * 1024 * 1024


def _torch_merge(best_s, best_i, s, ids, k: int, top: bool):
    """Merge a block into a running list on the device; exact order, lower id on ties.

    Args:
        best_s: (m, j) float32 running scores, best first. best_i: (m, j) int64 ids.
        s: (m, n) float32 block scores. ids: (n,) int64 block row ids.
        k: list length. top: descending (True) or ascending (False) scores.

    Returns:
        (scores, ids), each (m, min(k, j + n)), best first.
    """
    import torch

    cand_s = torch.cat([best_s, s], dim=1)
    cand_i = torch.cat([best_i, ids.unsqueeze(0).expand(s.shape[0], -1)], dim=1)
    # Three stable sorts give the order (NaN last, score, id): sort by the least
    # significant key first; stable sorts keep the earlier order among equal keys.
    order = torch.argsort(cand_i, dim=1, stable=True)
    cand_s, cand_i = cand_s.gather(1, order), cand_i.gather(1, order)
    order = torch.argsort(cand_s, dim=1, descending=top, stable=True)
    cand_s, cand_i = cand_s.gather(1, order), cand_i.gather(1, order)
    order = torch.argsort(torch.isnan(cand_s).to(torch.int8), dim=1, stable=True)
    cand_s, cand_i = cand_s.gather(1, order), cand_i.gather(1, order)
    return cand_s[:, :k].contiguous(), cand_i[:, :k].contiguous()


def _scan_torch(
    q: np.ndarray,
    blocks: Iterable[tuple[int, np.ndarray]],
    k: int,
    *,
    bottom: bool,
    device: str,
    progress: bool,
    row_scale: np.ndarray | None = None,
) -> ScanResult:
    """Streaming scan with torch: pinned staging, double-buffered copies on a side stream.

    The CPU fills pinned buffer ``i`` while the GPU copies and scores buffer ``1 - i``;
    events order the reuse of each buffer, so the store can be any size (the device holds
    two stage buffers, the queries and the running lists). On a CPU device the same code
    runs without streams and pinning (used by the tests).
    """
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    m, k_dim = q.shape
    stage_rows = max(1, min(_MAX_KERNEL_ROWS, _GPU_STAGE_BYTES // (2 * k_dim)))
    qd = torch.from_numpy(q).to(dev)
    host = [torch.empty((stage_rows, k_dim), dtype=torch.int16, pin_memory=cuda) for _ in range(2)]
    host_ids = [torch.empty(stage_rows, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
    if cuda:
        devbuf = [torch.empty((stage_rows, k_dim), dtype=torch.int16, device=dev) for _ in range(2)]
        dev_ids = [torch.empty(stage_rows, dtype=torch.int64, device=dev) for _ in range(2)]
        copy_stream = torch.cuda.Stream(dev)
        compute_stream = torch.cuda.current_stream(dev)
        copied = [torch.cuda.Event() for _ in range(2)]
        consumed = [torch.cuda.Event() for _ in range(2)]
    else:
        devbuf, dev_ids = host, host_ids
    state = {
        "top": (
            torch.empty((m, 0), dtype=torch.float32, device=dev),
            torch.empty((m, 0), dtype=torch.int64, device=dev),
        ),
    }
    if bottom:
        state["bottom"] = state["top"]
    nan_count = torch.zeros((), dtype=torch.int64, device=dev)
    scale_d = None if row_scale is None else torch.from_numpy(row_scale).to(dev)

    def dispatch(slot: int, n: int) -> None:
        nonlocal nan_count
        if cuda:
            with torch.cuda.stream(copy_stream):
                # the device buffer must be free: scoring of its previous contents done
                copy_stream.wait_event(consumed[slot])
                devbuf[slot][:n].copy_(host[slot][:n], non_blocking=True)
                dev_ids[slot][:n].copy_(host_ids[slot][:n], non_blocking=True)
                copied[slot].record(copy_stream)
            compute_stream.wait_event(copied[slot])
        x = devbuf[slot][:n].view(torch.float16).float()
        s = qd @ x.T  # (m, n) float32
        ids = dev_ids[slot][:n]
        if scale_d is not None:
            s = (s.double() * scale_d[ids]).float()
        nan_count += torch.isnan(s).sum()
        for key in state:
            state[key] = _torch_merge(*state[key], s, ids, k, top=(key == "top"))
        if cuda:
            consumed[slot].record(compute_stream)

    rows = 0
    slot = 0
    fill = 0
    next_row = None
    bar = _progress_bar(blocks, progress)
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: exact float32 products
    t_start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # read-only memmaps: torch warns about non-writable arrays; we only read them
            warnings.filterwarnings("ignore", message=".*not writable.*")
            for row_start, block in blocks:
                x = _as_block(block, k_dim)
                n = x.shape[0]
                row_start = int(row_start)
                if next_row is not None and row_start < next_row:
                    raise DataError(
                        f"store blocks out of order: block at row {row_start} overlaps rows "
                        f"before {next_row}"
                    )
                next_row = row_start + n
                _check_scale(row_scale, next_row)
                src = torch.from_numpy(x.view(np.int16))
                off = 0
                while off < n:
                    if fill == 0 and cuda:
                        copied[slot].synchronize()  # host buffer free for overwriting
                    take = min(n - off, stage_rows - fill)
                    host[slot][fill : fill + take].copy_(src[off : off + take])
                    host_ids[slot][fill : fill + take] = torch.arange(
                        row_start + off, row_start + off + take, dtype=torch.int64
                    )
                    fill += take
                    off += take
                    if fill == stage_rows:
                        dispatch(slot, fill)
                        slot, fill = 1 - slot, 0
                rows += n
                if bar is not None:
                    bar.update(n)
            if fill:
                dispatch(slot, fill)
        if cuda:
            torch.cuda.synchronize(dev)
    finally:
        torch.set_float32_matmul_precision(prec)
        if bar is not None:
            bar.close()
    logger.debug("gpu scan of %d rows in %.3f s", rows, time.perf_counter() - t_start)
    if int(nan_count):
        logger.warning(
            "%d NaN scores in the scan (NaN in the store or queries); they rank last",
            int(nan_count),
        )
    top_s, top_i = state["top"]
    result = ScanResult(top_i.cpu().numpy(), top_s.cpu().numpy(), None, None, rows)
    if bottom:
        low_s, low_i = state["bottom"]
        result.bottom_ids = low_i.cpu().numpy()
        result.bottom_scores = low_s.cpu().numpy()
    return result


# ----------------------------------------------------------------------------------------
# Raw chunk files
# ----------------------------------------------------------------------------------------


def _mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# madvise(MADV_POPULATE_READ) (Linux >= 5.14): fault a whole range in, one system call.
_MADV_POPULATE_READ = 22


def _libc_madvise():
    """libc ``madvise`` through ctypes, which releases the GIL during the call.

    ``mmap.mmap.madvise`` holds the GIL, so a populate that waits for the disk would stall
    the thread that feeds the kernels; through ctypes it overlaps with them.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


class _MappedChunk:
    """One chunk file mapped read-only, with its (valid_rows, K) uint16 view."""

    __slots__ = ("path", "row_start", "file", "mm", "block")

    def __init__(self, path: str, row_start: int, file, mm, block: np.ndarray) -> None:
        self.path = path
        self.row_start = row_start
        self.file = file
        self.mm = mm
        self.block = block


class RawChunkIterator(Iterator[tuple[int, np.ndarray]]):
    """Iterator over raw fp16 chunk files as ``(row_start, (valid_rows, K) uint16)`` blocks.

    Made by :func:`iter_raw_chunks`. A background thread prepares the next file while the
    consumer works on the current one: it maps the file read-only, asks for huge pages
    (``MADV_HUGEPAGE``: the page cache then holds the file in 2 MiB folios that later scans
    map with one page-table entry each instead of 512; on this VM that made warm scans
    2.5x faster) and faults the whole mapping in with one ``MADV_POPULATE_READ`` (reading
    it from disk if needed). The consumer so never takes page faults, and disk reads of a
    cold store overlap the scan of the previous chunk.

    When the consumer asks for the next block, the previous mapping's pages are released
    (``MADV_DONTNEED``, then unmapped unless the consumer still holds the array), so at most
    two chunks are resident whatever the store size. With ``drop_cache`` the file's
    page-cache pages are dropped as well (``POSIX_FADV_DONTNEED``), which keeps a
    larger-than-RAM store from evicting everything else on the machine.

    Attributes:
        total_rows: sum of the valid rows of all files (for progress bars).
        total_bytes: bytes of valid rows of all files.
        drop_cache: whether page-cache pages are dropped after each file.
    """

    def __init__(
        self, files: Sequence[tuple[str, int, int]], k_dim: int, drop_cache: bool | None = None
    ) -> None:
        if k_dim <= 0:
            raise SettingsError(f"K must be positive, got {k_dim}")
        self._files = [(os.fspath(p), int(r0), int(nv)) for p, r0, nv in files]
        self._k = int(k_dim)
        self.total_rows = sum(nv for _, _, nv in self._files)
        self.total_bytes = self.total_rows * self._k * 2
        if drop_cache is None:
            # A store over half the RAM cannot stay cached between scans anyway.
            mem = _mem_total_bytes()
            drop_cache = bool(mem) and self.total_bytes > mem // 2
        self.drop_cache = bool(drop_cache)
        self._gen = self._generate()

    def __next__(self) -> tuple[int, np.ndarray]:
        return next(self._gen)

    def __iter__(self) -> RawChunkIterator:
        return self

    def close(self) -> None:
        """Release the mapped chunks (also done when the iterator is exhausted)."""
        self._gen.close()

    def _map(self, index: int) -> _MappedChunk:
        """Map chunk ``index`` and fault it in (runs on the prefetch thread)."""
        path, row_start, valid_rows = self._files[index]
        row_bytes = 2 * self._k
        f = open(path, "rb")  # noqa: SIM115 - closed in _release
        try:
            size = os.fstat(f.fileno()).st_size
            if size % row_bytes:
                raise StoreError(
                    f"chunk file {path} has {size} bytes, not a multiple of a row "
                    f"({row_bytes} bytes for K={self._k})"
                )
            if valid_rows > size // row_bytes:
                raise StoreError(
                    f"chunk file {path} holds {size // row_bytes} rows, the store says "
                    f"{valid_rows} are valid"
                )
            mm = mmap.mmap(f.fileno(), valid_rows * row_bytes, prot=mmap.PROT_READ)
        except BaseException:
            f.close()
            raise
        for advice in ("MADV_HUGEPAGE", "MADV_SEQUENTIAL"):
            if hasattr(mmap, advice):
                with contextlib.suppress(OSError, ValueError):
                    mm.madvise(getattr(mmap, advice))
        block = np.frombuffer(mm, dtype=np.uint16).reshape(valid_rows, self._k)
        populated = False
        if _madvise is not None:
            populated = _madvise(block.ctypes.data, block.nbytes, _MADV_POPULATE_READ) == 0
        if not populated:  # older kernel: at least start the readahead
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_WILLNEED)
        return _MappedChunk(path, row_start, f, mm, block)

    def _release(self, chunk: _MappedChunk) -> None:
        mm = chunk.mm
        length = len(mm)
        chunk.block = None
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED)  # drop our page-table entries: RSS goes down
        if self.drop_cache and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(chunk.file.fileno(), 0, length, os.POSIX_FADV_DONTNEED)
        with contextlib.suppress(BufferError):
            mm.close()  # fails while the consumer holds the block: unmapped when it lets go
        chunk.file.close()

    def _generate(self) -> Iterator[tuple[int, np.ndarray]]:
        todo = [i for i, (_, _, valid_rows) in enumerate(self._files) if valid_rows > 0]
        if not todo:
            return
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rapidin-chunks")
        pending = prefetch.submit(self._map, todo[0])
        try:
            for pos in range(len(todo)):
                chunk = pending.result()
                pending = prefetch.submit(self._map, todo[pos + 1]) if pos + 1 < len(todo) else None
                try:
                    yield chunk.row_start, chunk.block
                finally:
                    self._release(chunk)
        finally:
            if pending is not None:  # closed early: unmap the chunk prepared ahead
                with contextlib.suppress(Exception):
                    self._release(pending.result())
            prefetch.shutdown(wait=True)


def iter_raw_chunks(
    files: Sequence[tuple[str, int, int]], K: int, *, drop_cache: bool | None = None
) -> RawChunkIterator:
    """Blocks of a store kept as raw fp16 chunk files, for :func:`scan`.

    Args:
        files: ``(path, row_start, valid_rows)`` per chunk file, in row order. A file is
            raw little-endian fp16, C-order, shape (rows_in_file, K); only its first
            ``valid_rows`` rows are used (the last chunk may be partly filled).
        K: columns of the store.
        drop_cache: drop each file's page-cache pages after use. None (default): only for
            stores larger than half the physical RAM.

    Returns:
        An iterator of ``(row_start, block)`` with ``block`` a (valid_rows, K) uint16
        read-only view of the mapped file. Its pages are released when the next item is
        requested (a block still referenced then stays valid and is re-read on access).
        It has ``total_rows`` for progress bars.

    Raises:
        StoreError: a file whose size is not whole rows or is shorter than ``valid_rows``.
    """
    return RawChunkIterator(files, K, drop_cache=drop_cache)
