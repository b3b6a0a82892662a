"""Whole-checkpoint operations behind the commands, each usable from Python: a model and tokenizer for chat
(`load_chat_model`), a LoRA folder merged into its base (`merge_lora_checkpoint`), a quantized copy of a
checkpoint (`quantize_checkpoint`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from glmkit.adapters.lora import ADAPTER_CONFIG, load_lora_adapter, merge_lora
from glmkit.core.hub import resolve_model_dir
from glmkit.core.tokenizer import load_tokenizer
from glmkit.distributed.tp import end_worker, lockstep
from glmkit.loading.loader import load_model, save_model
from glmkit.quant.calibrate import calibrate_and_quantize
from glmkit.quant.formats import default_head, default_spec, head_spec
from glmkit.quant.saving import save_quantized
from glmkit.quant.transform import quantize_head

DEFAULT_MODEL = "glm-tiny"  # the bundled model: every command works with no download


def model_name(path_or_id: str) -> str:
    """The name shown to users and returned by the API: the bundled name, a hub id, or a folder's name."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path.resolve().name or str(path)
    return path_or_id


def load_chat_model(path_or_id: str = DEFAULT_MODEL, *, quantize: str | None = None, adapter: str | None = None,
                    device: str | None = None, tensor_parallel: bool | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) ready for chat; the tokenizer always comes from the base model.

    tensor_parallel (default: when torchrun started several processes, WORLD_SIZE > 1): every process loads its
    shard; rank 0 returns and drives the model as usual, the other ranks mirror its model calls
    (glmkit.distributed.tp.lockstep) and exit when rank 0 is done, without returning."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if tensor_parallel is None:
        tensor_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    tokenizer = load_tokenizer(path_or_id)
    model = load_model(path_or_id, device=device, adapter=adapter, quantize=quantize, tensor_parallel=tensor_parallel)
    model.eval()
    if tensor_parallel and not lockstep(model):
        end_worker(0)  # a follower whose leader has finished
    return model, tokenizer


def merge_lora_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                          dtype: str | torch.dtype | None = None) -> Path:
    """`glmkit merge-lora`: loads `base`, applies the LoRA folder `adapter`, folds it into the weights and writes
    the merged model (with the base's tokenizer files when it has them) to `output`."""
    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{adapter} has no {ADAPTER_CONFIG}; pass a LoRA adapter folder")
    model = load_model(base, dtype=dtype)
    load_lora_adapter(model, adapter)
    merge_lora(model)
    try:
        tokenizer = load_tokenizer(base)
    except FileNotFoundError:  # a weights-only base folder: the merged folder is weights-only too
        tokenizer = None
    return save_model(model, output, tokenizer=tokenizer)


def calibration_progress_dir(dst: str | os.PathLike) -> Path:
    """Where `glmkit quantize --calibrate SRC DST` keeps its per-layer progress: a hidden sibling of DST."""
    dst = Path(dst)
    return dst.with_name(f".{dst.name}.gptq-progress")


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, bits: int, *, group_size: int | None = None,
                        scheme: str | None = None, symmetric: bool = False, dtype: str | None = None,
                        calibrate: bool = False, calibration_text: str | None = None, calibration_samples: int = 16,
                        calibration_length: int = 256, head: str | None = None) -> Path:
    """`glmkit quantize`: writes an INT8/INT4 copy of `src` (config.json + model.safetensors with the scheme in
    its metadata, plus the tokenizer files) that load_model maps without quantizing again. `head`: the output layer
    and embedding, "int8", "int4" or "none" (default: "none" for INT8 layers, "int8" for INT4). With `calibrate`, the float model is loaded whole and its
    layers rounded with GPTQ on `calibration_text` (default: the bundled sample); the head is rounded to nearest."""
    spec = default_spec(bits, group_size, scheme, symmetric or None)
    head = head or default_head(spec["bits"])
    head_spec(head)  # a bad value fails before any loading
    src_dir = resolve_model_dir(src)
    if calibrate:
        # fp16 checkpoints load in bf16 on CPU by default (fast GEMMs; the unquantized parts are saved in bf16)
        model = load_model(src_dir, dtype=dtype)
        # progress after each layer: a killed run started again with the same arguments resumes where it stopped
        progress_dir = calibration_progress_dir(dst)
        calibrate_and_quantize(model, load_tokenizer(src_dir), spec["bits"], spec["group_size"], spec["scheme"],
                               spec["symmetric"], calibration_text, calibration_samples, calibration_length,
                               progress_dir=progress_dir)
        quantize_head(model, head)
        out = save_quantized(model, dst, src_dir=src_dir)
        shutil.rmtree(progress_dir, ignore_errors=True)
        return out
    else:
        name = "group-symmetric" if spec["scheme"] == "group" and spec["symmetric"] else spec["scheme"]
        model = load_model(src_dir, dtype=dtype, quantize=f"int{spec['bits']}", group_size=spec["group_size"],
                           scheme=name, quantize_head=head)
    return save_quantized(model, dst, src_dir=src_dir)
