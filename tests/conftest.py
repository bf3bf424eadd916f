from __future__ import annotations

import os

import pytest

from tests.tiny import make_records, make_tiny_model, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny random llama checkpoint with its own byte-level BPE tokenizer."""
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture
def train_file(tmp_path):
    return str(write_jsonl(tmp_path / "train.jsonl", make_records(20)))
