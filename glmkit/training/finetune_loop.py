"""Fine-tuning as a stage of the training backbone (glmkit.training.trainer): the data are main.py's examples in
deterministic shuffled micro-batches, the loss is next-token cross-entropy over the answer tokens (main.py's
labels), averaged per micro-batch as Hugging Face Trainer does. Around it, HF Trainer's defaults: AdamW (β 0.9/0.999,
ε 1e-8), linear decay to 0 after warmup_steps, gradient clipping at max_grad_norm, gradient accumulation, optional
bf16 autocast, checkpoint-N folders every save_steps and at the end (finetune_checkpoint.py), exact resume.

Only the answer positions go through the output layer, which is most of the work for a small model with a large
vocabulary.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.training.data.finetune import IGNORE_INDEX, SpecialTokens, collate_train
from glmkit.training.finetune_args import FinetuneArgs
from glmkit.training.finetune_checkpoint import METHODS, TrainerState, load_trainer_state, save_checkpoint
from glmkit.training.trainer import (
    STEP_KEYS,
    Logger,
    LoopConfig,
    Stage,
    TrainState,
    fit,
    head_on_rows,
    log_line,
    trainable_parameters,
    wrap_model,
)

__all__ = ["AnswerLossStage", "MicroBatches", "linear_schedule", "lm_loss", "train"]


# ------------------------------------------------------------------------------------------------------ loss
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, select_positions: bool = True,
            raw_model: nn.Module | None = None, **model_kwargs) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labels != -100 (logits[t] predicts labels[t+1]) and the token count.

    select_positions: run the output layer only on the positions that have a label (same result, less work);
    raw_model: the module under a DDP/FSDP `model` (found for DDP). model_kwargs: position_ids / attention_mask
    when the batch lays them out (the original GLM's blank layout).
    """
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    n = int(keep.sum())
    if select_positions:
        rows = F.pad(keep, (0, 1), value=False)  # position t predicts labels[t+1]; the last one predicts nothing
        with head_on_rows(raw_model if raw_model is not None else _unwrap(model), rows):
            logits = model(input_ids, **model_kwargs)[0].float()  # (N, vocab)
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
class AnswerLossStage(Stage):
    """Supervised fine-tuning as a backbone stage: micro-batch m holds examples MicroBatches.indices(m), the loss
    is lm_loss over the answer tokens."""

    def __init__(self, examples: list[dict[str, list[int]]], order: MicroBatches, pad_id: int,
                 grad_accum: int) -> None:
        self.examples, self.order, self.pad_id, self.grad_accum = examples, order, pad_id, grad_accum

    def batches(self, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
        m = state.step * self.grad_accum
        while True:
            yield collate_train([self.examples[i] for i in self.order.indices(m)], self.pad_id)
            m += 1

    def units(self, batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def tokens(self, batch) -> int:
        return int((batch["input_ids"] != self.pad_id).sum())

    def loss(self, state, batch):
        dev = state.device
        layout = {k: batch[k].to(dev) for k in ("position_ids", "attention_mask") if k in batch}
        loss_sum, _ = lm_loss(state.model, batch["input_ids"].to(dev), batch["labels"].to(dev),
                              raw_model=state.raw_model, **layout)
        return loss_sum, {}


class TrainerStateLogger(Logger):
    """HF Trainer's log: on each log step, the mean step loss since the last one (averaged over processes), the
    learning rate, the epoch and tokens/s, appended to trainer_state.log_history and printed as a JSON line. A
    stage's own metrics (Stage.loss's, e.g. a reward accuracy) are logged the same way, as window means."""

    def __init__(self, state: TrainState, trainer_state: TrainerState, order: MicroBatches, grad_accum: int) -> None:
        self.trainer_state, self.order, self.grad_accum = trainer_state, order, grad_accum
        self.loss_sum, self.steps, self.t, self.tokens = 0.0, 0, time.perf_counter(), state.tokens_seen
        self.metric_sums: dict[str, float] = {}

    def step(self, state, stats, log):
        ts = self.trainer_state
        ts.global_step = state.step
        ts.epoch = self.order.epoch_of(state.step * self.grad_accum)
        self.loss_sum += stats["loss"]
        self.steps += 1
        for k, v in stats.items():
            if k not in STEP_KEYS and isinstance(v, (int, float)):
                self.metric_sums[k] = self.metric_sums.get(k, 0.0) + float(v)
        if not log:
            return
        names = sorted(self.metric_sums)
        means = [self.loss_sum / self.steps] + [self.metric_sums[k] / self.steps for k in names]
        if state.world_size > 1:  # the logged values are means over processes, as HF Trainer gathers them
            import torch.distributed as dist

            t = torch.tensor(means, dtype=torch.float64)
            dist.all_reduce(t)
            means = [float(x) / state.world_size for x in t]
        elapsed = time.perf_counter() - self.t
        entry = {"loss": round(means[0], 4), **{k: round(v, 4) for k, v in zip(names, means[1:])},
                 "learning_rate": stats["lr"], "epoch": round(ts.epoch, 4),
                 "tokens_per_second": round((state.tokens_seen - self.tokens) / max(elapsed, 1e-9), 1),
                 "step": state.step}
        ts.log_history.append(entry)
        log_line(json.dumps(entry), state.rank)
        self.loss_sum, self.steps, self.t, self.tokens = 0.0, 0, time.perf_counter(), state.tokens_seen
        self.metric_sums = {}
        self.metric_sums: dict[str, float] = {}


def train(model: nn.Module, tokenizer, examples: list[Any], args: FinetuneArgs, method: str, device: torch.device,
          rank: int = 0, world: int = 1, *,
          make_stage: Callable[[list[Any], MicroBatches], Stage] | None = None) -> dict[str, Any]:
    """Fine-tunes the parameters of `model` that require grad (the method set them) on the backbone; returns train
    metrics (train_loss, train_runtime, ...).

    make_stage(examples, order): the stage to train (default: AnswerLossStage, supervised fine-tuning). `examples`
    are whatever that stage collates (answer examples, preference pairs, prompts); `order` is this process's
    deterministic shuffled micro-batch order over them (resumable), which fixes the epoch arithmetic."""
    out = Path(args.output_dir)
    pad_id = SpecialTokens.from_tokenizer(tokenizer).pad
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("no trainable parameters: nothing to fine-tune")
    wrapped = wrap_model(model, METHODS[method].distributed, device, world)
    if wrapped is model and world > 1:
        params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them with sharded ones
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay)
    accum = args.gradient_accumulation_steps
    order = MicroBatches(len(examples), args.per_device_train_batch_size, args.seed, rank, world)
    state, trainer_state, total = start_state(args, wrapped, model, optimizer, order.per_epoch, device, rank, world,
                                              method)

    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    log_line(f"***** Running training ({method}) *****\n  examples = {len(examples)}, steps = {total}, "
             f"batch = {args.per_device_train_batch_size} x accumulation {accum} x processes {world}\n"
             f"  trainable parameters = {n_trainable:,} of {n_total:,} "
             f"({100 * n_trainable / max(1, n_total):.4f}%)", rank)
    loop = LoopConfig(max_steps=total, grad_accum=accum,
                      grad_clip=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else 0.0,
                      normalize="micro", log_every=args.logging_steps, save_every=args.save_steps,
                      progress=not args.disable_tqdm, desc=f"finetune {method}")

    def save(s: TrainState) -> None:
        save_checkpoint(out / f"checkpoint-{s.step}", s, trainer_state, method, tokenizer, args.model_name_or_path)

    t_start = time.perf_counter()
    stage = make_stage(examples, order) if make_stage else AnswerLossStage(examples, order, pad_id, accum)
    history = fit(state, stage, loop, save=save,
                  loggers=[TrainerStateLogger(state, trainer_state, order, accum)])
    wrapped.eval()
    runtime = time.perf_counter() - t_start
    steps = len(history)
    return {"train_loss": round(sum(h["loss"] for h in history) / max(1, steps), 4),
            "train_runtime": round(runtime, 2), "train_samples": len(examples),
            "train_steps_per_second": round(steps / max(runtime, 1e-9), 3),
            "global_step": state.step, "epoch": round(trainer_state.epoch, 4)}


def start_state(args: FinetuneArgs, wrapped: nn.Module, raw_model: nn.Module, optimizer, per_epoch: int,
                device, rank: int, world: int, kind: str) -> tuple[TrainState, TrainerState, int]:
    """The loop's state for a fine-tuning or alignment stage: total steps (max_steps, or epochs of `per_epoch`
    micro-batches), HF Trainer's linear schedule, and on --resume_from_checkpoint the checkpoint's state (refused
    when it was trained for another number of steps, whose schedule would differ)."""
    accum = args.gradient_accumulation_steps
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs * per_epoch / accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(args.warmup_steps, total))
    state = TrainState(model=wrapped, raw_model=raw_model, optimizer=optimizer, scheduler=scheduler, device=device,
                       autocast_dtype=torch.bfloat16 if args.bf16 else None, rank=rank, world_size=world)
    trainer_state = TrainerState(max_steps=total, method=kind, seed=args.seed, world_size=world,
                                 train_batch_size=args.per_device_train_batch_size, gradient_accumulation_steps=accum)
    if args.resume_from_checkpoint:
        trainer_state = load_trainer_state(Path(args.resume_from_checkpoint), state, kind)
        if trainer_state.max_steps != total:
            raise ValueError(f"the checkpoint was trained for max_steps {trainer_state.max_steps}, this run asks "
                             f"for {total}; the learning-rate schedule would differ")
        log_line(f"resumed from {args.resume_from_checkpoint} at step {state.step}", rank)
    return state, trainer_state, total
