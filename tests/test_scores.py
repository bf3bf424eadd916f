"""Score definitions: stored norms and cosine, parameter presets, magnitude ranking, the
paper preset, and the evaluation's score variants, on tiny random (LoRA) models."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rapidin_index import cli as cli_module
from rapidin_index.build import BuildSettings, build_index
from rapidin_index.cli import cli
from rapidin_index.data import Record, load_records, tokenize_records
from rapidin_index.errors import SettingsError, StoreError
from rapidin_index.gradients import GradientComputer, GradientSettings
from rapidin_index.model import expand_params_preset, load_model, select_parameters
from rapidin_index.query import Attributor, QueryInput
from rapidin_index.scan import scan
from rapidin_index.scores import (
    PRESETS,
    RANK_BY,
    SCORES,
    VARIANT_NORMALIZATIONS,
    VARIANT_PARAMS,
    ScoreOptions,
    merge_abs,
    per_tensor_pass,
    rank_rows,
    resolve_build_options,
    resolve_query_options,
    variant_scores,
)
from rapidin_index.sketch import SketchSettings
from rapidin_index.store import Store
from tests.tiny import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [QueryInput("the cat sat", "on the mat"), QueryInput("why water", "fire earth air")]


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_model):
    """(model path, adapter path, data path): a random LoRA r=4 on q_proj and o_proj of the
    tiny model, B not zero, so D = 1024 (512 in A matrices, 512 in B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(base, config).save_pretrained(root / "adapter")
    data = write_jsonl(root / "train.jsonl", make_records(24, seed=11))
    return tiny_model, str(root / "adapter"), str(data)


def _build(lora, index, k=1024, **gradient):
    model, adapter, data = lora
    return build_index(
        BuildSettings(
            data=data,
            index=str(index),
            model=model,
            adapter=adapter,
            gradient=GradientSettings(**gradient),
            sketch=SketchSettings(k=k),
            rows_per_chunk=10,
        ),
        progress=False,
    )


@pytest.fixture(scope="module")
def layer_index(lora, tmp_path_factory):
    path = tmp_path_factory.mktemp("ix") / "layer"
    _build(lora, path)
    return str(path)


def _brute_force(att: Attributor, queries):
    """(m, N) float64 dot and cosine of exact normalised gradients, one example at a time."""
    examples = tokenize_records(att.records(), att.tokenizer, att.template, att.max_length)
    g = torch.stack([att.computer.gradient(e) for e in examples]).double()
    q = torch.stack([att.computer.gradient(att.query_example(x)) for x in queries]).double()
    dots = (q @ g.T).numpy()
    gn, qn = g.norm(dim=1).numpy(), q.norm(dim=1).numpy()
    return dots, dots / qn[:, None] / gn[None, :], gn


# ---- cosine with stored norms -------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["layer", "none"])
def test_cosine_with_stored_norms_equals_brute_force(lora, tmp_path, normalization):
    # K = D = 1024: the transform is a permutation with signs, so sketched inner products
    # are exact up to the fp16 rounding of the stored rows.
    index = tmp_path / "ix"
    _build(lora, index, normalization=normalization)
    att = Attributor(str(index))
    assert att.computer.dim == 1024 == att.store.k
    dots, cosine, norms = _brute_force(att, QUERIES)
    np.testing.assert_allclose(att.store.read_norms(), norms, rtol=1e-5)
    exact = att.score_all(QUERIES, "exact", score="cosine")
    np.testing.assert_allclose(exact, cosine, rtol=1e-5, atol=1e-6)
    sketch = att.score_all(QUERIES, "rapidin", score="cosine")
    np.testing.assert_allclose(sketch, cosine, atol=2e-3)
    np.testing.assert_allclose(
        att.score_all(QUERIES, "rapidin"), dots, atol=2e-3 * np.abs(dots).max()
    )
    # The scan ranks by the same cosine (query norm from its exact gradient).
    results = att.attribute(QUERIES, topk=6, bottom=True, options=ScoreOptions("cosine"))
    for result, row in zip(results, sketch):
        ids, values = rank_rows(row, 6)
        assert [r["id"] for r in result.results] == ids.tolist()
        np.testing.assert_allclose([r["score"] for r in result.results], values, atol=1e-5)
        low = np.lexsort((np.arange(row.size), row))[:6]
        assert [r["id"] for r in result.bottom] == low.tolist()
        assert result.to_json()["score"] == "cosine"
    if normalization == "layer":
        # A layer-normalised gradient has norm sqrt(number of non-zero tensors).
        np.testing.assert_allclose(norms, np.sqrt(8.0), rtol=1e-6)


def test_index_without_stored_norms_names_the_fix(layer_index, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(layer_index, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["store"]["norms"], manifest["scores"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(old / "norms")
    att = Attributor(str(old))
    with pytest.raises(SettingsError, match="--score cosine.*rebuild it"):
        att.attribute(QUERIES, options=ScoreOptions("cosine"))
    with pytest.raises(StoreError, match="new --index"):
        att.store.read_norms()
    assert att.attribute(QUERIES, topk=3)[0].results  # dot still works
    result = CliRunner().invoke(
        cli,
        [
            "--quiet",
            "query",
            "--index",
            str(old),
            "--prompt",
            "x",
            "--generation",
            str(_gen(tmp_path)),
            "--score",
            "cosine",
        ],
    )
    assert result.exit_code == 1 and "--score dot" in result.output, result.output
    info = CliRunner().invoke(cli, ["info", "--index", str(old)])
    assert "no gradient norms stored" in info.output


def test_an_index_begun_without_norms_is_continued_without_them(lora, layer_index, tmp_path):
    model, adapter, data = lora
    old = tmp_path / "old"
    build_index(
        BuildSettings(
            data=data,
            index=str(old),
            model=model,
            adapter=adapter,
            sketch=SketchSettings(k=1024),
            rows_per_chunk=10,
            limit=13,
        ),
        progress=False,
    )
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["store"]["norms"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(old / "norms")
    _build(lora, old)
    resumed, whole = Store.open(old), Store.open(layer_index)
    resumed.verify()
    assert not resumed.has_norms and resumed.rows == 24
    # the same rows (up to the fp16 rounding of batch-order float differences)
    a, b = resumed.read_all().astype(np.float32), whole.read_all().astype(np.float32)
    np.testing.assert_allclose(a, b, atol=2e-3 * np.abs(b).max())


# ---- the store's norms ---------------------------------------------------------------------


def test_manifest_and_norms_round_trip(layer_index, tmp_path):
    import zarr

    store = Store.open(layer_index)
    m = store.manifest
    assert m["store"]["norms"]["dtype"] == "float32"
    assert len(m["store"]["norms"]["chunk_crc32"]) == 3
    assert m["scores"] == {
        "preset": None,
        "paper_gradient": True,
        "stored_norms": True,
        "query_scores": ["dot", "cosine"],
        "rank_by": ["signed", "abs"],
    }
    assert m["gradient"]["params_preset"] is None and m["gradient"]["preset_globs"] is None
    norms = store.read_norms()
    assert norms.shape == (24,) and norms.dtype == np.float32
    np.testing.assert_array_equal(zarr.open_array(str(Path(layer_index) / "norms"))[:], norms)
    store.verify()
    copy = tmp_path / "ix"
    shutil.copytree(layer_index, copy)
    chunk = Store.open(copy).norms_chunk_path(1)
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x40
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupted"):
        Store.open(copy).verify()
    chunk.write_bytes(bytes(raw[:8]))
    with pytest.raises(StoreError, match="truncated"):
        Store.open(copy)


def test_store_appends_norms_with_rows_and_resumes_a_partial_chunk(tmp_path):
    rng = np.random.default_rng(0)
    rows, norms = rng.standard_normal((13, 16)).astype(np.float16), rng.random(13) + 0.5
    store = Store.create(tmp_path / "ix", {}, k=16, rows_per_chunk=8, with_norms=True)
    store.append(rows[:10], norms[:10])
    store.flush()
    store = Store.open(tmp_path / "ix")
    with pytest.raises(ValueError, match="norm"):
        store.append(rows[10:])
    store.append(rows[10:], norms[10:])
    store.flush()
    again = Store.open(tmp_path / "ix")
    again.verify()
    np.testing.assert_array_equal(again.read_all(), rows)
    np.testing.assert_array_equal(again.read_norms(), norms.astype(np.float32))
    np.testing.assert_array_equal(again.read_norms(9), norms[:9].astype(np.float32))


# ---- parameter presets ---------------------------------------------------------------------


def test_presets_expand_to_the_right_parameter_names(lora, tiny_model):
    model, adapter, _ = lora
    loaded = load_model(model, adapter)
    net = loaded.model
    b = [n for n, _ in select_parameters(net, (), expand_params_preset(net, "lora-b"))]
    a = [n for n, _ in select_parameters(net, (), expand_params_preset(net, "lora-a"))]
    assert len(b) == len(a) == 4
    assert all(n.endswith("lora_B.default.weight") for n in b)
    assert all(n.endswith("lora_A.default.weight") for n in a)
    globs = expand_params_preset(net, "last-layers:1")
    assert globs == ["base_model.model.model.layers.1.*"]
    last = [n for n, _ in select_parameters(net, (), globs)]
    assert len(last) == 4 and all(".layers.1." in n for n in last)
    narrowed = select_parameters(net, ("*q_proj*",), expand_params_preset(net, "lora-b"))
    assert [n for n, _ in narrowed] == [n for n in b if "q_proj" in n]
    with pytest.raises(SettingsError, match="only 2 layers"):
        expand_params_preset(net, "last-layers:3")
    with pytest.raises(SettingsError, match="--params-preset"):
        expand_params_preset(net, "lora-c")
    with pytest.raises(SettingsError, match="--params-preset"):
        GradientSettings(params_preset="last-layers:0").validate()
    plain = load_model(tiny_model).model
    with pytest.raises(SettingsError, match="--adapter"):
        select_parameters(plain, (), expand_params_preset(plain, "lora-a"))
    assert expand_params_preset(plain, "last-layers:2") == ["model.layers.0.*", "model.layers.1.*"]


def test_a_preset_index_records_its_globs(lora, tmp_path):
    _build(lora, tmp_path / "ix", k=512, params_preset="lora-b")
    g = Store.open(tmp_path / "ix").manifest["gradient"]
    assert g["params_preset"] == "lora-b" and g["preset_globs"] == [
        "*.lora_B.*",
        "*.lora_embedding_B*",
    ]
    assert g["dim"] == 512 and all("lora_B" in p["name"] for p in g["parameters"])
    assert not Store.open(tmp_path / "ix").manifest["scores"]["paper_gradient"]


# ---- ranking -------------------------------------------------------------------------------


def test_abs_ranking_equals_numpy_brute_force_with_ties_to_the_lower_id():
    scores = np.array([0.5, -3.0, 3.0, 1.0, -3.0, 0.0, 2.0, -0.5], dtype=np.float32)
    ids, values = rank_rows(scores, 5, "abs")
    assert ids.tolist() == [1, 2, 4, 6, 3]
    np.testing.assert_array_equal(values, scores[ids])
    assert rank_rows(scores, 3, "signed")[0].tolist() == [2, 6, 3]
    rng = np.random.default_rng(1)
    for _ in range(50):
        s = np.round(rng.standard_normal(40), 1).astype(np.float32)  # plenty of ties
        want = np.lexsort((np.arange(s.size), -np.abs(s)))[:7]
        top = np.lexsort((np.arange(s.size), -s))[:7]
        bottom = np.lexsort((np.arange(s.size), s))[:7]
        got, vals = merge_abs((top, s[top]), (bottom, s[bottom]), 7)
        assert got.tolist() == want.tolist() == rank_rows(s, 7, "abs")[0].tolist()
        np.testing.assert_array_equal(vals, s[want])


def test_abs_ranking_of_a_query_keeps_signed_scores_and_labels_them(layer_index):
    att = Attributor(layer_index)
    scores = att.score_all(QUERIES)
    results = att.attribute(QUERIES, topk=8, bottom=True, options=ScoreOptions("dot", "abs"))
    for result, row in zip(results, scores):
        want = np.lexsort((np.arange(row.size), -np.abs(row)))[:8]
        assert [r["id"] for r in result.results] == want.tolist()
        np.testing.assert_allclose([r["score"] for r in result.results], row[want], atol=1e-5)
        assert [r["effect"] for r in result.results] == [
            "helpful" if v > 0 else "harmful" for v in row[want]
        ]
        # bottom stays the most harmful list, by signed score
        assert [r["id"] for r in result.bottom] == np.argsort(row, kind="stable")[:8].tolist()
        assert result.to_json()["rank_by"] == "abs"
    exact = att.attribute(QUERIES[:1], topk=5, method="exact", options=ScoreOptions("dot", "abs"))
    row = att.score_all(QUERIES[:1], "exact")[0]
    assert [r["id"] for r in exact[0].results] == rank_rows(row, 5, "abs")[0].tolist()


@pytest.mark.parametrize("engine", ["cpu", "torch"])
def test_scan_row_scale_multiplies_each_rows_score(engine):
    from rapidin_index.scan import _scan_torch

    rng = np.random.default_rng(2)
    store = rng.standard_normal((50, 32)).astype(np.float16)
    q = rng.standard_normal((2, 32)).astype(np.float32)
    scale = rng.random(50) * 2
    want = (q @ store.astype(np.float32).T) * scale[None, :]
    blocks = [(0, store[:20].view(np.uint16)), (20, store[20:].view(np.uint16))]
    if engine == "cpu":
        found = scan(q, blocks, 5, bottom=True, row_scale=scale)
    else:
        found = _scan_torch(
            q, blocks, 5, bottom=True, device="cpu", progress=False, row_scale=scale
        )
    for j in range(2):
        assert found.top_ids[j].tolist() == rank_rows(want[j], 5)[0].tolist()
        np.testing.assert_allclose(found.top_scores[j], np.sort(want[j])[::-1][:5], rtol=1e-5)
        assert found.bottom_ids[j].tolist() == np.argsort(want[j])[:5].tolist()


# ---- options and presets -------------------------------------------------------------------


def test_option_resolution_and_the_paper_preset():
    # Defaults: the paper's gradient without an adapter; raw LoRA B gradients with one,
    # unless the user picked the tensors (--params or --params-preset) or the normalisation.
    assert resolve_build_options(None, None) == ("layer", (), None)
    assert resolve_build_options(None, None, adapter=True) == ("none", (), "lora-b")
    assert resolve_build_options(None, "layer", adapter=True) == ("layer", (), "lora-b")
    assert resolve_build_options(None, None, ("*q_proj*",), adapter=True) == (
        "none",
        ("*q_proj*",),
        None,
    )
    assert resolve_build_options(None, None, (), "lora-a", adapter=True) == ("none", (), "lora-a")
    assert resolve_build_options("paper", None, adapter=True) == ("layer", (), None)
    assert resolve_build_options("paper", "layer") == ("layer", (), None)
    assert resolve_build_options(None, "none", ("*q*",), "lora-b") == ("none", ("*q*",), "lora-b")
    with pytest.raises(SettingsError, match="--normalization none"):
        resolve_build_options("paper", "none")
    with pytest.raises(SettingsError, match="--params-preset lora-b"):
        resolve_build_options("paper", None, (), "lora-b")
    # Query defaults: cosine where it is defined, signed ranking; an explicit flag wins.
    assert resolve_query_options(None) == ScoreOptions("cosine", "signed")
    assert resolve_query_options(None, method="exact") == ScoreOptions("cosine", "signed")
    assert resolve_query_options(None, method="bm25") == ScoreOptions("dot", "signed")
    assert resolve_query_options(None, has_norms=False) == ScoreOptions("dot", "signed")
    assert resolve_query_options(None, "cosine", has_norms=False) == ScoreOptions("cosine")
    assert resolve_query_options(None, "dot", "abs") == ScoreOptions("dot", "abs")
    assert ScoreOptions() == ScoreOptions("dot", "signed")  # the paper's
    assert resolve_query_options("paper", "dot") == ScoreOptions("dot", "signed")
    assert resolve_query_options(None, "cosine", "abs") == ScoreOptions("cosine", "abs")
    with pytest.raises(SettingsError, match="--rank-by abs"):
        resolve_query_options("paper", None, "abs")
    with pytest.raises(SettingsError, match="--preset"):
        resolve_query_options("bogus")
    # the CLI spells the choices out so that it starts without torch; they must agree
    assert tuple(cli_module.SCORE_CHOICES) == SCORES
    assert tuple(cli_module.RANK_BY_CHOICES) == RANK_BY
    assert tuple(cli_module.PRESET_CHOICES) == PRESETS


# ---- command line --------------------------------------------------------------------------


def _gen(root: Path) -> Path:
    path = root / "gen.txt"
    path.write_text("sat on the mat")
    return path


def _run(*args):
    return CliRunner().invoke(cli, ["--quiet", *args])


def test_cli_score_flags(lora, layer_index, tmp_path):
    model, adapter, data = lora
    gen = str(_gen(tmp_path))
    result = _run(
        "query",
        "--index",
        layer_index,
        "--generation",
        gen,
        "--prompt",
        "the cat",
        "--topk",
        "4",
        "--score",
        "cosine",
        "--rank-by",
        "abs",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    (q,) = json.loads(result.stdout)["queries"]
    assert q["score"] == "cosine" and q["rank_by"] == "abs"
    assert all(r["effect"] in ("helpful", "harmful") for r in q["results"])
    magnitudes = [abs(r["score"]) for r in q["results"]]
    assert magnitudes == sorted(magnitudes, reverse=True) and max(magnitudes) <= 1.0
    table = _run(
        "query",
        "--index",
        layer_index,
        "--generation",
        gen,
        "--prompt",
        "the cat",
        "--topk",
        "4",
        "--rank-by",
        "abs",
    )
    assert table.exit_code == 0, table.output
    assert "effect" in table.output and "most influential" in table.output
    paper = _run(
        "query",
        "--index",
        layer_index,
        "--generation",
        gen,
        "--prompt",
        "the cat",
        "--topk",
        "3",
        "--preset",
        "paper",
        "--format",
        "json",
    )
    assert paper.exit_code == 0, paper.output
    paper_query = json.loads(paper.stdout)["queries"][0]
    assert set(paper_query) == {"prompt", "generation", "score", "rank_by", "results"}
    assert (paper_query["score"], paper_query["rank_by"]) == ("dot", "signed")
    clash = _run(
        "query",
        "--index",
        layer_index,
        "--generation",
        gen,
        "--prompt",
        "x",
        "--preset",
        "paper",
        "--score",
        "cosine",
    )
    assert clash.exit_code == 1 and "drop --score cosine" in clash.output
    baseline = _run(
        "query",
        "--index",
        layer_index,
        "--generation",
        gen,
        "--prompt",
        "x",
        "--method",
        "random",
        "--score",
        "cosine",
    )
    assert baseline.exit_code == 1 and "--score cosine is defined for" in baseline.output

    ix = tmp_path / "lora-b"
    built = _run(
        "build",
        "--data",
        data,
        "--index",
        str(ix),
        "--model",
        model,
        "--adapter",
        adapter,
        "-k",
        "256",
        "--params-preset",
        "lora-b",
    )
    assert built.exit_code == 0, built.output
    info = _run("info", "--index", str(ix))
    assert "--params-preset lora-b" in info.output and "dot or cosine" in info.output
    not_paper = _run(
        "query", "--index", str(ix), "--generation", gen, "--prompt", "x", "--preset", "paper"
    )
    assert not_paper.exit_code == 1 and "--params-preset lora-b" in not_paper.output
    refused = _run(
        "build",
        "--data",
        data,
        "--index",
        str(tmp_path / "p"),
        "--model",
        model,
        "--preset",
        "paper",
        "--normalization",
        "none",
    )
    assert refused.exit_code == 1 and "--preset paper" in refused.output
    assert not (tmp_path / "p").exists()
    bad = _run(
        "build",
        "--data",
        data,
        "--index",
        str(tmp_path / "q"),
        "--model",
        model,
        "--params-preset",
        "middle-layers",
    )
    assert bad.exit_code == 1 and "unknown --params-preset" in bad.output


def test_cli_build_with_paper_preset_records_it(lora, tmp_path):
    model, adapter, data = lora
    result = _run(
        "build",
        "--data",
        data,
        "--index",
        str(tmp_path / "ix"),
        "--model",
        model,
        "--adapter",
        adapter,
        "-k",
        "256",
        "--preset",
        "paper",
        "--limit",
        "4",
    )
    assert result.exit_code == 0, result.output
    scores = Store.open(tmp_path / "ix").manifest["scores"]
    assert scores["preset"] == "paper" and scores["paper_gradient"]


def test_cli_build_of_an_adapter_defaults_to_raw_lora_b_gradients(lora, tmp_path):
    model, adapter, data = lora
    args = ["--data", data, "--model", model, "--adapter", adapter, "-k", "256", "--limit", "4"]
    result = _run("build", "--index", str(tmp_path / "ix"), *args)
    assert result.exit_code == 0, result.output
    manifest = Store.open(tmp_path / "ix").manifest
    gradient = manifest["gradient"]
    assert gradient["normalization"] == "none" and gradient["params_preset"] == "lora-b"
    assert all(".lora_B." in p["name"] for p in gradient["parameters"])
    assert not manifest["scores"]["paper_gradient"]
    # Choosing the tensors yourself turns the LoRA B default off.
    result = _run("build", "--index", str(tmp_path / "iq"), *args, "--params", "*q_proj*")
    assert result.exit_code == 0, result.output
    gradient = Store.open(tmp_path / "iq").manifest["gradient"]
    assert gradient["params_preset"] is None and gradient["normalization"] == "none"


# ---- score variants ------------------------------------------------------------------------


def test_score_variant_sums_equal_brute_force(lora):
    model, adapter, data = lora
    loaded = load_model(model, adapter)
    params = select_parameters(loaded.model)
    raw = GradientComputer(loaded.model, params, "none")
    examples = tokenize_records(load_records(data), loaded.tokenizer, "alpaca", 512)
    queries = tokenize_records(
        [Record(i, q.instruction, "", q.generation) for i, q in enumerate(QUERIES)],
        loaded.tokenizer,
        "alpaca",
        512,
    )
    q = torch.stack([raw.gradient(e) for e in queries])
    pts = per_tensor_pass(raw, q, examples, batch_size=5)
    g = torch.stack([raw.gradient(e) for e in examples]).double()
    q = q.double()
    names = raw.names
    for subset in VARIANT_PARAMS:
        mask = pts.mask(subset)
        assert mask.sum() == (8 if subset == "all" else 4)
        slots = [i for i in range(len(names)) if mask[i]]
        pieces = [slice(raw.offsets[i], raw.offsets[i + 1]) for i in slots]
        g_s = torch.cat([g[:, p] for p in pieces], dim=1)
        q_s = torch.cat([q[:, p] for p in pieces], dim=1)
        g_l = torch.cat([g[:, p] / g[:, p].norm(dim=1, keepdim=True) for p in pieces], dim=1)
        q_l = torch.cat([q[:, p] / q[:, p].norm(dim=1, keepdim=True) for p in pieces], dim=1)
        want = {
            "none": q_s @ g_s.T,
            "none-cosine": (q_s @ g_s.T) / q_s.norm(dim=1)[:, None] / g_s.norm(dim=1)[None],
            "layer": q_l @ g_l.T,
            "cosine": (q_l @ g_l.T) / q_l.norm(dim=1)[:, None] / g_l.norm(dim=1)[None],
        }
        for normalization in VARIANT_NORMALIZATIONS:
            got = variant_scores(pts, mask, normalization)
            np.testing.assert_allclose(
                got,
                want[normalization].numpy(),
                rtol=1e-5,
                atol=1e-7 * float(want[normalization].abs().max()),
            )


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_variants_stage_on_a_finished_run_dir(tmp_path):
    tool = _tool("run_backdoor_eval")
    out = tmp_path / "bd"
    args = ["--tiny", "--out", str(out), "--methods", "rapidin,exact"]
    tool.main(args)
    assert not (out / "score-variants.md").exists()
    tool.main([*args, "--score-variants"])
    stages = {
        s["stage"]: s["cached"] for s in json.loads((out / "results.json").read_text())["stages"]
    }
    assert stages.pop("score variants") is False and all(stages.values()), stages
    report = (out / "score-variants.md").read_text()
    assert "| exact (paper) | all | layer | signed |" in report
    assert "| RapidIn sketch K=1024 λ=4 | all | cosine | abs |" in report
    results = json.loads((out / "score-variants.json").read_text())
    rows = results["query_sets"]["generation"]
    assert len(rows) == 3 * 4 * 2 + 4
    # The exact paper variant's auPRC/auROC equal the report's TracIn + LN row.
    main = json.loads((out / "results.json").read_text())["metrics"]["TracIn + LN"]
    paper = next(r for r in rows if r["paper"])
    assert paper["metrics"]["Top 5 auPRC"] == pytest.approx(main["5"]["auprc"], abs=1e-6)
    assert paper["metrics"]["Top 5 auROC"] == pytest.approx(main["5"]["auroc"], abs=1e-6)
    # A rerun redoes no gradient work: only the summary tables are written again.
    tool.main([*args, "--score-variants"])
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert [s["stage"] for s in stages if not s["cached"]] == ["score variants"], stages
