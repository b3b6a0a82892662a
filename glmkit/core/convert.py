"""Checkpoint conversion: one name table per published layout, plus small per-family functions.

A table maps a source key pattern ({} = layer index) to a glmkit name, or to None for keys that are deliberately
dropped (rotary inv_freq buffers, which glmkit recomputes). Linear modules, the embedding and the output layer
map whole (`module.` prefix), so any attribute under them (weight, bias, THUDM's weight_scale, glmkit's quantized
tensors) follows along.
Anything not in the table is an error: nothing is ignored silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from glmkit.core.config import GLM4X_LAYOUTS, GLMConfig

# Each entry: source prefix/key -> target prefix/key. Keys ending in "." map every attribute under them.
CHATGLM_V1: dict[str, str | None] = {
    "transformer.word_embeddings.": "wte.",
    "transformer.layers.{}.input_layernorm.": "h.{}.ln_1.",
    "transformer.layers.{}.attention.query_key_value.": "h.{}.attn.qkv.",
    "transformer.layers.{}.attention.dense.": "h.{}.attn.proj.",
    "transformer.layers.{}.attention.rotary_emb.inv_freq": None,
    "transformer.layers.{}.post_attention_layernorm.": "h.{}.ln_2.",
    "transformer.layers.{}.mlp.dense_h_to_4h.": "h.{}.mlp.fc.",
    "transformer.layers.{}.mlp.dense_4h_to_h.": "h.{}.mlp.proj.",
    "transformer.final_layernorm.": "ln_f.",
    "lm_head.": "lm_head.",
    "transformer.prefix_encoder.": "prefix_encoder.",
}

CHATGLM_V2: dict[str, str | None] = {  # ChatGLM2-6B, ChatGLM3-6B, GLM-4 (THUDM layout)
    "transformer.embedding.word_embeddings.": "wte.",
    "transformer.rotary_pos_emb.inv_freq": None,
    "transformer.encoder.layers.{}.input_layernorm.": "h.{}.ln_1.",
    "transformer.encoder.layers.{}.self_attention.query_key_value.": "h.{}.attn.qkv.",
    "transformer.encoder.layers.{}.self_attention.dense.": "h.{}.attn.proj.",
    "transformer.encoder.layers.{}.post_attention_layernorm.": "h.{}.ln_2.",
    "transformer.encoder.layers.{}.mlp.dense_h_to_4h.": "h.{}.mlp.fc.",
    "transformer.encoder.layers.{}.mlp.dense_4h_to_h.": "h.{}.mlp.proj.",
    "transformer.encoder.final_layernorm.": "ln_f.",
    "transformer.output_layer.": "lm_head.",
    "transformer.prefix_encoder.": "prefix_encoder.",
}

ORIGINAL_GLM: dict[str, str | None] = {  # THUDM's hub GLMModel (GLMForConditionalGeneration: "glm." in front)
    "word_embeddings.": "wte.",
    "transformer.position_embeddings.weight": "wpe.weight",
    "transformer.block_position_embeddings.weight": "wbe.weight",
    "transformer.layers.{}.input_layernorm.": "h.{}.ln_1.",
    "transformer.layers.{}.attention.query_key_value.": "h.{}.attn.qkv.",  # rows [all q | all k | all v]
    "transformer.layers.{}.attention.dense.": "h.{}.attn.proj.",
    "transformer.layers.{}.post_attention_layernorm.": "h.{}.ln_2.",
    "transformer.layers.{}.mlp.dense_h_to_4h.": "h.{}.mlp.fc.",
    "transformer.layers.{}.mlp.dense_4h_to_h.": "h.{}.mlp.proj.",
    "transformer.final_layernorm.": "ln_f.",
    "transformer.prefix_encoder.": "prefix_encoder.",  # glmkit's P-tuning prefix merged into a checkpoint
}
ORIGINAL_GLM_PREFIX = "glm."  # what GLMForConditionalGeneration / GLMForMultipleChoice put before GLMModel's names
ORIGINAL_GLM_AUTO_MAP = {"AutoConfig": "configuration_glm.GLMConfig", "AutoModel": "modeling_glm.GLMModel",
                         "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
                         "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
                         "AutoModelForSequenceClassification": "modeling_glm.GLMForSequenceClassification"}

GLM130B_SAT: dict[str, str | None] = {  # GLM-130B's SwissArmyTransformer names (glmkit.core.sat merges TP shards)
    "transformer.word_embeddings.": "wte.",  # tied: lm_head is the same table
    "transformer.layers.{}.input_layernorm.": "h.{}.ln_1.",
    "transformer.layers.{}.attention.query_key_value.": "h.{}.attn.qkv.",  # per-head [q k v] rows
    "transformer.layers.{}.attention.dense.": "h.{}.attn.proj.",
    "transformer.layers.{}.attention.rotary_emb.inv_freq": None,
    "transformer.layers.{}.post_attention_layernorm.": "h.{}.ln_2.",
    "transformer.layers.{}.mlp.dense_h_to_4h.": "h.{}.mlp.fc.",  # [x1 | x2], GeGLU activates x2
    "transformer.layers.{}.mlp.dense_4h_to_h.": "h.{}.mlp.proj.",
    "transformer.final_layernorm.": "ln_f.",
    "mixins.rotary-embedding.rotary_emb.inv_freq": None,  # SAT 0.2.x keeps the rotary buffer in a mixin
}

HF_GLM: dict[str, str | None] = {  # transformers GlmForCausalLM; q/k/v are fused by HFGlmConverter
    "model.embed_tokens.": "wte.",
    "model.layers.{}.input_layernorm.weight": "h.{}.ln_1.weight",
    "model.layers.{}.self_attn.o_proj.weight": "h.{}.attn.proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "h.{}.ln_2.weight",
    "model.layers.{}.mlp.gate_up_proj.weight": "h.{}.mlp.fc.weight",  # gate = first half, as glmkit's swiglu
    "model.layers.{}.mlp.down_proj.weight": "h.{}.mlp.proj.weight",
    "model.norm.weight": "ln_f.weight",
    "lm_head.": "lm_head.",
}


# transformers' glm4 / glm4_moe / glm4_moe_lite (GLM-4-0414, GLM-4.5/4.6/4.7, GLM-4.7-Flash), as on the hub and as
# save_pretrained writes them. q/k/v and every gate/up pair are fused by Glm4xConverter (FUSED below).
HF_GLM4X: dict[str, str | None] = {
    "model.embed_tokens.": "wte.",
    "model.layers.{}.input_layernorm.weight": "h.{}.ln_1.weight",
    "model.layers.{}.post_attention_layernorm.weight": "h.{}.ln_2.weight",  # the pre-MLP norm, despite its name
    "model.layers.{}.post_self_attn_layernorm.weight": "h.{}.ln_attn_out.weight",  # GLM-4-0414 sandwich norms
    "model.layers.{}.post_mlp_layernorm.weight": "h.{}.ln_mlp_out.weight",
    "model.layers.{}.self_attn.o_proj.": "h.{}.attn.proj.",
    "model.layers.{}.self_attn.q_norm.weight": "h.{}.attn.q_norm.weight",  # GLM-4.5 use_qk_norm
    "model.layers.{}.self_attn.k_norm.weight": "h.{}.attn.k_norm.weight",
    "model.layers.{}.self_attn.q_a_proj.": "h.{}.attn.q_a.",  # multi-head latent attention (GLM-4.7-Flash)
    "model.layers.{}.self_attn.q_a_layernorm.weight": "h.{}.attn.q_a_norm.weight",
    "model.layers.{}.self_attn.q_b_proj.": "h.{}.attn.q_b.",
    "model.layers.{}.self_attn.q_proj.": "h.{}.attn.q.",  # MLA without q_lora_rank (else fused q/k/v)
    "model.layers.{}.self_attn.kv_a_proj_with_mqa.": "h.{}.attn.kv_a.",
    "model.layers.{}.self_attn.kv_a_layernorm.weight": "h.{}.attn.kv_a_norm.weight",
    "model.layers.{}.self_attn.kv_b_proj.": "h.{}.attn.kv_b.",
    "model.layers.{}.mlp.gate_up_proj.": "h.{}.mlp.fc.",  # GLM-4-0414: [gate | up] already fused
    "model.layers.{}.mlp.down_proj.": "h.{}.mlp.proj.",
    # glmkit's saved quantized files only: a quantized fused layer cannot be split back into q/k/v or gate/up (its
    # scales and packed layouts are the fused layer's), so it is written under one fused name
    "model.layers.{}.self_attn.qkv_proj.": "h.{}.attn.qkv.",
    "model.layers.{}.mlp.experts.{}.gate_up_proj.": "h.{}.mlp.experts.{}.fc.",
    "model.layers.{}.mlp.shared_experts.gate_up_proj.": "h.{}.mlp.shared.fc.",
    "model.layers.{}.mlp.experts.{}.down_proj.": "h.{}.mlp.experts.{}.proj.",
    "model.layers.{}.mlp.shared_experts.down_proj.": "h.{}.mlp.shared.proj.",
    "model.layers.{}.mlp.gate.weight": "h.{}.mlp.router.weight",  # fp32 on the hub
    "model.layers.{}.mlp.gate.e_score_correction_bias": "h.{}.mlp.router.bias",
    "model.norm.weight": "ln_f.weight",
    "lm_head.": "lm_head.",
}
# (pattern, the part names in fused order, the glmkit name with {0}.. = the pattern's groups)
GLM4X_FUSED: list[tuple[re.Pattern, tuple[str, ...], str]] = [
    (re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$"), ("q", "k", "v"),
     "h.{0}.attn.qkv.{2}"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.(weight)$"), ("gate", "up"), "h.{0}.mlp.fc.{2}"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up)_proj\.(weight)$"), ("gate", "up"),
     "h.{0}.mlp.experts.{1}.fc.{3}"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up)_proj\.(weight)$"), ("gate", "up"),
     "h.{0}.mlp.shared.fc.{2}"),
]
MTP_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# An MTP layer's own tensors (vLLM's glm4_moe_mtp.py names) -> MTPLayer's; the rest of `model.layers.{L}.` is its
# decoder layer (`mtp.{i}.block.`). Its embedding copy is dropped: MTP layers share the main model's embedding.
MTP_NAMES: dict[str, str | None] = {
    "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "head_norm.weight", "shared_head.head.weight": "head.weight",
    "embed_tokens.weight": None,
}


class UnexpectedWeightError(KeyError):
    pass


def _compile(table: dict[str, str | None]) -> list[tuple[re.Pattern, str | None, bool]]:
    rules = []
    for src, dst in table.items():
        prefix = src.endswith(".")
        pattern = re.escape(src).replace(r"\{\}", r"(\d+)")
        rules.append((re.compile(pattern + (r"(.+)" if prefix else "") + "$"), dst, prefix))
    return rules


def _rename(rules: list[tuple[re.Pattern, str | None, bool]], name: str) -> str | None:
    """`name` through the first matching rule of `_compile`d rules (None: a tensor the table drops);
    UnexpectedWeightError when none matches."""
    for pattern, dst, prefix in rules:
        m = pattern.match(name)
        if not m:
            continue
        if dst is None:
            return None
        groups = list(m.groups())
        rest = groups.pop() if prefix else ""
        return _fill(dst, groups) + rest
    raise UnexpectedWeightError(name)


class Converter:
    """Maps one source tensor at a time to zero or more (glmkit name, tensor) pairs."""

    def __init__(self, table: dict[str, str | None]) -> None:
        self.table = table
        self.rules = _compile(table)

    def map_name(self, name: str) -> str | None:
        return _rename(self.rules, name)

    def passthrough_target(self, name: str) -> str | None:
        """The glmkit name `name` is handed over to unchanged (None: dropped, transformed or unknown)."""
        try:
            return self.map_name(name)
        except UnexpectedWeightError:
            return None

    def feed(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        target = self.map_name(name)
        if target is None:  # deliberately unused (rotary inv_freq: glmkit recomputes it)
            return
        yield target, tensor

    def leftovers(self) -> list[str]:
        return []


def _fill(template: str, groups: list[str]) -> str:
    """'h.{}.mlp.experts.{}.' with ['3', '7'] -> 'h.3.mlp.experts.7.' (one {} per captured index, in order)."""
    for g in groups:
        template = template.replace("{}", g, 1)
    return template


class Glm4xConverter(Converter):
    """transformers' glm4 / glm4_moe / glm4_moe_lite layouts: the table above, q/k/v and gate/up pairs fused as
    glmkit's Attention.qkv and MLP.fc hold them, and the multi-token-prediction layers (indices num_layers ..
    num_layers + num_mtp_layers - 1, GLM-4.5's `model.layers.46.*` / `92.*`) read and dropped: they are counted in
    `skipped_mtp`, and a layer index past them is an error; with config.mtp they are kept as `mtp.{i}` (MTP_NAMES)."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__(HF_GLM4X)
        self.num_layers, self.num_mtp = config.num_layers, config.num_mtp_layers
        self.fused = GLM4X_FUSED[1:] if config.kv_lora_rank else GLM4X_FUSED  # MLA has no q/k/v projections
        self.pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.skipped_mtp: list[str] = []
        self.keep_mtp = config.mtp

    def _fused(self, name: str):
        for pattern, parts, target in self.fused:
            m = pattern.match(name)
            if m:
                groups = m.groups()
                return parts, next(g for g in groups if g in parts), target.format(*groups)
        return None

    def _is_mtp(self, name: str) -> bool:
        m = MTP_LAYER.match(name)
        if not m or int(m.group(1)) < self.num_layers:
            return False
        if int(m.group(1)) < self.num_layers + self.num_mtp:
            return True
        raise UnexpectedWeightError(name)

    def passthrough_target(self, name: str) -> str | None:
        if self._fused(name) is not None or MTP_LAYER.match(name) and int(MTP_LAYER.match(name).group(1)) >= \
                self.num_layers:
            return None
        return super().passthrough_target(name)

    def feed(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if not self._is_mtp(name):
            yield from self._feed_layer(name, tensor)
            return
        layer = int(MTP_LAYER.match(name).group(1))
        rest = name[MTP_LAYER.match(name).end():]
        if not self.keep_mtp or (rest in MTP_NAMES and MTP_NAMES[rest] is None):
            self.skipped_mtp.append(name)
            return
        i = layer - self.num_layers
        if rest in MTP_NAMES:
            yield f"mtp.{i}.{MTP_NAMES[rest]}", tensor
            return
        for target, t in self._feed_layer(name, tensor):  # the decoder layer, named as a main one first
            yield target.replace(f"h.{layer}.", f"mtp.{i}.block.", 1), t

    def _feed_layer(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        fused = self._fused(name)
        if fused is None:
            yield from super().feed(name, tensor)
            return
        order, part, target = fused
        parts = self.pending.setdefault((order, target), {})
        if part in parts:
            raise UnexpectedWeightError(f"{name} (twice)")
        parts[part] = tensor
        if len(parts) == len(order):
            del self.pending[(order, target)]
            yield target, torch.cat([parts[p] for p in order], dim=0)

    def leftovers(self) -> list[str]:
        return [f"{target} (only {sorted(parts)} of {list(order)} present)"
                for (order, target), parts in self.pending.items()]


def to_hf_glm4x_state_dict(state_dict: dict[str, torch.Tensor], config: GLMConfig) -> dict[str, torch.Tensor]:
    """glmkit names -> transformers' glm4 / glm4_moe / glm4_moe_lite names (what from_pretrained and the hub use):
    the table reversed, fused q/k/v and gate/up split back."""
    c = config
    rules = _compile({dst: src for src, dst in HF_GLM4X.items() if dst is not None})
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {}
    for name, t in state_dict.items():
        m = re.match(r"h\.(\d+)\.attn\.qkv\.(weight|bias)$", name)
        if m and t.is_floating_point():  # a quantized (integer) weight keeps its fused name, see HF_GLM4X
            for part, piece in zip("qkv", t.split([q, kv, kv], dim=0)):
                out[f"model.layers.{m[1]}.self_attn.{part}_proj.{m[2]}"] = piece.contiguous()
            continue
        m = re.match(r"h\.(\d+)\.mlp\.(experts\.\d+\.|shared\.|)fc\.weight$", name)
        if m and t.is_floating_point() and not (c.sandwich_norm and not m[2]):  # GLM-4-0414 keeps its dense gate_up_proj fused
            where = {"shared.": "shared_experts."}.get(m[2], m[2])
            gate, up = t.chunk(2, dim=0)
            out[f"model.layers.{m[1]}.mlp.{where}gate_proj.weight"] = gate.contiguous()
            out[f"model.layers.{m[1]}.mlp.{where}up_proj.weight"] = up.contiguous()
            continue
        try:
            out[_rename(rules, name)] = t
        except UnexpectedWeightError:
            raise UnexpectedWeightError(f"no transformers name for glmkit weight {name!r}") from None
    return out


def to_hf_glm4x_config(config: GLMConfig) -> dict[str, Any]:
    """transformers' config.json for a glm4 / glm4_moe / glm4_moe_lite model (over the one it was read from)."""
    c = config
    layout = c.extra.get("hf_layout")
    arch = {"glm4": "Glm4ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM", "glm4_moe_lite": "Glm4MoeLiteForCausalLM"}
    rope: dict[str, Any] = {"rope_theta": c.rope_base, "rope_type": "default"}
    if c.rope_scaling is not None:
        rope.update(c.rope_scaling)
    hf = {**c.extra.get("hf_config", {}), "model_type": layout, "architectures": [arch[layout]],
          "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
          "num_attention_heads": c.num_heads, "intermediate_size": c.ffn_hidden_size,
          "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
          "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
          "pad_token_id": c.pad_token_id, "torch_dtype": c.torch_dtype}
    hf.pop("dtype", None)
    if layout == "glm4_moe_lite":
        hf.update(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                  qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, attention_bias=c.qkv_bias,
                  rope_interleave=c.rope == "half_interleaved")
        hf.setdefault("num_key_value_heads", c.num_heads)
    else:
        rope["partial_rotary_factor"] = c.rotary_dim / c.head_dim
        hf.update(num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, attention_bias=c.qkv_bias)
    if layout == "glm4_moe":
        hf["use_qk_norm"] = c.qk_norm
        hf["first_k_dense_replace"] = c.mlp_layer_types.index("sparse") if "sparse" in c.mlp_layer_types else \
            c.num_layers
    if layout in ("glm4_moe", "glm4_moe_lite"):
        hf.update(n_routed_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                  moe_intermediate_size=c.moe_ffn_hidden_size, n_shared_experts=c.n_shared_experts,
                  n_group=c.n_group, topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
                  routed_scaling_factor=c.routed_scaling_factor, num_nextn_predict_layers=c.num_mtp_layers)
        if layout == "glm4_moe_lite":
            hf["mlp_layer_types"] = c.mlp_layer_types
    hf["rope_parameters"] = rope
    for old in ("rope_theta", "rope_scaling", "partial_rotary_factor"):
        hf.pop(old, None)
    return hf


class HFGlmConverter(Converter):
    """transformers' GLM keeps q, k and v apart; glmkit fuses them in the grouped layout [q | k | v]."""

    QKV = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")

    def __init__(self) -> None:
        super().__init__(HF_GLM)
        self.pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def passthrough_target(self, name: str) -> str | None:
        return None if self.QKV.match(name) else super().passthrough_target(name)

    def feed(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        m = self.QKV.match(name)
        if not m:
            yield from super().feed(name, tensor)
            return
        layer, which, attr = m.groups()
        parts = self.pending.setdefault((layer, attr), {})
        parts[which] = tensor
        if len(parts) == 3:
            del self.pending[(layer, attr)]
            yield f"h.{layer}.attn.qkv.{attr}", torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)

    def leftovers(self) -> list[str]:
        return [f"model.layers.{layer}.self_attn.{{q,k,v}}_proj.{attr} (only {sorted(parts)} present)"
                for (layer, attr), parts in self.pending.items()]


class OriginalGLMConverter(Converter):
    """THUDM's original GLM: GLMModel's names, with or without GLMForConditionalGeneration's `glm.` prefix."""

    def __init__(self) -> None:
        super().__init__(ORIGINAL_GLM)

    def map_name(self, name: str) -> str | None:
        return super().map_name(name.removeprefix(ORIGINAL_GLM_PREFIX))


def converter_for(config: GLMConfig, hf_config: dict[str, Any]) -> Converter:
    if config.family == "glm":
        return OriginalGLMConverter()
    if config.family == "glm130b":
        return Converter(GLM130B_SAT)
    if config.extra.get("hf_layout") in GLM4X_LAYOUTS:
        return Glm4xConverter(config)
    if hf_config.get("model_type") == "glm" or config.extra.get("hf_layout") == "glm":
        return HFGlmConverter()
    if config.family == "chatglm":
        return Converter(CHATGLM_V1)
    return Converter(CHATGLM_V2)


def to_thudm_state_dict(state_dict: dict[str, torch.Tensor], config: GLMConfig) -> dict[str, torch.Tensor]:
    """glmkit names -> THUDM names (the reverse of the family's table), for saving. The original GLM gets
    GLMForConditionalGeneration's names (`glm.` + GLMModel's), which its hub code loads."""
    if config.family == "glm":
        table = {ORIGINAL_GLM_PREFIX + k: v for k, v in ORIGINAL_GLM.items()
                 if not k.startswith("transformer.prefix_encoder")}
        table["transformer.prefix_encoder."] = "prefix_encoder."
    elif config.family == "glm130b":
        table = GLM130B_SAT
    else:
        table = CHATGLM_V1 if config.family == "chatglm" else CHATGLM_V2
    reverse = [(dst, src) for src, dst in table.items() if dst is not None]
    rules = _compile({dst: src for dst, src in reverse})
    out = {}
    for name, tensor in state_dict.items():
        try:
            out[_rename(rules, name)] = tensor
        except UnexpectedWeightError:
            raise UnexpectedWeightError(f"no THUDM name for glmkit weight {name!r}") from None
    return out


def to_hf_config(config: GLMConfig) -> dict[str, Any]:
    """A THUDM-style config.json for this config (what ChatGLM's / GLM's own code and glmkit both read)."""
    c = config
    if c.family == "glm":
        return _original_glm_config(c)
    if c.family == "glm130b":  # no Hugging Face layout exists for GLM-130B: glmkit's own config
        return {"model_type": "glmkit", **c.to_dict()}
    common = {"model_type": "chatglm", "torch_dtype": c.torch_dtype, "pre_seq_len": c.pre_seq_len,
              "prefix_projection": c.prefix_projection, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    if c.extra.get("quantization_bit"):
        common["quantization_bit"] = c.extra["quantization_bit"]
    if c.family == "chatglm":
        return {
            "architectures": ["ChatGLMModel"], **common, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "num_layers": c.num_layers, "num_attention_heads": c.num_heads, "inner_hidden_size": c.ffn_hidden_size,
            "max_sequence_length": c.max_seq_len, "layernorm_epsilon": c.norm_eps, "position_encoding_2d": True,
            "bos_token_id": c.bos_token_id, "mask_token_id": c.mask_token_id, "gmask_token_id": c.gmask_token_id,
            "use_cache": True,
        }
    rope_ratio = c.rope_base / 10000.0
    hf = {
        "architectures": ["ChatGLMModel"], **common, "padded_vocab_size": c.vocab_size, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "num_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "kv_channels": c.head_dim, "ffn_hidden_size": c.ffn_hidden_size, "seq_length": c.max_seq_len,
        "layernorm_epsilon": c.norm_eps, "rmsnorm": c.norm == "rmsnorm", "multi_query_attention": c.num_kv_heads != c.num_heads,
        "multi_query_group_num": c.num_kv_heads, "add_bias_linear": c.proj_bias, "add_qkv_bias": c.qkv_bias,
        "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True, "fp32_residual_connection": False, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "original_rope": True, "tie_word_embeddings": c.tie_word_embeddings,
        "use_cache": True,
    }
    if rope_ratio != 1.0:
        hf["rope_ratio"] = rope_ratio
    return hf


def _original_glm_config(c: GLMConfig) -> dict[str, Any]:
    """The hub's config.json of the original GLM (configuration_glm.GLMConfig's fields), over the one it was read
    from when there was one."""
    hf = {
        "model_type": "glm", "auto_map": ORIGINAL_GLM_AUTO_MAP,
        "attention_dropout_prob": 0.1, "attention_scale": 1.0, "block_position_encoding": True,
        "checkpoint_activations": False, "checkpoint_num_layers": 1, "embedding_dropout_prob": 0.1,
        "initializer_range": 0.02, "output_dropout_prob": 0.1, "output_predict": True, "parallel_output": True,
        "pool_token": "cls", "relative_encoding": False, "spell_func": "lstm", "spell_length": None,
        **{k: v for k, v in c.extra.get("hf_config", {}).items() if k != "transformers_version"},
        "architectures": ["GLMForConditionalGeneration"],  # the `glm.` names to_thudm_state_dict writes
        "hidden_size": c.hidden_size, "num_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "max_sequence_length": c.max_seq_len, "vocab_size": c.vocab_size, "torch_dtype": c.torch_dtype,
    }
    if c.pre_seq_len:
        hf.update(pre_seq_len=c.pre_seq_len, prefix_projection=c.prefix_projection)
    if c.extra.get("quantization_bit"):
        hf["quantization_bit"] = c.extra["quantization_bit"]
    return hf
