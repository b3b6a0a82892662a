"""memory-plan for GLM-4.5, GLM-4.5-Air and GLM-4.7-Flash: parameter counts and bytes against hand computation from
the published config.json values (glmkit.core.presets.HF_PRESETS)."""

import pytest

from glmkit.core.config import GLMConfig
from glmkit.distributed.plan import GIB, memory_plan


def glm45_params(h, layers, dense, heads, kv, hd, ffn, moe_ffn, experts, shared, vocab, qk_norm):
    """(total, router) parameters of a glm4_moe model without its MTP layer, by hand."""
    attn = h * (heads + 2 * kv) * hd + (heads + 2 * kv) * hd + heads * hd * h + 2 * h  # qkv + bias, proj, 2 norms
    attn += 2 * hd if qk_norm else 0
    router = experts * h
    moe = experts * 3 * h * moe_ffn + shared * 3 * h * moe_ffn + router
    total = 2 * vocab * h + h + layers * attn + dense * 3 * h * ffn + (layers - dense) * moe
    return total, (layers - dense) * router


def test_glm45_air_and_glm45_parameter_counts_and_bf16_bytes():
    air = glm45_params(4096, 46, 1, 96, 8, 128, 10944, 1408, 128, 1, 151552, False)
    full = glm45_params(5120, 92, 3, 96, 8, 128, 12288, 1536, 160, 1, 151552, True)
    assert round(air[0] / 1e9) == 107 and round(full[0] / 1e9) == 353  # "106B-A12B" / "355B-A32B" with MTP
    for name, (total, router) in (("glm-4.5-air", air), ("glm-4.5", full)):
        plan = memory_plan(GLMConfig.from_name(name), 1, 16, seq_len=4096)
        assert plan.parameters == total
        assert plan.weights == 2 * total + 2 * router  # bf16, the router in fp32
        assert plan.kv_cache == (46 if name == "glm-4.5-air" else 92) * 2 * 8 * 128 * 4096 * 2


def test_glm47_flash_latent_attention_and_tensor_parallel_split():
    h, layers, heads, vocab = 2048, 47, 20, 154880
    attn = (h * 768 + 768 + 768 * heads * 256  # q_a, its norm, q_b (192 + 64 per head)
            + h * (512 + 64) + 512 + 512 * heads * (192 + 256)  # kv_a, its norm, kv_b
            + heads * 256 * h + 2 * h)  # proj, the two layer norms
    moe = 64 * 3 * h * 1536 + 3 * h * 1536 + 64 * h
    total = 2 * vocab * h + h + layers * attn + 3 * h * 10240 + (layers - 1) * moe
    config = GLMConfig.from_name("glm-4.7-flash")
    one = memory_plan(config, 1, 16, seq_len=1000)
    assert one.parameters == total and round(total / 1e9, 1) == 29.9
    assert one.kv_cache == layers * 2 * (512 + 64) * 1000 * 2  # the latent row, in the cache's k and v slots
    two = memory_plan(config, 2, 16, seq_len=1000)
    replicated = layers * (h * 768 + 768 + h * 576 + 512 + 2 * h) + h + (layers - 1) * 64 * h
    assert two.parameters == (total - replicated) // 2 + replicated
    assert two.kv_cache == one.kv_cache  # every rank holds the whole latent cache
    # INT4: every linear of the layers packed (half a byte) with one fp16 scale per row; fits a 24 GB machine
    int4 = memory_plan(config, 1, 4, seq_len=8192, device_memory=24 * GIB)
    assert int4.fits and int4.weights < one.weights / 3


def test_expert_parallel_and_bad_degrees():
    config = GLMConfig.from_name("glm-4.5")
    tp = memory_plan(config, 8, 8, seq_len=1024)
    ep = memory_plan(config, 8, 8, seq_len=1024, expert_parallel=True)
    assert ep.parameters == tp.parameters and ep.expert_parallel  # the same bytes, spread by expert
    sixteen = memory_plan(config, 16, 16, seq_len=1024, expert_parallel=True)
    assert sixteen.kv_cache == tp.kv_cache  # 8 K/V heads over 16 ranks: one head per rank, replicated
    with pytest.raises(ValueError, match="num_experts 64 does not split over 5"):
        memory_plan(GLMConfig.from_name("glm-4.7-flash"), 5, 16, expert_parallel=True)
    with pytest.raises(ValueError, match="expert parallelism needs"):
        memory_plan(GLMConfig.from_name("glm-4-9b-chat"), 2, 16, expert_parallel=True)
