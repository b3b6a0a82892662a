"""Evaluation and prediction after (or without) fine-tuning, as main.py's trainer.evaluate / trainer.predict:
generated answers scored with ROUGE/BLEU (glmkit.evaluation.metrics) or the answer loss, metrics named
{eval,predict}_*, written to {split}_results.json and all_results.json, and generated_predictions.txt."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.core.atomic import atomic_file, write_text
from glmkit.core.blank import BlankInfillingView, blank_rows
from glmkit.core.generate import generate
from glmkit.evaluation.metrics import compute_metrics
from glmkit.training.data.finetune import (
    Columns,
    Lengths,
    SpecialTokens,
    build_examples,
    collate_prompts,
    collate_train,
    decode_text,
)
from glmkit.training.finetune_args import FinetuneArgs
from glmkit.training.finetune_loop import lm_loss
from glmkit.training.trainer import autocast


def generation_length(args: FinetuneArgs, tokenizer) -> int:
    """prompt + answer tokens to generate: --generation_max_length, else main.py's max_source_length +
    max_target_length + 1 (ChatGLM-6B's main.py since its May 2023 fix, which replaced a fixed 512, and
    ChatGLM2's; a fixed 512 let answers that never stop run to several times the answers' length)."""
    if args.generation_max_length:
        return args.generation_max_length
    return args.max_source_length + args.max_target_length + 1


@torch.no_grad()
def generate_predictions(model: nn.Module, tokenizer, examples: list[dict[str, Any]], args: FinetuneArgs,
                         device: torch.device, desc: str = "predict") -> list[str]:
    """Answers for each example's prompt (left-padded batches, sampling as main.py unless --do_sample false)."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    eos = [special.eos]
    max_length = generation_length(args, tokenizer)
    preds: list[str] = [""] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # similar lengths together
    bs = args.per_device_eval_batch_size
    bar = None
    if not args.disable_tqdm:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc=desc, dynamic_ncols=True)
    model.eval()
    for b in range(0, len(order), bs):
        idx = order[b:b + bs]
        rows = [examples[i] for i in idx]
        if "position_ids" in rows[0]:  # the original GLM: its blank layout, left-padded (core.blank)
            batch = blank_rows([(e["input_ids"], e["position_ids"], e["context"]) for e in rows], special.pad, device)
            gen_model = BlankInfillingView(model, batch["position_ids"], batch["context_end"], batch["pad"])
        else:
            batch = collate_prompts([e["input_ids"] for e in rows], special.pad)
            gen_model = model
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if max_length - ids.shape[1] <= 0:
            raise ValueError(f"--generation_max_length {max_length} leaves no room after prompts of "
                             f"{ids.shape[1]} tokens; raise it or lower --max_source_length")
        with autocast(device, torch.bfloat16 if args.bf16 else None):
            new = generate(gen_model, ids, attention_mask=mask, max_length=max_length, do_sample=args.do_sample,
                           top_p=args.top_p, temperature=args.temperature, eos_token_id=eos,
                           pad_token_id=special.pad, seed=args.seed + b)
        for row, i in zip(new.tolist(), idx):
            if special.eos in row:
                row = row[: row.index(special.eos)]
            preds[i] = decode_text(tokenizer, row)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return preds


@torch.no_grad()
def evaluate_loss(model: nn.Module, tokenizer, examples: list[dict[str, list[int]]], args: FinetuneArgs,
                  device: torch.device) -> float:
    """Mean next-token loss over the answer tokens of `examples` (built with train=True)."""
    pad_id = SpecialTokens.from_tokenizer(tokenizer).pad
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(examples), args.per_device_eval_batch_size):
        batch = collate_train(examples[b:b + args.per_device_eval_batch_size], pad_id)
        layout = {k: batch[k].to(device) for k in ("position_ids", "attention_mask") if k in batch}
        with autocast(device, torch.bfloat16 if args.bf16 else None):
            loss_sum, n = lm_loss(model, batch["input_ids"].to(device), batch["labels"].to(device), **layout)
        total, count = total + float(loss_sum), count + n
    return total / max(count, 1)


def run_evaluation(model, tokenizer, rows, args: FinetuneArgs, device, prefix: str,
                   write_predictions: bool) -> dict[str, Any]:
    """main.py's trainer.evaluate / trainer.predict: metrics with the prefix, plus generated_predictions.txt."""
    columns = Columns(args.prompt_column, args.response_column, args.history_column)
    val_tgt = args.val_max_target_length or args.max_target_length
    lengths = Lengths(args.max_source_length, val_tgt, args.source_prefix, args.ignore_pad_token_for_loss)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    if args.predict_with_generate or prefix == "predict":
        examples = build_examples(tokenizer, rows, columns, lengths, train=False)
        preds = generate_predictions(model, tokenizer, examples, args, device, desc=prefix)
        labels = [e["label"] for e in examples]
        scores = compute_metrics(preds, labels)
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
        if write_predictions:
            path = Path(args.output_dir) / "generated_predictions.txt"
            with atomic_file(path, "w", encoding="utf-8") as f:
                for p, l in zip(preds, labels):
                    f.write(json.dumps({"labels": l, "predict": p}, ensure_ascii=False) + "\n")
    else:
        examples = build_examples(tokenizer, rows, columns, lengths, train=True)
        metrics[f"{prefix}_loss"] = round(evaluate_loss(model, tokenizer, examples, args, device), 4)
    runtime = time.perf_counter() - t0
    metrics[f"{prefix}_runtime"] = round(runtime, 4)
    metrics[f"{prefix}_samples"] = len(examples)
    metrics[f"{prefix}_samples_per_second"] = round(len(examples) / max(runtime, 1e-9), 3)
    return metrics


def save_metrics(out: Path, split: str, metrics: dict[str, Any]) -> None:
    """HF Trainer.save_metrics: {split}_results.json, merged into all_results.json."""
    write_text(out / f"{split}_results.json", json.dumps(metrics, indent=4, sort_keys=True) + "\n")
    all_path = out / "all_results.json"
    merged = json.loads(all_path.read_text(encoding="utf-8")) if all_path.exists() else {}
    merged.update(metrics)
    write_text(all_path, json.dumps(merged, indent=4, sort_keys=True) + "\n")
