"""The losses of alignment and the reference policy, as TRL defines them (trl/trainer/dpo_trainer.py,
cpo_trainer.py, reward_trainer.py, grpo_trainer.py), written for glmkit's models.

Log-probs (TRL's `selective_log_softmax` over the shifted completion mask): logits[t] scores token t+1; only tokens
whose label is not -100 count (the answer and its end token; glmkit.training.data.preference builds the labels), and
a sequence's log-prob is their SUM. Padding and prompt tokens contribute nothing.

DPO family (`pref_loss`), with Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)) on summed log-probs:
  sigmoid  -(1 - ε) log σ(βΔ) - ε log σ(-βΔ)          (DPO; ε = label_smoothing, the conservative cDPO variant)
  ipo      (Δ' - 1/(2β))²  where Δ' uses per-token AVERAGE log-ratios (TRL normalises IPO by answer length)
  simpo    -(1 - ε) log σ(β (a_w - a_l) - γ)           a = AVERAGE log-prob per answer token, no reference
           (TRL CPOTrainer loss_type="simpo" with cpo_alpha = 0: logits = a_w - a_l - γ/β, loss on β·logits)
  + rpo_alpha · NLL   (optional, TRL's rpo_alpha: the chosen answers' per-token NLL over the batch, which keeps
           their likelihood from falling while the margin grows)
  rewards/chosen = β (log π(y_w) - log π_ref(y_w)) (simpo: β a_w), rewards/rejected likewise, margins = their
  difference, accuracies = share of pairs with chosen reward > rejected reward.
Reward model (Bradley-Terry, TRL RewardTrainer): -log σ(r_w - r_l - margin), mean over pairs.
GRPO (TRL GRPOTrainer, DeepSeekMath's GRPO):
  advantages  A_i = (r_i - mean(group)) / (std(group) + 1e-4), std with Bessel's correction; scale_rewards "group"
              (TRL's default), "batch" (one std over the batch) or "none" (no division)
  per token   ratio ρ = exp(log π - log π_old), loss_t = -min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A) + β KL_t,
              KL_t = exp(log π_ref - log π) - (log π_ref - log π) - 1   (the k3 estimator, ≥ 0)
  aggregation loss_type "dapo" (TRL's default): Σ over all completion tokens of the batch / their number;
              "grpo": per-sequence token mean, then mean over sequences; "bnpo": Σ / Σ mask of the micro-batch;
              "dr_grpo": Σ / (B · max_completion_length).
  With one optimisation step per generation (TRL's num_iterations = 1) π_old = π detached, so ρ = 1 but its
  gradient is the policy gradient; clip_ratio counts tokens clipped on the side that matters (TRL's region).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.training.data.finetune import IGNORE_INDEX

PREF_LOSSES = ("sigmoid", "ipo", "simpo")
GRPO_LOSSES = ("dapo", "grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


# ------------------------------------------------------------------------------------------------------ log-probs
@contextlib.contextmanager
def _hidden_states_only(model: nn.Module):
    """Makes the model return final hidden states instead of logits (lm_head -> Identity) inside the block."""
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


@contextlib.contextmanager
def _head_on_rows(raw_model: nn.Module, keep: torch.Tensor):
    """The output layer runs only where `keep` [B, T] is true (a forward pre-hook, so DDP/FSDP wrappers still see
    the whole forward): the model returns logits [1, N, vocab]."""
    hook = raw_model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0][keep][None],))
    try:
        yield
    finally:
        hook.remove()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, select_positions: bool = True,
                raw_model: nn.Module | None = None, **layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, T-1], mask [B, T-1]): log p(labels[:, t+1] | tokens ≤ t) where labels[:, t+1] != -100, else 0.

    select_positions: run the output layer only where there is a label (same numbers, less memory: the vocabulary
    is large). raw_model: the module under a DDP/FSDP `model` (found for DDP)."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    if select_positions:
        rows = F.pad(mask, (0, 1), value=False)  # position t predicts labels[t+1]; the last predicts nothing
        with _head_on_rows(raw_model if raw_model is not None else _unwrap(model), rows):
            logits = model(input_ids, **layout)[0].float()  # (N, vocab)
    else:
        logits = model(input_ids, **layout)[:, :-1][mask].float()
    picked = -F.cross_entropy(logits, target[mask], reduction="none")  # log-softmax at the label, (N,)
    out = torch.zeros(target.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    return out, mask


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], select_positions: bool = True,
                   raw_model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-prob [B], answer token count [B]) of a collated batch (collate_train's keys)."""
    layout = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    logps, mask = token_logps(model, batch["input_ids"], batch["labels"], select_positions, raw_model, **layout)
    return logps.sum(-1), mask.sum(-1)


# ------------------------------------------------------------------------------------------------------ DPO family
def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
                    chosen_len: torch.Tensor, rejected_len: torch.Tensor, *, loss_type: str = "sigmoid",
                    beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses [B], chosen rewards [B], rejected rewards [B]) from SUMMED answer log-probs and answer
    lengths (token counts); see the module docstring for each loss. The references are unused by simpo."""
    if loss_type not in PREF_LOSSES:
        raise ValueError(f"--pref_loss must be one of {', '.join(PREF_LOSSES)}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"--beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_len, rejected_len = chosen_len.clamp(min=1).float(), rejected_len.clamp(min=1).float()
    if loss_type == "simpo":
        avg_w, avg_l = chosen_logps / chosen_len, rejected_logps / rejected_len
        logits = (avg_w - avg_l) - simpo_gamma / beta
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
        return losses, beta * avg_w.detach(), beta * avg_l.detach()
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"--pref_loss {loss_type} needs the reference log-probs")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        delta = chosen_ratio - rejected_ratio
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    else:  # ipo, on per-token average log-ratios
        delta = chosen_ratio / chosen_len - rejected_ratio / rejected_len
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def rpo_nll(chosen_logps: torch.Tensor, chosen_len: torch.Tensor) -> torch.Tensor:
    """RPO's term (TRL rpo_alpha): the chosen answers' negative log-likelihood per token over the batch,
    -Σ log π(y_w) / Σ |y_w|; the stage adds rpo_alpha times it to every pair's loss."""
    return -chosen_logps.sum() / chosen_len.sum().clamp(min=1)


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                       rejected_logps: torch.Tensor) -> dict[str, float]:
    """TRL's DPO logs: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected} (batch means)."""
    return {"rewards/chosen": float(chosen_rewards.mean()), "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
            "logps/chosen": float(chosen_logps.detach().mean()),
            "logps/rejected": float(rejected_logps.detach().mean())}


# ------------------------------------------------------------------------------------------------------ reward model
def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Bradley-Terry pairwise loss, mean over pairs: -log σ(r_w - r_l [- margin])."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


# ------------------------------------------------------------------------------------------------------ GRPO
def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """Rewards [N·G] (each prompt's G completions next to each other) -> advantages [N·G]."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"--scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 completions per prompt (--num_generations), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)  # Bessel-corrected, as TRL's nanstd
    elif scale_rewards == "batch":
        std = rewards.float().std().expand_as(advantages)
    else:
        return advantages
    return advantages / (std + 1e-4)


def grpo_per_token(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                   advantages: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.04, epsilon_low: float = 0.2,
                   epsilon_high: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(per-token losses [B, T], metrics {kl, clip_ratio} as means over the masked tokens); see the module doc."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)
    adv = advantages.float().unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("a KL penalty (beta != 0) needs the reference log-probs")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    n_tokens = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        clipped = (((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))).float()
        metrics = {"clip_ratio": float((clipped * mask).sum() / n_tokens)}
        if kl is not None:
            metrics["kl"] = float((kl * mask).sum() / n_tokens)
    return per_token, metrics


def grpo_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
             max_completion_length: int | None = None) -> tuple[torch.Tensor, int]:
    """(Σ loss over the loss units, units) of one micro-batch, so that Σ / units summed the training loop's way
    is loss_type's aggregation: dapo = tokens, normalised over the whole step; bnpo = tokens, per micro-batch;
    grpo = sequences (each its token mean); dr_grpo = sequences, each its token sum / max_completion_length."""
    if loss_type not in GRPO_LOSSES:
        raise ValueError(f"--grpo_loss_type must be one of {', '.join(GRPO_LOSSES)}, got {loss_type!r}")
    mask = mask.float()
    if loss_type in ("dapo", "bnpo"):
        return (per_token * mask).sum(), int(mask.sum())
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), per_token.shape[0]
    return (per_token * mask).sum() / (max_completion_length or per_token.shape[1]), per_token.shape[0]


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.04, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              num_items: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics {kl, clip_ratio}) of one micro-batch: per-token log-probs [B, T] under the completion mask.

    num_items: for "dapo", the completion tokens of the whole optimiser step (all micro-batches and processes);
    default: this micro-batch's. max_completion_length: "dr_grpo"'s constant (default: T)."""
    per_token, metrics = grpo_per_token(logps, old_logps, ref_logps, advantages, mask, beta=beta,
                                        epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    total, units = grpo_sum(per_token, mask, loss_type, max_completion_length)
    if loss_type == "dapo" and num_items is not None:
        units = num_items
    return total / max(float(units), 1.0), metrics


# ------------------------------------------------------------------------------------------------------ reference
def disable_dropout(model: nn.Module) -> None:
    """Sets every dropout to p = 0 (TRL's disable_dropout): the policy and its reference then score a sequence
    identically at the start, and log-prob ratios measure training, not noise."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class Reference:
    """The frozen starting policy, from the policy's own weights where the policy trains an adapter.

    - a new LoRA adapter: the adapter layers switched off (PEFT's `disable_adapter()`, without its side effect of
      changing requires_grad), i.e. the base model;
    - a new P-tuning prefix: the prefix switched off (the base model);
    - a LoRA or P-tuning adapter loaded to continue from (`--adapter`, e.g. the SFT stage's checkpoint): the
      adapter's starting tensors swapped in for the duration (TRL keeps such a start as a second, "ref" adapter);
    - full fine-tuning: a frozen copy of the starting model (there are no other weights to borrow).
    Use `with reference(): ...` around a no-grad forward."""

    def __init__(self, model: nn.Module, method: str, adapter_loaded: bool) -> None:
        self.model, self.method = model, method
        self.copy: nn.Module | None = None
        self.start: dict[str, torch.Tensor] = {}
        if method == "full":
            self.copy = copy.deepcopy(model).eval()
            self.copy.requires_grad_(False)
        elif adapter_loaded:
            self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def __call__(self) -> Iterator[nn.Module]:
        """Yields the module to run for reference log-probs (the policy itself, changed until the block ends)."""
        if self.copy is not None:
            yield self.copy
            return
        if self.start:
            params = dict(self.model.named_parameters())
            now = {n: params[n].data for n in self.start}
            for n, t in self.start.items():
                params[n].data = t
            try:
                yield self.model
            finally:
                for n, t in now.items():
                    params[n].data = t
            return
        if self.method == "lora":
            layers = _lora_layers(self.model)
            saved = [m._disable_adapters for m in layers]
            for m in layers:
                m._disable_adapters = True
            try:
                yield self.model
            finally:
                for m, s in zip(layers, saved):
                    m._disable_adapters = s
            return
        prefix = self.model.prefix_encoder
        self.model.prefix_encoder = None
        try:
            yield self.model
        finally:
            self.model.prefix_encoder = prefix


