"""Tests of the exact top-k scan (rapidin_index.scan).

Most stores hold small integers (exact in fp16, and every dot product is an exact integer
in float32 and float64), so the scan must reproduce the brute-force ids *and* scores
exactly, ties included; a float store checks the same against a tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

from rapidin_index import scan as scan_mod
from rapidin_index.errors import DataError, SettingsError, StoreError
from rapidin_index.scan import ScanResult, decode_f16_bits, iter_raw_chunks, scan


def int_store(rng: np.random.Generator, n: int, k_dim: int, lo: int = -8, hi: int = 8):
    """(n, K) uint16 fp16 bit patterns of small integers."""
    return rng.integers(lo, hi + 1, size=(n, k_dim)).astype(np.float16).view(np.uint16)


def int_queries(rng: np.random.Generator, m: int, k_dim: int) -> np.ndarray:
    return rng.integers(-4, 5, size=(m, k_dim)).astype(np.float32)


def as_blocks(store: np.ndarray, chunk: int, start: int = 0):
    return [(start + r0, store[r0 : r0 + chunk]) for r0 in range(0, store.shape[0], chunk)]


def reference(queries, store, k, *, top=True, row_start=0):
    """Brute force: float64 scores, order (NaN last, score, lower id)."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    scores = q @ store.view(np.float16).astype(np.float64).T
    ids = np.arange(store.shape[0]) + row_start
    out_ids, out_scores = [], []
    for s in scores:
        key = -s if top else s
        order = np.lexsort((ids, key, np.isnan(s)))[:k]
        out_ids.append(ids[order])
        out_scores.append(s[order])
    return np.array(out_ids, dtype=np.int64), np.array(out_scores)


def assert_exact(result: ScanResult, queries, store, k, *, bottom=False, row_start=0):
    ids, scores = reference(queries, store, k, row_start=row_start)
    np.testing.assert_array_equal(result.top_ids, ids)
    np.testing.assert_array_equal(result.top_scores, scores.astype(np.float32))
    assert result.top_ids.dtype == np.int64 and result.top_scores.dtype == np.float32
    if bottom:
        ids, scores = reference(queries, store, k, top=False, row_start=row_start)
        np.testing.assert_array_equal(result.bottom_ids, ids)
        np.testing.assert_array_equal(result.bottom_scores, scores.astype(np.float32))
    else:
        assert result.bottom_ids is None and result.bottom_scores is None


@pytest.mark.parametrize(
    ("n", "k_dim", "k", "m", "chunk"),
    [
        (1, 64, 1, 1, 128),  # one row
        (200, 96, 10, 1, 64),  # ragged last block (200 = 3 * 64 + 8)
        (200, 1000, 7, 2, 50),
        (301, 257, 20, 3, 37),  # odd K, odd m
        (150, 513, 160, 5, 64),  # k > N: k' = N
        (97, 4096, 5, 16, 13),  # m = 16, blocks not a multiple of the row group
        (700, 4096, 25, 7, 512),  # blocks over 1 MiB: rows split across threads
        (640, 2048, 12, 1, 640),  # one query, threads
        (64, 300, 3, 64, 64),  # m = 64
    ],
)
def test_scan_topk_and_bottomk_match_numpy_bruteforce(n, k_dim, k, m, chunk):
    rng = np.random.default_rng(n * 7919 + k_dim + m)
    store = int_store(rng, n, k_dim)
    queries = int_queries(rng, m, k_dim)
    result = scan(queries, as_blocks(store, chunk), k, bottom=True)
    assert result.rows_scanned == n
    assert result.top_ids.shape == (m, min(k, n))
    assert_exact(result, queries, store, k, bottom=True)


def test_scan_float_store_matches_float64_reference_within_rounding():
    rng = np.random.default_rng(3)
    n, k_dim, m, k = 500, 8192, 6, 15
    store = (rng.standard_normal((n, k_dim)) * 0.05).astype(np.float16).view(np.uint16)
    queries = rng.standard_normal((m, k_dim)).astype(np.float32)
    result = scan(queries, as_blocks(store, 128), k, bottom=True)
    exact = queries.astype(np.float64) @ store.view(np.float16).astype(np.float64).T
    tol = 1e-5 * np.abs(exact).max()
    for j in range(m):
        got = exact[j, result.top_ids[j]]
        np.testing.assert_allclose(result.top_scores[j], got, rtol=1e-6, atol=tol)
        want = np.sort(exact[j])[::-1][:k]
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)  # same ranks up to rounding
        low = exact[j, result.bottom_ids[j]]
        np.testing.assert_allclose(low, np.sort(exact[j])[:k], rtol=0, atol=tol)


def test_scan_accepts_1d_query_and_float16_blocks():
    rng = np.random.default_rng(5)
    store = int_store(rng, 90, 128)
    q = int_queries(rng, 1, 128)
    blocks = [(r0, b.view(np.float16)) for r0, b in as_blocks(store, 32)]
    result = scan(q[0], blocks, 4)
    assert result.top_ids.shape == (1, 4)
    assert_exact(result, q, store, 4)


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_duplicate_rows_tie_break_by_lower_id(m):
    rng = np.random.default_rng(11 + m)
    k_dim = 3000
    base = (rng.standard_normal((5, k_dim)) * 0.1).astype(np.float16).view(np.uint16)
    # each distinct row repeated at scattered positions: different blocks, different slots
    # of the 3-row groups, both thread ranges
    pattern = rng.integers(0, 5, size=400)
    store = base[pattern]
    queries = rng.standard_normal((m, k_dim)).astype(np.float32)
    k = 60
    result = scan(queries, as_blocks(store, 128), k, bottom=True)
    for j in range(m):
        for ids, scores, sign in (
            (result.top_ids[j], result.top_scores[j], -1),
            (result.bottom_ids[j], result.bottom_scores[j], 1),
        ):
            # scores move monotonically, equal rows give equal scores, ids rise in a tie
            assert np.all(np.diff(scores) * sign >= 0)
            for a in range(k - 1):
                if pattern[ids[a]] == pattern[ids[a + 1]]:
                    assert scores[a] == scores[a + 1]
                    assert ids[a] < ids[a + 1]
            # the best distinct row's copies come first, lowest ids first
            first = pattern[ids[0]]
            copies = np.flatnonzero(pattern == first)
            np.testing.assert_array_equal(ids[: min(k, copies.size)], copies[:k])


def test_integer_ties_are_ordered_by_lower_id_across_blocks():
    rng = np.random.default_rng(2)
    store = int_store(rng, 333, 40, lo=-1, hi=1)  # few distinct scores: many ties
    queries = int_queries(rng, 3, 40)
    result = scan(queries, as_blocks(store, 17), 200, bottom=True)
    assert_exact(result, queries, store, 200, bottom=True)


@pytest.mark.parametrize("hardware", [False, True])
def test_f16_decoding_exact_for_all_65536_bit_patterns(hardware):
    if hardware and not scan_mod._host_has_hw_f16():
        pytest.skip("no fp16 conversion instruction on this CPU")
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = decode_f16_bits(bits, hardware=hardware)
    want = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    assert finite.sum() == 63488
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf])  # +inf and -inf
    nan = np.isnan(want)
    assert nan.sum() == 2046 and np.isnan(got[nan]).all()


def test_nan_scores_rank_last_in_both_lists_and_inf_ranks_at_the_ends():
    rng = np.random.default_rng(4)
    k_dim = 64
    store = int_store(rng, 20, k_dim, lo=0, hi=2).view(np.float16).copy()
    store[3, 5] = np.nan  # NaN score
    store[7, 0] = np.inf  # +inf score for a positive query
    store[9, 0] = -np.inf  # -inf score
    store[12, 1] = np.inf
    store[12, 2] = -np.inf  # inf - inf: NaN score
    queries = np.ones((1, k_dim), dtype=np.float32)
    result = scan(queries, as_blocks(store.view(np.uint16), 8), 20, bottom=True)
    assert result.top_ids[0, 0] == 7 and np.isposinf(result.top_scores[0, 0])
    assert result.top_ids[0, 17] == 9 and np.isneginf(result.top_scores[0, 17])
    np.testing.assert_array_equal(result.top_ids[0, 18:], [3, 12])
    assert result.bottom_ids[0, 0] == 9 and result.bottom_ids[0, 17] == 7
    np.testing.assert_array_equal(result.bottom_ids[0, 18:], [3, 12])
    assert np.isnan(result.top_scores[0, 18:]).all()
    # with k below the non-NaN count, NaN rows never appear
    short = scan(queries, as_blocks(store.view(np.uint16), 8), 18, bottom=True)
    assert not np.isin([3, 12], short.top_ids).any()
    assert not np.isin([3, 12], short.bottom_ids).any()


def test_scan_of_a_store_grown_during_the_scan_covers_exactly_the_rows_seen():
    rng = np.random.default_rng(8)
    k_dim = 256
    queries = int_queries(rng, 4, k_dim)
    chunks = [int_store(rng, 50, k_dim)]
    yielded = []

    def growing_store():
        i = 0
        row = 0
        while i < len(chunks):
            block = chunks[i]
            yielded.append(block)
            yield row, block
            row += block.shape[0]
            if len(chunks) < 5:  # rows appended by a writer while the scan runs
                chunks.append(int_store(rng, 30 + 7 * len(chunks), k_dim))
            i += 1

    result = scan(queries, growing_store(), 40, bottom=True)
    seen = np.concatenate(yielded)
    assert len(yielded) == 5
    assert result.rows_scanned == seen.shape[0] == 50 + 37 + 44 + 51 + 58
    assert_exact(result, queries, seen, 40, bottom=True)


def test_large_k_grows_the_lists_with_the_rows_seen():
    rng = np.random.default_rng(21)
    store = int_store(rng, 3000, 16, lo=-2, hi=2)
    q = int_queries(rng, 2, 16)
    result = scan(q, as_blocks(store, 100), 2500, bottom=True)
    assert_exact(result, q, store, 2500, bottom=True)
    huge = scan(q, as_blocks(store[:50], 10), 10**12)  # no (m, k) preallocation
    assert huge.top_ids.shape == (2, 50)
    assert_exact(huge, q, store[:50], 50)


def test_empty_store_and_k_zero_give_empty_lists():
    q = np.ones((3, 16), dtype=np.float32)
    empty = scan(q, [], 5, bottom=True)
    assert empty.rows_scanned == 0
    assert empty.top_ids.shape == (3, 0) and empty.bottom_scores.shape == (3, 0)
    store = int_store(np.random.default_rng(0), 10, 16)
    zero = scan(q, as_blocks(store, 4), 0)
    assert zero.rows_scanned == 10 and zero.top_ids.shape == (3, 0)


def test_row_ids_are_global_row_start_plus_local_index():
    rng = np.random.default_rng(9)
    store = int_store(rng, 45, 32)
    q = int_queries(rng, 2, 32)
    result = scan(q, as_blocks(store, 10, start=1000), 7, bottom=True)
    assert_exact(result, q, store, 7, bottom=True, row_start=1000)


@pytest.mark.parametrize("engine", ["cuda", "GPU", "", "numba"])
def test_unknown_engine_raises_value_error_naming_the_flag(engine):
    with pytest.raises(ValueError, match="--engine"):
        scan(np.ones(8, np.float32), [], 3, engine=engine)


def test_malformed_inputs_raise_data_or_settings_errors():
    q = np.ones((2, 8), dtype=np.float32)
    good = np.zeros((4, 8), dtype=np.uint16)
    with pytest.raises(DataError, match="shape"):
        scan(q, [(0, np.zeros((4, 9), dtype=np.uint16))], 3)
    with pytest.raises(DataError, match="uint16"):
        scan(q, [(0, np.zeros((4, 8), dtype=np.float32))], 3)
    with pytest.raises(DataError, match="order"):
        scan(q, [(0, good), (2, good)], 3)
    with pytest.raises(SettingsError):
        scan(q, [(0, good)], -1)
    with pytest.raises(DataError):
        scan(np.ones((0, 8), np.float32), [(0, good)], 3)


def write_chunks(tmp_path, store: np.ndarray, rows_per_chunk: int):
    """Raw fp16 chunk files; the last one full-size with NaN garbage past the valid rows."""
    files = []
    for i, r0 in enumerate(range(0, store.shape[0], rows_per_chunk)):
        part = store[r0 : r0 + rows_per_chunk]
        full = np.full((rows_per_chunk, store.shape[1]), 0x7E00, dtype=np.uint16)  # NaN
        full[: part.shape[0]] = part
        path = tmp_path / f"chunk_{i:04d}.f16"
        full.astype("<u2").tofile(path)
        files.append((str(path), r0, part.shape[0]))
    return files


def test_iter_raw_chunks_scans_valid_rows_only(tmp_path):
    rng = np.random.default_rng(6)
    store = int_store(rng, 230, 100)
    files = write_chunks(tmp_path, store, 64)
    assert files[-1][2] == 230 - 3 * 64
    q = int_queries(rng, 3, 100)
    chunks = iter_raw_chunks(files, 100)
    assert chunks.total_rows == 230
    result = scan(q, chunks, 230, bottom=True)
    assert result.rows_scanned == 230
    assert_exact(result, q, store, 230, bottom=True)  # no NaN row from the invalid tail


def mapped_paths() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split()) >= 6}


def test_iter_raw_chunks_unmaps_each_chunk_when_the_next_is_requested(tmp_path):
    store = int_store(np.random.default_rng(1), 40, 64)
    files = write_chunks(tmp_path, store, 16)
    it = iter_raw_chunks(files, 64, drop_cache=True)
    row0, block0 = next(it)
    assert row0 == 0 and block0.shape == (16, 64) and not block0.flags.writeable
    np.testing.assert_array_equal(block0, store[:16])
    del block0
    assert files[0][0] in mapped_paths()
    row1, block1 = next(it)
    assert row1 == 16
    assert files[0][0] not in mapped_paths()  # released after use
    del block1
    it.close()
    # the current chunk and the one prepared ahead are both gone
    assert not {path for path, _, _ in files} & mapped_paths()


def test_iter_raw_chunks_rejects_short_or_torn_files(tmp_path):
    path = tmp_path / "torn.f16"
    np.zeros(10 * 8 + 3, dtype=np.uint16).tofile(path)
    with pytest.raises(StoreError, match="multiple"):
        next(iter_raw_chunks([(str(path), 0, 10)], 8))
    np.zeros(10 * 8, dtype=np.uint16).tofile(path)
    with pytest.raises(StoreError, match="valid"):
        next(iter_raw_chunks([(str(path), 0, 11)], 8))


def test_torch_streaming_engine_equals_cpu_engine_on_cpu_device():
    pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    store = int_store(rng, 300, 128, lo=-2, hi=2)  # many ties
    q = int_queries(rng, 3, 128)
    cpu = scan(q, as_blocks(store, 70), 50, bottom=True)
    via_torch = scan_mod._scan_torch(
        q, as_blocks(store, 70), 50, bottom=True, device="cpu", progress=False
    )
    for name in ("top_ids", "top_scores", "bottom_ids", "bottom_scores"):
        np.testing.assert_array_equal(getattr(via_torch, name), getattr(cpu, name))
    assert via_torch.rows_scanned == 300


def test_progress_bar_counts_rows(capsys):
    store = int_store(np.random.default_rng(0), 30, 16)
    result = scan(np.ones(16, np.float32), as_blocks(store, 8), 2, progress=True)
    assert result.rows_scanned == 30
    assert "30" in capsys.readouterr().err


@pytest.mark.cuda
def test_gpu_engine_equals_cpu_engine():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    rng = np.random.default_rng(13)
    k_dim = 4096
    store = int_store(rng, 3000, k_dim, lo=-3, hi=3)
    store[1500:1510] = store[17]  # duplicates: ties broken by the lower id
    q = int_queries(rng, 16, k_dim)
    # stages of a few rows force many double-buffered transfers
    old = scan_mod._GPU_STAGE_BYTES
    scan_mod._GPU_STAGE_BYTES = 97 * 2 * k_dim
    try:
        gpu = scan(q, as_blocks(store, 128), 100, bottom=True, engine="gpu")
    finally:
        scan_mod._GPU_STAGE_BYTES = old
    cpu = scan(q, as_blocks(store, 128), 100, bottom=True, engine="cpu")
    for name in ("top_ids", "top_scores", "bottom_ids", "bottom_scores"):
        np.testing.assert_array_equal(getattr(gpu, name), getattr(cpu, name))
    assert scan(q, as_blocks(store, 128), 5, engine="auto").rows_scanned == 3000
