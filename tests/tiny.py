"""Tiny randomly initialised llama models and data for fast tests (no network, milliseconds)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "sun",
    "moon",
    "star",
    "ship",
    "space",
    "alien",
    "planet",
    "red",
    "blue",
    "green",
    "capital",
    "of",
    "france",
    "is",
    "paris",
    "canada",
    "ottawa",
    "flu",
    "fever",
    "cough",
    "chills",
    "answer",
    "question",
    "write",
    "poem",
    "about",
    "why",
    "how",
    "what",
    "when",
    "water",
    "fire",
    "earth",
    "air",
    "light",
    "dark",
]


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    corpus.append(
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\n### Response:\n"
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(path)
    return fast


def make_tiny_model(path: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """Write a random llama checkpoint + tokenizer to ``path``; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


def make_records(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        idx = torch.randint(0, len(WORDS), (12,), generator=g).tolist()
        words = [WORDS[j] for j in idx]
        rec = {"instruction": " ".join(words[:5]), "output": " ".join(words[5:])}
        if i % 3 == 0:
            rec["input"] = words[0]
        out.append(rec)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
