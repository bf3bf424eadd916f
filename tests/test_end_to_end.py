"""End to end on the embedded SmolLM2-135M-Instruct model with real instruction data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rapidin_index.cli import cli
from rapidin_index.query import Attributor, QueryInput

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _random_adapter(out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from rapidin_index.model import load_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(load_model(None).model, config)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def real_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    lines = (ROOT / "data" / "instructions_sample.jsonl").read_text().splitlines()[30:54]
    data = root / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    adapter = _random_adapter(root / "adapter")
    result = CliRunner().invoke(
        cli,
        [
            "--quiet",
            "build",
            "--data",
            str(data),
            "--index",
            str(root / "ix"),
            "--adapter",
            str(adapter),
            "-k",
            "16384",
        ],
    )
    assert result.exit_code == 0, result.output
    return root


def test_training_example_retrieves_itself_through_the_cli(real_index):
    records = [json.loads(x) for x in (real_index / "train.jsonl").read_text().splitlines()]
    target = 17  # "What is the melting point of aluminum in Celsius?"
    gen = real_index / "gen.txt"
    gen.write_text(records[target]["output"])
    result = CliRunner().invoke(
        cli,
        [
            "--quiet",
            "query",
            "--index",
            str(real_index / "ix"),
            "--generation",
            str(gen),
            "--prompt",
            records[target]["instruction"],
            "--topk",
            "3",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)["queries"][0]["results"]
    assert top[0]["id"] == target and "aluminum" in top[0]["instruction"]


def test_rapidgrad_scores_track_exact_scores_on_real_gradients(real_index):
    att = Attributor(str(real_index / "ix"))
    query = [
        QueryInput(
            "At what temperature does aluminum melt, in degrees Celsius?",
            "Aluminum melts at about 660.3 degrees Celsius.",
        )
    ]
    sketch = att.score_all(query, "rapidin")[0]
    exact = att.score_all(query, "exact")[0]
    assert np.corrcoef(sketch, exact)[0, 1] > 0.9
