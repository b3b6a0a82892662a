"""INT8/INT4 weight-only quantization: QuantizedLinear, quantize-on-load, pre-quantized checkpoints, `glmkit quantize`.

What is quantized: the four linears of every layer (`attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj`; THUDM's
query_key_value, dense, dense_h_to_4h, dense_4h_to_h), as in GLM-130B and ChatGLM-6B, and by default also the
output layer and the embedding (the "head", INT8 by default whatever the layers' bits; ``head="int4"`` or
``"none"`` to choose). The output layer is read whole for every token: ChatGLM-6B's 130528x4096 one is 1.07 GB
in bf16, more than a quarter of an INT4 model's bytes per token. A tied model (ChatGLM-6B) keeps one quantized
table (`QuantizedEmbedding`) that serves the lookup (rows dequantized) and the logits matmul (the INT8/INT4
kernels). INT8 is the default because the output layer sets the next token directly: on glm-tiny an INT4 head
took an INT4 model's logits error from 0.0133 to 0.0542, an INT8 one to 0.0138 (benchmarks/accuracy.py). Norms
and biases stay in floating point (tiny).

Schemes (every value is ``w = q * scale (+ zero)``, q a signed integer):

* ``rowwise``: ChatGLM-6B's, bit for bit: symmetric, one scale per output row,
  ``scale = (max|w_row| / (2^(bits-1) - 1)).half()``, q in [-127, 127] or [-7, 7]. The only INT8 scheme (so INT8
  has exactly the original's error); THUDM ``quantization_bit`` checkpoints use it.
* ``group`` (INT4 default): one bf16 (scale, zero) pair per ``group_size`` (32..256, default 32) consecutive
  inputs of a row, q in [-8, 7], asymmetric by default (the group's min..max range in 15 steps, so its extreme
  weights stay exact: see MSE_CLIP_RATIOS for why nothing is clipped), or symmetric (zero = 0). Finer groups follow
  the local range of the weights. 32 is the default: its scales and zeros cost 0.35 GB more than 64's at the 6B
  shape and decode reads 8% more bytes; benchmarks/accuracy.py has the errors of each choice.

Compute dtype follows the activations: bf16 takes the fast CPU kernels; fp32 dequantizes exactly (``q * scale``
with the stored scale, as ChatGLM-6B's CPU kernels do) for reference results; fp16 on CPU is computed in fp32.

INT4 values are exported two per byte in THUDM's order (even column in the high nibble). On CPU the weights are
repacked for the fused kernel (glmkit.quant.kernels) and `glmkit quantize` saves that layout as it is (with its
block size in the metadata), 64-byte aligned, so that loading maps the file and takes the tensors without a copy;
a CPU with another block size, and CUDA, repack it. THUDM ``quantization_bit`` checkpoints and glmkit's earlier
saved files (portable layout) load too.
"""

from __future__ import annotations

import ctypes
import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.core.atomic import atomic_dir
from glmkit.core.convert import to_hf_config, to_thudm_state_dict
from glmkit.quant import kernels

QUANT_KEY = "glmkit_quantization"  # config.json key and safetensors metadata key of glmkit checkpoints
QUANTIZED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
SCHEMES = ("rowwise", "group")
DEFAULT_GROUP_SIZE = 32
GROUP_SIZES = (32, 64, 128, 256)
# The "MSE fit" of a group's grid: clipping ratios tried per group (1.0 = plain min/max), then least-squares refits
# of (scale, zero) to the rounded integers. It lowers the weights' squared error (random Gaussian models: 0.59x
# the per-row scheme's logits error, 0.64x with plain min/max) but on trained weights it costs the largest weights
# their exact values, which matter most: glm-tiny's INT4 logits error is 1.17x the original per-row scheme's with
# it and 0.88x without (benchmarks/README.md). So quantize-on-load rounds on the plain min..max grid; GPTQ, which
# pushes each rounding error onto later columns, keeps the MSE fit (its error on glm-tiny: 0.52x -> 0.43x).
MSE_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85)
MSE_REFIT_ROUNDS = 2
HEADS = ("int8", "int4", "none")  # how the output layer and the embedding are stored
DEFAULT_HEAD = "int8"


# ================================================================================================ specs


def default_spec(bits: int, group_size: int | None = None, scheme: str | None = None,
                 symmetric: bool | None = None) -> dict[str, Any]:
    """The spec for quantizing a float checkpoint: INT8 = rowwise; INT4 = group-wise (32) unless told otherwise."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if scheme == "group-symmetric":  # one string for the loader's scheme= argument
        scheme, symmetric = "group", True
    if scheme is None:
        scheme = "rowwise" if bits == 8 else "group"
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "group":
        if bits != 4:
            raise ValueError("the group scheme is INT4 only; INT8 uses the rowwise scheme (its error is already small)")
        group_size = DEFAULT_GROUP_SIZE if group_size is None else int(group_size)
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
        return {"bits": 4, "scheme": "group", "group_size": group_size, "symmetric": bool(symmetric),
                "layout": "glmkit"}
    if group_size is not None:
        raise ValueError("group_size applies to the group scheme only (the rowwise scheme has one scale per row)")
    return {"bits": bits, "scheme": "rowwise", "group_size": None, "symmetric": True, "layout": "glmkit"}


def head_spec(head: str | dict | None = None) -> dict[str, Any] | None:
    """The spec of the output layer and embedding: "int8" (default; ChatGLM-6B's per-row scheme), "int4" (group
    32, as the layers' default) or "none" (kept in floating point, None returned)."""
    if head is None:
        head = DEFAULT_HEAD
    if isinstance(head, dict):
        spec = default_spec(int(head["bits"]), head.get("group_size"), head.get("scheme"), head.get("symmetric"))
        return {k: spec[k] for k in ("bits", "scheme", "group_size", "symmetric")}
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "none":
        return None
    spec = default_spec(8 if head == "int8" else 4)
    return {k: spec[k] for k in ("bits", "scheme", "group_size", "symmetric")}


def _validate_spec(spec: Any, where: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: quantization spec must be a JSON object, got {spec!r}")
    try:
        out = default_spec(int(spec["bits"]), spec.get("group_size"), spec.get("scheme"), spec.get("symmetric"))
        # a spec without "head" (checkpoints before the head was quantized) has it in floating point
        out["head"] = head_spec(spec["head"]) if spec.get("head") is not None else None
    except KeyError:
        raise ValueError(f"{where}: quantization spec lacks 'bits': {spec!r}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    out["layout"] = spec.get("layout", "glmkit")
    block = spec.get("int4pack_block")
    if block is not None:
        if block not in (32, 64):
            raise ValueError(f"{where}: int4pack_block must be 32 or 64, got {block!r}")
        out["int4pack_block"] = int(block)
    return out


def quantization_spec(config_json: dict, safetensors_metadata: dict | None) -> dict[str, Any] | None:
    """Detects a pre-quantized checkpoint. glmkit's own (safetensors metadata first, then config.json) wins over
    THUDM's ``quantization_bit`` (4 or 8: rowwise, INT4 packed with the even column in the high nibble).
    Returns e.g. {"bits": 4, "scheme": "rowwise", "group_size": None, "symmetric": True, "layout": "thudm"}."""
    meta = (safetensors_metadata or {}).get(QUANT_KEY)
    if meta is not None:
        try:
            spec = json.loads(meta) if isinstance(meta, str) else meta
        except json.JSONDecodeError as e:
            raise ValueError(f"safetensors metadata {QUANT_KEY!r} is not valid JSON: {e}") from None
        return _validate_spec(spec, f"safetensors metadata {QUANT_KEY}")
    if config_json.get(QUANT_KEY):
        return _validate_spec(config_json[QUANT_KEY], f"config.json {QUANT_KEY}")
    bit = config_json.get("quantization_bit") or 0
    if bit in (0, 16, 32):
        return None
    if bit not in (4, 8):
        raise ValueError(f"config.json quantization_bit must be 4 or 8 (or 0), got {bit!r}")
    return {"bits": int(bit), "scheme": "rowwise", "group_size": None, "symmetric": True, "layout": "thudm"}


# ================================================================================================ quantizers


def quantize_rowwise(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM-6B's scheme, bit for bit: [N, K] float -> q int8 [N, K], scale fp16 [N] with
    ``scale = (max|w_row| / (2^(bits-1) - 1)).half()`` and ``q = round(w / scale)``.

    Kept exact on purpose (no clipping or refitting): `glmkit quantize --bits 8` then writes the integers the
    original's quantize() writes, and on our test models a least-squares refit of the scale lowered the weight
    error but not the logits error (it clips each row's largest weight, which matters most)."""
    qmax = 2 ** (bits - 1) - 1
    w = w.to(torch.float32, copy=True)  # worked on in place below (fewer passes: the 6B embedding is 535M weights)
    lo, hi = torch.aminmax(w, dim=-1)
    scale = (torch.maximum(hi, -lo) / qmax).half()  # max |w| of the row
    s = scale.float()
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero row: q = 0 whatever the scale
    q = w.div_(s[:, None]).round_().clamp_(-qmax, qmax)
    return q.to(torch.int8), scale


def quantize_group(w: torch.Tensor, group_size: int, symmetric: bool = False, mse_fit: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N, K] float -> q int8 [N, K] in [-8, 7], scale bf16 [N, K/group], zero bf16 [N, K/group] (None if
    symmetric). Scale and zero are rounded to bf16 (what the kernels read) before q is computed.

    Asymmetric: the group's [min, max] range in 15 steps (q = -8 at the min, 7 at the max). mse_fit: the range is
    also shrunk by each of MSE_CLIP_RATIOS, per group the ratio with the least squared error wins, then
    MSE_REFIT_ROUNDS least-squares refits (lower weight error, higher logits error on trained weights unless the
    rounding errors are compensated, as GPTQ does: see MSE_CLIP_RATIOS)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    g = w.float().view(n, k // group_size, group_size)

    def rounded(s: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """t = (w - z) / s and q = clamp(round(t)), one fused pass for t."""
        inv = 1.0 / s
        t = g * inv[..., None] if z is None else torch.addcmul((-z * inv)[..., None], g, inv[..., None])
        return t, torch.round(t).clamp_(-8, 7)

    if symmetric:
        s = (g.abs().amax(dim=-1) / 7).bfloat16().float()
        s = torch.where(s == 0, torch.ones_like(s), s)
        _, q = rounded(s, None)
        return q.to(torch.int8).view(n, k), s.bfloat16(), None

    mn, mx = g.amin(dim=-1), g.amax(dim=-1)
    best = None
    for ratio in MSE_CLIP_RATIOS if mse_fit else (1.0,):
        s = ((mx - mn) * (ratio / 15)).bfloat16().float()
        s = torch.where(s == 0, torch.ones_like(s), s)  # a constant group: q = -8 and z carries the value
        z = (mn * ratio + 8 * s).bfloat16().float()
        if not mse_fit:
            _, q = rounded(s, z)
            return q.to(torch.int8).view(n, k), s.bfloat16(), z.bfloat16()
        t, q = rounded(s, z)
        err = q.sub_(t).square_().sum(dim=-1) * s.square()  # (q - t)^2 s^2 = (q s + z - w)^2
        if best is None:
            best = (s, z, err)
            continue
        better = err < best[2]
        best = (torch.where(better, s, best[0]), torch.where(better, z, best[1]), torch.minimum(err, best[2]))
    s, z, err = best
    # Refit (scale, zero) to the chosen integers by least squares, re-round, keep where the error drops.
    for _ in range(MSE_REFIT_ROUNDS):
        _, q = rounded(s, z)
        qm, wm = q.mean(dim=-1), g.mean(dim=-1)
        qc = q - qm[..., None]
        var = qc.square().sum(dim=-1)
        s2 = torch.where(var > 0, (qc * (g - wm[..., None])).sum(dim=-1) / var.clamp_min(1e-12), s)
        s2 = torch.where(s2 > 0, s2, s).bfloat16().float()
        z2 = (wm - s2 * qm).bfloat16().float()
        t, q2 = rounded(s2, z2)
        err2 = q2.sub_(t).square_().sum(dim=-1) * s2.square()
        better = err2 < err
        s, z, err = torch.where(better, s2, s), torch.where(better, z2, z), torch.minimum(err, err2)
    _, q = rounded(s, z)
    return q.to(torch.int8).view(n, k), s.bfloat16(), z.bfloat16()


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
               group_size: int | None = None) -> torch.Tensor:
    """q * scale (+ zero) in fp32 for [N, K] signed ints with per-row [N] or per-group [N, K/group] parameters."""
    return kernels.int4_dequantize(q, scale, zero, group_size or q.shape[1], torch.float32)


# ================================================================================================ the module


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
        # "int8" | "int4pack" (CPU fused kernel) | "tinygemm" (CUDA int4 kernel) | "packed" (portable THUDM packing)
        self.layout = "empty"
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
    def is_loaded(self) -> bool:
        return self.layout != "empty"

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
            self._store(p["weight"], p["weight_scale"], p.get("weight_zero"))

    def _adopt_int4pack(self, packed: torch.Tensor, scale_zero: torch.Tensor, row_scale: torch.Tensor | None) -> None:
        """Takes the CPU kernel's layout as saved: as it is (no copy: the tensors may be views of a memory-mapped
        file) when the block size is this CPU's, else through the portable form."""
        n, k = self.out_features, self.in_features
        if self.bits != 4:
            raise ValueError("weight_int4pack tensors hold INT4 weights, but this layer is INT8")
        block = self.int4pack_block or kernels.int4pack_block_n() or 64
        n_pad = kernels.int4pack_rows(n, block)
        group = self.group_size if self.scheme == "group" else _pack_group_for(k)
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
            self.layout = "int4pack"
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
        self._store(kernels.pack_int4(q), scale, zero)

    def _quantize_and_store(self, w: torch.Tensor) -> None:
        """Row chunks keep the temporaries small: peak = the float weight + the quantized layer + one chunk.
        INT4 chunks are packed two per byte as they come, so the whole layer never exists one value per byte."""
        n, k = w.shape
        # INT8 weights stay in this buffer (the kernel's layout); INT4 ones are repacked into another
        qweight = (kernels.weight_buffer((n, k), torch.int8) if self.bits == 8
                   else torch.empty(n, k // 2, dtype=torch.int8))
        scales, zeros = [], []
        for rows in _row_chunks(n, k):
            chunk = w[rows]
            if self.scheme == "rowwise":
                q, s = quantize_rowwise(chunk, self.bits)
                z = None
            else:
                q, s, z = quantize_group(chunk, self.group_size, self.symmetric)
            qweight[rows] = kernels.pack_int4(q) if self.bits == 4 else q
            scales.append(s)
            if z is not None:
                zeros.append(z)
            del q
        self._store(qweight, torch.cat(scales), torch.cat(zeros) if zeros else None)
        del qweight, scales, zeros
        release_freed_memory()

    def _store(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               device: torch.device | None = None) -> None:
        """Takes the portable form (int8 [N, K] or THUDM-packed int8 [N, K/2] + scale [+ zero]), checks it and
        builds the runtime form for `device` (default: where the tensors are)."""
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
        if self.bits == 8:
            self.layout = "int8"
            self._buffers["qweight"] = weight.to(device).contiguous()
            self._buffers["weight_scale"] = scale.to(device)
            if device.type == "cpu":
                self._buffers["scale_bf16"] = scale.to(torch.bfloat16)
            return
        pack_group = self.group_size if self.scheme == "group" else _pack_group_for(k)
        if device.type == "cpu" and pack_group is not None and kernels.int4pack_supported(n, k, pack_group):
            self.layout = "int4pack"
            self._buffers["qweight"] = _thudm_to_int4pack(weight, n, k)
            del weight
            release_freed_memory()  # the repacking temporaries
            n_pad = self._buffers["qweight"].shape[0]
            if self.scheme == "group":
                s, z = scale, zero if zero is not None else torch.zeros_like(scale)
            else:
                self._buffers["weight_scale"] = scale  # exact (fp16) values for the fp32 path
                s = scale.to(torch.bfloat16)[:, None].expand(n, k // pack_group)
                z = torch.zeros_like(s)
            table = torch.zeros(k // pack_group, n_pad, 2, dtype=torch.bfloat16)  # padding rows: s = z = 0
            table[:, :n, 0], table[:, :n, 1] = s.t(), z.t()
            self._buffers["scale_zero"] = table
            return
        # CUDA: torch's INT4 kernel computes in bf16; an fp32 model keeps the exact dequantize + matmul path
        if (self._CUDA_INT4_KERNEL and self.scheme == "group" and self.compute_dtype != torch.float32
                and kernels.tinygemm_supported(n, k, self.group_size, device)):
            self.layout = "tinygemm"
            self._buffers["qweight"] = kernels.int_to_tinygemm(kernels.unpack_int4(weight), device)
            z = zero if zero is not None else torch.zeros_like(scale)
            self._buffers["scale_zero"] = torch.stack((scale.t(), z.t()), dim=-1).to(device).contiguous()
            return
        self.layout = "packed"
        self._buffers["qweight"] = weight.to(device).contiguous()
        self._buffers["weight_scale"] = scale.to(device)
        self._buffers["weight_zero"] = zero.to(device) if zero is not None else None

    def export(self) -> dict[str, torch.Tensor]:
        """The portable checkpoint tensors: weight (int8 [N, K] or THUDM-packed [N, K/2]), weight_scale,
        weight_zero (asymmetric groups), bias."""
        if not self.is_loaded:
            raise ValueError("this QuantizedLinear has not been loaded yet")
        n, k = self.out_features, self.in_features
        out: dict[str, torch.Tensor] = {}
        if self.layout in ("int4pack", "tinygemm"):
            if self.layout == "int4pack":
                q = kernels.int4pack_to_int(self.qweight, n, k)
            else:
                q = kernels.tinygemm_to_int(self.qweight, self.scale_zero, self.group_size, n, k)
            out["weight"] = kernels.pack_int4(q.cpu())
            if self.scheme == "group":
                out["weight_scale"] = self.scale_zero[:, :n, 0].t().contiguous()
                if not self.symmetric:
                    out["weight_zero"] = self.scale_zero[:, :n, 1].t().contiguous()
            else:
                out["weight_scale"] = self.weight_scale
        else:
            out["weight"] = self.qweight
            out["weight_scale"] = self.weight_scale
            if self.weight_zero is not None:
                out["weight_zero"] = self.weight_zero
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return {name: t.detach().cpu().contiguous() for name, t in out.items()}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """What `glmkit quantize` writes for this layer: the CPU kernel's layout as it is (`weight_int4pack`,
        `weight_scale_zero`, plus the exact `weight_scale` of the rowwise scheme), so that loading maps it without
        a copy; INT8 (already the kernel's layout) and the other layouts in the portable form."""
        if self.layout != "int4pack":
            return self.export()
        out = {"weight_int4pack": self.qweight, "weight_scale_zero": self.scale_zero}
        if self.scheme == "rowwise":
            out["weight_scale"] = self.weight_scale
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return {name: t.detach().contiguous() for name, t in out.items()}

    # state_dict()/load_state_dict() carry the portable tensors, so generic save/load code sees real weights
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.is_loaded:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        for name, t in self.export().items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = [n for n in ("weight_zero", "weight_scale", "weight", "weight_int4pack", "weight_scale_zero", "bias")
                 if prefix + n in state_dict]
        if self.is_loaded and names:
            # reload in place: forget the current storage first
            self.layout = "empty"
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
        n, k = self.out_features, self.in_features
        if self.layout == "int8":
            return kernels.int8_dequantize(self.qweight, self.weight_scale, dtype)
        if self.layout == "int4pack":
            row_scale = self.weight_scale if self.scheme == "rowwise" else None
            return kernels.int4pack_dequantize(self.qweight, self.scale_zero, self.scale_zero_group, n, k, dtype,
                                               row_scale)
        if self.layout == "packed":
            return kernels.int4_dequantize(kernels.unpack_int4(self.qweight), self.weight_scale, self.weight_zero,
                                           self.group_size or k, dtype)
        if self.layout == "tinygemm":
            q = kernels.tinygemm_to_int(self.qweight, self.scale_zero, self.group_size, n, k)
            s, z = self.scale_zero[..., 0].t(), self.scale_zero[..., 1].t()
            return kernels.int4_dequantize(q, s, z, self.group_size, dtype)
        raise ValueError("this QuantizedLinear has not been loaded yet")

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
        if self.layout == "int8":
            return kernels.int8_linear(x, self.qweight, self.weight_scale, self.scale_bf16)
        if self.layout == "int4pack":
            row_scale = self.weight_scale if self.scheme == "rowwise" else None
            return kernels.int4pack_linear(x, self.qweight, self.scale_zero, self.scale_zero_group, self.out_features,
                                           row_scale)
        if self.layout == "tinygemm":
            if dtype == torch.float32:  # exact: fp32 inputs to a model moved to fp32 after loading (rare)
                return x @ self.dequantized_weight(torch.float32).t()
            return kernels.tinygemm_linear(x, self.qweight, self.scale_zero, self.group_size)
        return kernels.int4_linear_portable(x, self.qweight, self.weight_scale, self.weight_zero,
                                            self.group_size or self.in_features)

    @property
    def scale_zero_group(self) -> int:
        return self.in_features // self.scale_zero.shape[0]

    def _matmul_transposed(self, g: torch.Tensor) -> torch.Tensor:
        """g [M, N] @ W -> [M, K] (the input gradient), dequantizing row chunks of W."""
        n, k = self.out_features, self.in_features
        if self.layout == "int4pack":
            row_scale = self.weight_scale if self.scheme == "rowwise" else None
            return kernels.int4pack_linear_transposed(g, self.qweight, self.scale_zero, self.scale_zero_group, n, k,
                                                      row_scale).to(g.dtype)
        dtype = g.dtype if g.dtype in (torch.float32, torch.bfloat16) or g.device.type != "cpu" else torch.float32
        w = self.dequantized_weight(dtype).to(g.device)
        return (g.to(dtype) @ w).to(g.dtype)

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
            self._store(portable["weight"], portable["weight_scale"], portable.get("weight_zero"), device=target)
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
        dtype, k = self.compute_dtype, self.in_features
        if self.layout == "int4pack":
            row_scale = self.weight_scale if self.scheme == "rowwise" else None
            return kernels.int4pack_lookup(self.qweight, self.scale_zero, self.scale_zero_group, k, ids, dtype,
                                           row_scale)
        flat = ids.reshape(-1)
        if self.layout == "int8":
            rows = self.qweight[flat].float().mul_(self.weight_scale[flat].float()[:, None])
            return rows.to(dtype).view(*ids.shape, k)
        zero = self.weight_zero[flat] if self.weight_zero is not None else None
        rows = kernels.int4_dequantize(kernels.unpack_int4(self.qweight[flat]), self.weight_scale[flat], zero,
                                       self.group_size or k, dtype)
        return rows.view(*ids.shape, k)

    def extra_repr(self) -> str:
        return "num_embeddings={}, embedding_dim={}, ".format(self.num_embeddings, self.embedding_dim) + \
            super().extra_repr().split("bias=False, ", 1)[1]


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Hands freed heap memory back to the OS. Quantizing layer after layer frees many medium-sized fp32
    temporaries; glibc keeps them (its mmap threshold grows after the first big free), so without this the
    process RSS climbs by hundreds of MB during a quantize-on-load."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def effective_group_size(in_features: int, group_size: int) -> int:
    """The group size a layer uses: the requested one, or the largest smaller allowed size dividing in_features
    (e.g. 32 for a 96-wide toy layer asked for 64). Deterministic, so saved checkpoints load back alike."""
    for g in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
        if in_features % g == 0:
            return g
    raise ValueError(f"in_features {in_features} is not a multiple of any group size <= {group_size} in "
                     f"{GROUP_SIZES}; use the rowwise scheme for this model")


def _pack_group_for(k: int) -> int | None:
    """Group size that expresses one scale per row in the CPU kernel's (scale, zero) table."""
    for g in (256, 128, 64, 32):
        if k % g == 0:
            return g
    return None


def _row_chunks(n: int, k: int) -> list[slice]:
    """Row ranges of ~1M weights (a multiple of 64 rows: whole blocks of the CPU int4 layout), so quantizing or
    repacking a layer needs only a few MB of temporaries (~25 MB of fp32 for the group search)."""
    rows = max(64, (2**20 // max(k, 1)) // 64 * 64)
    return [slice(a, a + rows) for a in range(0, n, rows)]


def _thudm_to_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    out = kernels.weight_buffer((kernels.int4pack_rows(n), k // 2), torch.uint8)
    for rows in _row_chunks(n, k):
        out[rows] = kernels.int_to_int4pack(kernels.unpack_int4(packed[rows]))
    return out


# ================================================================================================ model level


def _layer_linears(model: nn.Module):
    blocks = getattr(model, "h", None)
    if blocks is None:
        raise ValueError("model has no .h block list (expected a glmkit GLM model)")
    for i, block in enumerate(blocks):
        for path in QUANTIZED_LINEARS:
            parent_name, _, attr = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            yield f"h.{i}.{path}", parent, attr, getattr(parent, attr)


def _model_dtype(model: nn.Module) -> torch.dtype:
    config = getattr(model, "config", None)
    name = getattr(config, "torch_dtype", None)
    if isinstance(name, str) and hasattr(torch, name):
        return getattr(torch, name)
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def prepare_model(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Swaps the four linears of every layer for empty QuantizedLinear modules (no allocation), ready for
    ``load_weight_tensor``, and with a ``head`` in the spec the embedding and output layer for QuantizedEmbedding /
    QuantizedLinear (one QuantizedEmbedding for both when they are tied). Call on a model built on the meta device
    (the loader does)."""
    spec = _validate_spec(spec, "prepare_model")
    dtype = _model_dtype(model)
    block = spec.get("int4pack_block")
    for name, parent, attr, linear in _layer_linears(model):
        if isinstance(linear, QuantizedLinear):
            raise ValueError(f"{name} is already quantized")
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, expected nn.Linear")
        q = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, bits=spec["bits"],
                            scheme=spec["scheme"], group_size=spec["group_size"], symmetric=spec["symmetric"],
                            dtype=dtype, int4pack_block=block)
        setattr(parent, attr, q)
    head = spec.get("head")
    if head is not None:
        wte, lm_head = model.wte, model.lm_head
        if isinstance(wte, QuantizedLinear) or isinstance(lm_head, QuantizedLinear):
            raise ValueError("the embedding / output layer is already quantized")
        kw = dict(bits=head["bits"], scheme=head["scheme"], group_size=head["group_size"],
                  symmetric=head["symmetric"], dtype=dtype, int4pack_block=block)
        table = QuantizedEmbedding(wte.num_embeddings, wte.embedding_dim, **kw)
        model.wte = table
        if lm_head.weight is wte.weight:  # tied: one table in both roles
            model.lm_head = table
        else:
            model.lm_head = QuantizedLinear(lm_head.in_features, lm_head.out_features, lm_head.bias is not None,
                                            **kw)
    _record_spec(model, spec)
    return model


def saved_layout_is_native(spec: dict[str, Any]) -> bool:
    """Whether a saved quantized checkpoint holds this machine's runtime layout (INT8 weights, or INT4 in the CPU
    kernel's layout with this CPU's block size), so that loading can map it and take its tensors as they are."""
    int4 = spec["bits"] == 4 or (spec.get("head") or {}).get("bits") == 4
    return spec.get("layout") == "glmkit" and (not int4 or spec.get("int4pack_block") == kernels.int4pack_block_n())


def tie_quantized_head(model: nn.Module) -> bool:
    """After loading: a quantized output layer that the checkpoint did not fill takes the quantized embedding
    table (ChatGLM-6B checkpoints may leave `lm_head` out; glmkit.core.checkpoint.finish ties float ones). True
    when it tied."""
    head, wte = getattr(model, "lm_head", None), getattr(model, "wte", None)
    if not (isinstance(head, QuantizedLinear) and isinstance(wte, QuantizedEmbedding)) or head is wte:
        return False
    config = model.config
    if head.is_loaded or not wte.is_loaded or not (config.tie_word_embeddings or config.family == "chatglm"):
        return False
    model.lm_head = wte
    config.tie_word_embeddings = True
    return True


def quantize_head(model: nn.Module, head: str | dict | None = None) -> nn.Module:
    """Quantizes the embedding and output layer of a materialised model in place (`head` as in head_spec:
    "int8" default, "int4", "none"); tied ones become one QuantizedEmbedding."""
    spec = head_spec(head)
    if spec is None:
        return model
    wte, lm_head = model.wte, model.lm_head
    if isinstance(wte, QuantizedLinear) or isinstance(lm_head, QuantizedLinear):
        raise ValueError("the embedding / output layer is already quantized")
    if wte.weight.is_meta:
        raise ValueError("the embedding is on the meta device; use prepare_model and load the weights instead")
    tied = lm_head.weight is wte.weight
    with torch.no_grad():
        table = QuantizedEmbedding.from_weight(wte.weight, spec)
        model.wte = table
        if tied:
            model.lm_head = table
        else:
            q = QuantizedLinear.from_linear(lm_head.cpu() if lm_head.weight.device.type != "cpu" else lm_head,
                                            spec["bits"], spec["scheme"], spec["group_size"], spec["symmetric"])
            model.lm_head = q.to(table.qweight.device)
    del wte, lm_head
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "extra") and config.extra.get("quantization"):
        config.extra["quantization"]["head"] = spec
    release_freed_memory()
    return model


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None, scheme: str | None = None,
                   symmetric: bool = False, head: str | dict | None = None) -> nn.Module:
    """Quantizes the four linears of every layer of a materialised float model in place (one layer at a time,
    each float weight freed as soon as its quantized form exists), and the embedding / output layer as `head`
    says (default INT8, as load_model's quantize= does; "none" keeps them in floating point)."""
    spec = default_spec(bits, group_size, scheme, symmetric)
    for name, parent, attr, linear in _layer_linears(model):
        if isinstance(linear, QuantizedLinear):
            raise ValueError(f"{name} is already quantized")
        if linear.weight.is_meta:
            raise ValueError(f"{name} is on the meta device; use prepare_model and load the weights instead")
        device = linear.weight.device
        with torch.no_grad():
            q = QuantizedLinear.from_linear(linear.cpu() if device.type != "cpu" else linear, spec["bits"],
                                            spec["scheme"], spec["group_size"], spec["symmetric"])
        setattr(parent, attr, q.to(device))
        del linear
    spec["head"] = None
    _record_spec(model, spec)
    quantize_head(model, head)
    return model


def _record_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "extra"):
        config.extra["quantization"] = dict(spec)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The quantization spec of a quantized model, read from its modules (the head included)."""
    for _, _, _, m in _layer_linears(model):
        if isinstance(m, QuantizedLinear):
            spec = {"bits": m.bits, "scheme": m.scheme, "group_size": m.requested_group_size,
                    "symmetric": m.symmetric, "layout": "glmkit", "head": None}
            head = getattr(model, "lm_head", None)
            if isinstance(head, QuantizedLinear):
                spec["head"] = {"bits": head.bits, "scheme": head.scheme, "group_size": head.requested_group_size,
                                "symmetric": head.symmetric}
            if any(getattr(x, "layout", None) == "int4pack" for x in model.modules()):
                spec["int4pack_block"] = kernels.int4pack_block_n()
            return spec
        break
    raise ValueError("the model is not quantized (no QuantizedLinear in its layers); run quantize_model first")


# ================================================================================================ saving


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
    sd = to_thudm_state_dict(sd, config)
    src = Path(src_dir) if src_dir is not None else None
    if src is not None and (src / "config.json").is_file():
        hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    else:
        hf = to_hf_config(config)
    hf.pop("quantization_bit", None)  # the glmkit key describes these tensors, not THUDM's
    hf[QUANT_KEY] = spec
    hf["torch_dtype"] = getattr(config, "torch_dtype", hf.get("torch_dtype", "float32"))
    # a new folder takes the old one's place (atomic_dir): a model loaded from the old file keeps its memory map of
    # the old inode (rewriting the file in place would pull the pages from under it)
    write_aligned_safetensors(sd, out / "model.safetensors", metadata={"format": "pt", QUANT_KEY: json.dumps(spec)})
    (out / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if src is not None and src.is_dir():
        for f in src.iterdir():
            if f.is_file() and _is_tokenizer_file(f.name):
                shutil.copy2(f, out / f.name)


SAFETENSORS_ALIGNMENT = 64
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_aligned_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                              metadata: dict[str, str] | None = None) -> Path:
    """A standard safetensors file in which every tensor starts on a 64-byte boundary of the file, so that a memory
    map of it can be used as it is (aten's INT8 kernel reads 32-byte aligned weights). The format allows no gaps
    between tensors, so the alignment comes from the order: tensors whose size is a multiple of 64 bytes first (all
    of a real model's large ones), the others after, and the header padded with spaces (which the format allows)."""
    entries = []
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot write {name!r}: dtype {t.dtype} has no safetensors code")
        entries.append((name, t.detach().cpu().contiguous()))
    entries.sort(key=lambda e: (e[1].numel() * e[1].element_size() % SAFETENSORS_ALIGNMENT != 0, e[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, t in entries:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % SAFETENSORS_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in entries:
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return Path(path)


def _is_tokenizer_file(name: str) -> bool:
    if name == "config.json" or name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack",
                                                ".h5", ".ckpt", ".gguf")):
        return False
    return (name.startswith(("tokenizer", "tokenization", "special_tokens", "vocab", "merges", "added_tokens"))
            or name.endswith((".model", ".tiktoken")) or name == "ice_text.model")
