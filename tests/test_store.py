"""The on-disk store: round trips, Zarr compatibility, crash safety, integrity checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rapidin_index.errors import SettingsMismatchError, StoreError
from rapidin_index.store import Store, compare_settings


def _rows(n, k, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float16)


def test_append_flush_reopen_round_trip_and_zarr_reads_it(tmp_path):
    import zarr

    store = Store.create(tmp_path / "ix", {"sketch": {"k": 64}}, k=64, rows_per_chunk=8)
    data = _rows(21, 64)
    store.append(data[:5])
    store.flush()
    store.append(data[5:])
    store.flush()
    again = Store.open(tmp_path / "ix")
    assert again.rows == 21
    np.testing.assert_array_equal(again.read_all(), data)
    np.testing.assert_array_equal(again.read_rows([20, 0, 9]), data[[20, 0, 9]])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ix" / "rapidgrads"))[:], data)
    again.verify()


def test_unflushed_rows_are_not_visible(tmp_path):
    store = Store.create(tmp_path / "ix", {}, k=16, rows_per_chunk=8)
    store.append(_rows(3, 16))
    assert Store.open(tmp_path / "ix").rows == 0
    store.append(_rows(6, 16))  # fills the first chunk, which commits it
    assert Store.open(tmp_path / "ix").rows == 8


def test_reopened_store_extends_a_partial_chunk(tmp_path):
    data = _rows(13, 16)
    store = Store.create(tmp_path / "ix", {}, k=16, rows_per_chunk=8)
    store.append(data[:10])
    store.flush()
    store = Store.open(tmp_path / "ix")
    store.append(data[10:])
    store.flush()
    np.testing.assert_array_equal(Store.open(tmp_path / "ix").read_all(), data)


def test_truncated_chunk_is_reported(tmp_path):
    store = Store.create(tmp_path / "ix", {}, k=16, rows_per_chunk=8)
    store.append(_rows(10, 16))
    store.flush()
    path = store.chunk_path(1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StoreError, match="truncated"):
        Store.open(tmp_path / "ix")


def test_corrupted_chunk_fails_verification(tmp_path):
    store = Store.create(tmp_path / "ix", {}, k=16, rows_per_chunk=8)
    store.append(_rows(10, 16))
    store.flush()
    raw = bytearray(store.chunk_path(0).read_bytes())
    raw[10] ^= 0xFF
    store.chunk_path(0).write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupted"):
        Store.open(tmp_path / "ix").verify()


def test_missing_or_foreign_manifest(tmp_path):
    with pytest.raises(StoreError, match="no index"):
        Store.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99, "store": {}}))
    with pytest.raises(StoreError, match="not supported"):
        Store.open(tmp_path)


def test_second_writer_is_locked_out(tmp_path):
    store = Store.create(tmp_path / "ix", {}, k=16)
    store.lock()
    with pytest.raises(StoreError, match="another build"):
        Store.open(tmp_path / "ix").lock()
    store.unlock()
    Store.open(tmp_path / "ix").lock()


def test_settings_mismatch_lists_both_values():
    with pytest.raises(SettingsMismatchError) as err:
        compare_settings(
            {"sketch": {"k": 64, "seed": 1}}, {"sketch": {"k": 128, "seed": 1}}, hint="use --k 64"
        )
    assert err.value.differences == {"sketch.k": (64, 128)}
    assert "index has 64, requested 128" in str(err.value) and "--k 64" in str(err.value)
    compare_settings({"a": [1, 2]}, {"a": (1, 2)})
