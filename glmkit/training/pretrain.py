"""`glmkit pretrain`: GLM blank-infilling pretraining, a stage of the training backbone (glmkit.training.trainer).

    glmkit pretrain --config configs/glm-tiny.yaml train.max_steps=2000 train.out_dir=out/tiny
    torchrun --nproc_per_node 2 -m glmkit.commands.pretrain --config CONFIG.yaml train.distributed=fsdp

The stage is the data (packed blank-infilling rows) and the loss (Part B cross-entropy); the backbone's loop does
the rest: AdamW, linear warmup + cosine decay, gradient clipping, bf16 autocast on CPU
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

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glmkit.core import options
from glmkit.core.atomic import torch_save, write_json
from glmkit.core.checkpoint import CheckpointError
from glmkit.core.config import GLMConfig
from glmkit.core.model import GLM
from glmkit.core.tokenizer import load_tokenizer
from glmkit.distributed.launch import init_process_group
from glmkit.loading.loader import load_model, save_model
from glmkit.training.data.blank import (
    IGNORE_INDEX,
    BlankConfig,
    SpecialIds,
    collate_rows,
    sentence_end_ids_from_tokenizer,
)
from glmkit.training.data.corpus import BlankInfillingDataset, Source
from glmkit.training.trainer import (
    CSVLogger,
    LoopConfig,
    Stage,
    TensorBoardLogger,
    TrainState,
    autocast,
    full_state_dicts,
    gather_rng_states,
    head_on_rows,
    load_full_state_dicts,
    meta_shell,
    pick_device,
    precision,
    set_rng_state,
    wrap_model,
)
from glmkit.training.trainer import fit as train_loop


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
    """a preset name (`preset: chatglm-6b`) plus GLMConfig fields that override it; vocab and ids come from the
    tokenizer"""
    tokenizer: str = ""
    """tokenizer folder"""
    data: DataArgs = field(default_factory=DataArgs)
    """training and held-out corpora"""
    train: TrainArgs = field(default_factory=TrainArgs)
    """the optimisation and its outputs"""
    eval: EvalArgs = field(default_factory=EvalArgs)
    """held-out evaluation"""


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Reads a YAML config and applies `section.key=value` overrides (values parsed as YAML)."""
    return options.load(PretrainConfig, path, overrides)


def config_from_dict(raw: dict[str, Any]) -> PretrainConfig:
    """A PretrainConfig from a mapping of sections, each value converted to its field's type."""
    return options.from_dict(PretrainConfig, raw)


# -------------------------------------------------------------------------------------------------------- state
@dataclass(kw_only=True)
class State(TrainState):
    """The backbone's TrainState plus what pretraining builds its data and exports from."""

    config: PretrainConfig
    model_config: GLMConfig
    tokenizer: Any
    special: SpecialIds
    sentence_end_ids: frozenset[int]


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
    if t.distributed not in ("none", "ddp", "fsdp"):
        raise ValueError(f"train.distributed must be none, ddp or fsdp, got {t.distributed!r}")
    rank, world = init_process_group("cpu" if t.device == "cpu" else None)
    if world > 1 and t.distributed == "none":
        raise ValueError(f"{world} processes but train.distributed is 'none'; set train.distributed=ddp or fsdp")
    device = pick_device(t.device, rank)
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
    model = wrap_model(raw, t.distributed, device, world)

    decay = [p for n, p in raw.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in raw.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=t.betas, eps=t.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
    amp_dtype, scaler = precision(t.precision, device)

    vocab = _vocab_size(tokenizer)
    state = State(model=model, raw_model=raw, optimizer=optimizer, scheduler=scheduler, device=device,
                  autocast_dtype=amp_dtype, scaler=scaler, rank=rank, world_size=world, config=config,
                  model_config=mcfg, tokenizer=tokenizer, special=special,
                  sentence_end_ids=sentence_end_ids_from_tokenizer(tokenizer, vocab))
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


# -------------------------------------------------------------------------------------------------------- the stage
def blank_infilling_loss(state: TrainState, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy over the Part B targets of a micro-batch. Part A has no targets, so the output
    head runs only on the target positions (trainer.head_on_rows: about half the tokens)."""
    b = {k: v.to(state.device) for k, v in batch.items()}
    keep = b["labels"] != IGNORE_INDEX  # [B, T]
    with head_on_rows(state.raw_model, keep):
        logits = state.model(b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"])
    return F.cross_entropy(logits.float()[0], b["labels"][keep], reduction="sum")


class BlankInfillingStage(Stage):
    """Pretraining as a backbone stage: packed blank-infilling rows (training/data/corpus.py) and the summed Part B
    cross-entropy, normalised over the global batch's target tokens."""

    def __init__(self, state: State) -> None:
        self.evalset = eval_dataset(state)

    def batches(self, state: State):
        return _batches(train_dataset(state), state.config.train.micro_batch_size)

    def loss(self, state, batch):
        return blank_infilling_loss(state, batch), {}

    def evaluate(self, state: State) -> dict[str, float]:
        loss = validate(state, self.evalset)
        return {} if loss is None else {"eval_loss": loss}


@torch.no_grad()
def validate(state: State, dataset: BlankInfillingDataset | None) -> float | None:
    """Mean token cross-entropy (nats) on the held-out rows' Part B targets. Every process evaluates the same
    rows (FSDP needs all processes in lockstep), so the value is the same everywhere."""
    if dataset is None:
        return None
    state.model.eval()
    loss_sum, count = torch.zeros(()), torch.zeros(())
    for batch in _batches(dataset, state.config.train.micro_batch_size, drop_last=False):
        with autocast(state.device, state.autocast_dtype):
            loss_sum += blank_infilling_loss(state, batch).cpu()
        count += (batch["labels"] != IGNORE_INDEX).sum()
    state.model.train()
    return (loss_sum / count).item() if count > 0 else None


CSV_COLUMNS = (("step", ""), ("tokens", ""), ("loss", ".5f"), ("eval_loss", ".5f"), ("lr", ".3e"),
               ("grad_norm", ".4f"), ("tokens_per_s", ".1f"), ("elapsed_s", ".1f"))


def loop_config(t: TrainArgs, e: EvalArgs) -> LoopConfig:
    return LoopConfig(max_steps=t.max_steps, grad_accum=t.grad_accum, grad_clip=t.grad_clip, normalize="global",
                      log_every=t.log_every, eval_every=e.every, save_every=t.save_every, progress=t.progress,
                      desc="pretrain")


def fit(state: State, stop_after: int | None = None) -> list[dict[str, float]]:
    """Trains until train.max_steps (or `stop_after` steps from now, to simulate an interruption); returns the
    per-step log. Writes checkpoints, CSV/TensorBoard logs and, at the end, the exported model."""
    t = state.config.train
    out = Path(t.out_dir)
    if state.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "pretrain_config.json", dataclasses.asdict(state.config))
    loggers = [CSVLogger(state, out / "log.csv", CSV_COLUMNS), TensorBoardLogger(state, out / "tensorboard",
                                                                                 "glmkit pretrain")]
    history = train_loop(state, BlankInfillingStage(state), loop_config(t, state.config.eval),
                         save=lambda s: save_checkpoint(s, out / "checkpoint.pt"), loggers=loggers,
                         stop_after=stop_after)
    if state.step == t.max_steps:
        export_model(state, out / "final")
    return history


# -------------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(state: State, path: Path) -> None:
    """Model, optimizer, scheduler, scaler, every process's RNG states and the data position (step), atomically."""
    model_sd, optim_sd = full_state_dicts(state.raw_model, state.optimizer)  # collective under FSDP
    rngs = gather_rng_states(state)
    if state.is_main:
        payload = {"model": model_sd, "optimizer": optim_sd, "scheduler": state.scheduler.state_dict(),
                   "scaler": state.scaler.state_dict() if state.scaler else None, "rng": rngs,
                   "step": state.step, "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
                   "world_size": state.world_size,
                   "config": dataclasses.asdict(state.config), "model_config": state.model_config.to_dict()}
        torch_save(payload, path)  # temporary sibling, fsync, rename: the previous checkpoint until this one is whole
    if state.world_size > 1:
        dist.barrier()


def load_checkpoint(state: State, path: Path) -> None:
    try:  # weights_only: a crafted pickle runs no code
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if payload["world_size"] != state.world_size:
        # the data position is per process; rows would be split differently
        raise ValueError(f"{path} was written by {payload['world_size']} processes; resume with the same number "
                         f"(now {state.world_size})")
    load_full_state_dicts(state.raw_model, state.optimizer, payload["model"], payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    if state.scaler and payload["scaler"]:
        state.scaler.load_state_dict(payload["scaler"])
    set_rng_state(payload["rng"][state.rank])
    state.step, state.tokens_seen = payload["step"], payload["tokens_seen"]
    state.train_seconds = float(payload.get("train_seconds", 0.0))


def export_model(state: State, out_dir: Path) -> None:
    """Writes the model as a THUDM ChatGLM-6B-layout folder (config.json, model.safetensors) with the tokenizer
    files, through glmkit.loading.loader.save_model."""
    model_sd, _ = full_state_dicts(state.raw_model, state.optimizer)  # collective under FSDP
    if not state.is_main:
        return
    model = meta_shell(GLM, state.model_config, model_sd)
    save_model(model, out_dir, tokenizer=state.tokenizer, dtype=getattr(torch, state.config.train.export_dtype))


# -------------------------------------------------------------------------------------------------------- CLI
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
