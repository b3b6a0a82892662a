"""`glmkit finetune --stage rm|dpo|grpo`: the alignment stages (glmkit.training.stages) set up on the training
backbone (glmkit.training.trainer.fit) with fine-tuning's optimizer, schedule, checkpoints and resume
(glmkit.training.finetune_loop / finetune_checkpoint), then evaluated.

Called by glmkit.training.finetune.finetune with the model already loaded as the method says (the base, plus
--adapter / --ptuning_checkpoint, plus fresh trainable parts; or the checkpoint's adapter for a resumed run).
The starting point (base + --adapter) is the reference where a stage needs one (Reference). Checkpoints are the
method's usual checkpoint-N folders (an adapter loads with glmkit.load_model(base, adapter=...)); a reward model's
also hold reward_head.safetensors and reward_config.json (glmkit.training.reward.load_reward_model).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.loading.loader import load_model
from glmkit.training.alignment import Reference, disable_dropout, preference_loss, reward_loss
from glmkit.training.data.finetune import Lengths, SpecialTokens, read_rows
from glmkit.training.data.preference import PreferenceColumns, build_pairs, build_prompts
from glmkit.training.finetune_args import FinetuneArgs, stage_prompt_column
from glmkit.training.finetune_checkpoint import METHODS, TrainerState, save_checkpoint
from glmkit.training.finetune_loop import MicroBatches, start_state
from glmkit.training.reward import (
    RewardModel,
    load_reward_head,
    load_reward_model,
    rewards_of,
    save_reward_model,
)
from glmkit.training.pairs import build_preference_pairs, write_pairs
from glmkit.training.rewards import load_reward_function
from glmkit.training.stages import (
    GRPOStage,
    PreferenceStage,
    RewardStage,
    collate_pairs,
    reward_metrics,
    reward_model_function,
)
from glmkit.training.trainer import (
    Logger,
    LoopConfig,
    TensorBoardLogger,
    TrainState,
    fit,
    log_line,
    trainable_parameters,
    wrap_model,
)

DEFAULT_BETA = {"dpo": 0.1, "grpo": 0.04}


def columns_of(args: FinetuneArgs) -> PreferenceColumns:
    return PreferenceColumns(stage_prompt_column(args), args.chosen_column, args.rejected_column)


def lengths_of(args: FinetuneArgs, target: int | None = None) -> Lengths:
    return Lengths(args.max_source_length, target or args.max_target_length, args.source_prefix,
                   args.ignore_pad_token_for_loss)


def beta_of(args: FinetuneArgs) -> float:
    return args.beta if args.beta is not None else DEFAULT_BETA.get(args.stage, 0.1)


# ------------------------------------------------------------------------------------------------------ reference
def start_reference(model: nn.Module, args: FinetuneArgs, method: str) -> Reference:
    """The frozen starting policy. A resumed run's model holds the checkpoint's adapter, so the start (--adapter,
    or the base for a new adapter) is rebuilt: the start adapter's tensors are read from a second load of it."""
    start = args.adapter or args.ptuning_checkpoint
    if not args.resume_from_checkpoint:
        return Reference(model, method, adapter_loaded=bool(start))
    if method == "full":
        raise ValueError("resuming a full-fine-tuning dpo/grpo run would take the checkpoint as the reference; "
                         "start the stage again from the checkpoint (--model_name_or_path) instead")
    ref = Reference(model, method, adapter_loaded=False)
    if start:
        quantize = {4: "int4", 8: "int8"}.get(args.quantization_bit) if args.quantization_bit else None
        first = load_model(args.model_name_or_path, dtype=args.dtype, quantize=quantize, adapter=start)
        theirs = dict(first.named_parameters())
        device = next(model.parameters()).device
        ref.start = {n: theirs[n].detach().to(device=device, dtype=p.dtype).clone()
                     for n, p in model.named_parameters() if p.requires_grad}
        del first
    return ref


# ------------------------------------------------------------------------------------------------------ logging
class StageLogger(Logger):
    """HF Trainer's log with the stage's metrics: on each log step, the means since the last one of the loss and of
    every stage metric (rewards/chosen, rewards/margins, logps/..., reward, kl, clip_ratio, ...), with the
    learning rate and epoch, appended to trainer_state.log_history and printed as a JSON line."""

    SKIP = ("step", "lr", "tokens", "tokens_per_s", "elapsed_s", "units", "grad_norm")

    def __init__(self, trainer_state: TrainerState, order: MicroBatches, grad_accum: int) -> None:
        self.trainer_state, self.order, self.grad_accum = trainer_state, order, grad_accum
        self.sums: dict[str, float] = {}
        self.steps = 0

    def step(self, state, stats, log):
        ts = self.trainer_state
        ts.global_step = state.step
        ts.epoch = self.order.epoch_of(state.step * self.grad_accum)
        for k, v in stats.items():
            if k not in self.SKIP and isinstance(v, (int, float)) and not k.startswith("eval_"):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.steps += 1
        if not log:
            return
        entry = {k: round(v / self.steps, 4) for k, v in self.sums.items()}
        if state.world_size > 1:  # means over processes, as HF Trainer gathers them
            import torch.distributed as dist

            t = torch.tensor(list(entry.values()), dtype=torch.float64)
            dist.all_reduce(t)
            entry = {k: round(float(v) / state.world_size, 4) for k, v in zip(entry, t)}
        entry.update(learning_rate=stats["lr"], epoch=round(ts.epoch, 4), step=state.step)
        ts.log_history.append(entry)
        log_line(json.dumps(entry), state.rank)
        self.sums, self.steps = {}, 0


# ------------------------------------------------------------------------------------------------------ training
def run_alignment(model: nn.Module, tokenizer, args: FinetuneArgs, method: str, device: torch.device, rank: int = 0,
                  world: int = 1) -> tuple[nn.Module, dict[str, Any], Reference | None]:
    """Trains --stage on --train_file; returns (the module to evaluate: the policy, or the RewardModel for rm;
    train metrics; the reference, where the stage has one)."""
    stage_name = args.stage
    out = Path(args.output_dir)
    columns, lengths = columns_of(args), lengths_of(args)
    rows = read_rows(args.train_file, args.max_train_samples)
    disable_dropout(model)  # TRL's disable_dropout: policy and reference agree at the start
    pad_id = SpecialTokens.from_tokenizer(tokenizer).pad
    accum = args.gradient_accumulation_steps
    base = args.model_name_or_path

    if stage_name in ("rm", "dpo"):
        data = build_pairs(tokenizer, rows, columns, lengths, source=args.train_file)
    else:
        data = build_prompts(tokenizer, rows, columns, lengths, source=args.train_file)
    order = MicroBatches(len(data), args.per_device_train_batch_size, args.seed, rank, world)

    body = model
    normalize = "micro"
    reference = None
    if stage_name == "rm":
        if method == "full" and world > 1:
            raise ValueError("--stage rm with --method full trains on one process (FSDP shards the body only); "
                             "use LoRA or P-tuning under torchrun")
        model = RewardModel(body)
        if args.resume_from_checkpoint:
            load_reward_head(model, args.resume_from_checkpoint)
        stage = RewardStage(data, order, pad_id, accum)
    elif stage_name == "dpo":
        reference = start_reference(body, args, method) if args.pref_loss != "simpo" else None
        stage = PreferenceStage(data, order, pad_id, accum, reference, loss_type=args.pref_loss, beta=beta_of(args),
                                label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma,
                                rpo_alpha=args.rpo_alpha)
    else:
        beta = beta_of(args)
        reference = start_reference(body, args, method) if beta != 0.0 else None
        if args.reward_model:
            rm, rm_tok = load_reward_model(args.reward_model, device=str(device))
            reward_fn = reward_model_function(rm, rm_tok, args.max_source_length, args.max_target_length)
        else:
            reward_fn = load_reward_function(args.reward_function)
        stage = GRPOStage(data, order, tokenizer, accum, reference, reward_fn, num_generations=args.num_generations,
                          max_new_tokens=args.max_target_length, temperature=args.sample_temperature,
                          top_p=args.sample_top_p, top_k=args.sample_top_k, beta=beta, epsilon=args.epsilon,
                          epsilon_high=args.epsilon_high, loss_type=args.grpo_loss_type,
                          scale_rewards=args.scale_rewards, seed=args.seed)
        normalize = "global" if args.grpo_loss_type == "dapo" else "micro"  # dapo: Σ / the step's tokens

    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("no trainable parameters: nothing to train")
    wrapped = wrap_model(model, "ddp" if stage_name == "rm" else METHODS[method].distributed, device, world)
    if wrapped is model and world > 1:
        params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them with sharded ones
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay)
    kind = f"{stage_name}-{method}"
    # raw_model is the GLM body: the output-layer hook and the method's checkpoint (adapter or model) are its
    state, trainer_state, total = start_state(args, wrapped, body, optimizer, order.per_epoch, device, rank, world,
                                              kind)

    n_trainable = sum(p.numel() for p in params)
    unit = {"rm": "pairs", "dpo": "pairs", "grpo": f"prompts x {args.num_generations} answers"}[stage_name]
    log_line(f"***** Running {stage_name} ({method}) *****\n  {unit}: {len(data)}, steps = {total}, batch = "
             f"{args.per_device_train_batch_size} x accumulation {accum} x processes {world}\n"
             f"  trainable parameters = {n_trainable:,}", rank)
    loop = LoopConfig(max_steps=total, grad_accum=accum,
                      grad_clip=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else 0.0,
                      normalize=normalize, log_every=args.logging_steps, save_every=args.save_steps,
                      progress=not args.disable_tqdm, desc=f"{stage_name} {method}")

    def save(s: TrainState) -> None:
        ckpt = out / f"checkpoint-{s.step}"
        trainer_state.method = kind
        save_checkpoint(ckpt, s, trainer_state, method, tokenizer, base)
        if stage_name == "rm" and s.is_main:
            save_reward_model(model, ckpt, method, base, tokenizer=tokenizer, body_saved=True)

    t0 = time.perf_counter()
    history = fit(state, stage, loop, save=save,
                  loggers=[StageLogger(trainer_state, order, accum), TensorBoardLogger(state, out / "tensorboard",
                                                                                      "glmkit finetune")])
    wrapped.eval()
    runtime = time.perf_counter() - t0
    metrics = {"train_loss": round(sum(h["loss"] for h in history) / max(1, len(history)), 4),
               "train_runtime": round(runtime, 2), "train_samples": len(data),
               "train_steps_per_second": round(len(history) / max(runtime, 1e-9), 3), "global_step": state.step,
               "epoch": round(trainer_state.epoch, 4)}
    return model, metrics, reference


# ------------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate_pairs(model: nn.Module, tokenizer, args: FinetuneArgs, device: torch.device, prefix: str = "eval",
                   reference: Reference | None = None) -> dict[str, Any]:
    """Held-out pairs (--validation_file): for a RewardModel, pairwise accuracy (chosen scored above rejected) and
    the Bradley-Terry loss; for a policy (dpo), the DPO loss and TRL's reward metrics against `reference`."""
    rows = read_rows(args.validation_file, args.max_eval_samples)
    pairs = build_pairs(tokenizer, rows, columns_of(args), lengths_of(args), source=args.validation_file)
    pad_id = SpecialTokens.from_tokenizer(tokenizer).pad
    model.eval()
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    bs = args.per_device_eval_batch_size
    for b in range(0, len(pairs), bs):
        chunk = pairs[b:b + bs]
        B = len(chunk)
        if isinstance(model, RewardModel):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in collate_pairs(chunk, pad_id, reward=True).items()}
            r = rewards_of(model, batch)
            found = {"loss": float(reward_loss(r[:B], r[B:])), **reward_metrics(r[:B], r[B:])}
        else:
            from glmkit.training.alignment import preference_metrics, sequence_logps

            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in collate_pairs(chunk, pad_id).items()}
            seq, n = sequence_logps(model, batch)
            ref = None
            if args.pref_loss != "simpo":
                with reference() as ref_model:
                    ref = sequence_logps(ref_model, batch)[0]
            losses, cr, rr = preference_loss(seq[:B], seq[B:], None if ref is None else ref[:B],
                                             None if ref is None else ref[B:], n[:B], n[B:],
                                             loss_type=args.pref_loss, beta=beta_of(args),
                                             label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma)
            found = {"loss": float(losses.mean()), **preference_metrics(cr, rr, seq[:B], seq[B:])}
        for k, v in found.items():
            sums[k] = sums.get(k, 0.0) + v * B
    runtime = time.perf_counter() - t0
    out = {f"{prefix}_{k.replace('/', '_')}": round(v / len(pairs), 4) for k, v in sums.items()}
    out.update({f"{prefix}_runtime": round(runtime, 4), f"{prefix}_samples": len(pairs),
                f"{prefix}_samples_per_second": round(len(pairs) / max(runtime, 1e-9), 3)})
    return out


def predict_args(args: FinetuneArgs) -> FinetuneArgs:
    """The arguments generation runs with after an alignment stage: the prompt column and the chosen answer as the
    reference text (ROUGE/BLEU against it)."""
    return dataclasses.replace(args, prompt_column=stage_prompt_column(args), response_column=args.chosen_column,
                               history_column=None)


def run_pairs(model: nn.Module, tokenizer, args: FinetuneArgs, device: torch.device) -> dict[str, Any]:
    """--stage pairs: --num_generations answers per --train_file prompt from the model (+ --adapter), sampled at
    --sample_temperature/--sample_top_p/--sample_top_k, scored by the reward, best vs worst written to
    OUTPUT_DIR/pairs.json (TRL's format, for --stage dpo)."""
    rows = read_rows(args.train_file, args.max_train_samples)
    prompts = build_prompts(tokenizer, rows, columns_of(args), lengths_of(args), source=args.train_file)
    if args.reward_model:
        rm, rm_tok = load_reward_model(args.reward_model, device=str(device))
        reward_fn = reward_model_function(rm, rm_tok, args.max_source_length, args.max_target_length)
    else:
        reward_fn = load_reward_function(args.reward_function)
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not args.disable_tqdm:
            log_line(f"pairs: {done}/{total} prompts sampled ({time.perf_counter() - t0:.0f}s)")

    pairs, stats = build_preference_pairs(
        model, tokenizer, prompts, reward_fn, args.num_generations, max_new_tokens=args.max_target_length,
        temperature=args.sample_temperature, top_p=args.sample_top_p, top_k=args.sample_top_k,
        batch_size=args.per_device_train_batch_size, seed=args.seed, progress=progress)
    path = write_pairs(pairs, Path(args.output_dir) / "pairs.json")
    log_line(f"wrote {len(pairs)} pairs from {len(prompts)} prompts to {path}")
    return {f"pairs_{k}": round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
