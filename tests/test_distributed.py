"""Scale-out on torch.distributed with the gloo backend: 2 CPU ranks started by torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rapidin_index.cli import cli
from rapidin_index.distributed import merge_ranked, torchrun_command
from rapidin_index.store import Store
from tests.tiny import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "RAPIDIN_INDEX_NO_PROGRESS": "1",
    "OMP_NUM_THREADS": "1",
}


def _build_args(data, index, model):
    return [
        "--quiet",
        "build",
        "--data",
        str(data),
        "--index",
        str(index),
        "--model",
        model,
        "-k",
        "512",
        "--rows-per-chunk",
        "4",
        "--batch-size",
        "2",
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("dist")
    data = write_jsonl(root / "train.jsonl", make_records(26, seed=11))
    single = root / "single"
    result = CliRunner().invoke(cli, _build_args(data, single, tiny_model))
    assert result.exit_code == 0, result.output
    return root, data, Store.open(single)


def test_two_ranks_build_the_same_store_as_one(setup, tiny_model):
    root, data, single = setup
    result = CliRunner().invoke(
        cli, [*_build_args(data, root / "two", tiny_model), "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    two = Store.open(root / "two")
    two.verify()
    assert two.rows == single.rows == 26
    assert two.manifest["build"]["world_size"] == 2
    np.testing.assert_array_equal(two.read_all(), single.read_all())


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_killed_rank_resumes_with_another_world_size(setup, tiny_model):
    root, data, single = setup
    index = root / "killed"
    args = torchrun_command(2, _build_args(data, index, tiny_model))
    proc = subprocess.Popen(args, env=ENV, start_new_session=True)
    deadline = time.time() + 180
    markers = index / "progress"
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 2:
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert workers, "torchrun should have started worker processes"
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun then stops the other
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = Store.open(index)
    assert partial.rows < 26, "the build must stop part-way for this test to mean much"
    # Resume with a different number of ranks: one process, in this interpreter.
    result = CliRunner().invoke(cli, _build_args(data, index, tiny_model))
    assert result.exit_code == 0, result.output
    resumed = Store.open(index)
    resumed.verify()
    assert resumed.rows == 26
    np.testing.assert_array_equal(resumed.read_all(), single.read_all())


def test_sharded_query_equals_single_process_query(setup, tmp_path):
    root, _, single = setup
    gen = tmp_path / "gen.txt"
    gen.write_text("sat on the mat")
    query = [
        "--quiet",
        "query",
        "--index",
        str(single.path),
        "--generation",
        str(gen),
        "--prompt",
        "the cat",
        "--topk",
        "5",
        "--bottom",
        "--format",
        "json",
    ]
    local = CliRunner().invoke(cli, query)
    assert local.exit_code == 0, local.output
    sharded = subprocess.run(
        torchrun_command(2, query), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert sharded.returncode == 0, sharded.stderr
    a = json.loads(local.stdout)["queries"][0]
    b = json.loads(sharded.stdout)["queries"][0]
    assert [r["id"] for r in a["results"]] == [r["id"] for r in b["results"]]
    assert [r["id"] for r in a["bottom"]] == [r["id"] for r in b["bottom"]]
    np.testing.assert_allclose(
        [r["score"] for r in a["results"]], [r["score"] for r in b["results"]], rtol=1e-5
    )


def test_merge_ranked_matches_a_global_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(np.float32)  # many ties
    ids = np.arange(40)
    parts = [(ids[i::3], scores[i::3]) for i in range(3)]
    top_ids, _ = merge_ranked(parts, 10)
    expected = np.lexsort((ids, -scores))[:10]
    assert top_ids.tolist() == expected.tolist()
    low_ids, _ = merge_ranked(parts, 10, largest=False)
    assert low_ids.tolist() == np.lexsort((ids, scores))[:10].tolist()
