"""The GLM family in one file of plain nn.Modules, in reading order.

Covers ChatGLM-6B (2D rotary, DeepNorm, prefix-LM mask), ChatGLM2/3-6B and GLM-4 (RMSNorm, SwiGLU, grouped KV
heads, rotary on half of each head in interleaved pairs, causal), THUDM's original GLM (learned position and
block-position tables, Pre-LN, exact GELU, tied head) and GLM-130B (DeepNorm, GeGLU, 1-D rotary over the whole head,
prefix-LM mask, tied head). Family differences are GLMConfig fields.
Facts and formulas: the originals' code (THUDM/GLM's mpu/transformer.py and the hub modeling_glm.py; SAT's
glm130B_model.py; the hub modeling_chatglm.py of chatglm-6b, chatglm2-6b, chatglm3-6b and glm-4-9b); docs/models.md.

Shapes: B batch, T new tokens, S key length (cache + new), H query heads, K kv heads, D head_dim, P prefix length.
This file imports only torch, the standard library and glmkit.core.config (no training, quantization or serving code).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.core.config import GLMConfig

DECODE_ROWS = 16  # up to this many query rows, CPU attention runs in fp32 (see Attention.forward)


class RMSNorm(nn.Module):
    """ChatGLM2's RMSNorm: statistics in fp32, scaled by the weight, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def make_norm(config: GLMConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


# ----------------------------------------------------------------------------------------------------------- rotary
class Rotary(nn.Module):
    """Cos/sin tables for both rotary schemes, indexed by position ids.

    2d (ChatGLM-6B): each head's first D/2 dims rotate by positions, the last D/2 by block positions, with one
    table of D/2 dims in the GPT-NeoX half-split layout (`rotate_half`). ChatGLM-6B rounds inv_freq to fp16 and,
    unless the model was `.float()`-ed, also builds positions × inv_freq and cos/sin in fp16 (`rope_fp16`).
    half_interleaved (ChatGLM2+, GLM-4): dims [0, rotary_dim) rotate in pairs (x[2i], x[2i+1]); the rest pass.
    1d (GLM-130B): one table of D dims over the whole head, GPT-NeoX half-split layout, 1-D positions. SAT's
    RotaryEmbedding rounds inv_freq to fp16 like ChatGLM-6B and builds the table in that buffer's dtype (fp16).
    A table built in fp16 (or bf16) is returned in fp32, and applied in fp32 whatever the compute dtype.
    """

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config  # read at call time: the loader may set rope_fp16 after construction

    @property
    def dim(self) -> int:
        if self.config.rope == "2d":
            return self.config.head_dim // 2
        return self.config.head_dim if self.config.rope == "1d" else self.config.rotary_dim

    def inv_freq(self, device=None) -> torch.Tensor:
        # Computed per call (dim/2 values): no buffer to materialise after meta-device construction.
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))
        if self.config.rope_scaling is not None:  # the newer generations' YaRN (see yarn_inv_freq)
            inv_freq = yarn_inv_freq(self.config, self.dim, device)[0]
        if self.config.rope_fp16 != "none":
            inv_freq = inv_freq.half().float()
        return inv_freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, dim] (2d, 1d) or [B, T, dim/2] (interleaved), float32."""
        mode = self.config.rope_fp16
        table_dtype = {"table": torch.float16, "table_bf16": torch.bfloat16}.get(mode)
        inv_freq = self.inv_freq(positions.device)
        if table_dtype is None:
            angles = positions.float()[..., None] * inv_freq  # (B, T, dim/2)
        else:  # the original's ops in that dtype: arange(seq_len, dtype) x inv_freq, then cos/sin of those angles
            angles = positions.to(table_dtype)[..., None] * inv_freq.to(table_dtype)
        if self.config.rope in ("2d", "1d", "half_split"):
            angles = torch.cat((angles, angles), dim=-1)  # (B, T, dim)
        # cos/sin taken in the table's own dtype, as the original does: fp32 cos/sin rounded to fp16 afterwards can
        # round the other way where a value sits on an fp16 rounding boundary
        cos, sin = angles.cos().float(), angles.sin().float()
        if self.config.rope_scaling is not None:  # YaRN scales cos and sin by its attention factor
            factor = yarn_inv_freq(self.config, self.dim, positions.device)[1]
            cos, sin = cos * factor, sin * factor
        return cos, sin


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ChatGLM-6B's 2D rotary in one pass: x (B, T, H, D); cos/sin (B, T, D), the position table beside the
    block-position table. Dims [0, D/2) rotate by positions, [D/2, D) by block positions, each half in the
    GPT-NeoX half-split layout: x * cos + rotate_half(x) * sin in fp32, with rotate_half(a | b) = (-b | a) taken
    within each half, all of it in a few op calls (decoding runs this twice per layer per token)."""
    xf = x.float()
    parts = xf.unflatten(-1, (2, 2, -1))  # (B, T, H, half, 2, D/4)
    rotated = torch.cat((-parts[..., 1:, :], parts[..., :1, :]), dim=-2).flatten(-3)  # rotate_half per half
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)  # (B, T, H, D)


def apply_rotary_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM-130B's rotary over the whole head: x (B, T, H, D); cos/sin (B, T, D). x * cos + rotate_half(x) * sin in
    fp32, with rotate_half(a | b) = (-b | a) over the head's two halves."""
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)
    rotated = torch.cat((-b, a), dim=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)  # (B, T, H, D)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin (B, T, r/2): rotate pairs (x[2i], x[2i+1]) of the first r dims."""
    r = cos.shape[-1] * 2
    rot, rest = x[..., :r], x[..., r:]
    pairs = rot.float().reshape(*rot.shape[:-1], r // 2, 2)  # (B, T, H, r/2, 2)
    c, s = cos[:, :, None], sin[:, :, None]  # (B, T, 1, r/2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)  # (B, T, H, r)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


# -------------------------------------------------------------------------------------------------------- attention
class LayerCache(nn.Module):
    """The KV cache contract of one Attention layer (`attn.kv_cache`): `update` stores the new keys/values and
    returns every key/value the tokens attend to; `attend` runs the attention over them through the layer's
    `attention(rows, q, k, v)` callback (rows None: every row of the batch). A cache with its own layout (the paged
    cache of glmkit.core.paged_cache) overrides `attend` to attend group by group."""

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, K, T, D) of the tokens at input_pos -> the keys/values they attend to (B, K, S, D)."""
        raise NotImplementedError

    def attend(self, input_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention: Callable) -> torch.Tensor:
        """Stores k, v (B, K, T, D) and returns the attention of q (B, H, T, D) over the cached keys (B, H, T, D)."""
        return attention(None, q, *self.update(input_pos, k, v))


class KVCache(LayerCache):
    """Preallocated keys/values for incremental decoding, written at `input_pos` slots."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch_size, n_kv, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, K, T, D) written at slots input_pos; returns the cache up to the last written slot."""
        if k.shape[2] == 1:  # decoding: one slot, a plain slice copy (cheaper than an indexed write)
            end = int(input_pos[0]) + 1
            self.k[:, :, end - 1:end] = k
            self.v[:, :, end - 1:end] = v
        else:
            self.k[:, :, input_pos] = k.to(self.k.dtype)
            self.v[:, :, input_pos] = v.to(self.v.dtype)
            end = int(input_pos[-1]) + 1
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        # The heads this module computes: all of them, or this rank's under tensor parallelism (glmkit.distributed
        # shards qkv by heads and sets these).
        self.n_heads, self.n_kv_heads = config.num_heads, config.num_kv_heads
        self.qkv = nn.Linear(config.hidden_size, config.qkv_out_features, bias=config.qkv_bias)
        self.proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=config.proj_bias)
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(config.head_dim, config.norm_eps), RMSNorm(config.head_dim, config.norm_eps)
        self.kv_cache: LayerCache | None = None

    def forward(self, x, cos_sin, mask, input_pos=None, prefix_kv=None, uniform_rows=None):
        c = self.config
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, c.head_dim
        qkv = self.qkv(x)  # (B, T, (H + 2K) * D)
        if c.qkv_layout == "per_head":
            q, k, v = qkv.view(B, T, H, 3 * D).split(D, dim=-1)  # each (B, T, H, D)
        else:
            q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)

        if c.rope == "none":  # the original GLM: positions were added to the embeddings
            pass
        elif c.rope == "2d":
            cos, sin = cos_sin  # (B, T, D): positions' table | block positions' table
            q, k = apply_rotary_2d(q, cos, sin), apply_rotary_2d(k, cos, sin)
        elif c.rope == "1d":
            cos, sin = cos_sin  # (B, T, D)
            q, k = apply_rotary_half_split(q, cos, sin), apply_rotary_half_split(k, cos, sin)
        elif c.rope == "half_split":
            if c.qk_norm:  # GLM-4.5 `use_qk_norm`: per-head RMSNorm before the rotary
                q, k = self.q_norm(q), self.k_norm(k)
            cos, sin = cos_sin
            q, k = apply_rotary_partial_half_split(q, cos, sin), apply_rotary_partial_half_split(k, cos, sin)
        else:
            if c.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            cos, sin = cos_sin
            q, k = apply_rotary_interleaved(q, cos, sin), apply_rotary_interleaved(k, cos, sin)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)
        if uniform_rows is not None:  # rows that see no key: zero scores everywhere -> the mean of all values
            q = q.masked_fill(uniform_rows, 0.0)  # uniform_rows (B|1, 1, T, 1)
        if self.kv_cache is not None and input_pos is None:
            raise ValueError("a KV cache is set up: pass input_pos (the cache slots of these tokens)")
        if self.kv_cache is None:
            y = self._attention(q, k, v, mask, prefix_kv)  # (B, H, T, D)
        else:
            # the cache stores k, v and attends over its keys, calling back here for each group of rows it makes
            # (a paged cache groups a batch's rows by length) with their keys (n, K, S_g, D)
            def attend_rows(rows, q_rows, k_rows, v_rows):
                m = mask if mask is None or rows is None or mask.shape[0] == 1 else mask[rows]
                pkv = prefix_kv
                if pkv is not None and rows is not None and pkv[0].shape[0] > 1:
                    pkv = (pkv[0][rows], pkv[1][rows])
                if m is not None:  # columns: P-tuning prefix, then the group's S_g cached keys
                    m = m[..., : k_rows.shape[2] + (pkv[0].shape[2] if pkv is not None else 0)]
                return self._attention(q_rows, k_rows, v_rows, m, pkv)

            y = self.kv_cache.attend(input_pos, q, k, v, attend_rows)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.proj(y)

    def _attention(self, q, k, v, mask, prefix_kv):
        """q (B, H, T, D) over keys/values (B, K, S, D) (+ the P-tuning prefix's) -> (B, H, T, D)."""
        H, K, T = q.shape[1], k.shape[1], q.shape[2]
        if prefix_kv is not None:  # P-tuning v2: every token sees the prefix keys/values (not rotated)
            pk, pv = prefix_kv  # (B, K, P, D)
            k = torch.cat((pk.to(k.dtype), k), dim=2)
            v = torch.cat((pv.to(v.dtype), v), dim=2)
        # ChatGLM-6B and GLM-130B divide q by (layer+1)·√D and multiply the fp32 scores back by (layer+1) to dodge
        # fp16 overflow: the same 1/√D attention, which SDPA computes (in fp32 accumulation on CPU). Their -10000 fill
        # gives masked keys weight exactly 0 in fp32 as SDPA's -inf does, and a row that sees no key the mean of all
        # values (masked_row "uniform").
        # Grouped KV heads: head h reads kv group h // (H / K) (enable_gqa, without copying K/V per head).
        if q.device.type == "cpu" and q.dtype != torch.float32 and T <= DECODE_ROWS:
            # CPU SDPA takes 3-6x longer in bf16/fp16 than in fp32 for a few query rows (decoding): run it in
            # fp32 on the same values (it accumulates in fp32 either way); the CPU cache is fp32 already.
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  enable_gqa=K != H).to(q.dtype)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an fp32 CPU cache under a bf16 prefill
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K != H)  # (B, H, T, D)


class MLP(nn.Module):
    """gelu: fc -> tanh-GELU -> proj (ChatGLM-6B's 'GLU' is not gated); gelu_erf: the same with the exact GELU (the
    original GLM's hub code). swiglu: silu(first half) * second half. geglu (GLM-130B): first half * erf-GELU(second
    half)."""

    def __init__(self, config: GLMConfig, ffn_hidden_size: int | None = None) -> None:
        super().__init__()
        self.kind = config.mlp
        ffn = ffn_hidden_size or config.ffn_hidden_size  # MoE experts are narrower MLPs
        fc_out = ffn * (2 if config.mlp in ("swiglu", "geglu") else 1)
        self.fc = nn.Linear(config.hidden_size, fc_out, bias=config.mlp_bias)
        self.proj = nn.Linear(ffn, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "geglu":
            x1, x2 = h.chunk(2, dim=-1)  # under tensor parallelism: this rank's part of each half
            h = x1 * F.gelu(x2)
        elif self.kind == "gelu_erf":
            h = F.gelu(h)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, config: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.residual = config.residual
        self.alpha = config.deepnorm_alpha
        self.ln_1 = make_norm(config)
        self.attn = MLAttention(config, layer_idx) if config.kv_lora_rank else Attention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)
        if config.sandwich_norm:  # GLM-4-0414: post_self_attn_layernorm, post_mlp_layernorm
            self.ln_attn_out, self.ln_mlp_out = make_norm(config), make_norm(config)

    def forward(self, x, cos_sin, mask, input_pos=None, prefix_kv=None, uniform_rows=None):
        if self.residual == "deepnorm":  # ChatGLM-6B / GLM-130B: x = α·LN(x) + f(LN(x))
            a = self.ln_1(x)
            h = a * self.alpha + self.attn(a, cos_sin, mask, input_pos, prefix_kv, uniform_rows)
            m = self.ln_2(h)
            return m * self.alpha + self.mlp(m)
        if hasattr(self, "ln_attn_out"):  # sandwich norms: x = x + norm(f(norm(x)))
            x = x + self.ln_attn_out(self.attn(self.ln_1(x), cos_sin, mask, input_pos, prefix_kv, uniform_rows))
            return x + self.ln_mlp_out(self.mlp(self.ln_2(x)))
        x = x + self.attn(self.ln_1(x), cos_sin, mask, input_pos, prefix_kv, uniform_rows)
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------- newer generations: YaRN, MoE, latent attention
# GLM-4-0414 (glm4), GLM-4.5/4.6/4.7 (glm4_moe) and GLM-4.7-Flash (glm4_moe_lite), as transformers 5.x computes them
# (models/glm4*/modeling_*.py, modeling_rope_utils.py).

def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(config: GLMConfig, dim: int, device=None) -> tuple[torch.Tensor, float]:
    """YaRN's inv_freq over `dim` rotary dims and its cos/sin attention factor (transformers'
    _compute_yarn_parameters): low frequencies interpolated by `factor`, high ones kept, a linear ramp between."""
    p = config.rope_scaling
    base, factor = config.rope_base, float(p["factor"])
    original = p["original_max_position_embeddings"]
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = (yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all)
                            if mscale and mscale_all else yarn_get_mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def apply_rotary_partial_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM-4.5's rotary: x (B, T, H, D); cos/sin (B, T, r). The first r dims rotate in the GPT-NeoX half-split
    layout (x[i] with x[i + r/2]), the rest pass."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return apply_rotary_half_split(x, cos, sin)
    return torch.cat((apply_rotary_half_split(x[..., :r], cos, sin), x[..., r:]), dim=-1)


class Router(nn.Module):
    """GLM-4.5's top-k router: sigmoid scores in fp32; experts chosen on scores + e_score_correction_bias within
    the topk_group best groups (a group scores the sum of its two best), weighted by the unbiased scores,
    renormalised if norm_topk_prob, times routed_scaling_factor. Its weight and bias stay fp32 whatever the model's
    dtype, as transformers keeps them (_keep_in_fp32_modules_strict)."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def load_weight_tensor(self, attr: str, tensor: torch.Tensor) -> None:
        """The checkpoint loader's hook: keep the router in fp32."""
        current = getattr(self, attr, None)
        if attr not in ("weight", "bias"):
            raise KeyError(attr)
        if tuple(current.shape) != tuple(tensor.shape):
            raise ValueError(f"router {attr}: checkpoint has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(current.shape)}")
        if not current.is_meta:
            raise ValueError(f"router {attr} appears twice in the checkpoint")
        value = tensor.to(torch.float32).contiguous()
        if attr == "weight":
            self.weight = nn.Parameter(value, requires_grad=current.requires_grad)
        else:
            self.register_buffer("bias", value)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> weights (N, k) fp32, expert ids (N, k)."""
        c = self.config
        E, G = c.num_experts, c.n_group
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.bias
        # the same ops as transformers' Glm4MoeTopkRouter, so ties resolve to the same experts
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)  # (N, G)
        group_idx = torch.topk(group_scores, k=c.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=c.num_experts_per_tok, dim=-1, sorted=False)[1]  # (N, k)
        weights = scores.gather(1, idx)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, idx


class MoE(nn.Module):
    """Routed experts (SwiGLU MLPs of moe_ffn_hidden_size) plus the always-on shared expert. Each token runs only
    its k experts: a decode step reads k experts' weights per layer, not all of them."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = nn.ModuleList(MLP(config, config.moe_ffn_hidden_size) for _ in range(config.num_experts))
        self.shared = (MLP(config, config.moe_ffn_hidden_size * config.n_shared_experts)
                       if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, hidden)
        weights, idx = self.router(flat)  # (N, k)
        out = torch.zeros_like(flat)
        if flat.shape[0] == 1:  # decoding one token: its k experts, no grouping
            for slot, e in enumerate(idx[0].tolist()):
                out += (self.experts[e](flat) * weights[:, slot, None]).to(out.dtype)
        else:
            for e in torch.unique(idx).tolist():  # each hit expert once, over the tokens routed to it
                tokens, slot = (idx == e).nonzero(as_tuple=True)
                y = self.experts[e](flat[tokens]) * weights[tokens, slot, None]
                out.index_add_(0, tokens, y.to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(shape)


class MLAttention(nn.Module):
    """Multi-head latent attention (GLM-4.7-Flash, DeepSeek-V2's design): q = q_b(norm(q_a(x))) (or q(x)) per head
    [nope | rope]; one latent c = norm(kv_a(x)[:kv_lora_rank]) and one rotary key k_rot = kv_a(x)[kv_lora_rank:]
    shared by all heads; kv_b(c) gives each head's k_nope and v.

    Computed in the absorbed form: q_nope·(W_uk c) = (W_ukᵀ q_nope)·c, so every head attends over the latent rows
    [c | k_rot] (one KV head, head_dim = kv_lora_rank + qk_rope_head_dim) and its output W_uv (Σ p·c) is expanded
    after attention. The same scores and outputs as expanding k and v first, in another summation order; the KV
    cache holds the latent rows, not per-head keys and values (its v slot holds the same rows as k)."""

    def __init__(self, config: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.config, self.layer_idx = config, layer_idx
        self.n_heads, self.n_kv_heads = c.num_heads, 1
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            self.q_a = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.qkv_bias)
            self.q_a_norm = RMSNorm(c.q_lora_rank, MLA_NORM_EPS)
            self.q_b = nn.Linear(c.q_lora_rank, c.num_heads * qk, bias=False)
        else:
            self.q = nn.Linear(c.hidden_size, c.num_heads * qk, bias=False)
        self.kv_a = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.qkv_bias)
        self.kv_a_norm = RMSNorm(c.kv_lora_rank, MLA_NORM_EPS)
        self.kv_b = nn.Linear(c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.proj = nn.Linear(c.num_heads * c.v_head_dim, c.hidden_size, bias=c.proj_bias)
        scale = qk ** -0.5
        if c.rope_scaling is not None and c.rope_scaling.get("mscale_all_dim"):  # yarn_apply_mscale
            m = yarn_get_mscale(float(c.rope_scaling["factor"]), c.rope_scaling["mscale_all_dim"])
            scale = scale * m * m
        self.scale = scale
        self.kv_cache: LayerCache | None = None

    def forward(self, x, cos_sin, mask, input_pos=None, prefix_kv=None, uniform_rows=None):
        c = self.config
        if prefix_kv is not None:
            raise ValueError("P-tuning v2 prefixes are per-head keys/values; multi-head latent attention has none")
        B, T, _ = x.shape
        H, nope, rope, R = self.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
        q = self.q_b(self.q_a_norm(self.q_a(x))) if c.q_lora_rank else self.q(x)
        q_nope, q_rot = q.view(B, T, H, nope + rope).split([nope, rope], dim=-1)
        latent, k_rot = self.kv_a(x).split([R, rope], dim=-1)
        latent = self.kv_a_norm(latent)  # (B, T, R)
        cos, sin = cos_sin
        rotate = apply_rotary_interleaved if c.rope == "half_interleaved" else apply_rotary_partial_half_split
        q_rot, k_rot = rotate(q_rot, cos, sin), rotate(k_rot.view(B, T, 1, rope), cos, sin)
        if type(self.kv_b) is not nn.Linear:  # a wrapper (LoRA, quantized) would be bypassed by reading .weight
            raise TypeError(f"latent attention reads kv_b's weight directly; kv_b is a {type(self.kv_b).__name__}")
        w = self.kv_b.weight.view(H, nope + c.v_head_dim, R)
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w[:, :nope])  # (B, H, T, R)
        q = torch.cat((q_lat, q_rot.transpose(1, 2).to(q_lat.dtype)), dim=-1)  # (B, H, T, R + rope)
        k = torch.cat((latent, k_rot.view(B, T, rope)), dim=-1)[:, None]  # (B, 1, T, R + rope)
        if self.kv_cache is not None and input_pos is None:
            raise ValueError("a KV cache is set up: pass input_pos (the cache slots of these tokens)")
        if hasattr(self.kv_cache, "attend"):  # the paged cache: attention per group of rows of similar length
            def attend_rows(rows, q_rows, k_rows, _v_rows):
                m = mask if mask is None or rows is None or mask.shape[0] == 1 else mask[rows]
                return self._attention(q_rows, k_rows, None if m is None else m[..., : k_rows.shape[2]])

            y = self.kv_cache.attend(input_pos, q, k, k, attend_rows)
        else:
            if self.kv_cache is not None:
                k, _ = self.kv_cache.update(input_pos, k, k)  # (B, 1, S, R + rope)
            y = self._attention(q, k, mask)
        y = torch.einsum("bhtr,hvr->bthv", y[..., :R], w[:, nope:])  # (B, T, H, v_head_dim)
        return self.proj(y.reshape(B, T, H * c.v_head_dim))

    def _attention(self, q, k, mask):
        """q (B, H, T, R + rope) over latent rows k (B, 1, S, R + rope); values are the rows themselves."""
        dtype = q.dtype
        if q.device.type == "cpu" and dtype != torch.float32 and q.shape[2] <= DECODE_ROWS:
            q, k = q.float(), k.float()  # as Attention._attention: CPU decode attends in fp32
        k = k.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, k, attn_mask=mask, scale=self.scale, enable_gqa=q.shape[1] > 1)
        return y.to(dtype)


MLA_NORM_EPS = 1e-6  # transformers' Glm4MoeLiteRMSNorm default, which q_a_layernorm and kv_a_layernorm use


class MTPLayer(nn.Module):
    """One of GLM-4.5's multi-token-prediction layers (`model.layers.{num_layers + i}`, DeepSeek-V3's design, as
    vLLM's glm4_moe_mtp.py computes it): at position t it reads the main model's final-norm hidden state h_t and the
    embedding of token t+1 (zero at position 0) and predicts token t+2:
    x = eh_proj([enorm(embed) | hnorm(h)]); x = block(x); logits = head(head_norm(x)). The embedding is the main
    model's (MTP layers share it; the checkpoint's per-layer copy is not kept)."""

    def __init__(self, config: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.enorm, self.hnorm = make_norm(config), make_norm(config)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_idx)
        self.head_norm = make_norm(config)  # shared_head.norm
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # shared_head.head

    def forward(self, embeds, hidden, cos_sin, mask, input_pos=None):
        """embeds, hidden (B, T, hidden) -> (logits (B, T, vocab) float32, this layer's hidden (B, T, hidden))."""
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(hidden)), dim=-1))
        x = self.block(x, cos_sin, mask, input_pos)
        return self.head(self.head_norm(x)).float(), x


# ------------------------------------------------------------------------------------------------------------ model
class GLM(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned_2d":  # the original GLM: position + block-position tables
            self.wpe = nn.Embedding(config.max_seq_len + 1, config.hidden_size)
            self.wbe = nn.Embedding(config.max_seq_len + 1, config.hidden_size)
        self.rotary = Rotary(config)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        self.mtp = (nn.ModuleList(MTPLayer(config, config.num_layers + i) for i in range(config.num_mtp_layers))
                    if config.mtp and config.num_mtp_layers else None)
        self.prefix_encoder: nn.Module | None = None  # set by glmkit.adapters.ptuning.attach_prefix
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ positions and masks
    def default_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The family's own positions: [B, 2, T] for ChatGLM-6B and the original GLM, [B, T] otherwise. Left padding
        is skipped. The original GLM's are its hub code's defaults: 0, 1, 2, ... with block positions 0."""
        B, T = input_ids.shape
        pad = _left_pad_lengths(attention_mask, B, T, input_ids.device)
        if self.config.position_embedding == "learned_2d":
            pos = (torch.arange(T, device=input_ids.device).expand(B, T) - pad[:, None]).clamp(min=0)
            return torch.stack((pos, torch.zeros_like(pos)), dim=1)
        if self.config.family == "glm130b":
            pos = (torch.arange(T, device=input_ids.device).expand(B, T) - pad[:, None]).clamp(min=0).clone()
            for b, row in enumerate(input_ids.tolist()):
                p = int(pad[b])
                ctx, frozen_at = self._glm130b_part_b(row[p:])
                if frozen_at is not None:  # [MASK] / [sMASK]: from <sop> on, every position is the mask's
                    pos[b, p + ctx:] = frozen_at
            return pos
        if self.config.rope != "2d":
            pos = torch.arange(T, device=input_ids.device).expand(B, T) - pad[:, None]
            return pos.clamp(min=0)
        positions = torch.zeros(B, 2, T, dtype=torch.long, device=input_ids.device)
        for b, row in enumerate(input_ids.tolist()):
            p = int(pad[b])
            ctx, mask_pos = self._context_and_mask_position(row[p:])
            n = T - p
            pos = torch.arange(n)
            block = torch.zeros(n, dtype=torch.long)
            if ctx < n:  # Part B (from <sop>): frozen at the mask's index, block ids 1, 2, ...
                pos[ctx:] = mask_pos
                block[ctx:] = torch.arange(1, n - ctx + 1)
            positions[b, 0, p:] = pos
            positions[b, 1, p:] = block
        return positions

    def _glm130b_part_b(self, row: list[int]) -> tuple[int, int | None]:
        """GLM-130B (generate.py): (index of the first <sop>, the position Part B is frozen at, or None).

        It generates for the first [MASK] if there is one, else the first [sMASK], else [gMASK] (the reverse of
        ChatGLM-6B's gMASK-first rule); only a [MASK] or [sMASK] freezes the positions from <sop> on at its index,
        with [gMASK] (or no mask, or no <sop>) they keep counting."""
        c = self.config
        if c.bos_token_id not in row:
            return len(row), None
        ctx = row.index(c.bos_token_id)
        for mask in (c.mask_token_id, c.smask_token_id):
            if mask is not None and mask in row:
                return ctx, row.index(mask)
        return ctx, None

    def frozen_position_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Bool [B]: rows whose 1-D positions stay at their mask's index for every generated token (GLM-130B after
        [MASK] / [sMASK] and <sop>). generate.py keeps their next position the same instead of counting up."""
        B, T = input_ids.shape
        frozen = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        if self.config.family != "glm130b":
            return frozen
        pad = _left_pad_lengths(attention_mask, B, T, input_ids.device)
        for b, row in enumerate(input_ids.tolist()):
            frozen[b] = self._glm130b_part_b(row[int(pad[b]):])[1] is not None
        return frozen

    def _context_and_mask_position(self, row: list[int]) -> tuple[int, int]:
        """ChatGLM-6B: context length = index of the first <sop>; mask = first [gMASK], else first [MASK].

        Without <sop> the whole row is context (n); without any mask token positions freeze at <sop> - 1.
        """
        c = self.config
        ctx = row.index(c.bos_token_id) if c.bos_token_id in row else len(row)
        mask_token = c.gmask_token_id if c.gmask_token_id in row else c.mask_token_id
        mask_pos = row.index(mask_token) if mask_token in row else max(ctx - 1, 0)
        return ctx, mask_pos

    def default_attention_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Bool [B, 1, T, T], True = may attend: prefix-LM for ChatGLM-6B, causal otherwise; pads never attended."""
        B, T = input_ids.shape
        device = input_ids.device
        allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, T, T).clone()
        if self.config.attention == "prefix_lm":
            pad = _left_pad_lengths(attention_mask, B, T, device)
            for b, row in enumerate(input_ids.tolist()):
                p = int(pad[b])
                ctx = row.index(self.config.bos_token_id, p) if self.config.bos_token_id in row[p:] else 0
                allowed[b, :, :ctx] = True  # everything sees the context before <sop>
        if attention_mask is not None:
            allowed &= attention_mask.bool()[:, None, :]
        return allowed[:, None]

    # ------------------------------------------------------------------ cache
    @property
    def device(self) -> torch.device:
        """Where the model computes (read from the final norm: the embedding may be a quantized table)."""
        return self.ln_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype (activations, KV cache)."""
        return self.ln_f.weight.dtype

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Preallocates a KV cache for `batch_size` rows of up to `max_seq_len` tokens (prefix excluded). Its dtype
        (default) is the model's, except fp32 for a bf16/fp16 model on the CPU: decoding attends in fp32 there
        (Attention.forward), and converting the whole cache for every layer at every step cost more than the
        attention itself (twice the cache memory; the values are the model dtype's, exactly)."""
        c = self.config
        device = self.device
        if dtype is None:
            dtype = self.dtype
            if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
                dtype = torch.float32
        for block in self._cached_blocks():
            block.attn.kv_cache = KVCache(batch_size, max_seq_len, block.attn.n_kv_heads, c.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for block in self._cached_blocks():
            block.attn.kv_cache = None

    def _cached_blocks(self) -> list:
        return list(self.h) + ([m.block for m in self.mtp] if self.mtp is not None else [])

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Beam search: row b of every cache becomes row index[b]."""
        for block in self.h:
            cache = block.attn.kv_cache
            cache.k, cache.v = cache.k.index_select(0, index), cache.v.index_select(0, index)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                last_logits_only: bool = False, return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (float32).

        position_ids: [B, T], or [B, 2, T] (positions, block positions) for ChatGLM-6B and the original GLM;
        None = the family's own.
        attention_mask: None; [B, T] with 1 = token, 0 = left padding; or bool [B, 1, T, S] / [B, T, S] with
        True = may attend (S = T, or the cache length when input_pos is given); or [B] (or a scalar) `sep`, the
        original GLM's own form: every row sees the first sep tokens and itself causally (tril + [:, :sep]).
        input_pos: [T] cache slots of these tokens (only with setup_cache()).
        last_logits_only: return logits [B, 1, vocab] for the last position only (prefill needs no more).
        return_hidden: return (logits, the final norm's output [B, T|1, hidden]), what MTP layers read.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        c = self.config
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size:
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}), got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask [B, T] must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
        if attention_mask is not None and attention_mask.dim() <= 1:  # GLM's `sep` per row (or one for all)
            if input_pos is not None:
                raise ValueError("with a KV cache, pass a bool [B, 1, T, S] attention mask over cache slots")
            sep = attention_mask.reshape(-1).to(input_ids.device)
            if sep.numel() not in (1, B):
                raise ValueError(f"a 1-D attention_mask is GLM's sep per row: {B} values (or one), got {sep.numel()}")
            cols = torch.arange(T, device=input_ids.device)
            attention_mask = (cols[None, None, :] <= cols[None, :, None]) | (cols[None, None, :] < sep[:, None, None])
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            if input_pos is not None:
                raise ValueError("with a KV cache, pass position_ids (generate.py computes them)")
            position_ids = self.default_position_ids(input_ids, padding)
        if attention_mask is None or attention_mask.dim() == 2:
            if input_pos is not None:
                raise ValueError("with a KV cache, pass a bool [B, 1, T, S] attention mask over cache slots")
            mask = self.default_attention_mask(input_ids, padding)
        else:
            mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None]
            mask = mask.bool()
            if input_pos is not None:
                mask = mask[..., : int(input_pos[-1]) + 1]

        prefix = None
        if self.prefix_encoder is not None and c.pre_seq_len:
            prefix = self.prefix_encoder(B)  # list over layers of (k, v), each (B, K, P, D)
            ones = torch.ones(*mask.shape[:-1], c.pre_seq_len, dtype=torch.bool, device=mask.device)
            mask = torch.cat((ones.expand(mask.shape[0], *ones.shape[1:]), mask), dim=-1)
        # A row that may attend to nothing (a padding query) attends to everything instead of producing NaN, as the
        # originals' finite fills do: ChatGLM's -10000 with the row's scores (masked_row "all"), the original GLM's
        # S·M - 65504·(1 - M) with equal scores, i.e. the mean of all values ("uniform": its query is zeroed).
        empty = ~mask.any(dim=-1, keepdim=True)  # (B|1, 1, T, 1)
        uniform_rows = empty if c.masked_row == "uniform" and bool(empty.any()) else None
        mask = mask | empty
        if bool(mask.all()):  # e.g. decoding one unpadded row: attention without a mask (the same result, faster)
            mask = None

        if c.position_embedding == "learned_2d":
            if position_ids.dim() != 3 or position_ids.shape[1] != 2 or position_ids.shape[0] not in (1, B):
                raise ValueError(f"the original GLM takes position_ids [B, 2, T], got {tuple(position_ids.shape)}")
            if int(position_ids.min()) < 0 or int(position_ids.max()) > c.max_seq_len:
                raise ValueError(f"position ids must lie in [0, {c.max_seq_len}] (tables of max_sequence_length + 1 "
                                 f"rows), got [{int(position_ids.min())}, {int(position_ids.max())}]")
            cos_sin = None
        elif c.rope == "2d":
            if position_ids.dim() != 3 or position_ids.shape[1] != 2:
                raise ValueError(f"ChatGLM-6B takes position_ids [B, 2, T], got {tuple(position_ids.shape)}")
            (cos_p, sin_p), (cos_b, sin_b) = (self.rotary.cos_sin(position_ids[:, 0]),
                                              self.rotary.cos_sin(position_ids[:, 1]))
            cos_sin = (torch.cat((cos_p, cos_b), dim=-1), torch.cat((sin_p, sin_b), dim=-1))  # (B, T, D) each
        else:
            if position_ids.dim() != 2:
                raise ValueError(f"position_ids must be [B, T], got {tuple(position_ids.shape)}")
            cos_sin = self.rotary.cos_sin(position_ids)

        x = self.wte(input_ids)  # (B, T, hidden)
        if c.position_embedding == "learned_2d":  # + position table + block-position table
            x = x + self.wpe(position_ids[:, 0]) + self.wbe(position_ids[:, 1])  # (B, T, hidden)
        for i, block in enumerate(self.h):
            layer_prefix = prefix[i] if prefix is not None else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos_sin, mask, input_pos, layer_prefix, uniform_rows,
                                                      use_reentrant=False)
            else:
                x = block(x, cos_sin, mask, input_pos, layer_prefix, uniform_rows)
        if last_logits_only:
            x = x[:, -1:]
        x = self.ln_f(x)
        logits = self.lm_head(x).float()
        return (logits, x) if return_hidden else logits

    def mtp_forward(self, i: int, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                    mask: torch.Tensor | None, input_pos: torch.Tensor | None = None):
        """MTP layer i (load_model(mtp=True)): input_ids [B, T] (the tokens after those `hidden` [B, T, hidden]
        stands for), position_ids [B, T] those of `hidden`, mask bool [B, 1, T, S] or None (causal) -> (logits
        [B, T, vocab] for the tokens two ahead, the layer's hidden [B, T, hidden])."""
        if self.mtp is None:
            raise ValueError("the model has no MTP layers: load it with load_model(..., mtp=True)")
        embeds = self.wte(input_ids)
        embeds = embeds.masked_fill((position_ids == 0)[..., None], 0.0)  # as vLLM: position 0 sees no embedding
        if mask is None and input_pos is None:
            T = input_ids.shape[1]
            mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        elif mask is not None and input_pos is not None:
            mask = mask[..., : int(input_pos[-1]) + 1]
        return self.mtp[i](embeds, hidden, self.rotary.cos_sin(position_ids), mask, input_pos)

    # ------------------------------------------------------------------ utilities
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch: N(0, std), output projections N(0, std/√(2L)), norms 1/0."""
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.startswith("prefix_encoder"):
                continue
            if p.dim() >= 2:
                s = out_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=generator) * s)
            elif ("ln" in name or name.endswith("norm.weight")) and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _left_pad_lengths(attention_mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """Number of leading zeros in each row of a [B, T] padding mask (0 without a mask)."""
    if attention_mask is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    am = attention_mask.bool()
    return torch.where(am.any(dim=1), am.long().argmax(dim=1), torch.full((B,), T, device=device))
