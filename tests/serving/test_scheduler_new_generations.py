"""The continuous-batching engine (paged KV cache, length groups) runs GLM-4.5's MoE layers and GLM-4.7-Flash's
latent attention: staggered requests get exactly the greedy tokens each gets alone through core.generate."""

from __future__ import annotations

import pytest
import torch

from glmkit.core import paged_cache
from glmkit.serving.protocol import SamplingParams
from tests.helpers.chat_models import TOOL_DATA
from tests.serving.test_scheduler import alone, make_engine, prompts, run  # noqa: F401 (make_engine: a fixture)

transformers = pytest.importorskip("transformers")


def tiny_checkpoint(folder, kind):
    """transformers' tiny random glm4_moe / glm4_moe_lite with the test GLM-4 tokenizer's vocabulary."""
    from glmkit import load_model, load_tokenizer

    tok = load_tokenizer(TOOL_DATA / "glm4")
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, moe_intermediate_size=12, n_routed_experts=8,
                  num_experts_per_tok=2, pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])
    torch.manual_seed(0)
    if kind == "glm4_moe":
        model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(
            **common, num_key_value_heads=2, head_dim=8, n_group=2, topk_group=1, use_qk_norm=True))
    else:
        model = transformers.Glm4MoeLiteForCausalLM(transformers.Glm4MoeLiteConfig(
            **common, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_model(folder, dtype="float32").eval(), load_tokenizer(folder)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["glm4_moe", "glm4_moe_lite"])
def test_engine_serves_moe_and_latent_attention(tmp_path, kind, make_engine, monkeypatch):  # noqa: F811
    model, tok = tiny_checkpoint(tmp_path / kind, kind)
    monkeypatch.setattr(paged_cache, "GROUP_COST_BYTES", 0)  # decode in length groups too
    engine = make_engine(model, tok, max_batch_size=4, block_size=4, prefill_chunk=5)
    sizes = [5, 17, 9, 20, 12, 15]
    requests = [(ids, SamplingParams(max_new_tokens=n)) for ids, n in zip(prompts(model, tok), sizes)]
    expected = [alone(model, tok, ids, p) for ids, p in requests]
    results, _ = run(engine, requests, [0.0, 0.005, 0.01, 0.03, 0.06, 0.1])
    assert [r[0] for r in results] == expected
    assert any(len(e) == n for e, n in zip(expected, sizes)), "the model stopped every answer early"
    assert engine.stats["largest_batch"] > 1
    assert engine.kv_blocks()[0] == 0
