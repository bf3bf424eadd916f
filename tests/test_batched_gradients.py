"""Batched per-example gradients equal the one-at-a-time reference (``gradient``).

Tolerance: every entry within ``rtol=1e-4, atol=1e-6`` of the batch-of-one vector. The
vectors are layer-normalised (entries ~ 1/sqrt(tensor size)); float reordering between a
batch and a batch of one moves them by ~1e-7, a leak between examples by ~1e-1.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rapidin_index import gradients as gradients_module
from rapidin_index.data import format_prompt, tokenize_example
from rapidin_index.errors import DataError
from rapidin_index.gradients import GradientComputer, choose_batch_size
from rapidin_index.model import select_parameters
from rapidin_index.sketch import RapidGradSketch, SketchSettings
from tests.tiny import WORDS, make_tiny_model

RTOL, ATOL = 1e-4, 1e-6


def _examples(tokenizer, n: int = 5) -> list:
    """Examples of clearly different lengths (prompt and response both vary)."""
    out = []
    for i, words in enumerate([25, 3, 12, 1, 18, 7][:n]):
        prompt = format_prompt(" ".join(WORDS[i : i + 2 + 3 * i]), tokenizer, "alpaca")
        response = " ".join(WORDS[i : i + words])
        out.append(tokenize_example(tokenizer, prompt, response, 512))
    assert len({len(e.input_ids) for e in out}) == n
    return out


def _reference(computer: GradientComputer, examples) -> torch.Tensor:
    return torch.stack([computer.gradient(e) for e in examples])


@pytest.fixture(scope="module")
def tiny(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    return tiny_model, tok, _examples(tok)


def _full_model(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _lora(model, r: int = 4):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    return get_peft_model(model, config).eval()


@pytest.mark.parametrize("batching", ["packed", "padded"])
@pytest.mark.parametrize("normalization", ["layer", "none"])
def test_full_parameter_batch_equals_one_at_a_time(tiny, batching, normalization):
    path, _, examples = tiny
    model = _full_model(path)
    computer = GradientComputer(model, select_parameters(model), normalization, batching)
    batched = computer.gradients(examples)
    assert computer.batching == batching and computer.verified
    torch.testing.assert_close(batched, _reference(computer, examples), rtol=RTOL, atol=ATOL)


def test_tied_embedding_gets_both_of_its_uses(tiny):
    path, tok, examples = tiny
    config = LlamaConfig.from_pretrained(path)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    computer = GradientComputer(model, select_parameters(model), "none")
    torch.testing.assert_close(
        computer.gradients(examples), _reference(computer, examples), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_lora_batch_equals_one_at_a_time(tiny, batching):
    path, _, examples = tiny
    model = _lora(_full_model(path))
    computer = GradientComputer(model, select_parameters(model), "layer", batching)
    assert all("lora_" in n for n in computer.names)
    torch.testing.assert_close(
        computer.gradients(examples), _reference(computer, examples), rtol=RTOL, atol=ATOL
    )


def test_qlora_4bit_batch_equals_one_at_a_time(tmp_path, tiny):
    _, tok, examples = tiny
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig

        path = make_tiny_model(tmp_path / "tiny64", hidden=64)
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        base = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, dtype=torch.float32
        )
        base(input_ids=torch.tensor([examples[0].input_ids]))
    except Exception as err:  # noqa: BLE001 - any failure means 4-bit cannot run here
        pytest.skip(f"bitsandbytes 4-bit cannot run on this machine: {err}")
    assert "4bit" in type(base.model.layers[0].self_attn.q_proj).__name__
    model = _lora(base)
    computer = GradientComputer(model, select_parameters(model), "layer")
    torch.testing.assert_close(
        computer.gradients(examples), _reference(computer, examples), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_an_examples_gradient_does_not_depend_on_its_neighbours(tiny, batching):
    path, _, examples = tiny
    model = _full_model(path)
    computer = GradientComputer(model, select_parameters(model), "layer", batching)
    target = examples[2]
    alone = computer.gradient(target)
    for neighbours in ([examples[0]], [examples[4], examples[1]], examples[:2] + examples[3:]):
        for batch in (neighbours + [target], [target] + neighbours):
            row = computer.gradients(batch)[batch.index(target)]
            torch.testing.assert_close(row, alone, rtol=RTOL, atol=ATOL)


def test_a_layout_that_leaks_is_caught_and_replaced(tiny, monkeypatch, caplog):
    """Packed rows without restarting position ids let examples see each other: the one-off
    check must notice, fall back to padding, and still return the right gradients."""
    path, _, examples = tiny
    make_layout = gradients_module._make_layout

    def leaky(*args, **kwargs):
        layout = make_layout(*args, **kwargs)
        layout.position_ids = None
        return layout

    monkeypatch.setattr(gradients_module, "_make_layout", leaky)
    model = _full_model(path)
    computer = GradientComputer(model, select_parameters(model), "layer", "packed")
    computer._attention_cost = 0.0  # pack everything into one row, so a leak can happen
    with caplog.at_level(logging.WARNING, logger="rapidin_index.gradients"):
        batched = computer.gradients(examples)
    assert computer.batching == "padded"
    assert "not usable" in caplog.text
    torch.testing.assert_close(batched, _reference(computer, examples), rtol=RTOL, atol=ATOL)


def test_loop_batching_is_the_reference(tiny):
    path, _, examples = tiny
    model = _full_model(path)
    computer = GradientComputer(model, select_parameters(model), "layer", "loop")
    assert torch.equal(computer.gradients(examples[:3]), _reference(computer, examples[:3]))


def test_an_example_without_labels_is_refused_in_a_batch(tiny):
    path, tok, examples = tiny
    model = _full_model(path)
    computer = GradientComputer(model, select_parameters(model))
    empty = tokenize_example(tok, format_prompt("the cat", tok, "alpaca"), "sat", 512)
    empty = type(empty)(empty.input_ids, [-100] * len(empty.labels), empty.prompt_len, True)
    with pytest.raises(DataError, match="no response tokens"):
        computer.gradients([examples[0], empty])


def test_batch_size_is_the_largest_that_fits_the_budget(tiny):
    path, _, examples = tiny
    model = _full_model(path)
    computer = GradientComputer(model, select_parameters(model))
    longest = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    need = [computer.batch_bytes(longest[:b]) for b in range(1, 6)]
    assert need == sorted(need) and need[0] > computer.dim * 4
    assert choose_batch_size(computer, examples, need[2]) == 3
    assert choose_batch_size(computer, examples, need[2] - 1) == 2
    assert choose_batch_size(computer, examples, 1) == 1
    assert choose_batch_size(computer, examples, need[4] * 10, max_batch=4) == 4


def test_sketch_workspace_enters_the_estimate_and_grows_with_k(tiny):
    path, _, examples = tiny
    model = _full_model(path)
    computer = GradientComputer(model, select_parameters(model))
    small = RapidGradSketch(computer.dim, SketchSettings(k=256), backend="torch")
    large = RapidGradSketch(computer.dim, SketchSettings(k=4096), backend="torch")
    for b in (1, 4):
        assert computer.batch_bytes(examples[:b], large.workspace_bytes) > computer.batch_bytes(
            examples[:b], small.workspace_bytes
        )
    per_example = [computer.batch_bytes(examples[:1] * b, small.workspace_bytes) for b in (1, 2, 4)]
    assert per_example[0] < per_example[1] < per_example[2]


def test_batched_build_writes_what_the_one_at_a_time_build_writes(tmp_path, tiny_model):
    import numpy as np

    from rapidin_index.build import BuildSettings, build_index
    from rapidin_index.store import Store
    from tests.tiny import make_records, write_jsonl

    data = str(write_jsonl(tmp_path / "train.jsonl", make_records(7, seed=4)))
    stores = {}
    for name, batch in (("loop", 1), ("auto", None), ("three", 3)):
        settings = BuildSettings(
            data=data,
            index=str(tmp_path / name),
            model=tiny_model,
            sketch=SketchSettings(k=1024),
            batch_size=batch,
        )
        build_index(settings, progress=False)
        stores[name] = Store.open(tmp_path / name)
    assert stores["auto"].manifest["build"]["settings"]["batch_size"] > 1
    assert stores["three"].manifest["build"]["settings"]["batch_size"] == 3
    ref = stores["loop"].read_all().astype(np.float32)
    for name in ("auto", "three"):
        got = stores[name].read_all().astype(np.float32)
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


def test_cli_build_takes_projection_batch_size_and_memory_budget(tmp_path, tiny_model):
    from click.testing import CliRunner

    from rapidin_index.cli import cli
    from rapidin_index.store import Store
    from tests.tiny import make_records, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", make_records(6, seed=2))
    for index, extra in (
        ("cs", ["--projection", "countsketch", "--batch-size", "4"]),
        ("mb", ["--memory-budget", "0.5"]),
    ):
        result = CliRunner().invoke(
            cli,
            [
                "--quiet",
                "build",
                "--data",
                str(data),
                "--index",
                str(tmp_path / index),
                "--model",
                tiny_model,
                "-k",
                "256",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
    cs = Store.open(tmp_path / "cs").manifest
    assert cs["sketch"]["projection"] == "countsketch" and cs["sketch"]["divisors"] == []
    assert cs["build"]["settings"]["batch_size"] == 4
    mb = Store.open(tmp_path / "mb").manifest
    assert mb["build"]["settings"]["memory_budget_gb"] == 0.5
    assert mb["sketch"]["projection"] == "shuffle" and mb["sketch"]["divisors"]
    bad = CliRunner().invoke(
        cli,
        [
            "build",
            "--data",
            str(data),
            "--index",
            str(tmp_path / "x"),
            "--model",
            tiny_model,
            "--batch-size",
            "0",
        ],
    )
    assert bad.exit_code == 2


@pytest.mark.cuda
def test_batched_lora_gradients_on_gpu_equal_one_at_a_time(tiny):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    path, _, examples = tiny
    model = _lora(_full_model(path).cuda())
    computer = GradientComputer(model, select_parameters(model), "layer")
    batched = computer.gradients(examples)
    assert batched.device.type == "cuda" and computer.verified
    torch.testing.assert_close(batched, _reference(computer, examples), rtol=RTOL, atol=ATOL)


def test_gradients_of_a_4bit_model_do_not_change_after_it_generates(tmp_path, tiny):
    """bitsandbytes repacks 4-bit weights for a faster CPU kernel on an inference forward,
    and gradients through a repacked weight are wrong; load_model must keep them unpacked,
    so a gradient taken after generate equals the one taken before."""
    _, tok, examples = tiny
    from peft import LoraConfig, get_peft_model

    from rapidin_index.model import load_model

    path = make_tiny_model(tmp_path / "tiny64", hidden=64)
    adapter = tmp_path / "adapter"
    config = LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(_full_model(path), config).save_pretrained(adapter)
    try:
        loaded = load_model(str(path), str(adapter), load_in_4bit=True)
    except Exception as err:  # noqa: BLE001 - any failure means 4-bit cannot run here
        pytest.skip(f"bitsandbytes 4-bit cannot run on this machine: {err}")
    model = loaded.model
    computer = GradientComputer(model, select_parameters(model), "none", "loop")
    before = computer.gradient(examples[0])
    with torch.no_grad():
        model.generate(
            input_ids=torch.tensor([examples[1].input_ids]), max_new_tokens=4, do_sample=False
        )
    torch.testing.assert_close(computer.gradient(examples[0]), before, rtol=RTOL, atol=ATOL)
