"""Reading checkpoint folders: their config.json, weight files (safetensors, .bin, shards with or without an index)
and tensors, streamed one at a time into a model built on the meta device.

Safetensors files are read with plain reads (glmkit.core.safetensors_io), .bin files with torch.load(mmap=True),
each tensor copied out, so peak memory stays near the final model size. A checkpoint whose tensors are already in
the model's runtime form (glmkit's saved quantized models) is memory-mapped instead (`iter_tensors(...,
mapped=True)`): its tensors are views of the file, taken without a copy. Every checkpoint tensor must map to a
model tensor and every model tensor must be filled: missing, unexpected, mis-shaped and duplicated weights are
errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.core.convert import UnexpectedWeightError
from glmkit.core.hub import read_json_object
from glmkit.core.safetensors_io import CheckpointError, CheckpointRows, map_tensors, read_metadata, read_tensors

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
# names of torch dtypes in config.json and on the command line (safetensors' codes: safetensors_io.DTYPES)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ locating files
def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    return read_json_object(path, CheckpointError)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, preferring safetensors; shards come from their index."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            try:
                index = json.loads(path.read_text(encoding="utf-8"))
                shards = sorted(set(index["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{path} is not a valid shard index ({e})") from None
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise CheckpointError(f"{path} lists shards that are missing: {missing}")
            return [folder / s for s in shards]
        return [path]
    # shards without an index (hand-copied folders)
    shards = sorted(folder.glob("pytorch_model-*-of-*.bin")) or sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    raise FileNotFoundError(f"{folder} holds no weights (looked for {', '.join(WEIGHT_FILES)} and shards)")


def iter_tensors(files: list[Path], defer: Callable[[str], bool] | None = None, mapped: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor | CheckpointRows]]:
    """Yields (name, tensor) one at a time, each in memory of its own (never a view of a mapped file); with
    `defer`, the named 2-D float tensors of safetensors files as CheckpointRows instead. mapped=True: safetensors
    tensors are views of a memory map of their file instead (for checkpoints taken as they are)."""
    for path in files:
        if path.suffix == ".safetensors" and mapped:
            yield from map_tensors(path)
        elif path.suffix == ".safetensors":
            yield from read_tensors(path, defer)
        else:
            try:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be mmap'ed
                    sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
            for name in list(sd):
                yield name, sd.pop(name).clone()  # out of the mapped file (see safetensors_io.read_tensors)
            del sd


def safetensors_metadata(files: list[Path]) -> dict[str, str] | None:
    """The metadata of the first safetensors file (None without one)."""
    for path in files:
        if path.suffix == ".safetensors":
            return read_metadata(path)
    return None


def as_dtype(d: str | torch.dtype) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of float32, float16, bfloat16")
    return DTYPES[d]


def default_dtype(checkpoint_dtype: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a checkpoint loads in when the caller names none: its own, except float16 on the CPU, which runs
    in bfloat16. CPUs have no fast fp16 GEMM (glmkit's INT4/INT8 kernels would dequantize to fp32 instead); bf16
    keeps fp16's size, takes the fast kernels and has a wider range."""
    dtype = as_dtype(checkpoint_dtype)
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        return torch.bfloat16
    return dtype


def stream_into(model, converter, tensors, dtype, source) -> None:
    for name, tensor in tensors:
        try:
            for target, t in converter.feed(name, tensor):
                assign(model, target, t, dtype)
        except UnexpectedWeightError:
            raise CheckpointError(f"{source}: unexpected weight {name!r} (shape {tuple(tensor.shape)}) does not "
                                  "belong to this model's architecture") from None
    left = converter.leftovers()
    if left:
        raise CheckpointError(f"{source}: incomplete weights: {left}")


def owner_of(model: nn.Module, target: str) -> tuple[nn.Module, str]:
    """(the module holding weight `target`, the attribute name); UnexpectedWeightError when the model has no such
    module."""
    module_name, _, attr = target.rpartition(".")
    try:
        return model.get_submodule(module_name), attr
    except AttributeError:
        raise UnexpectedWeightError(target) from None


def assign(model: nn.Module, target: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    module, attr = owner_of(model, target)
    if hasattr(module, "load_weight_tensor"):  # e.g. quantize.QuantizedLinear
        module.load_weight_tensor(attr, tensor)
        return
    current = getattr(module, attr, None)
    if not isinstance(current, torch.Tensor):
        raise UnexpectedWeightError(target)
    if tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(f"shape mismatch for {target}: checkpoint has {tuple(tensor.shape)}, the config "
                              f"implies {tuple(current.shape)}")
    value = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if not current.is_meta:
        raise CheckpointError(f"weight {target} appears twice in the checkpoint")
    if isinstance(current, nn.Parameter):
        setattr(module, attr, nn.Parameter(value.contiguous(), requires_grad=current.requires_grad))
    else:
        module.register_buffer(attr, value.contiguous())


def chatglm_rope_mode(dtype: torch.dtype, rope: str = "2d") -> str:
    """The rotary table of the originals' fp16 inv_freq buffer for a model loaded in `dtype`.

    ChatGLM-6B ("2d") as published is fp16 and builds its table in fp16; its CPU path is `.float()`, which keeps
    fp16-rounded inv_freq with an fp32 table. glmkit's bf16 load is its own speed choice, not the original's
    `.bfloat16()`: a bf16 table would round the positions themselves (8 mantissa bits: steps of 2 from 256 on), so
    bf16 uses the published fp16 table. GLM-130B ("1d") was trained and is deployed only in fp16: its fp16 table in
    every dtype."""
    if rope == "2d" and dtype == torch.float32:
        return "inv_freq"
    return "table"


def finish(model, converter, folder) -> None:
    # ChatGLM-6B's config never sets tie_word_embeddings, so transformers' default (tied) applies when a
    # checkpoint comes without lm_head; the later families publish an untied output_layer.
    tie = model.config.tie_word_embeddings or model.config.family == "chatglm"
    head, table = getattr(model.lm_head, "weight", None), getattr(model.wte, "weight", None)  # None: quantized
    if isinstance(head, torch.Tensor) and isinstance(table, torch.Tensor) and head.is_meta and not table.is_meta \
            and tie:
        model.lm_head.weight = model.wte.weight
        model.config.tie_word_embeddings = True
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        head = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{folder}: weights missing from the checkpoint: {head}")
