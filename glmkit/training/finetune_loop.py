"""The fine-tuning loop, HF Trainer's default written out: AdamW (β 0.9/0.999, ε 1e-8), linear decay to 0 after
warmup_steps, gradient clipping at max_grad_norm, gradient accumulation, optional bf16 autocast, checkpoints every
save_steps and at the end, exact resume.

Each micro-batch's loss is the mean over its answer tokens (main.py's labels); only the answer positions go through
the output layer, which is most of the work for a small model with a large vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.training.data.finetune import IGNORE_INDEX, SpecialTokens, collate_train
from glmkit.training.finetune_args import FinetuneArgs
from glmkit.training.finetune_checkpoint import (
    TrainerState,
    load_trainer_state,
    save_checkpoint,
    wrap_distributed,
)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------------ loss
@contextlib.contextmanager
def _hidden_states_only(model: nn.Module):
    """Temporarily makes the model return final hidden states instead of logits (lm_head -> Identity)."""
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
            select_positions: bool = True, **model_kwargs) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labels != -100 (logits[t] predicts labels[t+1]) and the token count.

    select_positions: run the output layer only on the positions that have a label (same result, less work).
    model_kwargs: position_ids / attention_mask when the batch lays them out (the original GLM's blank layout).
    """
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    n = int(keep.sum())
    if select_positions:
        with _hidden_states_only(model) as head:
            hidden = model(input_ids, **model_kwargs)  # (B, T, hidden)
        # the model hands back its final hidden states as float32 (its output cast): back to the head's dtype
        logits = head(hidden[:, :-1][keep].to(model.dtype)).float()  # (N, vocab)
        loss = F.cross_entropy(logits, target[keep], reduction="sum")
    else:
        logits = model(input_ids, **model_kwargs)[:, :-1].float()  # (B, T-1, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


# ------------------------------------------------------------------------------------------------------ schedule
def linear_schedule(warmup: int, total: int):
    """HF's get_linear_schedule_with_warmup: 0 -> 1 over warmup steps, then linearly to 0 at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


class MicroBatches:
    """Deterministic shuffled micro-batches: epoch e uses randperm(n, seed + e); rank r of W takes every W-th batch.

    Micro-batch m is a pure function of (m, seed), so resuming at step s just starts at m = s · accumulation."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = max(1, math.ceil(n / (batch_size * world)))
        self._perm_epoch, self._perm = -1, None

    def indices(self, m: int) -> list[int]:
        epoch, b = divmod(m, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        start = (b * self.world + self.rank) * self.bs
        chunk = self._perm[start:start + self.bs]
        return chunk or self._perm[: self.bs]  # a rank past the end of a short last batch reuses the first rows

    def epoch_of(self, m: int) -> float:
        return m / self.per_epoch


# ------------------------------------------------------------------------------------------------------ training
def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast on `device` when bf16, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def log(msg: str, rank: int = 0) -> None:
    """Prints `msg` on the main process only, above any progress bar."""
    if rank == 0:
        try:
            from tqdm import tqdm

            tqdm.write(msg)
        except ImportError:
            print(msg, flush=True)


def train(model: nn.Module, tokenizer, examples: list[dict[str, list[int]]], args: FinetuneArgs,
          method: str, device: torch.device, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The fine-tuning loop; returns train metrics (train_loss, train_runtime, ...)."""
    out = Path(args.output_dir)
    pad_id = SpecialTokens.from_tokenizer(tokenizer).pad
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("no trainable parameters: nothing to fine-tune")
    wrapped = wrap_distributed(model, method, device, world)
    if method == "full" and world > 1:
        params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them with sharded ones
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay)
    accum = args.gradient_accumulation_steps
    batches = MicroBatches(len(examples), args.per_device_train_batch_size, args.seed, rank, world)
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs * batches.per_epoch
                                                                       / accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(args.warmup_steps, total))
    state = TrainerState(max_steps=total, method=method, seed=args.seed, world_size=world,
                         train_batch_size=args.per_device_train_batch_size, gradient_accumulation_steps=accum)
    if args.resume_from_checkpoint:
        state = load_trainer_state(Path(args.resume_from_checkpoint), model, optimizer, scheduler, method, rank,
                                   world)
        if state.max_steps != total:
            raise ValueError(f"the checkpoint was trained for max_steps {state.max_steps}, this run asks for "
                             f"{total}; the learning-rate schedule would differ")
        log(f"resumed from {args.resume_from_checkpoint} at step {state.global_step}", rank)

    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    log(f"***** Running training ({method}) *****\n  examples = {len(examples)}, steps = {total}, "
        f"batch = {args.per_device_train_batch_size} x accumulation {accum} x processes {world}\n"
        f"  trainable parameters = {n_trainable:,} of {n_total:,} ({100 * n_trainable / max(1, n_total):.4f}%)",
        rank)
    bar = None
    if rank == 0 and not args.disable_tqdm:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state.global_step, desc=f"finetune {method}", dynamic_ncols=True)

    wrapped.train()
    t_start = time.perf_counter()
    t_log, tokens_log, loss_sum_log, steps_log = time.perf_counter(), 0, 0.0, 0
    loss_total, steps_total = 0.0, 0
    while state.global_step < total:
        step_loss = 0.0
        for micro in range(accum):
            m = state.global_step * accum + micro
            batch = collate_train([examples[i] for i in batches.indices(m)], pad_id)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            layout = {k: batch[k].to(device) for k in ("position_ids", "attention_mask") if k in batch}
            with autocast(device, args.bf16):
                # DDP/FSDP must see the whole forward, so they take the plain full-logits path
                loss_sum, n = lm_loss(model, ids, labels, **layout) if world == 1 else \
                    lm_loss(wrapped, ids, labels, select_positions=False, **layout)
            loss = loss_sum / max(n, 1)
            (loss / accum).backward()
            step_loss += float(loss.detach()) / accum
            tokens_log += int((ids != pad_id).sum())
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.epoch = batches.epoch_of(state.global_step * accum)
        loss_sum_log += step_loss
        steps_log += 1
        loss_total += step_loss
        steps_total += 1
        lr = scheduler.get_last_lr()[0]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if state.global_step % args.logging_steps == 0 or state.global_step == total:
            elapsed = time.perf_counter() - t_log
            mean_loss = loss_sum_log / steps_log
            if world > 1:  # the logged loss is the mean over processes, as HF Trainer gathers it
                import torch.distributed as dist

                t = torch.tensor([mean_loss], dtype=torch.float64)
                dist.all_reduce(t)
                mean_loss = float(t) / world
            entry = {"loss": round(mean_loss, 4), "learning_rate": lr,
                     "epoch": round(state.epoch, 4), "tokens_per_second": round(tokens_log * world / elapsed, 1),
                     "step": state.global_step}
            state.log_history.append(entry)
            log(json.dumps(entry), rank)
            t_log, tokens_log, loss_sum_log, steps_log = time.perf_counter(), 0, 0.0, 0
        if state.global_step % args.save_steps == 0 or state.global_step == total:
            save_checkpoint(out / f"checkpoint-{state.global_step}", model if world == 1 or method != "full" else
                            wrapped, tokenizer, method, optimizer, scheduler, state, rank, world,
                            args.model_name_or_path)
    if bar is not None:
        bar.close()
    wrapped.eval()
    runtime = time.perf_counter() - t_start
    return {"train_loss": round(loss_total / max(1, steps_total), 4), "train_runtime": round(runtime, 2),
            "train_samples": len(examples), "train_steps_per_second": round(steps_total / max(runtime, 1e-9), 3),
            "global_step": state.global_step, "epoch": round(state.epoch, 4)}


