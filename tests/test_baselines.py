"""The baseline methods of ``query --method`` against brute-force references on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rapidin_index.baselines import (
    BaselineSettings,
    InfluenceFunctionScorer,
    RandomScorer,
    make_scorer,
)
from rapidin_index.build import BuildSettings, build_index
from rapidin_index.cli import QUERY_METHODS, cli
from rapidin_index.data import tokenize_records
from rapidin_index.errors import SettingsError
from rapidin_index.gradients import GradientSettings, example_loss
from rapidin_index.query import METHODS, Attributor, QueryInput
from rapidin_index.sketch import SketchSettings
from rapidin_index.tokenwise import _math_attention
from tests.tiny import make_records, write_jsonl

QUERIES = [QueryInput("the cat sat", "on the mat"), QueryInput("why water", "fire earth air")]


def _build(root, tiny_model, records, params=(), k=256):
    data = write_jsonl(root / "train.jsonl", records)
    settings = BuildSettings(
        data=str(data),
        index=str(root / "ix"),
        model=tiny_model,
        sketch=SketchSettings(k=k),
        gradient=GradientSettings(params=tuple(params)),
    )
    build_index(settings, progress=False)
    return str(root / "ix")


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model):
    return _build(tmp_path_factory.mktemp("bl"), tiny_model, make_records(12, seed=5))


@pytest.fixture(scope="module")
def norm_index(tmp_path_factory, tiny_model):
    """An index over the 5 norm weights of the tiny model: 160 parameters."""
    root = tmp_path_factory.mktemp("bl-norm")
    return _build(root, tiny_model, make_records(4, seed=8), params=["*norm.weight"], k=64)


def test_cli_method_choices_are_the_query_methods():
    assert tuple(QUERY_METHODS) == METHODS


def _query_args(index):
    args = ["--quiet", "query", "--index", index, "--prompt", "the cat", "--format", "json"]
    return args + ["--topk", "3", "--bottom", "--max-new-tokens", "4", "--lissa-depth", "3"]


@pytest.fixture(scope="module")
def rapidin_json(index):
    result = CliRunner().invoke(cli, _query_args(index))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_answers_in_the_same_json_shape(index, rapidin_json, method):
    result = CliRunner().invoke(cli, [*_query_args(index), "--method", method])
    assert result.exit_code == 0, result.output
    want, got = rapidin_json, json.loads(result.stdout)
    assert set(got) == set(want) == {"queries", "timings"}
    (q,), (r,) = got["queries"], want["queries"]
    assert set(q) == set(r) and q["generation"] == r["generation"]
    assert [row["rank"] for row in q["results"]] == [1, 2, 3]
    assert all(set(row) == set(r["results"][0]) for row in q["results"] + q["bottom"])
    scores = [row["score"] for row in q["results"]]
    assert scores == sorted(scores, reverse=True)
    assert max(row["score"] for row in q["bottom"]) <= min(scores)


def _raw_gradient(att, example):
    params = att.computer.params
    grads = torch.autograd.grad(example_loss(att.loaded.model, example), params)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def test_tracin_equals_dot_of_unnormalised_per_example_gradients(index):
    att = Attributor(index)
    got = att.score_all(QUERIES, "tracin")
    examples = tokenize_records(att.records(), att.tokenizer, att.template, att.max_length)
    train = torch.stack([_raw_gradient(att, e) for e in examples])
    for row, query in zip(got, QUERIES):
        want = (train @ _raw_gradient(att, att.query_example(query))).numpy()
        np.testing.assert_allclose(row, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # Without layer-wise normalisation the scores differ from exact (TracIn + LN).
    assert not np.allclose(got, att.score_all(QUERIES, "exact"), rtol=1e-2)


class _Loss(torch.nn.Module):
    """Mean per-example loss as a module, so functional_call can swap its parameters."""

    def __init__(self, model, examples):
        super().__init__()
        self.model = model
        self.examples = examples

    def forward(self):
        return torch.stack([example_loss(self.model, e) for e in self.examples]).mean()


@pytest.fixture(scope="module")
def explicit_hessian(norm_index):
    """(160, 160) float64 Hessian of the mean training loss, by torch.autograd.functional."""
    att = Attributor(norm_index)
    computer = att.computer
    assert computer.dim == 160
    examples = tokenize_records(att.records(), att.tokenizer, att.template, att.max_length)
    wrapper = _Loss(att.loaded.model, examples)
    names = ["model." + n for n in computer.names]
    flat0 = torch.cat([p.detach().reshape(-1) for p in computer.params])

    def risk(flat):
        parts = torch.split(flat, computer.sizes)
        values = {n: t.view(s) for n, t, s in zip(names, parts, computer.shapes)}
        return torch.func.functional_call(wrapper, values, ())

    with _math_attention():
        hessian = torch.autograd.functional.hessian(risk, flat0, vectorize=True).double()
    return (hessian + hessian.T) / 2


@pytest.mark.parametrize("explicit_scale", [True, False])
def test_influence_function_equals_explicit_damped_hessian_inverse(
    norm_index, explicit_hessian, explicit_scale
):
    att = Attributor(norm_index)
    examples = tokenize_records(att.records(), att.tokenizer, att.template, att.max_length)
    eig = torch.linalg.eigvalsh(explicit_hessian)
    # Damping that makes H + λI positive definite with a condition number of 5, so that
    # LiSSA converges to ~1e-10 within the depth below.
    damping = max(0.0, -float(eig[0])) + 0.25 * float(eig[-1] - eig[0])
    settings = BaselineSettings(
        lissa_depth=120 if explicit_scale else 200,
        lissa_damping=damping,
        lissa_scale=float(eig[-1]) + damping if explicit_scale else None,
        lissa_batch_size=len(examples),  # the whole set: deterministic Hessian-vector products
    )
    itself = QueryInput(att.records()[2].merged_instruction, att.records()[2].output)
    got = InfluenceFunctionScorer(att, settings).scores([*QUERIES, itself])

    eye = torch.eye(explicit_hessian.shape[0], dtype=torch.float64)
    inverse = torch.linalg.inv(explicit_hessian + damping * eye)
    train = torch.stack([_raw_gradient(att, e) for e in examples])
    for row, query in zip(got, QUERIES):
        want = (train @ inverse @ _raw_gradient(att, att.query_example(query))).numpy()
        np.testing.assert_allclose(row, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    # The sign convention: a training example is helpful to itself (H + λI is positive
    # definite, so g^T (H + λI)^-1 g > 0).
    assert got[2, 2] > 0


def test_lissa_divergence_names_the_flags_that_fix_it(norm_index):
    att = Attributor(norm_index)
    settings = BaselineSettings(lissa_depth=200, lissa_scale=1e-6, lissa_damping=1.0)
    with pytest.raises(SettingsError, match="--lissa-scale"):
        InfluenceFunctionScorer(att, settings).scores(QUERIES[:1])


def test_bm25_ranks_an_exact_text_match_first(index):
    att = Attributor(index)
    record = att.records()[7]
    scores = att.score_all([QueryInput(record.merged_instruction, record.output)], "bm25")
    assert scores.shape == (1, len(att.records())) and scores.dtype == np.float32
    assert int(np.argmax(scores[0])) == 7


def test_embedding_ranks_an_exact_text_match_first_and_is_a_cosine(index):
    att = Attributor(index)
    record = att.records()[4]
    scores = att.score_all([QueryInput(record.merged_instruction, record.output)], "embedding")
    assert int(np.argmax(scores[0])) == 4
    assert scores[0, 4] == pytest.approx(1.0, abs=1e-5)
    assert np.all(scores <= 1.0 + 1e-5) and np.all(scores >= -1.0 - 1e-5)


def test_embedding_equals_sentence_transformers(index):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from rapidin_index.baselines import SentenceEmbedder, embedding_model_path

    texts = ["Howdy! What is the capital of France?", "Paris is the capital of France."]
    ours = SentenceEmbedder(device="cpu").embed(texts)
    theirs = SentenceTransformer(str(embedding_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_random_is_reproducible_with_a_seed_and_independent_of_the_batch():
    a = RandomScorer(50, seed=3).scores(QUERIES)
    assert a.shape == (2, 50) and a.dtype == np.float32
    assert np.all((a >= 0) & (a < 1))
    np.testing.assert_array_equal(a, RandomScorer(50, seed=3).scores(QUERIES))
    np.testing.assert_array_equal(a[1:], RandomScorer(50, seed=3).scores(QUERIES[1:]))
    assert not np.array_equal(a, RandomScorer(50, seed=4).scores(QUERIES))


def test_random_seed_flag_reaches_the_scorer(index):
    att = Attributor(index, baselines=BaselineSettings(seed=9))
    want = RandomScorer(len(att.records()), seed=9).scores(QUERIES)
    np.testing.assert_array_equal(att.score_all(QUERIES, "random"), want)


def test_unknown_method_and_bad_lissa_settings_are_refused(index):
    att = Attributor(index)
    with pytest.raises(SettingsError, match="--method"):
        att.score_all(QUERIES, "tracin-plus")
    with pytest.raises(SettingsError, match="--lissa-depth"):
        make_scorer("influence-function", att, BaselineSettings(lissa_depth=0))
