"""Must-show on real data: a repeated phrase carries the largest Eq. 6 scores of its source.

Runs tools/demo_tokenwise.py's ``run_demo``: the embedded SmolLM2-135M-Instruct, the first 30
rasbt instruction records, gradients of two late MLP matrices; about 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location(
        "demo_tokenwise", ROOT / "tools" / "demo_tokenwise.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_repeated_phrase_tokens_carry_the_top_eq6_scores_of_its_source_example(tmp_path):
    demo = _demo()
    if not demo.DATA.is_file():
        pytest.skip(f"needs {demo.DATA}")
    summary = demo.run_demo(tmp_path, token_top=1)
    # The example the phrase comes from is retrieved first ...
    assert summary["source_rank"] == 1, summary
    # ... and its highest-scoring tokens are tokens of the repeated phrase.
    assert summary["top_in_phrase"] == demo.TOP_TOKENS, summary
    assert summary["exact_score"] > 0
    assert (tmp_path / "demo.html").is_file()
