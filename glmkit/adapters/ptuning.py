"""P-tuning v2: trainable per-layer key/value prefixes over a frozen base (THUDM's PrefixEncoder).

ChatGLM-6B:  Embedding(P, 2·L·hidden), or with prefix_projection Embedding(P, hidden) -> Linear(hidden, hidden)
             -> Tanh -> Linear(hidden, 2·L·hidden).
ChatGLM2+:   the same with kv_size = 2·L·kv_heads·head_dim, and the projection's embedding is kv_size wide.
The output is viewed as (B, P, 2L, K, D); layer i reads keys from slot 2i and values from slot 2i+1; dropout 0.1
applies while training. Checkpoints use THUDM's key names (`transformer.prefix_encoder.*`) so that ChatGLM's own
P-tuning code and glmkit read each other's folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from glmkit.core.atomic import atomic_dir
from glmkit.core.config import GLMConfig
from glmkit.core.convert import to_hf_config

PREFIX_KEY = "transformer.prefix_encoder."


class PrefixEncoder(nn.Module):
    def __init__(self, config: GLMConfig, pre_seq_len: int, prefix_projection: bool = False,
                 prefix_hidden_size: int | None = None) -> None:
        super().__init__()
        self.num_layers, self.n_kv, self.head_dim = config.num_layers, config.num_kv_heads, config.head_dim
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        kv_size = 2 * config.num_layers * config.num_kv_heads * config.head_dim
        if prefix_projection:
            # ChatGLM-6B embeds into hidden_size, ChatGLM2+ into kv_size; both project through hidden_size.
            embed_dim = config.hidden_size if config.family == "chatglm" else kv_size
            mid = prefix_hidden_size or config.hidden_size
            self.embedding = nn.Embedding(pre_seq_len, embed_dim)
            self.trans = nn.Sequential(nn.Linear(embed_dim, mid), nn.Tanh(), nn.Linear(mid, kv_size))
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)
        self.dropout = nn.Dropout(0.1)

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        P = self.pre_seq_len
        tokens = torch.arange(P, device=self.embedding.weight.device)
        kv = self.embedding(tokens)
        if self.prefix_projection:
            kv = self.trans(kv)
        kv = kv.view(1, P, 2 * self.num_layers, self.n_kv, self.head_dim).expand(batch_size, -1, -1, -1, -1)
        kv = self.dropout(kv)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2L, B, K, P, D)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]


def attach_prefix(model: nn.Module, pre_seq_len: int, prefix_projection: bool = False,
                  prefix_hidden_size: int | None = None) -> PrefixEncoder:
    """Adds a (freshly initialised) prefix encoder to a GLM model and records it in model.config."""
    cfg: GLMConfig = model.config
    if cfg.kv_lora_rank:
        raise ValueError("P-tuning v2 prepends per-head keys and values to every layer; multi-head latent attention "
                         "(GLM-4.7-Flash) has none: use LoRA (targets attn.q_a, attn.q_b, attn.kv_a, attn.proj)")
    device = model.device
    encoder = PrefixEncoder(cfg, pre_seq_len, prefix_projection, prefix_hidden_size)
    if not encoder.embedding.weight.is_meta:  # built under torch.device("meta") by the loader: filled later
        encoder = encoder.to(device=device, dtype=model.dtype)
    model.prefix_encoder = encoder
    cfg.pre_seq_len, cfg.prefix_projection, cfg.prefix_hidden_size = pre_seq_len, prefix_projection, prefix_hidden_size
    return encoder


def mark_only_prefix_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("prefix_encoder.")


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prefix encoder's weights under THUDM's names."""
    if model.prefix_encoder is None:
        raise ValueError("this model has no P-tuning prefix encoder")
    return {PREFIX_KEY + k: v.detach().cpu().contiguous() for k, v in model.prefix_encoder.state_dict().items()}


def save_ptuning_checkpoint(model: nn.Module, out_dir: str | Path) -> Path:
    """Writes ChatGLM's P-tuning layout: config.json (with pre_seq_len) + pytorch_model.bin (prefix only)."""
    hf = to_hf_config(model.config)
    with atomic_dir(out_dir) as out:  # out_dir stays the previous complete checkpoint until this one is
        (out / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        torch.save(prefix_state_dict(model), out / "pytorch_model.bin")
    return Path(out_dir)

