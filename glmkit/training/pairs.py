"""On-policy preference pairs (`glmkit finetune --stage pairs`, docs/alignment.md): sample k answers per prompt from
the policy (glmkit's batched generation, as GRPO samples), score them with a reward, and pair the best answer
(chosen) with the worst (rejected) of each prompt whose answers differ in reward. The pairs are TRL's format, which
`--stage dpo` reads: iterative / online DPO's data step. Offline pairs whose answers differ in content as much as in
the trait to learn teach the content difference; pairs of the policy's own answers differ mainly in the reward.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from glmkit.training.data.finetune import decode_text
from glmkit.training.stages import sample_completions

RewardFn = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]


def _answer(prompt: Any, text: str) -> Any:
    """An answer in the prompt's format: text, or an assistant message list for a conversational prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


@torch.no_grad()
def build_preference_pairs(model, tokenizer, prompts: Sequence[dict[str, Any]], reward: RewardFn, k: int, *,
                           max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                           batch_size: int = 8, seed: int = 42, min_margin: float = 0.0,
                           progress: Callable[[int, int], None] | None = None) -> tuple[list[dict[str, Any]],
                                                                                        dict[str, float]]:
    """Pairs from k sampled answers per prompt.

    prompts: generation prompts as `glmkit.training.data.preference.build_prompts` makes them (each with its row's
    prompt under "source"). Batch b (batch_size prompts x k answers) is sampled with seed + b, so the same call gives
    the same pairs. For each prompt: chosen = the highest-reward answer, rejected = the lowest (the first of equals);
    prompts whose best and worst differ by no more than min_margin, or whose two texts are equal, give no pair.
    Returns (rows {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}, statistics)."""
    if k < 2:
        raise ValueError(f"k must be at least 2 (a pair needs two answers), got {k}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    all_rewards: list[float] = []
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start:start + batch_size]
            samples = [p for p in chunk for _ in range(k)]
            ids = sample_completions(model, tokenizer, samples, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed + b)
            texts = [decode_text(tokenizer, c) for c in ids]
            rewards = [float(r) for r in reward([p["source"] for p in samples], texts)]
            if len(rewards) != len(samples):
                raise ValueError(f"the reward function returned {len(rewards)} rewards for {len(samples)} answers")
            all_rewards.extend(rewards)
            for j, p in enumerate(chunk):
                group = list(zip(texts[j * k:(j + 1) * k], rewards[j * k:(j + 1) * k]))
                best = max(range(k), key=lambda i: group[i][1])
                worst = min(range(k), key=lambda i: group[i][1])
                (chosen, r_w), (rejected, r_l) = group[best], group[worst]
                if r_w - r_l <= min_margin or chosen == rejected or not chosen or not rejected:
                    continue
                rows.append({"prompt": p["source"], "chosen": _answer(p["source"], chosen),
                             "rejected": _answer(p["source"], rejected), "chosen_reward": r_w,
                             "rejected_reward": r_l})
            if progress is not None:
                progress(min(start + batch_size, len(prompts)), len(prompts))
    finally:
        model.train(was_training)
    n = max(1, len(all_rewards))
    stats = {"prompts": len(prompts), "answers": len(all_rewards), "pairs": len(rows),
             "mean_reward": sum(all_rewards) / n, "share_reward_1": sum(r >= 1.0 for r in all_rewards) / n}
    return rows, stats


def write_pairs(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """TRL-format JSON Lines (one pair per line), as `--stage dpo --train_file` reads them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
