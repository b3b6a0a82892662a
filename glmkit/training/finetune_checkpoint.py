"""Fine-tuning checkpoints, as Hugging Face Trainer lays them out: checkpoint-N folders holding the method's weights
(an adapter, or the whole model) plus optimizer.pt, scheduler.pt, rng_state.pth and trainer_state.json, written
and read back for --resume_from_checkpoint. What a method trains, how it is wrapped for several processes and what
its checkpoint holds is one row of METHODS; the loop (glmkit.training.trainer) never asks."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.adapters.lora import save_lora_adapter
from glmkit.adapters.ptuning import save_ptuning_checkpoint
from glmkit.core.atomic import atomic_dir
from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.checkpoint import CheckpointError
from glmkit.loading.loader import save_model
from glmkit.training.trainer import (
    TrainState,
    full_state_dicts,
    gather_rng_states,
    load_full_state_dicts,
    meta_shell,
    set_rng_state,
)

STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


@dataclass
class TrainerState:
    """trainer_state.json: the step, the epoch and the log of a fine-tuning run, as HF Trainer writes it."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    method: str = ""
    seed: int = 42
    world_size: int = 1
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1


# ------------------------------------------------------------------------------------------------------ methods
def save_full_model(model: nn.Module, out_dir: str | Path, tokenizer=None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The whole model in the base's (THUDM) layout, loadable by glmkit.load_model, plus the tokenizer files.

    state_dict: a gathered full state dict (FSDP), written through a meta-device shell of the model."""
    if state_dict is None:
        return save_model(model, out_dir, tokenizer=tokenizer)
    return save_model(meta_shell(GLMForCausalLM, model.config, state_dict), out_dir, tokenizer=tokenizer)


@dataclass(frozen=True)
class Method:
    """A fine-tuning method as the loop sees it: how several processes share the model ("ddp" replicates it,
    "fsdp" shards it) and what a checkpoint's weights are: save(raw_model, folder, tokenizer, base_name,
    full_state_dict or None). Which parameters train is set on the model before the loop (requires_grad)."""

    name: str
    distributed: str
    save: Callable[..., Any]


METHODS: dict[str, Method] = {
    "ptuning": Method("ptuning", "ddp", lambda model, ckpt, tok, base, sd: save_ptuning_checkpoint(model, ckpt)),
    "lora": Method("lora", "ddp", lambda model, ckpt, tok, base, sd: save_lora_adapter(
        model, ckpt, base_model_name_or_path=base)),
    "full": Method("full", "fsdp", lambda model, ckpt, tok, base, sd: save_full_model(model, ckpt, tokenizer=tok,
                                                                                     state_dict=sd)),
}


def _sharded(state: TrainState) -> bool:
    return state.world_size > 1 and not isinstance(state.model, nn.parallel.DistributedDataParallel)


# ------------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(ckpt: Path, state: TrainState, trainer_state: TrainerState, method: str, tokenizer,
                    base_model_name_or_path: str) -> None:
    """The method's weights, then optimizer/scheduler/RNG/trainer state for resuming. Every process calls it."""
    full_sd = optim_sd = None
    if _sharded(state):  # FSDP: gather whole tensors (collective)
        full_sd, optim_sd = full_state_dicts(state.raw_model, state.optimizer)
    rngs = gather_rng_states(state)
    if state.is_main:
        # one folder, committed whole: a kill leaves the previous checkpoint-N folders and no half-written one
        with atomic_dir(ckpt) as tmp:
            METHODS[method].save(state.raw_model, tmp, tokenizer, base_model_name_or_path, full_sd)
            torch.save(optim_sd if optim_sd is not None else state.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(state.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng_state.pth")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state.__dict__, indent=2,
                                                               ensure_ascii=False) + "\n", encoding="utf-8")
    if state.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def load_trainer_state(ckpt: Path, state: TrainState, method: str) -> TrainerState:
    """Restores optimizer, scheduler and this process's RNG streams from `ckpt` (the weights were loaded with the
    model); returns its trainer state and sets state.step to its global step."""
    missing = [f for f in STATE_FILES if not (ckpt / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{ckpt} lacks {missing}; --resume_from_checkpoint needs a checkpoint written by "
                                "glmkit finetune")
    try:
        saved = TrainerState(**json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'trainer_state.json'} is corrupt ({e})") from None
    if saved.method != method:
        raise ValueError(f"{ckpt} is a {saved.method} checkpoint but this run is --method {method}")
    if saved.world_size != state.world_size:
        raise ValueError(f"{ckpt} was written by {saved.world_size} processes; resume with the same number "
                         f"(now {state.world_size}) so every process continues its own data and RNG stream")
    optim_sd = _load(ckpt / "optimizer.pt")
    if _sharded(state):
        load_full_state_dicts(state.raw_model, state.optimizer, None, optim_sd)
    else:
        state.optimizer.load_state_dict(optim_sd)
    state.scheduler.load_state_dict(_load(ckpt / "scheduler.pt"))
    rngs = _load(ckpt / "rng_state.pth")
    set_rng_state(rngs[state.rank])
    state.step = saved.global_step
    return saved


def _load(path: Path):
    """A resume file, loaded with weights_only=True (a crafted pickle runs no code); a corrupt one is a
    CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
