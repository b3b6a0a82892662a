"""`glmkit.load_model` / `glmkit.save_model`: a checkpoint folder (or the bundled model, or a Hugging Face id) to a
ready model and back, with the plug-ins applied: quantization while loading and P-tuning/LoRA adapters.

Reading the files is glmkit.core.checkpoint's: the model is built on the meta device and tensors are streamed in one
at a time, so peak memory stays near the final model size (below it when quantizing while loading).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from glmkit.adapters.lora import load_lora_adapter
from glmkit.adapters.ptuning import PREFIX_KEY, attach_prefix
from glmkit.core.atomic import atomic_dir
from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.checkpoint import (
    CheckpointError,
    as_dtype,
    assign,
    chatglm_rope_mode,
    default_dtype,
    finish,
    iter_tensors,
    read_hf_config,
    safetensors_metadata,
    stream_into,
    weight_files,
)
from glmkit.core.config import CHATGLM_V1_ALPHA_LAYERS, GLM4X_LAYOUTS, ConfigError, GLMConfig
from glmkit.core.convert import (
    converter_for,
    to_hf_config,
    to_hf_glm4x_config,
    to_hf_glm4x_state_dict,
    to_thudm_state_dict,
)
from glmkit.core.hub import resolve_model_dir
from glmkit.core.sat import is_sat_checkpoint, iter_sat_tensors, read_sat_config, sat_quantization
from glmkit.quant.formats import QUANT_KEY, default_spec, head_spec, quantization_spec, saved_layout_is_native
from glmkit.quant.linear import QuantizedLinear
from glmkit.quant.saving import save_quantized
from glmkit.quant.transform import prepare_model, tie_quantized_head
from glmkit.quant.sharded import prepare_sat_model, sat_spec


# ------------------------------------------------------------------------------------------------ loading
def load_model(path_or_id: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
               adapter: str | os.PathLike | None = None, quantize: str | None = None, group_size: int | None = None,
               scheme: str | None = None, quantize_head: str | None = None, tensor_parallel: bool = False,
               mtp: bool = False):
    """Loads a GLM-family checkpoint folder (or bundled name, or Hugging Face id) as a GLMForCausalLM.

    dtype: torch dtype or name; default = config.json's torch_dtype, as transformers does with
    torch_dtype="auto", except that a float16 checkpoint loaded onto the CPU runs in bfloat16 (see
    `default_dtype`); an explicit dtype= always wins. adapter: a P-tuning or LoRA folder applied on top.
    quantize: "int8" | "int4" quantizes the four linears of every layer while loading, shard by shard, and the
    output layer and embedding as quantize_head says: "int8", "int4", or "none" (kept in floating point); by default
    "none" for int8 (the original's quantize(8) keeps them in floating point) and "int8" for int4. A checkpoint saved quantized (`glmkit quantize`, save_model) loads as it was saved, memory-mapped.
    GLM-130B's SwissArmyTransformer folders (`latest` + `<iteration>/mp_rank_XX_model_states.pt`, any
    tensor-parallel degree, float or quantized by its convert_tp.py) load merged (glmkit.core.sat).
    tensor_parallel=True (under torchrun, one process per device): each rank loads only its shard of the heads, MLP
    columns and vocabulary and the ranks compute together through torch.distributed (glmkit.distributed).
    mtp=True keeps GLM-4.5's multi-token-prediction layers (`model.mtp`, kept in floating point under quantize=) for
    self-speculative decoding (glmkit.core.speculative.generate_mtp); by default they are read and dropped.
    """
    folder = resolve_model_dir(path_or_id)
    if tensor_parallel:
        if mtp:
            raise ValueError("mtp=True is not supported with tensor_parallel=True")
        if adapter is not None:
            raise ValueError("adapters are not supported with tensor_parallel=True")
        from glmkit.distributed.tp import load_tensor_parallel

        model = load_tensor_parallel(folder, dtype=dtype, device=device, quantize=quantize, group_size=group_size,
                                     scheme=scheme)
        model.name_or_path = str(path_or_id)
        return model
    sat = is_sat_checkpoint(folder)
    if sat:
        hf, config, files = {}, read_sat_config(folder), []
    else:
        hf = read_hf_config(folder)
        try:
            config = GLMConfig.from_hf_config(hf)
        except ConfigError as e:
            raise ConfigError(f"{folder / 'config.json'}: {e}") from None
        files = weight_files(folder)
    if mtp:
        if not config.num_mtp_layers:
            raise ValueError(f"mtp=True: {folder} has no multi-token-prediction layers (num_nextn_predict_layers)")
        config.mtp = True
    target_dtype = as_dtype(dtype) if dtype is not None else default_dtype(config.torch_dtype, device)
    config.torch_dtype = str(target_dtype).removeprefix("torch.")

    with torch.device("meta"):
        model = GLMForCausalLM(config)
        if config.pre_seq_len:  # P-tuning weights merged into the checkpoint
            attach_prefix(model, config.pre_seq_len, config.prefix_projection, config.prefix_hidden_size)

    sat_quant = sat_quantization(config)  # GLM-130B quantized by its convert_tp.py
    if sat_quant is not None:
        if quantize is not None:
            raise ValueError("this GLM-130B checkpoint is already quantized (convert_tp.py); load it without quantize=")
        quant_spec = sat_spec(sat_quant["bits"])
        prepare_sat_model(model, sat_quant["bits"], sat_quant["row_parallel_groups"])
    else:
        quant_spec = _quantization_spec(hf, files, quantize, group_size, scheme, quantize_head)
        if quant_spec is not None:
            prepare_model(model, quant_spec)
    if quant_spec is not None:
        config.extra["quantization"] = quant_spec

    converter = converter_for(config, hf)
    defer = _quantized_weight_names(model, converter) if quant_spec is not None else None
    # glmkit's saved quantized models hold the runtime layout: map the file and take its tensors without a copy
    mapped = (quant_spec is not None and quantize is None and torch.device(device).type == "cpu"
              and saved_layout_is_native(quant_spec) and bool(hf.get(QUANT_KEY) or _glmkit_metadata(files)))
    tensors = iter_sat_tensors(folder) if sat else iter_tensors(files, defer, mapped=mapped)
    stream_into(model, converter, tensors, target_dtype, source=folder)
    if getattr(converter, "skipped_mtp", None):  # GLM-4.5's multi-token-prediction layers: read, not used
        config.extra["mtp_tensors_skipped"] = len(converter.skipped_mtp)
        logging.getLogger("glmkit").info("%s: skipped %d tensors of %d multi-token-prediction layer(s) (not used "
                                         "for decoding)", folder, len(converter.skipped_mtp), config.num_mtp_layers)
    if config.rope in ("2d", "1d"):  # ChatGLM-6B's and SAT's fp16 inv_freq buffer, as the model's dtype makes it
        config.rope_fp16 = chatglm_rope_mode(target_dtype, config.rope)
    tie_quantized_head(model)
    finish(model, converter, folder)

    if adapter is not None:
        load_adapter(model, adapter, dtype=target_dtype)
    model.to(device)
    model.eval()
    model.name_or_path = str(path_or_id)
    return model


def load_adapter(model: nn.Module, adapter: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Applies a P-tuning v2 folder (ChatGLM's layout) or a LoRA folder (PEFT's layout) to a loaded model."""
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if (folder / "adapter_config.json").exists():
        return load_lora_adapter(model, folder)
    hf = read_hf_config(folder)
    pre_seq_len = hf.get("pre_seq_len")
    if not pre_seq_len:
        raise CheckpointError(f"{folder} is neither a LoRA folder (adapter_config.json) nor a P-tuning folder "
                              "(config.json with pre_seq_len)")
    with torch.device("meta"):
        encoder = attach_prefix(model, int(pre_seq_len), bool(hf.get("prefix_projection", False)))
    files = weight_files(folder)
    dtype = dtype or model.dtype
    loaded = set()
    for name, tensor in iter_tensors(files):
        if not name.startswith(PREFIX_KEY):
            raise CheckpointError(f"{folder}: a P-tuning checkpoint holds only {PREFIX_KEY}* weights, found {name!r}")
        assign(model, "prefix_encoder." + name[len(PREFIX_KEY):], tensor, dtype)
        loaded.add(name)
    expected = {PREFIX_KEY + k for k in encoder.state_dict()}
    if loaded != expected:
        raise CheckpointError(f"{folder}: prefix weights missing {sorted(expected - loaded)}, "
                              f"unexpected {sorted(loaded - expected)}")
    return model


def _glmkit_metadata(files) -> bool:
    return QUANT_KEY in (safetensors_metadata(files) or {})


def _quantization_spec(hf, files, quantize, group_size, scheme, quantize_head=None):
    pre = quantization_spec(hf, safetensors_metadata(files))  # THUDM quantization_bit or glmkit metadata
    if quantize is None:
        if quantize_head is not None:
            raise ValueError("quantize_head= applies when quantizing while loading (quantize='int8' or 'int4'); a "
                             "checkpoint saved quantized keeps its own")
        return pre
    if pre is not None:
        raise ValueError("this checkpoint is already quantized; load it without quantize=")
    bits = {"int8": 8, "int4": 4, "8": 8, "4": 4, 8: 8, 4: 4}.get(quantize)
    if bits is None:
        raise ValueError(f"quantize must be 'int8' or 'int4', got {quantize!r}")
    spec = default_spec(bits, group_size=group_size, scheme=scheme)
    spec["head"] = head_spec(quantize_head, bits)
    return spec


def _quantized_weight_names(model: nn.Module, converter) -> Callable[[str], bool]:
    """The predicate "this checkpoint tensor is the float weight of a layer quantized while loading", for
    tensors the converter hands over unchanged: those are read a block of rows at a time."""
    def defer(name: str) -> bool:
        target = converter.passthrough_target(name)
        if not target or not target.endswith(".weight"):
            return False
        try:
            module = model.get_submodule(target.removesuffix(".weight"))
        except AttributeError:
            return False
        return isinstance(module, QuantizedLinear)

    return defer


# ------------------------------------------------------------------------------------------------ saving
def save_model(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None,
               max_shard_bytes: int | None = None) -> Path:
    """Writes a THUDM-layout folder (config.json + model.safetensors, sharded if asked) that glmkit and the
    original code both load; adds the tokenizer files when a tokenizer is given."""
    with atomic_dir(out_dir) as tmp:  # out_dir stays the previous complete folder until this one is
        _save_model(model, tmp, tokenizer, dtype, max_shard_bytes)
    return Path(out_dir)


def _save_model(model: nn.Module, out: Path, tokenizer, dtype, max_shard_bytes) -> None:
    from safetensors.torch import save_file

    config: GLMConfig = model.config
    if config.extra.get("quantization"):  # quantized layers have their own portable format and metadata
        save_quantized(model, out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return
    sd = {}
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().cpu()
        keep_fp32 = ".mlp.router." in name  # GLM-4.5's router stays fp32, as on the hub
        sd[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() and not keep_fp32 else t).contiguous()
    glm4x = config.extra.get("hf_layout") in GLM4X_LAYOUTS  # transformers' layout: there is no THUDM one
    sd = to_hf_glm4x_state_dict(sd, config) if glm4x else to_thudm_state_dict(sd, config)
    if glm4x:
        hf = to_hf_glm4x_config(config)
    elif config.family == "chatglm" and config.alpha_num_layers != CHATGLM_V1_ALPHA_LAYERS:
        # ChatGLM-6B's code fixes α at √56 (GLMBlock's num_layers=28 default), so its config.json cannot state another α: such a
        # model is written with glmkit's own config (model_type "glmkit"), which only glmkit loads.
        hf = {"model_type": "glmkit", **config.to_dict()}
    else:
        hf = to_hf_config(config)
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    if max_shard_bytes:
        shards, current, size = [], {}, 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[k] = v
            size += nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    else:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
