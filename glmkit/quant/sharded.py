"""GLM-130B's quantized checkpoints (THUDM/GLM-130B tools/convert_tp.py --quantization-bit-width 4|8) as
QuantizedLinear layers.

convert_tp.py quantizes every tensor-parallel shard on its own with the per-row scheme glmkit calls `rowwise`
(scale = max|w_row| / (2^(bits-1) - 1) in fp16, q = round(w / scale), INT4 packed two per byte, even column in the
high nibble). For the column-parallel layers (query_key_value, dense_h_to_4h) a shard holds whole rows, so the
merged layer is an ordinary rowwise QuantizedLinear. For the row-parallel ones (attention.dense, dense_4h_to_h) a
shard holds a slice of every row's inputs with a scale of its own: merged, each row has one scale per shard, i.e.
group-wise scales over the shards' slices of the input. GroupedRowwiseLinear computes exactly that, as the sum of
one rowwise QuantizedLinear per slice (what the ranks compute before their all-reduce).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from glmkit.quant.linear import QuantizedLinear, save_portable_state
from glmkit.quant.transform import prepare_model

ROW_PARALLEL = ("attn.proj", "mlp.proj")


def sat_spec(bits: int) -> dict[str, Any]:
    """The quantization spec of a convert_tp.py checkpoint: rowwise INT8/INT4 in THUDM's packing, float head."""
    if bits not in (4, 8):
        raise ValueError(f"GLM-130B quantized checkpoints are INT4 or INT8, got {bits} bits")
    return {"bits": bits, "scheme": "rowwise", "group_size": None, "symmetric": True, "layout": "thudm", "head": None}


class GroupedRowwiseLinear(nn.Module):
    """y = sum_g x[:, slice_g] @ W_g^T + b, each W_g rowwise-quantized with its own per-row scales: a row-parallel
    layer of a quantized GLM-130B checkpoint merged from `groups` shards.

    Checkpoint tensors: weight (int8 [N, K], or packed INT4 [N, K/2]: the shards' columns side by side), weight_scale
    [N, groups] (or [N] for one group) and bias [N].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int, groups: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if in_features % groups or (bits == 4 and (in_features // groups) % 2):
            raise ValueError(f"in_features {in_features} does not split into {groups} slices of whole INT{bits} bytes")
        self.in_features, self.out_features, self.bits, self.groups = in_features, out_features, bits, groups
        self.parts = nn.ModuleList(
            QuantizedLinear(in_features // groups, out_features, bias=False, bits=bits, scheme="rowwise",
                            group_size=None, symmetric=True, dtype=dtype) for _ in range(groups))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta"), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._pending: dict[str, torch.Tensor] = {}

    @property
    def is_loaded(self) -> bool:
        return all(p.is_loaded for p in self.parts)

    def load_weight_tensor(self, attr_name: str, tensor: torch.Tensor) -> None:
        if attr_name == "bias":
            if self.bias is None or tuple(tensor.shape) != (self.out_features,):
                raise ValueError(f"unexpected bias of shape {tuple(tensor.shape)} for {self}")
            self.bias = nn.Parameter(tensor.to(self.parts[0].compute_dtype, copy=True), requires_grad=False)
            return
        if attr_name not in ("weight", "weight_scale"):
            raise ValueError(f"GroupedRowwiseLinear takes weight, weight_scale and bias, not {attr_name!r}")
        if attr_name == "weight" and tensor.is_floating_point():
            raise ValueError("GroupedRowwiseLinear holds a pre-quantized checkpoint's weights (int8), got a float one")
        self._pending[attr_name] = tensor
        if len(self._pending) < 2:
            return
        weight, scale = self._pending.pop("weight"), self._pending.pop("weight_scale")
        scale = scale[:, None] if scale.dim() == 1 else scale
        if tuple(scale.shape) != (self.out_features, self.groups):
            raise ValueError(f"weight_scale must be [{self.out_features}, {self.groups}] (one scale per row and shard), "
                             f"got {tuple(scale.shape)}")
        cols = weight.shape[1] // self.groups
        for g, part in enumerate(self.parts):
            part.load_weight_tensor("weight", weight[:, g * cols:(g + 1) * cols].contiguous())
            part.load_weight_tensor("weight_scale", scale[:, g].contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features // self.groups
        out = self.parts[0](x[..., :k])
        for g in range(1, self.groups):
            out = out + self.parts[g](x[..., g * k:(g + 1) * k])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def export(self) -> dict[str, torch.Tensor]:
        """The merged checkpoint tensors: weight (slices side by side), weight_scale [N, groups], bias."""
        parts = [p.export() for p in self.parts]
        out = {"weight": torch.cat([p["weight"] for p in parts], dim=1),
               "weight_scale": torch.stack([p["weight_scale"] for p in parts], dim=1)}
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu()
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantized_weight(dtype) for p in self.parts], dim=1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        save_portable_state(self, destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, groups={self.groups}")


def prepare_sat_model(model: nn.Module, bits: int, row_parallel_groups: int = 1) -> nn.Module:
    """Swaps the four linears of every layer of a meta-built GLM-130B for empty quantized layers ready for a
    convert_tp.py checkpoint: rowwise QuantizedLinear, and GroupedRowwiseLinear for the row-parallel two when the
    checkpoint's scales come from more than one shard."""
    prepare_model(model, sat_spec(bits))
    if row_parallel_groups > 1:
        dtype = model.h[0].attn.qkv.compute_dtype
        for block in model.h:
            for path in ROW_PARALLEL:
                parent_name, _, attr = path.rpartition(".")
                parent = block.get_submodule(parent_name)
                old = getattr(parent, attr)
                setattr(parent, attr, GroupedRowwiseLinear(old.in_features, old.out_features, old.bias is not None,
                                                           bits=bits, groups=row_parallel_groups, dtype=dtype))
    return model
