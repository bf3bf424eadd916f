"""Per-example gradients and layer-wise normalisation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapidin_index.data import format_prompt, tokenize_example
from rapidin_index.gradients import GradientComputer
from rapidin_index.model import select_parameters


@pytest.fixture
def model_and_example(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ex = tokenize_example(tok, format_prompt("the cat", tok, "alpaca"), "sat on the mat", 512)
    return model, ex


def test_layer_normalisation_gives_unit_norm_per_tensor(model_and_example):
    model, ex = model_and_example
    computer = GradientComputer(model, select_parameters(model), "layer")
    flat = computer.gradient(ex)
    assert flat.shape == (computer.dim,)
    for piece in torch.split(flat, computer.sizes):
        assert float(piece.norm()) == pytest.approx(1.0, rel=1e-5)


def test_unnormalised_gradient_equals_autograd(model_and_example):
    model, ex = model_and_example
    computer = GradientComputer(model, select_parameters(model), "none")
    flat = computer.gradient(ex)
    model.zero_grad()
    out = model(torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
    out.loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-7)


def test_params_glob_selects_in_model_order(model_and_example):
    model, _ = model_and_example
    chosen = select_parameters(model, ["*mlp*", "model.layers.0.self_attn.q_proj.weight"])
    names = [n for n, _ in chosen]
    assert names[0] == "model.layers.0.self_attn.q_proj.weight"
    assert all("mlp" in n or "q_proj" in n for n in names)
    order = [n for n, _ in model.named_parameters()]
    assert names == sorted(names, key=order.index)


def test_zero_lora_b_gives_zero_a_gradient_not_nan(model_and_example):
    from peft import LoraConfig, get_peft_model

    model, ex = model_and_example
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    computer = GradientComputer(peft_model, select_parameters(peft_model), "layer")
    assert all("lora_" in n for n in computer.names)
    flat = computer.gradient(ex)
    assert torch.isfinite(flat).all()
    for name, piece in zip(computer.names, torch.split(flat, computer.sizes)):
        # B starts at zero, so dL/dA = 0; B's gradient is non-zero and gets unit norm.
        expected = 0.0 if "lora_A" in name else 1.0
        assert float(piece.norm()) == pytest.approx(expected, abs=1e-5)


def test_computers_sharing_a_model_each_keep_their_own_parameters(model_and_example):
    """A computer over a subset turns the other parameters off; one made earlier over every
    parameter must still give the gradient it gave before (batched and one at a time)."""
    model, ex = model_and_example
    everything = GradientComputer(model, select_parameters(model), "none")
    before = everything.gradient(ex)
    subset = GradientComputer(model, select_parameters(model, ["*mlp*"]), "none")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "mlp" not in n)
    torch.testing.assert_close(everything.gradient(ex), before)
    torch.testing.assert_close(everything.gradients([ex, ex])[1], before, rtol=1e-4, atol=1e-6)
    mlp = torch.cat(
        [
            g.reshape(-1)
            for n, g in zip(everything.names, torch.split(before, everything.sizes))
            if "mlp" in n
        ]
    )
    torch.testing.assert_close(subset.gradient(ex), mlp)
