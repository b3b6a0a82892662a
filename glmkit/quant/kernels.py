"""Matmul paths for weight-only INT8/INT4 linears; glmkit.quant.linear.QuantizedLinear picks one per call.

Everything here is plain torch: no C compiler at load time. What was measured on the 2-core AVX-512 development
machine (torch 2.13, bf16 activations, a 16384x4096 layer) and why each path exists:

* decode (few rows): ``aten._weight_int4pack_mm_for_cpu`` reads INT4 weights at ~38 GB/s and
  ``aten._weight_int8pack_mm`` INT8 weights at ~35 GB/s, against ~32 GB/s for a bf16 ``F.linear``; both only go
  fast with bf16 activations (fp32 activations fall to a scalar loop, 50x slower). The INT4 kernel is
  compute-bound on 2 cores (17 G weights/s per core whatever the group size, measured 2026-11-29), so its speed
  follows the weight count more than the bytes; weights live in 2 MB pages (``weight_buffer``).
* prefill (many rows, compute-bound): both kernels above accumulate in fp32 FMAs and re-dequantize the weight for
  every 4 rows, so at M=128 they run at ~45% of a bf16 GEMM. There we dequantize column chunks of W^T to bf16
  with a few vectorised torch ops (cache-sized chunks) and run the bf16 GEMM.
* float32 activations (reference mode, and what the original ChatGLM-6B CPU kernels compute): dequantize exactly
  to fp32 (``q * scale`` with the stored scale, no rounding of the weight) and use an fp32 GEMM.
* CUDA: INT4 group weights take torch's own INT4 kernel (``aten._weight_int4pack_mm``, the tinygemm layout built
  by ``aten._convert_weight_to_int4pack``; bf16, compute capability 8.0+); INT8 and what that kernel does not
  take dequantize to the activation dtype and matmul (as THUDM's W8A16Linear does). Not run here: no GPU.

The CPU int4 kernel wants its own weight layout, produced by ``aten._convert_weight_to_int4pack_for_cpu``, which
depends on the CPU's vector width. It is built at load time (never saved) and read back by ``int4pack_to_int``
after a probe of the layout (``int4pack_block_n``). Its rows come in blocks of 64 (AVX-512) or 32 (AVX2): a
weight whose row count is not a multiple is padded with zero rows (ChatGLM-6B's 130528-row output layer: 32 rows).
`glmkit quantize` saves this layout as it is, with its block size in the metadata, so that a saved model maps
straight into memory; a machine with another block size, and CUDA, convert it. The portable THUDM packing below
is what `export()` and THUDM ``quantization_bit`` checkpoints use.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading

import torch

# ------------------------------------------------------------------------------------------------ weight memory

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


@functools.lru_cache(maxsize=None)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


def weight_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty for a large weight the kernels stream through once per token. On Linux it asks for 2 MB pages
    before the memory is first touched (transparent huge pages, which Linux gives in "madvise" mode only when
    asked): measured here, the INT4 kernel reads such weights ~6% faster and the INT8 one 10-20% faster (one TLB
    entry per 2 MB, and the hardware prefetchers do not stop every 4 KB). A hint: elsewhere, or when the kernel
    declines, the tensor is the same with small pages."""
    t = torch.empty(shape, dtype=dtype)
    madvise = _madvise()
    nbytes = t.numel() * t.element_size()
    if madvise is not None and nbytes >= 4 * _HUGE_PAGE:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # the result is ignored: only a hint
    return t


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


# ------------------------------------------------------------------------------------------------ THUDM packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Packs signed 4-bit values ([N, K] int8 in [-8, 7], K even) two per byte, THUDM order.

    The even column goes to the HIGH nibble: ``byte = (q[:, 2i] << 4) | (q[:, 2i + 1] & 0xF)``, as ChatGLM-6B's
    ``compress_int4_weight`` writes ``quantization_bit: 4`` checkpoints.
    """
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4 needs an [N, K] tensor with even K, got shape {tuple(q.shape)}")
    q = q.to(torch.int8)
    return ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: [N, K/2] int8 -> [N, K] int8 in [-8, 7] (arithmetic shifts keep the sign)."""
    if packed.dim() != 2:
        raise ValueError(f"unpack_int4 needs an [N, K/2] tensor, got shape {tuple(packed.shape)}")
    p = packed.view(torch.int8) if packed.dtype == torch.uint8 else packed.to(torch.int8)
    high = p >> 4
    low = (p << 4) >> 4
    return torch.stack((high, low), dim=-1).reshape(p.shape[0], p.shape[1] * 2)


# ------------------------------------------------------------------------------------------------ CPU int4pack


@functools.lru_cache(maxsize=None)
def int4pack_block_n() -> int | None:
    """Rows per block of this CPU's ``_convert_weight_to_int4pack_for_cpu`` layout (64 on AVX-512, 32 on AVX2).

    The layout is [N/B, K, B/2] bytes; in each byte the low nibble holds row ``r`` and the high nibble row
    ``r + B/2`` of the block. We probe it instead of trusting the CPU flags; None = unknown layout, use the
    portable path.
    """
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    for block in (64, 32):
        u = torch.randint(0, 16, (block, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(block))
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 8)
        except RuntimeError:
            return None
        if _int4pack_unpack(packed, block, 64, block).equal(u.to(torch.uint8)):
            return block
    return None


def _int4pack_unpack(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    v = packed.reshape(n // block, k, block // 2)
    both = torch.cat((v & 0xF, v >> 4), dim=2)  # [NB, K, B]: rows of the block in order
    return both.permute(0, 2, 1).reshape(n, k)


def int4pack_supported(n: int, k: int, group_size: int) -> bool:
    """Whether an [N, K] weight with this group size can take the CPU int4pack layout (any N: the layout is
    padded to whole blocks of rows, e.g. ChatGLM-6B's 130528-row output layer to 130560)."""
    block = int4pack_block_n()
    return block is not None and n > 0 and group_size in (32, 64, 128, 256) and k % group_size == 0


def int4pack_rows(n: int, block: int | None = None) -> int:
    """Rows of the int4pack layout for N rows: N rounded up to whole blocks (padding rows are zero weights)."""
    block = block or int4pack_block_n()
    return -(-n // block) * block


def int_to_int4pack(q: torch.Tensor, rows_per_chunk: int | None = None) -> torch.Tensor:
    """Signed [N, K] int8 in [-8, 7] -> the CPU kernel's packed uint8 [N_pad, K/2] (N_pad = int4pack_rows(N); the
    padding rows hold q = 0). Chunked over rows (default ~1M weights) so the int32 temporary the converter needs
    stays small (blocks of rows are independent)."""
    block = int4pack_block_n()
    if block is None:
        raise ValueError("this CPU has no int4pack layout glmkit knows")
    n, k = q.shape
    n_pad = int4pack_rows(n, block)
    out = weight_buffer((n_pad, k // 2), torch.uint8)
    if rows_per_chunk is None:
        rows_per_chunk = 2**20 // max(k, 1)
    step = max(block, rows_per_chunk // block * block)
    for a in range(0, n_pad, step):
        u = torch.full((min(step, n_pad - a), k), 8, dtype=torch.int32)
        part = q[a:a + step]
        u[:part.shape[0]] += part
        out[a:a + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 8).view(-1, k // 2)
    return out


def int4pack_to_int(packed: torch.Tensor, n: int, k: int, block: int | None = None) -> torch.Tensor:
    """Inverse of :func:`int_to_int4pack`: the signed [N, K] int8 values (padding rows dropped). `block`: the
    layout's rows per block when it came from another machine (default: this CPU's)."""
    block = block or int4pack_block_n()
    return (_int4pack_unpack(packed, packed.shape[0], k, block)[:n].to(torch.int8) - 8)


def int4pack_lookup(packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, k: int, ids: torch.Tensor,
                    dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `ids` (any shape) of the weight in the int4pack layout -> [*ids.shape, K] in `dtype`: what an
    embedding lookup into a quantized table reads. (u - 8) * s + z in fp32 (the value the matmul kernels use),
    or (u - 8) * row_scale with exact per-row scales, then cast."""
    block = int4pack_block_n()
    half = block // 2
    flat = ids.reshape(-1)
    r = flat % block
    v = packed.view(-1, k, half)  # [NB, K, B/2]
    raw = v[flat // block, :, r % half]  # [T, K] bytes holding the rows
    u = torch.where((r >= half)[:, None], raw >> 4, raw & 0xF)
    w = u.float().sub_(8)
    if row_scale is not None:
        w.mul_(row_scale[flat].float()[:, None])
    else:
        sz = scale_zero[:, flat].float()  # [K/group, T, 2]
        wv = w.view(-1, k // group_size, group_size)
        wv.mul_(sz[..., 0].t().unsqueeze(-1)).add_(sz[..., 1].t().unsqueeze(-1))
    return w.to(dtype).view(*ids.shape, k)


_WORKSPACE: dict[tuple, torch.Tensor] = {}


def _workspace(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A scratch buffer reused across calls (one per thread). Fresh multi-MB allocations would be returned to the
    OS on free and page-faulted in again on every layer, which costs about as much as the dequantization."""
    key = (name, dtype, threading.get_ident())
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        # A normal tensor even when the first call runs under inference_mode: an inference tensor could not be
        # written in place later under no_grad, plain calls or training.
        with torch.inference_mode(False):
            buf = _WORKSPACE[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


# Nibble masks applied to 8 packed bytes at a time: int64 bitwise ops run ~2.5x faster than the same ops on the
# strided uint8 view (and are endian-neutral: every byte gets the same mask).
_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
_HIGH_NIBBLES = 0xF0F0F0F0F0F0F0F0 - (1 << 64)  # as a signed int64


def _int4pack_nibbles_t(packed: torch.Tensor, k: int, b0: int, b1: int, high_times_16: bool) -> torch.Tensor:
    """The nibbles of W^T[:, b0*B:b1*B] from the int4pack layout as uint8 [K, nb, B] in a workspace buffer: the
    low nibbles (rows r of each block) in [..., :B/2], the high ones (rows r + B/2) in [..., B/2:], either as u
    or, with high_times_16, as 16u (one AND, no shift)."""
    block = int4pack_block_n()
    words = block // 16  # int64 words per half block row
    nb = b1 - b0
    v = packed.view(-1, k, block // 2)[b0:b1].view(torch.int64).permute(1, 0, 2)  # [K, nb, words]
    u = _workspace("u", k * nb * block, torch.uint8).view(k, nb, block)
    u64 = u.view(torch.int64)  # [K, nb, 2 * words]
    torch.bitwise_and(v, _LOW_NIBBLES, out=u64[:, :, :words])
    if high_times_16:
        torch.bitwise_and(v, _HIGH_NIBBLES, out=u64[:, :, words:])
    else:
        torch.bitwise_and(torch.bitwise_right_shift(v, 4), _LOW_NIBBLES, out=u64[:, :, words:])
    return u


def _int4pack_unpack_t(packed: torch.Tensor, k: int, b0: int, b1: int, dtype: torch.dtype) -> torch.Tensor:
    """The unsigned nibbles u (0..15) of W^T[:, b0*B:b1*B] from the int4pack layout, as `dtype` [K, cols], in a
    workspace buffer (valid until the next call)."""
    u = _int4pack_nibbles_t(packed, k, b0, b1, high_times_16=False)
    wt = _workspace("wt", u.numel(), dtype).view(k, -1)
    return wt.copy_(u.view(k, -1))


def _int4pack_dequant_t(packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, k: int, b0: int, b1: int,
                        row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W^T[:, b0*B:b1*B] in fp32 from the int4pack layout, (u - 8) * s + z with u the unsigned nibble, or
    (u - 8) * row_scale with the stored per-row scales. Exact up to one rounding for + z ((u - 8) * s is exact):
    the value the fused kernel computes. Lives in a workspace buffer (valid until the next call)."""
    block = int4pack_block_n()
    cols = slice(b0 * block, b1 * block)
    wt = _int4pack_unpack_t(packed, k, b0, b1, torch.float32).sub_(8)
    if row_scale is not None:
        return wt.mul_(row_scale[cols].float()[None, :])
    view = wt.view(k // group_size, group_size, -1)
    view.mul_(scale_zero[:, cols, 0].float().unsqueeze(1)).add_(scale_zero[:, cols, 1].float().unsqueeze(1))
    return wt


# Weights dequantized at a time on the prefill path. Each torch op costs a thread fork/join, which gets expensive
# on a busy machine, so a layer is done in as few chunks as this bound allows (the largest ChatGLM-6B layer, 67M
# weights, in 3); the scratch buffers (~3 bytes per weight of a chunk) are kept for reuse.
_CHUNK_WEIGHTS = 24 * 2**20
# up to this many rows the fused int4/int8 kernels beat dequantize + GEMM (measured crossovers ~64 and ~8)
INT4_FUSED_MAX_ROWS = 48
INT8_FUSED_MAX_ROWS = 8


def _chunks(units: int, weights_per_unit: int) -> list[tuple[int, int]]:
    """Splits `units` (blocks of rows) into the fewest near-equal chunks of at most _CHUNK_WEIGHTS weights."""
    count = max(1, -(-units * weights_per_unit // _CHUNK_WEIGHTS))
    step = -(-units // count)
    return [(a, min(units, a + step)) for a in range(0, units, step)]


def _padded(row_scale: torch.Tensor | None, n_pad: int) -> torch.Tensor | None:
    """Per-row scales extended with zeros to the padded rows of the int4pack layout."""
    if row_scale is None or row_scale.shape[0] == n_pad:
        return row_scale
    return torch.cat((row_scale, row_scale.new_zeros(n_pad - row_scale.shape[0])))


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                    n: int, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] for a weight in the CPU int4pack layout (packed [N_pad, K/2], padded to whole
    blocks); scale_zero [K/group, N_pad, 2] bf16 (s, z) with W = (u - 8) * s + z. `row_scale`: exact per-row
    scales used instead on the fp32 path (THUDM's fp16 scales are not all bf16 values)."""
    m, k = x.shape
    n_pad = packed.shape[0]
    if x.dtype == torch.bfloat16 and m <= INT4_FUSED_MAX_ROWS:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scale_zero)
        return out if n_pad == n else out[:, :n]
    block = int4pack_block_n()
    chunks = _chunks(n_pad // block, k * block)
    if x.dtype == torch.float32:
        row_scale = _padded(row_scale, n_pad)
        out = torch.empty(m, n_pad, dtype=torch.float32)
        for b0, b1 in chunks:
            out[:, b0 * block:b1 * block] = x @ _int4pack_dequant_t(packed, scale_zero, group_size, k, b0, b1,
                                                                    row_scale)
        return out[:, :n]
    # bf16 prefill: W^T = u * s + (z - 8 s) per group. Only u * s is materialised (in bf16); the zero term is a
    # small GEMM of per-group input sums: x @ (1 (z - 8 s)) = xsum_groups @ (z - 8 s).
    xc = x.to(torch.bfloat16)
    groups = k // group_size
    s = scale_zero[:, :, 0].contiguous()
    z8 = scale_zero[:, :, 1].float().sub_(s.float(), alpha=8)
    out = x.float().view(m, groups, group_size).sum(dim=-1) @ z8  # [M, N] fp32, the zero term
    for b0, b1 in chunks:
        cols = slice(b0 * block, b1 * block)
        out[:, cols] += xc @ _int4pack_scaled_bf16_t(packed, s, group_size, k, b0, b1)
    return out[:, :n].to(x.dtype)


def _int4pack_scaled_bf16_t(packed: torch.Tensor, s: torch.Tensor, group_size: int, k: int, b0: int, b1: int
                            ) -> torch.Tensor:
    """u * s of W^T[:, b0*B:b1*B] in bf16 (s [K/group, N] bf16), in a workspace buffer. The high nibbles are
    taken as 16u (an AND without the shift) and scaled by s/16: the same bf16 values, since scaling by a power
    of two commutes with rounding."""
    block = int4pack_block_n()
    half = block // 2
    nb = b1 - b0
    u = _int4pack_nibbles_t(packed, k, b0, b1, high_times_16=True)
    wt = _workspace("wt", k * nb * block, torch.bfloat16).view(k, nb * block).copy_(u.view(k, nb * block))
    groups = k // group_size
    scale = s[:, b0 * block:b1 * block].reshape(groups, nb, block).clone()
    scale[:, :, half:].div_(16)
    wt.view(groups, group_size, nb * block).mul_(scale.view(groups, 1, nb * block))
    return wt


def int4pack_dequantize(packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, n: int, k: int,
                        dtype: torch.dtype = torch.float32, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The whole [N, K] weight (for inspection and tests), chunk by chunk so the workspace stays small."""
    block = int4pack_block_n()
    n_pad = packed.shape[0]
    row_scale = _padded(row_scale, n_pad)
    out = torch.empty(n_pad, k, dtype=dtype)
    for b0, b1 in _chunks(n_pad // block, k * block):
        out[b0 * block:b1 * block] = _int4pack_dequant_t(packed, scale_zero, group_size, k, b0, b1, row_scale).t()
    return out[:n]


def int4pack_linear_transposed(g: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                               n: int, k: int, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """g [M, N] @ W -> [M, K] in fp32 (the input gradient), one chunk of W's rows at a time."""
    block = int4pack_block_n()
    n_pad = packed.shape[0]
    row_scale = _padded(row_scale, n_pad)
    out = torch.zeros(g.shape[0], k, dtype=torch.float32)
    g = g.float()
    if n_pad != n:
        g = torch.cat((g, g.new_zeros(g.shape[0], n_pad - n)), dim=1)
    for b0, b1 in _chunks(n_pad // block, k * block):
        wt = _int4pack_dequant_t(packed, scale_zero, group_size, k, b0, b1, row_scale)
        out.addmm_(g[:, b0 * block:b1 * block], wt.t())
    return out


# ------------------------------------------------------------------------------------------------ INT8 (per row)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [M, K] @ (q * scale[:, None])^T; q [N, K] int8, scale [N] (fp16/fp32, the stored values)."""
    m, k = x.shape
    n = q.shape[0]
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and m <= INT8_FUSED_MAX_ROWS:
        s = scale_bf16 if scale_bf16 is not None else scale.to(torch.bfloat16)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, s)
    if x.device.type != "cpu":
        w = q.to(x.dtype) * scale.to(x.dtype)[:, None]
        return x @ w.t()
    if x.dtype == torch.float32:
        # exact dequantization in fp32, as ChatGLM-6B's extract_int8_weight_to_float, then an fp32 GEMM
        out = torch.empty(m, n, dtype=torch.float32)
        rows = max(1, _CHUNK_WEIGHTS // k)
        s32 = scale.float()
        for a in range(0, n, rows):
            w = q[a:a + rows].float().mul_(s32[a:a + rows, None])
            out[:, a:a + rows] = x @ w.t()
        return out
    # bf16/fp16 prefill: the per-row scale factors out of the GEMM: (x @ q^T) * scale
    xc = x.to(torch.bfloat16)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    for a, b in _chunks(n, k):
        chunk = q[a:b]
        w = _workspace("wt", chunk.numel(), torch.bfloat16).view(chunk.shape).copy_(chunk)
        out[:, a:b] = xc @ w.t()
    out.mul_(scale.to(torch.bfloat16))
    return out.to(x.dtype)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(torch.float32).mul_(scale.float()[:, None]).to(dtype)


# ------------------------------------------------------------------------------------------------ portable INT4


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Signed [N, K] int values with per-group scale/zero [N, K/group] (or per-row [N]): q * s + z, in fp32 then
    cast (exact in fp32 for the stored fp16/bf16 scales)."""
    n, k = q.shape
    w = q.to(torch.float32)
    if scale.dim() == 1:
        w.mul_(scale.float()[:, None])
        return w.to(dtype)
    g = k // group_size
    wv = w.view(n, g, group_size)
    wv.mul_(scale.float().view(n, g, 1))
    if zero is not None:
        wv.add_(zero.float().view(n, g, 1))
    return w.to(dtype)


def int4_linear_portable(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                         group_size: int) -> torch.Tensor:
    """x @ W^T for the THUDM-packed layout on any device: dequantize row chunks to the activation dtype."""
    m, k = x.shape
    n = packed.shape[0]
    dtype = x.dtype
    if x.device.type != "cpu":
        w = int4_dequantize(unpack_int4(packed), scale, zero, group_size, dtype)
        return x @ w.t()
    if dtype not in (torch.float32, torch.bfloat16):
        dtype = torch.bfloat16  # CPU fp16 GEMMs are very slow; compute in bf16
    xc = x.to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    rows = max(1, _CHUNK_WEIGHTS // k)
    for a in range(0, n, rows):
        zr = zero[a:a + rows] if zero is not None else None
        w = int4_dequantize(unpack_int4(packed[a:a + rows]), scale[a:a + rows], zr, group_size, dtype)
        out[:, a:a + rows] = xc @ w.t()
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ CUDA INT4


def tinygemm_inner_k_tiles(k: int) -> int | None:
    """Inner K tiles of torch's CUDA int4 layout for in_features K (the kernel needs K % (tiles * 16) == 0)."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    return None


def tinygemm_supported(n: int, k: int, group_size: int, device: torch.device) -> bool:
    """Whether torch's CUDA INT4 kernel (`_weight_int4pack_mm`, the tinygemm layout; bf16 tensor cores, so
    compute capability 8.0+) takes an [N, K] weight with this group size on `device`."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    return (n % 8 == 0 and group_size in (32, 64, 128, 256) and k % group_size == 0
            and tinygemm_inner_k_tiles(k) is not None)


def int_to_tinygemm(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Signed [N, K] int8 in [-8, 7] -> the CUDA kernel's int32 layout on `device`. Its converter takes the
    unsigned values u = q + 8 two per byte, the even column in the high nibble (THUDM's order, unsigned)."""
    u = (q.to(device=device, dtype=torch.int16) + 8).to(torch.uint8)
    packed = ((u[:, 0::2] << 4) | u[:, 1::2]).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(packed, tinygemm_inner_k_tiles(q.shape[1]))


def tinygemm_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int
                    ) -> torch.Tensor:
    """x [M, K] @ W^T on CUDA with W = (u - 8) * s + z in the tinygemm layout (scale_zero [K/group, N, 2] bf16,
    the same table as the CPU layout's). The kernel computes in bf16; other activation dtypes are cast."""
    out = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, group_size, scale_zero)
    return out.to(x.dtype)


def tinygemm_to_int(packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, n: int, k: int
                    ) -> torch.Tensor:
    """Inverse of :func:`int_to_tinygemm` through the kernel itself: with s = 1 and z = 0 it returns u - 8, and
    multiplying the identity gives W^T a block of rows at a time (integers, exact in bf16)."""
    unit = torch.zeros_like(scale_zero)
    unit[..., 0] = 1
    out = torch.empty(n, k, dtype=torch.int8, device=packed.device)
    step = 1024
    for a in range(0, k, step):
        eye = torch.zeros(min(step, k - a), k, dtype=torch.bfloat16, device=packed.device)
        eye[:, a:a + step].fill_diagonal_(1)
        out[:, a:a + step] = torch.ops.aten._weight_int4pack_mm(eye, packed, group_size, unit).t().to(torch.int8)
    return out
