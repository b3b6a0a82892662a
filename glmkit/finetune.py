"""`glmkit finetune`: P-tuning v2, LoRA and full fine-tuning with ChatGLM-6B's ptuning/main.py arguments.

    glmkit finetune --do_train --train_file poem-gen/train.json --prompt_column content --response_column summary \\
        --model_name_or_path glm-tiny --output_dir out/pt --pre_seq_len 16 --max_steps 300 --learning_rate 2e-2 \\
        --per_device_train_batch_size 8
    glmkit finetune --do_predict --test_file poem-gen/dev.json --prompt_column content --response_column summary \\
        --model_name_or_path glm-tiny --ptuning_checkpoint out/pt/checkpoint-300 --output_dir out/pt \\
        --predict_with_generate
    torchrun --nproc_per_node 2 -m glmkit.finetune --method full ...   (FSDP; gloo on CPU)

The method is P-tuning v2 when --pre_seq_len is given, else full fine-tuning (as main.py), unless --method says
otherwise. The loop is HF Trainer's default, written out: AdamW (β 0.9/0.999, ε 1e-8), linear decay to 0 after
--warmup_steps, gradient clipping at --max_grad_norm 1.0, gradient accumulation, optional bf16 autocast.
Each micro-batch's loss is the mean over its answer tokens (main.py's labels); only the answer positions go
through the output layer, which is most of the work for a small model with a large vocabulary.

Outputs (under --output_dir): checkpoint-N/ every --save_steps and at the end (P-tuning: config.json +
pytorch_model.bin with only transformer.prefix_encoder.*; LoRA: adapter_config.json + adapter_model.safetensors;
full: the whole model in the base's layout with its tokenizer), each with optimizer.pt, scheduler.pt,
rng_state.pth and trainer_state.json for --resume_from_checkpoint; train_results.json; with --do_eval /
--do_predict and --predict_with_generate: eval_results.json / predict_results.json (eval_rouge-1 ... bleu-4) and
generated_predictions.txt (JSON lines {"labels", "predict"}), as main.py writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.data.finetune import (
    IGNORE_INDEX,
    Columns,
    Lengths,
    SpecialTokens,
    build_examples,
    check_columns,
    collate_prompts,
    collate_train,
    decode_text,
    read_rows,
    tokenizer_family,
)

STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


# ------------------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmkit finetune",
        description="Fine-tune a GLM-family model with ChatGLM-6B's ptuning/main.py arguments (train.sh works "
                    "with `python3 main.py` replaced by `glmkit finetune`). P-tuning v2 when --pre_seq_len is given, "
                    "full fine-tuning otherwise, LoRA with --method lora.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to do")
    g.add_argument("--do_train", action="store_true", help="train on --train_file")
    g.add_argument("--do_eval", action="store_true", help="evaluate on --validation_file (eval_* metrics)")
    g.add_argument("--do_predict", action="store_true", help="predict on --test_file (predict_* metrics)")
    g.add_argument("--predict_with_generate", action="store_true",
                   help="generate answers and score them with ROUGE/BLEU; without it --do_eval reports the loss "
                        "(--do_predict always generates: main.py without it writes no predictions or scores)")

    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", required=True, help="base model folder, bundled name or HF id")
    g.add_argument("--ptuning_checkpoint", default=None, help="P-tuning checkpoint folder to load on the base")
    g.add_argument("--adapter", default=None, help="P-tuning or LoRA folder to load on the base")
    g.add_argument("--method", choices=["ptuning", "lora", "full"], default=None,
                   help="default: ptuning when --pre_seq_len is given, else full")
    g.add_argument("--pre_seq_len", type=int, default=None, help="P-tuning v2 prefix length")
    g.add_argument("--prefix_projection", action="store_true", help="P-tuning v2 with the two-layer MLP reparam.")
    g.add_argument("--quantization_bit", type=int, choices=[4, 8], default=None,
                   help="load the base as INT4/INT8 (frozen; P-tuning and LoRA train through it)")
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=32.0)
    g.add_argument("--lora_dropout", type=float, default=0.1)
    g.add_argument("--lora_target", default="attn.qkv",
                   help="comma-separated modules: attn.qkv, attn.proj, mlp.fc, mlp.proj (or THUDM names), or all")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the loaded base weights")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--num_threads", type=int, default=None,
                   help="CPU threads for torch (default: the cores not already busy, at least 1; on a shared, "
                        "oversubscribed CPU extra threads make small models many times slower)")

    g = p.add_argument_group("data (JSON Lines)")
    g.add_argument("--train_file")
    g.add_argument("--validation_file")
    g.add_argument("--test_file")
    g.add_argument("--prompt_column", default="content")
    g.add_argument("--response_column", default="summary")
    g.add_argument("--history_column", default=None, help="list of [query, response] pairs (multi-turn data)")
    g.add_argument("--source_prefix", default="", help="text put before every prompt")
    g.add_argument("--max_source_length", type=int, default=64)
    g.add_argument("--max_target_length", type=int, default=128)
    g.add_argument("--val_max_target_length", type=int, default=None, help="default: --max_target_length")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g.add_argument("--max_predict_samples", type=int, default=None)
    g.add_argument("--ignore_pad_token_for_loss", type=_bool, default=True)
    g.add_argument("--overwrite_cache", action="store_true", help="accepted for main.py compatibility (no cache)")
    g.add_argument("--preprocessing_num_workers", type=int, default=None, help="accepted for compatibility")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow an --output_dir with checkpoints")
    g.add_argument("--per_device_train_batch_size", type=int, default=8)
    g.add_argument("--per_device_eval_batch_size", type=int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; -1 = --num_train_epochs")
    g.add_argument("--num_train_epochs", type=float, default=3.0)
    g.add_argument("--warmup_steps", type=int, default=0)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--save_steps", type=int, default=500)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward/backward")
    g.add_argument("--fp16", action="store_true", help="accepted for compatibility; use --bf16 on CPU")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--resume_from_checkpoint", default=None, help="an OUT/checkpoint-N folder to continue from")
    g.add_argument("--report_to", default=None, help="accepted for compatibility (logs go to stdout)")
    g.add_argument("--deepspeed", default=None, help="accepted for ds_train_finetune.sh compatibility; use torchrun")
    g.add_argument("--local_rank", type=int, default=-1, help="set by launchers; torchrun's LOCAL_RANK is used")
    g.add_argument("--disable_tqdm", action="store_true")

    g = p.add_argument_group("generation (--predict_with_generate; defaults as main.py)")
    g.add_argument("--generation_max_length", type=int, default=None,
                   help="prompt + answer tokens (main.py: 512 for ChatGLM-6B, source+target+1 for ChatGLM2)")
    g.add_argument("--do_sample", type=_bool, default=True)
    g.add_argument("--top_p", type=float, default=0.7)
    g.add_argument("--temperature", type=float, default=0.95)
    return p


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def resolve_method(args: argparse.Namespace) -> str:
    method = args.method or ("ptuning" if args.pre_seq_len is not None else "full")
    if method == "ptuning" and args.pre_seq_len is None and args.ptuning_checkpoint is None and args.do_train:
        raise ValueError("--method ptuning needs --pre_seq_len (the prefix length, e.g. 128)")
    if method != "ptuning" and args.pre_seq_len is not None:
        raise ValueError(f"--pre_seq_len is a P-tuning option but --method is {method}")
    if method == "full" and args.quantization_bit and args.do_train:
        raise ValueError("full fine-tuning cannot train INT4/INT8 weights; use --method ptuning or lora with "
                         "--quantization_bit, or drop --quantization_bit")
    return method


def validate(args: argparse.Namespace) -> None:
    if not (args.do_train or args.do_eval or args.do_predict):
        raise ValueError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    for flag, path in (("do_train", args.train_file), ("do_eval", args.validation_file),
                       ("do_predict", args.test_file)):
        if getattr(args, flag) and not path:
            need = {"do_train": "--train_file", "do_eval": "--validation_file", "do_predict": "--test_file"}[flag]
            raise ValueError(f"--{flag} requires {need}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "save_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.pre_seq_len is not None and args.pre_seq_len < 0:
        raise ValueError(f"--pre_seq_len must be >= 0, got {args.pre_seq_len}")
    if args.do_train and args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError("set --max_steps or a positive --num_train_epochs")
    if args.ptuning_checkpoint and args.adapter:
        raise ValueError("pass either --ptuning_checkpoint or --adapter, not both")


# ------------------------------------------------------------------------------------------------------ model setup
def _device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _set_cpu_threads(requested: int | None, world: int) -> int:
    """torch threads for this process: as asked, else the idle cores (per process under torchrun)."""
    cores = os.cpu_count() or 1
    if requested is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:  # not available on this platform
            busy = 0.0
        requested = int(cores - busy + 0.5) // max(world, 1)
    n = max(1, min(int(requested), cores))
    torch.set_num_threads(n)
    return n


def load_for_finetune(args: argparse.Namespace, method: str):
    """Base model (+ adapter, + fresh trainable parts) and tokenizer, as the method and flags say."""
    from glmkit.loader import load_model
    from glmkit.tokenizer import load_tokenizer

    quantize = {4: "int4", 8: "int8"}.get(args.quantization_bit) if args.quantization_bit else None
    base = args.model_name_or_path
    if method == "full" and args.resume_from_checkpoint:
        base = args.resume_from_checkpoint  # a full checkpoint is a whole model folder
    model = load_model(base, dtype=args.dtype, quantize=quantize)
    tokenizer = load_tokenizer(base)
    adapter = args.ptuning_checkpoint or args.adapter
    resume = args.resume_from_checkpoint if method != "full" else None
    if resume:
        adapter = resume  # the checkpoint's adapter replaces any --ptuning_checkpoint / --adapter
    if adapter:
        load_adapter_folder(model, adapter, trainable=bool(args.do_train))

    if method == "ptuning" and args.do_train:
        from glmkit.ptuning import attach_prefix, mark_only_prefix_as_trainable

        if model.prefix_encoder is None:
            if args.pre_seq_len is None:
                raise ValueError("--method ptuning needs --pre_seq_len")
            attach_prefix(model, args.pre_seq_len, args.prefix_projection)
        elif args.pre_seq_len is not None and args.pre_seq_len != model.config.pre_seq_len:
            raise ValueError(f"--pre_seq_len {args.pre_seq_len} differs from the loaded prefix's "
                             f"{model.config.pre_seq_len}")
        model.prefix_encoder.float()  # as main.py: the prefix trains in fp32 over a half/quantized base
        mark_only_prefix_as_trainable(model)
    elif method == "lora" and args.do_train:
        from glmkit.lora import apply_lora, has_lora, mark_only_lora_as_trainable

        if has_lora(model):
            mark_only_lora_as_trainable(model)
        else:
            apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target)
        for n, p in model.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # fp32 adapter weights over a half base
    elif method == "full" and args.do_train:
        for p in model.parameters():
            p.requires_grad_(True)
    if getattr(args, "gradient_checkpointing", False):
        model.gradient_checkpointing = True
    return model, tokenizer


def load_adapter_folder(model: nn.Module, folder: str | Path, trainable: bool = False) -> nn.Module:
    """A LoRA folder (adapter_config.json) or a P-tuning folder (config.json with pre_seq_len, pytorch_model.bin
    with transformer.prefix_encoder.*), as main.py's --ptuning_checkpoint loads it."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        from glmkit.lora import load_lora_adapter

        return load_lora_adapter(model, folder, trainable=trainable)
    from glmkit.loader import load_adapter

    load_adapter(model, folder)
    if model.prefix_encoder is not None:
        model.prefix_encoder.float()  # main.py: the prefix encoder runs in fp32 over a half/quantized base
    return model


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
            select_positions: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labels != -100 (logits[t] predicts labels[t+1]) and the token count.

    select_positions: run the output layer only on the positions that have a label (same result, less work).
    """
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    n = int(keep.sum())
    if select_positions:
        with _hidden_states_only(model) as head:
            hidden = model(input_ids)  # (B, T, hidden)
        logits = head(hidden[:, :-1][keep]).float()  # (N, vocab)
        loss = F.cross_entropy(logits, target[keep], reduction="sum")
    else:
        logits = model(input_ids)[:, :-1].float()  # (B, T-1, vocab)
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


# ------------------------------------------------------------------------------------------------------ distributed
def _init_distributed(device: torch.device) -> tuple[int, int]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _wrap_distributed(model: nn.Module, method: str, device: torch.device, world: int) -> nn.Module:
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
    from glmkit.loader import save_model

    if state_dict is None:
        return save_model(model, out_dir, tokenizer=tokenizer)
    return save_model(_cpu_shell(model, state_dict), out_dir, tokenizer=tokenizer)


def _cpu_shell(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    from glmkit.api import GLMForCausalLM

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
                    state: TrainerState, rank: int, world: int, args) -> None:
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
            from glmkit.ptuning import save_ptuning_checkpoint

            save_ptuning_checkpoint(raw, ckpt)
        elif method == "lora":
            from glmkit.lora import save_lora_adapter

            save_lora_adapter(raw, ckpt, base_model_name_or_path=args.model_name_or_path)
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


# ------------------------------------------------------------------------------------------------------ training
def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        try:
            from tqdm import tqdm

            tqdm.write(msg)
        except ImportError:
            print(msg, flush=True)


def train(model: nn.Module, tokenizer, examples: list[dict[str, list[int]]], args: argparse.Namespace,
          method: str, device: torch.device, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The fine-tuning loop; returns train metrics (train_loss, train_runtime, ...)."""
    out = Path(args.output_dir)
    pad_id = SpecialTokens.from_tokenizer(tokenizer).pad
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("no trainable parameters: nothing to fine-tune")
    wrapped = _wrap_distributed(model, method, device, world)
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
        _log(f"resumed from {args.resume_from_checkpoint} at step {state.global_step}", rank)

    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    _log(f"***** Running training ({method}) *****\n  examples = {len(examples)}, steps = {total}, "
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
            with _autocast(device, args.bf16):
                # DDP/FSDP must see the whole forward, so they take the plain full-logits path
                loss_sum, n = lm_loss(model, ids, labels) if world == 1 else \
                    lm_loss(wrapped, ids, labels, select_positions=False)
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
            _log(json.dumps(entry), rank)
            t_log, tokens_log, loss_sum_log, steps_log = time.perf_counter(), 0, 0.0, 0
        if state.global_step % args.save_steps == 0 or state.global_step == total:
            save_checkpoint(out / f"checkpoint-{state.global_step}", model if world == 1 or method != "full" else
                            wrapped, tokenizer, method, optimizer, scheduler, state, rank, world, args)
    if bar is not None:
        bar.close()
    wrapped.eval()
    runtime = time.perf_counter() - t_start
    return {"train_loss": round(loss_total / max(1, steps_total), 4), "train_runtime": round(runtime, 2),
            "train_samples": len(examples), "train_steps_per_second": round(steps_total / max(runtime, 1e-9), 3),
            "global_step": state.global_step, "epoch": round(state.epoch, 4)}


# ------------------------------------------------------------------------------------------------------ evaluation
def generation_length(args, tokenizer) -> int:
    if args.generation_max_length:
        return args.generation_max_length
    if tokenizer_family(tokenizer) == "chatglm":
        return 512  # main.py: trainer.predict(..., max_length=512)
    return args.max_source_length + args.max_target_length + 1  # ChatGLM2's main.py


@torch.no_grad()
def generate_predictions(model: nn.Module, tokenizer, examples: list[dict[str, Any]], args,
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
        batch = collate_prompts([examples[i]["input_ids"] for i in idx], special.pad)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if max_length - ids.shape[1] <= 0:
            raise ValueError(f"--generation_max_length {max_length} leaves no room after prompts of "
                             f"{ids.shape[1]} tokens; raise it or lower --max_source_length")
        with _autocast(device, args.bf16):
            new = model.generate(ids, attention_mask=mask, max_length=max_length, do_sample=args.do_sample,
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
def evaluate_loss(model: nn.Module, tokenizer, examples: list[dict[str, list[int]]], args,
                  device: torch.device) -> float:
    pad_id = SpecialTokens.from_tokenizer(tokenizer).pad
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(examples), args.per_device_eval_batch_size):
        batch = collate_train(examples[b:b + args.per_device_eval_batch_size], pad_id)
        with _autocast(device, args.bf16):
            loss_sum, n = lm_loss(model, batch["input_ids"].to(device), batch["labels"].to(device))
        total, count = total + float(loss_sum), count + n
    return total / max(count, 1)


def run_evaluation(model, tokenizer, rows, args, device, prefix: str, write_predictions: bool) -> dict[str, Any]:
    """main.py's trainer.evaluate / trainer.predict: metrics with the prefix, plus generated_predictions.txt."""
    from glmkit.metrics import compute_metrics

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
            with open(path, "w", encoding="utf-8") as f:
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


def _save_metrics(out: Path, split: str, metrics: dict[str, Any]) -> None:
    """HF Trainer.save_metrics: {split}_results.json, merged into all_results.json."""
    (out / f"{split}_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True) + "\n", encoding="utf-8")
    all_path = out / "all_results.json"
    merged = json.loads(all_path.read_text(encoding="utf-8")) if all_path.exists() else {}
    merged.update(metrics)
    all_path.write_text(json.dumps(merged, indent=4, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ entry point
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Does what the flags ask (train, eval, predict) and returns all metrics."""
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # callers in the same process keep their setting


def _run(args: argparse.Namespace) -> dict[str, Any]:
    validate(args)
    method = resolve_method(args)
    device = _device(args)
    rank, world = _init_distributed(device)
    if device.type == "cpu":
        threads = _set_cpu_threads(args.num_threads, world)
        _log(f"device cpu, {threads} thread(s) per process", rank)
    out = Path(args.output_dir)
    if args.do_train and rank == 0:
        existing = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
        if existing and not args.overwrite_output_dir and not args.resume_from_checkpoint:
            _log(f"warning: {out} already holds {', '.join(p.name for p in existing[:3])}; checkpoints of the "
                 "same step will be overwritten (pass --overwrite_output_dir to silence this, or "
                 "--resume_from_checkpoint to continue a run)")
    if args.fp16 and rank == 0:
        _log("note: --fp16 is accepted for main.py compatibility; glmkit trains fp32 (or --bf16 autocast)")
    if args.deepspeed and rank == 0:
        _log("note: --deepspeed is ignored; run multi-process fine-tuning with torchrun (FSDP for --method full)")
    out.mkdir(parents=True, exist_ok=True)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = load_for_finetune(args, method)
    model.to(device)
    columns = Columns(args.prompt_column, args.response_column, args.history_column)
    results: dict[str, Any] = {}

    if args.do_train:
        rows = read_rows(args.train_file, args.max_train_samples)
        check_columns(rows, columns, args.train_file)
        lengths = Lengths(args.max_source_length, args.max_target_length, args.source_prefix,
                          args.ignore_pad_token_for_loss)
        examples = build_examples(tokenizer, rows, columns, lengths, train=True)
        if rank == 0:
            e = examples[0]
            _log(f"input_ids {e['input_ids']}\ninputs {tokenizer.decode(e['input_ids'])}\nlabel_ids {e['labels']}\n"
                 f"labels {tokenizer.decode([t for t in e['labels'] if t != IGNORE_INDEX])}")
        metrics = train(model, tokenizer, examples, args, method, device, rank, world)
        if rank == 0:
            _save_metrics(out, "train", metrics)
        results.update(metrics)

    if world > 1 and (args.do_eval or args.do_predict):
        if method == "full":
            _log("evaluation after multi-process full fine-tuning: load OUT/checkpoint-N in a single process", rank)
            args.do_eval = args.do_predict = False
        elif rank != 0:
            args.do_eval = args.do_predict = False
    model.eval()
    for wanted, split, path, limit in ((args.do_eval, "eval", args.validation_file, args.max_eval_samples),
                                       (args.do_predict, "predict", args.test_file, args.max_predict_samples)):
        if not wanted:
            continue
        rows = read_rows(path, limit)
        check_columns(rows, columns, path)
        # main.py writes generated_predictions.txt for --do_predict only
        metrics = run_evaluation(model, tokenizer, rows, args, device, split, write_predictions=split == "predict")
        _save_metrics(out, split, metrics)
        _log(json.dumps(metrics, ensure_ascii=False))
        results.update(metrics)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return results


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit finetune: error: {e}", file=sys.stderr)
        return 2
    from glmkit.pretrain import end_torchrun_worker

    return end_torchrun_worker(0)


if __name__ == "__main__":
    sys.exit(cli_main())
