"""The command line through click's CliRunner: happy path and every bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rapidin_index.cli import cli
from tests.tiny import make_records, make_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("cli")
    data = write_jsonl(root / "train.jsonl", make_records(12, seed=9))
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
    return root, str(data), str(index)


def _run(*args):
    return CliRunner().invoke(cli, ["--quiet", *args])


def _assert_clean_error(result, pattern):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert pattern in result.output, result.output
    assert "Traceback" not in result.output


def test_build_then_query_json(built):
    root, data, index = built
    gen = root / "gen.txt"
    gen.write_text("sat on the mat")
    result = _run(
        "query",
        "--index",
        index,
        "--generation",
        str(gen),
        "--prompt",
        "the cat",
        "--topk",
        "3",
        "--bottom",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    (q,) = payload["queries"]
    assert q["prompt"] == "the cat" and q["generation"] == "sat on the mat"
    assert [r["rank"] for r in q["results"]] == [1, 2, 3]
    assert len(q["bottom"]) == 3
    scores = [r["score"] for r in q["results"]]
    assert scores == sorted(scores, reverse=True)


def test_query_table_and_generation_by_the_model(built):
    _, _, index = built
    result = _run(
        "query", "--index", index, "--prompt", "the cat", "--topk", "2", "--max-new-tokens", "5"
    )
    assert result.exit_code == 0, result.output
    assert "most helpful" in result.output and "rank" in result.output


def test_info_summarises_the_manifest(built):
    _, _, index = built
    result = _run("info", "--index", index, "--verify")
    assert result.exit_code == 0, result.output
    assert "rows           12 of 12" in result.output and "K = 256" in result.output


def test_missing_data_file(tmp_path, tiny_model):
    _assert_clean_error(
        _run(
            "build",
            "--data",
            str(tmp_path / "no.jsonl"),
            "--index",
            str(tmp_path / "ix"),
            "--model",
            tiny_model,
        ),
        "not found",
    )


def test_malformed_jsonl_reports_line(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{oops\n')
    _assert_clean_error(
        _run("build", "--data", str(bad), "--index", str(tmp_path / "ix"), "--model", tiny_model),
        "bad.jsonl:3",
    )


def test_record_without_output(tmp_path, tiny_model):
    bad = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a"}])
    _assert_clean_error(
        _run("build", "--data", str(bad), "--index", str(tmp_path / "ix"), "--model", tiny_model),
        "no field 'output'",
    )


def test_empty_data(tmp_path, tiny_model):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    _assert_clean_error(
        _run("build", "--data", str(empty), "--index", str(tmp_path / "ix"), "--model", tiny_model),
        "no records",
    )


@pytest.mark.parametrize(
    "k, message", [("1000", "power of two"), ("1048576", "larger than the gradient")]
)
def test_bad_k(tmp_path, tiny_model, k, message):
    data = write_jsonl(tmp_path / "t.jsonl", make_records(2))
    result = _run(
        "build",
        "--data",
        str(data),
        "--index",
        str(tmp_path / "ix"),
        "--model",
        tiny_model,
        "-k",
        k,
    )
    _assert_clean_error(result, message)
    assert not (tmp_path / "ix" / "manifest.json").exists(), "nothing half-written"


def test_index_built_with_another_model(built, tmp_path):
    _, _, index = built
    other = make_tiny_model(tmp_path / "other", seed=2, hidden=48)
    gen = tmp_path / "g.txt"
    gen.write_text("x")
    result = _run(
        "query", "--index", index, "--generation", str(gen), "--prompt", "p", "--model", str(other)
    )
    _assert_clean_error(result, "config_hash")
    assert "--model" in result.output


def test_resume_with_other_settings_shows_both_values(built, tiny_model):
    _, data, index = built
    result = _run("build", "--data", data, "--index", index, "--model", tiny_model, "-k", "512")
    _assert_clean_error(result, "sketch.k: index has 256, requested 512")


def test_truncated_chunk(built, tmp_path):
    import shutil

    _, _, index = built
    copy = tmp_path / "ix"
    shutil.copytree(index, copy)
    chunk = copy / "rapidgrads" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    _assert_clean_error(_run("info", "--index", str(copy)), "truncated")


def test_corrupted_chunk(built, tmp_path):
    import shutil

    _, _, index = built
    copy = tmp_path / "ix"
    shutil.copytree(index, copy)
    chunk = copy / "rapidgrads" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x55
    chunk.write_bytes(bytes(raw))
    _assert_clean_error(_run("info", "--index", str(copy), "--verify"), "corrupted")


def test_missing_index(tmp_path):
    _assert_clean_error(_run("info", "--index", str(tmp_path / "nothing")), "no index")
