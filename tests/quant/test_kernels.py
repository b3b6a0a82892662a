"""glmkit.quant.kernels: THUDM INT4 packing, the CPU int4pack layout, and every matmul path against a plain reference."""

import pytest
import torch

from glmkit.quant import kernels
from tests.helpers.checkpoints import int4pack_with_block


def test_pack_int4_hand_made_high_nibble_is_even_column():
    q = torch.tensor([[1, -2, 3, 4], [-8, 7, 0, -1]], dtype=torch.int8)
    packed = kernels.pack_int4(q)
    # (1 << 4) | (-2 & 0xF) = 0x1E; (3 << 4) | 4 = 0x34; (-8 << 4) | 7 = 0x87; (0 << 4) | 0xF = 0x0F
    expected = torch.tensor([[0x1E, 0x34], [0x87, 0x0F]], dtype=torch.uint8).view(torch.int8)
    assert packed.dtype == torch.int8
    assert torch.equal(packed, expected)
    assert torch.equal(kernels.unpack_int4(packed), q)


def test_unpack_int4_hand_made_bytes():
    # 0x7F: high nibble 7 (column 0), low nibble 0xF = -1 (column 1); 0x80: -8 then 0
    packed = torch.tensor([[0x7F, 0x80]], dtype=torch.uint8).view(torch.int8)
    assert kernels.unpack_int4(packed).tolist() == [[7, -1, -8, 0]]


def test_pack_unpack_round_trip_random():
    q = torch.randint(-8, 8, (37, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kernels.unpack_int4(kernels.pack_int4(q)), q)


def test_pack_int4_rejects_odd_columns():
    with pytest.raises(ValueError, match="even K"):
        kernels.pack_int4(torch.zeros(2, 3, dtype=torch.int8))


needs_int4pack = pytest.mark.skipif(kernels.int4pack_block_n() is None,
                                    reason="this CPU's int4pack layout is not one glmkit knows (portable path only)")


@needs_int4pack
def test_int4pack_layout_round_trip():
    block = kernels.int4pack_block_n()
    q = torch.randint(-8, 8, (2 * block, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = kernels.int_to_int4pack(q, rows_per_chunk=block)  # several chunks
    assert packed.shape == (2 * block, 128) and packed.dtype == torch.uint8
    assert torch.equal(kernels.int4pack_to_int(packed, 2 * block, 256), q)


def _group_params(n, k, gs, seed=2):
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(k // gs, n, generator=g) * 0.1 + 0.01).bfloat16()
    z = (torch.randn(k // gs, n, generator=g) * 0.05).bfloat16()
    return s, z


@needs_int4pack
@pytest.mark.parametrize("rows", [1, 3, 70])  # fused kernel, and dequantize + GEMM past INT4_FUSED_MAX_ROWS
def test_int4pack_linear_matches_reference(rows):
    n, k, gs = 128, 256, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s, z = _group_params(n, k, gs)
    packed = kernels.int_to_int4pack(q)
    sz = torch.stack((s, z), dim=-1).contiguous()
    w = q.float().view(n, k // gs, gs) * s.t().float()[..., None] + z.t().float()[..., None]
    w = w.view(n, k)
    assert torch.equal(kernels.int4pack_dequantize(packed, sz, gs, n, k), w)
    x = torch.randn(rows, k, generator=g)
    ref = x @ w.t()
    # fp32: exact dequantization, only the GEMM's summation order differs
    torch.testing.assert_close(kernels.int4pack_linear(x, packed, sz, gs, n), ref, rtol=1e-5, atol=1e-5)
    # bf16: fused kernel (few rows) or bf16 dequantize + GEMM
    y = kernels.int4pack_linear(x.bfloat16(), packed, sz, gs, n)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()) < 1e-2
    g_out = torch.randn(rows, n, generator=g)
    torch.testing.assert_close(kernels.int4pack_linear_transposed(g_out, packed, sz, gs, n, k), g_out @ w,
                               rtol=1e-5, atol=1e-5)


@needs_int4pack
def test_int4pack_row_scale_fp32_path_is_exact():
    n, k = 64, 128
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) * 0.01 + 1e-3).half()  # fp16 scales, not all representable in bf16
    packed = kernels.int_to_int4pack(q)
    sz = torch.stack((scale.bfloat16()[None].expand(k // 128, n), torch.zeros(k // 128, n, dtype=torch.bfloat16)),
                     dim=-1).contiguous()
    x = torch.randn(5, k, generator=g)
    w = q.float() * scale.float()[:, None]
    torch.testing.assert_close(kernels.int4pack_linear(x, packed, sz, 128, n, row_scale=scale), x @ w.t(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 40])  # fused int8 kernel, and bf16 GEMM on int8 -> bf16 chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_reference(rows, dtype):
    n, k = 96, 128
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) * 0.01 + 1e-4).half()
    x = torch.randn(rows, k, generator=g)
    ref = x @ (q.float() * scale.float()[:, None]).t()
    y = kernels.int8_linear(x.to(dtype), q, scale)
    assert y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:
        assert ((y.float() - ref).norm() / ref.norm()) < 1e-2


def test_portable_int4_path_matches_int4_dequantize():
    n, k, gs = 96, 128, 32  # n not a multiple of the int4pack block: the portable layout is what runs
    g = torch.Generator().manual_seed(6)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, k // gs, generator=g) * 0.1).bfloat16()
    z = (torch.randn(n, k // gs, generator=g) * 0.01).bfloat16()
    w = kernels.int4_dequantize(q, s, z, gs)
    torch.testing.assert_close(w.view(n, k // gs, gs), q.float().view(n, -1, gs) * s.float()[..., None]
                               + z.float()[..., None])
    x = torch.randn(7, k, generator=g)
    torch.testing.assert_close(kernels.int4_linear_portable(x, kernels.pack_int4(q), s, z, gs), x @ w.t(),
                               rtol=1e-5, atol=1e-5)


@needs_int4pack
def test_prefill_scaled_chunk_is_exactly_u_times_s():
    """The bf16 prefill reads high nibbles as 16u against s/16: the bf16 values of u * s, bit for bit."""
    n, k, gs = 128, 256, 32
    block = kernels.int4pack_block_n()
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(k // gs, n, generator=g) * 0.03 + 1e-5).bfloat16()
    packed = kernels.int_to_int4pack(q)
    u = (q.to(torch.int16) + 8).t()  # W^T's unsigned nibbles [K, N]
    expected = (u.to(torch.bfloat16).view(k // gs, gs, n) * s[:, None, :]).view(k, n)
    got = kernels._int4pack_scaled_bf16_t(packed, s, gs, k, 0, n // block)
    assert got.dtype == torch.bfloat16 and got.equal(expected)


@needs_int4pack
@pytest.mark.parametrize("rows", [1, 70])  # fused kernel, and dequantize + GEMM
def test_int4pack_pads_rows_to_whole_blocks(rows):
    """N not a multiple of the block (ChatGLM-6B's 130528-row output layer is 32 rows short of one): the layout
    gets zero rows up to the block and every path returns exactly N outputs."""
    block = kernels.int4pack_block_n()
    n, k, gs = block + 36, 128, 32
    g = torch.Generator().manual_seed(8)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    packed = kernels.int_to_int4pack(q)
    n_pad = kernels.int4pack_rows(n)
    assert n_pad == 2 * block and packed.shape == (n_pad, k // 2)
    assert torch.equal(kernels.int4pack_to_int(packed, n, k), q)
    assert torch.equal(kernels.int4pack_to_int(packed, n_pad, k)[n:], torch.zeros(n_pad - n, k, dtype=torch.int8))
    s, z = _group_params(n, k, gs)
    sz = torch.zeros(k // gs, n_pad, 2, dtype=torch.bfloat16)
    sz[:, :n, 0], sz[:, :n, 1] = s, z
    w = (q.float().view(n, k // gs, gs) * s.t().float()[..., None] + z.t().float()[..., None]).view(n, k)
    assert torch.equal(kernels.int4pack_dequantize(packed, sz, gs, n, k), w)
    x = torch.randn(rows, k, generator=g)
    y = kernels.int4pack_linear(x, packed, sz, gs, n)
    assert y.shape == (rows, n)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)
    yb = kernels.int4pack_linear(x.bfloat16(), packed, sz, gs, n)
    assert yb.shape == (rows, n) and ((yb.float() - x @ w.t()).norm() / (x @ w.t()).norm()) < 1e-2
    g_out = torch.randn(rows, n, generator=g)
    torch.testing.assert_close(kernels.int4pack_linear_transposed(g_out, packed, sz, gs, n, k), g_out @ w,
                               rtol=1e-5, atol=1e-5)
    # rows looked up from the layout (an embedding table) are the dequantized rows, in any index shape
    ids = torch.tensor([[0, n - 1, block - 1], [block, block // 2, 3]])
    torch.testing.assert_close(kernels.int4pack_lookup(packed, sz, gs, k, ids, torch.float32), w[ids], rtol=0, atol=0)
    assert kernels.int4pack_lookup(packed, sz, gs, k, ids, torch.bfloat16).dtype == torch.bfloat16


@needs_int4pack
def test_int4pack_layout_of_another_block_size_converts_back():
    """A layout saved on a CPU with the other block size (64 on AVX-512, 32 on AVX2) reads back with `block=`."""
    block = kernels.int4pack_block_n()
    other = 32 if block == 64 else 64
    q = torch.randint(-8, 8, (2 * other + 64, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(9))
    assert torch.equal(int4pack_with_block(q, block), kernels.int_to_int4pack(q))  # the helper writes aten's layout
    packed = int4pack_with_block(q, other)
    assert torch.equal(kernels.int4pack_to_int(packed, q.shape[0], 64, block=other), q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU with compute capability 8.0+ (torch's INT4 kernel); not run here")
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_tinygemm_linear_matches_reference(rows):
    n, k, gs = 256, 512, 32
    g = torch.Generator().manual_seed(10)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s, z = _group_params(n, k, gs)
    sz = torch.stack((s, z), dim=-1).contiguous().cuda()
    assert kernels.tinygemm_supported(n, k, gs, torch.device("cuda"))
    packed = kernels.int_to_tinygemm(q, torch.device("cuda"))
    assert torch.equal(kernels.tinygemm_to_int(packed, sz, gs, n, k).cpu(), q)
    w = (q.float().view(n, k // gs, gs) * s.t().float()[..., None] + z.t().float()[..., None]).view(n, k)
    x = torch.randn(rows, k, generator=g)
    y = kernels.tinygemm_linear(x.bfloat16().cuda(), packed, sz, gs)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    assert ((y.float().cpu() - x @ w.t()).norm() / (x @ w.t()).norm()) < 1e-2
