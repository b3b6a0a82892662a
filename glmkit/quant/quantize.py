"""INT8/INT4 weight-only quantization: QuantizedLinear, quantize-on-load, pre-quantized checkpoints, `glmkit quantize`.

What is quantized: the four linears of every layer (`attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj`; THUDM's
query_key_value, dense, dense_h_to_4h, dense_4h_to_h), as in GLM-130B and ChatGLM-6B. The embedding (`wte`),
`lm_head`, the norms and all biases stay in floating point: the embedding is a lookup (never read whole per
token), the output head decides the next token directly and is the layer most sensitive to error, and norms and
biases are tiny.

Schemes (every value is ``w = q * scale (+ zero)``, q a signed integer):

* ``rowwise``: ChatGLM-6B's, bit for bit: symmetric, one scale per output row,
  ``scale = (max|w_row| / (2^(bits-1) - 1)).half()``, q in [-127, 127] or [-7, 7]. The only INT8 scheme (so INT8
  has exactly the original's error); THUDM ``quantization_bit`` checkpoints use it.
* ``group`` (INT4 default): one bf16 (scale, zero) pair per ``group_size`` (32..256, default 32) consecutive
  inputs of a row, q in [-8, 7], asymmetric by default (the full min..max range of the group, then the best of a
  few clipping ratios by squared error, then a least-squares refit of (scale, zero) to the rounded integers), or
  symmetric (zero = 0). Finer groups follow the local range of the weights: on Gaussian rows of 4096 the weight
  error is 0.48x (group 32), 0.55x (64), 0.60x (128) the per-row scheme's, and on the trained glm-tiny the
  logits error is 0.47x (32) and 0.69x (64). 32 is the default: its scales and zeros cost 0.35 GB more than 64's
  at the 6B shape (a ChatGLM-6B INT4 load peaks at 4.88 GB instead of 4.66 GB) and decode reads 8% more bytes.

Compute dtype follows the activations: bf16 takes the fast CPU kernels; fp32 dequantizes exactly (``q * scale``
with the stored scale, as ChatGLM-6B's CPU kernels do) for reference results; fp16 on CPU is computed in fp32.

INT4 values are stored two per byte in THUDM's order (even column in the high nibble). On CPU the weights are
repacked at load time for the fused kernel (glmkit.quant.kernels); checkpoints always hold the portable layout.
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

from glmkit.core.convert import to_hf_config, to_thudm_state_dict
from glmkit.quant import kernels

QUANT_KEY = "glmkit_quantization"  # config.json key and safetensors metadata key of glmkit checkpoints
QUANTIZED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
SCHEMES = ("rowwise", "group")
DEFAULT_GROUP_SIZE = 32
GROUP_SIZES = (32, 64, 128, 256)
# clipping ratios tried per group (asymmetric group scheme); 1.0 = plain min/max
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85)
REFIT_ROUNDS = 2  # least-squares refits of a group's (scale, zero) to its rounded integers: ~5% less error


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


def _validate_spec(spec: Any, where: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: quantization spec must be a JSON object, got {spec!r}")
    try:
        out = default_spec(int(spec["bits"]), spec.get("group_size"), spec.get("scheme"), spec.get("symmetric"))
    except KeyError:
        raise ValueError(f"{where}: quantization spec lacks 'bits': {spec!r}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    out["layout"] = spec.get("layout", "glmkit")
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
    w = w.float()
    scale = (w.abs().amax(dim=-1) / qmax).half()
    s = scale.float()
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero row: q = 0 whatever the scale
    q = torch.round(w / s[:, None]).clamp_(-qmax, qmax)
    return q.to(torch.int8), scale


def quantize_group(w: torch.Tensor, group_size: int, symmetric: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N, K] float -> q int8 [N, K] in [-8, 7], scale bf16 [N, K/group], zero bf16 [N, K/group] (None if
    symmetric). Scale and zero are rounded to bf16 (what the kernels read) before q is computed.

    Asymmetric: the group's [min, max] range shrunk by each of CLIP_RATIOS; per group the ratio with the least
    squared error wins (clipping a rare extreme value buys finer steps for all the others)."""
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
    for ratio in CLIP_RATIOS:
        s = ((mx - mn) * (ratio / 15)).bfloat16().float()
        s = torch.where(s == 0, torch.ones_like(s), s)  # a constant group: q = -8 and z carries the value
        z = (mn * ratio + 8 * s).bfloat16().float()
        if len(CLIP_RATIOS) == 1:
            best = (s, z)
            break
        t, q = rounded(s, z)
        err = q.sub_(t).square_().sum(dim=-1) * s.square()  # (q - t)^2 s^2 = (q s + z - w)^2
        if best is None:
            best = (s, z, err)
            continue
        better = err < best[2]
        best = (torch.where(better, s, best[0]), torch.where(better, z, best[1]), torch.minimum(err, best[2]))
    s, z, err = best
    # Refit (scale, zero) to the chosen integers by least squares, re-round, keep where the error drops.
    for _ in range(REFIT_ROUNDS):
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
        return module._matmul(x2).view(*x.shape[:-1], module.out_features)

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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 scheme: str = "group", group_size: int | None = DEFAULT_GROUP_SIZE, symmetric: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
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
        self.layout = "empty"  # "int8" | "int4pack" (CPU fused kernel) | "packed" (portable THUDM packing)
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
        if attr_name not in ("weight", "weight_scale", "weight_zero"):
            raise ValueError(f"QuantizedLinear has no checkpoint tensor {attr_name!r} "
                             "(expected weight, weight_scale, weight_zero or bias)")
        if self.is_loaded:
            raise ValueError(f"{attr_name} arrived for a QuantizedLinear that is already loaded (duplicate tensor?)")
        if attr_name == "weight" and tensor.is_floating_point():
            if tuple(tensor.shape) != (self.out_features, self.in_features):
                raise ValueError(f"float weight shape {tuple(tensor.shape)} does not match "
                                 f"[{self.out_features}, {self.in_features}]")
            self._quantize_and_store(tensor)
            return
        self._pending[attr_name] = tensor
        needed = {"weight", "weight_scale"} | ({"weight_zero"} if self.scheme == "group" and not self.symmetric
                                               else set())
        if needed <= set(self._pending):
            p, self._pending = self._pending, {}
            self._store(p["weight"], p["weight_scale"], p.get("weight_zero"))

    def _quantize_and_store(self, w: torch.Tensor) -> None:
        """Row chunks keep the temporaries small: peak = the float weight + the quantized layer + one chunk.
        INT4 chunks are packed two per byte as they come, so the whole layer never exists one value per byte."""
        n, k = w.shape
        qweight = torch.empty(n, k if self.bits == 8 else k // 2, dtype=torch.int8)
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
            if self.scheme == "group":
                s, z = scale, zero if zero is not None else torch.zeros_like(scale)
                self._buffers["scale_zero"] = torch.stack((s.t(), z.t()), dim=-1).contiguous()
            else:
                self._buffers["weight_scale"] = scale  # exact (fp16) values for the fp32 path
                s = scale.to(torch.bfloat16)[None, :].expand(k // pack_group, n)
                self._buffers["scale_zero"] = torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous()
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
        if self.layout == "int4pack":
            q = kernels.int4pack_to_int(self.qweight, n, k)
            out["weight"] = kernels.pack_int4(q)
            if self.scheme == "group":
                out["weight_scale"] = self.scale_zero[..., 0].t().contiguous()
                if not self.symmetric:
                    out["weight_zero"] = self.scale_zero[..., 1].t().contiguous()
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

    # state_dict()/load_state_dict() carry the portable tensors, so generic save/load code sees real weights
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.is_loaded:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        for name, t in self.export().items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = [n for n in ("weight_zero", "weight_scale", "weight", "bias") if prefix + n in state_dict]
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
            missing_keys.extend(prefix + n for n in sorted(needed - set(names)))
            known = {prefix + n for n in ("weight", "weight_scale", "weight_zero", "bias")}
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
        raise ValueError("this QuantizedLinear has not been loaded yet")

    # -------------------------------------------------------------------------------------------- compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_loaded:
            raise RuntimeError("QuantizedLinear used before its weights were loaded")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer expects {self.in_features}")
        out = _QuantizedMatmul.apply(x, self)
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
        probe = fn(torch.empty(0))
        for name, t in storage.items():
            self._buffers[name] = t
        if probe.is_floating_point():
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
    out = torch.empty(n, k // 2, dtype=torch.uint8)
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
    ``load_weight_tensor``. Call on a model built on the meta device (the loader does)."""
    spec = _validate_spec(spec, "prepare_model")
    dtype = _model_dtype(model)
    for name, parent, attr, linear in _layer_linears(model):
        if isinstance(linear, QuantizedLinear):
            raise ValueError(f"{name} is already quantized")
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, expected nn.Linear")
        q = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, bits=spec["bits"],
                            scheme=spec["scheme"], group_size=spec["group_size"], symmetric=spec["symmetric"],
                            dtype=dtype)
        setattr(parent, attr, q)
    _record_spec(model, spec)
    return model


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None, scheme: str | None = None,
                   symmetric: bool = False) -> nn.Module:
    """Quantizes the four linears of every layer of a materialised float model in place (one layer at a time,
    each float weight freed as soon as its quantized form exists)."""
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
    _record_spec(model, spec)
    return model


def _record_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "extra"):
        config.extra["quantization"] = dict(spec)


def model_spec(model: nn.Module) -> dict[str, Any]:
    for _, _, _, m in _layer_linears(model):
        if isinstance(m, QuantizedLinear):
            return {"bits": m.bits, "scheme": m.scheme, "group_size": m.requested_group_size, "symmetric": m.symmetric,
                    "layout": "glmkit"}
        break
    raise ValueError("the model is not quantized (no QuantizedLinear in its layers); run quantize_model first")


# ================================================================================================ saving


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """glmkit names -> tensors, each QuantizedLinear in its portable form (weight, weight_scale, weight_zero)."""
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}


def save_quantized(model: nn.Module, out_dir: str | Path, src_dir: str | Path | None = None) -> Path:
    """Writes config.json (SRC's, or the model's own in THUDM layout, with the quantization key added) and
    model.safetensors in THUDM tensor names with the scheme in its metadata, plus SRC's tokenizer files."""
    from safetensors.torch import save_file

    spec = model_spec(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    sd = quantized_state_dict(model)
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    sd = to_thudm_state_dict(sd, config)
    src = Path(src_dir) if src_dir is not None else None
    if src is not None and (src / "config.json").is_file():
        hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    else:
        hf = to_hf_config(config)
    hf.pop("quantization_bit", None)  # the glmkit key describes these tensors, not THUDM's
    hf[QUANT_KEY] = spec
    hf["torch_dtype"] = getattr(config, "torch_dtype", hf.get("torch_dtype", "float32"))
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt", QUANT_KEY: json.dumps(spec)})
    (out / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if src is not None and src.is_dir():
        for f in src.iterdir():
            if f.is_file() and _is_tokenizer_file(f.name):
                shutil.copy2(f, out / f.name)
    return out


def _is_tokenizer_file(name: str) -> bool:
    if name == "config.json" or name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack",
                                                ".h5", ".ckpt", ".gguf")):
        return False
    return (name.startswith(("tokenizer", "tokenization", "special_tokens", "vocab", "merges", "added_tokens"))
            or name.endswith((".model", ".tiktoken")) or name == "ice_text.model")
