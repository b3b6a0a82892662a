"""The training backbone every stage runs on: pretraining, P-tuning v2 / LoRA / full fine-tuning, and the stages to
come (reward model, DPO, GRPO). Plain functions around one small state object, in torchtune's spirit:

    state = TrainState(model=wrap_model(raw, "ddp", device, world), raw_model=raw, optimizer=..., scheduler=...,
                       device=device, rank=rank, world_size=world, autocast_dtype=amp_dtype)
    fit(state, stage, LoopConfig(max_steps=100, grad_accum=2), save=..., loggers=[...])

A stage (see `Stage`) is the data and the loss: `batches(state)` yields micro-batches from `state.step` on (so a
resumed run continues where it stopped), `loss(state, batch)` returns the summed loss over the batch's loss units
(tokens, pairs, sequences) with metrics to log, `units(batch)` counts those units. The loop owns the rest: gradient
accumulation, one normalisation rule, autocast and loss scaling, gradient sync, clipping, the optimizer and
schedule, periodic evaluation, logging and checkpoints. What is trainable (the optimizer's parameters), what a
checkpoint holds (an adapter or the whole model) and how the model is wrapped are decided by whoever builds the
state (the method), not by the loop.

Loss normalisation (`LoopConfig.normalize`):
- "global": the step's loss is Σ unit losses over the whole global batch / Σ units, whatever the split across
  processes and micro-batches, so a 2-process run computes the same update as a 1-process run (pretraining).
- "micro": each micro-batch's mean, averaged over the micro-batches (and, through DDP, over processes): Hugging
  Face Trainer's rule, which ChatGLM-6B's fine-tuning scripts were tuned with.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from glmkit.distributed.launch import all_reduce_sum, gather_objects

IGNORE_INDEX = -100


# -------------------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """What a training run holds. `model` is what forward and backward go through (a DDP/FSDP wrapper or the
    plain module), `raw_model` the module itself (its state dict, its lm_head)."""

    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    rank: int = 0
    world_size: int = 1
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # Stage.tokens summed over every process and step
    train_seconds: float = 0.0  # wall time inside fit() over every invocation (resumes included)
    history: list[dict[str, float]] = field(default_factory=list)  # one stats dict per step of this process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class LoopConfig:
    """The loop's knobs; each command maps its own options onto these."""

    max_steps: int
    grad_accum: int = 1
    """micro-batches per optimizer step per process"""
    grad_clip: float = 1.0
    """max global gradient norm (0 = no clipping; the norm is still reported)"""
    normalize: Literal["global", "micro"] = "global"
    """see the module doc"""
    log_every: int = 10
    eval_every: int = 0
    """steps between Stage.evaluate calls (0 = only at max_steps)"""
    save_every: int = 0
    """steps between checkpoints (0 = only where the run stops)"""
    progress: bool = True
    desc: str = "train"


class Stage:
    """The data and the loss of a training stage. Subclass and implement `batches` and `loss`; the defaults of
    `units`, `tokens` and `evaluate` suit language-model batches with `input_ids` and `labels`."""

    def batches(self, state: TrainState) -> Iterator[Any]:
        """Micro-batches for this process, starting at micro-batch state.step · grad_accum (resume)."""
        raise NotImplementedError

    def loss(self, state: TrainState, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(Σ loss over the batch's units, a scalar tensor with grad; metrics of this micro-batch to log). Run the
        model as `state.model` (so DDP/FSDP see the forward) inside the loop's autocast."""
        raise NotImplementedError

    def units(self, batch: Any) -> int:
        """Loss units in `batch` (what `loss` sums over): here the labelled tokens."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def tokens(self, batch: Any) -> int:
        """Tokens processed, for tokens/s: here every position of input_ids."""
        return int(batch["input_ids"].numel())

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Held-out metrics (e.g. {"eval_loss": ...}), called every LoopConfig.eval_every steps and at max_steps.
        Every process calls it (FSDP needs all of them in lockstep)."""
        return {}


# -------------------------------------------------------------------------------------------------------- setup
def pick_device(name: str | None, rank: int = 0) -> torch.device:
    """`name` ("cpu", "cuda:1"); "auto"/None: this process's GPU when there is one (rank or LOCAL_RANK), else cpu."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def precision(name: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype or None, a GradScaler or None) for "fp32", "bf16", "fp16" (CUDA only) or "auto" (fp16 with
    loss scaling on CUDA, bf16 elsewhere)."""
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "bf16"
    if name == "fp32":
        return None, None
    if name == "bf16":
        return torch.bfloat16, None
    if name != "fp16":
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {name!r}")
    if device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return torch.float16, torch.amp.GradScaler("cuda")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on `device` in `dtype`, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def wrap_model(model: nn.Module, mode: Literal["none", "ddp", "fsdp"], device: torch.device,
               world_size: int) -> nn.Module:
    """The module forward/backward go through: plain for one process; DDP; or FSDP2 `fully_shard` (ZeRO-3) with
    each transformer block (`model.h`) its own unit, sharded in place (the returned module is `model`)."""
    if world_size == 1:
        return model
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                   else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"{world_size} processes need a distributed mode (ddp or fsdp), got {mode!r}")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# -------------------------------------------------------------------------------------------------------- loss helpers
@contextlib.contextmanager
def head_on_rows(raw_model: nn.Module, keep: torch.Tensor):
    """Inside the context the model's output layer runs only on the positions where `keep` ([B, T] bool) is true:
    a forward pre-hook on `lm_head` selects those rows of its input, so the model returns logits [1, N, vocab] in
    the row-major order of `keep`. The head is a large share of a small model's compute and positions without a
    label need no logits. A hook (not a module swap) works through DDP and FSDP wrappers."""
    hook = raw_model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0][keep][None],))
    try:
        yield
    finally:
        hook.remove()


# -------------------------------------------------------------------------------------------------------- the step
def _sync_context(model: nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _clip(state: TrainState, max_norm: float) -> float:
    params = [p for p in state.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def train_step(state: TrainState, stage: Stage, micro_batches: Sequence[Any], loop: LoopConfig) -> dict[str, float]:
    """One optimizer step over this process's micro-batches: forward/backward each (loss normalised as
    loop.normalize says), unscale, clip, step, schedule. Returns {"loss", "grad_norm", "units", metrics...}: the
    loss is the step's global mean for "global", this process's mean for "micro"."""
    state.model.train()
    n = len(micro_batches)
    units = torch.tensor(float(sum(stage.units(mb) for mb in micro_batches)))
    n_global = all_reduce_sum(units.clone(), state.world_size).item()
    total = torch.zeros(())
    mean_loss = 0.0
    metrics: dict[str, float] = {}
    for i, mb in enumerate(micro_batches):
        with _sync_context(state.model, i == n - 1):
            with autocast(state.device, state.autocast_dtype):
                loss_sum, mb_metrics = stage.loss(state, mb)
            if loop.normalize == "global":
                # DDP/FSDP average gradients over processes; scaling by world_size makes that the global sum
                loss = loss_sum * state.world_size / max(n_global, 1.0)
            else:
                mean = loss_sum / max(stage.units(mb), 1)
                loss = mean / n
                mean_loss += float(mean.detach()) / n
            (state.scaler.scale(loss) if state.scaler else loss).backward()
        total += loss_sum.detach().float().cpu()
        for k, v in mb_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) / n
    if state.scaler:
        state.scaler.unscale_(state.optimizer)
    grad_norm = _clip(state, loop.grad_clip)
    if state.scaler:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if loop.normalize == "global":
        loss_value = all_reduce_sum(total.clone(), state.world_size).item() / max(n_global, 1.0)
    else:
        loss_value = mean_loss
    state.step += 1
    return {"loss": loss_value, "grad_norm": grad_norm, "units": n_global, **metrics}


# -------------------------------------------------------------------------------------------------------- the loop
# the stats fit() reports for every step; anything else in a step's stats is a stage metric or an evaluation's
STEP_KEYS = frozenset({"loss", "grad_norm", "units", "step", "lr", "tokens", "tokens_per_s", "elapsed_s"})


class Logger:
    """Receives every step's stats on every process; `log` is true on the steps the loop reports (log_every, an
    evaluation, the last step). Subclasses write CSV, TensorBoard, JSON lines; `close` ends the run."""

    def step(self, state: TrainState, stats: dict[str, float], log: bool) -> None:
        pass

    def close(self) -> None:
        pass


def fit(state: TrainState, stage: Stage, loop: LoopConfig, *, save: Callable[[TrainState], None] | None = None,
        loggers: Sequence[Logger] = (), stop_after: int | None = None) -> list[dict[str, float]]:
    """Trains to loop.max_steps (or `stop_after` steps from now, as an interruption would); returns state.history.

    Each step's stats (train_step's, plus step, lr, tokens, tokens_per_s, elapsed_s and Stage.evaluate's metrics
    on evaluation steps) go to every logger; `save(state)` writes a checkpoint every loop.save_every steps and
    where the run stops. Every process must call fit (collectives inside)."""
    end = loop.max_steps if stop_after is None else min(loop.max_steps, state.step + stop_after)
    bar = None
    if state.is_main and loop.progress:
        from tqdm import tqdm

        bar = tqdm(total=loop.max_steps, initial=state.step, desc=loop.desc, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    batches = stage.batches(state)
    t0, tok0, secs0 = time.perf_counter(), state.tokens_seen, state.train_seconds
    try:
        while state.step < end:
            micro = [next(batches) for _ in range(loop.grad_accum)]
            tokens = sum(stage.tokens(mb) for mb in micro)
            stats = train_step(state, stage, micro, loop)
            state.tokens_seen += tokens * state.world_size
            elapsed = time.perf_counter() - t0
            state.train_seconds = secs0 + elapsed
            stats.update(step=state.step, lr=state.scheduler.get_last_lr()[0], tokens=state.tokens_seen,
                         tokens_per_s=(state.tokens_seen - tok0) / max(elapsed, 1e-9),
                         elapsed_s=state.train_seconds)
            evaluated = False
            if (loop.eval_every and state.step % loop.eval_every == 0) or state.step == loop.max_steps:
                found = stage.evaluate(state)
                stats.update(found)
                evaluated = bool(found)
            state.history.append(stats)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}",
                                tok_s=f"{stats['tokens_per_s']:.0f}")
            log = bool(loop.log_every and state.step % loop.log_every == 0) or evaluated or state.step == end
            for logger in loggers:
                logger.step(state, stats, log)
            if save is not None and ((loop.save_every and state.step % loop.save_every == 0) or state.step == end):
                save(state)
    finally:
        if bar:
            bar.close()
        for logger in loggers:
            logger.close()
    return state.history


def log_line(msg: str, rank: int = 0) -> None:
    """Prints `msg` on the main process only, above any progress bar."""
    if rank == 0:
        try:
            from tqdm import tqdm

            tqdm.write(msg)
        except ImportError:
            print(msg, flush=True)


# -------------------------------------------------------------------------------------------------------- loggers
class CSVLogger(Logger):
    """Rows of `columns` (stats keys; a missing value is an empty cell) appended to `path` on the log steps, main
    process only; the header is written to a new file."""

    def __init__(self, state: TrainState, path, columns: Sequence[tuple[str, str]]) -> None:
        import csv

        self.columns = list(columns)  # (key, format spec)
        self.file = open(path, "a", newline="", encoding="utf-8") if state.is_main else None
        self.writer = csv.writer(self.file) if self.file else None
        if self.file and self.file.tell() == 0:
            self.writer.writerow([k for k, _ in self.columns])

    def step(self, state, stats, log):
        if self.writer and log:
            self.writer.writerow(["" if stats.get(k) is None else format(stats[k], f) for k, f in self.columns])
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


class TensorBoardLogger(Logger):
    """Every numeric stat as a scalar on the log steps (eval_* under eval/, the rest under train/), main process
    only. Without the tensorboard package it warns once and does nothing."""

    SKIP = ("step",)

    def __init__(self, state: TrainState, folder, prog: str = "glmkit") -> None:
        self.writer = None
        if not state.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a declared dependency, but training must not die without it
            print(f"{prog}: tensorboard is not installed; logging to CSV only", file=sys.stderr)
            return
        self.writer = SummaryWriter(str(folder))

    def step(self, state, stats, log):
        if self.writer is None or not log:
            return
        for k, v in stats.items():
            if k in self.SKIP or not isinstance(v, (int, float)):
                continue
            tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
            self.writer.add_scalar(tag, v, state.step)

    def close(self):
        if self.writer:
            self.writer.close()
            self.writer = None


# -------------------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    """This process's Python, torch CPU and CUDA random states."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def gather_rng_states(state: TrainState) -> list[dict[str, Any]]:
    """Every process's rng_state(), in rank order (collective): a checkpoint resumes each process's streams."""
    return gather_objects(rng_state(), state.world_size)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, whole and on the CPU, also from FSDP shards (collective there)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict | None,
                          optim_sd: dict) -> None:
    """Inverse of full_state_dicts (model_sd None: the optimizer only); FSDP shards take their part."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
        set_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=model_sd is not None)
    if model_sd is None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def meta_shell(cls: type[nn.Module], config, state_dict: dict[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """A `cls(config)` built on the meta device whose tensors are those of `state_dict` (assigned, not copied): a
    model to export from gathered weights without a second copy in memory. Ties lm_head to the embedding when the
    config says so."""
    with torch.device("meta"):
        shell = cls(config)
    result = shell.load_state_dict(state_dict, assign=True, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        shell.lm_head.weight = shell.wte.weight
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and tied)]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"gathered state dict does not fit the model: missing {missing[:4]}, "
                           f"unexpected {result.unexpected_keys[:4]}")
    return shell
