"""Reading records, the prompt template, label masking and the loss."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapidin_index.data import (
    ALPACA_TEMPLATE,
    IGNORE_INDEX,
    format_prompt,
    load_records,
    tokenize_example,
)
from rapidin_index.errors import DataError
from rapidin_index.gradients import example_loss


def test_jsonl_and_json_array_give_the_same_records(tmp_path):
    recs = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "x.json").write_text(json.dumps(recs))
    a, b = load_records(tmp_path / "x.jsonl"), load_records(tmp_path / "x.json")
    assert a == b
    assert [r.id for r in a] == [0, 1]
    assert a[0].merged_instruction == "a\nb" and a[1].merged_instruction == "d"


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        load_records(path)


def test_record_without_output_is_refused(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "a"}\n')
    with pytest.raises(DataError, match="no field 'output'"):
        load_records(path)
    assert load_records(path, require_output=False)[0].output == ""


def test_empty_and_missing_files_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.jsonl")


def test_alpaca_template_matches_the_paper():
    text = format_prompt("Say hi", None, "alpaca")
    assert text == ALPACA_TEMPLATE.format(instruction="Say hi")
    assert text.startswith("Below is an instruction that describes a task.")
    assert text.endswith("### Response:\n")


def test_labels_mask_the_prompt_and_end_with_eos(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = format_prompt("the cat", tok, "alpaca")
    ex = tokenize_example(tok, prompt, "sat on the mat", max_length=512)
    n_prompt = len(tok(prompt)["input_ids"])
    assert ex.prompt_len == n_prompt
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id and not ex.truncated


def test_truncation_keeps_some_response(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = tokenize_example(tok, "the cat " * 50, "sat on the mat " * 50, max_length=40)
    assert len(ex.input_ids) == 40 and ex.truncated
    assert any(label != IGNORE_INDEX for label in ex.labels)


def test_loss_is_shifted_mean_over_response_tokens(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ex = tokenize_example(tok, format_prompt("the cat", tok, "alpaca"), "sat on mat", 512)
    ours = example_loss(model, ex)
    # Brute force: position t predicts token t + 1, averaged over response + EOS targets.
    logits = model(torch.tensor([ex.input_ids])).logits[0]
    terms = [
        -torch.log_softmax(logits[t], -1)[ex.input_ids[t + 1]]
        for t in range(len(ex.input_ids) - 1)
        if ex.labels[t + 1] != IGNORE_INDEX
    ]
    assert len(terms) == len(ex.input_ids) - ex.prompt_len
    torch.testing.assert_close(ours, torch.stack(terms).mean())
    # And Hugging Face's own shifted loss agrees.
    hf = model(torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss
    torch.testing.assert_close(ours, hf)
