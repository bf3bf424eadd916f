"""Token-wise influence (Eqs. 6-8) against brute force per-token backward passes.

Brute force here means: one separate forward + backward per token, each on a copy of the
example whose labels keep only that token (so ``example_loss`` is that token's own CE term),
then the layer-wise factors of the example's full gradient, then a dense inner product.
Tolerances: fp32 everywhere; scores are O(1-30), compared with rtol 1e-4 and an absolute
slack of 1e-4 times the largest score.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapidin_index.build import BuildSettings, build_index
from rapidin_index.data import IGNORE_INDEX, Record, format_prompt, tokenize_example
from rapidin_index.errors import DataError
from rapidin_index.gradients import GradientComputer, example_loss
from rapidin_index.model import select_parameters
from rapidin_index.query import Attributor, QueryInput, topk_rows
from rapidin_index.sketch import SketchSettings
from rapidin_index.tokenwise import (
    TokenwiseScorer,
    example_pieces,
    find_target,
    generation_pieces,
    loss_positions,
    restrict_labels,
    restrict_to_target,
)
from tests.tiny import make_records, write_jsonl

RECORD = Record(0, "the cat Zürich 東京 🙂", "sun moon", "sat on the mat 🙂 under the red sun")
GENERATION = "the cat sat on the mat and the cat"


def _close(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    slack = 1e-4 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=slack)


@pytest.fixture
def setup(tiny_model):
    """Tokenizer, a fresh model (computers and PEFT change requires_grad), train, generation."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    train = tokenize_example(
        tok, format_prompt(RECORD.merged_instruction, tok, "alpaca"), RECORD.output, 512
    )
    gen = tokenize_example(tok, format_prompt("why the cat", tok, "alpaca"), GENERATION, 512)
    return tok, model, train, gen


def _lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    # LoRA's B starts at zero, which makes every A gradient zero; give B values so both
    # factors carry signal.
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def per_token_grads(computer, example) -> list[list[torch.Tensor]]:
    """Raw gradients of each labelled token's own loss term, one backward each."""
    out = []
    for t in loss_positions(example):
        alone = restrict_labels(example, [t])
        loss = example_loss(computer.model, alone)
        grads = torch.autograd.grad(loss, computer.params, allow_unused=True)
        out.append(
            [
                torch.zeros_like(p) if g is None else g.float()
                for g, p in zip(grads, computer.params, strict=True)
            ]
        )
    return out


def scaled_flat(computer, grads, scales) -> torch.Tensor:
    return torch.cat([g.reshape(-1) * s for g, s in zip(grads, scales, strict=True)])


def brute_eq6(computer, train, gen) -> np.ndarray:
    scales = computer.layer_scales(computer.parameter_gradients(train))
    g_gen = computer.gradient(gen)
    return np.array(
        [float(scaled_flat(computer, g, scales) @ g_gen) for g in per_token_grads(computer, train)]
    )


@pytest.mark.parametrize("method", ["jvp", "double-backward", "loop"])
def test_eq6_of_every_method_equals_per_token_backward_brute_force(setup, method):
    _, model, train, gen = setup
    computer = GradientComputer(model, select_parameters(model), "layer")
    scorer = TokenwiseScorer(computer, method)
    got = scorer.token_influence(scorer.prepare(train), scorer.prepare(gen))
    assert got.shape == (len(loss_positions(train)),)
    _close(got, brute_eq6(computer, train, gen))


def test_eq6_with_lora_parameters_equals_brute_force(setup):
    _, model, train, gen = setup
    peft_model = _lora(model)
    computer = GradientComputer(peft_model, select_parameters(peft_model), "layer")
    assert computer.names and all("lora_" in n for n in computer.names)
    scorer = TokenwiseScorer(computer, "jvp")
    got = scorer.token_influence(scorer.prepare(train), scorer.prepare(gen))
    _close(got, brute_eq6(computer, train, gen))


@pytest.mark.parametrize("normalization", ["layer", "none"])
def test_mean_of_token_scores_is_exactly_the_sentence_score(setup, normalization):
    _, model, train, gen = setup
    computer = GradientComputer(
        model, select_parameters(model, ["*mlp*", "lm_head*"]), normalization
    )
    scorer = TokenwiseScorer(computer)
    s, t = scorer.prepare(train), scorer.prepare(gen)
    sentence = float(computer.gradient(train) @ computer.gradient(gen))
    # Eq. 6 averaged over the training tokens and Eq. 7 averaged over the generation tokens
    # both give back Eq. 5 (relative tolerance 1e-5: fp32 sums in a different order).
    assert float(scorer.token_influence(s, t).mean()) == pytest.approx(sentence, rel=1e-5)
    assert float(scorer.token_influence(t, s).mean()) == pytest.approx(sentence, rel=1e-5)


def test_pairwise_matrix_equals_brute_force_and_its_marginals_are_eq6_and_eq7(setup):
    _, model, train, gen = setup
    computer = GradientComputer(model, select_parameters(model, ["model.layers.1.*"]), "layer")
    scorer = TokenwiseScorer(computer)
    s, t = scorer.prepare(train), scorer.prepare(gen)
    matrix = scorer.pairwise(t, s)
    assert matrix.shape == (len(t.positions), len(s.positions))
    rows = torch.stack([scaled_flat(computer, g, t.scales) for g in per_token_grads(computer, gen)])
    cols = torch.stack(
        [scaled_flat(computer, g, s.scales) for g in per_token_grads(computer, train)]
    )
    _close(matrix, rows @ cols.T)
    # The loop runs over the shorter side; swapping the roles transposes the result.
    _close(scorer.pairwise(s, t).T, matrix)
    _close(matrix.mean(0), scorer.token_influence(s, t))
    _close(matrix.mean(1), scorer.token_influence(t, s))


def test_target_gradient_is_the_mean_over_every_occurrences_tokens(setup):
    tok, model, _, gen = setup
    computer = GradientComputer(model, select_parameters(model), "none")
    spans = find_target(GENERATION, "cat")
    assert spans == [(4, 7), (31, 34)]
    restricted = restrict_to_target(tok, gen, GENERATION, "cat")
    kept = loss_positions(restricted)
    pieces = {p.position: p for p in generation_pieces(tok, GENERATION, gen)}
    # Exactly the tokens overlapping an occurrence of "cat", from both occurrences.
    assert {pieces[t].text.strip() for t in kept} <= {"cat", "c", "at", "ca", "t"}
    assert any(pieces[t].end <= 7 for t in kept) and any(pieces[t].end > 31 for t in kept)
    per_token = per_token_grads(computer, gen)
    by_position = dict(zip(loss_positions(gen), per_token, strict=True))
    expected = torch.cat(
        [
            torch.stack([by_position[t][k] for t in kept]).mean(0).reshape(-1)
            for k in range(len(computer.params))
        ]
    )
    torch.testing.assert_close(computer.gradient(restricted), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", ["Canada", "CAT", ""])
def test_target_text_not_in_the_generation_is_a_data_error_naming_the_flag(setup, target):
    tok, _, _, gen = setup
    with pytest.raises(DataError, match="--target-text"):
        restrict_to_target(tok, gen, GENERATION, target)


def test_pieces_are_exact_slices_of_the_original_fields(setup):
    tok, _, train, gen = setup
    pieces = example_pieces(tok, "alpaca", RECORD, train)
    fields = {"instruction": RECORD.instruction, "input": RECORD.input, "output": RECORD.output}
    for p in pieces:
        if p.field == "eos":
            assert p.text == tok.eos_token and train.input_ids[p.position] == tok.eos_token_id
        else:
            assert fields[p.field][p.start : p.end] == p.text
    # Every token with a loss term has exactly one piece; together they cover the output.
    scored = [p for p in pieces if p.field in ("output", "eos")]
    assert [p.position for p in scored] == loss_positions(train)
    covered = {i for p in scored for i in range(p.start, p.end) if p.field == "output"}
    assert covered == set(range(len(RECORD.output)))
    assert {p.field for p in pieces} == {"instruction", "input", "output", "eos"}
    gen_pieces = generation_pieces(tok, GENERATION, gen)
    assert [p.position for p in gen_pieces] == loss_positions(gen)
    assert "".join(p.text for p in gen_pieces if p.field == "generation") == GENERATION


def test_pieces_of_truncated_examples_cover_only_the_kept_tokens(setup):
    tok, _, train, _ = setup
    prompt = format_prompt(RECORD.merged_instruction, tok, "alpaca")
    fields = {"instruction": RECORD.instruction, "input": RECORD.input, "output": RECORD.output}
    # Response cut from the right (no EOS left), then prompt cut from the left.
    for max_length in (train.prompt_len + 5, train.prompt_len // 2):
        short = tokenize_example(tok, prompt, RECORD.output, max_length)
        assert short.truncated
        pieces = example_pieces(tok, "alpaca", RECORD, short)
        assert all(0 <= p.position < len(short.input_ids) for p in pieces)
        assert [p.position for p in pieces if p.field in ("output", "eos")] == loss_positions(short)
        assert all(fields[p.field][p.start : p.end] == p.text for p in pieces if p.field in fields)
    assert not any(
        p.field == "eos"
        for p in example_pieces(
            tok,
            "alpaca",
            RECORD,
            tokenize_example(tok, prompt, RECORD.output, train.prompt_len + 5),
        )
    )


# -- through the Attributor: --target-text retrieval and annotate() ---------------------------


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("tw")
    records = make_records(24, seed=5)
    records[7]["output"] = "the cat sat on the mat"
    data = write_jsonl(root / "train.jsonl", records)
    build_index(
        BuildSettings(
            data=str(data), index=str(root / "ix"), model=tiny_model, sketch=SketchSettings(k=1024)
        ),
        progress=False,
    )
    return str(root / "ix")


def test_target_text_retrieval_ranks_the_store_by_the_restricted_gradient(index):
    att = Attributor(index)
    query = QueryInput("why", GENERATION, target_text="mat")
    restricted = att.computer.gradient(att.query_example(query))
    whole = att.computer.gradient(att.tokenize(query))
    assert not torch.allclose(restricted, whole)
    torch.testing.assert_close(att.query_gradients([query])[0], restricted)
    expected = (
        att.sketch.transform(restricted[None]).numpy() @ att.store.read_all().astype(np.float32).T
    )[0]
    result = att.attribute([query], topk=5)[0]
    ids, _ = topk_rows(expected, 5)
    assert [r["id"] for r in result.results] == ids.tolist()
    # Without a target the ranking is that of the whole generation.
    plain = att.attribute([QueryInput("why", GENERATION)], topk=5)[0]
    assert plain.results[0]["score"] != pytest.approx(result.results[0]["score"])


def test_annotate_exact_score_is_the_uncompressed_score_and_tokens_map_to_text(index):
    from rapidin_index.tokenwise import annotate

    att = Attributor(index)
    results = att.attribute([QueryInput("why", GENERATION)], topk=4)
    annotate(att, results, top=2, pairwise=True)
    res = results[0]
    gen_ex = att.tokenize(QueryInput("why", GENERATION))
    g_gen = att.computer.gradient(gen_ex)
    records = att.records()
    for row in res.results[:2]:
        rec = records[row["id"]]
        train_ex = att.tokenize(QueryInput(rec.merged_instruction, rec.output))
        exact = float(att.computer.gradient(train_ex) @ g_gen)
        assert row["exact_score"] == pytest.approx(exact, rel=1e-4, abs=1e-5)
        scores = [t["score"] for t in row["tokens"] if t["score"] is not None]
        assert np.mean(scores) == pytest.approx(exact, rel=1e-4, abs=1e-5)
        assert len(row["generation_scores"]) == len(res.tokenwise["generation_tokens"])
        assert np.mean(row["generation_scores"]) == pytest.approx(exact, rel=1e-4, abs=1e-5)
    assert "tokens" not in res.results[2]
    pair = res.tokenwise["pairwise"]
    assert np.asarray(pair["matrix"]).shape == (
        len(pair["generation_tokens"]),
        len(pair["train_tokens"]),
    )
    assert np.asarray(pair["matrix"]).mean(0) == pytest.approx(
        [t["score"] for t in res.results[0]["tokens"] if t["score"] is not None], rel=1e-3, abs=1e-4
    )
    assert all(
        t["score"] is None
        for t in res.results[0]["tokens"]
        if t["field"] in ("instruction", "input")
    )
    assert IGNORE_INDEX not in [gen_ex.input_ids[t] for t in loss_positions(gen_ex)]
