"""The alignment stages of `glmkit finetune --stage rm|dpo|grpo` as training stages: each is the data and the loss
(`batches(state)` yields micro-batches from `state.step` on, `loss(state, batch)` returns the summed loss over the
batch's loss units with metrics to log, `units(batch)` counts those units); the fine-tuning loop owns the rest
(optimizer, schedule, accumulation, clipping, checkpoints, resume, logging): glmkit.training.trainer.fit.

- RewardStage (`rm`): pairs; units = pairs; loss = Bradley-Terry on a RewardModel's last-token scores.
- PreferenceStage (`dpo`): pairs, chosen and rejected in one forward (TRL's concatenated forward); units = pairs;
  loss = --pref_loss on summed answer log-probs, the reference's from `Reference` (the policy's own weights).
- GRPOStage (`grpo`): each micro-batch is a rollout: --num_generations answers per prompt sampled with
  glmkit.core.generate (KV cache, --sample_temperature/--sample_top_p/--sample_top_k), scored by the reward
  (a function or a reward model), group-normalised advantages, reference log-probs; units per --grpo_loss_type
  (glmkit.training.alignment.grpo_sum).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from glmkit.core.blank import BlankInfillingView, blank_rows
from glmkit.core.generate import generate
from glmkit.training.alignment import (
    Reference,
    group_advantages,
    grpo_per_token,
    grpo_sum,
    preference_loss,
    preference_metrics,
    reward_loss,
    rpo_nll,
    sequence_logps,
    token_logps,
)
from glmkit.training.data.finetune import IGNORE_INDEX, SpecialTokens, collate_prompts, collate_train, decode_text
from glmkit.training.data.preference import PairExample, completion_example
from glmkit.training.reward import RewardModel, reward_batch
from glmkit.training.trainer import Stage

_LAYOUT = ("position_ids", "attention_mask")


def _to(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _layout(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in _LAYOUT if k in batch}


def collate_pairs(pairs: Sequence[PairExample], pad_id: int, reward: bool = False) -> dict[str, Any]:
    """One batch of 2B rows: the B chosen answers, then the B rejected ones (right-padded); "pairs" = B.
    reward=True: RewardModel's batch (last_index instead of labels)."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = reward_batch(rows, pad_id) if reward else collate_train(rows, pad_id)
    batch["pairs"] = len(pairs)
    return batch


class _PairData(Stage):
    def __init__(self, pairs: list[PairExample], order, pad_id: int, grad_accum: int) -> None:
        self.pairs, self.order, self.pad_id, self.grad_accum = pairs, order, pad_id, grad_accum

    reward = False

    def batches(self, state) -> Iterator[dict[str, Any]]:
        m = state.step * self.grad_accum
        while True:
            yield collate_pairs([self.pairs[i] for i in self.order.indices(m)], self.pad_id, self.reward)
            m += 1

    def units(self, batch) -> int:
        return batch["pairs"]

    def tokens(self, batch) -> int:
        return int((batch["input_ids"] != self.pad_id).sum())


class RewardStage(_PairData):
    """Bradley-Terry reward-model training; `state.model` runs a RewardModel."""

    reward = True

    def loss(self, state, batch):
        batch = _to(batch, state.device)
        B = batch["pairs"]
        rewards = state.model(batch["input_ids"], batch["last_index"], **_layout(batch))
        chosen, rejected = rewards[:B], rewards[B:]
        loss = reward_loss(chosen, rejected) * B
        return loss, reward_metrics(chosen.detach(), rejected.detach())


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((chosen > rejected).float().mean()), "rewards/chosen": float(chosen.mean()),
            "rewards/rejected": float(rejected.mean()), "rewards/margins": float((chosen - rejected).mean())}


class PreferenceStage(_PairData):
    """DPO / IPO / SimPO on the policy (`state.model`); the reference from `reference` (unused by simpo)."""

    def __init__(self, pairs, order, pad_id, grad_accum, reference: Reference | None, *, loss_type: str = "sigmoid",
                 beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                 rpo_alpha: float | None = None) -> None:
        super().__init__(pairs, order, pad_id, grad_accum)
        self.reference, self.rpo_alpha = reference, rpo_alpha
        self.kw = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)

    def loss(self, state, batch):
        batch = _to(batch, state.device)
        B = batch["pairs"]
        logps, mask = token_logps(state.model, batch["input_ids"], batch["labels"], raw_model=state.raw_model,
                                  **_layout(batch))
        seq, n = logps.sum(-1), mask.sum(-1)
        ref = None
        if self.kw["loss_type"] != "simpo":
            with torch.no_grad(), self.reference() as ref_model:
                ref = sequence_logps(ref_model, batch)[0]
        losses, chosen_rewards, rejected_rewards = preference_loss(
            seq[:B], seq[B:], None if ref is None else ref[:B], None if ref is None else ref[B:], n[:B], n[B:],
            **self.kw)
        metrics = preference_metrics(chosen_rewards, rejected_rewards, seq[:B], seq[B:])
        total = losses.sum()
        if self.rpo_alpha is not None:
            nll = rpo_nll(seq[:B], n[:B])
            total = total + self.rpo_alpha * nll * B
            metrics["nll_loss"] = float(nll.detach())
        return total, metrics


# ------------------------------------------------------------------------------------------------------ GRPO
RewardFn = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]


def reward_model_function(model: RewardModel, tokenizer, max_source_length: int, max_target_length: int) -> RewardFn:
    """A reward function backed by a reward model (`--reward_model DIR`)."""
    from glmkit.training.reward import score

    def fn(prompts, completions):
        return score(model, tokenizer, list(prompts), list(completions), max_source_length=max_source_length,
                     max_target_length=max_target_length)

    return fn


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[dict[str, Any]], *, max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None
                       ) -> list[list[int]]:
    """One sampled answer per prompt example (glmkit's batched generation with a KV cache), each cut after its
    end token (kept) or at max_new_tokens."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    device = model.device
    if "position_ids" in prompts[0]:  # the original GLM: its blank layout, left-padded
        batch = blank_rows([(p["input_ids"], p["position_ids"], p["context"]) for p in prompts], special.pad, device)
        gen_model = BlankInfillingView(model, batch["position_ids"], batch["context_end"], batch["pad"])
    else:
        batch = collate_prompts([p["input_ids"] for p in prompts], special.pad)
        gen_model = model
    new = generate(gen_model, batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                   eos_token_id=[special.eos], pad_token_id=special.pad, seed=seed)
    out = []
    for row in new.tolist():
        if special.eos in row:
            row = row[: row.index(special.eos) + 1]
        out.append(row)
    return out


class GRPOStage(Stage):
    """Online RL: micro-batch m samples --num_generations answers for each of the prompts MicroBatches gives m
    (seeded by seed + m, so a resumed run samples what it would have), scores them and keeps what the loss needs."""

    def __init__(self, prompts: list[dict[str, Any]], order, tokenizer, grad_accum: int, reference: Reference | None,
                 reward_fn: RewardFn, *, num_generations: int = 8, max_new_tokens: int = 128, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, beta: float = 0.04, epsilon: float = 0.2,
                 epsilon_high: float | None = None, loss_type: str = "dapo", scale_rewards: str = "group",
                 seed: int = 42) -> None:
        self.prompts, self.order, self.tok, self.grad_accum = prompts, order, tokenizer, grad_accum
        self.reference, self.reward_fn = reference, reward_fn
        self.G, self.max_new_tokens = num_generations, max_new_tokens
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.loss_type, self.scale_rewards, self.seed = loss_type, scale_rewards, seed
        self.pad_id = SpecialTokens.from_tokenizer(tokenizer).pad

    def batches(self, state) -> Iterator[dict[str, Any]]:
        m = state.step * self.grad_accum
        while True:
            yield self.rollout(state, [self.prompts[i] for i in self.order.indices(m)], self.seed + m)
            m += 1

    def rollout(self, state, prompts: list[dict[str, Any]], seed: int) -> dict[str, Any]:
        raw = state.raw_model
        was_training = raw.training
        raw.eval()
        rows = [p for p in prompts for _ in range(self.G)]
        completions = sample_completions(raw, self.tok, rows, max_new_tokens=self.max_new_tokens, seed=seed,
                                         **self.sampling)
        texts = [decode_text(self.tok, c) for c in completions]
        rewards = torch.tensor([float(r) for r in self.reward_fn([p["source"] for p in rows], texts)])
        if rewards.numel() != len(rows):
            raise ValueError(f"the reward function returned {rewards.numel()} rewards for {len(rows)} answers")
        advantages = group_advantages(rewards, self.G, self.scale_rewards)
        batch = collate_train([completion_example(self.tok, p, c) for p, c in zip(rows, completions)], self.pad_id)
        batch = _to(batch, state.device)
        if self.beta != 0.0:
            with torch.no_grad(), self.reference() as ref_model:
                batch["ref_logps"] = token_logps(ref_model, batch["input_ids"], batch["labels"], **_layout(batch))[0]
        raw.train(was_training)
        group_std = rewards.view(-1, self.G).std(dim=1)
        batch["advantages"] = advantages.to(state.device)
        batch["metrics"] = {"reward": float(rewards.mean()), "reward_std": float(group_std.mean()),
                            "frac_reward_zero_std": float((group_std < 1e-6).float().mean()),
                            "completion_length": sum(len(c) for c in completions) / len(completions)}
        return batch

    def units(self, batch) -> int:
        if self.loss_type in ("dapo", "bnpo"):
            return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return int(batch["input_ids"].shape[0])

    def tokens(self, batch) -> int:
        return int((batch["input_ids"] != self.pad_id).sum())

    def loss(self, state, batch):
        logps, mask = token_logps(state.model, batch["input_ids"], batch["labels"], raw_model=state.raw_model,
                                  **_layout(batch))
        # one optimisation step per rollout (TRL's num_iterations = 1): π_old = π, detached
        per_token, metrics = grpo_per_token(logps, logps.detach(), batch.get("ref_logps"), batch["advantages"], mask,
                                            beta=self.beta, epsilon_low=self.epsilon,
                                            epsilon_high=self.epsilon_high)
        total, _ = grpo_sum(per_token, mask, self.loss_type, self.max_new_tokens)
        return total, {**batch["metrics"], **metrics}
