"""Retrieval end to end on a tiny model: sketch scores agree with exact ones."""

from __future__ import annotations

import numpy as np
import pytest

from rapidin_index.build import BuildSettings, build_index
from rapidin_index.errors import DataError, SettingsMismatchError
from rapidin_index.query import Attributor, QueryInput, read_query_inputs, topk_rows
from rapidin_index.sketch import SketchSettings
from tests.tiny import make_records, make_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("q")
    data = write_jsonl(root / "train.jsonl", make_records(40, seed=3))
    build_index(
        BuildSettings(
            data=str(data), index=str(root / "ix"), model=tiny_model, sketch=SketchSettings(k=4096)
        ),
        progress=False,
    )
    return str(root / "ix")


def test_scan_results_equal_brute_force_over_the_store(index):
    att = Attributor(index)
    queries = [QueryInput("the cat sat", "on the mat"), QueryInput("why water", "fire earth")]
    results = att.attribute(queries, topk=7, bottom=True)
    assert {r.score for r in results} == {"cosine"}  # the default where rows have norms
    scores = att.score_all(queries, score="cosine")
    for res, row in zip(results, scores):
        ids, _ = topk_rows(row, 7)
        assert [r["id"] for r in res.results] == ids.tolist()
        np.testing.assert_allclose(
            [r["score"] for r in res.results], row[ids], rtol=1e-4, atol=1e-4
        )
        low, _ = topk_rows(row, 7, largest=False)
        assert [r["id"] for r in res.bottom] == low.tolist()
        assert {"rank", "id", "score", "instruction", "input", "output"} <= set(res.results[0])


def test_sketch_scores_correlate_with_exact_scores(index):
    att = Attributor(index)
    query = [QueryInput(att.records()[4].merged_instruction, att.records()[4].output)]
    sketch = att.score_all(query, "rapidin")[0]
    exact = att.score_all(query, "exact")[0]
    assert np.corrcoef(sketch, exact)[0, 1] > 0.9
    # A training example queried with itself is its own most influential example.
    assert int(np.argmax(exact)) == 4 and int(np.argmax(sketch)) == 4


def test_index_from_another_model_is_refused(index, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=1, hidden=48)
    with pytest.raises(SettingsMismatchError, match="config_hash"):
        Attributor(index, model=str(other))


def test_query_inputs_from_text_and_records(tmp_path):
    gen = tmp_path / "gen.txt"
    gen.write_text("Paris.\n")
    assert read_query_inputs(str(gen), prompt="Capital?") == [QueryInput("Capital?", "Paris.")]
    recs = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "a", "input": "b", "output": "c"}])
    assert read_query_inputs(str(recs)) == [QueryInput("a\nb", "c")]
    with pytest.raises(DataError, match="--prompt"):
        read_query_inputs(str(gen))
    with pytest.raises(DataError, match="not found"):
        read_query_inputs(str(tmp_path / "none.txt"), prompt="x")
    assert read_query_inputs(None, prompt="x") == [QueryInput("x", None)]
    with pytest.raises(DataError, match="nothing to attribute"):
        read_query_inputs(None)


def test_topk_rows_breaks_ties_by_lower_id():
    scores = np.array([1.0, 3.0, 3.0, 0.5, 3.0], dtype=np.float32)
    assert topk_rows(scores, 3)[0].tolist() == [1, 2, 4]
    assert topk_rows(scores, 2, largest=False)[0].tolist() == [3, 0]
