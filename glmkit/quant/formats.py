"""Quantization formats: the specs (what a checkpoint or a load_model call asks for), and the math of each scheme
(quantize / dequantize a float [N, K] weight). Nothing here knows about modules or files.

Schemes (every value is ``w = q * scale (+ zero)``, q a signed integer):

* ``rowwise``: ChatGLM-6B's, bit for bit: symmetric, one scale per output row,
  ``scale = (max|w_row| / (2^(bits-1) - 1)).half()``, q in [-127, 127] or [-7, 7]. The only INT8 scheme (so INT8
  has exactly the original's error); THUDM ``quantization_bit`` checkpoints use it.
* ``group`` (INT4 default): one bf16 (scale, zero) pair per ``group_size`` (32..256, default 32) consecutive
  inputs of a row, q in [-8, 7], asymmetric by default (the group's min..max range in 15 steps, so its extreme
  weights stay exact: see MSE_CLIP_RATIOS for why nothing is clipped), or symmetric (zero = 0). Finer groups follow
  the local range of the weights. 32 is the default: its scales and zeros cost 0.35 GB more than 64's at the 6B
  shape and decode reads 8% more bytes; benchmarks/accuracy.py has the errors of each choice.

A spec also says how the "head" (output layer and embedding) is stored (``head_spec``) and, for saved checkpoints,
the tensors' layout: "glmkit" (portable or the CPU kernel's, see glmkit.quant.linear) or "thudm"
(``quantization_bit`` checkpoints, INT4 two per byte with the even column in the high nibble).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from glmkit.quant import kernels

QUANT_KEY = "glmkit_quantization"  # config.json key and safetensors metadata key of glmkit checkpoints
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
DEFAULT_HEAD = "int8"  # with INT4 layers; INT8 layers keep them in floating point (default_head)


def default_head(bits: int) -> str:
    """The head's default for layers of `bits`: INT8 layers keep it in floating point, as the original's quantize(8)
    does (an INT8 head on top raised the logits error past the original's); INT4 layers get an INT8 head."""
    return "none" if bits == 8 else DEFAULT_HEAD



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


def head_spec(head: str | dict | None = None, bits: int = 4) -> dict[str, Any] | None:
    """The spec of the output layer and embedding: "int8" (ChatGLM-6B's per-row scheme), "int4" (group 32, as the
    layers' default) or "none" (kept in floating point, None returned); None = default_head(bits) of the layers."""
    if head is None:
        head = default_head(bits)
    if isinstance(head, dict):
        spec = default_spec(int(head["bits"]), head.get("group_size"), head.get("scheme"), head.get("symmetric"))
        return {k: spec[k] for k in ("bits", "scheme", "group_size", "symmetric")}
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "none":
        return None
    spec = default_spec(8 if head == "int8" else 4)
    return {k: spec[k] for k in ("bits", "scheme", "group_size", "symmetric")}


def validate_spec(spec: Any, where: str) -> dict[str, Any]:
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
        return validate_spec(spec, f"safetensors metadata {QUANT_KEY}")
    if config_json.get(QUANT_KEY):
        return validate_spec(config_json[QUANT_KEY], f"config.json {QUANT_KEY}")
    bit = config_json.get("quantization_bit") or 0
    if bit in (0, 16, 32):
        return None
    if bit not in (4, 8):
        raise ValueError(f"config.json quantization_bit must be 4 or 8 (or 0), got {bit!r}")
    return {"bits": int(bit), "scheme": "rowwise", "group_size": None, "symmetric": True, "layout": "thudm"}


def saved_layout_is_native(spec: dict[str, Any]) -> bool:
    """Whether a saved quantized checkpoint holds this machine's runtime layout (INT8 weights, or INT4 in the CPU
    kernel's layout with this CPU's block size), so that loading can map it and take its tensors as they are."""
    int4 = spec["bits"] == 4 or (spec.get("head") or {}).get("bits") == 4
    return spec.get("layout") == "glmkit" and (not int4 or spec.get("int4pack_block") == kernels.int4pack_block_n())


# ================================================================================================ quantizers


def quantize_rowwise(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM-6B's scheme, bit for bit: [N, K] float -> q int8 [N, K], scale fp16 [N] with
    ``scale = (max|w_row| / (2^(bits-1) - 1)).half()`` and ``q = round(w / scale)``.

    Kept exact on purpose (no clipping or refitting): `glmkit quantize --bits 8` then writes the integers the
    original's quantize() writes, and on our test models a least-squares refit of the scale lowered the weight
    error but not the logits error (it clips each row's largest weight, which matters most)."""
    qmax = 2 ** (bits - 1) - 1
    half = w.dtype == torch.float16  # the original divides an fp16 weight by its fp16 scale in fp16
    w = w.to(torch.float32, copy=True)  # worked on in place below (fewer passes: the 6B embedding is 535M weights)
    lo, hi = torch.aminmax(w, dim=-1)
    scale = (torch.maximum(hi, -lo) / qmax).half()  # max |w| of the row
    s = scale.float()
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero row: q = 0 whatever the scale
    q = w.div_(s[:, None])
    if half:  # the quotient rounded to fp16 before round(), as fp16 division leaves it
        q = q.half().float()
    q = q.round_().clamp_(-qmax, qmax)
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


def effective_group_size(in_features: int, group_size: int) -> int:
    """The group size a layer uses: the requested one, or the largest smaller allowed size dividing in_features
    (e.g. 32 for a 96-wide toy layer asked for 64). Deterministic, so saved checkpoints load back alike."""
    for g in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
        if in_features % g == 0:
            return g
    raise ValueError(f"in_features {in_features} is not a multiple of any group size <= {group_size} in "
                     f"{GROUP_SIZES}; use the rowwise scheme for this model")


def pack_group_for(k: int) -> int | None:
    """Group size that expresses one scale per row in the CPU kernel's (scale, zero) table."""
    for g in (256, 128, 64, 32):
        if k % g == 0:
            return g
    return None


def row_chunks(n: int, k: int) -> list[slice]:
    """Row ranges of ~1M weights (a multiple of 64 rows: whole blocks of the CPU int4 layout), so quantizing or
    repacking a layer needs only a few MB of temporaries (~25 MB of fp32 for the group search)."""
    rows = max(64, (2**20 // max(k, 1)) // 64 * 64)
    return [slice(a, a + rows) for a in range(0, n, rows)]
