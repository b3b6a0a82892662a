"""`glmkit pretrain`: GLM blank-infilling pretraining with an explicit loop.

    glmkit pretrain --config configs/glm-tiny.yaml train.max_steps=2000 train.out_dir=out/tiny
    torchrun --nproc_per_node 2 -m glmkit.training.pretrain --config CONFIG.yaml train.distributed=fsdp

The loop (`fit`) is written out: AdamW, linear warmup + cosine decay, gradient clipping, bf16 autocast on CPU
(fp16 + GradScaler on CUDA), gradient accumulation, held-out evaluation, checkpoints with exact resume (model,
optimizer, scheduler, RNG states, data position), a tqdm bar with tokens/s, CSV and TensorBoard logs.
Multi-process training runs on torch.distributed (gloo on CPU, nccl on CUDA) as plain data parallel (`ddp`) or
fully sharded (`fsdp`, FSDP2 `fully_shard` = ZeRO-3). The loss of a step is the sum of token losses over the whole
global batch divided by its number of loss tokens, whatever the split across processes and micro-batches, so a
2-process run computes the same update as a 1-process run.

Config file sections: `model` (a preset name plus GLMConfig overrides), `tokenizer` (a folder), `data`
(DataArgs), `train` (TrainArgs), `eval` (EvalArgs). CLI overrides are `section.key=value` (YAML values).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glmkit.core.config import GLMConfig
from glmkit.core.model import GLM
from glmkit.core.tokenizer import load_tokenizer
from glmkit.loading.loader import load_model, save_model
from glmkit.training.data.blank import (
    IGNORE_INDEX,
    BlankConfig,
    SpecialIds,
    collate_rows,
    sentence_end_ids_from_tokenizer,
)
from glmkit.training.data.corpus import BlankInfillingDataset, Source


# -------------------------------------------------------------------------------------------------------- arguments
@dataclass
class DataArgs:
    train: list[Any] = field(default_factory=list)
    """training sources: paths or {path, weight, lines: "start:end", key}"""
    eval: list[Any] = field(default_factory=list)
    """held-out sources (read once, in order)"""
    seq_len: int = 256
    """packed row length"""
    max_doc_tokens: int | None = None
    """documents are cut into pieces of at most this many tokens (default 0.7·seq_len)"""
    shuffle_buffer: int = 1024
    """documents held for the streaming shuffle"""
    blank: dict[str, Any] = field(default_factory=dict)
    """BlankConfig fields (objective mixture, ratios)"""


@dataclass
class TrainArgs:
    out_dir: str = "out/pretrain"
    """checkpoints, logs and the exported model go here"""
    max_steps: int = 1000
    """optimizer steps (the cosine schedule spans them)"""
    micro_batch_size: int = 8
    """rows per forward pass per process"""
    grad_accum: int = 1
    """micro-batches per optimizer step per process"""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """the cosine decays to lr·min_lr_ratio"""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """max global grad norm (0 = off)"""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 autocast on CPU, fp16 + loss scaling on CUDA"""
    device: str = "auto"
    seed: int = 1234
    num_threads: int = 0
    """torch CPU threads (0 = leave torch's default)"""
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    """under torchrun: plain data parallel or FSDP (ZeRO-3); 'none' still works with torchrun for WORLD_SIZE=1"""
    log_every: int = 10
    save_every: int = 200
    """steps between checkpoints (0 = only at the end)"""
    resume: bool = True
    """continue from out_dir/checkpoint.pt when it exists"""
    init_from: str = ""
    """start from this model folder's weights instead of random ones (continued pretraining); its architecture must
    match the model section, except DeepNorm's α, which is reparametrized exactly (see rescale_deepnorm)"""
    export_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    """dtype of the exported model.safetensors"""
    progress: bool = True
    """tqdm progress bar"""


@dataclass
class EvalArgs:
    every: int = 200
    """steps between held-out evaluations (0 = only at the end)"""
    max_rows: int = 64
    """held-out rows per evaluation"""
    seed: int = 0


@dataclass
class PretrainConfig:
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = ""
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    """Reads a YAML config and applies `section.key=value` overrides (values parsed as YAML)."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no config file at {path}")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping with model/tokenizer/data/train/eval sections")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> PretrainConfig:
    unknown = set(raw) - {"model", "tokenizer", "data", "train", "eval"}
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; expected model, tokenizer, data, train, eval")

    def build(cls, section: str):
        values = dict(raw.get(section) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - names
        if bad:
            raise ValueError(f"unknown {section} options {sorted(bad)}; known: {sorted(names)}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for k, v in values.items():
            # YAML 1.1 reads "3e-4" (no dot) as a string; numbers are what the fields mean
            if isinstance(v, str) and types[k].split(" |")[0] in ("float", "int"):
                try:
                    values[k] = float(v) if types[k].startswith("float") else int(v)
                except ValueError:
                    raise ValueError(f"{section}.{k} must be a number, got {v!r}") from None
        if cls is TrainArgs and "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        return cls(**values)

    return PretrainConfig(model=dict(raw.get("model") or {}), tokenizer=str(raw.get("tokenizer") or ""),
                          data=build(DataArgs, "data"), train=build(TrainArgs, "train"), eval=build(EvalArgs, "eval"))


# -------------------------------------------------------------------------------------------------------- state
@dataclass
class State:
    config: PretrainConfig
    model_config: GLMConfig
    model: torch.nn.Module  # wrapped (DDP/FSDP) or plain
    raw_model: GLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    tokenizer: Any
    special: SpecialIds
    sentence_end_ids: frozenset[int]
    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0  # wall time of fit() over every invocation (resumes included)
    history: list[dict[str, float]] = field(default_factory=list)


def _init_distributed(train: TrainArgs) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and train.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _pick_device(train: TrainArgs, rank: int) -> torch.device:
    if train.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(train.device)


def _autocast_dtype(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "bf16"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return torch.float16, True


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def model_config_for(cfg: PretrainConfig, tokenizer) -> GLMConfig:
    """GLMConfig from the `model` section (preset + overrides), with vocab and special ids from the tokenizer."""
    spec = dict(cfg.model)
    preset = spec.pop("preset", "chatglm-6b")
    vocab = spec.pop("vocab_size", None) or _vocab_size(tokenizer)
    ids = dict(bos_token_id=tokenizer.sop_token_id, eos_token_id=tokenizer.eop_token_id,
               pad_token_id=tokenizer.pad_token_id, mask_token_id=tokenizer.mask_token_id,
               gmask_token_id=tokenizer.gmask_token_id)
    return GLMConfig.from_name(preset, **{**ids, **spec, "vocab_size": vocab})


def _vocab_size(tokenizer) -> int:
    n = getattr(tokenizer, "vocab_size", None)
    return int(n if n is not None else len(tokenizer))


def _load_tokenizer(path: str):
    if not path:
        raise ValueError("the config names no tokenizer (set `tokenizer: FOLDER`)")

    return load_tokenizer(path)


def setup(config: PretrainConfig, tokenizer=None) -> State:
    """Builds everything `fit` needs: process group, model (wrapped for DDP/FSDP), optimizer, schedule, and resumes
    from out_dir/checkpoint.pt when it exists (unless train.resume is false)."""
    t = config.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    rank, world = _init_distributed(t)
    device = _pick_device(t, rank)
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.tokenizer)
    special = SpecialIds.from_tokenizer(tokenizer)
    mcfg = model_config_for(config, tokenizer)

    torch.manual_seed(t.seed)
    raw = GLM(mcfg)
    raw.init_weights(generator=torch.Generator().manual_seed(t.seed))  # identical on every rank
    ckpt = Path(t.out_dir) / "checkpoint.pt"
    resuming = t.resume and ckpt.exists()
    if t.init_from and not resuming:
        init_from_model(raw, t.init_from)
    raw.to(device)
    model: torch.nn.Module = raw
    if world > 1 and t.distributed == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    elif world > 1 and t.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in raw.h:
            fully_shard(block)
        fully_shard(raw)
    elif world > 1:
        raise ValueError(f"{world} processes but train.distributed is 'none'; set train.distributed=ddp or fsdp")

    decay = [p for n, p in raw.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in raw.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=t.betas, eps=t.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
    amp_dtype, use_scaler = _autocast_dtype(t.precision, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    vocab = _vocab_size(tokenizer)
    state = State(config, mcfg, model, raw, optimizer, scheduler, scaler, tokenizer, special,
                  sentence_end_ids_from_tokenizer(tokenizer, vocab), device, amp_dtype, rank, world)
    if resuming:
        load_checkpoint(state, ckpt)
    return state


def rescale_deepnorm(state_dict: dict[str, torch.Tensor], alpha_from: float, alpha_to: float) -> None:
    """Rewrites DeepNorm weights trained with α = alpha_from so that the model computes the same function with
    α = alpha_to. Each sublayer feeds α·LN(x) + f(LN(x)) to a LayerNorm (the next sublayer's or the final one),
    which is blind to scale: multiplying f's output projection (weight and bias) by alpha_to / alpha_from scales
    the whole sum by that factor, so every LayerNorm output, and so the logits, stay the same (up to eps)."""
    ratio = alpha_to / alpha_from
    for name, tensor in state_dict.items():
        if ".attn.proj." in name or ".mlp.proj." in name:
            tensor.mul_(ratio)


def _architecture(config: GLMConfig) -> dict[str, Any]:
    skip = {"alpha_num_layers", "name", "torch_dtype", "extra", "rope_fp16", "pre_seq_len", "prefix_projection",
            "prefix_hidden_size"}
    return {k: v for k, v in config.to_dict().items() if k not in skip}


def init_from_model(model: GLM, path: str) -> None:
    """Loads a model folder's weights into `model` (fp32) for continued pretraining."""
    source = load_model(path, dtype=torch.float32)
    have, want = _architecture(source.config), _architecture(model.config)
    diff = {k: (have[k], want[k]) for k in want if have.get(k) != want[k]}
    if diff:
        raise ValueError(f"train.init_from {path}: its architecture differs from the model section "
                         f"(field: (checkpoint, config)): {diff}")
    if source.prefix_encoder is not None:
        raise ValueError(f"train.init_from {path}: a P-tuned model; merge or drop its prefix first")
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    rescale_deepnorm(sd, source.config.deepnorm_alpha, model.config.deepnorm_alpha)
    model.load_state_dict(sd, strict=True)


# -------------------------------------------------------------------------------------------------------- data
def train_dataset(state: State) -> BlankInfillingDataset:
    c, t = state.config, state.config.train
    if not c.data.train:
        raise ValueError("data.train lists no sources")
    rows_done = state.step * t.micro_batch_size * t.grad_accum  # per process: the data position
    return BlankInfillingDataset(
        [Source.parse(s) for s in c.data.train], state.tokenizer, state.special, BlankConfig(**c.data.blank),
        seq_len=c.data.seq_len, max_doc_tokens=c.data.max_doc_tokens, sentence_end_ids=state.sentence_end_ids,
        seed=t.seed, cycle=True, shuffle_buffer=c.data.shuffle_buffer, rank=state.rank, world_size=state.world_size,
        skip_rows=rows_done)


def eval_dataset(state: State) -> BlankInfillingDataset | None:
    c = state.config
    if not c.data.eval:
        return None
    return BlankInfillingDataset(
        [Source.parse(s) for s in c.data.eval], state.tokenizer, state.special, BlankConfig(**c.data.blank),
        seq_len=c.data.seq_len, max_doc_tokens=c.data.max_doc_tokens, sentence_end_ids=state.sentence_end_ids,
        seed=c.eval.seed, cycle=False, max_rows=c.eval.max_rows)  # every process evaluates all rows (FSDP lockstep)


def _batches(rows, size: int, drop_last: bool = True):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield collate_rows(batch)
            batch = []
    if batch and not drop_last:
        yield collate_rows(batch)


# -------------------------------------------------------------------------------------------------------- loop
def _all_reduce_sum(x: torch.Tensor, state: State) -> torch.Tensor:
    if state.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _forward_loss_sum(state: State, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy over Part B targets of a micro-batch.

    Part A has no targets, so the output head runs only on the target positions: a forward pre-hook on
    `lm_head` keeps those rows of its input (about half the tokens; the head is a large share of a small
    model's compute). The logits come back as [1, N_targets, vocab].
    """
    b = {k: v.to(state.device) for k, v in batch.items()}
    keep = b["labels"] != IGNORE_INDEX  # [B, T]
    hook = state.raw_model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0][keep][None],))
    ctx = (torch.autocast(state.device.type, dtype=state.autocast_dtype) if state.autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with ctx:
            logits = state.model(b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"])
    finally:
        hook.remove()
    return F.cross_entropy(logits.float()[0], b["labels"][keep], reduction="sum")


def train_step(state: State, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """One optimizer step over this process's micro-batches; loss normalised by the global loss-token count."""
    t = state.config.train
    state.model.train()
    n_tokens = torch.tensor(float(sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)))
    n_global = _all_reduce_sum(n_tokens.clone(), state).item()
    total = torch.zeros(())
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = _sync_context(state, last)
        with sync:
            loss_sum = _forward_loss_sum(state, mb)
            # DDP/FSDP average gradients over processes; scaling by world_size makes that the global token sum.
            loss = loss_sum * state.world_size / max(n_global, 1.0)
            (state.scaler.scale(loss) if state.scaler else loss).backward()
        total += loss_sum.detach().cpu()
    if state.scaler:
        state.scaler.unscale_(state.optimizer)
    grad_norm = _clip(state, t.grad_clip)
    if state.scaler:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    loss_global = _all_reduce_sum(total.clone(), state).item() / max(n_global, 1.0)
    rows = sum(mb["input_ids"].numel() for mb in micro_batches) * state.world_size
    state.step += 1
    state.tokens_seen += rows
    return {"loss": loss_global, "grad_norm": grad_norm, "loss_tokens": n_global}


def _sync_context(state: State, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    model = state.model
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _clip(state: State, max_norm: float) -> float:
    params = [p for p in state.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def validate(state: State, dataset: BlankInfillingDataset | None) -> float | None:
    """Mean token cross-entropy (nats) on the held-out rows' Part B targets. Every process evaluates the same
    rows (FSDP needs all processes in lockstep), so the value is the same everywhere."""
    if dataset is None:
        return None
    state.model.eval()
    loss_sum, count = torch.zeros(()), torch.zeros(())
    for batch in _batches(dataset, state.config.train.micro_batch_size, drop_last=False):
        loss_sum += _forward_loss_sum(state, batch).cpu()
        count += (batch["labels"] != IGNORE_INDEX).sum()
    state.model.train()
    return (loss_sum / count).item() if count > 0 else None


def fit(state: State, stop_after: int | None = None) -> list[dict[str, float]]:
    """Trains until train.max_steps (or `stop_after` steps from now, to simulate an interruption); returns the
    per-step log. Writes checkpoints, CSV/TensorBoard logs and, at the end, the exported model."""
    t = state.config.train
    out = Path(t.out_dir)
    is_main = state.rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(state.config), indent=2,
                                                             ensure_ascii=False) + "\n", encoding="utf-8")
    writer = _tensorboard(out) if is_main else None
    csv_file = open(out / "log.csv", "a", newline="", encoding="utf-8") if is_main else None
    csv_writer = csv.writer(csv_file) if csv_file else None
    if csv_file and csv_file.tell() == 0:
        csv_writer.writerow(["step", "tokens", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"])
    evalset = eval_dataset(state)
    end = t.max_steps if stop_after is None else min(t.max_steps, state.step + stop_after)
    bar = None
    if is_main and t.progress:
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=state.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    batches = _batches(train_dataset(state), t.micro_batch_size)
    t0, tok0, secs0 = time.perf_counter(), state.tokens_seen, state.train_seconds
    try:
        while state.step < end:
            micro = [next(batches) for _ in range(t.grad_accum)]
            stats = train_step(state, micro)
            elapsed = time.perf_counter() - t0
            state.train_seconds = secs0 + elapsed
            stats.update(step=state.step, lr=state.scheduler.get_last_lr()[0],
                         tokens_per_s=(state.tokens_seen - tok0) / max(elapsed, 1e-9))
            eval_loss = None
            if (state.config.eval.every and state.step % state.config.eval.every == 0) or state.step == t.max_steps:
                eval_loss = validate(state, evalset)
                if eval_loss is not None:
                    stats["eval_loss"] = eval_loss
            state.history.append(stats)
            if is_main:
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:.0f}")
                if state.step % t.log_every == 0 or eval_loss is not None or state.step == end:
                    csv_writer.writerow([state.step, state.tokens_seen, f"{stats['loss']:.5f}",
                                         "" if eval_loss is None else f"{eval_loss:.5f}", f"{stats['lr']:.3e}",
                                         f"{stats['grad_norm']:.4f}", f"{stats['tokens_per_s']:.1f}",
                                         f"{state.train_seconds:.1f}"])
                    csv_file.flush()
                    if writer:
                        writer.add_scalar("train/loss", stats["loss"], state.step)
                        writer.add_scalar("train/lr", stats["lr"], state.step)
                        writer.add_scalar("train/tokens_per_s", stats["tokens_per_s"], state.step)
                        if eval_loss is not None:
                            writer.add_scalar("eval/loss", eval_loss, state.step)
            if (t.save_every and state.step % t.save_every == 0) or state.step == end:
                save_checkpoint(state, out / "checkpoint.pt")
        if state.step == t.max_steps:
            export_model(state, out / "final")
    finally:
        if bar:
            bar.close()
        if csv_file:
            csv_file.close()
        if writer:
            writer.close()
    return state.history


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency, but training must not die without it
        print("glmkit pretrain: tensorboard is not installed (pip install 'glmkit[train]'); logging to CSV only",
              file=sys.stderr)
        return None
    return SummaryWriter(str(out / "tensorboard"))


# -------------------------------------------------------------------------------------------------------- checkpoints
def _full_state_dicts(state: State) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(state.raw_model, state.optimizer, options=opts)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(state: State, path: Path) -> None:
    """Model, optimizer, scheduler, scaler, every process's RNG states and the data position (step), atomically."""
    model_sd, optim_sd = _full_state_dicts(state)  # collective under FSDP: every rank calls it
    rngs = [None] * state.world_size
    if state.world_size > 1:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    if state.rank == 0:
        payload = {"model": model_sd, "optimizer": optim_sd, "scheduler": state.scheduler.state_dict(),
                   "scaler": state.scaler.state_dict() if state.scaler else None, "rng": rngs,
                   "step": state.step, "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
                   "world_size": state.world_size,
                   "config": dataclasses.asdict(state.config), "model_config": state.model_config.to_dict()}
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
    if state.world_size > 1:
        dist.barrier()


def load_checkpoint(state: State, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload["world_size"] != state.world_size:
        # the data position is per process; rows would be split differently
        raise ValueError(f"{path} was written by {payload['world_size']} processes; resume with the same number "
                         f"(now {state.world_size})")
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_state_dict(state.raw_model, state.optimizer, model_state_dict=payload["model"],
                   optim_state_dict=payload["optimizer"], options=opts)
    state.scheduler.load_state_dict(payload["scheduler"])
    if state.scaler and payload["scaler"]:
        state.scaler.load_state_dict(payload["scaler"])
    rng = payload["rng"][state.rank]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state.step, state.tokens_seen = payload["step"], payload["tokens_seen"]
    state.train_seconds = float(payload.get("train_seconds", 0.0))


def export_model(state: State, out_dir: Path) -> None:
    """Writes the model as a THUDM ChatGLM-6B-layout folder (config.json, model.safetensors) with the tokenizer
    files, through glmkit.loading.loader.save_model."""
    model_sd, _ = _full_state_dicts(state)  # collective under FSDP
    if state.rank != 0:
        return
    with torch.device("meta"):  # no second copy of the weights: the gathered tensors are assigned
        model = GLM(state.model_config)
    model.load_state_dict(model_sd, assign=True)
    save_model(model, out_dir, tokenizer=state.tokenizer, dtype=getattr(torch, state.config.train.export_dtype))


# -------------------------------------------------------------------------------------------------------- CLI
def end_torchrun_worker(code: int) -> int:
    """Under torchrun (WORLD_SIZE > 1), once the work is saved and the process group destroyed, end the worker with
    os._exit: interpreter finalization after destroy_process_group can still abort in gloo's C++ teardown
    ("terminate called without an active exception", about 1 run in 10 on the 2-core machine), and torchrun
    then reports a finished job as failed. Returns `code` when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def pretrain(config: PretrainConfig) -> list[dict[str, float]]:
    """`glmkit pretrain`: set up (resuming from out_dir/checkpoint.pt when there is one), train to train.max_steps,
    export out_dir/final; returns the per-step log. Under torchrun every process calls it; the process group is
    torn down once all of them are done."""
    state = setup(config)
    try:
        history = fit(state)
        if dist.is_initialized():
            dist.barrier()  # every rank done before gloo is torn down: a peer leaving early can abort the others
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return history if state.rank == 0 else []


def export_run(config: PretrainConfig, out_dir: str | Path) -> int:
    """Exports the run's latest checkpoint (out_dir/checkpoint.pt) as a model folder; returns its step."""
    ckpt = Path(config.train.out_dir) / "checkpoint.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt} to export")
    state = setup(config)
    export_model(state, Path(out_dir))
    return state.step
