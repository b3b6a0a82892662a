"""Fine-tuning state across processes and restarts: torchrun setup (DDP, or FSDP for full fine-tuning), the trainer
state, and checkpoint-N folders (the method's model/adapter files plus optimizer.pt, scheduler.pt, rng_state.pth and
trainer_state.json) written and read back for --resume_from_checkpoint."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.adapters.lora import save_lora_adapter
from glmkit.adapters.ptuning import save_ptuning_checkpoint
from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.loading.loader import save_model

STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


@dataclass
class TrainerState:
    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    method: str = ""
    seed: int = 42
    world_size: int = 1
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1


# ------------------------------------------------------------------------------------------------------ distributed
def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun, else after joining the process group (nccl on CUDA, else gloo)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap_distributed(model: nn.Module, method: str, device: torch.device, world: int) -> nn.Module:
    if world == 1:
        return model
    if method == "full":  # FSDP2 (ZeRO-3): each block's parameters sharded across processes
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------------ checkpoints
def save_full_model(model: nn.Module, out_dir: str | Path, tokenizer=None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The whole model in the base's (THUDM) layout, loadable by glmkit.load_model, plus the tokenizer files.

    state_dict: a gathered full state dict (FSDP), written through a CPU copy of the model."""
    if state_dict is None:
        return save_model(model, out_dir, tokenizer=tokenizer)
    return save_model(_cpu_shell(model, state_dict), out_dir, tokenizer=tokenizer)


def _cpu_shell(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    with torch.device("meta"):
        shell = GLMForCausalLM(model.config)
    result = shell.load_state_dict(state_dict, assign=True, strict=False)
    if model.config.tie_word_embeddings:
        shell.lm_head.weight = shell.wte.weight
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"gathered state dict does not fit the model: missing {missing[:4]}, "
                           f"unexpected {result.unexpected_keys[:4]}")
    return shell


def save_checkpoint(ckpt: Path, model: nn.Module, tokenizer, method: str, optimizer, scheduler,
                    state: TrainerState, rank: int, world: int, base_model_name_or_path: str) -> None:
    """Adapter/model files in the method's layout, then optimizer/scheduler/RNG/trainer state for resuming."""
    full_sd = optim_sd = None
    if method == "full" and world > 1:  # collective: every rank takes part
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        full_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
    rngs = [_rng_state()]
    if world > 1:
        import torch.distributed as dist

        rngs = [None] * world
        dist.all_gather_object(rngs, _rng_state())
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if method == "ptuning":
            save_ptuning_checkpoint(raw, ckpt)
        elif method == "lora":
            save_lora_adapter(raw, ckpt, base_model_name_or_path=base_model_name_or_path)
        else:
            save_full_model(raw, ckpt, tokenizer=tokenizer, state_dict=full_sd)
        torch.save(optim_sd if optim_sd is not None else optimizer.state_dict(), ckpt / "optimizer.pt")
        torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
        torch.save(rngs, ckpt / "rng_state.pth")
        (ckpt / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_trainer_state(ckpt: Path, model, optimizer, scheduler, method: str, rank: int,
                       world: int) -> TrainerState:
    """Restores optimizer, scheduler and this process's RNG streams from `ckpt`; returns its trainer state."""
    missing = [f for f in STATE_FILES if not (ckpt / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{ckpt} lacks {missing}; --resume_from_checkpoint needs a checkpoint written by "
                                "glmkit finetune")
    state = TrainerState(**json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")))
    if state.method != method:
        raise ValueError(f"{ckpt} is a {state.method} checkpoint but this run is --method {method}")
    if state.world_size != world:
        raise ValueError(f"{ckpt} was written by {state.world_size} processes; resume with the same number "
                         f"(now {world}) so every process continues its own data and RNG stream")
    optim_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
    if method == "full" and world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim_sd)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=False))
    rngs = torch.load(ckpt / "rng_state.pth", map_location="cpu", weights_only=False)
    _set_rng_state(rngs[rank])
    return state
