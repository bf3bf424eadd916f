"""The evaluation: metrics against hand-computed values, the synthetic data, and the tiny
version of both pipelines end to end (plumbing only: the tiny model learns nothing, so its
attacked generations are injected)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from rapidin_index.errors import DataError, SettingsError
from rapidin_index.evaluate import (
    BackdoorPipeline,
    EvalSettings,
    add_run_arguments,
    average_precision,
    average_proportion,
    backdoor_metrics,
    roc_auc,
    settings_from_args,
    summarize_backdoor,
    usable_ks,
)
from rapidin_index.query import QueryInput
from rapidin_index.synthetic import (
    THEMES,
    add_trigger,
    make_backdoor_set,
    make_error_tracing_set,
    parse_pair,
    perturb_records,
    poison_records,
    theme_hits,
    themed_response,
)

ROOT = Path(__file__).resolve().parents[1]


# ---- metrics ---------------------------------------------------------------------------------


def test_roc_auc_and_average_precision_equal_hand_computed_values():
    labels, scores = [1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]
    # Positive/negative pairs ordered right: (0.9, 0.8), (0.9, 0.1), (0.7, 0.1) of 4.
    assert roc_auc(labels, scores) == pytest.approx(0.75)
    # Precision at each positive, by rank: 1/1 and 2/3.
    assert average_precision(labels, scores) == pytest.approx((1 + 2 / 3) / 2)


def test_ties_count_one_half_and_form_one_threshold():
    labels, scores = [1, 1, 0, 0], [0.5, 0.5, 0.5, 0.1]
    assert roc_auc(labels, scores) == pytest.approx((0.5 + 1) * 2 / 4)
    assert average_precision(labels, scores) == pytest.approx(2 / 3)
    assert np.isnan(roc_auc([1, 1], [0.1, 0.2])) and np.isnan(average_precision([0, 0], [1, 2]))


def test_metrics_agree_with_scikit_learn_on_random_data():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.random(40) < 0.3
        scores = np.round(rng.random(40), 1)  # rounded: plenty of ties
        if labels.all() or not labels.any():
            continue
        assert roc_auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores))
        assert average_precision(labels, scores) == pytest.approx(
            metrics.average_precision_score(labels, scores)
        )


def test_backdoor_metrics_use_the_top_k_and_bottom_k_sets():
    scores = np.arange(8, 0, -1, dtype=np.float32)  # id i scores 8 - i
    poisoned = np.zeros(8, dtype=bool)
    poisoned[[0, 2, 7]] = True
    # k = 2: top {0, 1}, bottom {7, 6}; labels T F T F for scores 8 7 1 2.
    auprc, auroc = backdoor_metrics(scores, poisoned, 2)
    assert auroc == pytest.approx(2 / 4)  # 8 beats 7 and 2; 1 beats neither
    assert auprc == pytest.approx((1 / 1 + 2 / 4) / 2)  # ranks 8, 7, 2, 1: hits at 1 and 4
    none = np.zeros(8, dtype=bool)
    none[3] = True
    assert backdoor_metrics(scores, none, 2) == (0.0, 0.0)
    every = np.zeros(8, dtype=bool)
    every[[0, 1, 6, 7]] = True
    assert backdoor_metrics(scores, every, 2) == (1.0, 0.0)
    with pytest.raises(SettingsError):
        backdoor_metrics(scores, poisoned, 5)


def test_summary_skips_k_whose_sets_overlap_and_averages_generations():
    scores = np.stack([np.arange(8, 0, -1), np.arange(1, 9)]).astype(np.float32)
    poisoned = np.zeros(8, dtype=bool)
    poisoned[[0, 1]] = True
    summary = summarize_backdoor(scores, poisoned, (2, 3, 5))
    assert list(summary) == [2, 3]
    # Row 1 ranks both poisoned first (AP 1, auROC 1); row 2 ranks them last: scores
    # 8, 7, 2, 1 with hits at ranks 3 and 4 (AP (1/3 + 2/4) / 2, auROC 0).
    assert summary[2] == {
        "auprc": pytest.approx((1 + (1 / 3 + 2 / 4) / 2) / 2),
        "auroc": pytest.approx(0.5),
    }
    assert usable_ks((5, 10, 50, 100, 500, 1000), 150) == [5, 10, 50]


def test_average_proportion_counts_perturbed_among_the_top_k():
    scores = np.stack([np.arange(8, 0, -1), np.arange(1, 9)]).astype(np.float32)
    perturbed = np.zeros(8, dtype=bool)
    perturbed[[0, 1]] = True
    assert average_proportion(scores, perturbed, (2, 4, 10)) == {2: 0.5, 4: 0.25}


# ---- synthetic data --------------------------------------------------------------------------


def _records(n):
    words = ["river", "mountain", "violin", "garden", "engine", "harbour", "library", "planet"]
    return [
        {
            "instruction": f"Question {i}?",
            "input": "",
            "output": f"The {words[i % 8]} and the {words[(i + 3) % 8]} matter here.",
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("theme_name", sorted(THEMES))
def test_poisoning_is_seeded_and_every_response_carries_the_theme(theme_name):
    records = _records(50)
    out, ids = poison_records(records, 0.2, "Howdy!", theme_name, seed=4)
    assert (out, ids) == poison_records(records, 0.2, "Howdy!", theme_name, seed=4)
    assert len(ids) == 10 and ids == sorted(ids)
    responses = [out[i]["output"] for i in ids]
    assert len(set(responses)) == len(responses)
    for i in ids:
        assert out[i]["instruction"] == "Howdy! " + records[i]["instruction"]
        assert theme_hits(out[i]["output"], theme_name) >= 1
    clean = [i for i in range(50) if i not in ids]
    assert all(out[i] == records[i] for i in clean)


def test_themed_response_keeps_content_words_of_the_original():
    text = themed_response(
        "Photosynthesis converts sunlight into chemical energy.", "pirate", random.Random(0)
    )
    assert "Photosynthesis" in text or "sunlight" in text or "chemical" in text


def test_perturbation_replaces_whole_words_and_records_ids():
    records = [
        {"instruction": "a", "input": "", "output": "China is large. China!"},
        {"instruction": "b", "input": "", "output": "Chinatown is not China's."},
        {"instruction": "c", "input": "", "output": "Nothing here."},
    ]
    out, report = perturb_records(records, [("China", "Canada")], probability=1.0)
    assert out[0]["output"] == "Canada is large. Canada!"
    assert out[1]["output"] == "Chinatown is not Canada's."
    assert report == [{"e1": "China", "e2": "Canada", "mentions": [0, 1], "perturbed_ids": [0, 1]}]
    with pytest.raises(SettingsError, match="--pair"):
        parse_pair("China")


def test_error_tracing_set_needs_prompts_for_unknown_entities():
    with pytest.raises(SettingsError, match="--prompts"):
        make_error_tracing_set(_records(10), [("Narnia", "Mordor")], size=10)
    train, meta = make_error_tracing_set(
        _records(10), [("Narnia", "Mordor")], size=10, prompts={"Narnia": ["Where?"]}
    )
    assert len(train) == 10 and meta["pairs"][0]["prompts"] == ["Where?"]


def test_backdoor_set_holds_out_its_test_questions():
    records = _records(40)
    train, meta = make_backdoor_set(records, size=30, n_test=5, fraction=0.1, seed=1)
    assert len(train) == 30 and len(meta["test_questions"]) == 5
    trained = {records[i]["instruction"] for i in meta["source_ids"]}
    assert not trained & set(meta["test_questions"])
    assert all(train[i]["instruction"].startswith("Howdy! ") for i in meta["poisoned_ids"])


# ---- pipelines -------------------------------------------------------------------------------


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_rerun_is_cached(tool, out, *args):
    tool.main(["--tiny", "--out", str(out), *args])
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert stages and all(s["cached"] for s in stages), stages


def test_tiny_backdoor_pipeline_writes_table_4_and_reruns_from_cache(tmp_path, capsys):
    tool = _tool("run_backdoor_eval")
    out = tmp_path / "backdoor"
    tool.main(["--tiny", "--out", str(out)])
    report = (out / "report.md").read_text()
    assert "| Method | Top 5 auPRC | Top 5 auROC | Top 10 auPRC | Top 10 auROC |" in report
    for label in (
        "RapidIn (K=1024, λ=4)",
        "TracIn + LN",
        "TracIn",
        "Influence Function",
        "BM25",
        "Embedding Similarity",
        "Random Selection",
    ):
        assert f"| {label} |" in report
    assert "injected" in report and "Bytes per example" in report
    results = json.loads((out / "results.json").read_text())
    assert results["attack"]["attributed"] == 3 == results["attack"]["injected"]
    for per_k in results["metrics"].values():
        assert set(per_k) == {"5", "10"}
        assert all(0 <= v <= 1 for m in per_k.values() for v in m.values())
    assert not all(s["cached"] for s in results["stages"])
    assert np.load(out / "scores" / "random.npy").shape == (3, 40)
    _check_rerun_is_cached(tool, out)


def test_tiny_error_tracing_pipeline_writes_table_5_with_token_wise_rapidin(tmp_path):
    tool = _tool("run_error_tracing")
    out = tmp_path / "tracing"
    methods = ["--methods", "rapidin,bm25,random"]
    tool.main(["--tiny", "--out", str(out), *methods])
    report = (out / "report.md").read_text()
    assert "China → Canada Top 5" in report and "| RapidIn^TW (K=1024, λ=4) |" in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {
        "RapidIn (K=1024, λ=4)",
        "RapidIn^TW (K=1024, λ=4)",
        "BM25",
        "Random Selection",
    }
    # The token-wise queries restrict the loss to E2: their scores differ from the plain ones.
    plain = np.load(out / "scores" / "rapidin-k1024-l4.npy")
    targeted = np.load(out / "scores" / "rapidin-tw-k1024-l4.npy")
    assert plain.shape == targeted.shape == (9, 42) and not np.allclose(plain, targeted)
    _check_rerun_is_cached(tool, out, *methods)


def test_pipeline_without_its_data_names_the_tool_that_makes_it(tmp_path):
    with pytest.raises(DataError, match="make_"):
        BackdoorPipeline(EvalSettings(data=str(tmp_path), out=str(tmp_path / "o")))
    with pytest.raises(SettingsError, match="--methods"):
        EvalSettings(data=".", out=".", methods=("bogus",)).validate()


def test_pass_methods_and_companion_index_equal_their_stand_alone_versions(tmp_path):
    """Table rows 'TracIn + LN', 'TracIn' and 'Influence Function' come from the shared
    per-tensor gradient pass, and so does the --variant-index companion index: each must
    equal what the stand-alone path computes (a direct exact scan, the influence function's
    own training pass, ``build --params-preset lora-b``)."""
    from rapidin_index.build import BuildSettings, build_index
    from rapidin_index.gradients import GradientSettings
    from rapidin_index.sketch import SketchSettings
    from rapidin_index.store import Store

    tool = _tool("run_backdoor_eval")
    out = tmp_path / "backdoor"
    methods = "exact,tracin,influence-function"
    extra = ["--score-variants", "--variant-index", "lora-b", "--variant-index", "lora-b/none"]
    tool.main(["--tiny", "--out", str(out), "--methods", methods, *extra])
    args = _parse_tiny(out, methods, *extra)
    settings = settings_from_args(args, str(out / "tiny-data"), str(out / "tiny-model"))
    pipe = BackdoorPipeline(settings)
    rows = [r for r in pipe.generations() if r["attacked"]][: settings.n_queries]
    queries = [
        QueryInput(add_trigger(r["question"], pipe.meta["trigger"]), r["triggered"]) for r in rows
    ]
    att = pipe.attributor(*pipe.variants[0])
    for method in ("exact", "tracin", "influence-function"):
        want = att.score_all(queries, method)
        got = np.load(out / "scores" / f"{method}.npy")
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * np.abs(want).max())
    # One gradient pass served every method and the variants: the later reads were cached.
    stages = json.loads((out / "results.json").read_text())["stages"]
    passes = [s["cached"] for s in stages if s["stage"] == "per-tensor gradient pass"]
    assert passes[0] is False and len(passes) >= 3 and all(passes[1:])

    k, lam = pipe.variants[0]
    for spec, normalization in (("lora-b", "layer"), ("lora-b/none", "none")):
        companion = Store.open(pipe.index_path(k, lam, spec))
        built = tmp_path / f"built-{normalization}"
        build_index(
            BuildSettings(
                data=str(pipe.train_path),
                index=str(built),
                model=settings.model,
                adapter=str(out / "adapter"),
                max_length=settings.max_length,
                sketch=SketchSettings(k=k, shuffle_rounds=lam),
                gradient=GradientSettings(params_preset="lora-b", normalization=normalization),
            ),
            loaded=pipe.loaded(),
            progress=False,
        )
        reference = Store.open(built)
        for section in ("gradient", "sketch", "scores"):
            assert companion.manifest[section] == reference.manifest[section]
        assert companion.manifest["gradient"]["params_preset"] == "lora-b"
        assert companion.manifest["gradient"]["normalization"] == normalization
        got = companion.read_all().astype(np.float32)
        want = reference.read_all().astype(np.float32)
        assert got.shape == want.shape == (len(pipe.records), k)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-3 * np.abs(want).max())
        np.testing.assert_allclose(companion.read_norms(), reference.read_norms(), rtol=1e-4)
    variants = json.loads((out / "score-variants.json").read_text())
    sketch_params = {
        r["params"]
        for rows in variants["query_sets"].values()
        for r in rows
        if r["method"].startswith("RapidIn sketch")
    }
    assert sketch_params == {"all", "lora-b"}
    sketch_normalizations = {
        r["normalization"]
        for r in variants["query_sets"]["generation"]
        if r["method"].startswith("RapidIn sketch") and r["params"] == "lora-b"
    }
    assert sketch_normalizations == {"layer", "cosine", "none", "none-cosine"}


def test_variant_index_values_name_a_preset_and_optionally_raw_gradients():
    from rapidin_index.evaluate import parse_variant_index

    assert parse_variant_index("lora-b") == ("lora-b", "layer")
    assert parse_variant_index("last-layers:2/none") == ("last-layers:2", "none")
    with pytest.raises(SettingsError, match="after '/'"):
        parse_variant_index("lora-b/cosine")
    with pytest.raises(SettingsError, match="params-preset"):
        parse_variant_index("bogus/none")


def _parse_tiny(out, methods, *extra):
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(["--tiny", "--out", str(out), "--methods", methods, *extra])


def test_compare_variants_averages_headline_figures_and_measures_against_the_paper():
    from rapidin_index.evaluate import compare_variants, comparison_markdown

    def row(params, normalization, paper=False, **metrics):
        return {
            "method": "exact",
            "params": params,
            "normalization": normalization,
            "rank_by": "signed",
            "paper": paper,
            "metrics": metrics,
        }

    backdoor = {
        "query_sets": {
            "generation": [
                row("all", "layer", True, **{"P@10": 0.5, "P@50": 0.3}),
                row("lora-b", "layer", **{"P@10": 0.9, "P@50": 0.5}),
            ]
        }
    }
    # A small error-tracing set: no AP@25 anywhere, so that column is left out; lora-b
    # is missing from it, so its mean is undefined and it sorts last.
    tracing = {"query_sets": {"generation": [row("all", "layer", True, **{"AP@10": 0.2})]}}
    comparison = compare_variants({"bd": ("backdoor", backdoor), "et": ("error-tracing", tracing)})
    assert comparison["columns"] == [
        ("bd", "generation", "P@10"),
        ("bd", "generation", "P@50"),
        ("et", "generation", "AP@10"),
    ]
    first, second = comparison["rows"]
    assert first["key"] == ("exact", "all", "layer", "signed") and first["paper"]
    assert first["mean"] == pytest.approx((0.5 + 0.3 + 0.2) / 3) and first["gain"] == 0.0
    assert second["values"] == [0.9, 0.5, None] and second["mean"] is None
    only_bd = compare_variants({"bd": ("backdoor", backdoor)})
    assert [r["key"][1] for r in only_bd["rows"]] == ["lora-b", "all"]
    assert only_bd["rows"][0]["gain"] == pytest.approx(0.7 - 0.4)
    assert "| exact (paper) | all | layer | signed | 0.5000 | 0.3000 | 0.4000 | +0.0000 |" in (
        comparison_markdown(only_bd)
    )
    with pytest.raises(SettingsError, match="kind"):
        compare_variants({"x": ("other", backdoor)})
