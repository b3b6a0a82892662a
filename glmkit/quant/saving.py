"""Saving a quantized model: `save_quantized` writes the folder `glmkit quantize` makes (config.json with the
spec, model.safetensors in THUDM tensor names (transformers' for glm4 / glm4_moe / glm4_moe_lite) through glmkit.core.safetensors_io.write_aligned, the tokenizer
files), which load_model maps back without quantizing again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from glmkit.core.atomic import atomic_dir
from glmkit.core.config import GLM4X_LAYOUTS
from glmkit.core.convert import to_hf_config, to_hf_glm4x_config, to_hf_glm4x_state_dict, to_thudm_state_dict
from glmkit.core.safetensors_io import write_aligned
from glmkit.quant.formats import QUANT_KEY
from glmkit.quant.linear import QuantizedLinear
from glmkit.quant.transform import model_spec


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """glmkit names -> tensors as `glmkit quantize` saves them: each quantized module in its saved form
    (QuantizedLinear.saved_tensors: the CPU kernel's layout as it is, else the portable one), the rest as in
    state_dict(). A module or tensor shared by two names (a tied embedding / output layer) is written once, under
    its first name (`wte`)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    done: list[str] = []  # prefixes of modules written whole
    for prefix, module in model.named_modules():  # shared modules come once (remove_duplicate)
        prefix = prefix + "." if prefix else ""
        if any(prefix.startswith(d) for d in done):
            continue
        if isinstance(module, QuantizedLinear):
            out.update({prefix + k: t.detach().cpu().contiguous() for k, t in module.saved_tensors().items()})
            done.append(prefix)
            continue
        if type(module)._save_to_state_dict is not nn.Module._save_to_state_dict:  # a module with its own format
            out.update({k: t.detach().cpu().contiguous() for k, t in module.state_dict(prefix=prefix).items()})
            done.append(prefix)
            continue
        tensors = list(module._parameters.items()) + [
            (k, b) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set]
        for k, t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            out[prefix + k] = t.detach().cpu().contiguous()
    return out


def save_quantized(model: nn.Module, out_dir: str | Path, src_dir: str | Path | None = None) -> Path:
    """Writes config.json (SRC's, or the model's own in THUDM layout, with the quantization key added) and
    model.safetensors in THUDM tensor names with the scheme in its metadata, plus SRC's tokenizer files."""
    with atomic_dir(out_dir) as out:  # out_dir stays the previous complete folder until this one is
        _save_quantized(model, out, src_dir)
    return Path(out_dir)


def _save_quantized(model: nn.Module, out: Path, src_dir: str | Path | None) -> None:
    spec = model_spec(model)
    config = model.config
    sd = quantized_state_dict(model)
    if getattr(config, "tie_word_embeddings", False):
        for name in [k for k in sd if k.startswith("lm_head.")]:
            del sd[name]
    glm4x = config.extra.get("hf_layout") in GLM4X_LAYOUTS  # transformers' names: there is no THUDM layout
    sd = to_hf_glm4x_state_dict(sd, config) if glm4x else to_thudm_state_dict(sd, config)
    src = Path(src_dir) if src_dir is not None else None
    if src is not None and (src / "config.json").is_file():
        hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    else:
        hf = to_hf_glm4x_config(config) if glm4x else to_hf_config(config)
    hf.pop("quantization_bit", None)  # the glmkit key describes these tensors, not THUDM's
    hf[QUANT_KEY] = spec
    hf["torch_dtype"] = getattr(config, "torch_dtype", hf.get("torch_dtype", "float32"))
    # a new folder takes the old one's place (atomic_dir): a model loaded from the old file keeps its memory map of
    # the old inode (rewriting the file in place would pull the pages from under it)
    write_aligned(sd, out / "model.safetensors", metadata={"format": "pt", QUANT_KEY: json.dumps(spec)})
    (out / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if src is not None and src.is_dir():
        for f in src.iterdir():
            if f.is_file() and _is_tokenizer_file(f.name):
                shutil.copy2(f, out / f.name)


def _is_tokenizer_file(name: str) -> bool:
    if name == "config.json" or name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack",
                                                ".h5", ".ckpt", ".gguf")):
        return False
    return (name.startswith(("tokenizer", "tokenization", "special_tokens", "vocab", "merges", "added_tokens"))
            or name.endswith((".model", ".tiktoken")) or name == "ice_text.model")
