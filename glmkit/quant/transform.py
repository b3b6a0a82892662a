"""Model transforms: the quantized layers put into a GLM model, either empty for a checkpoint to fill
(`prepare_model`: quantize-on-load, pre-quantized checkpoints) or from its float weights (`quantize_model`,
`quantize_head`).

What is quantized: every nn.Linear inside the layers (`layer_linears`; for GLM/ChatGLM/GLM-4 the four `attn.qkv`,
`attn.proj`, `mlp.fc`, `mlp.proj`, THUDM's query_key_value, dense, dense_h_to_4h, dense_4h_to_h, as in GLM-130B and
ChatGLM-6B; for the MoE generations also every routed and shared expert's, and the latent attention's q_a/q_b/q/kv_a
projections), except those FLOAT_LINEARS names, and by default also the
output layer and the embedding (the "head", INT8 by default whatever the layers' bits; ``head="int4"`` or
``"none"`` to choose). The output layer is read whole for every token: ChatGLM-6B's 130528x4096 one is 1.07 GB
in bf16, more than a quarter of an INT4 model's bytes per token. A tied model (ChatGLM-6B) keeps one quantized
table (`QuantizedEmbedding`) that serves the lookup (rows dequantized) and the logits matmul (the INT8/INT4
kernels). INT8 is the default because the output layer sets the next token directly: on glm-tiny an INT4 head
took an INT4 model's logits error from 0.0133 to 0.0542, an INT8 one to 0.0138 (benchmarks/accuracy.py). Norms
and biases stay in floating point (tiny).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from glmkit.quant import kernels
from glmkit.quant.formats import default_spec, head_spec, validate_spec
from glmkit.quant.kernels import release_freed_memory
from glmkit.quant.linear import QuantizedEmbedding, QuantizedLinear

# The four linears of a GLM/ChatGLM/GLM-4 layer (THUDM's query_key_value, dense, dense_h_to_4h, dense_4h_to_h).
QUANTIZED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
# Linears inside a layer that stay in floating point, by their last name. MLAttention.kv_b: the absorbed latent
# attention reads its weight as a tensor for every step (q_nope·W_uk, W_uv·out), so a quantized one would be
# dequantized per token; it is small (kv_lora_rank x heads·(nope + v)). GLM-4.5's router is not an nn.Linear (an
# fp32 weight that Router keeps fp32) and norms are not linears, so neither is ever picked.
FLOAT_LINEARS = ("kv_b",)


def layer_linears(model: nn.Module):
    """(name, parent, attribute, module) of every linear inside the layers that is quantized: each nn.Linear (or
    already QuantizedLinear) under `h.N` but FLOAT_LINEARS, in module order: for a MoE layer the routed experts
    (`mlp.experts.E.fc`/`.proj`) and the shared expert (`mlp.shared.*`), for latent attention `attn.q_a`, `q_b` (or
    `q`), `kv_a` and `proj`."""
    blocks = getattr(model, "h", None)
    if blocks is None:
        raise ValueError("model has no .h block list (expected a glmkit GLM model)")
    for i, block in enumerate(blocks):
        for path, module in block.named_modules():
            if not isinstance(module, (nn.Linear, QuantizedLinear)):
                continue
            parent_name, _, attr = path.rpartition(".")
            if attr in FLOAT_LINEARS or any(part.startswith("lora_") for part in path.split(".")):
                continue  # LoRA's own A/B matrices (PEFT's lora_A/lora_B) stay float
            parent = block.get_submodule(parent_name) if parent_name else block
            yield f"h.{i}.{path}", parent, attr, module


def _model_dtype(model: nn.Module) -> torch.dtype:
    config = getattr(model, "config", None)
    name = getattr(config, "torch_dtype", None)
    if isinstance(name, str) and hasattr(torch, name):
        return getattr(torch, name)
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def prepare_model(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Swaps the linears of every layer (layer_linears) for empty QuantizedLinear modules (no allocation), ready for
    ``load_weight_tensor``, and with a ``head`` in the spec the embedding and output layer for QuantizedEmbedding /
    QuantizedLinear (one QuantizedEmbedding for both when they are tied). Call on a model built on the meta device
    (the loader does)."""
    spec = validate_spec(spec, "prepare_model")
    dtype = _model_dtype(model)
    block = spec.get("int4pack_block")
    for name, parent, attr, linear in layer_linears(model):
        if isinstance(linear, QuantizedLinear):
            raise ValueError(f"{name} is already quantized")
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, expected nn.Linear")
        q = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, bits=spec["bits"],
                            scheme=spec["scheme"], group_size=spec["group_size"], symmetric=spec["symmetric"],
                            dtype=dtype, int4pack_block=block)
        setattr(parent, attr, q)
    head = spec.get("head")
    if head is not None:
        wte, lm_head = model.wte, model.lm_head
        if isinstance(wte, QuantizedLinear) or isinstance(lm_head, QuantizedLinear):
            raise ValueError("the embedding / output layer is already quantized")
        kw = dict(bits=head["bits"], scheme=head["scheme"], group_size=head["group_size"],
                  symmetric=head["symmetric"], dtype=dtype, int4pack_block=block)
        table = QuantizedEmbedding(wte.num_embeddings, wte.embedding_dim, **kw)
        model.wte = table
        if lm_head.weight is wte.weight:  # tied: one table in both roles
            model.lm_head = table
        else:
            model.lm_head = QuantizedLinear(lm_head.in_features, lm_head.out_features, lm_head.bias is not None,
                                            **kw)
    record_spec(model, spec)
    return model


def tie_quantized_head(model: nn.Module) -> bool:
    """After loading: a quantized output layer that the checkpoint did not fill takes the quantized embedding
    table (ChatGLM-6B checkpoints may leave `lm_head` out; glmkit.core.checkpoint.finish ties float ones). True
    when it tied."""
    head, wte = getattr(model, "lm_head", None), getattr(model, "wte", None)
    if not (isinstance(head, QuantizedLinear) and isinstance(wte, QuantizedEmbedding)) or head is wte:
        return False
    config = model.config
    if head.is_loaded or not wte.is_loaded or not (config.tie_word_embeddings or config.family == "chatglm"):
        return False
    model.lm_head = wte
    config.tie_word_embeddings = True
    return True


def quantize_head(model: nn.Module, head: str | dict | None = None, bits: int = 4) -> nn.Module:
    """Quantizes the embedding and output layer of a materialised model in place (`head` as in head_spec: "int8",
    "int4", "none", or None for the default of `bits`-bit layers); tied ones become one QuantizedEmbedding."""
    spec = head_spec(head, bits)
    if spec is None:
        return model
    wte, lm_head = model.wte, model.lm_head
    if isinstance(wte, QuantizedLinear) or isinstance(lm_head, QuantizedLinear):
        raise ValueError("the embedding / output layer is already quantized")
    if wte.weight.is_meta:
        raise ValueError("the embedding is on the meta device; use prepare_model and load the weights instead")
    tied = lm_head.weight is wte.weight
    with torch.no_grad():
        table = QuantizedEmbedding.from_weight(wte.weight, spec)
        model.wte = table
        if tied:
            model.lm_head = table
        else:
            q = QuantizedLinear.from_linear(lm_head.cpu() if lm_head.weight.device.type != "cpu" else lm_head,
                                            spec["bits"], spec["scheme"], spec["group_size"], spec["symmetric"])
            model.lm_head = q.to(table.qweight.device)
    del wte, lm_head
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "extra") and config.extra.get("quantization"):
        config.extra["quantization"]["head"] = spec
    release_freed_memory()
    return model


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None, scheme: str | None = None,
                   symmetric: bool = False, head: str | dict | None = None) -> nn.Module:
    """Quantizes the linears of every layer (layer_linears) of a materialised float model in place (one layer at a time,
    each float weight freed as soon as its quantized form exists), and the embedding / output layer as `head`
    says (default as load_model's quantize= does: floating point under INT8 layers, INT8 under INT4)."""
    spec = default_spec(bits, group_size, scheme, symmetric)
    for name, parent, attr, linear in layer_linears(model):
        if isinstance(linear, QuantizedLinear):
            raise ValueError(f"{name} is already quantized")
        if linear.weight.is_meta:
            raise ValueError(f"{name} is on the meta device; use prepare_model and load the weights instead")
        device = linear.weight.device
        with torch.no_grad():
            q = QuantizedLinear.from_linear(linear.cpu() if device.type != "cpu" else linear, spec["bits"],
                                            spec["scheme"], spec["group_size"], spec["symmetric"])
        setattr(parent, attr, q.to(device))
        del linear
    spec["head"] = None
    record_spec(model, spec)
    quantize_head(model, head, bits)
    return model


def record_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "extra"):
        config.extra["quantization"] = dict(spec)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The quantization spec of a quantized model, read from its modules (the head included)."""
    for _, _, _, m in layer_linears(model):
        if isinstance(m, QuantizedLinear):
            spec = {"bits": m.bits, "scheme": m.scheme, "group_size": m.requested_group_size,
                    "symmetric": m.symmetric, "layout": "glmkit", "head": None}
            head = getattr(model, "lm_head", None)
            if isinstance(head, QuantizedLinear):
                spec["head"] = {"bits": head.bits, "scheme": head.scheme, "group_size": head.requested_group_size,
                                "symmetric": head.symmetric}
            if any(getattr(x, "layout", None) == "int4pack" for x in model.modules()):
                spec["int4pack_block"] = kernels.int4pack_block_n()
            return spec
        break
    raise ValueError("the model is not quantized (no QuantizedLinear in its layers); run quantize_model first")
