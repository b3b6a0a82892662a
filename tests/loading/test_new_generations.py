"""GLM-4-0414 (glm4), GLM-4.5 (glm4_moe) and GLM-4.7-Flash (glm4_moe_lite): tiny random checkpoints written by
transformers (the reference implementation) load through glmkit.load_model and compute what transformers computes."""

import json

import pytest
import torch

import glmkit

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_attention_heads=4, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=None, eos_token_id=[1])


def glm4_config(**kw):
    return transformers.Glm4Config(**{**COMMON, "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 8,
                                      **kw})


def glm4_moe_config(**kw):
    return transformers.Glm4MoeConfig(**{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 2, "head_dim": 8,
                                         "moe_intermediate_size": 12, "n_routed_experts": 8, "num_experts_per_tok": 3,
                                         "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
                                         "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
                                         "use_qk_norm": True, "num_nextn_predict_layers": 1, **kw})


def glm4_moe_lite_config(**kw):
    return transformers.Glm4MoeLiteConfig(**{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4,
                                             "moe_intermediate_size": 12, "n_routed_experts": 8,
                                             "num_experts_per_tok": 2, "n_shared_experts": 1, "kv_lora_rank": 16,
                                             "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 12,
                                             "v_head_dim": 10, **kw})


MODELS = {"glm4": (glm4_config, "Glm4ForCausalLM"), "glm4_moe": (glm4_moe_config, "Glm4MoeForCausalLM"),
          "glm4_moe_lite": (glm4_moe_lite_config, "Glm4MoeLiteForCausalLM")}


def write_reference(tmp_path, kind, seed=0, **kw):
    """transformers' model with larger-than-default random weights (so the comparison means something), saved."""
    make, cls = MODELS[kind]
    torch.manual_seed(seed)
    ref = getattr(transformers, cls)(make(**kw)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    folder = tmp_path / kind
    ref.save_pretrained(folder)
    return ref, folder


IDS = torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_greedy_and_left_padding_match_transformers(tmp_path, kind):
    ref, folder = write_reference(tmp_path, kind)
    ours = glmkit.load_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=3e-5, rtol=1e-5)
        theirs = ref.generate(IDS, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(IDS, max_new_tokens=8, eos_token_id=[]), theirs[:, IDS.shape[1]:])

    # left padding: row 0 is 4 tokens shorter
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)
    torch.testing.assert_close(got[0, 4:], expected[0, 4:], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=3e-5, rtol=1e-5)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]), theirs)


@pytest.mark.parametrize("kind", list(MODELS))
def test_kv_cache_decode_equals_full_forward(tmp_path, kind):
    _, folder = write_reference(tmp_path, kind, seed=3)
    model = glmkit.load_model(folder)
    ids = IDS[:1]
    T = ids.shape[1]
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(1, 32)
        mask = torch.ones(1, 1, T, 32, dtype=torch.bool).tril()
        pre = model(ids[:, :5], position_ids=torch.arange(5)[None], attention_mask=mask[:, :, :5],
                    input_pos=torch.arange(5))
        steps = [model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), attention_mask=mask[:, :, t:t + 1],
                       input_pos=torch.tensor([t])) for t in range(5, T)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat([pre] + steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_routing_picks_transformers_experts_including_ties(tmp_path):
    ref, folder = write_reference(tmp_path, "glm4_moe")
    ours = glmkit.load_model(folder)
    theirs_router, router = ref.model.layers[1].mlp.gate, ours.h[1].mlp.router
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    x[32:] = x[:32]  # repeated rows route alike
    with torch.no_grad():
        router.bias[4:] = router.bias[:4]  # a tie in the correction bias between expert groups
        theirs_router.e_score_correction_bias.copy_(router.bias)
        _, w_ref, i_ref = theirs_router(x)
        w, i = router(x)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(w, w_ref, atol=0, rtol=0)
    with torch.no_grad():  # an all-zero row: every score 0.5, ties everywhere
        z = torch.zeros(1, 32)
        assert torch.equal(router(z)[1], theirs_router(z)[2])


def test_router_stays_fp32_in_bf16_and_config_fields(tmp_path):
    _, folder = write_reference(tmp_path, "glm4_moe")
    model = glmkit.load_model(folder, dtype="bfloat16")
    assert model.h[1].mlp.router.weight.dtype == torch.float32 and model.h[1].mlp.router.bias.dtype == torch.float32
    assert model.h[1].attn.qkv.weight.dtype == torch.bfloat16
    c = model.config
    assert (c.num_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.routed_scaling_factor) == (8, 3, 4, 2, 2.5)
    assert c.mlp_layer_types == ["dense", "sparse", "sparse"] and c.qk_norm and c.rope == "half_split"
    assert c.rotary_dim == 4 and c.num_mtp_layers == 1
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()


def _rewrite(folder, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_mtp_layers_are_skipped_knowingly_and_unknown_weights_fail(tmp_path, caplog):
    ref, folder = write_reference(tmp_path, "glm4_moe")
    # GLM-4.5's hub layout: the MTP block is layer num_hidden_layers (3 here) with its own extra tensors
    mtp = {f"model.layers.3.{k}": torch.randn(32, 32) for k in ("eh_proj.weight", "shared_head.head.weight")}
    mtp.update({f"model.layers.3.{k}": torch.ones(32) for k in ("enorm.weight", "hnorm.weight",
                                                                "shared_head.norm.weight")})
    mtp["model.layers.3.mlp.experts.0.up_proj.weight"] = torch.randn(12, 32)
    _rewrite(folder, lambda sd: sd.update(mtp))
    with caplog.at_level("INFO", logger="glmkit"):
        model = glmkit.load_model(folder)
    assert model.config.extra["mtp_tensors_skipped"] == len(mtp)
    assert "multi-token-prediction" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(IDS).logits, atol=3e-5, rtol=1e-5)

    _rewrite(folder, lambda sd: sd.update({"model.layers.4.enorm.weight": torch.ones(32)}))  # past the MTP layers
    with pytest.raises(glmkit.core.checkpoint.CheckpointError, match="unexpected weight 'model.layers.4"):
        glmkit.load_model(folder)
    _rewrite(folder, lambda sd: (sd.pop("model.layers.4.enorm.weight"),
                                 sd.update({"model.layers.1.mlp.experts.0.extra.weight": torch.ones(3)})))
    with pytest.raises(glmkit.core.checkpoint.CheckpointError, match="unexpected weight"):
        glmkit.load_model(folder)
    _rewrite(folder, lambda sd: (sd.pop("model.layers.1.mlp.experts.0.extra.weight"),
                                 sd.pop("model.layers.1.mlp.experts.5.up_proj.weight")))
    with pytest.raises(glmkit.core.checkpoint.CheckpointError, match="experts.5.fc.weight"):
        glmkit.load_model(folder)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MODELS))
def test_save_model_round_trip_in_transformers_layout(tmp_path, kind):
    ref, folder = write_reference(tmp_path, kind)
    model = glmkit.load_model(folder)
    out = glmkit.save_model(model, tmp_path / "saved", max_shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())  # the hub names, unfused again
    again = glmkit.load_model(out)
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))
    # transformers reads what glmkit wrote
    theirs = getattr(transformers, MODELS[kind][1]).from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ref(IDS).logits, atol=0, rtol=0)


def test_yarn_and_mla_mscale_match_transformers(tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    ref, folder = write_reference(tmp_path, "glm4_moe_lite", rope_parameters=rope)
    ours = glmkit.load_model(folder)
    ids = torch.randint(2, 97, (1, 70), generator=torch.Generator().manual_seed(2))  # past the original 32
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=3e-5, rtol=1e-5)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "partial_rotary_factor": 0.5}
    ref, folder = write_reference(tmp_path / "b", "glm4", rope_parameters=rope)
    ours = glmkit.load_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,targets", [("glm4_moe", "attn.qkv,attn.proj,mlp.fc,mlp.proj"),
                                          ("glm4_moe_lite", "attn.q_a,attn.q_b,attn.kv_a,attn.proj")])
def test_lora_on_attention_and_dense_mlp_merges_exactly(tmp_path, kind, targets):
    from glmkit.adapters.lora import apply_lora, load_lora_adapter, merge_lora, save_lora_adapter

    _, folder = write_reference(tmp_path, kind)
    model = glmkit.load_model(folder)
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, rank=4, target_modules=targets)
    model.eval()  # LoRA dropout off
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
        tuned = model(IDS)
    assert (tuned - base).abs().max() > 1e-3
    save_lora_adapter(model, tmp_path / "adapter")
    again = load_lora_adapter(glmkit.load_model(folder), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), tuned, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merge_lora(model)(IDS), tuned, atol=1e-4, rtol=1e-4)


def test_adapters_give_clear_errors_for_latent_attention(tmp_path):
    from glmkit.adapters.lora import apply_lora
    from glmkit.adapters.ptuning import attach_prefix

    _, folder = write_reference(tmp_path, "glm4_moe_lite")
    model = glmkit.load_model(folder)
    with pytest.raises(ValueError, match="latent attention"):
        apply_lora(model, target_modules="attn.qkv")
    with pytest.raises(ValueError, match="latent attention"):
        attach_prefix(model, 4)
    _, folder = write_reference(tmp_path, "glm4_moe")
    moe = glmkit.load_model(folder)
    with pytest.raises(ValueError, match="do not exist"):
        apply_lora(moe, target_modules="attn.kv_a")
    attach_prefix(moe, 3)  # P-tuning v2 works on GLM-4.5's grouped-KV attention
    with torch.no_grad():
        moe.prefix_encoder.embedding.weight.normal_(0, 1.0)
        assert torch.isfinite(moe(IDS)).all()
