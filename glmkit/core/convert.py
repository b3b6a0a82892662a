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

from glmkit.core.config import GLMConfig

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


class UnexpectedWeightError(KeyError):
    pass


def _compile(table: dict[str, str | None]) -> list[tuple[re.Pattern, str | None, bool]]:
    rules = []
    for src, dst in table.items():
        prefix = src.endswith(".")
        pattern = re.escape(src).replace(r"\{\}", r"(\d+)")
        rules.append((re.compile(pattern + (r"(.+)" if prefix else "") + "$"), dst, prefix))
    return rules


class Converter:
    """Maps one source tensor at a time to zero or more (glmkit name, tensor) pairs."""

    def __init__(self, table: dict[str, str | None]) -> None:
        self.table = table
        self.rules = _compile(table)

    def map_name(self, name: str) -> str | None:
        for pattern, dst, prefix in self.rules:
            m = pattern.match(name)
            if not m:
                continue
            if dst is None:
                return None
            groups = list(m.groups())
            rest = groups.pop() if prefix else ""
            return dst.replace("{}", groups[0]) + rest if groups else dst + rest
        raise UnexpectedWeightError(name)

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
        for pattern, dst, prefix in rules:
            m = pattern.match(name)
            if m:
                groups = list(m.groups())
                rest = groups.pop() if prefix else ""
                out[dst.replace("{}", groups[0]) + rest if groups else dst + rest] = tensor
                break
        else:
            raise UnexpectedWeightError(f"no THUDM name for glmkit weight {name!r}")
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
