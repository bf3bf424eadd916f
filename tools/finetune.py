"""LoRA / QLoRA fine-tuning of the embedded model on Alpaca records (for evaluations).

Uses the same prompt template, tokenisation and response-only loss as the index, so the
adapter it writes is exactly what ``rapidin-index build --adapter`` attributes. The run is
skipped when the output directory already holds an adapter trained with the same settings
and data (``train_settings.json`` records them).

    python tools/finetune.py --data data/instructions_sample.jsonl --out runs/lora-sample \
        --epochs 2 --rank 8 --lr 1e-3
    python tools/finetune.py --data poisoned.jsonl --out runs/backdoor --load-in-4bit
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

from rapidin_index.data import IGNORE_INDEX, file_sha256, load_records, tokenize_records
from rapidin_index.model import load_model

logger = logging.getLogger("finetune")


def collate(batch, pad_id: int):
    """Right-pad a list of TokenizedExample into (B, T) ids, mask and labels."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return ids, mask, labels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda [default: cuda when available]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    out = Path(args.out)
    # The device is left out: an adapter trained on a GPU is reused on a CPU and back.
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    settings["data_sha256"] = file_sha256(args.data)
    record = out / "train_settings.json"
    if record.is_file() and json.loads(record.read_text()).get("settings") == settings:
        logger.info("%s already holds an adapter trained with these settings; skipping", out)
        return

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, load_in_4bit=args.load_in_4bit, device=device)
    model = loaded.model
    if args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    examples = tokenize_records(
        load_records(args.data), loaded.tokenizer, args.template, args.max_length
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * -(-len(examples) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10))
    )
    pad = loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id
    began, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        order = list(range(len(examples)))
        random.shuffle(order)
        total = 0.0
        for first in range(0, len(order), args.batch_size):
            batch = [examples[i] for i in order[first : first + args.batch_size]]
            ids, mask, labels = (t.to(device) for t in collate(batch, pad))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(batch)
            step += 1
            if step % 20 == 0:
                logger.info(
                    "epoch %d step %d/%d loss %.3f (%.0f s)",
                    epoch + 1,
                    step,
                    steps,
                    loss.item(),
                    time.perf_counter() - began,
                )
        logger.info("epoch %d mean loss %.4f", epoch + 1, total / len(examples))
    model.save_pretrained(out)
    record.write_text(
        json.dumps(
            {"settings": settings, "seconds": round(time.perf_counter() - began, 1)}, indent=2
        )
    )
    logger.info("adapter written to %s", out)


if __name__ == "__main__":
    main()
