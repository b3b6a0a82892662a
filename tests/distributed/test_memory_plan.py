"""The per-device memory plan of GLM-130B, from its real shapes: what its README says fits where."""

from __future__ import annotations

import pytest

from glmkit.core.config import GLMConfig
from glmkit.distributed.plan import GIB, format_plan, glm130b_plan, memory_plan


def test_glm130b_fits_where_its_readme_says():
    plans = {(p.setup, p.bits): p for p in glm130b_plan()}
    assert plans[("8x A100-40G", 16)].fits
    assert plans[("8x RTX 3090", 8)].fits and not plans[("4x RTX 3090", 8)].fits
    assert plans[("4x RTX 3090", 4)].fits and plans[("8x RTX 2080 Ti", 4)].fits
    assert not plans[("8x RTX 2080 Ti", 8)].fits and not plans[("4x RTX 3090", 16)].fits
    # ~130B parameters in fp16 over 8 devices
    assert 29 < plans[("8x A100-40G", 16)].weights / GIB < 31
    assert "| 4x RTX 3090 | INT4 |" in format_plan(list(plans.values()))


def test_plan_counts_the_shards_of_every_tensor():
    c = GLMConfig.from_name("glm-130b", hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=96,
                            vocab_size=256)
    one, two = memory_plan(c, 1), memory_plan(c, 2)
    replicated = (2 * 2 * 64 * 2 + 2 * 64) * 2 + 2 * 64 * 2 * 2  # norms, row-parallel biases (fp16)
    assert two.weights == (one.weights - replicated) // 2 + replicated
    q4 = memory_plan(c, 2, 4)
    assert q4.weights < two.weights / 2
    with pytest.raises(ValueError, match="does not split"):
        memory_plan(c, 3)
