"""One config for the whole GLM family; family differences are fields, never subclasses.

Field groups follow the model's reading order. `from_hf_config` reads the `config.json` of every published layout
(THUDM `chatglm` v1, ChatGLM2/3, GLM-4 `chatglm` with `rope_ratio`, transformers' native `glm` (GLM-4), and THUDM's
original GLM, whose hub configs also say `"model_type": "glm"`).
"""

from __future__ import annotations

import json
import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from glmkit.core.presets import HF_PRESETS, PRESETS

# ChatGLM-6B's code computes DeepNorm's α from this default argument, never from config.num_layers.
CHATGLM_V1_ALPHA_LAYERS = 28


class ConfigError(ValueError):
    """A config.json glmkit cannot turn into a model."""


@dataclass
class GLMConfig:
    # --- size ---
    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_heads: int = 32
    num_kv_heads: int | None = None  # grouped KV heads (ChatGLM2 `multi_query_group_num`); None = num_heads
    head_dim: int | None = None  # None = hidden_size // num_heads (ChatGLM2 `kv_channels`)
    ffn_hidden_size: int = 16384
    max_seq_len: int = 2048

    # --- transformer block ---
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    # "deepnorm": ChatGLM-6B, x = α·LN(x) + f(LN(x)) with α = √(2·alpha_num_layers).
    # "prenorm":  ChatGLM2+/GLM-4, x = x + f(LN(x)), final norm after the stack.
    residual: Literal["deepnorm", "prenorm"] = "deepnorm"
    # The layer count DeepNorm's α is computed from; None = num_layers (GLM-130B's SAT code). ChatGLM-6B's
    # GLMBlock takes num_layers=28 as a default argument that ChatGLMModel never passes, so its α is √56 at
    # every depth (the hub modeling_chatglm.py of THUDM/chatglm-6b): its reader and presets set 28.
    alpha_num_layers: int | None = None
    # gelu: tanh approximation (ChatGLM-6B); gelu_erf: the exact erf GELU (the original GLM as its hub code runs it:
    # transformers' `gelu`; THUDM/GLM's training code used the tanh form); swiglu: gate = first half (ChatGLM2+);
    # geglu: GLM-130B's GEGLU, fc -> (x1, x2) halves -> x1 * erf-GELU(x2) (the SECOND half is activated).
    mlp: Literal["gelu", "gelu_erf", "swiglu", "geglu"] = "gelu"
    qkv_bias: bool = True
    proj_bias: bool = True  # attention output projection
    mlp_bias: bool = True
    # Layout of the fused qkv projection's output rows:
    #   "per_head": [h0:q k v | h1:q k v | ...] (ChatGLM-6B)
    #   "grouped":  [all q | all k | all v]       (ChatGLM2+, GLM-4)
    qkv_layout: Literal["per_head", "grouped"] = "per_head"

    # --- positions ---
    # "2d":               ChatGLM-6B: first half of each head rotated by position ids, second half by block ids,
    #                     GPT-NeoX half-split layout.
    # "half_interleaved": ChatGLM2+/GLM-4: rotary on the first `rotary_dim` dims, interleaved pairs (x[2i], x[2i+1]).
    # "none":             the original GLM (no rotary; learned position tables, see position_embedding).
    # "1d":               GLM-130B: the whole head rotated by 1-D positions, GPT-NeoX half-split layout.
    # "half_split":       GLM-4.5/4.6/4.7 (glm4_moe): rotary on the first `rotary_dim` dims, GPT-NeoX half-split
    #                     layout (x[i] with x[i + rotary_dim/2]); the rest pass.
    rope: Literal["2d", "half_interleaved", "none", "1d", "half_split"] = "2d"
    rope_base: float = 10000.0
    rotary_dim: int | None = None  # half_interleaved / half_split; None = head_dim // 2
    # transformers' rope_parameters when they are not the default rotary: {"rope_type": "yarn", "factor": ...,
    # "original_max_position_embeddings": ..., optional beta_fast/beta_slow/mscale/mscale_all_dim/attention_factor}.
    rope_scaling: dict[str, Any] | None = None
    # ChatGLM-6B (and GLM-130B's SAT RotaryEmbedding) rounds inv_freq to fp16 and builds its cos/sin table in the
    # dtype that buffer has: fp16 as published ("table"), fp32 after .float() ("inv_freq": only inv_freq rounded),
    # bf16 after .bfloat16() ("table_bf16": positions, angles and table in bf16). The loader picks "inv_freq" for
    # an fp32 ChatGLM-6B and the published "table" otherwise (bf16 and GLM-130B in every dtype included, see
    # checkpoint.chatglm_rope_mode); "table_bf16" is only ever set by hand.
    rope_fp16: Literal["none", "inv_freq", "table", "table_bf16"] = "none"
    # "learned_2d": the original GLM (<= 10B): learned absolute + learned block-position tables (`max_seq_len + 1`
    # rows each, as THUDM's block_position_encoding builds them) added to the word embeddings; positions [B, 2, T].
    position_embedding: Literal["none", "learned_2d"] = "none"
    # "prefix_lm": ChatGLM-6B and GLM-130B, everything before <sop> sees everything before <sop>, causal after.
    attention: Literal["prefix_lm", "causal"] = "prefix_lm"
    # A query row whose mask hides every key (padding): "all" attends to every key as usual (ChatGLM's finite fill
    # keeps such rows finite too, their output is never used); "uniform" averages all values with equal weights,
    # as the original GLM's arithmetic mask S·M - 65504·(1 - M) makes every score of such a row the same.
    masked_row: Literal["all", "uniform"] = "all"

    # --- newer generations: GLM-4-0414 / Z1 (glm4), GLM-4.5/4.6/4.7 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite) ---
    # Sandwich norms (GLM-4-0414): the attention and MLP outputs pass an RMSNorm before the residual add.
    sandwich_norm: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary (GLM-4.5 `use_qk_norm`)
    # Mixture of experts (0 experts = every layer dense). Layer i is MoE where mlp_layer_types[i] == "sparse".
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_ffn_hidden_size: int = 0  # one routed expert's width; the shared expert is n_shared_experts times it
    n_shared_experts: int = 0
    n_group: int = 1  # experts are chosen from the topk_group best of n_group groups (group score: sum of top-2)
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    mlp_layer_types: list[str] | None = None  # "dense" | "sparse" per layer; None = all dense
    # Multi-token-prediction layers the checkpoint holds after the last layer (`num_nextn_predict_layers`); glmkit
    # reads and skips them unless `mtp` (load_model(mtp=True)) keeps them for self-speculative decoding
    # (glmkit.core.speculative).
    num_mtp_layers: int = 0
    mtp: bool = False
    # Multi-head latent attention (kv_lora_rank set; GLM-4.7-Flash): q through an optional q_lora_rank bottleneck,
    # keys/values from one kv_lora_rank latent plus a shared rotary key of qk_rope_head_dim. The KV cache holds the
    # latent row [latent | rotary key], so for MLA num_kv_heads is 1 and head_dim is kv_lora_rank + qk_rope_head_dim
    # (the from_hf_config reader sets both).
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    # --- head ---
    tie_word_embeddings: bool = False

    # --- P-tuning v2 prefixes ---
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None  # width of the projection MLP; None = hidden_size

    # --- special tokens (ids come from the checkpoint) ---
    bos_token_id: int | None = 130004  # ChatGLM-6B <sop>
    eos_token_id: int | list[int] | None = 130005  # <eop>
    pad_token_id: int | None = 3
    mask_token_id: int | None = 130000
    gmask_token_id: int | None = 130001
    smask_token_id: int | None = None  # GLM-130B's [sMASK] (it generates for [MASK], else [sMASK], else [gMASK])

    # --- bookkeeping ---
    torch_dtype: str = "float32"
    # glm: THUDM's original GLM (ACL 2022); glm130b: GLM-130B (SwissArmyTransformer checkpoints, core/sat.py)
    family: Literal["chatglm", "chatglm2", "glm4", "glm", "glm130b"] = "chatglm"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # unrecognised config.json fields, kept for save

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope == "2d":
            if self.head_dim % 4:
                raise ConfigError(f"2D rotary needs head_dim divisible by 4, got {self.head_dim}")
            if self.qkv_layout == "per_head" and self.num_kv_heads != self.num_heads:
                raise ConfigError("the per-head qkv layout has no grouped KV heads")
        if (self.position_embedding == "learned_2d") != (self.rope == "none"):
            raise ConfigError("learned 2D position tables go with rope='none' (the original GLM) and only with it; got "
                              f"position_embedding={self.position_embedding!r}, rope={self.rope!r}")
        if self.rope == "1d" and self.rotary_dim not in (None, self.head_dim):
            raise ConfigError(f"rope='1d' rotates the whole head: rotary_dim must be head_dim {self.head_dim}")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim if self.rope == "1d" else self.head_dim // 2
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and at most head_dim {self.head_dim}")
        if self.pre_seq_len is not None and self.pre_seq_len < 0:
            raise ConfigError(f"pre_seq_len must be >= 0, got {self.pre_seq_len}")
        if self.alpha_num_layers is not None and self.alpha_num_layers <= 0:
            raise ConfigError(f"alpha_num_layers must be positive, got {self.alpha_num_layers}")
        self._check_newer_generations()
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def _check_newer_generations(self) -> None:
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got "
                                  f"{self.num_experts_per_tok}")
            if self.moe_ffn_hidden_size <= 0:
                raise ConfigError("an MoE config needs moe_ffn_hidden_size > 0")
            if self.n_group <= 0 or self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"n_group {self.n_group} must divide num_experts {self.num_experts} and topk_group "
                                  f"{self.topk_group} lie in [1, n_group]")
            if self.num_experts // self.n_group < 2:
                raise ConfigError("each expert group needs at least 2 experts (group scores sum the top 2)")
            if self.topk_group * (self.num_experts // self.n_group) < self.num_experts_per_tok:
                raise ConfigError("topk_group groups hold fewer experts than num_experts_per_tok")
        if self.mlp_layer_types is not None:
            if len(self.mlp_layer_types) != self.num_layers or set(self.mlp_layer_types) - {"dense", "sparse"}:
                raise ConfigError(f"mlp_layer_types must list 'dense' or 'sparse' for each of the {self.num_layers} "
                                  f"layers, got {self.mlp_layer_types}")
            if "sparse" in self.mlp_layer_types and not self.num_experts:
                raise ConfigError("mlp_layer_types has sparse layers but num_experts is 0")
        if self.kv_lora_rank is not None:
            if min(self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim) <= 0:
                raise ConfigError("multi-head latent attention needs positive kv_lora_rank, qk_nope_head_dim, "
                                  "qk_rope_head_dim and v_head_dim")
            if self.num_kv_heads != 1 or self.head_dim != self.kv_lora_rank + self.qk_rope_head_dim:
                raise ConfigError("with multi-head latent attention the cache holds one latent row: num_kv_heads "
                                  "must be 1 and head_dim kv_lora_rank + qk_rope_head_dim")
            if self.rotary_dim != self.qk_rope_head_dim:
                raise ConfigError(f"MLA rotates qk_rope_head_dim={self.qk_rope_head_dim} dims; rotary_dim is "
                                  f"{self.rotary_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind != "yarn" or "factor" not in self.rope_scaling or \
                    "original_max_position_embeddings" not in self.rope_scaling:
                raise ConfigError(f"rope_scaling supports YaRN ({{'rope_type': 'yarn', 'factor', "
                                  f"'original_max_position_embeddings'}}), got {self.rope_scaling}")

    # ------------------------------------------------------------------ derived
    def is_moe_layer(self, i: int) -> bool:
        if self.mlp_layer_types is not None and i >= len(self.mlp_layer_types):  # an MTP layer: MoE in a MoE model
            return self.num_experts > 0
        return self.mlp_layer_types is not None and self.mlp_layer_types[i] == "sparse"

    @property
    def deepnorm_alpha(self) -> float:
        if self.residual != "deepnorm":
            return 1.0
        return (2 * (self.alpha_num_layers or self.num_layers)) ** 0.5

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def qkv_out_features(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GLMConfig:
        if name in HF_PRESETS:  # the newer generations: their config.json, read as a checkpoint's is
            return dataclasses.replace(cls.from_hf_config(HF_PRESETS[name]), name=name, **overrides)
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted([*PRESETS, *HF_PRESETS]))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown GLMConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> GLMConfig:
        """Reads a published config.json (any GLM layout) into a GLMConfig."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if _is_thudm_glm(hf, archs):
            return _from_thudm_glm(hf)
        if "GlmForCausalLM" in archs or (model_type == "glm" and "num_hidden_layers" in hf):
            return _from_transformers_glm(hf)
        if model_type == "glm":
            raise ConfigError("config.json says model_type 'glm' but is neither THUDM's original GLM (GLMModel / "
                              "GLMForConditionalGeneration: num_layers, max_sequence_length, block_position_encoding) "
                              "nor transformers' GLM-4 (GlmForCausalLM: num_hidden_layers, intermediate_size)")
        if model_type == "chatglm" or any(a.startswith("ChatGLM") for a in archs):
            if "multi_query_attention" in hf or "rmsnorm" in hf or "padded_vocab_size" in hf:
                return _from_chatglm2(hf)
            if "position_encoding_2d" in hf or "inner_hidden_size" in hf:
                return _from_chatglm1(hf)
            raise ConfigError("config.json says model_type 'chatglm' but matches neither the ChatGLM-6B nor the "
                              "ChatGLM2/3/GLM-4 layout (no position_encoding_2d / multi_query_attention fields)")
        if model_type in ("glm4", "glm4_moe", "glm4_moe_lite"):
            return _from_glm4x(hf, model_type)
        if model_type == "glmkit":
            return cls.from_dict({k: v for k, v in hf.items() if k != "model_type"})
        raise ConfigError(f"unsupported model_type {model_type!r} (architectures {archs}); glmkit loads 'chatglm' "
                          "(ChatGLM-6B, ChatGLM2/3-6B, GLM-4 THUDM layout), 'glm' (transformers GlmForCausalLM, "
                          "or THUDM's original GLM: glm-large-chinese, glm-2b, glm-10b, glm-10b-chinese), 'glm4' "
                          "(GLM-4-0414, GLM-Z1), 'glm4_moe' (GLM-4.5/4.6/4.7) and 'glm4_moe_lite' (GLM-4.7-Flash)")

    @classmethod
    def from_file(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no config file at {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_hf_config(data) if "model_type" in data and data["model_type"] != "glmkit" else (
            cls.from_dict({k: v for k, v in data.items() if k != "model_type"}))


def _require(hf: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required fields {missing}")


def _from_chatglm1(hf: dict[str, Any]) -> GLMConfig:
    _require(hf, "hidden_size", "num_layers", "num_attention_heads", "vocab_size")
    if not hf.get("position_encoding_2d", True):
        raise ConfigError("ChatGLM-6B with position_encoding_2d=false is not a published model; unsupported")
    hidden = hf["hidden_size"]
    return GLMConfig(
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_layers"],
        num_heads=hf["num_attention_heads"], ffn_hidden_size=hf.get("inner_hidden_size") or 4 * hidden,
        max_seq_len=hf.get("max_sequence_length", 2048), norm="layernorm", norm_eps=hf.get("layernorm_epsilon", 1e-5),
        residual="deepnorm", alpha_num_layers=CHATGLM_V1_ALPHA_LAYERS, mlp="gelu", qkv_bias=True, proj_bias=True,
        mlp_bias=True, qkv_layout="per_head", rope="2d", rope_base=10000.0, rope_fp16="table", attention="prefix_lm", tie_word_embeddings=False,
        pre_seq_len=hf.get("pre_seq_len"), prefix_projection=bool(hf.get("prefix_projection", False)),
        bos_token_id=hf.get("bos_token_id", 130004), eos_token_id=hf.get("eos_token_id", 130005),
        pad_token_id=hf.get("pad_token_id", 3), mask_token_id=hf.get("mask_token_id", 130000),
        gmask_token_id=hf.get("gmask_token_id", 130001), torch_dtype=_dtype_name(hf), family="chatglm",
        extra={"quantization_bit": hf.get("quantization_bit", 0)},
    )


def _from_chatglm2(hf: dict[str, Any]) -> GLMConfig:
    _require(hf, "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("kv_channels") or hf["hidden_size"] // heads
    kv_heads = hf.get("multi_query_group_num", heads) if hf.get("multi_query_attention", False) else heads
    if hf.get("apply_residual_connection_post_layernorm", False):
        raise ConfigError("apply_residual_connection_post_layernorm=true is not used by any published model")
    if not hf.get("post_layer_norm", True):
        raise ConfigError("post_layer_norm=false is not used by any published model")
    vocab = hf.get("padded_vocab_size") or hf.get("vocab_size")
    if vocab is None:
        raise ConfigError("config.json lacks padded_vocab_size / vocab_size")
    rope_ratio = float(hf.get("rope_ratio", 1.0))
    is_glm4 = vocab >= 150000
    add_bias_linear = bool(hf.get("add_bias_linear", False))
    return GLMConfig(
        vocab_size=vocab, hidden_size=hf["hidden_size"], num_layers=hf["num_layers"], num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, ffn_hidden_size=hf["ffn_hidden_size"],
        max_seq_len=hf.get("seq_length", 32768), norm="rmsnorm" if hf.get("rmsnorm", True) else "layernorm",
        norm_eps=hf.get("layernorm_epsilon", 1e-5), residual="prenorm", mlp="swiglu",
        qkv_bias=bool(hf.get("add_qkv_bias", False)) or add_bias_linear, proj_bias=add_bias_linear,
        mlp_bias=add_bias_linear, qkv_layout="grouped", rope="half_interleaved", rope_base=10000.0 * rope_ratio,
        rotary_dim=head_dim // 2, rope_fp16="none", attention="causal",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pre_seq_len=hf.get("pre_seq_len"), prefix_projection=bool(hf.get("prefix_projection", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id", 2), pad_token_id=hf.get("pad_token_id", 0),
        mask_token_id=None, gmask_token_id=None, torch_dtype=_dtype_name(hf), family="glm4" if is_glm4 else "chatglm2",
        extra={"quantization_bit": hf.get("quantization_bit", 0)},
    )


THUDM_GLM_ARCHITECTURES = ("GLMModel", "GLMForConditionalGeneration", "GLMForMultipleChoice",
                           "GLMForSequenceClassification")


def _is_thudm_glm(hf: dict[str, Any], archs: list[str]) -> bool:
    """THUDM's original GLM (hub `configuration_glm.py`): its architectures, or a 'glm' config with its fields."""
    if any(a in THUDM_GLM_ARCHITECTURES for a in archs):
        return True
    return hf.get("model_type") == "glm" and "num_hidden_layers" not in hf and any(
        k in hf for k in ("block_position_encoding", "max_sequence_length", "output_predict"))


def _from_thudm_glm(hf: dict[str, Any]) -> GLMConfig:
    """THUDM's original GLM as its hub code builds it (modeling_glm.py): Pre-LN layers with LayerNorm eps 1e-5 (the
    code never passes the config's layernorm_epsilon on), fused qkv split as [all q | all k | all v], the exact GELU,
    learned position + block-position tables of max_sequence_length + 1 rows, logits tied to the word embeddings."""
    _require(hf, "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")
    if not hf.get("block_position_encoding", True):
        raise ConfigError("block_position_encoding=false is not a published GLM (the hub code's own default positions "
                          "need the block-position table); unsupported")
    if not hf.get("output_predict", False):
        raise ConfigError("output_predict=false: this GLM has no language-model head (the hub's "
                          "GLMForSequenceClassification layout); glmkit loads GLM language models")
    hidden = hf["hidden_size"]
    return GLMConfig(
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_layers"],
        num_heads=hf["num_attention_heads"], ffn_hidden_size=4 * hidden, max_seq_len=hf["max_sequence_length"],
        norm="layernorm", norm_eps=1e-5, residual="prenorm", mlp="gelu_erf", qkv_bias=True, proj_bias=True,
        mlp_bias=True, qkv_layout="grouped", rope="none", position_embedding="learned_2d", attention="causal",
        masked_row="uniform", tie_word_embeddings=True, pre_seq_len=hf.get("pre_seq_len"),
        prefix_projection=bool(hf.get("prefix_projection", False)), bos_token_id=None,
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"), mask_token_id=None,
        gmask_token_id=None, torch_dtype=_dtype_name(hf), family="glm",
        extra={"hf_config": {k: v for k, v in hf.items() if k not in ("torch_dtype", "pre_seq_len",
                                                                       "prefix_projection")}},
    )


def _from_transformers_glm(hf: dict[str, Any]) -> GLMConfig:
    _require(hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only the default rotary embedding)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (GLM uses silu)")
    rotary_dim = int(head_dim * factor)
    return GLMConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        ffn_hidden_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 131072),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1.5625e-7), residual="prenorm", mlp="swiglu",
        qkv_bias=bool(hf.get("attention_bias", True)), proj_bias=False, mlp_bias=False, qkv_layout="grouped",
        rope="half_interleaved", rope_base=float(theta), rotary_dim=rotary_dim - rotary_dim % 2, rope_fp16="none",
        attention="causal", tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pre_seq_len=None, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), mask_token_id=None, gmask_token_id=None, torch_dtype=_dtype_name(hf),
        family="glm4", extra={"hf_layout": "glm"},
    )


GLM4X_LAYOUTS = ("glm4", "glm4_moe", "glm4_moe_lite")  # transformers' model types of the newer generations


def _rope_fields(hf: dict[str, Any], default_factor: float) -> tuple[float, float, dict[str, Any] | None]:
    """(rope_theta, partial_rotary_factor, YaRN parameters or None) from transformers' rope_parameters (5.x) or the
    older top-level rope_theta / partial_rotary_factor / rope_scaling."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    factor = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_factor)))
    if kind in ("default", None):
        return theta, factor, None
    if kind != "yarn":
        raise ConfigError(f"rope_type {kind!r} is not supported (the default rotary embedding and YaRN are)")
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
    scaling["rope_type"] = "yarn"
    if scaling.get("factor") is None:
        scaling["factor"] = hf.get("max_position_embeddings") / scaling["original_max_position_embeddings"]
    return theta, factor, scaling


def _from_glm4x(hf: dict[str, Any], model_type: str) -> GLMConfig:
    """transformers' glm4 (GLM-4-0414, GLM-Z1), glm4_moe (GLM-4.5/4.6/4.7) and glm4_moe_lite (GLM-4.7-Flash), with
    transformers 5.25's defaults for fields a config.json leaves out (configuration_glm4*.py)."""
    _require(hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (GLM uses silu)")
    moe, lite = model_type != "glm4", model_type == "glm4_moe_lite"
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    theta, factor, yarn = _rope_fields(hf, 1.0 if lite else 0.5)
    fields: dict[str, Any] = {}
    if lite:
        _require(hf, "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
        rope_dim = hf["qk_rope_head_dim"]
        fields.update(q_lora_rank=hf.get("q_lora_rank", 768), kv_lora_rank=hf["kv_lora_rank"],
                      qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=rope_dim, v_head_dim=hf["v_head_dim"],
                      num_kv_heads=1, head_dim=hf["kv_lora_rank"] + rope_dim, rotary_dim=int(rope_dim * factor),
                      rope="half_interleaved" if hf.get("rope_interleave", True) else "half_split")
        if fields["rotary_dim"] != rope_dim:
            raise ConfigError("multi-head latent attention with partial_rotary_factor != 1 is not a published model")
        if hf.get("first_k_dense_replace") is not None and hf.get("mlp_layer_types") is None:
            types = ["dense"] * hf["first_k_dense_replace"] + ["sparse"] * (layers - hf["first_k_dense_replace"])
        else:
            types = hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1)
    else:
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rotary_dim = int(head_dim * factor)
        fields.update(num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
                      rotary_dim=rotary_dim - rotary_dim % 2, rope="half_split" if moe else "half_interleaved",
                      qk_norm=bool(hf.get("use_qk_norm", False)), sandwich_norm=not moe)
        dense = hf.get("first_k_dense_replace", 1)
        types = ["dense"] * min(dense, layers) + ["sparse"] * max(layers - dense, 0) if moe else None
    if moe:
        fields.update(num_experts=hf.get("n_routed_experts", 64 if lite else 128),
                      num_experts_per_tok=hf.get("num_experts_per_tok", 4 if lite else 8),
                      moe_ffn_hidden_size=hf.get("moe_intermediate_size", 1536 if lite else 1408),
                      n_shared_experts=hf.get("n_shared_experts", 1), n_group=hf.get("n_group", 1),
                      topk_group=hf.get("topk_group", 1), norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.8 if lite else 1.0)),
                      mlp_layer_types=types, num_mtp_layers=int(hf.get("num_nextn_predict_layers", 0) or 0))
    if model_type == "glm4":
        eos = hf.get("eos_token_id", [151329, 151336, 151338])
    else:
        eos = hf.get("eos_token_id", 1 if lite else None)
    return GLMConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=layers, num_heads=heads,
        ffn_hidden_size=hf.get("intermediate_size", 10240 if lite else 10944),
        max_seq_len=hf.get("max_position_embeddings", 202752 if lite else 131072), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-5 if moe else 1.5625e-7), residual="prenorm", mlp="swiglu",
        qkv_bias=bool(hf.get("attention_bias", not moe)), proj_bias=lite and bool(hf.get("attention_bias", False)),
        mlp_bias=False, qkv_layout="grouped", rope_base=theta, rope_scaling=yarn, rope_fp16="none",
        attention="causal", tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), pre_seq_len=None,
        bos_token_id=hf.get("bos_token_id", 0 if lite else None), eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id", 151329 if model_type == "glm4" else None), mask_token_id=None,
        gmask_token_id=None, torch_dtype=_dtype_name(hf), family="glm4",
        extra={"hf_layout": model_type, "hf_config": {k: v for k, v in hf.items() if k != "transformers_version"}},
        **fields,
    )


def _dtype_name(hf: dict[str, Any]) -> str:
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(name), str(name))
    if name not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"unsupported torch_dtype {name!r}")
    return name
