"""Tensor-parallel inference on torch.distributed: a model too big for one device, one process per device (torchrun).

Megatron's split, as GLM-130B's SwissArmyTransformer runs it, expressed with PyTorch's own tensor-parallel API:

- attention: `attn.qkv` column-parallel by heads (each rank computes its heads; per-head [q k v] rows make a rank's
  rows contiguous), `attn.proj` row-parallel (each rank's heads' slice of the input, partial sums all-reduced);
- MLP: `mlp.fc` column-parallel and `mlp.proj` row-parallel. A GLU's fc holds [x1 | x2]: a rank takes its slice of
  both halves, [x1_r | x2_r] (SAT's layout), so the local activation pairs the right halves;
- embedding row-parallel over the vocabulary (each rank looks up its ids, the rows are summed), output layer
  column-parallel over the vocabulary with the logits gathered, tied to the same shard of the table;
- norms, biases of row-parallel layers and the KV cache: replicated / local.

Float linears and the embedding go through DeviceMesh + `parallelize_module` (ColwiseParallel, RowwiseParallel):
their weights become DTensors holding this rank's shard. The GLU fc's DTensor rows are the permuted [x1_0 x2_0 x1_1
x2_1 ...] order: a valid column-parallel layer whose outputs stay local. Quantized linears (glmkit.quant) are not
nn.Linear: column-parallel ones need no communication and row-parallel ones end with a functional all_reduce
(`RowParallelQuantized`).

Every rank must run the same model calls. `Leader` (rank 0) sends each call (forward, setup/clear/reorder of the
cache) to the others over a gloo group before running it; the others run `follow(model)` until rank 0 stops, so
generation, chat and serving code run unchanged on rank 0.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.checkpoint import (
    CheckpointError,
    as_dtype,
    assign,
    chatglm_rope_mode,
    default_dtype,
    iter_tensors,
    read_hf_config,
    weight_files,
)
from glmkit.core.config import GLMConfig
from glmkit.core.convert import UnexpectedWeightError, converter_for
from glmkit.core.sat import is_sat_checkpoint, iter_sat_tensors, read_sat_config, sat_quantization, split_by_kind
from glmkit.quant.quantize import QuantizedLinear, default_spec, prepare_model
from glmkit.quant.sharded import GroupedRowwiseLinear, prepare_sat_model
from glmkit.distributed.launch import end_worker

COLUMN = ("attn.qkv", "mlp.fc")
ROW = ("attn.proj", "mlp.proj")


# ------------------------------------------------------------------------------------------------ process group
def init_tensor_parallel(device: str | torch.device | None = None) -> tuple[DeviceMesh, torch.device]:
    """The 1-D device mesh of all ranks (torchrun's environment), gloo on CPU and NCCL on CUDA, and this rank's
    device (cuda:LOCAL_RANK for CUDA)."""
    if not dist.is_initialized() and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
        raise RuntimeError("tensor_parallel=True needs one process per device: run under torchrun "
                           "(torchrun --nproc-per-node N ...) or initialize torch.distributed first")
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"tensor parallelism runs on cpu (gloo) or cuda (nccl), not {kind!r}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    mesh = init_device_mesh(kind, (dist.get_world_size(),), mesh_dim_names=("tp",))
    return mesh, dev


# ------------------------------------------------------------------------------------------------ layers
class RowParallelQuantized(nn.Module):
    """A row-parallel quantized linear: this rank's slice of the input through its quantized shard, the partial
    sums all-reduced with a functional collective, then the bias (replicated)."""

    def __init__(self, inner: nn.Module, bias: bool, out_features: int, mesh: DeviceMesh,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.mesh, self.out_features = inner, mesh, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta"), requires_grad=False) \
            if bias else None

    def load_weight_tensor(self, attr_name: str, tensor: torch.Tensor) -> None:
        if attr_name == "bias":
            self.bias = nn.Parameter(tensor.to(self.bias.dtype, copy=True), requires_grad=False)
        else:
            self.inner.load_weight_tensor(attr_name, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = funcol.all_reduce(self.inner(x), "sum", self.mesh)
        y = funcol.wait_tensor(y)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def _local(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    return parent, attr, getattr(parent, attr)


def shard_model(model: GLMForCausalLM, mesh: DeviceMesh) -> GLMForCausalLM:
    """Turns a meta-built full-size model into this rank's part (no allocation): heads and MLP columns, the
    vocabulary of the embedding and output layer. Float linears and the tables through parallelize_module, quantized
    linears with a functional all-reduce after the row-parallel ones."""
    c, world = model.config, mesh.size()
    plan: dict[str, Any] = {"wte": RowwiseParallel(input_layouts=Replicate()),
                            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i, block in enumerate(model.h):
        block.attn.n_heads, block.attn.n_kv_heads = c.num_heads // world, c.num_kv_heads // world
        for path in COLUMN:
            parent, attr, module = _local(block, path)
            if isinstance(module, nn.Linear):
                plan[f"h.{i}.{path}"] = ColwiseParallel()
            else:  # quantized: its local shard, input replicated, output local: nothing to exchange
                setattr(parent, attr, _shrink(module, rows=world))
        for path in ROW:
            parent, attr, module = _local(block, path)
            if isinstance(module, nn.Linear):
                plan[f"h.{i}.{path}"] = RowwiseParallel()
            else:
                setattr(parent, attr, RowParallelQuantized(_shrink(module, cols=world), module.bias is not None,
                                                           module.out_features, mesh, c_dtype(model)))
    parallelize_module(model, mesh, plan)
    return model


def c_dtype(model: nn.Module) -> torch.dtype:
    return as_dtype(model.config.torch_dtype)


def _shrink(module: nn.Module, rows: int = 1, cols: int = 1) -> nn.Module:
    """A fresh empty quantized layer of this rank's shape (out/rows x in/cols), without the bias for row-parallel
    layers (RowParallelQuantized adds it after the all-reduce)."""
    dtype = module.parts[0].compute_dtype if isinstance(module, GroupedRowwiseLinear) else module.compute_dtype
    bias = module.bias is not None and cols == 1
    if isinstance(module, GroupedRowwiseLinear):
        if module.groups % cols:
            raise CheckpointError(f"{module.groups} shard scales cannot be split {cols} ways")
        groups = module.groups // cols
        if groups > 1:
            return GroupedRowwiseLinear(module.in_features // cols, module.out_features, bias, bits=module.bits,
                                        groups=groups, dtype=dtype)
        return QuantizedLinear(module.in_features // cols, module.out_features, bias, bits=module.bits,
                               scheme="rowwise", group_size=None, symmetric=True, dtype=dtype)
    return QuantizedLinear(module.in_features // cols, module.out_features // rows, bias, bits=module.bits,
                           scheme=module.scheme, group_size=module.requested_group_size, symmetric=module.symmetric,
                           dtype=dtype)


# ------------------------------------------------------------------------------------------------ loading
def tensor_parallel_kind(name: str, config: GLMConfig) -> str:
    """How glmkit weight `name` is split across ranks: rows, columns, glu, groups (row-parallel quantization
    scales of several shards) or replicated."""
    if name in ("wte.weight", "lm_head.weight"):
        return "rows"
    parts = name.split(".")
    if len(parts) >= 4 and parts[0] == "h":
        module, attr = ".".join(parts[2:4]), ".".join(parts[4:])
        if module == "attn.qkv":
            return "rows"
        if module == "mlp.fc":
            return "glu" if config.mlp in ("geglu", "swiglu") else "rows"
        if module in ROW:
            if attr == "weight":
                return "columns"
            return "groups" if attr == "weight_scale" else "replicated"
    return "replicated"


def _assign_local(model: nn.Module, target: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    module_name, _, attr = target.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise UnexpectedWeightError(target) from None
    current = getattr(module, attr, None)
    if isinstance(current, DTensor):
        local_shape = current.to_local().shape
        if tuple(local_shape) != tuple(tensor.shape):
            raise CheckpointError(f"shape mismatch for {target} on this rank: {tuple(tensor.shape)} vs "
                                  f"{tuple(local_shape)}")
        if not current.to_local().is_meta:
            raise CheckpointError(f"weight {target} appears twice in the checkpoint")
        value = DTensor.from_local(tensor.to(dtype).contiguous(), current.device_mesh, current.placements,
                                   run_check=False)
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
        return
    assign(model, target, tensor, dtype)


def _rank_tensors(folder: Path, config: GLMConfig, hf: dict, world: int, rank: int,
                  sat: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(glmkit name, this rank's tensor): a SAT folder's shards resharded to `world` (only the files this rank
    needs), any other folder's tensors split as they stream."""
    converter = converter_for(config, hf)
    if sat:
        for name, tensor in iter_sat_tensors(folder, world, rank):
            yield from converter.feed(name, tensor)
    else:
        for name, tensor in iter_tensors(weight_files(folder)):
            for target, t in converter.feed(name, tensor):
                yield target, split_by_kind(tensor_parallel_kind(target, config), target, t, world, rank)
    left = converter.leftovers()
    if left:
        raise CheckpointError(f"{folder}: incomplete weights: {left}")


def load_tensor_parallel(folder: str | Path, *, dtype: str | torch.dtype | None = None,
                         device: str | torch.device | None = "cpu", quantize: str | None = None,
                         group_size: int | None = None, scheme: str | None = None) -> GLMForCausalLM:
    """This rank's part of a per-head-qkv GLM checkpoint (GLM-130B SAT folders of any tensor-parallel degree and
    their `glmkit convert` folders; ChatGLM-6B folders), ready to run with the other ranks. quantize: glmkit's
    INT8/INT4 schemes applied to this rank's shards while loading (embedding and output layer stay in floating
    point, sharded over the vocabulary); a convert_tp.py-quantized checkpoint loads as it is."""
    folder = Path(folder)
    mesh, dev = init_tensor_parallel(device)
    world, rank = mesh.size(), mesh.get_local_rank()
    sat = is_sat_checkpoint(folder)
    hf = {} if sat else read_hf_config(folder)
    config = read_sat_config(folder) if sat else GLMConfig.from_hf_config(hf)
    _check_splittable(config, world)
    target_dtype = as_dtype(dtype) if dtype is not None else default_dtype(config.torch_dtype, dev)
    config.torch_dtype = str(target_dtype).removeprefix("torch.")
    tie = config.tie_word_embeddings or config.family == "chatglm"
    config.tie_word_embeddings = False  # the embedding and output layer are parallelized apart, then tied
    with torch.device("meta"):
        model = GLMForCausalLM(config)
    sat_quant = sat_quantization(config)
    if sat_quant is not None:
        if quantize is not None:
            raise ValueError("this GLM-130B checkpoint is already quantized (convert_tp.py); load it without quantize=")
        groups = max(sat_quant["row_parallel_groups"] // world, 1) * world  # row-parallel scales per merged row
        prepare_sat_model(model, sat_quant["bits"], groups)
    elif quantize is not None:
        bits = {"int8": 8, "int4": 4, "8": 8, "4": 4, 8: 8, 4: 4}.get(quantize)
        if bits is None:
            raise ValueError(f"quantize must be 'int8' or 'int4', got {quantize!r}")
        spec = default_spec(bits, group_size=group_size, scheme=scheme)
        spec["head"] = None
        prepare_model(model, spec)
    shard_model(model, mesh)
    for target, tensor in _rank_tensors(folder, config, hf, world, rank, sat):
        try:
            _assign_local(model, target, tensor.to(dev) if tensor.device != dev else tensor, target_dtype)
        except UnexpectedWeightError:
            raise CheckpointError(f"{folder}: unexpected weight {target!r}") from None
    if tie and _is_meta(model.lm_head.weight):
        model.lm_head.weight = model.wte.weight
        config.tie_word_embeddings = True
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if _is_meta(p)]
    if missing:
        raise CheckpointError(f"{folder}: weights missing from the checkpoint: {', '.join(missing[:8])}")
    if config.rope in ("2d", "1d"):
        config.rope_fp16 = chatglm_rope_mode(target_dtype)
    model.eval()
    model.tensor_parallel = {"world_size": world, "rank": rank, "mesh": mesh}
    return model


def _is_meta(t: torch.Tensor) -> bool:
    return (t.to_local() if isinstance(t, DTensor) else t).is_meta


def _check_splittable(config: GLMConfig, world: int) -> None:
    if config.qkv_layout != "per_head" or config.num_kv_heads != config.num_heads:
        raise ValueError("tensor parallelism splits qkv by heads: it needs the per-head qkv layout (GLM-130B, "
                         f"ChatGLM-6B); this {config.family} checkpoint has grouped q/k/v")
    for name, value in (("num_heads", config.num_heads), ("ffn_hidden_size", config.ffn_hidden_size),
                        ("vocab_size", config.vocab_size)):
        if value % world:
            raise ValueError(f"{name} {value} does not split over {world} ranks")


# ------------------------------------------------------------------------------------------------ lockstep
_CALLS = ("setup_cache", "clear_cache", "reorder_cache")


_LEADER: Leader | None = None


def finish_leader(code: int = 0) -> int:
    """On rank 0 of a tensor-parallel run: tell the other ranks to stop, then end like a worker (barrier, destroy
    the process group, os._exit(code)). Anywhere else: returns `code`."""
    if _LEADER is None:
        return code
    _LEADER.stop()
    end_worker(code)
    return code


class Leader:
    """Rank 0's side of the lockstep: every model call is broadcast to the other ranks before it runs here."""

    def __init__(self, model: GLMForCausalLM) -> None:
        self.model = model
        self.group = dist.new_group(backend="gloo")  # control messages on CPU whatever the compute backend
        self.stopped = False
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        for name in _CALLS:
            original = getattr(model, name)
            setattr(model, name, self._wrap(name, original))
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:  # rank 0 ending without finish_leader (an exception): release the others
        if not self.stopped and dist.is_initialized():
            self.stop()
            dist.barrier()
            dist.destroy_process_group()

    def send(self, message: tuple) -> None:
        dist.broadcast_object_list([_to_cpu(message)], src=0, group=self.group)

    def _before_forward(self, module, args, kwargs):
        self.send(("forward", args, kwargs))

    def _wrap(self, name, original):
        def call(*args, **kwargs):
            self.send((name, args, kwargs))
            return original(*args, **kwargs)

        return call

    def stop(self) -> None:
        if not self.stopped and dist.is_initialized():
            self.stopped = True
            self.send(("stop", (), {}))


def follow(model: GLMForCausalLM) -> None:
    """A non-zero rank's side: runs every call rank 0 sends, until it stops."""
    group = dist.new_group(backend="gloo")
    device = model.device
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        name, args, kwargs = box[0]
        if name == "stop":
            return
        args, kwargs = _to_device((args, kwargs), device)
        with torch.inference_mode():
            if name == "forward":
                model(*args, **kwargs)
            else:
                getattr(model, name)(*args, **kwargs)


def lockstep(model: GLMForCausalLM) -> bool:
    """Sets up the lockstep for a tensor-parallel model: True on rank 0 (drive the model as usual; the other ranks
    mirror it until the process exits), False on the others after rank 0 has stopped (they have nothing else to
    do). A model that is not tensor-parallel returns True at once."""
    info = getattr(model, "tensor_parallel", None)
    if not info or info["world_size"] == 1:
        return True
    if info["rank"] == 0:
        global _LEADER
        _LEADER = Leader(model)
        return True
    follow(model)
    return False


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
