"""Training and query records: reading Alpaca-style files, prompting and tokenising.

A record is a dict with ``instruction``, an optional ``input`` and ``output``. Its example
id is its 0-based position in the file. The loss of an example is taken over the response
tokens plus the end-of-sequence token only; prompt tokens carry the label -100.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rapidin_index.errors import DataError, SettingsError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# The Alpaca fine-tuning template of the RapidIn paper (appendix C, Figure 5).
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


@dataclass(frozen=True)
class Record:
    """One Alpaca record; ``id`` is its 0-based index in the file it came from."""

    id: int
    instruction: str
    input: str
    output: str

    @property
    def merged_instruction(self) -> str:
        """The instruction with the input merged into it, as the paper does."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + response + EOS and the matching labels.

    Attributes:
        input_ids: list of int, length T.
        labels: list of int, length T; IGNORE_INDEX on prompt tokens, else equal to input_ids.
        prompt_len: Number of prompt tokens kept.
        truncated: Whether anything was cut to fit ``max_length``.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_from(obj: object, index: int, where: str, require_output: bool) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction' and 'output'")
    if "instruction" not in obj or not isinstance(obj["instruction"], str):
        raise DataError(f"{where}: record has no string field 'instruction'")
    output = obj.get("output")
    if output is None and require_output:
        raise DataError(f"{where}: record has no field 'output' (the response to attribute)")
    if output is not None and not isinstance(output, str):
        raise DataError(f"{where}: field 'output' must be a string")
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string")
    return Record(index, obj["instruction"], extra, output or "")


def load_records(path: str | Path, require_output: bool = True) -> list[Record]:
    """Read a JSONL file or a JSON array of Alpaca records.

    Raises:
        DataError: missing file, malformed JSON (with the line number), a record without
            ``output`` when ``require_output``, or no records at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    records: list[Record] = []
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        for index, obj in enumerate(items):
            records.append(_record_from(obj, index, f"{path}: record {index}", require_output))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
            records.append(_record_from(obj, len(records), f"{path}:{lineno}", require_output))
    if not records:
        raise DataError(f"{path}: no records found")
    return records


def format_prompt(record_instruction: str, tokenizer, template: str) -> str:
    """The prompt text for an instruction (input already merged)."""
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(instruction=record_instruction)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise SettingsError("--template chat: this tokenizer has no chat template")
        messages = [{"role": "user", "content": record_instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise SettingsError(f"unknown --template {template!r}; choose one of {TEMPLATES}")


def tokenize_example(
    tokenizer, prompt: str, response: str, max_length: int, add_special_tokens: bool = True
) -> TokenizedExample:
    """Tokenise prompt and response separately and join them, masking the prompt.

    Prompt and response are tokenised apart so that the boundary between them is the same
    for a training example and for a generation that continues the same prompt. When the
    pair does not fit ``max_length``, the response is cut from the right; when the prompt
    alone leaves no room, the prompt is first cut from the left to half of ``max_length``.
    """
    if max_length < 2:
        raise SettingsError(f"--max-length must be at least 2, got {max_length}")
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SettingsError("the tokenizer has no EOS token; it is needed to end each response")
    response_ids = list(response_ids) + [eos]
    truncated = False
    if len(prompt_ids) >= max_length:
        prompt_ids = prompt_ids[-(max_length // 2) :]
        truncated = True
    room = max_length - len(prompt_ids)
    if len(response_ids) > room:
        response_ids = response_ids[:room]
        truncated = True
    input_ids = list(prompt_ids) + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return TokenizedExample(input_ids, labels, len(prompt_ids), truncated)


def tokenize_records(
    records: Sequence[Record], tokenizer, template: str, max_length: int
) -> list[TokenizedExample]:
    """Tokenise every record; logs how many had to be truncated."""
    examples = [
        tokenize_example(
            tokenizer,
            format_prompt(r.merged_instruction, tokenizer, template),
            r.output,
            max_length,
            # A chat template already writes its own special tokens into the prompt text.
            add_special_tokens=template != "chat",
        )
        for r in records
    ]
    cut = sum(e.truncated for e in examples)
    if cut:
        logger.warning(
            "%d of %d examples were truncated to --max-length %d", cut, len(examples), max_length
        )
    return examples
