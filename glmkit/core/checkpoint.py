"""Reading checkpoint folders: their config.json, weight files (safetensors, .bin, shards with or without an index)
and tensors, streamed one at a time into a model built on the meta device.

Safetensors files are read with plain reads, .bin files with torch.load(mmap=True), each tensor copied out, so peak
memory stays near the final model size. A checkpoint whose tensors are already in the model's runtime form (glmkit's
saved quantized models) is memory-mapped instead (`iter_tensors(..., mapped=True)`): its tensors are views of the
file, taken without a copy. Every checkpoint tensor must map to a model tensor and every model tensor must be filled:
missing, unexpected, mis-shaped and duplicated weights are errors.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.core.convert import UnexpectedWeightError
from glmkit.core.hub import read_json_object

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded as it is (missing, corrupt, mismatched)."""


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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointRows:
    """A 2-D float tensor of a safetensors file, read a block of rows at a time: ``rows[a:b]`` reads just those
    rows. Quantize-on-load takes these for the layers' float weights, so the whole float matrix (134 MB for one
    fp16 ChatGLM-6B MLP weight) never sits in memory next to the model."""

    def __init__(self, path: Path, offset: int, shape: list[int], dtype: torch.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, torch.Size(shape), dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("CheckpointRows reads contiguous row ranges only (rows[a:b])")
        a, b, _ = rows.indices(self.shape[0])
        out = torch.empty((max(b - a, 0), *self.shape[1:]), dtype=self.dtype)
        nbytes = out.numel() * out.element_size()
        row_bytes = self.shape[1:].numel() * out.element_size()
        with open(self.path, "rb") as f:
            f.seek(self.offset + a * row_bytes)
            if nbytes and f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != nbytes:
                raise CheckpointError(f"cannot read {self.path}: truncated data")
        return out

    def __repr__(self) -> str:
        return f"CheckpointRows({self.path.name}, shape={tuple(self.shape)}, dtype={self.dtype})"


def _safetensors_entries(path: Path, head: bytes, read_header: Callable[[int], bytes]
                         ) -> list[tuple[str, torch.dtype, list[int], int]]:
    """A safetensors file's header, checked against the file's size: [(name, dtype, shape, offset of its bytes in
    the file)] in file order. head: the file's first 8 bytes; read_header(n): the n header bytes after them."""
    if len(head) != 8:
        raise CheckpointError(f"cannot read {path}: file too short for a safetensors header")
    n = int.from_bytes(head, "little")
    size = path.stat().st_size
    if n <= 0 or 8 + n > size:
        raise CheckpointError(f"cannot read {path}: invalid safetensors header length {n}")
    try:
        header = json.loads(read_header(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    entries = []
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: bad header entry for {name!r} ({e})") from None
        if end - begin != torch.Size(shape).numel() * dtype.itemsize or 8 + n + end > size:
            raise CheckpointError(f"cannot read {path}: tensor {name!r} has inconsistent offsets")
        entries.append((name, dtype, shape, 8 + n + begin))
    return entries


def _read_safetensors(path: Path, defer: Callable[[str], bool] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor | CheckpointRows]]:
    """Reads a safetensors file tensor by tensor into freshly allocated memory, with plain reads rather than a
    memory map: pages of a mapped file count in the process's RSS until it is unmapped, which would put a whole
    multi-GB shard on top of the model while it streams in (and defeat quantize-on-load's low peak).
    defer(name) True: a 2-D float tensor comes as CheckpointRows, read later a block of rows at a time."""
    with open(path, "rb") as f:
        entries = _safetensors_entries(path, f.read(8), f.read)
        for name, dtype, shape, offset in entries:
            if defer is not None and len(shape) == 2 and dtype.is_floating_point and defer(name):
                yield name, CheckpointRows(path, offset, shape, dtype)
                continue
            tensor = torch.empty(shape, dtype=dtype)
            nbytes = tensor.numel() * dtype.itemsize
            f.seek(offset)
            if nbytes and f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != nbytes:
                raise CheckpointError(f"cannot read {path}: truncated data for {name!r}")
            yield name, tensor


MAPPED_ALIGNMENT = 64  # a mapped tensor is taken as it is only from an offset aligned to this (else copied)


def _map_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file as views of one private (copy-on-write) memory map of it: no copy, no
    read until a page is touched. The map lives as long as any of its tensors. A tensor that does not start on a
    MAPPED_ALIGNMENT boundary of the file is copied (glmkit writes its quantized files aligned)."""
    with open(path, "rb") as f:
        if path.stat().st_size < 8:
            raise CheckpointError(f"cannot read {path}: file too short for a safetensors header")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    entries = _safetensors_entries(path, bytes(mapped[:8]), lambda n: bytes(mapped[8:8 + n]))
    for name, dtype, shape, offset in entries:
        raw = data[offset:offset + torch.Size(shape).numel() * dtype.itemsize]
        if offset % MAPPED_ALIGNMENT:  # e.g. aten's INT8 kernel reads 32-byte aligned rows: copy it
            raw = raw.clone()
        yield name, raw.view(dtype).view(shape)


def iter_tensors(files: list[Path], defer: Callable[[str], bool] | None = None, mapped: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor | CheckpointRows]]:
    """Yields (name, tensor) one at a time, each in memory of its own (never a view of a mapped file); with
    `defer`, the named 2-D float tensors of safetensors files as CheckpointRows instead. mapped=True: safetensors
    tensors are views of a memory map of their file instead (for checkpoints taken as they are)."""
    for path in files:
        if path.suffix == ".safetensors" and mapped:
            yield from _map_safetensors(path)
        elif path.suffix == ".safetensors":
            yield from _read_safetensors(path, defer)
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
                yield name, sd.pop(name).clone()  # out of the mapped file (see _read_safetensors)
            del sd


def safetensors_metadata(files: list[Path]) -> dict[str, str] | None:
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    return f.metadata()
            except Exception as e:
                raise CheckpointError(f"cannot read {path}: {e}") from None
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


def assign(model: nn.Module, target: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    module_name, _, attr = target.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise UnexpectedWeightError(target) from None
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
