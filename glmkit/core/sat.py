"""GLM-130B's SwissArmyTransformer (SAT) checkpoints: reading a checkpoint folder, merging and splitting its
tensor-parallel shards, and `glmkit convert` (one merged safetensors folder).

A SAT folder holds `latest` (the iteration, or "release"), `<iteration>/mp_rank_XX_model_states.pt` (one per
tensor-parallel rank, each `{"module": state_dict}`) and, when a newer SAT saved it, `model_config.json`. GLM-130B
ships 8 shards; its tools/convert_tp.py changes the degree (and quantizes, `--quantization-bit-width 4|8`). How a
tensor is split across ranks (SHARDING, restated from convert_tp.py and SAT's parallel layers):

- rows: the vocabulary of `word_embeddings`; `query_key_value` by heads (each rank's rows are its heads' q, k, v,
  head after head, so concatenating ranks gives glmkit's per-head layout); per-row quantization scales with them;
- columns: the input of the row-parallel `attention.dense` and `mlp.dense_4h_to_h`;
- glu: `dense_h_to_4h` outputs [x1 | x2] (GeGLU: x1 * gelu(x2)) and each rank holds its slice of both halves,
  [x1_r | x2_r], so merging takes every rank's first half, then every rank's second half;
- groups: the scales of quantized row-parallel weights. convert_tp.py quantizes each target shard on its own, so
  a row of `attention.dense` has one scale per shard: merged, they are [out, shards], each group scaling its shard's
  slice of the input (quant.sharded.GroupedRowwiseLinear computes with them);
- replicated: layer norms and the row-parallel biases (every rank has them whole).

Shards are read a layer at a time (`iter_sat_tensors`): each shard file is opened with torch.load(mmap=True), the
layer's tensors copied out and the file released, so reading or converting GLM-130B holds one layer's shard set and
its merged form, never the model.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from glmkit.core.atomic import atomic_dir
from glmkit.core.checkpoint import DTYPES, CheckpointError
from glmkit.core.config import ConfigError, GLMConfig

SAT_CONFIG_FILE = "model_config.json"
SHARD_PATTERN = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
# GLM-130B's published hyper-parameters (configs/model_glm_130b.sh), used when a folder has no model_config.json.
GLM130B_ARGS = {"num_layers": 70, "hidden_size": 12288, "num_attention_heads": 96, "inner_hidden_size": 32768,
                "vocab_size": 150528, "max_sequence_length": 2048}

# SAT short name (after `transformer.layers.N.` or `transformer.`) -> how tensor parallelism splits it.
SHARDING: dict[str, str] = {
    "word_embeddings.weight": "rows",
    "attention.query_key_value.weight": "rows", "attention.query_key_value.bias": "rows",
    "attention.query_key_value.weight_scale": "rows",
    "attention.dense.weight": "columns", "attention.dense.weight_scale": "groups", "attention.dense.bias": "replicated",
    "mlp.dense_h_to_4h.weight": "glu", "mlp.dense_h_to_4h.bias": "glu", "mlp.dense_h_to_4h.weight_scale": "glu",
    "mlp.dense_4h_to_h.weight": "columns", "mlp.dense_4h_to_h.weight_scale": "groups",
    "mlp.dense_4h_to_h.bias": "replicated",
    "input_layernorm.weight": "replicated", "input_layernorm.bias": "replicated",
    "post_attention_layernorm.weight": "replicated", "post_attention_layernorm.bias": "replicated",
    "final_layernorm.weight": "replicated", "final_layernorm.bias": "replicated",
}
# Rotary inverse frequencies (SAT recomputes them and never loads them; glmkit too): dropped wherever they sit.
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def short_name(key: str) -> str:
    """`transformer.layers.3.attention.dense.weight` -> `attention.dense.weight` (convert_tp.py's naming)."""
    return ".".join(key.split(".")[3 if key.startswith("transformer.layers.") else 1:])


def sharding_of(key: str) -> str:
    kind = SHARDING.get(short_name(key))
    if kind is None:
        raise CheckpointError(f"unexpected tensor {key!r} in a GLM-130B SAT checkpoint")
    return kind


# ------------------------------------------------------------------------------------------------ merge / split
def merge_tensor(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The tensor of `key` for len(parts) consecutive ranks merged into one (convert_tp.py's merge)."""
    return merge_by_kind(sharding_of(key), parts)


def split_tensor(key: str, full: torch.Tensor, n: int, index: int) -> torch.Tensor:
    """Rank `index`'s part of `key` when `full` is split `n` ways (convert_tp.py's split)."""
    return split_by_kind(sharding_of(key), key, full, n, index)


def merge_by_kind(kind: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Merges consecutive ranks' parts of a tensor split as `kind` (see SHARDING)."""
    if kind == "replicated" or len(parts) == 1:
        return parts[0] if kind != "groups" or parts[0].dim() == 1 else _squeeze_groups(parts[0])
    if kind == "rows":
        return torch.cat(parts, dim=0)
    if kind == "columns":
        return torch.cat(parts, dim=1)
    if kind == "glu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([a for a, _ in halves] + [b for _, b in halves], dim=0)
    # groups: per-row scales of each shard's input slice -> [out, groups]
    return _squeeze_groups(torch.cat([p if p.dim() == 2 else p[:, None] for p in parts], dim=1))


def split_by_kind(kind: str, key: str, full: torch.Tensor, n: int, index: int) -> torch.Tensor:
    """Rank `index`'s part of a tensor split `n` ways as `kind` (`key` names it in errors). Scales of row-parallel
    weights follow their columns: a row's single scale serves every slice, [out, G] groups are dealt out."""
    if n == 1 or kind == "replicated":
        return full
    if kind == "groups":
        if full.dim() == 1:
            return full
        groups = full.shape[1]
        if groups % n == 0:
            return _squeeze_groups(full.chunk(n, dim=1)[index].contiguous())
        if n % groups == 0:
            return full[:, index // (n // groups)].contiguous()
        raise CheckpointError(f"{key}: {groups} scale groups cannot be dealt out over {n} ranks")
    dim = 1 if kind == "columns" else 0
    size = full.shape[dim] // (2 if kind == "glu" else 1)
    if size % n:
        raise CheckpointError(f"{key}: dimension {size} of shape {tuple(full.shape)} does not split {n} ways")
    if kind == "glu":
        chunks = full.chunk(2 * n, dim=0)
        return torch.cat([chunks[index], chunks[n + index]], dim=0)
    return full.chunk(n, dim=dim)[index].contiguous()


def _squeeze_groups(scale: torch.Tensor) -> torch.Tensor:
    return scale[:, 0].contiguous() if scale.dim() == 2 and scale.shape[1] == 1 else scale


def needed_shards(src_tp: int, world: int, rank: int) -> list[int]:
    """The source ranks whose files rank `rank` of `world` reads (all of them for world 1)."""
    if world >= src_tp:
        if world % src_tp:
            raise CheckpointError(f"a {src_tp}-way SAT checkpoint cannot be split {world} ways (not a multiple)")
        return [rank // (world // src_tp)]
    if src_tp % world:
        raise CheckpointError(f"a {src_tp}-way SAT checkpoint cannot be merged {world} ways (not a divisor)")
    k = src_tp // world
    return list(range(rank * k, (rank + 1) * k))


def local_tensor(key: str, parts: list[torch.Tensor], src_tp: int, world: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s tensor at degree `world` from `parts`, the tensors of needed_shards(src_tp, world, rank)."""
    merged = merge_tensor(key, parts)
    if world <= src_tp:
        return merged
    n = world // src_tp
    return split_tensor(key, merged, n, rank % n)


# ------------------------------------------------------------------------------------------------ files
def is_sat_checkpoint(folder: Path) -> bool:
    folder = Path(folder)
    if not (folder / "latest").is_file():
        return False
    try:
        return bool(sat_shard_files(folder))
    except (CheckpointError, OSError):
        return False


def sat_shard_files(folder: Path) -> list[Path]:
    """The mp_rank_XX files of the iteration `latest` names, in rank order (ranks 0..n-1, none missing)."""
    folder = Path(folder)
    tracker = folder / "latest"
    if not tracker.is_file():
        raise FileNotFoundError(f"{folder} has no `latest` file: not a SwissArmyTransformer checkpoint folder")
    iteration = tracker.read_text(encoding="utf-8").strip()
    if not iteration or "/" in iteration or iteration.startswith("."):
        raise CheckpointError(f"{tracker} names no iteration (got {iteration!r})")
    it_dir = folder / iteration
    if not it_dir.is_dir():
        raise CheckpointError(f"{tracker} names iteration {iteration!r}, but {it_dir} does not exist")
    ranks = {}
    for f in it_dir.iterdir():
        m = SHARD_PATTERN.match(f.name)
        if m:
            ranks[int(m.group(1))] = f
    if not ranks:
        raise CheckpointError(f"{it_dir} holds no mp_rank_XX_model_states.pt files")
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise CheckpointError(f"{it_dir}: tensor-parallel shards {missing} are missing (found ranks {sorted(ranks)})")
    return [ranks[r] for r in range(len(ranks))]


def _safe_globals() -> list:
    """numpy's array reconstruction, for SAT training checkpoints that carry numpy RNG state beside the weights
    (weights_only loading stays on)."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_shard(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(the `module` state dict of one mp_rank file, whether its tensors are memory-mapped views of the file:
    torch's zip format is; the legacy format is read whole)."""
    mapped = True
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                mapped = False
                sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
        raise CheckpointError(f"{path} is not a SAT checkpoint shard (expected a dict with a 'module' state dict)")
    return sd["module"], mapped


def _group_of(key: str) -> str:
    """Tensors read together: a layer's, or a top-level module's (`transformer.word_embeddings`)."""
    m = re.match(r"transformer\.layers\.(\d+)\.", key)
    return f"layer {int(m.group(1))}" if m else ".".join(key.split(".")[:2])


class ShardReader:
    """The shards a rank needs, read one group (the embedding, a layer, the final norm) at a time."""

    def __init__(self, folder: Path, world: int = 1, rank: int = 0) -> None:
        self.files = sat_shard_files(folder)
        self.src_tp = len(self.files)
        self.world, self.rank = world, rank
        self.needed = needed_shards(self.src_tp, world, rank)
        first, _ = load_shard(self.files[self.needed[0]])
        self.keys = list(first)
        self.shapes = {k: tuple(v.shape) for k, v in first.items()}
        self.dtypes = {k: v.dtype for k, v in first.items()}
        del first
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def groups(self) -> list[list[str]]:
        order: dict[str, list[str]] = {}
        for k in self.keys:
            order.setdefault(_group_of(k), []).append(k)
        return list(order.values())

    def read(self, keys: list[str]) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for r in self.needed:
            sd = self._cache.get(r)
            if sd is None:
                sd, mapped = load_shard(self.files[r])
                if not mapped:  # a legacy file is read whole: keep it rather than read it again for every layer
                    self._cache[r] = sd
            for k in keys:
                if k not in sd:
                    raise CheckpointError(f"{self.files[r]} lacks {k!r}, which {self.files[self.needed[0]]} has")
                out[k].append(sd[k].clone())
            extra = set(sd) - set(self.keys)
            if extra:
                raise CheckpointError(f"{self.files[r]} has tensors the other shards lack: {sorted(extra)[:4]}")
            del sd
        return out


def iter_sat_tensors(folder: Path, world: int = 1, rank: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(SAT name, tensor) of rank `rank`'s shard at tensor-parallel degree `world` (1: the merged model), a layer
    at a time, rotary inv_freq buffers left out."""
    reader = ShardReader(folder, world, rank)
    for keys in reader.groups():
        keys = [k for k in keys if not IGNORED.search(k)]
        if not keys:
            continue
        parts = reader.read(keys)
        for k in keys:
            yield k, local_tensor(k, parts.pop(k), reader.src_tp, world, rank)


# ------------------------------------------------------------------------------------------------ config
def read_sat_config(folder: Path) -> GLMConfig:
    """GLM-130B's architecture for a SAT folder: model_config.json (SAT's argument names; newer SAT leaves out the
    defaults: layernorm_epsilon 1e-5, head size hidden/heads), else GLM-130B's published hyper-parameters; checked
    against the tensors of shard 0, which also tell the dtype, the tensor-parallel degree and the quantization."""
    folder = Path(folder)
    path = folder / SAT_CONFIG_FILE
    if path.is_file():
        try:
            args = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(args, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        source = str(path)
    else:
        args = dict(GLM130B_ARGS)
        source = (f"GLM-130B's published hyper-parameters ({folder} has no {SAT_CONFIG_FILE}; add one in SAT's "
                  "format for another shape)")
    model_class = args.get("model_class", "GLM130B")
    if model_class != "GLM130B":
        raise ConfigError(f"{source}: model_class {model_class!r} is not GLM130B; glmkit reads GLM-130B SAT checkpoints")
    for flag in ("position_encoding_2d", "no_glu"):
        if args.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not how GLM-130B was trained; unsupported")
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in args]
    if missing:
        raise ConfigError(f"{source} lacks {missing}")
    hidden, heads = int(args["hidden_size"]), int(args["num_attention_heads"])
    head_dim = args.get("hidden_size_per_attention_head") or hidden // heads
    if head_dim * heads != hidden:
        raise ConfigError(f"{source}: GLM-130B's attention needs hidden_size = heads x head size, got {hidden} vs "
                          f"{heads} x {head_dim}")

    reader = ShardReader(folder)  # rank 0 of the merged view: shapes and dtypes of shard 0 only
    tp = reader.src_tp
    shapes, dtypes = reader.shapes, reader.dtypes

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{reader.files[0]} lacks {key!r}: not a GLM-130B SAT checkpoint")
        return shapes[key]

    vocab = shape("transformer.word_embeddings.weight")[0] * tp
    qkv = "transformer.layers.0.attention.query_key_value.weight"
    bits = None
    if dtypes[qkv] == torch.int8:
        if qkv + "_scale" not in shapes:
            raise CheckpointError(f"{reader.files[0]}: int8 {qkv} without {qkv}_scale")
        packed = {hidden: 8, hidden // 2: 4}.get(shape(qkv)[1])
        if packed is None:
            raise CheckpointError(f"{qkv} has {shape(qkv)[1]} int8 columns for hidden size {hidden}: neither INT8 "
                                  f"({hidden}) nor packed INT4 ({hidden // 2})")
        bits = packed
    cols = shape("transformer.layers.0.mlp.dense_4h_to_h.weight")[1] * (2 if bits == 4 else 1)
    inner = cols * tp
    if args.get("inner_hidden_size") not in (None, inner):
        raise ConfigError(f"{source} says inner_hidden_size {args['inner_hidden_size']}, the tensors {inner}")
    if int(args["vocab_size"]) != vocab:
        raise ConfigError(f"{source} says vocab_size {args['vocab_size']}, the {tp}-way tensors {vocab}")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"transformer\.layers\.(\d+)\.", k)))
    if layers != int(args["num_layers"]):
        raise ConfigError(f"{source} says num_layers {args['num_layers']}, the checkpoint has {layers}")
    got_hidden = shape("transformer.word_embeddings.weight")[1]
    if got_hidden != hidden:
        raise ConfigError(f"{source} says hidden_size {hidden}, the tensors {got_hidden}")
    if heads % tp:
        raise ConfigError(f"{heads} heads do not split over {tp} tensor-parallel shards")
    float_dtype = dtypes["transformer.word_embeddings.weight"]
    dtype_name = {v: k for k, v in DTYPES.items() if k in ("float32", "float16", "bfloat16")}.get(float_dtype)
    if dtype_name is None:
        raise CheckpointError(f"word_embeddings has dtype {float_dtype}, not a floating-point checkpoint")
    extra: dict[str, Any] = {"sat": {"tensor_parallel": tp, "source": source}}
    if bits is not None:
        extra["sat_quantization"] = {"bits": bits, "row_parallel_groups": tp}
    return GLMConfig.from_name(
        "glm-130b", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, head_dim=head_dim,
        ffn_hidden_size=inner, max_seq_len=int(args.get("max_sequence_length", 2048)),
        norm_eps=float(args.get("layernorm_epsilon", 1e-5)), torch_dtype=dtype_name, extra=extra)


def sat_quantization(config: GLMConfig) -> dict[str, int] | None:
    """{"bits": 4|8, "row_parallel_groups": G} for a GLM-130B checkpoint quantized by convert_tp.py, else None."""
    q = config.extra.get("sat_quantization")
    return dict(q) if q else None


# ------------------------------------------------------------------------------------------------ convert
def convert_sat_checkpoint(src: str | Path, out: str | Path, max_shard_bytes: int = 2 * 1024**3,
                           dtype: torch.dtype | None = None) -> Path:
    """Merges a SAT folder (any tensor-parallel degree, float or convert_tp.py-quantized) into `out`: config.json
    (glmkit's own, model_type "glmkit") + model-XXXXX-of-YYYYY.safetensors shards with SAT's tensor names, an index,
    and the folder's tokenizer file (ice_text.model) when it has one. `glmkit.load_model(out)` then reads it like any
    safetensors checkpoint. Peak memory: one layer's shard set and its merged tensors, plus the output shard being
    filled (at most max_shard_bytes and one layer). dtype: cast floating-point tensors (not quantization scales)."""
    src = Path(src)
    config = read_sat_config(src)
    with atomic_dir(out) as tmp:  # `out` stays the previous complete folder until this one is
        _convert_into(src, tmp, config, max_shard_bytes, dtype)
    return Path(out)


def _convert_into(src: Path, out: Path, config: GLMConfig, max_shard_bytes: int, dtype: torch.dtype | None) -> None:
    from safetensors.torch import save_file

    if dtype is not None:
        config.torch_dtype = str(dtype).removeprefix("torch.")
    names: list[str] = []
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        if not pending:
            return
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(pending, str(out / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(pending, name))
        pending, size = {}, 0

    for key, tensor in iter_sat_tensors(src):
        if dtype is not None and tensor.is_floating_point() and not key.endswith("_scale"):
            tensor = tensor.to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[key] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    final = {}
    for i, name in enumerate(names, 1):  # model-00001.safetensors -> model-00001-of-0000N.safetensors
        target = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        (out / name).replace(out / target)
        final[name] = target
    weight_map = {k: final[v] for k, v in weight_map.items()}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    hf = {"model_type": "glmkit", **config.to_dict()}
    (out / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for tok in ("ice_text.model", "tokenizer_config.json"):
        if (src / tok).is_file():
            (out / tok).write_bytes((src / tok).read_bytes())
