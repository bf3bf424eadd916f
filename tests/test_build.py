"""Caching: resumable, identical after a crash, refuses mismatched settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rapidin_index.build import BuildSettings, build_index
from rapidin_index.errors import SettingsMismatchError
from rapidin_index.sketch import SketchSettings
from rapidin_index.store import Store
from tests.tiny import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _settings(data, index, model, **kw):
    return BuildSettings(
        data=data, index=str(index), model=model, sketch=SketchSettings(k=kw.pop("k", 1024)), **kw
    )


def test_build_writes_one_row_per_example(tmp_path, tiny_model, train_file):
    report = build_index(_settings(train_file, tmp_path / "ix", tiny_model), progress=False)
    store = Store.open(tmp_path / "ix")
    assert report.rows == store.rows == 20
    m = store.manifest
    assert m["sketch"]["k"] == 1024 and m["sketch"]["shuffle_rounds"] == 20
    assert m["sketch"]["seed"] == 42 and len(m["sketch"]["divisors"]) == 20
    assert m["data"]["records"] == 20 and m["model"]["config_hash"]
    assert [p["name"] for p in m["gradient"]["parameters"]][0] == "model.embed_tokens.weight"
    assert np.isfinite(store.read_all().astype(np.float32)).all()


def test_rerun_after_completion_adds_nothing(tmp_path, tiny_model, train_file):
    build_index(_settings(train_file, tmp_path / "ix", tiny_model), progress=False)
    first = Store.open(tmp_path / "ix").read_all()
    report = build_index(_settings(train_file, tmp_path / "ix", tiny_model), progress=False)
    assert report.computed == 0
    np.testing.assert_array_equal(Store.open(tmp_path / "ix").read_all(), first)


def test_reopening_with_other_settings_is_refused(tmp_path, tiny_model, train_file):
    build_index(_settings(train_file, tmp_path / "ix", tiny_model, limit=5), progress=False)
    with pytest.raises(SettingsMismatchError, match="sketch.k: index has 1024, requested 512"):
        build_index(_settings(train_file, tmp_path / "ix", tiny_model, k=512), progress=False)
    with pytest.raises(SettingsMismatchError, match="max_length"):
        build_index(
            _settings(train_file, tmp_path / "ix", tiny_model, max_length=64), progress=False
        )


def test_killed_build_resumes_to_an_identical_store(tmp_path, tiny_model):
    data = str(write_jsonl(tmp_path / "train.jsonl", make_records(60, seed=5)))
    args = [
        sys.executable,
        "-m",
        "rapidin_index",
        "--quiet",
        "build",
        "--data",
        data,
        "--model",
        tiny_model,
        "-k",
        "1024",
        "--rows-per-chunk",
        "4",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(args + ["--index", str(tmp_path / "whole")], check=True, env=env)

    proc = subprocess.Popen(args + ["--index", str(tmp_path / "crashed")], env=env)
    manifest = tmp_path / "crashed" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["store"]["rows"] >= 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store.open(tmp_path / "crashed").rows
    assert 8 <= partial < 60, "the build must be killed part-way for this test to mean much"
    subprocess.run(args + ["--index", str(tmp_path / "crashed")], check=True, env=env)
    whole = Store.open(tmp_path / "whole")
    resumed = Store.open(tmp_path / "crashed")
    resumed.verify()
    assert resumed.rows == whole.rows == 60
    np.testing.assert_array_equal(resumed.read_all(), whole.read_all())
