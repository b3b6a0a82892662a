"""QuantizedLinear and QuantizedEmbedding: frozen weight-only INT8/INT4 layers (the formats: glmkit.quant.formats).

Compute dtype follows the activations: bf16 takes the fast CPU kernels; fp32 dequantizes exactly (``q * scale``
with the stored scale, as ChatGLM-6B's CPU kernels do) for reference results; fp16 on CPU is computed in fp32.

A loaded layer holds its weights in one runtime layout, a small `Layout` object that multiplies, dequantizes, looks
rows up and gives the checkpoint tensors back; the tensors stay the module's buffers (``qweight``,
``weight_scale``, ...), so that device moves, state dicts and the loader's checks see ordinary buffers:

* ``int8``: INT8 [N, K] with its fp16 scale per row (aten's INT8 kernel);
* ``int4pack``: the CPU INT4 kernel's layout (glmkit.quant.kernels) and a bf16 (scale, zero) table;
* ``tinygemm``: torch's CUDA INT4 kernel's layout (group scheme, bf16/fp16 models);
* ``packed``: the portable form, INT4 two per byte in THUDM's order (even column in the high nibble).

`glmkit quantize` saves the int4pack layout as it is (with its block size in the metadata), 64-byte aligned, so
that loading maps the file and takes the tensors without a copy; a CPU with another block size, and CUDA, repack
it. THUDM ``quantization_bit`` checkpoints and glmkit's earlier saved files (portable layout) load too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from glmkit.quant import formats, kernels
from glmkit.quant.formats import DEFAULT_GROUP_SIZE, default_spec, effective_group_size, pack_group_for, row_chunks
from glmkit.quant.kernels import release_freed_memory

# ================================================================================================ layouts


class Layout:
    """How a loaded QuantizedLinear `m` holds its weights; one instance per kind (its tensors are m's buffers).
    This base is the layout of a layer not loaded yet."""

    name = "empty"

    def __reduce__(self):  # copies and pickles of a layer keep the one instance of its kind
        return self.name.upper()

    def __repr__(self) -> str:
        return f"<{self.name} layout>"

    def fits(self, m: QuantizedLinear, device: torch.device) -> bool:
        """Whether a layer like `m` takes this layout on `device` (tried in RUNTIME_LAYOUTS' order)."""
        return False

    def build(self, m: QuantizedLinear, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              device: torch.device) -> None:
        """Fills m's buffers from the checked portable form (int8 [N, K] or packed [N, K/2], scale, zero)."""
        raise NotImplementedError

    def matmul(self, m: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W^T [M, N] in x's dtype."""
        raise RuntimeError("QuantizedLinear used before its weights were loaded")

    def matmul_transposed(self, m: QuantizedLinear, g: torch.Tensor) -> torch.Tensor:
        """g [M, N] @ W -> [M, K] (the input gradient), through the dequantized weight."""
        dtype = g.dtype if g.dtype in (torch.float32, torch.bfloat16) or g.device.type != "cpu" else torch.float32
        w = self.dequantize(m, dtype).to(g.device)
        return (g.to(dtype) @ w).to(g.dtype)

    def dequantize(self, m: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
        """The [N, K] weight the layer computes with (q * scale + zero)."""
        raise ValueError("this QuantizedLinear has not been loaded yet")

    def lookup(self, m: QuantizedLinear, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (any shape) of the weight, dequantized as the matmuls do: [*ids.shape, K] in dtype."""
        raise ValueError(f"the {self.name} layout has no row lookup")

    def portable(self, m: QuantizedLinear) -> dict[str, torch.Tensor]:
        """weight (int8 [N, K] or THUDM-packed [N, K/2]), weight_scale and weight_zero (asymmetric groups)."""
        raise ValueError("this QuantizedLinear has not been loaded yet")

    def saved(self, m: QuantizedLinear) -> dict[str, torch.Tensor]:
        """The tensors `glmkit quantize` writes: the portable ones unless the layout is worth mapping as it is."""
        return self.portable(m)


def _from_scale_zero_table(m: QuantizedLinear, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The portable tensors of an INT4 layout whose scales (and zeros) sit in a [K/group, N(+pad), 2] table."""
    n = m.out_features
    out = {"weight": kernels.pack_int4(q.cpu())}
    if m.scheme == "group":
        out["weight_scale"] = m.scale_zero[:, :n, 0].t().contiguous()
        if not m.symmetric:
            out["weight_zero"] = m.scale_zero[:, :n, 1].t().contiguous()
    else:
        out["weight_scale"] = m.weight_scale
    return out


class Int4Pack(Layout):
    name = "int4pack"

    def fits(self, m, device):
        group = m.group_size if m.scheme == "group" else pack_group_for(m.in_features)
        return (m.bits == 4 and device.type == "cpu" and group is not None
                and kernels.int4pack_supported(m.out_features, m.in_features, group))

    def build(self, m, weight, scale, zero, device):
        n, k = m.out_features, m.in_features
        group = m.group_size if m.scheme == "group" else pack_group_for(k)
        m._buffers["qweight"] = _thudm_to_int4pack(weight, n, k)
        release_freed_memory()  # the repacking temporaries
        n_pad = m._buffers["qweight"].shape[0]
        if m.scheme == "group":
            s, z = scale, zero if zero is not None else torch.zeros_like(scale)
        else:
            m._buffers["weight_scale"] = scale  # exact (fp16) values for the fp32 path
            s = scale.to(torch.bfloat16)[:, None].expand(n, k // group)
            z = torch.zeros_like(s)
        table = torch.zeros(k // group, n_pad, 2, dtype=torch.bfloat16)  # padding rows: s = z = 0
        table[:, :n, 0], table[:, :n, 1] = s.t(), z.t()
        m._buffers["scale_zero"] = table

    @staticmethod
    def _row_scale(m):
        return m.weight_scale if m.scheme == "rowwise" else None

    def matmul(self, m, x):
        return kernels.int4pack_linear(x, m.qweight, m.scale_zero, m.scale_zero_group, m.out_features,
                                       self._row_scale(m))

    def matmul_transposed(self, m, g):
        return kernels.int4pack_linear_transposed(g, m.qweight, m.scale_zero, m.scale_zero_group, m.out_features,
                                                  m.in_features, self._row_scale(m)).to(g.dtype)

    def dequantize(self, m, dtype):
        return kernels.int4pack_dequantize(m.qweight, m.scale_zero, m.scale_zero_group, m.out_features,
                                           m.in_features, dtype, self._row_scale(m))

    def lookup(self, m, ids, dtype):
        return kernels.int4pack_lookup(m.qweight, m.scale_zero, m.scale_zero_group, m.in_features, ids, dtype,
                                       self._row_scale(m))

    def portable(self, m):
        return _from_scale_zero_table(m, kernels.int4pack_to_int(m.qweight, m.out_features, m.in_features))

    def saved(self, m):
        # as it is, so that loading maps it without a copy (plus the exact fp16 scales of the rowwise scheme)
        out = {"weight_int4pack": m.qweight, "weight_scale_zero": m.scale_zero}
        if m.scheme == "rowwise":
            out["weight_scale"] = m.weight_scale
        return out


class Tinygemm(Layout):
    name = "tinygemm"

    def fits(self, m, device):
        # torch's INT4 kernel computes in bf16; an fp32 model keeps the exact dequantize + matmul path
        return (m.bits == 4 and m._CUDA_INT4_KERNEL and m.scheme == "group" and m.compute_dtype != torch.float32
                and kernels.tinygemm_supported(m.out_features, m.in_features, m.group_size, device))

    def build(self, m, weight, scale, zero, device):
        m._buffers["qweight"] = kernels.int_to_tinygemm(kernels.unpack_int4(weight), device)
        z = zero if zero is not None else torch.zeros_like(scale)
        m._buffers["scale_zero"] = torch.stack((scale.t(), z.t()), dim=-1).to(device).contiguous()

    def _int(self, m):
        return kernels.tinygemm_to_int(m.qweight, m.scale_zero, m.group_size, m.out_features, m.in_features)

    def matmul(self, m, x):
        if x.dtype == torch.float32:  # exact: fp32 inputs to a model moved to fp32 after loading (rare)
            return x @ self.dequantize(m, torch.float32).t()
        return kernels.tinygemm_linear(x, m.qweight, m.scale_zero, m.group_size)

    def dequantize(self, m, dtype):
        s, z = m.scale_zero[..., 0].t(), m.scale_zero[..., 1].t()
        return kernels.int4_dequantize(self._int(m), s, z, m.group_size, dtype)

    def portable(self, m):
        return _from_scale_zero_table(m, self._int(m))


class Packed(Layout):
    """The portable form as it is: INT4 two per byte in THUDM's order, scale (and zero) per row or group."""

    name = "packed"

    def fits(self, m, device):
        return m.bits == 4

    def build(self, m, weight, scale, zero, device):
        m._buffers["qweight"] = weight.to(device).contiguous()
        m._buffers["weight_scale"] = scale.to(device)
        m._buffers["weight_zero"] = zero.to(device) if zero is not None else None

    def matmul(self, m, x):
        return kernels.int4_linear_portable(x, m.qweight, m.weight_scale, m.weight_zero,
                                            m.group_size or m.in_features)

    def dequantize(self, m, dtype):
        return kernels.int4_dequantize(kernels.unpack_int4(m.qweight), m.weight_scale, m.weight_zero,
                                       m.group_size or m.in_features, dtype)

    def lookup(self, m, ids, dtype):
        flat = ids.reshape(-1)
        zero = m.weight_zero[flat] if m.weight_zero is not None else None
        rows = kernels.int4_dequantize(kernels.unpack_int4(m.qweight[flat]), m.weight_scale[flat], zero,
                                       m.group_size or m.in_features, dtype)
        return rows.view(*ids.shape, m.in_features)

    def portable(self, m):
        out = {"weight": m.qweight, "weight_scale": m.weight_scale}
        if m.weight_zero is not None:
            out["weight_zero"] = m.weight_zero
        return out


class Int8(Packed):
    """INT8 keeps the portable tensors as they are (aten's INT8 kernel reads them), plus bf16 scales on CPU."""

    name = "int8"

    def fits(self, m, device):
        return m.bits == 8

    def build(self, m, weight, scale, zero, device):
        super().build(m, weight, scale, None, device)
        if device.type == "cpu":
            m._buffers["scale_bf16"] = scale.to(torch.bfloat16)

    def matmul(self, m, x):
        return kernels.int8_linear(x, m.qweight, m.weight_scale, m.scale_bf16)

    def dequantize(self, m, dtype):
        return kernels.int8_dequantize(m.qweight, m.weight_scale, dtype)

    def lookup(self, m, ids, dtype):
        flat = ids.reshape(-1)
        rows = m.qweight[flat].float().mul_(m.weight_scale[flat].float()[:, None])
        return rows.to(dtype).view(*ids.shape, m.in_features)


EMPTY, INT8, INT4PACK, TINYGEMM, PACKED = Layout(), Int8(), Int4Pack(), Tinygemm(), Packed()
RUNTIME_LAYOUTS = (INT8, INT4PACK, TINYGEMM, PACKED)  # the first that fits a layer on its device holds it


def _thudm_to_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    out = kernels.weight_buffer((kernels.int4pack_rows(n), k // 2), torch.uint8)
    for rows in row_chunks(n, k):
        out[rows] = kernels.int_to_int4pack(kernels.unpack_int4(packed[rows]))
    return out


# ================================================================================================ the modules


def save_portable_state(module: nn.Module, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
    """`_save_to_state_dict` of a quantized layer (QuantizedLinear, sharded.GroupedRowwiseLinear): once loaded, its
    `export()` tensors (the checkpoint's portable form); before, nn.Module's own (empty placeholders)."""
    if not module.is_loaded:
        nn.Module._save_to_state_dict(module, destination, prefix, keep_vars)
        return
    for name, t in module.export().items():
        destination[prefix + name] = t


class _QuantizedMatmul(torch.autograd.Function):
    """x @ W^T with W quantized and frozen; backward gives the input gradient (grad @ dequantized W), which is
    what P-tuning and LoRA on a quantized base need."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        x2 = x.reshape(-1, x.shape[-1])
        return module._matmul(x2).reshape(*x.shape[:-1], module.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        module = ctx.module
        g2 = grad.reshape(-1, module.out_features)
        gx = module._matmul_transposed(g2)
        return gx.view(*grad.shape[:-1], module.in_features), None


class QuantizedLinear(nn.Module):
    """A frozen weight-only INT8/INT4 linear (``y = x W^T + b``, bias in floating point).

    Build it empty (``prepare_model`` on the meta device) and feed checkpoint tensors through
    ``load_weight_tensor``, or from a float weight with ``QuantizedLinear.from_linear``.
    """

    _STORAGE = ("qweight", "weight_scale", "weight_zero", "scale_zero", "scale_bf16")
    # checkpoint tensors: the portable form, and the CPU kernel's layout as `glmkit quantize` saves it
    PORTABLE_TENSORS = ("weight", "weight_scale", "weight_zero")
    INT4PACK_TENSORS = ("weight_int4pack", "weight_scale_zero")
    _CUDA_INT4_KERNEL = True  # QuantizedEmbedding keeps the portable layout on CUDA (it also looks rows up)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 scheme: str = "group", group_size: int | None = DEFAULT_GROUP_SIZE, symmetric: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 int4pack_block: int | None = None) -> None:
        super().__init__()
        # rows per block of `weight_int4pack` checkpoint tensors (the saving machine's; None = this CPU's)
        self.int4pack_block = int4pack_block
        spec = default_spec(bits, group_size if scheme == "group" else None, scheme, symmetric)
        self.requested_group_size = spec["group_size"]  # what the spec says; group_size = what this layer uses
        if spec["scheme"] == "group":
            spec["group_size"] = effective_group_size(in_features, spec["group_size"])
        if bits == 4 and in_features % 2:
            raise ValueError(f"INT4 packs two columns per byte: in_features must be even, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.scheme = spec["bits"], spec["scheme"]
        self.group_size = spec["group_size"]
        self.symmetric = spec["symmetric"]
        self.compute_dtype = dtype
        self._layout: Layout = EMPTY
        meta = torch.empty(0, device="meta")
        # placeholder until loaded, so the loader's missing-weights check sees an unloaded module
        self.register_buffer("qweight", meta, persistent=False)
        for name in self._STORAGE[1:]:
            self.register_buffer(name, None, persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device or "meta"),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._pending: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, scheme: str | None = None, group_size: int | None = None,
                    symmetric: bool = False) -> QuantizedLinear:
        spec = default_spec(bits, group_size, scheme, symmetric)
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=spec["bits"],
                scheme=spec["scheme"], group_size=spec["group_size"], symmetric=spec["symmetric"], dtype=w.dtype)
        m.load_weight_tensor("weight", w)
        if linear.bias is not None:
            m.load_weight_tensor("bias", linear.bias.detach())
        return m

    @property
    def layout(self) -> str:
        """"int8" | "int4pack" | "tinygemm" | "packed" (see the module's docstring), "empty" until loaded."""
        return self._layout.name

    @property
    def is_loaded(self) -> bool:
        return self._layout is not EMPTY

    def load_weight_tensor(self, attr_name: str, tensor: torch.Tensor) -> None:
        """Receives one checkpoint tensor. A floating-point ``weight`` is quantized right here (quantize-on-load),
        a block of rows at a time (it may be a loader.CheckpointRows, which reads only the rows sliced); an
        integer one (with ``weight_scale`` and, for asymmetric groups, ``weight_zero``) is taken as stored."""
        if attr_name == "bias":
            if self.bias is None:
                raise ValueError(f"{self}: the checkpoint has a bias but this layer was built without one")
            if tuple(tensor.shape) != (self.out_features,):
                raise ValueError(f"bias shape {tuple(tensor.shape)} does not match out_features {self.out_features}")
            # a copy: a view would keep the checkpoint file mapped (and its touched pages resident)
            self.bias = nn.Parameter(tensor.to(self.compute_dtype, copy=True).contiguous(), requires_grad=False)
            return
        if attr_name not in self.PORTABLE_TENSORS + self.INT4PACK_TENSORS:
            raise ValueError(f"QuantizedLinear has no checkpoint tensor {attr_name!r} "
                             "(expected weight, weight_scale, weight_zero, weight_int4pack, weight_scale_zero or bias)")
        if self.is_loaded:
            raise ValueError(f"{attr_name} arrived for a QuantizedLinear that is already loaded (duplicate tensor?)")
        if attr_name == "weight" and tensor.is_floating_point():
            if tuple(tensor.shape) != (self.out_features, self.in_features):
                raise ValueError(f"float weight shape {tuple(tensor.shape)} does not match "
                                 f"[{self.out_features}, {self.in_features}]")
            self._quantize_and_store(tensor)
            return
        self._pending[attr_name] = tensor
        if set(self.INT4PACK_TENSORS) & set(self._pending):  # the CPU kernel's layout, saved by glmkit quantize
            needed = set(self.INT4PACK_TENSORS) | ({"weight_scale"} if self.scheme == "rowwise" else set())
            if needed <= set(self._pending):
                p, self._pending = self._pending, {}
                self._adopt_int4pack(p["weight_int4pack"], p["weight_scale_zero"], p.get("weight_scale"))
            return
        needed = {"weight", "weight_scale"} | ({"weight_zero"} if self.scheme == "group" and not self.symmetric
                                               else set())
        if needed <= set(self._pending):
            p, self._pending = self._pending, {}
            self.load_portable(p["weight"], p["weight_scale"], p.get("weight_zero"))

    def _adopt_int4pack(self, packed: torch.Tensor, scale_zero: torch.Tensor, row_scale: torch.Tensor | None) -> None:
        """Takes the CPU kernel's layout as saved: as it is (no copy: the tensors may be views of a memory-mapped
        file) when the block size is this CPU's, else through the portable form."""
        n, k = self.out_features, self.in_features
        if self.bits != 4:
            raise ValueError("weight_int4pack tensors hold INT4 weights, but this layer is INT8")
        block = self.int4pack_block or kernels.int4pack_block_n() or 64
        n_pad = kernels.int4pack_rows(n, block)
        group = self.group_size if self.scheme == "group" else pack_group_for(k)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (n_pad, k // 2):
            raise ValueError(f"weight_int4pack must be uint8 [{n_pad}, {k // 2}] (rows padded to blocks of {block}), "
                             f"got {packed.dtype} {tuple(packed.shape)}")
        if scale_zero.dtype != torch.bfloat16 or group is None or tuple(scale_zero.shape) != (k // group, n_pad, 2):
            raise ValueError(f"weight_scale_zero must be bf16 [{k // (group or k)}, {n_pad}, 2], got "
                             f"{scale_zero.dtype} {tuple(scale_zero.shape)}")
        if row_scale is not None and tuple(row_scale.shape) != (n,):
            raise ValueError(f"rowwise weight_scale must have shape [{n}], got {tuple(row_scale.shape)}")
        if block == kernels.int4pack_block_n() and packed.device.type == "cpu":
            for name in self._STORAGE:
                self._buffers[name] = None
            self._layout = INT4PACK
            self._buffers["qweight"] = packed
            self._buffers["scale_zero"] = scale_zero
            self._buffers["weight_scale"] = row_scale
            return
        q = kernels.int4pack_to_int(packed, n, k, block)
        if self.scheme == "rowwise":
            scale, zero = row_scale, None
        else:
            scale = scale_zero[:, :n, 0].t().contiguous()
            zero = None if self.symmetric else scale_zero[:, :n, 1].t().contiguous()
        self.load_portable(kernels.pack_int4(q), scale, zero)

    def _quantize_and_store(self, w: torch.Tensor) -> None:
        """Row chunks keep the temporaries small: peak = the float weight + the quantized layer + one chunk.
        INT4 chunks are packed two per byte as they come, so the whole layer never exists one value per byte."""
        n, k = w.shape
        # INT8 weights stay in this buffer (the kernel's layout); INT4 ones are repacked into another
        qweight = (kernels.weight_buffer((n, k), torch.int8) if self.bits == 8
                   else torch.empty(n, k // 2, dtype=torch.int8))
        scales, zeros = [], []
        for rows in row_chunks(n, k):
            chunk = w[rows]
            if self.scheme == "rowwise":
                q, s = formats.quantize_rowwise(chunk, self.bits)
                z = None
            else:
                q, s, z = formats.quantize_group(chunk, self.group_size, self.symmetric)
            qweight[rows] = kernels.pack_int4(q) if self.bits == 4 else q
            scales.append(s)
            if z is not None:
                zeros.append(z)
            del q
        self.load_portable(qweight, torch.cat(scales), torch.cat(zeros) if zeros else None)
        del qweight, scales, zeros
        release_freed_memory()

    def load_portable(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      device: torch.device | None = None) -> None:
        """Takes the portable form (int8 [N, K] or THUDM-packed int8 [N, K/2] + scale [+ zero]), checks it and
        builds the runtime layout for `device` (default: where the tensors are): the first of RUNTIME_LAYOUTS
        that fits."""
        n, k = self.out_features, self.in_features
        device = torch.device(device) if device is not None else weight.device
        cols = k if self.bits == 8 else k // 2
        if weight.dtype not in (torch.int8, torch.uint8) or tuple(weight.shape) != (n, cols):
            raise ValueError(f"quantized weight must be int8 [{n}, {cols}] for INT{self.bits} with in_features {k}, "
                             f"got {weight.dtype} {tuple(weight.shape)}")
        weight = weight.view(torch.int8)
        if self.scheme == "rowwise":
            if tuple(scale.shape) != (n,):
                raise ValueError(f"rowwise weight_scale must have shape [{n}], got {tuple(scale.shape)}")
        else:
            groups = k // self.group_size
            if tuple(scale.shape) != (n, groups):
                raise ValueError(f"group weight_scale must have shape [{n}, {groups}] (group_size "
                                 f"{self.group_size}), got {tuple(scale.shape)}")
            if zero is not None and tuple(zero.shape) != (n, groups):
                raise ValueError(f"weight_zero must have shape [{n}, {groups}], got {tuple(zero.shape)}")
            scale = scale.to(torch.bfloat16)
            zero = zero.to(torch.bfloat16) if zero is not None else None
        if self.scheme == "rowwise" and not scale.is_floating_point():
            raise ValueError(f"weight_scale must be floating point, got {scale.dtype}")
        for name in self._STORAGE:
            self._buffers[name] = None
        layout = next(layout for layout in RUNTIME_LAYOUTS if layout.fits(self, device))
        layout.build(self, weight, scale, zero, device)
        self._layout = layout

    def export(self) -> dict[str, torch.Tensor]:
        """The portable checkpoint tensors: weight (int8 [N, K] or THUDM-packed [N, K/2]), weight_scale,
        weight_zero (asymmetric groups), bias."""
        if not self.is_loaded:
            raise ValueError("this QuantizedLinear has not been loaded yet")
        out = self._layout.portable(self)
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return {name: t.detach().cpu().contiguous() for name, t in out.items()}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """What `glmkit quantize` writes for this layer: the CPU kernel's layout as it is (`weight_int4pack`,
        `weight_scale_zero`, plus the exact `weight_scale` of the rowwise scheme), so that loading maps it without
        a copy; INT8 (already the kernel's layout) and the other layouts in the portable form."""
        out = self._layout.saved(self)
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return {name: t.detach().cpu().contiguous() for name, t in out.items()}

    # state_dict()/load_state_dict() carry the portable tensors, so generic save/load code sees real weights
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        save_portable_state(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = [n for n in ("weight_zero", "weight_scale", "weight", "weight_int4pack", "weight_scale_zero", "bias")
                 if prefix + n in state_dict]
        if self.is_loaded and names:
            # reload in place: forget the current storage first
            self._layout = EMPTY
        for name in names:
            try:
                self.load_weight_tensor(name, state_dict[prefix + name])
            except ValueError as e:
                error_msgs.append(f"{prefix}{name}: {e}")
        if strict:
            needed = {"weight", "weight_scale"} | ({"bias"} if self.bias is not None else set())
            needed |= {"weight_zero"} if self.scheme == "group" and not self.symmetric else set()
            if set(self.INT4PACK_TENSORS) & set(names):
                needed = set(self.INT4PACK_TENSORS) | ({"bias"} if self.bias is not None else set())
                needed |= {"weight_scale"} if self.scheme == "rowwise" else set()
            missing_keys.extend(prefix + n for n in sorted(needed - set(names)))
            known = {prefix + n for n in self.PORTABLE_TENSORS + self.INT4PACK_TENSORS + ("bias",)}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known
                                   and "." not in k[len(prefix):])

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [N, K] weight this layer computes with (q * scale + zero), for tests and inspection."""
        return self._layout.dequantize(self, dtype)

    # -------------------------------------------------------------------------------------------- compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_loaded:
            raise RuntimeError("QuantizedLinear used before its weights were loaded")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer expects {self.in_features}")
        if x.requires_grad and torch.is_grad_enabled():
            out = _QuantizedMatmul.apply(x, self)
        else:  # inference: no autograd node (its per-call cost adds up over 4 layers x 28 per token)
            out = self._matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype, through the fastest correct kernel for this device, dtype and M."""
        dtype = x.dtype
        if x.device.type == "cpu" and dtype == torch.float16:
            # CPU fp16 GEMMs are slow and lossy: compute exactly in fp32 (use bf16 for speed on CPU)
            return self._matmul(x.float()).to(dtype)
        return self._layout.matmul(self, x)

    @property
    def scale_zero_group(self) -> int:
        return self.in_features // self.scale_zero.shape[0]

    def _matmul_transposed(self, g: torch.Tensor) -> torch.Tensor:
        """g [M, N] @ W -> [M, K] (the input gradient), dequantizing row chunks of W."""
        return self._layout.matmul_transposed(self, g)

    # -------------------------------------------------------------------------------------------- device moves
    def _apply(self, fn, recurse=True):
        """`.to()`, `.float()`, `.cuda()`...: the bias follows; the quantized storage keeps its dtypes and only
        changes device (and layout: the CPU kernel layout exists on CPU only)."""
        storage = {name: self._buffers[name] for name in self._STORAGE if self._buffers.get(name) is not None}
        for name in storage:
            self._buffers[name] = None
        super()._apply(fn, recurse)
        probe, probe16 = fn(torch.empty(0)), fn(torch.empty(0, dtype=torch.float16))
        for name, t in storage.items():
            self._buffers[name] = t
        if probe.dtype == probe16.dtype and probe.is_floating_point():  # a dtype conversion (not just a move)
            self.compute_dtype = probe.dtype
        target = probe.device
        current = self.qweight.device
        if self.is_loaded and target.type != "meta" and target != current:
            portable = self.export()
            self.load_portable(portable["weight"], portable["weight_scale"], portable.get("weight_zero"), device=target)
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}, symmetric={self.symmetric}" if self.scheme == "group" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, scheme={self.scheme}{group}, layout={self.layout}")


class QuantizedEmbedding(QuantizedLinear):
    """A quantized [vocab, hidden] table: the embedding and, tied or not, the output layer.

    Called with token ids (an integer tensor) it is the embedding lookup: those rows, dequantized, in the model's
    dtype. Called with hidden states (a float tensor) it is the output layer: logits = x @ table^T through the
    INT8/INT4 matmul kernels. A tied model sets the one table as both ``model.wte`` and ``model.lm_head``, so
    glmkit.core.model calls it in both roles without knowing it is quantized. The table is frozen.
    """

    _CUDA_INT4_KERNEL = False  # on CUDA the rows must stay readable: the portable layout serves both roles

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bits: int = 8, scheme: str = "rowwise",
                 group_size: int | None = None, symmetric: bool = True, dtype: torch.dtype = torch.float32,
                 int4pack_block: int | None = None) -> None:
        super().__init__(embedding_dim, num_embeddings, bias=False, bits=bits, scheme=scheme, group_size=group_size,
                         symmetric=symmetric, dtype=dtype, int4pack_block=int4pack_block)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, spec: dict[str, Any]) -> QuantizedEmbedding:
        """Quantizes a float [vocab, hidden] table (an nn.Embedding's or an output layer's weight)."""
        w = weight.detach()
        m = cls(w.shape[0], w.shape[1], bits=spec["bits"], scheme=spec["scheme"], group_size=spec["group_size"],
                symmetric=spec["symmetric"], dtype=w.dtype)
        m.load_weight_tensor("weight", w.cpu() if w.device.type != "cpu" else w)
        return m.to(w.device)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return super().forward(x)  # the output layer
        return self.lookup(x)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (any shape, integer) -> [*ids.shape, hidden] in the model's dtype: q * scale (+ zero) of those rows,
        computed in fp32 as the matmul kernels dequantize, then cast."""
        if not self.is_loaded:
            raise RuntimeError("QuantizedEmbedding used before its weights were loaded")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must lie in [0, {self.num_embeddings}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return self._layout.lookup(self, ids, self.compute_dtype)

    def extra_repr(self) -> str:
        return "num_embeddings={}, embedding_dim={}, ".format(self.num_embeddings, self.embedding_dim) + \
            super().extra_repr().split("bias=False, ", 1)[1]
