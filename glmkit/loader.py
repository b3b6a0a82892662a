"""Loading published GLM-family checkpoints: local folders, the bundled model, Hugging Face ids.

The model is built on the meta device and tensors are streamed in one at a time (safetensors read with plain reads,
.bin shards with torch.load(mmap=True), each tensor copied out), so peak memory stays near the final model size. Every checkpoint tensor must map to a
model tensor and every model tensor must be filled: missing, unexpected and mis-shaped weights are errors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.config import CHATGLM_V1_ALPHA_LAYERS, ConfigError, GLMConfig
from glmkit.convert import UnexpectedWeightError, converter_for, to_hf_config, to_thudm_state_dict
from glmkit.hub import read_json_object, resolve_model_dir

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


def _read_safetensors(path: Path, defer: Callable[[str], bool] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor | CheckpointRows]]:
    """Reads a safetensors file tensor by tensor into freshly allocated memory, with plain reads rather than a
    memory map: pages of a mapped file count in the process's RSS until it is unmapped, which would put a whole
    multi-GB shard on top of the model while it streams in (and defeat quantize-on-load's low peak).
    defer(name) True: a 2-D float tensor comes as CheckpointRows, read later a block of rows at a time."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"cannot read {path}: file too short for a safetensors header")
        n = int.from_bytes(head, "little")
        size = path.stat().st_size
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"cannot read {path}: invalid safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"cannot read {path}: bad header entry for {name!r} ({e})") from None
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if end - begin != nbytes or 8 + n + end > size:
                raise CheckpointError(f"cannot read {path}: tensor {name!r} has inconsistent offsets")
            if defer is not None and len(shape) == 2 and dtype.is_floating_point and defer(name):
                yield name, CheckpointRows(path, 8 + n + begin, shape, dtype)
                continue
            tensor = torch.empty(shape, dtype=dtype)
            f.seek(8 + n + begin)
            if nbytes and f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != nbytes:
                raise CheckpointError(f"cannot read {path}: truncated data for {name!r}")
            yield name, tensor


def iter_tensors(files: list[Path], defer: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor | CheckpointRows]]:
    """Yields (name, tensor) one at a time, each in memory of its own (never a view of a mapped file); with
    `defer`, the named 2-D float tensors of safetensors files as CheckpointRows instead."""
    for path in files:
        if path.suffix == ".safetensors":
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


# ------------------------------------------------------------------------------------------------ loading
def load_model(path_or_id: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
               adapter: str | os.PathLike | None = None, quantize: str | None = None, group_size: int | None = None,
               scheme: str | None = None):
    """Loads a GLM-family checkpoint folder (or bundled name, or Hugging Face id) as a GLMForCausalLM.

    dtype: torch dtype or name; default = config.json's torch_dtype, as transformers does with
    torch_dtype="auto", except that a float16 checkpoint loaded onto the CPU runs in bfloat16 (see
    `default_dtype`); an explicit dtype= always wins. adapter: a P-tuning or LoRA folder applied on top.
    quantize: "int8" | "int4" quantizes the four linears of every layer while loading, shard by shard.
    """
    from glmkit.api import GLMForCausalLM

    folder = resolve_model_dir(path_or_id)
    hf = read_hf_config(folder)
    try:
        config = GLMConfig.from_hf_config(hf)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from None
    files = weight_files(folder)
    target_dtype = _dtype(dtype) if dtype is not None else default_dtype(config.torch_dtype, device)
    config.torch_dtype = str(target_dtype).removeprefix("torch.")

    with torch.device("meta"):
        model = GLMForCausalLM(config)
        if config.pre_seq_len:  # P-tuning weights merged into the checkpoint
            from glmkit.ptuning import attach_prefix

            attach_prefix(model, config.pre_seq_len, config.prefix_projection, config.prefix_hidden_size)

    quant_spec = _quantization_spec(hf, files, quantize, group_size, scheme)
    if quant_spec is not None:
        from glmkit import quantize as q

        q.prepare_model(model, quant_spec)
        config.extra["quantization"] = quant_spec

    converter = converter_for(config, hf)
    defer = _quantized_weight_names(model, converter) if quant_spec is not None else None
    _stream_into(model, converter, iter_tensors(files, defer), target_dtype, source=folder)
    if config.rope == "2d":
        config.rope_fp16 = chatglm_rope_mode(target_dtype)
    _finish(model, converter, folder)

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
        from glmkit.lora import load_lora_adapter

        return load_lora_adapter(model, folder)
    hf = read_hf_config(folder)
    pre_seq_len = hf.get("pre_seq_len")
    if not pre_seq_len:
        raise CheckpointError(f"{folder} is neither a LoRA folder (adapter_config.json) nor a P-tuning folder "
                              "(config.json with pre_seq_len)")
    from glmkit.ptuning import PREFIX_KEY, attach_prefix

    with torch.device("meta"):
        encoder = attach_prefix(model, int(pre_seq_len), bool(hf.get("prefix_projection", False)))
    files = weight_files(folder)
    dtype = dtype or model.wte.weight.dtype
    loaded = set()
    for name, tensor in iter_tensors(files):
        if not name.startswith(PREFIX_KEY):
            raise CheckpointError(f"{folder}: a P-tuning checkpoint holds only {PREFIX_KEY}* weights, found {name!r}")
        _assign(model, "prefix_encoder." + name[len(PREFIX_KEY):], tensor, dtype)
        loaded.add(name)
    expected = {PREFIX_KEY + k for k in encoder.state_dict()}
    if loaded != expected:
        raise CheckpointError(f"{folder}: prefix weights missing {sorted(expected - loaded)}, "
                              f"unexpected {sorted(loaded - expected)}")
    return model


def _dtype(d: str | torch.dtype) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of float32, float16, bfloat16")
    return DTYPES[d]


def _quantization_spec(hf, files, quantize, group_size, scheme):
    from glmkit.quantize import quantization_spec

    pre = quantization_spec(hf, safetensors_metadata(files))  # THUDM quantization_bit or glmkit metadata
    if quantize is None:
        return pre
    if pre is not None:
        raise ValueError("this checkpoint is already quantized; load it without quantize=")
    bits = {"int8": 8, "int4": 4, "8": 8, "4": 4, 8: 8, 4: 4}.get(quantize)
    if bits is None:
        raise ValueError(f"quantize must be 'int8' or 'int4', got {quantize!r}")
    from glmkit.quantize import default_spec

    return default_spec(bits, group_size=group_size, scheme=scheme)


def default_dtype(checkpoint_dtype: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a checkpoint loads in when the caller names none: its own, except float16 on the CPU, which runs
    in bfloat16. CPUs have no fast fp16 GEMM (glmkit's INT4/INT8 kernels would dequantize to fp32 instead); bf16
    keeps fp16's size, takes the fast kernels and has a wider range."""
    dtype = _dtype(checkpoint_dtype)
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        return torch.bfloat16
    return dtype


def _quantized_weight_names(model: nn.Module, converter) -> Callable[[str], bool]:
    """The predicate "this checkpoint tensor is the float weight of a layer quantized while loading", for
    tensors the converter hands over unchanged: those are read a block of rows at a time."""
    from glmkit.quantize import QuantizedLinear

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


def _stream_into(model, converter, tensors, dtype, source) -> None:
    for name, tensor in tensors:
        try:
            for target, t in converter.feed(name, tensor):
                _assign(model, target, t, dtype)
        except UnexpectedWeightError:
            raise CheckpointError(f"{source}: unexpected weight {name!r} (shape {tuple(tensor.shape)}) does not "
                                  "belong to this model's architecture") from None
    left = converter.leftovers()
    if left:
        raise CheckpointError(f"{source}: incomplete weights: {left}")


def _assign(model: nn.Module, target: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
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


def chatglm_rope_mode(dtype: torch.dtype) -> str:
    """ChatGLM-6B's rotary table follows its fp16 inv_freq buffer through .float()/.half()/.bfloat16(): an fp32
    model uses fp16-rounded inv_freq with an fp32 table; fp16 and bf16 models build the table in their dtype."""
    return {torch.float32: "inv_freq", torch.float16: "table", torch.bfloat16: "table_bf16"}[dtype]


def _finish(model, converter, folder) -> None:
    # ChatGLM-6B's config never sets tie_word_embeddings, so transformers' default (tied) applies when a
    # checkpoint comes without lm_head; the later families publish an untied output_layer.
    tie = model.config.tie_word_embeddings or model.config.family == "chatglm"
    if model.lm_head.weight.is_meta and not model.wte.weight.is_meta and tie:
        model.lm_head.weight = model.wte.weight
        model.config.tie_word_embeddings = True
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        head = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{folder}: weights missing from the checkpoint: {head}")


# ------------------------------------------------------------------------------------------------ saving
def save_model(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None,
               max_shard_bytes: int | None = None) -> Path:
    """Writes a THUDM-layout folder (config.json + model.safetensors, sharded if asked) that glmkit and the
    original code both load; adds the tokenizer files when a tokenizer is given."""
    from safetensors.torch import save_file

    config: GLMConfig = model.config
    if config.extra.get("quantization"):  # quantized layers have their own portable format and metadata
        from glmkit.quantize import save_quantized

        out = save_quantized(model, out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {}
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().cpu()
        sd[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    sd = to_thudm_state_dict(sd, config)
    if config.family == "chatglm" and config.alpha_num_layers != CHATGLM_V1_ALPHA_LAYERS:
        # ChatGLM-6B's code fixes α at √56 (glm-family.md §3.2), so its config.json cannot state another α: such a
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
    return out
