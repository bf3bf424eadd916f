"""``query --token-wise / --target-text / --pairwise / --html`` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rapidin_index.cli import cli
from tests.tiny import make_records, write_jsonl

GENERATION = "the cat sat on the mat 🙂"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("twcli")
    records = make_records(12, seed=9)
    records[2]["output"] = "<script>alert(1)</script> Zürich 東京 🙂 the cat"
    data = write_jsonl(root / "train.jsonl", records)
    index = root / "ix"
    result = CliRunner().invoke(
        cli,
        [
            "--quiet",
            "build",
            "--data",
            str(data),
            "--index",
            str(index),
            "--model",
            tiny_model,
            "-k",
            "256",
        ],
    )
    assert result.exit_code == 0, result.output
    gen = root / "gen.txt"
    gen.write_text(GENERATION, encoding="utf-8")
    return root, records, str(index), str(gen)


def _visible_text(page: str) -> str:
    """The page's text content, entities decoded, tags dropped."""
    from html.parser import HTMLParser

    chunks: list[str] = []
    parser = HTMLParser(convert_charrefs=True)
    parser.handle_data = chunks.append
    parser.feed(page)
    return "".join(chunks)


def _query(built, *extra):
    _, _, index, gen = built
    return CliRunner().invoke(
        cli,
        [
            "--quiet",
            "--no-progress",
            "query",
            "--index",
            index,
            "--generation",
            gen,
            "--prompt",
            "the cat",
            *extra,
        ],
    )


def test_json_without_token_flags_keeps_the_existing_format(built):
    result = _query(built, "--format", "json", "--topk", "3")
    assert result.exit_code == 0, result.output
    q = json.loads(result.output)["queries"][0]
    assert set(q) == {"prompt", "generation", "score", "rank_by", "results"}
    assert (q["score"], q["rank_by"]) == ("cosine", "signed")  # the defaults
    assert set(q["results"][0]) == {"rank", "id", "score", "instruction", "input", "output"}


def test_token_wise_json_tokens_are_field_slices_whose_mean_is_the_exact_score(built):
    _, records, _, _ = built
    result = _query(built, "--format", "json", "--topk", "4", "--token-wise", "--token-topk", "2")
    assert result.exit_code == 0, result.output
    q = json.loads(result.output)["queries"][0]
    assert [("tokens" in r) for r in q["results"]] == [True, True, False, False]
    for row in q["results"][:2]:
        for t in row["tokens"]:
            assert set(t) == {"text", "start", "end", "field", "score"}
            if t["field"] != "eos":
                assert row[t["field"]][t["start"] : t["end"]] == t["text"]
            assert (t["score"] is None) == (t["field"] in ("instruction", "input"))
        scores = [t["score"] for t in row["tokens"] if t["score"] is not None]
        assert np.mean(scores) == pytest.approx(row["exact_score"], rel=1e-5)
        assert len(row["generation_scores"]) == len(q["generation_tokens"])
    gen_text = [t for t in q["generation_tokens"] if t["field"] == "generation"]
    assert all(GENERATION[t["start"] : t["end"]] == t["text"] for t in gen_text)
    assert q["generation_tokens"][-1]["field"] == "eos"


def test_target_text_marks_its_tokens_and_changes_the_retrieval(built):
    plain = json.loads(_query(built, "--format", "json", "--topk", "12").output)
    result = _query(
        built, "--format", "json", "--topk", "12", "--token-wise", "--target-text", "mat"
    )
    assert result.exit_code == 0, result.output
    q = json.loads(result.output)["queries"][0]
    assert q["target"] == {"text": "mat", "spans": [[19, 22]]}
    marked = [t for t in q["generation_tokens"] if t["target"]]
    assert marked and all(t["start"] < 22 and t["end"] > 19 for t in marked)
    before = [r["score"] for r in plain["queries"][0]["results"]]
    after = [r["score"] for r in q["results"]]
    assert before != pytest.approx(after)


def test_target_text_missing_from_the_generation_is_a_clean_error(built):
    result = _query(built, "--target-text", "Canada")
    assert result.exit_code == 1
    assert "Error: --target-text 'Canada' does not occur" in result.output
    assert "Traceback" not in result.output


def test_pairwise_json_is_a_generation_by_training_token_matrix(built):
    result = _query(built, "--format", "json", "--topk", "2", "--pairwise")
    assert result.exit_code == 0, result.output
    q = json.loads(result.output)["queries"][0]
    pair = q["pairwise"]
    assert pair["id"] == q["results"][0]["id"] and pair["rank"] == 1
    matrix = np.asarray(pair["matrix"])
    assert matrix.shape == (len(pair["generation_tokens"]), len(pair["train_tokens"]))
    assert np.isfinite(matrix).all()
    assert "tokens" not in q["results"][0]  # --pairwise alone adds no token lists


def test_html_output_is_written_and_implies_token_wise(built, tmp_path):
    out = tmp_path / "heat.html"
    result = _query(built, "--topk", "12", "--token-topk", "12", "--html", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in page and "<script" not in page
    text = _visible_text(page)
    assert "<script>alert(1)</script> Zürich 東京 🙂 the cat" in text
    assert GENERATION in text
    assert "Token-wise influence" in result.output  # the table view got the terminal heat map


def test_table_output_with_token_wise_prints_the_heat_map(built):
    result = _query(built, "--topk", "2", "--token-wise", "--pairwise")
    assert result.exit_code == 0, result.output
    assert "most helpful" in result.output
    assert "Token-wise influence, query 1" in result.output
    assert "strongest token pairs" in result.output
