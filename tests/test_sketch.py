"""RapidGrad transform: determinism, fidelity, and the settings it refuses."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from rapidin_index.errors import SettingsError
from rapidin_index.sketch import RapidGradSketch, SketchSettings, plan_divisors, rademacher_bits


def _reference_transform(v: np.ndarray, sketch: RapidGradSketch) -> np.ndarray:
    """Algorithm 1 + signs + block sums written out with plain numpy indexing."""
    from rapidin_index.sketch import _permutation

    x = np.zeros(sketch.padded_dim, dtype=np.float64)
    x[: v.size] = v
    for r, (x_row, x_col) in enumerate(sketch.divisors):
        x = x.reshape(x_row, -1)[_permutation(sketch.settings.seed, r, 0, x_row)].reshape(-1)
        x = x.reshape(-1, x_col)[:, _permutation(sketch.settings.seed, r, 1, x_col)].reshape(-1)
    signs = 1.0 - 2.0 * rademacher_bits(np.arange(sketch.padded_dim, dtype=np.int64), 42)
    return (x * signs).reshape(sketch.settings.k, -1).sum(axis=1)


def test_transform_matches_numpy_reference():
    sketch = RapidGradSketch(3000, SketchSettings(k=256, shuffle_rounds=5))
    v = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    out = sketch.transform(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(out, _reference_transform(v, sketch), rtol=1e-5, atol=1e-5)


def test_shuffle_is_a_permutation():
    sketch = RapidGradSketch(4096, SketchSettings(k=64, shuffle_rounds=20))
    v = torch.arange(4096, dtype=torch.float32)[None]
    shuffled = sketch.shuffle(v)[0]
    assert sorted(shuffled.tolist()) == list(range(4096))
    assert not torch.equal(shuffled, v[0])


def test_permutations_are_bounded_by_max_perm_len():
    settings = SketchSettings(k=1024, shuffle_rounds=20, max_perm_len=64)
    for x_row, x_col in plan_divisors(1024 * 3 * 5 * 7, settings):
        assert 2 <= x_row <= 64 and 2 <= x_col <= 64


def test_rademacher_bits_torch_equals_numpy_and_is_balanced():
    pos = np.arange(0, 1 << 20, dtype=np.int64) + (1 << 33)
    a = rademacher_bits(pos, 7)
    b = rademacher_bits(torch.from_numpy(pos), 7).numpy()
    np.testing.assert_array_equal(a, b)
    assert abs(a.mean() - 0.5) < 0.005


def test_batched_transform_equals_single_rows():
    sketch = RapidGradSketch(5000, SketchSettings(k=512))
    grads = torch.randn(3, 5000)
    batched = sketch.transform(grads)
    for i in range(3):
        torch.testing.assert_close(batched[i], sketch.transform(grads[i]), rtol=0, atol=1e-6)


def test_transform_is_identical_across_processes():
    code = (
        "import torch, sys;"
        "from rapidin_index.sketch import RapidGradSketch, SketchSettings;"
        "g = torch.Generator().manual_seed(3);"
        "v = torch.randn(10000, generator=g);"
        "s = RapidGradSketch(10000, SketchSettings(k=1024));"
        "sys.stdout.write(s.transform(v).half().numpy().tobytes().hex())"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 1024 * 4
    g = torch.Generator().manual_seed(3)
    here = RapidGradSketch(10000, SketchSettings(k=1024)).transform(torch.randn(10000, generator=g))
    assert here.half().numpy().tobytes().hex() == runs[0]


def test_sketch_inner_products_track_exact_ones():
    rng = np.random.default_rng(1)
    d, n = 200_000, 40
    base = rng.standard_normal(d)
    # Vectors sharing a random amount of a common direction: exact inner products spread.
    vecs = np.stack([rng.standard_normal(d) + rng.uniform(-2, 2) * base for _ in range(n)])
    sketch = RapidGradSketch(d, SketchSettings(k=1 << 14))
    small = sketch.transform(torch.from_numpy(vecs).float()).double().numpy()
    exact = vecs[1:] @ vecs[0]
    approx = small[1:] @ small[0]
    assert np.corrcoef(exact, approx)[0, 1] > 0.99


def test_zero_vector_maps_to_zero():
    sketch = RapidGradSketch(1000, SketchSettings(k=128))
    assert torch.count_nonzero(sketch.transform(torch.zeros(1000))) == 0


@pytest.mark.parametrize("k", [0, 3, 1000])
def test_k_must_be_a_power_of_two(k):
    with pytest.raises(SettingsError, match="power of two"):
        RapidGradSketch(5000, SketchSettings(k=k))


def test_k_larger_than_gradient_is_refused():
    with pytest.raises(SettingsError, match="larger than the gradient length"):
        RapidGradSketch(1000, SketchSettings(k=2048))


def test_recorded_divisors_must_match_the_seed():
    sketch = RapidGradSketch(5000, SketchSettings(k=512))
    bad = [list(p) for p in sketch.divisors]
    bad[0][0] = 1 if bad[0][0] != 1 else 2
    with pytest.raises(SettingsError, match="divisors"):
        RapidGradSketch(5000, SketchSettings(k=512), divisors=bad)
    RapidGradSketch(5000, SketchSettings(k=512), divisors=sketch.manifest_entry()["divisors"])


# ---- CPU kernel and countsketch ---------------------------------------------------------


@pytest.mark.parametrize("dim,k,rounds", [(3000, 256, 5), (4096, 64, 20), (10_007, 1024, 3)])
def test_cpu_kernel_equals_torch_passes(dim, k, rounds):
    settings = SketchSettings(k=k, shuffle_rounds=rounds, max_perm_len=512)
    grads = torch.randn(5, dim, generator=torch.Generator().manual_seed(dim))
    via_numba = RapidGradSketch(dim, settings, backend="numba").transform(grads)
    via_torch = RapidGradSketch(dim, settings, backend="torch").transform(grads)
    torch.testing.assert_close(via_numba, via_torch, rtol=1e-5, atol=1e-5)


def test_cpu_kernel_with_int64_indices_matches_reference(monkeypatch):
    from rapidin_index import sketch as sketch_module

    monkeypatch.setattr(sketch_module, "_INT32_INDEX_LIMIT", 0)
    sketch = RapidGradSketch(3000, SketchSettings(k=256, shuffle_rounds=5), backend="numba")
    v = np.random.default_rng(2).standard_normal(3000).astype(np.float32)
    out = sketch.transform(torch.from_numpy(v)).numpy()
    assert sketch._cpu_plan.tables.dtype == np.int64
    np.testing.assert_allclose(out, _reference_transform(v, sketch), rtol=1e-5, atol=1e-5)


def test_cpu_kernel_gives_the_same_numbers_for_any_thread_count(monkeypatch):
    from rapidin_index import sketch as sketch_module

    grads = torch.randn(3, 20_000, generator=torch.Generator().manual_seed(5))
    runs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(sketch_module, "_num_threads", lambda n=threads: n)
        for projection in ("shuffle", "countsketch"):
            settings = SketchSettings(k=512, projection=projection)
            runs.append(RapidGradSketch(20_000, settings).transform(grads))
    for i in range(2, len(runs)):
        assert torch.equal(runs[i], runs[i % 2])


def _reference_countsketch(v: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Countsketch written out with plain numpy: bucket and sign from each global index."""
    from rapidin_index.sketch import countsketch_buckets

    pos = np.arange(v.shape[-1], dtype=np.int64)
    signs = 1.0 - 2.0 * rademacher_bits(pos, seed)
    out = np.zeros(v.shape[:-1] + (k,))
    for b, row in enumerate(v.reshape(-1, v.shape[-1])):
        np.add.at(out.reshape(-1, k)[b], countsketch_buckets(pos, seed, k), row * signs)
    return out


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_countsketch_matches_numpy_reference(backend):
    settings = SketchSettings(k=256, projection="countsketch", seed=7)
    v = np.random.default_rng(3).standard_normal((4, 5000)).astype(np.float32)
    out = RapidGradSketch(5000, settings, backend=backend).transform(torch.from_numpy(v))
    np.testing.assert_allclose(out.numpy(), _reference_countsketch(v, 256, 7), rtol=1e-5, atol=1e-5)


def test_countsketch_buckets_torch_equal_numpy_and_are_balanced():
    from rapidin_index.sketch import countsketch_buckets

    pos = np.arange(0, 1 << 20, dtype=np.int64) + (1 << 33)
    a = countsketch_buckets(pos, 3, 1024)
    b = countsketch_buckets(torch.from_numpy(pos), 3, 1024).numpy()
    np.testing.assert_array_equal(a, b)
    counts = np.bincount(a, minlength=1024)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    # The bucket and the sign of a coordinate are independent.
    signs = rademacher_bits(pos, 3)
    assert abs(signs[a < 512].mean() - 0.5) < 0.005


def test_countsketch_inner_products_track_exact_ones():
    rng = np.random.default_rng(1)
    d, n = 200_000, 40
    base = rng.standard_normal(d)
    vecs = np.stack([rng.standard_normal(d) + rng.uniform(-2, 2) * base for _ in range(n)])
    sketch = RapidGradSketch(d, SketchSettings(k=1 << 14, projection="countsketch"))
    small = sketch.transform(torch.from_numpy(vecs).float()).double().numpy()
    exact = vecs[1:] @ vecs[0]
    approx = small[1:] @ small[0]
    assert np.corrcoef(exact, approx)[0, 1] > 0.99


def test_countsketch_manifest_has_no_divisors_and_round_trips():
    settings = SketchSettings(k=512, projection="countsketch")
    entry = RapidGradSketch(5000, settings).manifest_entry()
    assert entry["projection"] == "countsketch" and entry["divisors"] == []
    assert entry["padded_dim"] == 5000
    again = RapidGradSketch(5000, settings, divisors=entry["divisors"])
    v = torch.randn(5000)
    assert torch.equal(again.transform(v), RapidGradSketch(5000, settings).transform(v))
    with pytest.raises(SettingsError, match="divisors"):
        RapidGradSketch(5000, settings, divisors=[[2, 2]])


def test_unknown_projection_is_refused():
    with pytest.raises(SettingsError, match="projection"):
        RapidGradSketch(5000, SketchSettings(k=512, projection="gaussian"))


@pytest.mark.cuda
@pytest.mark.parametrize("projection", ["shuffle", "countsketch"])
def test_gpu_transform_equals_cpu_kernel(projection):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    settings = SketchSettings(k=1024, projection=projection)
    grads = torch.randn(6, 50_000, generator=torch.Generator().manual_seed(11))
    sketch = RapidGradSketch(50_000, settings)
    on_gpu = sketch.transform(grads.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), sketch.transform(grads), rtol=1e-5, atol=1e-5)
