"""Reward models: a GLM body plus a scalar head on the last token of prompt + answer (TRL's
AutoModelForSequenceClassification with num_labels=1 reads the last non-pad token the same way), trained with the
Bradley-Terry pairwise loss (glmkit.training.alignment.reward_loss) by `glmkit finetune --stage rm`.

A reward-model folder holds
    reward_config.json         {"glmkit_reward_model": 1, "method", "base_model_name_or_path", "hidden_size"}
    reward_head.safetensors    score.weight [1, hidden], score.bias [1]
and the body in its training method's layout: LoRA (adapter_config.json + adapter_model.safetensors) or P-tuning
(config.json + pytorch_model.bin) over the base named in reward_config.json, or the whole model (full).

    from glmkit.training.reward import load_reward_model, score
    rm, tok = load_reward_model("out/rm/checkpoint-200")
    score(rm, tok, ["作者#王維*體裁#五言絕句*題目#鹿柴"], ["空山不見人，但聞人語響。返景入深林，復照青苔上。"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from glmkit.adapters.lora import save_lora_adapter
from glmkit.adapters.ptuning import save_ptuning_checkpoint
from glmkit.core.tokenizer import load_tokenizer
from glmkit.loading.loader import load_adapter, load_model, save_model
from glmkit.training.alignment import _hidden_states_only
from glmkit.training.data.finetune import Lengths, SpecialTokens, collate_train
from glmkit.training.data.preference import answer_example

REWARD_CONFIG = "reward_config.json"
REWARD_HEAD = "reward_head.safetensors"


class RewardModel(nn.Module):
    """body (a GLMForCausalLM, its output layer unused) + score: Linear(hidden, 1) in float32."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.score = nn.Linear(body.config.hidden_size, 1, device=body.device, dtype=torch.float32)
        nn.init.normal_(self.score.weight, std=1.0 / (body.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    @property
    def config(self):
        return self.body.config

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor, **layout) -> torch.Tensor:
        """Rewards [B]: the head on each row's hidden state at last_index (its final answer token)."""
        with _hidden_states_only(self.body):
            hidden = self.body(input_ids, **layout)  # (B, T, hidden)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        return self.score(last.float()).squeeze(-1)


def reward_batch(examples: Sequence[dict], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """collate_train's batch plus last_index (each row's last real token) for RewardModel."""
    batch = collate_train(list(examples), pad_id)
    batch["last_index"] = torch.tensor([len(e["input_ids"]) - 1 for e in examples])
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def rewards_of(model: RewardModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"], batch["last_index"],
                 **{k: batch[k] for k in ("position_ids", "attention_mask") if k in batch})


@torch.no_grad()
def score(model: RewardModel, tokenizer, prompts: Sequence, answers: Sequence[str], batch_size: int = 16,
          max_source_length: int = 512, max_target_length: int = 512) -> list[float]:
    """The reward of each (prompt, answer), laid out as fine-tuning lays it out (text or message-list prompts)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    lengths = Lengths(max_source_length, max_target_length)
    pad = SpecialTokens.from_tokenizer(tokenizer).pad
    was_training = model.training
    model.eval()
    out: list[float] = []
    for b in range(0, len(prompts), batch_size):
        examples = [answer_example(tokenizer, p, a if a.strip() else " ", lengths)
                    for p, a in zip(prompts[b:b + batch_size], answers[b:b + batch_size])]
        out += rewards_of(model, reward_batch(examples, pad, model.body.device)).tolist()
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------------ folders
def save_reward_model(model: RewardModel, out_dir: str | Path, method: str, base_model_name_or_path: str,
                      tokenizer=None, body_saved: bool = False) -> Path:
    """Writes the folder described in the module docstring (the body's part in `method`'s layout; body_saved: a
    fine-tuning checkpoint already wrote it)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if body_saved:
        pass
    elif method == "lora":
        save_lora_adapter(model.body, out, base_model_name_or_path=base_model_name_or_path)
    elif method == "ptuning":
        save_ptuning_checkpoint(model.body, out)
    else:
        save_model(model.body, out, tokenizer=tokenizer)
    save_file({"score.weight": model.score.weight.detach().float().cpu().contiguous(),
               "score.bias": model.score.bias.detach().float().cpu().contiguous()}, str(out / REWARD_HEAD))
    (out / REWARD_CONFIG).write_text(json.dumps({
        "glmkit_reward_model": 1, "method": method, "base_model_name_or_path": str(base_model_name_or_path),
        "hidden_size": model.config.hidden_size}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def is_reward_folder(path: str | Path) -> bool:
    return (Path(path) / REWARD_CONFIG).is_file()


def load_reward_head(model: RewardModel, folder: str | Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / REWARD_HEAD))
    if tuple(state["score.weight"].shape) != tuple(model.score.weight.shape):
        raise ValueError(f"{folder}: the reward head is {tuple(state['score.weight'].shape)}, the model needs "
                         f"{tuple(model.score.weight.shape)} (another base model?)")
    with torch.no_grad():
        model.score.weight.copy_(state["score.weight"])
        model.score.bias.copy_(state["score.bias"])


def load_reward_model(folder: str | Path, base: str | None = None, *, dtype=None, quantize: str | None = None,
                      device: str = "cpu") -> tuple[RewardModel, object]:
    """(RewardModel in eval mode, tokenizer) from a reward-model folder; `base` overrides the folder's recorded
    base model (LoRA / P-tuning folders)."""
    folder = Path(folder)
    if not is_reward_folder(folder):
        raise FileNotFoundError(f"{folder} is not a reward-model folder (no {REWARD_CONFIG}); train one with "
                                "`glmkit finetune --stage rm`")
    cfg = json.loads((folder / REWARD_CONFIG).read_text(encoding="utf-8"))
    if cfg.get("method") == "full":
        body = load_model(folder, dtype=dtype, quantize=quantize, device=device)
        tokenizer = load_tokenizer(folder)
    else:
        base = base or cfg.get("base_model_name_or_path")
        body = load_model(base, dtype=dtype, quantize=quantize, device=device)
        load_adapter(body, folder)
        if body.prefix_encoder is not None:
            body.prefix_encoder.float()
        tokenizer = load_tokenizer(base)
    model = RewardModel(body)
    load_reward_head(model, folder)
    model.eval()
    return model, tokenizer
