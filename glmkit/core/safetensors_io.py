"""Safetensors files: the one dtype table, header parsing, reading (plain reads or a memory map), metadata and the
aligned writer of glmkit's quantized checkpoints.

The `safetensors` library does the job where its behaviour is the one wanted: the metadata (`read_metadata`) and
ordinary float checkpoints (`glmkit convert`, `save_model`, LoRA adapters call `safetensors.torch.save_file`
directly). The rest is written by hand because the library cannot do it:

* `read_tensors` reads with plain file reads: the library maps the whole file, and the pages of a mapped file
  count in the process's memory until it is unmapped, which would put a multi-GB shard on top of the model while it
  streams in (and defeat quantize-on-load's low peak). It can also hand a 2-D float tensor over unread
  (`CheckpointRows`), to be read a block of rows at a time.
* `map_tensors` takes the tensors as views of one private memory map with no copy. Whether `safe_open`'s tensors
  are copies or views depends on the library's version (pyproject admits >= 0.4); this path must take views on
  every version, of one map, and check that each starts aligned.
* `write_aligned` starts every tensor on a 64-byte boundary of the file, so that those views can be used as they
  are by the kernels (the library aligns to the element size only).
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

ALIGNMENT = 64  # write_aligned starts tensors on it; map_tensors copies a tensor that does not start on it
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded as it is (missing, corrupt, mismatched)."""


class Entry(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: list[int]
    offset: int  # of the tensor's first byte in the file


def parse_header(path: Path, head: bytes, read_header: Callable[[int], bytes]) -> list[Entry]:
    """A safetensors file's header, checked against the file's size: its entries in file order. head: the file's
    first 8 bytes; read_header(n): the n header bytes after them."""
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
            dtype = DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: bad header entry for {name!r} ({e})") from None
        if end - begin != torch.Size(shape).numel() * dtype.itemsize or 8 + n + end > size:
            raise CheckpointError(f"cannot read {path}: tensor {name!r} has inconsistent offsets")
        entries.append(Entry(name, dtype, shape, 8 + n + begin))
    return entries


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


def read_tensors(path: Path, defer: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor | CheckpointRows]]:
    """The tensors of a file one at a time, each read into freshly allocated memory with plain reads (see the
    module's docstring for why not a map). defer(name) True: a 2-D float tensor comes as CheckpointRows, read later
    a block of rows at a time."""
    with open(path, "rb") as f:
        for name, dtype, shape, offset in parse_header(path, f.read(8), f.read):
            if defer is not None and len(shape) == 2 and dtype.is_floating_point and defer(name):
                yield name, CheckpointRows(path, offset, shape, dtype)
                continue
            tensor = torch.empty(shape, dtype=dtype)
            nbytes = tensor.numel() * dtype.itemsize
            f.seek(offset)
            if nbytes and f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != nbytes:
                raise CheckpointError(f"cannot read {path}: truncated data for {name!r}")
            yield name, tensor


def map_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a file as views of one private (copy-on-write) memory map of it: no copy, no read until a
    page is touched. The map lives as long as any of its tensors. A tensor that does not start on an ALIGNMENT
    boundary of the file is copied (write_aligned writes glmkit's quantized files aligned)."""
    with open(path, "rb") as f:
        if path.stat().st_size < 8:
            raise CheckpointError(f"cannot read {path}: file too short for a safetensors header")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = torch.frombuffer(mapped, dtype=torch.uint8)
    for name, dtype, shape, offset in parse_header(path, bytes(mapped[:8]), lambda n: bytes(mapped[8:8 + n])):
        raw = data[offset:offset + torch.Size(shape).numel() * dtype.itemsize]
        if offset % ALIGNMENT:  # e.g. aten's INT8 kernel reads 32-byte aligned rows: copy it
            raw = raw.clone()
        yield name, raw.view(dtype).view(shape)


def read_metadata(path: Path) -> dict[str, str] | None:
    """The file's `__metadata__` (None when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def write_aligned(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                  ) -> Path:
    """A standard safetensors file in which every tensor starts on an ALIGNMENT-byte boundary of the file, so that
    map_tensors' views can be used as they are (aten's INT8 kernel reads 32-byte aligned weights). The format
    allows no gaps between tensors, so the alignment comes from the order: tensors whose size is a multiple of
    ALIGNMENT bytes first (all of a real model's large ones), the others after, and the header padded with spaces
    (which the format allows)."""
    entries = []
    for name, t in tensors.items():
        if t.dtype not in CODES:
            raise ValueError(f"cannot write {name!r}: dtype {t.dtype} has no safetensors code")
        entries.append((name, t.detach().cpu().contiguous()))
    entries.sort(key=lambda e: (e[1].numel() * e[1].element_size() % ALIGNMENT != 0, e[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, t in entries:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in entries:
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return Path(path)
